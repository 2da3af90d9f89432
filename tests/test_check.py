"""The dataset checker on stand-ins of the three real layouts (real caption text): every problem in one report,
with the record named; exit 0 only when training would start; the folder left as it was."""
import json
import os
import subprocess
import sys

import pytest

from input_pipeline import check
from tests.test_datasets import SOURCE, make_source

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _listing(root):
  return sorted((os.path.relpath(os.path.join(d, f), root), os.path.getsize(os.path.join(d, f)),
                 os.path.getmtime(os.path.join(d, f))) for d, _, fs in os.walk(root) for f in fs)


def _problems(name, root):
  path_key = SOURCE[name][1]

  def edit(items):
    items.append(dict(items[0], captions=['An extra caption for the first image.']))  # merged
    items[2]['captions'] = [items[2]['captions'][0]] * 2  # repeated within a record
    items[3]['captions'] = ['{"color": "red"}; return null']  # code-like
    items[4]['captions'] = ['42']  # no letters
    del items[5]['id']  # a missing field
    items[6][path_key] = items[6][path_key].replace('_c1', '_gone')  # a missing image
    with open(os.path.join(root, 'imgs', items[7][path_key]), 'wb') as f:
      f.write(b'<html>not an image</html>')  # a file that does not decode
  return edit



@pytest.mark.parametrize('name', ['cuhk_pedes', 'icfg_pedes', 'rstpreid'])
def test_every_problem_is_found_at_once_with_its_record(tmp_path, name):
  root, _ = make_source(tmp_path / name, name=name, n=16, edit=_problems(name, str(tmp_path / name)))
  before = _listing(root)
  report = check.check(name, root, workers=1)
  assert _listing(root) == before  # nothing written into the folder
  bad = {b['index']: b['reason'] for g in report['bad_records']['kinds'].values() for b in g['first']}
  assert report['bad_records']['count'] == 3 and set(bad) == {5, 6, 7}, bad
  assert 'missing field' in bad[5] and 'does not exist' in bad[6] and 'does not decode' in bad[7]
  assert report['merges']['num_merged_records'] == 1 and report['merges']['merged_records'] == [16]
  assert report['merges']['num_repeated_captions'] == 1
  assert report['merges']['num_shared_captions'] >= 1  # the stand-in's real captions recur across people
  warned = {k.split(' (')[0]: [e['record'] for e in v['first']] for k, v in report['caption_warnings'].items()}
  assert 3 in warned['code-like'] and 4 in warned['no letters'] and 4 in warned['far too short'], warned
  assert sum(v['images'] for v in report['splits'].values()) == 16 - 3  # the merged record joined record 0
  assert not report['ready']
  said = check.text(report)
  assert 'record 6' in said and 'bad records: 3' in said and 'not ready' in said


def test_the_command_reports_and_exits_by_readiness(tmp_path):
  root, _ = make_source(tmp_path / 'cuhk', n=12)
  out = tmp_path / 'report.json'
  vocab = tmp_path / 'vocab.txt'
  vocab.write_text('[PAD]\n[UNK]\n[CLS]\n[SEP]\na\n')
  run = lambda *a: subprocess.run([sys.executable, '-m', 'input_pipeline.check', *a], cwd=ROOT,
                                  capture_output=True, text=True, timeout=300)
  ok = run('--config=configs/cuhk.py', f'--config.data.manual_dir={root}', f'--config.data.vocab_file={vocab}',
           f'--json={out}')
  assert ok.returncode == 0, ok.stdout + ok.stderr
  assert 'ready: training would start' in ok.stdout and 'Traceback' not in ok.stderr
  assert json.loads(out.read_text())['splits']['train']['images'] > 0
  no_vocab = run('--config=configs/cuhk.py', f'--config.data.manual_dir={root}')
  assert no_vocab.returncode == 1 and 'tokenizer: NOT READY' in no_vocab.stdout
  one_off = run('--dataset=cuhk_pedes', f'--manual_dir={tmp_path}')  # the parent of the real folder
  assert one_off.returncode == 1 and f'did you mean --config.data.manual_dir={root}' in one_off.stdout
  assert run('--dataset=cuhk_pedes').returncode == 2
