"""The training program.

  python -m ivt_jax.main --config=configs/cuhk.py --workdir=DIR [--config.key=value ...]

Several processes (GPU nodes): add --coordinator_address=HOST:PORT --num_processes=N --process_id=I
(--local_device_ids=0,1,... or 'all' to choose this process's GPUs). On Cloud TPU VMs, --distributed alone (the
runtime supplies the rest). Several CPU processes on one machine (a test setting): --cpu_collectives=gloo.
Libraries' INFO lines are hidden: --verbosity=1 (or IVT_VERBOSE=1) shows them (ivt_jax.runtime.console).
"""
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

config_flags.DEFINE_config_file('config', None, 'Experiment config file (configs/*.py).', lock_config=True)
flags.DEFINE_string('workdir', None, 'Where checkpoints, metrics, logs and prepared data go.')
flags.DEFINE_bool('distributed', False, 'Call jax.distributed.initialize() (implied by --coordinator_address).')
flags.DEFINE_string('coordinator_address', '', 'HOST:PORT of process 0 for jax.distributed.')
flags.DEFINE_integer('num_processes', None, 'Number of processes (jax.distributed).')
flags.DEFINE_integer('process_id', None, 'This process (jax.distributed).')
flags.DEFINE_string('cpu_collectives', '', "CPU collectives for several CPU processes, e.g. 'gloo'.")
flags.DEFINE_string('local_device_ids', '',
                    "This process's GPUs (jax.distributed), comma-separated, or 'all'. Default: JAX decides, and "
                    'under SLURM (SLURM_LOCALID set) that is one GPU per process.')
flags.mark_flags_as_required(['config', 'workdir'])
FLAGS = flags.FLAGS


def parse_local_device_ids(value: str) -> list[int]:
  """'0,1,2,3' -> [0, 1, 2, 3]; 'all' -> [] (jax.distributed then leaves every device visible)."""
  if value.strip().lower() == 'all':
    return []
  try:
    ids = [int(v) for v in value.split(',') if v.strip()]
  except ValueError:
    ids = None
  if not ids or any(i < 0 for i in ids) or len(set(ids)) != len(ids):
    raise app.UsageError(f"--local_device_ids={value!r}: expected distinct device numbers like '0,1,2,3', "
                         "or 'all'")
  return ids


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  from ivt_jax.runtime import console
  console.quiet_libraries(FLAGS.verbosity)
  import jax
  if FLAGS.cpu_collectives:
    jax.config.update('jax_cpu_collectives_implementation', FLAGS.cpu_collectives)
  if FLAGS.coordinator_address or FLAGS.distributed:
    kwargs = {}
    if FLAGS.coordinator_address:
      kwargs = dict(coordinator_address=FLAGS.coordinator_address, num_processes=FLAGS.num_processes,
                    process_id=FLAGS.process_id)
    if FLAGS.local_device_ids:
      kwargs['local_device_ids'] = parse_local_device_ids(FLAGS.local_device_ids)
    jax.distributed.initialize(**kwargs)
  log = logging.info if jax.process_count() > 1 else logging.debug
  log('JAX %s: process %d of %d, %d local / %d global devices (%s)', jax.__version__,
               jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count(),
               jax.devices()[0].platform)
  from input_pipeline import paths
  from input_pipeline import pipeline
  from ivt_jax.training import checkpoints
  from ivt_jax.training import run_guard
  from ivt_jax.training import loop as train
  try:
    train.train_and_evaluate(FLAGS.config, os.path.expanduser(FLAGS.workdir))
  except (run_guard.RunLockedError, run_guard.ConfigChangedError, checkpoints.CheckpointError,
          pipeline.InputPipelineError, paths.UnsupportedPathError) as e:  # said in full: no traceback needed
    print(f'error: {e}', file=sys.stderr)
    return 1


if __name__ == '__main__':
  from ivt_jax.runtime import cli, host_memory
  host_memory.reuse_step_memory()  # before any device exists
  cli.run_absl(main)
