"""Orbax checkpoints: the training state with the Grain iterator state, resume, and best-by-validation params.

Layouts (each an Orbax CheckpointManager directory of numbered steps):
  <workdir>/checkpoints/<step>/{state, data_iter, meta}   training: params, optimizer state, step, rng; the
                                                          input iterator's position; run metadata (json)
  <workdir>/best/<step>/{params, meta}                    the parameters with the best validation score
  <dir>/<step>/{params, meta}                             what `ivt_jax.tools.convert` writes
`restore_params` reads any of the three (for a workdir: best if present, else the latest training state).

Every save puts a checksum of the saved arrays in the meta (ivt_jax/training/integrity.py) and every restore checks it,
so bytes changed on disk after the save are found, not trained on. A save that fails (a full disk) stops the
run with CheckpointSaveError; Orbax finalizes a step only when all of it is written, so the earlier steps stay
intact and a restart resumes from the newest of them.
"""
import contextlib
import errno
import os
import time
from typing import Any, Optional

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from input_pipeline import paths
from ivt_jax.training import integrity


def _abs(path: str) -> str:
  return paths.resolve(path, 'checkpoint directory')


def training_manager(workdir: str, *, save_every: int, max_to_keep: int) -> ocp.CheckpointManager:
  # Every `save_every` steps and on preemption; not Orbax's default extra save at the first step (a full write of
  # the state, its checksum compiled, while the run has barely started; a restart loses one step without it).
  policy = ocp.checkpoint_managers.AnySavePolicy([ocp.checkpoint_managers.FixedIntervalPolicy(save_every),
                                                  ocp.checkpoint_managers.PreemptionCheckpointingPolicy()])
  options = ocp.CheckpointManagerOptions(save_decision_policy=policy, max_to_keep=max_to_keep, create=True)
  return ocp.CheckpointManager(paths.join(_abs(workdir), 'checkpoints'), options=options,
                               item_names=('state', 'data_iter', 'meta'))


def params_manager(directory: str, max_to_keep: Optional[int] = 1) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
  return ocp.CheckpointManager(_abs(directory), options=options, item_names=('params', 'meta'))


class CheckpointError(RuntimeError):
  pass


class CheckpointSaveError(CheckpointError):
  """A checkpoint could not be written (a full disk, a lost mount); the earlier ones are intact."""


def _save_error(manager: ocp.CheckpointManager, e: BaseException) -> CheckpointSaveError:
  full = isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)
  steps = manager.all_steps()
  kept = (f'the checkpoints already saved there (steps {", ".join(map(str, steps))}) are intact; restarting the '
          f'same command resumes from step {max(steps)}' if steps else 'no earlier checkpoint was saved there')
  what = 'the disk is full' if full else f'{type(e).__name__}: {e}'
  return CheckpointSaveError(f'saving a checkpoint in {manager.directory} failed ({what}); {kept}.'
                             + (' Free some space first.' if full else ''))


@contextlib.contextmanager
def _saving(manager: ocp.CheckpointManager):
  """Any failure of a save (or of the previous asynchronous one, which surfaces in the next call) becomes a
  CheckpointSaveError naming the intact steps."""
  try:
    yield
  except Exception as e:  # pylint: disable=broad-except  (OSError, or tensorstore's errors for the arrays)
    raise _save_error(manager, e) from e


def wait(manager: ocp.CheckpointManager) -> None:
  """Waits for the asynchronous save; its failure becomes a CheckpointSaveError."""
  with _saving(manager):
    manager.wait_until_finished()


def save_training(manager: ocp.CheckpointManager, step: int, state: Any, data_iter, meta: dict,
                  force: bool = False) -> bool:
  """Starts an asynchronous save of (state, iterator position, meta + the state's checksums)."""
  meta = dict(meta, digest=integrity.tree_digest(state))
  with _saving(manager):
    return manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data_iter=grain.checkpoint.CheckpointSave(data_iter),
        meta=ocp.args.JsonSave(meta)), force=force)


def _changed_arrays(saved_digest: Optional[dict], tree: Any) -> str:
  """'' if the restored arrays match the saved checksums (or none were saved), else what differs."""
  if not saved_digest:
    return ''
  bad = integrity.changed(saved_digest, tree)
  if not bad:
    return ''
  return (f'its data changed after it was saved: the checksums of {len(bad)} array(s) differ '
          f'({", ".join(bad[:3])}{", ..." if len(bad) > 3 else ""})')


def _set_aside(manager: ocp.CheckpointManager, step: int) -> str:
  """Moves a damaged step out of the manager's directory (kept for inspection) -> where it went."""
  root = os.fspath(manager.directory).rstrip('/')
  target = paths.join(paths.dirname(root), 'damaged_checkpoints', f'{step}.{int(time.time())}')
  paths.move_tree(paths.join(root, str(step)), target)
  return target


def restore_training(manager: ocp.CheckpointManager, abstract_state: Any, data_iter):
  """-> (state, meta) from the newest checkpoint that restores, the iterator restored in place; None if there
  is none. A checkpoint that cannot be restored (a missing or truncated file, damaged bytes that its format
  detects) is named in the log and moved to <workdir>/damaged_checkpoints/, and the one before it is tried;
  when none restores, CheckpointError names each with its error."""
  damaged = []
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      restored = manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state),
          data_iter=grain.checkpoint.CheckpointRestore(data_iter),
          meta=ocp.args.JsonRestore()))
    except Exception as e:  # pylint: disable=broad-except  (any failure to read it: try the one before)
      reason = f'{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ""}'
    else:
      meta = dict(restored.meta or {})
      reason = _changed_arrays(meta.pop('digest', None), restored.state)
    if reason:
      damaged.append((step, reason))
      logging.warning('the checkpoint of step %d in %s cannot be restored (%s); trying the one before', step,
                      manager.directory, reason)
      continue
    for bad, _ in damaged:
      where = _set_aside(manager, bad) if jax.process_index() == 0 else ''
      logging.warning('resuming from step %d; the damaged checkpoint of step %d was moved to %s', step, bad, where)
    if damaged:
      manager.reload()
    return restored.state, meta
  if damaged:
    raise CheckpointError(f'no checkpoint in {manager.directory} can be restored:\n' +
                          '\n'.join(f'  step {s}: {r}' for s, r in damaged) +
                          '\nMove that directory away to start the run afresh, or restore it from a copy.')
  return None


def latest_meta(manager: ocp.CheckpointManager) -> Optional[tuple[int, dict]]:
  """(step, run metadata) of the newest training checkpoint whose metadata reads, without restoring the state;
  None if none."""
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      restored = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    except Exception:  # pylint: disable=broad-except  (restore_training names and handles damaged steps)
      continue
    return step, dict(restored.meta or {})
  return None


def save_params(manager: ocp.CheckpointManager, step: int, params: Any, meta: dict) -> None:
  """Saves (replacing an earlier save of the same step, e.g. re-evaluated after a resume)."""
  if step in manager.all_steps():
    manager.delete(step)
  meta = dict(meta, digest=integrity.tree_digest(params))
  with _saving(manager):
    manager.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(params),
                                               meta=ocp.args.JsonSave(meta)), force=True)
    manager.wait_until_finished()


def _check_tree(restored: Any, abstract: Any, where: str) -> None:
  want = {jax.tree_util.keystr(p): a.shape for p, a in jax.tree_util.tree_leaves_with_path(abstract)}
  got = {jax.tree_util.keystr(p): tuple(getattr(a, 'shape', None) or np.shape(a))
         for p, a in jax.tree_util.tree_leaves_with_path(restored)}
  missing = sorted(set(want) - set(got))
  unexpected = sorted(set(got) - set(want))
  mismatched = sorted(k for k in set(want) & set(got) if tuple(want[k]) != got[k])
  if missing or unexpected or mismatched:
    lines = [f'parameters in {where} do not match the configured model:']
    lines += [f'  missing: {k} {want[k]}' for k in missing]
    lines += [f'  unexpected: {k} {got[k]}' for k in unexpected]
    lines += [f'  shape: {k} checkpoint {got[k]} vs model {tuple(want[k])}' for k in mismatched]
    raise ValueError('\n'.join(lines))


def restore_params(path: str, abstract_params: Any, shardings: Any = None) -> tuple[Any, dict]:
  """Parameters (and the saved meta) from a workdir, a best/ or convert directory, or a training checkpoints/ dir.

  `abstract_params`: the model's parameter tree of ShapeDtypeStructs; a structure or shape difference is an
  error that lists every difference.
  """
  path = _abs(path)
  if not paths.isdir(path):
    raise FileNotFoundError(f'checkpoint directory {path} does not exist')
  candidates = [paths.join(path, 'best'), path, paths.join(path, 'checkpoints')]
  for directory in candidates:
    if not paths.isdir(directory):
      continue
    steps = ocp.utils.checkpoint_steps(directory) if hasattr(ocp, 'utils') else []
    if not steps:
      continue
    step = max(steps)
    items = set(paths.listdir(paths.join(directory, str(step)))) & {'params', 'state', 'meta'}
    kinds = {'meta': ocp.JsonCheckpointHandler, 'params': ocp.StandardCheckpointHandler,
             'state': ocp.PyTreeCheckpointHandler}  # a training state: its params only (a partial restore)
    handlers = {k: kinds[k]() for k in items}
    manager = ocp.CheckpointManager(directory, item_handlers=handlers)
    if shardings is None:
      shardings = jax.tree_util.tree_map(lambda _: jax.sharding.SingleDeviceSharding(jax.devices()[0]),
                                         abstract_params)
    target = jax.tree_util.tree_map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_params, shardings)
    meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta \
        if 'meta' in items else {}
    if 'params' in items:
      raw = manager.item_metadata(step)['params']
      tree = getattr(raw, 'tree', raw)
      _check_tree(tree, abstract_params, f'{directory}/{step}/params')
      params = manager.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(target))).params
    elif 'state' in items:
      raw = manager.item_metadata(step)['state']
      tree = getattr(raw, 'tree', raw)
      _check_tree(tree['params'], abstract_params, f'{directory}/{step}/state')
      state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
          item={'params': target},
          restore_args={'params': jax.tree_util.tree_map(
              lambda t: ocp.ArrayRestoreArgs(sharding=t.sharding, dtype=t.dtype), target)},
          partial_restore=True))).state
      params = state['params']
    else:
      continue
    meta = dict(meta or {})
    saved = meta.pop('digest', None)
    if saved and 'state' in items:  # a training state's checksums: those of its params
      prefix = next((p for p in (".params", "['params']") if any(k.startswith(p) for k in saved)), '')
      saved = {k[len(prefix):]: v for k, v in saved.items() if prefix and k.startswith(prefix)}
    reason = _changed_arrays(saved, params)
    if reason:
      raise CheckpointError(f'{directory}/{step}: {reason}. Restore it from a copy, or use another checkpoint.')
    logging.debug('restored parameters from %s step %d', directory, step)
    return params, dict(meta or {}, step=int(step), directory=directory)
  raise FileNotFoundError(f'no Orbax checkpoint with parameters under {path} (looked in '
                          f'{", ".join(candidates)})')
