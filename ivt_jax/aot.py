"""Compile the training step for a Cloud TPU slice or GPU host on this machine (no accelerator needed): does the
recipe fit, what will a step cost, what does the compiler make of the sharding.

  python -m ivt_jax.aot --config=configs/cuhk.py --target=v5e-256 [--batch=N] [--config.key=value ...]
  python -m ivt_jax.aot --config=configs/cuhk.py --target=h100x8 --fit [--output=plan.json]
  python -m ivt_jax.aot --config=configs/cuhk.py --target=v4-8 --what=embed
  python -m ivt_jax.aot --list_targets

Needs the compilers (libtpu; jax-cuda12-plugin and -pjrt), kept out of the project's environment:
  pip install --no-deps --target .compilers -r requirements-compilers.txt
Exit status: 0 when the program fits the target, 1 when it does not, 2 for bad input. docs/scaling.md reads the
figures and holds them for the paper and CLIP recipes.
"""
import json
import os
import sys

from ivt_jax.planner import devices as devices_lib

devices_lib.prepare_environment()  # before JAX starts a backend
devices_lib.import_jax_quietly()

from absl import app, flags  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
from ml_collections import config_flags  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position

config_flags.DEFINE_config_file('config', None, 'Experiment config file (configs/*.py).', lock_config=True)
flags.DEFINE_string('target', None, 'v4-8, v5e-256, v5p-128, v6e-256, v5e:4x4, h100x8, h200x16, ...')
flags.DEFINE_integer('batch', 0, 'Global batch (samples); 0: the config\'s, raised to a multiple of the chips.')
flags.DEFINE_enum('what', 'train', ['train', 'embed'], 'The training step, or the evaluation embedders.')
flags.DEFINE_bool('fit', False, 'Find the largest batch that fits, by compiling (with and without remat).')
flags.DEFINE_enum('fit_remat', 'both', ['both', 'config'], '--fit with remat off and on, or as the config says.')
flags.DEFINE_integer('fit_chunk', 0, '--fit also with the chunked contrastive gradient (train.contrastive_chunk '
                     '= this many samples); 0: only as the config says.')
flags.DEFINE_integer('max_batch', 1 << 14, '--fit searches batches up to this.')
flags.DEFINE_string('output', '', 'Write the plan(s) as JSON here.')
flags.DEFINE_float('price', -1.0, 'US$ per chip-hour for the cost estimate (-1: the list price in the table).')
flags.DEFINE_integer('train_pairs', 0, 'Training pairs per epoch for the schedule estimate (0: the dataset\'s).')
flags.DEFINE_bool('list_targets', False, 'Print the target names and the chip table, then exit.')
FLAGS = flags.FLAGS


def _list_targets() -> int:
  from ivt_jax.planner import targets  # pylint: disable=g-import-not-at-top
  from ivt_jax.runtime import console  # pylint: disable=g-import-not-at-top
  rows = [{'chip': k, 'kind': c.kind, 'HBM GiB': f'{c.hbm_bytes / 2 ** 30:.1f}',
           'bf16 TFLOP/s': f'{c.bf16_flops / 1e12:.0f}', 'HBM GB/s': f'{c.hbm_bandwidth / 1e9:.0f}',
           'link GB/s': f'{c.link_bandwidth / 1e9:.0f}', '$/chip-h': f'{c.usd_per_chip_hour:.2f}',
           'compiler': 'installed' if devices_lib.have_compiler(c.platform) else 'missing'}
          for k, c in targets.CHIPS.items()]
  print(console.table(rows, list(rows[0])))
  print('\ntargets: ' + ' '.join(targets.listed_targets()))
  print('also libtpu topologies (v5e:4x4, v4:2x2x4, ...) and any NxGPU count in hosts of 8')
  return 0


def main(argv) -> int:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  from ivt_jax.runtime import console  # pylint: disable=g-import-not-at-top
  console.quiet_libraries(FLAGS.verbosity)
  if FLAGS.list_targets:
    return _list_targets()
  if FLAGS.config is None or not FLAGS.target:
    raise app.UsageError('--config and --target are required (--list_targets shows the targets)')
  from ivt_jax.planner import plan as plan_lib  # pylint: disable=g-import-not-at-top
  from ivt_jax.planner import report  # pylint: disable=g-import-not-at-top
  from ivt_jax.planner import targets  # pylint: disable=g-import-not-at-top
  verbose = console.verbose_requested(FLAGS.verbosity)
  config_name = config_flags.get_config_filename(FLAGS['config'])
  try:
    target = targets.parse_target(FLAGS.target)
    devices = devices_lib.target_devices(target, verbose)
  except (targets.TargetError, devices_lib.CompilerMissingError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  price = FLAGS.price if FLAGS.price >= 0 else None
  out, status = [], 0
  if FLAGS.fit:
    remats = (False, True) if FLAGS.fit_remat == 'both' else (bool(FLAGS.config.model.remat),)
    chunks = (int(FLAGS.config.train.contrastive_chunk),) + ((FLAGS.fit_chunk,) if FLAGS.fit_chunk > 0 else ())
    for remat, chunk in [(r, k) for k in chunks for r in remats]:
      c = FLAGS.config.copy_and_resolve_references()
      c.unlock()
      c.model.remat = remat
      c.train.contrastive_chunk = chunk
      how = f'remat {"on" if remat else "off"}' + (f', chunks of {chunk}' if chunk else '')
      print(f'{target.cloud_name}: the largest {FLAGS.what} batch with {how}...', file=sys.stderr)
      batch, p, tried = plan_lib.fit(c, target, FLAGS.what, devices, FLAGS.max_batch,
                                     progress=lambda s: print(f'  {s}', file=sys.stderr), verbose=verbose)
      if p is None:
        print(f'{how}: no batch fits {target.cloud_name}')
        out.append({'remat': remat, 'contrastive_chunk': chunk, 'largest_batch': 0, 'tried': tried})
        status = 1
        continue
      print(report.text(p, config_name, report.recipe(p, c, FLAGS.train_pairs or None, price)))
      print(f'=> the largest batch that fits with {how}: {batch}\n')
      out.append({'remat': remat, 'contrastive_chunk': chunk, 'largest_batch': batch, 'tried': tried, 'plan': p.to_dict(),
                  'recipe': report.recipe(p, c, FLAGS.train_pairs or None, price)})
  else:
    try:
      p = plan_lib.compile_for(FLAGS.config, target, FLAGS.batch or None, FLAGS.what, devices, verbose)
    except plan_lib.DoesNotFitError as e:
      print(f'{e}\n--fit finds the largest batch that fits.')
      out.append({'target': target.name, 'batch': FLAGS.batch, 'fits': False, 'error': str(e)})
      status = 1
    else:
      figures = report.recipe(p, FLAGS.config, FLAGS.train_pairs or None, price)
      print(report.text(p, config_name, figures))
      out.append({'plan': p.to_dict(), 'recipe': figures})
      status = 0 if p.fits else 1
  if FLAGS.output:
    path = os.path.expanduser(FLAGS.output)
    with open(path, 'w') as f:
      json.dump(out if FLAGS.fit else out[0], f, indent=1, default=float)
    print(f'plan written to {path}')
  return status


if __name__ == '__main__':
  from ivt_jax.runtime import cli  # pylint: disable=g-import-not-at-top
  cli.run_absl(main)
