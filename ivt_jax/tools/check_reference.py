"""Check it yourself: this encoder and training step beside the public reference implementation's, same weights.

  python -m ivt_jax.tools.check_reference --reference_repo=DIR [--size=small|vitb] [--batch=4] [--steps=2]
      [--text_length=32] [--seed=0] [--json=FILE]

DIR is the user's own checkout of TencentYoutuResearch/PersonRetrieval-IVT; nothing of it is in this project. Its
encoder (model/backbones/vit_vl.py) and CMPM loss (loss/cmps_loss.py) are imported from DIR by file path and need
PyTorch (`pip install torch`; CPU is enough). The check:
  1. builds the reference encoder with its own random initialization (`ivt_jax.tools.reference.build_encoder`;
     --size=small: 64x32 images, stride 16, width 64, 2 blocks, 2 heads, a 1,000-word vocabulary, a few
     seconds; --size=vitb: ViT-B at 384x128, stride 16, the bert-base-uncased vocabulary size, minutes on a CPU),
     and converts its state_dict into this project's parameters with the released-checkpoint converter
     (`ivt_jax.weights.mapping.convert_ivt`, strict: every parameter accounted for);
  2. embeds the same random images and token ids with both, in evaluation mode, and compares the CLS
     embeddings (image and text);
  3. runs --steps training steps of both from those weights on the same MLA batches (3 levels per sample,
     identity-balanced), with what is random switched off on both sides (stochastic depth, text dropout, BMM):
     the reference's loop (its encoder in training mode, its CMPM Loss, torch SGD with one group per tensor,
     biases at 2x lr, momentum 0.9, weight decay 1e-4) against `ivt_jax.training.step.train_step` with
     `optim.name='sgd'` and a constant lr of 0.005; compares each step's loss and, after the last step, every
     parameter (the reference's updated state_dict converted again).
Everything runs in float32 on the CPU. Printed: one line per figure (`name: value`) and a verdict; the exit status
is 0 when every difference is within its tolerance (embeddings 1e-4 relative to their scale, losses 1e-5
relative, parameters 1e-4 relative to each tensor's scale), 1 otherwise, 2 when torch or the checkout is missing.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from configs import base
from ivt_jax.models import encoder as model_lib
from ivt_jax.training import optim
from ivt_jax.weights import pretrained
from ivt_jax.training import step as step_lib
from ivt_jax.training import setup as step_setup
from ivt_jax.weights import mapping as weight_mapping
from ivt_jax.tools import reference as reference_lib

SIZES = {
    'small': dict(image_size=(64, 32), stride=16, width=64, depth=2, num_heads=2, vocab_size=1000),
    'vitb': dict(image_size=(384, 128), stride=16, width=768, depth=12, num_heads=12, vocab_size=30522),
}
TOLERANCE = {'embedding': 1e-4, 'loss': 1e-5, 'params': 1e-4}


def our_config(size: dict, text_length: int, lr: float = 0.005):
  """The project's config for the reference encoder's shape, stochastic parts off, SGD at a constant lr."""
  c = base.get_config()
  c.data.image_size = size['image_size']
  c.data.text_length = text_length
  c.data.bmm_ratio = 0.0
  c.model.update(patch_size=16, stride=size['stride'], width=size['width'], depth=size['depth'],
                 num_heads=size['num_heads'], mlp_dim=4 * size['width'], vocab_size=size['vocab_size'],
                 drop_path=0.0, text_embed_dropout=0.0)
  c.optim.update(name='sgd', lr=lr, min_lr=lr, warmup_epochs=0.0, warmup_init_lr=lr, bias_lr_factor=2.0,
                 momentum=0.9, weight_decay=1e-4)
  return c


def _numpy_state_dict(module) -> dict[str, np.ndarray]:
  return {k: v.detach().cpu().numpy().copy() for k, v in module.state_dict().items()}


def _relative(a, b) -> float:
  """max |a - b| / max |b| (0 when both are 0)."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  scale = float(np.max(np.abs(b))) if b.size else 0.0
  diff = float(np.max(np.abs(a - b))) if b.size else 0.0
  return diff / scale if scale > 0 else diff


def check(repo: str, size_name: str = 'small', batch: int = 4, images_per_id: int = 2, steps: int = 2,
          text_length: int = 32, seed: int = 0, log=print) -> dict[str, Any]:
  import torch  # pylint: disable=g-import-not-at-top
  size = SIZES[size_name]
  ref = reference_lib.load_reference(repo)
  random.seed(seed)
  torch.manual_seed(seed)
  encoder = reference_lib.build_encoder(ref, image_size=size['image_size'], stride=size['stride'],
                                        width=size['width'], depth=size['depth'], num_heads=size['num_heads'],
                                        vocab_size=size['vocab_size'], drop_path=0.0, text_dropout=0.0)
  config = our_config(size, text_length)
  config.data.images_per_id = images_per_id
  cfg = model_lib.encoder_config(config)
  module = model_lib.Encoder(cfg)
  fresh = model_lib.init_params(cfg, jax.random.key(seed))
  converted = weight_mapping.convert_ivt(_numpy_state_dict(encoder), cfg, file='reference (random init)')
  params, _ = pretrained.merge(fresh, [converted])
  params = jax.tree_util.tree_map(jnp.asarray, params)
  figures: dict[str, Any] = {'size': size_name, 'batch_samples': batch, 'steps': steps, 'text_length': text_length,
                             'torch': torch.__version__}

  # 2. Embeddings, evaluation mode.
  # Batches with the pipeline's shapes (step_setup.random_batch); BMM off: every keep mask all-kept.
  data = step_setup.random_batch(config, batch, seed=seed)
  flat = jax.device_get(step_lib.flatten_levels(data))  # (3B, ...) pairs, sample-major, as the step makes them
  images = np.asarray(model_lib.normalize_images(flat['images']))  # (3B, H, W, 3) in [-1, 1]
  images_t = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
  ids_t = torch.from_numpy(flat['text_ids'].astype(np.int64))
  mask_t = torch.from_numpy(flat['text_mask'].astype(np.int64))
  encoder.eval()
  with torch.no_grad():
    ref_img = encoder(images_t, mode='vis', use_mask=False)[:, 0].numpy()
    ref_txt = encoder(ids_t, mask_t, mode='txt', use_mask=False)[:, 0].numpy()
  our_img = np.asarray(module.apply({'params': params}, jnp.asarray(images), method='embed_images'))
  our_txt = np.asarray(module.apply({'params': params}, jnp.asarray(flat['text_ids']),
                                    jnp.asarray(flat['text_mask']), method='embed_texts'))
  figures['embedding/image_max_abs_diff'] = float(np.max(np.abs(our_img - ref_img)))
  figures['embedding/image_relative'] = _relative(our_img, ref_img)
  figures['embedding/text_max_abs_diff'] = float(np.max(np.abs(our_txt - ref_txt)))
  figures['embedding/text_relative'] = _relative(our_txt, ref_txt)

  # 3. Training steps from the same weights on the same batches.
  encoder.train()
  loss_fn = ref.cmps_loss.Loss(num_classes=8, feature_size=size['width'], epsilon=1e-8)
  optimizer = reference_lib.reference_optimizer(encoder)
  tx, schedule = optim.make_optimizer(config, steps_per_epoch=1000)
  state = step_lib.create_state(params, tx, jax.random.key(seed))
  train_step = jax.jit(lambda s, b: step_lib.train_step(s, b, encoder=module, tx=tx, schedule=schedule,
                                                        steps_per_epoch=1000))
  for i in range(steps):
    data = step_setup.random_batch(config, batch, seed=seed + 1 + i)
    state, metrics = train_step(state, data)
    # The reference on the same pairs, in the same (sample-major) order: CMPM does not depend on the order.
    flat = jax.device_get(step_lib.flatten_levels(data))
    images = np.asarray(model_lib.normalize_images(flat['images'])).transpose(0, 3, 1, 2).copy()
    pid = torch.from_numpy(np.asarray(flat['person_id'], np.int64))
    optimizer.zero_grad()
    out_vis = encoder(torch.from_numpy(images), mode='vis', use_mask=False)[:, 0]
    out_txt = encoder(torch.from_numpy(flat['text_ids'].astype(np.int64)),
                      torch.from_numpy(flat['text_mask'].astype(np.int64)), mode='txt', use_mask=False)[:, 0]
    loss = loss_fn(out_vis, out_txt, pid)
    loss.backward()
    optimizer.step()
    ours, theirs = float(metrics['loss']), float(loss.detach())
    figures[f'step{i + 1}/loss_ours'] = ours
    figures[f'step{i + 1}/loss_reference'] = theirs
    figures[f'step{i + 1}/loss_relative'] = abs(ours - theirs) / max(abs(theirs), 1e-12)
  after = weight_mapping.convert_ivt(_numpy_state_dict(encoder), cfg, file='reference (trained)').arrays
  ours_flat = traverse_util.flatten_dict(jax.device_get(state.params), sep='/')
  worst = sorted(((_relative(ours_flat[p], after[p]), p) for p in after), reverse=True)
  figures['params/max_relative'] = worst[0][0]
  figures['params/worst'] = worst[0][1]
  figures['params/compared'] = len(after)
  changed = [p for p in after if _relative(after[p], converted.arrays[p]) > 0]
  figures['params/changed_by_training'] = len(changed)
  return figures


def verdict(figures: dict[str, Any]) -> list[str]:
  """The figures past their tolerance (empty: the check passed)."""
  bad = []
  for key in ('embedding/image_relative', 'embedding/text_relative'):
    if figures[key] > TOLERANCE['embedding']:
      bad.append(f'{key} {figures[key]:.3g} > {TOLERANCE["embedding"]}')
  for key in [k for k in figures if k.endswith('/loss_relative')]:
    if figures[key] > TOLERANCE['loss']:
      bad.append(f'{key} {figures[key]:.3g} > {TOLERANCE["loss"]}')
  if figures['params/max_relative'] > TOLERANCE['params']:
    bad.append(f'params/max_relative {figures["params/max_relative"]:.3g} ({figures["params/worst"]}) > '
               f'{TOLERANCE["params"]}')
  return bad


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog='python -m ivt_jax.tools.check_reference', description=__doc__.split('\n')[0])
  p.add_argument('--reference_repo', required=True, help='a checkout of TencentYoutuResearch/PersonRetrieval-IVT')
  p.add_argument('--size', choices=sorted(SIZES), default='small')
  p.add_argument('--batch', type=int, default=4, help='samples per step (x3 MLA levels)')
  p.add_argument('--images_per_id', type=int, default=2)
  p.add_argument('--steps', type=int, default=2)
  p.add_argument('--text_length', type=int, default=32)
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--json', default='', help='also write the figures to this file')
  args = p.parse_args(argv)
  if args.batch < 2 or args.batch % args.images_per_id or args.steps < 1 or args.text_length < 2:
    p.error('--batch must be >= 2 and a multiple of --images_per_id; --steps >= 1; --text_length >= 2')
  try:
    import torch  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    print('ivt_jax.tools.check_reference needs PyTorch (pip install torch): not importable here', file=sys.stderr)
    return 2
  jax.config.update('jax_default_matmul_precision', 'float32')
  try:
    figures = check(args.reference_repo, args.size, args.batch, args.images_per_id, args.steps,
                    args.text_length, args.seed)
  except reference_lib.ReferenceError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  for k, v in figures.items():
    print(f'{k}: {v:.6g}' if isinstance(v, float) else f'{k}: {v}')
  bad = verdict(figures)
  print('verdict: ' + ('the same within tolerance' if not bad else 'DIFFERENT: ' + '; '.join(bad)))
  if args.json:
    with open(args.json, 'w') as f:
      json.dump({**figures, 'tolerance': TOLERANCE, 'differences': bad}, f, indent=1)
  return 0 if not bad else 1


if __name__ == '__main__':
  sys.exit(main())
