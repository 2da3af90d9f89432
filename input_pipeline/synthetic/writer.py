"""SynthPEDES on disk: draws every image (in worker processes), writes reid_raw.json and synthpedes.json, and the CLI."""
import argparse
import concurrent.futures
import json
import multiprocessing
import os
import shutil
import sys
import time
from typing import Any, Sequence

from absl import logging
import numpy as np
import tqdm

from input_pipeline.synthetic.vocabulary import (
    DEFAULT_IMAGE_SIZE, JSON_FILE, MIN_IMAGE_SIZE, PARAMS_FILE, SPLITS, VERSION)
from input_pipeline.synthetic.identities import make_identities, split_sizes
from input_pipeline.synthetic.captions import captions_for_image, processed_tokens
from input_pipeline.synthetic.scene import render, sample_view


def _image_seed(seed: int, split: str, index: int, n: int, stream: int) -> list[int]:
  """Seed of image n of the index-th identity of a split; stream 1 facing, 2 captions, 3 drawing. Keyed by
  the position within the split, not the id, so a split's images do not change when another split grows."""
  return [seed, SPLITS.index(split), index, n, stream]


def _render_job(job: tuple) -> None:
  a, facing, image_size, seed, path = job
  img = render(a, facing, image_size, seed)
  img.save(path, format='PNG', compress_level=1)  # lossless either way; 1 encodes fastest


def _file_path(split: str, pid: int, n: int, num_ids: int, images_per_id: int) -> str:
  return f'{split}/{pid:0{max(4, len(str(num_ids)))}d}_{n:0{max(2, len(str(images_per_id - 1)))}d}.png'


def _params(num_ids, images_per_id, seed, image_size, val_ids, test_ids, hard_negative_fraction,
            eval_images_per_id, train_hard_negative_fraction=None) -> dict:
  sizes = split_sizes(num_ids, val_ids, test_ids)
  return {'version': VERSION, 'num_ids': int(num_ids), 'images_per_id': int(images_per_id),
          'eval_images_per_id': int(eval_images_per_id), 'seed': int(seed),
          'image_size': [int(image_size[0]), int(image_size[1])], 'val_ids': sizes['val'],
          'test_ids': sizes['test'], 'hard_negative_fraction': float(hard_negative_fraction),
          # recorded only when set, so that earlier generations stay valid
          **({} if train_hard_negative_fraction is None else
             {'train_hard_negative_fraction': float(train_hard_negative_fraction)})}


def _check_args(num_ids, images_per_id, eval_images_per_id, image_size, workers) -> None:
  if not isinstance(num_ids, (int, np.integer)) or num_ids < 1:
    raise ValueError(f'num_ids must be a positive int, got {num_ids!r}.')
  for name, value in (('images_per_id', images_per_id), ('eval_images_per_id', eval_images_per_id)):
    if not isinstance(value, (int, np.integer)) or value < 1:
      raise ValueError(f'{name} must be a positive int, got {value!r}.')
  if len(image_size) != 2 or image_size[0] < MIN_IMAGE_SIZE[0] or image_size[1] < MIN_IMAGE_SIZE[1]:
    raise ValueError(f'image_size must be (H, W) with H >= {MIN_IMAGE_SIZE[0]} and W >= {MIN_IMAGE_SIZE[1]}, '
                     f'got {tuple(image_size)}.')
  if workers < 1:
    raise ValueError(f'workers must be >= 1, got {workers}.')


def is_complete(out_dir: str, params: dict | None = None) -> bool:
  """True if out_dir holds a finished SynthPEDES generation (with exactly these params, if given)."""
  try:
    with open(os.path.join(out_dir, PARAMS_FILE)) as f:
      info = json.load(f)
  except (OSError, ValueError):
    return False
  if not info.get('complete') or not os.path.isfile(os.path.join(out_dir, JSON_FILE)):
    return False
  return params is None or info.get('params') == params


def generate(out_dir: str, num_ids: int, images_per_id: int, seed: int = 0,
             image_size: Sequence[int] = DEFAULT_IMAGE_SIZE, val_ids: int | None = None,
             test_ids: int | None = None, hard_negative_fraction: float = 0.25, workers: int = 1,
             log_every: int = 500, eval_images_per_id: int | None = None,
             train_hard_negative_fraction: float | None = None) -> str:
  """Writes SynthPEDES into out_dir (see the module docstring); returns the path of reid_raw.json.

  Skips the work when out_dir already holds a complete generation with the same parameters. val_ids /
  test_ids default to 10% of num_ids each. images_per_id is per training identity; eval_images_per_id per
  val and test identity (None: images_per_id), so that a fixed drawing budget can go to more training
  identities while the gallery keeps its size. `workers` > 1 draws in that many processes (same bytes).
  """
  eval_images_per_id = images_per_id if eval_images_per_id is None else eval_images_per_id
  _check_args(num_ids, images_per_id, eval_images_per_id, image_size, workers)
  image_size = (int(image_size[0]), int(image_size[1]))
  params = _params(num_ids, images_per_id, seed, image_size, val_ids, test_ids, hard_negative_fraction,
                   eval_images_per_id, train_hard_negative_fraction)
  json_path = os.path.join(out_dir, JSON_FILE)
  if is_complete(out_dir, params):
    logging.info('SynthPEDES: %s is up to date (%s); not regenerating.', out_dir, params)
    return json_path
  imgs = os.path.join(out_dir, 'imgs')
  params_path = os.path.join(out_dir, PARAMS_FILE)
  if os.path.exists(imgs) or os.path.exists(json_path):
    if not os.path.isfile(params_path):
      raise FileExistsError(f'{out_dir} holds imgs/ or {JSON_FILE} but no {PARAMS_FILE}: not a SynthPEDES '
                            'directory, refusing to overwrite it; choose another output directory.')
    logging.info('SynthPEDES: %s holds another or unfinished generation; regenerating.', out_dir)
    shutil.rmtree(imgs, ignore_errors=True)
    if os.path.exists(json_path):
      os.remove(json_path)
  os.makedirs(out_dir, exist_ok=True)
  _write_json(params_path, {'params': params, 'complete': False})

  identities = make_identities(num_ids, seed, val_ids, test_ids, hard_negative_fraction,
                               train_hard_negative_fraction)
  for split in SPLITS:
    os.makedirs(os.path.join(imgs, split), exist_ok=True)
  records, jobs = [], []
  most_images = max(images_per_id, eval_images_per_id)
  first_id = {}
  for a in identities:
    first_id.setdefault(a['split'], a['id'])
    index = a['id'] - first_id[a['split']]
    for n in range(images_per_id if a['split'] == 'train' else eval_images_per_id):
      facing = sample_view(np.random.default_rng(_image_seed(seed, a['split'], index, n, 1)))
      caps = captions_for_image(a, facing, np.random.default_rng(_image_seed(seed, a['split'], index, n, 2)))
      rel = _file_path(a['split'], a['id'], n, num_ids, most_images)
      records.append({'split': a['split'], 'captions': caps, 'file_path': rel,
                      'processed_tokens': [processed_tokens(c) for c in caps], 'id': a['id']})
      jobs.append((a, facing, image_size, _image_seed(seed, a['split'], index, n, 3), os.path.join(imgs, rel)))

  total, t0 = len(jobs), time.time()
  logging.debug('SynthPEDES: drawing %d images (%d ids: %d per training id, %d per val/test id; %dx%d) into '
               '%s with %d worker(s).', total, num_ids, images_per_id, eval_images_per_id, image_size[0],
               image_size[1], out_dir, workers)

  bar = tqdm.tqdm(total=total, desc=f'SynthPEDES: drawing into {out_dir}', unit=' images', mininterval=1.0, leave=True)

  def progress(done: int) -> None:
    bar.update(1)
    if done % log_every == 0 or done == total:
      dt = time.time() - t0
      logging.debug('SynthPEDES: %d/%d images, %.1f s, %.0f images/s.', done, total, dt, done / max(dt, 1e-9))

  try:
    if workers == 1:
      for i, job in enumerate(jobs):
        _render_job(job)
        progress(i + 1)
    else:
      with concurrent.futures.ProcessPoolExecutor(workers, mp_context=_mp_context()) as pool:
        for i, _ in enumerate(pool.map(_render_job, jobs, chunksize=16)):
          progress(i + 1)
  finally:
    bar.close()
  logging.debug('SynthPEDES: drew %d images in %.1f s.', total, time.time() - t0)

  _write_json(json_path, records)
  _write_json(params_path, {'params': params, 'complete': True, 'identities': identities})
  return json_path


def _mp_context() -> multiprocessing.context.BaseContext:
  """spawn (safe when the caller runs threads, as JAX does), unless spawn cannot re-import __main__.

  A spawned worker re-imports the parent's main module; a script read from stdin has no file to import,
  so there the workers are forked instead.
  """
  main_file = getattr(sys.modules.get('__main__'), '__file__', None)
  if main_file is not None and not os.path.isfile(main_file):
    return multiprocessing.get_context('fork')
  return multiprocessing.get_context('spawn')


def _write_json(path: str, obj: Any) -> None:
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    json.dump(obj, f)
  os.replace(tmp, path)


def load_identities(out_dir: str) -> list[dict[str, Any]]:
  """The identities (attributes, split, id, hard_negative_of) of a generated directory."""
  path = os.path.join(out_dir, PARAMS_FILE)
  with open(path) as f:
    info = json.load(f)
  if 'identities' not in info:
    raise ValueError(f'{path} has no identities: the generation did not finish.')
  return info['identities']


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(prog='python -m input_pipeline.synthetic',
                                   description='Writes SynthPEDES (CUHK-PEDES layout) into --out.')
  parser.add_argument('--out', required=True, help='output directory')
  parser.add_argument('--ids', type=int, default=500, help='number of identities')
  parser.add_argument('--images-per-id', type=int, default=4, help='images per training identity')
  parser.add_argument('--eval-images-per-id', type=int, default=None,
                      help='images per val/test identity (default: --images-per-id)')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--height', type=int, default=DEFAULT_IMAGE_SIZE[0])
  parser.add_argument('--width', type=int, default=DEFAULT_IMAGE_SIZE[1])
  parser.add_argument('--val-ids', type=int, default=None, help='default: 10%% of --ids')
  parser.add_argument('--test-ids', type=int, default=None, help='default: 10%% of --ids')
  parser.add_argument('--hard-negative-fraction', type=float, default=0.25)
  parser.add_argument('--workers', type=int, default=1)
  args = parser.parse_args(argv)
  logging.set_verbosity(logging.DEBUG)  # this program's own summary lines (debug inside a training run)
  logging.use_absl_handler()
  try:
    path = generate(args.out, args.ids, args.images_per_id, seed=args.seed,
                    image_size=(args.height, args.width),
                    val_ids=args.val_ids, test_ids=args.test_ids,
                    hard_negative_fraction=args.hard_negative_fraction, workers=args.workers,
                    eval_images_per_id=args.eval_images_per_id)
  except (ValueError, FileExistsError) as e:
    parser.error(str(e))
  print(path)


if __name__ == '__main__':
  main()
