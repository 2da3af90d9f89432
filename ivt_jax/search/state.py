"""What the search server holds between requests: the index (reloaded when it changes on disk), the text
embedder behind a micro-batching queue, and the rule for which files may be sent.

- `IndexHolder`: the opened index and its exact (or approximate) ranking. A watcher thread compares the header's
  stat (index.json: its size and modification time, also on Cloud Storage, where nothing is downloaded to see
  it) every `check_every_s`; a changed index is opened (its shards memory-mapped), checked against the model
  (and its approximate index updated) in that thread, then swapped in, while requests go on with the previous
  one. `ivt_jax.search index` writes new shards first and replaces the header last, atomically, so a reader
  sees the old index or the new one, never half of one; an open that fails keeps serving the previous index and
  tries again later.
- `TextBatcher`: queries arriving together are embedded together: a worker thread takes the first waiting
  query, gathers those that arrive within `window_s` (up to `max_batch`), and makes one embedder call for all.
  At most `max_pending` queries wait; beyond that `submit` raises `Busy` (the server answers 503).
- `servable_path`: only a file that is in the index, and whose real path (symlinks resolved) lies under one
  of the folders that were indexed, is ever opened; the client names a row number, never a path.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import queue
import threading
import time
from typing import Callable, Optional, Sequence

import numpy as np

from input_pipeline import paths
from ivt_jax.search import index as search_index
from ivt_jax.search import model as search_model
from ivt_jax.search import store as search_store


class Busy(RuntimeError):
  """Too much work is waiting; try again later."""


@dataclasses.dataclass(frozen=True)
class Snapshot:
  """One loaded index with what belongs to it; replaced whole, so a request never mixes two indexes."""
  index: search_index.Index
  ann: Optional[object]       # the approximate index over the index's rows, or None (exact search)
  real_roots: tuple[str, ...]  # the indexed folders, symlinks resolved


class IndexHolder:
  """The served index, reopened when its header changes (see the module docstring)."""

  def __init__(self, directory: str, model: search_model.LoadedModel, check_every_s: float = 1.0,
               approximate: Optional[Callable[[search_index.Index], object]] = None, log: Callable[[str], None] = print):
    self.directory = directory
    self.model = model
    self.check_every_s = max(0.01, float(check_every_s))
    self._approximate = approximate
    self._log = log
    self._stamp = None
    self.reloads = 0
    self._snapshot = self._load()  # replaced whole by the watcher
    self._stop = threading.Event()
    self._watcher = threading.Thread(target=self._watch, name='index-watcher', daemon=True)
    self._watcher.start()

  def _header_stamp(self):
    for name in (search_store.HEADER, search_store.MANIFEST_V1):
      path = paths.join(self.directory, name)
      try:
        if paths.is_remote(path):  # on Cloud Storage: the object's size and time (nothing downloaded)
          st = paths.epath(path).stat()
          return (name, st.length, st.mtime)
        st = os.stat(path)
      except (OSError, FileNotFoundError):
        continue
      return (name, st.st_ino, st.st_size, st.st_mtime_ns)
    return None

  def _load(self):
    stamp = self._header_stamp()
    index = search_index.load_index(self.directory)
    search_index.check_identity(index, self.model)
    ann = self._approximate(index) if self._approximate and index.live else None
    self._stamp = stamp
    return Snapshot(index, ann, tuple(os.path.realpath(r) for r in index.header.get('roots', [])))

  def _watch(self) -> None:
    """Loads a changed index in this thread (an approximate index may take minutes to build) and swaps it in;
    requests go on with the previous one meanwhile."""
    while not self._stop.wait(self.check_every_s):
      if self._header_stamp() == self._stamp:
        continue
      try:
        snapshot = self._load()
      except Exception as e:  # pylint: disable=broad-except  (keep serving the previous one)
        self._log(f'index {self.directory} changed but did not load ({type(e).__name__}: {e}); '
                  'still serving the previous one')
        continue
      self._snapshot = snapshot
      self.reloads += 1
      self._log(f'index reloaded: {snapshot.index.live} images')

  def current(self) -> Snapshot:
    """The index to answer a request with (use this one snapshot for the whole request)."""
    return self._snapshot

  def close(self) -> None:
    self._stop.set()
    self._watcher.join(timeout=5)

  @staticmethod
  def rank(snap: Snapshot, query: np.ndarray, start: int, k: int,
           exclude: Optional[int] = None) -> list[tuple[int, float]]:
    """(row, score) ranked start..start+k-1 for a (D,) query embedding, best first."""
    index, ann = snap.index, snap.ann
    if index.live == 0:
      return []
    depth = start + k + (exclude is not None)
    if ann is not None and depth <= ann.max_depth:  # a deeper page goes exact: the width never follows offset
      rows, scores = ann.search(query, depth)
      pairs = [(int(r), float(s)) for r, s in zip(rows, scores) if r >= 0 and r != exclude]
      return pairs[start:start + k]
    scores = index.scores(query)  # deleted rows score -inf
    if exclude is not None:
      scores[exclude] = -np.inf
    rows = search_index.top_k(scores, start, k)
    return [(int(r), float(scores[r])) for r in rows if np.isfinite(scores[r])]

  @staticmethod
  def servable_path(snap: Snapshot, row: int) -> str:
    """The file of row `row`, if it may be sent: IndexError for a row out of range, PermissionError for a file
    whose real path leaves the indexed folders (a symlink pointing elsewhere)."""
    index = snap.index
    if not index.is_live(row):
      raise IndexError(f'no image {row}: the index numbers 0..{len(index) - 1}, and holds {index.live}'
                       + (' (this row was removed)' if 0 <= row < len(index) else ''))
    path = index.path(row)
    real = os.path.realpath(path)
    if not any(real == r or real.startswith(r.rstrip(os.sep) + os.sep) for r in snap.real_roots):
      raise PermissionError(f'image {row} resolves outside the indexed folders')
    return real


class TextBatcher:
  """Micro-batched text embedding (see the module docstring). `submit(text)` -> a Future of the (D,) embedding."""

  def __init__(self, embed: Callable[[Sequence[str]], np.ndarray], *, max_batch: int = 64,
               window_s: float = 0.005, max_pending: int = 256):
    self._embed = embed
    self.max_batch, self.window_s, self.max_pending = int(max_batch), float(window_s), int(max_pending)
    self._queue: queue.Queue = queue.Queue()
    self._pending = threading.BoundedSemaphore(self.max_pending)
    self.calls = 0
    self.queries = 0
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, name='text-batcher', daemon=True)
    self._thread.start()

  def submit(self, text: str) -> concurrent.futures.Future:
    if not self._pending.acquire(blocking=False):
      raise Busy(f'{self.max_pending} queries are already waiting')
    future: concurrent.futures.Future = concurrent.futures.Future()
    self._queue.put((text, future))
    return future

  def _run(self) -> None:
    while not self._stop.is_set():
      try:
        first = self._queue.get(timeout=0.1)
      except queue.Empty:
        continue
      batch = [first]
      deadline = time.monotonic() + self.window_s
      while len(batch) < self.max_batch:
        left = deadline - time.monotonic()
        try:
          batch.append(self._queue.get(timeout=max(left, 0.0)) if left > 0 else self._queue.get_nowait())
        except queue.Empty:
          break
      try:
        emb = self._embed([t for t, _ in batch])
      except Exception as e:  # pylint: disable=broad-except  (each waiting request gets the error)
        for _, f in batch:
          f.set_exception(e)
      else:
        self.calls += 1
        self.queries += len(batch)
        for (_, f), e in zip(batch, emb):
          f.set_result(e)
      finally:
        for _ in batch:
          self._pending.release()

  def close(self) -> None:
    self._stop.set()
    self._thread.join(timeout=5)
