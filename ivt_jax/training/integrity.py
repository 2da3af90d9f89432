"""Checksums of array trees, to tell a checkpoint that restores from one that restores what was saved.

Orbax's array format detects a file cut short, but not bytes changed inside its data (a bit flipped on a disk
or in a copy). `tree_digest` computes, per leaf, a 64-bit checksum of the leaf's bits on the devices where the
arrays live: the bits are read as unsigned integers and summed with odd position weights, modulo 2^32, with two
different sets of weights. Integer sums do not depend on the order of the additions, so the digest is the same
for any sharding, device count or process count (a run may resume on another mesh), and any single flipped
bit changes it (an odd weight times a power of two is never 0 modulo 2^32).
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

_W1 = (0x9E3779B1, 0x7F4A7C15)  # weight_i = (i * a + b) | 1 (uint32 arithmetic)
_W2 = (0x85EBCA6B, 0x2545F491)


def _bits(x: jax.Array) -> jax.Array:
  """Any array -> its bits as uint32 (one value per element; 8- and 16-bit types widened)."""
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  size = jnp.dtype(x.dtype).itemsize
  if size == 4:
    return jax.lax.bitcast_convert_type(x, jnp.uint32)
  if size in (1, 2):
    unsigned = {1: jnp.uint8, 2: jnp.uint16}[size]
    return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)
  raise TypeError(f'no checksum for dtype {x.dtype}')


def _leaf_sums(x: jax.Array) -> jax.Array:
  u = _bits(x).reshape(-1)
  i = jax.lax.iota(jnp.uint32, u.shape[0])
  w1 = (i * jnp.uint32(_W1[0]) + jnp.uint32(_W1[1])) | jnp.uint32(1)
  w2 = (i * jnp.uint32(_W2[0]) + jnp.uint32(_W2[1])) | jnp.uint32(1)
  return jnp.stack([jnp.sum(u * w1, dtype=jnp.uint32), jnp.sum(u * w2, dtype=jnp.uint32)])


@jax.jit
def _sums(leaves):
  return jnp.stack([_leaf_sums(x) for x in leaves])  # (leaves, 2): fetched in one transfer


def tree_digest(tree: Any) -> dict[str, str]:
  """{leaf path (jax keystr): 16 hex digits} of a tree of arrays (jax, sharded or not, or numpy).

  Every process calls it with its global arrays (it runs one jitted reduction) and gets the same digest.
  """
  paths_leaves = jax.tree_util.tree_leaves_with_path(tree)
  if not paths_leaves:
    return {}
  sums = np.asarray(_sums([x for _, x in paths_leaves]).addressable_data(0))
  return {jax.tree_util.keystr(path): f'{int(s[0]):08x}{int(s[1]):08x}' for (path, _), s in zip(paths_leaves, sums)}


def changed(saved: dict[str, str], tree: Any) -> list[str]:
  """The leaf paths of `tree` whose digest differs from `saved` (a leaf added or missing counts)."""
  now = tree_digest(tree)
  return sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
