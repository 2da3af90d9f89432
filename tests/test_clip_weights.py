"""CLIP weights: OpenAI/open_clip and Hugging Face names converted strictly; the converted head's embeddings equal
a numpy transcription of OpenAI's `clip/model.py` forward (encode_image, encode_text) on the same random state
dict within 1e-4."""
import numpy as np
import pytest

from ivt_jax.models import clip as clip_model
from ivt_jax.weights import clip as clip_weights
from ivt_jax.models import encoder as model_lib
from ivt_jax.weights import mapping as weight_mapping
from ivt_jax.weights import report as weight_report
from tests.test_clip_model import tiny_clip_config

W, LAYERS, HEADS, EMBED, PATCH, CONTEXT, VOCAB = 32, 2, 2, 16, 8, 16, 60


def random_openai_state(rng, grid=4):
  """A randomly initialized CLIP ViT state dict in OpenAI's names and layouts (PyTorch (out, in) weights)."""
  s = {}
  n = lambda *shape, std=0.2: (rng.standard_normal(shape) * std).astype(np.float32)
  s['visual.conv1.weight'] = n(W, 3, PATCH, PATCH, std=0.05)
  s['visual.class_embedding'] = n(W)
  s['visual.positional_embedding'] = n(grid * grid + 1, W)
  for name in ('visual.ln_pre', 'visual.ln_post', 'ln_final'):
    s[f'{name}.weight'], s[f'{name}.bias'] = 1 + n(W, std=0.1), n(W, std=0.1)
  s['visual.proj'] = n(W, EMBED)
  s['token_embedding.weight'] = n(VOCAB, W)
  s['positional_embedding'] = n(CONTEXT, W)
  s['text_projection'] = n(W, EMBED)
  s['logit_scale'] = np.array(np.log(1 / 0.07), np.float32)
  for prefix in ('visual.transformer', 'transformer'):
    for i in range(LAYERS):
      k = f'{prefix}.resblocks.{i}.'
      s[k + 'attn.in_proj_weight'], s[k + 'attn.in_proj_bias'] = n(3 * W, W), n(3 * W, std=0.05)
      s[k + 'attn.out_proj.weight'], s[k + 'attn.out_proj.bias'] = n(W, W), n(W, std=0.05)
      s[k + 'mlp.c_fc.weight'], s[k + 'mlp.c_fc.bias'] = n(4 * W, W), n(4 * W, std=0.05)
      s[k + 'mlp.c_proj.weight'], s[k + 'mlp.c_proj.bias'] = n(W, 4 * W, std=0.1), n(W, std=0.05)
      for ln in ('ln_1', 'ln_2'):
        s[k + ln + '.weight'], s[k + ln + '.bias'] = 1 + n(W, std=0.1), n(W, std=0.1)
  return s


def to_hf(s):
  """The same weights in Hugging Face CLIPModel's names and layouts."""
  hf = {'logit_scale': s['logit_scale'], 'vision_model.embeddings.class_embedding': s['visual.class_embedding'],
        'vision_model.embeddings.patch_embedding.weight': s['visual.conv1.weight'],
        'vision_model.embeddings.position_embedding.weight': s['visual.positional_embedding'],
        'visual_projection.weight': s['visual.proj'].T, 'text_projection.weight': s['text_projection'].T,
        'text_model.embeddings.token_embedding.weight': s['token_embedding.weight'],
        'text_model.embeddings.position_embedding.weight': s['positional_embedding'],
        'text_model.embeddings.position_ids': np.arange(CONTEXT)[None],
        'vision_model.embeddings.position_ids': np.arange(17)[None]}
  for ours, theirs in (('visual.ln_pre', 'vision_model.pre_layrnorm'), ('visual.ln_post', 'vision_model.post_layernorm'),
                       ('ln_final', 'text_model.final_layer_norm')):
    hf[theirs + '.weight'], hf[theirs + '.bias'] = s[ours + '.weight'], s[ours + '.bias']
  for prefix, tower in (('visual.transformer', 'vision_model'), ('transformer', 'text_model')):
    for i in range(LAYERS):
      k, h = f'{prefix}.resblocks.{i}.', f'{tower}.encoder.layers.{i}.'
      for j, name in enumerate('qkv'):
        hf[f'{h}self_attn.{name}_proj.weight'] = s[k + 'attn.in_proj_weight'][j * W:(j + 1) * W]
        hf[f'{h}self_attn.{name}_proj.bias'] = s[k + 'attn.in_proj_bias'][j * W:(j + 1) * W]
      for a, b in (('attn.out_proj', 'self_attn.out_proj'), ('mlp.c_fc', 'mlp.fc1'), ('mlp.c_proj', 'mlp.fc2'),
                   ('ln_1', 'layer_norm1'), ('ln_2', 'layer_norm2')):
        hf[f'{h}{b}.weight'], hf[f'{h}{b}.bias'] = s[f'{k}{a}.weight'], s[f'{k}{a}.bias']
  return hf


# ---- OpenAI's forward, transcribed in numpy (float64) -------------------------------------------------------


def _ln(x, s, name):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + 1e-5) * s[name + '.weight'] + s[name + '.bias']


def _block(x, s, k, mask):
  """ResidualAttentionBlock on x (N, L, D): nn.MultiheadAttention(in_proj, out_proj) with an additive mask."""
  def attention(y):
    n, l, d = y.shape
    qkv = y @ s[k + 'attn.in_proj_weight'].T + s[k + 'attn.in_proj_bias']
    q, kk, v = (qkv[..., i * d:(i + 1) * d].reshape(n, l, HEADS, d // HEADS).transpose(0, 2, 1, 3) for i in range(3))
    logits = q @ kk.transpose(0, 1, 3, 2) / np.sqrt(d // HEADS) + mask
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    out = (p @ v).transpose(0, 2, 1, 3).reshape(n, l, d)
    return out @ s[k + 'attn.out_proj.weight'].T + s[k + 'attn.out_proj.bias']
  x = x + attention(_ln(x, s, k + 'ln_1'))
  h = _ln(x, s, k + 'ln_2') @ s[k + 'mlp.c_fc.weight'].T + s[k + 'mlp.c_fc.bias']
  h = h * (1 / (1 + np.exp(-1.702 * h)))  # QuickGELU
  return x + h @ s[k + 'mlp.c_proj.weight'].T + s[k + 'mlp.c_proj.bias']


def encode_image(s, image):
  """image: (N, 3, H, W) CLIP-normalized -> (N, EMBED). conv1 (stride = kernel), class token, positions."""
  n, _, h, w = image.shape
  gh, gw = h // PATCH, w // PATCH
  patches = image.reshape(n, 3, gh, PATCH, gw, PATCH).transpose(0, 2, 4, 1, 3, 5).reshape(n, gh * gw, -1)
  x = patches @ s['visual.conv1.weight'].reshape(W, -1).T
  x = np.concatenate([np.broadcast_to(s['visual.class_embedding'], (n, 1, W)), x], axis=1)
  x = _ln(x + s['visual.positional_embedding'], s, 'visual.ln_pre')
  for i in range(LAYERS):
    x = _block(x, s, f'visual.transformer.resblocks.{i}.', 0.0)
  return _ln(x[:, 0], s, 'visual.ln_post') @ s['visual.proj']


def encode_text(s, text):
  """text: (N, CONTEXT) ids -> (N, EMBED): causal mask (-inf above the diagonal), features at argmax(text)."""
  x = s['token_embedding.weight'][text] + s['positional_embedding']
  mask = np.triu(np.full((CONTEXT, CONTEXT), -np.inf), 1)
  for i in range(LAYERS):
    x = _block(x, s, f'transformer.resblocks.{i}.', mask)
  x = _ln(x, s, 'ln_final')
  return x[np.arange(len(text)), text.argmax(-1)] @ s['text_projection']


def _ours(image_size=(32, 32)):
  c = tiny_clip_config(vision_width=W, vision_layers=LAYERS, vision_heads=HEADS, text_width=W,
                       text_layers=LAYERS, text_heads=HEADS, embed_dim=EMBED, context_length=CONTEXT,
                       num_classes=7)
  c.data.image_size = image_size
  c.data.text_length = CONTEXT
  c.model.vocab_size = VOCAB
  c.model.patch_size = c.model.stride = PATCH
  return clip_model.clip_config(c)


def _apply(cfg, s):
  import jax
  from ivt_jax.weights import pretrained
  module = clip_model.ClipModel(cfg)
  params = jax.device_get(model_lib.init_module_params(module, jax.random.key(0)))
  converted = clip_weights.convert_clip(s, cfg, file='test')
  params, report = pretrained.merge(params, [converted])
  return module, params, report


@pytest.mark.parametrize('names', ['openai', 'hf'])
def test_embeddings_equal_the_reference_forward(names):
  import jax.numpy as jnp
  rng = np.random.default_rng(0)
  s = random_openai_state(rng)
  cfg = _ours()
  module, params, report = _apply(cfg, s if names == 'openai' else to_hf(s))
  assert report.origin['classifier/kernel'] == 'init' and report.origin['visual/proj'] == 'clip'
  images = rng.integers(0, 256, size=(3, 32, 32, 3), dtype=np.uint8)
  ours = np.asarray(module.apply({'params': params}, model_lib.normalize_images(jnp.asarray(images)),
                                 method='embed_images'))
  clip_in = (images / 255.0 - np.array(clip_model.CLIP_MEAN)) / np.array(clip_model.CLIP_STD)
  ref = encode_image({k: v.astype(np.float64) for k, v in s.items()}, clip_in.transpose(0, 3, 1, 2))
  np.testing.assert_allclose(ours, ref, atol=1e-4)
  text = np.zeros((3, CONTEXT), np.int32)
  for row, n in enumerate((3, 9, 14)):  # <start>, n - 2 tokens, <end> (the highest id), padding 0
    text[row, :n] = [VOCAB - 2, *rng.integers(1, VOCAB - 2, size=n - 2), VOCAB - 1]
  mask = (np.cumsum(text == VOCAB - 1, axis=1) - (text == VOCAB - 1)) == 0  # up to and including <end>
  ours = np.asarray(module.apply({'params': params}, jnp.asarray(text), jnp.asarray(mask.astype(np.int32)),
                                 method='embed_texts'))
  ref = encode_text({k: v.astype(np.float64) for k, v in s.items()}, text)
  np.testing.assert_allclose(ours, ref, atol=1e-4)


def test_hf_and_openai_names_give_the_same_parameters():
  s = random_openai_state(np.random.default_rng(1))
  cfg = _ours((32, 16))
  a = clip_weights.convert_clip(s, cfg).arrays
  b = clip_weights.convert_clip(to_hf(s), cfg).arrays
  assert a.keys() == b.keys() and len(a) == 8 + 5 + 2 * LAYERS * 12  # visual 8, text 5, 12 per block
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  # The 4x4 grid resized to the 4x2 grid of a 32x16 image, as IRRA's resize_pos_embed (bilinear).
  want = weight_mapping.resize_pos_embed(s['visual.positional_embedding'][None], (4, 2))[0]
  np.testing.assert_allclose(a['visual/positional_embedding'], want)
  with_module = {f'module.{k}': v for k, v in s.items()}  # open_clip's DataParallel checkpoints
  np.testing.assert_array_equal(clip_weights.convert_clip(with_module, cfg).arrays['visual/proj'], a['visual/proj'])


def test_strict_errors_name_every_problem():
  s = random_openai_state(np.random.default_rng(2))
  s['visual.transformer.resblocks.5.attn.in_proj_weight'] = s['visual.transformer.resblocks.0.attn.in_proj_weight']
  s['visual.extra'] = np.zeros(3, np.float32)
  del s['transformer.resblocks.1.mlp.c_fc.bias']
  s['text_projection'] = np.zeros((W, 24), np.float32)
  with pytest.raises(weight_report.WeightMappingError) as e:
    clip_weights.convert_clip(s, _ours())
  msg = str(e.value)
  assert "unexpected key: 'visual.transformer.resblocks.5.attn.in_proj_weight'" in msg
  assert "unexpected key: 'visual.extra'" in msg
  assert "shape mismatch: text/text_projection <- 'text_projection' (32, 24), the model expects (32, 16)" in msg
  assert 'model.clip.vision_width' in msg
  converted = clip_weights.convert_clip(s, _ours(), strict=False)
  assert converted.absent['text/transformer/resblocks_1/mlp_c_fc/bias'] == ('transformer.resblocks.1.mlp.c_fc.bias',)


def test_loaded_from_a_file_with_the_report(tmp_path):
  from safetensors.numpy import save_file
  import jax
  from ivt_jax.weights import pretrained
  s = random_openai_state(np.random.default_rng(3))
  path = tmp_path / 'open_clip_vit.safetensors'
  save_file(s, str(path))
  c = tiny_clip_config(vision_width=W, vision_layers=LAYERS, vision_heads=HEADS, text_width=W, text_layers=LAYERS,
                       text_heads=HEADS, embed_dim=EMBED, context_length=CONTEXT, num_classes=7)
  c.data.text_length = CONTEXT
  c.model.vocab_size = VOCAB
  c.init.clip = str(path)
  module = clip_model.build(c)
  params = jax.device_get(model_lib.init_module_params(module, jax.random.key(0)))
  loaded, report = pretrained.load_pretrained(c, params)
  np.testing.assert_array_equal(loaded['text']['text_projection'], s['text_projection'])
  text = str(report)
  assert 'clip: ' + str(path) in text and 'visual/blocks_*/attn_in_proj' in text and 'blocks 0-1' in text
  assert 'ID classifier' in text and "CLIP's learned temperature" in text and 'resized' in text
  c.init.ivt = str(path)
  with pytest.raises(ValueError, match='unset config.init.ivt'):
    pretrained.load_pretrained(c, params)


def test_parity_tool_against_openai_clip(tmp_path, capsys):
  """`ivt_jax.tools.clip_parity`: OpenAI's own CLIP (a checkout named by $CLIP_REFERENCE_REPO, run with torch)
  through a TorchScript archive; without torch the tool says what it needs."""
  import importlib.util
  import os
  from ivt_jax.tools import clip_parity
  repo = os.environ.get('CLIP_REFERENCE_REPO', '')
  if importlib.util.find_spec('torch') is None:
    assert clip_parity.main(['--reference_repo', repo or str(tmp_path)]) == 2
    assert 'needs torch' in capsys.readouterr().err
    pytest.skip('torch is not installed: the comparison with OpenAI\'s model runs where it is')
  if not repo:
    pytest.skip('set CLIP_REFERENCE_REPO to a checkout of openai/CLIP')
  out = tmp_path / 'parity.json'
  assert clip_parity.main(['--reference_repo', repo, '--torchscript', '--json', str(out)]) == 0
  import json
  result = json.loads(out.read_text())
  assert result['pass'] and result['image_max_abs_diff'] < 1e-4 and result['text_max_abs_diff'] < 1e-4
