"""The chaos check: its phase detection, and a reduced run (a few SIGKILLs, restarts, bit-identical results)."""
import json
import os
import subprocess
import sys

import pytest

from ivt_jax.tools import chaos

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_phases_from_files_and_log(tmp_path):
  w = str(tmp_path)
  assert chaos.phase(w, '') is None
  os.makedirs(os.path.join(w, 'synthpedes', 'imgs'))
  assert chaos.phase(w, '') == 'draw'
  with open(os.path.join(w, 'synthpedes', 'synthpedes.json'), 'w') as f:
    json.dump({'params': {}, 'complete': False}, f)
  assert chaos.phase(w, '') == 'draw'
  with open(os.path.join(w, 'synthpedes', 'synthpedes.json'), 'w') as f:
    json.dump({'params': {}, 'complete': True}, f)
  assert chaos.phase(w, '') == 'prepare'
  os.makedirs(os.path.join(w, 'tfds', 'cuhk_pedes'))
  open(os.path.join(w, 'tfds', 'cuhk_pedes', 'prepared.json'), 'w').close()
  assert chaos.phase(w, '') is None
  log = 'I... 13 steps per epoch, 52 steps\n'
  assert chaos.phase(w, log) == 'compile'
  log += 'I... training from step 0 to step 52\n'
  assert chaos.phase(w, log) == 'train'
  log += 'I... step 13: evaluating on val\n'
  assert chaos.phase(w, log) == 'eval'
  os.makedirs(os.path.join(w, 'best', '13.orbax-checkpoint-tmp-1764547200'))
  assert chaos.phase(w, log) == 'best'
  os.rmdir(os.path.join(w, 'best', '13.orbax-checkpoint-tmp-1764547200'))
  log += 'I... step 13 val: R@1 16.67  R@5 62.50\n'
  assert chaos.phase(w, log) == 'train'
  os.makedirs(os.path.join(w, 'checkpoints', '14.orbax-checkpoint-tmp-1764547201'))
  assert chaos.phase(w, log) == 'checkpoint'
  os.rmdir(os.path.join(w, 'checkpoints', '14.orbax-checkpoint-tmp-1764547201'))
  assert chaos.phase(w, log + 'I... evaluating on test\n') is None


def test_arguments_checked():
  with pytest.raises(SystemExit):
    chaos.parse_args(['--workdir=x', '--phases=train,lunch'])
  assert chaos.parse_args(['--workdir=x', '--phases=best,draw']).phases == ['draw', 'best']


@pytest.mark.slow  # 6 starts of a tiny training run: about 3 minutes on 2 cores
def test_killed_in_several_phases_and_restarted_gives_bit_identical_results(tmp_path):
  workdir = str(tmp_path / 'chaos')
  proc = subprocess.run([sys.executable, '-m', 'ivt_jax.tools.chaos', f'--workdir={workdir}', '--kills=4',
                         '--phases=prepare,train,checkpoint,best', '--set=num_epochs=2', '--timeout=600'],
                        cwd=ROOT, capture_output=True, text=True, timeout=1500)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  with open(os.path.join(workdir, 'chaos.json')) as f:
    summary = json.load(f)
  assert summary['all_identical'] and summary['kills'] == 4
  assert summary['by_phase']['prepare'] == 1 and summary['by_phase']['train'] >= 1
  assert summary['by_phase']['checkpoint'] + summary['by_phase']['best'] >= 1
  assert '| prepare | 1 |' in proc.stdout and 'bit-identical to the uninterrupted run' in proc.stdout
  episode = summary['episodes'][0]
  assert episode['identical'] and episode['attempts'] == 5
