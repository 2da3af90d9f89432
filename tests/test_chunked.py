"""Less work per step, the same numbers: BMM by token removal equals BMM by masking, and the chunked
contrastive gradient (train.contrastive_chunk) equals the whole batch's, on 1 device and on a data x fsdp mesh."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ivt_jax.models import heads
from ivt_jax.models import encoder as model_lib
from ivt_jax.runtime import sharding as sharding_lib
from ivt_jax.training import chunked
from ivt_jax.training import setup as setup_lib
from ivt_jax.training import step as step_lib
from tests.conftest import tiny_config


def _config(head='ivt', **kw):
  c = tiny_config(width=32, mlp_dim=64, drop_path=0.3, text_embed_dropout=0.2)
  c.model.head = head
  if head == 'clip':
    c.model.clip.update(vision_width=32, vision_layers=2, vision_heads=4, embed_dim=16, context_length=16,
                        text_width=32, text_layers=2, text_heads=4, num_classes=4,
                        # 0.1, not the recipe's 0.02: the logits' 1/temperature magnifies float32 rounding of
                        # the embeddings (at 0.02 the chunked and whole-batch gradients differ by 2e-4 of 30)
                        temperature=0.1)
  c.data.bmm_ratio = 0.3
  c.data.bmm_drops = 'fixed'
  c.data.ids_per_batch, c.data.images_per_id = 4, 2
  for k, v in kw.items():
    node, key = c, k.split('.')
    for part in key[:-1]:
      node = node[part]
    node[key[-1]] = v
  return c


def _state_and_batch(c, batch=8, seed=1):
  module = heads.build(c)
  params = model_lib.init_module_params(module, jax.random.key(0))
  return module, params, {k: np.array(v) for k, v in setup_lib.random_batch(c, batch, seed=seed).items()}


def _grads(c, params, batch, chunk, mesh=None):
  module = heads.build(c)
  table = np.arange(4, dtype=np.int32) if c.model.head == 'clip' else None
  rng = jax.random.key(5)

  def run(p, b):
    if chunk:
      return step_lib.chunked_value_and_grad(p, b, rng, module, chunk, class_table=table)
    if c.model.head == 'clip':
      return jax.value_and_grad(step_lib.clip_loss_fn, has_aux=True)(p, b, rng, module, class_table=table)
    return jax.value_and_grad(lambda p, b: (step_lib.loss_fn(p, b, rng, module), {}), has_aux=True)(p, b)

  if mesh is not None:
    batch = sharding_lib.global_batch(batch, mesh)
  (loss, _), grads = jax.jit(run)(params, batch)
  return float(loss), jax.device_get(grads)


def _assert_close(a, b, tol):
  """Every leaf within tol of the leaf's scale: |a - b| <= tol * max(1, max |b|) (float32 sums in another
  order; the CLIP objective's gradients reach ~30 at temperature 0.02)."""
  la, lb = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves(b)
  assert len(la) == len(lb)
  for (path, x), y in zip(la, lb):
    y = np.asarray(y)
    scale = max(1.0, float(np.max(np.abs(y)))) if y.size else 1.0
    np.testing.assert_allclose(np.asarray(x), y, atol=tol * scale, rtol=0, err_msg=jax.tree_util.keystr(path))


def test_removal_shortens_the_image_sequence_only_with_fixed_drops():
  c = _config()
  enc = model_lib.encoder_config(c)
  n = enc.num_image_tokens
  assert enc.image_keep_length == n - int(0.3 * n) < n
  c.data.bmm_drops = 'uniform'
  assert model_lib.encoder_config(c).image_keep_length == n  # no row is sure to drop anything: masked path
  c.data.bmm_drops, c.model.bmm_tokens = 'fixed', 'mask'
  assert model_lib.encoder_config(c).image_keep_length == n
  c.model.bmm_tokens = 'drop'
  with pytest.raises(ValueError, match='model.bmm_tokens'):
    model_lib.encoder_config(c)


@pytest.mark.parametrize('head', ['ivt', 'clip'])
def test_removal_equals_masking_embeddings_and_gradients(head):
  removed = _config(head)
  masked = _config(head, **{'model.bmm_tokens': 'mask'})
  _, params, batch = _state_and_batch(removed)
  n = model_lib.encoder_config(removed).num_image_tokens
  assert (batch['image_keep'].sum(-1) == n - int(0.3 * n)).all()  # fixed drops
  # A row that keeps fewer than the removal length (dropped tokens left masked in the short sequence).
  batch['image_keep'][0, 0, 1:6] = False
  loss_r, grads_r = _grads(removed, params, batch, 0)
  loss_m, grads_m = _grads(masked, params, batch, 0)
  np.testing.assert_allclose(loss_r, loss_m, rtol=1e-6)
  _assert_close(grads_r, grads_m, 1e-5)
  module_r, module_m = heads.build(removed), heads.build(masked)
  images = model_lib.normalize_images(jnp.asarray(batch['images'][:, 0]))
  keep = jnp.asarray(batch['image_keep'][:, 0])
  embed = lambda m: m.apply({'params': params}, images, keep, True, method='embed_images',
                            rngs={'dropout': jax.random.key(2)})
  np.testing.assert_allclose(embed(module_r), embed(module_m), atol=1e-5)


def test_removal_costs_fewer_flops():
  def flops(c):
    s = setup_lib.TrainSetup(c, jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ('data', 'fsdp')), 8)
    return s.compile().cost_analysis()['flops']
  removed = _config(**{'model.depth': 4})
  masked = _config(**{'model.depth': 4, 'model.bmm_tokens': 'mask'})
  assert flops(removed) < 0.93 * flops(masked)


def test_a_mask_that_keeps_too_much_skips_the_step():
  c = _config()
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ('data', 'fsdp'))
  s = setup_lib.TrainSetup(c, mesh, 8)
  batch = {k: np.array(v) for k, v in setup_lib.random_batch(c, 8, seed=1).items()}
  batch['image_keep'][3, 1] = True  # keeps every token: more than the removal path holds
  state = s.init_state()
  before = jax.device_get(state.params)
  state, metrics = s.step(state, sharding_lib.global_batch(batch, mesh))
  assert float(metrics['bmm_fits']) == 0.0
  _assert_close(jax.device_get(state.params), before, 0.0)


@pytest.mark.parametrize('head', ['ivt', 'clip'])
def test_chunked_gradient_equals_the_whole_batch(head):
  c = _config(head)
  _, params, batch = _state_and_batch(c)
  loss, grads = _grads(c, params, batch, 0)
  for chunk in (2, 4):
    loss_c, grads_c = _grads(c, params, batch, chunk)
    np.testing.assert_allclose(loss_c, loss, rtol=1e-6)
    _assert_close(grads_c, grads, 1e-5)


def test_chunked_gradient_on_a_data_x_fsdp_mesh():
  c = _config(**{'mesh.data': 2, 'mesh.fsdp': 4})
  mesh = sharding_lib.make_mesh(c)
  _, params, batch = _state_and_batch(c, batch=16)
  loss, grads = _grads(c, params, batch, 0)
  loss_c, grads_c = _grads(c, params, batch, 8, mesh)
  np.testing.assert_allclose(loss_c, loss, rtol=1e-6)
  _assert_close(grads_c, grads, 1e-5)
  # The whole training step under the training shardings (gathered weights, donated state).
  def step(chunk):
    c.train.contrastive_chunk = chunk
    s = setup_lib.TrainSetup(c, mesh, 16)
    state, metrics = s.step(s.init_state(), sharding_lib.global_batch(batch, mesh))
    return jax.device_get(state.params), float(metrics['loss'])
  (p0, l0), (p1, l1) = step(0), step(8)
  np.testing.assert_allclose(l1, l0, rtol=1e-6)
  _assert_close(p1, p0, 1e-6)


def test_chunk_errors_name_the_key():
  with pytest.raises(ValueError, match='train.contrastive_chunk .3. must divide the global batch of 8'):
    chunked.check_chunk(8, 3)
  c = _config('part')
  module, params, batch = _state_and_batch(c)
  with pytest.raises(ValueError, match='not supported for model.head=part'):
    step_lib.chunked_value_and_grad(params, batch, jax.random.key(0), module, 4)
  c = _config()
  c.train.contrastive_chunk = 3
  with pytest.raises(ValueError, match='train.contrastive_chunk'):
    setup_lib.TrainSetup(c, sharding_lib.make_mesh(c), 16)
