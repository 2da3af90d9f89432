"""Source json parsers: CUHK-PEDES, ICFG-PEDES and RSTPReid -> one validated record shape.

The three datasets are given by their authors on request and are never downloaded here. Each parser
reads the user's copy (the "manual dir") and returns `Record`s:

  Record(image_path: str   path relative to <manual_dir>/imgs/, '/'-separated,
         file: str         absolute path of the image file,
         person_id: int    the dataset's own identity number (not remapped),
         captions: tuple[str, ...]  one or more non-empty descriptions,
         split: str        'train' | 'val' | 'test',
         index: int        position of the (first) record in the json list, for messages)

Layouts (`<manual_dir>` is the directory the user points `config.data.manual_dir` at):

  cuhk_pedes  <manual_dir>/reid_raw.json   [{split, captions, file_path, id, ...}, ...]
              <manual_dir>/imgs/<file_path>            e.g. imgs/CUHK01/0363004.png
              A SynthPEDES directory (input_pipeline/synthetic/) has this layout too.
  icfg_pedes  <manual_dir>/ICFG-PEDES.json (or ICFG_PEDES.json)  [{split, captions, file_path, id}, ...]
              <manual_dir>/imgs/<file_path>            e.g. imgs/test/0627/0627_010_05_0303afternoon_1591_0.jpg
  rstpreid    <manual_dir>/data_captions.json   [{id, img_path, captions, split}, ...]
              <manual_dir>/imgs/<img_path>              e.g. imgs/0000_c14_0031.jpg

Validation. Every record must have the format's fields with the right types: `id` a non-negative int,
the path field a non-empty relative str, `captions` a non-empty list of non-empty str, `split` one of
the format's split names; the image file must exist and decode with PIL (verify + full decode). A
problem raises `RecordError` naming the json file, the record index, and its id and path where known.
With `skip_bad_records=True` bad records are left out instead and listed in `ParseResult.bad`
(index, id, path, reason), so nothing is dropped silently.

Records that name the same image are merged into one record (their captions concatenated in json order)
when id and split agree; a disagreement is a bad record (the later one).

ICFG-PEDES validation split. ICFG-PEDES has only train and test. A deterministic val split is carved
from the training identities: the distinct ids of the valid training records are sorted, permuted by
`numpy.random.default_rng(VAL_SEED)` (VAL_SEED = 0), and the first max(1, round(fraction * n_ids)) ids
of the permutation become 'val' with all their images. The default fraction is 5% of the training ids
(`DEFAULT_ICFG_VAL_FRACTION`); 0 keeps every training id in train (no val split).
"""
import concurrent.futures
import contextlib
import dataclasses
import io
import json
import logging
import multiprocessing
import os
from typing import Any, Iterable, Sequence

import numpy as np
from PIL import Image

from input_pipeline import images

VAL_SEED = 0
DEFAULT_ICFG_VAL_FRACTION = 0.05


@dataclasses.dataclass(frozen=True)
class Record:
  """One image with its identity and captions (see the module docstring)."""
  image_path: str
  file: str
  person_id: int
  captions: tuple[str, ...]
  split: str
  index: int


@dataclasses.dataclass(frozen=True)
class BadRecord:
  """A record left out under skip_bad_records: where it was and why."""
  index: int
  person_id: Any
  image_path: Any
  reason: str

  def to_json(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


@dataclasses.dataclass
class ParseResult:
  """records: the valid records (merged per image); bad: those left out (skip_bad_records only); merged: json
  indices of records joined into an earlier one (same image, id and split); repeated_captions: captions written
  twice in one (merged) record; shared_captions: caption texts found on images of different people. The last
  two are kept as written, and counted."""
  name: str
  json_file: str
  records: list[Record]
  bad: list[BadRecord]
  merged: list[int] = dataclasses.field(default_factory=list)
  repeated_captions: int = 0
  shared_captions: int = 0

  def oddities(self) -> dict[str, int]:
    return {'num_merged_records': len(self.merged), 'num_repeated_captions': self.repeated_captions,
            'num_shared_captions': self.shared_captions}

  def split_sizes(self) -> dict[str, int]:
    sizes: dict[str, int] = {}
    for r in self.records:
      sizes[r.split] = sizes.get(r.split, 0) + 1
    return sizes

  def bad_report(self) -> dict[str, Any]:
    """The skip report, as written to bad_records.json."""
    return {'dataset': self.name, 'json_file': self.json_file, 'count': len(self.bad),
            'records': [b.to_json() for b in self.bad]}


class RecordError(ValueError):
  """A record of a source json is invalid (field, caption, split or image)."""


class ManualDirError(FileNotFoundError):
  """The manual dir or its json file is missing."""


@dataclasses.dataclass(frozen=True)
class SourceFormat:
  """How one dataset lays out its json and images."""
  name: str
  title: str
  json_names: tuple[str, ...]  # accepted names, the first is the canonical one
  path_key: str
  splits: tuple[str, ...]
  how_to_get: str


FORMATS = {
    'cuhk_pedes': SourceFormat(
        name='cuhk_pedes', title='CUHK-PEDES', json_names=('reid_raw.json',), path_key='file_path',
        splits=('train', 'val', 'test'),
        how_to_get=('CUHK-PEDES is given by its authors on request (Li et al., "Person Search with Natural '
                    'Language Description", CVPR 2017; see github.com/ShuangLI59/'
                    'Person-Search-with-Natural-Language-Description). A SynthPEDES directory written by '
                    'input_pipeline/synthetic/ has the same layout (config.data.synthetic.enabled=True '
                    'writes one).')),
    'icfg_pedes': SourceFormat(
        name='icfg_pedes', title='ICFG-PEDES', json_names=('ICFG-PEDES.json', 'ICFG_PEDES.json'),
        path_key='file_path', splits=('train', 'test'),
        how_to_get=('ICFG-PEDES is given by its authors on request (Ding et al., "Semantically '
                    'Self-Aligned Network for Text-to-Image Part-aware Person Re-identification", 2021; '
                    'see github.com/zifyloo/SSAN).')),
    'rstpreid': SourceFormat(
        name='rstpreid', title='RSTPReid', json_names=('data_captions.json',), path_key='img_path',
        splits=('train', 'val', 'test'),
        how_to_get=('RSTPReid is given by its authors on request (Zhu et al., "DSSL: Deep Surroundings-'
                    'person Separation Learning for Text-based Person Retrieval", ACM MM 2021; see '
                    'github.com/NjtechCVLab/RSTPReid-Dataset).')),
}


def get_format(name: str) -> SourceFormat:
  if name not in FORMATS:
    raise ValueError(f'Unknown dataset {name!r}; known: {sorted(FORMATS)}.')
  return FORMATS[name]


def expected_layout(name: str, manual_dir: str) -> str:
  """Text that says which files are expected where, and how to get them."""
  fmt = get_format(name)
  json_names = ' or '.join(fmt.json_names)
  return (f'{fmt.title} is expected in {manual_dir}:\n'
          f'  {os.path.join(manual_dir, fmt.json_names[0])}   (accepted names: {json_names}; a json list of '
          f'records with fields {_fields_text(fmt)})\n'
          f'  {os.path.join(manual_dir, "imgs")}/<{fmt.path_key}>   (the images, paths as in the json)\n'
          f'{fmt.how_to_get}')


def _fields_text(fmt: SourceFormat) -> str:
  return f'id, {fmt.path_key}, captions, split ({"|".join(fmt.splits)})'


def find_json(name: str, manual_dir: str) -> str:
  """Path of the format's json file in manual_dir; ManualDirError with the expected layout if absent."""
  fmt = get_format(name)
  manual_dir = os.path.abspath(os.path.expanduser(manual_dir))
  if not os.path.isdir(manual_dir):
    raise ManualDirError(f'Manual dir {manual_dir} does not exist.\n' + expected_layout(name, manual_dir))
  for json_name in fmt.json_names:
    path = os.path.join(manual_dir, json_name)
    if os.path.isfile(path):
      return path
  hint = ''
  if name == 'cuhk_pedes' and os.path.isfile(os.path.join(manual_dir, 'caption_all.json')):
    hint = ('\nFound caption_all.json, which has no train/val/test split: the split assignment is in '
            'reid_raw.json, shipped with the same dataset.')
  raise ManualDirError(f'{" / ".join(fmt.json_names)} not found in {manual_dir}.{hint}\n'
                       + expected_layout(name, manual_dir))


def check_image(file: str) -> None:
  """Raises ValueError naming `file` if it is missing or is not an image that training would decode: PIL's
  verify (structure, checksums), then the full decode by `input_pipeline.images` (size limit, modes)."""
  if not os.path.isfile(file):
    raise ValueError(f'image file {file} does not exist or is not a regular file')
  try:
    data = images.read_file(file)
  except OSError as e:
    raise ValueError(f'image file {file} cannot be read ({type(e).__name__}: {e})') from None
  try:
    images.decode(data, name=file)
  except images.ImageError as e:
    raise ValueError(f'image file {file} does not decode: {e.reason}') from None
  try:
    with Image.open(io.BytesIO(data)) as im:
      im.verify()  # structure and checksums (a full decode does not check every one)
  except Exception as e:  # PIL raises many types (OSError, SyntaxError, ValueError, ...).
    raise ValueError(f'image file {file} does not decode ({type(e).__name__}: {e})') from None


def _check_image_or_reason(file: str) -> str | None:
  try:
    check_image(file)
  except ValueError as e:
    return str(e)
  return None


def carve_val_ids(ids: Iterable[int], fraction: float, seed: int = VAL_SEED) -> set[int]:
  """Identities moved from train to val: first max(1, round(fraction * n)) of a seeded permutation.

  Args:
    ids: training identities (any order, duplicates allowed).
    fraction: in [0, 1); 0 returns an empty set.
    seed: permutation seed.
  Returns:
    the set of val identities.
  """
  if not 0.0 <= fraction < 1.0:
    raise ValueError(f'val_fraction_ids must be in [0, 1), got {fraction}.')
  ids = sorted(set(ids))
  if fraction == 0.0 or not ids:
    return set()
  n_val = max(1, int(round(fraction * len(ids))))
  if n_val >= len(ids):
    raise ValueError(f'val_fraction_ids={fraction} would move all {len(ids)} training ids to val.')
  perm = np.random.default_rng(seed).permutation(len(ids))
  return {ids[i] for i in perm[:n_val]}


def _describe(fmt: SourceFormat, json_file: str, index: int, item: Any) -> str:
  where = f'{json_file}: record {index}'
  if isinstance(item, dict):
    known = [f'{k}={item[k]!r}' for k in ('id', fmt.path_key) if k in item]
    if known:
      where += f' ({", ".join(known)})'
  return where


def _validate_fields(fmt: SourceFormat, item: Any, imgs_dir: str) -> tuple[str, str, int, tuple[str, ...], str]:
  """Checks one json item's fields; returns (image_path, file, id, captions, split) or raises ValueError."""
  if not isinstance(item, dict):
    raise ValueError(f'expected a json object, got {type(item).__name__}')
  missing = [k for k in ('id', fmt.path_key, 'captions', 'split') if k not in item]
  if missing:
    raise ValueError(f'missing field(s) {missing}; a record needs {_fields_text(fmt)}')
  pid = item['id']
  if isinstance(pid, bool) or not isinstance(pid, int):
    raise ValueError(f'field "id" must be an int, got {type(pid).__name__} {pid!r}')
  if pid < 0:
    raise ValueError(f'field "id" must be >= 0, got {pid}')
  path = item[fmt.path_key]
  if not isinstance(path, str):
    raise ValueError(f'field "{fmt.path_key}" must be a str, got {type(path).__name__} {path!r}')
  path = path.replace('\\', '/').strip()
  if not path or path.startswith('/') or '..' in path.split('/'):
    raise ValueError(f'field "{fmt.path_key}" must be a non-empty path relative to imgs/, got {path!r}')
  captions = item['captions']
  if not isinstance(captions, list):
    raise ValueError(f'field "captions" must be a list of str, got {type(captions).__name__}')
  if not captions:
    raise ValueError('field "captions" is an empty list')
  for j, c in enumerate(captions):
    if not isinstance(c, str):
      raise ValueError(f'caption {j} must be a str, got {type(c).__name__} {c!r}')
    if not c.strip():
      raise ValueError(f'caption {j} is empty')
  split = item['split']
  if not isinstance(split, str):
    raise ValueError(f'field "split" must be a str, got {type(split).__name__} {split!r}')
  if split not in fmt.splits:
    raise ValueError(f'unknown split {split!r}; {fmt.title} splits are {"|".join(fmt.splits)}')
  file = os.path.join(imgs_dir, *path.split('/'))
  if not os.path.isfile(file):
    raise ValueError(f'image file {file} does not exist or is not a regular file')
  return path, file, pid, tuple(captions), split


Workers = int | concurrent.futures.Executor


@contextlib.contextmanager
def process_pool(workers: int):
  """Yields None for workers <= 1, else a process pool to pass as `workers` to the functions here.

  Processes are spawned (not forked), which is safe after jax or other threads have started; as with
  any spawned pool, a script that calls this must guard its entry point with
  `if __name__ == '__main__':`.
  """
  if workers <= 1:
    yield None
    return
  ctx = multiprocessing.get_context('spawn')
  with concurrent.futures.ProcessPoolExecutor(max_workers=workers, mp_context=ctx,
                                              initializer=_warm_worker) as ex:
    yield ex


def _warm_worker() -> None:
  """Loads NLTK and the tagger in a pool process as soon as it starts."""
  from input_pipeline import text  # pylint: disable=g-import-not-at-top
  text.mla_texts('A man in a black jacket.')


# Below these counts the work stays in this process: a spawned process needs a few seconds to start
# (imports, tagger), about the time of 1000 captions' MLA texts or several thousand image checks.
POOL_MIN_IMAGES = 4000
POOL_MIN_CAPTIONS = 1000


def _map(fn, items: Sequence[Any], workers: Workers | None, min_items: int, chunksize: int = 64) -> list[Any]:
  """fn over items, in order: in this process, in the given pool, or in a new pool of `workers`."""
  if workers is None or len(items) < max(min_items, 2 * chunksize):
    return [fn(x) for x in items]
  if isinstance(workers, concurrent.futures.Executor):
    return list(workers.map(fn, items, chunksize=chunksize))
  if workers <= 1:
    return [fn(x) for x in items]
  with process_pool(workers) as ex:
    return list(ex.map(fn, items, chunksize=chunksize))


def _caption_key(caption: str) -> str:
  return ' '.join(caption.lower().split())


def _caption_oddities(records: Sequence['Record']) -> tuple[int, int]:
  """-> (captions repeated within a record, caption texts on images of more than one person id)."""
  repeated, people = 0, {}
  for r in records:
    keys = [_caption_key(c) for c in r.captions]
    repeated += len(keys) - len(set(keys))
    for k in set(keys):
      people.setdefault(k, set()).add(r.person_id)
  return repeated, sum(1 for ids in people.values() if len(ids) > 1)


def parse_records(name: str, manual_dir: str, *, skip_bad_records: bool = False,
                  val_fraction_ids: float | None = None, check_images: bool = True,
                  workers: Workers = 1) -> ParseResult:
  """Reads and validates a dataset's json (see the module docstring).

  Args:
    name: 'cuhk_pedes' | 'icfg_pedes' | 'rstpreid'.
    manual_dir: the user's copy (json + imgs/); '~' is expanded.
    skip_bad_records: leave bad records out (listed in `.bad`) instead of raising RecordError.
    val_fraction_ids: ICFG-PEDES only: fraction of training ids carved into 'val' (None: 5%).
    check_images: decode every image with PIL (existence is always checked).
    workers: processes for the image check, or a `process_pool`.
  Returns:
    ParseResult with records in json order (merged per image) and the bad ones.
  """
  fmt = get_format(name)
  json_file = find_json(name, manual_dir)
  imgs_dir = os.path.join(os.path.dirname(json_file), 'imgs')
  try:
    with open(json_file, encoding='utf-8-sig') as f:  # UTF-8, with or without the byte-order mark
      items = json.load(f)
  except UnicodeDecodeError as e:
    raise RecordError(f'{json_file}: not UTF-8 text ({e}); json files are read as UTF-8.') from None
  except json.JSONDecodeError as e:
    raise RecordError(f'{json_file}: not valid json ({e}).') from None
  if not isinstance(items, list):
    keys = f' with keys {sorted(items)[:5]}' if isinstance(items, dict) else ''
    raise RecordError(f'{json_file}: expected a json list of records ({_fields_text(fmt)}), '
                      f'got {type(items).__name__}{keys}.')

  bad: list[BadRecord] = []

  def fail(index: int, item: Any, reason: str) -> None:
    if not skip_bad_records:
      raise RecordError(f'{_describe(fmt, json_file, index, item)}: {reason}.')
    get = item.get if isinstance(item, dict) else (lambda k: None)
    bad.append(BadRecord(index=index, person_id=get('id'), image_path=get(fmt.path_key), reason=reason))

  checked: list[tuple[int, tuple[str, str, int, tuple[str, ...], str]]] = []
  for index, item in enumerate(items):
    try:
      checked.append((index, _validate_fields(fmt, item, imgs_dir)))
    except ValueError as e:
      fail(index, item, str(e))

  if check_images:
    reasons = _map(_check_image_or_reason, [c[1][1] for c in checked], workers, POOL_MIN_IMAGES)
    kept = []
    for (index, fields), reason in zip(checked, reasons):
      if reason is None:
        kept.append((index, fields))
      else:
        fail(index, items[index], reason)
    checked = kept

  merged: dict[str, Record] = {}
  joined: list[int] = []
  for index, (path, file, pid, captions, split) in checked:
    prev = merged.get(path)
    if prev is None:
      merged[path] = Record(path, file, pid, captions, split, index)
    elif (prev.person_id, prev.split) != (pid, split):
      fail(index, items[index], f'names the same image as record {prev.index} with a different id/split '
                                f'(id={prev.person_id}, split={prev.split!r})')
    else:
      merged[path] = dataclasses.replace(prev, captions=prev.captions + captions)
      joined.append(index)
  records = list(merged.values())
  repeated, shared = _caption_oddities(records)

  if 'val' in fmt.splits:
    if val_fraction_ids:
      logging.info('%s has its own val split: val_fraction_ids=%s is not used.', fmt.title, val_fraction_ids)
  else:
    fraction = DEFAULT_ICFG_VAL_FRACTION if val_fraction_ids is None else float(val_fraction_ids)
    val_ids = carve_val_ids([r.person_id for r in records if r.split == 'train'], fraction)
    records = [dataclasses.replace(r, split='val') if r.split == 'train' and r.person_id in val_ids else r
               for r in records]

  bad.sort(key=lambda b: b.index)
  if bad:
    logging.warning('%s: skipped %d bad record(s) (skip_bad_records=True): %s', json_file, len(bad),
                    '; '.join(f'record {b.index} (id={b.person_id!r}, {fmt.path_key}={b.image_path!r}): '
                              f'{b.reason}' for b in bad[:20]) + (' ...' if len(bad) > 20 else ''))
  return ParseResult(name=name, json_file=json_file, records=records, bad=bad, merged=joined,
                     repeated_captions=repeated, shared_captions=shared)


def mla_json(caption: str) -> tuple[str, str]:
  """A caption's MLA phrases and attributes (text.mla_texts), each a JSON-encoded list of str."""
  from input_pipeline import text  # pylint: disable=g-import-not-at-top (nltk, loaded on use)
  t = text.mla_texts(caption)
  return json.dumps(t['phrases'], ensure_ascii=False), json.dumps(t['attributes'], ensure_ascii=False)


def mla_json_for(records: Sequence[Record], workers: Workers = 1) -> list[tuple[list[str], list[str]]]:
  """Per record, ([phrases JSON per caption], [attributes JSON per caption]), each caption once.

  Args:
    records: the records.
    workers: processes (1: this process), or a `process_pool`.
  Returns:
    a list aligned with `records`; each inner list aligned with the record's captions.
  """
  unique = list(dict.fromkeys(c for r in records for c in r.captions))
  texts = dict(zip(unique, _map(mla_json, unique, workers, POOL_MIN_CAPTIONS)))
  return [([texts[c][0] for c in r.captions], [texts[c][1] for c in r.captions]) for r in records]
