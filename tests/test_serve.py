"""The search server: its API against the search CLI's ranking, the safety rules (loopback and tokens, files by
row only, limits), micro-batching, picking up a rebuilt index, a small load test, people found in footage (a
video and a full frame written here: the moment, the box, the frame and the crop), and the page in a real
headless Chromium (Debian's chromium and chromium-driver, driven by Selenium)."""
import concurrent.futures
import io
import json
import os
import shutil
import socket
import threading
import time

import numpy as np
import pytest
from PIL import Image

from ivt_jax import search
from ivt_jax.search import frames as search_frames
from ivt_jax.search import server as serve
from ivt_jax.search import state as serve_state
from ivt_jax.search import store as search_store
from tests.test_search import tiny_model, tiny_run  # noqa: F401 (session fixtures: a tiny demo workdir)

CHROMIUM, CHROMEDRIVER = '/usr/bin/chromium', '/usr/bin/chromedriver'


@pytest.fixture(scope='module')
def folder(tiny_run, tmp_path_factory):  # noqa: F811
  source = os.path.join(tiny_run[1].data.manual_dir, 'imgs', 'test')
  out = tmp_path_factory.mktemp('people')
  for f in sorted(os.listdir(source)):
    shutil.copy(os.path.join(source, f), out / f)
  return out


@pytest.fixture(scope='module')
def index_dir(tiny_model, folder, tmp_path_factory):  # noqa: F811
  out = str(tmp_path_factory.mktemp('index'))
  search.build_index(tiny_model, str(folder), out, log=lambda _: None)
  return out


@pytest.fixture(scope='module')
def holder(tiny_model, index_dir):  # noqa: F811
  return serve_state.IndexHolder(index_dir, tiny_model, check_every_s=0.0, log=lambda _: None)


@pytest.fixture(scope='module')
def client(holder):
  from fastapi.testclient import TestClient
  with TestClient(serve.create_app(holder)) as c:
    yield c


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


class LiveServer:
  """uvicorn serving an app in a thread on 127.0.0.1."""

  def __init__(self, app):
    import uvicorn
    self.port = _free_port()
    self.url = f'http://127.0.0.1:{self.port}'
    self.server = uvicorn.Server(uvicorn.Config(app, host='127.0.0.1', port=self.port, log_level='warning'))
    self.thread = threading.Thread(target=self.server.run, daemon=True)
    self.thread.start()
    deadline = time.time() + 30
    while not self.server.started:
      assert time.time() < deadline, 'the server did not start'
      time.sleep(0.05)

  def stop(self):
    self.server.should_exit = True
    self.thread.join(timeout=10)


@pytest.fixture(scope='module')
def live(holder):
  server = LiveServer(serve.create_app(holder))
  yield server
  server.stop()


# ---- footage: a video and a full frame, their people as index rows ------------------------------------------

FRAME_H, FRAME_W, PERSON_H = 240, 320, 160
BACKGROUND = (90, 110, 90)
MOVES_AT = 15  # the video's person stands at x=30 in frames 0..14 (0.0-1.4 s), at x=200 from frame 15 (1.5 s)
OPTIONS = dict(fps=2.0, track=True)  # looked at every 0.5 s; the person moving away starts a new track


def _person(folder, i):
  """SynthPEDES picture i cut to its middle two thirds (they are loose crops): the pasted box is the person's."""
  p = Image.open(sorted(folder.iterdir())[i]).convert('RGB')
  return p.crop((p.size[0] // 6, 0, p.size[0] - p.size[0] // 6, p.size[1]))


def _paste(frame, person, x, y):
  w = int(round(PERSON_H * person.size[0] / person.size[1]))
  frame[y:y + PERSON_H, x:x + w] = np.asarray(person.resize((w, PERSON_H), Image.BILINEAR))
  return np.asarray([x, y, x + w, y + PERSON_H], np.float32)


def _write_video(path, person, n=30, fps=10):
  """n frames of FRAME_H x FRAME_W at fps, the person at x=30 then (frame MOVES_AT on) x=200; -> the frames."""
  import av
  scenes = []
  with av.open(path, 'w') as out:
    stream = out.add_stream('libx264', rate=fps, options={'crf': '12'})
    stream.width, stream.height, stream.pix_fmt = FRAME_W, FRAME_H, 'yuv420p'
    for k in range(n):
      frame = np.full((FRAME_H, FRAME_W, 3), BACKGROUND, np.uint8)
      box = _paste(frame, person, 30 if k < MOVES_AT else 200, 40)
      scenes.append((frame, box))
      for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format='rgb24')):
        out.mux(packet)
    for packet in stream.encode():
      out.mux(packet)
  return scenes


def _add_rows(base_dir, out_dir, rows, embeddings, roots, fingerprint):
  """A copy of index base_dir with a shard of these rows appended and these folders among its roots (rows that
  `build_index` would not write: files gone or changed since)."""
  shutil.copytree(base_dir, out_dir)
  header = json.loads(open(os.path.join(out_dir, search_store.HEADER)).read())
  entry = search_store.write_shard(out_dir, search_store.new_run_id() + '-footage', rows,
                                   np.asarray(embeddings, np.float32), 'float32', fingerprint)
  old = search_store.open_index(out_dir)
  header = dict(header, shards=header['shards'] + [entry], roots=sorted(set(header['roots']) | set(map(str, roots))),
                stats=dict(header['stats'], images=old.live + len(rows)))
  search_store.write_header(out_dir, header, old.deleted, old.unreadable)
  return out_dir


def _row(path, box, score, **more):
  st = os.stat(path)
  return {'path': str(path), 'size': st.st_size, 'mtime_ns': st.st_mtime_ns, 'source': 'test-detector',
          'x0': box[0], 'y0': box[1], 'x1': box[2], 'y1': box[3], 'score': score, **more}


@pytest.fixture(scope='module')
def footage(tiny_model, folder, index_dir, tmp_path_factory):  # noqa: F811
  """The crops' index updated with a folder of footage (`build_index(footage=...)`, the SSDLite detector,
  tracking): a video whose person moves at 1.5 s (rows at 0.0 s, track 0, and 1.5 s, track 1) and a full frame
  with a person. -> dict(dir, rows {early, late, still: row}, truth {same: (frame, true box)}, root)."""
  from ivt_jax.search import footage as search_footage
  root = tmp_path_factory.mktemp('footage')
  (root / 'cam1').mkdir()
  scenes = _write_video(str(root / 'cam1' / 'clip.mp4'), _person(folder, 0))
  still = np.full((FRAME_H, FRAME_W, 3), BACKGROUND, np.uint8)
  still_box = _paste(still, _person(folder, 1), 120, 50)
  Image.fromarray(still).save(root / 'still.png')
  out = str(tmp_path_factory.mktemp('footage_index') / 'index')
  shutil.copytree(index_dir, out)
  search.build_index(tiny_model, str(root), out, footage=search_footage.FootageOptions(**OPTIONS),
                     log=lambda _: None)
  index = search.load_index(out)
  found = {}
  for row in index.live_rows:
    e = index.entry(int(row))
    if 'x0' in e:
      found['still' if e.get('frame_time') is None else 'early' if e['frame_time'] < 1 else 'late'] = int(row)
  truth = {'early': scenes[0], 'late': scenes[MOVES_AT], 'still': (still, still_box)}
  assert len(found) == 3 and index.live == len(search.load_index(index_dir)) + 3, found
  return {'dir': out, 'rows': found, 'truth': truth, 'root': root}


@pytest.fixture(scope='module')
def footage_holder(tiny_model, footage):  # noqa: F811
  return serve_state.IndexHolder(footage['dir'], tiny_model, check_every_s=0.0, log=lambda _: None)


@pytest.fixture(scope='module')
def footage_client(footage_holder):
  from fastapi.testclient import TestClient
  with TestClient(serve.create_app(footage_holder)) as c:
    yield c


@pytest.fixture(scope='module')
def footage_live(footage_holder):
  server = LiveServer(serve.create_app(footage_holder))
  yield server
  server.stop()


# ---- the API ---------------------------------------------------------------------------------------------------


def test_search_matches_the_search_command(client, tiny_model, index_dir):  # noqa: F811
  q = 'a man in a black jacket and blue jeans'
  page = client.get('/api/search', params={'q': q, 'k': 5}).json()
  index = search.load_index(index_dir)
  expected = search.search(tiny_model, index, [q], top=8)[0]
  assert page['total'] == len(index.paths) and page['query'] == q
  got = [(index.paths[r['id']], r['score']) for r in page['results']]
  assert [p for p, _ in got] == [p for p, _ in expected[:5]]
  np.testing.assert_allclose([s for _, s in got], [s for _, s in expected[:5]], atol=1e-5)
  assert [r['rank'] for r in page['results']] == [1, 2, 3, 4, 5]
  nxt = client.get('/api/search', params={'q': q, 'k': 3, 'offset': 5}).json()
  assert [index.paths[r['id']] for r in nxt['results']] == [p for p, _ in expected[5:8]]
  assert [r['rank'] for r in nxt['results']] == [6, 7, 8]


def test_similar_image_and_match(client, index_dir):
  index = search.load_index(index_dir)
  page = client.get('/api/similar', params={'id': 3, 'k': 4}).json()
  scores = index.scores(index.vector(3))
  scores[3] = -np.inf
  assert [r['id'] for r in page['results']] == list(np.argsort(-scores, kind='stable')[:4])
  r = client.get('/api/image/3')
  assert r.status_code == 200 and r.headers['content-type'] == 'image/png'
  with open(index.paths[3], 'rb') as f:
    assert r.content == f.read()
  r = client.get('/api/match/3', params={'q': 'black backpack'})
  assert r.status_code == 200 and r.headers['content-type'] == 'image/png'
  assert Image.open(__import__('io').BytesIO(r.content)).size[0] > 100
  info = client.get('/api/info').json()
  assert info['images'] == len(index.paths) and info['limits']['max_k'] == 200
  assert client.get('/').status_code == 200 and 'id="q"' in client.get('/').text
  assert client.get('/openapi.json').json()['paths']['/api/search']


# ---- safety ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize('path', [
    '/api/image/..%2F..%2Fetc%2Fpasswd', '/api/image/%2Fetc%2Fpasswd', '/api/image/../../etc/passwd',
    '/api/image/%252e%252e%252fetc%252fpasswd', '/api/image/-1', '/api/image/999999', '/api/image/1e3',
    '/api/image/0x1', '/api/image/3%00.png', '/static/../../../../etc/passwd', '/static/%2e%2e/%2e%2e/etc/passwd',
    '/api/match/-1?q=x', '/api/similar?id=-5',
], ids=lambda p: p)
def test_no_path_from_a_client_is_opened(client, path):
  r = client.get(path)
  assert 400 <= r.status_code < 500, (path, r.status_code)
  assert b'root:' not in r.content


def test_a_symlink_leaving_the_indexed_folders_is_not_sent(tiny_model, folder, tmp_path):  # noqa: F811
  from fastapi.testclient import TestClient
  outside = tmp_path / 'outside'
  outside.mkdir()
  secret = outside / 'secret.png'
  shutil.copy(sorted(folder.iterdir())[0], secret)
  photos = tmp_path / 'photos'
  photos.mkdir()
  shutil.copy(sorted(folder.iterdir())[1], photos / 'inside.png')
  (photos / 'escape.png').symlink_to(secret)
  (photos / 'also_inside.png').symlink_to(photos / 'inside.png')
  out = str(tmp_path / 'index')
  search.build_index(tiny_model, str(photos), out, log=lambda _: None)
  holder = serve_state.IndexHolder(out, tiny_model, log=lambda _: None)
  paths = search.load_index(out).paths
  with TestClient(serve.create_app(holder)) as c:
    r = c.get(f'/api/image/{paths.index(str(photos / "escape.png"))}')
    assert r.status_code == 403 and 'outside the indexed folders' in r.json()['detail']
    assert c.get(f'/api/image/{paths.index(str(photos / "also_inside.png"))}').status_code == 200


def test_another_address_needs_a_token(monkeypatch, capsys):
  monkeypatch.delenv(serve.TOKEN_ENV, raising=False)
  with pytest.raises(SystemExit):
    serve.parse_args(['--index=x', '--host=0.0.0.0'])
  assert 'give a token' in capsys.readouterr().err
  assert serve.parse_args(['--index=x', '--host=0.0.0.0', '--token=s3cret']).token == 's3cret'
  monkeypatch.setenv(serve.TOKEN_ENV, 'from-env')
  assert serve.parse_args(['--index=x', '--host=192.168.1.5']).token == 'from-env'
  assert serve.parse_args(['--index=x']).host == '127.0.0.1'
  assert serve.is_loopback('::1') and serve.is_loopback('localhost') and not serve.is_loopback('10.0.0.1')


def test_token_required_on_every_request(holder):
  from fastapi.testclient import TestClient
  with TestClient(serve.create_app(holder, token='s3cret')) as c:
    for path in ('/', '/api/info', '/api/image/0', '/api/search?q=a+man', '/static/app.js', '/openapi.json'):
      assert c.get(path).status_code == 401, path
    assert c.get('/api/info', headers={'Authorization': 'Bearer wrong'}).status_code == 401
    assert c.get('/api/info', headers={'Authorization': 'Bearer s3cret'}).status_code == 200
    assert c.get('/?token=s3cret').status_code == 200  # the page opened once with the token sets a cookie
    assert c.get('/api/image/0').status_code == 200


def test_limits_answer_4xx_and_never_reach_the_model(client, holder):
  from ivt_jax.search import server as serve_lib
  before = client.app.state.batcher.queries
  cases = [
      ({'q': 'x' * 1001}, 422, 'longer than 1000'), ({'q': '   '}, 422, 'empty query'),
      ({'q': 'a man', 'k': 0}, 422, 'k must be 1..200'), ({'q': 'a man', 'k': 201}, 422, 'k must be'),
      ({'q': 'a man', 'offset': -1}, 422, 'offset must be'), ({'q': 'a man', 'k': 'ten'}, 422, ''),
      ({}, 422, ''),
  ]
  for params, status, text in cases:
    r = client.get('/api/search', params=params)
    assert r.status_code == status and text in r.text, (params, r.status_code, r.text)
  r = client.post('/api/search', content=b'x' * 20000)
  assert r.status_code == 413
  r = client.get('/api/search', params={'q': 'a' * 20000})
  assert r.status_code == 413
  assert client.app.state.batcher.queries == before
  assert serve_lib.Limits().max_request_bytes == 16384


def test_busy_when_too_much_waits(holder):
  from fastapi.testclient import TestClient
  gate = threading.Event()
  app = serve.create_app(holder, limits=serve.Limits(max_pending=2, max_batch=1))
  real = app.state.batcher._embed
  app.state.batcher._embed = lambda texts: (gate.wait(30), real(texts))[1]
  with TestClient(app) as c, concurrent.futures.ThreadPoolExecutor(6) as pool:
    futures = [pool.submit(c.get, '/api/search', params={'q': f'a man {i}'}) for i in range(6)]
    time.sleep(1.0)
    gate.set()
    codes = sorted(f.result().status_code for f in futures)
  assert codes.count(503) >= 1 and codes.count(200) >= 2, codes
  busy = next(f.result() for f in futures if f.result().status_code == 503)
  assert 'busy' in busy.json()['detail']


# ---- under load, and while the index changes -------------------------------------------------------------------


def test_concurrent_queries_are_embedded_together(live, tiny_model):  # noqa: F811
  import httpx
  texts = [f'a person in a {c} coat' for c in ('red', 'blue', 'green', 'black', 'white', 'grey', 'pink', 'brown')]
  texts = texts * 2
  batcher_before = (live.server.config.app.state.batcher.calls, live.server.config.app.state.batcher.queries)
  with concurrent.futures.ThreadPoolExecutor(16) as pool:
    # a generous timeout: this checks batching, not latency (a busy 2-core machine can take seconds)
    pages = list(pool.map(lambda t: httpx.get(f'{live.url}/api/search', params={'q': t, 'k': 3},
                                              timeout=120).json(), texts))
  calls = live.server.config.app.state.batcher.calls - batcher_before[0]
  queries = live.server.config.app.state.batcher.queries - batcher_before[1]
  assert queries == 16 and calls < 16, (calls, queries)
  for t, p in zip(texts, pages):
    single = httpx.get(f'{live.url}/api/search', params={'q': t, 'k': 3}).json()
    assert [r['id'] for r in p['results']] == [r['id'] for r in single['results']]


def test_small_load_test(live):
  from ivt_jax.tools import load_test
  r = load_test.run(live.url, clients=4, queries=10, timeout_s=300)
  assert r['errors'] == 0 and r['ok'] == 40 and r['p50_ms'] <= r['p95_ms'] <= r['p99_ms'] <= r['max_ms']
  assert '| 4 x 10 |' in load_test.table(r)


def test_index_updated_while_serving(tiny_model, folder, tmp_path):  # noqa: F811
  import httpx
  photos = tmp_path / 'photos'
  photos.mkdir()
  files = sorted(folder.iterdir())
  for f in files[:3]:
    shutil.copy(f, photos / f.name)
  out = str(tmp_path / 'index')
  search.build_index(tiny_model, str(photos), out, log=lambda _: None)
  holder = serve_state.IndexHolder(out, tiny_model, check_every_s=0.05, log=lambda _: None)
  server = LiveServer(serve.create_app(holder))
  failures, counts, stop = [], set(), threading.Event()

  def poll():
    while not stop.is_set():
      r = httpx.get(f'{server.url}/api/search', params={'q': 'a man', 'k': 50})
      if r.status_code != 200:
        failures.append(r.text)
        continue
      page = r.json()
      counts.add(page['total'])
      if len(page['results']) != min(50, page['total']):
        failures.append(f'{len(page["results"])} results of {page["total"]}')
  try:
    assert httpx.get(f'{server.url}/api/search', params={'q': 'a man'}).json()['total'] == 3
    thread = threading.Thread(target=poll)
    thread.start()
    for f in files[3:]:  # grows the index while it is queried
      shutil.copy(f, photos / f.name)
    search.build_index(tiny_model, str(photos), out, log=lambda _: None, save_every=2)
    deadline = time.time() + 10
    while httpx.get(f'{server.url}/api/info').json()['images'] != len(files):
      assert time.time() < deadline, 'the new index was not picked up'
      time.sleep(0.05)
    stop.set()
    thread.join()
  finally:
    stop.set()
    server.stop()
  assert not failures, failures[:3]
  assert len(files) in counts and holder.reloads >= 1 and counts <= {3, 5, 7, 9, 11, len(files)}


# ---- people found in footage -----------------------------------------------------------------------------------


def _jpeg(response):
  assert response.status_code == 200, response.text
  assert response.headers['content-type'] == 'image/jpeg'
  return np.asarray(Image.open(io.BytesIO(response.content)).convert('RGB')).astype(np.float32)


def _diff(a, b):
  return float(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).mean())


def _is_red(pixels):
  """(..., 3) -> (...) whether each pixel is the box's red (after JPEG's colour blur)."""
  p = np.asarray(pixels, np.float32)
  return (p[..., 0] > 140) & (p[..., 0] - p[..., 1] > 70) & (p[..., 0] - p[..., 2] > 70)


def _edges(image, box):
  """The fraction of rows (columns) with the box's red just outside its left, right and top sides."""
  x0, y0, x1, y1 = (int(np.floor(v)) for v in box)
  mid, across = slice(y0 + 20, y1 - 20), slice(x0 + 5, x1 - 5)
  return (float(_is_red(image[mid, x0 - 3:x0 + 1]).any(axis=1).mean()),
          float(_is_red(image[mid, x1:x1 + 4]).any(axis=1).mean()),
          float(_is_red(image[y0 - 3:y0 + 1, across]).any(axis=0).mean()))


def _boxes(client, footage):
  """{early, late, still: the box the API gives} (the detector's)."""
  page = client.get('/api/search', params={'q': 'a person', 'k': 50}).json()
  by_id = {r['id']: r for r in page['results']}
  return {name: np.asarray(by_id[row]['frame']['box']) for name, row in footage['rows'].items()}


def test_footage_results_carry_the_moment_and_the_box(footage_client, footage):
  from ivt_jax.search import detect
  rows, truth = footage['rows'], footage['truth']
  page = footage_client.get('/api/search', params={'q': 'a person', 'k': 50}).json()
  by_id = {r['id']: r for r in page['results']}
  assert page['total'] == len(by_id) == footage_client.get('/api/info').json()['images']
  late, early, still = (by_id[rows[n]] for n in ('late', 'early', 'still'))
  assert late['name'] == os.path.join('cam1', 'clip.mp4') + ' @ 0:01.5' and early['name'].endswith(' @ 0:00.0')
  assert {k: v for k, v in late['frame'].items() if k not in ('box', 'score')} == {
      'time': pytest.approx(1.5), 'index': MOVES_AT, 'track': 1, 'source': 'ssdlite'}
  assert early['frame']['time'] == 0.0 and early['frame']['index'] == 0 and early['frame']['track'] == 0
  assert still['name'] == 'still.png' and still['frame']['time'] is None and still['frame']['index'] is None
  assert still['frame']['track'] is None
  for r, name in ((late, 'late'), (early, 'early'), (still, 'still')):  # the boxes: where the person was pasted
    assert detect.iou(truth[name][1][None], np.asarray([r['frame']['box']]))[0, 0] >= 0.6, (name, r['frame'])
    assert 0.5 <= r['frame']['score'] <= 1
  assert sum(r['frame'] is None and '@' not in r['name'] for r in page['results']) == page['total'] - 3  # crops
  similar = footage_client.get('/api/similar', params={'id': rows['late'], 'k': 50}).json()['results']
  assert rows['late'] not in [r['id'] for r in similar] and len(similar) == page['total'] - 1
  assert {r['id']: r['frame'] for r in similar}[rows['early']]['track'] == 0
  schema = footage_client.get('/openapi.json').json()
  assert set(schema['components']['schemas']['Frame']['properties']) == {'time', 'index', 'box', 'score', 'track',
                                                                       'source'}
  assert '/api/frame/{row}' in schema['paths'] and 'image/jpeg' in \
      schema['paths']['/api/frame/{row}']['get']['responses']['200']['content']


def test_frame_crop_and_match_of_a_footage_row(footage_client, footage, tiny_model):  # noqa: F811
  rows, truth = footage['rows'], footage['truth']
  boxes = _boxes(footage_client, footage)
  frame, box = truth['late'][0], boxes['late']
  x0, y0, x1, y1 = (int(np.floor(v)) for v in box)
  got = _jpeg(footage_client.get(f'/api/frame/{rows["late"]}'))
  assert got.shape == (FRAME_H, FRAME_W, 3)  # the video's frame
  inside = (slice(y0 + 4, y1 - 4), slice(x0 + 4, x1 - 4))
  assert _diff(got[inside], frame[inside]) < 12  # the person, at 1.5 s standing here ...
  was = (slice(60, 190), slice(40, 80))
  assert _diff(got[was], BACKGROUND) < 12  # ... and no longer where they stood before
  assert min(_edges(got, box)) > 0.9  # the box, drawn just outside it
  plain = _jpeg(footage_client.get(f'/api/frame/{rows["late"]}', params={'box': 0}))
  assert plain.shape == got.shape and max(_edges(plain, box)) == 0 and not _is_red(plain[:, :150]).any()
  assert _diff(plain, frame) < 4 and _diff(got[inside], plain[inside]) < 3  # the frame; the person not drawn over
  early = _jpeg(footage_client.get(f'/api/frame/{rows["early"]}', params={'box': 'false'}))
  assert _diff(early[inside], BACKGROUND) < 12 and _diff(early, truth['early'][0]) < 4  # the frame at 0.0 s
  still = _jpeg(footage_client.get(f'/api/frame/{rows["still"]}'))
  assert still.shape == (FRAME_H, FRAME_W, 3) and min(_edges(still, boxes['still'])) > 0.9
  assert _diff(still[inside], BACKGROUND) < 12
  crop = _jpeg(footage_client.get(f'/api/image/{rows["late"]}'))  # the person cut out, twice the model's input
  h, w = tiny_model.image_size
  assert crop.shape == (2 * h, 2 * w, 3)
  assert _diff(crop, search_frames.person_crop(frame, box, (2 * h, 2 * w))) < 12
  assert footage_client.app.state.frames.decoded <= 3  # the frame of 1.5 s was decoded once (then cached)
  r = footage_client.get(f'/api/match/{rows["late"]}', params={'q': 'a black backpack'})
  assert r.status_code == 200 and r.headers['content-type'] == 'image/png'
  assert Image.open(io.BytesIO(r.content)).size[0] > 100
  crop_row = min(set(range(len(rows) + 12)) - set(rows.values()))
  r = footage_client.get(f'/api/frame/{crop_row}')
  assert r.status_code == 404 and r.json()['detail'] == f'row {crop_row} is a person crop, not a frame of footage'
  assert footage_client.get(f'/api/image/{crop_row}').headers['content-type'] == 'image/png'  # a crop: its file
  end = footage_client.get('/api/info').json()['images']
  r = footage_client.get(f'/api/frame/{end}')
  assert r.status_code == 404 and f'no image {end}' in r.json()['detail']
  assert footage_client.get(f'/api/frame/{rows["late"]}', params={'box': 'maybe'}).status_code == 422


def test_footage_files_that_cannot_be_sent(tiny_model, footage, index_dir, tmp_path):  # noqa: F811
  """A row whose video resolves outside the indexed folders (403), one whose file is gone, changed since it
  was indexed or is no video (404, each saying so)."""
  from fastapi.testclient import TestClient
  outside = tmp_path / 'outside'
  outside.mkdir()
  shutil.copy(footage['root'] / 'cam1' / 'clip.mp4', outside / 'secret.mp4')
  root = tmp_path / 'footage'
  root.mkdir()
  (root / 'escape.mp4').symlink_to(outside / 'secret.mp4')
  for name in ('gone.mp4', 'changed.mp4'):
    shutil.copy(footage['root'] / 'cam1' / 'clip.mp4', root / name)
  (root / 'broken.mp4').write_bytes(b'not a video at all')
  box = (30.0, 60.0, 90.0, 180.0)
  names = ('escape.mp4', 'gone.mp4', 'changed.mp4', 'broken.mp4')
  rows = [_row(root / n, box, 0.9, frame_time=0.5, frame_index=5) for n in names]
  (root / 'gone.mp4').unlink()
  with open(root / 'changed.mp4', 'ab') as f:
    f.write(b'more')
  base = len(search.load_index(index_dir))
  vectors = search.load_index(index_dir).gather(np.zeros(len(rows), np.int64))
  out = _add_rows(index_dir, str(tmp_path / 'index'), rows, vectors, [root], tiny_model.identity['fingerprint'])
  holder = serve_state.IndexHolder(out, tiny_model, log=lambda _: None)
  row = {n: base + i for i, n in enumerate(names)}
  with TestClient(serve.create_app(holder)) as c:
    for path in ('frame', 'image'):
      r = c.get(f'/api/{path}/{row["escape.mp4"]}')
      assert r.status_code == 403 and 'outside the indexed folders' in r.json()['detail'], r.text
      assert b'\xff\xd8' not in r.content[:2]
      for name, says in (('gone.mp4', 'is no longer on disk'), ('changed.mp4', 'changed since it was indexed'),
                         ('broken.mp4', 'cannot be read now')):
        r = c.get(f'/api/{path}/{row[name]}')
        assert r.status_code == 404 and r.json()['detail'].startswith(f'row {row[name]}: ') and \
            says in r.json()['detail'], (path, name, r.text)
    assert c.get(f'/api/match/{row["escape.mp4"]}', params={'q': 'a man'}).status_code == 403
    assert c.get(f'/api/match/{row["gone.mp4"]}', params={'q': 'a man'}).status_code == 404
  holder.close()
  again = serve_state.IndexHolder(out, tiny_model, log=lambda _: None)
  for name in os.listdir(os.path.join(out, 'shards')):  # as a compaction does after this snapshot opened
    if name.endswith('.parquet'):
      os.remove(os.path.join(out, 'shards', name))
  with TestClient(serve.create_app(again)) as c:
    page = c.get('/api/search', params={'q': 'a man', 'k': 50}).json()  # the names were read at open
    assert len(page['results']) == page['total'] == base + len(rows)
    r = c.get(f'/api/frame/{row["escape.mp4"] + 1}')
    assert r.status_code == 404 and 'the index was rewritten while answering' in r.json()['detail'], r.text
  again.close()


# ---- the page in a browser -------------------------------------------------------------------------------------


@pytest.mark.skipif(not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)),
                    reason='needs Debian\'s chromium and chromium-driver (installed by .ci/run)')
def test_the_page_in_headless_chromium(footage_live, footage, tmp_path):
  live = footage_live  # the crops and the people found in footage
  from selenium import webdriver
  from selenium.webdriver.chrome.service import Service
  from selenium.webdriver.common.by import By
  from selenium.webdriver.support.ui import Select, WebDriverWait
  options = webdriver.ChromeOptions()
  for a in ('--headless=new', '--no-sandbox', '--disable-dev-shm-usage', '--window-size=1200,900'):
    options.add_argument(a)
  options.binary_location = CHROMIUM
  driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
  wait = WebDriverWait(driver, 60)
  cards = lambda: driver.find_elements(By.CSS_SELECTOR, '#grid .card')
  try:
    driver.get(live.url + '/')
    Select(driver.find_element(By.ID, 'k')).select_by_visible_text('10')
    driver.find_element(By.ID, 'q').send_keys('a woman in a red coat with a black backpack\n')
    wait.until(lambda d: len(cards()) == 10)
    first_page = [c.get_attribute('data-id') for c in cards()]
    assert cards()[0].find_element(By.CLASS_NAME, 'rank').text == '#1'
    assert 'results 1–10 of' in driver.find_element(By.ID, 'status').text
    wait.until(lambda d: d.execute_script(
        "return [...document.querySelectorAll('#grid img')].every(i => i.complete && i.naturalWidth > 0)"))
    driver.save_screenshot(str(tmp_path / 'page.png'))
    cards()[0].click()  # the viewer: the image large, its match map, "more like this"
    wait.until(lambda d: d.find_element(By.ID, 'viewer').is_displayed())
    wait.until(lambda d: d.execute_script("const i = document.getElementById('viewer-match');"
                                          "return i.complete && i.naturalWidth > 0"))
    driver.find_element(By.ID, 'close').click()
    driver.find_element(By.ID, 'next').click()
    wait.until(lambda d: 'results 11–' in d.find_element(By.ID, 'status').text)
    assert cards()[0].find_element(By.CLASS_NAME, 'rank').text == '#11'
    assert not set(first_page) & {c.get_attribute('data-id') for c in cards()}
    cards()[0].click()
    wait.until(lambda d: d.find_element(By.ID, 'more').is_displayed())
    driver.find_element(By.ID, 'more').click()
    wait.until(lambda d: 'images like #' in d.find_element(By.ID, 'status').text and len(cards()) == 10)
    assert all(c.find_element(By.CLASS_NAME, 'rank').text != '' for c in cards())
    driver.find_element(By.ID, 'q').clear()
    driver.find_element(By.ID, 'q').send_keys('x' * 1000 + 'y\n')  # maxlength keeps 1000; the server's limit
    wait.until(lambda d: 'results 1–10' in d.find_element(By.ID, 'status').text)
    # a person found in a video: the crop and its moment on the card, the whole frame in the viewer
    Select(driver.find_element(By.ID, 'k')).select_by_visible_text('50')
    driver.find_element(By.ID, 'q').clear()
    driver.find_element(By.ID, 'q').send_keys('a man with a brown backpack\n')
    wait.until(lambda d: 'backpack”: results 1–' in d.find_element(By.ID, 'status').text)
    wait.until(lambda d: len(cards()) == footage['rows']['still'] + 1)
    hit = next(c for c in cards() if c.get_attribute('data-id') == str(footage['rows']['late']))
    assert hit.find_element(By.CLASS_NAME, 'when').text == 'cam1/clip.mp4 · 0:01.5 · track 1'
    assert len(driver.find_elements(By.CSS_SELECTOR, '#grid .when')) == 3  # the crops' cards are as they were
    wait.until(lambda d: d.execute_script(
        "return [...document.querySelectorAll('#grid img')].every(i => i.complete && i.naturalWidth > 0)"))
    driver.save_screenshot(str(tmp_path / 'grid.png'))
    hit.click()
    wait.until(lambda d: d.find_element(By.ID, 'viewer').is_displayed())
    wait.until(lambda d: d.execute_script("const i = document.getElementById('viewer-image');"
                                          f"return i.complete && i.naturalWidth === {FRAME_W}"))
    assert f'api/frame/{footage["rows"]["late"]}' in driver.find_element(By.ID, 'viewer-image').get_attribute('src')
    assert '0:01.5' in driver.find_element(By.ID, 'viewer-title').text
    assert 'at 0:01.5, frame 15' in driver.find_element(By.ID, 'viewer-detail').text
    wait.until(lambda d: d.execute_script("const i = document.getElementById('viewer-match');"
                                          "return i.complete && i.naturalWidth > 0"))
    driver.save_screenshot(str(tmp_path / 'footage.png'))  # the viewer of a video hit
    driver.find_element(By.ID, 'more').click()
    wait.until(lambda d: f'images like #{footage["rows"]["late"]}' in d.find_element(By.ID, 'status').text)
  finally:
    driver.quit()


# ---- the approximate index -------------------------------------------------------------------------------------


@pytest.mark.parametrize('kind', ['ivf', 'hnsw'])
def test_approximate_index_behind_the_same_api(tiny_model, index_dir, client, kind, tmp_path):  # noqa: F811
  from fastapi.testclient import TestClient
  from ivt_jax.search import ann as serve_ann
  directory = str(tmp_path / 'index')
  shutil.copytree(index_dir, directory)
  said = []
  holder = serve_state.IndexHolder(directory, tiny_model, approximate=serve_ann.for_index(kind, said.append),
                                   log=lambda _: None)
  assert sorted(os.listdir(os.path.join(directory, 'ann'))) == [f'{kind}.faiss', f'{kind}.json']
  assert any('built' in line for line in said), said
  with TestClient(serve.create_app(holder)) as c:
    assert c.get('/api/info').json()['approximate'] is True
    for q in ('a man in a black jacket', 'a woman with a red bag'):
      got = c.get('/api/search', params={'q': q, 'k': 5, 'offset': 2}).json()['results']
      want = client.get('/api/search', params={'q': q, 'k': 5, 'offset': 2}).json()['results']
      assert [r['id'] for r in got] == [r['id'] for r in want]  # 12 images: the approximate index finds all
      np.testing.assert_allclose([r['score'] for r in got], [r['score'] for r in want], atol=1e-5)
    similar = c.get('/api/similar', params={'id': 2, 'k': 4}).json()['results']
    assert 2 not in [r['id'] for r in similar] and len(similar) == 4
  holder.close()
  again = serve_state.IndexHolder(directory, tiny_model, approximate=serve_ann.for_index(kind, said.append),
                                  log=lambda _: None)
  assert 'loaded' in said[-1] and again.current().ann.size == 12  # a restart loads it, no rebuild
  again.close()


def test_a_deep_page_is_answered_exactly(holder):
  class Shallow:
    max_depth = 5
    def search(self, query, n):
      raise AssertionError(f'the approximate index was asked for {n} results')
  snap = holder.current()
  shallow = serve_state.Snapshot(snap.index, Shallow(), snap.real_roots)
  query = snap.index.vector(0)
  assert holder.rank(shallow, query, 6, 3) == holder.rank(snap, query, 6, 3)
  with pytest.raises(AssertionError, match='asked for 5'):
    holder.rank(shallow, query, 2, 3)


def test_ann_benchmark_small(tmp_path, capsys):
  from ivt_jax.tools import ann_benchmark
  x, q = ann_benchmark.gallery(4000, 64, 60)
  r = ann_benchmark.run(x, q)
  assert r['ivf']['recall@10'] >= 0.95 and r['hnsw']['recall@10'] >= 0.9, r
  assert r['ivf']['p50_ms'] > 0 and r['exact']['p50_ms'] > 0 and r['ivf']['queries_per_s'] > 0
  assert '| ivf |' in ann_benchmark.table(r) and '4,000 x 64' in ann_benchmark.table(r)
  np.save(tmp_path / 'x.npy', x)
  np.save(tmp_path / 'q.npy', q[:20])
  assert ann_benchmark.main([f'--vectors={tmp_path / "x.npy"}', f'--queries_file={tmp_path / "q.npy"}',
                             '--kinds=ivf', f'--json={tmp_path / "r.json"}']) == 0
  assert '| ivf |' in capsys.readouterr().out and (tmp_path / 'r.json').exists()
  np.save(tmp_path / 'bad.npy', np.zeros((5,), np.float32))
  with pytest.raises(ValueError, match='expected a .N, D. array'):
    ann_benchmark.main([f'--vectors={tmp_path / "bad.npy"}', f'--queries_file={tmp_path / "q.npy"}'])
