"""The image index of a folder: listing and loading images, building and updating the index incrementally (new
or changed files embedded into new shards, vanished ones dropped, unreadable ones listed), in one process or
many, and loading it back, checked against the model that queries it. The files are ivt_jax/search/store.py's."""
from __future__ import annotations

import concurrent.futures
import dataclasses
import datetime
import json
import os
import time
from typing import Callable, Optional, Sequence

import numpy as np

from input_pipeline import paths
from ivt_jax.search import model as search_model
from ivt_jax.search import store as search_store


IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.webp')
HEADER = search_store.HEADER
Index = search_store.Index


def list_images(folder: str) -> list[str]:
  """Absolute paths of the image files under folder (recursive, sorted).

  Symbolic links to files are listed (and read if they resolve); links to folders are not followed, so a link
  loop cannot make the walk endless. A folder that cannot be listed is skipped.
  """
  folder = paths.local(folder, 'image folder')
  if not os.path.isdir(folder):
    raise FileNotFoundError(f'image folder {folder} does not exist')
  out = []
  for root, dirs, files in os.walk(folder):
    dirs.sort()
    out.extend(os.path.join(root, f) for f in files if os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS)
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


def _stat(path: str) -> tuple[int, int] | str:
  """(size, mtime_ns), or the reason the file cannot be looked at (a broken link, a link loop, ...)."""
  try:
    st = os.stat(path)
  except OSError as e:
    return f'{type(e).__name__}: {e.strerror or e}'
  return int(st.st_size), int(st.st_mtime_ns)


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


def check_identity(index: Index, model: search_model.LoadedModel) -> None:
  """Raises IdentityMismatchError (naming what differs) unless the index was built by this model."""
  want, got = index.header['identity'], model.identity
  if want.get('fingerprint') == got['fingerprint']:
    return
  parts = {'params': 'parameters', 'model_config': 'model config', 'tokenizer': 'tokenizer'}
  diffs = [f'{name} {want.get(k)} (index) vs {got[k]} (model)' for k, name in parts.items()
           if want.get(k) != got[k]]
  built = index.header.get('model', {}).get('checkpoint', '?')
  raise search_model.IdentityMismatchError(
      f'index {index.directory} was built by another model or tokenizer (built from {built}; given '
      f'{model.checkpoint}): {"; ".join(diffs) or "fingerprint differs"}. Query it with the model that built '
      'it, or rebuild it with `index --rebuild`.')


def _under(path: str, root: str) -> bool:
  return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _barrier(name: str, nproc: int) -> None:
  if nproc > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(f'ivt-jax-index-{name}')


@dataclasses.dataclass
class _Plan:
  """What an update starts from (every process computes the same one from the same files)."""
  base: list[dict]                  # header entries of the shards kept, in row order
  base_rows: int                    # rows they number
  base_deleted: np.ndarray          # rows already deleted in them
  current: dict[str, int]           # path -> its live row in them
  deleted: set[int]                 # rows this update drops (files vanished or no longer readable)
  unreadable: dict[str, dict]       # path -> {path, size, mtime_ns, error}
  todo: list[str]                   # files to embed (new or changed)
  stats: dict[str, tuple[int, int]]
  roots: list[str]
  unchanged: int
  removed: int
  still_bad: int
  stale: list[str]                  # shard names to remove after the next header (a rebuild's old shards)
  generation: int


def _adoptable(out_dir: str, known: set, fingerprint: str) -> tuple[list[str], list[str]]:
  """(complete shards under shards/ not in the header that this model wrote: a killed run's work, adopted;
  the others: another model's, removed by process 0)."""
  good, bad = [], []
  for name in search_store.complete_shards(out_dir):
    if name in known:
      continue
    meta = search_store.shard_meta(out_dir, name)
    (good if meta and meta.get('fingerprint') == fingerprint else bad).append(name)
  return good, bad


def _plan(model, root: str, out_dir: str, files: list[str], rebuild: bool, log) -> _Plan:
  fingerprint = model.identity['fingerprint']
  base, base_deleted, unreadable, roots, stale, gen = [], np.zeros((0,), np.int64), {}, [root], [], 0
  old = None
  if search_store.exists(out_dir):
    old = search_store.open_index(out_dir)
    if rebuild:
      stale = [s.name for s in old.shards] if old.version == search_store.VERSION else []
      gen = int(old.header.get('generation', 0))
      old = None
    else:
      check_identity(old, model)
  current: dict[str, int] = {}
  deleted: set[int] = set()
  if old is not None:
    base = [dict(name=s.name, rows=s.n, dtype=str(s.embeddings.dtype)) for s in old.shards]
    base_deleted = old.deleted
    unreadable = {u['path']: u for u in old.unreadable}
    roots = sorted(set(old.header.get('roots', [])) | {root})
    gen = int(old.header.get('generation', 0))
  adopted, _ = _adoptable(out_dir, {b['name'] for b in base} | set(stale), fingerprint)
  if adopted:
    log(f'{len(adopted)} shard(s) of an interrupted run adopted')
  for name in adopted:
    meta = search_store.shard_meta(out_dir, name)
    base.append({'name': name, 'rows': int(meta['rows']), 'dtype': meta['dtype']})
  # path -> its newest live row (a path written twice: the later row wins, the earlier is dropped), and the
  # stored size and mtime of that row, to see what changed
  dead = set(base_deleted.tolist())
  sizes: dict[str, tuple[int, int]] = {}
  row = 0
  for b in base:
    table = search_store.read_rows(out_dir, b['name'], ['path', 'size', 'mtime_ns'])
    for p, size, mtime in zip(*(table.column(c).to_pylist() for c in ('path', 'size', 'mtime_ns'))):
      if row not in dead:
        if p in current:
          deleted.add(current[p])
        current[p] = row
        sizes[p] = (size, mtime)
      row += 1
  present = set(files)
  removed = [p for p in current if _under(p, root) and p not in present]
  for p in removed:
    deleted.add(current.pop(p))
  for p in [p for p in unreadable if _under(p, root) and p not in present]:
    del unreadable[p]

  todo, stats, unchanged, still_bad = [], {}, 0, 0
  for p in files:
    st = _stat(p)
    if isinstance(st, str):
      unreadable[p] = {'path': p, 'size': -1, 'mtime_ns': -1, 'error': st}
      if p in current:
        deleted.add(current.pop(p))
      continue
    stats[p] = st
    if p in current and sizes.get(p) == st:
      unchanged += 1
    elif p in unreadable and (unreadable[p]['size'], unreadable[p]['mtime_ns']) == st:
      still_bad += 1
    else:
      todo.append(p)  # a changed file's old row is dropped when its new one is written
  return _Plan(base, sum(b['rows'] for b in base), base_deleted, current, deleted, unreadable, todo,
               stats, roots, unchanged, len(removed), still_bad, stale, gen)


def _header(model, plan: _Plan, shards: list[dict], dim: int, live: int, unreadable: int) -> dict:
  return {
      'identity': model.identity, 'generation': plan.generation,
      'model': {'checkpoint': model.checkpoint, 'checkpoint_step': model.meta.get('step'),
                'config': model.config.to_dict(),
                'tokenizer': {'kind': model.tokenizer.kind, 'path': model.tokenizer.path,
                              'identity': model.tokenizer.identity()}},
      'preprocess': {'image_size': list(model.image_size), 'resize': 'bilinear (input_pipeline.augment.'
                     'eval_image, as the evaluation gallery)'},
      'roots': plan.roots, 'dim': int(dim), 'shards': shards,
      'stats': {'images': int(live), 'dim': int(dim), 'unreadable': int(unreadable),
                'updated': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')},
  }


def _commit(model, out_dir: str, plan: _Plan, new: list[tuple[dict, list[str]]], bad: dict[str, dict]) -> int:
  """Writes the header naming the plan's shards and the new ones [(entry, their paths)], with the rows they
  replace dropped; -> live rows. `bad`: files found unreadable in this run."""
  deleted = set(plan.base_deleted.tolist()) | plan.deleted
  latest = dict(plan.current)
  row = plan.base_rows
  for _, ps in new:
    for p in ps:
      if p in latest:
        deleted.add(latest[p])
      latest[p] = row
      row += 1
  unreadable = dict(plan.unreadable)
  for _, ps in new:
    for p in ps:
      unreadable.pop(p, None)
  for p, u in bad.items():
    unreadable[p] = u
    if p in latest:
      deleted.add(latest.pop(p))
  shards = plan.base + [e for e, _ in new]
  dim = _dim(out_dir, shards)
  search_store.write_header(out_dir, _header(model, plan, shards, dim, row - len(deleted), len(unreadable)),
                            np.asarray(sorted(deleted), np.int64), [unreadable[p] for p in sorted(unreadable)])
  plan.generation += 1
  if plan.stale:
    search_store.remove_shards(out_dir, plan.stale)
    plan.stale = []
  return row - len(deleted)


def _dim(out_dir: str, shards: list[dict]) -> int:
  for s in shards:
    meta = search_store.shard_meta(out_dir, s['name'])
    if meta:
      return int(meta['dim'])
  return 0


def build_index(model: search_model.LoadedModel, images_dir: str, out_dir: str, *, batch_size: int = 64,
                workers: Optional[int] = None, rebuild: bool = False, save_every: int = 5000,
                dtype: str = 'float32', log_every_s: float = 2.0, log: Callable[[str], None] = print) -> dict:
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
    save_every: write a shard after about this many newly embedded images (a killed run loses at most the
      images since its last shard; the next run adopts the shards it finished).
    dtype: of the new shards' embeddings, 'float32' or 'float16'.
    log_every_s: seconds between progress lines.
    log: where progress lines go.
  Returns:
    dict(files, embedded, unchanged, removed, unreadable (list of {path, error}), images (rows in the index),
    seconds).
  """
  import jax  # pylint: disable=g-import-not-at-top
  t0 = time.time()
  if dtype not in search_store.DTYPES:
    raise ValueError(f'--dtype={dtype!r}: one of {", ".join(search_store.DTYPES)}')
  proc, nproc = jax.process_index(), jax.process_count()
  root = paths.local(images_dir, 'image folder')
  out_dir = paths.resolve(out_dir, 'index directory')
  files = list_images(root)
  batch_size = search_model.round_up(max(1, int(batch_size)), model.mesh.size)
  fingerprint = model.identity['fingerprint']
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
    _, foreign = _adoptable(out_dir, known, fingerprint)
    search_store.remove_shards(out_dir, foreign)
    keep = {n + ext for n in set(search_store.complete_shards(out_dir)) | known for ext in ('.npy', '.parquet')}
    d = search_store.shard_dir(out_dir)
    for name in paths.listdir(d) if paths.isdir(d) else []:  # half-written files of a killed run
      if name not in keep:
        paths.remove(paths.join(search_store.shard_dir(out_dir), name))
  _barrier('planned', nproc)
  plan = _plan(model, root, out_dir, files, rebuild, log)
  mine = plan.todo[proc::nproc]
  log(f'{len(files)} image files under {root}: {len(plan.todo)} to embed'
      + (f' ({len(mine)} by process {proc} of {nproc})' if nproc > 1 else '')
      + f', {plan.unchanged} unchanged, {plan.removed} removed, {plan.still_bad} unreadable and unchanged')

  run = f'{search_store.new_run_id()}-p{proc:03d}'
  written: list[tuple[dict, list[str]]] = []
  bad: dict[str, dict] = {}
  pending: list[tuple[dict, np.ndarray]] = []

  def flush():
    if pending:
      entry = search_store.write_shard(out_dir, f'{run}-{len(written):05d}', [r for r, _ in pending],
                                       np.stack([e for _, e in pending]), dtype, fingerprint)
      written.append((entry, [r['path'] for r, _ in pending]))
      pending.clear()
    if nproc == 1:
      return _commit(model, out_dir, plan, written, bad)
    return None

  embedded = 0
  workers = workers or max(1, min(8, os.cpu_count() or 1))
  chunks = [mine[i:i + batch_size] for i in range(0, len(mine), batch_size)]
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
        size, mtime = plan.stats[p]
        if img is None:
          bad[p] = {'path': p, 'size': size, 'mtime_ns': mtime, 'error': err}
          log(f'unreadable, skipped: {p} ({err})')
        else:
          good.append((p, img))
      if good:
        emb = search_model.embed_images(model, np.stack([img for _, img in good]), pad_to=batch_size)
        for (p, _), e in zip(good, emb):
          size, mtime = plan.stats[p]
          pending.append(({'path': p, 'size': size, 'mtime_ns': mtime}, e))
      embedded += len(good)
      done = sum(len(c) for c in chunks[:ci + 1])
      if time.time() - t_log >= log_every_s or ci + 1 == len(chunks):
        log(f'embedded {done}/{len(mine)} files ({done / max(time.time() - t_embed, 1e-9):.1f} files/s)')
        t_log = time.time()
      if len(pending) >= save_every and ci + 1 < len(chunks):
        flush()
  live = flush()
  if nproc > 1:  # each process's unreadable files beside its shards; process 0 gathers them into the header
    paths.write_text_atomic(paths.join(search_store.shard_dir(out_dir), f'{run}.unreadable.json'),
                            json.dumps(list(bad.values())))
    _barrier('embedded', nproc)
    if proc == 0:
      live = _commit_all(model, out_dir, plan, fingerprint)
    _barrier('committed', nproc)
    if proc != 0:
      live = search_store.open_index(out_dir).live
  unreadable = {**plan.unreadable, **bad}
  for _, ps in written:
    for p in ps:
      unreadable.pop(p, None)
  result = {'files': len(files), 'embedded': embedded, 'unchanged': plan.unchanged, 'removed': plan.removed,
            'unreadable': [{'path': u['path'], 'error': u['error']} for u in sorted(
                (unreadable[p] for p in unreadable if _under(p, root)), key=lambda u: u['path'])],
            'new_unreadable': [{'path': p, 'error': u['error']} for p, u in sorted(bad.items())],
            'images': int(live), 'seconds': time.time() - t0}
  log(f'index {out_dir}: {live} images; this run embedded {embedded}'
      + (f' (this process; {nproc} processes)' if nproc > 1 else '')
      + f', kept {plan.unchanged} unchanged, removed {plan.removed}, {len(result["unreadable"])} unreadable '
      f'under {root} ({result["seconds"]:.1f}s)')
  return result


def _commit_all(model, out_dir: str, plan: _Plan, fingerprint: str) -> int:
  """Process 0, after every process wrote its shards: the header naming them all."""
  known = {b['name'] for b in plan.base} | set(plan.stale)
  names, _ = _adoptable(out_dir, known, fingerprint)
  new = []
  for name in names:
    meta = search_store.shard_meta(out_dir, name)
    table = search_store.read_rows(out_dir, name, ['path'])
    new.append(({'name': name, 'rows': int(meta['rows']), 'dtype': meta['dtype']},
                table.column('path').to_pylist()))
  bad = {}
  d = search_store.shard_dir(out_dir)
  for name in paths.listdir(d) if paths.isdir(d) else []:
    if name.endswith('.unreadable.json'):
      for u in json.loads(paths.read_text(paths.join(d, name))):
        bad[u['path']] = u
      paths.remove(paths.join(d, name))
  return _commit(model, out_dir, plan, new, bad)
