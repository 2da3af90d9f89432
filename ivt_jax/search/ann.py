"""Approximate search for large galleries, behind the same ranking call as exact search (inner product, which is
the cosine for the unit-length IVT embeddings).

- 'ivf' (the default kind): faiss IVF over 8-bit scalar-quantized codes (nlist about 4 sqrt(N) cells, `nprobe`
  searched), whose candidates (`k_factor` times those asked for) are reranked with the float vectors of the
  index's own (memory-mapped) shards, so that the quantization costs no recall and the approximate index holds
  no second copy of the floats: 1 byte per dimension and an 8-byte row id per image. Built in seconds to
  minutes (k-means on a sample, then one pass over the shards); an update adds the new shards' rows and removes
  the deleted ones without retraining.
- 'hnsw': a faiss HNSW graph (M 32) over the float vectors, slower to build at 768 dimensions and lower in
  recall on text-side queries, faster per query (docs/search.md has both); an update adds the new rows, and a
  deletion rebuilds it (a graph cannot drop nodes).

`for_index(kind)` gives the IndexHolder's builder; `ensure(index, kind)` is the same for the `ann` command: it
loads the approximate index saved in INDEX/ann/<kind>.faiss (with <kind>.json: the shards, rows and deletions
it covers), brings it up to date with the index (new shards added, deleted rows removed) and saves it back
(atomically), or builds it when there is none or the shards were compacted. A page deeper than `max_depth`
results is answered by exact search (the search width never follows a deep offset). Exact search stays the
default: one matrix-vector product over the shards, always right.
"""
from __future__ import annotations

import json
import math
import os
import time
import uuid
from typing import Callable

import numpy as np

KINDS = ('ivf', 'hnsw')
MAX_DEPTH = 1000       # results (offset + k) an approximate search answers; deeper pages go exact
ADD_BLOCK = 1 << 16    # rows added per faiss call
# HNSW
M = 32                 # graph neighbours per node
EF_CONSTRUCTION = 128  # candidates while building
EF_SEARCH = 128        # candidates while searching (at least the number of results asked for)
# IVF
NPROBE = 32            # cells searched
K_FACTOR = 8           # candidates reranked with the float vectors, per result asked for
TRAIN_PER_CELL = 40    # k-means training points per cell
RERANK_QUERIES = 64    # queries reranked together (their candidates gathered once)


def _faiss():
  try:
    import faiss  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ImportError('the approximate index needs faiss: pip install faiss-cpu (in requirements.txt)') from None
  return faiss


class ArrayVectors:
  """An (N, D) matrix seen as an index's vectors (the benchmark's gallery): rows 0..N-1, none deleted."""

  def __init__(self, x):
    self.x = np.ascontiguousarray(x, dtype=np.float32)
    if self.x.ndim != 2 or not len(self.x):
      raise ValueError(f'embeddings must be (N > 0, D), got {self.x.shape}')
    self.dim = int(self.x.shape[1])
    self.deleted = np.zeros((0,), np.int64)

  def __len__(self) -> int:
    return len(self.x)

  def gather(self, rows: np.ndarray) -> np.ndarray:
    return self.x[rows]

  def blocks(self, block_rows: int = ADD_BLOCK):
    for a in range(0, len(self.x), block_rows):
      yield a, self.x[a:a + block_rows]


def cells_for(n: int) -> int:
  """IVF cells for n vectors: about 4 sqrt(n), at most n / TRAIN_PER_CELL (k-means needs points per cell)."""
  return max(1, min(int(4 * math.sqrt(n)), n // TRAIN_PER_CELL))


def _live_blocks(vectors, start: int = 0):
  """(row ids, float32 block) of the live rows from `start` on, in blocks."""
  deleted = np.asarray(vectors.deleted, np.int64)
  for a, blk in vectors.blocks(ADD_BLOCK):
    if a + len(blk) <= start:
      continue
    ids = np.arange(a, a + len(blk), dtype=np.int64)
    keep = ids >= start
    if len(deleted):
      keep &= ~np.isin(ids, deleted)
    if keep.any():
      yield ids[keep], np.ascontiguousarray(blk[keep], np.float32)


class _Faiss:
  """`search(query (D,), n)` -> (rows (n,), scores (n,)) best first; rows of -1 where fewer exist."""
  kind = ''
  max_depth = MAX_DEPTH
  removes = False  # whether deleted rows can be taken out (else a deletion rebuilds)

  def __init__(self, index, vectors, owner=None):
    # `owner`: the object faiss returned, kept alive (a downcast wrapper does not own the C++ index)
    self._index, self.vectors, self._owner = index, vectors, owner

  @property
  def size(self) -> int:
    return int(self._index.ntotal)

  def add(self, vectors, start: int) -> None:
    """Adds the live rows start..len(vectors)-1 (new shards)."""
    self.vectors = vectors
    for ids, x in _live_blocks(vectors, start):
      self._index.add_with_ids(x, ids)

  def search(self, query: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    rows, scores = self.search_batch(np.asarray(query, np.float32)[None], n)
    return rows[0], scores[0]

  def save(self, path: str) -> None:
    """Writes the index to `path` atomically (a temporary file, then a rename)."""
    tmp = f'{path}.tmp-{uuid.uuid4().hex[:8]}'
    try:
      _faiss().write_index(self._index, tmp)
      os.replace(tmp, path)
    finally:
      if os.path.exists(tmp):
        os.remove(tmp)


class IvfIndex(_Faiss):
  """faiss IVF-SQ8 over row ids, reranked with the index's float vectors (see the module docstring)."""
  kind = 'ivf'
  removes = True

  def __init__(self, vectors, nprobe: int = NPROBE, k_factor: int = K_FACTOR, index=None, seed: int = 0):
    faiss = _faiss()
    if index is None:
      n, d = len(vectors), vectors.dim
      nlist = cells_for(n)
      index = faiss.IndexIVFScalarQuantizer(faiss.IndexFlatIP(d), d, nlist, faiss.ScalarQuantizer.QT_8bit,
                                            faiss.METRIC_INNER_PRODUCT)
      want = TRAIN_PER_CELL * nlist * 2
      rows = np.arange(n) if n <= want else np.sort(np.random.default_rng(seed).choice(n, want, replace=False))
      index.train(vectors.gather(rows))
      super().__init__(index, vectors)
      self.add(vectors, 0)
    else:
      super().__init__(faiss.downcast_index(index), vectors, owner=index)
    self.nprobe, self.k_factor = int(nprobe), int(k_factor)

  def remove(self, rows: np.ndarray) -> None:
    if len(rows):
      self._index.remove_ids(np.ascontiguousarray(rows, np.int64))

  def search_batch(self, queries: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(Q, D) -> rows (Q, n) int64, scores (Q, n) float32: IVF candidates, reranked by their float vectors."""
    q = np.ascontiguousarray(queries, np.float32)
    n = int(n)
    self._index.nprobe = max(1, min(self.nprobe, self._index.nlist))
    _, cand = self._index.search(q, max(n, n * self.k_factor))
    rows = np.full((len(q), n), -1, np.int64)
    scores = np.full((len(q), n), -np.inf, np.float32)
    for a in range(0, len(q), RERANK_QUERIES):
      c = cand[a:a + RERANK_QUERIES]
      valid = c >= 0
      uniq, inv = np.unique(c[valid], return_inverse=True)
      if not len(uniq):
        continue
      exact = q[a:a + RERANK_QUERIES] @ self.vectors.gather(uniq).T  # (q, U)
      full = np.full(c.shape, -np.inf, np.float32)
      full[valid] = exact[np.nonzero(valid)[0], inv]
      order = np.lexsort((c, -full), axis=-1)[:, :n]  # per query: score descending, then row
      got_rows = np.take_along_axis(c, order, -1)
      got = np.take_along_axis(full, order, -1)
      ok = np.take_along_axis(valid, order, -1)
      rows[a:a + len(c), :order.shape[1]] = np.where(ok, got_rows, -1)
      scores[a:a + len(c), :order.shape[1]] = np.where(ok, got, -np.inf)
    return rows, scores


class HnswIndex(_Faiss):
  """A faiss HNSW graph over row ids (see the module docstring)."""
  kind = 'hnsw'

  def __init__(self, vectors, m: int = M, ef_construction: int = EF_CONSTRUCTION, ef_search: int = EF_SEARCH,
               index=None):
    faiss = _faiss()
    if index is None:
      graph = faiss.IndexHNSWFlat(vectors.dim, int(m), faiss.METRIC_INNER_PRODUCT)
      graph.hnsw.efConstruction = int(ef_construction)
      index = faiss.IndexIDMap2(graph)
      super().__init__(index, vectors)
      self.add(vectors, 0)
    else:
      super().__init__(faiss.downcast_index(index), vectors, owner=index)
    self._graph = faiss.downcast_index(self._index.index)
    self.ef_search = int(ef_search)

  def search_batch(self, queries: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    self._graph.hnsw.efSearch = max(self.ef_search, int(n))
    scores, rows = self._index.search(np.ascontiguousarray(queries, dtype=np.float32), int(n))
    return rows, scores


_CLASSES = {'ivf': IvfIndex, 'hnsw': HnswIndex}


def _check_kind(kind: str) -> None:
  if kind not in _CLASSES:
    raise ValueError(f'approximate index kind {kind!r}: one of {", ".join(KINDS)}')


def build(vectors, kind: str = 'ivf'):
  """The approximate index of `kind` over an index (or an (N, D) array)."""
  _check_kind(kind)
  return _CLASSES[kind](vectors if hasattr(vectors, 'blocks') else ArrayVectors(vectors))


def load(path: str, kind: str, vectors):
  """A saved index of `kind` (faiss.read_index) over these vectors."""
  _check_kind(kind)
  return _CLASSES[kind](vectors if hasattr(vectors, 'blocks') else ArrayVectors(vectors),
                        index=_faiss().read_index(path))


def saved_paths(directory: str, kind: str) -> tuple[str, str]:
  """(INDEX/ann/<kind>.faiss, its <kind>.json: what it covers)."""
  d = os.path.join(directory, 'ann')
  return os.path.join(d, f'{kind}.faiss'), os.path.join(d, f'{kind}.json')


def ensure(index, kind: str = 'ivf', rebuild: bool = False, log: Callable[[str], None] = lambda _: None):
  """The approximate index of `kind` over `index`, up to date: loaded from INDEX/ann/ and updated (new shards
  added, deleted rows removed) or built, and saved there when it changed (a gs:// index: built in memory)."""
  from input_pipeline import paths  # pylint: disable=g-import-not-at-top
  _check_kind(kind)
  names = [s.name for s in index.shards]
  state = {'kind': kind, 'shards': names, 'rows': len(index), 'deleted': int(len(index.deleted)), 'dim': index.dim}
  if paths.is_remote(index.directory):
    return build(index, kind)
  path, meta_path = saved_paths(index.directory, kind)
  t0 = time.time()
  ann, why = None, 'none saved'
  if not rebuild and os.path.isfile(path) and os.path.isfile(meta_path):
    try:
      with open(meta_path) as f:
        meta = json.load(f)
      if meta.get('kind') != kind or meta.get('dim') != index.dim or meta.get('shards') != names[:len(
          meta.get('shards', []))] or meta.get('rows', 0) > len(index):
        why = 'the index was compacted or rebuilt since'
      elif meta.get('deleted') != state['deleted'] and not _CLASSES[kind].removes:
        why = f'{state["deleted"] - meta.get("deleted", 0)} rows deleted since (a graph cannot drop them)'
      else:
        ann = load(path, kind, index)
        if meta == state:
          log(f'approximate index ({kind}, {ann.size} images) loaded from {path}')
          return ann
        ann.add(index, int(meta['rows']))
        if meta.get('deleted') != state['deleted']:
          ann.remove(index.deleted)
        log(f'approximate index ({kind}) updated to {ann.size} images ({len(index) - meta["rows"]} rows added, '
            f'{state["deleted"] - meta["deleted"]} removed) in {time.time() - t0:.1f}s')
    except (RuntimeError, ValueError, KeyError, OSError) as e:  # a damaged file: rebuild it
      ann, why = None, f'{path} unreadable ({e})'
  if ann is None:
    log(f'building the approximate index ({kind}) over {index.live} images ({why})')
    ann = build(index, kind)
    log(f'approximate index ({kind}) built over {ann.size} images in {time.time() - t0:.1f}s')
  os.makedirs(os.path.dirname(path), exist_ok=True)
  ann.save(path)
  paths.write_text_atomic(meta_path, json.dumps(state))
  log(f'approximate index saved to {path}')
  return ann


def for_index(kind: str = 'ivf', log: Callable[[str], None] = lambda _: None):
  """The IndexHolder's builder: index -> its approximate index (`ensure`)."""
  _check_kind(kind)
  return lambda index: ensure(index, kind, log=log)
