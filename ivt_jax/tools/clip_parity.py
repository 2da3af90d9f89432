"""The CLIP head against OpenAI's own model: a randomly initialized `clip.model.CLIP` of a checkout of openai/CLIP
(imported from the directory given, none of its code here), its state dict converted by `ivt_jax.weights.clip`,
and both models' embeddings of the same images and texts compared.

  python -m ivt_jax.tools.clip_parity --reference_repo=DIR [--size=tiny|vit-b16] [--torchscript] [--json=F]

DIR is a checkout of github.com/openai/CLIP (its clip/model.py is loaded by path; it needs torch and numpy only).
--torchscript saves the reference as a TorchScript archive first (the format of OpenAI's released ViT-B-16.pt) and
reads it back through `config.init.clip`'s loader. Prints the largest differences and exits 1 above --atol.
Needs torch (the CPU build is enough) beside JAX.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile

import numpy as np

SIZES = {  # embed_dim, image_resolution, vision_layers, vision_width, patch, context, vocab, width, heads, layers
    'tiny': (32, 64, 2, 64, 16, 16, 300, 64, 4, 2),
    'vit-b16': (512, 224, 12, 768, 16, 77, 49408, 512, 8, 12),
}


def load_reference_module(repo: str):
  path = os.path.join(os.path.expanduser(repo), 'clip', 'model.py')
  if not os.path.isfile(path):
    raise FileNotFoundError(f'--reference_repo={repo}: no clip/model.py there (a checkout of openai/CLIP)')
  spec = importlib.util.spec_from_file_location('_openai_clip_model', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def reference_outputs(repo: str, size: str, seed: int, torchscript_path: str = ''):
  """-> (state dict as numpy, uint8 images (N, R, R, 3), texts (N, context), image and text embeddings)."""
  import torch  # pylint: disable=g-import-not-at-top
  ref = load_reference_module(repo)
  embed, res, v_layers, v_width, patch, context, vocab, width, heads, layers = SIZES[size]
  torch.manual_seed(seed)
  model = ref.CLIP(embed, res, v_layers, v_width, patch, context, vocab, width, heads, layers).float().eval()
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, size=(3, res, res, 3), dtype=np.uint8)
  mean, std = np.array([0.48145466, 0.4578275, 0.40821073]), np.array([0.26862954, 0.26130258, 0.27577711])
  pixels = torch.from_numpy(((images / 255.0 - mean) / std).transpose(0, 3, 1, 2).astype(np.float32))
  texts = np.zeros((3, context), np.int64)
  for row, n in enumerate((3, context // 2, context)):  # the last fills every position
    texts[row, :n] = [vocab - 2, *rng.integers(1, vocab - 2, size=n - 2), vocab - 1]
  tokens = torch.from_numpy(texts)
  with torch.no_grad():
    image_emb = model.encode_image(pixels).numpy()
    text_emb = model.encode_text(tokens).numpy()
    if torchscript_path:
      torch.jit.save(torch.jit.trace(model, (pixels, tokens)), torchscript_path)
  state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
  return state, images, texts, image_emb, text_emb


def ours(state_or_file, size: str, images: np.ndarray, texts: np.ndarray):
  """The CLIP head built for `size`, loaded from a state dict or a file through config.init.clip's loader."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from configs import base  # pylint: disable=g-import-not-at-top
  from ivt_jax.models import clip as clip_model  # pylint: disable=g-import-not-at-top
  from ivt_jax.weights import clip as clip_weights  # pylint: disable=g-import-not-at-top
  from ivt_jax.weights import pretrained  # pylint: disable=g-import-not-at-top
  from ivt_jax.models import encoder as model_lib  # pylint: disable=g-import-not-at-top
  embed, res, v_layers, v_width, patch, context, vocab, width, heads, layers = SIZES[size]
  c = base.get_config()
  c.model.head = 'clip'
  c.data.image_size = (res, res)
  c.data.text_length = context
  c.model.patch_size = c.model.stride = patch
  c.model.vocab_size = vocab
  c.model.clip.update(vision_width=v_width, vision_layers=v_layers, vision_heads=v_width // 64 or 1,
                      text_width=width, text_layers=layers, text_heads=heads, embed_dim=embed,
                      context_length=context, num_classes=0, id_weight=0.0)
  module = clip_model.build(c)
  params = jax.device_get(model_lib.init_module_params(module, jax.random.key(0)))
  if isinstance(state_or_file, str):
    c.init.clip = state_or_file
    params, report = pretrained.load_pretrained(c, params)
  else:
    params, report = pretrained.merge(params, [clip_weights.convert_clip(state_or_file, module.cfg)])
  image_emb = module.apply({'params': params}, model_lib.normalize_images(jnp.asarray(images)),
                           method='embed_images')
  mask = (np.cumsum(texts == vocab - 1, axis=1) - (texts == vocab - 1)) == 0
  text_emb = module.apply({'params': params}, jnp.asarray(texts, jnp.int32), jnp.asarray(mask, jnp.int32),
                          method='embed_texts')
  return np.asarray(image_emb), np.asarray(text_emb), report


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--reference_repo', required=True, help='a checkout of github.com/openai/CLIP')
  p.add_argument('--size', default='tiny', choices=sorted(SIZES))
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--torchscript', action='store_true', help='go through a TorchScript archive, as ViT-B-16.pt')
  p.add_argument('--atol', type=float, default=1e-4)
  p.add_argument('--json', default='', help='also write the figures here')
  args = p.parse_args(argv)
  if importlib.util.find_spec('torch') is None:
    print('error: the reference model needs torch (pip install torch; the CPU build is enough)', file=sys.stderr)
    return 2
  with tempfile.TemporaryDirectory() as tmp:
    archive = os.path.join(tmp, 'ViT-random.pt') if args.torchscript else ''
    state, images, texts, ref_img, ref_txt = reference_outputs(args.reference_repo, args.size, args.seed, archive)
    img, txt, _ = ours(archive or state, args.size, images, texts)
  result = {'size': args.size, 'torchscript': args.torchscript, 'params': int(sum(v.size for v in state.values())),
            'image_max_abs_diff': float(np.abs(img - ref_img).max()),
            'text_max_abs_diff': float(np.abs(txt - ref_txt).max()),
            'image_emb_scale': float(np.abs(ref_img).max()), 'text_emb_scale': float(np.abs(ref_txt).max())}
  ok = max(result['image_max_abs_diff'], result['text_max_abs_diff']) <= args.atol
  result['pass'] = bool(ok)
  print(f"openai/CLIP {args.size} ({result['params']:,} parameters{', via TorchScript' if args.torchscript else ''}): "
        f"image embeddings max |diff| {result['image_max_abs_diff']:.2e} (values up to "
        f"{result['image_emb_scale']:.2f}), text {result['text_max_abs_diff']:.2e} (up to "
        f"{result['text_emb_scale']:.2f}): {'PASS' if ok else 'FAIL'} at atol {args.atol:g}")
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(result, f, indent=1)
  return 0 if ok else 1


if __name__ == '__main__':
  sys.exit(main())
