"""Batches produced ahead of the step: a background thread reads the host iterator and places each batch on the
devices while the previous step runs, so that a training step costs about max(input, step), not their sum.

`DevicePrefetcher(iterator, place, size)` is itself a checkpointable Grain iterator: `get_state()` is the wrapped
iterator's state after the last batch handed to the caller (batches read ahead but not yet taken do not count),
`set_state()` drops what was read ahead and restores the wrapped iterator, so saving and resuming through it is
exactly as through the wrapped iterator (grain.checkpoint.CheckpointSave / CheckpointRestore work on it).

An exception in the thread (a bad record, a dead Grain worker) is raised by the caller's `next()`, with its
original traceback; the thread never hangs the caller: it stops on `close()` and at interpreter exit.
"""
from __future__ import annotations

import copy
import queue
import threading
from typing import Any, Callable, Iterator

import grain
import jax
import ml_collections

from ivt_jax.runtime import sharding as sharding_lib
from ivt_jax.training import setup as step_setup

_POLL_S = 0.1


class _Failure:
  def __init__(self, error: BaseException):
    self.error = error


class _End:
  pass


class _Wrapper(grain.DatasetIterator):
  """What both feeds share: iteration, and closing the wrapped iterator once (after `_stop()`)."""

  def __init__(self, iterator: Any, place: Callable[[Any], Any]):
    super().__init__()
    self._it, self._place = iterator, place

  def __iter__(self) -> Iterator[Any]:
    return self

  def _stop(self) -> None:
    pass

  def close(self) -> None:
    if not self._closed:
      self._closed = True
      self._stop()
      close = getattr(self._it, 'close', None)
      if close is not None:
        close()


class DevicePrefetcher(_Wrapper):
  """Reads `size` batches ahead of the caller in a daemon thread and applies `place` (e.g. the placement of a
  process-local numpy batch as global jax.Arrays: `sharding.global_batch`) there.

  iterator: a host iterator with get_state() / set_state() (input_pipeline.pipeline.TrainIterator).
  place: batch -> placed batch, called in the thread (jax.device_put and make_array_from_process_local_data
    are thread-safe and asynchronous).
  size: batches kept ready (>= 1).
  """

  def __init__(self, iterator: Any, place: Callable[[Any], Any], size: int = 2):
    if size < 1:
      raise ValueError(f'prefetch size must be >= 1, got {size}')
    super().__init__(iterator, place)
    self._size = int(size)
    self._state = copy.deepcopy(iterator.get_state())
    self._queue: queue.Queue | None = None
    self._stop_event: threading.Event | None = None
    self._thread: threading.Thread | None = None

  # ---- the thread ----------------------------------------------------------------------------------

  def _run(self, q: queue.Queue, stop: threading.Event) -> None:
    while not stop.is_set():
      try:
        batch = next(self._it)
        state = copy.deepcopy(self._it.get_state())
        item = (self._place(batch), state)
      except StopIteration:
        item = _End()
      except BaseException as e:  # pylint: disable=broad-except  (handed to the caller)
        item = _Failure(e)
      while not stop.is_set():
        try:
          q.put(item, timeout=_POLL_S)
          break
        except queue.Full:
          continue
      if isinstance(item, (_End, _Failure)):
        return

  def start_prefetch(self) -> None:
    self._assert_not_closed()
    if self._thread is None:
      self._queue = queue.Queue(maxsize=self._size)
      self._stop_event = threading.Event()
      self._thread = threading.Thread(target=self._run, args=(self._queue, self._stop_event),
                                      name='ivt-prefetch', daemon=True)
      self._thread.start()

  def _stop(self) -> None:
    if self._thread is not None:
      self._stop_event.set()
      self._thread.join()
      self._thread = self._queue = self._stop_event = None

  # ---- the iterator --------------------------------------------------------------------------------

  def __next__(self) -> Any:
    self.start_prefetch()
    while True:
      try:
        item = self._queue.get(timeout=_POLL_S)
        break
      except queue.Empty:
        if not self._thread.is_alive() and self._queue.empty():
          raise RuntimeError('the input prefetch thread stopped without a batch or an error')
    if isinstance(item, _End):
      self._stop()
      raise StopIteration
    if isinstance(item, _Failure):
      self._stop()
      raise item.error
    placed, self._state = item
    return placed

  def get_state(self) -> dict[str, Any]:
    return copy.deepcopy(self._state)

  def set_state(self, state: dict[str, Any]) -> None:
    self._stop()
    self._it.set_state(state)
    self._state = copy.deepcopy(self._it.get_state())

  def __str__(self) -> str:
    return f'DevicePrefetcher(size={self._size}, {self._it})'


class InSeries(_Wrapper):
  """The same interface without a thread: each `next()` reads and places one batch (data.prefetch = 0)."""

  def __next__(self) -> Any:
    return self._place(next(self._it))

  def get_state(self) -> dict[str, Any]:
    return self._it.get_state()

  def set_state(self, state: dict[str, Any]) -> None:
    self._it.set_state(state)

  def start_prefetch(self) -> None:
    start = getattr(self._it, 'start_prefetch', None)
    if start is not None:
      start()

  def __str__(self) -> str:
    return f'InSeries({self._it})'


TEXT_SLOTS = 'text_slots'


def _placement(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> Callable[[Any], Any]:
  """batch -> global arrays; with data.text_packing, plus TEXT_SLOTS: the packed texts' slots per device this
  batch needs (`step_setup.text_packing`; with several processes, every position: no process knows the
  others' texts, and all must run one program)."""
  place = lambda batch: sharding_lib.global_batch(batch, mesh)
  if not config.data.get('text_packing', False):
    return place
  def place_packed(batch):
    if jax.process_count() > 1:
      samples, _, length = batch['text_ids'].shape
      slots = step_setup.text_packing(config, mesh, global_batch=samples * jax.process_count(),
                                      text_length=length)[1]
    else:
      slots = step_setup.text_packing(config, mesh, batch)[1]
    out = place(batch)
    out[TEXT_SLOTS] = slots
    return out
  return place_packed


def training_feed(config: ml_collections.ConfigDict, data_iter, mesh: jax.sharding.Mesh) -> grain.DatasetIterator:
  """The training batches as global arrays on the mesh: read and placed `data.prefetch` batches ahead of the
  step in a background thread (`DevicePrefetcher`), or in series with it when data.prefetch is 0 (`InSeries`).
  Either way a checkpointable iterator whose state counts only the batches the loop has taken. With
  data.text_packing each batch also carries TEXT_SLOTS (an int, `_placement`) for the loop to pick its program."""
  n = int(config.data.get('prefetch', 2))
  if n < 0:
    raise ValueError(f'data.prefetch must be >= 0 (batches read ahead; 0 = in series), got {n}')
  place = _placement(config, mesh)
  if n == 0:
    return InSeries(data_iter, place)
  return DevicePrefetcher(data_iter, place, size=n)
