"""A load test of the search server: concurrent clients sending text queries, latency percentiles, errors.

  python -m ivt_jax.tools.load_test --url=http://127.0.0.1:8000 [--clients=16] [--queries=200] [--k=20]
      [--token=...] [--timeout=600] [--json=OUT]

Each client (a thread with its own HTTP connection) sends --queries searches one after the other, each a
description drawn from a fixed list of attributes (the same texts for the same --seed). It stops by itself
after clients x queries requests or --timeout seconds, and prints queries/s, p50/p95/p99/max latency and the
errors (any status other than 200, or a failed connection), as a table and optionally as JSON.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import random
import sys
import time
from typing import Optional, Sequence

COLOURS = ('black', 'white', 'red', 'blue', 'green', 'grey', 'yellow', 'brown', 'pink', 'purple')
PEOPLE = ('a woman', 'a man', 'a girl', 'a boy', 'a young woman', 'an old man', 'a person')
CLOTHES = ('coat', 'jacket', 'shirt', 'dress', 'sweater', 't-shirt', 'hoodie')
LOWER = ('pants', 'jeans', 'shorts', 'skirt', 'trousers')
EXTRAS = ('a black backpack', 'a handbag', 'a hat', 'glasses', 'an umbrella', 'white shoes', 'boots')


def descriptions(n: int, seed: int = 0) -> list[str]:
  rng = random.Random(seed)
  return [f'{rng.choice(PEOPLE)} in a {rng.choice(COLOURS)} {rng.choice(CLOTHES)} and {rng.choice(COLOURS)} '
          f'{rng.choice(LOWER)} with {rng.choice(EXTRAS)}' for _ in range(n)]


def percentile(sorted_values: Sequence[float], p: float) -> float:
  if not sorted_values:
    return float('nan')
  i = min(len(sorted_values) - 1, max(0, int(round(p / 100.0 * (len(sorted_values) - 1)))))
  return sorted_values[i]


def run(url: str, clients: int, queries: int, k: int = 20, token: str = '', timeout_s: float = 600.0,
        seed: int = 0) -> dict:
  import httpx  # pylint: disable=g-import-not-at-top
  url = url.rstrip('/')
  headers = {'Authorization': f'Bearer {token}'} if token else {}
  texts = descriptions(clients * queries, seed)
  deadline = time.monotonic() + timeout_s

  def client(c: int):
    lat, errors = [], []
    with httpx.Client(headers=headers, timeout=60.0) as http:
      for i in range(queries):
        if time.monotonic() > deadline:
          errors.append('stopped: --timeout reached')
          break
        t = time.perf_counter()
        try:
          r = http.get(f'{url}/api/search', params={'q': texts[c * queries + i], 'k': k})
          ok = r.status_code == 200 and len(r.json()['results']) > 0
          if not ok:
            errors.append(f'status {r.status_code}: {r.text[:200]}')
        except (httpx.HTTPError, ValueError, KeyError) as e:
          errors.append(f'{type(e).__name__}: {e}')
          continue
        if ok:
          lat.append(time.perf_counter() - t)
    return lat, errors

  t0 = time.perf_counter()
  with concurrent.futures.ThreadPoolExecutor(clients) as pool:
    outs = list(pool.map(client, range(clients)))
  wall = time.perf_counter() - t0
  latencies = sorted(x for lat, _ in outs for x in lat)
  errors = [e for _, errs in outs for e in errs]
  ms = lambda p: round(1000 * percentile(latencies, p), 1)
  return {'clients': clients, 'queries_per_client': queries, 'requests': clients * queries,
          'ok': len(latencies), 'errors': len(errors), 'error_samples': errors[:5], 'seconds': round(wall, 2),
          'queries_per_s': round(len(latencies) / wall, 1) if wall > 0 else 0.0,
          'p50_ms': ms(50), 'p95_ms': ms(95), 'p99_ms': ms(99),
          'max_ms': round(1000 * latencies[-1], 1) if latencies else float('nan'), 'k': k}


def table(r: dict) -> str:
  return ('| clients x queries | queries/s | p50 ms | p95 ms | p99 ms | max ms | errors |\n'
          '|---|---:|---:|---:|---:|---:|---:|\n'
          f'| {r["clients"]} x {r["queries_per_client"]} | {r["queries_per_s"]} | {r["p50_ms"]} | {r["p95_ms"]} | '
          f'{r["p99_ms"]} | {r["max_ms"]} | {r["errors"]} |')


def main(argv: Optional[Sequence[str]] = None) -> int:
  p = argparse.ArgumentParser(prog='python -m ivt_jax.tools.load_test', description=__doc__.split('\n')[0])
  p.add_argument('--url', default='http://127.0.0.1:8000')
  p.add_argument('--clients', type=int, default=16)
  p.add_argument('--queries', type=int, default=200, help='per client')
  p.add_argument('--k', type=int, default=20)
  p.add_argument('--token', default='')
  p.add_argument('--timeout', type=float, default=600.0, help='seconds before the clients stop')
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--json', default='', help='also write the figures here')
  args = p.parse_args(argv)
  if args.clients < 1 or args.queries < 1:
    p.error('--clients and --queries must be >= 1')
  r = run(args.url, args.clients, args.queries, args.k, args.token, args.timeout, args.seed)
  print(table(r))
  for e in r['error_samples']:
    print(f'error: {e}')
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(r, f, indent=2)
  return 0 if r['errors'] == 0 else 1


if __name__ == '__main__':
  sys.exit(main())
