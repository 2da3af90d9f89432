"""The training program.

  python -m ivt_jax.main --config=configs/cuhk.py --workdir=DIR [--config.key=value ...]

Several processes (GPU nodes): add --coordinator_address=HOST:PORT --num_processes=N --process_id=I.
On Cloud TPU VMs, --distributed alone (the runtime supplies the rest).
"""
import os

from absl import app, flags, logging
from ml_collections import config_flags

config_flags.DEFINE_config_file('config', None, 'Experiment config file (configs/*.py).', lock_config=True)
flags.DEFINE_string('workdir', None, 'Where checkpoints, metrics, logs and prepared data go.')
flags.DEFINE_bool('distributed', False, 'Call jax.distributed.initialize() (implied by --coordinator_address).')
flags.DEFINE_string('coordinator_address', '', 'HOST:PORT of process 0 for jax.distributed.')
flags.DEFINE_integer('num_processes', None, 'Number of processes (jax.distributed).')
flags.DEFINE_integer('process_id', None, 'This process (jax.distributed).')
flags.DEFINE_string('cpu_collectives', '', "CPU collectives for several CPU processes, e.g. 'gloo'.")
flags.mark_flags_as_required(['config', 'workdir'])
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  import jax
  if FLAGS.cpu_collectives:
    jax.config.update('jax_cpu_collectives_implementation', FLAGS.cpu_collectives)
  if FLAGS.coordinator_address or FLAGS.distributed:
    kwargs = {}
    if FLAGS.coordinator_address:
      kwargs = dict(coordinator_address=FLAGS.coordinator_address, num_processes=FLAGS.num_processes,
                    process_id=FLAGS.process_id)
    jax.distributed.initialize(**kwargs)
  logging.info('JAX %s: process %d of %d, %d local / %d global devices (%s)', jax.__version__,
               jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count(),
               jax.devices()[0].platform)
  from ivt_jax import train
  train.train_and_evaluate(FLAGS.config, os.path.expanduser(FLAGS.workdir))


if __name__ == '__main__':
  app.run(main)
