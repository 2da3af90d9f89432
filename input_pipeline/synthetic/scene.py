"""SynthPEDES drawing, the scene: background, shadow, occluders and lighting around the figure -> one image."""
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from input_pipeline.synthetic.vocabulary import SUPERSAMPLE
from input_pipeline.synthetic.identities import weighted_choice
from input_pipeline.synthetic.figure import (
    Canvas, LOWER, LOWER_FAR, Look, UPPER, UPPER_FAR, draw_person, sample_pose)


def _muted(rng, s_max: float = 0.28) -> np.ndarray:
  """A dull background colour (low saturation) so that garments stand out."""
  h, s, v = rng.random(), rng.uniform(0.03, s_max), rng.uniform(0.3, 0.85)
  i = int(h * 6) % 6
  f = h * 6 - int(h * 6)
  p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
  rgb = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i]
  return np.array(rgb, np.float32) * 255


def _background(rng, height: int, width: int, ground: float) -> np.ndarray:
  """A street-like scene, float32 (H, W, 3): wall or sky with texture, a ground plane with tiles."""
  yy = np.arange(height, dtype=np.float32)[:, None]
  xx = np.arange(width, dtype=np.float32)[None, :]
  horizon = ground - rng.uniform(0.18, 0.45) * height
  top, mid = _muted(rng), _muted(rng)
  frac = np.clip(yy / max(horizon, 1.0), 0, 1)[..., None]
  wall = top + (mid - top) * frac  # (H, 1, 3)
  wall = np.broadcast_to(wall, (height, width, 3)).copy()
  kind = rng.integers(4)
  if kind == 0:  # bricks
    bh = rng.uniform(0.03, 0.05) * height
    bw = bh * rng.uniform(2.0, 3.0)
    row = np.floor(yy / bh)
    mortar = ((yy % bh) < 1.6) | (((xx + (row % 2) * bw / 2) % bw) < 1.6)
    wall[mortar] *= rng.uniform(0.7, 0.85)
  elif kind == 1:  # windows / shop fronts
    cw, ch = rng.uniform(0.3, 0.6) * width, rng.uniform(0.15, 0.3) * height
    ox, oy = rng.uniform(0, cw), rng.uniform(0, ch)
    win = ((((xx + ox) % cw) / cw) > 0.2) & ((((yy + oy) % ch) / ch) > 0.25)
    colour = _muted(rng, 0.15) * rng.uniform(0.5, 0.9)
    wall[win & (yy < horizon)] = colour
  elif kind == 2:  # vertical panels
    pw = rng.uniform(0.1, 0.3) * width
    panel = ((xx + rng.uniform(0, pw)) % pw) < pw * rng.uniform(0.06, 0.2)
    wall[np.broadcast_to(panel, (height, width))] *= rng.uniform(0.75, 1.2)
  ground_colour = _muted(rng, 0.12)
  below = (yy >= horizon)[..., 0]
  wall[below] = ground_colour
  # Paving lines: spacing grows towards the camera.
  d = np.clip(yy - horizon, 0, None)
  lines = (np.sqrt(d * rng.uniform(1.5, 3.0)) % rng.uniform(2.5, 4.0)) < 0.35
  lines = np.broadcast_to(lines & (yy > horizon + 2), (height, width))
  wall[lines] *= rng.uniform(0.8, 0.92)
  kerb = (yy >= horizon) & (yy < horizon + rng.uniform(0.012, 0.03) * height)
  wall[np.broadcast_to(kerb, (height, width))] = _muted(rng, 0.05) * rng.uniform(0.8, 1.2)
  for _ in range(rng.integers(0, 3)):  # poles / trees far behind
    x0 = rng.uniform(0, width)
    w = rng.uniform(0.02, 0.06) * width
    m = (np.abs(xx - x0) < w / 2) & (yy < horizon + rng.uniform(0, 0.05) * height)
    wall[np.broadcast_to(m, (height, width))] = _muted(rng, 0.2) * rng.uniform(0.5, 0.9)
  wall += rng.normal(0, rng.uniform(2, 7), (height, width, 1)).astype(np.float32)
  return wall


def sample_view(rng: np.random.Generator) -> str:
  """The facing of one image: 'front', 'back', 'left' or 'right'."""
  return weighted_choice(rng, ('front', 'back', 'left', 'right'), (0.35, 0.25, 0.2, 0.2))


def render(a: dict[str, Any], facing: str, image_size: tuple[int, int], seed: Sequence[int]) -> Image.Image:
  """One RGB image (PIL, size W x H) of identity `a` seen from `facing`; deterministic in `seed`."""
  rng = np.random.default_rng(np.random.SeedSequence(list(seed)))
  height, width = image_size
  H, W = height * SUPERSAMPLE, width * SUPERSAMPLE
  L = Look(a)
  extra = 1.15 if a['accessory'] == 'umbrella' else (1.04 if a['hat'] == 'hat' else 1.0)
  ground = H * (1 - rng.uniform(0.02, 0.06))
  h = H * rng.uniform(0.84, 0.94) * L.height
  h = min(h, (ground - 0.01 * H) / extra)
  cx = W / 2 + rng.uniform(-0.07, 0.07) * W
  side = facing in ('left', 'right')
  cv = Canvas((H, W), (W - cx) if facing == 'left' else cx, ground, h)
  draw_person(cv, L, 'side' if side else facing, sample_pose(rng, facing))
  img, lab = cv.img, cv.lab
  if facing == 'left':
    img, lab = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT), lab.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
  person = np.asarray(img, np.float32).copy()
  lab = np.asarray(lab)
  cat = np.asarray(cv.cat, np.uint8)[lab]
  group = np.asarray(cv.group, np.uint8)[lab]
  # Patterns on the upper garment.
  if a['pattern'] in ('striped', 'checked'):
    yy = np.arange(H, dtype=np.float32)[:, None]
    xx = np.arange(W, dtype=np.float32)[None, :]
    period = L.stripe_period * h
    if a['pattern'] == 'striped':
      m = ((yy - ground) % period) < period * 0.4
    else:
      period *= 1.25
      m = (((yy - ground) % period) < period * 0.17) | (((xx - cx) % period) < period * 0.17)
    for c, f in ((UPPER, 1.0), (UPPER_FAR, 0.8)):
      sel = (cat == c) & m
      person[sel] = np.asarray(L.second, np.float32) * f
  if a['lower_type'] == 'jeans':  # denim: faded front of the legs, a little grain
    sel = (cat == LOWER) | (cat == LOWER_FAR)
    person[sel] *= rng.uniform(0.95, 1.05) + 0.05 * rng.standard_normal((int(sel.sum()), 1)).astype(np.float32)
  # Outlines between parts and around the person.
  edge = np.zeros(lab.shape, bool)
  edge[1:] |= group[1:] != group[:-1]
  edge[:-1] |= group[:-1] != group[1:]
  edge[:, 1:] |= group[:, 1:] != group[:, :-1]
  edge[:, :-1] |= group[:, :-1] != group[:, 1:]
  edge &= lab > 0
  person[edge] *= 0.55
  # Scene: background with a soft shadow at the feet, then the person.
  bg = _background(rng, H, W, ground)
  yy, xx = np.ogrid[:H, :W]
  pcx = (W - cx) if facing == 'left' else cx
  shadow = ((xx - pcx) / (0.16 * h)) ** 2 + ((yy - ground) / (0.025 * h)) ** 2 < 1
  bg[shadow] *= 0.7
  out = np.where((lab > 0)[..., None], person, bg)
  scene = Image.fromarray(np.clip(out, 0, 255).astype(np.uint8))
  if rng.random() < 0.18:
    _occlude(scene, rng, pcx, ground, h)
  scene = scene.reduce(SUPERSAMPLE)
  # Lighting: contrast, brightness, colour cast, sensor noise, sometimes blur.
  x = np.asarray(scene, np.float32)
  mean = x.mean()
  x = (x - mean) * rng.uniform(0.85, 1.15) + mean
  x = x * rng.uniform(0.82, 1.15) * rng.uniform(0.96, 1.04, size=3).astype(np.float32)
  x += rng.normal(0, rng.uniform(0.5, 3.0), x.shape).astype(np.float32)
  scene = Image.fromarray(np.clip(np.round(x), 0, 255).astype(np.uint8))
  if rng.random() < 0.15:
    scene = scene.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.4, 0.9))))
  return scene


def _occlude(scene: Image.Image, rng, cx: float, ground: float, h: float) -> None:
  """Draws an object crossing part of the person: a pole, a low obstacle or a passer-by at the edge."""
  d = ImageDraw.Draw(scene)
  width, height = scene.size
  colour = tuple(int(v) for v in _muted(rng, 0.25))
  kind = rng.integers(3)
  if kind == 0:
    w = rng.uniform(0.08, 0.14) * width
    x = cx + rng.uniform(-0.12, 0.12) * h
    d.rectangle((x - w / 2, 0, x + w / 2, height), fill=colour)
    d.rectangle((x - w / 2, 0, x - w / 4, height), fill=tuple(int(v * 0.8) for v in colour))
  elif kind == 1:
    top = ground - rng.uniform(0.1, 0.25) * h
    x0 = rng.uniform(-0.3, 0.3) * width
    d.rounded_rectangle((x0, top, x0 + rng.uniform(0.6, 1.0) * width, height + 5), radius=int(0.05 * h),
                        fill=colour)
  else:
    s = 1 if rng.random() < 0.5 else -1
    x = (width if s > 0 else 0) + s * rng.uniform(-0.02, 0.08) * width
    w = rng.uniform(0.2, 0.3) * width
    head_y = ground - h * rng.uniform(0.85, 1.0)
    d.ellipse((x - 0.06 * h, head_y, x + 0.06 * h, head_y + 0.13 * h), fill=tuple(int(v * 0.9) for v in colour))
    d.rounded_rectangle((x - w, head_y + 0.12 * h, x + w, height + 5), radius=int(0.04 * h), fill=colour)
