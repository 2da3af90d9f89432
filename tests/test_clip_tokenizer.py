"""CLIP's byte-level BPE: ids equal to the reference SimpleTokenizer's (open_clip's copy of openai/CLIP's,
run side by side) on the real captions and on hard text; the shared encode interface; clear errors."""
import gzip
import importlib.util
import pickle
import sys
import types

import numpy as np
import pytest

from input_pipeline import tokenizers
from tests.test_tokenizers import CAPTIONS, _real_captions

HARD = ['', '   ', 'Ünïcödé façade — “quotes” & ampersands &amp; &lt;b&gt;', '日本語の説明文', 'نص عربي',
        'emoji 😀👍🏽 mixed', "it's they're we've I'm you'll he'd", 'numbers 123 4.5 6,7', 'x' * 300,
        'HTML &amp;amp; twice', '<start_of_text> in a caption <end_of_text>', 'tabs\tand\nnewlines']


def _reference_tokenizer():
  """open_clip/tokenizer.py imported by itself; its module-level `import torch` gets a stand-in (encode and
  decode never touch torch)."""
  path = tokenizers.clip_vocab_file()
  if not path:
    pytest.skip('open_clip is not installed')
  module_path = path.replace('bpe_simple_vocab_16e6.txt.gz', 'tokenizer.py')
  saved = sys.modules.get('torch')
  if saved is None:
    stand_in = types.ModuleType('torch')
    stand_in.LongTensor = stand_in.Tensor = object  # names in its annotations
    sys.modules['torch'] = stand_in
  try:
    spec = importlib.util.spec_from_file_location('_open_clip_tokenizer_reference', module_path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
  finally:
    if saved is None:
      del sys.modules['torch']
  return module.SimpleTokenizer(path)


@pytest.fixture(scope='module')
def clip():
  if not tokenizers.clip_vocab_file():
    pytest.skip('open_clip is not installed')
  return tokenizers.load_tokenizer('clip', '')


def test_ids_equal_the_reference(clip):
  ref = _reference_tokenizer()
  texts = _real_captions() + CAPTIONS + HARD
  assert len(texts) > 20
  ours = clip.pieces(texts)
  for text, ids in zip(texts, ours):
    assert ids == ref.encode(text), text
  assert clip.vocab_size == len(ref.encoder) == 49408
  assert (clip.cls_id, clip.sep_id) == (ref.sot_token_id, ref.eot_token_id) == (49406, 49407)
  for text in CAPTIONS[:5]:
    assert clip.decode(np.array([clip.cls_id, *clip.pieces([text])[0], clip.sep_id])) == \
        ref.decode(ref.encode(text)).strip()


def test_encode_77_tokens_as_irra(clip):
  """IRRA's tokenize: [sot] pieces [eot], cut to the length with <end_of_text> kept last, zeros after."""
  long = ' '.join(['a man in a red coat and blue jeans'] * 20)
  ids, mask = clip.encode([CAPTIONS[0], long], 77)
  pieces = clip.pieces([CAPTIONS[0]])[0]
  assert ids.shape == (2, 77) and ids.dtype == np.int32
  assert list(ids[0, :len(pieces) + 2]) == [49406, *pieces, 49407] and not ids[0, len(pieces) + 2:].any()
  assert mask[0].sum() == len(pieces) + 2
  assert ids[1, 0] == 49406 and ids[1, -1] == 49407 and mask[1].all()
  assert list(ids[1, 1:76]) == clip.pieces([long])[0][:75]


def test_pickles_without_the_file(clip, tmp_path):
  clone = pickle.loads(pickle.dumps(clip))
  assert clone.pieces(CAPTIONS) == clip.pieces(CAPTIONS) and clone.identity() == clip.identity()
  assert clip.identity().startswith('clip:sha256:')


def test_bad_files_refused_by_name(tmp_path):
  with pytest.raises(FileNotFoundError, match='bpe_simple_vocab_16e6'):
    tokenizers.load_tokenizer('clip', str(tmp_path / 'missing.txt.gz'))
  plain = tmp_path / 'plain.txt'
  plain.write_text('not gzip')
  with pytest.raises(ValueError, match=r'plain.txt: not a gzip-compressed CLIP merges file'):
    tokenizers.load_tokenizer('clip', str(plain))
  short = tmp_path / 'short.txt.gz'
  short.write_bytes(gzip.compress('#version: 0.2\na b\nc d\n'.encode()))
  with pytest.raises(ValueError, match=r'short.txt.gz: expected 48894 merges'):
    tokenizers.load_tokenizer('clip', str(short))
