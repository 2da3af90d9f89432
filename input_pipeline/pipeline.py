"""Grain input pipelines: identity-balanced MLA training batches and padded evaluation batches.

Source: any random-access sequence (a `tfds.data_source(...)` or a plain Python list) of records,
one per image:
  image       encoded PNG/JPEG bytes (a decoded uint8 (h, w, 3) array is accepted too)
  image_path  str or bytes (used in error messages)
  person_id   int
  captions    (C,) str or bytes
  phrases     (C,) per caption, a JSON-encoded list of strings (str or bytes)
  attributes  (C,) per caption, a JSON-encoded list of strings (str or bytes)
Tokenizer: `encode(texts, length) -> (ids int32 (N, L), mask int32 (N, L))`, `vocab_size`, `pad_id`.

Training (`train_iterator`)
  Sampling unit: one (image, caption) pair, as the reference, whose training list has one entry
  per caption (`data.sample_unit = 'caption'`, the default); `'image'` makes the unit an image and
  draws one of its captions at random for every sample.
  Identity-balanced batches of P = data.ids_per_batch identities x K = data.images_per_id units,
  following the reference's RandomIdentitySampler: every epoch, each identity's units are shuffled
  and cut into max(n, K) // K chunks of K (an identity with n < K units gets one chunk of K drawn
  with replacement; the remainder n % K is left out for that epoch). The chunks are then laid out
  so that every batch holds P distinct identities: identities in a random order, their chunks
  listed one after another, chunk t going to batch t % S, S = (number of chunks) // P (so an
  identity's chunks land in distinct batches); batch order and identity order inside a batch are
  shuffled. Unlike the reference, whose epoch ends when fewer than P identities have chunks left
  (a slightly random length), an epoch here is exactly S = `steps_per_epoch(...)` batches, the
  last (number of chunks) % P chunks being left out. Identities are contiguous runs of K samples.
  Each sample gives three views (independent augmentations, see augment.py) and three texts of
  its caption, in this order along axis 1 (levels):
    0 sentence: the full caption;
    1 phrase:   one of its 'phrases' at random (the caption itself when it has none);
    2 word:     a random non-empty subset of its 'attributes', of uniformly drawn size in
                1..min(#attributes, data.word_level_max_attrs or #attributes), in random order,
                joined by ',' as the reference; with no attributes, an independently drawn phrase
                as the reference, else the caption
  (drawn by input_pipeline.text.sample_phrase_level / sample_word_level); and BMM keep masks: per
  view over N_img = num_image_tokens(...) tokens and per text over its level's L_l positions (padding
  included, as the reference; L_l = data.text_length, data.phrase_text_length, data.word_text_length,
  see input_pipeline.shapes.level_text_lengths): k ~ U{0..int(bmm_ratio * N)} positions out of 1..N-1 are dropped,
  position 0 (CLS) is always kept; drawn independently per sample, level and modality (the
  reference draws one pattern per forward for the whole batch).
  Batch (B = P K / shard_count samples on this process):
    images (B, 3, H, W, 3) uint8, text_ids (B, 3, L) int32, text_mask (B, 3, L) int32,
    image_keep (B, 3, N_img) bool, text_keep (B, 3, L) bool, person_id (B,) int32;
  L = data.text_length; level l's text is encoded (cut, [SEP] kept) to L_l positions and padded to L
  (pad ids, mask 0, keep True), so a shorter level costs the train step only L_l positions.
  Global batch g of the run is the same whatever the process or worker count: process i gets its
  rows [i B, (i + 1) B) (a P divisible by the process count keeps each identity's K samples on one
  process; the loss sees the global batch either way). Randomness comes from grain's per-element
  seeded `random_map` (Philox keyed by the seed and the global sample index) and per-epoch seeded
  plans, so results do not depend on data.worker_count. The iterator's `get_state()/set_state()`
  resume exactly, also under another worker or process count (`TrainIterator`); for Orbax use
  `grain.checkpoint.CheckpointSave(iterator)` / `grain.checkpoint.CheckpointRestore(iterator)`
  (handler `grain.checkpoint.CheckpointHandler`).

Evaluation (`eval_batches`) returns both streams at once (`EvalData`): the gallery (each image
once, resized only) and the queries (each caption once), in fixed batches of config.eval_batch_size
per process, the tail padded with copies of item 0 flagged valid=False, person_id=-1, index=-1.
"""
from __future__ import annotations

import collections.abc
import dataclasses
import json
import sys
import threading
from typing import Any, NamedTuple, Sequence

from absl import flags
import grain
import numpy as np

from input_pipeline import augment
from input_pipeline import text
from input_pipeline.shapes import level_text_lengths
from input_pipeline.shapes import num_image_tokens

LEVELS = ('sentence', 'phrase', 'word')
SAMPLE_UNITS = ('caption', 'image')
_SCAN_CHUNK = 1024


# ---- records -------------------------------------------------------------------------------------

def _to_str(value, what: str) -> str:
  if isinstance(value, np.ndarray) and value.ndim == 0:
    value = value.item()
  if isinstance(value, (bytes, np.bytes_)):
    return bytes(value).decode('utf-8')
  if isinstance(value, str):
    return value
  raise ValueError(f'{what}: expected str or bytes, got {type(value).__name__}')


def _record_name(record, index: int) -> str:
  path = record.get('image_path', '') if isinstance(record, collections.abc.Mapping) else ''
  try:
    path = _to_str(path, 'image_path') if path is not None else ''
  except ValueError:
    path = repr(path)
  return f'record {index}' + (f' ({path})' if path else '')


def _field(record, key: str, index: int):
  if not isinstance(record, collections.abc.Mapping):
    raise ValueError(f'record {index}: expected a dict, got {type(record).__name__}')
  if key not in record:
    raise ValueError(f'{_record_name(record, index)}: missing field {key!r} '
                     f'(has {sorted(record.keys())})')
  return record[key]


def _captions(record, index: int) -> list[str]:
  caps = _field(record, 'captions', index)
  if isinstance(caps, (str, bytes)):
    raise ValueError(f'{_record_name(record, index)}: captions must be a list, got one string')
  caps = [_to_str(c, f'{_record_name(record, index)}: caption') for c in caps]
  if not caps:
    raise ValueError(f'{_record_name(record, index)}: no captions')
  return caps


def _person_id(record, index: int) -> int:
  pid = _field(record, 'person_id', index)
  try:
    pid_int = int(pid)
  except (TypeError, ValueError) as e:
    raise ValueError(f'{_record_name(record, index)}: person_id {pid!r} is not an integer') from e
  if pid_int != pid or not -2**31 <= pid_int < 2**31:
    raise ValueError(f'{_record_name(record, index)}: person_id {pid!r} is not an int32')
  return pid_int


def _json_list(record, key: str, caption_index: int, index: int) -> list[str]:
  """The caption's entry of 'phrases' / 'attributes': a JSON list of strings, blanks removed."""
  values = _field(record, key, index)
  n_caps = len(_field(record, 'captions', index))
  if len(values) != n_caps:
    raise ValueError(f'{_record_name(record, index)}: {key!r} has {len(values)} entries but '
                     f'captions has {n_caps}')
  raw = _to_str(values[caption_index], f'{_record_name(record, index)}: {key}[{caption_index}]')
  try:
    items = json.loads(raw) if raw.strip() else []
  except json.JSONDecodeError as e:
    raise ValueError(f'{_record_name(record, index)}: {key}[{caption_index}] is not JSON: '
                     f'{raw[:80]!r}') from e
  if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
    raise ValueError(f'{_record_name(record, index)}: {key}[{caption_index}] is not a JSON list '
                     f'of strings: {raw[:80]!r}')
  return [s.strip() for s in items if s.strip()]


def _get_many(source, indices: Sequence[int]) -> list:
  getitems = getattr(source, '__getitems__', None)
  if getitems is not None:
    return list(getitems(list(indices)))
  return [source[i] for i in indices]


def scan_source(source) -> tuple[np.ndarray, np.ndarray]:
  """Reads every record once: person_id (R,) int32 and number of captions (R,) int32."""
  n = len(source)
  pids = np.empty(n, np.int32)
  counts = np.empty(n, np.int32)
  for start in range(0, n, _SCAN_CHUNK):
    idx = range(start, min(n, start + _SCAN_CHUNK))
    for i, record in zip(idx, _get_many(source, idx)):
      pids[i] = _person_id(record, i)
      counts[i] = len(_captions(record, i))
  return pids, counts


@dataclasses.dataclass(frozen=True)
class TrainIndex:
  """The sampling units of a training source.

  record: (U,) int64 record index; caption: (U,) int32 caption index (-1: draw one per sample);
  person_id: (U,) int32.
  """
  record: np.ndarray
  caption: np.ndarray
  person_id: np.ndarray

  @classmethod
  def build(cls, person_ids, num_captions, sample_unit: str = 'caption') -> 'TrainIndex':
    """From per-record person ids (R,) and caption counts (R,)."""
    pids = np.asarray(person_ids, np.int32)
    counts = np.asarray(num_captions, np.int64)
    if sample_unit == 'caption':
      record = np.repeat(np.arange(len(pids), dtype=np.int64), counts)
      starts = np.cumsum(counts) - counts
      caption = (np.arange(len(record)) - np.repeat(starts, counts)).astype(np.int32)
      return cls(record, caption, pids[record])
    if sample_unit == 'image':
      return cls(np.arange(len(pids), dtype=np.int64), np.full(len(pids), -1, np.int32), pids)
    raise ValueError(f'data.sample_unit must be one of {SAMPLE_UNITS}, got {sample_unit!r}')

  @classmethod
  def from_source(cls, source, sample_unit: str = 'caption') -> 'TrainIndex':
    return cls.build(*scan_source(source), sample_unit=sample_unit)


# ---- identity-balanced epochs --------------------------------------------------------------------

def _config_pk(config) -> tuple[int, int]:
  p, k = int(config.data.ids_per_batch), int(config.data.images_per_id)
  if p < 1:
    raise ValueError(f'data.ids_per_batch must be >= 1, got {p}')
  if k < 1:
    raise ValueError(f'data.images_per_id must be >= 1, got {k}')
  return p, k


def chunk_counts(units_per_id: np.ndarray, p: int, k: int) -> np.ndarray:
  """Chunks of K per identity in one epoch: max(n, K) // K, capped at the epoch's batch count.

  The cap only bites when one identity holds more than 1/P of all chunks (tiny datasets); it keeps
  every batch's P identities distinct.
  """
  n = np.asarray(units_per_id, np.int64)
  if len(n) < p:
    raise ValueError(f'data.ids_per_batch={p} but the training data has only {len(n)} identities')
  c = np.maximum(n, k) // k
  while True:
    s = int(c.sum()) // p
    if c.max() <= s:
      return c
    c = np.minimum(c, s)


class IdentitySampler:
  """Per-epoch identity-balanced plans over sampling units with person ids (U,)."""

  def __init__(self, person_ids, p: int, k: int, seed: int):
    pids = np.asarray(person_ids)
    if pids.ndim != 1 or len(pids) == 0:
      raise ValueError(f'expected a non-empty 1-D array of person ids, got shape {pids.shape}')
    self.p, self.k, self.seed = p, k, int(seed)
    _, inverse, n = np.unique(pids, return_inverse=True, return_counts=True)
    order = np.argsort(inverse, kind='stable')
    self._groups = np.split(order, np.cumsum(n)[:-1])  # unit indices per identity, sorted by id
    self._chunks = chunk_counts(n, p, k)
    self.steps_per_epoch = int(self._chunks.sum()) // p

  def epoch(self, epoch: int) -> np.ndarray:
    """Unit indices (S, P*K) of epoch `epoch`: K consecutive units per identity, P distinct ids."""
    p, k, s = self.p, self.k, self.steps_per_epoch
    rng = np.random.default_rng([self.seed, int(epoch), 0x1D5A])
    chunks = []
    for units, c in zip(self._groups, self._chunks):
      if len(units) < k:
        chunks.append(rng.choice(units, size=k, replace=True)[None])
      else:
        chunks.append(rng.permutation(units)[:c * k].reshape(c, k))
    order = rng.permutation(len(chunks))
    flat = np.concatenate([chunks[i] for i in order])[:s * p]            # (S P, K) grouped by id
    batches = flat.reshape(p, s, k).transpose(1, 0, 2)                     # chunk t -> batch t % S
    batches = batches[rng.permutation(s)]
    slots = rng.permuted(np.tile(np.arange(p), (s, 1)), axis=1)
    batches = np.take_along_axis(batches, slots[:, :, None], axis=1)
    return batches.reshape(s, p * k)


def steps_per_epoch(config, source_or_ids) -> int:
  """Training batches per epoch.

  Args:
    config: reads data.ids_per_batch, data.images_per_id, data.sample_unit (default 'caption').
    source_or_ids: the training source, a `TrainIndex`, or the person ids of the sampling units
      (U,) (one per caption for sample_unit='caption', one per image for 'image').
  """
  p, k = _config_pk(config)
  if isinstance(source_or_ids, TrainIndex):
    pids = source_or_ids.person_id
  elif isinstance(source_or_ids, np.ndarray) or (
      len(source_or_ids) and not isinstance(source_or_ids[0], collections.abc.Mapping)):
    pids = np.asarray(source_or_ids)
  else:
    pids = TrainIndex.from_source(source_or_ids, _sample_unit(config)).person_id
  _, n = np.unique(pids, return_counts=True)
  return int(chunk_counts(n, p, k).sum()) // p


def _sample_unit(config) -> str:
  unit = config.data.get('sample_unit', 'caption')
  if unit not in SAMPLE_UNITS:
    raise ValueError(f'data.sample_unit must be one of {SAMPLE_UNITS}, got {unit!r}')
  return unit


# ---- per-sample work -----------------------------------------------------------------------------

def level_texts(caption: str, phrases: Sequence[str], attributes: Sequence[str],
                rng: np.random.Generator, max_attrs: int = 0) -> tuple[str, str, str]:
  """(sentence, phrase, word) texts of one caption, drawn with input_pipeline.text's samplers."""
  texts = {'phrases': list(phrases) or [caption], 'attributes': list(attributes)}
  return (caption, text.sample_phrase_level(texts, rng),
          text.sample_word_level(texts, rng, max_attributes=max_attrs))


def bmm_keep(n: int, ratio: float, rng: np.random.Generator) -> np.ndarray:
  """BMM keep mask (n,) bool: U{0..int(ratio n)} of positions 1..n-1 dropped, CLS kept."""
  keep = np.ones(n, bool)
  num = min(int(ratio * n), n - 1)
  drop = int(rng.integers(0, num + 1)) if num > 0 else 0
  if drop:
    keep[1 + rng.choice(n - 1, size=drop, replace=False)] = False
  return keep


def _encode(tokenizer, texts: Sequence[str], length: int) -> tuple[np.ndarray, np.ndarray]:
  ids, mask = tokenizer.encode(list(texts), length)
  ids, mask = np.asarray(ids, np.int32), np.asarray(mask, np.int32)
  if ids.shape != (len(texts), length) or mask.shape != ids.shape:
    raise ValueError(f'tokenizer.encode returned shapes {ids.shape}, {mask.shape}; expected '
                     f'{(len(texts), length)} (data.text_length={length})')
  return ids, mask


def _encode_levels(tokenizer, texts: Sequence[str], lengths: Sequence[int], length: int
                   ) -> tuple[np.ndarray, np.ndarray]:
  """Level l's text cut to lengths[l] positions, all padded to `length`: ids, mask (len(texts), length)."""
  if len(set(lengths)) == 1 and lengths[0] == length:
    return _encode(tokenizer, texts, length)
  ids = np.full((len(texts), length), getattr(tokenizer, 'pad_id', 0), np.int32)
  mask = np.zeros((len(texts), length), np.int32)
  for level, (t, n) in enumerate(zip(texts, lengths)):
    i, m = _encode(tokenizer, [t], n)
    ids[level, :n], mask[level, :n] = i[0], m[0]
  return ids, mask


@dataclasses.dataclass(frozen=True)
class _Settings:
  image_size: tuple[int, int]
  text_length: int
  level_lengths: tuple[int, int, int]
  num_image_tokens: int
  pad: int
  flip_prob: float
  erase_prob: float
  bmm_ratio: float
  max_attrs: int

  @classmethod
  def from_config(cls, config) -> '_Settings':
    d, m = config.data, config.model
    size = tuple(int(x) for x in d.image_size)
    if len(size) != 2:
      raise ValueError(f'data.image_size must be (H, W), got {d.image_size}')
    if int(d.text_length) < 2:
      raise ValueError(f'data.text_length must be >= 2, got {d.text_length}')
    if not 0.0 <= float(d.bmm_ratio) < 1.0:
      raise ValueError(f'data.bmm_ratio must be in [0, 1), got {d.bmm_ratio}')
    for key in ('flip_prob', 'erase_prob'):
      if not 0.0 <= float(d.augment[key]) <= 1.0:
        raise ValueError(f'data.augment.{key} must be in [0, 1], got {d.augment[key]}')
    if int(d.augment.pad) < 0:
      raise ValueError(f'data.augment.pad must be >= 0, got {d.augment.pad}')
    return cls(size, int(d.text_length), level_text_lengths(config),
               num_image_tokens(size, int(m.patch_size), int(m.stride)),
               int(d.augment.pad), float(d.augment.flip_prob), float(d.augment.erase_prob),
               float(d.bmm_ratio), int(d.word_level_max_attrs))


class _TrainSample(grain.transforms.RandomMap):
  """(record index, caption index or -1) -> one training sample (see the module docstring)."""

  def __init__(self, source, tokenizer, settings: _Settings):
    self._source, self._tokenizer, self._s = source, tokenizer, settings

  def random_map(self, element, rng: np.random.Generator) -> dict[str, Any]:
    index, cap = element
    s = self._s
    record = self._source[index]
    name = _record_name(record, index)
    captions = _captions(record, index)
    if cap < 0:
      cap = int(rng.integers(len(captions)))
    elif cap >= len(captions):
      raise ValueError(f'{name}: caption {cap} requested but it has {len(captions)}')
    images = augment.train_views(_field(record, 'image', index), s.image_size, rng,
                                 num_views=len(LEVELS), pad=s.pad, flip_prob=s.flip_prob,
                                 erase_prob=s.erase_prob, name=name)
    texts = level_texts(captions[cap], _json_list(record, 'phrases', cap, index),
                      _json_list(record, 'attributes', cap, index), rng, s.max_attrs)
    ids, mask = _encode_levels(self._tokenizer, texts, s.level_lengths, s.text_length)
    image_keep = np.stack([bmm_keep(s.num_image_tokens, s.bmm_ratio, rng) for _ in LEVELS])
    text_keep = np.ones((len(LEVELS), s.text_length), bool)
    for level, n in enumerate(s.level_lengths):
      text_keep[level, :n] = bmm_keep(n, s.bmm_ratio, rng)
    return dict(images=images, text_ids=ids, text_mask=mask, image_keep=image_keep,
                text_keep=text_keep, person_id=np.int32(_person_id(record, index)))


class _EpochPlanDataset(grain.MapDataset):
  """Global sample index -> (record index, caption index); infinite, epoch after epoch."""

  def __init__(self, units: TrainIndex, sampler: IdentitySampler):
    super().__init__()
    self._units, self._sampler = units, sampler
    self._per_epoch = sampler.steps_per_epoch * sampler.p * sampler.k
    self._init_cache()

  def _init_cache(self):
    self._lock = threading.Lock()
    self._cache: dict[int, np.ndarray] = {}

  def __getstate__(self):
    state = self.__dict__.copy()
    del state['_lock'], state['_cache']
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._init_cache()

  def __len__(self) -> int:
    return sys.maxsize

  def __str__(self) -> str:
    return f'EpochPlanDataset(steps_per_epoch={self._sampler.steps_per_epoch})'

  def _plan(self, epoch: int) -> np.ndarray:
    with self._lock:
      plan = self._cache.get(epoch)
      if plan is None:
        plan = self._sampler.epoch(epoch).reshape(-1)
        if len(self._cache) >= 2:
          self._cache.pop(min(self._cache))
        self._cache[epoch] = plan
    return plan

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    epoch, pos = divmod(int(index), self._per_epoch)
    unit = self._plan(epoch)[pos]
    return int(self._units.record[unit]), int(self._units.caption[unit])


class _ShardRows(grain.MapDataset):
  """Local sample index -> the global sample index of this process's rows of each global batch."""

  def __init__(self, parent: grain.MapDataset, global_batch: int, shard_index: int,
               shard_count: int):
    super().__init__(parent)
    self._global, self._local = global_batch, global_batch // shard_count
    self._offset = shard_index * self._local

  def __len__(self) -> int:
    return sys.maxsize

  def __str__(self) -> str:
    return f'ShardRows(offset={self._offset}, rows={self._local}/{self._global})'

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    step, row = divmod(int(index), self._local)
    return self._parent[step * self._global + self._offset + row]


# ---- public API ----------------------------------------------------------------------------------

def _shards(shard_index, shard_count) -> tuple[int, int]:
  if shard_index is None or shard_count is None:
    import jax  # pylint: disable=g-import-not-at-top  (lazy: keeps workers and tests light)
    shard_index = jax.process_index() if shard_index is None else shard_index
    shard_count = jax.process_count() if shard_count is None else shard_count
  if not 0 <= shard_index < shard_count:
    raise ValueError(f'shard_index {shard_index} out of range for shard_count {shard_count}')
  return int(shard_index), int(shard_count)


def _read_options(worker_count: int, worker_buffer_size: int, read_ahead: bool = True) -> grain.ReadOptions:
  """Elements are whole batches. In-process, two threads overlap batches with the consumer (PIL
  decode/resize and numpy copies release the GIL); in a worker, one thread computes the next batch
  while the process hands the last one over. The buffer bounds memory to a few batches.
  read_ahead=False (data.prefetch = 0, in-process): each batch is made when asked for, in the caller's thread."""
  if not read_ahead and worker_count == 0:
    return grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
  return grain.ReadOptions(num_threads=2 if worker_count == 0 else 1,
                           prefetch_buffer_size=max(2, worker_buffer_size))


def train_batches(config, source, tokenizer, *, seed: int, shard_index: int | None = None,
                  shard_count: int | None = None, index: TrainIndex | None = None
                  ) -> grain.MapDataset:
  """This process's training batches as an infinite random-access `MapDataset` (batch n = step n).

  Args:
    config: the ConfigDict (data.*, model.patch_size, model.stride).
    source: random-access sequence of records.
    tokenizer: object with encode(texts, length).
    seed: the run's seed (epoch plans and per-sample randomness).
    shard_index, shard_count: this process's shard; default jax.process_index()/process_count().
    index: precomputed `TrainIndex.from_source(source, ...)` (saves a scan of the source).
  Returns:
    MapDataset of batch dicts with B = P K / shard_count rows (module docstring).
  """
  shard_index, shard_count = _shards(shard_index, shard_count)
  if not 0 <= int(seed) < 2**32:
    raise ValueError(f'seed must be in [0, 2**32), got {seed}')
  p, k = _config_pk(config)
  if (p * k) % shard_count:
    raise ValueError(f'data.ids_per_batch * data.images_per_id = {p * k} is not divisible by '
                     f'the process count {shard_count}')
  settings = _Settings.from_config(config)
  units = index if index is not None else TrainIndex.from_source(source, _sample_unit(config))
  sampler = IdentitySampler(units.person_id, p, k, seed)
  ds = _EpochPlanDataset(units, sampler)
  ds = ds.random_map(_TrainSample(source, tokenizer, settings), seed=int(seed))
  ds = _ShardRows(ds, p * k, shard_index, shard_count)
  return ds.batch(p * k // shard_count, drop_remainder=True)


class TrainIterator(grain.DatasetIterator):
  """Checkpointable iterator over training batches, from any step, with any worker count.

  The state is the next batch number plus what must match on restore:
  {'next_batch', 'seed', 'global_batch_size', 'steps_per_epoch'}. Batch n does not depend on
  the worker count or on the process count (each process takes its rows of the same global
  batch), so a state restores under other data.worker_count or process counts too. `set_state`
  stops the worker processes; they restart at the new position on the next batch (or at
  `start_prefetch()`, which Orbax's grain handler calls after restoring).
  """

  def __init__(self, batches: grain.MapDataset, *, worker_count: int, worker_buffer_size: int,
               check: dict[str, int], read_ahead: bool = True):
    super().__init__()
    if worker_count < 0:
      raise ValueError(f'data.worker_count must be >= 0, got {worker_count}')
    self._batches, self._check = batches, dict(check)
    self._workers, self._buffer = int(worker_count), int(worker_buffer_size)
    self._read_ahead = bool(read_ahead)
    self._next = 0
    self._it = None

  def _inner(self) -> grain.DatasetIterator:
    self._assert_not_closed()
    if self._it is None:
      ds = self._batches[self._next:].to_iter_dataset(
          _read_options(self._workers, self._buffer, self._read_ahead))
      if self._workers > 0:
        if not flags.FLAGS.is_parsed():
          # Grain reads its absl flags when it starts worker processes; outside absl.app.run (a
          # notebook, a library caller) nothing parsed them: take their defaults.
          flags.FLAGS.mark_as_parsed()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=self._workers, per_worker_buffer_size=max(1, self._buffer)))
      self._it = iter(ds)
    return self._it

  def __next__(self) -> dict[str, np.ndarray]:
    batch = next(self._inner())
    self._next += 1
    return batch

  def __str__(self) -> str:
    return f'TrainIterator(next_batch={self._next}, workers={self._workers})'

  def get_state(self) -> dict[str, int]:
    return {'next_batch': self._next, **self._check}

  def set_state(self, state: dict[str, Any]) -> None:
    for key, value in self._check.items():
      if key in state and int(state[key]) != value:
        raise ValueError(f'cannot resume the training data: the checkpoint has {key}='
                         f'{state[key]}, this run {value} (same seed, data.ids_per_batch x '
                         f'data.images_per_id and training data are needed)')
    next_batch = int(state['next_batch'])
    if next_batch < 0:
      raise ValueError(f'bad training-data state: next_batch={next_batch}')
    self._stop()
    self._next = next_batch

  def start_prefetch(self) -> None:
    self._inner().start_prefetch()

  def _stop(self) -> None:
    if self._it is not None:
      self._it.close()
      self._it = None

  def close(self) -> None:
    if not self._closed:
      self._closed = True
      self._stop()


def train_iterator(config, source, tokenizer, *, seed: int, shard_index: int | None = None,
                   shard_count: int | None = None, index: TrainIndex | None = None
                   ) -> TrainIterator:
  """Checkpointable iterator over this process's training batches (see `train_batches`).

  `it.get_state()` / `it.set_state(state)` resume exactly. With Orbax: save
  `grain.checkpoint.CheckpointSave(it)` and restore `grain.checkpoint.CheckpointRestore(it)` into
  an iterator built with the same config, source and seed (handler
  `grain.checkpoint.CheckpointHandler`; one JSON file per process). Call `it.close()` when done
  with worker processes.
  """
  units = index if index is not None else TrainIndex.from_source(source, _sample_unit(config))
  batches = train_batches(config, source, tokenizer, seed=seed, shard_index=shard_index,
                          shard_count=shard_count, index=units)
  p, k = _config_pk(config)
  check = dict(seed=int(seed), global_batch_size=p * k,
               steps_per_epoch=steps_per_epoch(config, units))
  return TrainIterator(batches, worker_count=int(config.data.worker_count),
                       worker_buffer_size=int(config.data.worker_buffer_size), check=check,
                       read_ahead=int(config.data.get('prefetch', 2)) > 0)


class EvalData(NamedTuple):
  """Evaluation streams of one process. Iterate `gallery` / `queries` as often as needed.

  gallery batches: images (b, H, W, 3) uint8, person_id (b,) int32, index (b,) int32 (record
    index), valid (b,) bool.
  queries batches: text_ids (b, L) int32, text_mask (b, L) int32, person_id (b,) int32,
    index (b,) int32 (caption number in record order), image_index (b,) int32 (its record),
    valid (b,) bool.
  Padding rows copy item 0 with valid=False, person_id=-1, index=-1 (image_index=-1).
  """
  gallery: grain.IterDataset
  queries: grain.IterDataset
  num_gallery_batches: int
  num_query_batches: int
  num_images: int
  num_queries: int


class _GalleryItem(grain.transforms.Map):

  def __init__(self, source, image_size, num_items: int):
    self._source, self._size, self._n = source, tuple(image_size), num_items

  def map(self, g: int) -> dict[str, Any]:
    valid = g < self._n
    i = int(g) if valid else 0
    record = self._source[i]
    image = augment.eval_image(_field(record, 'image', i), self._size, name=_record_name(record, i))
    return dict(images=image, person_id=np.int32(_person_id(record, i) if valid else -1),
                index=np.int32(i if valid else -1), valid=np.bool_(valid))


class _QueryItem(grain.transforms.Map):

  def __init__(self, source, tokenizer, text_length: int, q_record: np.ndarray,
               q_caption: np.ndarray):
    self._source, self._tokenizer, self._length = source, tokenizer, text_length
    self._record, self._caption = q_record, q_caption

  def map(self, g: int) -> dict[str, Any]:
    valid = g < len(self._record)
    q = int(g) if valid else 0
    i, c = int(self._record[q]), int(self._caption[q])
    record = self._source[i]
    ids, mask = _encode(self._tokenizer, [_captions(record, i)[c]], self._length)
    return dict(text_ids=ids[0], text_mask=mask[0],
                person_id=np.int32(_person_id(record, i) if valid else -1),
                index=np.int32(q if valid else -1), image_index=np.int32(i if valid else -1),
                valid=np.bool_(valid))


def _padded_range(n: int, batch: int, shard_index: int, shard_count: int):
  """Global item numbers of this process (padded past n) and its number of batches."""
  per_process = -(-max(n, 1) // (batch * shard_count)) * batch
  start = shard_index * per_process
  return grain.MapDataset.range(start, start + per_process), per_process // batch


def eval_batches(config, source, tokenizer, *, shard_index: int | None = None,
                 shard_count: int | None = None) -> EvalData:
  """Gallery and query batches of an evaluation split for this process (see `EvalData`).

  Items are split in contiguous blocks: process i holds global items [i n_p, (i + 1) n_p), n_p a
  multiple of config.eval_batch_size; every process gets the same number of batches.
  """
  shard_index, shard_count = _shards(shard_index, shard_count)
  b = int(config.eval_batch_size)
  if b < 1:
    raise ValueError(f'eval_batch_size must be >= 1, got {b}')
  size = tuple(int(x) for x in config.data.image_size)
  length = int(config.data.text_length)
  pids, counts = scan_source(source)
  units = TrainIndex.build(pids, counts, 'caption')
  options = grain.ReadOptions(num_threads=max(2, int(config.data.worker_count)),
                              prefetch_buffer_size=4)
  g_items, g_batches = _padded_range(len(pids), b, shard_index, shard_count)
  gallery = g_items.map(_GalleryItem(source, size, len(pids))).batch(b).to_iter_dataset(options)
  q_items, q_batches = _padded_range(len(units.record), b, shard_index, shard_count)
  queries = q_items.map(_QueryItem(source, tokenizer, length, units.record, units.caption))
  queries = queries.batch(b).to_iter_dataset(options)
  return EvalData(gallery, queries, g_batches, q_batches, len(pids), len(units.record))
