"""A trained model for search: loaded from a workdir, best/ or converted checkpoint with its config and tokenizer,
its identity (a fingerprint of parameters, model config and tokenizer), and embedding images and texts with it."""
from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import os
import sys
from typing import Any, Optional, Sequence

import jax
import ml_collections
import numpy as np

from input_pipeline import paths


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
  path = paths.local(path, 'config file')
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
  return [paths.join(path, 'best'), path, paths.join(path, 'checkpoints')]


def read_checkpoint_meta(checkpoint: str) -> dict:
  """The JSON meta saved with the parameters `checkpoints.restore_params` would restore ({} if none).

  Returns the meta with 'directory' and 'step' added.
  """
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  path = paths.resolve(checkpoint, 'checkpoint')
  if not paths.isdir(path):
    raise FileNotFoundError(f'checkpoint directory {path} does not exist')
  for directory in _checkpoint_dirs(path):
    if not paths.isdir(directory):
      continue
    steps = ocp.utils.checkpoint_steps(directory)
    if not steps:
      continue
    step = max(steps)
    items = set(paths.listdir(paths.join(directory, str(step))))
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
  path = paths.resolve(checkpoint, 'checkpoint')  # absolute, or a URL: no trailing separator either way
  out = [path]
  if os.path.basename(path) in ('best', 'checkpoints'):
    out.append(paths.dirname(path))
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
  if kind == 'clip':
    vocab = os.path.abspath(os.path.expanduser(config.data.vocab_file)) if config.data.vocab_file else ''
    return tokenizers_lib.load_tokenizer(kind, vocab)  # '' = the open_clip package's copy
  if kind == 'wordpiece':
    vocab = os.path.abspath(os.path.expanduser(config.data.vocab_file)) if config.data.vocab_file else ''
    if not vocab or not os.path.isfile(vocab):
      raise FileNotFoundError(f'the checkpoint uses WordPiece, but data.vocab_file={config.data.vocab_file!r} '
                              'is not a file: pass --tokenizer=PATH/vocab.txt --tokenizer_kind=wordpiece')
    return tokenizers_lib.load_tokenizer(kind, vocab)
  from input_pipeline import prepare as prepare_lib  # pylint: disable=g-import-not-at-top (imports tfds)
  looked = []
  for workdir in _workdir_candidates(checkpoint):
    marker = paths.join(prepare_lib.data_dir_of(config, workdir), config.data.name, prepare_lib.MARKER_FILE)
    looked.append(marker)
    tok_path = prepare_lib.tokenizer_of_marker(config, marker)
    if tok_path and os.path.isfile(tok_path):
      return tokenizers_lib.load_tokenizer(kind, tok_path)
    if tok_path:
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
  """This process's devices on the batch axis (under jax.distributed each process embeds on its own); the
  training's fsdp size when it divides their count."""
  config = ml_collections.ConfigDict(config.to_dict())
  fsdp = int(config.mesh.fsdp)
  config.mesh.fsdp = fsdp if fsdp >= 1 and jax.local_device_count() % fsdp == 0 else 1
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
  from ivt_jax.training import checkpoints  # pylint: disable=g-import-not-at-top
  from ivt_jax.evaluation import evaluate as evaluate_lib  # pylint: disable=g-import-not-at-top
  from ivt_jax.models import heads  # pylint: disable=g-import-not-at-top
  from ivt_jax.models import encoder as model_lib  # pylint: disable=g-import-not-at-top
  from ivt_jax.runtime import sharding as sharding_lib  # pylint: disable=g-import-not-at-top
  checkpoint = paths.resolve(checkpoint, 'checkpoint')
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
  mesh = sharding_lib.make_mesh(config, jax.local_devices())
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


def round_up(n: int, m: int) -> int:
  return -(-n // m) * m


def embed_images(model: LoadedModel, images: np.ndarray, pad_to: int = 0) -> np.ndarray:
  """uint8 (N, H, W, 3) -> float32 (N, D) L2-normalized, in one call.

  The batch is zero-padded to max(N, pad_to) rounded up to the device count (one compiled shape for every
  batch of an index run) and sharded over the mesh; the padding rows are dropped.
  """
  from ivt_jax.runtime import sharding as sharding_lib  # pylint: disable=g-import-not-at-top
  n = len(images)
  full = _padded(np.asarray(images, np.uint8), round_up(max(n, pad_to, 1), model.mesh.size))
  glob = sharding_lib.global_batch({'images': full}, model.mesh)
  return _host(model.embedder.images(model.params, glob['images']))[:n].astype(np.float32)


def embed_texts(model: LoadedModel, texts: Sequence[str]) -> np.ndarray:
  """Q texts -> float32 (Q, D) L2-normalized (tokenized to data.text_length)."""
  from ivt_jax.runtime import sharding as sharding_lib  # pylint: disable=g-import-not-at-top
  ids, mask = model.tokenizer.encode(list(texts), int(model.config.data.text_length))
  n = round_up(max(len(ids), 1), model.mesh.size)
  glob = sharding_lib.global_batch({'ids': _padded(ids, n), 'mask': _padded(mask, n)}, model.mesh)
  return _host(model.embedder.texts(model.params, glob['ids'], glob['mask']))[:len(texts)].astype(np.float32)
