"""What loading pretrained weights did: the converted arrays of one file and the report of every source (which
parameters each file set, which file keys are unused and why, what stayed random), and the strict errors."""
from __future__ import annotations

import collections
import dataclasses
import re
from typing import Any, Iterable, Optional, Sequence

import numpy as np


SOURCES = ('vit', 'bert', 'ivt', 'clip')  # the order in which the layers are applied
CONFIG_KEYS = {'vit': 'config.init.vit_npz', 'bert': 'config.init.bert', 'ivt': 'config.init.ivt',
               'clip': 'config.init.clip'}

class WeightMappingError(ValueError):
  """Pretrained arrays that do not fit the model; `problems` lists every one."""

  def __init__(self, title: str, problems: Sequence[str]):
    self.title = title
    self.problems = list(problems)
    super().__init__('\n  '.join([title] + self.problems))


@dataclasses.dataclass
class Converted:
  """What one file provides, in the model's layout.

  Attributes:
    source: 'vit', 'bert' or 'ivt'.
    file: the file it was read from ('' when converted from arrays in memory).
    arrays: parameter path ('blocks_0/attn/qkv/kernel') -> float array shaped as the model's parameter.
    by_design: parameter path -> why this file deliberately leaves it at its initial value.
    ignored: file key -> why it is unused.
    absent: parameter path -> the file keys that would have provided it but are not in the file.
    notes: what was done beyond renaming and transposing (resizes, unwrapping).
    problems: unexpected keys and shape mismatches (only with strict=False; strict conversion raises).
    rejected: parameter paths whose file arrays did not fit (listed in `problems`).
  """
  source: str
  file: str
  arrays: dict[str, np.ndarray]
  by_design: dict[str, str] = dataclasses.field(default_factory=dict)
  ignored: dict[str, str] = dataclasses.field(default_factory=dict)
  absent: dict[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)
  notes: list[str] = dataclasses.field(default_factory=list)
  problems: list[str] = dataclasses.field(default_factory=list)
  rejected: set[str] = dataclasses.field(default_factory=set)

  def error(self) -> WeightMappingError:
    return WeightMappingError(f'{CONFIG_KEYS[self.source]} {self.file or "(arrays)"}: the {self.source} weights '
                              f'do not fit the model ({len(self.problems)} problems):', self.problems)


@dataclasses.dataclass
class LoadReport:
  """Where every parameter came from. `str(report)` is a per-group summary for logs.

  Attributes:
    files: source -> file path, for the files that were applied.
    origin: parameter path -> 'vit' | 'bert' | 'ivt' (the last file that provided it), 'init' (left at its
      initial value by design) or 'random' (allowed by config.init.allow_random).
    replaced: parameter path -> earlier sources whose values a later file replaced.
    by_design: parameter path -> why it keeps its initial value.
    allowed_random: parameter path -> the allow_random pattern that allowed it.
    ignored: source -> {file key: why it is unused}.
    notes: source -> notes of its conversion.
    sizes: parameter path -> number of values.
  """
  files: dict[str, str]
  origin: dict[str, str]
  replaced: dict[str, list[str]]
  by_design: dict[str, str]
  allowed_random: dict[str, str]
  ignored: dict[str, dict[str, str]]
  notes: dict[str, list[str]]
  sizes: dict[str, int]

  def groups(self) -> dict[str, dict[str, list[int]]]:
    """Parameter group ('blocks_*/attn', 'embeddings', ...) -> origin label -> sorted block indices ([] outside
    the blocks). The origin label reads like 'ivt (replacing vit)' when a later file replaced earlier values."""
    out: dict[str, dict[str, set]] = collections.defaultdict(lambda: collections.defaultdict(set))
    for path, origin in self.origin.items():
      group, block = _group_of(path)
      label = origin
      if self.replaced.get(path):
        label += f' (replacing {", ".join(self.replaced[path])})'
      blocks = out[group][label]
      if block is not None:
        blocks.add(block)
    return {g: {label: sorted(b) for label, b in d.items()} for g, d in sorted(out.items(), key=_group_order)}

  def summary(self) -> dict[str, Any]:
    """A json-able digest (group -> origin -> blocks; files; ignored keys; notes; allowed / by-design paths)."""
    return {'files': dict(self.files), 'groups': self.groups(), 'by_design': dict(self.by_design),
            'allowed_random': dict(self.allowed_random), 'ignored': {s: dict(d) for s, d in self.ignored.items()},
            'notes': {s: list(n) for s, n in self.notes.items()}}

  def __str__(self) -> str:
    total = sum(self.sizes.values())
    lines = [f'pretrained weights: {total:,} values in {len(self.sizes)} arrays']
    for source in SOURCES:
      if source in self.files:
        lines.append(f'  {source}: {self.files[source] or "(arrays in memory)"}')
    groups = self.groups()
    width = max([len(g) for g in groups] + [10])
    for group, origins in groups.items():
      parts = []
      for label, blocks in origins.items():
        text = label + (f' [blocks {_ranges(blocks)}]' if blocks and 'blocks_*' in group else '')
        parts.append(text)
      lines.append(f'  {group:<{width}}  ' + '; '.join(parts))
    reasons = sorted(set(self.by_design.values()))
    for reason in reasons:
      paths = sorted(p for p, r in self.by_design.items() if r == reason)
      lines.append(f'  left at init by design: {", ".join(paths)}: {reason}')
    patterns = sorted(set(self.allowed_random.values()))
    for pattern in patterns:
      n = sum(1 for v in self.allowed_random.values() if v == pattern)
      lines.append(f'  left random ({n} arrays) as allowed by config.init.allow_random pattern {pattern!r}')
    for source in SOURCES:
      for note in self.notes.get(source, []):
        lines.append(f'  {source}: {note}')
    for source in SOURCES:
      ignored = self.ignored.get(source)
      if not ignored:
        continue
      lines.append(f'  {source}: {len(ignored)} file keys ignored by design:')
      by_reason = collections.defaultdict(list)
      for key, reason in ignored.items():
        by_reason[reason].append(key)
      for reason, keys in sorted(by_reason.items()):
        lines.append(f'    {reason}: {", ".join(_compress_names(keys))}')
    return '\n'.join(lines)


def _group_of(path: str) -> tuple[str, Optional[int]]:
  parts = path.split('/')
  m = re.fullmatch(r'blocks_(\d+)', parts[0])
  if m:
    return 'blocks_*/' + parts[1], int(m.group(1))
  if len(parts) > 3 and parts[1] == 'transformer':  # the CLIP head: visual|text/transformer/resblocks_N/...
    m = re.fullmatch(r'resblocks_(\d+)', parts[2])
    if m:
      return f'{parts[0]}/blocks_*/{parts[3]}', int(m.group(1))
  if parts[0] in ('visual', 'text') and len(parts) > 1:
    return f'{parts[0]}/{parts[1]}', None
  return parts[0], None


_GROUP_ORDER = ['cls_token', 'pos_embed', 'type_embed', 'patch_embed', 'embeddings', 'blocks_*/norm1',
                'blocks_*/attn', 'blocks_*/norm2', 'blocks_*/mlp_vis', 'blocks_*/mlp_txt', 'norm']


def _group_order(item):
  name = item[0]
  return (_GROUP_ORDER.index(name) if name in _GROUP_ORDER else len(_GROUP_ORDER), name)


def _ranges(ints: Sequence[int]) -> str:
  """[0, 1, 2, 5] -> '0-2, 5'."""
  out, start, prev = [], None, None
  for i in list(ints) + [None]:
    if start is not None and (i is None or i != prev + 1):
      out.append(str(start) if start == prev else f'{start}-{prev}')
      start = None
    if i is not None and start is None:
      start = i
    prev = i
  return ', '.join(out)


def _compress_names(keys: Iterable[str]) -> list[str]:
  """Names that differ only in a layer index are shown once with '*' and a count."""
  counts = collections.Counter(re.sub(r'(?<=[._])\d+(?=[./])', '*', k) for k in keys)
  return [k if n == 1 else f'{k} (x{n})' for k, n in sorted(counts.items())]
