"""The image index of a folder: listing and loading images, building and updating the index incrementally (new
or changed files embedded into new shards, vanished ones dropped, unreadable ones listed), in one process or
many, and loading it back, checked against the model that queries it. A folder holds person crops (a row per
file) or, with `footage=`, full frames and videos whose people a detector finds (ivt_jax/search/footage.py:
a row per person and frame looked at). The files are ivt_jax/search/store.py's; the bookkeeping of an update
is ivt_jax/search/update.py's."""
from __future__ import annotations

import concurrent.futures
import json
import os
import queue
import threading
import time
from typing import Callable, Optional, Sequence

import numpy as np

from input_pipeline import paths
from ivt_jax.search import footage as search_footage
from ivt_jax.search import frames as search_frames
from ivt_jax.search import model as search_model
from ivt_jax.search import store as search_store
from ivt_jax.search import update as search_update


IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.webp')
HEADER = search_store.HEADER
Index = search_store.Index


def list_images(folder: str, videos: bool = False) -> list[str]:
  """Absolute paths of the image files (and with `videos`, the video files) under folder (recursive, sorted).

  Symbolic links to files are listed (and read if they resolve); links to folders are not followed, so a link
  loop cannot make the walk endless. A folder that cannot be listed is skipped.
  """
  folder = paths.local(folder, 'image folder')
  if not os.path.isdir(folder):
    raise FileNotFoundError(f'image folder {folder} does not exist')
  out = []
  for root, dirs, files in os.walk(folder):
    dirs.sort()
    kinds = IMAGE_EXTENSIONS + (search_frames.VIDEO_EXTENSIONS if videos else ())
    out.extend(os.path.join(root, f) for f in files if os.path.splitext(f)[1].lower() in kinds)
  return sorted(out)


def load_image(path: str, image_size: Sequence[int]) -> np.ndarray:
  """A file -> uint8 (H, W, 3) as the evaluation gallery preprocesses it. Raises ValueError/OSError."""
  from input_pipeline import augment, images  # pylint: disable=g-import-not-at-top
  return augment.eval_image(images.read_file(path), tuple(image_size), name=path)


def _try_load(path: str, image_size) -> tuple[Optional[np.ndarray], str]:
  try:
    return load_image(path, image_size), ''
  except Exception as e:  # pylint: disable=broad-except (any unreadable file is skipped, never fatal)
    return None, f'{type(e).__name__}: {e}'


# ---- index --------------------------------------------------------------------------------------


def top_k(scores: np.ndarray, start: int, k: int) -> np.ndarray:
  """Rows ranked start..start+k-1 of a (N,) score vector, best first, ties in row order (the search command's
  and the server's one ranking)."""
  n = len(scores)
  stop = min(n, start + k)
  if start >= stop:
    return np.zeros((0,), np.int64)
  if stop < n:
    # argpartition splits ties at the cut arbitrarily: take every row that scores at least the cut's score.
    cut = scores[np.argpartition(-scores, stop - 1)[stop - 1]]
    part = np.flatnonzero(scores >= cut)
  else:
    part = np.arange(n)
  order = part[np.lexsort((part, -scores[part]))]
  return order[start:stop]


def load_index(directory: str) -> Index:
  """Opens INDEX (search_store.open_index: this format or the first one)."""
  return search_store.open_index(directory)


def model_for_index(index: Index, checkpoint: str = '', config: Optional[str] = None, tokenizer: str = '',
                    tokenizer_kind: str = '') -> search_model.LoadedModel:
  """The model to query `index` with: the checkpoint (default: the one that built it), the config file and the
  tokenizer given, else those saved in the index when they are still there."""
  saved = index.header['model']
  loaded_config = search_model.load_config_file(config) if config else None
  if not tokenizer and not config and os.path.isfile(saved['tokenizer'].get('path', '')):
    tokenizer = saved['tokenizer']['path']
  return search_model.load_model(checkpoint or saved['checkpoint'], loaded_config, tokenizer,
                                 tokenizer_kind or (saved['tokenizer']['kind'] if tokenizer else ''),
                                 fallback_config=saved['config'])


check_identity = search_update.check_identity


def _barrier(name: str, nproc: int) -> None:
  if nproc > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(f'ivt-jax-index-{name}')


def build_index(model: search_model.LoadedModel, images_dir: str, out_dir: str, *, batch_size: int = 64,
                workers: Optional[int] = None, rebuild: bool = False, save_every: int = 5000,
                dtype: str = 'float32', footage: Optional[search_footage.FootageOptions] = None,
                save_every_s: float = 300.0, log_every_s: float = 2.0,
                log: Callable[[str], None] = print) -> dict:
  """Indexes (or updates the index of) a folder, in this process or, under jax.distributed, in every process
  (each embeds every N-th file to embed and writes its own shards; process 0 writes the header at the end);
  returns the run's statistics.

  Args:
    model: from `load_model` (its mesh over this process's devices).
    images_dir: the folder (recursive; the same path on every host).
    out_dir: the index directory (created; an index from another model there is refused unless `rebuild`).
    batch_size: images per embedding call (rounded up to a multiple of the local device count).
    workers: threads decoding images (default: min(8, CPUs)).
    rebuild: start from an empty index (the old one is served until the first new header replaces it).
    save_every: write a shard after about this many newly embedded rows (a killed run loses at most the
      rows since its last shard; the next run adopts the shards it finished).
    dtype: of the new shards' embeddings, 'float32' or 'float16'.
    footage: index full frames and videos (.mp4 .mkv .avi .mov .webm) by the people a detector finds in them
      (FootageOptions); None: every image is one person crop, and videos are left alone.
    save_every_s: with footage, also write a shard after this many seconds of work (a long video with few
      people is then resumed after its last saved frame).
    log_every_s: seconds between progress lines.
    log: where progress lines go.
  Returns:
    dict(files, embedded (rows), unchanged, removed, unreadable (list of {path, error}), images (rows in the
    index), seconds; with footage also frames, people, videos).
  """
  import jax  # pylint: disable=g-import-not-at-top
  t0 = time.time()
  if dtype not in search_store.DTYPES:
    raise ValueError(f'--dtype={dtype!r}: one of {", ".join(search_store.DTYPES)}')
  proc, nproc = jax.process_index(), jax.process_count()
  root = paths.local(images_dir, 'image folder')
  out_dir = paths.resolve(out_dir, 'index directory')
  files = list_images(root, videos=True)
  batch_size = search_model.round_up(max(1, int(batch_size)), model.mesh.size)
  fingerprint = model.identity['fingerprint']
  detector = search_footage.make_detector(footage) if footage is not None else None
  if proc == 0:  # alone, before the others look: another model's leftovers and half-written files go
    paths.makedirs(search_store.shard_dir(out_dir))
    if search_store.exists(out_dir) and not rebuild:
      old = search_store.open_index(out_dir)
      check_identity(old, model)
      if old.version != search_store.VERSION:
        log(f'{out_dir} is a first-format index (manifest.json): converting it')
        search_store.convert(out_dir, log=log)
    known = set()
    if paths.isfile(search_store.header_path(out_dir)):
      known = {s['name'] for s in json.loads(paths.read_text(search_store.header_path(out_dir)))['shards']}
    _, foreign = search_update.adoptable(out_dir, known, fingerprint)
    search_store.remove_shards(out_dir, foreign)
    keep = {n + ext for n in set(search_store.complete_shards(out_dir)) | known for ext in ('.npy', '.parquet')}
    d = search_store.shard_dir(out_dir)
    for name in paths.listdir(d) if paths.isdir(d) else []:  # half-written files of a killed run
      if name not in keep:
        paths.remove(paths.join(search_store.shard_dir(out_dir), name))
  _barrier('planned', nproc)
  plan = search_update.make_plan(model, root, out_dir, files, rebuild, footage, log)
  mine = plan.todo[proc::nproc]
  what = 'files' if footage is not None else 'image files'
  log(f'{len(files)} {what} under {root}: {len(plan.todo)} to embed'
      + (f' ({len(mine)} by process {proc} of {nproc})' if nproc > 1 else '')
      + (f' ({len(plan.resumed)} videos resumed)' if plan.resumed else '')
      + f', {plan.unchanged} unchanged, {plan.removed} removed, {plan.still_bad} unreadable and unchanged')
  if plan.skipped_videos:
    log(f'{plan.skipped_videos} video files left alone: index them with --detect (people found in their frames)')

  run = f'{search_store.new_run_id()}-p{proc:03d}'
  out = _Writer(model, out_dir, plan, run, dtype, fingerprint, nproc, batch_size, log)
  workers = workers or max(1, min(8, os.cpu_count() or 1))
  if footage is None:
    counts = _embed_crops(model, plan, mine, out, batch_size, save_every, workers, log_every_s, log)
  else:
    counts = _embed_footage(model, plan, mine, out, footage, detector, batch_size, save_every, save_every_s,
                            log_every_s, log)
  live = out.flush(final=True)
  if nproc > 1:  # each process's unreadable files beside its shards; process 0 gathers them into the header
    paths.write_text_atomic(paths.join(search_store.shard_dir(out_dir), f'{run}.unreadable.json'),
                            json.dumps(list(out.bad.values())))
    _barrier('embedded', nproc)
    if proc == 0:
      live = _commit_all(model, out_dir, plan, fingerprint)
    _barrier('committed', nproc)
    if proc != 0:
      live = search_store.open_index(out_dir).live
  unreadable = {**plan.unreadable, **out.bad}
  for w in out.written:
    for p in w.paths + w.files:
      if p not in out.bad:
        unreadable.pop(p, None)
  result = {'files': len(files), 'embedded': counts['rows'], 'unchanged': plan.unchanged, 'removed': plan.removed,
            'unreadable': [{'path': u['path'], 'error': u['error']} for u in sorted(
                (unreadable[p] for p in unreadable if search_update.under(p, root)), key=lambda u: u['path'])],
            'new_unreadable': [{'path': p, 'error': u['error']} for p, u in sorted(out.bad.items())],
            'images': int(live), 'seconds': time.time() - t0, 'skipped_videos': plan.skipped_videos}
  if footage is not None:
    result.update(frames=counts['frames'], people=counts['people'], videos=counts['videos'])
  log(f'index {out_dir}: {live} rows; this run embedded {counts["rows"]}'
      + (f' ({counts["people"]} people in {counts["frames"]} frames)' if footage is not None else '')
      + (f' (this process; {nproc} processes)' if nproc > 1 else '')
      + f', kept {plan.unchanged} unchanged, removed {plan.removed}, {len(result["unreadable"])} unreadable '
      f'under {root} ({result["seconds"]:.1f}s)')
  return result


class _Writer:
  """This run's pending rows and the shards it wrote; `flush` writes a shard and (one process) the header."""

  def __init__(self, model, out_dir, plan, run, dtype, fingerprint, nproc, batch_size, log):
    self.model, self.out_dir, self.plan, self.run, self.batch_size = model, out_dir, plan, run, batch_size
    self.dtype, self.fingerprint, self.nproc, self.log = dtype, fingerprint, nproc, log
    self.rows: list[dict] = []
    self.embeddings: list[np.ndarray] = []
    self.written: list[search_update.Written] = []
    self.bad: dict[str, dict] = {}
    self.saved_at = time.time()

  def add(self, rows: list[dict], embeddings: np.ndarray) -> None:
    self.rows.extend(rows)
    self.embeddings.extend(embeddings)

  def flush(self, progress: Sequence[search_footage.Progress] = (), final: bool = False):
    """Writes the pending rows (and the progress of the files they belong to) as a shard; -> live rows when
    this process wrote the header."""
    if self.rows or progress:
      emb = np.stack(self.embeddings) if self.embeddings else np.zeros((0, self._dim()), np.float32)
      entry = search_store.write_shard(
          self.out_dir, f'{self.run}-{len(self.written):05d}', self.rows, emb, self.dtype, self.fingerprint,
          [p.to_json() for p in progress])
      self.written.append(search_update.Written(entry, [r['path'] for r in self.rows], [p.path for p in progress]))
      self.rows, self.embeddings = [], []
    self.saved_at = time.time()
    if self.nproc == 1 and (final or self.written):
      return search_update.commit(self.model, self.out_dir, self.plan, self.written, self.bad)
    return None

  def _dim(self) -> int:
    """D for a shard without rows (only progress: a stretch of video without people)."""
    d = search_update.dim(self.out_dir, self.plan.base + [w.entry for w in self.written])
    if not d:
      probe = np.zeros((1,) + tuple(self.model.image_size) + (3,), np.uint8)
      d = int(search_model.embed_images(self.model, probe, pad_to=self.batch_size).shape[1])
    return d

  def unreadable(self, path: str, error: str) -> None:
    size, mtime = self.plan.stats[path]
    self.bad[path] = {'path': path, 'size': size, 'mtime_ns': mtime, 'error': error}
    self.log(f'unreadable, skipped: {path} ({error})')


def _embed_crops(model, plan, mine, out: _Writer, batch_size, save_every, workers, log_every_s, log) -> dict:
  """Every file one person crop, decoded by `workers` threads while the previous batch is embedded."""
  embedded = 0
  todo = [t.path for t in mine]
  chunks = [todo[i:i + batch_size] for i in range(0, len(todo), batch_size)]
  t_embed = t_log = time.time()
  with concurrent.futures.ThreadPoolExecutor(workers) as decode, \
       concurrent.futures.ThreadPoolExecutor(1) as prefetch:
    load = lambda chunk: list(decode.map(lambda p: _try_load(p, model.image_size), chunk))
    future = prefetch.submit(load, chunks[0]) if chunks else None
    for ci, chunk in enumerate(chunks):
      loaded = future.result()
      if ci + 1 < len(chunks):  # decode the next batch while this one is embedded
        future = prefetch.submit(load, chunks[ci + 1])
      good = []
      for p, (img, err) in zip(chunk, loaded):
        if img is None:
          out.unreadable(p, err)
        else:
          good.append((p, img))
      if good:
        emb = search_model.embed_images(model, np.stack([img for _, img in good]), pad_to=batch_size)
        rows = []
        for p, _ in good:
          size, mtime = plan.stats[p]
          rows.append({'path': p, 'size': size, 'mtime_ns': mtime})
        out.add(rows, emb)
      embedded += len(good)
      done = sum(len(c) for c in chunks[:ci + 1])
      if time.time() - t_log >= log_every_s or ci + 1 == len(chunks):
        log(f'embedded {done}/{len(todo)} files ({done / max(time.time() - t_embed, 1e-9):.1f} files/s)')
        t_log = time.time()
      if len(out.rows) >= save_every and ci + 1 < len(chunks):
        out.flush()
  return {'rows': embedded}


def _embed_footage(model, plan, mine, out: _Writer, options, detector, batch_size, save_every, save_every_s,
                   log_every_s, log) -> dict:
  """The people of every file's frames: a thread decodes and detects (footage.scan) while this one embeds the
  crops; a shard is written every `save_every` rows or `save_every_s` seconds with the progress of its files."""
  counts = {'rows': 0, 'frames': 0, 'people': 0, 'videos': 0}
  key = options.key()
  events: queue.Queue = queue.Queue(maxsize=32)
  stop = threading.Event()

  def put(item):
    while not stop.is_set():
      try:
        events.put(item, timeout=0.2)
        return
      except queue.Full:
        continue

  def produce():
    try:
      for todo in mine:
        if stop.is_set():
          return
        try:
          for found in search_footage.scan(todo.path, options, detector, model.image_size, todo.after,
                                           todo.next_track):
            put(('frame', todo, found))
            if stop.is_set():
              return
        except (ValueError, OSError) as e:  # the file cannot be read (frames.VideoError is a ValueError)
          put(('error', todo, f'{type(e).__name__}: {e}'))
          continue
        put(('done', todo, None))
    except BaseException as e:  # pylint: disable=broad-except  (our bug: raised in the main thread)
      put(('crash', None, e))
    finally:
      put(('end', None, None))

  progress: dict[str, search_footage.Progress] = {}
  touched: set[str] = set()
  buffered: list[tuple[object, search_footage.Found]] = []  # frames whose crops are not embedded yet

  def embed_buffered():
    crops = [c for _, f in buffered for c in f.crops]
    rows = [r for _, f in buffered for r in f.rows]
    for a in range(0, len(crops), batch_size):
      out.add(rows[a:a + batch_size],
              search_model.embed_images(model, np.stack(crops[a:a + batch_size]), pad_to=batch_size))
    counts['rows'] += len(rows)
    for todo, f in buffered:
      p = progress[todo.path]
      p.rows += len(f.rows)
      p.until = f.time if f.time is not None else p.until
      p.next_track = max(p.next_track, f.next_track)
      touched.add(todo.path)
    buffered.clear()

  def save():
    embed_buffered()
    out.flush([progress[p] for p in sorted(touched) if p in progress])
    for p in [p for p in touched if p in progress and progress[p].until is None and p in finished]:
      del progress[p]
    touched.clear()

  finished: set[str] = set()
  thread = threading.Thread(target=produce, name='footage-scan', daemon=True)
  t_start = t_log = time.time()
  thread.start()
  files_done = 0
  try:
    while True:
      kind, todo, item = events.get()
      if kind == 'end':
        break
      if kind == 'crash':
        raise item
      if todo.path not in progress:
        size, mtime = plan.stats[todo.path]
        progress[todo.path] = search_footage.Progress(todo.path, size, mtime, key, todo.after, todo.rows,
                                                      todo.next_track)
      if kind == 'frame':
        size, mtime = plan.stats[todo.path]
        for r in item.rows:
          r.update(path=todo.path, size=size, mtime_ns=mtime)
        buffered.append((todo, item))
        counts['frames'] += 1
        counts['people'] += item.people
        if sum(len(f.crops) for _, f in buffered) >= batch_size:
          embed_buffered()
      elif kind == 'done':
        embed_buffered()
        progress[todo.path].until = None
        touched.add(todo.path)
        finished.add(todo.path)
        files_done += 1
        counts['videos'] += search_frames.is_video(todo.path)
      else:  # 'error': what it had is dropped (its rows go with it in the header)
        buffered[:] = [(t, f) for t, f in buffered if t.path != todo.path]
        embed_buffered()
        out.unreadable(todo.path, item)
        progress.pop(todo.path, None)
        touched.discard(todo.path)
        files_done += 1
      now = time.time()
      if now - t_log >= log_every_s:
        log(f'{files_done}/{len(mine)} files, {counts["frames"]} frames looked at, {counts["people"]} people, '
            f'{counts["rows"] + sum(len(f.rows) for _, f in buffered)} rows '
            f'({counts["frames"] / max(now - t_start, 1e-9):.1f} frames/s)')
        t_log = now
      if len(out.rows) >= save_every or (touched and now - out.saved_at >= save_every_s):
        save()
    save()
  finally:
    stop.set()
    thread.join(timeout=30)
  log(f'{files_done}/{len(mine)} files, {counts["frames"]} frames looked at, {counts["people"]} people, '
      f'{counts["rows"]} rows embedded ({time.time() - t_start:.1f}s)')
  return counts


def _commit_all(model, out_dir: str, plan, fingerprint: str) -> int:
  """Process 0, after every process wrote its shards: the header naming them all."""
  known = {b['name'] for b in plan.base} | set(plan.stale)
  names, _ = search_update.adoptable(out_dir, known, fingerprint)
  new = [search_update.written_shard(out_dir, name) for name in names]
  bad = {}
  d = search_store.shard_dir(out_dir)
  for name in paths.listdir(d) if paths.isdir(d) else []:
    if name.endswith('.unreadable.json'):
      for u in json.loads(paths.read_text(paths.join(d, name))):
        bad[u['path']] = u
      paths.remove(paths.join(d, name))
  return search_update.commit(model, out_dir, plan, new, bad)
