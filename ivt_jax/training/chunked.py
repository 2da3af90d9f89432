"""The exact full-batch gradient of a contrastive objective with the activation memory of one chunk.

The gradient cache (Gao et al. 2021, "Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup"):
CMPM, SDM, ITC and the ID loss couple every pair of the batch through the embeddings alone, so

  1. embed every chunk of the batch without keeping activations (a `lax.scan` of forwards);
  2. compute the objective on all the embeddings and its gradient with respect to the embeddings (and to the
     parameters it uses directly, such as the ID classifier);
  3. run each chunk's forward again with its backward against those embedding gradients (a `lax.scan` of
     vector-Jacobian products), summing the parameter gradients.

The result is the gradient of the objective over the whole batch, not the mean of per-chunk objectives that
ordinary accumulation gives: equal to the unchunked step's up to the order of float additions, provided the
second forward computes what the first did. The models key their randomness by the pair's row in the whole
batch (`encoder.row_bernoulli`), and the BMM masks come with the batch, so it does. Cost: one more forward
(about a third more compute); memory: one chunk's activations plus the (pairs, D) embeddings and their
gradients.

Chunk j holds the samples j, j + n, j + 2n, ... (n = batch / chunk chunks): with the batch split over the
devices in contiguous blocks, every chunk has the same share of each device's rows, so no chunk moves data
between devices and every device works on every chunk.
"""
from typing import Any, Callable

import jax
import jax.numpy as jnp


def check_chunk(batch: int, chunk: int) -> int:
  """The number of chunks; a clear error when train.contrastive_chunk does not divide the batch."""
  if chunk < 0:
    raise ValueError(f'train.contrastive_chunk must be >= 0 (0 = the whole batch), got {chunk}')
  if chunk == 0 or chunk >= batch:
    return 1
  if batch % chunk:
    raise ValueError(f'train.contrastive_chunk ({chunk}) must divide the global batch of {batch} samples '
                     f'(data.ids_per_batch x data.images_per_id)')
  return batch // chunk


def split(x: jax.Array, chunk: int) -> jax.Array:
  """(B, ...) -> (B / chunk, chunk, ...): chunk j = rows j, j + n, j + 2n, ... (n = B / chunk)."""
  n = x.shape[0] // chunk
  return jnp.moveaxis(x.reshape((chunk, n) + x.shape[1:]), 1, 0)


def merge(x: jax.Array, levels: int) -> jax.Array:
  """Per-chunk pair embeddings (n, chunk * V, D), each chunk sample-major -> (B V, D) in the whole batch's
  sample-major order (the inverse of `split` applied to the pairs)."""
  n, rows, d = x.shape
  chunk = rows // levels
  return jnp.moveaxis(x.reshape(n, chunk, levels, d), 0, 1).reshape(n * rows, d)


def unmerge(x: jax.Array, levels: int, chunk: int) -> jax.Array:
  """(B V, D) -> (n, chunk * V, D): the inverse of `merge`."""
  d = x.shape[-1]
  samples = x.shape[0] // levels
  return split(x.reshape(samples, levels * d), chunk).reshape(samples // chunk, chunk * levels, d)


def value_and_grad(embed: Callable, objective: Callable, params: Any, batch: dict, chunk: int,
                   levels: int) -> tuple[tuple[jax.Array, dict], Any]:
  """((loss, aux), grads) of objective(params, x, z) on the embeddings of the whole batch, one chunk at a time.

  embed(params, chunk_batch, rows) -> (x, z): the (chunk V, D) image and text embeddings of a chunk's pairs,
  sample-major, rows (chunk,) = the chunk's samples' indices in the batch (for the randomness);
  objective(params, x, z) -> (loss, aux) on the (B V, D) embeddings of the whole batch, sample-major.
  batch: (B, ...) arrays; chunk: samples per chunk, dividing B; levels: V, the pairs per sample.
  """
  samples = jax.tree_util.tree_leaves(batch)[0].shape[0]
  chunks = jax.tree_util.tree_map(lambda a: split(a, chunk), batch)
  rows = split(jnp.arange(samples, dtype=jnp.int32), chunk)

  def forward(_, xs):
    return None, embed(params, *xs)

  _, (x, z) = jax.lax.scan(forward, None, (chunks, rows))
  x, z = merge(jax.lax.stop_gradient(x), levels), merge(jax.lax.stop_gradient(z), levels)
  (loss, aux), (grads, gx, gz) = jax.value_and_grad(objective, argnums=(0, 1, 2), has_aux=True)(params, x, z)

  def backward(acc, xs):
    part, r, gx_c, gz_c = xs
    _, vjp = jax.vjp(lambda p: embed(p, part, r), params)
    (g,) = vjp((gx_c, gz_c))
    return jax.tree_util.tree_map(jnp.add, acc, g), None

  grads, _ = jax.lax.scan(backward, grads, (chunks, rows, unmerge(gx, levels, chunk), unmerge(gz, levels, chunk)))
  return (loss, aux), grads
