"""Attention maps, as in the IVT paper's figures: where the image CLS token looks, and which patches match a
phrase.

  python -m ivt_jax.attention_maps --checkpoint=DIR --image=PATH --text "black backpack" [--text ...]
      --out=map.png [--layer=-1] [--height=384]

writes a PNG with the image | its CLS attention | one text-match map per --text.

- CLS attention: the attention probabilities of the image's CLS query in one layer (default: the last),
  averaged over heads, over the patch keys only, renormalized to sum to 1 over the patches (the CLS token's
  attention to itself is left out). IVT encodes an image and a text separately (one shared transformer, no
  cross-attention), so this map depends on the image alone.
- Text match: the cosine between the text's CLS token and each image patch token, both after the final
  LayerNorm (the space the embeddings live in): which patches look like the phrase, e.g. "black backpack".

The model exposes its attention probabilities through Flax's 'intermediates' collection (each block's
Attention sows 'attention' (B, heads, N, N) when the collection is mutable). Images are preprocessed as the
evaluation gallery (`augment.eval_image`). A map over the (rows, cols) patch grid becomes pixels by bilinear
interpolation between patch centres (patch (r, c) covers input pixels [r * stride, r * stride + patch) by
[c * stride, c * stride + patch), so its centre is at r * stride + patch / 2), constant beyond the outer
centres.

DIR, --config and --tokenizer(_kind) are as for `python -m ivt_jax.search` (the checkpoint's saved config and
tokenizer by default).
"""
from __future__ import annotations

import argparse
import functools
import re
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ivt_jax.runtime import cli as cli_lib


def attention_layers(intermediates) -> list:
  """The sown attention probabilities, one (B, heads, N, N) array per block, in block order.

  Blocks are ordered by the number their module name ends in (blocks_0, blocks_1, ...), else by call order.
  """
  found = []
  for order, (path, leaf) in enumerate(jax.tree_util.tree_leaves_with_path(intermediates)):
    names = [str(getattr(k, 'key', '')) for k in path]
    if 'attention' not in names:
      continue
    numbers = [int(m.group(1)) for n in names if (m := re.search(r'_(\d+)$', n))]
    found.append(((numbers[-1] if numbers else order), order, leaf))
  if not found:
    raise ValueError("the model sowed no 'attention' intermediates: its Attention must call "
                     "self.sow('intermediates', 'attention', probs) when that collection is mutable")
  return [leaf for _, _, leaf in sorted(found, key=lambda t: t[:2])]


def _image_forward(params, images_uint8, *, encoder):
  from ivt_jax.models import encoder as model_lib  # pylint: disable=g-import-not-at-top
  tokens, state = encoder.apply({'params': params}, model_lib.normalize_images(images_uint8),
                                method='image_tokens', mutable=['intermediates'])
  return tokens.astype(jnp.float32), [a.astype(jnp.float32) for a in attention_layers(state['intermediates'])]


def _text_forward(params, ids, mask, *, encoder):
  return encoder.apply({'params': params}, ids, mask, method='text_tokens')[:, 0].astype(jnp.float32)


_JITTED = {}


def _jitted(fn, encoder, method: str):
  """One jitted function per (fn, encoder), so repeated calls reuse the compilation."""
  if not hasattr(encoder, method):
    raise ValueError(f'{type(encoder).__name__} has no {method}(): attention maps need the encoder\'s tokens')
  key = (fn.__name__, id(encoder))
  if key not in _JITTED or _JITTED[key][0] is not encoder:
    _JITTED[key] = (encoder, jax.jit(functools.partial(fn, encoder=encoder)))
  return _JITTED[key][1]


def image_tokens_and_attention(encoder, params, images_uint8: np.ndarray, layer: int = -1):
  """uint8 (B, H, W, 3) -> (tokens (B, 1 + P, D) after the final norm, attention (B, heads, 1 + P, 1 + P)
  of block `layer`), float32 numpy."""
  tokens, layers = _jitted(_image_forward, encoder, 'image_tokens')(params, images_uint8)
  if not -len(layers) <= layer < len(layers):
    raise ValueError(f'layer {layer} does not exist: the model has {len(layers)} blocks')
  return np.asarray(tokens), np.asarray(layers[layer])


def text_cls(encoder, params, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
  """(T, L) ids and mask -> (T, D) the text CLS tokens after the final norm (not normalized), float32."""
  return np.asarray(_jitted(_text_forward, encoder, 'text_tokens')(params, ids, mask))


def cls_attention_map(attention: np.ndarray, grid: Sequence[int]) -> np.ndarray:
  """(B, heads, N, N) probabilities -> (B, rows, cols): the CLS query's head-averaged attention over the
  patch keys, renormalized to sum to 1 over the patches."""
  rows, cols = grid
  if attention.shape[-1] != 1 + rows * cols:
    raise ValueError(f'attention over {attention.shape[-1]} keys does not fit a CLS + {rows}x{cols} grid')
  p = np.asarray(attention, np.float64).mean(axis=1)[:, 0, 1:]
  p = p / p.sum(axis=-1, keepdims=True)
  return p.reshape(-1, rows, cols).astype(np.float32)


def text_match_map(tokens: np.ndarray, texts_cls: np.ndarray, grid: Sequence[int]) -> np.ndarray:
  """Image tokens (B, 1 + P, D) and text CLS tokens (T, D) -> (B, T, rows, cols) cosine per patch."""
  rows, cols = grid
  patches = np.asarray(tokens, np.float64)[:, 1:]
  if patches.shape[1] != rows * cols:
    raise ValueError(f'{patches.shape[1]} patch tokens do not fit a {rows}x{cols} grid')
  patches = patches / np.linalg.norm(patches, axis=-1, keepdims=True)
  t = np.asarray(texts_cls, np.float64)
  t = t / np.linalg.norm(t, axis=-1, keepdims=True)
  cos = np.einsum('bpd,td->btp', patches, t)
  return cos.reshape(cos.shape[0], cos.shape[1], rows, cols).astype(np.float32)


def _interp_matrix(n_out: int, in_size: int, n_grid: int, patch: int, stride: int) -> np.ndarray:
  """(n_out, n_grid) weights: output pixel i (of n_out over in_size input pixels) from the patch centres."""
  pos = (np.arange(n_out) + 0.5) * in_size / n_out          # continuous input coordinate of the pixel centre
  g = np.clip((pos - patch / 2.0) / stride, 0.0, n_grid - 1)  # grid coordinate between patch centres
  lo = np.minimum(np.floor(g).astype(int), max(n_grid - 2, 0))
  frac = g - lo if n_grid > 1 else np.zeros_like(g)
  w = np.zeros((n_out, n_grid))
  w[np.arange(n_out), lo] += 1.0 - frac
  if n_grid > 1:
    w[np.arange(n_out), lo + 1] += frac
  return w


def upsample(grid_map: np.ndarray, image_size: Sequence[int], patch_size: int, stride: int,
             out_size: Optional[Sequence[int]] = None) -> np.ndarray:
  """(rows, cols) patch values -> (out_h, out_w) pixels (default: the model's input size (H, W)).

  Bilinear between patch centres (module docstring); out_size may differ from image_size (the same image
  shown larger).
  """
  rows, cols = grid_map.shape
  h, w = image_size
  out_h, out_w = out_size or image_size
  wy = _interp_matrix(out_h, h, rows, patch_size, stride)
  wx = _interp_matrix(out_w, w, cols, patch_size, stride)
  return (wy @ np.asarray(grid_map, np.float64) @ wx.T).astype(np.float32)


def _unit(x: np.ndarray) -> np.ndarray:
  lo, hi = float(x.min()), float(x.max())
  return np.zeros_like(x) if hi - lo < 1e-12 else (x - lo) / (hi - lo)


def compute_maps(model, image: np.ndarray, texts: Sequence[str] = (), layer: int = -1) -> dict:
  """Maps for one preprocessed image and some phrases.

  Args:
    model: a `search.LoadedModel` (config, tokenizer, encoder, params).
    image: uint8 (H, W, 3) at data.image_size (`augment.eval_image`).
    texts: T phrases.
    layer: the block whose attention is shown (-1: the last).
  Returns:
    dict(grid=(rows, cols), attention (heads, N, N), cls_attention (rows, cols) summing to 1,
    text_match (T, rows, cols) cosines).
  """
  enc_cfg = model.encoder.cfg
  grid = tuple(enc_cfg.grid)
  tokens, attention = image_tokens_and_attention(model.encoder, model.params, image[None], layer)
  out = {'grid': grid, 'attention': attention[0], 'cls_attention': cls_attention_map(attention, grid)[0],
         'text_match': np.zeros((0,) + grid, np.float32)}
  if texts:
    ids, mask = model.tokenizer.encode(list(texts), int(model.config.data.text_length))
    out['text_match'] = text_match_map(tokens, text_cls(model.encoder, model.params, ids, mask), grid)[0]
  return out


def figure(model, image_path, texts: Sequence[str] = (), layer: int = -1, height: int = 384):
  """-> (PIL figure: image | CLS attention | a text-match map per text, the `compute_maps` dict).

  image_path: an image file, or an encoded image's bytes (a person cut from a frame of footage).

  Colour scales: the CLS map from its minimum to its maximum; the text-match maps share one scale, from the
  lowest to the highest cosine over all phrases. The notes under the panels give the actual values.
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from input_pipeline import augment, images  # pylint: disable=g-import-not-at-top
  from ivt_jax.search import pictures as search_pictures  # pylint: disable=g-import-not-at-top
  data = bytes(image_path) if isinstance(image_path, (bytes, bytearray)) else images.read_file(image_path)
  name = 'the image' if isinstance(image_path, (bytes, bytearray)) else image_path
  size = tuple(int(s) for s in model.config.data.image_size)
  maps = compute_maps(model, augment.eval_image(data, size, name=name), texts, layer)
  h, w = size
  shown = (int(height), max(8, int(round(height * w / h))))
  display = np.asarray(augment.decode_image(data, name=name).resize((shown[1], shown[0]),
                                                                          Image.Resampling.BILINEAR))
  cfg = model.encoder.cfg
  up = lambda m: upsample(m, size, cfg.patch_size, cfg.stride, shown)
  rows, cols = maps['grid']
  cls = maps['cls_attention']
  layer_no = layer % cfg.depth
  panels = [('image', None, f'{rows}x{cols} patches'),
            (f'CLS attention (block {layer_no + 1}/{cfg.depth})', _unit(up(cls)),
             f'max {cls.max():.3f}, uniform {1 / cls.size:.3f}')]
  if len(texts):  # one colour scale for all phrases, so that a weak match looks weak next to a strong one
    lo, hi = float(maps['text_match'].min()), float(maps['text_match'].max())
    for text, m in zip(texts, maps['text_match']):
      heat = np.clip((up(m) - lo) / max(hi - lo, 1e-12), 0.0, 1.0)
      panels.append((f'match: "{text}"', heat, f'cos {m.min():+.2f}..{m.max():+.2f}'))
  return search_pictures.attention_figure(display, panels), maps


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(prog='python -m ivt_jax.attention_maps', description=__doc__.split('\n')[0])
  parser.add_argument('--checkpoint', required=True, help='training workdir, best/ or converted checkpoint')
  parser.add_argument('--image', required=True, help='an image file')
  parser.add_argument('--text', action='append', default=[], help='a phrase to match (repeatable)')
  parser.add_argument('--out', required=True, help='PNG to write')
  parser.add_argument('--layer', type=int, default=-1, help='block whose CLS attention is shown (-1: last)')
  parser.add_argument('--height', type=int, default=384, help='height of each panel in pixels')
  parser.add_argument('--config', default='', help='config file overriding the checkpoint\'s saved config')
  parser.add_argument('--tokenizer', default='', help='tokenizer file (.model or vocab.txt)')
  parser.add_argument('--tokenizer_kind', default='', choices=('', 'sentencepiece', 'wordpiece'))
  args = parser.parse_args(argv)
  if args.height < 16:
    parser.error(f'--height must be >= 16, got {args.height}')
  return args


def main(argv: Optional[Sequence[str]] = None) -> int:
  from ivt_jax.search import model as search_model  # pylint: disable=g-import-not-at-top
  from ivt_jax.evaluation import pictures as visualize  # pylint: disable=g-import-not-at-top
  args = parse_args(argv)
  config = search_model.load_config_file(args.config) if args.config else None
  model = search_model.load_model(args.checkpoint, config, args.tokenizer, args.tokenizer_kind)
  fig, maps = figure(model, args.image, args.text, args.layer, args.height)
  path = visualize.save_png(fig, args.out)
  cls = maps['cls_attention']
  r, c = np.unravel_index(int(np.argmax(cls)), cls.shape)
  print(f'{args.image}: {maps["grid"][0]}x{maps["grid"][1]} patches; CLS attention peaks at patch '
        f'(row {r}, col {c}) with {cls[r, c]:.3f}')
  for text, m in zip(args.text, maps['text_match']):
    r, c = np.unravel_index(int(np.argmax(m)), m.shape)
    print(f'"{text}": best patch (row {r}, col {c}), cos {m[r, c]:+.3f} (min {m.min():+.3f})')
  print(f'wrote {path}')
  return 0


def cli(argv: Optional[Sequence[str]] = None) -> int:
  """`main` with bad input reported as one line, exit status 2."""
  return cli_lib.run_cli(main, argv)

