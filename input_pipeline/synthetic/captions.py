"""SynthPEDES captions: two independent CUHK-PEDES-style descriptions per image, of drawn attributes only."""
import re
from typing import Any, Sequence

import numpy as np

from input_pipeline.synthetic.vocabulary import COLOUR_WORDS, HAIR_WORDS
from input_pipeline.synthetic.identities import weighted_choice


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
    return weighted_choice(self.rng, COLOUR_WORDS.get(colour, (colour,)))

  def pick(self, *options: str) -> str:
    return weighted_choice(self.rng, options)

  def hair(self) -> str:
    a = self.a
    if a['hair_style'] == 'bald':
      return self.pick('a bald head', 'a shaved head', 'a bald head')
    c = weighted_choice(self.rng, HAIR_WORDS[a['hair_colour']])
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
  subject = weighted_choice(rng, _SUBJECTS[a['gender']])
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
  style = weighted_choice(rng, ('one', 'two', 'three'), (0.4, 0.4, 0.2))
  dressed = ('is dressed in',) if wear_keys and wear_keys[0] in ('upper', 'lower') else ()
  wear_verb = lambda: weighted_choice(rng, ('is wearing', 'is wearing', 'wears', 'has on') + dressed)
  carry_verb = lambda: weighted_choice(rng, ('is carrying', 'carries', 'is holding') if 'accessory' in carry_keys
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
      verb = weighted_choice(rng, ('is wearing', 'wearing', 'wears'))
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
      first += weighted_choice(rng, (f', carrying {_join(carry, rng)}', f' and {carry_verb()} {_join(carry, rng)}',
                             f' with {_join(carry, rng)}'))
      carry = []
    sentences.append(first)
  if rest_wear:
    also = weighted_choice(rng, ('also ', '', 'also '))
    sentences.append(weighted_choice(rng, (f'{pron} {also}wears {_join(rest_wear, rng)}',
                                   f'{pron} is {also}wearing {_join(rest_wear, rng)}',
                                   f'{pron} {also}has on {_join(rest_wear, rng)}')))
  if hair is not None and not hair_done:
    sentences.append(weighted_choice(rng, (f'{pron} has {hair}', f'{pron} has {hair}')))
  if carry:
    verb = carry_verb()
    if rng.random() < 0.3:
      verb = 'is also ' + verb[3:] if verb.startswith('is ') else 'also ' + verb
    sentences.append(f'{pron} {verb} {_join(carry, rng)}')
  if rng.random() < 0.12:
    sentences.append(weighted_choice(rng, _FACING_SENTENCES[facing]).format(P=pron)[:-1])
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
