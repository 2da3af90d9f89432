"""CLIP's two towers as a head (`config.model.head = 'clip'`): the recipe family of IRRA and RDE.

  image: ViT (CLIP's VisionTransformer): patches by a bias-free convolution, a class embedding, positions,
         `ln_pre`, pre-norm residual blocks (multi-head attention, MLP with QuickGELU), `ln_post` on the class
         token, a projection (width -> embed_dim). Input: the pipeline's images normalized to [-1, 1]
         (`model.normalize_images`), turned into CLIP's per-channel normalization here.
  text:  CLIP's text transformer: token and position embeddings, causal blocks, `ln_final`, the features of the
         end-of-text token (the last real token: our tokenizers always end a text with it; CLIP's own takes the
         highest id, which is the same token), a projection.
  score: cosine of the two projected features.
  ID:    with `num_classes` > 0, a linear classifier over the training identities on both features (IRRA:
         weights normal(0.001), bias 0).

BMM (data.bmm_ratio) drops tokens as keys, as in the IVT encoder: image patches (the class token always stays),
and text tokens (the start and end-of-text tokens always stay). In the causal text tower a dropped token still
gets its own output (it attends to the earlier kept tokens), but no later token sees it: the end-of-text token,
whose output is the text's feature, reads the text without it, as the shared encoder's CLS does. With
data.bmm_drops = 'fixed' and model.bmm_tokens = 'remove' the dropped image patches are removed from the
sequence at training time (`encoder.remove_dropped`: exact, the same features and gradients).

Parameter names follow OpenAI's state dict (visual.conv1, visual.class_embedding, ..., transformer.resblocks_N
.attn.in_proj, ln_final, text_projection), so that released weights map one to one (ivt_jax.weights.clip).
Initialization (for training from scratch) follows OpenAI's `initialize_parameters` for both towers.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from input_pipeline import shapes
from ivt_jax.models import encoder as model_lib

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclasses.dataclass(frozen=True)
class ClipConfig:
  """Static description of both towers and the CLIP objectives; built from `config.model.clip` by `clip_config`."""
  image_size: tuple[int, int] = (384, 128)
  patch_size: int = 16
  stride: int = 16
  vision_width: int = 768
  vision_layers: int = 12
  vision_heads: int = 12
  embed_dim: int = 512
  vocab_size: int = 49408
  context_length: int = 77
  text_width: int = 512
  text_layers: int = 12
  text_heads: int = 8
  num_classes: int = 0
  bmm_ratio: float = 0.2
  bmm_drops: str = 'uniform'
  bmm_tokens: str = 'remove'
  dtype: str = 'float32'
  attention: str = 'xla'
  remat: bool = False
  # The objective: weights (0 skips a term) and the fixed logit scale 1 / temperature.
  sdm_weight: float = 1.0
  id_weight: float = 1.0
  itc_weight: float = 0.0
  cmpm_weight: float = 0.0
  temperature: float = 0.02

  @property
  def grid(self) -> tuple[int, int]:
    return shapes.patch_grid(self.image_size, self.patch_size, self.stride)

  @property
  def num_image_tokens(self) -> int:
    """Patches plus the class token."""
    return shapes.num_image_tokens(self.image_size, self.patch_size, self.stride)

  @property
  def image_keep_length(self) -> int:
    """Image tokens the vision tower runs on at training time (`encoder.removal_length`)."""
    return model_lib.removal_length(self.num_image_tokens, self.bmm_ratio, self.bmm_drops, self.bmm_tokens)


def clip_config(config: ml_collections.ConfigDict) -> ClipConfig:
  """The one place where the experiment config becomes the CLIP head's static config."""
  c, m = config.model.clip, config.model
  for tower, width, heads in (('vision', c.vision_width, c.vision_heads), ('text', c.text_width, c.text_heads)):
    if width % heads:
      raise ValueError(f'model.clip.{tower}_width ({width}) must be divisible by model.clip.{tower}_heads '
                       f'({heads})')
  if config.data.text_length > c.context_length:
    raise ValueError(f'data.text_length ({config.data.text_length}) exceeds model.clip.context_length '
                     f'({c.context_length})')
  if m.dtype not in ('float32', 'bfloat16'):
    raise ValueError(f"model.dtype must be 'float32' or 'bfloat16', got {m.dtype!r}")
  if not c.temperature > 0:
    raise ValueError(f'model.clip.temperature must be positive, got {c.temperature}')
  if c.id_weight and not c.num_classes:
    raise ValueError('model.clip.id_weight > 0 needs model.clip.num_classes (the training identities; set from '
                     'the prepared data when the run starts)')
  bmm_drops, bmm_tokens = model_lib.bmm_settings(config)
  model_lib.check_bmm(config.data.bmm_ratio, bmm_drops, bmm_tokens)
  return ClipConfig(
      image_size=tuple(config.data.image_size), patch_size=m.patch_size, stride=m.stride,
      vision_width=c.vision_width, vision_layers=c.vision_layers, vision_heads=c.vision_heads,
      embed_dim=c.embed_dim, vocab_size=m.vocab_size, context_length=c.context_length, text_width=c.text_width,
      text_layers=c.text_layers, text_heads=c.text_heads, num_classes=int(c.num_classes),
      bmm_ratio=config.data.bmm_ratio, bmm_drops=bmm_drops, bmm_tokens=bmm_tokens, dtype=m.dtype, attention=m.attention, remat=m.remat,
      sdm_weight=c.sdm_weight, id_weight=c.id_weight, itc_weight=c.itc_weight, cmpm_weight=c.cmpm_weight,
      temperature=c.temperature)


def quick_gelu(x):
  return x * jax.nn.sigmoid(1.702 * x)


class ResidualAttentionBlock(nn.Module):
  """x + attn(ln_1(x)); x + mlp(ln_2(x)) with CLIP's names (attn.in_proj, attn.out_proj, mlp.c_fc, mlp.c_proj)."""
  width: int
  heads: int
  attn_std: float
  proj_std: float
  fc_std: float
  dtype: Any = jnp.float32
  implementation: str = 'xla'

  @nn.compact
  def __call__(self, x, bias):
    """x: (B, N, D); bias: (B, 1, N or 1, N) additive, 0 where a query may read a key."""
    b, n, d = x.shape
    h = self.heads
    ln = lambda name: nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, name=name)
    dense = lambda f, std, name: nn.Dense(f, dtype=self.dtype, kernel_init=nn.initializers.normal(std),
                                          name=name)
    y = ln('ln_1')(x)
    q, k, v = jnp.split(dense(3 * d, self.attn_std, 'attn_in_proj')(y), 3, axis=-1)
    heads = lambda t: t.reshape(b, n, h, d // h)
    impl = None if self.implementation == 'auto' else self.implementation
    y = jax.nn.dot_product_attention(heads(q), heads(k), heads(v), bias=bias.astype(q.dtype),
                                     implementation=impl).reshape(b, n, d)
    x = x + dense(d, self.proj_std, 'attn_out_proj')(y)
    y = dense(4 * d, self.fc_std, 'mlp_c_fc')(ln('ln_2')(x))
    return x + dense(d, self.proj_std, 'mlp_c_proj')(quick_gelu(y))


class Transformer(nn.Module):
  width: int
  layers: int
  heads: int
  dtype: Any = jnp.float32
  implementation: str = 'xla'
  remat: bool = False

  @nn.compact
  def __call__(self, x, bias):
    attn_std = self.width ** -0.5
    proj_std = attn_std * (2 * self.layers) ** -0.5
    fc_std = (2 * self.width) ** -0.5
    block = nn.remat(ResidualAttentionBlock) if self.remat else ResidualAttentionBlock
    for i in range(self.layers):
      x = block(self.width, self.heads, attn_std, proj_std, fc_std, self.dtype, self.implementation,
                name=f'resblocks_{i}')(x, bias)
    return x


def _key_bias(valid):
  """(B, N) bool keys -> (B, 1, 1, N) additive bias."""
  return jnp.where(valid, 0.0, model_lib.MASK_VALUE)[:, None, None, :]


class VisionTransformer(nn.Module):
  cfg: ClipConfig

  @nn.compact
  def __call__(self, images, valid, keep_length=None):
    """images: (B, H, W, 3) CLIP-normalized; valid: (B, 1 + N) bool keys -> (B, embed_dim) float32.
    keep_length: run the blocks on the first `keep_length` valid tokens alone (`encoder.remove_dropped`)."""
    c = self.cfg
    dtype = jnp.dtype(c.dtype)
    w = c.vision_width
    scale = w ** -0.5
    x = nn.Conv(w, (c.patch_size, c.patch_size), strides=(c.stride, c.stride), padding='VALID', use_bias=False,
                dtype=dtype, name='conv1')(images.astype(dtype))
    b = x.shape[0]
    x = x.reshape(b, -1, w)
    cls = self.param('class_embedding', nn.initializers.normal(scale), (w,))
    pos = self.param('positional_embedding', nn.initializers.normal(scale), (c.num_image_tokens, w))
    x = jnp.concatenate([jnp.broadcast_to(cls.astype(x.dtype), (b, 1, w)), x], axis=1) + pos.astype(x.dtype)
    x = nn.LayerNorm(epsilon=1e-5, dtype=dtype, name='ln_pre')(x)
    if keep_length is not None and keep_length < x.shape[1]:
      x, valid = model_lib.remove_dropped(x, jnp.ones_like(valid), valid, keep_length)
    x = Transformer(w, c.vision_layers, c.vision_heads, dtype, c.attention, c.remat, name='transformer')(
        x, _key_bias(valid))
    x = nn.LayerNorm(epsilon=1e-5, dtype=dtype, name='ln_post')(x[:, 0])
    proj = self.param('proj', nn.initializers.normal(scale), (w, c.embed_dim))
    return (x @ proj.astype(x.dtype)).astype(jnp.float32)


class TextTransformer(nn.Module):
  cfg: ClipConfig

  @nn.compact
  def __call__(self, ids, valid, last):
    """ids: (B, L); valid: (B, L) bool keys; last: (B,) the end-of-text positions -> (B, embed_dim) float32."""
    c = self.cfg
    dtype = jnp.dtype(c.dtype)
    w = c.text_width
    n = ids.shape[1]
    x = nn.Embed(c.vocab_size, w, embedding_init=nn.initializers.normal(0.02), name='token_embedding')(ids)
    pos = self.param('positional_embedding', nn.initializers.normal(0.01), (c.context_length, w))
    x = (x + pos[:n]).astype(dtype)
    causal = jnp.tril(jnp.ones((n, n), bool))
    bias = jnp.where(causal[None, None] & valid[:, None, None, :], 0.0, model_lib.MASK_VALUE)
    x = Transformer(w, c.text_layers, c.text_heads, dtype, c.attention, c.remat, name='transformer')(x, bias)
    x = nn.LayerNorm(epsilon=1e-5, dtype=dtype, name='ln_final')(x)
    x = jnp.take_along_axis(x, last[:, None, None], axis=1)[:, 0]
    proj = self.param('text_projection', nn.initializers.normal(w ** -0.5), (w, c.embed_dim))
    return (x @ proj.astype(x.dtype)).astype(jnp.float32)


class ClipModel(nn.Module):
  """Entry points as the IVT encoder's: `embed_images`, `embed_texts`; plus `classify` (the ID classifier)."""
  cfg: ClipConfig

  def setup(self):
    c = self.cfg
    self.visual = VisionTransformer(c)
    self.text = TextTransformer(c)
    if c.num_classes:
      self.classifier = nn.Dense(c.num_classes, kernel_init=nn.initializers.normal(0.001), name='classifier')

  def _keep(self, keep, batch, length, train):
    return model_lib.keep_mask(self, keep, batch, length, train, self.cfg.bmm_ratio)

  def embed_images(self, images, keep=None, train: bool = False, rows=None):
    """(B, H, W, 3) normalized to [-1, 1] -> (B, embed_dim) float32 (not L2-normalized). rows: unused (the
    towers draw no randomness), as the IVT encoder's."""
    c = self.cfg
    if images.shape[1:3] != tuple(c.image_size):
      raise ValueError(f'images are {images.shape[1:3]}, the model expects data.image_size {c.image_size}')
    x = (images * 0.5 + 0.5 - jnp.asarray(CLIP_MEAN)) / jnp.asarray(CLIP_STD)
    return self.visual(x, self._keep(keep, images.shape[0], c.num_image_tokens, train),
                       c.image_keep_length if train else None)

  def embed_texts(self, ids, mask, keep=None, train: bool = False, rows=None):
    """(B, L) ids and mask (1 on start..end-of-text) -> (B, embed_dim) float32 (not L2-normalized)."""
    b, n = ids.shape
    if n > self.cfg.context_length:
      raise ValueError(f'text length {n} exceeds model.clip.context_length {self.cfg.context_length}')
    mask = mask.astype(bool)
    last = jnp.maximum(jnp.sum(mask, axis=1) - 1, 0)
    is_last = jnp.arange(n)[None] == last[:, None]
    valid = mask & (self._keep(keep, b, n, train) | is_last)
    return self.text(ids, valid, last)

  def classify(self, features):
    """(B, embed_dim) -> (B, num_classes) identity logits (float32)."""
    return self.classifier(features).astype(jnp.float32)

  def __call__(self, images, ids, mask, train: bool = False):
    x, z = self.embed_images(images, train=train), self.embed_texts(ids, mask, train=train)
    if self.cfg.num_classes:
      self.classify(x)
    return x, z


def build(config: ml_collections.ConfigDict) -> ClipModel:
  return ClipModel(clip_config(config))


def param_count(config: ml_collections.ConfigDict) -> int:
  abstract = jax.eval_shape(lambda: model_lib.init_module_params(build(config), jax.random.key(0)))
  return int(sum(np.prod(a.shape) for a in jax.tree_util.tree_leaves(abstract)))
