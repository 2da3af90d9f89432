"""The jitted training step with the shardings of training, for a config and a batch size, compiled once per
process; the abstract shapes of a training batch (train.py compiles its step from them while it initializes);
and random batches of those shapes for the benchmarks and the export checks (nothing here reads data or files).
"""
import concurrent.futures
import functools
import time
from typing import Any, Optional, Sequence

import jax
import ml_collections
import numpy as np

from input_pipeline import shapes
from ivt_jax.models import heads
from ivt_jax.models import encoder as model_lib
from ivt_jax.models import packing as packing_lib
from ivt_jax.training import optim
from ivt_jax.runtime import sharding as sharding_lib
from ivt_jax.training import chunked
from ivt_jax.training import step as step_lib

def batch_shapes(config: ml_collections.ConfigDict, batch: int,
                 text_length: Optional[int] = None) -> dict[str, tuple[tuple[int, ...], Any]]:
  """{name: (shape, dtype)} of a global training batch of `batch` samples, as the input pipeline gives it
  (texts padded to `text_length`: one of `shapes.text_buckets`; default data.text_length)."""
  enc = model_lib.encoder_config(config)
  h, w = enc.image_size
  length = int(text_length or config.data.text_length)
  n_img = enc.num_image_tokens
  v = len(shapes.mla_levels(config))
  return {'images': ((batch, v, h, w, 3), np.uint8), 'text_ids': ((batch, v, length), np.int32),
          'text_mask': ((batch, v, length), np.int32), 'image_keep': ((batch, v, n_img), np.bool_),
          'text_keep': ((batch, v, length), np.bool_), 'person_id': ((batch,), np.int32)}


def abstract_batch(config: ml_collections.ConfigDict, batch: int, mesh: jax.sharding.Mesh,
                   text_length: Optional[int] = None) -> dict[str, jax.ShapeDtypeStruct]:
  """`batch_shapes` as abstract arrays with the batch sharding over `mesh`: what the step is lowered for."""
  batch_sharding = sharding_lib.batch_sharding(mesh)
  return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sharding)
          for k, (shape, dtype) in batch_shapes(config, batch, text_length).items()}


def random_batch(config: ml_collections.ConfigDict, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
  """A global training batch of `batch` samples with the pipeline's shapes and dtypes (`batch_shapes`)."""
  enc = model_lib.encoder_config(config)
  h, w = enc.image_size
  length = config.data.text_length
  n_img = enc.num_image_tokens
  rng = np.random.default_rng(seed)
  v = len(shapes.mla_levels(config))
  level_max = np.asarray(shapes.level_text_lengths(config))
  lengths = rng.integers(np.maximum(2, level_max // 4), level_max + 1, size=(batch, v))
  mask = (np.arange(length)[None, None, :] < lengths[..., None]).astype(np.int32)
  ids = rng.integers(1, config.model.vocab_size, size=(batch, v, length)).astype(np.int32) * mask
  key_img, key_txt = jax.random.split(jax.random.PRNGKey(seed))
  ratio = float(config.data.bmm_ratio)
  drops, _ = model_lib.bmm_settings(config)
  image_keep = np.asarray(model_lib.draw_keep_mask(key_img, batch * v, n_img, ratio, drops))
  text_keep = np.asarray(model_lib.draw_keep_mask(key_txt, batch * v, length, ratio, drops))
  text_keep = text_keep | (np.arange(length) >= np.tile(level_max, batch)[:, None])  # past each level's length
  k = max(1, int(config.data.images_per_id))
  return {
      'images': rng.integers(0, 256, size=(batch, v, h, w, 3), dtype=np.uint8),
      'text_ids': ids,
      'text_mask': mask,
      'image_keep': image_keep.reshape(batch, v, n_img),
      'text_keep': text_keep.reshape(batch, v, length),
      'person_id': (np.arange(batch) // k).astype(np.int32),
  }


def local_rows(batch: dict) -> dict:
  """This process's rows of a global batch (processes hold contiguous equal blocks)."""
  n = len(batch['person_id'])
  per = n // jax.process_count()
  start = jax.process_index() * per
  return {k: v[start:start + per] for k, v in batch.items()}


def text_packing(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, batch: dict = None,
                 *, global_batch: int = 0, text_length: int = 0) -> Optional[tuple[int, int]]:
  """(groups, slots) of the packed texts for a step (static arguments of `step.train_step`), or None without
  data.text_packing. groups: one per device (the batch axis is split over every device). slots: what `batch`
  (a global numpy batch) needs (`packing.slots_for`), or with no batch every position of the group's texts
  (`global_batch` samples at `text_length`: the worst case, which holds any batch)."""
  if not config.data.get('text_packing', False):
    return None
  groups = mesh.size
  if batch is None:
    levels = len(shapes.mla_levels(config))
    return groups, (global_batch // groups) * levels * (text_length or config.data.text_length)
  valid = packing_lib.batch_valid(np.asarray(batch['text_mask']), np.asarray(batch['text_keep']),
                                  shapes.bucket_text_lengths(shapes.level_text_lengths(config),
                                                             batch['text_ids'].shape[-1]), np)
  return groups, packing_lib.slots_for(valid, groups)


def text_slots(config: ml_collections.ConfigDict, batch: dict) -> int:
  """The slots per device a global numpy `batch` needs with data.text_packing (`text_packing`), 0 without: the
  `text_slots` argument of `TrainSetup` and `compile_train_step`."""
  packed = text_packing(config, sharding_lib.make_mesh(config), batch)
  return packed[1] if packed else 0


def check_text_packing(config: ml_collections.ConfigDict, contrastive_chunk: int) -> None:
  """A clear error for data.text_packing with what it does not serve."""
  if not config.data.get('text_packing', False):
    return
  if config.model.get('head', 'ivt') != 'ivt':
    raise ValueError(f'data.text_packing packs the IVT encoder\'s texts: not with model.head='
                     f'{config.model.head!r}')
  if contrastive_chunk:
    raise ValueError('data.text_packing is not available with train.contrastive_chunk (each chunk would need '
                     'its own slots): set one of them off')


def jit_train_step(encoder, tx, schedule, steps_per_epoch: int, text_lengths: Sequence[int], state_shardings,
                   mesh: jax.sharding.Mesh, class_table=None, gathered_params=None, contrastive_chunk: int = 0,
                   text_packing: Optional[tuple[int, int]] = None):
  """`step.train_step` jitted as training runs it: the batch split over the mesh, the state donated, the metrics
  replicated. text_lengths: the levels' positions in the batch's text length (static). class_table: the sorted
  training person ids (the CLIP head's ID classifier; a constant of the program). gathered_params: see
  `step.train_step` (`gather_shardings` of a config with mesh.gather_params). contrastive_chunk: see
  `step.train_step` (train.contrastive_chunk). text_packing: (groups, slots) or None (`text_packing`)."""
  return jax.jit(
      functools.partial(step_lib.train_step, encoder=encoder, tx=tx, schedule=schedule,
                        steps_per_epoch=steps_per_epoch, text_lengths=tuple(text_lengths),
                        class_table=None if class_table is None else np.asarray(class_table, np.int32),
                        gathered_params=gathered_params, contrastive_chunk=int(contrastive_chunk),
                        text_packing=None if text_packing is None else tuple(int(x) for x in text_packing)),
      in_shardings=(state_shardings, sharding_lib.batch_sharding(mesh)),
      out_shardings=(state_shardings, sharding_lib.replicated(mesh)), donate_argnums=(0,))


def contrastive_chunk(config: ml_collections.ConfigDict, batch: int) -> int:
  """train.contrastive_chunk, checked against the global batch (a clear error naming the key)."""
  chunk = int(config.get('train', {}).get('contrastive_chunk', 0))
  chunked.check_chunk(batch, chunk)
  return chunk


def gather_shardings(config: ml_collections.ConfigDict, param_shardings, mesh: jax.sharding.Mesh):
  """Replicated shardings for every parameter when mesh.gather_params and the fsdp axis is used, else None."""
  if not config.mesh.get('gather_params', False) or mesh.shape['fsdp'] == 1:
    return None
  rep = sharding_lib.replicated(mesh)
  return jax.tree_util.tree_map(lambda _: rep, param_shardings)


class TrainSetup:
  """The jitted training step, its shardings and abstract inputs for a config and mesh (nothing allocated)."""

  def __init__(self, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, batch: int,
               steps_per_epoch: int = 1000, text_slots: int = 0):
    """text_slots: with data.text_packing, the slots per device the step is compiled for (0: every position,
    which holds any batch)."""
    if batch % mesh.size or batch % jax.process_count():
      raise ValueError(f'--batch {batch} must be a multiple of the {mesh.size} devices of the mesh '
                       f'{dict(mesh.shape)} and of the {jax.process_count()} processes')
    self.config, self.mesh, self.batch = config, mesh, batch
    self.encoder = heads.build(config)
    self.tx, schedule = optim.make_optimizer(config, steps_per_epoch)
    self.rng = jax.random.PRNGKey(config.seed)
    abstract = jax.eval_shape(lambda: model_lib.init_module_params(self.encoder, jax.random.key(0)))
    self.param_shardings = sharding_lib.param_shardings(abstract, mesh)
    abstract_state = jax.eval_shape(lambda p: step_lib.create_state(p, self.tx, self.rng), abstract)
    self.state_shardings = sharding_lib.state_shardings(abstract_state, self.tx, self.param_shardings, mesh)
    self.abstract_state = jax.tree_util.tree_map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, self.state_shardings)
    self.num_params = model_lib.count_params(abstract)
    self.abstract_batch = abstract_batch(config, batch, mesh)
    check_text_packing(config, contrastive_chunk(config, batch))
    self.text_packing = text_packing(config, mesh, global_batch=batch)
    if self.text_packing is not None and text_slots:
      self.text_packing = (self.text_packing[0], int(text_slots))
    classes = config.model.clip.num_classes if config.model.head == 'clip' and config.model.clip.id_weight else 0
    self.step = jit_train_step(self.encoder, self.tx, schedule, steps_per_epoch, shapes.level_text_lengths(config),
                               self.state_shardings, mesh, np.arange(classes) if classes else None,
                               gather_shardings(config, self.param_shardings, mesh),
                               contrastive_chunk(config, batch), self.text_packing)

  def compile(self):
    return self.step.lower(self.abstract_state, self.abstract_batch).compile()

  def init_state(self):
    params = jax.jit(functools.partial(model_lib.init_module_params, self.encoder),
                     out_shardings=self.param_shardings)(self.rng)
    return jax.jit(lambda p: step_lib.create_state(p, self.tx, self.rng),
                   out_shardings=self.state_shardings)(params)


_COMPILED = {}


def _key(config: ml_collections.ConfigDict, batch: int, text_slots: int = 0):
  mesh = sharding_lib.make_mesh(config)
  resolved = ml_collections.ConfigDict(config.to_dict())
  resolved.mesh.data, resolved.mesh.fsdp = mesh.shape['data'], mesh.shape['fsdp']
  return mesh, (resolved.to_json(), batch, text_slots)


def compile_train_step(config: ml_collections.ConfigDict, batch: int, text_slots: int = 0):
  """-> (TrainSetup, compiled step, compile seconds) for a config and batch; compiled once per process.
  text_slots: see `TrainSetup`."""
  mesh, key = _key(config, batch, text_slots)
  if key not in _COMPILED:
    setup = TrainSetup(config, mesh, batch, text_slots=text_slots)
    t0 = time.perf_counter()
    compiled = setup.compile()
    _COMPILED[key] = (setup, compiled, time.perf_counter() - t0)
  return _COMPILED[key]


def compile_many(configs: Sequence[ml_collections.ConfigDict], batch: int,
                 max_workers: int = 4) -> list[Optional[BaseException]]:
  """Compiles the training step of several configs at once (traced here one by one, compiled by XLA in threads,
  which run in parallel on a many-core host); later `compile_train_step` calls find them compiled. -> per config
  None, or the exception its tracing or compilation raised."""
  errors: list[Optional[BaseException]] = [None] * len(configs)
  todo = []
  for i, c in enumerate(configs):
    try:
      mesh, key = _key(c, batch)
      if key in _COMPILED:
        continue
      setup = TrainSetup(c, mesh, batch)
      todo.append((i, key, setup, setup.step.lower(setup.abstract_state, setup.abstract_batch)))
    except Exception as e:  # pylint: disable=broad-except  (reported per config)
      errors[i] = e

  def one(item):
    i, key, setup, lowered = item
    t0 = time.perf_counter()
    try:
      _COMPILED[key] = (setup, lowered.compile(), time.perf_counter() - t0)
    except Exception as e:  # pylint: disable=broad-except
      errors[i] = e

  with concurrent.futures.ThreadPoolExecutor(max(1, max_workers)) as pool:
    list(pool.map(one, todo))
  return errors
