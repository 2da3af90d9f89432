"""The launch scripts: dry-run commands for a TPU pod slice and GPU nodes, their quoting, their errors.

The printed remote scripts are also run here with bash (HOME in a temporary directory, a stand-in for
.venv/bin/python that prints its arguments, a stand-in curl for the TPU worker number), so the quoting is
checked the way a remote shell will read it.
"""
import importlib.util
import os
import pathlib
import re
import shlex
import subprocess
import sys
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
TPU = ROOT / 'launch' / 'tpu_vm.py'
GPU = ROOT / 'launch' / 'gpu.py'
TRICKY = ["--config.init.allow_random=head/.*,pos embed", "--config.data.vocab_file=/w/it's/vocab.txt"]


def _run(script, *args, env=None):
  return subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, env=env,
                        check=False, timeout=60)


def _lines(script, *args):
  out = _run(script, *args)
  assert out.returncode == 0, out.stderr
  lines = [l for l in out.stdout.splitlines() if l.strip()]
  for line in lines:
    shlex.split(line)   # every printed line is valid shell words
    subprocess.run(['bash', '-n', '-c', line], check=True)
  return lines


def _commands(lines):
  return [shlex.split(l) for l in lines if not l.startswith('#')]


def _words(script):
  """Shell words of a script, with ; & | ( ) > < as separate tokens."""
  lex = shlex.shlex(script, posix=True, punctuation_chars=True)
  lex.whitespace_split = True
  return list(lex)


def _remote(argv):
  """The script a command runs on the other side: gcloud's --command value, ssh's last word, bash -c's."""
  if argv[0] == 'gcloud':
    return argv[argv.index('--command') + 1]
  return argv[-1]


def _pin():
  for line in (ROOT / 'requirements.txt').read_text().splitlines():
    if line.startswith('jax=='):
      return line.split('==')[1].strip()
  return '0.10.2'


def _load(path):
  spec = importlib.util.spec_from_file_location(path.stem, path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def _fake_home(tmp_path, repo='ivt-jax'):
  """HOME with <repo>/.venv/bin/python printing its arguments (one per line) and two env variables."""
  home = tmp_path / 'home'
  venv = home / repo / '.venv' / 'bin'
  venv.mkdir(parents=True)
  py = venv / 'python'
  py.write_text('#!/bin/sh\nfor a in "$@"; do printf "%s\\n" "$a"; done\n'
                'echo "MEM=$XLA_PYTHON_CLIENT_MEM_FRACTION CVD=$CUDA_VISIBLE_DEVICES EXTRA=$EXTRA"\n'
                'if [ -n "$FAKE_SLEEP" ]; then exec sleep "$FAKE_SLEEP"; fi\n')
  py.chmod(0o755)
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  curl = bin_dir / 'curl'
  curl.write_text('#!/bin/sh\necho 3\n')   # the TPU metadata server's agent-worker-number
  curl.chmod(0o755)
  env = dict(os.environ, HOME=str(home), PATH=f'{bin_dir}:{os.environ["PATH"]}')
  return home, env


def _wait_for(path, text, timeout=10.0):
  deadline = time.time() + timeout
  while time.time() < deadline:
    if path.exists() and text in path.read_text():
      return path.read_text()
    time.sleep(0.05)
  raise AssertionError(f'{path} did not get {text!r}: {path.read_text() if path.exists() else "(absent)"}')


# ---- TPU ------------------------------------------------------------------------------------------

POD = ['--name', 'ivt-pod', '--zone', 'us-central2-b', '--project', 'my-proj', '--dry-run']


def test_accelerator_types():
  mod = _load(TPU)
  want = {'v4-8': (1, 4), 'v4-32': (4, 16), 'v3-32': (4, 32), 'v2-8': (1, 8), 'v5p-16': (2, 8),
          'v5litepod-4': (1, 4), 'v5litepod-16': (4, 16), 'v6e-8': (1, 8), 'v6e-256': (64, 256)}
  for accel, (workers, devices) in want.items():
    s = mod.parse_accelerator(accel)
    assert (s.workers, s.devices) == (workers, devices), accel
  assert mod.parse_accelerator('v4-32').runtime == 'tpu-ubuntu2204-base'
  assert mod.parse_accelerator('v5p-8').runtime == 'v2-alpha-tpuv5'
  assert mod.parse_accelerator('v5litepod-8').runtime == 'v2-alpha-tpuv5-lite'
  assert mod.parse_accelerator('v6e-16').runtime == 'v2-alpha-tpuv6e'


def test_tpu_pod_slice_create_run_logs_delete(tmp_path):
  create = _commands(_lines(TPU, 'create', '--accelerator-type', 'v4-32', '--spot', *POD))
  assert create == [['gcloud', 'compute', 'tpus', 'tpu-vm', 'create', 'ivt-pod', '--zone=us-central2-b',
                     '--accelerator-type=v4-32', '--version=tpu-ubuntu2204-base', '--project=my-proj',
                     '--spot']]

  run = _commands(_lines(TPU, 'run', *POD, '--workdir', 'gs://my-bucket/runs/pod', '--env', 'EXTRA=a b',
                         '--config.data.ids_per_batch=8', *TRICKY))
  assert len(run) == 1
  argv = run[0]
  assert argv[:6] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', 'ivt-pod']
  assert '--worker=all' in argv and '--zone=us-central2-b' in argv and '--project=my-proj' in argv
  words = _words(_remote(argv))
  for w in ['--workdir=gs://my-bucket/runs/pod', '--distributed', '--config=configs/cuhk.py',
            '--config.data.ids_per_batch=8', *TRICKY]:
    assert w in words, w
  assert "(nohup env 'EXTRA=a b' .venv/bin/python" in _remote(argv)

  # What the workers' shells do with it: worker 3 (the stand-in metadata server) starts the program.
  home, env = _fake_home(tmp_path)
  subprocess.run(['bash', '-c', _remote(argv)], env=env, check=True, timeout=30, capture_output=True)
  log = _wait_for(home / 'ivt-logs' / 'train-worker3.log', 'MEM=')
  args = log.splitlines()
  assert args[:6] == ['-m', 'ivt_jax.main', '--config=configs/cuhk.py', '--workdir=gs://my-bucket/runs/pod',
                      '--distributed', '--config.data.ids_per_batch=8']
  assert args[6:8] == TRICKY
  assert 'EXTRA=a b' in args[8]
  assert (home / 'ivt-logs' / 'train-worker3.pid').read_text().strip().isdigit()

  logs = _commands(_lines(TPU, 'logs', '--accelerator-type', 'v4-32', *POD))
  assert logs[0] == ['mkdir', '-p', 'logs/ivt-pod']
  scps = logs[1:]
  assert len(scps) == 4
  for w, cmd in enumerate(scps):
    assert cmd[4] == 'scp' and f'--worker={w}' in cmd
    assert f'ivt-pod:ivt-logs/train-worker{w}.log' in cmd

  delete = _commands(_lines(TPU, 'delete', '--yes', *POD))
  assert delete == [['gcloud', 'compute', 'tpus', 'tpu-vm', 'delete', 'ivt-pod', '--zone=us-central2-b',
                     '--project=my-proj', '--quiet']]


def test_tpu_install_copy_mount_stop(tmp_path):
  install = _commands(_lines(TPU, 'install', '--repo-url', 'https://example.org/ivt-jax.git', *POD))
  assert len(install) == 1 and '--worker=all' in install[0]
  script = _remote(install[0])
  words = _words(script)
  assert f'jax[tpu]=={_pin()}' in words
  assert 'https://example.org/ivt-jax.git' in words and 'requirements.txt' in words
  subprocess.run(['bash', '-n', '-c', script], check=True)

  # The jax pin comes from requirements.txt at run time; 0.10.2 when there is none.
  req = tmp_path / 'requirements.txt'
  req.write_text('absl-py==2.5.1\njax==9.8.7\njaxlib==9.8.7\n')
  for path, version in [(req, '9.8.7'), (tmp_path / 'absent.txt', '0.10.2')]:
    cmd = _commands(_lines(TPU, 'install', '--repo-url', 'u', '--requirements', str(path), *POD))[0]
    assert f'jax[tpu]=={version}' in _words(_remote(cmd))

  copy = _commands(_lines(TPU, 'copy-data', '--src', 'gs://my-bucket/tfds', '--dest', '~/data', *POD))
  assert len(copy) == 1 and '--worker=all' in copy[0]
  assert _words(_remote(copy[0]))[-3:] == ['-r', 'gs://my-bucket/tfds', '$HOME/data/']
  local = _commands(_lines(TPU, 'copy-data', '--src', str(tmp_path), *POD))
  assert local[1][4:7] == ['scp', '--recurse', str(tmp_path)] and 'ivt-pod:data' in local[1]

  mount = _commands(_lines(TPU, 'mount', '--bucket', 'gs://my-bucket/runs', *POD))
  words = _words(_remote(mount[0]))
  i = len(words) - 1 - words[::-1].index('gcsfuse')
  assert words[i:i + 7] == ['gcsfuse', '--implicit-dirs', '--rename-dir-limit=200000',
                            '--metadata-cache-ttl-secs=0', '--only-dir', 'runs', 'my-bucket']
  assert words[i + 7] == '$HOME/gcs'

  stop = _commands(_lines(TPU, 'stop', *POD))
  home, env = _fake_home(tmp_path / 's')
  out = subprocess.run(['bash', '-c', _remote(stop[0])], env=env, check=True, capture_output=True, text=True)
  assert out.stdout.strip() == 'worker 3: not running'


@pytest.mark.parametrize('accel', ['v4_32', 'tpu-v4-32', 'v4-30', 'v6e-12', 'v7-8', 'V4-32', ''])
def test_tpu_refuses_bad_accelerator_type(accel):
  out = _run(TPU, 'create', '--accelerator-type', accel, *POD)
  assert out.returncode == 2
  assert out.stdout == ''
  assert '--accelerator-type' in out.stderr


def test_tpu_refuses_bad_input():
  for args, words in [
      (['run', '--workdir', 'gs://b/r', '--config.data.ids_per_batch', '8'], 'config.key=value'),
      (['run', '--workdir', 'gs://b/r', '--learning_rate=3'], 'config.key=value'),
      (['run', '--workdir', 'gs://b/r', '--config', 'configs/nope.py'], 'does not exist'),
      (['run', '--workdir', 'gs://b/r', '--env', 'NOEQUALS'], 'NAME=VALUE'),
      (['run', '--workdir', ' '], '--workdir'),
      (['logs'], '--num-workers'),
      (['create', '--accelerator-type', 'v4-8', '--zone', 'uscentral'], '--zone'),
      (['stop', '--name', 'My_TPU'], '--name'),
      (['delete', '--config.x=1'], 'unrecognized'),
  ]:
    out = _run(TPU, args[0], *POD, *args[1:])
    assert out.returncode == 2, args
    assert out.stdout == '', args
    assert words in out.stderr, (args, out.stderr)


# ---- GPU ------------------------------------------------------------------------------------------

def test_gpu_two_nodes(tmp_path):
  lines = _lines(GPU, 'run', '--nodes', 'gpu-a,user@gpu-b', '--gpus-per-node', '4', '--workdir', '/shared/r1',
                 '--env', 'EXTRA=x', '--dry-run', *TRICKY)
  cmds = _commands(lines)
  assert [c[0] for c in cmds] == ['ssh', 'ssh'] and [c[1] for c in cmds] == ['gpu-a', 'user@gpu-b']
  for i, cmd in enumerate(cmds):
    words = _words(_remote(cmd))
    assert f'--process_id={i}' in words
    assert '--coordinator_address=gpu-a:12345' in words and '--num_processes=2' in words
    assert 'CUDA_VISIBLE_DEVICES=0,1,2,3' in words and '--workdir=/shared/r1' in words
    for t in TRICKY:
      assert t in words
  srun = [l for l in lines if l.startswith('# SLURM')]
  assert len(srun) == 1 and 'srun --nodes=2 --ntasks-per-node=1 --gpus-per-node=4' in srun[0]
  check = [l for l in lines if l.startswith('# compile check')]  # 2 nodes of 4 GPUs, the overrides as given
  assert len(check) == 1 and shlex.split(check[0].split(': ', 1)[1])[:5] == [
      'python', '-m', 'ivt_jax.aot', '--config=configs/cuhk.py', '--target=h100x8']
  assert all(t in shlex.split(check[0].split(': ', 1)[1]) for t in TRICKY)

  # Node 1's shell: the program gets exactly these arguments, the log and pid files are per node.
  home, env = _fake_home(tmp_path)
  subprocess.run(['bash', '-c', _remote(cmds[1])], env=env, check=True, timeout=30, capture_output=True)
  args = _wait_for(home / 'ivt-logs' / 'train-node1.log', 'MEM=').splitlines()
  assert args[:8] == ['-m', 'ivt_jax.main', '--config=configs/cuhk.py', '--workdir=/shared/r1',
                      '--coordinator_address=gpu-a:12345', '--num_processes=2', '--process_id=1', *TRICKY[:1]]
  assert args[8] == TRICKY[1]
  assert args[9] == 'MEM=0.9 CVD=0,1,2,3 EXTRA=x'


def test_gpu_single_node_has_no_coordinator(tmp_path):
  for nodes in ([], ['--nodes', 'gpu-a']):
    cmds = _commands(_lines(GPU, 'run', *nodes, '--workdir', '/shared/r1', '--dry-run', '--config.seed=3'))
    assert len(cmds) == 1
    script = _remote(cmds[0])
    assert cmds[0][0] == ('ssh' if nodes else 'bash')
    assert '--config.seed=3' in _words(script)
    for flag in ('--coordinator_address', '--num_processes', '--process_id', '--distributed'):
      assert flag not in script

  # For real, here, in a given checkout: start, then stop by the pid file.
  home, env = _fake_home(tmp_path, repo='repo')
  env['FAKE_SLEEP'] = '30'
  repo = str(home / 'repo')
  out = _run(GPU, 'run', '--repo-dir', repo, '--workdir', '~/w', '--mem-fraction', '0', '--skip-compile-check',
             env=env)
  assert out.returncode == 0, out.stderr
  assert out.stderr.startswith('+ bash -c ') and out.stdout.startswith('node 0: started, log')
  args = _wait_for(home / 'ivt-logs' / 'train-node0.log', 'MEM=').splitlines()
  assert args == ['-m', 'ivt_jax.main', '--config=configs/cuhk.py', '--workdir=~/w', 'MEM= CVD= EXTRA=']
  pid = int((home / 'ivt-logs' / 'train-node0.pid').read_text())
  out = _run(GPU, 'stop', '--repo-dir', repo, env=env)
  assert out.returncode == 0 and out.stdout.strip() == 'node 0: stopped', out.stderr
  deadline = time.time() + 10
  while time.time() < deadline and os.path.exists(f'/proc/{pid}') and 'Z' not in _proc_state(pid):
    time.sleep(0.05)
  assert not os.path.exists(f'/proc/{pid}') or 'Z' in _proc_state(pid)
  out = _run(GPU, 'stop', '--repo-dir', repo, env=env)
  assert out.returncode == 0 and out.stdout.strip() == 'node 0: not running'


def _proc_state(pid):
  try:
    return re.search(r'^State:\s+(\S)', pathlib.Path(f'/proc/{pid}/status').read_text(), re.M).group(1)
  except (FileNotFoundError, AttributeError):
    return 'Z'


def test_gpu_install_and_slurm(tmp_path):
  cmds = _commands(_lines(GPU, 'install', '--nodes', 'gpu-a,gpu-b', '--repo-url', 'https://example.org/r.git',
                          '--dry-run'))
  assert [c[:2] for c in cmds] == [['ssh', 'gpu-a'], ['ssh', 'gpu-b']]
  assert f'jax[cuda12]=={_pin()}' in _words(_remote(cmds[0]))
  cmd = _commands(_lines(GPU, 'install', '--cuda', '13', '--dry-run'))[0]
  assert cmd[:2] == ['bash', '-c'] and f'jax[cuda13]=={_pin()}' in _words(cmd[2])
  assert 'git clone' not in cmd[2]   # here: this checkout

  out = _run(GPU, 'run', '--slurm', '--num-nodes', '2', '--gpus-per-node', '8', '--workdir', '/shared/r1',
             '--partition', 'gpu', '--config.seed=1')
  assert out.returncode == 0, out.stderr
  script = out.stdout
  for line in ['#SBATCH --nodes=2', '#SBATCH --ntasks-per-node=1', '#SBATCH --gpus-per-node=8',
               '#SBATCH --partition=gpu']:
    assert line in script.splitlines()
  path = tmp_path / 'job.sbatch'
  path.write_text(script)
  subprocess.run(['bash', '-n', str(path)], check=True)
  srun = shlex.split(script.splitlines()[-1])
  assert srun[:4] == ['srun', '--nodes=2', '--ntasks-per-node=1', '--gpus-per-node=8']
  inner = srun[-1]
  assert '--process_id="$SLURM_PROCID"' in inner and '--num_processes="$SLURM_NTASKS"' in inner
  assert 'env -u SLURM_LOCALID' in inner and '--config.seed=1' in inner

  logs = _commands(_lines(GPU, 'logs', '--nodes', 'gpu-a,gpu-b', '--dry-run'))
  assert logs[1:] == [['scp', 'gpu-a:ivt-logs/train-node0.log', 'logs/'],
                      ['scp', 'gpu-b:ivt-logs/train-node1.log', 'logs/']]


def test_gpu_refuses_bad_input():
  for args, words in [
      (['run', '--nodes', '', '--workdir', 'w'], '0 nodes'),
      (['run', '--nodes', ' , ', '--workdir', 'w'], '0 nodes'),
      (['install', '--nodes', ','], '0 nodes'),
      (['run', '--nodes', 'a,a', '--workdir', 'w'], 'twice'),
      (['run', '--nodes', 'a b', '--workdir', 'w'], 'bad host'),
      (['run', '--gpus-per-node', '0', '--workdir', 'w'], '--gpus-per-node'),
      (['run', '--slurm', '--num-nodes', '0', '--gpus-per-node', '8', '--workdir', 'w'], '--num-nodes'),
      (['run', '--slurm', '--workdir', 'w'], '--gpus-per-node'),
      (['run', '--nodes', 'a,b', '--port', '0', '--workdir', 'w'], '--port'),
      (['run', '--workdir', 'w', '--mem-fraction', '1.5'], '--mem-fraction'),
      (['run', '--workdir', ''], '--workdir'),
      (['run', '--slurm', '--num-nodes', '2', '--gpus-per-node', '8', '--port', '70000', '--workdir', 'w'],
       '--port'),
      (['run', '--workdir', 'w', '--config.seed', '3'], 'config.key=value'),
      (['logs'], 'on this machine'),
  ]:
    out = _run(GPU, *args, '--dry-run')
    assert out.returncode == 2, args
    assert out.stdout == '', args
    assert words in out.stderr, (args, out.stderr)


def test_the_compile_check_refuses_what_does_not_fit_naming_the_largest_batch(monkeypatch):
  """launch/fit_check.py on a stand-in planner: fits -> go; does not fit -> the --fit search's largest batch is
  named; the planner failing (e.g. no compiler) -> its own message."""
  spec = importlib.util.spec_from_file_location('fit_check', ROOT / 'launch' / 'fit_check.py')
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  calls = []

  def fake(result):
    def run(cmd, **kw):
      calls.append(cmd)
      if '--fit' in cmd:
        out = next(a.split('=', 1)[1] for a in cmd if a.startswith('--output='))
        pathlib.Path(out).write_text('[{"remat": false, "largest_batch": 56}]')
        return subprocess.CompletedProcess(cmd, 0, '=> the largest batch ...: 56', '')
      return subprocess.CompletedProcess(cmd, *result)
    return run

  class Refused(Exception):
    pass

  monkeypatch.setattr(mod.subprocess, 'run', fake((0, 'fits: 40.0% of the HBM', '')))
  mod.check('configs/cuhk.py', 'v4-8', ['--config.seed=1'], Refused)
  assert calls[-1][2:] == ['ivt_jax.aot', '--config=configs/cuhk.py', '--target=v4-8', '--config.seed=1']
  monkeypatch.setattr(mod.subprocess, 'run', fake((1, 'train at batch 112 does not fit v4-8: ...', '')))
  with pytest.raises(Refused, match='largest batch that fits is 56 samples'):
    mod.check('configs/cuhk.py', 'v4-8', [], Refused)
  assert '--fit' in calls[-1] and '--fit_remat=config' in calls[-1]
  monkeypatch.setattr(mod.subprocess, 'run', fake((2, '', 'error: --target=v4-8 needs libtpu')))
  with pytest.raises(Refused, match='could not run.*needs libtpu'):
    mod.check('configs/cuhk.py', 'v4-8', [], Refused)
