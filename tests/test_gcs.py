"""Cloud Storage workdirs and data (gs://) against a stand-in server (tests/gcs_standin.py)."""
import importlib.util
import json
import os
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from tests import gcs_standin

BUCKET = 'ivt-test'


@pytest.fixture(scope='module')
def gcs(tmp_path_factory):
  """The stand-in's URL, with the environment pointing epath, gcsfs and TensorStore at it for this module."""
  if importlib.util.find_spec('gcsfs') is None:
    pytest.skip('gcsfs is not installed')
  from etils.epath import gpath
  with gcs_standin.server(str(tmp_path_factory.mktemp('gcs'))) as url:
    saved = {k: os.environ.get(k) for k in gcs_standin.ENV_KEYS}
    os.environ.update(gcs_standin.environment(url))  # before gcsfs is imported: it reads some at import
    gpath._is_tf_installed.cache_clear()  # pylint: disable=protected-access  (it caches EPATH_USE_TF)
    try:
      yield url
    finally:
      for k, v in saved.items():
        if v is None:
          os.environ.pop(k, None)
        else:
          os.environ[k] = v
      gpath._is_tf_installed.cache_clear()  # pylint: disable=protected-access


def test_paths_on_gcs(gcs, tmp_path):
  from input_pipeline import paths
  root = f'gs://{BUCKET}/paths'
  assert paths.resolve(root + '/', 'workdir') == root
  paths.write_text_atomic(paths.join(root, 'a', 'x.json'), '{"k": 1}')
  assert json.loads(paths.read_text(paths.join(root, 'a', 'x.json'))) == {'k': 1}
  assert paths.isdir(paths.join(root, 'a')) and paths.isfile(paths.join(root, 'a', 'x.json'))
  assert not paths.exists(paths.join(root, 'nope'))
  local = tmp_path / 'src'
  (local / 'sub').mkdir(parents=True)
  (local / 'sub' / 'big.bin').write_bytes(os.urandom(3 * 1024 * 1024 + 7))
  (local / 'top.txt').write_text('top')
  for rel in paths.walk_files(str(local)):
    paths.copy_file(os.path.join(local, rel), paths.join(root, 'tree', rel))
  assert list(paths.walk_files(paths.join(root, 'tree'))) == ['sub/big.bin', 'top.txt']
  paths.move_tree(paths.join(root, 'tree'), paths.join(root, 'moved'))
  assert not paths.exists(paths.join(root, 'tree', 'top.txt'))
  paths.copy_file(paths.join(root, 'moved', 'sub', 'big.bin'), str(tmp_path / 'back.bin'))
  assert (tmp_path / 'back.bin').read_bytes() == (local / 'sub' / 'big.bin').read_bytes()
  assert paths.listdir(root) == ['a', 'moved']
  for url in ('s3://b/run', 'https://example.com/x'):
    with pytest.raises(paths.UnsupportedPathError, match='not supported'):
      paths.resolve(url, 'workdir')
  with pytest.raises(paths.UnsupportedPathError, match='local .* disk'):
    paths.local(root, 'image folder')


def test_lease_one_run_per_gcs_workdir(gcs):
  from ivt_jax.training import run_guard
  workdir = f'gs://{BUCKET}/lease'
  first = run_guard.WorkdirLock(workdir, heartbeat_s=0.2, stale_s=3.0, settle_s=0.1).acquire()
  try:
    lock_path = f'{workdir}/{run_guard.LOCK_FILE}'
    from input_pipeline import paths
    beat0 = json.loads(paths.read_text(lock_path))['heartbeat']
    time.sleep(0.8)
    assert json.loads(paths.read_text(lock_path))['heartbeat'] > beat0  # renewed in the background
    with pytest.raises(run_guard.RunLockedError, match=rf'process {os.getpid()} on host .*renewed'):
      run_guard.WorkdirLock(workdir, stale_s=3.0, settle_s=0.1).acquire()
  finally:
    first.release()
  assert not paths.exists(lock_path)  # released: the next run starts at once
  second = run_guard.WorkdirLock(workdir, heartbeat_s=60, stale_s=3.0, settle_s=0.1).acquire()
  second.release()
  # A lease left by a killed run (never renewed again) goes stale and is taken over.
  paths.write_text_atomic(lock_path, json.dumps({'pid': 424242, 'host': 'gone', 'token': 'old',
                                                 'heartbeat': time.time() - 10}))
  third = run_guard.WorkdirLock(workdir, heartbeat_s=60, stale_s=3.0, settle_s=0.1).acquire()
  assert json.loads(paths.read_text(lock_path))['pid'] == os.getpid()
  third.release()
  # A fresh lease of a process of this host that is gone (kill -9, then the same command): taken at once.
  dead = subprocess.Popen([sys.executable, '-c', 'pass'])
  dead.wait()
  paths.write_text_atomic(lock_path, json.dumps({'pid': dead.pid, 'host': socket.gethostname(), 'token': 'old',
                                                 'heartbeat': time.time()}))
  fourth = run_guard.WorkdirLock(workdir, heartbeat_s=60, stale_s=3600, settle_s=0.1).acquire()
  fourth.release()
  # ... but a live one of another host is waited for, saying how long.
  paths.write_text_atomic(lock_path, json.dumps({'pid': os.getpid(), 'host': 'tpu-vm-7', 'token': 'theirs',
                                                 'heartbeat': time.time()}))
  with pytest.raises(run_guard.RunLockedError, match=r'host tpu-vm-7.*goes stale \d+ s from now'):
    run_guard.WorkdirLock(workdir, stale_s=3600, settle_s=0.1).acquire()


def test_lease_race_has_one_winner(gcs, monkeypatch):
  """Two runs that both saw no lease: the one whose token is not read back is refused, naming the other."""
  from input_pipeline import paths
  from ivt_jax.training import run_guard
  workdir = f'gs://{BUCKET}/race'
  lock = run_guard.WorkdirLock(workdir, heartbeat_s=60, settle_s=0.1)
  real_sleep = time.sleep
  def other_run_writes(s):  # during the settle time, another host writes its own lease
    paths.write_text_atomic(f'{workdir}/{run_guard.LOCK_FILE}', json.dumps(
        {'pid': 777, 'host': 'other-host', 'token': 'theirs', 'heartbeat': time.time()}))
    real_sleep(s)
  monkeypatch.setattr(run_guard.time, 'sleep', other_run_writes)
  with pytest.raises(run_guard.RunLockedError, match='process 777 on host other-host'):
    lock.acquire()


@pytest.mark.slow
def test_training_in_a_bucket(gcs, tmp_path, monkeypatch):
  """The tiny demo with --workdir=gs://...: data prepared locally and uploaded, checkpoints, best parameters,
  metrics and picture in the bucket; a second host's cache downloads the data; the same numbers as a local
  workdir; a restart resumes from the bucket."""
  from clu import metric_writers
  from input_pipeline import paths
  from input_pipeline import prepare as prepare_lib
  from ivt_jax.training import checkpoints
  from ivt_jax.training import loop as train
  from tests.test_train import tiny_demo
  real_writer = metric_writers.create_default_writer
  tb_dirs = []
  def local_writer(logdir, **kw):  # TensorFlow's GCS client has no endpoint setting: TensorBoard stays local
    tb_dirs.append(logdir)
    return real_writer(str(tmp_path / 'tb'), **kw)
  monkeypatch.setattr(train.metric_writers, 'create_default_writer', local_writer)

  def config(workdir_kind):
    c = tiny_demo(str(tmp_path / workdir_kind))
    c.data.data_dir = ''  # <workdir>/tfds
    c.data.manual_dir = ''  # SynthPEDES drawn: <workdir>/synthpedes, or the local cache for a gs:// workdir
    c.data.local_cache_dir = str(tmp_path / 'cache_host0')
    c.total_steps = 4
    c.eval_every_epochs = 1
    c.checkpoint_every_steps = 2
    return c

  local = train.train_and_evaluate(config('local'), str(tmp_path / 'local_run'))
  workdir = f'gs://{BUCKET}/run'
  remote = train.train_and_evaluate(config('gcs'), workdir)
  assert tb_dirs[-1] == workdir
  assert remote['test'] == local['test'] and remote['best_step'] == local['best_step']
  names = paths.listdir(workdir)
  for name in ('checkpoints', 'best', 'tfds', 'metrics.json', 'retrieval.png'):
    assert name in names, names
  assert 'run.lock' not in names  # the lease is released at the end
  assert json.loads(paths.read_text(f'{workdir}/metrics.json'))['test'] == remote['test']
  assert paths.read_bytes(f'{workdir}/retrieval.png')[:4] == b'\x89PNG'
  assert sorted(int(s) for s in paths.listdir(f'{workdir}/checkpoints') if s.isdigit()) == [2, 4]
  marker = json.loads(paths.read_text(f'{workdir}/tfds/cuhk_pedes/{prepare_lib.MARKER_FILE}'))
  assert any(f.endswith('.model') for f in marker['files']) and len(marker['files']) > 3

  # Another host: an empty cache, the bucket's data downloaded and opened.
  c = config('gcs')
  c.data.local_cache_dir = str(tmp_path / 'cache_host1')
  prepared = prepare_lib._prepare_remote(c, workdir, f'{workdir}/tfds', 1, process=1, wait_timeout_s=30,
                                         poll_s=0.1)
  assert prepared.data_dir.startswith(str(tmp_path / 'cache_host1'))
  assert prepared.split_sizes == prepare_lib.prepare_here(config('local'), str(tmp_path / 'local_run')).split_sizes

  # The best parameters read back from the bucket equal the local run's.
  from ivt_jax.evaluation import evaluate as evaluate_lib
  _, _, _, _, _, abstract, _ = evaluate_lib.build(config('local'), str(tmp_path / 'local_run'))
  p_remote, _ = checkpoints.restore_params(workdir, abstract)
  p_local, _ = checkpoints.restore_params(str(tmp_path / 'local_run'), abstract)
  for a, b in zip(jax.tree_util.tree_leaves(p_remote), jax.tree_util.tree_leaves(p_local)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

  # The same command again: it resumes at the last step in the bucket and trains nothing more.
  again = train.train_and_evaluate(config('gcs'), workdir)
  assert again['test'] == remote['test']

  # Search from the bucket: the model from the gs:// workdir (its tokenizer named by the bucket's marker), an
  # index written to the bucket with the same vectors as one on a local disk, a contact sheet in the bucket, and
  # the search server's watcher seeing the index change.
  from ivt_jax import search
  from ivt_jax.search import state as serve_state
  folder = os.path.join(prepare_lib.local_cache_of(config('gcs'), workdir), 'synthpedes', 'imgs', 'test')
  index_dir, local_index = f'gs://{BUCKET}/index', str(tmp_path / 'index')
  assert search.main(['index', f'--checkpoint={workdir}', f'--images={folder}', f'--out={index_dir}',
                      '--batch=4']) == 0
  assert search.main(['index', f'--checkpoint={tmp_path / "local_run"}', f'--images={folder}',
                      f'--out={local_index}', '--batch=4']) == 0
  in_bucket, on_disk = search.load_index(index_dir), search.load_index(local_index)
  assert in_bucket.paths == on_disk.paths and len(in_bucket.paths) > 0
  np.testing.assert_array_equal(in_bucket.dense(), on_disk.dense())
  assert not isinstance(in_bucket.shards[0].embeddings, np.memmap)  # read from the bucket, not mapped
  sheet = f'gs://{BUCKET}/sheet.png'
  assert search.main(['query', f'--index={index_dir}', 'a man in a blue shirt', '--sheet', sheet]) == 0
  assert paths.read_bytes(sheet)[:4] == b'\x89PNG'
  holder = serve_state.IndexHolder(index_dir, search.load_model(workdir), check_every_s=3600)
  try:
    before = holder._header_stamp()  # pylint: disable=protected-access
    assert search.main(['index', f'--checkpoint={workdir}', f'--images={folder}', f'--out={index_dir}',
                        '--rebuild']) == 0
    assert holder._header_stamp() != before  # pylint: disable=protected-access
  finally:
    holder.close()
