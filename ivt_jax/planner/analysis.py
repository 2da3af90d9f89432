"""What a compiled program says about itself, per chip: memory, FLOPs and bytes, the collectives with their bytes,
and a roofline estimate of the step time and MFU on a chip of `targets.CHIPS`.

Collectives are read from the optimized HLO text: every all-gather, all-reduce, reduce-scatter, all-to-all and
collective-permute (an async pair counted once), its result bytes, its group size, and the bytes a chip sends
for it with ring algorithms: all-gather and all-to-all (g-1)/g of the result, reduce-scatter (g-1) x the result,
all-reduce 2 (g-1)/g of it, a permute all of it. An op in a loop body counts once.
"""
import collections
import re
from typing import Any, Optional

import numpy as np

from ivt_jax.planner import targets as targets_lib

KINDS = ('all-gather', 'all-reduce', 'reduce-scatter', 'all-to-all', 'collective-permute')
_DTYPE_BYTES = {'pred': 1, 's8': 1, 'u8': 1, 's16': 2, 'u16': 2, 'f16': 2, 'bf16': 2, 's32': 4, 'u32': 4, 'f32': 4,
                's64': 8, 'u64': 8, 'f64': 8, 'c64': 8, 'c128': 16, 'f8e4m3fn': 1, 'f8e5m2': 1}
_OP = re.compile(r'^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.+?)\s+(' + '|'.join(KINDS) + r')(-start)?\(')
_ARRAY = re.compile(r'\b(' + '|'.join(_DTYPE_BYTES) + r')\[([0-9,]*)\]')
_GROUPS_MESH = re.compile(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}")
_GROUPS_IOTA = re.compile(r'replica_groups=\[([0-9,]+)\]<=')
_GROUPS_LIST = re.compile(r'replica_groups=\{\{([0-9,]*)\}')
_PAIRS = re.compile(r'source_target_pairs=\{([^}]*(?:\}[^}]*)*?)\}\}')


def _bytes(shape_text: str) -> int:
  total = 0
  for dtype, dims in _ARRAY.findall(shape_text):
    total += _DTYPE_BYTES[dtype] * int(np.prod([int(d) for d in dims.split(',') if d] or [1]))
  return total


def _group_size(line: str, num_devices: int) -> int:
  if m := _GROUPS_MESH.search(line):
    sizes = dict(re.findall(r"'([^']+)'=([0-9]+)", m.group(1)))
    named = re.findall(r"'([^']+)'", m.group(2))
    return int(np.prod([int(sizes[a]) for a in named if a in sizes] or [1]))
  if m := _GROUPS_IOTA.search(line):
    return int(m.group(1).split(',')[-1])
  if m := _GROUPS_LIST.search(line):
    return len([x for x in m.group(1).split(',') if x])
  return num_devices  # no groups: every device


def collectives(hlo_text: str, num_devices: int) -> dict[str, dict[str, int]]:
  """{kind: {'count', 'bytes' (results), 'sent_bytes' (per chip, ring estimate)}} of an optimized HLO module."""
  out = {k: collections.Counter() for k in KINDS}
  for line in hlo_text.splitlines():
    m = _OP.match(line)
    if not m:
      continue
    shape_text, kind, start = m.groups()
    size = _bytes(shape_text)
    if start and kind != 'collective-permute' and shape_text.startswith('('):
      size //= 2  # async start ops return (operands, results)
    g = max(1, _group_size(line, num_devices))
    if kind in ('all-gather', 'all-to-all'):
      sent = size * (g - 1) / g
    elif kind == 'reduce-scatter':
      sent = size * (g - 1)
    elif kind == 'all-reduce':
      sent = 2 * size * (g - 1) / g
    else:
      sent = size // 2 if start else size  # collective-permute-start: (operand, result, ...) tuple
    out[kind].update(count=1, bytes=size, sent_bytes=int(sent))
  return {k: dict(v) for k, v in out.items() if v}


def memory(compiled) -> dict[str, int]:
  """Per-chip bytes: arguments, outputs, aliased (donated), temporaries, generated code, and their peak."""
  m = compiled.memory_analysis()
  out = {'arguments': int(m.argument_size_in_bytes), 'outputs': int(m.output_size_in_bytes),
         'aliased': int(m.alias_size_in_bytes), 'temporaries': int(m.temp_size_in_bytes),
         'code': int(m.generated_code_size_in_bytes)}
  out['total'] = out['arguments'] + out['outputs'] - out['aliased'] + out['temporaries'] + out['code']
  return out


def cost(compiled, global_cost: Optional[dict], num_devices: int) -> dict[str, Any]:
  """FLOPs and HBM bytes per chip per call: the compiled program's own analysis where the backend gives one
  (TPU), else the unpartitioned program's (lowered on this host) divided over the chips."""
  c = compiled.cost_analysis()
  if isinstance(c, list):
    c = c[0] if c else None
  if c and c.get('flops'):
    return {'flops': float(c['flops']), 'bytes': float(c.get('bytes accessed', 0.0)), 'source': 'compiled'}
  if global_cost and global_cost.get('flops'):
    return {'flops': float(global_cost['flops']) / num_devices,
            'bytes': float(global_cost.get('bytes accessed', 0.0)) / num_devices, 'source': 'global/chips'}
  return {'flops': float('nan'), 'bytes': float('nan'), 'source': 'none'}


def roofline(flops: float, hbm_bytes: float, sent_bytes: float, chip: targets_lib.Chip, dtype: str) -> dict:
  """Seconds per step on one chip by compute, HBM traffic and interconnect traffic; the step time if they
  overlap perfectly (their maximum) and if they do not (their sum); MFU = FLOPs / (time x peak)."""
  peak = chip.bf16_flops if dtype == 'bfloat16' else chip.f32_flops
  terms = {'compute_s': flops / peak, 'memory_s': hbm_bytes / chip.hbm_bandwidth,
           'collective_s': sent_bytes / chip.link_bandwidth}
  best, worst = max(terms.values()), sum(terms.values())
  bound = max(terms, key=terms.get)[:-2]
  return {**terms, 'step_s': best, 'step_s_serial': worst, 'bound': bound, 'peak_flops': peak,
          'mfu': flops / (best * peak) if best > 0 else float('nan'),
          'mfu_serial': flops / (worst * peak) if worst > 0 else float('nan')}
