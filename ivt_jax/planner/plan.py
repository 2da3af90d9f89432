"""Compiles the real training step (or the evaluation embedders) for a target, with training's mesh and
shardings, and reports what the compiler says: per-chip memory against the chip's HBM, FLOPs, bytes, the
collectives, and a roofline estimate; `fit` finds the largest batch that fits by compiling.

Nothing runs and nothing is allocated: the arguments are abstract (jax.ShapeDtypeStruct) on compile-only devices.
"""
import dataclasses
import math
import re
import time
from typing import Any, Callable, Optional

import jax
import ml_collections
import numpy as np

from ivt_jax.models import encoder as model_lib
from ivt_jax.models import heads
from ivt_jax.planner import analysis
from ivt_jax.planner import devices as devices_lib
from ivt_jax.planner import targets as targets_lib
from ivt_jax.runtime import sharding as sharding_lib
from ivt_jax.training import setup as setup_lib

WHAT = ('train', 'embed')
_OOM = re.compile(r'RESOURCE_EXHAUSTED|Ran out of memory|out of memory|exceeds available', re.IGNORECASE)


class DoesNotFitError(Exception):
  """The compiler refused the program for want of memory (its message is kept), or it needs more than the HBM."""


@dataclasses.dataclass
class Plan:
  target: targets_lib.Target
  what: str
  batch: int
  mesh: dict
  config: ml_collections.ConfigDict
  compile_s: float
  memory: dict
  cost: dict
  collectives: dict
  roofline: dict
  fits: bool
  num_params: int = 0
  notes: list = dataclasses.field(default_factory=list)

  def to_dict(self) -> dict[str, Any]:
    t = self.target
    return {'target': t.name, 'cloud_name': t.cloud_name, 'topology': t.topology, 'platform': t.platform,
            'chips': t.chips, 'chip': dataclasses.asdict(t.chip), 'what': self.what, 'batch': self.batch,
            'mesh': self.mesh, 'gather_params': bool(self.config.mesh.get('gather_params', False)),
            'dtype': self.config.model.dtype, 'remat': bool(self.config.model.remat),
            'patch_embed': self.config.model.patch_embed, 'compile_s': self.compile_s, 'memory': self.memory,
            'hbm_bytes': t.chip.hbm_bytes, 'fits': self.fits, 'cost': self.cost, 'collectives': self.collectives,
            'roofline': self.roofline, 'num_params': self.num_params, 'notes': list(self.notes)}


def batch_unit(config: ml_collections.ConfigDict, mesh_size: int) -> int:
  """Batches the step takes on this mesh come in multiples of this: every chip a share, whole identities, whole
  chunks (train.contrastive_chunk)."""
  k = max(1, int(config.data.images_per_id))
  chunk = max(1, int(config.get('train', {}).get('contrastive_chunk', 0)))
  return math.lcm(mesh_size, k, chunk)


def config_batch(config: ml_collections.ConfigDict, what: str = 'train') -> int:
  if what == 'embed':
    return int(config.eval_batch_size)
  return int(config.data.ids_per_batch) * int(config.data.images_per_id)


def default_batch(config: ml_collections.ConfigDict, mesh_size: int, what: str = 'train') -> int:
  """The config's batch (training: ids_per_batch x images_per_id; embed: eval_batch_size), raised to the next
  multiple of `batch_unit`."""
  unit = batch_unit(config, mesh_size) if what == 'train' else mesh_size
  return unit * max(1, -(-config_batch(config, what) // unit))


def _global_cost(fn: Callable, *abstract) -> Optional[dict]:
  """XLA's cost analysis of the unpartitioned program, lowered for this host (the backends that give none of
  their own compiled programs: CUDA)."""
  strip = lambda tree: jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), tree)
  try:
    c = jax.jit(fn).lower(*[strip(a) for a in abstract]).compile().cost_analysis()
  except Exception:  # pylint: disable=broad-except  (an estimate only; reported as missing)
    return None
  return c[0] if isinstance(c, list) else c


def _host_cost(config, batch: int, what: str, global_args) -> Optional[dict]:
  """The unpartitioned program's cost, on one host CPU device. The training step is set up again on a 1 x 1
  mesh: its sharding constraints (mesh.gather_params) name the target's devices, which this host cannot
  compile for."""
  if what != 'train':
    return _global_cost(*global_args)
  host = ml_collections.ConfigDict(config.to_dict())
  host.mesh.data, host.mesh.fsdp = 1, 1
  try:
    cpu = jax.devices('cpu')[:1]
    s = setup_lib.TrainSetup(host, sharding_lib.make_mesh(host, cpu), batch)
    c = s.compile().cost_analysis()
  except Exception:  # pylint: disable=broad-except  (an estimate only; reported as missing)
    return None
  return c[0] if isinstance(c, list) else c


def _lowered(config, mesh, batch: int, what: str):
  """-> (lowered program, the function and abstract arguments for `_global_cost` (the embedders; None for the
  training step), parameter count)."""
  if what == 'train':
    s = setup_lib.TrainSetup(config, mesh, batch)
    return s.step.lower(s.abstract_state, s.abstract_batch), None, s.num_params  # its cost: `_host_cost`
  encoder = heads.build(config)
  abstract = jax.eval_shape(lambda: model_lib.init_module_params(encoder, jax.random.key(0)))
  shardings = sharding_lib.param_shardings(abstract, mesh)
  params = jax.tree_util.tree_map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract,
                                  shardings)
  bs = sharding_lib.batch_sharding(mesh)
  h, w = model_lib.encoder_config(config).image_size
  images = jax.ShapeDtypeStruct((batch, h, w, 3), np.uint8, sharding=bs)
  ids = jax.ShapeDtypeStruct((batch, config.data.text_length), np.int32, sharding=bs)

  def both(p, im, i, m):
    return heads.embed_images(p, im, encoder=encoder), heads.embed_texts(p, i, m, encoder=encoder)

  # evaluation.evaluate.Embedder jits the two apart, with these shardings; one program here
  fn = jax.jit(both, in_shardings=(shardings, bs, bs, bs), out_shardings=(bs, bs))
  return fn.lower(params, images, ids, ids), (both, params, images, ids, ids), model_lib.count_params(abstract)


def compile_for(config: ml_collections.ConfigDict, target: targets_lib.Target, batch: Optional[int] = None,
                what: str = 'train', devices: Optional[list] = None, verbose: bool = False) -> Plan:
  """Compiles `what` for `target` at `batch` (default: `default_batch`). DoesNotFitError when the compiler runs
  out of the chip's memory; ValueError for a batch the mesh cannot take."""
  if what not in WHAT:
    raise ValueError(f'--what={what!r}: one of {WHAT}')
  devices = devices or devices_lib.target_devices(target, verbose)
  config = model_lib.for_platform(config, target.platform)
  mesh = sharding_lib.make_mesh(config, devices)
  notes = []
  if batch is None:
    batch = default_batch(config, mesh.size, what)
    want = config_batch(config, what)
    if batch != want:
      notes.append(f'batch {want} (the config\'s) raised to {batch}: a multiple of the {mesh.size} chips'
                   + (' and of data.images_per_id' if what == 'train' else ''))
  elif batch % mesh.size:
    raise ValueError(f'--batch={batch} is not a multiple of the {mesh.size} chips of {target.name} '
                     f'(mesh {dict(mesh.shape)})')
  lowered, global_args, num_params = _lowered(config, mesh, batch, what)
  t0 = time.perf_counter()
  try:
    with devices_lib.quiet_stderr(verbose):
      compiled = lowered.compile(devices_lib.compiler_options(target) or None)
  except Exception as e:  # pylint: disable=broad-except  (XlaRuntimeError; only memory refusals are ours)
    if _OOM.search(str(e)):
      raise DoesNotFitError(f'{what} at batch {batch} does not fit {target.name}: '
                            f'{str(e).strip().splitlines()[0][:400]}') from None
    raise
  compile_s = time.perf_counter() - t0
  mem = analysis.memory(compiled)
  cost = analysis.cost(compiled, None if target.platform == 'tpu' else _host_cost(config, batch, what, global_args),
                       mesh.size)
  coll = analysis.collectives(compiled.as_text(), mesh.size)
  sent = sum(c['sent_bytes'] for c in coll.values())
  roof = analysis.roofline(cost['flops'], cost['bytes'], sent, target.chip, config.model.dtype)
  fits = mem['total'] <= target.chip.hbm_bytes
  return Plan(target, what, batch, dict(mesh.shape), config, compile_s, mem, cost, coll, roof, fits,
              num_params, notes)


def fit(config: ml_collections.ConfigDict, target: targets_lib.Target, what: str = 'train',
        devices: Optional[list] = None, max_batch: int = 1 << 16, progress: Callable[[str], None] = None,
        verbose: bool = False) -> tuple[int, Optional[Plan], list[tuple[int, bool]]]:
  """The largest batch (a multiple of `batch_unit`, at most `max_batch`) whose program fits the target, by
  compiling. Memory grows about linearly with the batch, so two compiles (1 and 2 units) predict the boundary;
  the compiler's word there decides, galloping and bisecting from it when the prediction is off (typically 4
  compiles in all). -> (batch or 0 when none fits, its Plan, [(batch tried, fits)])."""
  devices = devices or devices_lib.target_devices(target, verbose)
  size = sharding_lib.make_mesh(config, devices).size
  unit = batch_unit(config, size) if what == 'train' else size
  top = max_batch // unit
  tried, plans, known = [], {}, {}

  def fits(n: int) -> bool:
    if n in known:
      return known[n]
    try:
      p = compile_for(config, target, n * unit, what, devices, verbose)
      ok = p.fits
      if ok:
        plans[n] = p
    except DoesNotFitError:
      ok = False
    known[n] = ok
    tried.append((n * unit, ok))
    if progress:
      progress(f'batch {n * unit}: {"fits" if ok else "does not fit"}')
    return ok

  if top < 1 or not fits(1):
    return 0, None, tried
  if top < 2 or not fits(2):
    return unit, plans[1], tried
  m1, m2 = plans[1].memory['total'], plans[2].memory['total']
  slope = max(m2 - m1, 1)
  guess = int(min(top, max(2, 1 + (target.chip.hbm_bytes - m1) // slope)))
  lo, hi = 2, top + 1  # fits(lo); nothing at or above hi does (hi = top + 1: not tried)
  if fits(guess):
    lo, step = guess, 1
    while lo + step < hi and fits(lo + step):  # gallop up
      lo, step = lo + step, step * 2
    hi = min(hi, lo + step)
  else:
    hi, step = guess, 1
    while hi - step > lo and not fits(hi - step):  # gallop down
      hi, step = hi - step, step * 2
    lo = max(lo, hi - step)
  while hi - lo > 1:
    mid = (lo + hi) // 2
    if fits(mid):
      lo = mid
    else:
      hi = mid
  return lo * unit, plans.get(lo), tried
