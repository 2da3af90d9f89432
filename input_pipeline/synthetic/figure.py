"""SynthPEDES drawing, the person: a part-labelled figure in a pose, front, back or side view (PIL).

One subject a little over 500 lines: every garment, accessory and body part is drawn here, in the three views,
and splitting the views apart would separate code that shares the figure's geometry.
"""
import math
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageDraw

from input_pipeline.synthetic.vocabulary import COLOURS, DARK_COLOURS, HAIR_COLOURS, SKIN_TONES
from input_pipeline.synthetic.identities import weighted_choice


# Part categories: patterns and textures go by category, outlines by part group.
SKIN, HAIR, UPPER, UPPER_FAR, LOWER, LOWER_FAR, SHOE, BAG, ACC, DETAIL = range(1, 11)


def _shade(rgb: Sequence[int], f: float) -> tuple[int, int, int]:
  return tuple(int(min(255, max(0, round(v * f)))) for v in rgb)


def _jitter(rgb: Sequence[int], rng, amount: int = 8) -> tuple[int, int, int]:
  return tuple(int(np.clip(v + rng.integers(-amount, amount + 1), 0, 255)) for v in rgb)


class Canvas:
  """A person layer: colour image plus a part-label image (alpha, outlines, patterns).

  Coordinates are in person units: x right of the body axis, y up from the ground, both in units of the
  person's height `h` (pixels); `oy` lowers the whole body (striding legs are shorter than straight ones).
  """

  def __init__(self, hw: tuple[int, int], cx: float, gy: float, h: float):
    height, width = hw
    self.img = Image.new('RGB', (width, height))
    self.lab = Image.new('L', (width, height), 0)
    self._d, self._dl = ImageDraw.Draw(self.img), ImageDraw.Draw(self.lab)
    self.group, self.cat = [0], [0]
    self.cx, self.gy, self.h, self.oy = cx, gy, h, 0.0

  def part(self, cat: int, host: int | None = None) -> int:
    """A new part id; `host`: draw as a detail of that part (no outline between them)."""
    pid = len(self.group)
    if pid > 255:
      raise RuntimeError('too many parts in one drawing')
    self.group.append(self.group[host] if host else pid)
    self.cat.append(cat)
    return pid

  def xy(self, x: float, y: float) -> tuple[float, float]:
    return self.cx + x * self.h, self.gy - (y + self.oy) * self.h

  def poly(self, pts, colour, pid: int) -> None:
    p = [self.xy(x, y) for x, y in pts]
    self._d.polygon(p, fill=colour)
    self._dl.polygon(p, fill=pid)

  def ellipse(self, x: float, y: float, rx: float, ry: float, colour, pid: int) -> None:
    (x0, y0), (x1, y1) = self.xy(x - rx, y + ry), self.xy(x + rx, y - ry)
    self._d.ellipse((x0, y0, x1, y1), fill=colour)
    self._dl.ellipse((x0, y0, x1, y1), fill=pid)

  def chord(self, x: float, y: float, rx: float, ry: float, start: float, end: float, colour, pid: int) -> None:
    (x0, y0), (x1, y1) = self.xy(x - rx, y + ry), self.xy(x + rx, y - ry)
    self._d.chord((x0, y0, x1, y1), start, end, fill=colour)
    self._dl.chord((x0, y0, x1, y1), start, end, fill=pid)

  def line(self, pts, colour, width: float, pid: int) -> None:
    p = [self.xy(x, y) for x, y in pts]
    w = max(1, int(round(width * self.h)))
    self._d.line(p, fill=colour, width=w, joint='curve')
    self._dl.line(p, fill=pid, width=w, joint='curve')

  def limb(self, p0, p1, w0: float, w1: float, colour, pid: int) -> None:
    """A tapered segment with round ends from p0 to p1, widths w0 and w1."""
    dx, dy = p1[0] - p0[0], p1[1] - p0[1]
    n = math.hypot(dx, dy) or 1e-6
    nx, ny = -dy / n, dx / n
    self.poly([(p0[0] + nx * w0 / 2, p0[1] + ny * w0 / 2), (p1[0] + nx * w1 / 2, p1[1] + ny * w1 / 2),
               (p1[0] - nx * w1 / 2, p1[1] - ny * w1 / 2), (p0[0] - nx * w0 / 2, p0[1] - ny * w0 / 2)],
              colour, pid)
    self.ellipse(p0[0], p0[1], w0 / 2, w0 / 2, colour, pid)
    self.ellipse(p1[0], p1[1], w1 / 2, w1 / 2, colour, pid)


def _at(p, length: float, angle_deg: float) -> tuple[float, float]:
  """The point `length` away from p along a limb at `angle_deg` from straight down (+: towards +x)."""
  t = math.radians(angle_deg)
  return p[0] + length * math.sin(t), p[1] - length * math.cos(t)


class Look:
  """Identity-fixed drawing colours and proportions (from the attributes and their render seed)."""

  def __init__(self, a: dict[str, Any]):
    rng = np.random.default_rng(a['render_seed'])
    self.a = a
    self.woman = a['gender'] == 'woman'
    b = {'slim': 0.88, 'average': 1.0, 'heavy': 1.2}[a['build']]
    self.b = b
    self.height = {'short': 0.9, 'average': 0.95, 'tall': 1.0}[a['height']]
    self.sh = (0.098 if self.woman else 0.118) * (1 + 0.7 * (b - 1))  # shoulder half width
    self.waist = (0.07 if self.woman else 0.086) * b
    self.hip = (0.094 if self.woman else 0.09) * b
    self.skin = _jitter(SKIN_TONES[a['skin']], rng, 6)
    self.hair = _jitter(HAIR_COLOURS[a['hair_colour']], rng, 6) if a['hair_colour'] else None
    col = lambda name: _jitter(COLOURS[name], rng, 7) if name else None
    self.upper, self.lower, self.shoes = col(a['upper_colour']), col(a['lower_colour']), col(a['shoes_colour'])
    self.bag, self.hat, self.acc = col(a['bag_colour']), col(a['hat_colour']), col(a['accessory_colour'])
    self.second = col(a['pattern_colour'])
    self.stripe_period = float(rng.uniform(0.042, 0.055))
    self.logo = weighted_choice(rng, ('circle', 'square', 'diamond'))
    inner = 'white' if a['upper_colour'] in DARK_COLOURS and a['upper_colour'] != 'grey' else 'black'
    self.inner = COLOURS['grey'] if a['upper_colour'] in ('white', 'black') else COLOURS[inner]


def sample_pose(rng, facing: str) -> dict[str, float]:
  """Per-image limb angles in degrees."""
  if facing in ('left', 'right'):
    stride = float(rng.uniform(6, 26))
    sign = 1 if rng.random() < 0.5 else -1
    return {'near_leg': sign * stride, 'far_leg': -sign * stride * float(rng.uniform(0.7, 1.0)),
            'knee': float(rng.uniform(4, 22)), 'near_arm': -sign * stride * float(rng.uniform(0.6, 1.2)),
            'far_arm': sign * stride * float(rng.uniform(0.6, 1.0)), 'elbow': float(rng.uniform(5, 30))}
  return {'leg_l': float(rng.uniform(1, 6)), 'leg_r': float(rng.uniform(1, 6)),
          'lift': float(rng.uniform(0, 0.035)), 'lift_side': 1 if rng.random() < 0.5 else -1,
          'arm_l': float(rng.uniform(4, 13)), 'arm_r': float(rng.uniform(4, 13)),
          'elbow_l': float(rng.uniform(-4, 10)), 'elbow_r': float(rng.uniform(-4, 10)),
          'swing': float(rng.uniform(0.85, 1.0))}


# Vertical landmarks (person units, y up from the ground).
_HEAD_Y, _HEAD_RY, _HEAD_RX = 0.932, 0.066, 0.052
_SHOULDER_Y, _WAIST_Y, _HIP_Y, _ANKLE_Y = 0.80, 0.585, 0.47, 0.045
_THIGH, _SHIN, _UPPER_ARM, _FOREARM = 0.215, 0.21, 0.175, 0.16
_HEMS = {'t-shirt': 0.455, 'shirt': 0.45, 'jacket': 0.445, 'hoodie': 0.45, 'coat': 0.31, 'dress': 0.57}


def draw_person(cv: Canvas, L: Look, facing: str, pose: dict[str, float]) -> None:
  """Draws the person facing the viewer ('front'), away ('back') or to the right ('side')."""
  if facing == 'side':
    _draw_side(cv, L, pose)
  else:
    _draw_front_back(cv, L, pose, back=facing == 'back')


def _lower_parts(cv: Canvas, L: Look, legs, far_leg: int | None) -> None:
  """Legs (hip, knee, ankle) with lower garment and shoes; `far_leg`: index drawn shaded and first."""
  a = L.a
  b = L.b
  t = a['lower_type']
  for i, (hip, knee, ankle) in enumerate(legs):
    far = i == far_leg
    f = 0.8 if far else 1.0
    skin = cv.part(SKIN)
    cv.limb(hip, knee, 0.064 * b, 0.046 * b, _shade(L.skin, f), skin)
    cv.limb(knee, ankle, 0.046 * b, 0.034 * b, _shade(L.skin, f), skin)
    if t in ('trousers', 'jeans', 'shorts'):
      g = cv.part(LOWER_FAR if far else LOWER)
      colour = _shade(L.lower, f)
      if t == 'shorts':
        end = (hip[0] + 0.62 * (knee[0] - hip[0]), hip[1] + 0.62 * (knee[1] - hip[1]))
        cv.limb(hip, end, 0.078 * b, 0.07 * b, colour, g)
      else:
        w_knee, w_ankle = (0.06, 0.05) if t == 'jeans' else (0.064, 0.058)
        cv.limb(hip, knee, 0.076 * b, w_knee * b, colour, g)
        cv.limb(knee, ankle, w_knee * b, w_ankle * b, colour, g)


def _shoe(cv: Canvas, L: Look, ankle, side: bool, far: bool) -> None:
  s = cv.part(SHOE)
  colour = _shade(L.shoes, 0.8 if far else 1.0)
  x, y = ankle
  if side:
    cv.poly([(x - 0.03, y - 0.045), (x - 0.032, y + 0.002), (x + 0.015, y + 0.005), (x + 0.07, y - 0.025),
             (x + 0.07, y - 0.045)], colour, s)
  else:
    cv.ellipse(x, y - 0.02, 0.034, 0.026, colour, s)


def _pelvis(cv: Canvas, L: Look, side: bool) -> None:
  a, b = L.a, L.b
  if a['lower_type'] is None:
    return
  if a['lower_type'] == 'skirt':
    g = cv.part(LOWER)
    if side:
      cv.poly([(-0.06 * b, _WAIST_Y), (0.055 * b, _WAIST_Y), (0.1 * b, 0.3), (-0.1 * b, 0.3)], L.lower, g)
    else:
      cv.poly([(-L.waist - 0.004, _WAIST_Y), (L.waist + 0.004, _WAIST_Y), (L.hip + 0.045, 0.3),
               (-L.hip - 0.045, 0.3)], L.lower, g)
    return
  g = cv.part(LOWER)
  if side:
    cv.poly([(-0.062 * b, _WAIST_Y), (0.055 * b, _WAIST_Y), (0.06 * b, 0.44), (-0.064 * b, 0.44)], L.lower, g)
  else:
    cv.poly([(-L.waist, _WAIST_Y), (L.waist, _WAIST_Y), (L.hip, 0.46), (0.015, 0.42), (-0.015, 0.42),
             (-L.hip, 0.46)], L.lower, g)


def _torso_front(cv: Canvas, L: Look) -> int:
  """Upper garment body, front or back view; returns its part id."""
  a = L.a
  t = a['upper_type']
  g = cv.part(UPPER)
  sh = L.sh * (0.78 if a['sleeve'] == 'sleeveless' else 1.0)
  hem = _HEMS[t]
  flare = L.hip + (0.035 if t == 'coat' else 0.006)
  chest = sh - 0.012 * L.b
  pts = [(-0.03, 0.845), (-sh + 0.012, 0.818), (-sh, 0.785), (-chest, 0.7), (-L.waist - 0.006, _WAIST_Y),
         (-flare, hem), (flare, hem), (L.waist + 0.006, _WAIST_Y), (chest, 0.7), (sh, 0.785),
         (sh - 0.012, 0.818), (0.03, 0.845)]
  cv.poly(pts, L.upper, g)
  if t == 'dress':
    cv.poly([(-L.waist - 0.006, _WAIST_Y + 0.01), (L.waist + 0.006, _WAIST_Y + 0.01), (L.hip + 0.05, 0.285),
             (-L.hip - 0.05, 0.285)], L.upper, g)
  return g


def _front_details(cv: Canvas, L: Look, g: int, back: bool) -> None:
  """Neckline, collars, zips, pockets, logo (front) or hood (back) on the upper garment `g`."""
  a = L.a
  t = a['upper_type']
  dark = _shade(L.upper, 0.72)
  light = _shade(L.upper, 1.25) if a['upper_colour'] not in ('white', 'yellow') else _shade(L.upper, 0.88)
  if back:
    if t == 'hoodie':
      hood = [(-0.06, 0.835), (0.06, 0.835), (0.05, 0.74), (0.0, 0.715), (-0.05, 0.74)]
      cv.poly(hood, dark, cv.part(UPPER, g))
    elif t in ('shirt', 'jacket', 'coat'):
      cv.poly([(-0.035, 0.845), (0.035, 0.845), (0.03, 0.82), (-0.03, 0.82)], light, cv.part(DETAIL, g))
    if t == 'coat':
      cv.poly([(-L.waist - 0.004, 0.6), (L.waist + 0.004, 0.6), (L.waist + 0.005, 0.58),
               (-L.waist - 0.005, 0.58)], dark, cv.part(DETAIL, g))
    return
  if t in ('t-shirt', 'dress', 'hoodie'):
    neck = cv.part(SKIN)
    cv.ellipse(0, 0.838, 0.03, 0.018, L.skin, neck)
  if t == 'hoodie':
    cv.poly([(-0.058, 0.57), (0.058, 0.57), (0.07, 0.48), (-0.07, 0.48)], dark, cv.part(UPPER, g))
    cv.line([(-0.014, 0.828), (-0.016, 0.75)], COLOURS['white'], 0.007, cv.part(DETAIL, g))
    cv.line([(0.014, 0.828), (0.016, 0.75)], COLOURS['white'], 0.007, cv.part(DETAIL, g))
  elif t == 'shirt':
    neck = cv.part(SKIN)
    cv.poly([(-0.022, 0.846), (0.022, 0.846), (0.0, 0.81)], L.skin, neck)
    d = cv.part(DETAIL, g)
    cv.poly([(-0.034, 0.846), (-0.004, 0.812), (-0.03, 0.8)], light, d)
    cv.poly([(0.034, 0.846), (0.004, 0.812), (0.03, 0.8)], light, d)
    cv.line([(0.0, 0.81), (0.0, 0.46)], dark, 0.005, d)
    for y in (0.76, 0.69, 0.62, 0.55):
      cv.ellipse(0.0, y, 0.006, 0.006, dark, d)
  elif t in ('jacket', 'coat'):
    d = cv.part(DETAIL, g)
    cv.poly([(-0.024, 0.845), (0.024, 0.845), (0.008, 0.64), (-0.008, 0.64)], L.inner, d)
    cv.poly([(-0.036, 0.846), (-0.01, 0.66), (-0.045, 0.76)], dark, d)
    cv.poly([(0.036, 0.846), (0.01, 0.66), (0.045, 0.76)], dark, d)
    if t == 'jacket':
      cv.line([(0.0, 0.64), (0.0, _HEMS[t])], dark, 0.006, d)
    else:
      for y in (0.6, 0.52, 0.44):
        cv.ellipse(-0.028, y, 0.006, 0.006, dark, d)
        cv.ellipse(0.028, y, 0.006, 0.006, dark, d)
      cv.poly([(-L.waist - 0.004, 0.6), (L.waist + 0.004, 0.6), (L.waist + 0.005, 0.58),
               (-L.waist - 0.005, 0.58)], dark, d)
  if a['pattern'] == 'logo':
    d = cv.part(DETAIL, g)
    x, y, r = 0.0, 0.69, 0.03
    if L.logo == 'circle':
      cv.ellipse(x, y, r, r, L.second, d)
    elif L.logo == 'square':
      cv.poly([(x - r, y + r), (x + r, y + r), (x + r, y - r), (x - r, y - r)], L.second, d)
    else:
      cv.poly([(x, y + 1.3 * r), (x + r, y), (x, y - 1.3 * r), (x - r, y)], L.second, d)


def _arm(cv: Canvas, L: Look, shoulder, elbow, wrist, far: bool) -> tuple[float, float]:
  """Skin arm, sleeve and hand; returns the hand centre."""
  a, b = L.a, L.b
  f = 0.8 if far else 1.0
  skin = cv.part(SKIN)
  cv.limb(shoulder, elbow, 0.046 * b, 0.038 * b, _shade(L.skin, f), skin)
  cv.limb(elbow, wrist, 0.038 * b, 0.032 * b, _shade(L.skin, f), skin)
  dx, dy = wrist[0] - elbow[0], wrist[1] - elbow[1]
  n = math.hypot(dx, dy) or 1e-6
  hand = (wrist[0] + 0.018 * dx / n, wrist[1] + 0.018 * dy / n)
  cv.ellipse(hand[0], hand[1], 0.024, 0.026, _shade(L.skin, f), skin)
  if a['sleeve'] != 'sleeveless':
    g = cv.part(UPPER_FAR if far else UPPER)
    colour = _shade(L.upper, f)
    extra = 0.018 if a['upper_type'] in ('jacket', 'coat', 'hoodie') else 0.01
    if a['sleeve'] == 'short':
      end = (shoulder[0] + 0.55 * (elbow[0] - shoulder[0]), shoulder[1] + 0.55 * (elbow[1] - shoulder[1]))
      cv.limb(shoulder, end, (0.05 + extra) * b, (0.048 + extra) * b, colour, g)
    else:
      cv.limb(shoulder, elbow, (0.046 + extra) * b, (0.04 + extra) * b, colour, g)
      cv.limb(elbow, wrist, (0.04 + extra) * b, (0.034 + extra) * b, colour, g)
  return hand


def _handbag(cv: Canvas, L: Look, hand, far: bool = False) -> None:
  c = _shade(L.bag, 0.8 if far else 1.0)
  p = cv.part(BAG)
  x, y = hand
  cv.line([(x - 0.025, y - 0.04), (x, y + 0.0), (x + 0.025, y - 0.04)], _shade(c, 0.7), 0.008, p)
  cv.poly([(x - 0.042, y - 0.035), (x + 0.042, y - 0.035), (x + 0.052, y - 0.115), (x - 0.052, y - 0.115)],
          c, p)


def _umbrella(cv: Canvas, L: Look, hand) -> None:
  x, y = hand
  stick = cv.part(ACC)
  cv.line([(x, y - 0.04), (x, 1.06)], (60, 60, 60), 0.012, stick)
  p = cv.part(ACC)
  cv.chord(x, 1.04, 0.23, 0.105, 180, 360, L.acc, p)
  d = cv.part(DETAIL, p)
  for dx in (-0.115, 0.0, 0.115):
    cv.line([(x, 1.14), (x + dx * 1.9, 1.045)], _shade(L.acc, 0.75), 0.006, d)


def _head_front(cv: Canvas, L: Look, back: bool) -> None:
  a = L.a
  style = a['hair_style']
  skin = cv.part(SKIN)
  hair = cv.part(HAIR) if L.hair else None
  cv.poly([(-0.022, 0.88), (0.022, 0.88), (0.024, 0.82), (-0.024, 0.82)], L.skin, skin)  # neck
  cv.ellipse(-_HEAD_RX, 0.925, 0.012, 0.018, L.skin, skin)  # ears
  cv.ellipse(_HEAD_RX, 0.925, 0.012, 0.018, L.skin, skin)
  if back:
    cv.ellipse(0, _HEAD_Y, _HEAD_RX, _HEAD_RY, L.skin, skin)
    if hair:
      cv.ellipse(0, _HEAD_Y + 0.008, _HEAD_RX + 0.005, _HEAD_RY - 0.002, L.hair, hair)
      if style == 'long':
        cv.poly([(-0.058, 0.935), (0.058, 0.935), (0.068, 0.735), (0.0, 0.725), (-0.068, 0.735)], L.hair, hair)
      elif style == 'ponytail':
        cv.limb((0.0, 0.905), (0.0, 0.79), 0.04, 0.026, L.hair, hair)
    return
  if hair:
    cv.ellipse(0, _HEAD_Y + 0.014, _HEAD_RX + 0.006, _HEAD_RY - 0.004, L.hair, hair)
    if style == 'ponytail':
      cv.ellipse(-0.06, 0.9, 0.014, 0.03, L.hair, hair)
  face = cv.part(SKIN)
  cv.ellipse(0, _HEAD_Y - 0.01, _HEAD_RX - 0.002, _HEAD_RY - 0.008, L.skin, face)
  if style == 'long':
    cv.poly([(-0.058, 0.95), (-0.036, 0.95), (-0.04, 0.86), (-0.05, 0.76), (-0.075, 0.77), (-0.066, 0.9)],
            L.hair, hair)
    cv.poly([(0.058, 0.95), (0.036, 0.95), (0.04, 0.86), (0.05, 0.76), (0.075, 0.77), (0.066, 0.9)],
            L.hair, hair)
  d = cv.part(DETAIL, face)
  if a['glasses']:
    g = cv.part(DETAIL, face)
    cv.poly([(-0.042, 0.944), (-0.006, 0.944), (-0.008, 0.924), (-0.04, 0.924)], (20, 20, 22), g)
    cv.poly([(0.042, 0.944), (0.006, 0.944), (0.008, 0.924), (0.04, 0.924)], (20, 20, 22), g)
  else:
    cv.ellipse(-0.019, 0.935, 0.007, 0.006, (40, 30, 30), d)
    cv.ellipse(0.019, 0.935, 0.007, 0.006, (40, 30, 30), d)
  cv.line([(-0.012, 0.895), (0.012, 0.895)], _shade(L.skin, 0.7), 0.005, d)


def _hat(cv: Canvas, L: Look, view: str) -> None:
  """view: 'front', 'back' or 'side' (facing +x)."""
  t = L.a['hat']
  if t == 'none':
    return
  p = cv.part(ACC)
  c, dark = L.hat, _shade(L.hat, 0.8)
  x0 = 0.004 if view == 'side' else 0.0
  if t == 'cap':
    cv.chord(x0, 0.955, 0.059, 0.052, 180, 360, c, p)
    if view == 'side':
      cv.poly([(0.03, 0.962), (0.108, 0.956), (0.108, 0.946), (0.03, 0.948)], dark, cv.part(ACC, p))
    elif view == 'front':
      cv.ellipse(0, 0.955, 0.06, 0.013, dark, cv.part(ACC, p))
  elif t == 'beanie':
    cv.chord(x0, 0.95, 0.061, 0.062, 180, 360, c, p)
    cv.poly([(x0 - 0.062, 0.958), (x0 + 0.062, 0.958), (x0 + 0.062, 0.936), (x0 - 0.062, 0.936)], dark,
            cv.part(ACC, p))
  else:
    cv.ellipse(x0, 0.956, 0.105, 0.016 if view != 'side' else 0.011, dark, cv.part(ACC, p))
    cv.chord(x0, 0.962, 0.05, 0.05, 180, 360, c, p)


def _draw_front_back(cv: Canvas, L: Look, pose: dict[str, float], back: bool) -> None:
  a, b = L.a, L.b
  # Legs: back view mirrors left and right, which only changes which hand holds what.
  legs = []
  for s, key in ((-1, 'leg_l'), (1, 'leg_r')):
    hip = (s * L.hip * 0.48, _HIP_Y)
    lift = pose['lift'] if s == pose['lift_side'] else 0.0
    knee = _at(hip, _THIGH - lift * 0.4, s * pose[key])
    ankle = _at(knee, _SHIN - lift * 0.6, s * pose[key] * 0.6)
    legs.append((hip, knee, ankle))
  cv.oy = 0.0
  if a['hair_style'] == 'long' and not back:
    cv.poly([(-0.06, 0.93), (0.06, 0.93), (0.07, 0.76), (-0.07, 0.76)], L.hair, cv.part(HAIR))
  if a['upper_type'] == 'hoodie' and not back:
    cv.ellipse(0, 0.84, 0.062, 0.03, _shade(L.upper, 0.72), cv.part(UPPER))
  _lower_parts(cv, L, legs, None)
  for hip, knee, ankle in legs:
    _shoe(cv, L, ankle, side=False, far=False)
  _pelvis(cv, L, side=False)
  g = _torso_front(cv, L)
  bag_s = 1 if (a['bag_side'] == 'right') != back else -1  # +x side of the image
  umbrella_s = -bag_s if a['bag'] == 'handbag' else bag_s
  if back and a['bag'] == 'backpack':
    p = cv.part(BAG)
    w = min(L.sh - 0.02, 0.092)
    cv.poly([(-w, 0.8), (w, 0.8), (w + 0.006, 0.57), (-w - 0.006, 0.57)], L.bag, p)
    cv.poly([(-w + 0.02, 0.66), (w - 0.02, 0.66), (w - 0.016, 0.585), (-w + 0.016, 0.585)],
            _shade(L.bag, 0.75), cv.part(BAG, p))
  _front_details(cv, L, g, back)
  hands = {}
  for s, arm, elbow_key in ((-1, 'arm_l', 'elbow_l'), (1, 'arm_r', 'elbow_r')):
    shoulder = (s * (L.sh - 0.024 * b), 0.785)
    if a['accessory'] == 'umbrella' and s == umbrella_s:
      elbow = (s * (L.sh + 0.02), 0.635)
      wrist = (s * 0.075, 0.7)
    else:
      elbow = _at(shoulder, _UPPER_ARM * pose['swing'], s * pose[arm])
      wrist = _at(elbow, _FOREARM * pose['swing'], s * (pose[arm] + pose[elbow_key]))
    hands[s] = _arm(cv, L, shoulder, elbow, wrist, far=False)
  if a['bag'] == 'backpack' and not back:
    p = cv.part(BAG)
    for s in (-1, 1):
      cv.limb((s * (L.sh - 0.04), 0.815), (s * (L.sh - 0.03), 0.62), 0.03, 0.026, L.bag, p)
  if a['bag'] == 'shoulder bag':
    p = cv.part(BAG)
    s = -bag_s
    cv.line([(s * (L.sh - 0.04), 0.82), (-s * (L.hip + 0.02), 0.56)], _shade(L.bag, 0.85), 0.016, p)
    x = -s * (L.hip + 0.03)
    cv.poly([(x - 0.055, 0.565), (x + 0.055, 0.565), (x + 0.055, 0.46), (x - 0.055, 0.46)], L.bag, p)
    cv.poly([(x - 0.055, 0.565), (x + 0.055, 0.565), (x + 0.055, 0.53), (x - 0.055, 0.53)],
            _shade(L.bag, 0.8), cv.part(BAG, p))
  if a['bag'] == 'handbag':
    _handbag(cv, L, hands[bag_s])
  if a['accessory'] == 'scarf':
    p = cv.part(ACC)
    cv.ellipse(0, 0.835, 0.05, 0.022, L.acc, p)
    if not back:
      cv.poly([(0.008, 0.83), (0.04, 0.83), (0.046, 0.67), (0.016, 0.67)], L.acc, p)
  _head_front(cv, L, back)
  _hat(cv, L, 'back' if back else 'front')
  if a['accessory'] == 'umbrella':
    _umbrella(cv, L, hands[umbrella_s])


def _draw_side(cv: Canvas, L: Look, pose: dict[str, float]) -> None:
  """The person facing +x (right); 'left' is drawn mirrored."""
  a, b = L.a, L.b
  hipj = (0.0, _HIP_Y)
  legs = []
  for key in ('far_leg', 'near_leg'):
    knee = _at(hipj, _THIGH, pose[key])
    bend = pose['knee'] if pose[key] < 0 else pose['knee'] * 0.2
    ankle = _at(knee, _SHIN, pose[key] - bend)
    legs.append((hipj, knee, ankle))
  cv.oy = -(min(l[2][1] for l in legs) - _ANKLE_Y)
  shoulder = (-0.008, 0.785)
  umbrella = a['accessory'] == 'umbrella'
  # far arm
  elbow = _at(shoulder, _UPPER_ARM, pose['far_arm'])
  wrist = _at(elbow, _FOREARM, pose['far_arm'] + pose['elbow'])
  far_hand = _arm(cv, L, shoulder, elbow, wrist, far=True)
  if a['bag'] == 'handbag' and umbrella:  # the umbrella takes the near hand: the bag hangs from the far one
    _handbag(cv, L, far_hand, far=True)
  # far leg, backpack, pelvis, near leg
  _lower_parts(cv, L, legs[:1], 0)
  _shoe(cv, L, legs[0][2], side=True, far=True)
  if a['bag'] == 'backpack':
    p = cv.part(BAG)
    cv.poly([(-0.05, 0.81), (-0.125, 0.795), (-0.14, 0.6), (-0.12, 0.57), (-0.05, 0.57)], L.bag, p)
    cv.poly([(-0.125, 0.7), (-0.15, 0.69), (-0.152, 0.6), (-0.13, 0.6)], _shade(L.bag, 0.75), cv.part(BAG, p))
  _lower_parts(cv, L, legs[1:], None)
  _shoe(cv, L, legs[1][2], side=True, far=False)
  _pelvis(cv, L, side=True)
  # torso
  g = cv.part(UPPER)
  t = a['upper_type']
  hem = _HEMS[t]
  bust = 0.075 * b if L.woman else 0.066 * b
  front = [(0.03, 0.845), (0.05 * b, 0.81), (bust, 0.72), (0.054 * b, _WAIST_Y)]
  rear = [(-0.06 * b, _WAIST_Y), (-0.07 * b, 0.72), (-0.062 * b, 0.81), (-0.04, 0.845)]
  if t == 'coat':
    body = front + [(0.09 * b, hem), (-0.095 * b, hem)] + rear
  elif t == 'dress':
    body = front + [(0.1 * b, 0.285), (-0.1 * b, 0.285)] + rear
  else:
    body = front + [(0.06 * b, hem), (-0.066 * b, hem)] + rear
  cv.poly(body, L.upper, g)
  dark = _shade(L.upper, 0.72)
  if t == 'hoodie':
    cv.ellipse(-0.05, 0.83, 0.04, 0.045, dark, cv.part(UPPER, g))
  elif t in ('shirt', 'jacket', 'coat'):
    cv.poly([(-0.04, 0.85), (0.03, 0.85), (0.045, 0.815), (-0.045, 0.82)],
            _shade(L.upper, 1.2) if a['upper_colour'] not in ('white', 'yellow') else dark, cv.part(DETAIL, g))
  if t == 'coat':
    cv.poly([(-0.06 * b, 0.6), (0.056 * b, 0.6), (0.056 * b, 0.58), (-0.06 * b, 0.58)], dark,
            cv.part(DETAIL, g))
  if a['pattern'] == 'logo':
    cv.ellipse(0.045 * b, 0.69, 0.018, 0.024, L.second, cv.part(DETAIL, g))
  # neck, head, hair
  skin = cv.part(SKIN)
  cv.poly([(-0.018, 0.89), (0.026, 0.89), (0.028, 0.83), (-0.022, 0.83)], L.skin, skin)
  hair = cv.part(HAIR) if L.hair else None
  style = a['hair_style']
  if style == 'long':
    cv.poly([(-0.05, 0.96), (0.0, 0.96), (-0.01, 0.86), (-0.03, 0.76), (-0.075, 0.76), (-0.066, 0.9)],
            L.hair, hair)
  elif style == 'ponytail':
    cv.limb((-0.05, 0.945), (-0.085, 0.835), 0.034, 0.022, L.hair, hair)
  if hair:
    cv.ellipse(-0.004, _HEAD_Y + 0.01, _HEAD_RX + 0.003, _HEAD_RY - 0.002, L.hair, hair)
  face = cv.part(SKIN)
  cv.ellipse(0.014, _HEAD_Y - 0.008, _HEAD_RX - 0.006, _HEAD_RY - 0.01, L.skin, face)
  cv.poly([(0.05, 0.94), (0.068, 0.912), (0.05, 0.905)], L.skin, face)  # nose
  cv.ellipse(-0.004, 0.925, 0.011, 0.017, L.skin, cv.part(SKIN, face))  # ear
  if a['glasses']:
    gl = cv.part(DETAIL, face)
    cv.poly([(0.022, 0.945), (0.054, 0.945), (0.052, 0.924), (0.024, 0.924)], (20, 20, 22), gl)
    cv.line([(-0.004, 0.938), (0.024, 0.938)], (20, 20, 22), 0.007, gl)
  else:
    cv.ellipse(0.036, 0.936, 0.006, 0.006, (40, 30, 30), cv.part(DETAIL, face))
  _hat(cv, L, 'side')
  if a['accessory'] == 'scarf':
    p = cv.part(ACC)
    cv.ellipse(0.004, 0.835, 0.042, 0.022, L.acc, p)
    cv.poly([(0.03, 0.83), (0.058, 0.83), (0.07, 0.69), (0.044, 0.69)], L.acc, p)
  if a['bag'] == 'backpack':
    strap = [(-0.03, 0.835), (0.05, 0.76), (0.045, 0.66), (-0.02, 0.6)]
    cv.line(strap, _shade(L.bag, 0.85), 0.02, cv.part(BAG))
  if a['bag'] == 'shoulder bag':
    p = cv.part(BAG)
    cv.line([(-0.01, 0.83), (0.0, 0.56)], _shade(L.bag, 0.85), 0.016, p)
    cv.poly([(-0.06, 0.565), (0.05, 0.565), (0.05, 0.46), (-0.06, 0.46)], L.bag, p)
    cv.poly([(-0.06, 0.565), (0.05, 0.565), (0.05, 0.53), (-0.06, 0.53)], _shade(L.bag, 0.8), cv.part(BAG, p))
  # near arm
  if umbrella:
    elbow = _at(shoulder, _UPPER_ARM, 22)
    wrist = _at(elbow, _FOREARM, 150)
  else:
    elbow = _at(shoulder, _UPPER_ARM, pose['near_arm'])
    wrist = _at(elbow, _FOREARM, pose['near_arm'] + pose['elbow'])
  hand = _arm(cv, L, shoulder, elbow, wrist, far=False)
  if a['bag'] == 'handbag' and not umbrella:
    _handbag(cv, L, hand)
  if umbrella:
    _umbrella(cv, L, hand)
