"""Footage building blocks: frames sampled from a video written here, people found in frames by each detector,
crops cut at the model's aspect without stretching."""
import glob
import os

import numpy as np
import pytest
from PIL import Image

from ivt_jax.search import detect, frames
from tests.test_search import tiny_run  # noqa: F401 (session fixture: a tiny demo workdir with SynthPEDES)


def _people(tiny_run, n=3):  # noqa: F811
  paths = sorted(glob.glob(os.path.join(tiny_run[1].data.manual_dir, 'imgs', 'test', '*.png')))
  return [Image.open(p).convert('RGB') for p in paths[:n]]


def _scene(people, height, at, size=(720, 1280)):
  """A frame of grass-grey with each person pasted `height` px tall at (x, y); -> frame, their true boxes."""
  frame = np.full(size + (3,), (90, 110, 90), np.uint8)
  boxes = []
  for person, (x, y) in zip(people, at):
    w = int(round(height * person.size[0] / person.size[1]))
    frame[y:y + height, x:x + w] = np.asarray(person.resize((w, height), Image.BILINEAR))
    boxes.append((x, y, x + w, y + height))
  return frame, np.asarray(boxes, np.float32)


def test_video_frames_sampled_at_their_times(tmp_path):
  import av
  path = str(tmp_path / 'clip.mp4')
  with av.open(path, 'w') as out:
    stream = out.add_stream('libx264', rate=10)
    stream.width, stream.height, stream.pix_fmt = 64, 48, 'yuv420p'
    for k in range(50):  # 5 s; frame k is grey level 5 k
      img = np.full((48, 64, 3), 5 * k, np.uint8)
      for packet in stream.encode(av.VideoFrame.from_ndarray(img, format='rgb24')):
        out.mux(packet)
    for packet in stream.encode():
      out.mux(packet)
  got = list(frames.sample(path, fps=2))
  assert [i for _, i, _ in got] == list(range(0, 50, 5))
  np.testing.assert_allclose([t for t, _, _ in got], np.arange(0, 5, 0.5), atol=1e-6)
  for _, i, img in got:
    assert img.shape == (48, 64, 3) and abs(float(img.mean()) - 5 * i) < 4
  assert len(list(frames.sample(path, fps=0.25))) == 2  # 0 s and 4 s
  (tmp_path / 'fake.mp4').write_bytes(b'not a video')
  with pytest.raises(frames.VideoError, match='fake.mp4'):
    list(frames.sample(str(tmp_path / 'fake.mp4')))


def test_person_crop_is_not_stretched():
  frame = np.zeros((400, 600, 3), np.uint8)
  yy, xx = np.mgrid[:400, :600]
  frame[(yy - 200) ** 2 + (xx - 300) ** 2 <= 60 ** 2] = 255  # a disc in a wide box
  crop = frames.person_crop(frame, (200, 140, 400, 260), (96, 32), margin=0.0)  # box 200 x 120, model 3:1
  assert crop.shape == (96, 32, 3)
  ys, xs = np.nonzero(crop[..., 0] > 127)
  # the box's width decides: 200 px -> 32 px, so the disc (120 px) is about 19 px across both ways
  assert abs((xs.max() - xs.min()) - (ys.max() - ys.min())) <= 2 and 16 <= xs.max() - xs.min() <= 21
  # a box at the frame's edge is padded with the fill colour, not stretched into the frame
  edge = frames.person_crop(frame, (0, 0, 30, 90), (96, 32), margin=0.1)
  assert tuple(edge[0, 0]) == frames.FILL
  x0, y0, x1, y1 = frames.widened((10, 10, 20, 100), (384, 128), margin=0.1)
  assert abs((y1 - y0) / (x1 - x0) - 3) < 1e-6 and abs((y1 - y0) - 90 * 1.2) < 1e-6


@pytest.mark.parametrize('kind', ['ssdlite', 'hog'])
def test_detectors_find_pasted_people(tiny_run, kind):  # noqa: F811
  d = detect.make(kind, min_height=100, threshold=0.5)
  for height in (360, 200):
    frame, truth = _scene(_people(tiny_run), height, [(100, 300), (500, 300), (900, 300)])
    found = d(frame)
    assert len(found) == 3, (kind, height, found)
    # Each pasted picture holds one person with scenery at its sides (SynthPEDES crops are loose): one box per
    # picture, inside it (a few px of slack), centred on it and at least 85% of its height.
    match = detect.iou(truth, found.xyxy).argmax(axis=1)
    assert sorted(match) == [0, 1, 2], (kind, height, found.xyxy)
    for t, f in zip(truth, found.xyxy[match]):
      slack = 0.15 * height  # HOG's boxes are loose
      assert f[0] >= t[0] - slack and f[1] >= t[1] - slack and f[2] <= t[2] + slack and f[3] <= t[3] + slack, (t, f)
      assert abs((f[0] + f[2]) / 2 - (t[0] + t[2]) / 2) < 0.1 * (t[2] - t[0]), (t, f)
      assert f[3] - f[1] >= 0.85 * height, (kind, t, f)
    assert (np.diff(found.scores) <= 0).all()
  empty = d(np.full((480, 640, 3), (90, 110, 90), np.uint8))
  assert len(empty) == 0


def test_tiles_and_nms():
  t = detect.tiles(720, 1280)
  assert t[0][:2] == (0, 0) and t[-1][2:] == (1280, 720) and all(x1 - x0 <= 640 and y1 - y0 <= 640 for x0, y0, x1, y1 in t)
  b = detect.Boxes(np.asarray([[0, 0, 10, 20], [1, 1, 11, 21], [50, 50, 60, 70]], np.float32),
                   np.asarray([0.6, 0.9, 0.5], np.float32))
  kept = detect.nms(b)
  np.testing.assert_allclose(kept.scores, [0.9, 0.5])
  with pytest.raises(ValueError, match='ssdlite .the default., hog, or a path'):
    detect.make('yolo')
  with pytest.raises(FileNotFoundError, match='no such file'):
    detect.make('/nonexistent/model.onnx')


def test_onnx_detector_reads_yolo_rows(tmp_path):
  """A user's model: a tiny ONNX graph that answers fixed YOLO-style rows (cx, cy, w, h, objectness, person)."""
  import onnx
  from onnx import helper, TensorProto
  rows = np.asarray([[[160, 320, 64, 256, 0.9, 1.0], [480, 100, 20, 40, 0.8, 1.0], [320, 320, 50, 50, 0.1, 1.0]]],
                    np.float32)
  const = helper.make_node('Constant', [], ['rows'], value=helper.make_tensor('v', TensorProto.FLOAT, rows.shape,
                                                                             rows.reshape(-1)))
  graph = helper.make_graph([const], 'g', [helper.make_tensor_value_info('images', TensorProto.FLOAT, [1, 3, 640, 640])],
                            [helper.make_tensor_value_info('rows', TensorProto.FLOAT, list(rows.shape))])
  model = helper.make_model(graph, opset_imports=[helper.make_opsetid('', 17)])
  model.ir_version = 8
  onnx.save(model, str(tmp_path / 'm.onnx'))
  d = detect.make(str(tmp_path / 'm.onnx'), min_height=100, threshold=0.5, tile=10_000)
  found = d(np.zeros((1280, 1280, 3), np.uint8))  # twice the model's input: boxes scaled back
  np.testing.assert_allclose(found.xyxy, [[256, 384, 384, 896]])
  np.testing.assert_allclose(found.scores, [0.9], rtol=1e-6)


def test_footage_benchmark_small(capsys):
  from ivt_jax.tools import footage_benchmark
  assert footage_benchmark.main(['--seconds=2', '--size=320x240', '--detectors=hog']) == 0
  out = capsys.readouterr().out
  assert '50 frames of 320x240' in out and 'keeps 4' in out and '| hog |' in out
