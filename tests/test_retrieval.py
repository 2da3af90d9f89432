"""ivt_jax.evaluation.retrieval.topk: exact top-k with ties by gallery index, sharded over 8 devices, bounded memory."""
import jax
import numpy as np
import pytest

from ivt_jax.evaluation import metrics
from ivt_jax.evaluation import retrieval


def _integer_embeddings(rng, n, d=6):
  # Small integers: every dot product is exact in float32 and many scores tie.
  return rng.integers(-2, 3, size=(n, d)).astype(np.float32)


def _reference(text, gallery, k):
  sim = text @ gallery.T
  order = np.argsort(-sim, axis=1, kind='stable')[:, :k]
  return np.take_along_axis(sim, order, axis=1), order


def _mesh(n):
  return jax.make_mesh((n,), ('gallery',), devices=jax.devices()[:n],
                       axis_types=(jax.sharding.AxisType.Auto,))


def test_topk_on_the_training_mesh():
  """A 2-D data x fsdp mesh (sharding.make_mesh): the gallery is split over both axes."""
  from configs import base
  from ivt_jax.runtime import sharding
  c = base.get_config()
  c.mesh.data, c.mesh.fsdp = 2, 4
  rng = np.random.default_rng(5)
  text, gallery = _integer_embeddings(rng, 19), _integer_embeddings(rng, 333)
  scores, indices = retrieval.topk(text, gallery, k=7, mesh=sharding.make_mesh(c), query_chunk=8,
                                   gallery_chunk=16)
  ref_scores, ref_indices = _reference(text, gallery, 7)
  np.testing.assert_array_equal(indices, ref_indices)
  np.testing.assert_array_equal(scores, ref_scores)


@pytest.mark.parametrize('devices,query_chunk,gallery_chunk', [(1, 1024, 65536), (1, 7, 16), (8, 5, 24),
                                                             (8, 64, 1000)])
def test_topk_equals_stable_argsort_with_ties(devices, query_chunk, gallery_chunk):
  assert jax.device_count() >= devices
  rng = np.random.default_rng(devices + query_chunk)
  text, gallery = _integer_embeddings(rng, 23), _integer_embeddings(rng, 501)  # 501: no chunk divides it
  scores, indices = retrieval.topk(text, gallery, k=10, mesh=_mesh(devices), query_chunk=query_chunk,
                                   gallery_chunk=gallery_chunk)
  ref_scores, ref_indices = _reference(text, gallery, 10)
  assert scores.shape == indices.shape == (23, 10)
  assert indices.dtype == np.int32 and scores.dtype == np.float32
  # The data has ties inside the top 10 (else the index order would not be tested).
  assert (np.diff(ref_scores, axis=1) == 0).any()
  np.testing.assert_array_equal(indices, ref_indices)
  np.testing.assert_array_equal(scores, ref_scores)


def test_topk_agrees_with_metrics_rank_order():
  """R@k from the top-k lists equals ivt_jax.evaluation.metrics' R@k (same tie rule) on tied scores."""
  rng = np.random.default_rng(3)
  text, gallery = _integer_embeddings(rng, 40, 3), _integer_embeddings(rng, 97, 3)
  query_ids = rng.integers(0, 10, size=40)
  gallery_ids = np.concatenate([np.arange(10), rng.integers(0, 10, size=87)])
  _, indices = retrieval.topk(text, gallery, k=10, mesh=_mesh(8), query_chunk=16, gallery_chunk=8)
  hits = gallery_ids[indices] == query_ids[:, None]
  m = metrics.retrieval_metrics(text @ gallery.T, query_ids, gallery_ids)
  for k in (1, 5, 10):
    assert 100.0 * hits[:, :k].any(1).mean() == pytest.approx(m[f'r{k}'])


def test_topk_k_equals_gallery_and_bfloat16():
  rng = np.random.default_rng(1)
  text, gallery = _integer_embeddings(rng, 9), _integer_embeddings(rng, 13)
  _, indices = retrieval.topk(text, gallery, k=13, mesh=_mesh(8), gallery_chunk=8)
  np.testing.assert_array_equal(indices, _reference(text, gallery, 13)[1])
  import ml_dtypes
  # Small integers are exact in bfloat16 too; scores accumulate in float32.
  s16, i16 = retrieval.topk(text.astype(ml_dtypes.bfloat16), gallery.astype(ml_dtypes.bfloat16), k=5,
                            mesh=_mesh(8))
  ref_s, ref_i = _reference(text, gallery, 5)
  np.testing.assert_array_equal(i16, ref_i)
  np.testing.assert_array_equal(s16, ref_s)


def test_topk_accepts_device_arrays():
  rng = np.random.default_rng(2)
  text = rng.standard_normal((17, 8)).astype(np.float32)
  gallery = rng.standard_normal((300, 8)).astype(np.float32)
  scores, indices = retrieval.topk(jax.numpy.asarray(text), jax.numpy.asarray(gallery), k=3, mesh=_mesh(8),
                                   gallery_chunk=16)
  ref_s, ref_i = _reference(text, gallery, 3)
  np.testing.assert_array_equal(indices, ref_i)
  np.testing.assert_allclose(scores, ref_s, rtol=1e-5, atol=1e-5)


def test_memory_is_bounded_by_the_chunks():
  """Per-device memory stays near (query_chunk x gallery_chunk) scores, far below the (Q, G) matrix."""
  q, g, d = 512, 40_003, 16
  full = q * g * 4
  small = retrieval.memory_analysis(q, g, d, k=10, mesh=_mesh(8), query_chunk=64, gallery_chunk=512)
  assert small.temp_size_in_bytes < full / 20, (small, full)
  # Chunks and the gallery shard are what the memory grows with: 8x larger chunks, more temporary memory.
  large = retrieval.memory_analysis(q, g, d, k=10, mesh=_mesh(8), query_chunk=512, gallery_chunk=4096)
  assert large.temp_size_in_bytes > 4 * small.temp_size_in_bytes
  # The gallery argument is one shard per device (G / 8 rows, padded), not the whole gallery.
  assert small.argument_size_in_bytes < (g // 8 + 1024) * d * 4 + q * d * 4


def test_bad_input_is_refused():
  x = np.zeros((3, 4), np.float32)
  with pytest.raises(ValueError, match='embedding sizes differ'):
    retrieval.topk(x, np.zeros((5, 3), np.float32), k=1)
  with pytest.raises(ValueError, match='between 1 and the gallery size 5'):
    retrieval.topk(x, np.zeros((5, 4), np.float32), k=6)
