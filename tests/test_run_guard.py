"""ivt_jax.training.run_guard: one run per workdir (a live owner refused, a killed one's lock no obstacle) and the
config keys a resumed run may change."""
import json
import os
import signal
import socket
import subprocess
import sys

import pytest

from ivt_jax.training import run_guard

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOLD = ('import sys, time\nfrom ivt_jax.training import run_guard\nrun_guard.WorkdirLock(sys.argv[1]).acquire()\n'
        'print("locked", flush=True)\ntime.sleep(120)\n')


def test_a_live_run_is_refused_and_a_killed_ones_lock_is_no_obstacle(tmp_path):
  holder = subprocess.Popen([sys.executable, '-c', HOLD, str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE,
                            text=True)
  try:
    assert holder.stdout.readline().strip() == 'locked'
    with pytest.raises(run_guard.RunLockedError) as e:
      run_guard.WorkdirLock(str(tmp_path)).acquire()
    message = str(e.value)
    assert f'process {holder.pid}' in message and socket.gethostname() in message and str(tmp_path) in message
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait()
  # The killed run's lock file is still there; the kernel released its lock.
  assert os.path.exists(tmp_path / run_guard.LOCK_FILE)
  with run_guard.WorkdirLock(str(tmp_path)):
    owner = json.load(open(tmp_path / run_guard.LOCK_FILE))
    assert owner['pid'] == os.getpid() and owner['host'] == socket.gethostname()
  with run_guard.WorkdirLock(str(tmp_path)):  # released on exit: taken again
    pass


def _config(**changes):
  c = {'seed': 0, 'num_epochs': 2, 'total_steps': 0, 'log_every_steps': 20, 'eval_every_epochs': 1,
       'model': {'width': 128, 'depth': 2}, 'optim': {'lr': 1e-3},
       'data': {'ids_per_batch': 16, 'image_size': (128, 48), 'worker_count': 0, 'manual_dir': '/a'},
       'mesh': {'data': 1, 'fsdp': 1}}
  for key, value in changes.items():
    d = c
    *path, last = key.split('.')
    for p in path:
      d = d[p]
    d[last] = value
  return c


def test_changes_that_alter_training_are_refused_each_named_with_both_values():
  saved = json.loads(json.dumps(_config()))  # as the checkpoint holds it: tuples became lists
  assert run_guard.check_resume_config(saved, _config(), 'w') == []
  with pytest.raises(run_guard.ConfigChangedError) as e:
    run_guard.check_resume_config(saved, _config(**{'data.ids_per_batch': 8, 'model.width': 64, 'seed': 1,
                                                    'log_every_steps': 5}), 'w')
  message = str(e.value)
  for line in ("data.ids_per_batch: 16 in the checkpoint, 8 now", "model.width: 128 in the checkpoint, 64 now",
               "seed: 0 in the checkpoint, 1 now"):
    assert line in message
  assert 'log_every_steps' not in message  # harmless
  for key, value in (('optim.lr', 2e-3), ('num_epochs', 3), ('data.image_size', (96, 32))):
    with pytest.raises(run_guard.ConfigChangedError, match=key.replace('.', r'\.')):
      run_guard.check_resume_config(saved, _config(**{key: value}), 'w')


def test_harmless_changes_are_allowed_and_listed():
  saved = json.loads(json.dumps(_config()))
  allowed = run_guard.check_resume_config(
      saved, _config(**{'total_steps': 5000, 'log_every_steps': 5, 'eval_every_epochs': 2, 'mesh.fsdp': 8,
                        'data.worker_count': 4, 'data.manual_dir': '/b'}), 'w')
  assert len(allowed) == 6 and 'total_steps: 0 -> 5000' in allowed
  # A key this version has and the checkpoint's did not (an older version wrote it): allowed.
  newer = _config()
  newer['data']['text_buckets'] = (32, 64)
  assert run_guard.check_resume_config(saved, newer, 'w') == []
  assert run_guard.check_resume_config(None, _config(), 'w') == []


def test_the_training_program_refuses_a_workdir_in_use(tmp_path):
  holder = subprocess.Popen([sys.executable, '-c', HOLD, str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE,
                            text=True)
  try:
    assert holder.stdout.readline().strip() == 'locked'
    proc = subprocess.run([sys.executable, '-m', 'ivt_jax.main', '--config=configs/demo.py',
                           f'--workdir={tmp_path}'], cwd=ROOT, capture_output=True, text=True, timeout=300)
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait()
  assert proc.returncode == 1
  assert f'in use by another run: process {holder.pid} on host {socket.gethostname()}' in proc.stderr
  assert 'Traceback' not in proc.stderr
  assert not os.path.exists(tmp_path / 'synthpedes')  # refused before any work
