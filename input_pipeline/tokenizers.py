"""Text tokenizers behind one interface: WordPiece (bert-base-uncased vocab.txt) and SentencePiece.

Both give fixed-length int32 ids and an attention mask:
  [CLS] pieces... [SEP] [PAD]...   (SentencePiece: <s> as the CLS, </s> as the SEP, <pad> = 0)
Texts longer than the length are cut before the final [SEP], which is always kept; padding is 0.

  WordPiece:     the reference's tokenizer (HF BertTokenizer, bert-base-uncased: lower-casing, accent
                 stripping, [CLS] text [SEP]); ids equal bert-base-uncased's, so BERT and IVT checkpoints
                 load as they are. Built with the `tokenizers` library from a vocab.txt.
  SentencePiece: a BPE (or unigram) model trained on the training captions (`train_sentencepiece`),
                 for training from scratch with a small vocabulary.
  CLIP:          CLIP's byte-level BPE (49,408 ids) from its released merges file bpe_simple_vocab_16e6.txt.gz
                 (a path, or the copy the open_clip package ships): <start_of_text> text <end_of_text>, padding
                 0, ids equal to CLIP's SimpleTokenizer's (ftfy and HTML unescaping, whitespace folded,
                 lower case, its pre-tokenization pattern, byte-to-unicode map and merge ranks).

`identity()` fingerprints what decides the ids (kind + hash of the vocabulary or of the model's pieces
and normalizer), so that an index or checkpoint made with one tokenizer can refuse another.
"""
from __future__ import annotations

import functools
import gzip
import hashlib
import html
import logging
import os
import re
from collections.abc import Iterable, Sequence

import numpy as np
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2
from tokenizers import Tokenizer as _HFTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers

_LOG = logging.getLogger(__name__)

KINDS = ('wordpiece', 'sentencepiece', 'clip')
PAD_ID = 0

# SentencePiece special ids (fixed at training).
SP_PAD_ID, SP_UNK_ID, SP_BOS_ID, SP_EOS_ID = 0, 1, 2, 3

_WORDPIECE_SPECIALS = ('[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]')


class TextTokenizer:
  """Shared encode/decode logic; subclasses give the pieces of each text and their special ids.

  Attributes:
    kind: 'wordpiece' | 'sentencepiece'.
    vocab_size: number of ids (the model's embedding rows).
    pad_id: 0.
    cls_id, sep_id: first and last id of every encoded text.
    path: the file it was loaded from.
  """

  kind: str = ''
  pad_id: int = PAD_ID

  def __init__(self, path: str, vocab_size: int, cls_id: int, sep_id: int, fingerprint: str):
    self._path = path
    self._vocab_size = vocab_size
    self._cls_id = cls_id
    self._sep_id = sep_id
    self._fingerprint = fingerprint

  @property
  def path(self) -> str:
    return self._path

  @property
  def vocab_size(self) -> int:
    return self._vocab_size

  @property
  def cls_id(self) -> int:
    return self._cls_id

  @property
  def sep_id(self) -> int:
    return self._sep_id

  def identity(self) -> str:
    """Stable fingerprint '<kind>:sha256:<16 hex>' of what decides the ids (not of the file path)."""
    return f'{self.kind}:sha256:{self._fingerprint[:16]}'

  def pieces(self, texts: Sequence[str]) -> list[list[int]]:
    """Ids of each text without special tokens, not truncated."""
    raise NotImplementedError

  def encode(self, texts: Sequence[str], length: int) -> tuple[np.ndarray, np.ndarray]:
    """Tokenizes texts to fixed length.

    Args:
      texts: N strings (a bare str is refused: wrap it in a list).
      length: tokens per text including CLS and SEP, >= 2 (config key data.text_length).

    Returns:
      ids: int32 (N, length): CLS, at most length - 2 pieces, SEP, then pad_id (0).
      mask: int32 (N, length): 1 on CLS..SEP, 0 on padding.
    """
    if isinstance(texts, (str, bytes)):
      raise TypeError('texts must be a sequence of strings, not a single string: use [text]')
    texts = list(texts)
    for i, t in enumerate(texts):
      if not isinstance(t, str):
        raise TypeError(f'texts[{i}] must be a str, got {type(t).__name__}')
    if int(length) != length or length < 2:
      raise ValueError(f'length (data.text_length) must be an integer >= 2 for CLS and SEP, got {length}')
    length = int(length)
    ids = np.full((len(texts), length), self.pad_id, dtype=np.int32)
    mask = np.zeros((len(texts), length), dtype=np.int32)
    for row, pieces in enumerate(self.pieces(texts) if texts else []):
      body = pieces[:length - 2]
      n = len(body) + 2
      ids[row, 0] = self.cls_id
      ids[row, 1:n - 1] = body
      ids[row, n - 1] = self.sep_id
      mask[row, :n] = 1
    return ids, mask

  def decode(self, ids: np.ndarray | Sequence[int] | Sequence[Sequence[int]]) -> str | list[str]:
    """Text of encoded ids; padding and special tokens are skipped.

    Args:
      ids: (L,) -> str, or (N, L) -> list of N str.
    """
    arr = np.asarray(ids)
    if arr.ndim == 1:
      return self._decode_one([int(i) for i in arr])
    if arr.ndim == 2:
      return [self._decode_one([int(i) for i in row]) for row in arr]
    raise ValueError(f'ids must be 1-D or 2-D, got shape {arr.shape}')

  def _decode_one(self, ids: list[int]) -> str:
    raise NotImplementedError

  def __repr__(self) -> str:
    return f'{type(self).__name__}(path={self.path!r}, vocab_size={self.vocab_size}, {self.identity()})'


class WordPieceTokenizer(TextTokenizer):
  """BERT uncased WordPiece from a vocab.txt, ids equal to HF BertTokenizer's for that vocabulary."""

  kind = 'wordpiece'

  def __init__(self, path: str):
    path = os.fspath(path)
    _require_file(path, 'WordPiece vocab.txt (config key data.vocab_file)')
    with open(path, 'rb') as f:
      self._setup(path, f.read())

  def _setup(self, path: str, vocab_bytes: bytes) -> None:
    vocab = _read_wordpiece_vocab(vocab_bytes, path)
    self._vocab_bytes = vocab_bytes
    self._tok = _build_wordpiece(vocab)
    fingerprint = hashlib.sha256('\n'.join(vocab).encode('utf-8')).hexdigest()
    super().__init__(path, self._tok.get_vocab_size(with_added_tokens=True), vocab['[CLS]'], vocab['[SEP]'],
                     fingerprint)

  def pieces(self, texts: Sequence[str]) -> list[list[int]]:
    return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

  def _decode_one(self, ids: list[int]) -> str:
    return self._tok.decode(ids, skip_special_tokens=True)

  def __getstate__(self):
    return {'path': self._path, 'vocab_bytes': self._vocab_bytes}

  def __setstate__(self, state):
    # Rebuilt from the bytes read at load time: worker processes need not see the file.
    self._setup(state['path'], state['vocab_bytes'])


def _read_wordpiece_vocab(raw: bytes, path: str) -> dict[str, int]:
  """vocab.txt bytes -> {token: line index}, as HF's load_vocab (one token a line, '\\n' only)."""
  try:
    content = raw.decode('utf-8')
  except UnicodeDecodeError as e:
    raise ValueError(f'{path}: a WordPiece vocab.txt must be UTF-8 ({e})') from e
  lines = content.split('\n')
  if lines and lines[-1] == '':
    lines.pop()
  vocab: dict[str, int] = {}
  for i, token in enumerate(lines):
    if token in vocab:
      raise ValueError(f'{path}: line {i + 1}: token {token!r} repeats line {vocab[token] + 1}')
    vocab[token] = i
  if vocab.get('[PAD]') != PAD_ID:
    raise ValueError(f'{path}: [PAD] must be the first line (id {PAD_ID}), as in bert-base-uncased; got '
                     f'{vocab.get("[PAD]")}')
  missing = [s for s in ('[UNK]', '[CLS]', '[SEP]') if s not in vocab]
  if missing:
    raise ValueError(f'{path}: not a BERT WordPiece vocab.txt: no {", ".join(missing)} '
                     f'({len(vocab)} lines)')
  return vocab


def _build_wordpiece(vocab: dict[str, int]) -> _HFTokenizer:
  tok = _HFTokenizer(models.WordPiece(vocab=vocab, unk_token='[UNK]', max_input_chars_per_word=100))
  # As BertTokenizer(do_lower_case=True): clean text, CJK spacing, lower-case and strip accents.
  tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                              strip_accents=None, lowercase=True)
  tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
  tok.decoder = decoders.WordPiece(prefix='##', cleanup=True)
  # Special tokens written in a text stay single tokens, as in BertTokenizer.
  tok.add_special_tokens([s for s in _WORDPIECE_SPECIALS if s in vocab])
  return tok


class SentencePieceTokenizer(TextTokenizer):
  """A trained SentencePiece model: <s> (id 2) as CLS, </s> (id 3) as SEP, <pad> = 0."""

  kind = 'sentencepiece'

  def __init__(self, path: str):
    path = os.fspath(path)
    _require_file(path, 'SentencePiece model')
    with open(path, 'rb') as f:
      self._setup(path, f.read())

  def _setup(self, path: str, model_bytes: bytes) -> None:
    self._model_bytes = model_bytes
    sp = spm.SentencePieceProcessor()
    try:
      sp.LoadFromSerializedProto(model_bytes)
    except Exception as e:  # sentencepiece raises RuntimeError/OSError depending on the fault
      raise ValueError(f'{path}: not a SentencePiece model ({e})') from e
    if sp.pad_id() != PAD_ID or sp.bos_id() < 0 or sp.eos_id() < 0:
      raise ValueError(f'{path}: the SentencePiece model needs pad_id={PAD_ID} and bos/eos pieces '
                       f'(got pad={sp.pad_id()}, bos={sp.bos_id()}, eos={sp.eos_id()}); train it with '
                       'train_sentencepiece')
    self._sp = sp
    super().__init__(path, sp.get_piece_size(), sp.bos_id(), sp.eos_id(),
                     _sentencepiece_fingerprint(model_bytes))
    self._special_ids = frozenset({sp.pad_id(), sp.bos_id(), sp.eos_id()})

  def pieces(self, texts: Sequence[str]) -> list[list[int]]:
    return self._sp.encode(list(texts), out_type=int)

  def _decode_one(self, ids: list[int]) -> str:
    return self._sp.decode([i for i in ids if i not in self._special_ids])

  def __getstate__(self):
    return {'path': self._path, 'model_bytes': self._model_bytes}

  def __setstate__(self, state):
    self._setup(state['path'], state['model_bytes'])


def _sentencepiece_fingerprint(model_bytes: bytes) -> str:
  """sha256 of the model without its trainer spec (which records paths), i.e. pieces + normalizer."""
  proto = sentencepiece_model_pb2.ModelProto()
  proto.ParseFromString(model_bytes)
  proto.ClearField('trainer_spec')
  return hashlib.sha256(proto.SerializeToString(deterministic=True)).hexdigest()


MODEL_TYPES = ('bpe', 'unigram')


def train_sentencepiece(texts: Iterable[str], out_prefix: str, vocab_size: int,
                        model_type: str = 'bpe') -> str:
  """Trains a SentencePiece model on captions.

  BPE by default: on a small caption set (a few hundred word types) a unigram model can accept only a
  few pieces more than the characters and splits common words ('blue' -> 'bl' 'u' 'e'), while BPE merges
  up to whole words. On a large corpus both give whole words for the frequent ones.

  Lower-cases through the nmt_nfkc_cf normalization rule; pad=0, unk=1, bos=2, eos=3; every character
  of the texts is covered (no unknown piece for the training texts). One thread and
  no sampling or shuffling of the input, so that the same texts give the same model. When the texts
  are too few for `vocab_size` pieces, the size is lowered to the largest the trainer accepts, with a
  warning.

  Args:
    texts: training captions (config key data.sentencepiece_vocab_size sets the size).
    out_prefix: writes <out_prefix>.model and <out_prefix>.vocab (folders are created).
    vocab_size: requested number of pieces, > 4.
    model_type: 'bpe' or 'unigram' (config key data.sentencepiece_model_type).

  Returns:
    Path of the .model file.
  """
  if model_type not in MODEL_TYPES:
    raise ValueError(f'SentencePiece model type (data.sentencepiece_model_type) must be one of '
                     f'{MODEL_TYPES}, got {model_type!r}')
  if vocab_size <= SP_EOS_ID + 1:
    raise ValueError(f'vocab_size (data.sentencepiece_vocab_size) must exceed {SP_EOS_ID + 1}, '
                     f'got {vocab_size}')
  out_prefix = os.fspath(out_prefix)
  os.makedirs(os.path.dirname(os.path.abspath(out_prefix)), exist_ok=True)
  # Held in memory (a few MB for the largest caption set) so that a retry with a smaller size reads
  # the same text; fed through an iterator, the model records no corpus path and its bytes depend on
  # the texts, the options and out_prefix only.
  lines = []
  for i, t in enumerate(texts):
    if not isinstance(t, str):
      raise TypeError(f'texts[{i}] must be a str, got {type(t).__name__}')
    line = ' '.join(t.split())  # one caption per line: newlines inside a caption become spaces
    if line:
      lines.append(line)
  if not lines:
    raise ValueError(f'no non-empty text to train a SentencePiece model for {out_prefix}')
  size = int(vocab_size)
  while True:
    try:
      _run_trainer(lines, out_prefix, size, model_type)
      break
    except RuntimeError as e:
      m = re.search(r'Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)', str(e))
      if m is None or int(m.group(2)) >= size:
        raise
      smaller = int(m.group(2))
      if smaller <= SP_EOS_ID + 1:
        raise ValueError(f'{len(lines)} texts are too few for a SentencePiece model '
                         f'({smaller} pieces at most)') from e
      _LOG.warning('SentencePiece: %d texts support at most %d pieces; vocab_size lowered from %d to %d '
                   'for %s.model', len(lines), smaller, size, smaller, out_prefix)
      size = smaller
  return out_prefix + '.model'


def _run_trainer(lines: list[str], out_prefix: str, vocab_size: int, model_type: str) -> None:
  spm.SentencePieceTrainer.Train(
      sentence_iterator=iter(lines),
      model_prefix=out_prefix,
      model_type=model_type,
      vocab_size=vocab_size,
      normalization_rule_name='nmt_nfkc_cf',
      character_coverage=1.0,  # every character of the (English) captions gets a piece
      pad_id=SP_PAD_ID, unk_id=SP_UNK_ID, bos_id=SP_BOS_ID, eos_id=SP_EOS_ID,
      pad_piece='<pad>', unk_piece='<unk>', bos_piece='<s>', eos_piece='</s>',
      num_threads=1,
      input_sentence_size=0,
      shuffle_input_sentence=False,
      minloglevel=2,
  )


CLIP_MERGES = 49152 - 256 - 2  # the merges CLIP uses from its file (the rest are unused)


def clip_vocab_file() -> str:
  """The bpe_simple_vocab_16e6.txt.gz the open_clip package ships ('' if it is not installed)."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.find_spec('open_clip')
  if spec is None or not spec.submodule_search_locations:
    return ''
  path = os.path.join(list(spec.submodule_search_locations)[0], 'bpe_simple_vocab_16e6.txt.gz')
  return path if os.path.isfile(path) else ''


@functools.lru_cache(maxsize=1)
def _bytes_to_unicode() -> dict[int, str]:
  """GPT-2's reversible map of the 256 bytes to printable characters (CLIP's `bytes_to_unicode`), in its order
  (the printable bytes first, then the others mapped from 256 on): the order of the first 256 ids."""
  keep = [*range(ord('!'), ord('~') + 1), *range(ord('¡'), ord('¬') + 1), *range(ord('®'), ord('ÿ') + 1)]
  chars = {b: chr(b) for b in keep}
  for extra, b in enumerate(b for b in range(256) if b not in chars):
    chars[b] = chr(256 + extra)
  return chars


class ClipTokenizer(TextTokenizer):
  """CLIP's byte-level BPE (module docstring); <start_of_text> as CLS, <end_of_text> as SEP, pad 0."""

  kind = 'clip'

  def __init__(self, path: str = ''):
    path = os.fspath(path) or clip_vocab_file()
    _require_file(path, "CLIP's bpe_simple_vocab_16e6.txt.gz (config key data.vocab_file; or install open_clip)")
    with open(path, 'rb') as f:
      self._setup(path, f.read())

  def _setup(self, path: str, raw: bytes) -> None:
    import regex  # pylint: disable=g-import-not-at-top  (\p{L}: the pattern CLIP tokenizes with)
    try:
      lines = gzip.decompress(raw).decode('utf-8').split('\n')
    except (OSError, EOFError, UnicodeDecodeError) as e:
      raise ValueError(f'{path}: not a gzip-compressed CLIP merges file ({e})') from e
    merges = [tuple(line.split()) for line in lines[1:CLIP_MERGES + 1]]
    if len(merges) != CLIP_MERGES or any(len(m) != 2 for m in merges):
      raise ValueError(f'{path}: expected {CLIP_MERGES} merges of two symbols after the header line, got '
                       f'{len(merges)} lines (the first malformed: {next((m for m in merges if len(m) != 2), None)})')
    self._raw = raw
    base = list(_bytes_to_unicode().values())
    vocab = base + [v + '</w>' for v in base] + [''.join(m) for m in merges] + ['<start_of_text>', '<end_of_text>']
    self._encoder = {v: i for i, v in enumerate(vocab)}
    self._decoder = dict(enumerate(vocab))
    self._ranks = {m: i for i, m in enumerate(merges)}
    self._byte_encoder = _bytes_to_unicode()
    self._byte_decoder = {c: b for b, c in self._byte_encoder.items()}
    self._pattern = regex.compile(r"""<start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|"""
                                  r"""[^\s\p{L}\p{N}]+""", regex.IGNORECASE)
    self._cache = {'<start_of_text>': '<start_of_text>', '<end_of_text>': '<end_of_text>'}
    fingerprint = hashlib.sha256('\n'.join(' '.join(m) for m in merges).encode('utf-8')).hexdigest()
    super().__init__(path, len(vocab), self._encoder['<start_of_text>'], self._encoder['<end_of_text>'],
                     fingerprint)

  def _bpe(self, token: str) -> str:
    if token in self._cache:
      return self._cache[token]
    word = [*token[:-1], token[-1] + '</w>']
    while len(word) > 1:
      pairs = {(a, b) for a, b in zip(word, word[1:])}
      best = min(pairs, key=lambda p: self._ranks.get(p, float('inf')))
      if best not in self._ranks:
        break
      merged, i = [], 0
      while i < len(word):
        if i < len(word) - 1 and (word[i], word[i + 1]) == best:
          merged.append(word[i] + word[i + 1])
          i += 2
        else:
          merged.append(word[i])
          i += 1
      word = merged
    out = ' '.join(word)
    self._cache[token] = out
    return out

  @staticmethod
  def clean(text: str) -> str:
    import ftfy  # pylint: disable=g-import-not-at-top
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return ' '.join(text.split()).lower()

  def pieces(self, texts: Sequence[str]) -> list[list[int]]:
    out = []
    for text in texts:
      ids = []
      for token in self._pattern.findall(self.clean(text)):
        token = ''.join(self._byte_encoder[b] for b in token.encode('utf-8'))
        ids.extend(self._encoder[p] for p in self._bpe(token).split(' '))
      out.append(ids)
    return out

  def _decode_one(self, ids: list[int]) -> str:
    text = ''.join(self._decoder[i] for i in ids if i not in (self.cls_id, self.sep_id) and i in self._decoder)
    return bytearray(self._byte_decoder[c] for c in text).decode('utf-8', errors='replace').replace(
        '</w>', ' ').strip()

  def __getstate__(self):
    return {'path': self._path, 'raw': self._raw}

  def __setstate__(self, state):
    self._setup(state['path'], state['raw'])


def load_tokenizer(kind: str, path: str) -> TextTokenizer:
  """The tokenizer of a kind from its file.

  Args:
    kind: 'wordpiece' (path: vocab.txt), 'sentencepiece' (path: .model) or 'clip' (path: CLIP's
      bpe_simple_vocab_16e6.txt.gz; '' = open_clip's copy) (config key data.tokenizer).
    path: the vocabulary or model file.

  Raises:
    ValueError: unknown kind, or a file that is not what the kind needs (the message names it).
    FileNotFoundError: the file does not exist (the message names it).
  """
  if kind == 'wordpiece':
    return WordPieceTokenizer(path)
  if kind == 'sentencepiece':
    return SentencePieceTokenizer(path)
  if kind == 'clip':
    return ClipTokenizer(path)
  raise ValueError(f'unknown tokenizer kind {kind!r} (config key data.tokenizer): expected one of {KINDS}')


def _require_file(path: str, what: str) -> None:
  if not path:
    raise FileNotFoundError(f'no {what} given (empty path)')
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{what} not found: {path}')
