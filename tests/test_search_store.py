"""The index on disk: first-format indexes open and convert, compaction, a killed run's shards adopted, the
approximate index updated in place, and an index built by two processes under jax.distributed."""
import json
import os
import shutil
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from ivt_jax import search
from ivt_jax.search import ann as search_ann
from ivt_jax.search import store
from tests.test_search import tiny_model, tiny_run  # noqa: F401 (session fixtures: a tiny demo workdir)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _images(tiny_run):  # noqa: F811
  folder = os.path.join(tiny_run[1].data.manual_dir, 'imgs', 'test')
  return sorted(os.path.join(folder, f) for f in os.listdir(folder))


def _folder(tiny_run, tmp_path, n=None):  # noqa: F811
  src = _images(tiny_run)[:n]
  folder = tmp_path / 'photos'
  folder.mkdir()
  for p in src:
    shutil.copy(p, folder / os.path.basename(p))
  return str(folder), sorted(str(folder / os.path.basename(p)) for p in src)


def _write_first_format(index: store.Index, directory: str) -> None:
  """The index as the first format wrote it: manifest.json with one entry per row and one embeddings file."""
  os.makedirs(directory)
  np.save(os.path.join(directory, 'embeddings-0a1b2c3d.npy'), index.dense())
  entries = [{k: e[k] for k in ('path', 'size', 'mtime_ns')} for e in map(index.entry, index.live_rows)]
  manifest = {k: v for k, v in index.header.items() if k in ('identity', 'model', 'preprocess', 'roots', 'stats')}
  manifest.update(format='ivt-jax-image-index', version=1, embeddings='embeddings-0a1b2c3d.npy', entries=entries,
                  unreadable=[])
  with open(os.path.join(directory, 'manifest.json'), 'w') as f:
    json.dump(manifest, f)


def test_first_format_opens_converts_and_updates(tiny_run, tiny_model, tmp_path, capsys):  # noqa: F811
  folder, files = _folder(tiny_run, tmp_path)
  built = search.build_index(tiny_model, folder, str(tmp_path / 'new'), log=lambda _: None)
  assert built['images'] == len(files)
  new = search.load_index(str(tmp_path / 'new'))
  old_dir = str(tmp_path / 'old')
  _write_first_format(new, old_dir)
  old = search.load_index(old_dir)
  assert old.version == 1 and old.paths == files and old.live == len(files)
  np.testing.assert_array_equal(old.dense(), new.dense())
  q = search.embed_texts(tiny_model, ['a man in a black jacket'])[0]
  assert search.search(tiny_model, old, ['a man in a black jacket']) == \
      search.search(tiny_model, new, ['a man in a black jacket'])
  np.testing.assert_allclose(old.scores(q), new.scores(q), atol=1e-6)

  assert search.main(['convert', f'--index={old_dir}']) == 0
  assert 'shard(s)' in capsys.readouterr().out
  converted = search.load_index(old_dir)
  assert converted.version == 2 and converted.paths == files
  np.testing.assert_array_equal(converted.dense(), new.dense())
  assert sorted(os.listdir(old_dir)) == ['index.json', 'shards']
  assert search.cli(['convert', f'--index={old_dir}']) == 2
  assert 'already a version 2 index' in capsys.readouterr().err

  # An update of a first-format index converts it and embeds only what changed.
  again = str(tmp_path / 'again')
  _write_first_format(new, again)
  os.remove(files[0])
  result = search.build_index(tiny_model, folder, again, log=lambda _: None)
  assert (result['embedded'], result['removed'], result['images']) == (0, 1, len(files) - 1)
  assert search.load_index(again).version == 2 and not os.path.exists(os.path.join(again, 'manifest.json'))


def test_compact_drops_deleted_rows_and_float16(tiny_run, tiny_model, tmp_path):  # noqa: F811
  folder, files = _folder(tiny_run, tmp_path)
  out = str(tmp_path / 'index')
  search.build_index(tiny_model, folder, out, batch_size=2, save_every=4, log=lambda _: None)
  first = search.load_index(out)
  batch = search.model.round_up(2, tiny_model.mesh.size)  # a shard per batch once 4 are waiting
  assert [s.n for s in first.shards] == [batch] * (len(files) // batch) + [len(files) % batch] * (len(files) % batch > 0)
  vectors = {first.path(int(r)): first.vector(int(r)) for r in first.live_rows}
  for p in files[1:3]:
    os.remove(p)
  search.build_index(tiny_model, folder, out, log=lambda _: None)
  before = search.load_index(out)
  assert len(before) == len(files) and len(before.deleted) == 2 and before.live == len(files) - 2
  assert search.main(['compact', f'--index={out}', '--shard_rows=5']) == 0
  after = search.load_index(out)
  assert len(after) == after.live == len(files) - 2 and len(after.deleted) == 0
  assert after.paths == before.paths and [s.n for s in after.shards][0] == 5
  for r in after.live_rows:
    np.testing.assert_array_equal(after.vector(int(r)), vectors[after.path(int(r))])
  assert set(os.listdir(os.path.join(out, 'shards'))) == {s.name + e for s in after.shards for e in ('.npy', '.parquet')}
  # float16 shards: half the bytes, the same ranking to float16 precision.
  assert search.main(['compact', f'--index={out}', '--dtype=float16']) == 0
  half = search.load_index(out)
  assert {s.embeddings.dtype for s in half.shards} == {np.dtype('float16')}
  q = search.embed_texts(tiny_model, ['a woman with a red bag'])[0]
  np.testing.assert_allclose(half.scores(q), after.scores(q), atol=2e-3)
  # An update after a compaction keeps working (new rows appended after the compacted ones).
  shutil.copy(_images(tiny_run)[1], files[1])
  result = search.build_index(tiny_model, folder, out, log=lambda _: None)
  assert result['embedded'] == 1 and search.load_index(out).live == len(files) - 1


class _Killed(Exception):
  pass


def test_a_killed_run_loses_at_most_its_last_shard(tiny_run, tiny_model, tmp_path):  # noqa: F811
  folder, files = _folder(tiny_run, tmp_path)
  out = str(tmp_path / 'index')
  lines = []

  batch = search.model.round_up(2, tiny_model.mesh.size)
  assert len(files) > batch

  def log(line):  # the process dies during its second batch (the first one's shard written, save_every=2)
    lines.append(line)
    if line.startswith(f'embedded {min(2 * batch, len(files))}/'):
      raise _Killed()
  with pytest.raises(_Killed):
    search.build_index(tiny_model, folder, out, batch_size=2, save_every=2, log_every_s=0, log=log)
  partial = search.load_index(out)
  assert partial.live == batch  # the first shard was committed with its header
  # A half-written file of the killed run is cleaned up; the next run embeds only what is not in a shard.
  with open(os.path.join(out, 'shards', 'deadbeef-p000-00009.npy.tmp123'), 'wb') as f:
    f.write(b'partial')
  result = search.build_index(tiny_model, folder, out, batch_size=2, log=lambda _: None)
  assert result['embedded'] == len(files) - batch and result['unchanged'] == batch
  index = search.load_index(out)
  assert sorted(index.paths) == files and index.live == len(files)
  assert not any(n.endswith('.tmp123') for n in os.listdir(os.path.join(out, 'shards')))
  # A finished shard that never made it into a header (a process killed between the two) is adopted.
  orphan = store.write_shard(out, '00000000000000ff-p001-00000', [{'path': files[0], 'size': 1, 'mtime_ns': 1}],
                             index.vector(0)[None], 'float32', tiny_model.identity['fingerprint'])
  result = search.build_index(tiny_model, folder, out, batch_size=2, log=lambda _: None)
  index = search.load_index(out)
  assert orphan['name'] in [s.name for s in index.shards] and sorted(index.paths) == files
  # Its row is of another version of the file (size and time differ): dropped, the file's own row kept.
  assert result['embedded'] == 0 and index.live == len(files) and not index.is_live(len(index) - 1)


@pytest.mark.parametrize('kind', ['ivf', 'hnsw'])
def test_saved_approximate_index_follows_updates(tiny_run, tiny_model, tmp_path, kind, capsys):  # noqa: F811
  folder, files = _folder(tiny_run, tmp_path, 8)
  out = str(tmp_path / 'index')
  search.build_index(tiny_model, folder, out, log=lambda _: None)
  said = []
  q = search.embed_texts(tiny_model, ['a man with a black backpack'])[0]

  def check(index, ann):
    rows, scores = ann.search(q, 5)
    exact = index.scores(q)
    want = search.index.top_k(exact, 0, 5)
    assert list(rows) == list(want) and np.allclose(scores, exact[want], atol=1e-5)

  index = search.load_index(out)
  ann = search_ann.ensure(index, kind, log=said.append)
  assert 'built' in ' '.join(said) and ann.size == 8
  check(index, ann)
  for p in _images(tiny_run)[8:11]:  # three new images
    shutil.copy(p, os.path.join(folder, os.path.basename(p)))
  search.build_index(tiny_model, folder, out, log=lambda _: None)
  said.clear()
  index = search.load_index(out)
  ann = search_ann.ensure(index, kind, log=said.append)
  assert any('updated to 11 images (3 rows added' in s for s in said), said
  check(index, ann)
  os.remove(files[0])
  search.build_index(tiny_model, folder, out, log=lambda _: None)
  said.clear()
  index = search.load_index(out)
  assert search.main(['ann', f'--index={out}', f'--kind={kind}']) == 0
  assert 'over 10 images' in capsys.readouterr().out
  ann = search_ann.ensure(index, kind, log=said.append)
  assert 'loaded' in said[-1] and ann.size == 10
  check(index, ann)
  rows, _ = ann.search(q, 10)
  assert index.deleted[0] not in rows


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def test_two_processes_build_one_index(tiny_run, tiny_model, tmp_path):  # noqa: F811
  folder, files = _folder(tiny_run, tmp_path)
  out = str(tmp_path / 'index')
  port = _free_port()
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=1', JAX_PLATFORMS='cpu')
  args = [sys.executable, '-m', 'ivt_jax.search', 'index', f'--checkpoint={tiny_run[0]}', f'--images={folder}',
          f'--out={out}', '--batch=2', '--save_every=2', f'--coordinator_address=127.0.0.1:{port}',
          '--num_processes=2', '--cpu_collectives=gloo']
  logs = [tmp_path / f'p{i}.log' for i in range(2)]
  procs = [subprocess.Popen(args + [f'--process_id={i}'], cwd=ROOT, env=env, stdout=open(logs[i], 'w'),
                            stderr=subprocess.STDOUT) for i in range(2)]
  deadline = time.time() + 600
  while any(p.poll() is None for p in procs) and time.time() < deadline:
    if any(p.poll() not in (None, 0) for p in procs):
      break
    time.sleep(0.5)
  for p in procs:
    if p.poll() is None:
      p.kill()
    p.wait()
  texts = [log.read_text() for log in logs]
  assert [p.returncode for p in procs] == [0, 0], '\n----\n'.join(t[-3000:] for t in texts)
  assert f'({(len(files) + 1) // 2} by process 0 of 2)' in texts[0] and f'({len(files) // 2} by process 1 of 2)' in texts[1]
  index = search.load_index(out)
  assert sorted(index.paths) == files and index.live == len(files) and len(index.deleted) == 0
  writers = {s.name.split('-')[1] for s in index.shards}
  assert writers == {'p000', 'p001'}, [s.name for s in index.shards]
  alone = search.embed_images(tiny_model, np.stack([search.load_image(index.path(int(r)), tiny_model.image_size)
                                                    for r in index.live_rows]))
  np.testing.assert_allclose(index.dense(), alone, atol=2e-5)
  assert not [n for n in os.listdir(os.path.join(out, 'shards')) if n.endswith('.json')]


def test_index_benchmark_small(tmp_path, capsys):
  from ivt_jax.tools import index_benchmark
  out = tmp_path / 'r.json'
  assert index_benchmark.main(['--rows=3000', '--dim=16', '--shard_rows=1000', f'--dir={tmp_path / "i"}',
                               '--queries=2', f'--json={out}']) == 0
  assert '3,000 x 16 float16 in 3 shards' in capsys.readouterr().out
  r = json.loads(out.read_text())
  assert r['rows'] == 3000 and r['shards'] == 3 and r['open_s'] >= 0 and r['query_top10_s_median'] >= 0
  assert not (tmp_path / 'i').exists()  # removed unless --keep
