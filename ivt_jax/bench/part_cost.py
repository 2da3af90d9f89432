"""The part head's extra cost against the IVT head on the same config (`python -m ivt_jax.benchmark --part_cost`).

`cost_summary(config)` returns {'ivt': {...}, 'part': {...}, 'extra': {...}}: per head the parameters, the part
decoder's parameters, the embedding floats per image (and per text) vector and, when time_steps > 0, step_flops
(XLA's count for one compiled train step) and step_seconds (the fastest of `time_steps` timed steps after one
warm-up, on the default backend, with a random batch of the configured shapes: ivt_jax.training.setup); 'extra' holds
the part / ivt ratios and the added parameter count.
"""
import functools
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ivt_jax.models import heads
from ivt_jax.models import encoder as model_lib
from ivt_jax.training import optim
from ivt_jax.models import part as part_model
from ivt_jax.training import step as step_lib
from ivt_jax.training import setup as step_setup


def _measure(config, time_steps: int) -> dict:
  """Parameters, embedding size and (time_steps > 0) the compiled step's FLOPs and fastest seconds for one head."""
  module = heads.build(config)
  params = jax.jit(functools.partial(model_lib.init_module_params, module))(jax.random.PRNGKey(0))
  total = model_lib.count_params(params)
  decoder = model_lib.count_params({k: v for k, v in params.items() if k.startswith('part_')})
  out = {'params': total, 'part_params': decoder, 'embedding_floats': part_model.embedding_size(config)}
  if time_steps <= 0:
    return out
  tx, schedule = optim.make_optimizer(config, steps_per_epoch=100)
  state = step_lib.create_state(params, tx, jax.random.PRNGKey(1))
  b = config.data.ids_per_batch * config.data.images_per_id
  batch = jax.tree_util.tree_map(jnp.asarray, step_setup.random_batch(config, b))
  step = jax.jit(functools.partial(step_lib.train_step, encoder=module, tx=tx, schedule=schedule,
                                   steps_per_epoch=100))
  compiled = step.lower(state, batch).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  out['step_flops'] = float(cost.get('flops', float('nan'))) if cost else float('nan')
  state, m = compiled(state, batch)
  jax.block_until_ready(m)
  times = []
  for _ in range(time_steps):
    t0 = time.perf_counter()
    state, m = compiled(state, batch)
    jax.block_until_ready(m)
    times.append(time.perf_counter() - t0)
  out['step_seconds'] = float(np.min(times))  # the fastest: least disturbed by other load
  return out


def cost_summary(config: ml_collections.ConfigDict, time_steps: int = 3) -> dict:
  """The part head against the IVT head (module docstring)."""
  results = {}
  for head in ('ivt', 'part'):
    c = ml_collections.ConfigDict(config.to_dict())
    c.model.head = head
    results[head] = _measure(c, time_steps)
  ivt, part = results['ivt'], results['part']
  extra = {'params_added': part['params'] - ivt['params'],
           'params_ratio': part['params'] / ivt['params'],
           'embedding_ratio': part['embedding_floats'] / ivt['embedding_floats']}
  for key in ('step_flops', 'step_seconds'):
    if key in part and key in ivt:
      extra[f'{key.split("_")[1]}_ratio'] = part[key] / ivt[key]
  results['extra'] = extra
  return results


def format_cost(summary: dict) -> str:
  lines = [f'{"":8s}{"params":>14s}{"decoder":>12s}{"emb floats":>12s}{"step GFLOP":>12s}{"step s":>10s}']
  for head in ('ivt', 'part'):
    r = summary[head]
    lines.append(f'{head:8s}{r["params"]:>14,d}{r["part_params"]:>12,d}{r["embedding_floats"]:>12d}'
                 f'{r.get("step_flops", float("nan")) / 1e9:>12.2f}{r.get("step_seconds", float("nan")):>10.4f}')
  e = summary['extra']
  lines.append('part / ivt: ' + ', '.join(f'{k}={v:.3f}' if isinstance(v, float) else f'{k}={v:,d}'
                                          for k, v in e.items()))
  return '\n'.join(lines)
