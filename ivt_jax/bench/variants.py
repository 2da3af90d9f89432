"""The same training step done with less work: BMM by masking against BMM by token removal, and the exact
chunked contrastive gradient, side by side (`python -m ivt_jax.benchmark --variants=...`).

  uniform_mask   the config's recipe with the reference's drop count, U{0..floor(ratio N)}: masked as keys
  fixed_mask     exactly floor(ratio N) drops per row, masked as keys (every token still computed)
  fixed_remove   the same drops, removed from the image sequence (model.bmm_tokens=remove): the same numbers
  chunked        fixed_remove with train.contrastive_chunk = --chunk samples: the same gradient, one chunk's
                 activations
  packed         fixed_remove with the texts packed (data.text_packing): padding and dropped text tokens not
                 computed, the slots per device this step's random batch needs

Per variant: XLA's FLOP count of the compiled step (summed over the devices), the compiled memory per device
(arguments + outputs + temporaries - aliased; chunked: no FLOP count, as XLA counts the chunks' loop body
once), the compile time and, with --steps > 0, the step time (mean and
median over the timed steps) and pairs per second. The figures print as `variant/<name>/<figure>: value` lines
and a table.
"""
from typing import Any, Callable, Sequence

import ml_collections

from ivt_jax.bench import step as step_bench
from ivt_jax.training import setup as step_setup

VARIANTS = ('uniform_mask', 'fixed_mask', 'fixed_remove', 'chunked', 'packed')


def variant_config(config: ml_collections.ConfigDict, name: str, chunk: int) -> ml_collections.ConfigDict:
  """A copy of `config` for one of `VARIANTS`."""
  if name not in VARIANTS:
    raise ValueError(f'--variants: unknown variant {name!r}; choose from {", ".join(VARIANTS)}')
  c = ml_collections.ConfigDict(config.to_dict())
  c.data.bmm_drops = 'uniform' if name == 'uniform_mask' else 'fixed'
  c.model.bmm_tokens = 'mask' if name.endswith('_mask') else 'remove'
  c.train.contrastive_chunk = int(chunk) if name == 'chunked' else 0
  c.data.text_packing = name == 'packed'
  return c


def compare(config: ml_collections.ConfigDict, batch: int, names: Sequence[str], chunk: int, steps: int,
            warmup: int, log: Callable = print) -> dict[str, Any]:
  """{'variant/<name>/<figure>': value} for each variant (see the module docstring)."""
  if 'chunked' in names:
    if chunk <= 0:
      chunk = max(1, batch // 4)
    step_setup.contrastive_chunk(variant_config(config, 'chunked', chunk), batch)
  out = {}
  for name in names:
    c = variant_config(config, name, chunk)
    if steps > 0:
      figures = step_bench.benchmark_train(c, batch, steps, warmup, log=lambda *_: None)
    else:
      slots = step_setup.text_slots(c, step_setup.random_batch(c, batch, seed=c.seed))
      setup, compiled, compile_s = step_setup.compile_train_step(c, batch, slots)
      figures = {'train/compile_s': compile_s}
      flops = step_bench.compiled_flops(compiled)
      if flops is not None:
        figures['train/flops_xla'] = flops * setup.mesh.size  # the same program on every device
      figures.update({f'train/compiled_{k}_bytes': v for k, v in step_bench.compiled_memory(compiled).items()})
    if name == 'chunked':  # XLA's cost analysis counts a loop's body once, not once per chunk
      figures.pop('train/flops_xla', None)
    keep = ('compile_s', 'flops_xla', 'compiled_total_bytes', 'compiled_temp_bytes', 'step_s', 'step_s_median',
            'pairs_per_s')
    for k in keep:
      if f'train/{k}' in figures:
        out[f'variant/{name}/{k}'] = figures[f'train/{k}']
    if name == 'chunked':
      out['variant/chunked/chunk_samples'] = chunk
    log(f'variant {name}: compiled')
  return out


def table(figures: dict[str, Any], names: Sequence[str]) -> str:
  """The variants as a small text table (FLOPs and memory against the first variant)."""
  base = names[0]
  rows = [f'{"variant":<14} {"GFLOP/step":>11} {"vs " + base:>16} {"memory GB":>9} {"step s":>8} {"pairs/s":>8}']
  f0 = figures.get(f'variant/{base}/flops_xla')
  for name in names:
    get = lambda k: figures.get(f'variant/{name}/{k}')
    flops, mem, step_s, pps = get('flops_xla'), get('compiled_total_bytes'), get('step_s_median'), get('pairs_per_s')
    ratio = f'{flops / f0:.3f}x' if flops and f0 else '-'
    gflop = f'{flops / 1e9:.1f}' if flops else '-'
    rows.append(f'{name:<14} {gflop:>11} {ratio:>16} {(mem or 0) / 1e9:>9.2f} '
                f'{step_s if step_s is not None else float("nan"):>8.3f} {pps if pps is not None else float("nan"):>8.1f}')
  return '\n'.join(rows)
