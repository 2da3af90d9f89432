"""File keys -> encoder parameters: the mapping engine and the three converters (released IVT checkpoints, ImageNet
ViT-B/16 .npz with its position embedding resized to the patch grid, BERT's embeddings and MLPs). Pure
functions: a flat mapping of names to numpy arrays in, arrays in the model's layout out."""
from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import Callable, Mapping, Optional, Sequence

import jax
import numpy as np
from flax import traverse_util

from ivt_jax.models import encoder as model_lib
from ivt_jax.weights import report as weight_report


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
             pre_problems: Sequence[str] = (), strict: bool = True,
             target: Optional[Mapping[str, jax.ShapeDtypeStruct]] = None) -> weight_report.Converted:
  """Applies `entries` to `arrays`; unexpected keys and shape mismatches raise one WeightMappingError
  (strict) or are returned in `Converted.problems`.

  `names` maps the (normalized) keys of `arrays` back to the names in the file, for messages. `target`: the
  model's flat parameter shapes (default: the IVT encoder's for `cfg`).
  """
  target = _target_shapes(cfg) if target is None else target
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
      hint = _block_hint(k, block_pattern, cfg.depth) if block_pattern and hasattr(cfg, 'depth') else ''
      problems.append(f'unexpected key: {name(k)!r} {tuple(np.shape(arrays[k]))}{hint}')
  converted = weight_report.Converted(source, file, out, ignored=ignored, absent=absent, problems=problems,
                                      rejected=rejected)
  if problems and strict:
    raise converted.error()
  return converted


def _hint(path: str, cfg: model_lib.EncoderConfig) -> str:
  """Which config keys decide a parameter's shape, for the parameters whose size depends on the config."""
  if not isinstance(cfg, model_lib.EncoderConfig):
    return _clip_hint(path, cfg)
  if path in ('pos_embed', 'type_embed'):
    return (f' (data.image_size {tuple(cfg.image_size)}, model.patch_size {cfg.patch_size} and model.stride '
            f'{cfg.stride} give {cfg.num_image_tokens} tokens; a checkpoint trained with another stride or image '
            'size does not fit)')
  if path == 'embeddings/word_embeddings/embedding':
    return (f' (model.vocab_size {cfg.vocab_size} comes from the tokenizer; pretrained text weights need the '
            'vocabulary they were trained with, e.g. data.tokenizer=wordpiece with bert-base-uncased vocab.txt)')
  return ''


def _clip_hint(path: str, cfg) -> str:
  if path == 'visual/positional_embedding':
    return (f' (data.image_size {tuple(cfg.image_size)} with model.patch_size {cfg.patch_size} and model.stride '
            f'{cfg.stride}: {cfg.num_image_tokens} tokens)')
  if path == 'text/token_embedding/embedding':
    return (f' (model.vocab_size {cfg.vocab_size} comes from the tokenizer: CLIP weights need '
            "data.tokenizer='clip')")
  if '/resblocks_' in path or path.endswith(('proj', 'projection')):
    return (' (the towers: model.clip.vision_width/_layers/_heads, text_width/_layers/_heads, embed_dim; '
            'ViT-B/16: 768/12/12, 512/12/8, 512)')
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
                strict: bool = True) -> weight_report.Converted:
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
                strict: bool = True) -> weight_report.Converted:
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
                 strict: bool = True) -> weight_report.Converted:
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
      short = re.sub(r'LayerNorm\.beta$', 'LayerNorm.bias', short)
      short = re.sub(r'LayerNorm\.gamma$', 'LayerNorm.weight', short)
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
