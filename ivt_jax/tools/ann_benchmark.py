"""Approximate against exact search: recall@10, latency, queries/s, build time and memory, per kind of index.

  python -m ivt_jax.tools.ann_benchmark [--images=200000] [--dim=768] [--queries=1000] [--kinds=ivf,hnsw]
  python -m ivt_jax.tools.ann_benchmark --vectors=GALLERY.npy --queries_file=QUERIES.npy   (your own embeddings)
      [--json=OUT]

Without files, a synthetic gallery shaped like person embeddings: --images unit vectors of people (about 4 images
each) who share looks (400 images per look: people who dress alike sit near each other), and text-side queries:
a person's centre moved by a fixed modality gap (--gap, one direction for every query: texts sit apart from the
images they describe) plus noise of their own. Exact search scores every embedding (one float32 product, the
server's default); the approximate indexes are ivt_jax/search/ann.py's, at its settings. recall@10 is the fraction
of the exact top 10 that the approximate top 10 holds, averaged over the queries. Latency is one query at a time
(as the server answers), p50 and p99 after a warm-up; queries/s is for all the queries in one batch.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Optional, Sequence

import numpy as np

IMAGES_PER_PERSON, IMAGES_PER_LOOK = 4, 400


def gallery(n: int, dim: int, queries: int, seed: int = 0, gap: float = 0.7) -> tuple[np.ndarray, np.ndarray]:
  """(n, dim) unit images and (queries, dim) unit text-side queries (see the module docstring)."""
  rng = np.random.default_rng(seed)
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  noise = lambda m: unit(rng.standard_normal((m, dim), dtype=np.float32))
  people = max(1, n // IMAGES_PER_PERSON)
  looks = unit(rng.standard_normal((max(1, n // IMAGES_PER_LOOK), dim), dtype=np.float32))
  centres = np.empty((people, dim), np.float32)
  x = np.empty((n, dim), np.float32)
  step = 100_000
  for i in range(0, people, step):  # in chunks: a million at once would need several copies in memory
    m = min(step, people - i)
    centres[i:i + m] = unit(looks[rng.integers(0, len(looks), m)] + 0.9 * noise(m))
  for i in range(0, n, step):
    m = min(step, n - i)
    x[i:i + m] = unit(centres[rng.integers(0, people, m)] + 0.6 * noise(m))
  direction = unit(rng.standard_normal(dim).astype(np.float32))
  q = unit(centres[rng.integers(0, people, queries)] + gap * direction + 0.7 * noise(queries))
  return x, q


def exact_top(x: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
  s = q @ x.T
  part = np.argpartition(-s, k - 1, axis=1)[:, :k]
  order = np.take_along_axis(s, part, 1).argsort(axis=1)[:, ::-1]
  return np.take_along_axis(part, order, 1)


def _latency(fn, q) -> tuple[float, float]:
  for i in range(min(5, len(q))):
    fn(q[i])
  times = []
  for i in range(len(q)):
    t = time.perf_counter()
    fn(q[i])
    times.append(time.perf_counter() - t)
  times.sort()
  return 1000 * times[len(times) // 2], 1000 * times[min(len(times) - 1, int(0.99 * (len(times) - 1)))]


def memory_mb(kind: str, n: int, dim: int) -> float:
  """What an index of `kind` holds beside nothing: the float vectors (all kinds keep a copy for reranking or
  search) plus 1-byte codes (ivf) or the graph's M x 2 neighbour ids (hnsw)."""
  from ivt_jax.search import ann as serve_ann  # pylint: disable=g-import-not-at-top
  floats = n * dim * 4
  extra = n * (dim + 8) if kind == 'ivf' else n * serve_ann.M * 2 * 4
  return (floats + extra) / 2**20


def run(x: np.ndarray, q: np.ndarray, kinds: Sequence[str] = ('ivf', 'hnsw'), k: int = 10,
        log=lambda _: None) -> dict:
  from ivt_jax.search import ann as serve_ann  # pylint: disable=g-import-not-at-top
  x = np.ascontiguousarray(x, np.float32)
  q = np.ascontiguousarray(q, np.float32)
  truth = np.concatenate([exact_top(x, q[i:i + 64], k) for i in range(0, len(q), 64)])
  t = time.perf_counter()
  for i in range(0, len(q), 64):
    exact_top(x, q[i:i + 64], k)
  exact_qps = len(q) / (time.perf_counter() - t)
  p50, p99 = _latency(lambda v: np.argpartition(-(x @ v), k - 1)[:k], q)
  out = {'images': len(x), 'dim': x.shape[1], 'queries': len(q), 'k': k,
         'exact': {'p50_ms': round(p50, 2), 'p99_ms': round(p99, 2), 'queries_per_s': round(exact_qps, 1),
                   'memory_mb': round(x.nbytes / 2**20, 1)}}
  for kind in kinds:
    log(f'{kind}: building over {len(x):,} x {x.shape[1]}')
    t = time.perf_counter()
    ann = serve_ann.build(x, kind)
    build_s = time.perf_counter() - t
    t = time.perf_counter()
    found, _ = ann.search_batch(q, k)
    qps = len(q) / (time.perf_counter() - t)
    recall = float(np.mean([len(set(a) & set(b)) / k for a, b in zip(found, truth)]))
    p50, p99 = _latency(lambda v: ann.search(v, k), q)
    out[kind] = {f'recall@{k}': round(recall, 4), 'p50_ms': round(p50, 3), 'p99_ms': round(p99, 3),
                 'queries_per_s': round(qps, 1), 'build_s': round(build_s, 1),
                 'memory_mb': round(memory_mb(kind, len(x), x.shape[1]), 1)}
    log(f'{kind}: {out[kind]}')
  return out


def table(r: dict) -> str:
  lines = [f'gallery {r["images"]:,} x {r["dim"]}, {r["queries"]:,} queries',
           '| search | recall@10 | p50 / p99 ms | queries/s (batch) | build s | memory MB |',
           '|---|---:|---:|---:|---:|---:|',
           f'| exact | 1.0000 | {r["exact"]["p50_ms"]} / {r["exact"]["p99_ms"]} | {r["exact"]["queries_per_s"]:,.0f} | '
           f'- | {r["exact"]["memory_mb"]:,.0f} |']
  for kind in ('ivf', 'hnsw'):
    if kind in r:
      a = r[kind]
      lines.append(f'| {kind} | {a["recall@10"]:.4f} | {a["p50_ms"]} / {a["p99_ms"]} | {a["queries_per_s"]:,.0f} | '
                   f'{a["build_s"]} | {a["memory_mb"]:,.0f} |')
  return '\n'.join(lines)


def _load(path: str, what: str) -> np.ndarray:
  try:
    a = np.load(path, mmap_mode='r')
  except (OSError, ValueError) as e:
    raise ValueError(f'{what} {path}: not a readable .npy file ({e})') from None
  if a.ndim != 2 or not len(a):
    raise ValueError(f'{what} {path}: expected a (N, D) array, got shape {a.shape}')
  return np.asarray(a, np.float32)


def main(argv: Optional[Sequence[str]] = None) -> int:
  from ivt_jax.search import ann as serve_ann  # pylint: disable=g-import-not-at-top
  p = argparse.ArgumentParser(prog='python -m ivt_jax.tools.ann_benchmark', description=__doc__.split('\n')[0])
  p.add_argument('--images', type=int, default=200_000)
  p.add_argument('--dim', type=int, default=768)
  p.add_argument('--queries', type=int, default=1000, help='synthetic queries')
  p.add_argument('--gap', type=float, default=0.7, help='the synthetic queries\' modality gap')
  p.add_argument('--vectors', default='', help='a (N, D) .npy of gallery embeddings instead of the synthetic one')
  p.add_argument('--queries_file', default='', help='a (Q, D) .npy of query embeddings (with --vectors)')
  p.add_argument('--kinds', default='ivf,hnsw', help=f'approximate indexes to measure: {",".join(serve_ann.KINDS)}')
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--json', default='')
  args = p.parse_args(argv)
  kinds = [k.strip() for k in args.kinds.split(',') if k.strip()]
  if not kinds or any(k not in serve_ann.KINDS for k in kinds):
    p.error(f'--kinds: a comma-separated list of {", ".join(serve_ann.KINDS)}, got {args.kinds!r}')
  if bool(args.vectors) != bool(args.queries_file):
    p.error('--vectors and --queries_file go together')
  if args.vectors:
    x, q = _load(args.vectors, '--vectors'), _load(args.queries_file, '--queries_file')
    if x.shape[1] != q.shape[1]:
      p.error(f'--vectors are {x.shape[1]}-d but --queries_file {q.shape[1]}-d')
  else:
    if args.images < 10 or args.dim < 2 or args.queries < 1:
      p.error('--images >= 10, --dim >= 2 and --queries >= 1 are needed')
    x, q = gallery(args.images, args.dim, args.queries, args.seed, args.gap)
  r = run(x, q, kinds, log=lambda line: print(line, file=sys.stderr, flush=True))
  print(table(r))
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(r, f, indent=2)
  return 0


if __name__ == '__main__':
  from ivt_jax.runtime import cli as cli_lib  # pylint: disable=g-import-not-at-top
  sys.exit(cli_lib.run_cli(main))
