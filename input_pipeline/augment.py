"""Image decoding and the reference train/eval augmentation, in numpy/PIL.

Everything random draws from a `np.random.Generator` passed in, so a view is a pure function of
(encoded image, generator state). Images are uint8 (H, W, 3); the model normalizes them on device
with mean = std = 0.5, i.e. `x / 127.5 - 1`.

The reference train transform (torchvision + timm, applied to each of the three views):
  Resize((H, W), bicubic) -> Pad(10, fill 0) -> RandomCrop((H, W)) -> RandomHorizontalFlip(0.5)
  -> ToTensor -> Normalize(0.5, 0.5) -> timm RandomErasing(p=0.5, mode='pixel', max_count=1).
Its eval transform is Resize((H, W)) with torchvision's default interpolation, bilinear.

Here the resize is done once per image and shared by its three views (it is deterministic, so this
is the same as resizing each view). Pad + crop is one zero-filled copy: output pixel (y, x) is
resized pixel (y + i - pad, x + j - pad), zero outside, with i, j ~ U{0..2 pad}, as torchvision
draws them on the padded image. Crop and flip are one copy per view (the flipped crop at column
offset dx is the crop of the mirrored image at -dx; the mirror is made once per image by PIL).
Decoding is PIL's full decode (no JPEG draft mode), as the reference, with the rules of input_pipeline.images.

RandomErasing matches timm's parameters: erase with probability p, up to 10 attempts, area
fraction ~ U(0.02, 1/3), aspect ratio ~ exp(U(log 0.3, log 1/0.3)), h = round(sqrt(area * r)),
w = round(sqrt(area / r)), accepted when h < H and w < W, top ~ U{0..H-h}, left ~ U{0..W-w}; the
box is filled with per-pixel, per-channel standard normal noise in the normalized space.
Difference: the noise is written in uint8 space, u = round(127.5 (n + 1)) clipped to [0, 255], so
values with |n| > 1 (about 32% of them) saturate at the ends of the pixel range, and all values
are quantized to the 256 pixel levels. The erased box is otherwise identical.
Options (data.augment): `erase_max_area` (timm's 1/3; IRRA's torchvision RandomErasing: 0.4) and `erase_fill`:
'noise' (timm's) or 'clip_mean', IRRA's `value=mean` given after normalization, i.e. CLIP's channel means in
CLIP-normalized units: the pixel round(255 (m s + m)) per channel (m, s: CLIP's mean and std).
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import PIL.Image

from input_pipeline import images

TRAIN_RESAMPLE = PIL.Image.Resampling.BICUBIC  # the reference's T.Resize(..., interpolation=3)
EVAL_RESAMPLE = PIL.Image.Resampling.BILINEAR  # the reference's T.Resize(...) default
ERASE_AREA = (0.02, 1.0 / 3.0)                # timm RandomErasing min_area, max_area (max: data.augment option)
ERASE_FILLS = ('noise', 'clip_mean')
CLIP_MEAN_PIXEL = tuple(int(round(255 * (m * s + m))) for m, s in ((0.48145466, 0.26862954),
                                                                    (0.4578275, 0.26130258),
                                                                    (0.40821073, 0.27577711)))
ERASE_MIN_ASPECT = 0.3                        # timm RandomErasing min_aspect (max = 1 / min)
ERASE_ATTEMPTS = 10


def decode_image(data, *, name: str = '') -> PIL.Image.Image:
  """Encoded image bytes (or an already decoded uint8 (h, w, 3) array) -> RGB PIL image.

  Bytes go through `input_pipeline.images.decode`, the one set of rules (orientation, colour modes,
  transparency, size limit) that training, evaluation and search share.
  """
  if isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 3:
    if data.shape[-1] != 3:
      raise ValueError(f'image {name!r}: expected 3 channels, got shape {data.shape}')
    return PIL.Image.fromarray(data, 'RGB')
  if isinstance(data, np.ndarray) and data.dtype == object and data.ndim == 0:
    data = data.item()
  if isinstance(data, np.bytes_):
    data = bytes(data)
  return images.decode(data, name=name)


def resize_image(image: PIL.Image.Image, size: Sequence[int], resample) -> PIL.Image.Image:
  """PIL image -> PIL image of size (H, W) (unchanged if already that size)."""
  h, w = size
  return image if image.size == (w, h) else image.resize((w, h), resample=resample)


def _to_array(image: PIL.Image.Image, size: Sequence[int]) -> np.ndarray:
  out = np.asarray(image, dtype=np.uint8)
  if out.shape != (size[0], size[1], 3):
    raise ValueError(f'resize produced shape {out.shape}, expected {(size[0], size[1], 3)}')
  return out


def resize(image: PIL.Image.Image, size: Sequence[int], resample) -> np.ndarray:
  """PIL image -> uint8 (H, W, 3) resized to size = (H, W) with PIL's filter `resample`."""
  return _to_array(resize_image(image, size, resample), size)


def load_resized(data, size: Sequence[int], resample, *, name: str = '') -> np.ndarray:
  """Decode then resize: encoded bytes -> uint8 (H, W, 3)."""
  return resize(decode_image(data, name=name), size, resample)


def pad_crop(image: np.ndarray, pad: int, rng: np.random.Generator) -> np.ndarray:
  """Zero-pad by `pad` on every side, then crop back to the input size at a random offset.

  Args:
    image: uint8 (H, W, C).
    pad: padding in pixels (0 = identity, no random draws).
    rng: the generator.
  Returns:
    uint8 (H, W, C).
  """
  if pad <= 0:
    return image
  h, w = image.shape[:2]
  i = int(rng.integers(0, 2 * pad + 1))  # top of the crop in the padded image
  j = int(rng.integers(0, 2 * pad + 1))
  dy, dx = i - pad, j - pad              # shift in the original image
  out = np.zeros_like(image)
  ys, ye = max(0, -dy), min(h, h - dy)   # output rows that see the image
  xs, xe = max(0, -dx), min(w, w - dx)
  out[ys:ye, xs:xe] = image[ys + dy:ye + dy, xs + dx:xe + dx]
  return out


def random_hflip(image: np.ndarray, prob: float, rng: np.random.Generator) -> np.ndarray:
  """Mirror left-right with probability `prob`. uint8 (H, W, C) -> same."""
  if prob > 0 and rng.random() < prob:
    return image[:, ::-1]
  return image


def erase_box(h: int, w: int, rng: np.random.Generator, max_area: float = ERASE_AREA[1]
              ) -> tuple[int, int, int, int] | None:
  """timm RandomErasing's box draw for an (h, w) image: (top, left, box_h, box_w) or None."""
  area = h * w
  log_lo, log_hi = math.log(ERASE_MIN_ASPECT), math.log(1.0 / ERASE_MIN_ASPECT)
  for _ in range(ERASE_ATTEMPTS):
    target_area = rng.uniform(ERASE_AREA[0], max_area) * area
    aspect = math.exp(rng.uniform(log_lo, log_hi))
    bh = int(round(math.sqrt(target_area * aspect)))
    bw = int(round(math.sqrt(target_area / aspect)))
    if bw < w and bh < h:
      top = int(rng.integers(0, h - bh + 1))
      left = int(rng.integers(0, w - bw + 1))
      return top, left, bh, bw
  return None


def _erase_into(image: np.ndarray, prob: float, rng: np.random.Generator, max_area: float = ERASE_AREA[1],
                fill: str = 'noise') -> None:
  """`random_erase` in place."""
  if prob <= 0 or rng.random() >= prob:
    return
  h, w, c = image.shape
  box = erase_box(h, w, rng, max_area)
  if box is None:
    return
  top, left, bh, bw = box
  if fill == 'clip_mean':
    image[top:top + bh, left:left + bw] = CLIP_MEAN_PIXEL[:c]
    return
  noise = rng.standard_normal((bh, bw, c), dtype=np.float32)
  noise = np.rint(noise * 127.5 + 127.5, out=noise)
  image[top:top + bh, left:left + bw] = np.clip(noise, 0, 255, out=noise)


def random_erase(image: np.ndarray, prob: float, rng: np.random.Generator) -> np.ndarray:
  """With probability `prob`, fill one random box with normal noise (see the module docstring).

  Args:
    image: uint8 (H, W, C); not modified.
    prob: erase probability.
    rng: the generator.
  Returns:
    uint8 (H, W, C).
  """
  out = np.array(image, copy=True)
  _erase_into(out, prob, rng)
  return out


def train_view(resized: np.ndarray, rng: np.random.Generator, *, pad: int, flip_prob: float,
               erase_prob: float, flipped: np.ndarray | None = None,
               out: np.ndarray | None = None, erase_max_area: float = ERASE_AREA[1],
               erase_fill: str = 'noise') -> np.ndarray:
  """One augmented view of a resized uint8 (H, W, 3) image: pad-crop, flip, erase.

  The same draws and result as `random_erase(random_hflip(pad_crop(x)))`, in one copy: the
  flipped crop at column offset dx is the crop of the mirrored image at offset -dx.

  Args:
    resized: uint8 (H, W, 3).
    rng: the generator.
    pad, flip_prob, erase_prob: data.augment.{pad, flip_prob, erase_prob}.
    flipped: optional `resized[:, ::-1]` made contiguous (saves a strided copy per flipped view).
    out: optional uint8 (H, W, 3) destination.
  Returns:
    `out` (or a new array) holding the view.
  """
  h, w = resized.shape[:2]
  out = np.empty_like(resized) if out is None else out
  dy = dx = 0
  if pad > 0:
    dy = int(rng.integers(0, 2 * pad + 1)) - pad
    dx = int(rng.integers(0, 2 * pad + 1)) - pad
  src = resized
  if flip_prob > 0 and rng.random() < flip_prob:
    src, dx = (resized[:, ::-1] if flipped is None else flipped), -dx
  ys, ye = max(0, -dy), min(h, h - dy)     # out[y, x] = src[y + dy, x + dx], zero outside
  xs, xe = max(0, -dx), min(w, w - dx)
  out[:ys] = 0
  out[ye:] = 0
  out[ys:ye, :xs] = 0
  out[ys:ye, xe:] = 0
  out[ys:ye, xs:xe] = src[ys + dy:ye + dy, xs + dx:xe + dx]
  _erase_into(out, erase_prob, rng, erase_max_area, erase_fill)
  return out


def train_views(data, size: Sequence[int], rng: np.random.Generator, *, num_views: int = 3,
                pad: int = 10, flip_prob: float = 0.5, erase_prob: float = 0.5,
                name: str = '', erase_max_area: float = ERASE_AREA[1], erase_fill: str = 'noise') -> np.ndarray:
  """Encoded image -> uint8 (num_views, H, W, 3), independently augmented views of one resize."""
  return views_of(decode_image(data, name=name), size, rng, num_views=num_views, pad=pad,
                  flip_prob=flip_prob, erase_prob=erase_prob, erase_max_area=erase_max_area,
                  erase_fill=erase_fill)


def views_of(image: PIL.Image.Image, size: Sequence[int], rng: np.random.Generator, *,
             num_views: int = 3, pad: int = 10, flip_prob: float = 0.5,
             erase_prob: float = 0.5, erase_max_area: float = ERASE_AREA[1],
             erase_fill: str = 'noise') -> np.ndarray:
  """Decoded RGB image -> uint8 (num_views, H, W, 3): one bicubic resize, then `train_view`s."""
  image = resize_image(image, size, TRAIN_RESAMPLE)
  resized = _to_array(image, size)
  flipped = None
  if flip_prob > 0:  # PIL mirrors faster than a strided numpy copy of 3-byte pixels
    flipped = np.asarray(image.transpose(PIL.Image.Transpose.FLIP_LEFT_RIGHT), dtype=np.uint8)
  out = np.empty((num_views,) + resized.shape, np.uint8)
  for v in range(num_views):
    train_view(resized, rng, pad=pad, flip_prob=flip_prob, erase_prob=erase_prob,
               flipped=flipped, out=out[v], erase_max_area=erase_max_area, erase_fill=erase_fill)
  return out


def eval_image(data, size: Sequence[int], *, name: str = '') -> np.ndarray:
  """Encoded image -> uint8 (H, W, 3), resized only (bilinear, as the reference's eval)."""
  return load_resized(data, size, EVAL_RESAMPLE, name=name)
