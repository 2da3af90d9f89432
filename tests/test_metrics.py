import numpy as np
import pytest

from ivt_jax.evaluation.metrics import reference_gallery, reference_metrics, retrieval_metrics


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


def test_reference_protocol_hand_worked():
  """The reference's trapezoid AP and CMC, worked by hand."""
  gids = np.array([1, 2, 1, 3, 1])
  # Query 0 (id 1): positives ranked 1st, 3rd and 5th (0-based ranks 0, 2, 4).
  s0 = np.array([.9, .8, .7, .6, .5])
  # Query 1 (id 3): its one positive ranked 2nd.
  s1 = np.array([.9, .1, .2, .8, .3])
  # Query 2 (id 7): no positive in the gallery: counts in the mean with 0.
  s2 = np.array([.5, .4, .3, .2, .1])
  m = reference_metrics(np.stack([s0, s1, s2]), np.array([1, 3, 7]), gids)
  # Query 0: i = 0: (1 + 1/1)/2 = 1; i = 1: (1/2 + 2/3)/2; i = 2: (2/4 + 3/5)/2; each x 1/3.
  ap0 = (1 + (1 / 2 + 2 / 3) / 2 + (2 / 4 + 3 / 5) / 2) / 3
  ap1 = (0 / 1 + 1 / 2) / 2  # i = 0 at rank 1: p_old = 0 / 1, p = 1 / 2
  assert m['mAP'] == pytest.approx(100 * (ap0 + ap1 + 0) / 3)
  assert m['r1'] == pytest.approx(100 / 3)
  assert m['r5'] == m['r10'] == pytest.approx(200 / 3)
  # Its AP is not the standard one: query 0's standard AP is (1 + 2/3 + 3/5) / 3.
  assert m['mAP'] != pytest.approx(retrieval_metrics(s0[None], [1], gids)['mAP'])


def test_reference_gallery_is_every_second_pair_image_for_cuhk():
  # Images 0..3 with 2, 3, 2 and 1 captions: the reference's feats[::2] keeps pairs 0, 2, 4, 6.
  pairs = np.array([0, 0, 1, 1, 1, 2, 2, 3])
  np.testing.assert_array_equal(reference_gallery(pairs, 'cuhk_pedes'), [0, 1, 1, 2])  # image 1 twice, 3 never
  np.testing.assert_array_equal(reference_gallery(pairs, 'rstpreid'), [0, 1, 1, 2])
  np.testing.assert_array_equal(reference_gallery(pairs, 'icfg_pedes'), pairs)
  with pytest.raises(ValueError, match='reference protocol'):
    reference_gallery(pairs, 'mnist')


def test_evaluate_reference_protocol_builds_the_reference_gallery():
  from ivt_jax.evaluation import evaluate
  rng = np.random.default_rng(0)
  image_emb = rng.normal(size=(4, 8)).astype(np.float32)
  text_emb = rng.normal(size=(8, 8)).astype(np.float32)
  emb = {'image_emb': image_emb, 'image_pid': np.array([10, 11, 10, 12]), 'image_index': np.arange(4),
         'text_emb': text_emb, 'text_pid': np.array([10, 10, 11, 11, 11, 10, 10, 12]),
         'text_image_index': np.array([0, 0, 1, 1, 1, 2, 2, 3])}
  m, sim = evaluate.evaluate_embeddings(emb, 'reference', 'cuhk_pedes')
  gallery = [0, 1, 1, 2]  # pairs 0, 2, 4, 6
  np.testing.assert_allclose(sim, text_emb @ image_emb[gallery].T, rtol=1e-6)
  assert m == pytest.approx(reference_metrics(text_emb @ image_emb[gallery].T, emb['text_pid'],
                                              emb['image_pid'][gallery]))
  m_std, sim_std = evaluate.evaluate_embeddings(emb, 'standard')
  assert sim_std.shape == (8, 4) and set(m_std) == {'r1', 'r5', 'r10', 'mAP', 'mINP'}
  with pytest.raises(ValueError, match='protocol'):
    evaluate.evaluate_embeddings(emb, 'paper')
