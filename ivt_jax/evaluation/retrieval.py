"""Text-to-image top-k over a gallery sharded across the devices, in bounded memory.

  scores, indices = topk(text_emb (Q, D), image_emb (G, D), k, mesh)

The gallery is cut into equal contiguous shards, one per device of the mesh (all its axes flattened, the tail
padded). Every device ranks its shard against the queries, `query_chunk` queries at a time, walking the shard
`gallery_chunk` rows at a time with a running top-k; the per-device lists are then gathered and merged with a
last top-k. Memory per device: its gallery shard (G / devices rows), the (replicated) queries, one
(query_chunk, gallery_chunk) float32 score block and O(Q k) results; the (Q, G) score matrix never exists.

Scores are dot products accumulated in float32 (cosine similarities for L2-normalized embeddings), computed in
the embeddings' dtype (bfloat16 embeddings halve the gallery's memory). Ties are broken by the lower gallery
index, the order `np.argsort(-s, kind='stable')` and `ivt_jax.evaluation.metrics` use: `jax.lax.top_k` puts the
lower-position element first among equals, and every merge concatenates lists in gallery-index order.
"""
import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P


def _pad_rows(n: int, multiple: int) -> int:
  return -(-max(n, 1) // multiple) * multiple


def _place_rows(x, rows: int, sharding: NamedSharding) -> jax.Array:
  """(n, D) numpy or jax array -> a (rows, D) global array with zero rows appended, placed by `sharding`.

  Numpy input is read per shard (every process must hold the same full array), so no device ever holds more
  than its shard.
  """
  if isinstance(x, jax.Array):
    pad = rows - x.shape[0]
    if pad == 0 and x.sharding == sharding:
      return x
    return jax.jit(lambda a: jnp.pad(a, ((0, pad), (0, 0))), out_shardings=sharding)(x)
  x = np.asarray(x)

  def shard(index):
    r, c = index
    start = r.start or 0
    stop = rows if r.stop is None else r.stop
    part = x[start:min(stop, len(x)), c]
    if len(part) < stop - start:
      part = np.concatenate([part, np.zeros((stop - start - len(part),) + part.shape[1:], x.dtype)])
    return part

  return jax.make_array_from_callback((rows, x.shape[1]), sharding, shard)


def _running_topk(q, gallery, offset, *, k: int, gallery_chunk: int, num_valid: int):
  """Top-k of one query chunk over one device's shard.

  q: (c, D); gallery: (S, D) with S a multiple of gallery_chunk; offset: global index of the shard's first row.
  -> scores (c, k) float32, indices (c, k) int32 (global gallery indices).
  """
  c = q.shape[0]
  chunks = gallery.reshape(-1, gallery_chunk, gallery.shape[-1])
  kk = min(k, gallery_chunk)

  def body(carry, xs):
    best_s, best_i = carry
    block, start = xs
    s = jnp.einsum('qd,gd->qg', q, block, preferred_element_type=jnp.float32)
    index = offset + start + jnp.arange(gallery_chunk, dtype=jnp.int32)
    s = jnp.where(index[None, :] < num_valid, s, -jnp.inf)
    top_s, top_p = jax.lax.top_k(s, kk)
    # The running list holds lower gallery indices than this block: ties keep it first.
    merged_s = jnp.concatenate([best_s, top_s], axis=1)
    merged_i = jnp.concatenate([best_i, index[top_p]], axis=1)
    new_s, pos = jax.lax.top_k(merged_s, k)
    return (new_s, jnp.take_along_axis(merged_i, pos, axis=1)), None

  init = (jnp.full((c, k), -jnp.inf, jnp.float32), jnp.full((c, k), -1, jnp.int32))
  starts = jnp.arange(chunks.shape[0], dtype=jnp.int32) * gallery_chunk
  (best_s, best_i), _ = jax.lax.scan(body, init, (chunks, starts))
  return best_s, best_i


def _sharded_topk(queries, gallery, *, k: int, query_chunk: int, gallery_chunk: int, num_valid: int,
                  axes: tuple, shard_rows: int):
  """Inside shard_map: queries (Qp, D) replicated, gallery (shard_rows, D) this device's rows."""
  offset = jax.lax.axis_index(axes).astype(jnp.int32) * shard_rows
  q_chunks = queries.reshape(-1, query_chunk, queries.shape[-1])
  fn = functools.partial(_running_topk, gallery=gallery, offset=offset, k=k, gallery_chunk=gallery_chunk,
                         num_valid=num_valid)
  s, i = jax.lax.map(fn, q_chunks)  # (nq, c, k)
  s = s.reshape(-1, k)
  i = i.reshape(-1, k)
  # Every device's list, in device (= gallery-range) order: (Qp, n_dev * k), then the final top-k.
  all_s = jax.lax.all_gather(s, axes, axis=1, tiled=True)
  all_i = jax.lax.all_gather(i, axes, axis=1, tiled=True)
  top_s, pos = jax.lax.top_k(all_s, k)
  return top_s, jnp.take_along_axis(all_i, pos, axis=1)


@functools.lru_cache(maxsize=16)
def _compiled(mesh, k, query_chunk, gallery_chunk, num_valid, shard_rows):
  axes = tuple(mesh.axis_names)
  fn = functools.partial(_sharded_topk, k=k, query_chunk=query_chunk, gallery_chunk=gallery_chunk,
                         num_valid=num_valid, axes=axes, shard_rows=shard_rows)
  # The outputs are replicated (every device merges the same gathered lists); check_vma cannot infer it.
  mapped = jax.shard_map(fn, mesh=mesh, in_specs=(P(), P(axes)), out_specs=(P(), P()), check_vma=False)
  return jax.jit(mapped)


def _plan(q_n: int, g_n: int, n_dev: int, query_chunk: int, gallery_chunk: int):
  """-> (query_chunk, gallery_chunk, rows per gallery shard, padded query rows), chunks cut to the data."""
  per_device = -(-g_n // n_dev)
  # The fewest chunks of at most gallery_chunk rows, evened out (so that little padding is added).
  chunks = -(-per_device // gallery_chunk)
  gallery_chunk = _pad_rows(-(-per_device // chunks), 8)
  shard_rows = chunks * gallery_chunk
  query_chunk = min(query_chunk, _pad_rows(q_n, 8))
  return query_chunk, gallery_chunk, shard_rows, _pad_rows(q_n, query_chunk)


def memory_analysis(num_queries: int, gallery_size: int, dim: int, k: int = 10, dtype=jnp.float32,
                    mesh: Optional[jax.sharding.Mesh] = None, query_chunk: int = 1024,
                    gallery_chunk: int = 65536):
  """The compiled per-device memory (XLA's CompiledMemoryStats) of `topk` at these sizes; nothing runs."""
  mesh = mesh or default_mesh()
  qc, gc, shard_rows, q_rows = _plan(num_queries, gallery_size, mesh.size, query_chunk, gallery_chunk)
  axes = tuple(mesh.axis_names)
  fn = _compiled(mesh, int(k), qc, gc, int(gallery_size), shard_rows)
  queries = jax.ShapeDtypeStruct((q_rows, dim), dtype, sharding=NamedSharding(mesh, P()))
  gallery = jax.ShapeDtypeStruct((shard_rows * mesh.size, dim), dtype, sharding=NamedSharding(mesh, P(axes)))
  return fn.lower(queries, gallery).compile().memory_analysis()


def default_mesh() -> jax.sharding.Mesh:
  """A 1-D mesh over every device."""
  return jax.make_mesh((jax.device_count(),), ('gallery',), axis_types=(jax.sharding.AxisType.Auto,))


def topk(text_emb, image_emb, k: int = 10, mesh: Optional[jax.sharding.Mesh] = None,
         query_chunk: int = 1024, gallery_chunk: int = 65536) -> tuple[np.ndarray, np.ndarray]:
  """The k best gallery images per text query, best first.

  Args:
    text_emb: (Q, D) query embeddings (numpy or jax; float32 or bfloat16).
    image_emb: (G, D) gallery embeddings, same D; numpy input must be the same in every process.
    k: how many per query, 1 <= k <= G.
    mesh: the devices to shard the gallery over (every axis); default: all devices.
    query_chunk: queries ranked at a time (smaller bounds memory, larger amortizes the loop).
    gallery_chunk: gallery rows scored at a time per device, at most (the shard is cut into equal chunks, a
      multiple of 8 rows each).
  Returns:
    scores (Q, k) float32 and indices (Q, k) int32 into the gallery, sorted by decreasing score, ties by
    increasing index.
  """
  q_n, d = np.shape(text_emb)
  g_n, d_g = np.shape(image_emb)
  if d != d_g:
    raise ValueError(f'text_emb is (Q, D) = {np.shape(text_emb)} but image_emb is {np.shape(image_emb)}: '
                     'the embedding sizes differ')
  if not 1 <= k <= g_n:
    raise ValueError(f'k={k} must be between 1 and the gallery size {g_n}')
  if query_chunk < 1 or gallery_chunk < 1:
    raise ValueError(f'query_chunk ({query_chunk}) and gallery_chunk ({gallery_chunk}) must be positive')
  mesh = mesh or default_mesh()
  query_chunk, gallery_chunk, shard_rows, q_rows = _plan(q_n, g_n, mesh.size, query_chunk, gallery_chunk)
  axes = tuple(mesh.axis_names)
  gallery = _place_rows(image_emb, shard_rows * mesh.size, NamedSharding(mesh, P(axes)))
  queries = _place_rows(text_emb, q_rows, NamedSharding(mesh, P()))
  if queries.dtype != gallery.dtype:
    queries = queries.astype(gallery.dtype)
  fn = _compiled(mesh, int(k), int(query_chunk), int(gallery_chunk), int(g_n), int(shard_rows))
  scores, indices = fn(queries, gallery)
  return np.asarray(scores)[:q_n], np.asarray(indices)[:q_n]
