"""The paper's ablation in one command: baseline, +MLA, +BMM and both, over several seeds, as a table.

  python -m ivt_jax.tools.ablation --config=configs/demo.py --workdir=DIR [--seeds=0,1,2] [--rows=...]
      [--set=key=value ...]

Each row is the config with these overrides (the paper's Table 3 rows):
  baseline   data.mla_levels=sentence, data.bmm_ratio=0   (one (image, sentence) pair per sample, no token drops)
  +MLA       data.bmm_ratio=0                             (the three levels, no token drops)
  +BMM       data.mla_levels=sentence                     (the sentence level alone, token drops)
  +MLA+BMM   the config as it is                          (the full method)
Every run is `python -m ivt_jax.main --config=CONFIG --workdir=DIR/ROW/seed_S --config.seed=S` with the row's
overrides and --set's, in its own process, one after the other; runs of one seed share their prepared data
(DIR/data_S: for SynthPEDES, the same images and captions in every row). A run whose metrics.json holds test
figures is not run again, so an interrupted ablation continues where it stopped. The table (test R@1, R@5, mAP,
mINP: the mean over the seeds and the range min-max, then each seed's R@1) is printed as markdown and written with
every run's figures to DIR/ablation.json and DIR/ablation.md.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Sequence

ROWS = {
    'baseline': ('data.mla_levels=sentence', 'data.bmm_ratio=0.0'),
    '+MLA': ('data.bmm_ratio=0.0',),
    '+BMM': ('data.mla_levels=sentence',),
    '+MLA+BMM': (),
}
ROW_DIRS = {'baseline': 'baseline', '+MLA': 'mla', '+BMM': 'bmm', '+MLA+BMM': 'mla_bmm'}
METRICS = ('r1', 'r5', 'mAP', 'mINP')


def run_dir(workdir: str, row: str, seed: int) -> str:
  return os.path.join(workdir, ROW_DIRS[row], f'seed_{seed}')


def read_test(path: str) -> dict | None:
  """The test figures of a finished run (its metrics.json), or None."""
  try:
    with open(os.path.join(path, 'metrics.json')) as f:
      test = json.load(f).get('test')
  except (OSError, ValueError):
    return None
  return test if isinstance(test, dict) and all(k in test for k in METRICS) else None


def command(config: str, workdir: str, row: str, seed: int, extra: Sequence[str]) -> list[str]:
  data = os.path.join(workdir, f'data_{seed}')
  overrides = [f'seed={seed}', f'data.data_dir={os.path.join(data, "tfds")}',
               f'data.manual_dir={os.path.join(data, "synthpedes")}', *ROWS[row], *extra]
  return [sys.executable, '-m', 'ivt_jax.main', f'--config={config}', f'--workdir={run_dir(workdir, row, seed)}',
          *[f'--config.{o}' for o in overrides]]


def summarize(results: dict[str, dict[int, dict]]) -> str:
  """{row: {seed: test figures}} -> a markdown table: per metric, the mean over seeds and min-max."""
  lines = ['| row | seeds | R@1 | R@5 | mAP | mINP | R@1 per seed |', '|---|---|---|---|---|---|---|']
  for row, per_seed in results.items():
    if not per_seed:
      continue
    cells = []
    for k in METRICS:
      values = [per_seed[s][k] for s in sorted(per_seed)]
      cells.append(f'{statistics.mean(values):.2f} ({min(values):.2f}-{max(values):.2f})')
    seeds = ' / '.join(f'{per_seed[s]["r1"]:.2f}' for s in sorted(per_seed))
    lines.append(f'| {row} | {len(per_seed)} | ' + ' | '.join(cells) + f' | {seeds} |')
  return '\n'.join(lines)


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog='python -m ivt_jax.tools.ablation', description=__doc__.split('\n')[0])
  parser.add_argument('--config', required=True, help='experiment config, e.g. configs/demo.py')
  parser.add_argument('--workdir', required=True, help='one sub-directory per row and seed, and the table')
  parser.add_argument('--seeds', default='0,1,2', help='comma-separated seeds (default 0,1,2)')
  parser.add_argument('--rows', default=','.join(ROWS), help=f'comma-separated rows among {", ".join(ROWS)}')
  parser.add_argument('--set', action='append', default=[], metavar='KEY=VALUE',
                      help='a config override for every run, e.g. --set num_epochs=1 (repeatable)')
  args = parser.parse_args(argv)
  try:
    seeds = [int(s) for s in args.seeds.split(',') if s.strip()]
  except ValueError:
    parser.error(f'--seeds={args.seeds!r}: expected comma-separated integers such as 0,1,2')
  rows = [r.strip() for r in args.rows.split(',') if r.strip()]
  unknown = [r for r in rows if r not in ROWS]
  if unknown or not rows or not seeds:
    parser.error(f'--rows: unknown {unknown}; choose among {list(ROWS)}' if unknown else 'no rows or seeds given')
  bad = [s for s in args.set if '=' not in s]
  if bad:
    parser.error(f'--set expects KEY=VALUE, got {bad}')
  if not os.path.isfile(args.config):
    parser.error(f'--config={args.config}: no such file')
  os.makedirs(args.workdir, exist_ok=True)

  results: dict[str, dict[int, dict]] = {r: {} for r in rows}
  todo = [(r, s) for s in seeds for r in rows]
  for i, (row, seed) in enumerate(todo):
    path = run_dir(args.workdir, row, seed)
    test = read_test(path)
    if test is None:
      print(f'[{i + 1}/{len(todo)}] {row}, seed {seed}: training into {path}', flush=True)
      t0 = time.time()
      os.makedirs(path, exist_ok=True)
      with open(os.path.join(path, 'ablation.log'), 'a') as log:
        proc = subprocess.run(command(args.config, args.workdir, row, seed, args.set), stdout=log,
                              stderr=subprocess.STDOUT)
      test = read_test(path)
      if proc.returncode != 0 or test is None:
        print(f'{row}, seed {seed} failed (exit {proc.returncode}); its output: {path}/ablation.log',
              file=sys.stderr)
        return 1
      print(f'    test R@1 {test["r1"]:.2f}, mAP {test["mAP"]:.2f} ({time.time() - t0:.0f} s)', flush=True)
    else:
      print(f'[{i + 1}/{len(todo)}] {row}, seed {seed}: done before (test R@1 {test["r1"]:.2f})', flush=True)
    results[row][seed] = test
  table = summarize(results)
  print(table)
  with open(os.path.join(args.workdir, 'ablation.md'), 'w') as f:
    f.write(table + '\n')
  with open(os.path.join(args.workdir, 'ablation.json'), 'w') as f:
    json.dump({'config': args.config, 'overrides': args.set, 'rows': {r: ROWS[r] for r in rows},
               'results': {r: {str(s): v for s, v in per.items()} for r, per in results.items()}}, f, indent=2)
  print(f'table: {os.path.join(args.workdir, "ablation.md")}; every figure: '
        f'{os.path.join(args.workdir, "ablation.json")}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
