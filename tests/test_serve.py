"""The search server: its API against the search CLI's ranking, the safety rules (loopback and tokens, files by
row only, limits), micro-batching, picking up a rebuilt index, a small load test, people found in footage (a
video and a full frame written here: the moment, the box, the frame and the crop), and the page in a real
headless Chromium (Debian's chromium and chromium-driver, driven by Selenium)."""
import concurrent.futures
import os
import shutil
import socket
import threading
import time

import numpy as np
import pytest
from PIL import Image

from ivt_jax import search
from ivt_jax.search import server as serve
from ivt_jax.search import state as serve_state
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
