"""Pretrained weights for the encoder: ImageNet ViT-B/16 (.npz), BERT, and released IVT checkpoints.

IVT initializes in layers, each applied on top of the previous one (config keys, in this order):
  config.init.vit_npz   ImageNet ViT-B/16 in the google-research/vision_transformer .npz format: the patch
                        embedding, CLS token, position embedding (bilinearly resized from the checkpoint's square
                        grid to the configured patch grid, as the reference's `resize_pos_embed`), every block's
                        norm1 / attention / norm2 / MLP (-> `mlp_vis`) and the final norm. The ViT has no type
                        embedding: `type_embed` keeps its initial value, as in the reference.
  config.init.bert      BERT (bert-base-uncased; .safetensors, a PyTorch .bin, or a Hugging Face model folder):
                        the text embeddings and every block's `mlp_txt` (intermediate.dense -> fc1,
                        output.dense -> fc2), as the reference's `load_param_hybrid`.
  config.init.ivt       a released IVT checkpoint (a PyTorch state_dict, bare or under 'state_dict' / 'model',
                        keys with or without 'module.' and 'encoder_vl.'; or .safetensors): the whole encoder.
  config.init.allow_random  comma-separated regexes, each matched against the whole parameter path (such as
                        'blocks_6/mlp_txt/fc1/kernel'), of parameters allowed to keep their fresh initialization.

Strict: a file key that maps to no parameter and is not known to be unused, a shape mismatch, and a parameter
that no file provides and no pattern allows are errors, all listed in one message. File keys that are unused by
design (classification heads, BERT's own attention) are named in the report, never dropped silently.

PyTorch files are read with `torch.load(weights_only=True)` (torch is an optional extra, imported only for
them); .safetensors and .npz files need no torch. Every converter is a pure function: a flat mapping of names to
numpy arrays in, arrays in the model's layout out.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import math
import os
import re
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import jax
import ml_collections
import numpy as np
from flax import traverse_util

from ivt_jax import model as model_lib

SOURCES = ('vit', 'bert', 'ivt')  # the order in which the layers are applied
CONFIG_KEYS = {'vit': 'config.init.vit_npz', 'bert': 'config.init.bert', 'ivt': 'config.init.ivt'}

# Keys of the released IVT files that belong to the reference's training wrapper, not to the encoder.
IVT_UNUSED = (
    (r'temp', 'learned temperature of the reference training wrapper (unused: CMPM has none)'),
    (r'bottleneck_img\..*', 'BatchNorm neck of the reference training wrapper (not part of the encoder)'),
    (r'classifier_img\..*', 'ID classifier of the reference training wrapper (not part of the encoder)'),
)
VIT_UNUSED = (
    (r'head/.*', 'ImageNet classification head'),
    (r'pre_logits/.*', 'ImageNet pre-logits layer'),
)
BERT_UNUSED = (
    (r'pooler\..*', 'BERT pooler'),
    (r'cls\..*', 'BERT pretraining heads'),
)
BERT_LAYER_UNUSED = (  # within encoder.layer.<i>. for the model's blocks i
    (r'attention\..*', "BERT's self-attention (IVT shares the ViT's attention)"),
    (r'output\.LayerNorm\..*', 'post-MLP LayerNorm (no counterpart in pre-norm blocks)'),
)
_POSITION_IDS = 'embeddings.position_ids'
_POSITION_IDS_REASON = 'buffer holding the position ids 0..n-1 (the model computes them)'


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
        text = label + (f' [blocks {_ranges(blocks)}]' if blocks and group.startswith('blocks_*') else '')
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


# ---- reading files ----------------------------------------------------------------------------------------


def read_arrays(path: str, what: str = 'weights') -> tuple[dict[str, np.ndarray], list[str]]:
  """A flat name -> numpy array mapping from a .safetensors, .npz or PyTorch file; plus notes.

  Args:
    path: the file; for BERT also a Hugging Face model folder (model.safetensors or pytorch_model.bin in it).
    what: the config key the path came from, for error messages.
  """
  path = os.path.expanduser(path)
  if os.path.isdir(path):
    for name in ('model.safetensors', 'pytorch_model.bin'):
      if os.path.isfile(os.path.join(path, name)):
        path = os.path.join(path, name)
        break
    else:
      raise FileNotFoundError(f'{what}: folder {path} has neither model.safetensors nor pytorch_model.bin')
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{what}: file {path} does not exist')
  if path.endswith('.safetensors'):
    from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
    try:
      return {k: np.asarray(v) for k, v in load_file(path).items()}, []
    except Exception as e:  # safetensors raises its own error types (bad header, unsupported dtype)
      raise ValueError(f'{what}: cannot read safetensors file {path}: {e}') from e
  if path.endswith('.npz'):
    try:
      with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}, []
    except ValueError as e:
      raise ValueError(f'{what}: cannot read .npz file {path} (object arrays are refused): {e}') from e
  return _read_torch(path, what)


def _numpy_safe_globals() -> list[Any]:
  """numpy scalars and dtypes, which the reference's checkpoints hold (e.g. 'best_acc'); data only, no code."""
  core = getattr(np, '_core', None) or np.core  # numpy 2 / numpy 1
  scalar = core.multiarray.scalar
  allowed = [(scalar, 'numpy.core.multiarray.scalar'), (scalar, 'numpy._core.multiarray.scalar'), np.dtype]
  allowed += [getattr(np.dtypes, n) for n in getattr(np.dtypes, '__all__', [])]
  return allowed


def _read_torch(path: str, what: str) -> tuple[dict[str, np.ndarray], list[str]]:
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ImportError(f'{what}: {path} is a PyTorch file; reading it needs torch (an optional extra: '
                      'pip install torch, the CPU build is enough), or convert it to .safetensors '
                      'elsewhere') from None
  try:
    with torch.serialization.safe_globals(_numpy_safe_globals()):
      obj = torch.load(path, map_location='cpu', weights_only=True)
  except Exception as e:  # torch raises UnpicklingError, RuntimeError, ... for unreadable or unsafe files
    raise ValueError(f'{what}: cannot read {path} with torch.load(weights_only=True) (only tensors and plain '
                     f'containers are accepted): {e}') from e
  state_dict, notes = select_state_dict(obj, what=f'{what} {path}', is_array=torch.is_tensor)
  out = {}
  for k, t in state_dict.items():
    t = t.detach().cpu()
    if t.is_floating_point() and t.dtype not in (torch.float32, torch.float64, torch.float16):
      t = t.float()  # bfloat16 and friends have no numpy dtype
    out[k] = t.numpy()
  return out, notes


def select_state_dict(obj: Any, what: str = 'checkpoint',
                      is_array: Callable[[Any], bool] = lambda v: isinstance(v, np.ndarray)
                      ) -> tuple[dict[str, Any], list[str]]:
  """The state_dict inside a loaded checkpoint: `obj` itself, or under 'state_dict' or 'model' (nested).

  Returns (state_dict, notes); raises ValueError naming `what` when there is none.
  """
  notes = []
  while isinstance(obj, Mapping):
    if obj and all(isinstance(k, str) and is_array(v) for k, v in obj.items()):
      return dict(obj), notes
    for key in ('state_dict', 'model'):
      if isinstance(obj.get(key), Mapping):
        others = sorted(str(k) for k in obj if k != key)
        notes.append(f"read the '{key}' entry" + (f' (other entries, unused: {", ".join(others)})'
                                                   if others else ''))
        obj = obj[key]
        break
    else:
      break
  found = (f'a mapping with keys {sorted(map(str, obj))[:10]}' if isinstance(obj, Mapping)
           else type(obj).__name__)
  raise ValueError(f'{what}: no state_dict (a mapping of names to tensors, bare or under "state_dict" or '
                   f'"model"); found {found}')


# ---- mapping engine ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Entry:
  path: str                # parameter path in the model
  keys: tuple[str, ...]    # file keys it is built from
  fn: Callable[..., np.ndarray] = lambda x: x  # arrays of `keys` -> array in the model's layout


@functools.lru_cache(maxsize=8)
def _target_shapes(cfg: model_lib.EncoderConfig) -> dict[str, jax.ShapeDtypeStruct]:
  shapes = jax.eval_shape(lambda: model_lib.init_params(cfg, jax.random.key(0)))
  return traverse_util.flatten_dict(shapes, sep='/')


def _block_hint(key: str, pattern: str, depth: int) -> str:
  m = re.search(pattern, key)
  if m and int(m.group(1)) >= depth:
    return f' (layer {m.group(1)}: the model has model.depth={depth} blocks)'
  return ''


def _convert(source: str, file: str, arrays: Mapping[str, np.ndarray], entries: Sequence[_Entry],
             unused: Sequence[tuple[str, str]], cfg: model_lib.EncoderConfig, *,
             names: Optional[Mapping[str, str]] = None, block_pattern: str = '',
             pre_problems: Sequence[str] = (), strict: bool = True) -> Converted:
  """Applies `entries` to `arrays`; unexpected keys and shape mismatches raise one WeightMappingError
  (strict) or are returned in `Converted.problems`.

  `names` maps the (normalized) keys of `arrays` back to the names in the file, for messages.
  """
  target = _target_shapes(cfg)
  names = names or {}
  name = lambda k: names.get(k, k)
  out, absent, problems, used, rejected = {}, {}, list(pre_problems), set(), set()
  for e in entries:
    missing = tuple(name(k) for k in e.keys if k not in arrays)
    if missing:
      absent[e.path] = missing
      continue
    used.update(e.keys)
    src = [np.asarray(arrays[k]) for k in e.keys]
    given = ', '.join(f'{name(k)!r} {tuple(a.shape)}' for k, a in zip(e.keys, src))
    want = tuple(target[e.path].shape)
    try:
      value = np.asarray(e.fn(*src))
    except ValueError as err:
      problems.append(f'shape mismatch: {e.path} <- {given}: {err}; the model expects {want}')
      rejected.add(e.path)
      continue
    if tuple(value.shape) != want:
      problems.append(f'shape mismatch: {e.path} <- {given}, the model expects {want}{_hint(e.path, cfg)}')
      rejected.add(e.path)
      continue
    if not np.issubdtype(value.dtype, np.floating):
      problems.append(f'dtype: {e.path} <- {given} is {value.dtype}, expected a float array')
      rejected.add(e.path)
      continue
    out[e.path] = value.astype(target[e.path].dtype)
  ignored = {}
  compiled = [(re.compile(p), why) for p, why in unused]
  for k in sorted(arrays):
    if k in used:
      continue
    why = next((w for p, w in compiled if p.fullmatch(k)), None)
    if why is not None:
      ignored[name(k)] = why
    else:
      hint = _block_hint(k, block_pattern, cfg.depth) if block_pattern else ''
      problems.append(f'unexpected key: {name(k)!r} {tuple(np.shape(arrays[k]))}{hint}')
  converted = Converted(source, file, out, ignored=ignored, absent=absent, problems=problems, rejected=rejected)
  if problems and strict:
    raise converted.error()
  return converted


def _hint(path: str, cfg: model_lib.EncoderConfig) -> str:
  """Which config keys decide a parameter's shape, for the parameters whose size depends on the config."""
  if path in ('pos_embed', 'type_embed'):
    return (f' (data.image_size {tuple(cfg.image_size)}, model.patch_size {cfg.patch_size} and model.stride '
            f'{cfg.stride} give {cfg.num_image_tokens} tokens; a checkpoint trained with another stride or image '
            'size does not fit)')
  if path == 'embeddings/word_embeddings/embedding':
    return (f' (model.vocab_size {cfg.vocab_size} comes from the tokenizer; pretrained text weights need the '
            'vocabulary they were trained with, e.g. data.tokenizer=wordpiece with bert-base-uncased vocab.txt)')
  return ''


def _linear(w: np.ndarray) -> np.ndarray:
  """PyTorch Linear weight (out, in) -> Dense kernel (in, out)."""
  if w.ndim != 2:
    raise ValueError(f'expected a 2-d Linear weight, got {w.ndim}-d')
  return w.T


def _conv(w: np.ndarray) -> np.ndarray:
  """PyTorch Conv2d weight (O, I, H, W) -> Flax Conv kernel (H, W, I, O)."""
  if w.ndim != 4:
    raise ValueError(f'expected a 4-d Conv2d weight, got {w.ndim}-d')
  return w.transpose(2, 3, 1, 0)


def _check_position_ids(arrays: Mapping[str, np.ndarray], key: str, shown: str) -> list[str]:
  """The BERT position_ids buffer, if present, must be the default 0..n-1 (the model uses those)."""
  if key not in arrays:
    return []
  ids = np.asarray(arrays[key]).reshape(-1)
  if not np.array_equal(ids, np.arange(ids.size)):
    return [f'{shown!r} is not 0..{ids.size - 1}: custom position ids are not supported']
  return []


# ---- IVT ------------------------------------------------------------------------------------------------


def _torch_name(path: str) -> tuple[str, Callable[[np.ndarray], np.ndarray]]:
  """Model parameter path -> (name in the reference's encoder state_dict, layout transform)."""
  parts = path.split('/')
  if parts[0] == 'patch_embed':
    parts = ['patch_embed', 'proj'] + parts[1:]
  parts[0] = re.sub(r'^blocks_(\d+)$', r'blocks.\1', parts[0])
  leaf = parts[-1]
  fn = lambda x: x
  if leaf == 'kernel':
    fn = _conv if path.startswith('patch_embed/') else _linear
  if leaf in ('kernel', 'scale', 'embedding'):
    parts[-1] = 'weight'
  return '.'.join(parts), fn


def convert_ivt(state_dict: Mapping[str, np.ndarray], cfg: model_lib.EncoderConfig, file: str = '',
                strict: bool = True) -> Converted:
  """A released IVT state_dict (PyTorch names and layouts) -> every encoder parameter.

  Keys may carry 'module.' and 'encoder_vl.' prefixes; the reference wrapper's heads (`temp`,
  `bottleneck_img.*`, `classifier_img.*`) and the `embeddings.position_ids` buffer are ignored by design.
  """
  arrays, names, problems = {}, {}, []
  for k, v in state_dict.items():
    short = k.removeprefix('module.').removeprefix('encoder_vl.')
    if short in arrays:
      problems.append(f'duplicate key: {names[short]!r} and {k!r} both give {short!r} after removing the '
                      "'module.' / 'encoder_vl.' prefixes")
      continue
    arrays[short], names[short] = v, k
  problems += _check_position_ids(arrays, _POSITION_IDS, names.get(_POSITION_IDS, _POSITION_IDS))
  entries = [_Entry(path, (key,), fn) for path in _target_shapes(cfg) for key, fn in [_torch_name(path)]]
  unused = IVT_UNUSED + ((re.escape(_POSITION_IDS), _POSITION_IDS_REASON),)
  return _convert('ivt', file, arrays, entries, unused, cfg, names=names, block_pattern=r'^blocks\.(\d+)\.',
                  pre_problems=problems, strict=strict)


# ---- ViT .npz ---------------------------------------------------------------------------------------------


def bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
  """(n_out, n_in) interpolation weights of PyTorch's bilinear resize, align_corners=False, no antialias.

  Source coordinate (i + 0.5) * n_in / n_out - 0.5, clamped at 0; the upper neighbour is clamped at n_in - 1.
  The coordinates are computed in float32, as PyTorch's CPU kernel does for float32 inputs. Unlike
  jax.image.resize, downsampling does not low-pass filter (the reference uses F.interpolate).
  """
  out = np.zeros((n_out, n_in), np.float64)
  if n_in == n_out:
    np.fill_diagonal(out, 1.0)
    return out
  f32 = np.float32
  src = np.maximum(f32(n_in) / f32(n_out) * (np.arange(n_out, dtype=f32) + f32(0.5)) - f32(0.5), f32(0))
  i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
  i1 = np.minimum(i0 + 1, n_in - 1)
  lam = np.clip(src - i0.astype(f32), f32(0), f32(1)).astype(np.float64)
  rows = np.arange(n_out)
  np.add.at(out, (rows, i0), 1.0 - lam)
  np.add.at(out, (rows, i1), lam)
  return out


def resize_grid(grid: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """(H, W, D) -> (size[0], size[1], D) bilinear, as torch F.interpolate(mode='bilinear', align_corners=False)."""
  wy = bilinear_matrix(grid.shape[0], size[0])
  wx = bilinear_matrix(grid.shape[1], size[1])
  return np.einsum('yi,xj,ijd->yxd', wy, wx, grid.astype(np.float64)).astype(grid.dtype)


def resize_pos_embed(posemb: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
  """(1, 1 + g*g, D) with a square g x g grid -> (1, 1 + grid[0]*grid[1], D); the CLS position is kept."""
  if posemb.ndim != 3 or posemb.shape[0] != 1:
    raise ValueError(f'expected a (1, 1 + tokens, width) position embedding, got {posemb.shape}')
  n = posemb.shape[1] - 1
  g = math.isqrt(n)
  if g * g != n:
    raise ValueError(f'{n} grid positions are not a square grid')
  resized = resize_grid(posemb[0, 1:].reshape(g, g, -1), grid)
  return np.concatenate([posemb[:, :1], resized.reshape(1, grid[0] * grid[1], -1)], axis=1)


def convert_vit(arrays: Mapping[str, np.ndarray], cfg: model_lib.EncoderConfig, file: str = '',
                strict: bool = True) -> Converted:
  """ImageNet ViT (google-research/vision_transformer .npz names) -> the image side of the encoder.

  Attention: query/key/value kernels (width, heads, head_dim) are concatenated into `qkv` laid out q|k|v, as
  timm's conversion of the same file (which the reference loads); `out` (heads, head_dim, width) -> `proj`.
  The position embedding is resized from the checkpoint's square grid to `cfg.grid` when the shapes differ.
  `type_embed` has no ViT counterpart and keeps its initial value (as in the reference). Both the per-layer
  ('Transformer/encoderblock_<i>/...') and the scanned ('Transformer/encoderblock/...', stacked) layouts are read.
  """
  notes = []
  grid = cfg.grid
  n_tokens = cfg.num_image_tokens
  arrays = dict(arrays)
  stacked = sorted(k for k in arrays if k.startswith('Transformer/encoderblock/'))
  if stacked:  # the scanned layout: one array per name with a leading layer axis
    layers = {np.shape(arrays[k])[0] if np.ndim(arrays[k]) else 0 for k in stacked}
    for k in stacked:
      v = arrays.pop(k)
      for i in range(np.shape(v)[0] if np.ndim(v) else 0):
        arrays[k.replace('encoderblock/', f'encoderblock_{i}/', 1)] = v[i]
    notes.append(f'split {len(stacked)} scanned Transformer/encoderblock/* arrays along their layer axis '
                 f'({", ".join(map(str, sorted(layers)))} layers)')

  def posemb(v):
    if v.shape[1:2] == (n_tokens,):
      return v
    out = resize_pos_embed(v, grid)
    g = math.isqrt(v.shape[1] - 1)
    notes.append(f'pos_embed resized from a {g}x{g} grid to {grid[0]}x{grid[1]} (model.stride '
                 f'{cfg.stride}, data.image_size {tuple(cfg.image_size)}); bilinear, align_corners=False')
    return out

  def heads(x, shape):
    """Checks a per-head array against `shape` ('w', 'h', 'd' for width, heads, head_dim)."""
    sizes = {'w': cfg.width, 'h': cfg.num_heads, 'd': cfg.width // cfg.num_heads}
    want = tuple(sizes[c] for c in shape)
    if x.shape != want:
      raise ValueError(f'expected ({", ".join(shape)}) = {want} for model.width {cfg.width} and '
                       f'model.num_heads {cfg.num_heads}')
    return x

  def qkv_kernel(q, k, v):  # each (width, heads, head_dim)
    return np.concatenate([heads(x, 'whd').reshape(cfg.width, -1) for x in (q, k, v)], axis=1)

  def qkv_bias(q, k, v):  # each (heads, head_dim)
    return np.concatenate([heads(x, 'hd').reshape(-1) for x in (q, k, v)], axis=0)

  def out_kernel(w):  # (heads, head_dim, width)
    return heads(w, 'hdw').reshape(-1, cfg.width)

  entries = [
      _Entry('cls_token', ('cls',)),
      _Entry('patch_embed/kernel', ('embedding/kernel',)),
      _Entry('patch_embed/bias', ('embedding/bias',)),
      _Entry('pos_embed', ('Transformer/posembed_input/pos_embedding',), posemb),
      _Entry('norm/scale', ('Transformer/encoder_norm/scale',)),
      _Entry('norm/bias', ('Transformer/encoder_norm/bias',)),
  ]
  for i in range(cfg.depth):
    b, p = f'blocks_{i}', f'Transformer/encoderblock_{i}'
    mha = f'{p}/MultiHeadDotProductAttention_1'
    entries += [
        _Entry(f'{b}/norm1/scale', (f'{p}/LayerNorm_0/scale',)),
        _Entry(f'{b}/norm1/bias', (f'{p}/LayerNorm_0/bias',)),
        _Entry(f'{b}/attn/qkv/kernel', tuple(f'{mha}/{n}/kernel' for n in ('query', 'key', 'value')), qkv_kernel),
        _Entry(f'{b}/attn/qkv/bias', tuple(f'{mha}/{n}/bias' for n in ('query', 'key', 'value')), qkv_bias),
        _Entry(f'{b}/attn/proj/kernel', (f'{mha}/out/kernel',), out_kernel),
        _Entry(f'{b}/attn/proj/bias', (f'{mha}/out/bias',)),
        _Entry(f'{b}/norm2/scale', (f'{p}/LayerNorm_2/scale',)),
        _Entry(f'{b}/norm2/bias', (f'{p}/LayerNorm_2/bias',)),
        _Entry(f'{b}/mlp_vis/fc1/kernel', (f'{p}/MlpBlock_3/Dense_0/kernel',)),
        _Entry(f'{b}/mlp_vis/fc1/bias', (f'{p}/MlpBlock_3/Dense_0/bias',)),
        _Entry(f'{b}/mlp_vis/fc2/kernel', (f'{p}/MlpBlock_3/Dense_1/kernel',)),
        _Entry(f'{b}/mlp_vis/fc2/bias', (f'{p}/MlpBlock_3/Dense_1/bias',)),
    ]
  converted = _convert('vit', file, arrays, entries, VIT_UNUSED, cfg, block_pattern=r'encoderblock_(\d+)/',
                       strict=strict)
  converted.by_design['type_embed'] = ('the ImageNet ViT has no type embedding; it keeps its initial value, as '
                                       'in the reference')
  converted.notes += notes
  return converted


# ---- BERT -------------------------------------------------------------------------------------------------


def convert_bert(state_dict: Mapping[str, np.ndarray], cfg: model_lib.EncoderConfig, file: str = '',
                 strict: bool = True) -> Converted:
  """BERT (Hugging Face names, with or without 'bert.') -> text embeddings and every block's `mlp_txt`.

  encoder.layer.i.intermediate.dense -> blocks_i/mlp_txt/fc1, encoder.layer.i.output.dense -> fc2, as the
  reference's load_param_hybrid. LayerNorm parameters may be named weight/bias or gamma/beta. A BERT with fewer
  layers than model.depth leaves the remaining blocks' mlp_txt to config.init.allow_random; one with more is
  an error.
  """
  arrays, names, problems = {}, {}, []
  for k, v in state_dict.items():
    short = k.removeprefix('bert.')
    if 'LayerNorm.' in short:
      short = re.sub(r'LayerNorm\.gamma$', 'LayerNorm.weight', re.sub(r'LayerNorm\.beta$', 'LayerNorm.bias', short))
    if short in arrays:
      problems.append(f'duplicate key: {names[short]!r} and {k!r} both give {short!r}')
      continue
    arrays[short], names[short] = v, k
  problems += _check_position_ids(arrays, _POSITION_IDS, names.get(_POSITION_IDS, _POSITION_IDS))
  e = 'embeddings'
  entries = [
      _Entry(f'{e}/word_embeddings/embedding', (f'{e}.word_embeddings.weight',)),
      _Entry(f'{e}/position_embeddings/embedding', (f'{e}.position_embeddings.weight',)),
      _Entry(f'{e}/token_type_embeddings/embedding', (f'{e}.token_type_embeddings.weight',)),
      _Entry(f'{e}/LayerNorm/scale', (f'{e}.LayerNorm.weight',)),
      _Entry(f'{e}/LayerNorm/bias', (f'{e}.LayerNorm.bias',)),
  ]
  for i in range(cfg.depth):
    layer = f'encoder.layer.{i}'
    entries += [
        _Entry(f'blocks_{i}/mlp_txt/fc1/kernel', (f'{layer}.intermediate.dense.weight',), _linear),
        _Entry(f'blocks_{i}/mlp_txt/fc1/bias', (f'{layer}.intermediate.dense.bias',)),
        _Entry(f'blocks_{i}/mlp_txt/fc2/kernel', (f'{layer}.output.dense.weight',), _linear),
        _Entry(f'blocks_{i}/mlp_txt/fc2/bias', (f'{layer}.output.dense.bias',)),
    ]
  # Attention and LayerNorm weights of layers beyond the model's depth are unexpected, not ignored.
  layers = '|'.join(str(i) for i in range(cfg.depth))
  unused = BERT_UNUSED + tuple((rf'encoder\.layer\.({layers})\.{p}', why) for p, why in BERT_LAYER_UNUSED)
  unused += ((re.escape(_POSITION_IDS), _POSITION_IDS_REASON),)
  return _convert('bert', file, arrays, entries, unused, cfg, names=names,
                  block_pattern=r'^encoder\.layer\.(\d+)\.', pre_problems=problems, strict=strict)


# ---- composing --------------------------------------------------------------------------------------------


def parse_allow_random(spec: str) -> list[re.Pattern]:
  """config.init.allow_random ('a,b,...') -> compiled patterns (each must match a whole parameter path)."""
  patterns = []
  for s in (spec or '').split(','):
    s = s.strip()
    if not s:
      continue
    try:
      patterns.append(re.compile(s))
    except re.error as e:
      raise ValueError(f'config.init.allow_random: {s!r} is not a valid regular expression ({e}); patterns '
                       'are separated by commas, so a pattern cannot contain one') from e
  return patterns


def merge(params: Any, converted: Sequence[Converted], allow_random: Sequence[re.Pattern] = ()
          ) -> tuple[Any, LoadReport]:
  """Applies converted files in order onto `params` and checks that every parameter is accounted for.

  A parameter is accounted for when a file provides it, a file leaves it at its initial value by design, or an
  `allow_random` pattern matches its whole path. Anything else, and the files' own `problems` (unexpected keys,
  shape mismatches), raise one WeightMappingError that lists them all. Returns (params with the loaded arrays
  as numpy, report).
  """
  flat = dict(traverse_util.flatten_dict(params, sep='/'))
  all_problems = []
  for c in converted:
    if c.problems:
      err = c.error()
      all_problems += [err.title] + ['  ' + p for p in err.problems]
  origin, replaced, by_design, files, ignored, notes = {}, collections.defaultdict(list), {}, {}, {}, {}
  shape_problems = []
  for c in converted:
    files[c.source] = c.file
    ignored[c.source] = dict(c.ignored)
    notes[c.source] = list(c.notes)
    for path, value in c.arrays.items():
      if path not in flat:
        shape_problems.append(f'{path} (from {c.source}) is not a parameter of the given tree')
        continue
      if tuple(np.shape(flat[path])) != tuple(value.shape):
        shape_problems.append(f'{path} (from {c.source}) has shape {value.shape}, the given parameter '
                              f'{tuple(np.shape(flat[path]))}')
        continue
      if path in origin:
        replaced[path].append(origin[path])
      origin[path] = c.source
      flat[path] = value
    for path, why in c.by_design.items():
      by_design.setdefault(path, why)
  all_problems += shape_problems
  allowed, matched, missing = {}, set(), []
  rejected = set().union(*[c.rejected for c in converted])
  for path in flat:
    hits = [p for p in allow_random if p.fullmatch(path)]
    matched.update(p.pattern for p in hits)
    if path in origin:
      continue
    if path in by_design:
      origin[path] = 'init'
    elif hits:
      origin[path] = 'random'
      allowed[path] = hits[0].pattern
    elif path not in rejected:  # a rejected array is listed as a mismatch already
      looked = [f'{CONFIG_KEYS[c.source]} lacks {", ".join(repr(k) for k in c.absent[path])}'
                for c in converted if path in c.absent]
      missing.append(f'  {path} {tuple(np.shape(flat[path]))}' + (f' ({"; ".join(looked)})' if looked else
                                                                  ' (no configured file provides it)'))
  unmatched = [p.pattern for p in allow_random if p.pattern not in matched]
  if unmatched:
    all_problems.append(f'config.init.allow_random patterns that match no parameter path: {unmatched} '
                        "(paths look like 'blocks_0/mlp_txt/fc1/kernel'; each pattern must match a whole path)")
  if missing:
    all_problems.append(f'missing ({len(missing)}): parameters that no file provides and '
                        'config.init.allow_random does not allow to stay random:')
    all_problems += missing
  if all_problems:
    raise WeightMappingError('pretrained weights do not fit the model:', all_problems)
  used = {p for p in by_design if origin.get(p) == 'init'}
  report = LoadReport(files=files, origin={p: origin[p] for p in flat}, replaced=dict(replaced),
                      by_design={p: by_design[p] for p in used}, allowed_random=allowed, ignored=ignored,
                      notes=notes, sizes={p: int(np.prod(np.shape(v))) for p, v in flat.items()})
  return traverse_util.unflatten_dict(flat, sep='/'), report


CONVERTERS = {'vit': convert_vit, 'bert': convert_bert, 'ivt': convert_ivt}


def load_pretrained(config: ml_collections.ConfigDict, params: Any) -> tuple[Any, LoadReport]:
  """Applies config.init.vit_npz, then .bert, then .ivt onto `params` (strict; see the module docstring).

  Args:
    config: the experiment config (model shape from config.model / config.data, files from config.init).
    params: the encoder's parameter tree (fresh initialization), host arrays.

  Returns:
    (params with every loaded array replaced by a numpy array, LoadReport).
  """
  cfg = model_lib.encoder_config(config)
  patterns = parse_allow_random(config.init.get('allow_random', ''))
  converted = []
  for source, key in (('vit', 'vit_npz'), ('bert', 'bert'), ('ivt', 'ivt')):
    path = config.init.get(key)
    if not path:
      continue
    arrays, notes = read_arrays(path, CONFIG_KEYS[source])
    c = CONVERTERS[source](arrays, cfg, file=os.path.expanduser(path), strict=False)
    c.notes[:0] = notes
    converted.append(c)
  return merge(params, converted, patterns)
