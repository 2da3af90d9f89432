"""Prepared examples as the pipelines read them: a record's fields (errors name the record), the index of
training units (`TrainIndex`), and what training and evaluation share (process shards, text encoding).

Source: any random-access sequence (a `tfds.data_source(...)` or a plain Python list) of records,
one per image:
  image       encoded PNG/JPEG bytes (a decoded uint8 (h, w, 3) array is accepted too)
  image_path  str or bytes (used in error messages)
  person_id   int
  captions    (C,) str or bytes
  phrases     (C,) per caption, a JSON-encoded list of strings (str or bytes)
  attributes  (C,) per caption, a JSON-encoded list of strings (str or bytes)
Tokenizer: `encode(texts, length) -> (ids int32 (N, L), mask int32 (N, L))`, `vocab_size`, `pad_id`.
"""
from __future__ import annotations

import collections.abc
import dataclasses
import json
from typing import Sequence

import numpy as np

from input_pipeline import shapes


LEVELS = shapes.MLA_LEVELS
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


def record_name(record, index: int) -> str:
  path = record.get('image_path', '') if isinstance(record, collections.abc.Mapping) else ''
  try:
    path = _to_str(path, 'image_path') if path is not None else ''
  except ValueError:
    path = repr(path)
  return f'record {index}' + (f' ({path})' if path else '')


def record_field(record, key: str, index: int):
  if not isinstance(record, collections.abc.Mapping):
    raise ValueError(f'record {index}: expected a dict, got {type(record).__name__}')
  if key not in record:
    raise ValueError(f'{record_name(record, index)}: missing field {key!r} '
                     f'(has {sorted(record.keys())})')
  return record[key]


def record_captions(record, index: int) -> list[str]:
  caps = record_field(record, 'captions', index)
  if isinstance(caps, (str, bytes)):
    raise ValueError(f'{record_name(record, index)}: captions must be a list, got one string')
  caps = [_to_str(c, f'{record_name(record, index)}: caption') for c in caps]
  if not caps:
    raise ValueError(f'{record_name(record, index)}: no captions')
  return caps


def record_person_id(record, index: int) -> int:
  pid = record_field(record, 'person_id', index)
  try:
    pid_int = int(pid)
  except (TypeError, ValueError) as e:
    raise ValueError(f'{record_name(record, index)}: person_id {pid!r} is not an integer') from e
  if pid_int != pid or not -2**31 <= pid_int < 2**31:
    raise ValueError(f'{record_name(record, index)}: person_id {pid!r} is not an int32')
  return pid_int


def record_json_list(record, key: str, caption_index: int, index: int) -> list[str]:
  """The caption's entry of 'phrases' / 'attributes': a JSON list of strings, blanks removed."""
  values = record_field(record, key, index)
  n_caps = len(record_field(record, 'captions', index))
  if len(values) != n_caps:
    raise ValueError(f'{record_name(record, index)}: {key!r} has {len(values)} entries but '
                     f'captions has {n_caps}')
  raw = _to_str(values[caption_index], f'{record_name(record, index)}: {key}[{caption_index}]')
  try:
    items = json.loads(raw) if raw.strip() else []
  except json.JSONDecodeError as e:
    raise ValueError(f'{record_name(record, index)}: {key}[{caption_index}] is not JSON: '
                     f'{raw[:80]!r}') from e
  if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
    raise ValueError(f'{record_name(record, index)}: {key}[{caption_index}] is not a JSON list '
                     f'of strings: {raw[:80]!r}')
  return [s.strip() for s in items if s.strip()]


def get_many(source, indices: Sequence[int]) -> list:
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
    for i, record in zip(idx, get_many(source, idx)):
      pids[i] = record_person_id(record, i)
      counts[i] = len(record_captions(record, i))
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


def resolve_shards(shard_index, shard_count) -> tuple[int, int]:
  if shard_index is None or shard_count is None:
    import jax  # pylint: disable=g-import-not-at-top  (lazy: keeps workers and tests light)
    shard_index = jax.process_index() if shard_index is None else shard_index
    shard_count = jax.process_count() if shard_count is None else shard_count
  if not 0 <= shard_index < shard_count:
    raise ValueError(f'shard_index {shard_index} out of range for shard_count {shard_count}')
  return int(shard_index), int(shard_count)


def encode_texts(tokenizer, texts: Sequence[str], length: int) -> tuple[np.ndarray, np.ndarray]:
  ids, mask = tokenizer.encode(list(texts), length)
  ids, mask = np.asarray(ids, np.int32), np.asarray(mask, np.int32)
  if ids.shape != (len(texts), length) or mask.shape != ids.shape:
    raise ValueError(f'tokenizer.encode returned shapes {ids.shape}, {mask.shape}; expected '
                     f'{(len(texts), length)} (data.text_length={length})')
  return ids, mask


def longest_text(batch: dict[str, np.ndarray]) -> int:
  """Positions of the batch's longest text ([CLS] and [SEP] included), over every row and level."""
  return int(batch['text_mask'].sum(axis=-1).max())


def trim_to_bucket(batch: dict[str, np.ndarray], buckets: Sequence[int]) -> dict[str, np.ndarray]:
  """A batch padded to buckets[-1] -> padded to the smallest bucket that holds its longest text (the positions
  cut off are padding in every row)."""
  longest = longest_text(batch)
  length = next(b for b in buckets if b >= longest)
  if length == batch['text_ids'].shape[-1]:
    return batch
  return {k: (v[..., :length] if k.startswith('text_') else v) for k, v in batch.items()}
