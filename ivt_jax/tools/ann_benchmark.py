"""Approximate against exact search on a synthetic gallery: recall@10, latency, build time, memory.

  python -m ivt_jax.tools.ann_benchmark [--images=1000000] [--dim=128] [--queries=1000] [--json=OUT]

The gallery imitates person embeddings: --images unit vectors in --identities clusters (an identity's images
are its centre plus noise, as different views of one person), queries the centre of a random identity plus
noise of their own (a description is not any one of the images). Exact search scores every embedding (one
float32 matrix product, the server's default); the approximate index is ivt_jax/search/ann.py's faiss HNSW.
recall@10 is the fraction of the exact top 10 that the approximate top 10 holds, averaged over the queries.
Latency is one query at a time (as the server answers), p50 and p99 over --queries, after a warm-up.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Optional, Sequence

import numpy as np


def gallery(n: int, dim: int, identities: int, queries: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  rng = np.random.default_rng(seed)
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  centres = unit(rng.standard_normal((identities, dim), dtype=np.float32))
  x = np.empty((n, dim), np.float32)
  step = 100_000
  for i in range(0, n, step):  # in chunks: a million at once would need several copies in memory
    ids = rng.integers(0, identities, min(step, n - i))
    x[i:i + len(ids)] = unit(centres[ids] + 0.08 * rng.standard_normal((len(ids), dim), dtype=np.float32))
  q = unit(centres[rng.integers(0, identities, queries)] + 0.1 * rng.standard_normal((queries, dim),
                                                                                       dtype=np.float32))
  return x, q


def exact_top(x: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
  s = q @ x.T
  part = np.argpartition(-s, k - 1, axis=1)[:, :k]
  order = np.take_along_axis(s, part, 1).argsort(axis=1)[:, ::-1]
  return np.take_along_axis(part, order, 1)


def run(images: int, dim: int, queries: int, identities: int, k: int = 10, seed: int = 0) -> dict:
  from ivt_jax.search import ann as serve_ann  # pylint: disable=g-import-not-at-top
  x, q = gallery(images, dim, identities, queries, seed)
  truth = np.concatenate([exact_top(x, q[i:i + 64], k) for i in range(0, len(q), 64)])
  t = time.perf_counter()
  ann = serve_ann.build(x)
  build_s = time.perf_counter() - t
  found, _ = ann.search_batch(q, k)
  recall = float(np.mean([len(set(a) & set(b)) / k for a, b in zip(found, truth)]))

  def latency(fn):
    for i in range(min(5, len(q))):
      fn(q[i])
    times = []
    for i in range(len(q)):
      t = time.perf_counter()
      fn(q[i])
      times.append(time.perf_counter() - t)
    times.sort()
    return 1000 * times[len(times) // 2], 1000 * times[min(len(times) - 1, int(0.99 * (len(times) - 1)))]

  def exact_one(v):
    s = x @ v
    return np.argpartition(-s, k - 1)[:k]
  exact_p50, exact_p99 = latency(exact_one)
  ann_p50, ann_p99 = latency(lambda v: ann.search(v, k))
  return {'images': images, 'dim': dim, 'identities': identities, 'queries': queries, 'k': k,
          f'recall@{k}': round(recall, 4), 'build_s': round(build_s, 1),
          'exact_p50_ms': round(exact_p50, 2), 'exact_p99_ms': round(exact_p99, 2),
          'hnsw_p50_ms': round(ann_p50, 3), 'hnsw_p99_ms': round(ann_p99, 3),
          'embeddings_mb': round(x.nbytes / 2**20, 1),
          'hnsw_graph_mb': round(images * serve_ann.M * 2 * 4 / 2**20, 1)}


def table(r: dict) -> str:
  return ('| gallery | recall@10 | exact p50 / p99 ms | HNSW p50 / p99 ms | HNSW build s |\n'
          '|---|---:|---:|---:|---:|\n'
          f'| {r["images"]:,} x {r["dim"]} | {r["recall@10"]:.4f} | {r["exact_p50_ms"]} / {r["exact_p99_ms"]} | '
          f'{r["hnsw_p50_ms"]} / {r["hnsw_p99_ms"]} | {r["build_s"]} |')


def main(argv: Optional[Sequence[str]] = None) -> int:
  p = argparse.ArgumentParser(prog='python -m ivt_jax.tools.ann_benchmark', description=__doc__.split('\n')[0])
  p.add_argument('--images', type=int, default=1_000_000)
  p.add_argument('--dim', type=int, default=128)
  p.add_argument('--identities', type=int, default=0, help='clusters (default: images / 10)')
  p.add_argument('--queries', type=int, default=1000)
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--json', default='')
  args = p.parse_args(argv)
  if args.images < 10 or args.dim < 2 or args.queries < 1:
    p.error('--images >= 10, --dim >= 2 and --queries >= 1 are needed')
  r = run(args.images, args.dim, args.queries, args.identities or max(1, args.images // 10), seed=args.seed)
  print(table(r))
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(r, f, indent=2)
  return 0


if __name__ == '__main__':
  sys.exit(main())
