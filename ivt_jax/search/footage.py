"""People in footage, as index rows: full frames (stills) and videos sampled in time, people found by a detector,
each found person cropped as the model was trained (ivt_jax/search/frames.py), optionally followed by an IoU
tracker so that a person standing in view is embedded a few times rather than at every sampled frame.

`scan(path, options, detector, image_size)` yields one `Found` per frame looked at (a still is one frame, a
video one per 1/fps seconds), holding the rows of the people in it (their box, score, time, frame index and
track) and their crops; `ivt_jax.search.index.build_index(footage=FootageOptions(...))` embeds the crops and
writes the rows. What an update must know to resume a video or to skip a file with no person in it is a
`Progress` record, kept with the shards (see index.py).
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Iterator, Optional, Sequence

import numpy as np

from ivt_jax.search import detect as search_detect
from ivt_jax.search import frames as search_frames


@dataclasses.dataclass(frozen=True)
class FootageOptions:
  """How footage is indexed (`index --detect` and its flags).

  detector: 'ssdlite' (the shipped default), 'hog', or a path to an .onnx model (ivt_jax/search/detect.py).
  fps: frames looked at per second of video.
  min_height: boxes lower than this many source pixels are dropped (the crop would be a few pixels of the
    model's 384 x 128 input).
  threshold: the detector's score below which a box is dropped.
  track: follow people over the sampled frames of a video (IoU >= track_iou between consecutive sightings);
    a track is embedded at its first sighting, then at most every track_gap seconds, at most track_crops times.
  """
  detector: str = 'ssdlite'
  fps: float = 2.0
  min_height: float = 64.0
  threshold: float = 0.5
  track: bool = False
  track_iou: float = 0.3
  track_gap: float = 2.0
  track_crops: int = 4

  def __post_init__(self):
    checks = [('fps', self.fps > 0, 'must be > 0'), ('min_height', self.min_height >= 0, 'must be >= 0'),
              ('threshold', 0 <= self.threshold <= 1, 'must be in 0..1'),
              ('track_iou', 0 < self.track_iou <= 1, 'must be in (0, 1]'),
              ('track_gap', self.track_gap >= 0, 'must be >= 0'), ('track_crops', self.track_crops >= 1, 'must be >= 1')]
    for name, ok, rule in checks:
      if not ok:
        raise ValueError(f'--{name}={getattr(self, name)} {rule}')

  def key(self) -> str:
    """What a row was made with: rows of other settings are made again. A user's model is named by its file's
    path and size."""
    d = dataclasses.asdict(self)
    if self.detector.lower().endswith('.onnx'):
      d['detector'] = f'{os.path.abspath(self.detector)}:{os.path.getsize(self.detector) if os.path.isfile(self.detector) else -1}'
    if not self.track:
      for k in ('track_iou', 'track_gap', 'track_crops'):
        d.pop(k)
    return json.dumps(d, sort_keys=True)


@dataclasses.dataclass
class Progress:
  """How far a file (one version of it: size, mtime_ns) has been indexed with settings `key`: `until` is the time
  of the last video frame whose people are all in the index (None: the whole file), `rows` the rows it has in
  the index by then, `next_track` the first track id not yet used in it."""
  path: str
  size: int
  mtime_ns: int
  key: str
  until: Optional[float]
  rows: int
  next_track: int = 0

  def to_json(self) -> list:
    return [self.path, self.size, self.mtime_ns, self.key, self.until, self.rows, self.next_track]

  @classmethod
  def from_json(cls, v: Sequence) -> 'Progress':
    return cls(str(v[0]), int(v[1]), int(v[2]), str(v[3]), None if v[4] is None else float(v[4]), int(v[5]),
               int(v[6]))


@dataclasses.dataclass
class Found:
  """The people of one frame looked at: rows (index row dicts without path/size/mtime_ns) and their crops."""
  time: Optional[float]       # seconds into the video; None for a still
  index: Optional[int]        # frame index in the video's stream; None for a still
  rows: list[dict]
  crops: list[np.ndarray]     # uint8 image_size, aligned with rows
  people: int                 # boxes found (the tracker may embed fewer)
  next_track: int = 0


class Tracker:
  """Greedy IoU tracking over consecutive sampled frames; decides which sightings are embedded."""

  def __init__(self, iou: float, gap: float, crops: int, max_age: float, next_id: int = 0):
    self.iou, self.gap, self.crops, self.max_age = float(iou), float(gap), int(crops), float(max_age)
    self.next_id = int(next_id)
    self._tracks: list[dict] = []  # {id, box, seen, embedded_at, embedded}

  def update(self, t: float, boxes: np.ndarray) -> list[tuple[int, bool]]:
    """(n, 4) boxes of the frame at time t -> per box (track id, embed it?)."""
    self._tracks = [tr for tr in self._tracks if t - tr['seen'] <= self.max_age + 1e-6]
    out: list[Optional[tuple[int, bool]]] = [None] * len(boxes)
    if self._tracks and len(boxes):
      overlap = search_detect.iou(boxes, np.stack([tr['box'] for tr in self._tracks]))
      pairs = sorted(((overlap[i, j], i, j) for i in range(len(boxes)) for j in range(len(self._tracks))
                      if overlap[i, j] >= self.iou), reverse=True)
      used_b, used_t = set(), set()
      for _, i, j in pairs:
        if i in used_b or j in used_t:
          continue
        used_b.add(i)
        used_t.add(j)
        tr = self._tracks[j]
        tr['box'], tr['seen'] = boxes[i], t
        embed = tr['embedded'] < self.crops and t - tr['embedded_at'] >= self.gap - 1e-6
        if embed:
          tr['embedded'] += 1
          tr['embedded_at'] = t
        out[i] = (tr['id'], embed)
    for i in range(len(boxes)):
      if out[i] is None:
        self._tracks.append({'id': self.next_id, 'box': boxes[i], 'seen': t, 'embedded_at': t, 'embedded': 1})
        out[i] = (self.next_id, True)
        self.next_id += 1
    return out  # type: ignore[return-value]


BOX = ('x0', 'y0', 'x1', 'y1')


def is_footage(entry: dict) -> bool:
  """Whether an index row (`Index.entry`) is a person found in a frame (it has a box) rather than a crop."""
  return all(k in entry for k in BOX)


def box_of(entry: dict) -> tuple[float, float, float, float]:
  """An index row's box (x0, y0, x1, y1 in its source's pixels)."""
  return tuple(float(entry[k]) for k in BOX)  # type: ignore[return-value]


def _rows(boxes: search_detect.Boxes, source: str) -> list[dict]:
  return [{'source': source, 'x0': float(b[0]), 'y0': float(b[1]), 'x1': float(b[2]), 'y1': float(b[3]),
           'score': float(s)} for b, s in zip(boxes.xyxy, boxes.scores)]


def scan(path: str, options: FootageOptions, detector, image_size: Sequence[int], after: Optional[float] = None,
         next_track: int = 0) -> Iterator[Found]:
  """The people in a still or in a video's frames every 1/fps s (after time `after`: resuming). Raises
  frames.VideoError or ValueError/OSError (naming the file) for a file that cannot be read."""
  source = search_detect.describe(detector)
  if not search_frames.is_video(path):
    frame = search_frames.read_still(path)
    boxes = detector(frame)
    yield Found(None, None, _rows(boxes, source),
                [search_frames.person_crop(frame, b, image_size) for b in boxes.xyxy], len(boxes))
    return
  tracker = Tracker(options.track_iou, options.track_gap, options.track_crops,
                    max_age=max(2.0 / options.fps, 1.0), next_id=next_track) if options.track else None
  for t, index, frame in search_frames.sample(path, options.fps, -1.0 if after is None else after):
    boxes = detector(frame)
    rows = _rows(boxes, source)
    keep = list(range(len(rows)))
    if tracker is not None:
      decisions = tracker.update(t, boxes.xyxy)
      for r, (track, _) in zip(rows, decisions):
        r['track'] = track
      keep = [i for i, (_, embed) in enumerate(decisions) if embed]
    for r in rows:
      r['frame_time'], r['frame_index'] = float(t), int(index)
    yield Found(float(t), int(index), [rows[i] for i in keep],
                [search_frames.person_crop(frame, boxes.xyxy[i], image_size) for i in keep], len(rows),
                tracker.next_id if tracker is not None else 0)


def make_detector(options: FootageOptions):
  """The detector of these options (ivt_jax/search/detect.py `make`)."""
  return search_detect.make(options.detector, options.min_height, options.threshold)
