"""One workdir, one run: the workdir lock, and what a resumed run may change in its config.

The lock: `<workdir>/run.lock` holds the owner's process id, host and start time, and the owner holds an
exclusive `fcntl.flock` on it for as long as it runs. The kernel drops that lock when the process ends in any way
(SIGKILL included), so a lock file left by a killed run does not block the restart; a second live run on the
same workdir is refused, naming the first. With several processes (jax.distributed), process 0 takes the lock.
Where the file system cannot lock (some network file systems), the run goes on with a warning.

On Cloud Storage (a gs:// workdir) there is no file lock: the owner holds a lease instead. `run.lock` is an
object holding the owner's process id, host, a random token and a heartbeat time that the owner rewrites every
`heartbeat_s` (30 s) from a background thread. A run finding a lease whose heartbeat is younger than `stale_s`
(120 s) is refused, naming the owner, unless its process ran on this host and is gone; an older one (a killed
run elsewhere) is taken over. Two runs starting together both
write their token and read it back `settle_s` (2 s) later: the one whose token is not there is refused (Cloud
Storage serves the last complete write to every reader).

The config on resume: a run that continues from a checkpoint must train the same model on the same data stream,
so keys that change shapes or the stream (`REFUSED`: the model, the data, the optimizer and its schedule, the seed,
the initialization) are refused, every changed key named with both values, before anything is restored. The other
keys (logging, evaluation and checkpoint frequency, total_steps, the mesh, worker counts, data paths) may change;
each change is logged.
"""
from __future__ import annotations

import datetime
import fcntl
import json
import os
import secrets
import socket
import threading
import time
from typing import Any, Mapping

from absl import logging

from input_pipeline import paths

LOCK_FILE = 'run.lock'

# Config keys (dotted prefixes) a resumed run must keep.
REFUSED = ('model.', 'part.', 'data.', 'optim.', 'init.', 'seed', 'num_epochs')
# Keys under those prefixes that do not change what is trained: how the data is read, not which data.
ALLOWED = ('data.worker_count', 'data.worker_buffer_size', 'data.prefetch', 'data.manual_dir', 'data.data_dir',
           'data.local_cache_dir', 'model.patch_embed', 'model.bmm_tokens')  # the same numbers by another op


class RunLockedError(RuntimeError):
  pass


class ConfigChangedError(ValueError):
  pass


def _refusal(workdir: str, owner: dict, where: str) -> RunLockedError:
  return RunLockedError(
      f'{workdir} is in use by another run: process {owner.get("pid", "?")} on host {owner.get("host", "?")}, '
      f'started {owner.get("started", "?")} ({where}). One workdir holds one run: wait for it to end, stop it, or '
      'choose another --workdir.')


class WorkdirLock:
  """Exclusive ownership of a workdir for one run (see the module docstring). Use as a context manager.

  A gs:// workdir gets a lease (`heartbeat_s`, `stale_s`, `settle_s`: see the module docstring)."""

  def __init__(self, workdir: str, *, heartbeat_s: float = 30.0, stale_s: float = 120.0, settle_s: float = 2.0):
    self.workdir = workdir
    self.path = paths.join(workdir, LOCK_FILE)
    self._fd = None
    self._lease = _Lease(self.path, heartbeat_s, stale_s, settle_s) if paths.is_remote(workdir) else None

  def acquire(self) -> 'WorkdirLock':
    if self._lease is not None:
      self._lease.acquire(self.workdir)
      return self
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      owner = _read_owner(fd)
      os.close(fd)
      raise _refusal(os.path.dirname(self.path), owner, self.path) from None
    except OSError as e:  # no locking on this file system
      logging.warning('cannot lock %s (%s): running without the one-run-per-workdir check', self.path, e)
      os.close(fd)
      return self
    owner = {'pid': os.getpid(), 'host': socket.gethostname(),
             'started': datetime.datetime.now().isoformat(timespec='seconds')}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(owner) + '\n').encode(), 0)
    os.fsync(fd)
    self._fd = fd
    return self

  def release(self) -> None:
    if self._lease is not None:
      self._lease.release()
    if self._fd is not None:
      fcntl.flock(self._fd, fcntl.LOCK_UN)
      os.close(self._fd)
      self._fd = None

  def __enter__(self) -> 'WorkdirLock':
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()


class _Lease:
  """The lock of a gs:// workdir: an object with a heartbeat (module docstring)."""

  def __init__(self, path: str, heartbeat_s: float, stale_s: float, settle_s: float):
    self.path, self.heartbeat_s, self.stale_s, self.settle_s = path, heartbeat_s, stale_s, settle_s
    self._owner = None
    self._stop = threading.Event()
    self._thread = None

  def _read(self) -> dict:
    try:
      return json.loads(paths.read_text(self.path) or '{}')
    except (OSError, ValueError):  # absent (FileNotFoundError is an OSError) or unreadable: no live owner
      return {}

  def _write(self) -> None:
    self._owner['heartbeat'] = time.time()
    paths.write_text_atomic(self.path, json.dumps(self._owner) + '\n')

  def acquire(self, workdir: str) -> None:
    current = self._read()
    age = time.time() - float(current.get('heartbeat', 0.0))
    if current and age < self.stale_s and not _dead_here(current):
      raise _refusal(workdir, current, f'its lease {self.path} was renewed {age:.0f} s ago; if that run was '
                     f'killed, the lease goes stale {self.stale_s - age:.0f} s from now')
    if current:
      logging.warning('taking over the lease %s of process %s on %s: not renewed for %.0f s (a run that ended '
                      'without releasing it)', self.path, current.get('pid'), current.get('host'), age)
    self._owner = {'pid': os.getpid(), 'host': socket.gethostname(), 'token': secrets.token_hex(8),
                   'started': datetime.datetime.now().isoformat(timespec='seconds')}
    self._write()
    time.sleep(self.settle_s)
    now = self._read()
    if now.get('token') != self._owner['token']:
      self._owner = None
      raise _refusal(workdir, now, f'it took the lease {self.path} at the same time')
    self._thread = threading.Thread(target=self._beat, name='workdir-lease', daemon=True)
    self._thread.start()

  def _beat(self) -> None:
    while not self._stop.wait(self.heartbeat_s):
      try:
        now = self._read()
        if now.get('token') not in (None, self._owner['token']):
          logging.error('the lease %s was taken by process %s on %s: another run now writes to this workdir',
                        self.path, now.get('pid'), now.get('host'))
          return
        self._write()
      except Exception as e:  # pylint: disable=broad-except  (a network error: try again next beat)
        logging.warning('could not renew the lease %s: %s', self.path, e)

  def release(self) -> None:
    self._stop.set()
    if self._thread is not None:
      self._thread.join(timeout=30)
      self._thread = None
    if self._owner is not None:
      try:
        if self._read().get('token') == self._owner['token']:
          paths.remove(self.path)
      except OSError as e:
        logging.warning('could not remove the lease %s (%s); it goes stale in %.0f s', self.path, e, self.stale_s)
      self._owner = None


def _dead_here(owner: dict) -> bool:
  """The lease's owner ran on this host and its process is gone (a killed run restarted on the same machine)."""
  if owner.get('host') != socket.gethostname() or not isinstance(owner.get('pid'), int):
    return False
  try:
    os.kill(owner['pid'], 0)
  except ProcessLookupError:
    return True
  except OSError:  # alive, another user's
    return False
  return False


def _read_owner(fd: int) -> dict:
  try:
    return json.loads(os.pread(fd, 4096, 0).decode() or '{}')
  except (OSError, ValueError):
    return {}


def _flat(d: Mapping[str, Any], prefix: str = '') -> dict[str, Any]:
  out = {}
  for k, v in d.items():
    if isinstance(v, Mapping):
      out.update(_flat(v, f'{prefix}{k}.'))
    else:
      out[f'{prefix}{k}'] = list(v) if isinstance(v, tuple) else v
  return out


def _refused(key: str) -> bool:
  if any(key == a or key.startswith(a + '.') for a in ALLOWED):
    return False
  return any(key.startswith(p) if p.endswith('.') else key == p for p in REFUSED)


def check_resume_config(saved: Mapping[str, Any] | None, current: Mapping[str, Any], where: str) -> list[str]:
  """Compares the config a checkpoint was written with to this run's (both `ConfigDict.to_dict()`).

  Raises ConfigChangedError naming every refused change (key: checkpoint value -> this run's value); returns the
  allowed changes as lines (also logged). A checkpoint without a saved config is let through with a warning.
  """
  if not saved:
    logging.warning('%s: the checkpoint holds no config to compare with; resuming without the check', where)
    return []
  old, new = _flat(saved), _flat(current)
  newer = sorted(set(new) - set(old))  # keys this version has and the checkpoint's did not
  if newer:
    logging.warning('%s: the checkpoint was written by a version without the config keys %s; resuming with '
                    'their values here', where, ', '.join(f'{k}={new[k]!r}' for k in newer))
  changes = [(k, old[k], new.get(k, '<absent>')) for k in sorted(old) if old[k] != new.get(k, '<absent>')]
  refused = [f'  {k}: {a!r} in the checkpoint, {b!r} now' for k, a, b in changes if _refused(k)]
  if refused:
    raise ConfigChangedError(
        f'cannot resume {where} with another config: these keys change the model, the data stream or the '
        'optimization:\n' + '\n'.join(refused) + '\nPut the checkpoint\'s values back, or train in a new --workdir.')
  allowed = [f'{k}: {a!r} -> {b!r}' for k, a, b in changes]
  for line in allowed:
    logging.info('resuming with a changed setting (it does not change what is trained): %s', line)
  return allowed
