"""What prepared data was made from: a fingerprint of a dataset's source folder, and the checks that can be made
before preparing it.

`fingerprint(name, manual_dir)`: the folder (absolute path), the annotation file's name, size, modification time
and SHA-256, and the image list (every file under imgs/ with its size and modification time, as one SHA-256 and a
count). Preparation stores it beside the prepared files (SOURCE_FILE); a later run whose source differs
prepares again, saying what changed (`differences`). Reading it costs one pass over the annotation file and one
directory walk (no image is opened).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from typing import Any

from input_pipeline.datasets import records

SOURCE_FILE = 'source.json'
# Prepared ArrayRecord files hold the encoded images as they are, the captions and their MLA texts: about the
# source's size (0.85x for SynthPEDES). The estimate asks for more, so that a build does not fill the disk.
SIZE_FACTOR, SIZE_MARGIN = 1.25, 64 << 20


def _sha256_of_file(path: str) -> str:
  h = hashlib.sha256()
  with open(path, 'rb') as f:
    for chunk in iter(lambda: f.read(1 << 20), b''):
      h.update(chunk)
  return h.hexdigest()


def fingerprint(name: str, manual_dir: str) -> dict[str, Any]:
  """-> a JSON-able dict describing the source folder of dataset `name` (ManualDirError when it has no
  annotation file)."""
  manual_dir = os.path.abspath(os.path.expanduser(manual_dir))
  json_file = records.find_json(name, manual_dir)
  st = os.stat(json_file)
  listing, count, total = hashlib.sha256(), 0, 0
  imgs = os.path.join(manual_dir, 'imgs')
  for dirpath, dirnames, filenames in os.walk(imgs):
    dirnames.sort()
    for fn in sorted(filenames):
      path = os.path.join(dirpath, fn)
      try:
        s = os.stat(path)
      except OSError:
        continue  # vanished while listed, or a dangling link: the build reports the records that need it
      listing.update(f'{os.path.relpath(path, imgs)}\0{s.st_size}\0{s.st_mtime_ns}\n'.encode('utf-8', 'replace'))
      count += 1
      total += s.st_size
  return {'manual_dir': manual_dir, 'annotation_file': os.path.basename(json_file),
          'annotation_size': st.st_size, 'annotation_mtime_ns': st.st_mtime_ns,
          'annotation_sha256': _sha256_of_file(json_file), 'images': count, 'images_bytes': total,
          'images_sha256': listing.hexdigest()}


def differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
  """What changed between two fingerprints, in words; [] when they describe the same source."""
  out = []
  if old.get('manual_dir') != new['manual_dir']:
    out.append(f'the folder was {old.get("manual_dir")}, now {new["manual_dir"]}')
  if old.get('annotation_file') != new['annotation_file']:
    out.append(f'the annotation file was {old.get("annotation_file")}, now {new["annotation_file"]}')
  elif old.get('annotation_sha256') != new['annotation_sha256']:
    out.append(f'{new["annotation_file"]} changed ({old.get("annotation_size")} -> {new["annotation_size"]} bytes)')
  if old.get('images') != new['images']:
    out.append(f'imgs/ held {old.get("images")} files, now {new["images"]}')
  elif old.get('images_sha256') != new['images_sha256']:
    out.append('files in imgs/ changed')
  return out


def read(dataset_dir: str) -> dict[str, Any] | None:
  """The fingerprint stored with prepared data, or None (prepared before fingerprints, or unreadable)."""
  try:
    with open(os.path.join(dataset_dir, SOURCE_FILE), encoding='utf-8') as f:
      found = json.load(f)
  except (OSError, ValueError):
    return None
  return found if isinstance(found, dict) else None


def write(dataset_dir: str, fp: dict[str, Any]) -> None:
  tmp = os.path.join(dataset_dir, f'.{SOURCE_FILE}.tmp{os.getpid()}')
  with open(tmp, 'w', encoding='utf-8') as f:
    json.dump(fp, f, indent=1)
  os.replace(tmp, os.path.join(dataset_dir, SOURCE_FILE))


def check_room(data_dir: str, fp: dict[str, Any], key: str = 'config.data.data_dir') -> None:
  """Before preparing: `data_dir` can be created and written, and its disk has room for the prepared data (by
  the estimate above). Raises OSError naming `key` otherwise."""
  try:
    os.makedirs(data_dir, exist_ok=True)
  except OSError as e:
    raise OSError(f'{key}: cannot create {data_dir} ({e.strerror or e})') from None
  if not os.access(data_dir, os.W_OK | os.X_OK):
    raise OSError(f'{key}: {data_dir} is not writable by this user')
  need = int((fp['images_bytes'] + fp['annotation_size']) * SIZE_FACTOR) + SIZE_MARGIN
  free = shutil.disk_usage(data_dir).free
  if free < need:
    raise OSError(f'{key}: preparing {fp["manual_dir"]} needs about {need / 2**30:.2f} GiB in {data_dir}; its disk '
                  f'has {free / 2**30:.2f} GiB free')
