"""Search a folder of images by text with a trained model.

  python -m ivt_jax.search index --checkpoint=DIR --images=FOLDER --out=INDEX [--batch=64]
  python -m ivt_jax.search query --index=INDEX "a man in a grey hoodie with a black backpack" [--top=10]
      [--sheet=results.png]

`index` embeds every image under FOLDER (recursively; .jpg .jpeg .png .webp, any case) in batches sharded
over all local devices, preprocessed exactly as the evaluation gallery (`augment.eval_image`: a bilinear
resize to data.image_size). Re-running it embeds only the files that are new or whose size or modification
time changed, drops the rows of files that disappeared from FOLDER, and keeps rows of files under other
folders indexed into the same INDEX. Files that cannot be read or decoded are listed and skipped (and not
retried until they change).

`query` embeds the text with the model that built the index and prints the files ranked by score;
--sheet writes a PNG contact sheet of the results.

DIR is what `ivt_jax.evaluate` accepts: a training workdir (its best-by-validation parameters, else the
latest state), a best/ directory, or a converted checkpoint. The config and the tokenizer come from the
checkpoint's saved meta (the training program saves 'config' and the tokenizer 'identity'): the tokenizer
file is found through the prepared data of that config (<data.data_dir or workdir/tfds>/<name>/prepared.json)
or data.vocab_file for WordPiece. --config=FILE and --tokenizer=PATH --tokenizer_kind=KIND override them
(for a checkpoint saved without a config, or a vocabulary that moved). `query` uses the checkpoint and
tokenizer recorded in the index unless --checkpoint / --tokenizer are given.

INDEX is a directory:
  manifest.json           format, version, the model identity, the model's config, tokenizer, checkpoint,
                          the indexed roots, 'entries' [{path, size, mtime_ns}] (row i of the embeddings),
                          'unreadable' [{path, size, mtime_ns, error}], 'stats' {images, dim, unreadable,
                          updated}
  embeddings-<id>.npy     float32 (N, D) image embeddings (`evaluate.Embedder.images`: L2-normalized CLS
                          vectors, or the part head's composite vectors), named by the manifest (written
                          before the manifest, so an interrupted run leaves the last good index)

A query's score is the plain dot product of its text embedding with each row, as in evaluation.

The model identity is a fingerprint of the parameters, of config.model (without the execution-only keys
'attention' and 'remat') with data.image_size (and config.part for the part head), and of the tokenizer's
identity(); `index` and `query` refuse an index whose identity differs from their model's, naming the parts
that differ.

Runs in one process, on all its local devices.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import datetime
import hashlib
import importlib.util
import json
import os
import sys
import time
import uuid
from typing import Any, Callable, Optional, Sequence

import jax
import ml_collections
import numpy as np

from ivt_jax import tools

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.webp')
MANIFEST = 'manifest.json'
INDEX_FORMAT = 'ivt-jax-image-index'
INDEX_VERSION = 1
# Keys of config.model that choose how, not what, is computed: left out of the identity.
EXECUTION_ONLY_MODEL_KEYS = ('attention', 'remat')


class IdentityMismatchError(ValueError):
  """An index made by another model or tokenizer than the one given."""


# ---- model --------------------------------------------------------------------------------------


@dataclasses.dataclass
class LoadedModel:
  """A restored model ready to embed: config (model.vocab_size from the tokenizer), tokenizer, module, mesh,
  parameters, the batch-sharded embedder, the checkpoint it came from and its identity."""
  config: ml_collections.ConfigDict
  tokenizer: Any
  encoder: Any
  mesh: jax.sharding.Mesh
  params: Any
  embedder: Any
  checkpoint: str
  meta: dict
  identity: dict

  @property
  def image_size(self) -> tuple[int, int]:
    return tuple(int(s) for s in self.config.data.image_size)


def load_config_file(path: str) -> ml_collections.ConfigDict:
  """get_config() of a config file (configs/*.py)."""
  path = os.path.abspath(os.path.expanduser(path))
  if not os.path.isfile(path):
    raise FileNotFoundError(f'config file {path} does not exist')
  spec = importlib.util.spec_from_file_location(f'_ivt_search_config_{abs(hash(path))}', path)
  module = importlib.util.module_from_spec(spec)
  root = os.path.dirname(os.path.dirname(path))
  added = root not in sys.path
  if added:  # configs import `from configs import base`
    sys.path.insert(0, root)
  try:
    spec.loader.exec_module(module)
  finally:
    if added:
      sys.path.remove(root)
  if not hasattr(module, 'get_config'):
    raise ValueError(f'config file {path} has no get_config()')
  return module.get_config()


def _checkpoint_dirs(path: str) -> list[str]:
  """Where restore_params looks, in its order: best/, the directory itself, checkpoints/."""
  return [os.path.join(path, 'best'), path, os.path.join(path, 'checkpoints')]


def read_checkpoint_meta(checkpoint: str) -> dict:
  """The JSON meta saved with the parameters `checkpoints.restore_params` would restore ({} if none).

  Returns the meta with 'directory' and 'step' added.
  """
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  path = os.path.abspath(os.path.expanduser(checkpoint))
  if not os.path.isdir(path):
    raise FileNotFoundError(f'checkpoint directory {path} does not exist')
  for directory in _checkpoint_dirs(path):
    if not os.path.isdir(directory):
      continue
    steps = ocp.utils.checkpoint_steps(directory)
    if not steps:
      continue
    step = max(steps)
    items = set(os.listdir(os.path.join(directory, str(step))))
    if not items & {'params', 'state'}:
      continue
    meta = {}
    if 'meta' in items:
      manager = ocp.CheckpointManager(directory, item_handlers={'meta': ocp.JsonCheckpointHandler()})
      meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta or {}
      manager.close()
    return dict(meta, directory=directory, step=int(step))
  raise FileNotFoundError(f'no Orbax checkpoint with parameters under {path} (looked in '
                          f'{", ".join(_checkpoint_dirs(path))})')


def _workdir_candidates(checkpoint: str) -> list[str]:
  path = os.path.abspath(os.path.expanduser(checkpoint)).rstrip(os.sep)
  out = [path]
  if os.path.basename(path) in ('best', 'checkpoints'):
    out.append(os.path.dirname(path))
  return out


def find_tokenizer(config: ml_collections.ConfigDict, checkpoint: str, path: str = '', kind: str = ''):
  """The tokenizer a checkpoint was trained with.

  Args:
    config: the model's config (data.tokenizer, data.vocab_file, data.data_dir, data.name).
    checkpoint: the checkpoint directory (a demo workdir holds its prepared data).
    path: an explicit tokenizer file (.model or vocab.txt); overrides the lookup.
    kind: 'sentencepiece' | 'wordpiece' (default: config.data.tokenizer).
  Raises:
    FileNotFoundError naming where it looked.
  """
  from input_pipeline import tokenizers as tokenizers_lib  # pylint: disable=g-import-not-at-top
  kind = kind or config.data.tokenizer
  if path:
    return tokenizers_lib.load_tokenizer(kind, os.path.abspath(os.path.expanduser(path)))
  if kind == 'wordpiece':
    vocab = os.path.abspath(os.path.expanduser(config.data.vocab_file)) if config.data.vocab_file else ''
    if not vocab or not os.path.isfile(vocab):
      raise FileNotFoundError(f'the checkpoint uses WordPiece, but data.vocab_file={config.data.vocab_file!r} '
                              'is not a file: pass --tokenizer=PATH/vocab.txt --tokenizer_kind=wordpiece')
    return tokenizers_lib.load_tokenizer(kind, vocab)
  from input_pipeline import prepare as prepare_lib  # pylint: disable=g-import-not-at-top (imports tfds)
  looked = []
  for workdir in _workdir_candidates(checkpoint):
    marker = os.path.join(prepare_lib.data_dir_of(config, workdir), config.data.name, prepare_lib.MARKER_FILE)
    looked.append(marker)
    try:
      with open(marker, encoding='utf-8') as f:
        tok_path = json.load(f)['prepared']['tokenizer_path']
    except (OSError, ValueError, KeyError, TypeError):
      continue
    if os.path.isfile(tok_path):
      return tokenizers_lib.load_tokenizer(kind, tok_path)
    looked.append(tok_path)
  raise FileNotFoundError(f'no {kind} tokenizer found for checkpoint {checkpoint} (looked in '
                          f'{", ".join(looked)}): pass --tokenizer=PATH --tokenizer_kind={kind}')


def params_fingerprint(params) -> str:
  """sha256 (16 hex) over every parameter's path, dtype, shape and bytes."""
  h = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      leaf = multihost_utils.process_allgather(leaf, tiled=True)
    arr = np.ascontiguousarray(np.asarray(jax.device_get(leaf)))
    h.update(f'{jax.tree_util.keystr(path)}|{arr.dtype}|{arr.shape}|'.encode())
    h.update(arr.tobytes())
  return h.hexdigest()[:16]


def model_identity(params, config: ml_collections.ConfigDict, tokenizer_identity: str) -> dict:
  """{'fingerprint', 'params', 'model_config', 'tokenizer'}: what decides the embeddings (module docstring)."""
  section = {k: v for k, v in config.model.to_dict().items() if k not in EXECUTION_ONLY_MODEL_KEYS}
  section['image_size'] = [int(s) for s in config.data.image_size]
  if config.model.get('head', 'ivt') == 'part' and 'part' in config:
    section['part'] = config.part.to_dict()
  cfg = hashlib.sha256(json.dumps(section, sort_keys=True, default=list).encode()).hexdigest()[:16]
  par = params_fingerprint(params)
  whole = hashlib.sha256(f'{par}|{cfg}|{tokenizer_identity}'.encode()).hexdigest()[:16]
  return {'fingerprint': whole, 'params': par, 'model_config': cfg, 'tokenizer': tokenizer_identity}


def _search_mesh_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """All local devices on the batch axis; the training's fsdp size when it divides the device count."""
  config = ml_collections.ConfigDict(config.to_dict())
  fsdp = int(config.mesh.fsdp)
  config.mesh.fsdp = fsdp if fsdp >= 1 and jax.device_count() % fsdp == 0 else 1
  config.mesh.data = -1
  return config


def load_model(checkpoint: str, config: Optional[ml_collections.ConfigDict] = None, tokenizer_path: str = '',
               tokenizer_kind: str = '', fallback_config: Optional[dict] = None) -> LoadedModel:
  """Restores a checkpoint for embedding.

  Args:
    checkpoint: a workdir, best/ or converted checkpoint directory.
    config: overrides the config saved in the checkpoint's meta.
    tokenizer_path, tokenizer_kind: override the tokenizer lookup (`find_tokenizer`).
    fallback_config: a config dict used when the checkpoint has none and `config` is None (an index's).
  Raises:
    ValueError when there is no config, or the tokenizer is not the one the checkpoint was trained with.
  """
  from ivt_jax import checkpoints  # pylint: disable=g-import-not-at-top
  from ivt_jax import evaluate as evaluate_lib  # pylint: disable=g-import-not-at-top
  from ivt_jax import heads  # pylint: disable=g-import-not-at-top
  from ivt_jax import model as model_lib  # pylint: disable=g-import-not-at-top
  from ivt_jax import sharding as sharding_lib  # pylint: disable=g-import-not-at-top
  checkpoint = os.path.abspath(os.path.expanduser(checkpoint))
  meta = read_checkpoint_meta(checkpoint)
  if config is None:
    saved = meta.get('config') or fallback_config
    if not saved:
      raise ValueError(f'checkpoint {meta["directory"]} step {meta["step"]} holds no saved config (meta '
                       "'config'): pass --config=configs/<the training config>.py")
    config = ml_collections.ConfigDict(saved)
  config = ml_collections.ConfigDict(config.to_dict())
  tokenizer = find_tokenizer(config, checkpoint, tokenizer_path, tokenizer_kind)
  trained_with = meta.get('tokenizer')
  if trained_with and tokenizer.identity() != trained_with:
    raise ValueError(f'tokenizer {tokenizer.path} is {tokenizer.identity()}, but checkpoint {checkpoint} '
                     f'was trained with {trained_with}: pass the tokenizer it was trained with')
  config.model.vocab_size = int(tokenizer.vocab_size)
  config = _search_mesh_config(config)
  encoder = heads.build(config)
  mesh = sharding_lib.make_mesh(config)
  abstract = jax.eval_shape(lambda: model_lib.init_module_params(encoder, jax.random.key(0)))
  shardings = sharding_lib.param_shardings(abstract, mesh)
  params, restored_meta = checkpoints.restore_params(checkpoint, abstract, shardings)
  if (restored_meta.get('directory'), restored_meta.get('step')) != (meta['directory'], meta['step']):
    raise RuntimeError(f'restored {restored_meta.get("directory")} step {restored_meta.get("step")}, but read '
                       f'the meta of {meta["directory"]} step {meta["step"]}')
  return LoadedModel(config=config, tokenizer=tokenizer, encoder=encoder, mesh=mesh, params=params,
                     embedder=evaluate_lib.Embedder(encoder, mesh, shardings), checkpoint=checkpoint,
                     meta=meta, identity=model_identity(params, config, tokenizer.identity()))


def _host(x: jax.Array) -> np.ndarray:
  if x.is_fully_addressable:
    return np.asarray(jax.device_get(x))
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _padded(x: np.ndarray, n: int) -> np.ndarray:
  if len(x) == n:
    return x
  return np.concatenate([x, np.zeros((n - len(x),) + x.shape[1:], x.dtype)])


def _round_up(n: int, m: int) -> int:
  return -(-n // m) * m


def embed_images(model: LoadedModel, images: np.ndarray, pad_to: int = 0) -> np.ndarray:
  """uint8 (N, H, W, 3) -> float32 (N, D) L2-normalized, in one call.

  The batch is zero-padded to max(N, pad_to) rounded up to the device count (one compiled shape for every
  batch of an index run) and sharded over the mesh; the padding rows are dropped.
  """
  from ivt_jax import sharding as sharding_lib  # pylint: disable=g-import-not-at-top
  n = len(images)
  full = _padded(np.asarray(images, np.uint8), _round_up(max(n, pad_to, 1), model.mesh.size))
  glob = sharding_lib.global_batch({'images': full}, model.mesh)
  return _host(model.embedder.images(model.params, glob['images']))[:n].astype(np.float32)


def embed_texts(model: LoadedModel, texts: Sequence[str]) -> np.ndarray:
  """Q texts -> float32 (Q, D) L2-normalized (tokenized to data.text_length)."""
  from ivt_jax import sharding as sharding_lib  # pylint: disable=g-import-not-at-top
  ids, mask = model.tokenizer.encode(list(texts), int(model.config.data.text_length))
  n = _round_up(max(len(ids), 1), model.mesh.size)
  glob = sharding_lib.global_batch({'ids': _padded(ids, n), 'mask': _padded(mask, n)}, model.mesh)
  return _host(model.embedder.texts(model.params, glob['ids'], glob['mask']))[:len(texts)].astype(np.float32)


# ---- files --------------------------------------------------------------------------------------


def list_images(folder: str) -> list[str]:
  """Absolute paths of the image files under folder (recursive, sorted)."""
  folder = os.path.abspath(os.path.expanduser(folder))
  if not os.path.isdir(folder):
    raise FileNotFoundError(f'image folder {folder} does not exist')
  out = []
  for root, dirs, files in os.walk(folder):
    dirs.sort()
    out.extend(os.path.join(root, f) for f in files if os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS)
  return sorted(out)


def load_image(path: str, image_size: Sequence[int]) -> np.ndarray:
  """A file -> uint8 (H, W, 3) as the evaluation gallery preprocesses it. Raises ValueError/OSError."""
  from input_pipeline import augment  # pylint: disable=g-import-not-at-top
  with open(path, 'rb') as f:
    data = f.read()
  return augment.eval_image(data, tuple(image_size), name=path)


def _try_load(path: str, image_size) -> tuple[Optional[np.ndarray], str]:
  try:
    return load_image(path, image_size), ''
  except Exception as e:  # pylint: disable=broad-except (any unreadable file is skipped, never fatal)
    return None, f'{type(e).__name__}: {e}'


def _stat(path: str) -> Optional[tuple[int, int]]:
  try:
    st = os.stat(path)
  except OSError:
    return None
  return int(st.st_size), int(st.st_mtime_ns)


# ---- index --------------------------------------------------------------------------------------


@dataclasses.dataclass
class Index:
  """A loaded index: its directory, manifest and (N, D) embeddings, row i for manifest['entries'][i]."""
  directory: str
  manifest: dict
  embeddings: np.ndarray

  @property
  def paths(self) -> list[str]:
    return [e['path'] for e in self.manifest['entries']]


def load_index(directory: str) -> Index:
  """Reads INDEX/manifest.json and its embeddings; checks they agree."""
  directory = os.path.abspath(os.path.expanduser(directory))
  path = os.path.join(directory, MANIFEST)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{directory} is not an index (no {MANIFEST}); build one with '
                            '`python -m ivt_jax.search index`')
  with open(path, encoding='utf-8') as f:
    manifest = json.load(f)
  if manifest.get('format') != INDEX_FORMAT or manifest.get('version') != INDEX_VERSION:
    raise ValueError(f'{path}: not an {INDEX_FORMAT} version {INDEX_VERSION} manifest '
                     f'(format {manifest.get("format")!r}, version {manifest.get("version")!r})')
  emb_path = os.path.join(directory, manifest['embeddings'])
  embeddings = np.load(emb_path)
  if embeddings.ndim != 2 or len(embeddings) != len(manifest['entries']):
    raise ValueError(f'{emb_path} holds {embeddings.shape} embeddings for {len(manifest["entries"])} '
                     f'entries in {path}: rebuild the index (index --rebuild)')
  return Index(directory, manifest, embeddings)


def check_identity(index: Index, model: LoadedModel) -> None:
  """Raises IdentityMismatchError (naming what differs) unless the index was built by this model."""
  want, got = index.manifest['identity'], model.identity
  if want.get('fingerprint') == got['fingerprint']:
    return
  parts = {'params': 'parameters', 'model_config': 'model config', 'tokenizer': 'tokenizer'}
  diffs = [f'{name} {want.get(k)} (index) vs {got[k]} (model)' for k, name in parts.items()
           if want.get(k) != got[k]]
  built = index.manifest.get('model', {}).get('checkpoint', '?')
  raise IdentityMismatchError(
      f'index {index.directory} was built by another model or tokenizer (built from {built}; given '
      f'{model.checkpoint}): {"; ".join(diffs) or "fingerprint differs"}. Query it with the model that built '
      'it, or rebuild it with `index --rebuild`.')


def _save_index(directory: str, manifest: dict, embeddings: np.ndarray) -> None:
  """Writes embeddings-<id>.npy, then the manifest naming it (atomic replace), then drops the old file."""
  os.makedirs(directory, exist_ok=True)
  old = None
  try:
    with open(os.path.join(directory, MANIFEST), encoding='utf-8') as f:
      old = json.load(f).get('embeddings')
  except (OSError, ValueError):
    pass
  name = f'embeddings-{uuid.uuid4().hex[:8]}.npy'
  tmp = os.path.join(directory, name + '.tmp')
  with open(tmp, 'wb') as f:
    np.save(f, np.asarray(embeddings, np.float32))
  os.replace(tmp, os.path.join(directory, name))
  manifest = dict(manifest, embeddings=name)
  tmp = os.path.join(directory, MANIFEST + '.tmp')
  with open(tmp, 'w', encoding='utf-8') as f:
    json.dump(manifest, f, indent=1)
  os.replace(tmp, os.path.join(directory, MANIFEST))
  if old and old != name and os.path.isfile(os.path.join(directory, old)):
    os.remove(os.path.join(directory, old))


def _under(path: str, root: str) -> bool:
  return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def build_index(model: LoadedModel, images_dir: str, out_dir: str, *, batch_size: int = 64,
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
  root = os.path.abspath(os.path.expanduser(images_dir))
  out_dir = os.path.abspath(os.path.expanduser(out_dir))
  files = list_images(root)
  batch_size = _round_up(max(1, int(batch_size)), model.mesh.size)
  rows: dict[str, tuple[dict, np.ndarray]] = {}
  unreadable: dict[str, dict] = {}
  roots = [root]
  if not rebuild and os.path.isfile(os.path.join(out_dir, MANIFEST)):
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
    if st is None:
      unreadable[p] = {'path': p, 'size': -1, 'mtime_ns': -1, 'error': 'OSError: cannot stat'}
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
        emb = embed_images(model, np.stack([img for _, img in good]), pad_to=batch_size)
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


def search(model: LoadedModel, index: Index, texts: Sequence[str],
           top: int = 10) -> list[list[tuple[str, float]]]:
  """Per text, the top files of the index by score (dot product of the embeddings; the cosine for the IVT
  head): [[(path, score), ...], ...] best first, ties in path order."""
  check_identity(index, model)
  if len(index.embeddings) == 0:
    return [[] for _ in texts]
  q = embed_texts(model, texts)
  scores = q @ index.embeddings.T  # (Q, N)
  k = min(int(top), scores.shape[1])
  out = []
  for row in scores:
    part = np.argpartition(-row, k - 1)[:k] if k < len(row) else np.arange(len(row))
    order = part[np.lexsort((part, -row[part]))]  # score descending, then row (path order)
    out.append([(index.paths[i], float(row[i])) for i in order])
  return out


def contact_sheet(results: Sequence[Sequence[tuple[str, float]]], texts: Sequence[str],
                  image_size: Sequence[int], height: int = 128):
  """A PIL contact sheet of `search` results (visualize.search_sheet), thumbnails at the model's aspect."""
  from ivt_jax import visualize  # pylint: disable=g-import-not-at-top
  h, w = image_size
  cell = (height, max(16, int(round(height * w / h))))
  images, scores, names = [], [], []
  for ranked in results:
    row = []
    for p, _ in ranked:
      try:
        with open(p, 'rb') as f:
          row.append(f.read())
      except OSError:
        row.append(None)
    images.append(row)
    scores.append([s for _, s in ranked])
    names.append([os.path.splitext(os.path.basename(p))[0] for p, _ in ranked])
  return visualize.search_sheet(list(texts), images, scores, names, cell=cell)


# ---- command line -------------------------------------------------------------------------------


def _add_model_flags(parser: argparse.ArgumentParser, required: bool) -> None:
  parser.add_argument('--checkpoint', required=required,
                      help='training workdir, best/ or converted checkpoint directory')
  parser.add_argument('--config', default='', help='config file overriding the checkpoint\'s saved config')
  parser.add_argument('--tokenizer', default='', help='tokenizer file (.model or vocab.txt)')
  parser.add_argument('--tokenizer_kind', default='', choices=('', 'sentencepiece', 'wordpiece'),
                      help='kind of --tokenizer (default: the config\'s data.tokenizer)')


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(prog='python -m ivt_jax.search', description=__doc__.split('\n')[0])
  sub = parser.add_subparsers(dest='command', required=True)
  p = sub.add_parser('index', help='embed every image in a folder into an index')
  _add_model_flags(p, required=True)
  p.add_argument('--images', required=True, help='folder of images (recursive: jpg, jpeg, png, webp)')
  p.add_argument('--out', required=True, help='index directory (created or updated)')
  p.add_argument('--batch', type=int, default=64, help='images per batch (rounded to the device count)')
  p.add_argument('--workers', type=int, default=0, help='image decoding threads (0: min(8, CPUs))')
  p.add_argument('--rebuild', action='store_true', help='discard an existing index in --out')
  q = sub.add_parser('query', help='rank the indexed images for text queries')
  q.add_argument('--index', required=True, help='index directory')
  q.add_argument('texts', nargs='+', help='query texts')
  q.add_argument('--top', type=int, default=10, help='results per query')
  q.add_argument('--sheet', default='', help='write a PNG contact sheet of the results here')
  _add_model_flags(q, required=False)
  args = parser.parse_args(argv)
  if args.command == 'index' and args.batch < 1:
    parser.error(f'--batch must be >= 1, got {args.batch}')
  if args.command == 'query' and args.top < 1:
    parser.error(f'--top must be >= 1, got {args.top}')
  return args


def _log(line: str) -> None:
  print(line, file=sys.stderr, flush=True)


def main(argv: Optional[Sequence[str]] = None) -> int:
  args = parse_args(argv)
  config = load_config_file(args.config) if args.config else None
  if args.command == 'index':
    model = load_model(args.checkpoint, config, args.tokenizer, args.tokenizer_kind)
    _log(f'model {model.checkpoint} (step {model.meta.get("step")}), identity {model.identity["fingerprint"]}, '
         f'{model.mesh.size} device(s)')
    result = build_index(model, args.images, args.out, batch_size=args.batch, workers=args.workers or None,
                         rebuild=args.rebuild, log=_log)
    for u in result['unreadable']:
      print(f'unreadable: {u["path"]} ({u["error"]})')
    print(f'{result["images"]} images indexed in {os.path.abspath(args.out)} ({result["embedded"]} embedded '
          f'now, {result["unchanged"]} unchanged, {result["removed"]} removed, {len(result["unreadable"])} '
          'unreadable)')
    return 0
  index = load_index(args.index)
  saved = index.manifest['model']
  tok_path = args.tokenizer
  if not tok_path and not args.config and os.path.isfile(saved['tokenizer'].get('path', '')):
    tok_path = saved['tokenizer']['path']
  model = load_model(args.checkpoint or saved['checkpoint'], config, tok_path,
                     args.tokenizer_kind or (saved['tokenizer']['kind'] if tok_path else ''),
                     fallback_config=saved['config'])
  results = search(model, index, args.texts, args.top)
  for text, ranked in zip(args.texts, results):
    print(f'query: {text}')
    for rank, (path, score) in enumerate(ranked, 1):
      print(f'{rank:4d}  {score:+.4f}  {path}')
  if args.sheet:
    from ivt_jax import visualize  # pylint: disable=g-import-not-at-top
    path = visualize.save_png(contact_sheet(results, args.texts, model.image_size), args.sheet)
    print(f'contact sheet: {path}')
  return 0


def cli(argv: Optional[Sequence[str]] = None) -> int:
  """`main` with bad input (missing files, another model's index, ...) reported as one line, status 2."""
  return tools.run_cli(main, argv)


if __name__ == '__main__':
  sys.exit(cli())
