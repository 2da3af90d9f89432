"""The CLIP head: its towers' BMM and causal semantics, the objective's terms, and the program end to end."""
import os

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import base
from ivt_jax.objectives import clip as clip_losses
from ivt_jax.models import clip as clip_model
from ivt_jax.models import encoder as model_lib
from ivt_jax.training import step as step_lib


def tiny_clip_config(**clip):
  c = base.get_config()
  c.model.head = 'clip'
  c.data.image_size = (32, 16)
  c.data.text_length = 12
  c.model.patch_size = 8
  c.model.stride = 8
  c.model.vocab_size = 50
  c.model.clip.update(vision_width=32, vision_layers=2, vision_heads=2, text_width=32, text_layers=2,
                      text_heads=2, embed_dim=16, context_length=16, num_classes=5)
  c.model.clip.update(**clip)
  return c


@pytest.fixture(scope='module')
def tiny():
  module = clip_model.build(tiny_clip_config())
  params = model_lib.init_module_params(module, jax.random.key(0))
  return module, params


def _texts():
  ids = np.array([[48, 5, 6, 7, 8, 49, 0, 0], [48, 9, 10, 49, 0, 0, 0, 0]], np.int32)
  return ids, (ids > 0).astype(np.int32)


def test_parameters_named_as_openai(tiny):
  _, params = tiny
  assert set(params) == {'visual', 'text', 'classifier'}
  assert set(params['visual']) == {'conv1', 'class_embedding', 'positional_embedding', 'ln_pre', 'transformer',
                                   'ln_post', 'proj'}
  assert 'bias' not in params['visual']['conv1']
  assert set(params['text']) == {'token_embedding', 'positional_embedding', 'transformer', 'ln_final',
                                 'text_projection'}
  block = params['text']['transformer']['resblocks_1']
  assert set(block) == {'ln_1', 'attn_in_proj', 'attn_out_proj', 'ln_2', 'mlp_c_fc', 'mlp_c_proj'}
  assert params['visual']['positional_embedding'].shape == (1 + 4 * 2, 32)
  assert params['classifier']['kernel'].shape == (16, 5)
  assert abs(float(np.std(params['classifier']['kernel'])) - 0.001) < 5e-4


def test_text_feature_is_causal_and_read_at_the_end_token(tiny):
  module, params = tiny
  ids, mask = _texts()
  embed = lambda i, m, keep=None, train=False: np.asarray(module.apply(
      {'params': params}, jnp.asarray(i), jnp.asarray(m), None if keep is None else jnp.asarray(keep), train,
      method='embed_texts'))
  base_feat = embed(ids, mask)
  padded = ids.copy()
  padded[1, 5] = 33  # after the end token, masked: nothing changes (causal, and not a key)
  np.testing.assert_array_equal(embed(padded, mask), base_feat)
  changed = ids.copy()
  changed[0, 2] = 40  # a real token: the feature changes
  assert np.abs(embed(changed, mask)[0] - base_feat[0]).max() > 1e-4
  # Dropped by BMM: no later token reads it, so its id no longer matters ...
  keep = np.ones_like(ids, bool)
  keep[0, 2] = False
  dropped = embed(ids, mask, keep, True)
  np.testing.assert_allclose(embed(changed, mask, keep, True), dropped, atol=1e-6)
  assert np.abs(dropped[0] - base_feat[0]).max() > 1e-4
  # ... while the start and end tokens stay whatever the keep mask says.
  keep_ends = np.ones_like(ids, bool)
  keep_ends[0, 0] = keep_ends[0, 5] = False
  np.testing.assert_allclose(embed(ids, mask, keep_ends, True), base_feat, atol=1e-6)


def test_dropped_image_patches_are_not_read(tiny):
  module, params = tiny
  rng = np.random.default_rng(0)
  images = rng.uniform(-1, 1, size=(2, 32, 16, 3)).astype(np.float32)
  keep = np.ones((2, 9), bool)
  keep[0, 1] = False  # the first patch (rows 0-7, columns 0-7) of image 0
  embed = lambda im: np.asarray(module.apply({'params': params}, jnp.asarray(im), jnp.asarray(keep), True,
                                             method='embed_images'))
  other = images.copy()
  other[0, :8, :8] = -images[0, :8, :8]
  np.testing.assert_allclose(embed(other), embed(images), atol=1e-6)
  other[0, 8:16, :8] = 0.3  # a kept patch
  assert np.abs(embed(other)[0] - embed(images)[0]).max() > 1e-4


def test_objective_is_the_weighted_terms(tiny):
  module, params = tiny
  rng = np.random.default_rng(1)
  b, v, l = 4, 3, 8
  ids = rng.integers(1, 48, size=(b, v, l)).astype(np.int32)
  ids[..., -1] = 49
  batch = {'images': rng.integers(0, 256, size=(b, v, 32, 16, 3), dtype=np.uint8), 'text_ids': ids,
           'text_mask': np.ones((b, v, l), np.int32), 'image_keep': np.ones((b, v, 9), bool),
           'text_keep': np.ones((b, v, l), bool), 'person_id': np.array([11, 11, 30, 42], np.int32)}
  table = np.array([3, 11, 30, 42, 50])
  total, aux = step_lib.clip_loss_fn(params, batch, jax.random.key(0), module, class_table=table)
  assert set(aux) == {'loss_sdm', 'loss_id'}
  np.testing.assert_allclose(float(total), float(aux['loss_sdm'] + aux['loss_id']), rtol=1e-6)
  pairs = step_lib.flatten_levels(batch)
  x = module.apply({'params': params}, model_lib.normalize_images(pairs['images']), method='embed_images')
  z = module.apply({'params': params}, pairs['text_ids'], pairs['text_mask'], method='embed_texts')
  np.testing.assert_allclose(float(aux['loss_sdm']), float(clip_losses.sdm_loss(x, z, pairs['person_id'], 50.0)),
                             rtol=1e-5)
  classes = np.repeat([1, 1, 2, 3], 3)  # ranks in the table, each sample's three levels
  logits = lambda f: module.apply({'params': params}, f, method='classify')
  np.testing.assert_allclose(float(aux['loss_id']),
                             float(clip_losses.id_loss(logits(x), logits(z), jnp.asarray(classes))), rtol=1e-5)
  other = clip_model.build(tiny_clip_config(sdm_weight=0.0, id_weight=0.0, itc_weight=2.0, cmpm_weight=0.5))
  total, aux = step_lib.clip_loss_fn(params, batch, jax.random.key(0), other)
  assert set(aux) == {'loss_itc', 'loss_cmpm'}
  np.testing.assert_allclose(float(total), float(2 * aux['loss_itc'] + 0.5 * aux['loss_cmpm']), rtol=1e-6)


def test_bad_config_refused_by_key():
  with pytest.raises(ValueError, match='model.clip.text_width .* divisible by model.clip.text_heads'):
    clip_model.build(tiny_clip_config(text_heads=3))
  with pytest.raises(ValueError, match='data.text_length .* exceeds model.clip.context_length'):
    clip_model.build(tiny_clip_config(context_length=8))
  with pytest.raises(ValueError, match='model.clip.id_weight > 0 needs model.clip.num_classes'):
    clip_model.build(tiny_clip_config(num_classes=0))


@pytest.mark.slow
def test_clip_head_trains_evaluates_and_serves_search(tmp_path):
  """The program with model.head='clip' on the tiny demo: ID classes from the training identities, the loss
  terms logged, best parameters restored for test, and the search model loaded from the workdir."""
  from ivt_jax import search
  from ivt_jax.training import loop as train
  from tests.test_train import tiny_demo
  c = tiny_demo(str(tmp_path / 'data'))
  c.model.head = 'clip'
  c.model.clip.update(vision_width=32, vision_layers=1, vision_heads=2, text_width=32, text_layers=1,
                      text_heads=2, embed_dim=32, context_length=64)
  c.total_steps = 6
  c.eval_every_epochs = 1
  c.checkpoint_every_steps = 3
  workdir = str(tmp_path / 'run')
  result = train.train_and_evaluate(c, workdir)
  assert 0.0 <= result['test']['r1'] <= 100.0 and result['best_step'] in (3, 6)
  model = search.load_model(workdir)
  assert model.config.model.head == 'clip'
  assert model.config.model.clip.num_classes == 24 - 4 - 6  # the training identities of the tiny SynthPEDES
  assert model.params['classifier']['kernel'].shape == (32, 14)
  emb = search.embed_texts(model, ['a man in a red coat'])
  assert emb.shape == (1, 32) and abs(float(np.linalg.norm(emb)) - 1.0) < 1e-5
  assert os.path.isfile(os.path.join(workdir, 'metrics.json'))


@pytest.mark.slow
def test_clip_head_on_8_devices_matches_one_device(tmp_path):
  """Data and FSDP sharding (2 x 4) train the two towers and the ID classifier as one device does."""
  from ivt_jax.training import loop as train
  from tests.test_train import _assert_trees, _final_params, tiny_demo
  assert jax.device_count() == 8
  c = tiny_demo(str(tmp_path / 'data'))
  c.model.head = 'clip'
  c.model.clip.update(vision_width=32, vision_layers=1, vision_heads=2, text_width=32, text_layers=1,
                      text_heads=2, embed_dim=32, context_length=64)
  c.total_steps = 3
  c.mesh.data, c.mesh.fsdp = 1, 1
  train.train_and_evaluate(c, str(tmp_path / 'one'))
  c.mesh.data, c.mesh.fsdp = 2, 4
  train.train_and_evaluate(c, str(tmp_path / 'eight'))
  _, p1 = _final_params(str(tmp_path / 'one'))
  _, p8 = _final_params(str(tmp_path / 'eight'))
  assert set(p1) == {'visual', 'text', 'classifier'}
  # The key bias (the middle third of attn_in_proj/bias) adds the same q.b_k to every logit of a query, which
  # the softmax ignores: its true gradient is 0, its computed one rounding noise, which Adam scales up to
  # +-lr per step with a sign that depends on the summation order. Everything else is compared.
  def without_key_bias(tree):
    flat = flax.traverse_util.flatten_dict(jax.device_get(tree), sep='/')
    for k, v in flat.items():
      if k.endswith('attn_in_proj/bias'):
        n = v.shape[0] // 3
        flat[k] = np.concatenate([v[:n], v[2 * n:]])
    return flat
  _assert_trees(without_key_bias(p1), without_key_bias(p8), atol=5e-5)  # Adam near 0: see test_train.py


@pytest.mark.parametrize('name', ['cuhk_clip', 'icfg_clip', 'rstp_clip'])
def test_recipe_configs_build_vit_b16(name):
  """IRRA's recipe on each dataset: CLIP ViT-B/16 + its text transformer (149,620,737 parameters without
  logit_scale, which the recipe fixes), the ID classifier on top; Adam with the classifier at 5x lr."""
  import importlib
  from ivt_jax.training import optim
  c = importlib.import_module(f'configs.{name}').get_config()
  c.model.vocab_size = 49408
  c.model.clip.num_classes = 11003
  assert (c.model.head, c.data.tokenizer, c.data.text_length, tuple(c.data.image_size)) == (
      'clip', 'clip', 77, (384, 128))
  n = clip_model.param_count(c)
  classifier = 512 * 11003 + 11003
  # OpenAI's ViT-B/16 at 224 has 197 image positions; at 384 x 128 there are 1 + 24 x 8 = 193.
  assert n - classifier == 149_620_737 - 1 - (197 - 193) * 768
  tx, schedule = optim.make_optimizer(c, 100)
  assert float(schedule(0)) == pytest.approx(1e-6) and float(schedule(500)) == pytest.approx(1e-5)
