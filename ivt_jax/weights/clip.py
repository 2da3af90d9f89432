"""Released CLIP weights -> the CLIP head's parameters (`config.init.clip`), strict, with the per-group report.

Formats, told apart by their keys:
  OpenAI / open_clip  OpenAI's released `ViT-B-16.pt` (a TorchScript archive: torch is needed to read it, nothing
                      else), open_clip checkpoints of the same architecture (`.bin`/`.pt`, bare or under
                      'state_dict', keys with or without 'module.'; or `.safetensors`): `visual.conv1.weight`,
                      `visual.transformer.resblocks.N.attn.in_proj_weight`, `transformer.resblocks.N...`,
                      `token_embedding.weight`, `text_projection`, ...
  Hugging Face        `CLIPModel` safetensors (or a model folder): `vision_model.encoder.layers.N.self_attn.q_proj`,
                      `text_model...`, `visual_projection.weight`, `text_projection.weight`; q, k and v are
                      concatenated into the in-projection.
The image position embedding is resized from the checkpoint's square grid to the patch grid of
data.image_size (bilinear, the class position kept), as IRRA's `resize_pos_embed`; `logit_scale` (CLIP's learned
temperature) is unused: the recipe fixes it (model.clip.temperature). The ID classifier is new: it keeps its
initialization (named in the report).
"""
from __future__ import annotations

import functools
import os
from typing import Mapping

import jax
import numpy as np
from flax import traverse_util

from ivt_jax.models import clip as clip_model
from ivt_jax.models import encoder as model_lib
from ivt_jax.weights import files as weight_files
from ivt_jax.weights import mapping as weight_mapping
from ivt_jax.weights import report as weight_report

_Entry = weight_mapping._Entry  # pylint: disable=protected-access

OPENAI_UNUSED = (
    (r'logit_scale', "CLIP's learned temperature (the recipe fixes it: model.clip.temperature)"),
    (r'input_resolution|context_length|vocab_size', "TorchScript metadata of OpenAI's archive"),
)
HF_UNUSED = (
    (r'logit_scale', OPENAI_UNUSED[0][1]),
    (r'(vision|text)_model\.embeddings\.position_ids', 'buffer holding the position ids 0..n-1'),
)


@functools.lru_cache(maxsize=8)
def _target(cfg: clip_model.ClipConfig) -> dict:
  shapes = jax.eval_shape(lambda: model_lib.init_module_params(clip_model.ClipModel(cfg), jax.random.key(0)))
  return traverse_util.flatten_dict(shapes, sep='/')


def _pos(cfg):
  def fn(p):
    if p.ndim != 2:
      raise ValueError(f'expected a (1 + grid, width) position embedding, got {p.ndim}-d')
    out = weight_mapping.resize_pos_embed(p[None], cfg.grid)[0]
    return out
  return fn


def _text_pos(cfg):
  def fn(p):
    if p.shape[0] != cfg.context_length:
      raise ValueError(f'{p.shape[0]} text positions, model.clip.context_length is {cfg.context_length}')
    return p
  return fn


def _conv(w):
  """PyTorch Conv2d weight (out, in, kh, kw) -> Flax Conv kernel (kh, kw, in, out)."""
  if w.ndim != 4:
    raise ValueError(f'expected a 4-d convolution weight, got {w.ndim}-d')
  return w.transpose(2, 3, 1, 0)


def _cat_linear(*ws):
  return np.concatenate([weight_mapping._linear(w) for w in ws], axis=1)  # pylint: disable=protected-access


def _block_entries(path: str, key: str, hf: bool) -> list[_Entry]:
  lin = weight_mapping._linear  # pylint: disable=protected-access
  if hf:
    a = f'{key}self_attn.'
    names = {'ln_1': 'layer_norm1', 'ln_2': 'layer_norm2', 'mlp_c_fc': 'mlp.fc1', 'mlp_c_proj': 'mlp.fc2',
             'attn_out_proj': 'self_attn.out_proj'}
    entries = [_Entry(f'{path}attn_in_proj/kernel', tuple(f'{a}{n}_proj.weight' for n in 'qkv'), _cat_linear),
               _Entry(f'{path}attn_in_proj/bias', tuple(f'{a}{n}_proj.bias' for n in 'qkv'),
                      lambda *bs: np.concatenate(bs))]
  else:
    names = {'ln_1': 'ln_1', 'ln_2': 'ln_2', 'mlp_c_fc': 'mlp.c_fc', 'mlp_c_proj': 'mlp.c_proj',
             'attn_out_proj': 'attn.out_proj'}
    entries = [_Entry(f'{path}attn_in_proj/kernel', (f'{key}attn.in_proj_weight',), lin),
               _Entry(f'{path}attn_in_proj/bias', (f'{key}attn.in_proj_bias',))]
  for ours, theirs in names.items():
    if ours.startswith('ln'):
      entries += [_Entry(f'{path}{ours}/scale', (f'{key}{theirs}.weight',)),
                  _Entry(f'{path}{ours}/bias', (f'{key}{theirs}.bias',))]
    else:
      entries += [_Entry(f'{path}{ours}/kernel', (f'{key}{theirs}.weight',), lin),
                  _Entry(f'{path}{ours}/bias', (f'{key}{theirs}.bias',))]
  return entries


def _ln(path, key):
  return [_Entry(f'{path}/scale', (f'{key}.weight',)), _Entry(f'{path}/bias', (f'{key}.bias',))]


def openai_entries(cfg: clip_model.ClipConfig) -> list[_Entry]:
  e = [_Entry('visual/conv1/kernel', ('visual.conv1.weight',), _conv),
       _Entry('visual/class_embedding', ('visual.class_embedding',)),
       _Entry('visual/positional_embedding', ('visual.positional_embedding',), _pos(cfg)),
       *_ln('visual/ln_pre', 'visual.ln_pre'), *_ln('visual/ln_post', 'visual.ln_post'),
       _Entry('visual/proj', ('visual.proj',)),
       _Entry('text/token_embedding/embedding', ('token_embedding.weight',)),
       _Entry('text/positional_embedding', ('positional_embedding',), _text_pos(cfg)),
       *_ln('text/ln_final', 'ln_final'), _Entry('text/text_projection', ('text_projection',))]
  for i in range(cfg.vision_layers):
    e += _block_entries(f'visual/transformer/resblocks_{i}/', f'visual.transformer.resblocks.{i}.', False)
  for i in range(cfg.text_layers):
    e += _block_entries(f'text/transformer/resblocks_{i}/', f'transformer.resblocks.{i}.', False)
  return e


def hf_entries(cfg: clip_model.ClipConfig) -> list[_Entry]:
  v, t = 'vision_model.', 'text_model.'
  e = [_Entry('visual/conv1/kernel', (f'{v}embeddings.patch_embedding.weight',), _conv),
       _Entry('visual/class_embedding', (f'{v}embeddings.class_embedding',)),
       _Entry('visual/positional_embedding', (f'{v}embeddings.position_embedding.weight',), _pos(cfg)),
       *_ln('visual/ln_pre', f'{v}pre_layrnorm'), *_ln('visual/ln_post', f'{v}post_layernorm'),
       _Entry('visual/proj', ('visual_projection.weight',), weight_mapping._linear),  # pylint: disable=protected-access
       _Entry('text/token_embedding/embedding', (f'{t}embeddings.token_embedding.weight',)),
       _Entry('text/positional_embedding', (f'{t}embeddings.position_embedding.weight',), _text_pos(cfg)),
       *_ln('text/ln_final', f'{t}final_layer_norm'),
       _Entry('text/text_projection', ('text_projection.weight',), weight_mapping._linear)]  # pylint: disable=protected-access
  for i in range(cfg.vision_layers):
    e += _block_entries(f'visual/transformer/resblocks_{i}/', f'{v}encoder.layers.{i}.', True)
  for i in range(cfg.text_layers):
    e += _block_entries(f'text/transformer/resblocks_{i}/', f'{t}encoder.layers.{i}.', True)
  return e


def _strip_module(arrays: Mapping[str, np.ndarray]) -> tuple[dict, dict]:
  out, names = {}, {}
  for k, v in arrays.items():
    n = k[len('module.'):] if k.startswith('module.') else k
    out[n], names[n] = v, k
  return out, names


def convert_clip(arrays: Mapping[str, np.ndarray], cfg: clip_model.ClipConfig, file: str = '',
                 strict: bool = True) -> weight_report.Converted:
  """A CLIP state dict (OpenAI/open_clip or Hugging Face names: told apart by their keys) -> the head's arrays."""
  arrays, names = _strip_module(arrays)
  hf = any(k.startswith('vision_model.') for k in arrays)
  entries, unused = (hf_entries(cfg), HF_UNUSED) if hf else (openai_entries(cfg), OPENAI_UNUSED)
  arrays = {k: np.asarray(v, np.float32) if np.asarray(v).dtype.kind == 'f' else np.asarray(v)
            for k, v in arrays.items()}
  converted = weight_mapping._convert(  # pylint: disable=protected-access
      'clip', file, arrays, entries, unused, cfg, names=names, strict=False, target=_target(cfg),
      block_pattern=r'(?:resblocks|layers)\.(\d+)\.')
  if cfg.num_classes:
    for p in ('classifier/kernel', 'classifier/bias'):
      converted.by_design[p] = 'the ID classifier over the training identities is new (IRRA: normal(0.001), 0)'
  old = arrays.get(f'{"vision_model.embeddings.position_embedding.weight" if hf else "visual.positional_embedding"}')
  if old is not None and old.shape[0] != cfg.num_image_tokens:
    converted.notes.append(f'image position embedding resized from {old.shape[0] - 1} positions to the '
                           f'{cfg.grid[0]}x{cfg.grid[1]} patch grid of data.image_size {tuple(cfg.image_size)}')
  converted.notes.append('Hugging Face CLIPModel names' if hf else 'OpenAI / open_clip names')
  if converted.problems and strict:
    raise converted.error()
  return converted


def read_clip_file(path: str) -> tuple[dict[str, np.ndarray], list[str]]:
  """Arrays of a CLIP checkpoint; OpenAI's TorchScript archive through torch.jit (torch needed only there)."""
  path = os.path.expanduser(path)
  if os.path.isfile(path) and not path.endswith(('.safetensors', '.npz')):
    import zipfile  # pylint: disable=g-import-not-at-top
    if zipfile.is_zipfile(path) and any(n.endswith('constants.pkl') for n in zipfile.ZipFile(path).namelist()):
      return _read_torchscript(path)
  return weight_files.read_arrays(path, weight_report.CONFIG_KEYS['clip'])


def _read_torchscript(path: str) -> tuple[dict[str, np.ndarray], list[str]]:
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ImportError(f'config.init.clip: {path} is a TorchScript archive (OpenAI\'s released format); reading '
                      'it needs torch (pip install torch, the CPU build is enough)') from None
  try:
    state = torch.jit.load(path, map_location='cpu').state_dict()
  except Exception as e:  # pylint: disable=broad-except  (torch raises RuntimeError and others)
    raise ValueError(f'config.init.clip: cannot read the TorchScript archive {path}: {e}') from e
  arrays = {k: v.detach().float().numpy() if v.is_floating_point() else v.detach().numpy()
            for k, v in state.items()}
  weight_files.check_finite(arrays, f'config.init.clip: {path}')
  return arrays, ['read with torch.jit.load (OpenAI TorchScript archive; float16 weights upcast to float32)']
