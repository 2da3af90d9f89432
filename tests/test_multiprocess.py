"""The training program as 2 JAX processes (jax.distributed, gloo CPU collectives) of 4 CPU devices each.

Both runs train the tiny SynthPEDES demo on a data 2 x fsdp 4 mesh: one process with 8 devices (in this test
process) and two processes with 4 devices each (`python -m ivt_jax.main`, coordinator on 127.0.0.1). Each
process reads its own rows of every batch and checkpoints its iterator state; the two-process run stops at step
2 and is resumed to step 4 by a second launch. Parameters at both steps and the evaluation (multihost gather of
the embeddings) must agree with the one-process run.
"""
import json
import os
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import demo
from test_train import tiny_demo  # the tiny SynthPEDES demo config shared with test_train.py

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 900


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _override_flags(config, base, prefix='--config.') -> list[str]:
  """`--config.key=value` for every leaf where `config` differs from `base` (the config file's defaults)."""
  flags = []
  def walk(c, b, path):
    for key in c.keys():
      value, default = c[key], b[key]
      if hasattr(value, 'keys'):
        walk(value, default, path + [key])
      elif value != default:
        flags.append(f'{prefix}{".".join(path + [key])}={value}')
  walk(config, base, [])
  return flags


def _params_at(workdir: str, step: int):
  """The parameters of training checkpoint `step`, on this process's first device, as numpy arrays."""
  manager = ocp.CheckpointManager(os.path.join(workdir, 'checkpoints'),
                                  item_handlers={'state': ocp.StandardCheckpointHandler()})
  raw = manager.item_metadata(step)['state']
  tree = getattr(raw, 'tree', raw)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree_util.tree_map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), tree)
  state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target))).state
  return jax.tree_util.tree_map(np.asarray, state['params'])


def _assert_close(a, b, atol):
  la, lb = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
  assert [p for p, _ in la] == [p for p, _ in lb]
  for (path, x), (_, y) in zip(la, lb):
    np.testing.assert_allclose(x, y, atol=atol, rtol=0, err_msg=jax.tree_util.keystr(path))


def _launch(config, workdir: str, num_processes: int, cache_dir: str) -> list[str]:
  """Runs the training program as `num_processes` local processes; -> their logs. Fails on any error."""
  port = _free_port()
  args = [sys.executable, '-m', 'ivt_jax.main', '--config=configs/demo.py', f'--workdir={workdir}',
          *_override_flags(config, demo.get_config()), f'--coordinator_address=127.0.0.1:{port}',
          f'--num_processes={num_processes}', '--cpu_collectives=gloo']
  # The persistent compilation cache lets the resuming launch reuse the first launch's executables.
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=4', JAX_PLATFORMS='cpu',
             JAX_COMPILATION_CACHE_DIR=cache_dir, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0')
  logs = [os.path.join(os.path.dirname(workdir), f'{os.path.basename(workdir)}-{i}.log')
          for i in range(num_processes)]
  procs = []
  for i, log in enumerate(logs):
    with open(log, 'a') as f:
      procs.append(subprocess.Popen(args + [f'--process_id={i}'], cwd=ROOT, env=env, stdout=f,
                                    stderr=subprocess.STDOUT))
  deadline = time.time() + TIMEOUT_S
  timed_out = False
  try:
    while any(p.poll() is None for p in procs):
      # A failed process leaves the others waiting at a barrier: stop them all.
      if any(p.poll() not in (None, 0) for p in procs):
        break
      if time.time() > deadline:
        timed_out = True
        break
      time.sleep(0.5)
  finally:
    stopped = [p.poll() is None for p in procs]
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  texts = [open(log).read() for log in logs]
  # The process that failed on its own first (the others were stopped here).
  order = sorted(range(num_processes), key=lambda i: stopped[i])
  for i in order:
    why = (f'still running after {TIMEOUT_S} s, stopped' if timed_out and stopped[i]
           else 'stopped after another process failed' if stopped[i] else f'exited with {procs[i].returncode}')
    assert procs[i].returncode == 0, f'process {i} {why}:\n{texts[i][-4000:]}'
  return texts


@pytest.fixture(scope='module')
def config(tmp_path_factory):
  """The tiny demo on a data 2 x fsdp 4 mesh, its data prepared once here (process 0's job in a real run)."""
  from input_pipeline import prepare as prepare_lib
  root = str(tmp_path_factory.mktemp('mp_data'))
  c = tiny_demo(root)
  c.mesh.data, c.mesh.fsdp = 2, 4
  prepare_lib.prepare(c, root)
  return c


@pytest.mark.slow
def test_two_processes_match_one_and_resume(config, tmp_path):
  from ivt_jax.training import loop as train
  assert jax.device_count() == 8
  cache = str(tmp_path / 'jax_cache')
  # One process, 8 devices: steps 0-2, then resumed to 4 (the same schedule as the two-process runs).
  one = str(tmp_path / 'one')
  c = config.copy_and_resolve_references()
  c.total_steps = 2
  train.train_and_evaluate(c, one)
  c.total_steps = 4
  train.train_and_evaluate(c, one)
  # Two processes, 4 devices each: to step 2, then a second launch resumes from that checkpoint to step 4.
  two = str(tmp_path / 'two')
  c.total_steps = 2
  logs = _launch(c, two, 2, cache)
  assert all('2 processes' in log and '4 local / 8 global devices' in log for log in logs)
  c.total_steps = 4
  logs = _launch(c, two, 2, cache)
  assert all('resumed from step 2' in log for log in logs)
  # Each process saved its own input-iterator state with every checkpoint.
  for step in (2, 4):
    files = os.listdir(os.path.join(two, 'checkpoints', str(step), 'data_iter'))
    assert any('process_0' in f for f in files) and any('process_1' in f for f in files), files
    _assert_close(_params_at(one, step), _params_at(two, step), atol=2e-5)
  # Evaluation gathered every process's embeddings: the same metrics (and best step) as one process.
  m1 = json.load(open(os.path.join(one, 'metrics.json')))
  m2 = json.load(open(os.path.join(two, 'metrics.json')))
  assert m1['best_step'] == m2['best_step']
  for key in ('test', 'best_val'):
    assert m2[key] == pytest.approx(m1[key], abs=1e-6), key
  assert os.path.exists(os.path.join(two, 'retrieval.png'))


def test_local_device_ids_flag():
  from absl import app
  from ivt_jax import main
  assert main.parse_local_device_ids('0,1, 3') == [0, 1, 3]
  assert main.parse_local_device_ids('all') == []
  for bad in ('', 'x', '0,0', '-1'):
    with pytest.raises(app.UsageError, match='--local_device_ids'):
      main.parse_local_device_ids(bad)
