"""Training input pipeline throughput: samples/s (a sample = 3 views + 3 texts) per worker count.

  python -m input_pipeline.benchmark --config=configs/cuhk.py [--workers 0,1,2] [--batches 20]
      [--workdir DIR]            # a prepared dataset (input_pipeline.prepare) instead of SynthPEDES
      [--num_ids 64 --images_per_id 4 --image_hw 384,128 --format png]  # in-memory SynthPEDES
      [--profile]                # per-sample cost of each stage, in this process

Without --workdir the source is in memory (input_pipeline.memory_source): SynthPEDES identities drawn
at --image_hw (default: the configured data.image_size) and stored as PNG (like the generator) or
JPEG, with
captions, phrases and attributes from input_pipeline.text, and a SentencePiece tokenizer trained on
those captions (or the WordPiece vocabulary of data.vocab_file when data.tokenizer is 'wordpiece'
and the file exists). Nothing is downloaded.
"""
from __future__ import annotations

from multiprocessing import shared_memory
import os
import tempfile
import time

from absl import app
from absl import flags
from absl import logging
import numpy as np
from ml_collections import config_flags

from input_pipeline import augment
from input_pipeline import memory_source
from input_pipeline import pipeline
from input_pipeline import examples as examples_lib
from input_pipeline import tokenizers


def _define_flags():
  """The CLI's flags (defined only when run as a program, so that importing `measure` clashes with no CLI)."""
  config_flags.DEFINE_config_file('config', None, 'Configuration file.', lock_config=False)
  flags.DEFINE_string('workers', '0,1,2', 'Comma-separated worker counts to measure.')
  flags.DEFINE_integer('batches', 20, 'Timed batches per worker count.')
  flags.DEFINE_integer('warmup', 3, 'Untimed batches first (worker start-up).')
  flags.DEFINE_string('workdir', '', 'Use the prepared dataset of this workdir.')
  flags.DEFINE_integer('num_ids', 64, 'In-memory source: identities.')
  flags.DEFINE_integer('images_per_id', 4, 'In-memory source: images per identity.')
  flags.DEFINE_string('image_hw', '', 'In-memory source: stored image size H,W (default data.image_size).')
  flags.DEFINE_enum('format', 'png', ['png', 'jpeg'], 'In-memory source: image encoding.')
  flags.DEFINE_bool('profile', False, 'Also time each per-sample stage in this process and estimate the rate '
                    'of a --cores machine.')
  flags.DEFINE_integer('cores', 16, 'With --profile: host cores for the estimate.')


def measure(config, source, tokenizer, workers: int, batches: int, warmup: int, index
            ) -> tuple[float, float]:
  """(samples/s, main-process CPU ms per batch) of the training iterator with `workers` workers.

  Each batch is read once in full (as a transfer to the device would) before the next.
  """
  config = config.copy_and_resolve_references()
  config.data.worker_count = workers
  it = pipeline.train_iterator(config, source, tokenizer, seed=0, shard_index=0, shard_count=1,
                               index=index)
  try:
    for _ in range(warmup):
      next(it)
    start, cpu = time.perf_counter(), time.process_time()
    n = 0
    for _ in range(batches):
      batch = next(it)
      for v in batch.values():
        v.max()
      n += batch['person_id'].shape[0]
    return n / (time.perf_counter() - start), (time.process_time() - cpu) * 1e3 / batches
  finally:
    it.close()


def _handover_ms(batch: dict[str, np.ndarray]) -> float:
  """Milliseconds to pass one batch through fresh shared memory (what a worker does per batch)."""
  start = time.perf_counter()
  for v in batch.values():
    shm = shared_memory.SharedMemory(create=True, size=max(1, v.nbytes))
    try:
      np.ndarray(v.shape, v.dtype, buffer=shm.buf)[...] = v
    finally:
      shm.close()
      shm.unlink()
  return (time.perf_counter() - start) * 1e3


def profile(config, source, tokenizer, samples: int = 200) -> dict[str, float]:
  """CPU milliseconds per sample of each stage (thread CPU time, so other load barely counts)."""
  s = pipeline._Settings.from_config(config)  # pylint: disable=protected-access
  rng = np.random.default_rng(0)
  t = dict(read=0.0, decode=0.0, resize=0.0, views=0.0, texts=0.0, tokenize=0.0, bmm=0.0)
  clock = time.thread_time
  for i in range(samples):
    c0 = clock()
    record = source[i % len(source)]
    c1 = clock()
    im = augment.decode_image(record['image'])
    c2 = clock()
    resized = augment.resize_image(im, s.image_size, augment.TRAIN_RESAMPLE)
    c3 = clock()
    augment.views_of(resized, s.image_size, rng, num_views=len(examples_lib.LEVELS), pad=s.pad,
                     flip_prob=s.flip_prob, erase_prob=s.erase_prob)
    c4 = clock()
    # pylint: disable=protected-access
    texts = pipeline.level_texts(examples_lib.record_captions(record, i)[0],
                                 examples_lib.record_json_list(record, 'phrases', 0, i),
                                 examples_lib.record_json_list(record, 'attributes', 0, i), rng, s.max_attrs)
    # pylint: enable=protected-access
    c5 = clock()
    tokenizer.encode(list(texts), s.text_length)
    c6 = clock()
    for _ in examples_lib.LEVELS:
      pipeline.bmm_keep(s.num_image_tokens, s.bmm_ratio, rng, s.bmm_drops)
      pipeline.bmm_keep(s.text_length, s.bmm_ratio, rng, s.bmm_drops)
    c7 = clock()
    for k, a, b in (('read', c0, c1), ('decode', c1, c2), ('resize', c2, c3), ('views', c3, c4),
                    ('texts', c4, c5), ('tokenize', c5, c6), ('bmm', c6, c7)):
      t[k] += (b - a) * 1e3 / samples
  return t


def main(argv):
  del argv
  FLAGS = flags.FLAGS
  config = FLAGS.config
  if config is None:
    raise app.UsageError('--config is required (e.g. --config=configs/cuhk.py)')
  workers = [int(w) for w in FLAGS.workers.split(',') if w.strip()]
  with tempfile.TemporaryDirectory() as tmpdir:
    if FLAGS.workdir:
      from input_pipeline import prepare  # pylint: disable=g-import-not-at-top (tfds: slow import)
      prepared = prepare.prepare(config, FLAGS.workdir)
      source = prepare.open_split(prepared, 'train')
      tokenizer = tokenizers.load_tokenizer(prepared.tokenizer, prepared.tokenizer_path)
      what = f'{prepared.name} train ({len(source)} images) from {prepared.dataset_dir}'
    else:
      hw = ([int(x) for x in FLAGS.image_hw.split(',')] if FLAGS.image_hw
            else list(config.data.image_size))
      start = time.perf_counter()
      source = memory_source.synthetic_source(FLAGS.num_ids, FLAGS.images_per_id, hw, seed=config.seed,
                                              image_format=FLAGS.format)
      tokenizer = memory_source.tokenizer_for(config, source, tmpdir)
      size = np.mean([len(r['image']) for r in source]) / 1024
      seconds = time.perf_counter() - start
      what = (f'in-memory SynthPEDES: {len(source)} {FLAGS.format.upper()} images '
              f'{hw[0]}x{hw[1]} ({size:.0f} KiB each), built in {seconds:.0f} s')
    index = examples_lib.TrainIndex.from_source(source, config.data.get('sample_unit', 'caption'))
    d = config.data
    print(f'source: {what}; tokenizer: {tokenizer!r}')
    print(f'config: image_size={tuple(d.image_size)} text_length={d.text_length} '
          f'patch={config.model.patch_size} stride={config.model.stride} '
          f'batch={d.ids_per_batch}x{d.images_per_id} cpus={os.cpu_count()}')
    main_ms = {}
    for w in workers:
      rate, main_ms[w] = measure(config, source, tokenizer, w, FLAGS.batches, FLAGS.warmup, index)
      print(f'workers={w}: {rate:.1f} samples/s (main process CPU {main_ms[w]:.1f} ms/batch)',
            flush=True)
      logging.info('workers=%d: %.1f samples/s', w, rate)
    if FLAGS.profile:
      costs = profile(config, source, tokenizer)
      total = sum(costs.values())
      print('per-sample CPU ms: ' + ', '.join(f'{k} {v:.2f}' for k, v in costs.items())
            + f'; total {total:.2f} ms = {1e3 / total:.0f} samples/s per core')
      b = d.ids_per_batch * d.images_per_id
      config1 = config.copy_and_resolve_references()
      config1.data.worker_count = 0
      batch = next(pipeline.train_iterator(config1, source, tokenizer, seed=0, shard_index=0,
                                           shard_count=1, index=index))
      handover = min(_handover_ms(batch) for _ in range(5)) / b
      cores = FLAGS.cores
      from_workers = (cores - 2) * 1e3 / (total + handover)
      line = (f'handover through shared memory {handover:.2f} ms/sample (worker side). Estimate '
              f'for {cores} cores ({cores - 2} workers, 2 cores left to the training loop): '
              f'workers ~{from_workers:.0f} samples/s')
      worker_main = [v for k, v in main_ms.items() if k > 0]
      if worker_main:
        recv = min(worker_main) / b
        line += (f'; the main process receives and reads {recv:.2f} ms/sample: at most '
                 f'~{1e3 / recv:.0f} samples/s')
      print(line)


if __name__ == '__main__':
  _define_flags()
  from input_pipeline import cli  # pylint: disable=g-import-not-at-top
  cli.run_app(main)
