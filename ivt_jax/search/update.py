"""What an index update starts from and what it commits: which files are new, changed, gone, unreadable or
half-done (a video whose indexing was cut off), and the header that names the shards and drops the rows they
replace. ivt_jax/search/index.py embeds; this module keeps the books.

A file may own any number of rows: one for a crop, one per person found for a frame or a video (index
--detect), none for a frame without people. A file indexed with --detect is known as done, or as done until a
frame time, by the `footage.Progress` records each shard carries in its schema metadata ('files'), written
with the rows they account for: a killed run's finished shards carry their own progress, and the next run
resumes a video after its last recorded frame. A record holds only while its file keeps its size and mtime,
the settings are the same, and the file still has the rows the record counts.
"""
from __future__ import annotations

import dataclasses
import datetime
import os
from typing import Callable, Optional

import numpy as np

from ivt_jax.search import footage as search_footage
from ivt_jax.search import frames as search_frames
from ivt_jax.search import model as search_model
from ivt_jax.search import store as search_store

FILES_KEY = 'files'  # shard schema metadata: [Progress.to_json(), ...]


def check_identity(index: search_store.Index, model: search_model.LoadedModel) -> None:
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


def under(path: str, root: str) -> bool:
  return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def stat(path: str) -> tuple[int, int] | str:
  """(size, mtime_ns), or the reason the file cannot be looked at (a broken link, a link loop, ...)."""
  try:
    st = os.stat(path)
  except OSError as e:
    return f'{type(e).__name__}: {e.strerror or e}'
  return int(st.st_size), int(st.st_mtime_ns)


@dataclasses.dataclass
class Todo:
  """A file to embed; `after` set: a video resumed after that frame time (its `rows` rows kept)."""
  path: str
  after: Optional[float] = None
  rows: int = 0
  next_track: int = 0


@dataclasses.dataclass
class Plan:
  """What an update starts from (every process computes the same one from the same files)."""
  base: list[dict]                  # header entries of the shards kept, in row order
  base_rows: int                    # rows they number
  base_deleted: np.ndarray          # rows already deleted in them
  current: dict[str, list[int]]     # path -> its live rows in them
  deleted: set[int]                 # rows this update drops (files vanished, changed, no longer readable)
  unreadable: dict[str, dict]       # path -> {path, size, mtime_ns, error}
  todo: list[Todo]                  # files to embed (new, changed, or a video to resume)
  stats: dict[str, tuple[int, int]]
  roots: list[str]
  unchanged: int
  removed: int
  still_bad: int
  skipped_videos: int               # videos seen without --detect (their rows, if any, kept)
  stale: list[str]                  # shard names to remove after the next header (a rebuild's old shards)
  generation: int

  @property
  def resumed(self) -> set[str]:
    return {t.path for t in self.todo if t.after is not None}


def adoptable(out_dir: str, known: set, fingerprint: str) -> tuple[list[str], list[str]]:
  """(complete shards under shards/ not in the header that this model wrote: a killed run's work, adopted;
  the others: another model's, removed by process 0)."""
  good, bad = [], []
  for name in search_store.complete_shards(out_dir):
    if name in known:
      continue
    meta = search_store.shard_meta(out_dir, name)
    (good if meta and meta.get('fingerprint') == fingerprint else bad).append(name)
  return good, bad


def shard_progress(meta: Optional[dict]) -> list[search_footage.Progress]:
  return [search_footage.Progress.from_json(v) for v in (meta or {}).get(FILES_KEY, [])]


def make_plan(model, root: str, out_dir: str, files: list[str], rebuild: bool,
              footage: Optional[search_footage.FootageOptions], log: Callable[[str], None]) -> Plan:
  """The plan of an update of `root`'s `files` into out_dir (see the module docstring)."""
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
  if old is not None:
    base = [dict(name=s.name, rows=s.n, dtype=str(s.embeddings.dtype)) for s in old.shards]
    base_deleted = old.deleted
    unreadable = {u['path']: u for u in old.unreadable}
    roots = sorted(set(old.header.get('roots', [])) | {root})
    gen = int(old.header.get('generation', 0))
  adopted, _ = adoptable(out_dir, {b['name'] for b in base} | set(stale), fingerprint)
  if adopted:
    log(f'{len(adopted)} shard(s) of an interrupted run adopted')
  progress: dict[str, search_footage.Progress] = {}
  for b in base:
    if old is not None and old.version != search_store.VERSION:
      continue
    for p in shard_progress(search_store.shard_meta(out_dir, b['name'])):
      progress[p.path] = p
  for name in adopted:
    meta = search_store.shard_meta(out_dir, name)
    base.append({'name': name, 'rows': int(meta['rows']), 'dtype': meta['dtype']})
    for p in shard_progress(meta):
      progress[p.path] = p

  # path -> its live rows with the size and mtime they were made from, and whether a detector made them
  dead = set(base_deleted.tolist())
  rows_of: dict[str, list[tuple[int, int, int, bool]]] = {}
  row = 0
  columns = ('path', 'size', 'mtime_ns', 'source')
  for b in base:
    table = search_store.read_rows(out_dir, b['name'], columns)
    for p, size, mtime, source in zip(*(table.column(c).to_pylist() for c in columns)):
      if row not in dead:
        rows_of.setdefault(p, []).append((row, size, mtime, source is not None))
      row += 1
  deleted: set[int] = set()
  present = set(files)
  removed = [p for p in rows_of if under(p, root) and p not in present]
  for p in removed:
    deleted.update(r[0] for r in rows_of.pop(p))
  for p in [p for p in unreadable if under(p, root) and p not in present]:
    del unreadable[p]

  key = footage.key() if footage else ''
  current: dict[str, list[int]] = {p: [r[0] for r in rs] for p, rs in rows_of.items()}
  todo, stats, unchanged, still_bad, skipped = [], {}, 0, 0, 0
  for p in files:
    st = stat(p)
    if isinstance(st, str):
      unreadable[p] = {'path': p, 'size': -1, 'mtime_ns': -1, 'error': st}
      deleted.update(current.pop(p, []))
      continue
    stats[p] = st
    rs = rows_of.get(p, [])
    if footage is None and search_frames.is_video(p):
      skipped += 1  # kept as they are while they do not change (a crop index does not look into videos)
      stale_rows = [r[0] for r in rs if (r[1], r[2]) != st]
      deleted.update(stale_rows)
      current[p] = [r for r in current.get(p, []) if r not in stale_rows]
      continue
    if p in unreadable and (unreadable[p]['size'], unreadable[p]['mtime_ns']) == st:
      still_bad += 1
      continue
    if footage is None:
      crops = [r[0] for r in rs if (r[1], r[2]) == st and not r[3]]
      if crops:  # the newest crop row of this version stays; any other row of the path goes
        unchanged += 1
        deleted.update(r[0] for r in rs if r[0] != crops[-1])
        current[p] = [crops[-1]]
      else:
        todo.append(Todo(p))  # a changed file's old rows are dropped when its new ones are written
      continue
    kept = [r[0] for r in rs if (r[1], r[2]) == st and r[3]]
    rec = progress.get(p)
    if rec is not None and (rec.size, rec.mtime_ns) == st and rec.key == key and rec.rows == len(kept):
      deleted.update(r[0] for r in rs if r[0] not in kept)
      current[p] = kept
      if rec.until is None:
        unchanged += 1
      else:
        todo.append(Todo(p, rec.until, rec.rows, rec.next_track))
    else:
      todo.append(Todo(p))
  return Plan(base, sum(b['rows'] for b in base), base_deleted, current, deleted, unreadable, todo, stats,
              roots, unchanged, len(removed), still_bad, skipped, stale, gen)


def header(model, plan: Plan, shards: list[dict], dim: int, live: int, unreadable: int) -> dict:
  return {
      'identity': model.identity, 'generation': plan.generation,
      'model': {'checkpoint': model.checkpoint, 'checkpoint_step': model.meta.get('step'),
                'config': model.config.to_dict(),
                'tokenizer': {'kind': model.tokenizer.kind, 'path': model.tokenizer.path,
                              'identity': model.tokenizer.identity()}},
      'preprocess': {'image_size': list(model.image_size), 'resize': 'bilinear (input_pipeline.augment.'
                     'eval_image, as the evaluation gallery; people in frames: ivt_jax.search.frames.person_crop)'},
      'roots': plan.roots, 'dim': int(dim), 'shards': shards,
      'stats': {'images': int(live), 'dim': int(dim), 'unreadable': int(unreadable),
                'updated': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')},
  }


@dataclasses.dataclass
class Written:
  """A shard this run wrote: its header entry, its rows' paths, and the files it accounts for."""
  entry: dict
  paths: list[str]
  files: list[str]


def commit(model, out_dir: str, plan: Plan, new: list[Written], bad: dict[str, dict]) -> int:
  """Writes the header naming the plan's shards and the new ones, with the rows they replace dropped; -> live
  rows. `bad`: files found unreadable in this run (their rows, this run's included, are dropped)."""
  deleted = set(plan.base_deleted.tolist()) | plan.deleted
  rows_of = {p: list(r) for p, r in plan.current.items()}
  resumed = plan.resumed
  started: set[str] = set()

  def start(p):  # the first sign of a file in this run's shards: its earlier rows go (unless resumed)
    if p not in started:
      started.add(p)
      if p not in resumed:
        deleted.update(rows_of.pop(p, []))

  row = plan.base_rows
  for w in new:
    for p in w.paths:
      start(p)
      rows_of.setdefault(p, []).append(row)
      row += 1
    for p in w.files:
      start(p)
  unreadable = dict(plan.unreadable)
  for p in started:
    unreadable.pop(p, None)
  for p, u in bad.items():
    unreadable[p] = u
    deleted.update(rows_of.pop(p, []))
  shards = plan.base + [w.entry for w in new]
  dim_ = dim(out_dir, shards)
  search_store.write_header(out_dir, header(model, plan, shards, dim_, row - len(deleted), len(unreadable)),
                            np.asarray(sorted(deleted), np.int64), [unreadable[p] for p in sorted(unreadable)])
  plan.generation += 1
  if plan.stale:
    search_store.remove_shards(out_dir, plan.stale)
    plan.stale = []
  return row - len(deleted)


def dim(out_dir: str, shards: list[dict]) -> int:
  for s in shards:
    meta = search_store.shard_meta(out_dir, s['name'])
    if meta:
      return int(meta['dim'])
  return 0


def written_shard(out_dir: str, name: str) -> Written:
  """A shard on disk (another process's, or adopted) as `commit` takes it."""
  meta = search_store.shard_meta(out_dir, name)
  table = search_store.read_rows(out_dir, name, ['path'])
  return Written({'name': name, 'rows': int(meta['rows']), 'dtype': meta['dtype']},
                 table.column('path').to_pylist(), [p.path for p in shard_progress(meta)])
