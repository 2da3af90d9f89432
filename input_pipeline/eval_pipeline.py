"""The Grain evaluation pipeline: padded gallery and query batches of a split.

Evaluation (`eval_batches`) returns both streams at once (`EvalData`): the gallery (each image
once, resized only) and the queries (each caption once), in fixed batches of config.eval_batch_size
per process, the tail padded with copies of item 0 flagged valid=False, person_id=-1, index=-1.
"""
from __future__ import annotations

import functools
from typing import Any, NamedTuple

import grain
import numpy as np

from input_pipeline import augment
from input_pipeline import examples
from input_pipeline import shapes


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
    image = augment.eval_image(examples.record_field(record, 'image', i), self._size,
                               name=examples.record_name(record, i))
    return dict(images=image, person_id=np.int32(examples.record_person_id(record, i) if valid else -1),
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
    ids, mask = examples.encode_texts(self._tokenizer, [examples.record_captions(record, i)[c]], self._length)
    return dict(text_ids=ids[0], text_mask=mask[0],
                person_id=np.int32(examples.record_person_id(record, i) if valid else -1),
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
  shard_index, shard_count = examples.resolve_shards(shard_index, shard_count)
  b = int(config.eval_batch_size)
  if b < 1:
    raise ValueError(f'eval_batch_size must be >= 1, got {b}')
  size = tuple(int(x) for x in config.data.image_size)
  length = int(config.data.text_length)
  pids, counts = examples.scan_source(source)
  units = examples.TrainIndex.build(pids, counts, 'caption')
  options = grain.ReadOptions(num_threads=max(2, int(config.data.worker_count)),
                              prefetch_buffer_size=4)
  g_items, g_batches = _padded_range(len(pids), b, shard_index, shard_count)
  gallery = g_items.map(_GalleryItem(source, size, len(pids))).batch(b).to_iter_dataset(options)
  q_items, q_batches = _padded_range(len(units.record), b, shard_index, shard_count)
  queries = q_items.map(_QueryItem(source, tokenizer, length, units.record, units.caption)).batch(b)
  buckets = shapes.text_buckets(config, shard_count)
  if len(buckets) > 1:  # as training: each batch padded to the bucket of its longest query
    queries = queries.map(functools.partial(examples.trim_to_bucket, buckets=buckets))
  queries = queries.to_iter_dataset(options)
  return EvalData(gallery, queries, g_batches, q_batches, len(pids), len(units.record))
