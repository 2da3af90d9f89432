"""Paths the program reads and writes: local or mounted file systems; any URL scheme is refused by name.

`os.path.abspath('gs://bucket/run')` is '<cwd>/gs:/bucket/run': without this check a Cloud Storage workdir
would silently become a folder on the machine's own disk, lost with the machine. Until object stores are
supported natively, mount the bucket (Cloud Storage FUSE) and give the mounted path.
"""
from __future__ import annotations

import os
import re

_SCHEME = re.compile(r'^([A-Za-z][A-Za-z0-9+.-]*)://')


class UnsupportedPathError(ValueError):
  pass


def local(path: str, what: str) -> str:
  """`path` ('~' expanded) as an absolute local path; UnsupportedPathError naming `what` for a URL."""
  path = os.fspath(path)
  m = _SCHEME.match(path)
  if m:
    scheme = m.group(1)
    hint = (' For Cloud Storage, mount the bucket with Cloud Storage FUSE (gcsfuse --implicit-dirs BUCKET '
            '/mnt/BUCKET) and give the mounted path, e.g. /mnt/BUCKET/run.' if scheme.lower() in ('gs', 'gcs') else '')
    raise UnsupportedPathError(f'{what}={path!r}: {scheme}:// paths are not supported; this program reads and '
                               f'writes local or mounted file systems only.{hint}')
  return os.path.abspath(os.path.expanduser(path))
