"""Approximate search for large galleries, behind the same ranking call as exact search (inner product, which is
the cosine for the unit-length IVT embeddings).

- 'ivf' (the default kind): faiss IVF over 8-bit scalar-quantized codes (nlist about 4 sqrt(N) cells, `nprobe`
  searched), whose candidates (`k_factor` times those asked for) are reranked with the float vectors, so that the
  quantization costs no recall. Built in seconds to minutes (k-means on a sample, then one pass), 1 byte per
  dimension for the codes beside the float vectors.
- 'hnsw': a faiss HNSW graph (M 32), slower to build at 768 dimensions and lower in recall per millisecond on
  text-side queries (docs/search.md has both).

`for_index(kind)` gives the IndexHolder's builder: it loads the approximate index saved beside the index's
embeddings file (ann-<kind>-<embeddings file>.faiss), else builds it and saves it there (atomically), so a
server restart or a reload of an unchanged index does not rebuild. A page deeper than `max_depth` results is
answered by exact search (the search width never follows a deep offset). Exact search stays the default: one
matrix-vector product, always right.
"""
from __future__ import annotations

import math
import os
import uuid
from typing import Callable

import numpy as np

KINDS = ('ivf', 'hnsw')
MAX_DEPTH = 1000       # results (offset + k) an approximate search answers; deeper pages go exact
# HNSW
M = 32                 # graph neighbours per node
EF_CONSTRUCTION = 128  # candidates while building
EF_SEARCH = 128        # candidates while searching (at least the number of results asked for)
# IVF
NPROBE = 32            # cells searched
K_FACTOR = 8           # candidates reranked with the float vectors, per result asked for
TRAIN_PER_CELL = 40    # k-means training points per cell


def _faiss():
  try:
    import faiss  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ImportError('the approximate index needs faiss: pip install faiss-cpu (in requirements.txt)') from None
  return faiss


def _vectors(embeddings) -> np.ndarray:
  x = np.ascontiguousarray(embeddings, dtype=np.float32)
  if x.ndim != 2 or not len(x):
    raise ValueError(f'embeddings must be (N > 0, D), got {x.shape}')
  return x


def cells_for(n: int) -> int:
  """IVF cells for n vectors: about 4 sqrt(n), at most n / TRAIN_PER_CELL (k-means needs points per cell)."""
  return max(1, min(int(4 * math.sqrt(n)), n // TRAIN_PER_CELL))


class _Faiss:
  """`search(query (D,), n)` -> (rows (n,), scores (n,)) best first; rows of -1 where fewer exist."""
  kind = ''
  max_depth = MAX_DEPTH

  def __init__(self, index, size: int):
    self._index, self.size = index, int(size)

  def _prepare(self, n: int) -> None:
    pass

  def search_batch(self, queries: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(Q, D) -> rows (Q, n) int64, scores (Q, n) float32."""
    self._prepare(int(n))
    scores, rows = self._index.search(np.ascontiguousarray(queries, dtype=np.float32), int(n))
    return rows, scores

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
  """faiss IVF-SQ8 with a float rerank (see the module docstring)."""
  kind = 'ivf'

  def __init__(self, embeddings=None, nprobe: int = NPROBE, k_factor: int = K_FACTOR, index=None, seed: int = 0):
    faiss = _faiss()
    if index is None:
      x = _vectors(embeddings)
      n, d = x.shape
      nlist = cells_for(n)
      base = faiss.IndexIVFScalarQuantizer(faiss.IndexFlatIP(d), d, nlist, faiss.ScalarQuantizer.QT_8bit,
                                           faiss.METRIC_INNER_PRODUCT)
      sample = x if n <= TRAIN_PER_CELL * nlist * 2 else x[np.sort(np.random.default_rng(seed).choice(
          n, TRAIN_PER_CELL * nlist * 2, replace=False))]
      base.train(sample)
      index = faiss.IndexRefineFlat(base)
      index.add(x)
    super().__init__(index, index.ntotal)
    self._ivf = faiss.extract_index_ivf(index)
    self.nprobe, self.k_factor = int(nprobe), int(k_factor)

  def _prepare(self, n: int) -> None:
    self._ivf.nprobe = max(1, min(self.nprobe, self._ivf.nlist))
    _faiss().downcast_index(self._index).k_factor = float(self.k_factor)


class HnswIndex(_Faiss):
  """A faiss HNSW graph (see the module docstring)."""
  kind = 'hnsw'

  def __init__(self, embeddings=None, m: int = M, ef_construction: int = EF_CONSTRUCTION,
               ef_search: int = EF_SEARCH, index=None):
    faiss = _faiss()
    if index is None:
      x = _vectors(embeddings)
      index = faiss.IndexHNSWFlat(x.shape[1], int(m), faiss.METRIC_INNER_PRODUCT)
      index.hnsw.efConstruction = int(ef_construction)
      index.add(x)
    super().__init__(index, index.ntotal)
    self.ef_search = int(ef_search)

  def _prepare(self, n: int) -> None:
    self._index.hnsw.efSearch = max(self.ef_search, n)


_CLASSES = {'ivf': IvfIndex, 'hnsw': HnswIndex}


def build(embeddings: np.ndarray, kind: str = 'ivf'):
  if kind not in _CLASSES:
    raise ValueError(f'approximate index kind {kind!r}: one of {", ".join(KINDS)}')
  return _CLASSES[kind](embeddings)


def load(path: str, kind: str):
  """A saved index of `kind` (faiss.read_index)."""
  faiss = _faiss()
  return _CLASSES[kind](index=faiss.read_index(path))


def saved_path(directory: str, embeddings_name: str, kind: str) -> str:
  """Where the approximate index of an embeddings file is saved: beside it, named after it (a new embeddings
  file, i.e. a changed index, has another name and so another approximate index)."""
  return os.path.join(directory, f'ann-{kind}-{os.path.splitext(os.path.basename(embeddings_name))[0]}.faiss')


def for_index(kind: str = 'ivf', log: Callable[[str], None] = lambda _: None):
  """The IndexHolder's builder: index -> the approximate index, loaded when saved beside the index's embeddings
  (and of their size), else built and saved there (local indexes; a gs:// index builds it in memory)."""
  if kind not in _CLASSES:
    raise ValueError(f'approximate index kind {kind!r}: one of {", ".join(KINDS)}')

  def make(index):
    from input_pipeline import paths  # pylint: disable=g-import-not-at-top
    name = index.manifest.get('embeddings', '')
    local = name and not paths.is_remote(index.directory)
    path = saved_path(index.directory, name, kind) if local else ''
    if path and os.path.isfile(path):
      try:
        ann = load(path, kind)
        if ann.size == len(index.embeddings):
          log(f'approximate index ({kind}) loaded from {path}')
          return ann
      except RuntimeError as e:  # a damaged file: rebuild it
        log(f'approximate index {path} unreadable ({e}); rebuilding it')
    ann = build(index.embeddings, kind)
    if path:
      ann.save(path)
      log(f'approximate index ({kind}) built over {ann.size} images, saved to {path}')
      for old in os.listdir(index.directory):  # those of embeddings files the index no longer names
        if old.startswith(f'ann-{kind}-') and old.endswith('.faiss') and os.path.join(index.directory, old) != path:
          try:
            os.remove(os.path.join(index.directory, old))
          except OSError:
            pass
    return ann
  return make
