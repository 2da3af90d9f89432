"""The IVT encoder: one transformer shared by images and texts (Flax Linen, pure functional).

Per block, `norm1`, the attention (`attn.qkv` laid out q|k|v, `attn.proj`) and `norm2` are shared by both
modalities; the MLP is per modality (`mlp_vis` for images, `mlp_txt` for texts). Images enter through an
overlapping patch convolution, a CLS token and learned position and type embeddings; texts through BERT-style
word + position + token-type embeddings with LayerNorm(eps 1e-12). The CLS output after the final LayerNorm is
the embedding; retrieval compares embeddings by cosine.

Numerics follow the reference: LayerNorm eps 1e-6 in the blocks, exact (erf) GELU, additive (1 - mask) * -10000
attention masks, stochastic depth linearly 0 -> drop_path over the blocks, qkv with bias.

Fresh parameters (training from scratch; loaded checkpoints replace them): truncated normal with std 0.02 for
CLS, position and type embeddings, normal(0.02) for the text embeddings, normal(sqrt(2 / fan_out)) for the patch
convolution, and truncated normal with std `model.init_std` (0.02, ViT-B/BERT's value, by default) for every
block's qkv, proj, fc1 and fc2 kernels. 0.02 suits width 768; a narrow model gets nearly-identity blocks from it,
and the text [CLS] then leaves the untrained transformer almost the same for every caption, so CMPM stays near its
chance value for a while (configs/demo.py uses 0.08, about 1/sqrt(width); docs/demo.md has the runs).
`model.pos_embed_init='sincos2d'` starts the image position embedding (still learned) from 2-D sine-cosine codes
of the patch grid instead (`sincos2d_pos_embed`): at std 0.02 the position signal is a small fraction of the patch
content, and a model trained from scratch first has to learn where each garment is.

BMM token dropping: a dropped token is excluded as a key in every layer with the same additive -10000 used for
padding. Every kept token (CLS included) then attends to exactly the kept tokens, with the dropped ones
contributing exp(-10000 + s) = 0 (exactly 0 in float32 and bfloat16), so the CLS output equals the output of the
sequence with those tokens removed. model.bmm_tokens = 'remove' (the default) also removes them from the image
sequence when the data promises a static number of drops (data.bmm_drops = 'fixed': exactly floor(ratio * N)
per row): the kept tokens are gathered, in order, into a sequence of N - floor(ratio * N) that the blocks run on,
so the dropped tokens cost nothing (`remove_dropped`; a row that keeps fewer keeps its extra drops masked). With
the reference's random count (data.bmm_drops = 'uniform', U{0..floor(ratio * N)}) no row is sure to drop
anything, and the masked path runs. 'mask' keeps the masked path always (the parity tests compare the two).
Texts keep the masked path: their keep masks count padding, as the reference's, and the text buckets cut
padding, so the number of kept text positions is not static. tests/test_model.py checks the equivalences.

Randomness at training time (stochastic depth, the text embedding dropout) is drawn per row from
fold_in(key, row), row = the pair's index in the whole batch (`rows`, default 0..B-1), so a chunk of the batch
run on its own (train.contrastive_chunk, ivt_jax.training.chunked) draws exactly what the whole batch draws.
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
from ivt_jax.models import dense as dense_lib
from ivt_jax.models import packing as packing_lib

MASK_VALUE = -10000.0  # the reference's additive mask, not -inf.
_trunc_normal = nn.initializers.truncated_normal(stddev=0.02)
POS_EMBED_INITS = ('trunc_normal', 'sincos2d')
PATCH_EMBEDS = ('auto', 'conv', 'matmul')
BMM_DROPS = ('uniform', 'fixed')
BMM_TOKENS = ('remove', 'mask')


def sincos2d_pos_embed(grid: tuple[int, int], width: int, temperature: float = 10_000.0) -> np.ndarray:
  """(1, 1 + rows * cols, width) fixed 2-D sine-cosine position codes; row 0 (the CLS token) is zero.

  Per patch at (row r, col c), width / 4 frequencies w_k = temperature^(-k / (width / 4 - 1)):
  [sin(c w), cos(c w), sin(r w), cos(r w)], patches row-major as the patch convolution flattens them.
  """
  if width % 4:
    raise ValueError(f'sincos2d position embeddings need model.width divisible by 4, got {width}')
  rows, cols = grid
  quarter = width // 4
  omega = 1.0 / temperature ** (np.arange(quarter) / max(quarter - 1, 1))
  r, c = np.meshgrid(np.arange(rows), np.arange(cols), indexing='ij')
  r = r.reshape(-1, 1) * omega[None]
  c = c.reshape(-1, 1) * omega[None]
  codes = np.concatenate([np.sin(c), np.cos(c), np.sin(r), np.cos(r)], axis=1)
  return np.concatenate([np.zeros((1, width)), codes], axis=0)[None].astype(np.float32)


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
  """Static description of the encoder; built from `config.model` and `config.data` by `encoder_config`."""
  image_size: tuple[int, int] = (384, 128)
  patch_size: int = 16
  stride: int = 16
  width: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_dim: int = 3072
  vocab_size: int = 30522
  max_text_positions: int = 512
  type_vocab_size: int = 2
  drop_path: float = 0.1
  text_embed_dropout: float = 0.1
  bmm_ratio: float = 0.2
  bmm_drops: str = 'uniform'
  bmm_tokens: str = 'remove'
  ln_eps: float = 1e-6
  text_ln_eps: float = 1e-12
  dtype: str = 'float32'
  attention: str = 'xla'
  remat: bool = False
  init_std: float = 0.02
  pos_embed_init: str = 'trunc_normal'
  patch_embed: str = 'auto'
  dense_grad: str = 'auto'

  @property
  def grid(self) -> tuple[int, int]:
    return shapes.patch_grid(self.image_size, self.patch_size, self.stride)

  @property
  def num_image_tokens(self) -> int:
    return shapes.num_image_tokens(self.image_size, self.patch_size, self.stride)

  @property
  def image_keep_length(self) -> int:
    """Image tokens the blocks run on at training time: fewer than `num_image_tokens` only when tokens are
    removed (`removal_length`)."""
    return removal_length(self.num_image_tokens, self.bmm_ratio, self.bmm_drops, self.bmm_tokens)


def min_drops(length: int, ratio: float, drops: str) -> int:
  """The fewest BMM drops a row of `length` tokens (CLS included) gets: floor(ratio * length) (at most
  length - 1) with 'fixed' drops, 0 with 'uniform' ones."""
  return min(int(ratio * length), length - 1) if drops == 'fixed' else 0


def removal_length(length: int, ratio: float, drops: str, tokens: str) -> int:
  """The static sequence length of the removal path (`remove_dropped`): length - min_drops, or length when the
  masked path runs (tokens='mask' or no guaranteed drop)."""
  return length - min_drops(length, ratio, drops) if tokens == 'remove' else length


def check_bmm(ratio: float, drops: str, tokens: str) -> None:
  """A clear error for a bad data.bmm_ratio, data.bmm_drops or model.bmm_tokens."""
  if not 0.0 <= ratio < 1.0:
    raise ValueError(f'data.bmm_ratio must be in [0, 1), got {ratio}')
  if drops not in BMM_DROPS:
    raise ValueError(f'data.bmm_drops must be one of {BMM_DROPS}, got {drops!r}')
  if tokens not in BMM_TOKENS:
    raise ValueError(f'model.bmm_tokens must be one of {BMM_TOKENS}, got {tokens!r}')


def encoder_config(config: ml_collections.ConfigDict) -> EncoderConfig:
  """The one place where the experiment config becomes the encoder's static config."""
  m = config.model
  if m.width % m.num_heads:
    raise ValueError(f'model.width ({m.width}) must be divisible by model.num_heads ({m.num_heads})')
  if m.dtype not in ('float32', 'bfloat16'):
    raise ValueError(f"model.dtype must be 'float32' or 'bfloat16', got {m.dtype!r}")
  if not m.init_std > 0:
    raise ValueError(f'model.init_std must be positive, got {m.init_std}')
  if m.pos_embed_init not in POS_EMBED_INITS:
    raise ValueError(f'model.pos_embed_init must be one of {POS_EMBED_INITS}, got {m.pos_embed_init!r}')
  if m.attention not in ('xla', 'cudnn', 'auto'):
    raise ValueError(f"model.attention must be 'xla', 'cudnn' or 'auto', got {m.attention!r}")
  patch_embed = m.get('patch_embed', 'auto')
  if patch_embed not in PATCH_EMBEDS:
    raise ValueError(f'model.patch_embed must be one of {PATCH_EMBEDS}, got {patch_embed!r}')
  dense_grad = m.get('dense_grad', 'auto')
  if dense_grad not in dense_lib.GRADS:
    raise ValueError(f'model.dense_grad must be one of {dense_lib.GRADS}, got {dense_grad!r}')
  if config.data.text_length > m.max_text_positions:
    raise ValueError(f'data.text_length ({config.data.text_length}) exceeds model.max_text_positions '
                     f'({m.max_text_positions})')
  bmm_drops, bmm_tokens = bmm_settings(config)
  check_bmm(config.data.bmm_ratio, bmm_drops, bmm_tokens)
  return EncoderConfig(
      image_size=tuple(config.data.image_size), patch_size=m.patch_size, stride=m.stride, width=m.width,
      depth=m.depth, num_heads=m.num_heads, mlp_dim=m.mlp_dim, vocab_size=m.vocab_size,
      max_text_positions=m.max_text_positions, type_vocab_size=m.type_vocab_size, drop_path=m.drop_path,
      text_embed_dropout=m.text_embed_dropout, bmm_ratio=config.data.bmm_ratio, bmm_drops=bmm_drops,
      bmm_tokens=bmm_tokens, ln_eps=m.ln_eps,
      text_ln_eps=m.text_ln_eps, dtype=m.dtype, attention=m.attention, remat=m.remat, init_std=m.init_std,
      pos_embed_init=m.pos_embed_init, patch_embed=patch_embed, dense_grad=dense_grad)


def bmm_settings(config: ml_collections.ConfigDict) -> tuple[str, str]:
  """(data.bmm_drops, model.bmm_tokens), with their defaults for configs that predate them."""
  return str(config.data.get('bmm_drops', 'uniform')), str(config.model.get('bmm_tokens', 'remove'))


def for_platform(config: ml_collections.ConfigDict, platform: str) -> ml_collections.ConfigDict:
  """A copy of `config` with every backend-dependent choice ('auto') made for `platform` ('cpu', 'tpu', 'cuda',
  'gpu'), not for the host: what a program compiled here for another backend must use to be the program that
  backend runs. Today that is model.patch_embed (matmul on CPU, conv elsewhere) and model.dense_grad (the
  row-contracting backward on CPU, JAX's own elsewhere: ivt_jax.models.dense)."""
  out = ml_collections.ConfigDict(config.to_dict())
  if out.model.get('patch_embed', 'auto') == 'auto':
    out.model.patch_embed = 'matmul' if platform == 'cpu' else 'conv'
  if out.model.get('dense_grad', 'auto') == 'auto':
    out.model.dense_grad = dense_lib.resolve('auto', 'cpu' if platform == 'cpu' else 'other')
  return out


def normalize_images(images_uint8: jax.Array) -> jax.Array:
  """(N, H, W, 3) uint8 -> float32 in [-1, 1]: mean = std = 0.5 per channel, as the reference."""
  return (images_uint8.astype(jnp.float32) / 255.0 - 0.5) / 0.5


def draw_keep_mask(rng: jax.Array, batch: int, length: int, ratio: float, drops: str = 'uniform') -> jax.Array:
  """BMM drop pattern: (batch, length) bool, CLS (position 0) always kept.

  Per row, k of the positions 1..length-1 are dropped, chosen uniformly: k ~ U{0, ..., floor(ratio * length)}
  ('uniform', the reference's) or k = floor(ratio * length) ('fixed'). `length` counts the CLS token and, for
  text, the padding, as the reference does.
  """
  max_drop = min(int(ratio * length), length - 1)
  rk, rp = jax.random.split(rng)
  if drops == 'fixed':
    k = jnp.full((batch, 1), max_drop)
  else:
    k = jax.random.randint(rk, (batch, 1), 0, max_drop + 1)
  scores = jax.random.uniform(rp, (batch, length - 1))
  rank = jnp.argsort(jnp.argsort(scores, axis=-1), axis=-1)  # a uniform random permutation rank per row
  keep_rest = rank >= k
  return jnp.concatenate([jnp.ones((batch, 1), bool), keep_rest], axis=1)


def remove_dropped(x: jax.Array, valid: jax.Array, keep: jax.Array, length: int) -> tuple[jax.Array, jax.Array]:
  """The removal path of BMM: x (B, N, D) tokens, valid (B, N) attended keys, keep (B, N) the BMM keep mask ->
  (B, length, D) tokens and (B, length) keys: each row's kept tokens first, in their order (CLS first), then its
  dropped ones (still masked as keys) up to `length`. Exact for every row that keeps at most `length` tokens
  (`kept_overflow` finds the others)."""
  order = jnp.argsort(~keep, axis=1, stable=True)[:, :length]  # kept positions first, each group in order
  x = jnp.take_along_axis(x, order[..., None], axis=1)
  return x, jnp.take_along_axis(valid & keep, order, axis=1)


def kept_overflow(keep: jax.Array, length: int) -> jax.Array:
  """() bool: some row of keep (..., N) keeps more than `length` tokens (the removal path would lose some)."""
  return jnp.any(jnp.sum(keep, axis=-1) > length)


def row_bernoulli(key: jax.Array, p: float, rows: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """(len(rows),) + shape bool, True with probability p, row r drawn from fold_in(key, rows[r]): the same for a
  row whichever batch or chunk it is computed in."""
  return jax.vmap(lambda r: jax.random.bernoulli(jax.random.fold_in(key, r), p, shape))(rows)


def batch_rows(rows, batch: int) -> jax.Array:
  """The rows' indices in the whole batch: `rows` as given, or 0..batch-1."""
  if rows is None:
    return jnp.arange(batch, dtype=jnp.int32)
  if rows.shape != (batch,):
    raise ValueError(f'rows has shape {rows.shape}, expected {(batch,)}')
  return rows


def keep_mask(module: nn.Module, keep, batch: int, length: int, train: bool, ratio: float) -> jax.Array:
  """The BMM keep mask a model applies: the given one at training time (position 0 always kept), one drawn from
  `module`'s 'bmm' rng if none, all-ones at eval or with ratio 0. -> (batch, length) bool."""
  if not train:
    return jnp.ones((batch, length), bool)
  if keep is None:
    if ratio == 0.0:
      return jnp.ones((batch, length), bool)
    keep = draw_keep_mask(module.make_rng('bmm'), batch, length, ratio)
  if keep.shape != (batch, length):
    raise ValueError(f'keep mask has shape {keep.shape}, expected {(batch, length)}')
  return jnp.asarray(keep, bool).at[:, 0].set(True)


class Mlp(nn.Module):
  """fc1 -> exact GELU -> fc2; kernels truncated-normal(init_std); dense_grad: see ivt_jax.models.dense."""
  hidden: int
  dtype: Any = jnp.float32
  init_std: float = 0.02
  dense_grad: str = 'auto'

  @nn.compact
  def __call__(self, x):
    width = x.shape[-1]
    init = nn.initializers.truncated_normal(stddev=self.init_std)
    x = dense_lib.Dense(self.hidden, self.dtype, init, self.dense_grad, name='fc1')(x)
    x = nn.gelu(x, approximate=False)
    return dense_lib.Dense(width, self.dtype, init, self.dense_grad, name='fc2')(x)


def image_patches(images: jax.Array, patch_size: int, stride: int) -> jax.Array:
  """(B, H, W, C) -> (B, rows, cols, K * K * C): every K x K patch every `stride` pixels (no padding), flattened
  (kh, kw, c) as an HWIO kernel reshaped to (K * K * C, D) - the patch convolution as one matrix product."""
  b, hh, ww, ch = images.shape
  k, s = patch_size, stride
  rows, cols = shapes.patch_grid((hh, ww), k, s)
  if s == k:  # non-overlapping: a reshape
    x = images[:, :rows * k, :cols * k].reshape(b, rows, k, cols, k, ch)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, rows, cols, k * k * ch)
  x = jnp.stack([images[:, r * s:r * s + k] for r in range(rows)], axis=1)  # (B, rows, K, W, C)
  x = jnp.stack([x[:, :, :, c * s:c * s + k] for c in range(cols)], axis=2)  # (B, rows, cols, K, K, C)
  return x.reshape(b, rows, cols, k * k * ch)


class PatchEmbed(nn.Module):
  """The patch convolution (parameters `kernel` (K, K, C, D) and `bias` (D,), as nn.Conv names them).

  implementation: 'conv' (lax.conv_general_dilated), 'matmul' (`image_patches` then one matrix product: the same
  function; on a CPU, where XLA's convolution with a 16x16 kernel is slow, the demo's patch forward takes 36 ms of
  op time instead of 38 and the step's patch work about 40 ms instead of 54), or 'auto' (matmul on CPU, conv on
  GPU and TPU).
  """
  features: int
  patch_size: int
  stride: int
  dtype: Any = jnp.float32
  implementation: str = 'auto'

  @nn.compact
  def __call__(self, images):
    """(B, H, W, C) -> (B, rows, cols, D)."""
    k, ch = self.patch_size, images.shape[-1]
    fan_out = k * k * self.features
    kernel = self.param('kernel', nn.initializers.normal(np.sqrt(2.0 / fan_out)), (k, k, ch, self.features),
                        jnp.float32)
    bias = self.param('bias', nn.initializers.zeros_init(), (self.features,), jnp.float32)
    images, kernel, bias = nn.dtypes.promote_dtype(images, kernel, bias, dtype=self.dtype)
    impl = self.implementation
    if impl == 'auto':
      impl = 'matmul' if jax.default_backend() == 'cpu' else 'conv'
    if impl == 'conv':
      y = jax.lax.conv_general_dilated(images, kernel, (self.stride, self.stride), 'VALID',
                                       dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    else:
      y = image_patches(images, k, self.stride) @ kernel.reshape(k * k * ch, self.features)
    return y + bias


class QKV(nn.Module):
  """The q|k|v projection (parameters `kernel` (D, 3D) and `bias` (3D,), as nn.Dense(3D) names them).

  With `cls_only`, the query is projected for the first token alone (the keys and values for every token):
  what a block needs when only its CLS output is used.
  """
  features: int
  dtype: Any = jnp.float32
  init_std: float = 0.02
  dense_grad: str = 'auto'

  @nn.compact
  def __call__(self, x, cls_only: bool = False):
    """x: (B, N, D) -> q (B, N or 1, D), k (B, N, D), v (B, N, D)."""
    init = nn.initializers.truncated_normal(stddev=self.init_std)
    kernel = self.param('kernel', init, (x.shape[-1], 3 * self.features), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros_init(), (3 * self.features,), jnp.float32)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    d = self.features
    proj = lambda t, w, b: dense_lib.apply(t, w, b, self.dense_grad)
    if not cls_only:
      q, k, v = jnp.split(proj(x, kernel, bias), 3, axis=-1)
      return q, k, v
    q = proj(x[:, :1], kernel[:, :d], bias[:d])
    k, v = jnp.split(proj(x, kernel[:, d:], bias[d:]), 2, axis=-1)
    return q, k, v


class Attention(nn.Module):
  """Multi-head self-attention with one qkv projection laid out q|k|v and an additive key bias."""
  num_heads: int
  dtype: Any = jnp.float32
  implementation: str = 'xla'
  init_std: float = 0.02
  dense_grad: str = 'auto'

  @nn.compact
  def __call__(self, x, key_bias, cls_only: bool = False, packing=None, window: int = 0):
    """x: (B, N, D); key_bias: (B, N) float32, 0 for attended keys and -10000 for masked ones.

    -> (B, N, D), or (B, 1, D) with `cls_only`: the CLS query alone (every token still a key and value).
    packing (a `packing.Packing`; key_bias None): x holds packed texts, each token attending to its own text's
    (`packing.windowed_attention` with windows of `window` slots).
    """
    b, _, d = x.shape
    h = self.num_heads
    init = nn.initializers.truncated_normal(stddev=self.init_std)
    q, k, v = QKV(d, self.dtype, self.init_std, self.dense_grad, name='qkv')(x, cls_only)
    proj = dense_lib.Dense(d, self.dtype, init, self.dense_grad, name='proj')
    heads = lambda t: t.reshape(t.shape[0], t.shape[1], h, d // h)  # (B, T, H, Dh)
    q, k, v = heads(q), heads(k), heads(v)
    impl = None if self.implementation == 'auto' else self.implementation
    if packing is not None:
      out = packing_lib.windowed_attention(q, k, v, packing.segment, window, MASK_VALUE, impl)
      return proj(out.reshape(b, -1, d))
    bias = key_bias[:, None, None, :]  # (B, 1, 1, N)
    if self.is_mutable_collection('intermediates'):
      # Explicit path that exposes the attention probabilities (attention maps).
      logits = jnp.einsum('bqhd,bkhd->bhqk', q, k, preferred_element_type=jnp.float32) * (d // h) ** -0.5
      probs = jax.nn.softmax(logits + bias, axis=-1)
      self.sow('intermediates', 'attention', probs)
      out = jnp.einsum('bhqk,bkhd->bqhd', probs.astype(v.dtype), v)
    else:
      out = jax.nn.dot_product_attention(q, k, v, bias=bias.astype(q.dtype), implementation=impl)
    return proj(out.reshape(b, q.shape[1], d))


class Block(nn.Module):
  """Pre-norm block: shared norm1/attn/norm2, the MLP chosen by modality; stochastic depth on both branches."""
  num_heads: int
  mlp_dim: int
  drop_path: float
  ln_eps: float
  dtype: Any = jnp.float32
  implementation: str = 'xla'
  init_std: float = 0.02
  dense_grad: str = 'auto'

  def _drop_path(self, y, deterministic, rows, packing=None):
    if deterministic or self.drop_path == 0.0:
      return y
    keep = 1.0 - self.drop_path
    if packing is None:
      mask = row_bernoulli(self.make_rng('dropout'), keep, batch_rows(rows, y.shape[0]), (1,) * (y.ndim - 1))
    else:  # rows (G, n) per packed text: each slot takes its text's draw
      draws = row_bernoulli(self.make_rng('dropout'), keep, rows.reshape(-1), (1, 1)).reshape(rows.shape)
      mask = packing_lib.per_slot(draws, packing)[..., None]
    return jnp.where(mask, y / keep, 0).astype(y.dtype)

  @nn.compact
  def __call__(self, x, key_bias, modality: str, deterministic: bool, cls_only: bool = False, rows=None,
               packing=None, window: int = 0):
    """x: (B, N, D) -> (B, N, D); with `cls_only` -> (B, 1, D), the CLS output alone (the same numbers).
    rows: (B,) the rows' indices in the whole batch (`batch_rows`), keying stochastic depth. packing: x is
    (G, S, D) packed texts (`packing.Packing`, key_bias None, rows (G, n) per text, windows of `window`)."""
    norm = lambda name: nn.LayerNorm(epsilon=self.ln_eps, dtype=self.dtype, name=name)
    attn = Attention(self.num_heads, self.dtype, self.implementation, self.init_std, self.dense_grad, name='attn')
    y = attn(norm('norm1')(x), key_bias, cls_only, packing, window)
    x = (x[:, :1] if cls_only else x) + self._drop_path(y, deterministic, rows, packing)
    y = norm('norm2')(x)
    # Both MLPs exist in every block; only the modality's one runs.
    mlp_vis = Mlp(self.mlp_dim, self.dtype, self.init_std, self.dense_grad, name='mlp_vis')
    mlp_txt = Mlp(self.mlp_dim, self.dtype, self.init_std, self.dense_grad, name='mlp_txt')
    if self.is_initializing():
      _ = mlp_txt(y) if modality == 'image' else mlp_vis(y)
    y = mlp_vis(y) if modality == 'image' else mlp_txt(y)
    return x + self._drop_path(y, deterministic, rows, packing)


class TextEmbeddings(nn.Module):
  """BERT embeddings: word + position + token type 0, LayerNorm(eps 1e-12), dropout (drawn per row, see
  `row_bernoulli`)."""
  vocab_size: int
  max_positions: int
  type_vocab_size: int
  width: int
  ln_eps: float
  dropout: float
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, ids, deterministic: bool, rows=None):
    """ids: (B, L) int32 -> (B, L, D); rows: (B,) the rows' indices in the whole batch (`batch_rows`)."""
    init = nn.initializers.normal(0.02)
    word = nn.Embed(self.vocab_size, self.width, embedding_init=init, name='word_embeddings')(ids)
    pos = nn.Embed(self.max_positions, self.width, embedding_init=init, name='position_embeddings')(
        jnp.arange(ids.shape[1])[None])
    typ = nn.Embed(self.type_vocab_size, self.width, embedding_init=init, name='token_type_embeddings')(
        jnp.zeros_like(ids))
    x = nn.LayerNorm(epsilon=self.ln_eps, dtype=self.dtype, name='LayerNorm')(word + typ + pos)
    if deterministic or self.dropout == 0.0:
      return x
    keep = 1.0 - self.dropout
    mask = row_bernoulli(self.make_rng('dropout'), keep, batch_rows(rows, ids.shape[0]), x.shape[1:])
    return jnp.where(mask, x / keep, 0).astype(x.dtype)


class Encoder(nn.Module):
  """The shared image/text transformer. Entry points: `embed_images`, `embed_texts` (and the token versions).

  Rngs at training time: 'dropout' (stochastic depth, text embedding dropout) and, only when no keep mask is
  given, 'bmm' (the token-drop pattern).
  """
  cfg: EncoderConfig

  def setup(self):
    c = self.cfg
    dtype = jnp.dtype(c.dtype)
    n_img = c.num_image_tokens
    self.patch_embed = PatchEmbed(c.width, c.patch_size, c.stride, dtype, c.patch_embed, name='patch_embed')
    self.cls_token = self.param('cls_token', _trunc_normal, (1, 1, c.width))
    if c.pos_embed_init == 'sincos2d':  # learned, starting from the fixed 2-D codes
      pos_init = lambda rng, shape: jnp.asarray(sincos2d_pos_embed(c.grid, c.width).reshape(shape))
    else:
      pos_init = _trunc_normal
    self.pos_embed = self.param('pos_embed', pos_init, (1, n_img, c.width))
    self.type_embed = self.param('type_embed', _trunc_normal, (1, n_img, c.width))
    self.embeddings = TextEmbeddings(c.vocab_size, c.max_text_positions, c.type_vocab_size, c.width,
                                     c.text_ln_eps, c.text_embed_dropout, dtype)
    # static: modality, deterministic, cls_only, window
    block = nn.remat(Block, static_argnums=(3, 4, 5, 8)) if c.remat else Block
    rates = np.linspace(0.0, c.drop_path, c.depth)
    self.blocks = [block(c.num_heads, c.mlp_dim, float(rates[i]), c.ln_eps, dtype, c.attention, c.init_std,
                         c.dense_grad) for i in range(c.depth)]
    self.norm = nn.LayerNorm(epsilon=c.ln_eps, dtype=dtype)

  def _keep(self, keep, batch, length, train):
    return keep_mask(self, keep, batch, length, train, self.cfg.bmm_ratio)

  def _transformer(self, x, valid, modality, train, cls_only: bool = False, rows=None):
    """x: (B, N, D) embedded tokens; valid: (B, N) bool keys -> (B, N, D) after the final LayerNorm.

    cls_only: -> (B, 1, D), the CLS output alone: the last block projects only the CLS query and runs its
    MLP and the final LayerNorm on the CLS token (the other tokens' last outputs are never used by an
    embedding; in a 2-block model that is about a third of the block work).
    """
    key_bias = jnp.where(valid, 0.0, MASK_VALUE).astype(jnp.float32)
    last = len(self.blocks) - 1
    for i, blk in enumerate(self.blocks):
      x = blk(x, key_bias, modality, not train, cls_only and i == last, rows, None, 0)  # all positional: remat
    return self.norm(x)

  def image_tokens(self, images, keep=None, train: bool = False, cls_only: bool = False, rows=None):
    """images: (B, H, W, 3) float, normalized (see `normalize_images`) -> (B, 1 + patches, D), or (B, 1, D)
    with `cls_only` (then, at training time, the dropped tokens removed when `image_keep_length` says so)."""
    c = self.cfg
    if images.shape[1:3] != tuple(c.image_size):
      raise ValueError(f'images are {images.shape[1:3]}, the model expects data.image_size {c.image_size}')
    b = images.shape[0]
    x = self.patch_embed(images.astype(jnp.dtype(c.dtype)))
    x = x.reshape(b, -1, c.width)  # row-major over the (rows, cols) grid
    x = jnp.concatenate([jnp.broadcast_to(self.cls_token, (b, 1, c.width)).astype(x.dtype), x], axis=1)
    x = x + self.pos_embed + self.type_embed
    valid = self._keep(keep, b, x.shape[1], train)
    if train and cls_only and c.image_keep_length < x.shape[1]:
      x, valid = remove_dropped(x, jnp.ones_like(valid), valid, c.image_keep_length)
    return self._transformer(x, valid, 'image', train, cls_only, rows)

  def text_tokens(self, ids, mask, keep=None, train: bool = False, cls_only: bool = False, rows=None):
    """ids, mask: (B, L) int -> (B, L, D), or (B, 1, D) with `cls_only`. mask is 1 for real tokens (incl.
    [CLS]/[SEP]) and 0 for padding."""
    b, n = ids.shape
    if n > self.cfg.max_text_positions:
      raise ValueError(f'text length {n} exceeds model.max_text_positions {self.cfg.max_text_positions}')
    x = self.embeddings(ids, deterministic=not train, rows=rows)
    valid = jnp.logical_and(mask.astype(bool), self._keep(keep, b, n, train))
    return self._transformer(x, valid, 'text', train, cls_only, rows)

  def packed_text_tokens(self, ids, mask, keep=None, rows=None, *, groups: int, slots: int):
    """Training-time texts packed (`ivt_jax.models.packing`): ids, mask, keep (B, L) with B = groups x n (each
    group one contiguous share of the batch) -> (B, 1, D) the CLS outputs: the same numbers as
    `text_tokens(..., train=True, cls_only=True)` for every group whose tokens fit in `slots` (a group with more
    loses its last tokens: `packing.group_tokens` tells); position 0 ([CLS]) always attends."""
    b, n = ids.shape
    if b % groups or slots % n:
      raise ValueError(f'packing {b} texts of {n} positions: groups {groups} must divide the texts and the '
                       f'slots {slots} be a multiple of {n}')
    x = self.embeddings(ids, deterministic=False, rows=rows)
    valid = jnp.logical_and(mask.astype(bool), self._keep(keep, b, n, True)).at[:, 0].set(True)
    t = b // groups
    packing = packing_lib.pack(valid.reshape(groups, t, n), slots)
    x = packing_lib.gather_slots(x.reshape(groups, t, n, -1), packing)
    text_rows = batch_rows(rows, b)
    for blk in self.blocks[:-1]:
      x = blk(x, None, 'text', False, False, text_rows.reshape(groups, t), packing, n)
    x, own = packing_lib.text_windows(x, packing, n)
    key_bias = jnp.where(own, 0.0, MASK_VALUE).astype(jnp.float32)
    x = self.blocks[-1](x, key_bias, 'text', False, True, text_rows, None, 0)
    return self.norm(x)

  def embed_texts_packed(self, ids, mask, keep=None, rows=None, *, groups: int, slots: int):
    """(B, L) ids, mask, keep -> (B, D) CLS embeddings (float32): `packed_text_tokens`."""
    return self.packed_text_tokens(ids, mask, keep, rows, groups=groups, slots=slots)[:, 0].astype(jnp.float32)

  def embed_images(self, images, keep=None, train: bool = False, rows=None):
    """(B, H, W, 3) normalized float -> (B, D) CLS embedding (float32). rows: see `batch_rows`."""
    return self.image_tokens(images, keep, train, cls_only=True, rows=rows)[:, 0].astype(jnp.float32)

  def embed_texts(self, ids, mask, keep=None, train: bool = False, rows=None):
    """(B, L) ids and mask -> (B, D) CLS embedding (float32). rows: see `batch_rows`."""
    return self.text_tokens(ids, mask, keep, train, cls_only=True, rows=rows)[:, 0].astype(jnp.float32)

  def __call__(self, images, ids, mask, train: bool = False):
    """Both modalities (used to initialize every parameter): -> ((B, D), (B, D))."""
    return self.embed_images(images, train=train), self.embed_texts(ids, mask, train=train)


def init_module_params(module: nn.Module, rng: jax.Array):
  """Fresh float32 parameters of a model whose __call__(images, ids, mask) runs both modalities."""
  h, w = module.cfg.image_size
  images = jnp.zeros((1, h, w, 3), jnp.float32)
  ids = jnp.zeros((1, 8), jnp.int32)
  return module.init({'params': rng}, images, ids, jnp.ones_like(ids))['params']


def init_params(cfg: EncoderConfig, rng: jax.Array):
  """Fresh float32 parameters of the encoder (no data needed)."""
  return init_module_params(Encoder(cfg), rng)


def count_params(params) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(params)))
