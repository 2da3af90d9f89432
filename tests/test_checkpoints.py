"""Checkpoint integrity: checksums that do not depend on the sharding and catch every flipped bit; a latest
checkpoint with flipped bytes found and set aside; a failed save (a full disk) that leaves the earlier
checkpoints intact and says so."""
import errno
import logging
import os

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from ivt_jax.training import checkpoints
from ivt_jax.training import integrity


def _state(seed):
  k = jax.random.key(seed)
  return {'params': {'w': jax.random.normal(k, (64, 32)), 'b': jnp.arange(32, dtype=jnp.bfloat16)},
          'step': jnp.asarray(seed, jnp.int32), 'rng': jax.random.key_data(k)}


def _iterator():
  return iter(grain.MapDataset.range(100).to_iter_dataset())


def _save(manager, step, meta=None):
  it = _iterator()
  for _ in range(step):
    next(it)
  checkpoints.save_training(manager, step, _state(step), it, dict(meta or {}, step=step))
  checkpoints.wait(manager)


def _abstract():
  return jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), _state(0))


def _restore(workdir):
  manager = checkpoints.training_manager(workdir, save_every=1, max_to_keep=5)
  it = _iterator()
  state, meta = checkpoints.restore_training(manager, _abstract(), it)
  return state, meta, next(it)


def test_digest_is_sharding_independent_and_sees_every_flipped_bit():
  x = np.random.default_rng(0).standard_normal((16, 8)).astype(np.float32)
  tree = {'x': x, 'h': x.astype(jnp.bfloat16), 'i': np.arange(10, dtype=np.int32), 'k': np.ones(3, bool)}
  single = integrity.tree_digest(jax.tree_util.tree_map(jnp.asarray, tree))
  mesh = jax.make_mesh((len(jax.devices()),), ('d',))
  sharded = jax.device_put(tree['x'], jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('d')))
  assert len(jax.devices()) > 1 and len(sharded.sharding.device_set) > 1
  assert integrity.tree_digest(dict(tree, x=sharded)) == single
  assert integrity.tree_digest(tree) == single  # numpy in, the same
  for name, dtype, bits in (('x', np.uint32, 32), ('h', np.uint16, 16)):
    for bit in range(bits):
      flipped = np.array(tree[name]).view(dtype).copy()
      flipped[3, 5] ^= dtype(1 << bit)
      assert integrity.changed(single, dict(tree, **{name: flipped.view(tree[name].dtype)})) == [f"['{name}']"]


def test_flipped_bytes_in_the_latest_checkpoint_are_found_and_set_aside(tmp_path, caplog):
  workdir = str(tmp_path)
  manager = checkpoints.training_manager(workdir, save_every=1, max_to_keep=5)
  _save(manager, 1)
  _save(manager, 2)
  # Bytes changed on disk: one byte of every array data file of step 2 (the format may or may not notice).
  for d, _, files in os.walk(os.path.join(workdir, 'checkpoints', '2', 'state')):
    for name in files if os.path.basename(d) == 'd' else ():
      with open(os.path.join(d, name), 'r+b') as f:
        size = os.path.getsize(os.path.join(d, name))
        f.seek(size // 2)
        b = f.read(1)
        f.seek(size // 2)
        f.write(bytes([b[0] ^ 0x10]))
  with caplog.at_level(logging.WARNING):
    state, meta, next_item = _restore(workdir)
  assert meta['step'] == 1 and int(state['step']) == 1 and next_item == 1
  assert 'digest' not in meta
  assert 'step 2' in caplog.text and 'cannot be restored' in caplog.text
  assert os.listdir(os.path.join(workdir, 'damaged_checkpoints'))[0].startswith('2.')


def test_a_change_the_format_cannot_see_is_found_by_the_checksums(tmp_path, caplog):
  workdir = str(tmp_path)
  manager = checkpoints.training_manager(workdir, save_every=1, max_to_keep=5)
  _save(manager, 1)
  _save(manager, 2)
  # Step 3: well-formed Orbax data whose bytes are not those that were saved (one bit of one weight), under
  # the meta of the state as it was: what a flipped bit inside uncompressed data looks like to a reader.
  good = _state(3)
  it = _iterator()
  checkpoints.save_training(manager, 3, good, it, {'step': 3})
  checkpoints.wait(manager)
  meta = manager.restore(3, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
  w = np.array(good['params']['w'])
  w.view(np.uint32)[7, 7] ^= np.uint32(1 << 30)
  bad = dict(good, params=dict(good['params'], w=jnp.asarray(w)))
  manager.delete(3)
  manager.save(3, args=ocp.args.Composite(state=ocp.args.StandardSave(bad),
                                          data_iter=grain.checkpoint.CheckpointSave(it),
                                          meta=ocp.args.JsonSave(meta)), force=True)
  manager.wait_until_finished()
  with caplog.at_level(logging.WARNING):
    state, meta, _ = _restore(workdir)
  assert meta['step'] == 2
  assert "the checksums of 1 array(s) differ (['params']['w'])" in caplog.text
  # The parameters-only reader (evaluation, search) refuses it too.
  manager.delete(2)
  os.replace(os.path.join(workdir, 'damaged_checkpoints', os.listdir(os.path.join(workdir, 'damaged_checkpoints'))[0]),
             os.path.join(workdir, 'checkpoints', '3'))
  with pytest.raises(checkpoints.CheckpointError, match=r"checkpoints/3: its data changed after it was saved"):
    checkpoints.restore_params(os.path.join(workdir, 'checkpoints'), _abstract()['params'])


def test_params_checkpoint_checked_on_restore(tmp_path):
  directory = str(tmp_path / 'best')
  params = _state(4)['params']
  checkpoints.save_params(checkpoints.params_manager(directory), 4, params, {'best_step': 4})
  restored, meta = checkpoints.restore_params(directory, _abstract()['params'])
  np.testing.assert_array_equal(restored['w'], params['w'])
  assert meta['best_step'] == 4 and 'digest' not in meta


def test_full_disk_during_a_save_keeps_the_earlier_checkpoints(tmp_path, monkeypatch):
  workdir = str(tmp_path)
  manager = checkpoints.training_manager(workdir, save_every=1, max_to_keep=5)
  _save(manager, 1)
  _save(manager, 2)
  from orbax.checkpoint._src.handlers import json_checkpoint_handler

  async def no_space(self, x, directory):
    raise OSError(errno.ENOSPC, 'No space left on device', str(directory))
  monkeypatch.setattr(json_checkpoint_handler.JsonCheckpointHandler, '_save_fn', no_space)
  with pytest.raises(checkpoints.CheckpointSaveError,
                     match=r'failed \(the disk is full\); the checkpoints already saved there \(steps 1, 2\) are '
                           r'intact; restarting the same command resumes from step 2\. Free some space first\.'):
    _save(manager, 3)
  monkeypatch.undo()
  state, meta, next_item = _restore(workdir)
  assert meta['step'] == 2 and int(state['step']) == 2 and next_item == 2
  # The unfinished step is never taken for a checkpoint, and the same step saves again once there is space.
  manager = checkpoints.training_manager(workdir, save_every=1, max_to_keep=5)
  assert manager.all_steps() == [1, 2]
  _save(manager, 3)
  assert _restore(workdir)[1]['step'] == 3


def test_full_disk_while_saving_the_best_parameters(tmp_path, monkeypatch):
  directory = str(tmp_path / 'best')
  manager = checkpoints.params_manager(directory)
  checkpoints.save_params(manager, 1, _state(1)['params'], {})
  from orbax.checkpoint._src.handlers import json_checkpoint_handler

  async def no_space(self, x, directory):
    raise OSError(errno.ENOSPC, 'No space left on device', str(directory))
  monkeypatch.setattr(json_checkpoint_handler.JsonCheckpointHandler, '_save_fn', no_space)
  with pytest.raises(checkpoints.CheckpointSaveError, match=r'the disk is full'):
    checkpoints.save_params(manager, 2, _state(2)['params'], {})
