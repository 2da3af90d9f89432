"""Evaluation of a checkpoint on a split: embed its gallery and queries, rank, metrics.

  python -m ivt_jax.evaluate --config=configs/cuhk.py --checkpoint=DIR [--split=test] [--workdir=DIR]
      [--protocol=standard|reference] [--output=FILE.json]

The protocols and what DIR may be: ivt_jax.evaluation.evaluate.
"""
import json

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from ivt_jax.evaluation import evaluate
from ivt_jax.runtime import console
from ivt_jax.training import checkpoints


FLAGS = flags.FLAGS


def main(argv):
  del argv
  console.quiet_libraries(FLAGS.verbosity)
  config = FLAGS.config
  if FLAGS.protocol == 'reference' and config.data.name not in evaluate.metrics_lib.REFERENCE_GALLERY_STEP:
    raise app.UsageError(f'--protocol=reference knows the datasets {sorted(evaluate.metrics_lib.REFERENCE_GALLERY_STEP)}, '
                         f'not data.name={config.data.name!r}')
  workdir = FLAGS.workdir or FLAGS.checkpoint
  config, prepared, tokenizer, encoder, mesh, abstract, shardings = evaluate.build(config, workdir)
  params, meta = checkpoints.restore_params(FLAGS.checkpoint, abstract, shardings)
  metrics, emb, sim, source = evaluate.run_evaluation(config, params, encoder, mesh, shardings, prepared, tokenizer,
                                             FLAGS.split, FLAGS.protocol)
  line = ' '.join(f'{k}={v:.2f}' for k, v in metrics.items())
  logging.debug('%s, %s protocol (%d queries, %d gallery entries): %s', FLAGS.split, FLAGS.protocol,
                sim.shape[0], sim.shape[1], line)
  print(f'{FLAGS.split} ({FLAGS.protocol} protocol): {line}')
  if FLAGS.output and jax.process_index() == 0:
    with open(FLAGS.output, 'w') as f:
      json.dump({'split': FLAGS.split, 'protocol': FLAGS.protocol, 'checkpoint': meta, **metrics}, f, indent=2)


def define_flags():
  config_flags.DEFINE_config_file('config', None, 'Experiment config (configs/*.py).', lock_config=True)
  flags.DEFINE_string('checkpoint', None, 'Workdir, best/ or converted checkpoint directory.')
  flags.DEFINE_string('split', 'test', 'Split to evaluate: train | val | test.')
  flags.DEFINE_string('workdir', '', 'Where prepared data lives (default: the checkpoint directory).')
  flags.DEFINE_string('output', '', 'Optional JSON file for the metrics.')
  flags.DEFINE_enum('protocol', 'standard', list(evaluate.PROTOCOLS), 'standard: every image once, R@k/mAP/mINP; '
                    "reference: the reference implementation's gallery selection and trapezoid mAP.")
  flags.mark_flags_as_required(['config', 'checkpoint'])


if __name__ == '__main__':
  from ivt_jax.runtime import cli, host_memory
  host_memory.reuse_step_memory()  # before any device exists
  define_flags()
  cli.run_absl(main)
