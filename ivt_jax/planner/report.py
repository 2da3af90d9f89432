"""A plan as a person reads it (small tables), and what a full recipe would take on the target."""
import math
from typing import Optional

import ml_collections

from ivt_jax.planner import plan as plan_lib
from ivt_jax.runtime import console

GB = 1e9
GIB = 2 ** 30
# Training pairs per epoch (sample_unit='caption'): the published train splits.
TRAIN_PAIRS = {'cuhk_pedes': 68_126, 'icfg_pedes': 34_674, 'rstpreid': 37_010}


def recipe(p: plan_lib.Plan, config: ml_collections.ConfigDict, train_pairs: Optional[int] = None,
           usd_per_chip_hour: Optional[float] = None) -> Optional[dict]:
  """Steps, hours and cost of the config's whole schedule at the roofline step time (training plans only)."""
  synthetic = config.data.synthetic.enabled if 'synthetic' in config.data else False
  pairs = train_pairs or (None if synthetic else TRAIN_PAIRS.get(config.data.name))
  if p.what != 'train' or not pairs:
    return None
  steps_per_epoch = math.ceil(pairs / p.batch)
  steps = int(config.total_steps) or int(math.ceil(float(config.num_epochs) * steps_per_epoch))
  price = usd_per_chip_hour if usd_per_chip_hour is not None else p.target.chip.usd_per_chip_hour
  out = {'train_pairs': pairs, 'steps': steps}
  for key, step_s in (('', p.roofline['step_s']), ('_serial', p.roofline['step_s_serial'])):
    hours = steps * step_s / 3600
    out['hours' + key] = hours
    out['usd' + key] = hours * p.target.chips * price
  out['usd_per_chip_hour'] = price
  return out


def _hours(h: float) -> str:
  return f'{h:.1f} h' if h >= 1 else f'{h * 60:.1f} min'


def _gib(x: float) -> str:
  return f'{x / GIB:.2f}'


def text(p: plan_lib.Plan, config_name: str, recipe_figures: Optional[dict] = None) -> str:
  t, c, r = p.target, p.config, p.roofline
  mesh = ' x '.join(f'{k} {v}' for k, v in p.mesh.items())
  if c.mesh.get('gather_params', False) and p.mesh.get('fsdp', 1) > 1:
    mesh += ' (weights gathered)'
  lines = [f'{config_name}: {p.what} step for {t.cloud_name} ({t.topology}, {t.chips} x {t.chip.kind}), '
           f'mesh {mesh}, batch {p.batch}, {c.model.dtype}, remat {"on" if c.model.remat else "off"}, '
           f'patch_embed {c.model.patch_embed}; {p.num_params / 1e6:.1f} M parameters; '
           f'compiled in {p.compile_s:.1f} s']
  lines += [f'note: {n}' for n in p.notes]
  m = p.memory
  rows = [{'memory per chip': k, 'GiB': _gib(m[k])} for k in ('arguments', 'outputs', 'aliased', 'temporaries',
                                                              'code')]
  rows.append({'memory per chip': 'total', 'GiB': _gib(m['total'])})
  rows.append({'memory per chip': 'HBM', 'GiB': _gib(t.chip.hbm_bytes)})
  lines += ['', console.table(rows, ['memory per chip', 'GiB']),
            f'{"fits" if p.fits else "DOES NOT FIT"}: {m["total"] / t.chip.hbm_bytes:.1%} of the HBM']
  lines += ['', f'per chip per step: {p.cost["flops"] / 1e12:.3f} TFLOP, {p.cost["bytes"] / GB:.2f} GB of HBM '
            f'traffic ({p.cost["source"]})']
  if p.collectives:
    rows = [{'collective': k, 'count': v['count'], 'result GB': f'{v["bytes"] / GB:.3f}',
             'sent GB': f'{v["sent_bytes"] / GB:.3f}'} for k, v in p.collectives.items()]
    lines += [console.table(rows, ['collective', 'count', 'result GB', 'sent GB'])]
  else:
    lines += ['no collectives']
  ch = t.chip
  lines += ['', f'roofline ({ch.kind}: {r["peak_flops"] / 1e12:.0f} TFLOP/s {c.model.dtype}, '
            f'{ch.hbm_bandwidth / GB:.0f} GB/s HBM, {ch.link_bandwidth / GB:.0f} GB/s interconnect):',
            f'  compute {r["compute_s"] * 1e3:.2f} ms, HBM {r["memory_s"] * 1e3:.2f} ms, collectives '
            f'{r["collective_s"] * 1e3:.2f} ms -> step {r["step_s"] * 1e3:.2f} ms overlapped ({r["bound"]}-bound), '
            f'{r["step_s_serial"] * 1e3:.2f} ms serial; MFU at most {r["mfu"]:.0%} ({r["mfu_serial"]:.0%} serial)']
  if recipe_figures:
    f = recipe_figures
    lines += [f'the whole schedule: {f["steps"]} steps ({f["train_pairs"]} pairs per epoch) -> '
              f'{_hours(f["hours"])} to {_hours(f["hours_serial"])}, ${f["usd"]:.2f} to ${f["usd_serial"]:.2f} at '
              f'${f["usd_per_chip_hour"]:.2f} per chip-hour (a lower bound: input, evaluation and '
              'checkpoints are not counted)']
  return '\n'.join(lines)
