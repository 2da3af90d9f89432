import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ivt_jax.models import encoder as model
from tests.conftest import tiny_config


def _setup(**kw):
  c = tiny_config(**kw)
  cfg = model.encoder_config(c)
  params = model.init_params(cfg, jax.random.key(0))
  return c, cfg, model.Encoder(cfg), params


def _inputs(cfg, b=3, length=16, seed=0):
  rng = np.random.default_rng(seed)
  h, w = cfg.image_size
  images = jnp.asarray(rng.uniform(-1, 1, (b, h, w, 3)), jnp.float32)
  ids = jnp.asarray(rng.integers(1, cfg.vocab_size, (b, length)), jnp.int32)
  lengths = np.array([length, 9, 5][:b])
  mask = jnp.asarray(np.arange(length)[None] < lengths[:, None], jnp.int32)
  return images, ids, mask


def test_param_counts_match_reference_vit_b():
  from configs import base
  for stride, expected in ((12, 166_631_424), (16, 166_450_176)):
    c = base.get_config()
    c.model.stride = stride
    cfg = model.encoder_config(c)
    shapes = jax.eval_shape(lambda: model.init_params(cfg, jax.random.key(0)))
    assert model.count_params(shapes) == expected
    assert cfg.num_image_tokens == {12: 311, 16: 193}[stride]


def test_shapes_and_dtypes():
  _, cfg, enc, p = _setup()
  images, ids, mask = _inputs(cfg)
  xi = enc.apply({'params': p}, images, method=enc.embed_images)
  xt = enc.apply({'params': p}, ids, mask, method=enc.embed_texts)
  assert xi.shape == (3, 32) and xt.shape == (3, 32)
  assert xi.dtype == jnp.float32 and xt.dtype == jnp.float32
  assert p['pos_embed'].shape == (1, cfg.num_image_tokens, 32)
  assert p['patch_embed']['kernel'].shape == (16, 16, 3, 32)


def test_bfloat16_compute_keeps_float32_params():
  _, cfg, enc, p = _setup(dtype='bfloat16')
  assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(p))
  images, ids, mask = _inputs(cfg)
  tokens = enc.apply({'params': p}, images, method=enc.image_tokens)
  assert tokens.dtype == jnp.bfloat16
  _, cfg32, enc32, _ = _setup()
  ref = enc32.apply({'params': p}, images, method=enc32.embed_images)
  out = enc.apply({'params': p}, images, method=enc.embed_images)
  np.testing.assert_allclose(out, ref, atol=0.1)


def test_padding_does_not_change_text_embedding():
  _, cfg, enc, p = _setup()
  _, ids, mask = _inputs(cfg)
  ids2 = ids.at[1, 9:].set(7).at[2, 5:].set(3)  # change only padded positions
  a = enc.apply({'params': p}, ids, mask, method=enc.embed_texts)
  b = enc.apply({'params': p}, ids2, mask, method=enc.embed_texts)
  np.testing.assert_allclose(a, b, atol=1e-6)
  # A shorter padded length gives the same embedding too.
  short = enc.apply({'params': p}, ids[1:2, :9], mask[1:2, :9], method=enc.embed_texts)
  np.testing.assert_allclose(a[1:2], short, atol=1e-5)


def test_real_tokens_do_change_text_embedding():
  _, cfg, enc, p = _setup()
  _, ids, mask = _inputs(cfg)
  a = enc.apply({'params': p}, ids, mask, method=enc.embed_texts)
  b = enc.apply({'params': p}, ids.at[1, 3].set(ids[1, 3] % 99 + 1), mask, method=enc.embed_texts)
  assert np.abs(a[1] - b[1]).max() > 1e-4


def test_masking_equals_removal():
  """A token masked out of attention in every layer leaves the CLS output as removing it would."""
  _, cfg, enc, p = _setup(drop_path=0.0, text_embed_dropout=0.0)
  images, ids, mask = _inputs(cfg, b=1)
  keep = np.ones((1, 16), bool)
  keep[0, [2, 5, 11]] = False
  masked = enc.apply({'params': p}, ids, mask, jnp.asarray(keep), True, method=enc.embed_texts)
  # Removal: run the transformer on the kept tokens only (embeddings computed at full length first).
  def removed(module, ids, mask, keep):
    x = module.embeddings(ids, deterministic=True)[:, keep[0]]
    return module._transformer(x, mask[:, keep[0]].astype(bool), 'text', False)[:, 0]
  ref = enc.apply({'params': p}, ids, mask, keep, method=removed)
  np.testing.assert_allclose(masked, ref, atol=1e-5)
  # Image side as well.
  n = cfg.num_image_tokens
  keep_i = np.ones((1, n), bool)
  keep_i[0, [1, 4, 7]] = False
  masked_i = enc.apply({'params': p}, images, jnp.asarray(keep_i), True, method=enc.embed_images)
  full_tokens = enc.apply({'params': p}, images, method=enc.image_tokens)
  def removed_img(module, images, keep):
    b = images.shape[0]
    x = module.patch_embed(images).reshape(b, -1, cfg.width)
    x = jnp.concatenate([jnp.broadcast_to(module.cls_token, (b, 1, cfg.width)), x], 1)
    x = (x + module.pos_embed + module.type_embed)[:, keep[0]]
    return module._transformer(x, jnp.ones(x.shape[:2], bool), 'image', False)[:, 0]
  ref_i = enc.apply({'params': p}, images, keep_i, method=removed_img)
  np.testing.assert_allclose(masked_i, ref_i, atol=1e-5)
  assert np.abs(full_tokens[:, 0] - masked_i).max() > 1e-4  # dropping changed the output


def test_bmm_drawn_mask_bounds():
  for length, ratio in ((16, 0.2), (311, 0.2), (193, 0.5)):
    keep = np.asarray(model.draw_keep_mask(jax.random.key(3), 2000, length, ratio))
    dropped = (~keep).sum(1)
    assert keep[:, 0].all()
    assert dropped.min() == 0 and dropped.max() == int(ratio * length)
    assert abs(dropped.mean() - int(ratio * length) / 2) < 0.1 * int(ratio * length) + 0.5
    # Positions uniform over 1..N-1.
    freq = (~keep[:, 1:]).mean(0)
    assert freq.std() < 0.35 * freq.mean()


def test_bmm_in_training_and_not_at_eval():
  _, cfg, enc, p = _setup(drop_path=0.0, text_embed_dropout=0.0)
  images, ids, mask = _inputs(cfg)
  ev = enc.apply({'params': p}, images, method=enc.embed_images)
  # Eval ignores a keep mask entirely.
  keep = jnp.zeros((3, cfg.num_image_tokens), bool)
  np.testing.assert_array_equal(enc.apply({'params': p}, images, keep, False, method=enc.embed_images), ev)
  # Training draws from the 'bmm' stream: deterministic for a seed, different across seeds.
  f = lambda s: enc.apply({'params': p}, images, None, True, method=enc.embed_images,
                          rngs={'bmm': jax.random.key(s), 'dropout': jax.random.key(0)})
  np.testing.assert_array_equal(f(1), f(1))
  assert np.abs(f(1) - f(2)).max() > 0
  # A given keep mask overrides the stream (no 'bmm' rng needed) and CLS is forced kept.
  keep = jnp.ones((3, cfg.num_image_tokens), bool).at[:, 0].set(False)
  out = enc.apply({'params': p}, images, keep, True, method=enc.embed_images, rngs={'dropout': jax.random.key(0)})
  np.testing.assert_allclose(out, ev, atol=1e-6)
  with pytest.raises(ValueError, match='keep mask has shape'):
    enc.apply({'params': p}, images, keep[:, :5], True, method=enc.embed_images)


def test_modality_mlps_get_gradient_only_from_their_modality():
  from ivt_jax.objectives import cmpm as losses
  _, cfg, enc, p = _setup()
  images, ids, mask = _inputs(cfg)
  pid = jnp.array([0, 1, 0])
  def img_loss(p):
    x = enc.apply({'params': p}, images, method=enc.embed_images)
    return losses.cmpm_loss(x, jax.lax.stop_gradient(x[::-1]), pid)
  def txt_loss(p):
    z = enc.apply({'params': p}, ids, mask, method=enc.embed_texts)
    return losses.cmpm_loss(jax.lax.stop_gradient(z[::-1]), z, pid)
  gi, gt = jax.grad(img_loss)(p), jax.grad(txt_loss)(p)
  norm = lambda t: float(sum(jnp.abs(x).sum() for x in jax.tree_util.tree_leaves(t)))
  for b in ('blocks_0', 'blocks_1'):
    assert norm(gi[b]['mlp_txt']) == 0 and norm(gi[b]['mlp_vis']) > 0
    assert norm(gt[b]['mlp_vis']) == 0 and norm(gt[b]['mlp_txt']) > 0
    for shared in ('attn', 'norm1', 'norm2'):
      assert norm(gi[b][shared]) > 0 and norm(gt[b][shared]) > 0
  assert norm(gi['embeddings']) == 0 and norm(gt['patch_embed']) == 0


def test_stochastic_depth_schedule_and_rng():
  _, cfg, enc, p = _setup(drop_path=0.5, text_embed_dropout=0.0, depth=3)
  blocks = model.Encoder(cfg).bind({'params': model.init_params(cfg, jax.random.key(0))})
  assert [blocks.blocks[i].drop_path for i in range(3)] == [0.0, 0.25, 0.5]
  _, ids, mask = _inputs(cfg)
  p = model.init_params(cfg, jax.random.key(0))
  keep = jnp.ones(ids.shape, bool)
  f = lambda s: model.Encoder(cfg).apply({'params': p}, ids, mask, keep, True, method='embed_texts',
                                         rngs={'dropout': jax.random.key(s)})
  np.testing.assert_array_equal(f(0), f(0))
  assert np.abs(f(0) - f(1)).max() > 0


def test_remat_gives_same_gradients():
  _, cfg, enc, p = _setup(drop_path=0.0, text_embed_dropout=0.0)
  _, cfg_r, enc_r, _ = _setup(drop_path=0.0, text_embed_dropout=0.0, remat=True)
  images, _, _ = _inputs(cfg)
  g = jax.grad(lambda p: enc.apply({'params': p}, images, method=enc.embed_images).sum())(p)
  gr = jax.grad(lambda p: enc_r.apply({'params': p}, images, method=enc_r.embed_images).sum())(p)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), g, gr)


def test_config_errors_name_the_key():
  c = tiny_config()
  c.model.num_heads = 5
  with pytest.raises(ValueError, match='model.num_heads'):
    model.encoder_config(c)
  c = tiny_config(dtype='float16')
  with pytest.raises(ValueError, match='model.dtype'):
    model.encoder_config(c)
  with pytest.raises(ValueError, match='model.init_std'):
    model.encoder_config(tiny_config(init_std=0.0))
  _, cfg, enc, p = _setup()
  with pytest.raises(ValueError, match='data.image_size'):
    enc.apply({'params': p}, jnp.zeros((1, 32, 32, 3)), method=enc.embed_images)


def test_short_levels_run_on_their_own_positions_with_the_same_loss_and_gradients():
  """step.loss_fn with per-level text lengths == one forward over the full length, when the rest is padding."""
  from ivt_jax.training import step
  c, cfg, enc, p = _setup(drop_path=0.0, text_embed_dropout=0.0)
  rng = np.random.default_rng(1)
  b, length, lengths = 4, 16, (16, 9, 6)
  h, w = cfg.image_size
  n_tok = np.stack([rng.integers(3, n + 1, b) for n in lengths], 1)  # (B, 3) real tokens per text
  mask = (np.arange(length)[None, None] < n_tok[..., None]).astype(np.int32)
  keep = np.stack([np.stack([np.asarray(model.draw_keep_mask(jax.random.key(10 * i + l), 1, n, 0.2))[0].tolist()
                             + [True] * (length - n) for l, n in enumerate(lengths)]) for i in range(b)])
  batch = dict(images=jnp.asarray(rng.integers(0, 256, (b, 3, h, w, 3)), jnp.uint8),
               text_ids=jnp.asarray(rng.integers(1, cfg.vocab_size, (b, 3, length)) * mask, jnp.int32),
               text_mask=jnp.asarray(mask), text_keep=jnp.asarray(keep),
               image_keep=jnp.ones((b, 3, cfg.num_image_tokens), bool),
               person_id=jnp.asarray([0, 0, 1, 1], jnp.int32))
  key = jax.random.key(0)
  loss_and_grad = jax.jit(jax.value_and_grad(step.loss_fn), static_argnums=(3, 4))
  whole, g_whole = loss_and_grad(p, batch, key, enc, None)
  short, g_short = loss_and_grad(p, batch, key, enc, lengths)
  np.testing.assert_allclose(short, whole, rtol=1e-5)
  for a, r in zip(jax.tree_util.tree_leaves(g_short), jax.tree_util.tree_leaves(g_whole)):
    np.testing.assert_allclose(a, r, rtol=1e-4, atol=1e-6)
  # Real tokens past a level's length are left out: those texts' embeddings change, no others.
  z = lambda n: np.asarray(step.apply_texts(p, batch, key, enc, 'embed_texts', n)).reshape(b, 3, -1)
  z_whole, z_cut = z(None), z((16, 4, 6))
  np.testing.assert_allclose(z_cut[:, 2], z_whole[:, 2], rtol=1e-4, atol=1e-5)
  changed = np.abs(z_cut[:, 1] - z_whole[:, 1]).max(-1) > 1e-3
  np.testing.assert_array_equal(changed, n_tok[:, 1] > 4)
  with pytest.raises(ValueError, match='do not fit'):
    step.loss_fn(p, batch, key, enc, (16, 17, 6))


def test_init_std_sets_the_block_kernels_only():
  """model.init_std scales the fresh qkv/proj/fc1/fc2 kernels of every block (truncated normal: the sample
  std is 0.88 x the given one); embeddings, CLS and norms keep their initialization."""
  *_, p02 = _setup(width=64, mlp_dim=128)
  *_, p08 = _setup(width=64, mlp_dim=128, init_std=0.08)
  for blk in ('blocks_0', 'blocks_1'):
    for path in (('attn', 'qkv'), ('attn', 'proj'), ('mlp_vis', 'fc1'), ('mlp_txt', 'fc2')):
      k02, k08 = p02[blk][path[0]][path[1]]['kernel'], p08[blk][path[0]][path[1]]['kernel']
      np.testing.assert_allclose(float(jnp.std(k02)), 0.02 * 0.88, rtol=0.1)
      np.testing.assert_allclose(float(jnp.std(k08)), 0.08 * 0.88, rtol=0.1)
  for name in ('cls_token', 'pos_embed', 'type_embed'):
    np.testing.assert_array_equal(p02[name], p08[name])
  np.testing.assert_array_equal(p02['embeddings']['word_embeddings']['embedding'],
                                p08['embeddings']['word_embeddings']['embedding'])


def test_sincos2d_pos_embed_init():
  """model.pos_embed_init='sincos2d': the image pos_embed starts as the 2-D sine-cosine codes of the patch grid
  (CLS row zero) and stays a learned parameter; everything else is initialized as before."""
  _, cfg, enc, p = _setup(pos_embed_init='sincos2d')
  *_, ref = _setup()
  rows, cols = cfg.grid  # 64x32 input, 16x16 patches, stride 12: 5 x 2
  pe = np.asarray(p['pos_embed'])[0]
  assert pe.shape == (1 + rows * cols, cfg.width)
  np.testing.assert_array_equal(pe[0], 0.0)
  q = cfg.width // 4
  omega = 10_000.0 ** -(np.arange(q) / (q - 1))
  for index in range(rows * cols):
    r, c = divmod(index, cols)  # row-major, as the patch convolution flattens
    np.testing.assert_allclose(pe[1 + index], np.concatenate([np.sin(c * omega), np.cos(c * omega),
                                                              np.sin(r * omega), np.cos(r * omega)]), atol=1e-6)
  for name in ('cls_token', 'type_embed'):
    np.testing.assert_array_equal(p[name], ref[name])
  # It is trained: the loss has a gradient for it.
  images, ids, mask = _inputs(cfg)
  grad = jax.grad(lambda q_: jnp.sum(enc.apply({'params': q_}, images, method=enc.embed_images) ** 2))(p)
  assert float(jnp.abs(grad['pos_embed']).max()) > 0
  with pytest.raises(ValueError, match='model.pos_embed_init'):
    model.encoder_config(tiny_config(pos_embed_init='learned'))
  with pytest.raises(ValueError, match='divisible by 4'):
    model.sincos2d_pos_embed((2, 2), 30)


@pytest.mark.parametrize('remat', [False, True])
def test_embeddings_compute_the_last_block_for_cls_alone_with_the_same_numbers(remat):
  """embed_* run the last block on the CLS query only; values and gradients equal the full sequence's CLS."""
  _, cfg, enc, p = _setup(drop_path=0.3, text_embed_dropout=0.1, depth=3, remat=remat)
  images, ids, mask = _inputs(cfg)
  img_keep = model.draw_keep_mask(jax.random.key(5), 3, cfg.num_image_tokens, 0.2)
  txt_keep = model.draw_keep_mask(jax.random.key(6), 3, ids.shape[1], 0.2)
  rngs = {'dropout': jax.random.key(7)}
  def both(p, cls_only):
    xi = enc.apply({'params': p}, images, img_keep, True, cls_only, method='image_tokens', rngs=rngs)
    xt = enc.apply({'params': p}, ids, mask, txt_keep, True, cls_only, method='text_tokens', rngs=rngs)
    return xi, xt
  full_i, full_t = both(p, False)
  cls_i, cls_t = both(p, True)
  assert full_i.shape[1] == cfg.num_image_tokens and cls_i.shape[1] == 1 and cls_t.shape[1] == 1
  np.testing.assert_allclose(cls_i[:, 0], full_i[:, 0], atol=2e-5)
  np.testing.assert_allclose(cls_t[:, 0], full_t[:, 0], atol=2e-5)
  emb = enc.apply({'params': p}, images, img_keep, True, method='embed_images', rngs=rngs)
  np.testing.assert_array_equal(emb, cls_i[:, 0])
  loss = lambda p, cls_only: sum(jnp.sum(jnp.sin(3 * x[:, 0])) for x in both(p, cls_only))
  g_full, g_cls = jax.grad(loss)(p, False), jax.grad(loss)(p, True)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), g_cls, g_full)
  # Not vacuous: the dropped and dropout-ed runs differ from the deterministic one.
  assert np.abs(cls_i[:, 0] - enc.apply({'params': p}, images, method='embed_images')).max() > 1e-3


@pytest.mark.parametrize('hw,k,s,dtype', [((40, 24), 8, 6, 'float32'), ((37, 21), 8, 8, 'float32'),
                                          ((128, 48), 16, 10, 'float32'), ((40, 24), 8, 6, 'bfloat16')])
def test_patch_embed_matmul_equals_conv(hw, k, s, dtype):
  """The matrix-product patch embedding computes the convolution, forward and kernel gradient, for overlapping,
  non-overlapping and ragged (size not a multiple of the stride) grids."""
  x = jnp.asarray(np.random.default_rng(0).normal(size=(3, *hw, 3)), jnp.float32)
  outs = {}
  for impl in ('conv', 'matmul'):
    mod = model.PatchEmbed(16, k, s, jnp.dtype(dtype), impl)
    p = mod.init(jax.random.key(1), x)['params']
    y = mod.apply({'params': p}, x)
    g = jax.grad(lambda p: jnp.sum(mod.apply({'params': p}, x).astype(jnp.float32) ** 2))(p)
    outs[impl] = (y, g)
  (yc, gc), (ym, gm) = outs['conv'], outs['matmul']
  rows, cols = (hw[0] - k) // s + 1, (hw[1] - k) // s + 1
  assert yc.shape == ym.shape == (3, rows, cols, 16)
  tol = 1e-5 if dtype == 'float32' else 2e-2
  np.testing.assert_allclose(np.float32(ym), np.float32(yc), atol=tol, rtol=tol)
  np.testing.assert_allclose(gm['kernel'], gc['kernel'], rtol=tol, atol=tol * 10)
  np.testing.assert_allclose(gm['bias'], gc['bias'], rtol=tol, atol=tol * 10)
  assert np.abs(np.float32(yc)).max() > 0.1


def test_patch_embed_config_checked():
  c = tiny_config()
  c.model.patch_embed = 'fft'
  with pytest.raises(ValueError, match='model.patch_embed'):
    model.encoder_config(c)
