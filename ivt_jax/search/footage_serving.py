"""What the search server (ivt_jax/search/server.py) sends for a person found in footage: a row that a detector
found in a full frame or a video (ivt_jax/search/footage.py) has a box, a score, a source and, for a video, a
time; its file may be a video, so the server never sends the file itself but pictures made from it:

- `frame_info(entry)`: the result's `frame` object {time, index, box, score, track, source} (None for a crop);
  `display_name` puts the time after a video's name ("cam1.mp4 @ 0:12.5").
- `Frames`: the frames of rows, decoded (a still read, a video decoded at the row's time: ivt_jax/search/
  frames.py) and kept in a small cache bounded in bytes, keyed by the file's real path, size, modification time
  and the frame's time (a changed file is never answered from the cache); requests for the same frame that
  arrive together decode it once. `crop_jpeg`, `frame_jpeg` and `crop_png` make the pictures.
- Every error a client can cause or meet is `Unavailable` (a status and a message naming the row).

The server calls these in its thread pool: decoding never runs on the event loop.
"""
from __future__ import annotations

import collections
import concurrent.futures
import io
import os
import threading
from typing import Callable, Optional, Sequence

import numpy as np

from ivt_jax.search import footage as search_footage
from ivt_jax.search import frames as search_frames
from ivt_jax.search import pictures as search_pictures

CROP_SCALE = 2          # the crop sent for a card: twice the model's input size
JPEG_QUALITY = 90
CACHE_BYTES = 192 << 20  # decoded frames kept (a 1080p frame is 6 MB)


class Unavailable(Exception):
  """A row's picture cannot be made: `status` (404, 403) and a message naming the row."""

  def __init__(self, status: int, message: str):
    super().__init__(message)
    self.status = status


is_footage = search_footage.is_footage
box_of = search_footage.box_of


def frame_info(entry: dict) -> Optional[dict]:
  """The `frame` object of a search result (schemas.Frame), None for a crop row."""
  if not is_footage(entry):
    return None
  t = entry.get('frame_time')
  return {'time': None if t is None else round(float(t), 6),
          'index': None if entry.get('frame_index') is None else int(entry['frame_index']),
          'box': [round(v, 2) for v in box_of(entry)],
          'score': None if entry.get('score') is None else round(float(entry['score']), 4),
          'track': None if entry.get('track') is None else int(entry['track']),
          'source': str(entry.get('source', ''))}


def display_name(name: str, entry: dict) -> str:
  """A result's name: a video row's with its time ("cam1.mp4 @ 0:12.5")."""
  t = entry.get('frame_time')
  return name if t is None or not is_footage(entry) else f'{name} @ {search_pictures.clock(t)}'


def label(entry: dict) -> str:
  """What is written above the box: the time of a video's frame, and the track when there is one."""
  parts = []
  if entry.get('frame_time') is not None:
    parts.append(search_pictures.clock(entry['frame_time']))
  if entry.get('track') is not None:
    parts.append(f'track {int(entry["track"])}')
  return '  '.join(parts)


def _what(entry: dict) -> str:
  return 'video' if search_frames.is_video(entry['path']) else 'frame'


class Frames:
  """Decoded frames of rows, cached (see the module docstring)."""

  def __init__(self, max_bytes: int = CACHE_BYTES,
               decode: Callable[[dict], np.ndarray] = search_frames.frame_of):
    self.max_bytes = int(max_bytes)
    self._decode = decode
    self._lock = threading.Lock()
    self._done: collections.OrderedDict = collections.OrderedDict()
    self._pending: dict = {}
    self._bytes = 0
    self.decoded = 0  # frames decoded (not answered from the cache)

  def frame(self, row: int, entry: dict, real_path: str) -> np.ndarray:
    """The whole frame of footage row `row` (read-only uint8 (H, W, 3)); its file is `real_path` (the server
    checked it may be sent). Unavailable (404) for a crop row, a missing or changed file, or one that cannot
    be decoded."""
    if not is_footage(entry):
      raise Unavailable(404, f'row {row} is a person crop, not a frame of footage')
    try:
      st = os.stat(real_path)
    except OSError:
      raise Unavailable(404, f'row {row}: its {_what(entry)} {entry["path"]} is no longer on disk') from None
    if (st.st_size, st.st_mtime_ns) != (entry.get('size'), entry.get('mtime_ns')):
      raise Unavailable(404, f'row {row}: its {_what(entry)} {entry["path"]} changed since it was indexed '
                        '(update the index: python -m ivt_jax.search index ...)')
    key = (real_path, st.st_size, st.st_mtime_ns, entry.get('frame_time'))
    try:
      return self._get(key, lambda: self._decode(dict(entry, path=real_path)))
    except (OSError, ValueError) as e:  # frames.VideoError is a ValueError
      raise Unavailable(404, f'row {row}: its {_what(entry)} cannot be read now ({e})') from None

  def _get(self, key, load) -> np.ndarray:
    with self._lock:
      if key in self._done:
        self._done.move_to_end(key)
        return self._done[key]
      future = self._pending.get(key)
      mine = future is None
      if mine:
        future = self._pending[key] = concurrent.futures.Future()
    if not mine:  # the same frame is being decoded for another request
      return future.result()
    try:
      value = np.asarray(load(), np.uint8)
    except BaseException as e:
      with self._lock:
        del self._pending[key]
      future.set_exception(e)
      raise
    value.flags.writeable = False
    with self._lock:
      del self._pending[key]
      self.decoded += 1
      if value.nbytes <= self.max_bytes:
        self._done[key] = value
        self._bytes += value.nbytes
        while self._bytes > self.max_bytes:
          _, old = self._done.popitem(last=False)
          self._bytes -= old.nbytes
    future.set_result(value)
    return value


def _encode(image, fmt: str) -> bytes:
  from PIL import Image  # pylint: disable=g-import-not-at-top
  if isinstance(image, np.ndarray):
    image = Image.fromarray(np.ascontiguousarray(image))
  buf = io.BytesIO()
  image.save(buf, format=fmt, **({'quality': JPEG_QUALITY} if fmt == 'JPEG' else {}))
  return buf.getvalue()


def crop(frames: Frames, row: int, entry: dict, real_path: str, image_size: Sequence[int],
         scale: int = 1) -> np.ndarray:
  """The person of footage row `row` cut as the index embedded it (frames.person_crop), at `scale` times the
  model's input size."""
  size = tuple(int(s) * int(scale) for s in image_size)
  return search_frames.person_crop(frames.frame(row, entry, real_path), box_of(entry), size)


def crop_jpeg(frames: Frames, row: int, entry: dict, real_path: str, image_size: Sequence[int]) -> bytes:
  """JPEG of the person crop at CROP_SCALE times the model's input (a card's picture)."""
  return _encode(crop(frames, row, entry, real_path, image_size, CROP_SCALE), 'JPEG')


def crop_png(frames: Frames, row: int, entry: dict, real_path: str, image_size: Sequence[int]) -> bytes:
  """PNG (lossless) of the person crop at the model's input size: what the index embedded."""
  return _encode(crop(frames, row, entry, real_path, image_size), 'PNG')


def frame_jpeg(frames: Frames, row: int, entry: dict, real_path: str, drawn: bool = True) -> bytes:
  """JPEG of the whole frame of footage row `row`, with its box and time drawn (pictures.boxed) or plain."""
  frame = frames.frame(row, entry, real_path)
  return _encode(search_pictures.boxed(frame, box_of(entry), label(entry)) if drawn else frame, 'JPEG')
