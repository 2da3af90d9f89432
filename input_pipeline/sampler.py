"""Identity-balanced epochs (the reference's RandomIdentitySampler, with a fixed epoch length).

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
"""
from __future__ import annotations

import collections.abc

import numpy as np

from input_pipeline import examples


def config_pk(config) -> tuple[int, int]:
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
  p, k = config_pk(config)
  if isinstance(source_or_ids, examples.TrainIndex):
    pids = source_or_ids.person_id
  elif isinstance(source_or_ids, np.ndarray) or (
      len(source_or_ids) and not isinstance(source_or_ids[0], collections.abc.Mapping)):
    pids = np.asarray(source_or_ids)
  else:
    pids = examples.TrainIndex.from_source(source_or_ids, sample_unit_of(config)).person_id
  _, n = np.unique(pids, return_counts=True)
  return int(chunk_counts(n, p, k).sum()) // p


def sample_unit_of(config) -> str:
  unit = config.data.get('sample_unit', 'caption')
  if unit not in examples.SAMPLE_UNITS:
    raise ValueError(f'data.sample_unit must be one of {examples.SAMPLE_UNITS}, got {unit!r}')
  return unit
