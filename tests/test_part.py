"""The part head: shapes, shared queries, score = composite dot product, L_CMR, margins, start epoch, end to end."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config
from ivt_jax.models import heads
from ivt_jax.models import encoder as model_lib
from ivt_jax.bench import part_cost
from ivt_jax.objectives import part as part_losses
from ivt_jax.models import part as part_model
from ivt_jax.training import step as step_lib


def part_config(**part):
  c = tiny_config(depth=1, drop_path=0.0, text_embed_dropout=0.0, head='part')
  c.part.update(num_parts=3, weight_hidden=8)
  c.part.update(**part)
  return c


def _inputs(c, b=4, seed=0):
  rng = np.random.default_rng(seed)
  h, w = c.data.image_size
  n = c.data.text_length
  images = rng.uniform(-1, 1, (b, h, w, 3)).astype(np.float32)
  lengths = rng.integers(4, n + 1, size=b)
  mask = (np.arange(n)[None] < lengths[:, None]).astype(np.int32)
  ids = (rng.integers(1, c.model.vocab_size, (b, n)) * mask).astype(np.int32)
  return jnp.asarray(images), jnp.asarray(ids), jnp.asarray(mask)


def _init(c, seed=0):
  module = heads.build(c)
  return module, model_lib.init_module_params(module, jax.random.PRNGKey(seed))


def test_shapes_and_encoder_names():
  c = part_config()
  module, params = _init(c)
  images, ids, mask = _inputs(c)
  k, d = c.part.num_parts, c.model.width
  gi, pi, gt, pt, w = module.apply({'params': params}, images, ids, mask)
  assert gi.shape == gt.shape == (4, d) and pi.shape == pt.shape == (4, k, d) and w.shape == (4, k)
  np.testing.assert_allclose(np.asarray(w).sum(1), 1.0, rtol=1e-6)
  # The encoder's parameters carry the plain Encoder's names and shapes; the coarse embedding is its CLS.
  encoder = model_lib.Encoder(model_lib.encoder_config(c))
  plain = model_lib.init_module_params(encoder, jax.random.PRNGKey(1))
  enc_part = {n: v for n, v in params.items() if not n.startswith('part_')}
  assert jax.tree_util.tree_structure(plain) == jax.tree_util.tree_structure(enc_part)
  assert set(params) - set(plain) == {'part_queries', 'part_decoder', 'part_weights_hidden', 'part_weights_out'}
  np.testing.assert_allclose(encoder.apply({'params': enc_part}, images, method='embed_images'), gi, atol=1e-5)
  np.testing.assert_allclose(encoder.apply({'params': enc_part}, ids, mask, method='embed_texts'), gt, atol=1e-5)
  # Composite vectors.
  u8 = jnp.asarray(np.random.default_rng(0).integers(0, 256, images.shape), jnp.uint8)
  assert heads.embed_images(params, u8, encoder=module).shape == (4, (1 + k) * d)
  assert heads.embed_texts(params, ids, mask, encoder=module).shape == (4, (1 + k) * d)
  assert part_model.embedding_size(c) == (1 + k) * d
  # Separate decoders, uniform weights: no weight MLP, two decoders, one set of queries.
  module2, params2 = _init(part_config(share_decoder=False, weights='uniform'))
  assert {n for n in params2 if n.startswith('part_')} == {'part_queries', 'part_decoder_image',
                                                            'part_decoder_text'}


def test_bad_part_config_names_key():
  with pytest.raises(ValueError, match='part.weights'):
    heads.build(part_config(weights='learned'))
  with pytest.raises(ValueError, match='part.cmr_min_margin'):
    heads.build(part_config(cmr_margin=0.1, cmr_min_margin=0.2))
  with pytest.raises(ValueError, match='model.head must be one of'):
    heads.build(tiny_config(head='slots'))


@pytest.mark.parametrize('share', [True, False])
def test_queries_shared_and_reached_from_both_modalities(share):
  c = part_config(share_decoder=share)
  module, params = _init(c)
  images, ids, mask = _inputs(c)
  assert params['part_queries'].shape == (c.part.num_parts, c.model.width)

  def image_side(p):
    return jnp.sum(module.apply({'params': p}, images, method='image_parts')[1] ** 2)

  def text_side(p):
    return jnp.sum(module.apply({'params': p}, ids, mask, method='text_parts')[1] ** 2)

  gi = jax.grad(image_side)(params)
  gt = jax.grad(text_side)(params)
  assert float(jnp.abs(gi['part_queries']).max()) > 0
  assert float(jnp.abs(gt['part_queries']).max()) > 0
  # Each side reaches its own modality's path only (the other's MLPs and key norm get nothing).
  assert float(jnp.abs(gi['blocks_0']['mlp_txt']['fc1']['kernel']).max()) == 0
  assert float(jnp.abs(gt['blocks_0']['mlp_vis']['fc1']['kernel']).max()) == 0
  if share:
    assert float(jnp.abs(gi['part_decoder']['key_norm_text']['scale']).max()) == 0
    assert float(jnp.abs(gt['part_decoder']['key_norm_image']['scale']).max()) == 0
    assert float(jnp.abs(gi['part_decoder']['layers_0']['cross_attn']['query']['kernel']).max()) > 0
    assert float(jnp.abs(gt['part_decoder']['layers_0']['cross_attn']['query']['kernel']).max()) > 0


@pytest.mark.parametrize('weights,score', [('text', 'coarse_fine'), ('uniform', 'coarse_fine'),
                                           ('text', 'coarse')])
def test_score_is_dot_product_of_composites(weights, score):
  c = part_config(weights=weights, score=score, scale=2.5)
  module, params = _init(c)
  rng = np.random.default_rng(3)
  u8 = jnp.asarray(rng.integers(0, 256, (5,) + tuple(c.data.image_size) + (3,)), jnp.uint8)
  _, ids, mask = _inputs(c, b=6, seed=4)
  gi, pi = module.apply({'params': params}, model_lib.normalize_images(u8), method='image_parts')
  gt, pt = module.apply({'params': params}, ids, mask, method='text_parts')
  w = module.apply({'params': params}, gt, method='part_weights')
  if weights == 'uniform':
    np.testing.assert_allclose(w, 1.0 / c.part.num_parts)
  # The definition, written out with numpy.
  n = lambda x: np.asarray(x) / np.linalg.norm(np.asarray(x), axis=-1, keepdims=True)
  expected = n(gt) @ n(gi).T
  if score == 'coarse_fine':
    for k in range(c.part.num_parts):
      expected = expected + 2.5 * np.asarray(w)[:, k:k + 1] * (n(pt[:, k]) @ n(pi[:, k]).T)
  img = heads.embed_images(params, u8, encoder=module)
  txt = heads.embed_texts(params, ids, mask, encoder=module)
  from ivt_jax.evaluation import evaluate
  np.testing.assert_allclose(evaluate.similarity(np.asarray(txt), np.asarray(img)), expected, atol=1e-5)
  np.testing.assert_allclose(part_model.score(gi, pi, gt, pt, w, module.part), expected, atol=1e-5)


def test_text_keys_exclude_cls_sep_padding_and_dropped_tokens():
  mask = jnp.asarray([[1, 1, 1, 1, 1, 0], [1, 1, 1, 0, 0, 0]])
  keep = jnp.asarray([[1, 1, 0, 1, 1, 1], [1, 0, 1, 1, 1, 1]], bool)
  keys = np.asarray(part_model.text_part_keys(mask, keep))
  np.testing.assert_array_equal(keys, [[0, 1, 0, 1, 0, 0], [1, 0, 0, 0, 0, 0]])  # row 2: only CLS is left
  np.testing.assert_array_equal(part_model.image_part_keys(jnp.asarray([[1, 0, 1]], bool)), [[0, 0, 1]])
  # Parts do not depend on the ids of dropped or padded tokens (BMM drop respected).
  c = part_config()
  module, params = _init(c)
  _, ids, mask = _inputs(c, seed=5)
  keep = jnp.ones_like(ids, bool).at[:, 2].set(False)
  other = ids.at[:, 2].set((ids[:, 2] + 7) % c.model.vocab_size)
  other = jnp.where(mask.astype(bool), other, 5)
  run = lambda i: module.apply({'params': params}, i, mask, keep, True, method='text_parts')
  np.testing.assert_allclose(run(ids)[1], run(other)[1], atol=1e-5)
  np.testing.assert_allclose(run(ids)[0], run(other)[0], atol=1e-5)


# ---- L_CMR against a plain numpy transcription of the definition -------------------------------------

def np_commonality(s, pid, mapping):
  k, n, _ = s.shape
  out = np.zeros(k)
  for kk in range(k):
    vals = [s[kk, i, j] for i in range(n) for j in range(n) if pid[i] != pid[j]]
    mean = np.mean(vals) if vals else 0.0
    out[kk] = min(max(mean, 0.0), 1.0) if mapping == 'clip' else min(max((1 + mean) / 2, 0.0), 1.0)
  return out


def np_cmr_hardest(s, pid, m):
  k, n, _ = s.shape
  total = 0.0
  for direction in (s, np.transpose(s, (0, 2, 1))):
    acc = 0.0
    for kk in range(k):
      for i in range(n):
        negs = [direction[kk, i, j] for j in range(n) if pid[i] != pid[j]]
        if negs:
          acc += max(0.0, m[kk] - direction[kk, i, i] + max(negs))
    total += acc / (k * n)
  return total


def _batch_parts(seed, n=8, k=3, d=6):
  rng = np.random.default_rng(seed)
  pid = np.repeat(np.arange(n // 2), 2)
  img = rng.normal(size=(n, k, d)).astype(np.float32)
  txt = (img + 0.8 * rng.normal(size=(n, k, d))).astype(np.float32)
  return img, txt, pid


@pytest.mark.parametrize('mapping', ['clip', 'affine'])
def test_cmr_matches_numpy_transcription(mapping):
  img, txt, pid = _batch_parts(0)
  s = np.asarray(part_losses.per_part_similarity(jnp.asarray(img), jnp.asarray(txt)))
  n = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  np.testing.assert_allclose(s, np.einsum('ikd,jkd->kij', n(img), n(txt)), atol=1e-6)
  c = np.asarray(part_losses.commonality(jnp.asarray(s), jnp.asarray(pid), mapping))
  np.testing.assert_allclose(c, np_commonality(s, pid, mapping), atol=1e-6)
  m = np.asarray(part_losses.cmr_margins(jnp.asarray(c), 0.3, 0.05))
  np.testing.assert_allclose(m, np.maximum(0.05, 0.3 * (1 - np_commonality(s, pid, mapping))), atol=1e-6)
  got = float(part_losses.cmr_loss(jnp.asarray(s), jnp.asarray(pid), jnp.asarray(m), 'hardest'))
  assert got > 0
  np.testing.assert_allclose(got, np_cmr_hardest(s, pid, m), rtol=1e-5)


def test_cmr_semihard_picks_a_semihard_negative_else_the_hardest():
  img, txt, pid = _batch_parts(1, n=10)
  s = np.asarray(part_losses.per_part_similarity(jnp.asarray(img), jnp.asarray(txt)))
  m = np.array([0.3, 0.5, 0.1], np.float32)
  neg = pid[:, None] != pid[None, :]
  seen = set()
  for seed in range(20):
    got = np.asarray(part_losses.ranking_losses(jnp.asarray(s), jnp.asarray(neg), jnp.asarray(m), 'semihard',
                                                jax.random.PRNGKey(seed)))
    for kk in range(3):
      for i in range(len(pid)):
        hinges = [m[kk] - s[kk, i, i] + s[kk, i, j] for j in range(len(pid)) if neg[i, j]]
        semi = [h for h in hinges if 0 < h < m[kk]]
        allowed = semi if semi else [max(0.0, max(hinges))]
        assert np.min(np.abs(np.array(allowed) - got[kk, i])) < 1e-5, (kk, i)
        if len(semi) > 1:
          seen.add((kk, i, round(float(got[kk, i]), 5)))
  # The choice is random: some anchor with several semi-hard negatives got different ones across seeds.
  counts = {}
  for kk, i, _ in seen:
    counts[(kk, i)] = counts.get((kk, i), 0) + 1
  assert counts and max(counts.values()) > 1


def test_margin_floor_for_common_part_and_larger_for_distinctive():
  """Part 0 is identical for everyone (common), part 1 differs per identity (orthogonal across identities)."""
  n_ids, d = 4, 8
  pid = np.repeat(np.arange(n_ids), 2)
  common = np.ones((len(pid), d), np.float32)
  distinct = np.eye(d, dtype=np.float32)[pid]
  parts = np.stack([common, distinct], axis=1)  # (N, 2, D), the same for images and texts
  s = part_losses.per_part_similarity(jnp.asarray(parts), jnp.asarray(parts))
  for mapping, expected_c1 in (('clip', 0.0), ('affine', 0.5)):
    c = np.asarray(part_losses.commonality(s, jnp.asarray(pid), mapping))
    np.testing.assert_allclose(c, [1.0, expected_c1], atol=1e-6)
    m = np.asarray(part_losses.cmr_margins(jnp.asarray(c), 0.2, 0.05))
    assert m[0] == pytest.approx(0.05)  # the floor m_min
    assert m[1] == pytest.approx(0.2 * (1 - expected_c1)) and m[1] > m[0]
  # The common part's ranking loss is exactly its floor margin (positive and negatives tie).
  m = jnp.asarray([0.05, 0.2])
  per = part_losses.ranking_losses(s, jnp.asarray(pid[:, None] != pid[None, :]), m, 'hardest')
  np.testing.assert_allclose(np.asarray(per)[0], 0.05, atol=1e-6)
  np.testing.assert_allclose(np.asarray(per)[1], 0.0, atol=1e-6)


def test_matching_losses_against_numpy():
  img, txt, pid = _batch_parts(2)
  s = part_losses.per_part_similarity(jnp.asarray(img), jnp.asarray(txt))
  w = jax.nn.softmax(jnp.asarray(np.random.default_rng(0).normal(size=(8, 3))), axis=-1)
  sw = np.asarray(part_losses.weighted_part_similarity(s, w))
  np.testing.assert_allclose(sw, np.einsum('kij,jk->ij', np.asarray(s), np.asarray(w)), atol=1e-6)
  y = (pid[:, None] == pid[None, :]).astype(np.float64)
  tau = 0.1

  def np_sdm(a):
    p = np.exp(a / tau) / np.exp(a / tau).sum(1, keepdims=True)
    q = y / y.sum(1, keepdims=True)
    return np.mean(np.sum(p * (np.log(p) - np.log(q + 1e-8)), 1))

  def np_nce(a):
    logp = a / tau - np.log(np.exp(a / tau).sum(1, keepdims=True))
    return -np.mean((y * logp).sum(1) / y.sum(1))

  np.testing.assert_allclose(part_losses.sdm_loss(jnp.asarray(sw), jnp.asarray(pid), tau),
                             np_sdm(sw) + np_sdm(sw.T), rtol=1e-4)
  np.testing.assert_allclose(part_losses.infonce_loss(jnp.asarray(sw), jnp.asarray(pid), tau),
                             np_nce(sw) + np_nce(sw.T), rtol=1e-4)


def _train_batch(c, seed=0):
  p, kk = c.data.ids_per_batch, c.data.images_per_id
  b = p * kk
  rng = np.random.default_rng(seed)
  n = c.data.text_length
  n_img = model_lib.encoder_config(c).num_image_tokens
  lengths = rng.integers(4, n + 1, size=(b, 3))
  mask = (np.arange(n)[None, None] < lengths[..., None]).astype(np.int32)
  return {'images': jnp.asarray(rng.integers(0, 256, (b, 3) + tuple(c.data.image_size) + (3,)), jnp.uint8),
          'text_ids': jnp.asarray(rng.integers(1, c.model.vocab_size, (b, 3, n)) * mask, jnp.int32),
          'text_mask': jnp.asarray(mask),
          'image_keep': jnp.asarray(rng.uniform(size=(b, 3, n_img)) > 0.1).at[..., 0].set(True),
          'text_keep': jnp.asarray(rng.uniform(size=(b, 3, n)) > 0.1).at[..., 0].set(True),
          'person_id': jnp.asarray(np.repeat(np.arange(p), kk), jnp.int32)}


def test_part_losses_off_before_start_epoch():
  c = part_config(start_epoch=2.0, cmr_negatives='hardest')
  c.data.ids_per_batch, c.data.images_per_id = 3, 2
  module, params = _init(c)
  batch = _train_batch(c)
  rng = jax.random.PRNGKey(0)

  def run(step):
    (loss, aux), grads = jax.value_and_grad(step_lib.part_loss_fn, has_aux=True)(
        params, batch, rng, module, jnp.asarray(step), 5)
    return float(loss), jax.device_get(aux), grads

  loss, aux, grads = run(9)  # epoch 1.8 < 2
  assert aux['part_on'] == 0 and aux['loss_match'] > 0 and aux['loss_cmr'] > 0
  assert loss == pytest.approx(float(aux['loss_global']), rel=1e-6)
  for name in ('part_queries', 'part_decoder', 'part_weights_hidden', 'part_weights_out'):
    assert all(float(jnp.abs(g).max()) == 0 for g in jax.tree_util.tree_leaves(grads[name])), name
  loss, aux, grads = run(10)  # epoch 2
  assert aux['part_on'] == 1
  assert loss == pytest.approx(float(aux['loss_global'] + aux['loss_match'] + aux['loss_cmr']), rel=1e-5)
  for name in ('part_queries', 'part_decoder', 'part_weights_hidden', 'part_weights_out'):
    assert any(float(jnp.abs(g).max()) > 0 for g in jax.tree_util.tree_leaves(grads[name])), name


def test_train_step_reports_part_metrics_and_stays_finite():
  from ivt_jax.training import optim
  c = part_config()
  c.data.ids_per_batch, c.data.images_per_id = 3, 2
  module, params = _init(c)
  tx, schedule = optim.make_optimizer(c, steps_per_epoch=4)
  state = step_lib.create_state(params, tx, jax.random.PRNGKey(0))
  step = jax.jit(lambda s, b: step_lib.train_step(s, b, encoder=module, tx=tx, schedule=schedule,
                                                  steps_per_epoch=4))
  state, m = step(state, _train_batch(c))
  m = jax.device_get(m)
  assert m['finite'] == 1 and int(state.step) == 1
  for key in ('loss_global', 'loss_match', 'loss_cmr', 'commonality_mean', 'margin_mean'):
    assert np.isfinite(m[key]), key
  assert 0.05 <= m['margin_mean'] <= 0.2


def test_cost_summary_sizes():
  c = part_config()
  summary = part_cost.cost_summary(c, time_steps=0)
  d, k = c.model.width, c.part.num_parts
  assert summary['ivt']['embedding_floats'] == d and summary['part']['embedding_floats'] == (1 + k) * d
  assert summary['ivt']['part_params'] == 0
  assert summary['part']['params'] - summary['ivt']['params'] == summary['part']['part_params'] > 0
  assert 'params_added' in part_cost.format_cost(summary)


@pytest.mark.slow
def test_end_to_end_training_with_part_head(tmp_path):
  from test_train import tiny_demo
  from ivt_jax.training import loop as train
  c = tiny_demo(str(tmp_path / 'data'))
  c.model.head = 'part'
  c.part.update(num_parts=2, weight_hidden=8)
  c.total_steps = 4
  c.mesh.data = 1
  workdir = str(tmp_path / 'run')
  result = train.train_and_evaluate(c, workdir)
  saved = json.load(open(os.path.join(workdir, 'metrics.json')))
  assert set(saved['test']) == {'r1', 'r5', 'r10', 'mAP', 'mINP'}
  assert all(np.isfinite(v) for v in saved['test'].values())
  assert saved['test'] == pytest.approx(result['test'])
