"""The image index of a folder: listing and loading images, building and updating the index incrementally
(new or changed files embedded, vanished ones dropped, unreadable ones listed), saving it atomically and
loading it back, checked against the model that queries it."""
from __future__ import annotations

import concurrent.futures
import dataclasses
import datetime
import functools
import io
import json
import os
import time
import uuid
from typing import Callable, Optional, Sequence

import numpy as np

from input_pipeline import paths
from ivt_jax.search import model as search_model


IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.webp')
MANIFEST = 'manifest.json'
INDEX_FORMAT = 'ivt-jax-image-index'
INDEX_VERSION = 1


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


@dataclasses.dataclass
class Index:
  """A loaded index: its directory, manifest and (N, D) embeddings, row i for manifest['entries'][i]."""
  directory: str
  manifest: dict
  embeddings: np.ndarray

  @functools.cached_property
  def paths(self) -> list[str]:
    """Every row's file, built once per loaded index."""
    return [e['path'] for e in self.manifest['entries']]

  def path(self, row: int) -> str:
    """Row `row`'s file (no list built)."""
    return self.manifest['entries'][row]['path']


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
  """Reads INDEX/manifest.json and its embeddings; checks they agree."""
  directory = paths.resolve(directory, 'index directory')
  path = paths.join(directory, MANIFEST)
  if not paths.isfile(path):
    raise FileNotFoundError(f'{directory} is not an index (no {MANIFEST}); build one with '
                            '`python -m ivt_jax.search index`')
  manifest = json.loads(paths.read_text(path))
  if manifest.get('format') != INDEX_FORMAT or manifest.get('version') != INDEX_VERSION:
    raise ValueError(f'{path}: not an {INDEX_FORMAT} version {INDEX_VERSION} manifest '
                     f'(format {manifest.get("format")!r}, version {manifest.get("version")!r})')
  emb_path = paths.join(directory, manifest['embeddings'])
  embeddings = np.load(io.BytesIO(paths.read_bytes(emb_path))) if paths.is_remote(emb_path) else np.load(emb_path)
  if embeddings.ndim != 2 or len(embeddings) != len(manifest['entries']):
    raise ValueError(f'{emb_path} holds {embeddings.shape} embeddings for {len(manifest["entries"])} '
                     f'entries in {path}: rebuild the index (index --rebuild)')
  return Index(directory, manifest, embeddings)


def model_for_index(index: Index, checkpoint: str = '', config: Optional[str] = None, tokenizer: str = '',
                    tokenizer_kind: str = '') -> search_model.LoadedModel:
  """The model to query `index` with: the checkpoint (default: the one that built it), the config file and the
  tokenizer given, else those saved in the index when they are still there."""
  saved = index.manifest['model']
  loaded_config = search_model.load_config_file(config) if config else None
  if not tokenizer and not config and os.path.isfile(saved['tokenizer'].get('path', '')):
    tokenizer = saved['tokenizer']['path']
  return search_model.load_model(checkpoint or saved['checkpoint'], loaded_config, tokenizer,
                                 tokenizer_kind or (saved['tokenizer']['kind'] if tokenizer else ''),
                                 fallback_config=saved['config'])


def check_identity(index: Index, model: search_model.LoadedModel) -> None:
  """Raises IdentityMismatchError (naming what differs) unless the index was built by this model."""
  want, got = index.manifest['identity'], model.identity
  if want.get('fingerprint') == got['fingerprint']:
    return
  parts = {'params': 'parameters', 'model_config': 'model config', 'tokenizer': 'tokenizer'}
  diffs = [f'{name} {want.get(k)} (index) vs {got[k]} (model)' for k, name in parts.items()
           if want.get(k) != got[k]]
  built = index.manifest.get('model', {}).get('checkpoint', '?')
  raise search_model.IdentityMismatchError(
      f'index {index.directory} was built by another model or tokenizer (built from {built}; given '
      f'{model.checkpoint}): {"; ".join(diffs) or "fingerprint differs"}. Query it with the model that built '
      'it, or rebuild it with `index --rebuild`.')


def _save_index(directory: str, manifest: dict, embeddings: np.ndarray) -> None:
  """Writes embeddings-<id>.npy, then the manifest naming it (atomic replace), then drops the old file."""
  paths.makedirs(directory)
  old = None
  try:
    old = json.loads(paths.read_text(paths.join(directory, MANIFEST))).get('embeddings')
  except (OSError, ValueError):
    pass
  name = f'embeddings-{uuid.uuid4().hex[:8]}.npy'
  buf = io.BytesIO()
  np.save(buf, np.asarray(embeddings, np.float32))
  paths.write_bytes_atomic(paths.join(directory, name), buf.getvalue())
  manifest = dict(manifest, embeddings=name)
  paths.write_text_atomic(paths.join(directory, MANIFEST), json.dumps(manifest, indent=1))
  if old and old != name and paths.isfile(paths.join(directory, old)):
    paths.remove(paths.join(directory, old))


def _under(path: str, root: str) -> bool:
  return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def build_index(model: search_model.LoadedModel, images_dir: str, out_dir: str, *, batch_size: int = 64,
                workers: Optional[int] = None, rebuild: bool = False, save_every: int = 5000,
                log_every_s: float = 2.0, log: Callable[[str], None] = print) -> dict:
  """Indexes (or updates the index of) a folder; returns the run's statistics.

  Args:
    model: from `load_model`.
    images_dir: the folder (recursive).
    out_dir: the index directory (created; an index from another model there is refused unless `rebuild`).
    batch_size: images per embedding call (rounded up to a multiple of the device count).
    workers: threads decoding images (default: min(8, CPUs)).
    rebuild: start from an empty index.
    save_every: also save after about this many newly embedded images (an interrupted run resumes there).
    log_every_s: seconds between progress lines.
    log: where progress lines go.
  Returns:
    dict(files, embedded, unchanged, removed, unreadable (list of {path, error}), images (rows in the index),
    seconds).
  """
  t0 = time.time()
  root = paths.local(images_dir, 'image folder')
  out_dir = paths.resolve(out_dir, 'index directory')
  files = list_images(root)
  batch_size = search_model.round_up(max(1, int(batch_size)), model.mesh.size)
  rows: dict[str, tuple[dict, np.ndarray]] = {}
  unreadable: dict[str, dict] = {}
  roots = [root]
  if not rebuild and paths.isfile(paths.join(out_dir, MANIFEST)):
    old = load_index(out_dir)
    check_identity(old, model)
    rows = {e['path']: (e, old.embeddings[i]) for i, e in enumerate(old.manifest['entries'])}
    unreadable = {u['path']: u for u in old.manifest.get('unreadable', [])}
    roots = sorted(set(old.manifest.get('roots', [])) | {root})
  present = set(files)
  removed = [p for p in rows if _under(p, root) and p not in present]
  for p in removed:
    del rows[p]
  for p in [p for p in unreadable if _under(p, root) and p not in present]:
    del unreadable[p]

  todo, unchanged, still_bad = [], 0, 0
  stats: dict[str, tuple[int, int]] = {}
  for p in files:
    st = _stat(p)
    if isinstance(st, str):
      unreadable[p] = {'path': p, 'size': -1, 'mtime_ns': -1, 'error': st}
      rows.pop(p, None)
      continue
    stats[p] = st
    if p in rows and (rows[p][0]['size'], rows[p][0]['mtime_ns']) == st:
      unchanged += 1
    elif p in unreadable and (unreadable[p]['size'], unreadable[p]['mtime_ns']) == st:
      still_bad += 1
    else:
      todo.append(p)
  log(f'{len(files)} image files under {root}: {len(todo)} to embed, {unchanged} unchanged, '
      f'{len(removed)} removed, {still_bad} unreadable and unchanged')

  identity = model.identity
  def save():
    paths = sorted(rows)
    emb = np.stack([rows[p][1] for p in paths]) if paths else np.zeros((0, 0), np.float32)
    manifest = {
        'format': INDEX_FORMAT, 'version': INDEX_VERSION, 'identity': identity,
        'model': {'checkpoint': model.checkpoint, 'checkpoint_step': model.meta.get('step'),
                  'config': model.config.to_dict(),
                  'tokenizer': {'kind': model.tokenizer.kind, 'path': model.tokenizer.path,
                                'identity': model.tokenizer.identity()}},
        'preprocess': {'image_size': list(model.image_size), 'resize': 'bilinear (input_pipeline.augment.'
                       'eval_image, as the evaluation gallery)'},
        'roots': roots,
        'entries': [rows[p][0] for p in paths],
        'unreadable': [unreadable[p] for p in sorted(unreadable)],
        'stats': {'images': len(paths), 'dim': int(emb.shape[1]) if paths else 0,
                  'unreadable': len(unreadable),
                  'updated': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')},
    }
    _save_index(out_dir, manifest, emb)

  embedded, new_bad, since_save = 0, [], 0
  workers = workers or max(1, min(8, os.cpu_count() or 1))
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
        size, mtime = stats[p]
        if img is None:
          rows.pop(p, None)
          unreadable[p] = {'path': p, 'size': size, 'mtime_ns': mtime, 'error': err}
          new_bad.append({'path': p, 'error': err})
          log(f'unreadable, skipped: {p} ({err})')
        else:
          unreadable.pop(p, None)
          good.append((p, img))
      if good:
        emb = search_model.embed_images(model, np.stack([img for _, img in good]), pad_to=batch_size)
        for (p, _), e in zip(good, emb):
          size, mtime = stats[p]
          rows[p] = ({'path': p, 'size': size, 'mtime_ns': mtime}, e)
      embedded += len(good)
      since_save += len(good)
      done = sum(len(c) for c in chunks[:ci + 1])
      if time.time() - t_log >= log_every_s or ci + 1 == len(chunks):
        log(f'embedded {done}/{len(todo)} files ({done / max(time.time() - t_embed, 1e-9):.1f} files/s)')
        t_log = time.time()
      if since_save >= save_every and ci + 1 < len(chunks):
        save()
        since_save = 0
  save()
  result = {'files': len(files), 'embedded': embedded, 'unchanged': unchanged, 'removed': len(removed),
            'unreadable': [{'path': u['path'], 'error': u['error']} for u in sorted(
                (unreadable[p] for p in unreadable if _under(p, root)), key=lambda u: u['path'])],
            'new_unreadable': new_bad, 'images': len(rows), 'seconds': time.time() - t0}
  log(f'index {out_dir}: {len(rows)} images; this run embedded {embedded}, kept {unchanged} unchanged, '
      f'removed {len(removed)}, {len(result["unreadable"])} unreadable under {root} ({result["seconds"]:.1f}s)')
  return result
