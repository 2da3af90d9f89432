"""SynthPEDES identities: attribute sets, their consistency rules, and hard negatives."""
import bisect
import functools
from typing import Any, Sequence

import numpy as np

from input_pipeline.synthetic.vocabulary import (
    COLOURS, DARK_COLOURS, GROUPS, HAIR_COLOURS, HARD_NEGATIVE_WEIGHTS, JEANS_COLOURS, LOWER_TYPES, PATTERNS,
    SAMPLING_ORDER, SKIN_TONES, SLEEVES, SPLITS, UPPER_TYPES)


def weighted_choice(rng: np.random.Generator, options: Sequence[Any], weights: Sequence[float] | None = None) -> Any:
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
  return weighted_choice(rng, names, [(weights or {}).get(c, 1.0) for c in names])


def pattern_colour(upper_colour: str) -> str:
  """Colour of stripes, checks or logo on an upper garment: white on dark colours, black on light."""
  return 'white' if upper_colour in DARK_COLOURS else 'black'


def _group_samplers(rng: np.random.Generator, a: dict[str, Any]):
  """Samplers per group, in dependency order; each reads the groups sampled before it from `a`."""
  woman = lambda: a['gender'] == 'woman'

  def hair_style():
    return (weighted_choice(rng, ('short', 'long', 'ponytail', 'bald'),
                    (0.2, 0.48, 0.32, 0.0) if woman() else (0.76, 0.07, 0.04, 0.13)),)

  def hair_colour():
    if a['hair_style'] == 'bald':
      return (None,)
    return (weighted_choice(rng, tuple(HAIR_COLOURS), (0.45, 0.3, 0.15, 0.1)),)

  def upper_type():
    w = (0.22, 0.2, 0.16, 0.12, 0.12, 0.18) if woman() else (0.3, 0.25, 0.2, 0.1, 0.15, 0.0)
    t = weighted_choice(rng, UPPER_TYPES, w)
    return t, weighted_choice(rng, SLEEVES[t])

  def upper_colour():
    return (_colour(rng),)

  def pattern():
    options = PATTERNS[a['upper_type']]
    return (weighted_choice(rng, options, [0.62] + [0.38 / (len(options) - 1)] * (len(options) - 1)),)

  def lower_type():
    if a['upper_type'] == 'dress':
      return (None,)
    if a['upper_type'] == 'coat':  # a coat hides shorts and short skirts
      return (weighted_choice(rng, ('trousers', 'jeans')),)
    return (weighted_choice(rng, LOWER_TYPES, (0.3, 0.3, 0.15, 0.25) if woman() else (0.45, 0.35, 0.2, 0.0)),)

  def lower_colour():
    if a['lower_type'] is None:
      return (None,)
    if a['lower_type'] == 'jeans':
      return (weighted_choice(rng, JEANS_COLOURS, (3, 3, 2, 1, 0.6)),)
    c = _colour(rng, {'black': 2.0, 'grey': 1.5, 'dark blue': 1.5, 'blue': 1.2, 'brown': 1.2})
    if c == a['upper_colour'] and rng.random() < 0.7:  # same colour top and bottom: allowed, rarer
      c = _colour(rng, exclude=(c,))
    return (c,)

  def shoes_colour():
    return (_colour(rng, {'black': 3, 'white': 3, 'brown': 2, 'grey': 1.2, 'orange': 0.5, 'yellow': 0.5,
                          'purple': 0.5, 'green': 0.5}),)

  def bag():
    t = weighted_choice(rng, ('none', 'backpack', 'handbag', 'shoulder bag'),
                (0.3, 0.25, 0.25, 0.2) if woman() else (0.38, 0.3, 0.1, 0.22))
    return t, (None if t == 'none' else _colour(rng))

  def hat():
    t = weighted_choice(rng, ('none', 'cap', 'beanie', 'hat'), (0.72, 0.12, 0.08, 0.08))
    return t, (None if t == 'none' else _colour(rng))

  def glasses():
    return (bool(rng.random() < 0.2),)

  def accessory():
    t = weighted_choice(rng, ('none', 'umbrella', 'scarf'), (0.76, 0.1, 0.14))
    return t, (None if t == 'none' else _colour(rng))

  return {'gender': lambda: (weighted_choice(rng, ('man', 'woman')),), 'hair_style': hair_style,
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
    a['build'] = weighted_choice(rng, ('slim', 'average', 'heavy'), (0.3, 0.5, 0.2))
    a['height'] = weighted_choice(rng, ('short', 'average', 'tall'), (0.25, 0.5, 0.25))
    a['skin'] = int(rng.integers(len(SKIN_TONES)))
    a['bag_side'] = weighted_choice(rng, ('left', 'right'))
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
                    hard_negative_fraction: float = 0.25,
                    train_hard_negative_fraction: float | None = None) -> list[dict[str, Any]]:
  """All identities: dicts of attributes plus 'id' (from 1), 'split' and 'hard_negative_of' (id or None).

  Ids are consecutive per split (train, then val, then test). The splits are sampled test first, then val,
  then train, so the test identities depend only on (seed, test_ids, fraction) and the val identities on
  those and val_ids: adding training identities leaves the evaluation splits as they were. Within a split
  the base identities prefer an (upper colour, lower colour) pair not used yet in this round (a round ends
  when 40 draws find none), then round(fraction * n) hard
  negatives copy a base identity of the same split with 1 or 2 described groups changed. No two identities
  share `described_key`. `train_hard_negative_fraction` (None: `hard_negative_fraction`) sets the training
  split's fraction alone; the val and test identities, sampled before, do not change with it.
  """
  if train_hard_negative_fraction is None:
    train_hard_negative_fraction = hard_negative_fraction
  for name, v in (('hard_negative_fraction', hard_negative_fraction),
                  ('train_hard_negative_fraction', train_hard_negative_fraction)):
    if not 0.0 <= v < 1.0:
      raise ValueError(f'{name} must be in [0, 1), got {v}.')
  sizes = split_sizes(num_ids, val_ids, test_ids)
  rng = np.random.default_rng(np.random.SeedSequence([seed, 0x5E1D]))
  used: set[tuple] = set()
  by_split: dict[str, list[dict[str, Any]]] = {}  # in id order within the split
  for split in SAMPLING_ORDER:
    n = sizes[split]
    fraction = train_hard_negative_fraction if split == 'train' else hard_negative_fraction
    n_hard = min(round(fraction * n), n - 1) if n > 1 else 0
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
    groups = list(HARD_NEGATIVE_WEIGHTS)
    weights = np.array([HARD_NEGATIVE_WEIGHTS[g] for g in groups])
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
