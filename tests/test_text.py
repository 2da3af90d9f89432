"""MLA text levels: reference phrase splitting, attribute phrases, offline tagger, safe model loading."""
import json
import os
import pickle
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from input_pipeline import text

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REAL = os.path.join(os.path.dirname(REPO), 'shared', 'reference', 'real_samples', 'captions.jsonl')

# Real CUHK-PEDES / RSTPReid / SYNTH-PEDES captions (shared/reference/real_samples/captions.jsonl).
PEDESTRIAN = ('A pedestrian with dark hair is wearing red and white shoes, a black hooded sweatshirt, '
              'and black pants.')
PERSON = ('The person has short black hair and is wearing black pants, a long sleeve black top, and red '
          'sneakers.')
WOMAN = 'A woman is wearing a gray shirt, a pair of brown pants and a pair of shoes.'
RSTP = ('The man is wearing a grey jacket and a blue shirt.His trousers are black and his shoes are '
        'brown.He is walking.')
LIST = ('A man with black hair, wearing glasses, a gray and black shirt, black pants and black shoes, '
        'carrying a black backpack, is walking, a hand in the pocket')
STRIPED = ('The woman is wearing knee-length blue shorts and a green and grey striped shirt. She is holding '
           'a white purse in her left hand.')
CAPS = 'THE YOUNG GIRL IS WEARING LIGHT BLUE SKINNY JEANS AND A GRAY TUNIC TOP.'


def _real_captions():
  if not os.path.isfile(REAL):
    pytest.skip(f'{REAL} not available')
  with open(REAL) as f:
    return [json.loads(line)['caption'] for line in f if line.strip()]


def test_real_samples_contain_the_test_captions():
  caps = _real_captions()
  for c in (PEDESTRIAN, PERSON, WOMAN, RSTP, LIST, STRIPED):
    assert c in caps


# ---- phrase level ---------------------------------------------------------------------------------

def test_sentence_phrases_longest_piece_and_rest_per_sentence():
  assert text.sentence_phrases(PEDESTRIAN) == [
      'a pedestrian with dark hair is wearing red and white shoes',
      'a black hooded sweatshirt, and black pants']
  # The longest comma piece comes first even when it is the second piece.
  assert text.sentence_phrases(WOMAN) == [
      'a pair of brown pants and a pair of shoes',
      'a woman is wearing a gray shirt']
  # Sentences split on '.' even without a following space.
  assert text.sentence_phrases(RSTP) == [
      'the man is wearing a grey jacket and a blue shirt',
      'his trousers are black and his shoes are brown',
      'he is walking']
  assert text.sentence_phrases(LIST) == [
      'black pants and black shoes',
      'a man with black hair, wearing glasses, a gray and black shirt, carrying a black backpack, is '
      'walking, a hand in the pocket']


def test_sentence_phrases_length_rule_counts_spaces_and_strips_brackets():
  # ' hat,' pieces: 'a man' has 5 characters (dropped), ' a hat' has 6 with its space (kept).
  assert text.sentence_phrases('[A man, a hat.]') == ['a hat']
  assert text.sentence_phrases('A man, hat.') == []
  assert text.sentence_phrases('') == []
  # Sentences that are only dots or spaces give nothing.
  assert text.sentence_phrases('A man in a red coat... .') == ['a man in a red coat']


def test_comma_pieces_icfg_rstp_word_level():
  assert text.comma_pieces(PEDESTRIAN) == [
      'a pedestrian with dark hair is wearing red and white shoes',
      'a black hooded sweatshirt',
      'and black pants']
  assert text.comma_pieces('A man, hat. Tall.') == []


def test_mla_texts_phrase_fallback_is_the_caption():
  out = text.mla_texts('A man, hat.')
  assert out['phrases'] == ['a man, hat.']


# ---- word level -----------------------------------------------------------------------------------

@pytest.mark.parametrize('caption, expected', [
    (PEDESTRIAN, ['dark hair', 'red and white shoes', 'black hooded sweatshirt', 'black pants']),
    (PERSON, ['short black hair', 'black pants', 'long sleeve black top', 'red sneakers']),
    (WOMAN, ['gray shirt', 'brown pants']),
    (RSTP, ['grey jacket', 'blue shirt']),
    (LIST, ['black hair', 'gray and black shirt', 'black pants', 'black shoes', 'black backpack']),
    (STRIPED, ['knee-length blue shorts', 'green and grey striped shirt', 'white purse', 'left hand']),
    (CAPS, ['young girl', 'light blue skinny jeans', 'gray tunic top']),
    ('She is wearing a dark grey top and light colored pants.', ['dark grey top', 'light colored pants']),
])
def test_attribute_phrases(caption, expected):
  assert text.attribute_phrases(caption) == expected


def test_attribute_phrases_no_repeats_and_none_without_modifiers():
  assert text.attribute_phrases('The woman wears black pants. The woman is carrying black pants.') == [
      'black pants']
  assert text.attribute_phrases('A woman wearing shoes and jeans.') == []


def test_every_real_caption_gives_texts():
  caps = _real_captions()
  out = text.mla_texts_batch(caps)
  assert len(out) == len(caps)
  with_attrs = 0
  for caption, t in zip(caps, out):
    assert t['phrases'] and all(p and p == p.strip() and p == p.lower() for p in t['phrases'])
    assert all(a and a == a.lower() and ' ' in a for a in t['attributes'])
    assert len(set(t['attributes'])) == len(t['attributes'])
    # Every attribute's words appear in the caption, in order.
    words = caption.lower()
    for a in t['attributes']:
      pos = 0
      for w in a.split(' '):
        pos = words.find(w, pos)
        assert pos >= 0, (a, caption)
    with_attrs += bool(t['attributes'])
  assert with_attrs >= 0.9 * len(caps)


def test_mla_texts_rejects_bad_captions():
  with pytest.raises(TypeError, match='str'):
    text.mla_texts(None)
  with pytest.raises(ValueError, match='blank'):
    text.mla_texts('   ')
  with pytest.raises(ValueError, match='caption 1'):
    text.mla_texts_batch(['A man in a red coat.', ''])


# ---- sampling -------------------------------------------------------------------------------------

def test_sample_word_level_subsets_and_fallback():
  texts = text.mla_texts(PEDESTRIAN)
  attrs = set(texts['attributes'])
  rng = np.random.default_rng(0)
  sizes = set()
  for _ in range(300):
    parts = text.sample_word_level(texts, rng).split(',')
    assert set(parts) <= attrs and len(set(parts)) == len(parts)
    sizes.add(len(parts))
  assert sizes == {1, 2, 3, 4}
  for _ in range(50):
    assert len(text.sample_word_level(texts, rng, max_attributes=2).split(',')) <= 2
  # No attribute: one of the phrases, whole.
  bare = {'phrases': ['a man walking', 'he carries nothing'], 'attributes': []}
  seen = {text.sample_word_level(bare, rng) for _ in range(50)}
  assert seen == set(bare['phrases'])
  with pytest.raises(ValueError, match='word_level_max_attrs'):
    text.sample_word_level(texts, rng, max_attributes=-1)


def test_sample_phrase_level_is_uniform_over_phrases():
  texts = text.mla_texts(RSTP)
  rng = np.random.default_rng(1)
  counts = {}
  for _ in range(600):
    p = text.sample_phrase_level(texts, rng)
    counts[p] = counts.get(p, 0) + 1
  assert set(counts) == set(texts['phrases'])
  assert min(counts.values()) > 150


# ---- tagger ---------------------------------------------------------------------------------------

def test_packaged_tagger_model_loads_with_restricted_unpickler():
  weights, tagdict, classes = text.load_tagger_model(text.packaged_tagger_path())
  assert {'NN', 'NNS', 'JJ', 'VBN', 'CC', 'DT'} <= classes
  assert len(weights) > 50_000 and len(tagdict) > 1_000
  assert tagdict['the'] == 'DT'


def test_tagger_works_without_nltk_data(tmp_path):
  """No nltk_data anywhere: NLTK's own pos_tag fails, ours tags from the packaged model."""
  empty = tmp_path / 'nltk_data'
  empty.mkdir()
  code = textwrap.dedent(f"""
      import nltk
      nltk.data.path[:] = [{str(empty)!r}]
      try:
        nltk.pos_tag(['a', 'man'])
        raise SystemExit('nltk.pos_tag found data')
      except LookupError:
        pass
      from input_pipeline import text
      print(text.attribute_phrases({PEDESTRIAN!r}))
      print(text.tagger_source())
  """)
  env = dict(os.environ, NLTK_DATA=str(empty), HOME=str(tmp_path))
  out = subprocess.run([sys.executable, '-c', code], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=120, check=False)
  assert out.returncode == 0, out.stderr
  lines = out.stdout.strip().splitlines()
  assert lines[0] == str(['dark hair', 'red and white shoes', 'black hooded sweatshirt', 'black pants'])
  assert lines[1].startswith('textblob_aptagger:')


class _Hostile:
  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (os.system, (f'touch {self.marker}',))


class _Eval:
  def __reduce__(self):
    return (eval, ('1 + 1',))


@pytest.mark.parametrize('protocol', [2, pickle.HIGHEST_PROTOCOL])
def test_hostile_pickle_is_refused(tmp_path, protocol):
  marker = tmp_path / 'pwned'
  path = tmp_path / 'model.pickle'
  path.write_bytes(pickle.dumps(({}, {}, _Hostile(marker)), protocol=protocol))
  with pytest.raises(pickle.UnpicklingError, match='refusing'):
    text.load_tagger_model(str(path))
  assert not marker.exists()


def test_pickle_naming_other_builtins_is_refused(tmp_path):
  path = tmp_path / 'model.pickle'
  # builtins.eval through REDUCE: a builtin, but not a plain container.
  path.write_bytes(pickle.dumps(({}, {}, _Eval()), protocol=2))
  with pytest.raises(pickle.UnpicklingError, match='eval'):
    text.load_tagger_model(str(path))


def test_pickle_of_wrong_shape_names_the_file(tmp_path):
  path = tmp_path / 'model.pickle'
  path.write_bytes(pickle.dumps(['not', 'a', 'model'], protocol=2))
  with pytest.raises(ValueError, match='model.pickle'):
    text.load_tagger_model(str(path))
  path.write_bytes(pickle.dumps(({'bias': {'NN': 'x'}}, {}, {'NN'}), protocol=2))
  with pytest.raises(ValueError, match='bad weight'):
    text.load_tagger_model(str(path))


def test_remembered_tagger_answers_as_the_perceptron_does():
  """text._MemoPredict (the tagger's predict remembered per feature set) changes no tag: real captions and
  synthetic ones tagged with and without it agree, and a full memory is cleared, not grown."""
  from input_pipeline import synthetic
  real = [json.loads(l)['caption'] for l in open(REAL) if l.strip()] if os.path.exists(REAL) else []
  ids = synthetic.make_identities(60, seed=3, val_ids=0, test_ids=0)  # > 100 captions even without REAL
  rng = np.random.default_rng(0)
  caps = real + [c for a in ids for c in synthetic.captions_for_image(a, synthetic.sample_view(rng), rng)]
  caps += [PEDESTRIAN, PERSON, WOMAN, RSTP, LIST, STRIPED, CAPS]
  tagger = text.load_tagger()
  memo = tagger.model.predict
  assert isinstance(memo, text._MemoPredict)  # pylint: disable=protected-access
  plain = memo._predict  # pylint: disable=protected-access
  tokens = [text._WORD_TOKENIZER.tokenize(c.lower()) for c in caps]  # pylint: disable=protected-access
  try:
    tagger.model.predict = plain
    want = [tagger.tag(t) for t in tokens]
    small = text._MemoPredict(plain, limit=50)  # pylint: disable=protected-access
    tagger.model.predict = small
    got_small = [tagger.tag(t) for t in tokens]
    assert len(small._memory) <= 50  # pylint: disable=protected-access
  finally:
    tagger.model.predict = memo
  assert [tagger.tag(t) for t in tokens] == want == got_small
  assert len(caps) > 100
