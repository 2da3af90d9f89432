"""Frames of video files, sampled in time, and person crops cut from frames as the model was trained.

- `sample(path, fps)`: decodes a video with PyAV (FFmpeg: h264, hevc, vp9, av1, mjpeg, ...) and yields the
  frames nearest to every 1/fps seconds, with their time in seconds (the frame's own presentation time) and
  their index in the stream. Every frame is decoded (FFmpeg cannot skip to arbitrary frames without seeking);
  only the sampled ones are converted to RGB.
- `person_crop(frame, box, image_size)`: the box widened (or heightened) to the model's aspect ratio (3:1 for
  384 x 128) about its centre, with a margin, cut from the frame with the part outside the frame filled with a
  neutral grey, then resized as the evaluation gallery is (bilinear): a person is never stretched.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import numpy as np

VIDEO_EXTENSIONS = ('.mp4', '.mkv', '.avi', '.mov', '.webm')
MARGIN = 0.1        # of the box's height, added above and below (and of its width at the sides)
FILL = (124, 116, 104)  # outside the frame: the ImageNet mean colour


class VideoError(ValueError):
  pass


@contextlib.contextmanager
def _video(path: str):
  """(container, its first video stream), opened; VideoError naming the file when there is none."""
  import av  # pylint: disable=g-import-not-at-top
  try:
    container = av.open(path)
  except (av.error.FFmpegError, OSError) as e:
    raise VideoError(f'{path}: not a video FFmpeg can open ({type(e).__name__}: {e})') from None
  with container:
    if not container.streams.video:
      raise VideoError(f'{path}: holds no video stream')
    yield container, container.streams.video[0]


def _decoded(path: str, container, stream, seek: float = 0.0) -> Iterator[tuple[int, float, object]]:
  """(k, time in s, av frame) in stream order, after seeking to the key frame before `seek` s (k counts from
  there); FFmpeg's errors as VideoError naming the file."""
  import av  # pylint: disable=g-import-not-at-top
  try:
    if seek > 0 and stream.time_base:
      container.seek(int(seek / stream.time_base) + (stream.start_time or 0), stream=stream, backward=True,
                     any_frame=False)
    for k, frame in enumerate(container.decode(stream)):
      yield k, (float(frame.time) if frame.time is not None else k / float(stream.average_rate or 25)), frame
  except av.error.FFmpegError as e:
    raise VideoError(f'{path}: decoding failed ({type(e).__name__}: {e})') from None


def sample(path: str, fps: float = 2.0, after: float = -1.0) -> Iterator[tuple[float, int, np.ndarray]]:
  """(time in s, frame index, uint8 (H, W, 3) RGB) every 1/fps seconds of the video's first video stream; with
  `after`, only the samples later than that time (the same ones a full pass yields: resuming a pass)."""
  if fps <= 0:
    raise ValueError(f'--fps must be > 0, got {fps}')
  with _video(path) as (container, stream):
    stream.thread_type = 'AUTO'
    period, due = 1.0 / fps, 0.0
    for index, t, frame in _decoded(path, container, stream):
      if t + 1e-6 >= due:
        if t > after + 1e-6:
          yield t, index, frame.to_ndarray(format='rgb24')
        due = (np.floor(t / period + 1e-6) + 1) * period


def is_video(path: str) -> bool:
  return path.lower().endswith(VIDEO_EXTENSIONS)


def frame_of(entry: dict) -> np.ndarray:
  """uint8 (H, W, 3) RGB: the whole frame an index row was cut from (a still's file, or the video's frame at
  the row's frame_time)."""
  if entry.get('frame_time') is not None:
    return frame_at(entry['path'], float(entry['frame_time']))
  return read_still(entry['path'])


def read_still(path: str) -> np.ndarray:
  """An image file -> uint8 (H, W, 3) RGB (any mode or bit depth, as the gallery reads them). Raises
  ValueError/OSError naming the file."""
  from input_pipeline import images  # pylint: disable=g-import-not-at-top
  return np.asarray(images.decode(images.read_file(path), name=path))


def frame_at(path: str, time: float) -> np.ndarray:
  """uint8 (H, W, 3) RGB: the frame of a video shown at `time` s (the first at or after it; the last frame
  when the video ends before). Seeks to the key frame before it, then decodes on."""
  with _video(path) as (container, stream):
    last = None
    for _, t, frame in _decoded(path, container, stream, seek=max(0.0, time - 1.0) if time > 0 else 0.0):
      last = frame
      if t + 1e-6 >= time:
        return frame.to_ndarray(format='rgb24')
    if last is None:
      raise VideoError(f'{path}: no frame at {time:.3f} s')
    return last.to_ndarray(format='rgb24')


def widened(box: Sequence[float], image_size: Sequence[int], margin: float = MARGIN) -> tuple[float, ...]:
  """(x0, y0, x1, y1) around the box's centre with the aspect of image_size (h, w), margin included."""
  x0, y0, x1, y1 = map(float, box)
  h, w = (y1 - y0) * (1 + 2 * margin), (x1 - x0) * (1 + 2 * margin)
  aspect = image_size[1] / image_size[0]  # width / height of the model's input
  if w / max(h, 1e-9) > aspect:
    h = w / aspect
  else:
    w = h * aspect
  cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
  return cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2


def person_crop(frame: np.ndarray, box: Sequence[float], image_size: Sequence[int],
                margin: float = MARGIN) -> np.ndarray:
  """uint8 (H, W, 3) frame, a box in its pixels -> uint8 image_size crop (see the module docstring)."""
  import PIL.Image  # pylint: disable=g-import-not-at-top
  from input_pipeline import augment  # pylint: disable=g-import-not-at-top
  fh, fw = frame.shape[:2]
  x0, y0, x1, y1 = widened(box, image_size, margin)
  x0, y0 = int(np.floor(x0)), int(np.floor(y0))
  x1, y1 = max(x0 + 1, int(np.ceil(x1))), max(y0 + 1, int(np.ceil(y1)))
  out = np.empty((y1 - y0, x1 - x0, 3), np.uint8)
  out[:] = np.asarray(FILL, np.uint8)
  sx0, sy0, sx1, sy1 = max(0, x0), max(0, y0), min(fw, x1), min(fh, y1)
  if sx1 > sx0 and sy1 > sy0:
    out[sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0] = frame[sy0:sy1, sx0:sx1, :3]
  return augment.resize(PIL.Image.fromarray(out), tuple(image_size), augment.EVAL_RESAMPLE)
