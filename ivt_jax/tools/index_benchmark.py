"""What an index of many rows costs to open, search and update: writes a synthetic index in the index format
(ivt_jax/search/store.py) and measures it in a fresh process.

  python -m ivt_jax.tools.index_benchmark --rows=10000000 [--dim=768] [--dtype=float16] [--shard_rows=1048576]
      [--dir=/tmp/index_benchmark] [--json=OUT]

Rows are unit vectors with paths like /data/cam017/000123456.jpg (their sizes and times made up). Printed: the
time to write the shards and the bytes on disk; then, in a new process (so that nothing is already in memory but
the page cache): the time to open the index and the memory it holds beyond the mapped embeddings (resident
memory less the mapped pages), an exact top-10 query (every row scored through the mapped shards: this reads
them all, so it is bound by the disk or the page cache) with the paths of its results, and the time of an update
that appends a shard of 5,000 rows (old shards untouched, so it does not grow with the index).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from typing import Optional, Sequence

import numpy as np


def _rss_mb() -> tuple[float, float]:
  """(resident MB, of which anonymous MB: not file-backed, so not the mapped shards) from /proc/self/status."""
  fields = {}
  with open('/proc/self/status') as f:
    for line in f:
      key, _, value = line.partition(':')
      fields[key] = value.strip()
  kb = lambda k: float(fields.get(k, '0 kB').split()[0])
  return kb('VmRSS') / 1024, kb('RssAnon') / 1024


def write(directory: str, rows: int, dim: int, dtype: str, shard_rows: int, log=print) -> dict:
  """A synthetic index of `rows` rows in shards of `shard_rows`; -> {seconds, bytes}."""
  from ivt_jax.search import store  # pylint: disable=g-import-not-at-top
  shutil.rmtree(directory, ignore_errors=True)
  os.makedirs(directory)
  rng = np.random.default_rng(0)
  t0 = time.time()
  entries, run = [], store.new_run_id()
  for i, a in enumerate(range(0, rows, shard_rows)):
    n = min(shard_rows, rows - a)
    x = rng.standard_normal((n, dim), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    ids = np.arange(a, a + n)
    table = _rows({'path': [f'/data/cam{j % 97:03d}/{j:09d}.jpg' for j in ids.tolist()],
                   'size': (40_000 + ids % 9_000).astype(np.int64),
                   'mtime_ns': (1_700_000_000_000_000_000 + ids).astype(np.int64)})
    entries.append(store.write_shard(directory, f'{run}-p000-{i:05d}', table, x, dtype, 'synthetic'))
    log(f'wrote {a + n:,}/{rows:,} rows')
  header = {'identity': {'fingerprint': 'synthetic'}, 'roots': ['/data'], 'dim': dim, 'shards': entries,
            'stats': {'images': rows, 'dim': dim}}
  store.write_header(directory, header, np.zeros((0,), np.int64), [])
  size = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(directory) for f in fs)
  return {'seconds': round(time.time() - t0, 1), 'bytes': size}


def _rows(columns: dict):
  """A rows table of the index format from these columns (the others empty), built column-wise."""
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  from ivt_jax.search import store  # pylint: disable=g-import-not-at-top
  n = len(columns['path'])
  return pa.Table.from_pydict({name: columns[name] if name in columns else pa.nulls(n, getattr(pa, kind)())
                               for name, kind in store.COLUMNS}, schema=store.schema())


def measure(directory: str, queries: int = 5) -> dict:
  """Open, query and update (run in a fresh process by `main`)."""
  from ivt_jax.search import index as search_index  # pylint: disable=g-import-not-at-top
  from ivt_jax.search import store  # pylint: disable=g-import-not-at-top
  import pyarrow.parquet  # pylint: disable=g-import-not-at-top,unused-import (its libraries are not the index)
  _, anon0 = _rss_mb()
  t = time.perf_counter()
  index = store.open_index(directory)
  open_s = time.perf_counter() - t
  _, anon1 = _rss_mb()
  rng = np.random.default_rng(1)
  times, paths_s = [], []
  for _ in range(queries):
    q = rng.standard_normal(index.dim).astype(np.float32)
    q /= np.linalg.norm(q)
    t = time.perf_counter()
    top = search_index.top_k(index.scores(q), 0, 10)
    times.append(time.perf_counter() - t)
    t = time.perf_counter()
    [index.path(int(r)) for r in top]  # pylint: disable=expression-not-assigned
    paths_s.append(time.perf_counter() - t)
  _, anon2 = _rss_mb()
  x = rng.standard_normal((5000, index.dim)).astype(np.float32)
  t = time.perf_counter()
  entry = store.write_shard(directory, f'{store.new_run_id()}-p000-update', [
      {'path': f'/data/new/{i:06d}.jpg', 'size': 1, 'mtime_ns': 1} for i in range(5000)], x,
      str(index.shards[0].embeddings.dtype), 'synthetic')
  store.write_header(directory, dict(index.header, shards=index.header['shards'] + [entry]), index.deleted, [])
  update_s = time.perf_counter() - t
  return {'rows': len(index), 'shards': len(index.shards), 'open_s': round(open_s, 2),
          'memory_after_open_mb': round(anon1 - anon0, 1),
          'query_top10_s_median': round(float(np.median(times)), 2), 'query_top10_s_first': round(times[0], 2),
          'paths_of_top10_ms': round(1000 * float(np.median(paths_s)), 3),
          'memory_after_queries_mb': round(anon2 - anon0, 1),
          'update_5000_rows_s': round(update_s, 2)}


def main(argv: Optional[Sequence[str]] = None) -> int:
  p = argparse.ArgumentParser(prog='python -m ivt_jax.tools.index_benchmark', description=__doc__.split('\n')[0])
  p.add_argument('--rows', type=int, default=1_000_000)
  p.add_argument('--dim', type=int, default=768)
  p.add_argument('--dtype', default='float16', choices=('float32', 'float16'))
  p.add_argument('--shard_rows', type=int, default=1 << 20)
  p.add_argument('--queries', type=int, default=5)
  p.add_argument('--dir', default='/tmp/index_benchmark', help='where the synthetic index is written (replaced)')
  p.add_argument('--keep', action='store_true', help='keep the index (default: removed at the end)')
  p.add_argument('--json', default='', help='also write the figures here')
  p.add_argument('--measure_only', action='store_true', help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.measure_only:
    print(json.dumps(measure(args.dir, args.queries)))
    return 0
  if args.rows < 1 or args.dim < 1 or args.shard_rows < 1 or args.queries < 1:
    p.error('--rows, --dim, --shard_rows and --queries must be >= 1')
  log = lambda line: print(line, file=sys.stderr, flush=True)
  written = write(args.dir, args.rows, args.dim, args.dtype, args.shard_rows, log)
  out = subprocess.run([sys.executable, '-m', 'ivt_jax.tools.index_benchmark', '--measure_only',
                        f'--dir={args.dir}', f'--queries={args.queries}'], capture_output=True, text=True,
                       check=False)
  if out.returncode:
    raise RuntimeError(f'the measuring process failed:\n{out.stderr[-3000:]}')
  r = {'rows': args.rows, 'dim': args.dim, 'dtype': args.dtype, 'write_s': written['seconds'],
       'disk_gb': round(written['bytes'] / 1e9, 2), **json.loads(out.stdout.strip().splitlines()[-1])}
  print(f'index of {r["rows"]:,} x {r["dim"]} {r["dtype"]} in {r["shards"]} shards ({r["disk_gb"]} GB, written in '
        f'{r["write_s"]} s)')
  print('| open | memory beyond the mapped shards | exact top-10 query (median / first) | paths of the 10 | '
        'update of 5,000 rows |')
  print('|---:|---:|---:|---:|---:|')
  print(f'| {r["open_s"]} s | {r["memory_after_open_mb"]:,} MB (after queries: {r["memory_after_queries_mb"]:,} MB) '
        f'| {r["query_top10_s_median"]} / {r["query_top10_s_first"]} s | {r["paths_of_top10_ms"]} ms | '
        f'{r["update_5000_rows_s"]} s |')
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(r, f, indent=1)
  if not args.keep:
    shutil.rmtree(args.dir, ignore_errors=True)
  return 0


if __name__ == '__main__':
  sys.exit(main())
