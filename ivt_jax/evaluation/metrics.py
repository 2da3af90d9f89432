"""Text-to-image retrieval metrics over the full ranking: R@1/5/10, mAP, mINP (percent).

The ranking of a query sorts the gallery by decreasing similarity; ties are broken by gallery index (the
order `np.argsort(-s, kind='stable')` gives). Only the ranks of the relevant items are needed, so no argsort of
the whole matrix is built: for each relevant item p of a query, rank_p = 1 + #{g: s_g > s_p} +
#{g < p: s_g = s_p}. Queries are processed in chunks so that memory stays bounded for a million-image gallery.

  R@k  = 100 * mean_q [min_p rank_p <= k]
  mAP  = 100 * mean_q (1 / R_q) sum_{i=1..R_q} i / rank_(i)   (ranks of the R_q relevant items in order)
  mINP = 100 * mean_q R_q / max_p rank_p
"""
from typing import Optional

import numpy as np


def _positive_ranks(sim: np.ndarray, relevant: np.ndarray) -> np.ndarray:
  """sim, relevant: (c, G) -> (c, Pmax) 1-based ranks of the relevant items, sorted, padded with +inf."""
  c, g = sim.shape
  counts = relevant.sum(1)
  pmax = int(counts.max())
  # Gallery indices of the relevant items per row, in index order, padded with index 0 (masked below).
  rows, cols = np.nonzero(relevant)
  slot = np.arange(len(rows)) - np.repeat(np.cumsum(counts) - counts, counts)
  order = np.zeros((c, pmax), np.int64)
  order[rows, slot] = cols
  valid = np.arange(pmax)[None, :] < counts[:, None]
  pos_scores = np.take_along_axis(sim, order, axis=1)  # (c, Pmax)
  ranks = np.empty((c, pmax), np.float64)
  gallery_index = np.arange(g)
  for j in range(pmax):  # Pmax is small (images per identity); each step is a (c, G) comparison.
    s = pos_scores[:, j:j + 1]
    ahead = (sim > s) | ((sim == s) & (gallery_index[None, :] < order[:, j:j + 1]))
    ranks[:, j] = ahead.sum(1) + 1
  ranks = np.where(valid, ranks, np.inf)
  return np.sort(ranks, axis=1)


def _checked(similarity, query_ids, gallery_ids, dtype=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """-> (similarity (Q, G), query_ids (Q,), gallery_ids (G,)) as numpy; a bad shape or a non-finite score is
  refused."""
  similarity = np.asarray(similarity, dtype)
  query_ids = np.asarray(query_ids).reshape(-1)
  gallery_ids = np.asarray(gallery_ids).reshape(-1)
  if similarity.shape != (len(query_ids), len(gallery_ids)):
    raise ValueError(f'similarity has shape {similarity.shape}, expected ({len(query_ids)}, {len(gallery_ids)}) '
                     'from query_ids and gallery_ids')
  if not np.all(np.isfinite(similarity)):
    raise ValueError(f'similarity has {int((~np.isfinite(similarity)).sum())} non-finite entries')
  return similarity, query_ids, gallery_ids


def retrieval_metrics(similarity, query_ids, gallery_ids, chunk_size: Optional[int] = None) -> dict:
  """similarity: (Q, G) text-to-image scores; query_ids: (Q,); gallery_ids: (G,) -> dict of percentages.

  Keys r1, r5, r10, mAP, mINP. Every query must have at least one relevant gallery item.
  """
  similarity, query_ids, gallery_ids = _checked(similarity, query_ids, gallery_ids)
  q, g = similarity.shape
  if chunk_size is None:
    chunk_size = max(1, (1 << 23) // max(g, 1))  # ~8M comparisons per chunk
  hits = {1: 0, 5: 0, 10: 0}
  ap_sum = inp_sum = 0.0
  for start in range(0, q, chunk_size):
    sim = similarity[start:start + chunk_size]
    relevant = query_ids[start:start + chunk_size, None] == gallery_ids[None, :]
    counts = relevant.sum(1)
    if np.any(counts == 0):
      bad = start + np.flatnonzero(counts == 0)
      raise ValueError(f'{len(bad)} queries have no relevant gallery item (first: query {bad[0]}, '
                       f'person id {query_ids[bad[0]]})')
    ranks = _positive_ranks(sim, relevant)  # (c, Pmax)
    for k in hits:
      hits[k] += int((ranks[:, 0] <= k).sum())
    finite = np.isfinite(ranks)
    precision = np.where(finite, np.arange(1, ranks.shape[1] + 1)[None, :] / np.where(finite, ranks, 1), 0)
    ap_sum += float((precision.sum(1) / counts).sum())
    last = np.max(np.where(finite, ranks, 0), axis=1)
    inp_sum += float((counts / last).sum())
  return {'r1': 100.0 * hits[1] / q, 'r5': 100.0 * hits[5] / q, 'r10': 100.0 * hits[10] / q,
          'mAP': 100.0 * ap_sum / q, 'mINP': 100.0 * inp_sum / q}


# ---- the reference implementation's own protocol ---------------------------------------------------------------

# Which of the per-caption image features the reference's test function keeps as its gallery, by dataset:
# R1_mAP_CUHK (CUHK-PEDES, RSTPReid) takes every second one (`feats[::2]`, which assumes exactly two captions per
# image), R1_mAP_ICFG (ICFG-PEDES) every one (an image appears once per caption).
REFERENCE_GALLERY_STEP = {'cuhk_pedes': 2, 'rstpreid': 2, 'icfg_pedes': 1}


def reference_gallery(pair_images: np.ndarray, dataset: str) -> np.ndarray:
  """pair_images: (Q,) the image of each (image, caption) pair in the test list's order -> the images of the
  reference's gallery (with its repeats and omissions when an image does not have exactly two captions)."""
  if dataset not in REFERENCE_GALLERY_STEP:
    raise ValueError(f'the reference protocol knows {sorted(REFERENCE_GALLERY_STEP)}, not {dataset!r}')
  return np.asarray(pair_images)[::REFERENCE_GALLERY_STEP[dataset]]


def reference_metrics(similarity, query_ids, gallery_ids) -> dict:
  """The reference's R1_mAP.compute_metric_sim: -> {'r1', 'r5', 'r10', 'mAP'} in percent.

  Per query the gallery is ranked by `np.argsort(score)[::-1]`; with the positives at (0-based) ranks
  r_0 < r_1 < ... < r_(n-1): CMC[k] = [r_0 <= k], and the trapezoid average precision
    AP = sum_i (1 / n) * (p_old_i + p_i) / 2,  p_i = (i + 1) / (r_i + 1),  p_old_i = i / r_i (1 when r_i = 0).
  Both are averaged over every query (a query without a positive adds 0, as there).
  """
  similarity, query_ids, gallery_ids = _checked(similarity, query_ids, gallery_ids, np.float32)
  hits = {1: 0, 5: 0, 10: 0}
  ap_sum = 0.0
  for q in range(len(query_ids)):
    order = np.argsort(similarity[q])[::-1]
    rows_good = np.flatnonzero(gallery_ids[order] == query_ids[q])  # sorted 0-based ranks of the positives
    n = len(rows_good)
    if n == 0:
      continue
    for k in hits:
      hits[k] += int(rows_good[0] < k)
    i = np.arange(n)
    precision = (i + 1) / (rows_good + 1)
    old_precision = np.where(rows_good != 0, i / np.maximum(rows_good, 1), 1.0)
    ap_sum += float(np.sum((old_precision + precision) / 2) / n)
  q = max(len(query_ids), 1)
  return {'r1': 100.0 * hits[1] / q, 'r5': 100.0 * hits[5] / q, 'r10': 100.0 * hits[10] / q,
          'mAP': 100.0 * ap_sum / q}
