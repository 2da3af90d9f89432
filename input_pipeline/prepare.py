"""Prepare a dataset once: (SynthPEDES generation) -> TFDS build -> tokenizer; then open its splits.

`prepare(config, workdir)` is idempotent: the first call builds `<data_dir>/<name>/<version>/`
(ArrayRecord files, see input_pipeline/datasets) and the tokenizer, later calls only open them. In a
multi-process run, process 0 prepares and writes a marker file; the other processes wait for it, so
data_dir must be on storage that all hosts see (a shared file system) when there are several hosts.

Config keys read: data.name, data.manual_dir, data.data_dir, data.skip_bad_records,
data.val_fraction_ids (ICFG-PEDES only; 0 = the builder's default, 5% of the training ids),
data.synthetic.{enabled, num_ids, images_per_id, image_size}, seed, data.tokenizer, data.vocab_file,
data.sentencepiece_vocab_size, data.sentencepiece_model_type. The SentencePiece model is trained once on
the prepared training captions and kept as <data_dir>/<name>/spm_<model type>_<vocab size>.model.

data_dir may be on Cloud Storage (gs://BUCKET/...; also <workdir>/tfds for a gs:// workdir). Grain reads
ArrayRecord files by random access, one small read per record: over HTTP that is ~1000x slower than a local disk,
so the data are prepared in a local cache (config.data.local_cache_dir, else $IVT_CACHE_DIR, else
~/.cache/ivt_jax) and uploaded file by file, the bucket's marker written last with every file's size; every host
(process 0 after a restart, the others always) downloads what its cache lacks before opening it. manual_dir
(the raw dataset) is read from a local disk.
"""
import contextlib
import dataclasses
import hashlib
import io
import json
import logging
import os
import shutil
import time
from typing import Any

import tensorflow_datasets as tfds

from input_pipeline import paths
from input_pipeline import source as source_lib
from input_pipeline.datasets import BAD_RECORDS_FILE
from input_pipeline.datasets import cuhk_pedes  # pylint: disable=unused-import (registers the builder)
from input_pipeline.datasets import decode_json_list
from input_pipeline.datasets import icfg_pedes  # pylint: disable=unused-import (registers the builder)
from input_pipeline.datasets import records
from input_pipeline.datasets import rstpreid  # pylint: disable=unused-import (registers the builder)

NAMES = tuple(records.FORMATS)
MARKER_FILE = 'prepared.json'


@dataclasses.dataclass(frozen=True)
class PreparedData:
  """A prepared dataset: where it is, its tokenizer, its split sizes (images per split)."""
  name: str
  data_dir: str                 # TFDS data_dir (the dataset is in <data_dir>/<name>/<version>/)
  dataset_dir: str              # <data_dir>/<name>/<version>
  tokenizer: str                # 'sentencepiece' | 'wordpiece'
  tokenizer_path: str           # .model or vocab.txt
  split_sizes: dict[str, int]   # {'train': n, 'val': n, 'test': n} (0 for an absent split)
  num_bad_records: int          # records left out under skip_bad_records
  bad_records_file: str         # '' unless built with skip_bad_records
  num_merged_records: int = 0   # records joined into an earlier one (same image, id, split)
  num_repeated_captions: int = 0  # captions written twice in one record (kept)
  num_shared_captions: int = 0  # caption texts on images of different people (kept)

  def to_json(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


def _expand(path: str) -> str:
  return paths.local(path, 'data path')


def data_dir_of(config, workdir: str) -> str:
  """config.data.data_dir, or <workdir>/tfds: a local absolute path or a gs:// URL."""
  if config.data.data_dir:
    return paths.resolve(config.data.data_dir, 'config.data.data_dir')
  return paths.join(paths.resolve(workdir, 'workdir'), 'tfds')


def local_cache_of(config, remote: str) -> str:
  """The local folder that stands for the gs:// path `remote` (prepared data, SynthPEDES of a gs:// workdir)."""
  root = (config.data.get('local_cache_dir', '') or os.environ.get('IVT_CACHE_DIR', '')
          or os.path.join('~', '.cache', 'ivt_jax'))
  root = paths.local(root, 'config.data.local_cache_dir')
  return os.path.join(root, hashlib.sha256(remote.encode()).hexdigest()[:16])


def _val_fraction(config) -> float | None:
  """config.data.val_fraction_ids; 0 means the dataset's default (5% for ICFG-PEDES)."""
  v = float(config.data.val_fraction_ids)
  if v < 0.0 or v >= 1.0:
    raise ValueError(f'config.data.val_fraction_ids must be in [0, 1), got {v}.')
  return v if v > 0.0 else None


def _builder(config, data_dir: str, workers: int = 1) -> tfds.core.DatasetBuilder:
  name = config.data.name
  if name not in NAMES:
    raise ValueError(f'config.data.name={name!r} is not a known dataset; expected one of {NAMES}.')
  return tfds.builder(name, data_dir=data_dir, file_format='array_record',
                      skip_bad_records=bool(config.data.skip_bad_records),
                      val_fraction_ids=_val_fraction(config), workers=workers)


def _fingerprint(config) -> str:
  """What a marker must match for a waiting process to trust it."""
  d = config.data
  key = [d.name, d.tokenizer, d.vocab_file, int(d.sentencepiece_vocab_size), d.sentencepiece_model_type,
         float(d.val_fraction_ids)]
  if d.synthetic.enabled:  # different SynthPEDES parameters -> different data -> prepare again
    key.append(json.dumps(d.synthetic.to_dict(), sort_keys=True, default=list) + f'seed={config.seed}')
  return hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16]


def _maybe_generate_synthetic(config, manual_dir: str, workers: int) -> None:
  syn = config.data.synthetic
  if not syn.enabled:
    return
  if config.data.name != 'cuhk_pedes':
    raise ValueError('config.data.synthetic.enabled writes a CUHK-PEDES-format directory: set '
                     f"config.data.name='cuhk_pedes' (got {config.data.name!r}).")
  for key in ('num_ids', 'images_per_id'):
    if int(syn[key]) <= 0:
      raise ValueError(f'config.data.synthetic.{key} must be > 0 to generate SynthPEDES, got {syn[key]}.')
  if int(syn.eval_images_per_id) < 0:
    raise ValueError('config.data.synthetic.eval_images_per_id must be >= 0 (0: images_per_id), got '
                     f'{syn.eval_images_per_id}.')
  if len(syn.image_size) != 2 or min(syn.image_size) <= 0:
    raise ValueError(f'config.data.synthetic.image_size must be (H, W) > 0, got {tuple(syn.image_size)}.')
  from input_pipeline import synthetic  # pylint: disable=g-import-not-at-top
  eval_images = int(syn.eval_images_per_id) or int(syn.images_per_id)
  logging.debug('SynthPEDES in %s (%d ids; %d images per training id, %d per val/test id; generated unless '
               'already there with these parameters).', manual_dir, syn.num_ids, syn.images_per_id, eval_images)
  synthetic.generate(manual_dir, int(syn.num_ids), int(syn.images_per_id), seed=int(config.seed),
                     image_size=tuple(int(s) for s in syn.image_size), val_ids=int(syn.val_ids) or None,
                     test_ids=int(syn.test_ids) or None,
                     hard_negative_fraction=float(syn.hard_negative_fraction), workers=workers,
                     train_hard_negative_fraction=(None if float(syn.get('train_hard_negative_fraction', -1.0)) < 0
                                                   else float(syn.train_hard_negative_fraction)),
                     eval_images_per_id=eval_images)


def _forget_if_stale(config, dataset_dir: str, data_dir: str, manual_dir: str) -> None:
  """Prepared data whose source folder changed since (or another folder now): removed, with the tokenizer
  trained on its captions, saying why, so that it is prepared again. A source that is not there (prepared data
  copied without it) or that was not fingerprinted is trusted."""
  try:
    now = source_lib.fingerprint(config.data.name, manual_dir)
  except records.ManualDirError:
    return
  before = source_lib.read(dataset_dir)
  if before is None:
    source_lib.write(dataset_dir, now)
    return
  changed = source_lib.differences(before, now)
  if not changed:
    return
  logging.warning('%s was prepared from another source (%s): preparing it again.', dataset_dir, '; '.join(changed))
  shutil.rmtree(dataset_dir)
  name_dir = os.path.join(data_dir, config.data.name)
  for fn in os.listdir(name_dir):
    if fn.startswith('spm_') or fn == MARKER_FILE:
      os.remove(os.path.join(name_dir, fn))


def _check_manual_dir(config, manual_dir: str) -> None:
  try:
    records.find_json(config.data.name, manual_dir)
  except records.ManualDirError as e:
    raise records.ManualDirError(f'config.data.manual_dir={config.data.manual_dir!r}: {e}') from None


def _check_options(config, builder) -> None:
  """The prepared data must match the options the config asks for."""
  meta = builder.info.metadata or {}
  if 'val_fraction_ids' in meta and meta['val_fraction_ids'] is not None:
    want = _val_fraction(config)
    want = records.DEFAULT_ICFG_VAL_FRACTION if want is None else want
    if abs(float(meta['val_fraction_ids']) - want) > 1e-9:
      raise ValueError(
          f'{builder.data_dir} was prepared with val_fraction_ids={meta["val_fraction_ids"]}, but '
          f'config.data.val_fraction_ids asks for {want}: remove that directory or set '
          'config.data.data_dir to another place.')
  if meta.get('num_bad_records') and not config.data.skip_bad_records:
    logging.warning('%s was prepared with skip_bad_records=True and leaves out %d bad record(s); see %s.',
                    builder.data_dir, meta['num_bad_records'], os.path.join(builder.data_dir, BAD_RECORDS_FILE))


def _tokenizer(config, builder, data_dir: str, train: bool) -> str:
  """Path of the tokenizer file; trains SentencePiece on the train captions when `train` and absent."""
  path = _tokenizer_file(config)
  return path if path is not None else _sentencepiece(config, builder, data_dir, train)


def _tokenizer_file(config) -> str | None:
  """The vocabulary file of a file-based tokenizer (FileNotFoundError naming the config key when it is not
  there); None for SentencePiece, which is trained on the prepared captions."""
  kind = config.data.tokenizer
  if kind == 'wordpiece':
    path = _expand(config.data.vocab_file) if config.data.vocab_file else ''
    if not path or not os.path.isfile(path):
      raise FileNotFoundError(
          f'config.data.tokenizer=wordpiece needs config.data.vocab_file, the bert-base-uncased '
          f'vocab.txt (got {config.data.vocab_file!r}, which is not a file).')
    return path
  if kind == 'clip':  # CLIP's merges file: data.vocab_file, else the copy the open_clip package ships
    from input_pipeline import tokenizers  # pylint: disable=g-import-not-at-top
    path = _expand(config.data.vocab_file) if config.data.vocab_file else tokenizers.clip_vocab_file()
    if not path or not os.path.isfile(path):
      raise FileNotFoundError(
          "config.data.tokenizer=clip needs CLIP's bpe_simple_vocab_16e6.txt.gz: set config.data.vocab_file to "
          f'it (got {config.data.vocab_file!r}) or install the open_clip package, which ships it.')
    return path
  if kind != 'sentencepiece':
    raise ValueError(f"config.data.tokenizer must be 'wordpiece', 'sentencepiece' or 'clip', got {kind!r}.")
  return None


def _sentencepiece(config, builder, data_dir: str, train: bool) -> str:
  size = int(config.data.sentencepiece_vocab_size)
  model_type = config.data.sentencepiece_model_type
  prefix = os.path.join(data_dir, config.data.name, f'spm_{model_type}_{size}')
  path = prefix + '.model'
  if os.path.isfile(path) or not train:
    if not os.path.isfile(path):
      raise FileNotFoundError(f'SentencePiece model {path} not found (process 0 should have trained it).')
    return path
  from input_pipeline import tokenizers  # pylint: disable=g-import-not-at-top
  source = builder.as_data_source(split='train')
  texts = []
  for i in range(len(source)):
    texts.extend(c.decode('utf-8') for c in source[i]['captions'])
  t0 = time.time()
  path = tokenizers.train_sentencepiece(texts, prefix, size, model_type)
  logging.debug('Trained SentencePiece %s (%d pieces asked) on %d captions in %.1fs: %s', model_type, size,
               len(texts), time.time() - t0, path)
  return path


def _split_sizes(builder) -> dict[str, int]:
  sizes = {s: 0 for s in ('train', 'val', 'test')}
  for s, info in builder.info.splits.items():
    sizes[s] = int(info.num_examples)
  return sizes


def oddities_text(meta) -> str:
  """What preparation found and kept or left out, as one clause ('' when nothing): skipped bad records,
  records merged into others, captions repeated in a record, captions shared by different people."""
  parts = []
  for key, what in (('num_bad_records', 'bad record(s) skipped'),
                    ('num_merged_records', 'record(s) merged into an earlier one naming the same image and id'),
                    ('num_repeated_captions', 'caption(s) repeated within a record (kept)'),
                    ('num_shared_captions', 'caption text(s) found on images of different people (kept)')):
    n = int(meta.get(key, 0) or 0)
    if n:
      parts.append(f'{n} {what}')
  return '; '.join(parts)


def _prepared(config, builder, data_dir: str, tokenizer_path: str) -> PreparedData:
  meta = builder.info.metadata or {}
  sizes = _split_sizes(builder)
  bad_file = os.path.join(os.fspath(builder.data_dir), BAD_RECORDS_FILE)
  return PreparedData(name=config.data.name, data_dir=data_dir, dataset_dir=os.fspath(builder.data_dir),
                      tokenizer=config.data.tokenizer, tokenizer_path=tokenizer_path, split_sizes=sizes,
                      num_bad_records=int(meta.get('num_bad_records', 0)),
                      num_merged_records=int(meta.get('num_merged_records', 0) or 0),
                      num_repeated_captions=int(meta.get('num_repeated_captions', 0) or 0),
                      num_shared_captions=int(meta.get('num_shared_captions', 0) or 0),
                      bad_records_file=bad_file if os.path.isfile(bad_file) else '')


def prepare_here(config, workdir: str, workers: int | None = None, data_dir: str | None = None) -> PreparedData:
  """Builds (if needed) and opens the dataset in this process, ignoring other processes (in `data_dir`, a local
  path: default data_dir_of(config, workdir))."""
  data_dir = data_dir or paths.local(data_dir_of(config, workdir), 'config.data.data_dir')
  workers = workers or max(1, min(8, os.cpu_count() or 1))
  builder = _builder(config, data_dir, workers)
  dataset_dir = os.fspath(builder.data_dir)
  manual_dir = _expand(config.data.manual_dir)
  # Not builder.is_prepared(): it warns "Variant folder ... has no dataset_info.json" when there is no data yet.
  if os.path.isfile(os.path.join(dataset_dir, 'dataset_info.json')):
    _forget_if_stale(config, dataset_dir, data_dir, manual_dir)
  if not os.path.isfile(os.path.join(dataset_dir, 'dataset_info.json')):
    _tokenizer_file(config)  # a missing vocabulary is said now, not after the build
    _maybe_generate_synthetic(config, manual_dir, workers)
    _check_manual_dir(config, manual_dir)
    fp = source_lib.fingerprint(config.data.name, manual_dir)
    source_lib.check_room(data_dir, fp)
    t0 = time.time()
    # TFDS prints "Downloading and preparing dataset Unknown size ..." to stdout; the line below says it all.
    verbose = os.environ.get('IVT_VERBOSE', '') not in ('', '0')
    if not verbose:  # TFDS's bars count nothing useful here ("0 examples"); the builder's own bar counts records
      tfds.disable_progress_bar()
    with contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO()):
      builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
          manual_dir=manual_dir, try_download_gcs=False))
    builder = _builder(config, data_dir, workers)  # re-open: the info now holds the splits
    source_lib.write(dataset_dir, fp)
    sizes = ', '.join(f'{n} {s}' for s, n in _split_sizes(builder).items())
    logging.info('Prepared %s (%s records) in %.1fs: %s', config.data.name, sizes, time.time() - t0,
                 builder.data_dir)
    said = oddities_text(builder.info.metadata or {})
    if said:
      logging.warning('%s: %s', config.data.name, said)
  _check_options(config, builder)
  tok = _tokenizer(config, builder, data_dir, train=True)
  return _prepared(config, builder, data_dir, tok)


def prepare(config, workdir: str, *, workers: int | None = None, wait_timeout_s: float = 6 * 3600,
            poll_s: float = 5.0) -> PreparedData:
  """Prepares the configured dataset (process 0) or waits for it (other processes), then opens it.

  Args:
    config: the run's ConfigDict (keys: module docstring).
    workdir: the run's directory; the data goes to config.data.data_dir or <workdir>/tfds.
    workers: processes for SynthPEDES generation, image checks and MLA texts (None: CPU count, <= 8).
    wait_timeout_s: how long processes other than 0 wait for the marker.
    poll_s: their polling interval.
  Returns:
    PreparedData (split_sizes count images).
  """
  import jax  # pylint: disable=g-import-not-at-top (prepare.py imports without jax)
  data_dir = data_dir_of(config, workdir)
  if paths.is_remote(data_dir):
    return _prepare_remote(config, workdir, data_dir, workers, jax.process_index(), wait_timeout_s, poll_s)
  marker = os.path.join(data_dir, config.data.name, MARKER_FILE)
  if jax.process_index() == 0:
    prepared = prepare_here(config, workdir, workers)
    os.makedirs(os.path.dirname(marker), exist_ok=True)
    tmp = f'{marker}.tmp{os.getpid()}'
    with open(tmp, 'w', encoding='utf-8') as f:
      json.dump({'fingerprint': _fingerprint(config), 'prepared': prepared.to_json()}, f, indent=1)
    os.replace(tmp, marker)
    return prepared
  deadline = time.time() + wait_timeout_s
  while not _marker_ready(marker, _fingerprint(config)):
    if time.time() > deadline:
      raise TimeoutError(f'process {jax.process_index()}: no marker {marker} from process 0 after '
                         f'{wait_timeout_s:.0f}s; data_dir must be on storage shared by all hosts.')
    time.sleep(poll_s)
  builder = _builder(config, data_dir)
  _check_options(config, builder)
  return _prepared(config, builder, data_dir, _tokenizer(config, builder, data_dir, train=False))


def _prepare_remote(config, workdir: str, data_dir: str, workers, process: int, wait_timeout_s: float,
                    poll_s: float) -> PreparedData:
  """Prepared data on Cloud Storage, opened from this host's local copy (module docstring)."""
  local_dir = local_cache_of(config, data_dir)
  name = config.data.name
  remote_marker = paths.join(data_dir, name, MARKER_FILE)
  fingerprint = _fingerprint(config)
  marker = _remote_marker(remote_marker, fingerprint)
  if marker is None and process == 0:
    prepared = prepare_here(config, workdir, workers, data_dir=local_dir)
    _upload(os.path.join(local_dir, name), paths.join(data_dir, name), remote_marker, fingerprint, prepared)
    return prepared
  deadline = time.time() + wait_timeout_s
  while marker is None:
    if time.time() > deadline:
      raise TimeoutError(f'process {process}: no marker {remote_marker} from process 0 after '
                         f'{wait_timeout_s:.0f}s.')
    time.sleep(poll_s)
    marker = _remote_marker(remote_marker, fingerprint)
  _download(marker, paths.join(data_dir, name), os.path.join(local_dir, name))
  builder = _builder(config, local_dir)
  _check_options(config, builder)
  return _prepared(config, builder, local_dir, _tokenizer(config, builder, local_dir, train=False))


def _remote_marker(path: str, fingerprint: str) -> dict | None:
  try:
    m = json.loads(paths.read_text(path))
  except (OSError, ValueError):  # absent, or not yet whole
    return None
  return m if m.get('fingerprint') == fingerprint and isinstance(m.get('files'), dict) else None


def _upload(local: str, remote: str, remote_marker: str, fingerprint: str, prepared: PreparedData) -> None:
  """Copies the prepared files to the bucket, then the marker listing them (last: a killed upload is redone)."""
  files = {rel: os.path.getsize(os.path.join(local, rel)) for rel in paths.walk_files(local)
           if rel != MARKER_FILE and '.tmp' not in rel}
  t0 = time.time()
  for rel in files:
    paths.copy_file(os.path.join(local, *rel.split('/')), paths.join(remote, rel))
  paths.write_text_atomic(remote_marker, json.dumps(
      {'fingerprint': fingerprint, 'files': files, 'prepared': prepared.to_json()}, indent=1))
  logging.info('Uploaded %d prepared files (%.1f MB) to %s in %.1fs', len(files), sum(files.values()) / 1e6,
               remote, time.time() - t0)


def _download(marker: dict, remote: str, local: str) -> None:
  """Copies to `local` each file the marker lists that is absent there or of another size."""
  todo = [rel for rel, size in sorted(marker['files'].items())
          if not (os.path.isfile(os.path.join(local, rel)) and os.path.getsize(os.path.join(local, rel)) == size)]
  t0 = time.time()
  for rel in todo:
    paths.copy_file(paths.join(remote, rel), os.path.join(local, *rel.split('/')))
    if os.path.getsize(os.path.join(local, rel)) != marker['files'][rel]:
      raise OSError(f'{paths.join(remote, rel)}: {os.path.getsize(os.path.join(local, rel))} bytes downloaded, '
                    f'the marker {MARKER_FILE} lists {marker["files"][rel]}: was it changed after it was prepared?')
  if todo:
    logging.info('Downloaded %d prepared files from %s to %s in %.1fs', len(todo), remote, local, time.time() - t0)


def tokenizer_of_marker(config, marker: str) -> str:
  """The local tokenizer file a prepared dataset's marker names ('' if the marker cannot be read). For data on
  Cloud Storage, the tokenizer file is downloaded into the local cache when absent there."""
  try:
    m = json.loads(paths.read_text(marker))
    prepared = m['prepared']
    tok_path = prepared['tokenizer_path']
  except (OSError, ValueError, KeyError, TypeError):
    return ''
  if not paths.is_remote(marker):
    return tok_path
  data_dir = paths.dirname(paths.dirname(marker))
  rel = os.path.relpath(tok_path, prepared.get('data_dir', ''))
  if rel.startswith('..'):  # a WordPiece vocab named by path, outside the prepared data
    return tok_path
  local = os.path.join(local_cache_of(config, data_dir), rel)
  if not os.path.isfile(local):
    try:
      paths.copy_file(paths.join(data_dir, *rel.split(os.sep)), local)
    except OSError:
      return ''
  return local


def _marker_ready(marker: str, fingerprint: str) -> bool:
  """The marker matches this config and what it names is on disk (a stale marker is not trusted)."""
  try:
    with open(marker, encoding='utf-8') as f:
      m = json.load(f)
  except (OSError, json.JSONDecodeError):
    return False
  if m.get('fingerprint') != fingerprint:
    return False
  p = m.get('prepared', {})
  return (os.path.isfile(os.path.join(p.get('dataset_dir', ''), 'dataset_info.json'))
          and os.path.isfile(p.get('tokenizer_path', '')))


def open_split(prepared: PreparedData, split: str):
  """The split's ArrayRecord data source: len() and random access to example dicts.

  Values: 'image' the encoded image bytes, 'image_path' bytes, 'person_id' int64, 'captions',
  'phrases', 'attributes' lists of bytes (see `decode_example`).
  """
  if prepared.split_sizes.get(split, 0) == 0:
    raise ValueError(f'{prepared.name} in {prepared.dataset_dir} has no {split!r} split '
                     f'(split sizes {prepared.split_sizes}).')
  return tfds.data_source(prepared.name, data_dir=prepared.data_dir, split=split, download=False)


def decode_example(example: dict[str, Any]) -> dict[str, Any]:
  """A data-source example with text as Python str.

  Returns:
    dict(image=bytes, image_path=str, person_id=int, captions=[str] * C,
         phrases=[[str, ...]] * C, attributes=[[str, ...]] * C).
  """
  def s(v):
    return v.decode('utf-8') if isinstance(v, bytes) else str(v)
  return {
      'image': example['image'],
      'image_path': s(example['image_path']),
      'person_id': int(example['person_id']),
      'captions': [s(c) for c in example['captions']],
      'phrases': [decode_json_list(p) for p in example['phrases']],
      'attributes': [decode_json_list(a) for a in example['attributes']],
  }
