'use strict';
// The search page: a text query or "more like this" -> a grid of results, paged; a viewer for one image.
// A person found in footage (result.frame set) shows its crop with the file, time and track under it; its
// viewer shows the whole frame at that moment with the box drawn (api/frame/ROW).
const $ = (id) => document.getElementById(id);
const state = { mode: null, q: '', id: null, offset: 0, k: 20, total: 0 };

function setStatus(text, isError) {
  $('status').textContent = text;
  $('status').className = isError ? 'error' : '';
}

async function getJSON(url) {
  const response = await fetch(url, { credentials: 'same-origin' });
  const body = await response.json().catch(() => ({}));
  if (!response.ok) {
    const detail = typeof body.detail === 'string' ? body.detail
      : Array.isArray(body.detail) ? body.detail.map((d) => d.msg || JSON.stringify(d)).join('; ')
      : JSON.stringify(body.detail || body);
    throw new Error(`${response.status}: ${detail}`);
  }
  return body;
}

// 12.5 -> '0:12.5', 3725 -> '1:02:05.0' (as ivt_jax.search.pictures.clock)
function clock(seconds) {
  const h = Math.floor(seconds / 3600);
  const m = Math.floor((seconds - 3600 * h) / 60);
  const s = (seconds - 3600 * h - 60 * m).toFixed(1).padStart(4, '0');
  return h ? `${h}:${String(m).padStart(2, '0')}:${s}` : `${m}:${s}`;
}

// 'cam1.mp4 · 0:12.5 · track 3' for a person found in footage (the name without its ' @ time').
function frameLabel(result) {
  const f = result.frame;
  const parts = [f.time === null ? result.name : result.name.replace(/ @ [^@]*$/, '')];
  if (f.time !== null) parts.push(clock(f.time));
  if (f.track !== null) parts.push(`track ${f.track}`);
  return parts.join(' · ');
}

function frameDetail(result) {
  const f = result.frame;
  const parts = [`found by ${f.source}` + (f.score === null ? '' : ` (score ${f.score.toFixed(2)})`)];
  if (f.time !== null) parts.push(`at ${clock(f.time)}, frame ${f.index}`);
  if (f.track !== null) parts.push(`track ${f.track}`);
  parts.push(`box ${f.box.map((v) => Math.round(v)).join(', ')}`);
  return parts.join(' · ');
}

function card(result) {
  const div = document.createElement('div');
  div.className = 'card';
  div.dataset.id = result.id;
  const img = document.createElement('img');
  img.loading = 'lazy';
  img.src = `api/image/${result.id}`;
  img.alt = result.name;
  const meta = document.createElement('div');
  meta.className = 'meta';
  meta.innerHTML = '<span class="rank"></span><span class="score"></span>';
  meta.querySelector('.rank').textContent = `#${result.rank}`;
  meta.querySelector('.score').textContent = result.score.toFixed(3);
  const name = document.createElement('div');
  name.className = 'name';
  name.textContent = result.name;
  name.title = result.name;
  if (result.frame) {
    div.classList.add('footage');
    name.classList.add('when');
    name.textContent = frameLabel(result);
  }
  div.append(img, meta, name);
  div.addEventListener('click', () => openViewer(result));
  return div;
}

async function run() {
  const params = new URLSearchParams({ k: state.k, offset: state.offset });
  let url;
  if (state.mode === 'text') {
    params.set('q', state.q);
    url = `api/search?${params}`;
  } else {
    params.set('id', state.id);
    url = `api/similar?${params}`;
  }
  setStatus('Searching…');
  try {
    const page = await getJSON(url);
    state.total = page.total;
    const grid = $('grid');
    grid.replaceChildren(...page.results.map(card));
    const first = page.results.length ? page.offset + 1 : 0;
    const last = page.offset + page.results.length;
    const what = state.mode === 'text' ? `“${state.q}”` : `images like #${state.id}`;
    setStatus(`${what}: results ${first}–${last} of ${page.total} images`);
    $('range').textContent = `${first}–${last} of ${page.total}`;
    $('pager').hidden = page.total === 0;
    $('prev').disabled = page.offset === 0;
    $('next').disabled = last >= page.total;
  } catch (error) {
    setStatus(error.message, true);
  }
}

function openViewer(result) {
  $('viewer-title').textContent = `#${result.rank}  ${result.name}  (score ${result.score.toFixed(3)})`;
  const image = $('viewer-image');
  image.classList.toggle('frame', Boolean(result.frame));
  image.alt = result.frame ? 'the whole frame at that moment, the person boxed' : 'the image, large';
  image.src = result.frame ? `api/frame/${result.id}` : `api/image/${result.id}`;
  $('viewer-detail').textContent = result.frame ? frameDetail(result) : '';
  $('viewer-detail').hidden = !result.frame;
  const box = $('viewer-match-box');
  if (state.mode === 'text') {
    box.hidden = false;
    $('viewer-match').src = `api/match/${result.id}?${new URLSearchParams({ q: state.q })}`;
  } else {
    box.hidden = true;
  }
  $('more').onclick = () => {
    closeViewer();
    Object.assign(state, { mode: 'similar', id: result.id, offset: 0 });
    run();
  };
  $('viewer').hidden = false;
}

function closeViewer() { $('viewer').hidden = true; }

$('form').addEventListener('submit', (event) => {
  event.preventDefault();
  const q = $('q').value.trim();
  if (!q) { setStatus('Describe the person to find.', true); return; }
  Object.assign(state, { mode: 'text', q, offset: 0, k: Number($('k').value) });
  run();
});
$('k').addEventListener('change', () => { state.k = Number($('k').value); if (state.mode) { state.offset = 0; run(); } });
$('prev').addEventListener('click', () => { state.offset = Math.max(0, state.offset - state.k); run(); });
$('next').addEventListener('click', () => { state.offset += state.k; run(); });
$('close').addEventListener('click', closeViewer);
$('viewer').addEventListener('click', (event) => { if (event.target === $('viewer')) closeViewer(); });
document.addEventListener('keydown', (event) => { if (event.key === 'Escape') closeViewer(); });
