"""ivt_jax.tools.ablation: the rows' commands, the table from finished runs, resuming, and one tiny real row."""
import json
import os

import pytest

from ivt_jax.tools import ablation

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _finish(path, r1, mAP=50.0):
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, 'metrics.json'), 'w') as f:
    json.dump({'test': {'r1': r1, 'r5': r1 + 20, 'r10': r1 + 30, 'mAP': mAP, 'mINP': mAP - 10}}, f)


def test_rows_are_the_papers_and_seeds_share_their_data(tmp_path):
  cmd = ablation.command('configs/demo.py', str(tmp_path), 'baseline', 2, ['num_epochs=1'])
  assert '--config.data.mla_levels=sentence' in cmd and '--config.data.bmm_ratio=0.0' in cmd
  assert '--config.seed=2' in cmd and '--config.num_epochs=1' in cmd
  assert f'--workdir={tmp_path}/baseline/seed_2' in cmd
  both = ablation.command('configs/demo.py', str(tmp_path), '+MLA+BMM', 2, [])
  data = [a for a in both if 'data_dir' in a or 'manual_dir' in a]
  assert data == [a for a in cmd if 'data_dir' in a or 'manual_dir' in a] and len(data) == 2
  assert not any('mla_levels' in a or 'bmm_ratio' in a for a in both)  # the full method: the config as it is


def test_table_from_finished_runs_without_training(tmp_path, capsys):
  wd = str(tmp_path)
  for row, base in (('baseline', 30.0), ('+MLA', 40.0), ('+BMM', 35.0), ('+MLA+BMM', 45.0)):
    for seed, delta in ((0, 0.0), (1, 2.0), (2, 7.0)):
      _finish(ablation.run_dir(wd, row, seed), base + delta)
  assert ablation.main(['--config=configs/demo.py', f'--workdir={wd}']) == 0  # nothing left to train
  out = capsys.readouterr().out
  assert out.count('done before') == 12
  table = open(os.path.join(wd, 'ablation.md')).read()
  assert '| baseline | 3 | 33.00 (30.00-37.00) |' in table  # mean (min-max) of 30, 32, 37
  assert '| +MLA+BMM | 3 | 48.00 (45.00-52.00) |' in table
  assert '45.00 / 47.00 / 52.00 |' in table
  saved = json.load(open(os.path.join(wd, 'ablation.json')))
  assert saved['results']['+BMM']['1']['r1'] == 37.0


def test_bad_arguments_are_refused(tmp_path):
  for bad in (['--rows=baseline,+XYZ'], ['--seeds=a,b'], ['--set', 'num_epochs']):
    with pytest.raises(SystemExit):
      ablation.main(['--config=configs/demo.py', f'--workdir={tmp_path}', *bad])
  with pytest.raises(SystemExit):
    ablation.main(['--config=configs/nope.py', f'--workdir={tmp_path}'])


@pytest.mark.slow
def test_one_tiny_row_trains_for_real(tmp_path, monkeypatch, capsys):
  """The baseline row of a tiny SynthPEDES, one seed, through the real training program."""
  from test_train import _flags, tiny_demo
  monkeypatch.chdir(ROOT)
  c = tiny_demo(str(tmp_path / 'unused'))
  c.total_steps = 4
  sets = [f.removeprefix('--config.') for f in _flags(c)
          if not f.startswith(('--config.data.manual_dir', '--config.data.data_dir'))]
  sets += ['total_steps=4', 'eval_every_epochs=1000', 'checkpoint_every_steps=2', 'data.ids_per_batch=4',
           'data.images_per_id=2', 'model.init_std=0.02']
  args = ['--config=configs/demo.py', f'--workdir={tmp_path}', '--seeds=0', '--rows=baseline',
          *[x for s in sets for x in ('--set', s)]]
  assert ablation.main(args) == 0
  test = ablation.read_test(ablation.run_dir(str(tmp_path), 'baseline', 0))
  assert test is not None and 0.0 <= test['r1'] <= 100.0
  assert os.path.isdir(tmp_path / 'data_0' / 'synthpedes')
  capsys.readouterr()
  assert ablation.main(args) == 0  # finished: not trained again
  assert 'done before' in capsys.readouterr().out
