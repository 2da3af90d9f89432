"""ivt_jax.training.prefetch: batches read and placed ahead, state as the taken batches, errors surface, no hang."""
import threading
import time

import jax
import numpy as np
import pytest

from ivt_jax.training import prefetch
from ivt_jax.runtime import sharding as sharding_lib
from conftest import tiny_config


class Counting:
  """A checkpointable iterator of numbered batches; records how far it has been read."""

  def __init__(self, fail_at=None, stop_at=None):
    self.next_batch, self.calls, self.fail_at, self.stop_at = 0, 0, fail_at, stop_at
    self.read = threading.Event()

  def __next__(self):
    self.calls += 1
    self.read.set()
    if self.fail_at is not None and self.next_batch == self.fail_at:
      raise ValueError(f'record 17 (train/0017.png): cannot decode (batch {self.next_batch})')
    if self.stop_at is not None and self.next_batch == self.stop_at:
      raise StopIteration
    batch = {'x': np.full((8, 3), self.next_batch, np.int32)}
    self.next_batch += 1
    return batch

  def get_state(self):
    return {'next_batch': self.next_batch}

  def set_state(self, state):
    self.next_batch = int(state['next_batch'])


def _wait(predicate, timeout=10.0):
  end = time.time() + timeout
  while not predicate():
    if time.time() > end:
      return False
    time.sleep(0.01)
  return True


def test_same_batches_and_state_counts_only_taken_batches():
  inner = Counting()
  feed = prefetch.DevicePrefetcher(inner, lambda b: {k: v + 1000 for k, v in b.items()}, size=3)
  assert feed.get_state() == {'next_batch': 0}
  for i in range(5):
    batch = next(feed)
    assert int(batch['x'][0, 0]) == 1000 + i
    assert feed.get_state() == {'next_batch': i + 1}
  # The thread reads ahead: the wrapped iterator is past what was taken (5 taken + 3 ready + 1 in hand).
  assert _wait(lambda: inner.next_batch >= 8)
  assert feed.get_state() == {'next_batch': 5}
  feed.close()


def test_set_state_drops_read_ahead_and_resumes_exactly():
  feed = prefetch.DevicePrefetcher(Counting(), lambda b: b, size=2)
  taken = [int(next(feed)['x'][0, 0]) for _ in range(4)]
  state = feed.get_state()
  later = [int(next(feed)['x'][0, 0]) for _ in range(3)]
  feed.set_state(state)
  again = [int(next(feed)['x'][0, 0]) for _ in range(3)]
  assert taken == [0, 1, 2, 3] and later == again == [4, 5, 6]
  # A fresh feed restored from the state continues the same way.
  other = prefetch.DevicePrefetcher(Counting(), lambda b: b, size=2)
  other.set_state(state)
  other.start_prefetch()
  assert [int(next(other)['x'][0, 0]) for _ in range(3)] == [4, 5, 6]
  feed.close()
  other.close()


def test_reads_the_next_batch_while_the_caller_works():
  inner = Counting()
  feed = prefetch.DevicePrefetcher(inner, lambda b: b, size=1)
  next(feed)
  # While the caller holds batch 0 (its "step"), the thread has already read batch 1 and is reading batch 2.
  assert _wait(lambda: inner.calls >= 2), inner.calls
  feed.close()


def test_error_in_the_thread_is_raised_by_next_not_a_hang():
  feed = prefetch.DevicePrefetcher(Counting(fail_at=2), lambda b: b, size=2)
  next(feed), next(feed)
  with pytest.raises(ValueError, match=r'record 17 \(train/0017.png\): cannot decode'):
    next(feed)
  feed.close()


def test_end_of_data_stops_iteration():
  feed = prefetch.DevicePrefetcher(Counting(stop_at=3), lambda b: b, size=2)
  assert [int(b['x'][0, 0]) for b in feed] == [0, 1, 2]
  feed.close()


def test_close_stops_the_thread():
  feed = prefetch.DevicePrefetcher(Counting(), lambda b: b, size=2)
  next(feed)
  feed.close()
  assert not any(t.name == 'ivt-prefetch' and t.is_alive() for t in threading.enumerate())
  with pytest.raises(Exception):
    next(feed)


def test_training_feed_places_global_batches_on_the_mesh():
  """prefetch.training_feed: the batch arrives as global arrays split over the 8 devices, ahead or in series, with
  the same values and state."""
  c = tiny_config()
  mesh = sharding_lib.make_mesh(c)
  outs = {}
  for n in (0, 2):
    c.data.prefetch = n
    feed = prefetch.training_feed(c, Counting(), mesh)
    batches = [next(feed) for _ in range(3)]
    for b in batches:
      assert isinstance(b['x'], jax.Array) and b['x'].sharding == sharding_lib.batch_sharding(mesh)
      assert len(b['x'].addressable_shards) == jax.device_count()
    outs[n] = ([np.asarray(b['x']) for b in batches], feed.get_state())
    feed.close()
  np.testing.assert_array_equal(outs[0][0], outs[2][0])
  assert outs[0][1] == outs[2][1] == {'next_batch': 3}
  c.data.prefetch = -1
  with pytest.raises(ValueError, match='data.prefetch'):
    prefetch.training_feed(c, Counting(), mesh)
