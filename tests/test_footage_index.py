"""Indexing footage: a video written here from person pictures pasted at known times and places, and full frames
(one with people, one without): the people found at the right times and boxes, updates that skip what is done,
a run killed mid-video resumed after its last shard, tracking, and `query --json`."""
import json
import os

import numpy as np
import pytest

from ivt_jax import search
from ivt_jax.search import command, detect, footage, store
from tests.test_footage import _people, _scene
from tests.test_search import tiny_model, tiny_run  # noqa: F401 (session fixtures)

FPS = 10           # of the video written
SAMPLE = 2.0       # frames looked at per second
SEGMENTS = [(1.0, 2.5, 360), (4.0, 5.5, 200)]  # people in view from..until (s), their height (px)
AT = [(100, 300), (500, 300), (900, 300)]
OPTIONS = footage.FootageOptions(fps=SAMPLE, min_height=100)


def _write_video(path, people, seconds=6.0):
  import av
  truth = {}  # frame time -> true boxes
  empty = _scene([], 1, [])[0]
  scenes = [_scene(people, h, AT) for _, _, h in SEGMENTS]
  with av.open(path, 'w') as out:
    stream = out.add_stream('libx264', rate=FPS, options={'crf': '12'})
    stream.width, stream.height, stream.pix_fmt = 1280, 720, 'yuv420p'
    for k in range(int(seconds * FPS)):
      t = k / FPS
      frame = empty
      for (a, b, _), (img, boxes) in zip(SEGMENTS, scenes):
        if a - 1e-6 <= t < b - 1e-6:
          frame, truth[round(t, 3)] = img, boxes
      for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format='rgb24')):
        out.mux(packet)
    for packet in stream.encode():
      out.mux(packet)
  return truth


@pytest.fixture(scope='module')
def footage_folder(tiny_run, tmp_path_factory):  # noqa: F811
  from PIL import Image
  folder = tmp_path_factory.mktemp('footage') / 'cameras'
  folder.mkdir()
  # SynthPEDES pictures are loose crops (scenery beside the person): cut to their middle two thirds, the pasted
  # picture's box is the person's box to within a few pixels, and the truth the detector's boxes are held to.
  people = [p.crop((p.size[0] // 6, 0, p.size[0] - p.size[0] // 6, p.size[1])) for p in _people(tiny_run)]
  truth = _write_video(str(folder / 'cam1.mp4'), people)
  still, still_boxes = _scene(people, 360, AT)
  Image.fromarray(still).save(folder / 'frame_people.png')
  Image.fromarray(_scene([], 1, [])[0]).save(folder / 'frame_empty.png')
  return str(folder), truth, still_boxes


def _rows(index):
  t = index.columns([c for c, _ in store.COLUMNS]).take(index.live_rows).to_pylist()
  return t


def _check_found(rows, truth, still_boxes, folder):
  video = [r for r in rows if r['path'].endswith('cam1.mp4')]
  times = sorted({r['frame_time'] for r in video})
  # Looked at every 0.5 s: the people are found in each sampled frame they are in, and in no other.
  assert times == sorted(t for t in truth if abs(t / 0.5 - round(t / 0.5)) < 1e-6), times
  for t in times:
    found = np.asarray([[r[k] for k in ('x0', 'y0', 'x1', 'y1')] for r in video if r['frame_time'] == t])
    assert len(found) == 3, (t, found)
    overlap = detect.iou(truth[t], found)
    assert (overlap.max(axis=1) >= 0.5).all() and sorted(overlap.argmax(axis=1)) == [0, 1, 2], (t, overlap)
  assert {r['frame_index'] for r in video} == {round(t * FPS) for t in times}
  assert all(r['source'] == 'ssdlite' and r['score'] >= 0.5 for r in rows)
  stills = [r for r in rows if r['path'].endswith('frame_people.png')]
  assert len(stills) == 3 and all(r['frame_time'] is None and r['frame_index'] is None for r in stills)
  found = np.asarray([[r[k] for k in ('x0', 'y0', 'x1', 'y1')] for r in stills])
  assert (detect.iou(still_boxes, found).max(axis=1) >= 0.5).all()
  assert not [r for r in rows if r['path'].endswith('frame_empty.png')]
  assert all(r['path'].startswith(folder) for r in rows)


def test_footage_indexed_updated_and_resumed(footage_folder, tiny_model, tmp_path, monkeypatch, capsys):  # noqa: F811
  folder, truth, still_boxes = footage_folder
  out = str(tmp_path / 'index')
  result = search.build_index(tiny_model, folder, out, batch_size=4, save_every=4, footage=OPTIONS,
                              log=lambda _: None)
  index = search.load_index(out)
  rows = _rows(index)
  _check_found(rows, truth, still_boxes, folder)
  assert result['embedded'] == len(rows) == index.live == 3 * 6 + 3 and result['videos'] == 1
  assert result['frames'] == 12 + 2 and result['people'] == len(rows)
  # Nothing changed: nothing is looked at again, the frame without people included.
  again = search.build_index(tiny_model, folder, out, batch_size=4, footage=OPTIONS, log=lambda _: None)
  assert again['embedded'] == 0 and again['frames'] == 0 and again['unchanged'] == 3
  # Without --detect the frames are crops and the video is left alone (its rows kept).
  said = []
  crops = search.build_index(tiny_model, folder, out, batch_size=4, log=said.append)
  assert crops['skipped_videos'] == 1 and crops['embedded'] == 2 and any('--detect' in s for s in said)
  index = search.load_index(out)
  assert len([p for p in index.paths if p.endswith('cam1.mp4')]) == 18 and index.live == 18 + 2
  # Back with --detect: the frames' crop rows are replaced by their people; the video is untouched.
  back = search.build_index(tiny_model, folder, out, batch_size=4, footage=OPTIONS, log=lambda _: None)
  # (the frame without people is known as such still: its crop row goes, it is not looked at again)
  assert back['embedded'] == 3 and back['frames'] == 1
  _check_found(_rows(search.load_index(out)), truth, still_boxes, folder)

  # A run killed mid-video (after its first shard) resumes after that shard's last frame.
  killed = str(tmp_path / 'killed')
  real, calls = store.write_shard, []
  def dying(*args, **kwargs):
    calls.append(1)
    if len(calls) == 2:
      raise KeyboardInterrupt('killed')
    return real(*args, **kwargs)
  monkeypatch.setattr(store, 'write_shard', dying)
  with pytest.raises(KeyboardInterrupt):
    search.build_index(tiny_model, folder, killed, batch_size=8, save_every=8, footage=OPTIONS,
                       log=lambda _: None)
  monkeypatch.setattr(store, 'write_shard', real)
  first = search.load_index(killed)
  assert first.live == 9  # embedded 8 crops at a time: the first shard holds the three frames of the first people
  said = []
  resumed = search.build_index(tiny_model, folder, killed, batch_size=8, save_every=8, footage=OPTIONS,
                               log=said.append)
  assert any('1 videos resumed' in s for s in said), said
  assert resumed['embedded'] == 3 * 6 + 3 - 9 and resumed['frames'] == 12 - 5 + 2  # after 2.0 s, and the stills
  rows = _rows(search.load_index(killed))
  _check_found(rows, truth, still_boxes, folder)
  keys = [(r['path'], r['frame_time'], round(r['x0'])) for r in rows]
  assert len(keys) == len(set(keys))  # nothing twice

  # A changed frame: its rows are made again.
  from PIL import Image
  before = search.load_index(out)
  old = [r for r in before.live_rows if before.path(r).endswith('frame_people.png')]
  still = Image.open(os.path.join(folder, 'frame_people.png'))
  still.save(os.path.join(folder, 'frame_people.png'), compress_level=1)  # the same picture, other bytes
  changed = search.build_index(tiny_model, folder, out, batch_size=4, footage=OPTIONS, log=lambda _: None)
  assert changed['embedded'] == 3 and changed['frames'] == 1
  index = search.load_index(out)
  assert index.live == before.live and not any(index.is_live(r) for r in old)
  _check_found(_rows(index), truth, still_boxes, folder)
  # Compaction keeps what is known of the files: nothing is looked at again after it.
  store.compact(out, shard_rows=8, log=lambda _: None)
  after = search.build_index(tiny_model, folder, out, batch_size=4, footage=OPTIONS, log=lambda _: None)
  assert after['frames'] == 0 and after['embedded'] == 0 and after['unchanged'] == 3
  index = search.load_index(out)
  _check_found(_rows(index), truth, still_boxes, folder)

  # query --json: each hit's source file, time, box, detector score and row.
  assert command.main(['query', f'--index={out}', 'a person', '--top=30', '--json']) == 0
  printed = json.loads(capsys.readouterr().out)
  hits = printed['queries'][0]['results']
  assert len(hits) == index.live and [h['rank'] for h in hits] == list(range(1, len(hits) + 1))
  video = [h for h in hits if h['path'].endswith('cam1.mp4')]
  assert len(video) == 18 and all(h['time'] in truth and len(h['box']) == 4 for h in video)
  for h in hits[:5]:
    assert index.entry(h['row'])['path'] == h['path'] and h['detector_score'] >= 0.5


def test_tracking_embeds_a_few_crops_per_person(footage_folder, tiny_model, tmp_path, capsys):  # noqa: F811
  folder, truth, _ = footage_folder
  out = str(tmp_path / 'tracked')
  opts = footage.FootageOptions(fps=SAMPLE, min_height=100, track=True, track_gap=10.0, track_crops=2)
  result = search.build_index(tiny_model, folder, out, batch_size=4, footage=opts, log=lambda _: None)
  rows = [r for r in _rows(search.load_index(out)) if r['path'].endswith('cam1.mp4')]
  # Each person of each segment is one track (the 1.5 s between the segments ends the first ones), embedded
  # at its first sighting only (track_gap 10 s).
  assert len(rows) == 6 and sorted(r['track'] for r in rows) == list(range(6))
  assert sorted({r['frame_time'] for r in rows}) == [1.0, 4.0]
  assert result['people'] == 3 * 6 + 3 and result['embedded'] == 6 + 3
  assert command.main(['query', f'--index={out}', 'a person', '--top=50', '--json', '--per_track']) == 0
  hits = json.loads(capsys.readouterr().out)['queries'][0]['results']
  assert len(hits) == 9 and len({(h['path'], h['track']) for h in hits if h['track'] is not None}) == 6
  # The contact sheet shows each person in the frame around them, the box drawn (red), the time under it.
  sheet = str(tmp_path / 'sheet.png')
  assert command.main(['query', f'--index={out}', 'a person', '--top=4', f'--sheet={sheet}']) == 0
  printed = capsys.readouterr().out
  assert '@ 0:01.0' in printed or '@ 0:04.0' in printed
  from PIL import Image
  img = np.asarray(Image.open(sheet).convert('RGB')).astype(int)
  red = (img[..., 0] > 200) & (img[..., 1] < 80) & (img[..., 2] < 80)
  assert red.sum() > 200


def test_footage_benchmark_embeds(tiny_run, capsys):  # noqa: F811
  from ivt_jax.tools import footage_benchmark
  assert footage_benchmark.main(['--seconds=1', '--size=320x240', '--detectors=hog', f'--checkpoint={tiny_run[0]}',
                                 '--embed_batch=8']) == 0
  out = capsys.readouterr().out
  assert 'crops/s' in out and 'with embedding 3 people per sampled frame' in out


def test_tracker_follows_boxes():
  tr = footage.Tracker(iou=0.3, gap=1.0, crops=2, max_age=1.0)
  a, b = [0, 0, 10, 30], [100, 0, 110, 30]
  assert tr.update(0.0, np.asarray([a], np.float32)) == [(0, True)]
  assert tr.update(0.5, np.asarray([b, [1, 0, 11, 30]], np.float32)) == [(1, True), (0, False)]
  assert tr.update(1.0, np.asarray([[2, 0, 12, 30]], np.float32)) == [(0, True)]   # 1 s since its last crop
  assert tr.update(2.0, np.asarray([[3, 0, 13, 30]], np.float32)) == [(0, False)]  # two crops at most
  assert tr.update(3.5, np.asarray([[3, 0, 13, 30]], np.float32)) == [(2, True)]   # unseen 1.5 s: a new track
