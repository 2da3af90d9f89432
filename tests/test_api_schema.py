"""The search API's OpenAPI schema tells the truth: schemathesis (a third-party fuzzer, pinned in requirements.txt)
with every check against a served index (crops and people found in footage: a video and a full frame): every limit is declared, every answer's status, body and content type
are the ones the schema promises, schema-valid requests are accepted and invalid ones refused, no server error.
(docs/search.md: the same command by hand, with more examples.)"""
import os
import subprocess
import sys

from tests.test_search import tiny_model, tiny_run  # noqa: F401 (session fixtures: a tiny demo workdir)
from tests.test_serve import folder, index_dir  # noqa: F401 (a served index)
from tests.test_serve_footage import footage, footage_holder, footage_live  # noqa: F401

EXAMPLES = int(os.environ.get('IVT_SCHEMATHESIS_EXAMPLES', '100'))


def test_schemathesis_finds_no_failure(footage_live, tmp_path):  # noqa: F811
  live = footage_live
  command = [os.path.join(os.path.dirname(sys.executable), 'schemathesis'), 'run', f'{live.url}/openapi.json',
             '--checks', 'all', '--max-examples', str(EXAMPLES), '--seed', '1', '--workers', '1',
             '--request-timeout', '60', '--warnings', 'off', '--report', 'junit',
             '--report-dir', str(tmp_path)]
  run = subprocess.run(command, capture_output=True, text=True, timeout=1200,
                       env=dict(os.environ, NO_COLOR='1', SCHEMATHESIS_HOOKS=''))
  out = run.stdout + run.stderr
  assert run.returncode == 0, out[-12000:]
  assert 'No issues found' in out or ' passed' in out, out[-4000:]
  assert 'failed' not in out.lower().split('summary')[-1] or ' 0 failed' in out, out[-4000:]
