"""Approximate search for large galleries: a faiss HNSW graph over the index's embeddings (inner product, which
is the cosine for the unit-length IVT embeddings), behind the same ranking call as exact search.

Exact search stays the default: it is one matrix-vector product, about 25 ms for a million 128-d embeddings on
one CPU core, and always right. HNSW answers in well under a millisecond at a recall@10 near 1 (figures and the
benchmark: `python -m ivt_jax.tools.ann_benchmark`, README), at the cost of building the graph (minutes for a
million) and its memory (the vectors plus about M x 8 bytes per vector).
"""
from __future__ import annotations

import numpy as np

M = 32                 # graph neighbours per node
EF_CONSTRUCTION = 128  # candidates while building
EF_SEARCH = 128        # candidates while searching (at least the number of results asked for)


class HnswIndex:
  """`search(query (D,), n)` -> (rows (n,), scores (n,)) best first; rows of -1 where fewer exist."""

  def __init__(self, embeddings: np.ndarray, m: int = M, ef_construction: int = EF_CONSTRUCTION,
               ef_search: int = EF_SEARCH):
    try:
      import faiss  # pylint: disable=g-import-not-at-top
    except ImportError:
      raise ImportError('the approximate index needs faiss: pip install faiss-cpu (in requirements.txt)') from None
    x = np.ascontiguousarray(embeddings, dtype=np.float32)
    if x.ndim != 2 or not len(x):
      raise ValueError(f'embeddings must be (N > 0, D), got {x.shape}')
    self._index = faiss.IndexHNSWFlat(x.shape[1], int(m), faiss.METRIC_INNER_PRODUCT)
    self._index.hnsw.efConstruction = int(ef_construction)
    self._index.add(x)
    self.ef_search = int(ef_search)
    self.size = len(x)

  def search_batch(self, queries: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(Q, D) -> rows (Q, n) int64, scores (Q, n) float32."""
    self._index.hnsw.efSearch = max(self.ef_search, int(n))
    scores, rows = self._index.search(np.ascontiguousarray(queries, dtype=np.float32), int(n))
    return rows, scores

  def search(self, query: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    rows, scores = self.search_batch(np.asarray(query, np.float32)[None], n)
    return rows[0], scores[0]


def build(embeddings: np.ndarray) -> HnswIndex:
  return HnswIndex(embeddings)
