"""Attention maps: grid shapes, probabilities that sum to 1, the text-match cosines, the upsampling geometry
and the command's PNG."""
import os

import numpy as np
import pytest
from PIL import Image

from input_pipeline import shapes
from ivt_jax.search import attention_maps
from ivt_jax import search
from tests.test_search import tiny_model, tiny_run  # noqa: F401 (session fixtures: a tiny demo workdir)


def _image(tiny_run):  # noqa: F811
  folder = os.path.join(tiny_run[1].data.manual_dir, 'imgs', 'test')
  return os.path.join(folder, sorted(os.listdir(folder))[0])


def test_maps_shapes_and_sums(tiny_run, tiny_model):  # noqa: F811
  m = tiny_model
  c = m.config
  grid = shapes.patch_grid(tuple(c.data.image_size), c.model.patch_size, c.model.stride)
  image = search.load_image(_image(tiny_run), m.image_size)
  texts = ['black backpack', 'a woman in a red dress']
  maps = attention_maps.compute_maps(m, image, texts)
  n = 1 + grid[0] * grid[1]
  assert maps['grid'] == grid
  assert maps['attention'].shape == (c.model.num_heads, n, n)
  np.testing.assert_allclose(maps['attention'].sum(-1), 1.0, atol=1e-5)  # every query, every head
  assert (maps['attention'] >= 0).all()
  assert maps['cls_attention'].shape == grid
  assert maps['cls_attention'].sum() == pytest.approx(1.0, abs=1e-5)
  assert (maps['cls_attention'] >= 0).all()
  # The CLS map is the head-averaged CLS row over the patch keys, renormalized.
  row = maps['attention'].mean(0)[0, 1:]
  np.testing.assert_allclose(maps['cls_attention'].ravel(), row / row.sum(), rtol=1e-5)
  assert maps['text_match'].shape == (len(texts),) + grid
  assert np.abs(maps['text_match']).max() <= 1.0 + 1e-6


def test_sown_path_equals_plain_model_and_match_is_cosine(tiny_run, tiny_model):  # noqa: F811
  from ivt_jax.models import encoder as model_lib
  m = tiny_model
  image = search.load_image(_image(tiny_run), m.image_size)[None]
  tokens, attention = attention_maps.image_tokens_and_attention(m.encoder, m.params, image)
  # The attention-exposing path computes what the model computes without it.
  plain = m.encoder.apply({'params': m.params}, model_lib.normalize_images(image), method='image_tokens')
  np.testing.assert_allclose(tokens, np.asarray(plain), atol=1e-5)
  first = attention_maps.image_tokens_and_attention(m.encoder, m.params, image, layer=0)[1]
  assert first.shape == attention.shape
  if m.config.model.depth > 1:
    assert not np.allclose(first, attention)
  with pytest.raises(ValueError, match='layer 5 does not exist'):
    attention_maps.image_tokens_and_attention(m.encoder, m.params, image, layer=5)
  # Text match: cosine of the text embedding (the model's own embed_texts) with each patch token.
  ids, mask = m.tokenizer.encode(['black backpack'], int(m.config.data.text_length))
  z = np.asarray(m.encoder.apply({'params': m.params}, ids, mask, method='embed_texts'))[0]
  patches = tokens[0, 1:]
  want = patches @ z / np.linalg.norm(patches, axis=1) / np.linalg.norm(z)
  got = attention_maps.compute_maps(m, image[0], ['black backpack'])['text_match'][0]
  np.testing.assert_allclose(got.ravel(), want, atol=1e-5)


def test_cls_map_and_attention_layers_order():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 3, 7, 7))
  probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  cls = attention_maps.cls_attention_map(probs, (3, 2))
  assert cls.shape == (2, 3, 2)
  np.testing.assert_allclose(cls.sum((1, 2)), 1.0, rtol=1e-6)
  with pytest.raises(ValueError, match='does not fit'):
    attention_maps.cls_attention_map(probs, (2, 2))
  tree = {'blocks_10': {'attn': {'attention': (np.full((1,), 10.0),)}},
          'blocks_2': {'attn': {'attention': (np.full((1,), 2.0),)}},
          'norm': {'other': (np.zeros(1),)}}
  assert [float(a[0]) for a in attention_maps.attention_layers(tree)] == [2.0, 10.0]
  with pytest.raises(ValueError, match="no 'attention'"):
    attention_maps.attention_layers({'norm': {'other': (np.zeros(1),)}})


def test_upsample_geometry():
  # 4x3 grid of 8x8 patches with stride 8 on a 32x24 input: a one-hot patch peaks at its centre.
  grid = np.zeros((4, 3))
  grid[2, 1] = 1.0
  up = attention_maps.upsample(grid, (32, 24), patch_size=8, stride=8)
  assert up.shape == (32, 24)
  ys, xs = np.nonzero(up == up.max())
  assert set(ys) <= {19, 20} and set(xs) <= {11, 12}  # centre of patch (2, 1): pixel (20, 12)
  # Constant maps stay constant; values stay within the grid's range; a larger output is the same map.
  flat = attention_maps.upsample(np.full((4, 3), 0.25), (32, 24), 8, 8, out_size=(64, 48))
  np.testing.assert_allclose(flat, 0.25, rtol=1e-6)
  ramp = np.arange(12, dtype=float).reshape(4, 3)
  big = attention_maps.upsample(ramp, (32, 24), 8, 8, out_size=(128, 96))
  assert big.min() >= 0 and big.max() <= 11
  # Overlapping patches (16 wide, stride 12): patch centres at 8, 20, 32 ...
  over = attention_maps.upsample(np.eye(5, 2)[::-1].copy(), (64, 28), 16, 12)
  assert over.shape == (64, 28)
  np.testing.assert_allclose(over[:8, :8], 0.0)
  assert over[60, 3] == pytest.approx(1.0) and over[60, 25] == pytest.approx(0.0)


def test_command_writes_png(tiny_run, tiny_model, tmp_path, capsys):  # noqa: F811
  out = str(tmp_path / 'maps' / 'map.png')
  workdir = tiny_run[0]
  assert attention_maps.main([f'--checkpoint={workdir}', f'--image={_image(tiny_run)}', '--text',
                              'black backpack', '--text', 'red dress', f'--out={out}', '--height=96']) == 0
  printed = capsys.readouterr().out
  assert 'CLS attention peaks at patch' in printed and '"black backpack": best patch' in printed
  assert f'wrote {out}' in printed
  image = Image.open(out)
  assert image.format == 'PNG'
  h, w = tiny_model.image_size
  panel_w = int(round(96 * w / h))
  assert image.size[0] == 8 + 4 * (panel_w + 8)  # image | CLS attention | two text-match maps
  assert attention_maps.cli([f'--checkpoint={workdir}', f'--image={tmp_path / "none.png"}',
                             f'--out={tmp_path / "x.png"}']) == 2
  assert 'none.png' in capsys.readouterr().err


def test_overlay_and_figure_layout():
  from ivt_jax.search import pictures as visualize
  image = np.full((6, 4, 3), 100, np.uint8)
  heat = np.zeros((6, 4))
  heat[0, 0] = 1.0
  mixed = visualize.overlay(image, heat, alpha=0.5, cmap='gray')
  np.testing.assert_array_equal(mixed[0, 0], [178, 178, 178])  # (100 + 255) / 2, rounded
  np.testing.assert_array_equal(mixed[1, 1], [50, 50, 50])
  with pytest.raises(ValueError, match='differ in size'):
    visualize.overlay(image, np.zeros((3, 4)))
  fig = visualize.attention_figure(image, [('image', None, ''), ('heat', heat, 'note')], cmap='gray')
  assert fig.size[0] == 8 + 2 * (4 + 8)
  pixels = np.asarray(fig)
  rows = np.nonzero((pixels[:, 8:12] == 100).all(axis=(1, 2)))[0]  # the plain image panel
  assert len(rows) == 6
  np.testing.assert_array_equal(pixels[rows[0]:rows[0] + 6, 20:24], mixed)
