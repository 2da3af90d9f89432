"""The search server over footage: people found in a video and a full frame written here, as index rows (the
moment, the box, the frame and the crop through the API), files that cannot be sent, and the page in a real
headless Chromium (Debian's chromium and chromium-driver, driven by Selenium) opening a video hit."""
import io
import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from ivt_jax import search
from ivt_jax.search import frames as search_frames
from ivt_jax.search import server as serve
from ivt_jax.search import state as serve_state
from ivt_jax.search import store as search_store
from tests.test_search import tiny_model, tiny_run  # noqa: F401 (session fixtures: a tiny demo workdir)
from tests.test_serve import CHROMEDRIVER, CHROMIUM, LiveServer, folder, index_dir  # noqa: F401 (fixtures)

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


