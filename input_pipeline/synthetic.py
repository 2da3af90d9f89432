"""SynthPEDES: a procedurally drawn pedestrian dataset in the CUHK-PEDES layout.

Writes, under an output directory DIR, exactly what the real CUHK-PEDES ships:

  DIR/reid_raw.json                 [{"split", "captions": [str, str], "file_path", "processed_tokens", "id"}]
  DIR/imgs/<split>/<pid>_<n>.png    file_path is relative to DIR/imgs, e.g. "train/0001_00.png"
  DIR/synthpedes.json               the generation parameters and every identity's attributes

so the training and evaluation code read it through the CUHK-PEDES parser, unchanged.

Every identity is one fixed attribute set (gender, hair, upper garment with colour, pattern and sleeves,
lower garment, shoes, bag, hat, glasses, umbrella or scarf) unique among all identities; a fraction of
identities are hard negatives: a copy of another identity of the same split with one or two described
attributes changed. Each image draws the person (PIL + numpy) in a new pose, facing, position, background,
lighting, sometimes blurred or partly occluded; its two captions are sampled independently in the style
of CUHK-PEDES and name only drawn attributes, with colour names from a palette of 12 well separated colours.

Everything is deterministic given the arguments: identities from `seed`, each image from its own seed
(seed, split, the identity's position within its split, image index), so `workers` changes the speed and never
the bytes, and the val and test splits stay the same when the number of training identities changes.

CLI: python -m input_pipeline.synthetic --out DIR [--ids 500 --images-per-id 4 --eval-images-per-id 4 --seed 0
     --height 192 --width 64 --val-ids V --test-ids T --hard-negative-fraction 0.25 --workers 2]
"""
import argparse
import bisect
import concurrent.futures
import functools
import json
import math
import multiprocessing
import os
import re
import shutil
import sys
import time
from typing import Any, Sequence

from absl import logging
import numpy as np
from PIL import Image, ImageDraw, ImageFilter
import tqdm

# Bump when drawing or captions change: an existing directory is then regenerated.
VERSION = 2  # 2: splits sampled test first; image seeds keyed by position within the split
PARAMS_FILE = 'synthpedes.json'
JSON_FILE = 'reid_raw.json'
SPLITS = ('train', 'val', 'test')
SAMPLING_ORDER = ('test', 'val', 'train')  # see make_identities
DEFAULT_IMAGE_SIZE = (192, 64)  # (H, W)
MIN_IMAGE_SIZE = (48, 20)
_SS = 2  # drawing supersampling factor (anti-aliasing)

# ---- vocabulary ----------------------------------------------------------------------------------------

# The 12 garment colours (RGB) and the words captions use for them.
COLOURS = {
    'black': (30, 30, 32),
    'white': (238, 238, 234),
    'grey': (132, 132, 132),
    'red': (208, 30, 36),
    'orange': (247, 136, 22),
    'yellow': (246, 214, 38),
    'green': (36, 150, 58),
    'blue': (46, 108, 228),
    'dark blue': (24, 34, 104),
    'purple': (126, 48, 166),
    'pink': (246, 140, 192),
    'brown': (118, 70, 34),
}
COLOUR_WORDS = {'grey': ('grey', 'grey', 'gray'), 'dark blue': ('dark blue', 'dark blue', 'navy blue', 'navy')}
HAIR_COLOURS = {'black': (26, 22, 20), 'brown': (104, 62, 30), 'blonde': (222, 188, 108),
                'grey': (176, 176, 172)}
HAIR_WORDS = {'black': ('black', 'black', 'dark'), 'blonde': ('blonde', 'blond'), 'brown': ('brown',),
              'grey': ('grey', 'gray')}
SKIN_TONES = ((248, 214, 186), (234, 190, 150), (204, 150, 106), (160, 108, 72), (112, 72, 46))
_DARK = frozenset({'black', 'grey', 'red', 'green', 'blue', 'dark blue', 'purple', 'brown'})
JEANS_COLOURS = ('blue', 'dark blue', 'black', 'grey', 'white')
UPPER_TYPES = ('t-shirt', 'shirt', 'jacket', 'coat', 'hoodie', 'dress')
LOWER_TYPES = ('trousers', 'jeans', 'shorts', 'skirt')
PATTERNS = {'t-shirt': ('plain', 'striped', 'logo'), 'shirt': ('plain', 'striped', 'checked'),
            'jacket': ('plain', 'checked'), 'coat': ('plain', 'checked'),
            'hoodie': ('plain', 'striped', 'logo'), 'dress': ('plain', 'striped', 'checked')}
SLEEVES = {'t-shirt': ('short',), 'shirt': ('short', 'long'), 'jacket': ('long',), 'coat': ('long',),
           'hoodie': ('long',), 'dress': ('sleeveless', 'short')}

# Described attribute groups: identities differ in these; a hard negative changes one or two of them.
GROUPS = {
    'gender': ('gender',),
    'hair_style': ('hair_style',),
    'hair_colour': ('hair_colour',),
    'upper_type': ('upper_type', 'sleeve'),
    'upper_colour': ('upper_colour',),
    'pattern': ('pattern',),
    'lower_type': ('lower_type',),
    'lower_colour': ('lower_colour',),
    'shoes_colour': ('shoes_colour',),
    'bag': ('bag', 'bag_colour'),
    'hat': ('hat', 'hat_colour'),
    'glasses': ('glasses',),
    'accessory': ('accessory', 'accessory_colour'),
}
# How often each group is the one a hard negative changes (gender never).
_HARD_WEIGHTS = {'hair_style': 1.0, 'hair_colour': 1.0, 'upper_type': 1.0, 'upper_colour': 3.0,
                 'pattern': 1.0, 'lower_type': 1.0, 'lower_colour': 3.0, 'shoes_colour': 1.5, 'bag': 2.0,
                 'hat': 1.0, 'glasses': 0.5, 'accessory': 1.0}


# ---- identities ----------------------------------------------------------------------------------------


def _choice(rng: np.random.Generator, options: Sequence[Any], weights: Sequence[float] | None = None) -> Any:
  if weights is None:
    return options[int(rng.integers(len(options)))]
  # The same draw as rng.choice(len(options), p=weights / sum): one rng.random() looked up in the normalized
  # cdf; without choice's per-call checks, which made sampling identities slow.
  return options[bisect.bisect_right(_cdf(tuple(weights)), rng.random())]


@functools.lru_cache(maxsize=256)
def _cdf(weights: tuple[float, ...]) -> list[float]:
  """The cdf Generator.choice builds from p = weights / sum(weights), as floats."""
  p = np.asarray(weights, np.float64)
  cdf = np.cumsum(p / p.sum())
  cdf /= cdf[-1]
  return cdf.tolist()


def _colour(rng, weights: dict[str, float] | None = None, exclude: Sequence[str] = ()) -> str:
  names = [c for c in COLOURS if c not in exclude]
  return _choice(rng, names, [(weights or {}).get(c, 1.0) for c in names])


def pattern_colour(upper_colour: str) -> str:
  """Colour of stripes, checks or logo on an upper garment: white on dark colours, black on light."""
  return 'white' if upper_colour in _DARK else 'black'


def _group_samplers(rng: np.random.Generator, a: dict[str, Any]):
  """Samplers per group, in dependency order; each reads the groups sampled before it from `a`."""
  woman = lambda: a['gender'] == 'woman'

  def hair_style():
    return (_choice(rng, ('short', 'long', 'ponytail', 'bald'),
                    (0.2, 0.48, 0.32, 0.0) if woman() else (0.76, 0.07, 0.04, 0.13)),)

  def hair_colour():
    if a['hair_style'] == 'bald':
      return (None,)
    return (_choice(rng, tuple(HAIR_COLOURS), (0.45, 0.3, 0.15, 0.1)),)

  def upper_type():
    w = (0.22, 0.2, 0.16, 0.12, 0.12, 0.18) if woman() else (0.3, 0.25, 0.2, 0.1, 0.15, 0.0)
    t = _choice(rng, UPPER_TYPES, w)
    return t, _choice(rng, SLEEVES[t])

  def upper_colour():
    return (_colour(rng),)

  def pattern():
    options = PATTERNS[a['upper_type']]
    return (_choice(rng, options, [0.62] + [0.38 / (len(options) - 1)] * (len(options) - 1)),)

  def lower_type():
    if a['upper_type'] == 'dress':
      return (None,)
    if a['upper_type'] == 'coat':  # a coat hides shorts and short skirts
      return (_choice(rng, ('trousers', 'jeans')),)
    return (_choice(rng, LOWER_TYPES, (0.3, 0.3, 0.15, 0.25) if woman() else (0.45, 0.35, 0.2, 0.0)),)

  def lower_colour():
    if a['lower_type'] is None:
      return (None,)
    if a['lower_type'] == 'jeans':
      return (_choice(rng, JEANS_COLOURS, (3, 3, 2, 1, 0.6)),)
    c = _colour(rng, {'black': 2.0, 'grey': 1.5, 'dark blue': 1.5, 'blue': 1.2, 'brown': 1.2})
    if c == a['upper_colour'] and rng.random() < 0.7:  # same colour top and bottom: allowed, rarer
      c = _colour(rng, exclude=(c,))
    return (c,)

  def shoes_colour():
    return (_colour(rng, {'black': 3, 'white': 3, 'brown': 2, 'grey': 1.2, 'orange': 0.5, 'yellow': 0.5,
                          'purple': 0.5, 'green': 0.5}),)

  def bag():
    t = _choice(rng, ('none', 'backpack', 'handbag', 'shoulder bag'),
                (0.3, 0.25, 0.25, 0.2) if woman() else (0.38, 0.3, 0.1, 0.22))
    return t, (None if t == 'none' else _colour(rng))

  def hat():
    t = _choice(rng, ('none', 'cap', 'beanie', 'hat'), (0.72, 0.12, 0.08, 0.08))
    return t, (None if t == 'none' else _colour(rng))

  def glasses():
    return (bool(rng.random() < 0.2),)

  def accessory():
    t = _choice(rng, ('none', 'umbrella', 'scarf'), (0.76, 0.1, 0.14))
    return t, (None if t == 'none' else _colour(rng))

  return {'gender': lambda: (_choice(rng, ('man', 'woman')),), 'hair_style': hair_style,
          'hair_colour': hair_colour, 'upper_type': upper_type, 'upper_colour': upper_colour,
          'pattern': pattern, 'lower_type': lower_type, 'lower_colour': lower_colour,
          'shoes_colour': shoes_colour, 'bag': bag, 'hat': hat, 'glasses': glasses, 'accessory': accessory}


def check_identity(a: dict[str, Any]) -> None:
  """Raises ValueError if an attribute set is inconsistent (e.g. a dress with trousers)."""
  problems = []
  if a['gender'] not in ('man', 'woman'):
    problems.append('gender')
  if (a['hair_style'] == 'bald') != (a['hair_colour'] is None):
    problems.append('hair colour of bald head')
  if a['sleeve'] not in SLEEVES.get(a['upper_type'], ()):
    problems.append('sleeve')
  if a['pattern'] not in PATTERNS.get(a['upper_type'], ()):
    problems.append('pattern')
  if (a['upper_type'] == 'dress') != (a['lower_type'] is None):
    problems.append('dress xor lower garment')
  if a['upper_type'] == 'coat' and a['lower_type'] in ('shorts', 'skirt'):
    problems.append('coat over shorts/skirt')
  if a['gender'] == 'man' and (a['upper_type'] == 'dress' or a['lower_type'] == 'skirt'):
    problems.append('dress/skirt on a man')
  if a['lower_type'] == 'jeans' and a['lower_colour'] not in JEANS_COLOURS:
    problems.append('jeans colour')
  if a['lower_type'] is not None and a['lower_colour'] not in COLOURS:
    problems.append('lower colour')
  for kind, colour in (('bag', 'bag_colour'), ('hat', 'hat_colour'), ('accessory', 'accessory_colour')):
    if (a[kind] == 'none') != (a[colour] is None):
      problems.append(colour)
  if problems:
    raise ValueError(f'inconsistent identity attributes ({", ".join(problems)}): {a}')


class _Unsatisfiable(RuntimeError):
  """No consistent value differs from the base (e.g. a new lower garment colour under a dress)."""


def _sample_identity(rng: np.random.Generator, base: dict[str, Any] | None = None,
                     change: Sequence[str] = ()) -> dict[str, Any]:
  """A new attribute set; with `base`, a copy whose groups in `change` are resampled to new values.

  Groups that depend on a changed one (a dress needs no lower garment, a new garment type may not allow
  the old pattern) keep the base value when still consistent and are resampled otherwise.
  """
  a: dict[str, Any] = {}
  samplers = _group_samplers(rng, a)
  for group, fields in GROUPS.items():
    old = None if base is None else tuple(base[f] for f in fields)
    for _ in range(200):
      value = samplers[group]() if (old is None or group in change) else old
      a.update(zip(fields, value))
      if group in change and value == old:
        continue
      if _partial_ok(a, group):
        break
      old = None  # the base value does not fit the changed groups: sample one
    else:
      raise _Unsatisfiable(f'could not sample attribute group {group!r} (base {base}, change {change})')
  a['pattern_colour'] = None if a['pattern'] == 'plain' else pattern_colour(a['upper_colour'])
  if base is None:
    a['build'] = _choice(rng, ('slim', 'average', 'heavy'), (0.3, 0.5, 0.2))
    a['height'] = _choice(rng, ('short', 'average', 'tall'), (0.25, 0.5, 0.25))
    a['skin'] = int(rng.integers(len(SKIN_TONES)))
    a['bag_side'] = _choice(rng, ('left', 'right'))
    a['render_seed'] = int(rng.integers(2**31))
  else:  # same body, same drawing style: only the changed attributes tell them apart
    for k in ('build', 'height', 'skin', 'bag_side', 'render_seed'):
      a[k] = base[k]
  check_identity(a)
  return a


def _partial_ok(a: dict[str, Any], group: str) -> bool:
  """Consistency of `group`'s value with the groups sampled before it."""
  if group == 'hair_style':
    return not (a['gender'] == 'woman' and a['hair_style'] == 'bald')
  if group == 'hair_colour':
    return (a['hair_style'] == 'bald') == (a['hair_colour'] is None)
  if group == 'upper_type':
    return (a['sleeve'] in SLEEVES[a['upper_type']]
            and not (a['gender'] == 'man' and a['upper_type'] == 'dress'))
  if group == 'pattern':
    return a['pattern'] in PATTERNS[a['upper_type']]
  if group == 'lower_type':
    if (a['upper_type'] == 'dress') != (a['lower_type'] is None):
      return False
    if a['upper_type'] == 'coat' and a['lower_type'] in ('shorts', 'skirt'):
      return False
    return not (a['gender'] == 'man' and a['lower_type'] == 'skirt')
  if group == 'lower_colour':
    if a['lower_type'] is None:
      return a['lower_colour'] is None
    return a['lower_colour'] in (JEANS_COLOURS if a['lower_type'] == 'jeans' else COLOURS)
  return True


def described_key(a: dict[str, Any]) -> tuple:
  """The described attributes of an identity (what captions can tell apart)."""
  return tuple(tuple(a[f] for f in fields) for fields in GROUPS.values())


def attribute_diff(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
  """Names of the described attribute groups in which two identities differ."""
  return [g for g, fields in GROUPS.items() if any(a[f] != b[f] for f in fields)]


def split_sizes(num_ids: int, val_ids: int | None = None, test_ids: int | None = None) -> dict[str, int]:
  """Identities per split; val and test default to 10% each (rounded), train takes the rest."""
  val = round(0.1 * num_ids) if val_ids is None else val_ids
  test = round(0.1 * num_ids) if test_ids is None else test_ids
  if val < 0 or test < 0:
    raise ValueError(f'val_ids ({val}) and test_ids ({test}) must be >= 0.')
  if num_ids - val - test < 1:
    raise ValueError(f'num_ids={num_ids} leaves no training identity after val_ids={val} and test_ids={test}.')
  return {'train': num_ids - val - test, 'val': val, 'test': test}


def make_identities(num_ids: int, seed: int = 0, val_ids: int | None = None, test_ids: int | None = None,
                    hard_negative_fraction: float = 0.25) -> list[dict[str, Any]]:
  """All identities: dicts of attributes plus 'id' (from 1), 'split' and 'hard_negative_of' (id or None).

  Ids are consecutive per split (train, then val, then test). The splits are sampled test first, then val,
  then train, so the test identities depend only on (seed, test_ids, fraction) and the val identities on
  those and val_ids: adding training identities leaves the evaluation splits as they were. Within a split
  the base identities prefer an (upper colour, lower colour) pair not used yet in this round (a round ends
  when 40 draws find none), then round(fraction * n) hard
  negatives copy a base identity of the same split with 1 or 2 described groups changed. No two identities
  share `described_key`.
  """
  if not 0.0 <= hard_negative_fraction < 1.0:
    raise ValueError(f'hard_negative_fraction must be in [0, 1), got {hard_negative_fraction}.')
  sizes = split_sizes(num_ids, val_ids, test_ids)
  rng = np.random.default_rng(np.random.SeedSequence([seed, 0x5E1D]))
  used: set[tuple] = set()
  by_split: dict[str, list[dict[str, Any]]] = {}  # in id order within the split
  for split in SAMPLING_ORDER:
    n = sizes[split]
    n_hard = min(round(hard_negative_fraction * n), n - 1) if n > 1 else 0
    base: list[dict[str, Any]] = []
    pairs: set[tuple] = set()
    while len(base) < n - n_hard:
      for attempt in range(40):
        a = _sample_identity(rng)
        pair = (a['upper_colour'], a['lower_colour'])
        if described_key(a) not in used and (pair not in pairs or attempt == 39):
          break
      if described_key(a) in used:
        continue
      used.add(described_key(a))
      if pair in pairs:  # 40 draws found no unused pair: the pairs are used up, start another round
        pairs.clear()
      pairs.add(pair)
      a['hard_negative_of'] = None
      base.append(a)
    hard: list[tuple[int, dict[str, Any]]] = []
    sources = rng.choice(len(base), size=n_hard, replace=n_hard > len(base)) if n_hard else []
    groups = list(_HARD_WEIGHTS)
    weights = np.array([_HARD_WEIGHTS[g] for g in groups])
    for src in sources:
      src = int(src)
      for _ in range(1000):
        k = 1 if rng.random() < 0.6 else 2
        change = [groups[i] for i in rng.choice(len(groups), size=k, replace=False, p=weights / weights.sum())]
        try:
          a = _sample_identity(rng, base[src], change)
        except _Unsatisfiable:
          continue
        if 1 <= len(attribute_diff(a, base[src])) <= 2 and described_key(a) not in used:
          break
      else:
        raise RuntimeError(f'no hard negative found for identity {base[src]}')
      used.add(described_key(a))
      hard.append((src, a))
    members = base + [a for _, a in hard]
    order = rng.permutation(len(members))
    position = {int(old): pos for pos, old in enumerate(order)}
    for src, a in hard:
      a['hard_negative_of'] = position[src]  # made an id below
    by_split[split] = [members[int(old)] for old in order]
  identities: list[dict[str, Any]] = []
  for split in SPLITS:
    first_id = len(identities) + 1
    for pos, a in enumerate(by_split[split]):
      a['split'] = split
      a['id'] = first_id + pos
      if a['hard_negative_of'] is not None:
        a['hard_negative_of'] += first_id
      identities.append(a)
  return identities


# ---- captions ------------------------------------------------------------------------------------------


def colour_words(colour: str) -> tuple[str, ...]:
  """The words a caption may use for a garment colour (e.g. 'grey' or 'gray')."""
  return tuple(dict.fromkeys(COLOUR_WORDS.get(colour, (colour,))))


def _article(phrase: str) -> str:
  return ('an ' if phrase[0] in 'aeiou' else 'a ') + phrase


def _join(items: Sequence[str], rng) -> str:
  if len(items) == 1:
    return items[0]
  if len(items) == 2:
    return f'{items[0]} and {items[1]}'
  last = ', and ' if rng.random() < 0.3 else ' and '
  return ', '.join(items[:-1]) + last + items[-1]


class _Phrases:
  """Noun phrases for one identity and image; every call samples new wording."""

  def __init__(self, a: dict[str, Any], facing: str, rng: np.random.Generator):
    self.a, self.facing, self.rng = a, facing, rng
    self.woman = a['gender'] == 'woman'
    self.poss = 'her' if self.woman else 'his'

  def c(self, colour: str) -> str:
    return _choice(self.rng, COLOUR_WORDS.get(colour, (colour,)))

  def pick(self, *options: str) -> str:
    return _choice(self.rng, options)

  def hair(self) -> str:
    a = self.a
    if a['hair_style'] == 'bald':
      return self.pick('a bald head', 'a shaved head', 'a bald head')
    c = _choice(self.rng, HAIR_WORDS[a['hair_colour']])
    if a['hair_style'] == 'short':
      return self.pick(f'short {c} hair', f'short {c} hair', f'{c} short hair', f'{c} hair')
    if a['hair_style'] == 'long':
      return self.pick(f'long {c} hair', f'long {c} hair', f'shoulder length {c} hair',
                       f'long straight {c} hair')
    return self.pick(f'{c} hair in a ponytail', f'{c} hair tied in a ponytail', _article(f'{c} ponytail'),
                     f'long {c} hair in a ponytail')

  def upper(self) -> str:
    a, pick = self.a, self.pick
    c, t, sl = self.c(a['upper_colour']), a['upper_type'], a['sleeve']
    if t == 't-shirt':
      noun = pick('t-shirt', 't-shirt', 't shirt', 'tee shirt', 'shirt', 'top', 'short sleeved shirt')
      if not noun.startswith('short') and self.rng.random() < 0.3:
        noun = pick('short sleeved ', 'short sleeve ') + noun
    elif t == 'shirt':
      noun = pick('shirt', 'shirt', 'button up shirt', 'collared shirt', 'top',
                  'blouse' if self.woman else 'shirt')
      if self.rng.random() < 0.4:
        noun = pick(f'{sl} sleeved ', f'{sl} sleeve ') + noun
    elif t == 'jacket':
      noun = pick('jacket', 'jacket', 'zip-up jacket', 'long sleeved jacket')
    elif t == 'coat':
      noun = pick('coat', 'long coat', 'coat', 'overcoat', 'knee length coat')
    elif t == 'hoodie':
      noun = pick('hoodie', 'hoodie', 'hooded sweatshirt', 'sweatshirt with a hood', 'hooded top')
    else:
      noun = pick('dress', 'dress', 'knee length dress',
                  'sleeveless dress' if sl == 'sleeveless' else 'short sleeved dress')
    p, pc = a['pattern'], a['pattern_colour']
    if p == 'plain':
      return _article(f'{c} {noun}')
    sc = self.c(pc)
    if p == 'striped':
      return _article(self.pick(f'{c} and {sc} striped {noun}', f'{c} {noun} with {sc} stripes',
                                f'striped {c} and {sc} {noun}'))
    if p == 'checked':
      return _article(self.pick(f'{c} and {sc} checked {noun}', f'{c} plaid {noun}', f'{c} checkered {noun}',
                                f'{c} {noun} with a {sc} check pattern'))
    if self.facing == 'back':  # the logo is on the front
      return _article(f'{c} {noun}')
    return _article(self.pick(f'{c} {noun} with {_article(sc + " logo")}',
                              f'{c} {noun} with a logo on the front',
                              f'{c} graphic {noun}', f'{c} {noun} with {_article(sc + " print")} on the chest'))

  def lower(self) -> str:
    a, pick = self.a, self.pick
    c, t = self.c(a['lower_colour']), a['lower_type']
    if t == 'trousers':
      noun = pick('pants', 'pants', 'trousers', 'trousers', 'slacks', 'long pants')
      return pick(f'{c} {noun}', f'a pair of {c} {noun}')
    if t == 'jeans':
      return pick(f'{c} jeans', f'a pair of {c} jeans', f'{c} denim jeans', f'{c} jeans')
    if t == 'shorts':
      return pick(f'{c} shorts', f'a pair of {c} shorts', f'knee length {c} shorts')
    return _article(pick(f'{c} skirt', f'short {c} skirt', f'{c} knee length skirt'))

  def shoes(self) -> str:
    c = self.c(self.a['shoes_colour'])
    noun = self.pick('shoes', 'shoes', 'sneakers', 'sneakers', 'tennis shoes', 'trainers')
    return self.pick(f'{c} {noun}', f'a pair of {c} {noun}')

  def bag(self) -> str:
    c, t, poss = self.c(self.a['bag_colour']), self.a['bag'], self.poss
    if t == 'backpack':
      return self.pick(_article(f'{c} backpack'), _article(f'{c} backpack'),
                       _article(f'{c} backpack on {poss} back'),
                       _article(f'{c} bag on {poss} back'))
    if t == 'handbag':
      return self.pick(_article(f'{c} handbag'), _article(f'{c} purse' if self.woman else f'{c} hand bag'),
                       _article(f'{c} bag in {poss} hand'), _article(f'small {c} bag'))
    return self.pick(_article(f'{c} shoulder bag'), _article(f'{c} bag over {poss} shoulder'),
                     _article(f'{c} messenger bag'), _article(f'{c} bag on {poss} shoulder'))

  def hat(self) -> str:
    c, t = self.c(self.a['hat_colour']), self.a['hat']
    if t == 'cap':
      return _article(self.pick(f'{c} cap', f'{c} baseball cap'))
    if t == 'beanie':
      return _article(self.pick(f'{c} beanie', f'{c} knit hat', f'{c} wool hat'))
    return _article(self.pick(f'{c} hat', f'wide brimmed {c} hat', f'{c} sun hat'))

  def glasses(self) -> str:
    return self.pick('glasses', 'a pair of glasses', 'black glasses', 'dark framed glasses')

  def accessory(self) -> str:
    c = self.c(self.a['accessory_colour'])
    if self.a['accessory'] == 'umbrella':
      return _article(self.pick(f'{c} umbrella', f'open {c} umbrella'))
    return self.pick(_article(f'{c} scarf'), _article(f'{c} scarf around {self.poss} neck'))


_SUBJECTS = {
    'man': ('A man', 'A man', 'The man', 'This man', 'A young man', 'The guy', 'A gentleman', 'This pedestrian',
            'The person', 'A male pedestrian', 'He'),
    'woman': ('A woman', 'A woman', 'The woman', 'This woman', 'A young lady', 'The lady', 'A girl', 'The girl',
              'This pedestrian', 'The person', 'A female pedestrian', 'She'),
}
_FACING_SENTENCES = {
    'front': ('{P} is walking towards the camera.', '{P} is facing the camera.'),
    'back': ('{P} is walking away from the camera.', '{P} is seen from behind.'),
    'left': ('{P} is walking to the left.', '{P} is facing left.'),
    'right': ('{P} is walking to the right.', '{P} is facing right.'),
}


def _present(a: dict[str, Any], facing: str) -> list[str]:
  """The attributes an image of this identity shows (glasses are not seen from behind)."""
  present = ['upper', 'hair']
  if a['lower_type'] is not None:
    present.append('lower')
  present.append('shoes')
  present += [k for k in ('bag', 'hat', 'accessory') if a[k] != 'none']
  if a['glasses'] and facing != 'back':
    present.append('glasses')
  return present


_MENTION_P = {'upper': 0.97, 'lower': 0.95, 'shoes': 0.5, 'hair': 0.55, 'bag': 0.85, 'hat': 0.8,
              'glasses': 0.6, 'accessory': 0.85}


def _mentions(present: Sequence[str], rng, boost: Sequence[str] = (), damp: Sequence[str] = ()) -> list[str]:
  """Which attributes one caption names (at least two); `boost`: ones the other caption left out."""
  for _ in range(20):
    out = []
    for k in present:
      q = _MENTION_P[k]
      if k in boost:
        q = max(q, 0.9)
      elif k in damp and k not in ('upper', 'lower'):
        q *= 0.7
      if rng.random() < q:
        out.append(k)
    if len(out) >= 2:
      return out
  return list(present[:2])


def caption(a: dict[str, Any], facing: str, mention: Sequence[str], rng: np.random.Generator) -> str:
  """One caption naming the attributes in `mention` (see `_mentions`), CUHK-PEDES style."""
  ph = _Phrases(a, facing, rng)
  subject = _choice(rng, _SUBJECTS[a['gender']])
  pron = 'She' if a['gender'] == 'woman' else 'He'
  wear_keys = [k for k in ('upper', 'lower', 'shoes', 'hat', 'glasses') if k in mention]
  if a['accessory'] == 'scarf' and 'accessory' in mention:
    wear_keys.append('accessory')
  r = rng.random()
  if r < 0.2:
    rng.shuffle(wear_keys)
  elif r < 0.35 and 'lower' in wear_keys and 'upper' in wear_keys:
    i, j = wear_keys.index('upper'), wear_keys.index('lower')
    wear_keys[i], wear_keys[j] = wear_keys[j], wear_keys[i]
  carry_keys = [k for k in ('bag',) if k in mention]
  if a['accessory'] == 'umbrella' and 'accessory' in mention:
    carry_keys.append('accessory')
  wear = [getattr(ph, k)() for k in wear_keys]
  carry = [getattr(ph, k)() for k in carry_keys]
  hair = ph.hair() if 'hair' in mention else None

  sentences: list[str] = []
  style = _choice(rng, ('one', 'two', 'three'), (0.4, 0.4, 0.2))
  dressed = ('is dressed in',) if wear_keys and wear_keys[0] in ('upper', 'lower') else ()
  wear_verb = lambda: _choice(rng, ('is wearing', 'is wearing', 'wears', 'has on') + dressed)
  carry_verb = lambda: _choice(rng, ('is carrying', 'carries', 'is holding') if 'accessory' in carry_keys
                               else ('is carrying', 'carries', 'has'))
  first_wear, rest_wear = wear, []
  if style != 'one' and len(wear) >= 3:
    cut = int(rng.integers(2, len(wear)))
    first_wear, rest_wear = wear[:cut], wear[cut:]
  hair_done = False
  if not first_wear:  # nothing worn is named: lead with what is carried
    first = f'{subject} {carry_verb()} {_join(carry, rng)}' if carry else f'{subject} has {hair}'
    sentences.append(first)
    hair_done, carry = carry == [] or hair is None, []
  else:
    form = rng.random()
    pronoun = subject in ('He', 'She')
    if hair is not None and form < 0.35 and not pronoun:
      verb = _choice(rng, ('is wearing', 'wearing', 'wears'))
      first = f'{subject} with {hair} {verb} {_join(first_wear, rng)}'
      hair_done = True
    elif hair is not None and form < 0.55:
      first = f'{subject} has {hair} and {wear_verb()} {_join(first_wear, rng)}'
      hair_done = True
    elif form < 0.72 and not pronoun:
      first = f'{subject} wearing {_join(first_wear, rng)}'
    elif form < 0.82 and not pronoun:
      first = f'{subject} in {_join(first_wear, rng)} is walking'
    else:
      first = f'{subject} {wear_verb()} {_join(first_wear, rng)}'
    if carry and style == 'one':
      first += _choice(rng, (f', carrying {_join(carry, rng)}', f' and {carry_verb()} {_join(carry, rng)}',
                             f' with {_join(carry, rng)}'))
      carry = []
    sentences.append(first)
  if rest_wear:
    also = _choice(rng, ('also ', '', 'also '))
    sentences.append(_choice(rng, (f'{pron} {also}wears {_join(rest_wear, rng)}',
                                   f'{pron} is {also}wearing {_join(rest_wear, rng)}',
                                   f'{pron} {also}has on {_join(rest_wear, rng)}')))
  if hair is not None and not hair_done:
    sentences.append(_choice(rng, (f'{pron} has {hair}', f'{pron} has {hair}')))
  if carry:
    verb = carry_verb()
    if rng.random() < 0.3:
      verb = 'is also ' + verb[3:] if verb.startswith('is ') else 'also ' + verb
    sentences.append(f'{pron} {verb} {_join(carry, rng)}')
  if rng.random() < 0.12:
    sentences.append(_choice(rng, _FACING_SENTENCES[facing]).format(P=pron)[:-1])
  if style == 'one' and len(sentences) > 1 and rng.random() < 0.5:  # fold into one long sentence
    text = sentences[0] + ', ' + ', '.join(s[0].lower() + s[1:] if not s.startswith(('He ', 'She ')) else
                                           s.replace('He ', 'he ', 1).replace('She ', 'she ', 1)
                                           for s in sentences[1:])
    sentences = [text]
  text = '. '.join(s[0].upper() + s[1:] for s in sentences)
  return text + ('.' if rng.random() < 0.93 else '')


def captions_for_image(a: dict[str, Any], facing: str, rng: np.random.Generator) -> list[str]:
  """Two different captions of one image; together they name most of what it shows."""
  present = _present(a, facing)
  m1 = _mentions(present, rng)
  c1 = caption(a, facing, m1, rng)
  for _ in range(20):
    c2 = caption(a, facing, _mentions(present, rng, boost=[k for k in present if k not in m1], damp=m1), rng)
    if c2 != c1:
      break
  return [c1, c2]


_TOKEN_RE = re.compile(r"[a-z0-9]+(?:['-][a-z0-9]+)*")


def processed_tokens(text: str) -> list[str]:
  """Lowercase word tokens without punctuation, as in CUHK-PEDES's processed_tokens."""
  return _TOKEN_RE.findall(text.lower())


# ---- drawing -------------------------------------------------------------------------------------------

# Part categories: patterns and textures go by category, outlines by part group.
_SKIN, _HAIR, _UPPER, _UPPER_FAR, _LOWER, _LOWER_FAR, _SHOE, _BAG, _ACC, _DETAIL = range(1, 11)


def _shade(rgb: Sequence[int], f: float) -> tuple[int, int, int]:
  return tuple(int(min(255, max(0, round(v * f)))) for v in rgb)


def _jitter(rgb: Sequence[int], rng, amount: int = 8) -> tuple[int, int, int]:
  return tuple(int(np.clip(v + rng.integers(-amount, amount + 1), 0, 255)) for v in rgb)


class _Canvas:
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


class _Look:
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
    self.logo = _choice(rng, ('circle', 'square', 'diamond'))
    inner = 'white' if a['upper_colour'] in _DARK and a['upper_colour'] != 'grey' else 'black'
    self.inner = COLOURS['grey'] if a['upper_colour'] in ('white', 'black') else COLOURS[inner]


def _pose(rng, facing: str) -> dict[str, float]:
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


def _draw_person(cv: _Canvas, L: _Look, facing: str, pose: dict[str, float]) -> None:
  """Draws the person facing the viewer ('front'), away ('back') or to the right ('side')."""
  if facing == 'side':
    _draw_side(cv, L, pose)
  else:
    _draw_front_back(cv, L, pose, back=facing == 'back')


def _lower_parts(cv: _Canvas, L: _Look, legs, far_leg: int | None) -> None:
  """Legs (hip, knee, ankle) with lower garment and shoes; `far_leg`: index drawn shaded and first."""
  a = L.a
  b = L.b
  t = a['lower_type']
  for i, (hip, knee, ankle) in enumerate(legs):
    far = i == far_leg
    f = 0.8 if far else 1.0
    skin = cv.part(_SKIN)
    cv.limb(hip, knee, 0.064 * b, 0.046 * b, _shade(L.skin, f), skin)
    cv.limb(knee, ankle, 0.046 * b, 0.034 * b, _shade(L.skin, f), skin)
    if t in ('trousers', 'jeans', 'shorts'):
      g = cv.part(_LOWER_FAR if far else _LOWER)
      colour = _shade(L.lower, f)
      if t == 'shorts':
        end = (hip[0] + 0.62 * (knee[0] - hip[0]), hip[1] + 0.62 * (knee[1] - hip[1]))
        cv.limb(hip, end, 0.078 * b, 0.07 * b, colour, g)
      else:
        w_knee, w_ankle = (0.06, 0.05) if t == 'jeans' else (0.064, 0.058)
        cv.limb(hip, knee, 0.076 * b, w_knee * b, colour, g)
        cv.limb(knee, ankle, w_knee * b, w_ankle * b, colour, g)


def _shoe(cv: _Canvas, L: _Look, ankle, side: bool, far: bool) -> None:
  s = cv.part(_SHOE)
  colour = _shade(L.shoes, 0.8 if far else 1.0)
  x, y = ankle
  if side:
    cv.poly([(x - 0.03, y - 0.045), (x - 0.032, y + 0.002), (x + 0.015, y + 0.005), (x + 0.07, y - 0.025),
             (x + 0.07, y - 0.045)], colour, s)
  else:
    cv.ellipse(x, y - 0.02, 0.034, 0.026, colour, s)


def _pelvis(cv: _Canvas, L: _Look, side: bool) -> None:
  a, b = L.a, L.b
  if a['lower_type'] is None:
    return
  if a['lower_type'] == 'skirt':
    g = cv.part(_LOWER)
    if side:
      cv.poly([(-0.06 * b, _WAIST_Y), (0.055 * b, _WAIST_Y), (0.1 * b, 0.3), (-0.1 * b, 0.3)], L.lower, g)
    else:
      cv.poly([(-L.waist - 0.004, _WAIST_Y), (L.waist + 0.004, _WAIST_Y), (L.hip + 0.045, 0.3),
               (-L.hip - 0.045, 0.3)], L.lower, g)
    return
  g = cv.part(_LOWER)
  if side:
    cv.poly([(-0.062 * b, _WAIST_Y), (0.055 * b, _WAIST_Y), (0.06 * b, 0.44), (-0.064 * b, 0.44)], L.lower, g)
  else:
    cv.poly([(-L.waist, _WAIST_Y), (L.waist, _WAIST_Y), (L.hip, 0.46), (0.015, 0.42), (-0.015, 0.42),
             (-L.hip, 0.46)], L.lower, g)


def _torso_front(cv: _Canvas, L: _Look) -> int:
  """Upper garment body, front or back view; returns its part id."""
  a = L.a
  t = a['upper_type']
  g = cv.part(_UPPER)
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


def _front_details(cv: _Canvas, L: _Look, g: int, back: bool) -> None:
  """Neckline, collars, zips, pockets, logo (front) or hood (back) on the upper garment `g`."""
  a = L.a
  t = a['upper_type']
  dark = _shade(L.upper, 0.72)
  light = _shade(L.upper, 1.25) if a['upper_colour'] not in ('white', 'yellow') else _shade(L.upper, 0.88)
  if back:
    if t == 'hoodie':
      hood = [(-0.06, 0.835), (0.06, 0.835), (0.05, 0.74), (0.0, 0.715), (-0.05, 0.74)]
      cv.poly(hood, dark, cv.part(_UPPER, g))
    elif t in ('shirt', 'jacket', 'coat'):
      cv.poly([(-0.035, 0.845), (0.035, 0.845), (0.03, 0.82), (-0.03, 0.82)], light, cv.part(_DETAIL, g))
    if t == 'coat':
      cv.poly([(-L.waist - 0.004, 0.6), (L.waist + 0.004, 0.6), (L.waist + 0.005, 0.58),
               (-L.waist - 0.005, 0.58)], dark, cv.part(_DETAIL, g))
    return
  if t in ('t-shirt', 'dress', 'hoodie'):
    neck = cv.part(_SKIN)
    cv.ellipse(0, 0.838, 0.03, 0.018, L.skin, neck)
  if t == 'hoodie':
    cv.poly([(-0.058, 0.57), (0.058, 0.57), (0.07, 0.48), (-0.07, 0.48)], dark, cv.part(_UPPER, g))
    cv.line([(-0.014, 0.828), (-0.016, 0.75)], COLOURS['white'], 0.007, cv.part(_DETAIL, g))
    cv.line([(0.014, 0.828), (0.016, 0.75)], COLOURS['white'], 0.007, cv.part(_DETAIL, g))
  elif t == 'shirt':
    neck = cv.part(_SKIN)
    cv.poly([(-0.022, 0.846), (0.022, 0.846), (0.0, 0.81)], L.skin, neck)
    d = cv.part(_DETAIL, g)
    cv.poly([(-0.034, 0.846), (-0.004, 0.812), (-0.03, 0.8)], light, d)
    cv.poly([(0.034, 0.846), (0.004, 0.812), (0.03, 0.8)], light, d)
    cv.line([(0.0, 0.81), (0.0, 0.46)], dark, 0.005, d)
    for y in (0.76, 0.69, 0.62, 0.55):
      cv.ellipse(0.0, y, 0.006, 0.006, dark, d)
  elif t in ('jacket', 'coat'):
    d = cv.part(_DETAIL, g)
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
    d = cv.part(_DETAIL, g)
    x, y, r = 0.0, 0.69, 0.03
    if L.logo == 'circle':
      cv.ellipse(x, y, r, r, L.second, d)
    elif L.logo == 'square':
      cv.poly([(x - r, y + r), (x + r, y + r), (x + r, y - r), (x - r, y - r)], L.second, d)
    else:
      cv.poly([(x, y + 1.3 * r), (x + r, y), (x, y - 1.3 * r), (x - r, y)], L.second, d)


def _arm(cv: _Canvas, L: _Look, shoulder, elbow, wrist, far: bool) -> tuple[float, float]:
  """Skin arm, sleeve and hand; returns the hand centre."""
  a, b = L.a, L.b
  f = 0.8 if far else 1.0
  skin = cv.part(_SKIN)
  cv.limb(shoulder, elbow, 0.046 * b, 0.038 * b, _shade(L.skin, f), skin)
  cv.limb(elbow, wrist, 0.038 * b, 0.032 * b, _shade(L.skin, f), skin)
  dx, dy = wrist[0] - elbow[0], wrist[1] - elbow[1]
  n = math.hypot(dx, dy) or 1e-6
  hand = (wrist[0] + 0.018 * dx / n, wrist[1] + 0.018 * dy / n)
  cv.ellipse(hand[0], hand[1], 0.024, 0.026, _shade(L.skin, f), skin)
  if a['sleeve'] != 'sleeveless':
    g = cv.part(_UPPER_FAR if far else _UPPER)
    colour = _shade(L.upper, f)
    extra = 0.018 if a['upper_type'] in ('jacket', 'coat', 'hoodie') else 0.01
    if a['sleeve'] == 'short':
      end = (shoulder[0] + 0.55 * (elbow[0] - shoulder[0]), shoulder[1] + 0.55 * (elbow[1] - shoulder[1]))
      cv.limb(shoulder, end, (0.05 + extra) * b, (0.048 + extra) * b, colour, g)
    else:
      cv.limb(shoulder, elbow, (0.046 + extra) * b, (0.04 + extra) * b, colour, g)
      cv.limb(elbow, wrist, (0.04 + extra) * b, (0.034 + extra) * b, colour, g)
  return hand


def _handbag(cv: _Canvas, L: _Look, hand, far: bool = False) -> None:
  c = _shade(L.bag, 0.8 if far else 1.0)
  p = cv.part(_BAG)
  x, y = hand
  cv.line([(x - 0.025, y - 0.04), (x, y + 0.0), (x + 0.025, y - 0.04)], _shade(c, 0.7), 0.008, p)
  cv.poly([(x - 0.042, y - 0.035), (x + 0.042, y - 0.035), (x + 0.052, y - 0.115), (x - 0.052, y - 0.115)],
          c, p)


def _umbrella(cv: _Canvas, L: _Look, hand) -> None:
  x, y = hand
  stick = cv.part(_ACC)
  cv.line([(x, y - 0.04), (x, 1.06)], (60, 60, 60), 0.012, stick)
  p = cv.part(_ACC)
  cv.chord(x, 1.04, 0.23, 0.105, 180, 360, L.acc, p)
  d = cv.part(_DETAIL, p)
  for dx in (-0.115, 0.0, 0.115):
    cv.line([(x, 1.14), (x + dx * 1.9, 1.045)], _shade(L.acc, 0.75), 0.006, d)


def _head_front(cv: _Canvas, L: _Look, back: bool) -> None:
  a = L.a
  style = a['hair_style']
  skin = cv.part(_SKIN)
  hair = cv.part(_HAIR) if L.hair else None
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
  face = cv.part(_SKIN)
  cv.ellipse(0, _HEAD_Y - 0.01, _HEAD_RX - 0.002, _HEAD_RY - 0.008, L.skin, face)
  if style == 'long':
    cv.poly([(-0.058, 0.95), (-0.036, 0.95), (-0.04, 0.86), (-0.05, 0.76), (-0.075, 0.77), (-0.066, 0.9)],
            L.hair, hair)
    cv.poly([(0.058, 0.95), (0.036, 0.95), (0.04, 0.86), (0.05, 0.76), (0.075, 0.77), (0.066, 0.9)],
            L.hair, hair)
  d = cv.part(_DETAIL, face)
  if a['glasses']:
    g = cv.part(_DETAIL, face)
    cv.poly([(-0.042, 0.944), (-0.006, 0.944), (-0.008, 0.924), (-0.04, 0.924)], (20, 20, 22), g)
    cv.poly([(0.042, 0.944), (0.006, 0.944), (0.008, 0.924), (0.04, 0.924)], (20, 20, 22), g)
  else:
    cv.ellipse(-0.019, 0.935, 0.007, 0.006, (40, 30, 30), d)
    cv.ellipse(0.019, 0.935, 0.007, 0.006, (40, 30, 30), d)
  cv.line([(-0.012, 0.895), (0.012, 0.895)], _shade(L.skin, 0.7), 0.005, d)


def _hat(cv: _Canvas, L: _Look, view: str) -> None:
  """view: 'front', 'back' or 'side' (facing +x)."""
  t = L.a['hat']
  if t == 'none':
    return
  p = cv.part(_ACC)
  c, dark = L.hat, _shade(L.hat, 0.8)
  x0 = 0.004 if view == 'side' else 0.0
  if t == 'cap':
    cv.chord(x0, 0.955, 0.059, 0.052, 180, 360, c, p)
    if view == 'side':
      cv.poly([(0.03, 0.962), (0.108, 0.956), (0.108, 0.946), (0.03, 0.948)], dark, cv.part(_ACC, p))
    elif view == 'front':
      cv.ellipse(0, 0.955, 0.06, 0.013, dark, cv.part(_ACC, p))
  elif t == 'beanie':
    cv.chord(x0, 0.95, 0.061, 0.062, 180, 360, c, p)
    cv.poly([(x0 - 0.062, 0.958), (x0 + 0.062, 0.958), (x0 + 0.062, 0.936), (x0 - 0.062, 0.936)], dark,
            cv.part(_ACC, p))
  else:
    cv.ellipse(x0, 0.956, 0.105, 0.016 if view != 'side' else 0.011, dark, cv.part(_ACC, p))
    cv.chord(x0, 0.962, 0.05, 0.05, 180, 360, c, p)


def _draw_front_back(cv: _Canvas, L: _Look, pose: dict[str, float], back: bool) -> None:
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
    cv.poly([(-0.06, 0.93), (0.06, 0.93), (0.07, 0.76), (-0.07, 0.76)], L.hair, cv.part(_HAIR))
  if a['upper_type'] == 'hoodie' and not back:
    cv.ellipse(0, 0.84, 0.062, 0.03, _shade(L.upper, 0.72), cv.part(_UPPER))
  _lower_parts(cv, L, legs, None)
  for hip, knee, ankle in legs:
    _shoe(cv, L, ankle, side=False, far=False)
  _pelvis(cv, L, side=False)
  g = _torso_front(cv, L)
  bag_s = 1 if (a['bag_side'] == 'right') != back else -1  # +x side of the image
  umbrella_s = -bag_s if a['bag'] == 'handbag' else bag_s
  if back and a['bag'] == 'backpack':
    p = cv.part(_BAG)
    w = min(L.sh - 0.02, 0.092)
    cv.poly([(-w, 0.8), (w, 0.8), (w + 0.006, 0.57), (-w - 0.006, 0.57)], L.bag, p)
    cv.poly([(-w + 0.02, 0.66), (w - 0.02, 0.66), (w - 0.016, 0.585), (-w + 0.016, 0.585)],
            _shade(L.bag, 0.75), cv.part(_BAG, p))
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
    p = cv.part(_BAG)
    for s in (-1, 1):
      cv.limb((s * (L.sh - 0.04), 0.815), (s * (L.sh - 0.03), 0.62), 0.03, 0.026, L.bag, p)
  if a['bag'] == 'shoulder bag':
    p = cv.part(_BAG)
    s = -bag_s
    cv.line([(s * (L.sh - 0.04), 0.82), (-s * (L.hip + 0.02), 0.56)], _shade(L.bag, 0.85), 0.016, p)
    x = -s * (L.hip + 0.03)
    cv.poly([(x - 0.055, 0.565), (x + 0.055, 0.565), (x + 0.055, 0.46), (x - 0.055, 0.46)], L.bag, p)
    cv.poly([(x - 0.055, 0.565), (x + 0.055, 0.565), (x + 0.055, 0.53), (x - 0.055, 0.53)],
            _shade(L.bag, 0.8), cv.part(_BAG, p))
  if a['bag'] == 'handbag':
    _handbag(cv, L, hands[bag_s])
  if a['accessory'] == 'scarf':
    p = cv.part(_ACC)
    cv.ellipse(0, 0.835, 0.05, 0.022, L.acc, p)
    if not back:
      cv.poly([(0.008, 0.83), (0.04, 0.83), (0.046, 0.67), (0.016, 0.67)], L.acc, p)
  _head_front(cv, L, back)
  _hat(cv, L, 'back' if back else 'front')
  if a['accessory'] == 'umbrella':
    _umbrella(cv, L, hands[umbrella_s])


def _draw_side(cv: _Canvas, L: _Look, pose: dict[str, float]) -> None:
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
    p = cv.part(_BAG)
    cv.poly([(-0.05, 0.81), (-0.125, 0.795), (-0.14, 0.6), (-0.12, 0.57), (-0.05, 0.57)], L.bag, p)
    cv.poly([(-0.125, 0.7), (-0.15, 0.69), (-0.152, 0.6), (-0.13, 0.6)], _shade(L.bag, 0.75), cv.part(_BAG, p))
  _lower_parts(cv, L, legs[1:], None)
  _shoe(cv, L, legs[1][2], side=True, far=False)
  _pelvis(cv, L, side=True)
  # torso
  g = cv.part(_UPPER)
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
    cv.ellipse(-0.05, 0.83, 0.04, 0.045, dark, cv.part(_UPPER, g))
  elif t in ('shirt', 'jacket', 'coat'):
    cv.poly([(-0.04, 0.85), (0.03, 0.85), (0.045, 0.815), (-0.045, 0.82)],
            _shade(L.upper, 1.2) if a['upper_colour'] not in ('white', 'yellow') else dark, cv.part(_DETAIL, g))
  if t == 'coat':
    cv.poly([(-0.06 * b, 0.6), (0.056 * b, 0.6), (0.056 * b, 0.58), (-0.06 * b, 0.58)], dark,
            cv.part(_DETAIL, g))
  if a['pattern'] == 'logo':
    cv.ellipse(0.045 * b, 0.69, 0.018, 0.024, L.second, cv.part(_DETAIL, g))
  # neck, head, hair
  skin = cv.part(_SKIN)
  cv.poly([(-0.018, 0.89), (0.026, 0.89), (0.028, 0.83), (-0.022, 0.83)], L.skin, skin)
  hair = cv.part(_HAIR) if L.hair else None
  style = a['hair_style']
  if style == 'long':
    cv.poly([(-0.05, 0.96), (0.0, 0.96), (-0.01, 0.86), (-0.03, 0.76), (-0.075, 0.76), (-0.066, 0.9)],
            L.hair, hair)
  elif style == 'ponytail':
    cv.limb((-0.05, 0.945), (-0.085, 0.835), 0.034, 0.022, L.hair, hair)
  if hair:
    cv.ellipse(-0.004, _HEAD_Y + 0.01, _HEAD_RX + 0.003, _HEAD_RY - 0.002, L.hair, hair)
  face = cv.part(_SKIN)
  cv.ellipse(0.014, _HEAD_Y - 0.008, _HEAD_RX - 0.006, _HEAD_RY - 0.01, L.skin, face)
  cv.poly([(0.05, 0.94), (0.068, 0.912), (0.05, 0.905)], L.skin, face)  # nose
  cv.ellipse(-0.004, 0.925, 0.011, 0.017, L.skin, cv.part(_SKIN, face))  # ear
  if a['glasses']:
    gl = cv.part(_DETAIL, face)
    cv.poly([(0.022, 0.945), (0.054, 0.945), (0.052, 0.924), (0.024, 0.924)], (20, 20, 22), gl)
    cv.line([(-0.004, 0.938), (0.024, 0.938)], (20, 20, 22), 0.007, gl)
  else:
    cv.ellipse(0.036, 0.936, 0.006, 0.006, (40, 30, 30), cv.part(_DETAIL, face))
  _hat(cv, L, 'side')
  if a['accessory'] == 'scarf':
    p = cv.part(_ACC)
    cv.ellipse(0.004, 0.835, 0.042, 0.022, L.acc, p)
    cv.poly([(0.03, 0.83), (0.058, 0.83), (0.07, 0.69), (0.044, 0.69)], L.acc, p)
  if a['bag'] == 'backpack':
    strap = [(-0.03, 0.835), (0.05, 0.76), (0.045, 0.66), (-0.02, 0.6)]
    cv.line(strap, _shade(L.bag, 0.85), 0.02, cv.part(_BAG))
  if a['bag'] == 'shoulder bag':
    p = cv.part(_BAG)
    cv.line([(-0.01, 0.83), (0.0, 0.56)], _shade(L.bag, 0.85), 0.016, p)
    cv.poly([(-0.06, 0.565), (0.05, 0.565), (0.05, 0.46), (-0.06, 0.46)], L.bag, p)
    cv.poly([(-0.06, 0.565), (0.05, 0.565), (0.05, 0.53), (-0.06, 0.53)], _shade(L.bag, 0.8), cv.part(_BAG, p))
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
  return _choice(rng, ('front', 'back', 'left', 'right'), (0.35, 0.25, 0.2, 0.2))


def render(a: dict[str, Any], facing: str, image_size: tuple[int, int], seed: Sequence[int]) -> Image.Image:
  """One RGB image (PIL, size W x H) of identity `a` seen from `facing`; deterministic in `seed`."""
  rng = np.random.default_rng(np.random.SeedSequence(list(seed)))
  height, width = image_size
  H, W = height * _SS, width * _SS
  L = _Look(a)
  extra = 1.15 if a['accessory'] == 'umbrella' else (1.04 if a['hat'] == 'hat' else 1.0)
  ground = H * (1 - rng.uniform(0.02, 0.06))
  h = H * rng.uniform(0.84, 0.94) * L.height
  h = min(h, (ground - 0.01 * H) / extra)
  cx = W / 2 + rng.uniform(-0.07, 0.07) * W
  side = facing in ('left', 'right')
  cv = _Canvas((H, W), (W - cx) if facing == 'left' else cx, ground, h)
  _draw_person(cv, L, 'side' if side else facing, _pose(rng, facing))
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
    for c, f in ((_UPPER, 1.0), (_UPPER_FAR, 0.8)):
      sel = (cat == c) & m
      person[sel] = np.asarray(L.second, np.float32) * f
  if a['lower_type'] == 'jeans':  # denim: faded front of the legs, a little grain
    sel = (cat == _LOWER) | (cat == _LOWER_FAR)
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
  scene = scene.reduce(_SS)
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


# ---- the dataset ---------------------------------------------------------------------------------------


def _image_seed(seed: int, split: str, index: int, n: int, stream: int) -> list[int]:
  """Seed of image n of the index-th identity of a split; stream 1 facing, 2 captions, 3 drawing. Keyed by
  the position within the split, not the id, so a split's images do not change when another split grows."""
  return [seed, SPLITS.index(split), index, n, stream]


def _render_job(job: tuple) -> None:
  a, facing, image_size, seed, path = job
  img = render(a, facing, image_size, seed)
  img.save(path, format='PNG', compress_level=1)  # lossless either way; 1 encodes fastest


def _file_path(split: str, pid: int, n: int, num_ids: int, images_per_id: int) -> str:
  return f'{split}/{pid:0{max(4, len(str(num_ids)))}d}_{n:0{max(2, len(str(images_per_id - 1)))}d}.png'


def _params(num_ids, images_per_id, seed, image_size, val_ids, test_ids, hard_negative_fraction,
            eval_images_per_id) -> dict:
  sizes = split_sizes(num_ids, val_ids, test_ids)
  return {'version': VERSION, 'num_ids': int(num_ids), 'images_per_id': int(images_per_id),
          'eval_images_per_id': int(eval_images_per_id), 'seed': int(seed),
          'image_size': [int(image_size[0]), int(image_size[1])], 'val_ids': sizes['val'],
          'test_ids': sizes['test'], 'hard_negative_fraction': float(hard_negative_fraction)}


def _check_args(num_ids, images_per_id, eval_images_per_id, image_size, workers) -> None:
  if not isinstance(num_ids, (int, np.integer)) or num_ids < 1:
    raise ValueError(f'num_ids must be a positive int, got {num_ids!r}.')
  for name, value in (('images_per_id', images_per_id), ('eval_images_per_id', eval_images_per_id)):
    if not isinstance(value, (int, np.integer)) or value < 1:
      raise ValueError(f'{name} must be a positive int, got {value!r}.')
  if len(image_size) != 2 or image_size[0] < MIN_IMAGE_SIZE[0] or image_size[1] < MIN_IMAGE_SIZE[1]:
    raise ValueError(f'image_size must be (H, W) with H >= {MIN_IMAGE_SIZE[0]} and W >= {MIN_IMAGE_SIZE[1]}, '
                     f'got {tuple(image_size)}.')
  if workers < 1:
    raise ValueError(f'workers must be >= 1, got {workers}.')


def is_complete(out_dir: str, params: dict | None = None) -> bool:
  """True if out_dir holds a finished SynthPEDES generation (with exactly these params, if given)."""
  try:
    with open(os.path.join(out_dir, PARAMS_FILE)) as f:
      info = json.load(f)
  except (OSError, ValueError):
    return False
  if not info.get('complete') or not os.path.isfile(os.path.join(out_dir, JSON_FILE)):
    return False
  return params is None or info.get('params') == params


def generate(out_dir: str, num_ids: int, images_per_id: int, seed: int = 0,
             image_size: Sequence[int] = DEFAULT_IMAGE_SIZE, val_ids: int | None = None,
             test_ids: int | None = None, hard_negative_fraction: float = 0.25, workers: int = 1,
             log_every: int = 500, eval_images_per_id: int | None = None) -> str:
  """Writes SynthPEDES into out_dir (see the module docstring); returns the path of reid_raw.json.

  Skips the work when out_dir already holds a complete generation with the same parameters. val_ids /
  test_ids default to 10% of num_ids each. images_per_id is per training identity; eval_images_per_id per
  val and test identity (None: images_per_id), so that a fixed drawing budget can go to more training
  identities while the gallery keeps its size. `workers` > 1 draws in that many processes (same bytes).
  """
  eval_images_per_id = images_per_id if eval_images_per_id is None else eval_images_per_id
  _check_args(num_ids, images_per_id, eval_images_per_id, image_size, workers)
  image_size = (int(image_size[0]), int(image_size[1]))
  params = _params(num_ids, images_per_id, seed, image_size, val_ids, test_ids, hard_negative_fraction,
                   eval_images_per_id)
  json_path = os.path.join(out_dir, JSON_FILE)
  if is_complete(out_dir, params):
    logging.info('SynthPEDES: %s is up to date (%s); not regenerating.', out_dir, params)
    return json_path
  imgs = os.path.join(out_dir, 'imgs')
  params_path = os.path.join(out_dir, PARAMS_FILE)
  if os.path.exists(imgs) or os.path.exists(json_path):
    if not os.path.isfile(params_path):
      raise FileExistsError(f'{out_dir} holds imgs/ or {JSON_FILE} but no {PARAMS_FILE}: not a SynthPEDES '
                            'directory, refusing to overwrite it; choose another output directory.')
    logging.info('SynthPEDES: %s holds another or unfinished generation; regenerating.', out_dir)
    shutil.rmtree(imgs, ignore_errors=True)
    if os.path.exists(json_path):
      os.remove(json_path)
  os.makedirs(out_dir, exist_ok=True)
  _write_json(params_path, {'params': params, 'complete': False})

  identities = make_identities(num_ids, seed, val_ids, test_ids, hard_negative_fraction)
  for split in SPLITS:
    os.makedirs(os.path.join(imgs, split), exist_ok=True)
  records, jobs = [], []
  most_images = max(images_per_id, eval_images_per_id)
  first_id = {}
  for a in identities:
    first_id.setdefault(a['split'], a['id'])
    index = a['id'] - first_id[a['split']]
    for n in range(images_per_id if a['split'] == 'train' else eval_images_per_id):
      facing = sample_view(np.random.default_rng(_image_seed(seed, a['split'], index, n, 1)))
      caps = captions_for_image(a, facing, np.random.default_rng(_image_seed(seed, a['split'], index, n, 2)))
      rel = _file_path(a['split'], a['id'], n, num_ids, most_images)
      records.append({'split': a['split'], 'captions': caps, 'file_path': rel,
                      'processed_tokens': [processed_tokens(c) for c in caps], 'id': a['id']})
      jobs.append((a, facing, image_size, _image_seed(seed, a['split'], index, n, 3), os.path.join(imgs, rel)))

  total, t0 = len(jobs), time.time()
  logging.info('SynthPEDES: drawing %d images (%d ids: %d per training id, %d per val/test id; %dx%d) into '
               '%s with %d worker(s).', total, num_ids, images_per_id, eval_images_per_id, image_size[0],
               image_size[1], out_dir, workers)

  bar = tqdm.tqdm(total=total, desc='SynthPEDES: drawing', unit=' images', mininterval=1.0, leave=True)

  def progress(done: int) -> None:
    bar.update(1)
    if done % log_every == 0 or done == total:
      dt = time.time() - t0
      logging.debug('SynthPEDES: %d/%d images, %.1f s, %.0f images/s.', done, total, dt, done / max(dt, 1e-9))

  try:
    if workers == 1:
      for i, job in enumerate(jobs):
        _render_job(job)
        progress(i + 1)
    else:
      with concurrent.futures.ProcessPoolExecutor(workers, mp_context=_mp_context()) as pool:
        for i, _ in enumerate(pool.map(_render_job, jobs, chunksize=16)):
          progress(i + 1)
  finally:
    bar.close()
  logging.info('SynthPEDES: drew %d images in %.1f s.', total, time.time() - t0)

  _write_json(json_path, records)
  _write_json(params_path, {'params': params, 'complete': True, 'identities': identities})
  return json_path


def _mp_context() -> multiprocessing.context.BaseContext:
  """spawn (safe when the caller runs threads, as JAX does), unless spawn cannot re-import __main__.

  A spawned worker re-imports the parent's main module; a script read from stdin has no file to import,
  so there the workers are forked instead.
  """
  main_file = getattr(sys.modules.get('__main__'), '__file__', None)
  if main_file is not None and not os.path.isfile(main_file):
    return multiprocessing.get_context('fork')
  return multiprocessing.get_context('spawn')


def _write_json(path: str, obj: Any) -> None:
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    json.dump(obj, f)
  os.replace(tmp, path)


def load_identities(out_dir: str) -> list[dict[str, Any]]:
  """The identities (attributes, split, id, hard_negative_of) of a generated directory."""
  path = os.path.join(out_dir, PARAMS_FILE)
  with open(path) as f:
    info = json.load(f)
  if 'identities' not in info:
    raise ValueError(f'{path} has no identities: the generation did not finish.')
  return info['identities']


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(prog='python -m input_pipeline.synthetic',
                                   description='Writes SynthPEDES (CUHK-PEDES layout) into --out.')
  parser.add_argument('--out', required=True, help='output directory')
  parser.add_argument('--ids', type=int, default=500, help='number of identities')
  parser.add_argument('--images-per-id', type=int, default=4, help='images per training identity')
  parser.add_argument('--eval-images-per-id', type=int, default=None,
                      help='images per val/test identity (default: --images-per-id)')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--height', type=int, default=DEFAULT_IMAGE_SIZE[0])
  parser.add_argument('--width', type=int, default=DEFAULT_IMAGE_SIZE[1])
  parser.add_argument('--val-ids', type=int, default=None, help='default: 10%% of --ids')
  parser.add_argument('--test-ids', type=int, default=None, help='default: 10%% of --ids')
  parser.add_argument('--hard-negative-fraction', type=float, default=0.25)
  parser.add_argument('--workers', type=int, default=1)
  args = parser.parse_args(argv)
  logging.set_verbosity(logging.INFO)
  logging.use_absl_handler()
  try:
    path = generate(args.out, args.ids, args.images_per_id, seed=args.seed,
                    image_size=(args.height, args.width),
                    val_ids=args.val_ids, test_ids=args.test_ids,
                    hard_negative_fraction=args.hard_negative_fraction, workers=args.workers,
                    eval_images_per_id=args.eval_images_per_id)
  except (ValueError, FileExistsError) as e:
    parser.error(str(e))
  print(path)


if __name__ == '__main__':
  main()
