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
(seed, id, image index), so `workers` changes the speed and never the bytes.

CLI: python -m input_pipeline.synthetic --out DIR [--ids 500 --images-per-id 4 --seed 0 --height 192
     --width 64 --val-ids V --test-ids T --hard-negative-fraction 0.25 --workers 2]
"""
import argparse
import json
import math
import multiprocessing
import os
import re
import shutil
import time
from typing import Any, Sequence

from absl import logging
import numpy as np
from PIL import Image, ImageDraw, ImageFilter

# Bump when drawing or captions change: an existing directory is then regenerated.
VERSION = 1
PARAMS_FILE = 'synthpedes.json'
JSON_FILE = 'reid_raw.json'
SPLITS = ('train', 'val', 'test')
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
  p = np.asarray(weights, np.float64)
  return options[int(rng.choice(len(options), p=p / p.sum()))]


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
      raise RuntimeError(f'could not sample attribute group {group!r} (base {base}, change {change})')
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

  Ids are consecutive per split (train, then val, then test). Within a split the base identities prefer
  an unused (upper colour, lower colour) pair, then round(fraction * n) hard negatives copy a base
  identity of the same split with 1 or 2 described groups changed. No two identities share
  `described_key`.
  """
  if not 0.0 <= hard_negative_fraction < 1.0:
    raise ValueError(f'hard_negative_fraction must be in [0, 1), got {hard_negative_fraction}.')
  sizes = split_sizes(num_ids, val_ids, test_ids)
  rng = np.random.default_rng(np.random.SeedSequence([seed, 0x5E1D]))
  used: set[tuple] = set()
  identities: list[dict[str, Any]] = []
  for split in SPLITS:
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
        a = _sample_identity(rng, base[src], change)
        if 1 <= len(attribute_diff(a, base[src])) <= 2 and described_key(a) not in used:
          break
      else:
        raise RuntimeError(f'no hard negative found for identity {base[src]}')
      used.add(described_key(a))
      hard.append((src, a))
    members = base + [a for _, a in hard]
    order = rng.permutation(len(members))
    first_id = len(identities) + 1
    new_id = {int(old): first_id + pos for pos, old in enumerate(order)}
    for j, (src, a) in enumerate(hard):
      a['hard_negative_of'] = new_id[src]
    for old in order:
      a = members[int(old)]
      a['split'] = split
      a['id'] = new_id[int(old)]
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
      return self.pick(f'long {c} hair', f'long {c} hair', f'shoulder length {c} hair', f'long straight {c} hair')
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
      noun = pick('shirt', 'shirt', 'button up shirt', 'collared shirt', 'top', 'blouse' if self.woman else 'shirt')
      if self.rng.random() < 0.4:
        noun = (pick('long sleeved ', 'long sleeve ') if sl == 'long' else pick('short sleeved ', 'short sleeve ')) + noun
    elif t == 'jacket':
      noun = pick('jacket', 'jacket', 'zip up jacket', 'long sleeved jacket')
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
    return _article(self.pick(f'{c} {noun} with {_article(sc + " logo")}', f'{c} {noun} with a logo on the front',
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
      return self.pick(_article(f'{c} backpack'), _article(f'{c} backpack'), _article(f'{c} backpack on {poss} back'),
                       _article(f'{c} bag on {poss} back'))
    if t == 'handbag':
      return self.pick(_article(f'{c} handbag'), _article(f'{c} purse'), _article(f'{c} bag in {poss} hand'),
                       _article(f'small {c} bag'))
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


def _mentions(a: dict[str, Any], facing: str, rng, boost: set[str] = frozenset(),
              damp: set[str] = frozenset()) -> list[str]:
  """Which attributes one caption names; `boost`: ones the other caption left out."""
  p = {'upper': 0.97, 'lower': 0.95, 'shoes': 0.5, 'hair': 0.55, 'bag': 0.85, 'hat': 0.8, 'glasses': 0.6,
       'accessory': 0.85}
  present = ['upper', 'hair']
  if a['lower_type'] is not None:
    present.append('lower')
  present.append('shoes')
  for k in ('bag', 'hat', 'accessory'):
    if a[k] != 'none':
      present.append(k)
  if a['glasses'] and facing != 'back':
    present.append('glasses')
  for _ in range(20):
    out = []
    for k in present:
      q = p[k]
      if k in boost:
        q = max(q, 0.9)
      elif k in damp and k not in ('upper', 'lower'):
        q *= 0.7
      if rng.random() < q:
        out.append(k)
    if len(out) >= 2:
      return out
  return present[:2]


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
  wear_verb = lambda: _choice(rng, ('is wearing', 'is wearing', 'wears', 'has on', 'is dressed in'))
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
    if hair is not None and form < 0.35:
      first = f'{subject} with {hair} {_choice(rng, ("is wearing", "wearing", "wears"))} {_join(first_wear, rng)}'
      hair_done = True
    elif hair is not None and form < 0.55:
      first = f'{subject} has {hair} and {wear_verb()} {_join(first_wear, rng)}'
      hair_done = True
    elif form < 0.72 and subject not in ('He', 'She'):
      first = f'{subject} wearing {_join(first_wear, rng)}'
    elif form < 0.82 and subject not in ('He', 'She'):
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
    sentences.append(f'{pron} {_choice(rng, ("", "also ", ""))}{carry_verb()} {_join(carry, rng)}')
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
  """Two different captions of one image; together they name most attributes."""
  m1 = _mentions(a, facing, rng)
  c1 = caption(a, facing, m1, rng)
  present = set(_mentions(a, facing, np.random.default_rng(0), boost=set(GROUPS) | {'upper', 'lower', 'shoes', 'hair', 'bag', 'hat', 'glasses', 'accessory'}))
  for _ in range(20):
    m2 = _mentions(a, facing, rng, boost=present - set(m1), damp=set(m1))
    c2 = caption(a, facing, m2, rng)
    if c2 != c1:
      break
  return [c1, c2]


_TOKEN_RE = re.compile(r"[a-z0-9]+(?:['-][a-z0-9]+)*")


def processed_tokens(text: str) -> list[str]:
  """Lowercase word tokens without punctuation, as in CUHK-PEDES's processed_tokens."""
  return _TOKEN_RE.findall(text.lower())
