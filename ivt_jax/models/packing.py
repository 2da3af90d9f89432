"""Text packing: the kept tokens of many texts in one flat sequence per batch shard, so that padding and the
BMM-dropped text tokens cost nothing at training time (data.text_packing).

A text's tokens that attend (its mask, its BMM keep mask and its level's length) are gathered, in order, text
after text, into `slots` positions per group (a group: one device's share of the batch, so that packing never
moves a token between devices). Each position remembers its text (`segment`, -1 for the unused tail) and keeps
its own position embedding (the embeddings are made before packing). In every block but the last, a token
attends to the tokens of its own text alone: positions are cut into windows of W = text length, and a query in
window r looks at the keys of windows r-1, r and r+1, which hold the whole of any text it belongs to (a text has
at most W tokens), with the other texts masked by the additive -10000 of the masked path. The last block runs
for the [CLS] queries alone (the embedding uses nothing else): each text's W positions from its start are taken
back into a (texts, W) layout with its own tokens as the only keys, and the ordinary block runs on it. Every
token therefore attends to exactly the keys it attends to in the masked path: packing is exact (equal up to
float rounding; tests/test_packing.py compares embeddings and gradients).

Shapes: G groups, n texts per group, L = W positions per text, S slots per group (a multiple of W).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

NO_TEXT = -1    # the segment of an unused slot
OUTSIDE = -2    # the segment of the padding around the windows (matches nothing)
GRANULES = 16   # slot counts are multiples of max(W, n * W / GRANULES): at most GRANULES programs per length


class Packing(NamedTuple):
  """Where each slot's token comes from. order: (G, S) flat index text * L + position in the group's (n, L)
  texts; segment: (G, S) the slot's text (NO_TEXT past the last token); starts: (G, n) each text's first slot;
  count: (G,) tokens used."""
  order: jax.Array
  segment: jax.Array
  starts: jax.Array
  count: jax.Array


def batch_valid(mask, keep, text_lengths=None, xp=jnp):
  """The MLA batch's (B, V, L) text mask and BMM keep mask -> (B V, L) bool, sample-major: the tokens that
  attend, each level cut to its length (`input_pipeline.shapes.level_text_lengths`; None: all of L), position 0
  ([CLS]) always. xp: numpy on the host (`slots_for`), jax.numpy in the step."""
  b, v, length = mask.shape
  valid = xp.logical_and(mask.astype(bool), keep.astype(bool))
  if text_lengths is not None:
    cut = xp.arange(length)[None, :] < xp.asarray(text_lengths)[:, None]  # (V, L)
    valid = xp.logical_and(valid, cut[None])
  valid = xp.logical_or(valid, (xp.arange(length) == 0)[None, None])
  return valid.reshape(b * v, length)


def group_tokens(valid, groups: int, xp=jnp):
  """(T, L) bool, T = groups x n texts (groups contiguous) -> (groups,) the tokens each group packs."""
  total, length = valid.shape
  if total % groups:
    raise ValueError(f'{total} texts do not split into {groups} groups')
  return xp.sum(valid.reshape(groups, (total // groups) * length), axis=1)


def slot_granule(texts: int, length: int) -> int:
  """The step between slot counts for `texts` texts of `length` positions per group: a multiple of `length`."""
  return length * max(1, math.ceil(texts / GRANULES))


def slots_for(valid: np.ndarray, groups: int) -> int:
  """Host side: the slot count that holds every group's tokens. valid: (T, L) bool, the texts of the whole batch
  (T = groups x n, groups contiguous) -> the smallest multiple of `slot_granule` >= the largest group's tokens,
  at most n x L (every position: nothing can need more)."""
  valid = np.asarray(valid, bool)
  total, length = valid.shape
  need = int(group_tokens(valid, groups, np).max(initial=0))
  n = total // groups
  granule = slot_granule(n, length)
  return min(max(granule, -(-need // granule) * granule), n * length)


def pack(valid: jax.Array, slots: int) -> Packing:
  """valid: (G, n, L) bool, the tokens that attend -> the `Packing` of their kept tokens into `slots` per group.

  A group with more than `slots` tokens loses its last ones (`group_tokens` tells; `slots_for` prevents it)."""
  g, n, length = valid.shape
  flat = valid.reshape(g, n * length)
  order = jnp.argsort(~flat, axis=1, stable=True)[:, :slots].astype(jnp.int32)
  count = jnp.sum(flat, axis=1, dtype=jnp.int32)
  used = jnp.arange(slots, dtype=jnp.int32)[None] < count[:, None]
  segment = jnp.where(used, order // length, NO_TEXT)
  per_text = jnp.sum(valid, axis=2, dtype=jnp.int32)
  starts = jnp.cumsum(per_text, axis=1) - per_text
  return Packing(order, segment, starts, count)


def gather_slots(x: jax.Array, packing: Packing) -> jax.Array:
  """x: (G, n, L, ...) per text and position -> (G, S, ...) per slot."""
  g, n, length = x.shape[:3]
  flat = x.reshape((g, n * length) + x.shape[3:])
  idx = packing.order.reshape(packing.order.shape + (1,) * (x.ndim - 3))
  return jnp.take_along_axis(flat, idx, axis=1)


def per_slot(values: jax.Array, packing: Packing) -> jax.Array:
  """values: (G, n, ...) per text -> (G, S, ...) the value of each slot's text (text 0's for unused slots)."""
  idx = jnp.maximum(packing.segment, 0)
  idx = idx.reshape(idx.shape + (1,) * (values.ndim - 2))
  return jnp.take_along_axis(values, idx, axis=1)


def _windows(t: jax.Array, window: int, fill) -> jax.Array:
  """t: (G, S, ...) -> (G, S / W, 3W, ...): for each window r of W slots, the slots of windows r-1, r, r+1 (the
  outside filled with `fill`)."""
  g, s = t.shape[:2]
  pad = [(0, 0), (window, window)] + [(0, 0)] * (t.ndim - 2)
  blocks = jnp.pad(t, pad, constant_values=fill).reshape((g, s // window + 2, window) + t.shape[2:])
  return jnp.concatenate([blocks[:, :-2], blocks[:, 1:-1], blocks[:, 2:]], axis=2)


def windowed_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment: jax.Array, window: int,
                       mask_value: float, implementation=None) -> jax.Array:
  """Attention within texts over packed slots. q, k, v: (G, S, H, Dh); segment: (G, S) -> (G, S, H, Dh).

  Each query attends to the keys of its own segment among windows r-1, r, r+1 of its window r (exact for
  segments of at most `window` slots); unused slots attend to one another (their outputs are never read)."""
  g, s, h, dh = q.shape
  nb = s // window
  qb = q.reshape(g * nb, window, h, dh)
  kb = _windows(k, window, 0).reshape(g * nb, 3 * window, h, dh)
  vb = _windows(v, window, 0).reshape(g * nb, 3 * window, h, dh)
  seg_q = segment.reshape(g, nb, window)
  seg_k = _windows(segment, window, OUTSIDE)
  bias = jnp.where(seg_q[..., :, None] == seg_k[..., None, :], 0.0, mask_value)  # (G, nb, W, 3W)
  bias = bias.reshape(g * nb, 1, window, 3 * window).astype(q.dtype)
  out = jax.nn.dot_product_attention(qb, kb, vb, bias=bias, implementation=implementation)
  return out.reshape(g, s, h, dh)


def text_windows(x: jax.Array, packing: Packing, length: int) -> tuple[jax.Array, jax.Array]:
  """x: (G, S, D) packed tokens -> ((G n, L, D) each text's L slots from its start, (G n, L) bool: the slot is
  the text's own) - the texts back in a padded layout with their kept tokens first, for the last block."""
  g, s, d = x.shape
  n = packing.starts.shape[1]
  xp = jnp.pad(x, [(0, 0), (0, length), (0, 0)])
  seg = jnp.pad(packing.segment, [(0, 0), (0, length)], constant_values=OUTSIDE)
  idx = (packing.starts[..., None] + jnp.arange(length, dtype=jnp.int32)).reshape(g, n * length)
  windows = jnp.take_along_axis(xp, idx[..., None], axis=1).reshape(g * n, length, d)
  own = jnp.take_along_axis(seg, idx, axis=1).reshape(g, n, length) == jnp.arange(n, dtype=jnp.int32)[None, :, None]
  return windows, own.reshape(g * n, length)
