import numpy as np
import pytest

from ivt_jax.metrics import retrieval_metrics


def naive(sim, qids, gids):
  """Full argsort per query, ties broken by gallery index."""
  r = {1: [], 5: [], 10: []}
  aps, inps = [], []
  for s, q in zip(sim, qids):
    order = np.argsort(-s, kind='stable')
    match = gids[order] == q
    pos = np.flatnonzero(match) + 1
    for k in r:
      r[k].append(pos[0] <= k)
    aps.append(np.mean(np.arange(1, len(pos) + 1) / pos))
    inps.append(len(pos) / pos[-1])
  return {'r1': 100 * np.mean(r[1]), 'r5': 100 * np.mean(r[5]), 'r10': 100 * np.mean(r[10]),
          'mAP': 100 * np.mean(aps), 'mINP': 100 * np.mean(inps)}


def test_hand_worked_cases():
  gids = np.array([1, 2, 3, 1, 2, 4, 5, 6, 7, 8, 9, 10])
  # Query 0 (id 1): relevant at gallery 0 and 3; scores put them at ranks 1 and 3.
  s0 = np.array([.9, .8, .1, .7, .0, .0, .0, .0, .0, .0, .0, .0])
  # Query 1 (id 4): one relevant item (gallery 5), ranked last.
  s1 = np.linspace(1, 0.1, 12)
  s1[5], s1[11] = 0.0, s1[5]
  # Query 2 (id 2): ties: every score equal; relevant at gallery 1 and 4 -> ranks 2 and 5 by index.
  s2 = np.full(12, 0.5)
  m = retrieval_metrics(np.stack([s0, s1, s2]), np.array([1, 4, 2]), gids)
  assert m['r1'] == pytest.approx(100 / 3)
  assert m['r5'] == pytest.approx(200 / 3)
  assert m['r10'] == pytest.approx(200 / 3)
  ap = [(1 / 1 + 2 / 3) / 2, 1 / 12, (1 / 2 + 2 / 5) / 2]
  inp = [2 / 3, 1 / 12, 2 / 5]
  assert m['mAP'] == pytest.approx(100 * np.mean(ap))
  assert m['mINP'] == pytest.approx(100 * np.mean(inp))


def test_perfect_and_worst():
  gids = np.arange(20) % 5
  sim = (gids[None, :] == np.arange(5)[:, None]).astype(float)
  m = retrieval_metrics(sim, np.arange(5), gids)
  assert m == {'r1': 100.0, 'r5': 100.0, 'r10': 100.0, 'mAP': 100.0, 'mINP': 100.0}
  m = retrieval_metrics(-sim, np.arange(5), gids)
  assert m['r1'] == 0 and m['r10'] == 0
  assert m['mINP'] == pytest.approx(20.0)  # 4 relevant items at ranks 17..20


def test_random_matches_naive_and_chunking():
  rng = np.random.default_rng(0)
  gids = rng.integers(0, 30, 300)
  qids = rng.choice(gids, 101)
  sim = rng.normal(size=(101, 300)).round(1)  # rounding creates ties
  ref = naive(sim, qids, gids)
  full = retrieval_metrics(sim, qids, gids, chunk_size=1000)
  for c in (1, 7, 64):
    chunked = retrieval_metrics(sim, qids, gids, chunk_size=c)
    assert chunked == pytest.approx(full, abs=1e-9)
  assert full == pytest.approx(ref, abs=1e-9)


def test_large_gallery_bounded_memory():
  rng = np.random.default_rng(1)
  g = 1_000_000
  gids = rng.integers(0, 200_000, g).astype(np.int32)
  qids = gids[:3]
  sim = rng.random((3, g), dtype=np.float32)
  m = retrieval_metrics(sim, qids, gids)
  assert 0 <= m['mAP'] <= 100


def test_bad_input():
  with pytest.raises(ValueError, match='no relevant gallery item'):
    retrieval_metrics(np.zeros((1, 3)), np.array([9]), np.array([1, 2, 3]))
  with pytest.raises(ValueError, match='expected'):
    retrieval_metrics(np.zeros((2, 3)), np.array([1]), np.array([1, 2, 3]))
  with pytest.raises(ValueError, match='non-finite'):
    retrieval_metrics(np.array([[np.nan, 1, 2]]), np.array([1]), np.array([1, 2, 3]))
