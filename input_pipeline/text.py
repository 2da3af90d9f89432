"""MLA (multi-level alignment) texts: the phrase level and the word level of a caption.

IVT pairs each training image with three texts, each with its own augmented view:
  sentence level: the whole caption;
  phrase level:   one phrase of the caption (`sentence_phrases`), drawn at random per step;
  word level:     a random non-empty subset of the caption's attribute phrases ("black backpack",
                  "long hair"; `attribute_phrases`) joined by ','.

The dataset builder calls `mla_texts` (or `mla_texts_batch`) once per caption and stores both lists;
the input pipeline draws the per-step texts with `sample_phrase_level` and `sample_word_level`, which
implement the reference's fallbacks:
  * no phrase (every piece of the caption is 5 characters or shorter): the phrase list is the whole
    lower-cased caption. (The reference would fail there: `random.sample` of an empty list.)
  * no attribute phrase: the word level is one random phrase, as the reference does for CUHK-PEDES
    (`split_txt` when `atts` is empty), and if that were empty, the caption.

Attribute phrases come from NLTK's averaged-perceptron part-of-speech tagger and an NLTK
`RegexpParser` chunk grammar. The reference ships its CUHK-PEDES attributes precomputed
(`cuhk_pedes_att.json`, field `att`) and not the code or grammar that made them, so the grammar here
is this project's own (see `ATTRIBUTE_GRAMMAR`). The tagger model is the user's NLTK data when
installed (`averaged_perceptron_tagger_eng`), else the English model shipped in the PyPI package
`textblob-aptagger` (0.2.0), read with a restricted unpickler: nothing is downloaded.
"""
from __future__ import annotations

import builtins
import functools
import importlib.util
import os
import pickle
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import nltk
import numpy as np
from nltk.chunk import RegexpParser
from nltk.tag.perceptron import PerceptronTagger
from nltk.tokenize import NLTKWordTokenizer

# The reference keeps phrase pieces strictly longer than this many characters.
PHRASE_MIN_CHARS = 5

# Attribute phrase: modifiers ending in a noun, at least one modifier.
#   - modifiers: adjectives (JJ, JJR, JJS), participles (VBN: "hooded", "faded"), and singular nouns used
#     as modifiers, because the tagger tags many colour words as NN ("grey/NN jacket/NN",
#     "pink/NN shoes/NNS") and compounds are attributes too ("baseball cap", "knee length shorts");
#   - adjective groups may be coordinated: "red and white shoes", "black and grey backpack";
#   - an adverb may lead a group: the tagger reads "long" in "long black hair" as RB.
# Plural nouns never act as modifiers, and nouns never sit before a conjunction, so "black pants and
# red shoes" gives two phrases, not one.
ATTRIBUTE_GRAMMAR = r"""
ATT: {(<RB>?<JJ.*|VBN>+<CC>)*<RB>?<JJ.*|VBN|NN|NNP>+<NN.*>}
"""
_ATTRIBUTE_LABEL = 'ATT'

# Sentence ends for tagging (the reference's phrase split uses '.' only; '!', '?', ';' also end
# sentences for the tagger). Captions often lack the space after '.': "jacket.His trousers".
_SENTENCE_END = re.compile(r'[.!?;]+')

_TAGGER_PICKLE_PACKAGE = 'textblob_aptagger'
_TAGGER_PICKLE_NAME = 'trontagger-0.1.0.pickle'
_NLTK_TAGGER_RESOURCE = 'taggers/averaged_perceptron_tagger_eng/'


# ---- phrase level ---------------------------------------------------------------------------------


def sentence_phrases(caption: str) -> list[str]:
  """The phrase level of a caption, as the reference computes it (`get_phrase_level_txt`).

  The caption is lower-cased, '.' then '[' then ']' are stripped from its ends, and it is split into
  sentences on '.'. Each sentence is split on ','; its longest comma piece (the first of equal ones)
  is one candidate, and the other pieces joined back with ',' (outer commas stripped) are a second.
  Candidates of more than `PHRASE_MIN_CHARS` characters (counted before stripping spaces) are kept,
  then stripped of spaces. Pieces that are empty after stripping are dropped (the reference would
  keep them as empty texts).

  Example: "A pedestrian with dark hair is wearing red and white shoes, a black hooded sweatshirt, and
  black pants." -> ["a pedestrian with dark hair is wearing red and white shoes",
  "a black hooded sweatshirt, and black pants"].

  Args:
    caption: the caption.

  Returns:
    The phrases in caption order; empty when no piece is long enough (`mla_texts` then falls back to
    the whole caption).
  """
  _check_caption(caption)
  text = caption.lower().strip('.').strip('[').strip(']')
  candidates = []
  for sentence in text.split('.'):
    pieces = sentence.split(',')
    longest = max(range(len(pieces)), key=lambda i: len(pieces[i]))
    rest = (','.join(pieces[:longest]) + ',' + ','.join(pieces[longest + 1:])).strip(',')
    candidates += [p for p in (pieces[longest], rest) if len(p) > PHRASE_MIN_CHARS]
  return [p for p in (c.strip(' ') for c in candidates) if p]


def comma_pieces(caption: str) -> list[str]:
  """All comma pieces of a caption: the reference's word level for ICFG-PEDES and RSTPReid.

  For those two datasets the reference has no attribute file; its word-level text is one random
  piece of the caption split on '.' and ',', keeping pieces longer than `PHRASE_MIN_CHARS`
  characters (counted before stripping spaces).

  Args:
    caption: the caption.

  Returns:
    The stripped pieces in caption order (possibly empty).
  """
  _check_caption(caption)
  text = caption.lower().strip('.').strip('[').strip(']')
  pieces = [p for sentence in text.split('.') for p in sentence.split(',') if len(p) > PHRASE_MIN_CHARS]
  return [p for p in (c.strip(' ') for c in pieces) if p]


# ---- word level -----------------------------------------------------------------------------------


class _TaggerModelUnpickler(pickle.Unpickler):
  """Unpickler for the perceptron tagger model: plain containers only, every other global refused.

  The model is a (weights, tagdict, classes) tuple of dicts, strings, floats and one set; the only
  global it names is the builtin `set` (spelt `__builtin__.set` by Python 2 pickles).
  """

  _ALLOWED = frozenset({'set', 'frozenset', 'dict', 'list', 'tuple'})

  def find_class(self, module: str, name: str) -> Any:
    if module in ('builtins', '__builtin__') and name in self._ALLOWED:
      return getattr(builtins, name)
    raise pickle.UnpicklingError(
        f'refusing to load global {module}.{name}: the tagger model may only hold plain '
        f'containers ({", ".join(sorted(self._ALLOWED))})')

  def persistent_load(self, pid: Any) -> Any:
    raise pickle.UnpicklingError('refusing persistent id in the tagger model')


def load_tagger_model(path: str) -> tuple[dict[str, dict[str, float]], dict[str, str], set[str]]:
  """Reads a pickled averaged-perceptron tagger model safely.

  Args:
    path: a pickle of (weights, tagdict, classes) as written by textblob-aptagger (and by NLTK before
      3.8.2): weights maps feature -> {tag: weight}, tagdict word -> tag, classes is the tag set.

  Returns:
    (weights, tagdict, classes).

  Raises:
    pickle.UnpicklingError: the file names any global other than a plain builtin container.
    ValueError: the content does not have the model's shape (the message names the file).
  """
  with open(path, 'rb') as f:
    # Python 2 pickles store str as bytes; the model's strings are ASCII.
    obj = _TaggerModelUnpickler(f, encoding='utf-8').load()
  if not (isinstance(obj, tuple) and len(obj) == 3):
    raise ValueError(f'{path}: expected a (weights, tagdict, classes) tuple, got {type(obj).__name__}')
  weights, tagdict, classes = obj
  classes = set(classes) if isinstance(classes, (set, frozenset, list, tuple)) else classes
  if not (isinstance(weights, dict) and isinstance(tagdict, dict) and isinstance(classes, set)):
    raise ValueError(f'{path}: expected (dict, dict, set), got '
                     f'({type(weights).__name__}, {type(tagdict).__name__}, {type(classes).__name__})')
  if not classes or not all(isinstance(c, str) for c in classes):
    raise ValueError(f'{path}: the tag set must be a non-empty set of strings')
  for word, tag in tagdict.items():
    if not (isinstance(word, str) and tag in classes):
      raise ValueError(f'{path}: bad tag dictionary entry {word!r}: {tag!r}')
  for feature, row in weights.items():
    if not (isinstance(feature, str) and isinstance(row, dict)):
      raise ValueError(f'{path}: bad weights entry for feature {feature!r}')
    for tag, w in row.items():
      if tag not in classes or not isinstance(w, (int, float)):
        raise ValueError(f'{path}: bad weight {tag!r}: {w!r} for feature {feature!r}')
  return weights, tagdict, classes


def packaged_tagger_path() -> str:
  """Path of the English tagger model inside the installed textblob-aptagger package.

  The package is located without importing it (its __init__ imports textblob, which is not needed).

  Raises:
    FileNotFoundError: the package or its model file is missing, with how to install it.
  """
  hint = ('install it with `pip install --no-deps textblob-aptagger==0.2.0`, or put NLTK\'s '
          f'{_NLTK_TAGGER_RESOURCE} in an nltk_data directory')
  spec = importlib.util.find_spec(_TAGGER_PICKLE_PACKAGE)
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(f'no part-of-speech tagger model: package {_TAGGER_PICKLE_PACKAGE} is not '
                            f'installed and NLTK has no {_NLTK_TAGGER_RESOURCE}; {hint}')
  for folder in spec.submodule_search_locations:
    path = os.path.join(folder, _TAGGER_PICKLE_NAME)
    if os.path.isfile(path):
      return path
  raise FileNotFoundError(f'{_TAGGER_PICKLE_NAME} is missing from {list(spec.submodule_search_locations)}; '
                          f'{hint}')


class _MemoPredict:
  """The tagger model's `predict(features)` remembered per feature set. The averaged perceptron's answer is a
  pure function of the features (the word, its affixes, its neighbours and the two previous tags), and
  captions repeat these contexts far more often than they repeat whole sentences, so most tokens are looked
  up instead of scored. Bounded: the memory is cleared when it holds `limit` entries."""

  def __init__(self, predict, limit: int = 1 << 18):
    self._predict, self._limit = predict, limit
    self._memory: dict = {}

  def __call__(self, features, return_conf=False):
    if return_conf:
      return self._predict(features, True)
    key = frozenset(features.items())
    answer = self._memory.get(key)
    if answer is None:
      if len(self._memory) >= self._limit:
        self._memory.clear()
      answer = self._memory[key] = self._predict(features)
    return answer


@functools.lru_cache(maxsize=None)
def _tagger_and_source() -> tuple[PerceptronTagger, str]:
  try:
    found = nltk.data.find(_NLTK_TAGGER_RESOURCE)
  except LookupError:
    found = None
  if found is not None:
    tagger, source = PerceptronTagger(), f'nltk_data:{found}'
  else:
    path = packaged_tagger_path()
    weights, tagdict, classes = load_tagger_model(path)
    tagger = PerceptronTagger(load=False)
    tagger.model.weights = weights
    tagger.tagdict = tagdict
    tagger.classes = tagger.model.classes = classes
    source = f'{_TAGGER_PICKLE_PACKAGE}:{path}'
  tagger.model.predict = _MemoPredict(tagger.model.predict)
  return tagger, source


def load_tagger() -> PerceptronTagger:
  """The English part-of-speech tagger, loaded once per process (see the module docstring)."""
  return _tagger_and_source()[0]


def tagger_source() -> str:
  """Where the tagger model came from: 'nltk_data:<path>' or 'textblob_aptagger:<path>'."""
  return _tagger_and_source()[1]


@functools.lru_cache(maxsize=None)
def _chunker() -> RegexpParser:
  return RegexpParser(ATTRIBUTE_GRAMMAR)


_WORD_TOKENIZER = NLTKWordTokenizer()


def pos_tag_caption(caption: str) -> list[list[tuple[str, str]]]:
  """Lower-cases, splits into sentences, word-tokenizes and tags a caption (no NLTK data needed).

  Returns:
    One list of (token, Penn Treebank tag) per non-empty sentence.
  """
  _check_caption(caption)
  tagged = []
  for sentence in _SENTENCE_END.split(caption.lower()):
    tags = _tag_sentence(sentence)
    if tags:
      tagged.append(list(tags))
  return tagged


@functools.lru_cache(maxsize=1 << 16)
def _tag_sentence(sentence: str) -> tuple[tuple[str, str], ...]:
  """Tokens and tags of one lower-cased sentence (the tagger sees one sentence at a time, so a sentence
  repeated across captions is tagged once)."""
  tokens = _WORD_TOKENIZER.tokenize(sentence)
  return tuple(load_tagger().tag(tokens)) if tokens else ()


def attribute_phrases(caption: str) -> list[str]:
  """The word level of a caption: its attribute phrases, modifiers with their noun.

  The caption is tagged by `pos_tag_caption` (lower-cased: all-capital captions exist) and chunked
  with `ATTRIBUTE_GRAMMAR`. Past-tense verbs ending in "-ed" are read as participles first (VBD ->
  VBN: the tagger often gives "striped/VBD shirt", "colored/VBD pants"). Phrases are lower-case words
  joined by one space, in caption order, without repeats.

  Example: "A pedestrian with dark hair is wearing red and white shoes, a black hooded sweatshirt, and
  black pants." -> ["dark hair", "red and white shoes", "black hooded sweatshirt", "black pants"].

  Args:
    caption: the caption.

  Returns:
    The attribute phrases (possibly empty: see `sample_word_level` for the fallback).
  """
  chunker = _chunker()
  phrases: dict[str, None] = {}
  for tagged in pos_tag_caption(caption):
    tagged = [(w, 'VBN' if t == 'VBD' and w.endswith('ed') else t) for w, t in tagged]
    for subtree in chunker.parse(tagged).subtrees(lambda t: t.label() == _ATTRIBUTE_LABEL):
      phrases.setdefault(' '.join(w for w, _ in subtree.leaves()), None)
  return list(phrases)


# ---- both levels ----------------------------------------------------------------------------------


def mla_texts(caption: str) -> dict[str, list[str]]:
  """Phrase and word levels of one caption, precomputed once by the dataset builder.

  Args:
    caption: a non-blank caption.

  Returns:
    dict(phrases=[...] (never empty: the lower-cased caption when no phrase is long enough),
         attributes=[...] (possibly empty)).

  Raises:
    TypeError / ValueError: the caption is not a string / is blank.
  """
  _check_caption(caption)
  if not caption.strip():
    raise ValueError('blank caption: MLA texts need a non-empty caption')
  phrases = sentence_phrases(caption) or [caption.lower().strip()]
  return {'phrases': phrases, 'attributes': attribute_phrases(caption)}


def mla_texts_batch(captions: Iterable[str]) -> list[dict[str, list[str]]]:
  """`mla_texts` for many captions; a bad caption's error names its index."""
  out = []
  for i, caption in enumerate(captions):
    try:
      out.append(mla_texts(caption))
    except (TypeError, ValueError) as e:
      raise type(e)(f'caption {i}: {e}') from e
  return out


def sample_phrase_level(texts: Mapping[str, Sequence[str]], rng: np.random.Generator) -> str:
  """One phrase drawn uniformly, as the reference's `random.sample(result, 1)`.

  Args:
    texts: a `mla_texts` result.
    rng: numpy random generator.
  """
  phrases = texts['phrases']
  if not phrases:
    raise ValueError('no phrase: texts must come from mla_texts (its phrase list is never empty)')
  return phrases[int(rng.integers(len(phrases)))]


def sample_word_level(texts: Mapping[str, Sequence[str]], rng: np.random.Generator,
                      max_attributes: int = 0) -> str:
  """The word-level text: a random subset of the attribute phrases joined by ','.

  As the reference: the subset size is uniform in 1..n (n attributes; capped at `max_attributes`
  when > 0, config key data.word_level_max_attrs), the chosen phrases in random order, joined by ','
  without spaces. Without attributes: one random phrase (the reference's fallback).

  Args:
    texts: a `mla_texts` result.
    rng: numpy random generator.
    max_attributes: largest subset size; 0 = no cap.
  """
  if max_attributes < 0:
    raise ValueError(f'max_attributes must be >= 0 (data.word_level_max_attrs), got {max_attributes}')
  attributes = texts['attributes']
  if not attributes:
    return sample_phrase_level(texts, rng)
  n = len(attributes)
  top = min(n, max_attributes) if max_attributes else n
  k = int(rng.integers(1, top + 1))
  chosen = rng.choice(n, size=k, replace=False)
  return ','.join(attributes[int(i)] for i in chosen)


def _check_caption(caption: Any) -> None:
  if not isinstance(caption, str):
    raise TypeError(f'caption must be a str, got {type(caption).__name__}: {caption!r:.80}')
