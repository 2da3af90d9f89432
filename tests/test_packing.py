"""Text packing (data.text_packing): the kept tokens of many texts in one sequence per device give the numbers
of the masked path - embeddings, gradients and the training step, on 1 device and on a data x fsdp mesh - at
fewer FLOPs; a batch that needs more slots than its program has is skipped, never cut."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ivt_jax.models import encoder as model_lib
from ivt_jax.models import heads
from ivt_jax.models import packing
from ivt_jax.runtime import sharding as sharding_lib
from ivt_jax.training import setup as setup_lib
from ivt_jax.training import step as step_lib
from tests.test_chunked import _assert_close
from tests.test_chunked import _config as _chunked_config


def _config(**kw):
  """test_chunked's config (dropout, stochastic depth and fixed BMM drops on), 3 blocks, texts packed."""
  return _chunked_config(**{'model.depth': 3, 'data.text_packing': True, **kw})


def _batch(c, batch=8, seed=1):
  b = {k: np.array(v) for k, v in setup_lib.random_batch(c, batch, seed=seed).items()}
  # Edge cases: a text of [CLS] alone and one that fills every position with nothing dropped.
  b['text_mask'][0, 1] = 0
  b['text_mask'][0, 1, 0] = 1
  b['text_mask'][1, 0] = 1
  b['text_keep'][1, 0] = True
  return b


def test_pack_puts_each_texts_tokens_in_order_text_after_text():
  valid = jnp.array([[[1, 1, 0, 0], [1, 0, 1, 1], [1, 0, 0, 0]]], bool)
  p = packing.pack(valid, 8)
  np.testing.assert_array_equal(p.order[0, :6], [0, 1, 4, 6, 7, 8])
  np.testing.assert_array_equal(p.segment[0], [0, 0, 1, 1, 1, 2, -1, -1])
  np.testing.assert_array_equal(p.starts[0], [0, 2, 5])
  assert int(p.count[0]) == 6
  x = jnp.arange(12.0).reshape(1, 3, 4)
  np.testing.assert_array_equal(packing.gather_slots(x, p)[0, :6], [0, 1, 4, 6, 7, 8])
  windows, own = packing.text_windows(packing.gather_slots(x, p)[..., None], p, 4)
  np.testing.assert_array_equal(windows[1, :3, 0], [4, 6, 7])
  np.testing.assert_array_equal(own, [[1, 1, 0, 0], [1, 1, 1, 0], [1, 0, 0, 0]])


def test_slots_hold_the_largest_group_in_granules_and_never_exceed_every_position():
  valid = np.zeros((12, 64), bool)
  valid[:, :36] = True  # 432 tokens in one group
  assert packing.slot_granule(12, 64) == 64
  assert packing.slots_for(valid, 1) == 448
  assert packing.slots_for(valid, 2) == 256  # 216 per group of 6 texts
  assert packing.slots_for(np.ones((12, 64), bool), 1) == 12 * 64
  assert packing.slot_granule(64, 32) == 32 * 4  # at most packing.GRANULES slot counts per length
  with pytest.raises(ValueError, match='12 texts do not split into 5 groups'):
    packing.slots_for(valid, 5)


def test_batch_valid_cuts_each_level_to_its_length_and_keeps_cls():
  mask = np.ones((2, 3, 8), np.int32)
  keep = np.ones((2, 3, 8), bool)
  keep[0, 0, 0] = False
  valid = packing.batch_valid(mask, keep, (8, 4, 2), np)
  assert valid.shape == (6, 8)
  np.testing.assert_array_equal(valid.sum(1), [8, 4, 2, 8, 4, 2])


@pytest.mark.parametrize('groups', [1, 2, 4])
def test_packed_texts_equal_the_masked_path(groups):
  c = _config()
  module = heads.build(c)
  params = model_lib.init_module_params(module, jax.random.key(0))
  b = _batch(c)
  ids, mask, keep = (jnp.asarray(b[k].reshape(-1, 16)) for k in ('text_ids', 'text_mask', 'text_keep'))
  rows = jnp.arange(24, dtype=jnp.int32) + 7
  slots = packing.slots_for(packing.batch_valid(b['text_mask'], b['text_keep'], None, np), groups)
  assert slots < 24 * 16 // groups
  rng = {'dropout': jax.random.key(3)}
  masked = lambda p: module.apply({'params': p}, ids, mask, keep, True, rows=rows, method='embed_texts', rngs=rng)
  packed = lambda p: module.apply({'params': p}, ids, mask, keep, rows, groups=groups, slots=slots,
                                  method='embed_texts_packed', rngs=rng)
  np.testing.assert_allclose(packed(params), masked(params), atol=1e-5)
  objective = lambda f: jax.grad(lambda p: jnp.sum(jnp.sin(3 * f(p))))(params)
  _assert_close(objective(packed), objective(masked), 1e-5)


def _loss_and_grads(c, params, batch, text_packing, mesh=None):
  module = heads.build(c)
  rng = jax.random.key(5)
  lengths = setup_lib.shapes.level_text_lengths(c)
  run = lambda p, b: jax.value_and_grad(step_lib.loss_fn)(p, b, rng, module, lengths, text_packing)
  if mesh is not None:
    batch = sharding_lib.global_batch(batch, mesh)
  loss, grads = jax.jit(run)(params, batch)
  return float(loss), jax.device_get(grads)


@pytest.mark.parametrize('levels', ['full', 'short'])
def test_packed_loss_and_gradients_equal_the_unpacked_step(levels):
  extra = {}
  if levels == 'short':  # shorter phrase and word levels run as their own forwards unpacked, with their own
    # dropout draws: compared without randomness
    extra = {'data.phrase_text_length': 8, 'data.word_text_length': 4, 'model.drop_path': 0.0,
             'model.text_embed_dropout': 0.0}
  c = _config(**extra)
  params = model_lib.init_module_params(heads.build(c), jax.random.key(0))
  b = _batch(c)
  pk = setup_lib.text_packing(c, jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ('data', 'fsdp')), b)
  assert pk[0] == 1 and pk[1] < 24 * 16
  loss, grads = _loss_and_grads(c, params, b, None)
  loss_p, grads_p = _loss_and_grads(c, params, b, pk)
  np.testing.assert_allclose(loss_p, loss, rtol=1e-6)
  _assert_close(grads_p, grads, 1e-5)


def test_packed_training_step_on_a_data_x_fsdp_mesh():
  c = _config(**{'mesh.data': 2, 'mesh.fsdp': 4})
  mesh = sharding_lib.make_mesh(c)
  b = _batch(c, batch=16)
  groups, slots = setup_lib.text_packing(c, mesh, b)
  assert groups == 8 and slots < 6 * 16
  params = model_lib.init_module_params(heads.build(c), jax.random.key(0))
  loss, grads = _loss_and_grads(c, params, b, None)
  loss_p, grads_p = _loss_and_grads(c, params, b, (groups, slots), mesh)
  np.testing.assert_allclose(loss_p, loss, rtol=1e-6)
  _assert_close(grads_p, grads, 1e-5)

  def step(pack):
    c.data.text_packing = pack
    s = setup_lib.TrainSetup(c, mesh, 16, text_slots=slots)
    state, metrics = s.step(s.init_state(), sharding_lib.global_batch(b, mesh))
    return jax.device_get(state.params), jax.device_get(metrics)
  (p0, m0), (p1, m1) = step(False), step(True)
  assert float(m1['text_fits']) == 1.0 and 'text_fits' not in m0
  np.testing.assert_allclose(float(m1['loss']), float(m0['loss']), rtol=1e-6)
  _assert_close(p1, p0, 1e-6)


def test_packing_costs_fewer_flops():
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ('data', 'fsdp'))
  c = _config(**{'model.depth': 4})
  b = _batch(c)
  slots = setup_lib.text_packing(c, mesh, b)[1]
  flops = lambda s: s.compile().cost_analysis()['flops']
  packed = flops(setup_lib.TrainSetup(c, mesh, 8, text_slots=slots))
  c.data.text_packing = False
  assert packed < 0.97 * flops(setup_lib.TrainSetup(c, mesh, 8))


def test_a_batch_with_more_text_tokens_than_slots_skips_the_step():
  c = _config()
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ('data', 'fsdp'))
  b = _batch(c)
  slots = setup_lib.text_packing(c, mesh, b)[1]
  s = setup_lib.TrainSetup(c, mesh, 8, text_slots=slots)
  state = s.init_state()
  before = jax.device_get(state.params)
  b['text_mask'][:] = 1  # every position of every text
  b['text_keep'][:] = True
  state, metrics = s.step(state, sharding_lib.global_batch(b, mesh))
  assert float(metrics['text_fits']) == 0.0
  _assert_close(jax.device_get(state.params), before, 0.0)


def test_packing_errors_name_the_keys():
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ('data', 'fsdp'))
  c = _config(**{'model.head': 'part'})
  with pytest.raises(ValueError, match='data.text_packing .*model.head=.part.'):
    setup_lib.TrainSetup(c, mesh, 8)
  c = _config(**{'train.contrastive_chunk': 4})
  with pytest.raises(ValueError, match='data.text_packing .*train.contrastive_chunk'):
    setup_lib.TrainSetup(c, mesh, 8)
