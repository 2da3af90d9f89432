"""The public reference implementation's training step, timed on the same machine as ours.

  python -m ivt_jax.tools.reference --reference_repo=DIR [--stride=16 --ids=1 --images_per_id=4 \
      --text_length=64 --steps=5 --warmup=2 --json=FILE]

DIR is the user's own checkout of TencentYoutuResearch/PersonRetrieval-IVT. Nothing of it is in this project:
its encoder (model/backbones/vit_vl.py) and its CMPM loss (loss/cmps_loss.py) are imported from DIR by file
path (they need only torch and the standard library), the encoder is built with random weights as its
`vit_base_patch16_224_uvt_img_txt_mask` factory builds it (ViT-B, qkv bias, LayerNorm eps 1e-6, drop path
0.1; its BERT embeddings get the bert-base-uncased shape: vocabulary 30,522, 512 positions, 2 token types,
LayerNorm eps 1e-12, dropout 0.1), and one training step is run as its training loop runs it
(processor/processor.py): images of the three MLA views concatenated (3B), the 3B texts in one call padded to
one length, `encoder(img, mode='vis')[:, 0]` and `encoder(ids, mask, mode='txt')[:, 0]` with its BMM on
(use_mask=True, ratio 0.2), its CMPM loss, torch SGD with one parameter group per tensor (lr 0.005, biases x2,
momentum 0.9, weight decay 1e-4: make_optimizer_triplet), fp16 autocast with a GradScaler on CUDA (the
reference's `amp.autocast(enabled=True)`). On a CPU the step runs in float32 without autocast (the reference's
AMP is CUDA's). The batch is made once on the device (the data loader is not timed, as in ivt_jax.bench.step).
Figures: step time (mean and median over --steps after --warmup), pairs per second (3B pairs per step).
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import io
import importlib.util
import json
import os
import random
import statistics
import sys
import time
import types
from typing import Any, Optional

REFERENCE_FILES = {'vit_vl': 'model/backbones/vit_vl.py', 'cmps_loss': 'loss/cmps_loss.py'}
LEVELS = 3


class ReferenceError(RuntimeError):
  pass


def load_reference(repo: str) -> types.SimpleNamespace:
  """The reference's encoder and loss modules, imported from the checkout `repo` by file path."""
  repo = os.path.abspath(os.path.expanduser(repo))
  if not os.path.isdir(repo):
    raise ReferenceError(f'--reference_repo {repo} is not a directory (a checkout of '
                         'TencentYoutuResearch/PersonRetrieval-IVT is expected)')
  modules = {}
  for name, rel in REFERENCE_FILES.items():
    path = os.path.join(repo, rel)
    if not os.path.isfile(path):
      raise ReferenceError(f'{path} not found: --reference_repo must be a checkout of '
                           'TencentYoutuResearch/PersonRetrieval-IVT (it has model/backbones/vit_vl.py and '
                           'loss/cmps_loss.py)')
    spec = importlib.util.spec_from_file_location(f'ivt_reference_{name}', path)
    module = importlib.util.module_from_spec(spec)
    try:
      spec.loader.exec_module(module)
    except Exception as e:  # pylint: disable=broad-except  (any failure of foreign code, named)
      raise ReferenceError(f'importing {path} failed: {type(e).__name__}: {e}') from e
    modules[name] = module
  for name, attr in (('vit_vl', 'UVT_Bert_IMG_TXT_MASK'), ('cmps_loss', 'Loss')):
    if not hasattr(modules[name], attr):
      raise ReferenceError(f'{os.path.join(repo, REFERENCE_FILES[name])} has no {attr}: not the expected '
                           'version of the reference')
  return types.SimpleNamespace(repo=repo, **modules)


def build_encoder(ref: types.SimpleNamespace, *, image_size=(384, 128), stride: int = 16, width: int = 768,
                  depth: int = 12, num_heads: int = 12, vocab_size: int = 30522, drop_path: float = 0.1,
                  text_dropout: float = 0.1):
  """The reference encoder with random weights; ViT-B by default, as its factory builds it."""
  import torch  # pylint: disable=g-import-not-at-top
  bert = types.SimpleNamespace(vocab_size=vocab_size, hidden_size=width, pad_token_id=0,
                               max_position_embeddings=512, type_vocab_size=2, layer_norm_eps=1e-12,
                               hidden_dropout_prob=text_dropout, position_embedding_type='absolute')
  with contextlib.redirect_stdout(io.StringIO()):  # its constructor prints its dropout rates
    return ref.vit_vl.UVT_Bert_IMG_TXT_MASK(
        img_size=tuple(image_size), patch_size=16, stride_size=stride, embed_dim=width, depth=depth,
        num_heads=num_heads, mlp_ratio=4, qkv_bias=True, drop_path_rate=drop_path, drop_rate=0.0,
        attn_drop_rate=0.0, norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-6), config=bert)


def reference_optimizer(model, lr: float = 0.005, bias_lr_factor: float = 2.0, momentum: float = 0.9,
                        weight_decay: float = 1e-4, weight_decay_bias: float = 1e-4):
  """torch SGD with one group per tensor, biases at lr x bias_lr_factor (the reference's make_optimizer_triplet)."""
  import torch  # pylint: disable=g-import-not-at-top
  groups = []
  for name, p in model.named_parameters():
    if p.requires_grad:
      bias = 'bias' in name
      groups.append({'params': [p], 'lr': lr * bias_lr_factor if bias else lr,
                     'weight_decay': weight_decay_bias if bias else weight_decay})
  return torch.optim.SGD(groups, lr=lr, momentum=momentum)


def time_train_step(repo: str, *, stride: int = 16, ids: int = 7, images_per_id: int = 4,
                    text_length: int = 64, image_size=(384, 128), steps: int = 10, warmup: int = 3,
                    device: Optional[str] = None, seed: int = 0, model_kwargs: Optional[dict] = None,
                    log=print) -> dict[str, Any]:
  """Times the reference's training step (module docstring) at B = ids x images_per_id samples."""
  import torch  # pylint: disable=g-import-not-at-top
  ref = load_reference(repo)
  device = device or ('cuda' if torch.cuda.is_available() else 'cpu')
  amp = device.startswith('cuda')
  random.seed(seed)
  torch.manual_seed(seed)
  encoder = build_encoder(ref, image_size=image_size, stride=stride, **(model_kwargs or {})).to(device)
  encoder.train()
  width = encoder.embed_dim
  loss_fn = ref.cmps_loss.Loss(num_classes=8, feature_size=width, epsilon=1e-8).to(device)
  optimizer = reference_optimizer(encoder)
  scaler = torch.amp.GradScaler('cuda', enabled=amp)
  b = ids * images_per_id
  h, w = image_size
  gen = torch.Generator().manual_seed(seed)
  images = (torch.rand(LEVELS * b, 3, h, w, generator=gen) * 2 - 1).to(device)
  lengths = torch.randint(text_length // 4, text_length + 1, (LEVELS * b,), generator=gen)
  lengths[0] = text_length  # the batch is padded to its longest text
  mask = (torch.arange(text_length)[None] < lengths[:, None]).long()
  text = (torch.randint(1, 30522 if width == 768 else 1000, (LEVELS * b, text_length), generator=gen) * mask)
  text, mask = text.to(device), mask.to(device)
  pid = torch.arange(b).div(images_per_id, rounding_mode='floor').repeat(LEVELS).to(device)
  sync = torch.cuda.synchronize if amp else (lambda: None)

  def step():
    optimizer.zero_grad()
    with torch.autocast(device_type='cuda', dtype=torch.float16, enabled=amp):
      out_vis = encoder(images, mode='vis', use_mask=True, percent=0.2)[:, 0]
      out_txt = encoder(text, mask, mode='txt', use_mask=True, percent=0.2)[:, 0]
      loss = loss_fn(out_vis, out_txt, pid)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return loss

  times = []
  for i in range(warmup + steps):
    sync()
    t = time.perf_counter()
    loss = step()
    sync()
    if i >= warmup:
      times.append(time.perf_counter() - t)
  loss = float(loss.detach().float().cpu())
  if loss != loss or loss in (float('inf'), float('-inf')):
    raise FloatingPointError(f'the reference step gave a non-finite loss ({loss})')
  step_s = sum(times) / len(times)
  out = {'reference/step_s': step_s, 'reference/step_s_median': statistics.median(times),
         'reference/pairs_per_s': LEVELS * b / step_s, 'reference/pairs_per_step': LEVELS * b,
         'reference/stride': stride, 'reference/text_length': text_length, 'reference/loss': loss,
         'reference/device': (torch.cuda.get_device_name(0) if amp else 'cpu'),
         'reference/precision': 'float16 autocast + GradScaler' if amp else 'float32',
         'reference/torch': torch.__version__}
  if amp:
    out['reference/peak_bytes'] = int(torch.cuda.max_memory_allocated())
  log(f'reference step ({out["reference/device"]}, {out["reference/precision"]}, stride {stride}, '
      f'{b} x {LEVELS} pairs, text {text_length}): {step_s:.4f} s, {out["reference/pairs_per_s"]:.1f} pairs/s')
  return out


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--reference_repo', required=True, help='a checkout of TencentYoutuResearch/PersonRetrieval-IVT')
  p.add_argument('--stride', type=int, default=16)
  p.add_argument('--ids', type=int, default=7, help='identities per batch (x --images_per_id = samples)')
  p.add_argument('--images_per_id', type=int, default=4)
  p.add_argument('--text_length', type=int, default=64)
  p.add_argument('--image_size', default='384,128', help='H,W')
  p.add_argument('--steps', type=int, default=10)
  p.add_argument('--warmup', type=int, default=3)
  p.add_argument('--device', default=None, help='cuda or cpu (default: cuda when available)')
  p.add_argument('--json', default='', help='also write the figures to this file')
  args = p.parse_args(argv)
  try:
    import torch  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    print('ivt_jax.tools.reference needs PyTorch (pip install torch): not importable here', file=sys.stderr)
    return 2
  try:
    size = tuple(int(x) for x in args.image_size.split(','))
    if len(size) != 2:
      raise ValueError
  except ValueError:
    print(f'--image_size={args.image_size!r}: expected H,W', file=sys.stderr)
    return 2
  try:
    figures = time_train_step(args.reference_repo, stride=args.stride, ids=args.ids,
                              images_per_id=args.images_per_id, text_length=args.text_length, image_size=size,
                              steps=args.steps, warmup=args.warmup, device=args.device)
  except ReferenceError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  for k, v in figures.items():
    print(f'{k}: {v}')
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(figures, f, indent=1)
  return 0


if __name__ == '__main__':
  sys.exit(main())
