"""The part-level head: coarse-to-fine embeddings from K learnable part queries shared by both modalities.
(Its extra cost against the IVT head: ivt_jax.bench.part_cost, `python -m ivt_jax.benchmark --part_cost`.)

The model is the IVT encoder (same parameters, same names) plus a small decoder:

  coarse:  g_i = CLS output of the image, g_t = CLS output of the text (exactly the IVT embeddings).
  fine:    K learnable part queries Q (K, D), one set for both modalities (parameter `part_queries`), go
           through `part.depth` decoder layers that cross-attend to the encoder's output tokens of one
           modality: image patch tokens without CLS, or text tokens without CLS, [SEP], padding. At training
           time the BMM-dropped tokens are excluded as keys too. A layer is
             x <- x + CrossAttn(LN(x), LN_m(tokens))    LN_m: a key LayerNorm per modality (`key_norm_image`,
             x <- x + SelfAttn(LN(x))   (part.self_attention)                          `key_norm_text`)
             x <- x + MLP(LN(x))
           then a final LayerNorm: p_i (K, D) per image, p_t (K, D) per text. The decoder layers are shared by
           both modalities (`part_decoder`) or one per modality (part.share_decoder=False:
           `part_decoder_image`, `part_decoder_text`); the queries are shared in both cases, so that part k of an
           image and part k of a text come from the same query.
  weights: w_t = softmax_K(MLP(g_t)) with MLP = Dense(part.weight_hidden) -> ReLU -> Dense(K) (`part_weights`,
           as PLOT's text-based dynamic part attention), or w_t = 1/K (part.weights='uniform').
  score:   S(t, i) = cos(g_t, g_i) + s * sum_k w_tk cos(p_tk, p_ik),  s = part.scale
           (part.score='coarse': S = cos(g_t, g_i); the parts are still computed).

The score is a plain dot product of composite vectors, so evaluation, metrics and search are unchanged:
  image: [ĝ_i, p̂_i1, ..., p̂_iK],   text: [ĝ_t, s w_t1 p̂_t1, ..., s w_tK p̂_tK]   (hats: L2-normalized), size
(1 + K) D; with part.score='coarse' both are ĝ (size D).

If a row has no valid key (a text whose every word was dropped), its CLS token is the only key, so the
attention stays defined.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from ivt_jax.models import encoder as model_lib

_trunc_normal = nn.initializers.truncated_normal(stddev=0.02)

WEIGHT_MODES = ('text', 'uniform')
SCORES = ('coarse_fine', 'coarse')
QUERY_INITS = ('orthogonal', 'normal')


@dataclasses.dataclass(frozen=True)
class PartConfig:
  """Static description of the part decoder; built from `config.part` by `part_config`."""
  num_parts: int = 8
  depth: int = 1
  num_heads: int = 12
  mlp_dim: int = 3072
  self_attention: bool = True
  share_decoder: bool = True
  query_init: str = 'orthogonal'
  weights: str = 'text'
  weight_hidden: int = 64
  scale: float = 1.0
  score: str = 'coarse_fine'
  # Training objective (read by ivt_jax.training.step; see ivt_jax.objectives.part).
  match_loss: str = 'sdm'
  match_weight: float = 1.0
  temperature: float = 0.02
  cmr_weight: float = 1.0
  cmr_margin: float = 0.2
  cmr_min_margin: float = 0.05
  cmr_negatives: str = 'semihard'
  commonality: str = 'clip'
  start_epoch: float = 0.0


def part_config(config: ml_collections.ConfigDict) -> PartConfig:
  """config.part (+ config.model for the 0 = 'as the encoder' defaults) -> PartConfig, validated."""
  if 'part' not in config:
    raise ValueError("model.head='part' needs a config.part block (see configs/base.py)")
  p, m = config.part, config.model
  heads = p.num_heads or m.num_heads
  if p.num_parts < 1:
    raise ValueError(f'part.num_parts must be >= 1, got {p.num_parts}')
  if p.depth < 1:
    raise ValueError(f'part.depth must be >= 1, got {p.depth}')
  if m.width % heads:
    raise ValueError(f'model.width ({m.width}) must be divisible by part.num_heads ({heads})')
  from ivt_jax.objectives import part as part_losses
  for key, value, allowed in (('weights', p.weights, WEIGHT_MODES), ('score', p.score, SCORES),
                              ('query_init', p.query_init, QUERY_INITS),
                              ('match_loss', p.match_loss, part_losses.MATCH_LOSSES),
                              ('cmr_negatives', p.cmr_negatives, part_losses.NEGATIVES),
                              ('commonality', p.commonality, part_losses.COMMONALITY_MAPS)):
    if value not in allowed:
      raise ValueError(f'part.{key} must be one of {allowed}, got {value!r}')
  if not 0.0 <= p.cmr_min_margin <= p.cmr_margin:
    raise ValueError(f'need 0 <= part.cmr_min_margin ({p.cmr_min_margin}) <= part.cmr_margin ({p.cmr_margin})')
  if p.temperature <= 0:
    raise ValueError(f'part.temperature must be > 0, got {p.temperature}')
  if p.query_init == 'orthogonal' and p.num_parts > m.width:
    raise ValueError(f"part.query_init='orthogonal' needs part.num_parts ({p.num_parts}) <= model.width "
                     f'({m.width})')
  return PartConfig(num_parts=int(p.num_parts), depth=int(p.depth), num_heads=int(heads),
                    mlp_dim=int(p.mlp_dim or m.mlp_dim), self_attention=bool(p.self_attention),
                    share_decoder=bool(p.share_decoder), query_init=p.query_init, weights=p.weights,
                    weight_hidden=int(p.weight_hidden), scale=float(p.scale), score=p.score,
                    match_loss=p.match_loss, match_weight=float(p.match_weight),
                    temperature=float(p.temperature), cmr_weight=float(p.cmr_weight),
                    cmr_margin=float(p.cmr_margin), cmr_min_margin=float(p.cmr_min_margin),
                    cmr_negatives=p.cmr_negatives, commonality=p.commonality,
                    start_epoch=float(p.start_epoch))


class MultiHeadAttention(nn.Module):
  """Multi-head attention of queries (B, K, D) over keys/values (B, N, D) with an additive key bias (B, N)."""
  num_heads: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, kv, key_bias):
    b, k, d = x.shape
    h = self.num_heads
    dense = lambda name: nn.Dense(d, dtype=self.dtype, kernel_init=_trunc_normal, name=name)
    q = dense('query')(x).reshape(b, k, h, d // h)
    key = dense('key')(kv).reshape(b, kv.shape[1], h, d // h)
    val = dense('value')(kv).reshape(b, kv.shape[1], h, d // h)
    logits = jnp.einsum('bqhd,bkhd->bhqk', q, key, preferred_element_type=jnp.float32) * (d // h) ** -0.5
    probs = jax.nn.softmax(logits + key_bias[:, None, None, :], axis=-1)
    self.sow('intermediates', 'attention', probs)
    out = jnp.einsum('bhqk,bkhd->bqhd', probs.astype(val.dtype), val).reshape(b, k, d)
    return dense('out')(out)


class DecoderLayer(nn.Module):
  """Pre-norm: cross-attention to the tokens, optional self-attention among the parts, MLP."""
  num_heads: int
  mlp_dim: int
  self_attention: bool
  ln_eps: float
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, tokens, key_bias):
    norm = lambda name: nn.LayerNorm(epsilon=self.ln_eps, dtype=self.dtype, name=name)
    x = x + MultiHeadAttention(self.num_heads, self.dtype, name='cross_attn')(norm('norm_q')(x), tokens, key_bias)
    if self.self_attention:
      y = norm('norm_self')(x)
      no_bias = jnp.zeros(x.shape[:2], jnp.float32)
      x = x + MultiHeadAttention(self.num_heads, self.dtype, name='self_attn')(y, y, no_bias)
    return x + model_lib.Mlp(self.mlp_dim, self.dtype, name='mlp')(norm('norm_mlp')(x))


class PartDecoder(nn.Module):
  """queries (K, D), tokens (B, N, D), valid keys (B, N) bool -> parts (B, K, D) (float32)."""
  num_heads: int
  mlp_dim: int
  depth: int
  self_attention: bool
  ln_eps: float
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, queries, tokens, valid, modality: str):
    tokens = nn.LayerNorm(epsilon=self.ln_eps, dtype=self.dtype, name=f'key_norm_{modality}')(tokens)
    if self.is_initializing():  # both key norms exist whatever the modality of the initializing call
      other = 'text' if modality == 'image' else 'image'
      nn.LayerNorm(epsilon=self.ln_eps, dtype=self.dtype, name=f'key_norm_{other}')(tokens[:, :1])
    key_bias = jnp.where(valid, 0.0, model_lib.MASK_VALUE).astype(jnp.float32)
    x = jnp.broadcast_to(queries.astype(tokens.dtype), (tokens.shape[0],) + queries.shape)
    for i in range(self.depth):
      x = DecoderLayer(self.num_heads, self.mlp_dim, self.self_attention, self.ln_eps, self.dtype,
                       name=f'layers_{i}')(x, tokens, key_bias)
    return nn.LayerNorm(epsilon=self.ln_eps, dtype=self.dtype, name='norm')(x).astype(jnp.float32)


def _with_fallback(valid):
  """valid (B, N) bool keys, position 0 = CLS excluded; a row with none gets its CLS as the only key."""
  empty = ~jnp.any(valid, axis=-1, keepdims=True)
  return valid.at[:, 0].set(empty[:, 0])


def text_part_keys(mask, keep):
  """(B, L) mask and BMM keep -> (B, L) bool: real tokens other than CLS (position 0) and SEP (the last real
  token), not dropped; a row left empty gets its CLS."""
  mask = mask.astype(bool)
  pos = jnp.arange(mask.shape[1])[None, :]
  sep = jnp.sum(mask, axis=1, keepdims=True) - 1
  valid = mask & keep.astype(bool) & (pos != 0) & (pos != sep)
  return _with_fallback(valid)


def image_part_keys(keep):
  """(B, N) BMM keep (CLS + patches) -> (B, N) bool: kept patch tokens, CLS excluded (kept only if nothing else is)."""
  return _with_fallback(keep.astype(bool).at[:, 0].set(False))


class PartModel(model_lib.Encoder):
  """The IVT encoder (its parameters under the Encoder's names) plus the shared-query part decoder.

  Parameters added to the Encoder's: `part_queries` (K, D); `part_decoder` (or `part_decoder_image` and
  `part_decoder_text`); `part_weights` (part.weights='text'). Entry points: `image_parts`, `text_parts`,
  `part_weights`; the inherited `embed_images` / `embed_texts` give the coarse embeddings.
  """
  part: PartConfig = PartConfig()

  def setup(self):
    super().setup()
    c, p = self.cfg, self.part
    dtype = jnp.dtype(c.dtype)
    init = (nn.initializers.orthogonal() if p.query_init == 'orthogonal' else nn.initializers.normal(0.02))
    self.part_queries = self.param('part_queries', init, (p.num_parts, c.width))
    make = lambda name: PartDecoder(p.num_heads, p.mlp_dim, p.depth, p.self_attention, c.ln_eps, dtype,
                                    name=name)
    if p.share_decoder:
      self.part_decoder = make('part_decoder')
    else:
      self.part_decoder_image = make('part_decoder_image')
      self.part_decoder_text = make('part_decoder_text')
    if p.weights == 'text':
      self.part_weights_hidden = nn.Dense(p.weight_hidden, kernel_init=_trunc_normal, name='part_weights_hidden')
      self.part_weights_out = nn.Dense(p.num_parts, kernel_init=_trunc_normal, name='part_weights_out')

  def _decoder(self, modality: str):
    if self.part.share_decoder:
      return self.part_decoder
    return self.part_decoder_image if modality == 'image' else self.part_decoder_text

  def image_parts(self, images, keep=None, train: bool = False, rows=None):
    """(B, H, W, 3) normalized images -> (coarse (B, D), parts (B, K, D)), float32."""
    b = images.shape[0]
    keep = self._keep(keep, b, self.cfg.num_image_tokens, train)  # CLS included
    tokens = self.image_tokens(images, keep, train, rows=rows)
    parts = self._decoder('image')(self.part_queries, tokens, image_part_keys(keep), 'image')
    return tokens[:, 0].astype(jnp.float32), parts

  def text_parts(self, ids, mask, keep=None, train: bool = False, rows=None):
    """(B, L) ids and mask -> (coarse (B, D), parts (B, K, D)), float32."""
    b, n = ids.shape
    keep = self._keep(keep, b, n, train)
    tokens = self.text_tokens(ids, mask, keep, train, rows=rows)
    parts = self._decoder('text')(self.part_queries, tokens, text_part_keys(mask, keep), 'text')
    return tokens[:, 0].astype(jnp.float32), parts

  def part_weights(self, text_coarse):
    """(B, D) text coarse embeddings -> (B, K) part weights, each row summing to 1."""
    if self.part.weights == 'uniform':
      return jnp.full(text_coarse.shape[:1] + (self.part.num_parts,), 1.0 / self.part.num_parts, jnp.float32)
    h = nn.relu(self.part_weights_hidden(text_coarse.astype(jnp.float32)))
    return jax.nn.softmax(self.part_weights_out(h).astype(jnp.float32), axis=-1)

  def __call__(self, images, ids, mask, train: bool = False):
    """Both modalities (initializes every parameter) -> (image coarse, image parts, text coarse, text parts,
    weights)."""
    gi, pi = self.image_parts(images, train=train)
    gt, pt = self.text_parts(ids, mask, train=train)
    return gi, pi, gt, pt, self.part_weights(gt)


def build(config: ml_collections.ConfigDict) -> PartModel:
  return PartModel(model_lib.encoder_config(config), part_config(config))


# ---- composite embeddings (what evaluation compares by dot product) ----------------------------------

def _l2(x):
  return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def image_composite(coarse, parts, part: PartConfig):
  """coarse (B, D), parts (B, K, D) -> (B, (1 + K) D) = [ĝ, p̂_1..p̂_K] ((B, D) = ĝ for score='coarse')."""
  if part.score == 'coarse':
    return _l2(coarse)
  return jnp.concatenate([_l2(coarse), _l2(parts).reshape(parts.shape[0], -1)], axis=-1)


def text_composite(coarse, parts, weights, part: PartConfig):
  """coarse (B, D), parts (B, K, D), weights (B, K) -> (B, (1 + K) D) = [ĝ, s w_1 p̂_1..s w_K p̂_K]."""
  if part.score == 'coarse':
    return _l2(coarse)
  fine = part.scale * weights[..., None] * _l2(parts)
  return jnp.concatenate([_l2(coarse), fine.reshape(parts.shape[0], -1)], axis=-1)


def score(image_coarse, image_parts, text_coarse, text_parts, weights, part: PartConfig):
  """The retrieval score written out: (Q, G) = cos(g_t, g_i) + s sum_k w_tk cos(p_tk, p_ik) (coarse only for
  score='coarse'); equals text_composite @ image_composite.T."""
  s = _l2(text_coarse) @ _l2(image_coarse).T
  if part.score == 'coarse':
    return s
  per_part = jnp.einsum('qkd,gkd->qgk', _l2(text_parts), _l2(image_parts))
  return s + part.scale * jnp.einsum('qgk,qk->qg', per_part, weights)


def embedding_size(config: ml_collections.ConfigDict) -> int:
  """Floats per image (and per text) vector that evaluation stores for the configured head."""
  d = config.model.width
  if config.model.head != 'part' or config.part.score == 'coarse':
    return d
  return (1 + config.part.num_parts) * d
