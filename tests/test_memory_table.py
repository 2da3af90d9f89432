"""ivt_jax.tools.memory_table: the fits and the budget reading, and the program on one H100 (the CUDA plugin)
at a tiny size: every budget's batch is one whose compiled memory is within it."""
import json
import os
import subprocess
import sys

import pytest

from ivt_jax.planner import memory_fit as mt
from tests.test_aot import ROOT, TINY_FLAGS, needs_cuda

GB = 1e9


def test_fits_are_exact_on_their_own_forms_and_budgets_read_down():
  affine = mt.fit_memory([16, 32, 64], [1 * GB + 0.5 * GB * b for b in (16, 32, 64)], quadratic=False)
  assert affine[2] == 0 and abs(affine[0] - GB) < 1e-3 * GB and abs(affine[1] - 0.5 * GB) < 1e-6 * GB
  quad = mt.fit_memory([256, 1024, 4096], [2 * GB + 1e6 * b + 100.0 * b * b for b in (256, 1024, 4096)], True)
  assert abs(quad[2] - 100.0) < 1e-3
  # 1 GB + 0.5 GB per sample: 16 GB holds 30 samples, in units of 4: 28
  assert mt.largest_batch(affine, 16 * GB, 4) == 28
  assert mt.largest_batch(affine, 0.5 * GB, 4) == 0
  n = mt.largest_batch(quad, 40 * GB, 16)
  fits = lambda b: quad[0] + quad[1] * b + quad[2] * b * b <= 40 * GB
  assert n % 16 == 0 and fits(n) and not fits(n + 16)
  # a compiled point over a budget caps that budget's batch below it, whatever the fit said
  assert mt.within_compiled({80: 412, 40: 196}, [16, 412], [2 * GB, 81.06 * GB], 4) == {80: 408, 40: 196}


def test_bad_numbers_are_named():
  with pytest.raises(ValueError, match='--budgets'):
    mt.numbers('16,x', 'budgets')
  with pytest.raises(ValueError, match='positive'):
    mt.numbers('0,16', 'points')


@needs_cuda
def test_the_program_reads_batches_that_the_compiler_fits(tmp_path):
  out = tmp_path / 'table.json'
  env = dict(os.environ)
  env.pop('XLA_FLAGS', None)  # the program's own host: one CPU device
  r = subprocess.run([sys.executable, '-m', 'ivt_jax.tools.memory_table', '--config=configs/demo.py', *TINY_FLAGS,
                      '--target=h100', '--dtypes=float32', '--remat=off', '--budgets=0.05,0.2', '--chunk=8',
                      '--points=8,16,32', '--chunk_points=32,64,128', f'--output={out}'],
                     cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert r.returncode == 0, r.stderr[-3000:]
  rows = json.loads(out.read_text())['rows']
  assert [row['chunk'] for row in rows] == [0, 8]
  for row in rows:
    assert len(row['points']) >= 3 and all(t > 0 for t in row['totals_bytes'])
    big = row['largest']['0.2']
    assert big > 0 and big % (8 if row['chunk'] else 1) == 0
    for b, t in zip(row['points'], row['totals_bytes']):  # no compiled point over a budget is reported as fitting
      for g, n in row['largest'].items():
        assert not (t > float(g) * GB and b <= n), (b, t, g, n)
  assert 'largest batch' in r.stdout
