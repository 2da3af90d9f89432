"""Compiled memory as a function of the batch: least-squares fits (affine, or quadratic with chunked
contrastive gradients), the largest batch within a budget, and the compiler's word over the fit
(ivt_jax.tools.memory_table's arithmetic)."""
import math

import numpy as np

GB = 1e9


def numbers(text: str, flag: str, kind=int) -> list:
  """Comma-separated positive numbers of a flag (`kind`: int or float), or a ValueError naming --flag."""
  try:
    values = [kind(float(x)) for x in text.split(',') if x.strip()]
  except ValueError:
    raise ValueError(f'--{flag}={text!r}: expected comma-separated numbers') from None
  if not values or min(values) <= 0:
    raise ValueError(f'--{flag}={text!r}: expected positive numbers')
  return values


def fit_memory(batches, totals, quadratic: bool):
  """Least-squares coefficients (c0, c1, c2) of memory = c0 + c1 B + c2 B^2 (c2 = 0 unless quadratic)."""
  b = np.asarray(batches, np.float64)
  cols = [np.ones_like(b), b] + ([b * b] if quadratic else [])
  coef, *_ = np.linalg.lstsq(np.stack(cols, 1), np.asarray(totals, np.float64), rcond=None)
  return tuple(coef) + ((0.0,) if not quadratic else ())


def largest_batch(coef, budget: float, unit: int, limit: int = 1 << 20) -> int:
  """The largest multiple of `unit` whose fitted memory is within `budget` (0 when none)."""
  c0, c1, c2 = coef
  if c2 > 0:
    top = (-c1 + math.sqrt(max(c1 * c1 - 4 * c2 * (c0 - budget), 0.0))) / (2 * c2)
  elif c1 > 0:
    top = (budget - c0) / c1
  else:
    top = limit
  n = int(min(top, limit)) // unit * unit
  while n > 0 and c0 + c1 * n + c2 * n * n > budget:
    n -= unit
  return max(n, 0)


def within_compiled(best: dict, batches, totals, unit: int) -> dict:
  """`best` ({budget GB: batch}) with no batch at or above a compiled batch that exceeded that budget: the
  compiler's word beats the fit."""
  out = dict(best)
  for g, b in best.items():
    over = [p for p, t in zip(batches, totals) if t > g * GB and p <= b]
    if over:
      out[g] = max(0, min(over) - unit)
  return out
