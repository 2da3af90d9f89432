"""The device mesh (data x fsdp), parameter sharding by name rules, and batch placement."""
import re
from typing import Sequence

import jax
import ml_collections
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

BATCH_AXES = ('data', 'fsdp')
# Name rules, first match wins: 'fsdp' shards a parameter's largest dimension divisible by the fsdp axis
# over it; 'replicate' keeps a full copy per device. Small tensors (norms, biases) stay replicated.
DEFAULT_RULES = (('.*', 'fsdp'),)
MIN_FSDP_SIZE = 2 ** 14


def make_mesh(config: ml_collections.ConfigDict, devices: Sequence[jax.Device] = None) -> jax.sharding.Mesh:
  devices = list(devices if devices is not None else jax.devices())
  n = len(devices)
  fsdp = config.mesh.fsdp
  data = config.mesh.data if config.mesh.data != -1 else n // max(fsdp, 1)
  if fsdp < 1 or data < 1 or data * fsdp > n or (config.mesh.data == -1 and data * fsdp != n):
    raise ValueError(f'mesh.data x mesh.fsdp = {config.mesh.data} x {fsdp} does not fit the {n} devices '
                     '(mesh.data=-1 takes all remaining devices)')
  if data * fsdp < n:
    if jax.process_count() > 1:
      raise ValueError(f'mesh.data x mesh.fsdp = {data * fsdp} must use all {n} devices with several processes')
    devices = devices[:data * fsdp]  # an explicitly smaller mesh: the first devices
  return jax.make_mesh((data, fsdp), ('data', 'fsdp'), devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)


def _spec_for(name: str, shape, rules, fsdp_size: int) -> P:
  for pattern, rule in rules:
    if re.fullmatch(pattern, name):
      break
  else:
    rule = 'replicate'
  if rule == 'replicate' or fsdp_size == 1 or int(np.prod(shape)) < MIN_FSDP_SIZE:
    return P()
  if rule != 'fsdp':
    raise ValueError(f'unknown sharding rule {rule!r} for {name}')
  for axis in np.argsort(shape)[::-1]:
    if shape[axis] % fsdp_size == 0:
      spec = [None] * len(shape)
      spec[axis] = 'fsdp'
      return P(*spec)
  return P()


def param_shardings(params, mesh: jax.sharding.Mesh, rules=DEFAULT_RULES):
  """A NamedSharding per leaf of `params` (arrays or ShapeDtypeStructs), from the name rules."""
  fsdp_size = mesh.shape['fsdp']
  def one(path, leaf):
    name = '/'.join(str(getattr(k, 'key', getattr(k, 'idx', k))) for k in path)
    return NamedSharding(mesh, _spec_for(name, leaf.shape, rules, fsdp_size))
  return jax.tree_util.tree_map_with_path(one, params)


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  """Leading (batch) axis split over every device."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def state_shardings(abstract_state, tx: optax.GradientTransformation, param_shardings, mesh: jax.sharding.Mesh):
  """Shardings of a step.TrainState: optimizer moments as their parameters, everything else replicated.

  abstract_state: the TrainState (of arrays or ShapeDtypeStructs) that `tx` was initialized in.
  """
  rep = replicated(mesh)
  opt = optax.tree_map_params(tx, lambda _, s: s, abstract_state.opt_state, param_shardings,
                              transform_non_params=lambda _: rep)
  return abstract_state.replace(step=rep, params=param_shardings, opt_state=opt, rng=rep)


def global_batch(local_batch: dict, mesh: jax.sharding.Mesh) -> dict:
  """Process-local numpy batch -> global jax.Arrays sharded over the batch axis (one or many processes)."""
  sharding = batch_sharding(mesh)
  return jax.tree_util.tree_map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
                                local_batch)
