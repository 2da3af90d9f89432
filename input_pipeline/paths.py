"""Paths the program reads and writes: local (or mounted) paths, and Cloud Storage (`gs://bucket/...`).

`resolve(path, what)` is where every user-given path enters: a local path becomes absolute ('~' expanded); a
`gs://` path stays a URL and is read and written through etils' epath (TensorFlow's GCS client where TensorFlow
is installed, else gcsfs), Orbax and TensorStore; any other scheme (s3://, https://, ...) is refused by name.
`os.path.abspath('gs://bucket/run')` would be '<cwd>/gs:/bucket/run', a folder on the machine's own disk, lost
with the machine: no path reaches `os` without passing here.

`local(path, what)` is for what must be on a local disk (SentencePiece training, raw dataset folders, image
folders to index, a web server's files): a gs:// path is refused there with what to do instead.

Cloud Storage has no rename: a single object appears whole when its upload completes, so `write_*_atomic`
writes an object directly; on a local disk it writes a temporary file and renames it.
"""
from __future__ import annotations

import os
import posixpath
import re
import shutil
from typing import Iterator

_SCHEME = re.compile(r'^([A-Za-z][A-Za-z0-9+.-]*)://')
REMOTE_SCHEMES = ('gs',)
COPY_CHUNK = 16 << 20


class UnsupportedPathError(ValueError):
  pass


def scheme(path) -> str:
  m = _SCHEME.match(os.fspath(path))
  return m.group(1).lower() if m else ''


def is_remote(path) -> bool:
  return scheme(path) in REMOTE_SCHEMES


def resolve(path, what: str) -> str:
  """A local path made absolute, or a gs:// URL (trailing '/' removed); UnsupportedPathError for other URLs."""
  path = os.fspath(path)
  s = scheme(path)
  if s in REMOTE_SCHEMES:
    if not path[len(s) + 3:].strip('/'):
      raise UnsupportedPathError(f'{what}={path!r}: name a bucket, e.g. gs://BUCKET/run')
    return s + path[len(s):].rstrip('/')  # GS://b -> gs://b
  if s:
    raise UnsupportedPathError(
        f'{what}={path!r}: {s}:// paths are not supported; this program reads and writes local or mounted file '
        'systems and Cloud Storage (gs://BUCKET/...). Copy the data to one of those, or mount it.')
  return os.path.abspath(os.path.expanduser(path))


def local(path, what: str) -> str:
  """`path` as an absolute local path; UnsupportedPathError naming `what` for a URL (gs:// included)."""
  path = os.fspath(path)
  if is_remote(path):
    raise UnsupportedPathError(
        f'{what}={path!r}: this must be on a local (or mounted) disk. Copy it to one (gcloud storage cp -r '
        f'{path} /some/dir) or mount the bucket with Cloud Storage FUSE (gcsfuse --implicit-dirs BUCKET '
        '/mnt/BUCKET) and give the local path.')
  return resolve(path, what)


def epath(path):
  from etils import epath as _epath  # pylint: disable=g-import-not-at-top (imported when first needed)
  return _epath.Path(path)


def join(base: str, *parts: str) -> str:
  return posixpath.join(base, *parts) if is_remote(base) else os.path.join(base, *parts)


def dirname(path: str) -> str:
  return posixpath.dirname(path) if is_remote(path) else os.path.dirname(path)


def exists(path: str) -> bool:
  return epath(path).exists() if is_remote(path) else os.path.exists(path)


def isfile(path: str) -> bool:
  return epath(path).is_file() if is_remote(path) else os.path.isfile(path)


def isdir(path: str) -> bool:
  return epath(path).is_dir() if is_remote(path) else os.path.isdir(path)


def listdir(path: str) -> list[str]:
  if is_remote(path):
    return sorted(p.name for p in epath(path).iterdir())
  return sorted(os.listdir(path))


def makedirs(path: str) -> None:
  if is_remote(path):
    epath(path).mkdir(parents=True, exist_ok=True)  # object stores have no folders; harmless
  else:
    os.makedirs(path, exist_ok=True)


def read_bytes(path: str) -> bytes:
  if is_remote(path):
    return epath(path).read_bytes()
  with open(path, 'rb') as f:
    return f.read()


def read_text(path: str) -> str:
  return read_bytes(path).decode('utf-8')


def write_bytes_atomic(path: str, data: bytes) -> None:
  """Readers see the old content or the new, never a part."""
  if is_remote(path):
    epath(path).write_bytes(data)
    return
  os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
  tmp = f'{path}.tmp{os.getpid()}'
  with open(tmp, 'wb') as f:
    f.write(data)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def write_text_atomic(path: str, text: str) -> None:
  write_bytes_atomic(path, text.encode('utf-8'))


def remove(path: str) -> None:
  if is_remote(path):
    epath(path).unlink(missing_ok=True)
  elif os.path.lexists(path):
    os.remove(path)


def rmtree(path: str) -> None:
  if is_remote(path):
    p = epath(path)
    if p.exists():
      p.rmtree()
  else:
    shutil.rmtree(path, ignore_errors=True)


def walk_files(root: str) -> Iterator[str]:
  """Relative paths ('/'-separated) of every file under `root`, sorted."""
  if is_remote(root):
    out, todo = [], [(epath(root), '')]
    while todo:
      d, prefix = todo.pop()
      for p in d.iterdir():
        if p.is_dir():
          todo.append((p, prefix + p.name + '/'))
        else:
          out.append(prefix + p.name)
    yield from sorted(out)
    return
  out = []
  for d, _, files in os.walk(root):
    rel = os.path.relpath(d, root)
    out.extend(f if rel == '.' else posixpath.join(*rel.split(os.sep), f) for f in files)
  yield from sorted(out)


def copy_file(src: str, dst: str) -> None:
  """Streams one file between any two supported places (local <-> gs://); the target appears whole."""
  if not is_remote(dst):
    os.makedirs(os.path.dirname(dst) or '.', exist_ok=True)
    tmp = f'{dst}.tmp{os.getpid()}'
    with (epath(src).open('rb') if is_remote(src) else open(src, 'rb')) as f, open(tmp, 'wb') as g:
      shutil.copyfileobj(f, g, COPY_CHUNK)
    os.replace(tmp, dst)
    return
  with (epath(src).open('rb') if is_remote(src) else open(src, 'rb')) as f, epath(dst).open('wb') as g:
    shutil.copyfileobj(f, g, COPY_CHUNK)


def move_tree(src: str, dst: str) -> None:
  """Moves a directory; on Cloud Storage (no rename) by copying each object, then deleting the source."""
  if not is_remote(src) and not is_remote(dst):
    os.makedirs(os.path.dirname(dst) or '.', exist_ok=True)
    os.replace(src, dst)
    return
  for rel in list(walk_files(src)):
    copy_file(join(src, rel), join(dst, rel))
  rmtree(src)
