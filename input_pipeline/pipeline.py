"""The Grain training pipeline: identity-balanced MLA training batches, checkpointable, from any step.

Training (`train_iterator`)
  Sampling unit: one (image, caption) pair, as the reference, whose training list has one entry
  per caption (`data.sample_unit = 'caption'`, the default); `'image'` makes the unit an image and
  draws one of its captions at random for every sample.
  Identity-balanced batches of P = data.ids_per_batch identities x K = data.images_per_id units
  (input_pipeline.sampler).
  Each sample gives three views (independent augmentations, see augment.py) and three texts of
  its caption, in this order along axis 1 (levels; data.mla_levels keeps a subset, in this order, with
  one view each: ('sentence',) alone is training without MLA):
    0 sentence: the full caption;
    1 phrase:   one of its 'phrases' at random (the caption itself when it has none);
    2 word:     a random non-empty subset of its 'attributes', of uniformly drawn size in
                1..min(#attributes, data.word_level_max_attrs or #attributes), in random order,
                joined by ',' as the reference; with no attributes, an independently drawn phrase
                as the reference, else the caption
  (drawn by input_pipeline.text.sample_phrase_level / sample_word_level); and BMM keep masks: per
  view over N_img = num_image_tokens(...) tokens and per text over its level's L_l positions (padding
  included, as the reference; L_l = data.text_length, data.phrase_text_length, data.word_text_length,
  see input_pipeline.shapes.level_text_lengths): k ~ U{0..int(bmm_ratio * N)} positions out of 1..N-1 are dropped
  (data.bmm_drops = 'uniform'; 'fixed': k = int(bmm_ratio * N)), position 0 (CLS) is always kept. data.bmm_pattern = 'sample' draws them independently per sample, level and
  modality; 'batch' is the reference's: one pattern for every image view of this process's batch (N = the image
  tokens) and one for every text (N = the batch's longest text, [CLS] and [SEP] included: the reference pads
  to the longest and counts the padding), drawn per batch (`_BatchKeep`; with several processes each draws
  its own, as each GPU of the reference's DDP does).
  Batch (B = P K / shard_count samples on this process):
    images (B, V, H, W, 3) uint8, text_ids (B, V, L) int32, text_mask (B, V, L) int32,
    image_keep (B, V, N_img) bool, text_keep (B, V, L) bool, person_id (B,) int32 (V = the levels, 3);
  L = data.text_length; level l's text is encoded (cut, [SEP] kept) to L_l positions and padded to L
  (pad ids, mask 0, keep True), so a shorter level costs the train step only L_l positions. With
  data.text_buckets (one process), the batch's text arrays are then cut to the smallest bucket that holds its
  longest text (`examples.trim_to_bucket`): only padding goes, and the step sees a handful of text shapes.
  Global batch g of the run is the same whatever the process or worker count: process i gets its
  rows [i B, (i + 1) B) (a P divisible by the process count keeps each identity's K samples on one
  process; the loss sees the global batch either way). Randomness comes from grain's per-element
  seeded `random_map` (Philox keyed by the seed and the global sample index) and per-epoch seeded
  plans, so results do not depend on data.worker_count. The iterator's `get_state()/set_state()`
  resume exactly, also under another worker or process count (`TrainIterator`); for Orbax use
  `grain.checkpoint.CheckpointSave(iterator)` / `grain.checkpoint.CheckpointRestore(iterator)`
  (handler `grain.checkpoint.CheckpointHandler`).

Examples are read by input_pipeline.examples; evaluation batches come from input_pipeline.eval_pipeline.
"""
from __future__ import annotations

import dataclasses
import functools
import sys
import threading
from typing import Any, Sequence

from absl import flags
from absl import logging
import grain
import numpy as np

from input_pipeline import augment
from input_pipeline import examples
from input_pipeline import sampler as sampler_lib
from input_pipeline import text
from input_pipeline import shapes
from input_pipeline.shapes import level_text_lengths
from input_pipeline.shapes import num_image_tokens


def level_texts(caption: str, phrases: Sequence[str], attributes: Sequence[str],
                rng: np.random.Generator, max_attrs: int = 0) -> tuple[str, str, str]:
  """(sentence, phrase, word) texts of one caption, drawn with input_pipeline.text's samplers."""
  texts = {'phrases': list(phrases) or [caption], 'attributes': list(attributes)}
  return (caption, text.sample_phrase_level(texts, rng),
          text.sample_word_level(texts, rng, max_attributes=max_attrs))


BMM_PATTERNS = ('sample', 'batch')
BMM_DROPS = ('uniform', 'fixed')


def bmm_keep(n: int, ratio: float, rng: np.random.Generator, drops: str = 'uniform') -> np.ndarray:
  """BMM keep mask (n,) bool: U{0..int(ratio n)} ('uniform') or exactly int(ratio n) ('fixed') of positions
  1..n-1 dropped, CLS kept."""
  keep = np.ones(n, bool)
  num = min(int(ratio * n), n - 1)
  if drops == 'fixed':
    drop = max(num, 0)
  else:
    drop = int(rng.integers(0, num + 1)) if num > 0 else 0
  if drop:
    keep[1 + rng.choice(n - 1, size=drop, replace=False)] = False
  return keep


def _encode_levels(tokenizer, texts: Sequence[str], lengths: Sequence[int], length: int
                   ) -> tuple[np.ndarray, np.ndarray]:
  """Level l's text cut to lengths[l] positions, all padded to `length`: ids, mask (len(texts), length)."""
  ids, mask = examples.encode_texts(tokenizer, texts, max(lengths))  # one tokenizer call for every level
  ids = np.pad(ids, ((0, 0), (0, length - ids.shape[1])), constant_values=getattr(tokenizer, 'pad_id', 0))
  mask = np.pad(mask, ((0, 0), (0, length - mask.shape[1])))
  for level, n in enumerate(lengths):
    if n < ids.shape[1] and mask[level, n - 1]:  # longer than its level: cut to n - 1 pieces, then [SEP]
      sep = ids[level, mask[level].sum() - 1]
      ids[level, n - 1], ids[level, n:] = sep, getattr(tokenizer, 'pad_id', 0)
      mask[level, n:] = 0
  return ids, mask


@dataclasses.dataclass(frozen=True)
class _Settings:
  image_size: tuple[int, int]
  text_length: int
  level_lengths: tuple[int, ...]
  num_image_tokens: int
  pad: int
  flip_prob: float
  erase_prob: float
  bmm_ratio: float
  max_attrs: int
  bmm_pattern: str = 'sample'
  levels: tuple[str, ...] = examples.LEVELS
  erase_max_area: float = augment.ERASE_AREA[1]
  erase_fill: str = 'noise'
  bmm_drops: str = 'uniform'

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
    if d.bmm_pattern not in BMM_PATTERNS:
      raise ValueError(f'data.bmm_pattern must be one of {BMM_PATTERNS}, got {d.bmm_pattern!r}')
    drops = str(d.get('bmm_drops', 'uniform'))
    if drops not in BMM_DROPS:
      raise ValueError(f'data.bmm_drops must be one of {BMM_DROPS}, got {drops!r}')
    max_area = float(d.augment.get('erase_max_area', augment.ERASE_AREA[1]))
    if not augment.ERASE_AREA[0] < max_area < 1.0:
      raise ValueError(f'data.augment.erase_max_area must be in ({augment.ERASE_AREA[0]}, 1), got {max_area}')
    fill = d.augment.get('erase_fill', 'noise')
    if fill not in augment.ERASE_FILLS:
      raise ValueError(f'data.augment.erase_fill must be one of {augment.ERASE_FILLS}, got {fill!r}')
    return cls(size, int(d.text_length), level_text_lengths(config),
               num_image_tokens(size, int(m.patch_size), int(m.stride)),
               int(d.augment.pad), float(d.augment.flip_prob), float(d.augment.erase_prob),
               float(d.bmm_ratio), int(d.word_level_max_attrs), str(d.bmm_pattern), shapes.mla_levels(config),
               max_area, fill, drops)


class _TrainSample(grain.transforms.RandomMap):
  """(record index, caption index or -1) -> one training sample (see the module docstring)."""

  def __init__(self, source, tokenizer, settings: _Settings):
    self._source, self._tokenizer, self._s = source, tokenizer, settings

  def random_map(self, element, rng: np.random.Generator) -> dict[str, Any]:
    index, cap = element
    s = self._s
    record = self._source[index]
    name = examples.record_name(record, index)
    captions = examples.record_captions(record, index)
    if cap < 0:
      cap = int(rng.integers(len(captions)))
    elif cap >= len(captions):
      raise ValueError(f'{name}: caption {cap} requested but it has {len(captions)}')
    n_levels = len(s.levels)
    images = augment.train_views(examples.record_field(record, 'image', index), s.image_size, rng,
                                 num_views=n_levels, pad=s.pad, flip_prob=s.flip_prob,
                                 erase_prob=s.erase_prob, name=name, erase_max_area=s.erase_max_area,
                                 erase_fill=s.erase_fill)
    texts = level_texts(captions[cap], examples.record_json_list(record, 'phrases', cap, index),
                      examples.record_json_list(record, 'attributes', cap, index), rng, s.max_attrs)
    texts = [t for level, t in zip(examples.LEVELS, texts) if level in s.levels]
    ids, mask = _encode_levels(self._tokenizer, texts, s.level_lengths, s.text_length)
    text_keep = np.ones((n_levels, s.text_length), bool)
    if s.bmm_pattern == 'batch':  # drawn for the whole batch by _BatchKeep
      image_keep = np.ones((n_levels, s.num_image_tokens), bool)
    else:
      image_keep = np.stack([bmm_keep(s.num_image_tokens, s.bmm_ratio, rng, s.bmm_drops) for _ in s.levels])
      for level, n in enumerate(s.level_lengths):
        text_keep[level, :n] = bmm_keep(n, s.bmm_ratio, rng, s.bmm_drops)
    return dict(images=images, text_ids=ids, text_mask=mask, image_keep=image_keep,
                text_keep=text_keep, person_id=np.int32(examples.record_person_id(record, index)))


class _BatchKeep:
  """(batch number, batch) -> the batch with one BMM pattern for all its image views and one for all its texts
  (data.bmm_pattern = 'batch'), drawn from (seed, batch number): the same whatever the worker count."""
  STREAM = 0xB33  # keeps these draws apart from the per-sample streams

  def __init__(self, settings: _Settings, seed: int):
    self._s, self._seed = settings, int(seed)

  def __call__(self, index: int, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    s = self._s
    rng = np.random.default_rng([self._seed, self.STREAM, int(index)])
    image_keep = bmm_keep(s.num_image_tokens, s.bmm_ratio, rng, s.bmm_drops)
    longest = max(2, examples.longest_text(batch))
    text_keep = np.ones(s.text_length, bool)
    text_keep[:longest] = bmm_keep(longest, s.bmm_ratio, rng, s.bmm_drops)
    return {**batch, 'image_keep': np.broadcast_to(image_keep, batch['image_keep'].shape).copy(),
            'text_keep': np.broadcast_to(text_keep, batch['text_keep'].shape).copy()}


class _EpochPlanDataset(grain.MapDataset):
  """Global sample index -> (record index, caption index); infinite, epoch after epoch."""

  def __init__(self, units: examples.TrainIndex, sampler: sampler_lib.IdentitySampler):
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
                  shard_count: int | None = None, index: examples.TrainIndex | None = None
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
  shard_index, shard_count = examples.resolve_shards(shard_index, shard_count)
  if not 0 <= int(seed) < 2**32:
    raise ValueError(f'seed must be in [0, 2**32), got {seed}')
  p, k = sampler_lib.config_pk(config)
  if (p * k) % shard_count:
    raise ValueError(f'data.ids_per_batch * data.images_per_id = {p * k} is not divisible by '
                     f'the process count {shard_count}')
  settings = _Settings.from_config(config)
  units = (index if index is not None
           else examples.TrainIndex.from_source(source, sampler_lib.sample_unit_of(config)))
  sampler = sampler_lib.IdentitySampler(units.person_id, p, k, seed)
  ds = _EpochPlanDataset(units, sampler)
  ds = ds.random_map(_TrainSample(source, tokenizer, settings), seed=int(seed))
  ds = _ShardRows(ds, p * k, shard_index, shard_count)
  ds = ds.batch(p * k // shard_count, drop_remainder=True)
  if settings.bmm_pattern == 'batch':
    ds = ds.map_with_index(_BatchKeep(settings, seed))
  buckets = shapes.text_buckets(config, shard_count)
  if len(buckets) > 1:
    ds = ds.map(functools.partial(examples.trim_to_bucket, buckets=buckets))
  elif len(shapes.text_buckets(config)) > 1:
    logging.info('data.text_buckets: off with %d processes; every batch is padded to data.text_length (%d)',
                 shard_count, settings.text_length)
  return ds


class InputPipelineError(RuntimeError):
  """Producing a training batch failed (a record that does not read, a Grain worker process that died)."""


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
    try:
      batch = next(self._inner())
    except StopIteration:
      raise
    except Exception as e:  # pylint: disable=broad-except  (said once, with the batch and the workers)
      self._stop()  # the next call starts afresh at this batch
      where = (f'in one of its {self._workers} Grain worker processes' if self._workers
               else 'in the training process (data.worker_count=0)')
      died = 'terminated unexpectedly' in str(e)
      hint = (' A worker process that dies was killed from outside or ran out of memory: lower '
              'data.worker_count or data.worker_buffer_size.' if died else '')
      raise InputPipelineError(f'the input pipeline failed {where}, at or before training batch {self._next}: '
                               f'{type(e).__name__}: {str(e).rstrip(". ")}.{hint}') from e
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
                   shard_count: int | None = None, index: examples.TrainIndex | None = None
                   ) -> TrainIterator:
  """Checkpointable iterator over this process's training batches (see `train_batches`).

  `it.get_state()` / `it.set_state(state)` resume exactly. With Orbax: save
  `grain.checkpoint.CheckpointSave(it)` and restore `grain.checkpoint.CheckpointRestore(it)` into
  an iterator built with the same config, source and seed (handler
  `grain.checkpoint.CheckpointHandler`; one JSON file per process). Call `it.close()` when done
  with worker processes.
  """
  units = (index if index is not None
           else examples.TrainIndex.from_source(source, sampler_lib.sample_unit_of(config)))
  batches = train_batches(config, source, tokenizer, seed=seed, shard_index=shard_index,
                          shard_count=shard_count, index=units)
  p, k = sampler_lib.config_pk(config)
  check = dict(seed=int(seed), global_batch_size=p * k,
               steps_per_epoch=sampler_lib.steps_per_epoch(config, units))
  return TrainIterator(batches, worker_count=int(config.data.worker_count),
                       worker_buffer_size=int(config.data.worker_buffer_size), check=check,
                       read_ahead=int(config.data.get('prefetch', 2)) > 0)
