"""ivt_jax.runtime.console: library INFO hidden (warnings and the project's own lines kept), the progress line, tables."""
import io
import logging
import os
import re
import subprocess
import sys

from ivt_jax.runtime import console
from ivt_jax.training import loop as train


def _record(path, level):
  return logging.LogRecord('absl', level, path, 1, 'message', None, None)


def test_filter_keeps_project_lines_and_every_warning():
  f = console.ProjectOrWarnings()
  ours = os.path.join(console.PROJECT_DIRS[0], 'train.py')
  lib = '/usr/lib/python3/site-packages/orbax/checkpoint/checkpoint_manager.py'
  assert f.filter(_record(ours, logging.INFO))
  assert not f.filter(_record(lib, logging.INFO))
  assert f.filter(_record(lib, logging.WARNING)) and f.filter(_record(lib, logging.ERROR))


def test_quiet_unless_asked(monkeypatch):
  from absl import logging as absl_logging
  handler = absl_logging.get_absl_handler()
  monkeypatch.setenv('IVT_VERBOSE', '1')
  verbosity = absl_logging.get_verbosity()
  assert console.quiet_libraries(0) is False
  assert absl_logging.get_verbosity() == absl_logging.DEBUG  # as --verbosity=1
  absl_logging.set_verbosity(verbosity)
  monkeypatch.delenv('IVT_VERBOSE')
  assert console.quiet_libraries(1) is False
  assert os.environ['IVT_VERBOSE'] == '1'  # said to input_pipeline and to child processes
  monkeypatch.delenv('IVT_VERBOSE')
  formatter = handler._current_handler.formatter  # pylint: disable=protected-access
  try:
    assert console.quiet_libraries(0) is True
    assert any(isinstance(x, console.ProjectOrWarnings) for x in handler.filters)
    assert isinstance(handler._current_handler.formatter, console.Plain)  # pylint: disable=protected-access
  finally:
    handler.setFormatter(formatter)
    for x in list(handler.filters):
      if isinstance(x, console.ProjectOrWarnings):
        handler.removeFilter(x)


class _Tty(io.StringIO):
  def isatty(self):
    return True


def test_progress_line_in_a_log_and_on_a_terminal():
  log = io.StringIO()
  p = console.Progress(100, stream=log, every_s=3600)
  p.update(10, loss=25.5, lr=5e-4)
  p.update(20, loss=20.0, lr=4e-4)  # within every_s: not written
  p.update(100, loss=12.3, lr=1e-5)  # the end: written
  lines = log.getvalue().splitlines()
  assert len(lines) == 2
  assert lines[0].startswith('train step 10/100') and 'loss 25.5' in lines[0] and 'lr 0.0005' in lines[0]
  assert lines[1].startswith('train step 100/100') and 'ETA 0s' in lines[1]
  tty = _Tty()
  p = console.Progress(100, stream=tty)
  p.update(5, loss=1.0)
  p.update(6, loss=0.9)
  p.clear()
  assert tty.getvalue().count('\r') == 2 and tty.getvalue().endswith('\n')
  assert console.Progress(10, stream=log, enabled=False).update(1) is None


def test_results_table_and_outputs():
  result = {'test': {'r1': 51.08, 'r5': 77.33, 'r10': 86.25, 'mAP': 51.88, 'mINP': 40.37},
            'best_val': {'r1': 64.25, 'r5': 91.0, 'r10': 95.75, 'mAP': 65.83, 'mINP': 55.4},
            'best_step': 1200, 'steps': 1200, 'seconds': 441.0}
  text = train._summary(result, '/tmp/run')  # pylint: disable=protected-access
  lines = text.strip().splitlines()
  assert lines[0] == 'text-to-image retrieval, 1200 steps, 7.3 min'
  assert lines[1].split() == ['split', 'R@1', 'R@5', 'R@10', 'mAP', 'mINP']
  assert lines[2].split() == ['val', '(best,', 'step', '1200)', '64.25', '91.00', '95.75', '65.83', '55.40']
  assert lines[3].split() == ['test', '51.08', '77.33', '86.25', '51.88', '40.37']
  assert '/tmp/run/metrics.json' in text and '/tmp/run/best' in text and 'tensorboard --logdir /tmp/run' in text
  assert len({len(l) for l in lines[1:4]}) == 1  # aligned
  assert 'data:' not in text
  noted = train._summary(result, '/tmp/run', '3 bad record(s) skipped')  # pylint: disable=protected-access
  assert noted.strip().splitlines()[4] == 'data: 3 bad record(s) skipped'


def test_project_dirs_are_this_checkout():
  assert console.__file__.startswith(console.PROJECT_DIRS[0])  # ivt_jax/runtime/console.py under ivt_jax/
  assert os.path.isfile(os.path.join(console.PROJECT_DIRS[1], 'prepare.py'))


def test_plain_lines():
  plain = console.Plain()
  rec = lambda level: logging.LogRecord('absl', level, 'x.py', 1, 'step %d', (3,), None)
  assert plain.format(rec(logging.INFO)) == 'step 3'
  assert plain.format(rec(logging.WARNING)) == 'warning: step 3'
  assert plain.format(rec(logging.ERROR)) == 'error: step 3'


_PROGRESS = re.compile(r'\[\d+:\d+[<,]|^(train|eval) step \d+/\d+ ')  # tqdm bars; the training progress line


def unrequested_lines(stderr: str) -> list[str]:
  """stderr's lines that are not progress bars or the training progress line (bars rewrite with \\r)."""
  text = stderr.replace('\x1b[A', '')
  return [p.strip() for p in re.split(r'[\r\n]', text) if p.strip() and not _PROGRESS.search(p.strip())]


def test_a_quiet_demo_run_and_a_verbose_one(tmp_path):
  """configs/demo.py at the tests' tiny size, by its command line: at most 5 lines on stderr besides progress
  bars; no library INFO, no TensorFlow notice, no TFDS chatter, no raw reprs. IVT_VERBOSE=1 shows them."""
  from test_train import _flags, tiny_demo
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  runs = {}
  for name, verbose in (('quiet', ''), ('verbose', '1')):
    c = tiny_demo(str(tmp_path / name))
    env = {**os.environ, 'IVT_VERBOSE': verbose}
    env.pop('TF_CPP_MIN_LOG_LEVEL', None)
    runs[name] = subprocess.run(
        [sys.executable, '-m', 'ivt_jax.main', '--config=configs/demo.py', f'--workdir={tmp_path / name / "w"}',
         '--config.num_epochs=2', '--config.data.ids_per_batch=4', *_flags(c)],
        cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert runs[name].returncode == 0, runs[name].stderr[-3000:]
  quiet = runs['quiet']
  lines = unrequested_lines(quiet.stderr)
  assert len(lines) <= 5, '\n'.join(lines)
  assert any(l.startswith('training cuhk_pedes: steps 0 to 14') for l in lines), lines
  assert any(l.startswith('Prepared cuhk_pedes (28 train, 8 val, 12 test records)') for l in lines), lines
  for noise in ('oneDNN', 'absl::InitializeLog', 'Downloading and preparing', 'Variant folder', 'PreparedData(',
                'downloaded and prepared to'):
    assert noise not in quiet.stderr + quiet.stdout, noise
  assert not any(re.match(r'[IWE]\d{4} ', l) for l in lines), lines  # no absl prefix
  assert 'test ' in quiet.stdout and 'outputs:' in quiet.stdout
  verbose = runs['verbose']
  shown = unrequested_lines(verbose.stderr)
  assert len(shown) > 30
  assert any(re.match(r'I\d{4} .* main\.py:\d+\] JAX ', l) for l in shown)  # the absl prefix, DEBUG lines too
  assert 'Downloading and preparing dataset' in verbose.stdout
  assert _table(verbose.stdout) == _table(quiet.stdout)  # the same run: the verbosity changes no figure


def _table(stdout: str) -> list[str]:
  return [l for l in stdout.splitlines() if l.startswith(('val ', 'test '))]
