"""The image index on disk: a small JSON header, row metadata in Parquet shards, embeddings in append-only .npy
shards (memory-mapped when read), and the list of rows dropped since; reading today's and the first format.

  INDEX/
    index.json                    the header, written last and atomically: format, version 2, generation, the
                                  model identity, config, tokenizer and checkpoint, the indexed roots, dim, the
                                  shards in row order [{name, rows, dtype}], the deleted and unreadable files
                                  of this generation, stats
    shards/<name>.npy             the shard's (n, D) embeddings, float32 or float16 (rows start..start+n-1)
    shards/<name>.parquet         the shard's rows: path, size, mtime_ns and the columns of frames from video
                                  (source, frame_time, frame_index, x0, y0, x1, y1, score, track; empty for a
                                  crop); written after the .npy, so a shard is complete when its .parquet exists;
                                  its schema metadata names the model fingerprint, rows, dim and dtype
    deleted-<generation>.npy      the rows no longer in the index (sorted int64: their file vanished or changed
                                  after the shard was written); they keep their number until `compact`
    unreadable-<generation>.json  [{path, size, mtime_ns, error}] files that could not be read
    ann/                          saved approximate indexes (ivt_jax/search/ann.py)

An update writes new shards, then a new header naming them and a new deleted list: old shards are never
rewritten, so writing grows with what changed, not with the index. A reader opens the header and the files it
names: it sees the old index or the new one, never half of one. Row r is row r - start of the shard holding it.
`compact` rewrites the live rows into new shards (row numbers change; the approximate index is rebuilt);
`convert` turns a first-format index (manifest.json with one JSON entry per row, one embeddings file) into this
one. Both formats open with `open_index`.
"""
from __future__ import annotations

import dataclasses
import functools
import io
import json
import os
import time
from typing import Callable, Iterator, Optional, Sequence

import numpy as np

from input_pipeline import paths

HEADER = 'index.json'
MANIFEST_V1 = 'manifest.json'
SHARDS = 'shards'
FORMAT = 'ivt-jax-image-index'
VERSION = 2
DTYPES = ('float32', 'float16')
BLOCK_ROWS = 1 << 16  # rows scored per matrix product when a shard must be converted (float16)

# Row metadata: a crop has path, size and mtime_ns; a person found in a frame of a video also has the others.
COLUMNS = (('path', 'string'), ('size', 'int64'), ('mtime_ns', 'int64'), ('source', 'string'),
           ('frame_time', 'float64'), ('frame_index', 'int64'), ('x0', 'float32'), ('y0', 'float32'),
           ('x1', 'float32'), ('y1', 'float32'), ('score', 'float32'), ('track', 'int64'))


def _pa():
  import pyarrow  # pylint: disable=g-import-not-at-top
  import pyarrow.parquet  # pylint: disable=g-import-not-at-top,unused-import
  return pyarrow


def schema(metadata: Optional[dict] = None):
  pa = _pa()
  return pa.schema([pa.field(name, getattr(pa, kind)()) for name, kind in COLUMNS],
                   metadata={k: json.dumps(v) for k, v in (metadata or {}).items()})


def rows_table(rows: Sequence[dict], metadata: Optional[dict] = None):
  """[{path, size, mtime_ns, ...}] -> a pyarrow Table of COLUMNS (absent columns null)."""
  pa = _pa()
  s = schema(metadata)
  return pa.Table.from_pydict({name: [r.get(name) for r in rows] for name, _ in COLUMNS}, schema=s)


# ---- reading ------------------------------------------------------------------------------------


@dataclasses.dataclass
class Shard:
  """Rows start..start+len(embeddings)-1 of an index."""
  name: str
  start: int
  embeddings: np.ndarray           # (n, D) float32 or float16; memory-mapped for a local index
  _table: object = None            # pyarrow Table of the rows (read when first asked for)
  _table_path: str = ''
  _paths: object = None            # pyarrow array of the rows' paths (read at open)
  _footage: Optional[bool] = None  # whether any row has a box (from the Parquet footer's statistics)

  @property
  def path_column(self):
    return self._paths if self._paths is not None else self.table.column('path')

  @property
  def n(self) -> int:
    return int(self.embeddings.shape[0])

  @property
  def table(self):
    if self._table is None:
      self._table = _read_table(self._table_path)
    return self._table

  @property
  def has_footage(self) -> bool:
    """Whether any row is a person found in footage (has a box); read from the Parquet footer's null counts of
    x0, so a shard of crops is never read whole for it."""
    if self._footage is None:
      if self._table is not None or not self._table_path:
        self._footage = self.table.column('x0').null_count < self.table.num_rows
      else:
        meta = _pa().parquet.read_metadata(_source(self._table_path))
        col = meta.schema.names.index('x0')
        self._footage = False
        for g in range(meta.num_row_groups):
          stats = meta.row_group(g).column(col).statistics
          if stats is None or not stats.has_null_count or stats.null_count < meta.row_group(g).num_rows:
            self._footage = True
            break
    return self._footage


def _source(path: str):
  """What pyarrow reads a file from: its local path, or a gs:// object's bytes."""
  return _pa().BufferReader(paths.read_bytes(path)) if paths.is_remote(path) else path


def _read_table(path: str, columns: Optional[Sequence[str]] = None):
  return _pa().parquet.read_table(_source(path), columns=list(columns) if columns else None)


def read_rows(directory: str, name: str, columns: Optional[Sequence[str]] = None):
  """Shard `name`'s rows (these columns) as a pyarrow Table."""
  return _read_table(paths.join(directory, SHARDS, name + '.parquet'), columns)


def _read_npy(path: str) -> np.ndarray:
  if paths.is_remote(path):
    return np.load(io.BytesIO(paths.read_bytes(path)))
  return np.load(path, mmap_mode='r')


class Index:
  """An opened index (either format). Rows are numbered over its shards in order; `deleted` rows stay numbered
  but are never returned. Scoring streams the (memory-mapped) shards; nothing per row is a Python object."""

  def __init__(self, directory: str, header: dict, shards: list[Shard], deleted: np.ndarray,
               unreadable: list[dict]):
    self.directory, self.header, self.shards = directory, header, shards
    self.deleted = np.asarray(deleted, np.int64)
    self.unreadable = unreadable
    self.starts = np.asarray([s.start for s in shards], np.int64)
    self.dim = int(header.get('dim') or (shards[0].embeddings.shape[1] if shards else 0))

  @property
  def version(self) -> int:
    return int(self.header.get('version', 0))

  def __len__(self) -> int:
    """Rows numbered (the deleted included): valid row numbers are 0..len-1."""
    return int(self.shards[-1].start + self.shards[-1].n) if self.shards else 0

  @property
  def live(self) -> int:
    """Rows that are in the index."""
    return len(self) - len(self.deleted)

  def is_live(self, row: int) -> bool:
    if not 0 <= row < len(self):
      return False
    i = np.searchsorted(self.deleted, row)
    return not (i < len(self.deleted) and self.deleted[i] == row)

  @functools.cached_property
  def live_rows(self) -> np.ndarray:
    """(live,) int64 row numbers in order."""
    mask = np.ones(len(self), bool)
    mask[self.deleted] = False
    return np.flatnonzero(mask)

  def _locate(self, row: int) -> tuple[Shard, int]:
    if not 0 <= row < len(self):
      raise IndexError(f'no row {row}: the index numbers 0..{len(self) - 1}')
    s = self.shards[int(np.searchsorted(self.starts, row, side='right')) - 1]
    return s, int(row - s.start)

  def vector(self, row: int) -> np.ndarray:
    s, i = self._locate(int(row))
    return np.asarray(s.embeddings[i], np.float32)

  def gather(self, rows: np.ndarray) -> np.ndarray:
    """(n,) rows -> (n, D) float32, read from the shards holding them."""
    rows = np.asarray(rows, np.int64)
    out = np.empty((len(rows), self.dim), np.float32)
    which = np.searchsorted(self.starts, rows, side='right') - 1
    for k in np.unique(which):
      sel = np.flatnonzero(which == k)
      s = self.shards[int(k)]
      local = rows[sel] - s.start
      order = np.argsort(local)  # sorted reads of a memory-mapped file
      out[sel[order]] = s.embeddings[local[order]]
    return out

  def blocks(self, block_rows: int = BLOCK_ROWS) -> Iterator[tuple[int, np.ndarray]]:
    """(first row, (b, D) float32 block) over every row, deleted included, in order."""
    for s in self.shards:
      for a in range(0, s.n, block_rows):
        yield s.start + a, np.asarray(s.embeddings[a:a + block_rows], np.float32)

  def scores(self, queries: np.ndarray) -> np.ndarray:
    """(D,) -> (N,), or (Q, D) -> (Q, N) float32 dot products; deleted rows score -inf."""
    q = np.asarray(queries, np.float32)
    single = q.ndim == 1
    q2 = q[None] if single else q
    out = np.empty((len(q2), len(self)), np.float32)
    for s in self.shards:
      if s.embeddings.dtype == np.float32:
        out[:, s.start:s.start + s.n] = q2 @ np.asarray(s.embeddings).T
      else:
        for a in range(0, s.n, BLOCK_ROWS):
          blk = np.asarray(s.embeddings[a:a + BLOCK_ROWS], np.float32)
          out[:, s.start + a:s.start + a + len(blk)] = q2 @ blk.T
    out[:, self.deleted] = -np.inf
    return out[0] if single else out

  def entry(self, row: int) -> dict:
    """Row `row`'s metadata {path, size, mtime_ns, ...} (the columns that are set)."""
    s, i = self._locate(int(row))
    return {k: v for k, v in s.table.slice(i, 1).to_pylist()[0].items() if v is not None}

  def footage_entry(self, row: int) -> dict:
    """`entry(row)` for a person found in footage; {path} for a crop of a shard that holds only crops (its
    other columns are not read: serving a large index of crops reads nothing more than its paths)."""
    s, i = self._locate(int(row))
    if not s.has_footage:
      return {'path': s.path_column[i].as_py()}
    return self.entry(row)

  def path(self, row: int) -> str:
    s, i = self._locate(int(row))
    return s.path_column[i].as_py()

  @functools.cached_property
  def paths(self) -> list[str]:
    """Every live row's file in row order (a Python list: for small indexes and tests)."""
    if not self.shards:
      return []
    return _pa().chunked_array([c for s in self.shards for c in s.path_column.chunks]).take(
        self.live_rows).to_pylist()

  def dense(self) -> np.ndarray:
    """(live, D) float32 copy of the live rows' embeddings in row order (small indexes and tests)."""
    return self.gather(self.live_rows)

  def columns(self, names: Sequence[str]):
    """A pyarrow Table of these columns over every row (deleted included), in row order."""
    return _pa().concat_tables([s.table.select(list(names)) for s in self.shards]) if self.shards else \
        schema().empty_table().select(list(names))


class NotAnIndexError(FileNotFoundError):
  pass


def header_path(directory: str) -> str:
  return paths.join(directory, HEADER)


def exists(directory: str) -> bool:
  return paths.isfile(paths.join(directory, HEADER)) or paths.isfile(paths.join(directory, MANIFEST_V1))


def open_index(directory: str) -> Index:
  """Opens INDEX (index.json, or a first-format manifest.json); checks the files agree."""
  directory = paths.resolve(directory, 'index directory')
  hp = header_path(directory)
  if not paths.isfile(hp):
    if paths.isfile(paths.join(directory, MANIFEST_V1)):
      return _open_v1(directory)
    raise NotAnIndexError(f'{directory} is not an index (no {HEADER}); build one with '
                          '`python -m ivt_jax.search index`')
  try:
    header = json.loads(paths.read_text(hp))
  except ValueError as e:
    raise ValueError(f'{hp}: not JSON ({e})') from None
  if header.get('format') != FORMAT or header.get('version') != VERSION:
    raise ValueError(f'{hp}: not an {FORMAT} version {VERSION} header (format {header.get("format")!r}, '
                     f'version {header.get("version")!r})')
  shards, start = [], 0
  for sh in header['shards']:
    emb_path = paths.join(directory, SHARDS, sh['name'] + '.npy')
    emb = _read_npy(emb_path)
    if emb.ndim != 2 or len(emb) != sh['rows'] or (len(emb) and emb.shape[1] != header['dim']):
      raise ValueError(f'{emb_path} holds {emb.shape} embeddings where {hp} says ({sh["rows"]}, {header["dim"]}): '
                       'the index is damaged; rebuild it (index --rebuild)')
    # The paths are read now (one Arrow column, no per-row objects): results keep their names while a
    # compaction removes the files (the mapped .npy stays readable after the file is unlinked); the other
    # columns when first asked for.
    rows_path = paths.join(directory, SHARDS, sh['name'] + '.parquet')
    names = read_rows(directory, sh['name'], ['path']).column('path')
    if len(names) != len(emb):
      raise ValueError(f'{rows_path} holds {len(names)} rows for {len(emb)} embeddings: the index is damaged; '
                       'rebuild it (index --rebuild)')
    shards.append(Shard(sh['name'], start, emb, _table_path=rows_path, _paths=names))
    start += len(emb)
  deleted = np.zeros((0,), np.int64)
  if header.get('deleted'):
    deleted = np.asarray(_read_npy(paths.join(directory, header['deleted'])), np.int64)
  unreadable = json.loads(paths.read_text(paths.join(directory, header['unreadable']))) \
      if header.get('unreadable') else []
  if len(deleted) and (deleted[0] < 0 or deleted[-1] >= start):
    raise ValueError(f'{paths.join(directory, header["deleted"])} names rows outside 0..{start - 1}: the index is '
                     'damaged; rebuild it (index --rebuild)')
  return Index(directory, header, shards, deleted, unreadable)


def _open_v1(directory: str) -> Index:
  """A first-format index: manifest.json (one JSON entry per row) and one embeddings .npy, read as one shard."""
  path = paths.join(directory, MANIFEST_V1)
  manifest = json.loads(paths.read_text(path))
  if manifest.get('format') != FORMAT or manifest.get('version') != 1:
    raise ValueError(f'{path}: not an {FORMAT} version 1 manifest (format {manifest.get("format")!r}, '
                     f'version {manifest.get("version")!r})')
  emb_path = paths.join(directory, manifest['embeddings'])
  emb = _read_npy(emb_path)
  entries = manifest.pop('entries')
  if emb.ndim != 2 or len(emb) != len(entries):
    raise ValueError(f'{emb_path} holds {emb.shape} embeddings for {len(entries)} entries in {path}: rebuild '
                     'the index (index --rebuild)')
  unreadable = manifest.pop('unreadable', [])
  header = dict(manifest, dim=int(emb.shape[1]) if len(entries) else 0,
                shards=[{'name': os.path.splitext(manifest['embeddings'])[0], 'rows': len(entries),
                         'dtype': str(emb.dtype)}])
  shard = Shard(header['shards'][0]['name'], 0, emb, _table=rows_table(entries))
  return Index(directory, header, [shard] if entries else [], np.zeros((0,), np.int64), unreadable)


# ---- writing ------------------------------------------------------------------------------------


def shard_dir(directory: str) -> str:
  return paths.join(directory, SHARDS)


def write_shard(directory: str, name: str, rows, embeddings: np.ndarray, dtype: str, fingerprint: str,
                files: Sequence = ()) -> dict:
  """Writes shards/<name>.npy, then shards/<name>.parquet (the shard is complete once it exists) -> its header
  entry. `rows`: a list of row dicts or a pyarrow Table of COLUMNS; `files`: the progress records of the files
  of footage it accounts for (ivt_jax/search/update.py), kept in its schema metadata."""
  if dtype not in DTYPES:
    raise ValueError(f'embedding dtype {dtype!r}: one of {", ".join(DTYPES)}')
  emb = np.asarray(embeddings, dtype)
  buf = io.BytesIO()
  np.save(buf, emb)
  paths.write_bytes_atomic(paths.join(directory, SHARDS, name + '.npy'), buf.getvalue())
  meta = {'fingerprint': fingerprint, 'rows': int(len(emb)), 'dim': int(emb.shape[1]), 'dtype': dtype}
  if files:
    meta['files'] = list(files)
  table = rows_table(rows, meta) if isinstance(rows, list) else rows.replace_schema_metadata(
      {k: json.dumps(v) for k, v in meta.items()})
  if table.num_rows != len(emb):
    raise ValueError(f'shard {name}: {table.num_rows} rows for {len(emb)} embeddings')
  buf = io.BytesIO()
  _pa().parquet.write_table(table, buf, compression='zstd')
  paths.write_bytes_atomic(paths.join(directory, SHARDS, name + '.parquet'), buf.getvalue())
  return {'name': name, 'rows': int(len(emb)), 'dtype': dtype}


def shard_meta(directory: str, name: str) -> Optional[dict]:
  """The schema metadata of shards/<name>.parquet (None when it cannot be read: an incomplete shard)."""
  try:
    raw = _pa().parquet.read_schema(_source(paths.join(directory, SHARDS, name + '.parquet'))).metadata
    return {k.decode(): json.loads(v) for k, v in (raw or {}).items()}
  except (OSError, ValueError) as e:
    del e
    return None


def complete_shards(directory: str) -> list[str]:
  """Names of the shards under shards/ whose .parquet (written last) and .npy both exist, in name order."""
  d = shard_dir(directory)
  if not paths.isdir(d):
    return []
  names = set(paths.listdir(d))
  return sorted(n[:-len('.parquet')] for n in names if n.endswith('.parquet') and n[:-len('.parquet')] + '.npy'
                in names)


def write_header(directory: str, header: dict, deleted: np.ndarray, unreadable: Sequence[dict]) -> dict:
  """Writes this generation's deleted and unreadable files, then index.json (atomically), then removes the
  previous generation's files. -> the header written."""
  gen = int(header.get('generation', 0)) + 1
  old = {}
  try:
    old = json.loads(paths.read_text(header_path(directory)))
  except (OSError, ValueError):
    pass
  header = dict(header, format=FORMAT, version=VERSION, generation=gen, deleted='', unreadable='')
  deleted = np.unique(np.asarray(deleted, np.int64))
  if len(deleted):
    buf = io.BytesIO()
    np.save(buf, deleted)
    header['deleted'] = f'deleted-{gen}.npy'
    paths.write_bytes_atomic(paths.join(directory, header['deleted']), buf.getvalue())
  if unreadable:
    header['unreadable'] = f'unreadable-{gen}.json'
    paths.write_text_atomic(paths.join(directory, header['unreadable']), json.dumps(list(unreadable), indent=0))
  paths.write_text_atomic(header_path(directory), json.dumps(header, indent=1))
  for key in ('deleted', 'unreadable'):
    if old.get(key) and old[key] != header[key]:
      paths.remove(paths.join(directory, old[key]))
  return header


def remove_shards(directory: str, names) -> None:
  for n in names:
    for ext in ('.parquet', '.npy'):  # the .parquet first: a half-removed shard is incomplete, not adoptable
      paths.remove(paths.join(directory, SHARDS, n + ext))


def new_run_id() -> str:
  """A name prefix ordered by time (shards sort in the order they were written)."""
  return f'{time.time_ns():016x}'


# ---- compaction and conversion -------------------------------------------------------------------


def compact(directory: str, shard_rows: int = 1 << 20, dtype: str = '', log: Callable[[str], None] = print) -> dict:
  """Rewrites the live rows of INDEX into new shards of at most `shard_rows` rows (row order kept; the deleted
  rows' numbers are given up), in `dtype` (default: as stored), then the header, then removes the old shards
  and the saved approximate indexes (their row numbers changed). A first-format index is converted.
  -> {rows, deleted, shards, seconds}."""
  t0 = time.time()
  index = open_index(directory)
  old_names = [s.name for s in index.shards] if index.version == VERSION else []
  shard_rows = max(1, int(shard_rows))
  dtype = dtype or _stored_dtype(index)
  fingerprint = index.header.get('identity', {}).get('fingerprint', '')
  run = new_run_id()
  live = index.live_rows
  table = index.columns([c for c, _ in COLUMNS]) if len(index) else None
  files = _live_progress(index) if index.version == VERSION else []
  entries = []
  starts = list(range(0, len(live), shard_rows)) or ([0] if files else [])
  for i, a in enumerate(starts):
    rows = live[a:a + shard_rows]
    last = i + 1 == len(starts)  # the footage progress records go with the last shard
    entries.append(write_shard(directory, f'{run}-c-{i:05d}', table.take(rows) if table is not None else [],
                               index.gather(rows), dtype, fingerprint, files if last else ()))
    log(f'compacted {a + len(rows)}/{len(live)} rows')
  header = {k: v for k, v in index.header.items() if k not in ('embeddings', 'entries')}
  header.update(shards=entries, dim=index.dim, stats=dict(index.header.get('stats', {}), images=int(len(live))))
  write_header(directory, header, np.zeros((0,), np.int64), index.unreadable)
  remove_shards(directory, old_names)
  if index.version == 1:
    paths.remove(paths.join(directory, MANIFEST_V1))
    paths.remove(paths.join(directory, index.header['embeddings']))
  paths.rmtree(paths.join(directory, 'ann'))
  for name in paths.listdir(directory):  # approximate indexes of the first format, beside its embeddings
    if name.startswith('ann-') and name.endswith('.faiss'):
      paths.remove(paths.join(directory, name))
  result = {'rows': int(len(live)), 'deleted': int(len(index.deleted)), 'shards': len(entries),
            'seconds': time.time() - t0}
  log(f'index {directory}: {result["rows"]} rows in {len(entries)} shard(s) ({dtype}); {result["deleted"]} '
      f'deleted rows dropped ({result["seconds"]:.1f}s)')
  return result


def _live_progress(index: Index) -> list:
  """The footage progress records (ivt_jax/search/update.py) that still hold: the latest of each file whose
  live rows of that version are as many as it counts."""
  latest = {}
  for s in index.shards:
    for rec in (shard_meta(index.directory, s.name) or {}).get('files', []):
      latest[rec[0]] = rec
  if not latest:
    return []
  t = index.columns(['path', 'size', 'mtime_ns'])
  live = index.live_rows
  counts: dict = {}
  for p, size, mtime in zip(*(t.column(c).take(live).to_pylist() for c in ('path', 'size', 'mtime_ns'))):
    if p in latest:
      counts[(p, size, mtime)] = counts.get((p, size, mtime), 0) + 1
  return [rec for p, rec in sorted(latest.items()) if counts.get((p, rec[1], rec[2]), 0) == rec[5]]


def _stored_dtype(index: Index) -> str:
  kinds = {str(s.embeddings.dtype) for s in index.shards}
  return 'float16' if kinds == {'float16'} else 'float32'


def convert(directory: str, shard_rows: int = 1 << 20, log: Callable[[str], None] = print) -> dict:
  """A first-format index (manifest.json) rewritten in this format, in place (`compact` of it)."""
  directory = paths.resolve(directory, 'index directory')
  if paths.isfile(header_path(directory)):
    raise ValueError(f'{directory} is already a version {VERSION} index ({HEADER}); nothing to convert')
  if not paths.isfile(paths.join(directory, MANIFEST_V1)):
    raise NotAnIndexError(f'{directory} is not an index (no {MANIFEST_V1} to convert)')
  return compact(directory, shard_rows, log=log)
