"""The largest training batch whose compiled step fits a memory budget, with and without the chunked
contrastive gradient and rematerialization, for float32 and bfloat16 (compiled for a GPU on this machine).

  python -m ivt_jax.tools.memory_table --config=configs/cuhk.py [--target=h100] [--budgets=16,24,40,80]
      [--chunk=16] [--points=16,64,256] [--dtypes=float32,bfloat16] [--output=table.json] [--config.key=value]

For each (dtype, remat, chunk) the real training step (ivt_jax.planner: the mesh and shardings of training, the
target's compiler) is compiled at the --points batches; its memory per device (arguments + outputs +
temporaries - aliased + code) is fitted as a function of the batch, exactly affine without chunks (every
activation scales with the batch) and quadratic with chunks (the objective's (3B)^2 similarity matrices are
then what grows; fitted at the larger --chunk_points), and each budget's largest batch (a multiple of the batch
unit: data.images_per_id, the chunk) is read from the fit. One more compile at the largest budget's batch checks
the fit against the compiler (the `check` column); when they differ by more than 2%, or the compiled step is
over the budget, the point joins the fit and the batches are read again (twice at most); a compiled batch over
a budget is never reported as fitting it. Budgets are in GB (1e9 bytes, as GPU memory is sold). The batch is
in samples (x 3 MLA pairs).
"""
import json

from ivt_jax.planner import devices as devices_lib
from ivt_jax.planner import memory_fit

devices_lib.prepare_environment()  # before JAX starts a backend
devices_lib.import_jax_quietly()

from absl import app, flags  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
from ml_collections import config_flags  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position

config_flags.DEFINE_config_file('config', 'configs/cuhk.py', 'Experiment config file (configs/*.py).',
                                lock_config=True)
flags.DEFINE_string('target', 'h100', 'One accelerator to compile for (h100, h200, v5e-1, ...).')
flags.DEFINE_string('budgets', '16,24,40,80', 'Memory budgets in GB (1e9 bytes).')
flags.DEFINE_integer('chunk', 16, 'train.contrastive_chunk of the chunked rows (samples).')
flags.DEFINE_string('points', '16,64,256', 'Batches compiled for the fit of the unchunked rows (at least 3).')
flags.DEFINE_string('chunk_points', '256,1024,4096', 'Batches compiled for the (quadratic) fit of the chunked rows: '
                    'large ones, where the quadratic term shows.')
flags.DEFINE_string('dtypes', 'float32,bfloat16', 'model.dtype values.')
flags.DEFINE_enum('remat', 'both', ['both', 'off', 'on'], 'model.remat rows.')
flags.DEFINE_bool('check', True, 'Compile once more at the largest budget\'s batch to check the fit.')
flags.DEFINE_string('output', '', 'Write every figure as JSON here.')
FLAGS = flags.FLAGS
GB = memory_fit.GB


def main(argv) -> int:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  from ivt_jax.planner import plan as plan_lib  # pylint: disable=g-import-not-at-top
  from ivt_jax.planner import targets as targets_lib  # pylint: disable=g-import-not-at-top
  from ivt_jax.runtime import console  # pylint: disable=g-import-not-at-top
  console.quiet_libraries(FLAGS.verbosity)
  budgets = memory_fit.numbers(FLAGS.budgets, 'budgets', float)
  points = sorted(set(memory_fit.numbers(FLAGS.points, 'points')))
  chunk_points = sorted(set(memory_fit.numbers(FLAGS.chunk_points, 'chunk_points')))
  dtypes = [d.strip() for d in FLAGS.dtypes.split(',') if d.strip()]
  if len(points) < 3 or len(chunk_points) < 3:
    raise ValueError('--points and --chunk_points: three batches each are needed')
  target = targets_lib.parse_target(FLAGS.target)
  devices = devices_lib.target_devices(target)
  remats = {'both': (False, True), 'off': (False,), 'on': (True,)}[FLAGS.remat]
  rows, figures = [], []
  for dtype in dtypes:
    for remat in remats:
      for chunk in (0, FLAGS.chunk):
        c = FLAGS.config.copy_and_resolve_references()
        c.model.dtype, c.model.remat = dtype, remat
        c.train.contrastive_chunk = chunk
        unit = plan_lib.batch_unit(c, len(devices))  # whole identities and whole chunks
        pts = sorted({max(unit, p // unit * unit) for p in (chunk_points if chunk else points)})
        totals = []

        def compiled(b):
          p = plan_lib.compile_for(c, target, b, 'train', devices)
          print(f'{dtype} remat={remat} chunk={chunk}: batch {b}: {p.memory["total"] / GB:.2f} GB '
                f'({p.compile_s:.0f} s compile)', flush=True)
          return p.memory['total']

        totals = [compiled(b) for b in pts]
        coef = memory_fit.fit_memory(pts, totals, quadratic=bool(chunk))
        best = {g: memory_fit.largest_batch(coef, g * GB, unit) for g in budgets}
        check = None
        for _ in range(3 if FLAGS.check else 0):
          top = best[max(budgets)]
          if top <= 0 or top in pts:
            break
          got = compiled(top)
          fitted = coef[0] + coef[1] * top + coef[2] * top * top
          check = {'batch': top, 'compiled_gb': got / GB, 'fitted_gb': fitted / GB}
          if abs(got - fitted) <= 0.02 * got and got <= max(budgets) * GB:
            break
          pts, totals = pts + [top], totals + [got]  # the fit was off (or over): refit with this point
          coef = memory_fit.fit_memory(pts, totals, quadratic=bool(chunk))
          best = {g: memory_fit.largest_batch(coef, g * GB, unit) for g in budgets}
        best = memory_fit.within_compiled(best, pts, totals, unit)
        row = {'dtype': dtype, 'remat': 'on' if remat else 'off', 'chunk': chunk or '-'}
        row.update({f'{g:g} GB': best[g] for g in budgets})
        if check is None:
          row['check'] = '-'
        else:
          row['check'] = f'{check["batch"]}: {check["compiled_gb"]:.2f} GB compiled, {check["fitted_gb"]:.2f} fitted'
        rows.append(row)
        figures.append({'dtype': dtype, 'remat': remat, 'chunk': chunk, 'points': pts,
                        'totals_bytes': totals, 'coef': coef, 'largest': {f'{g:g}': n for g, n in best.items()}, 'check': check})
        print(console.table([row], list(row)), flush=True)
  print(f'\nlargest batch (samples; x3 pairs) whose compiled training step fits, {target.name}, '
        f'{FLAGS.config.data.image_size} stride {FLAGS.config.model.stride}:')
  print(console.table(rows, list(rows[0])))
  if FLAGS.output:
    with open(FLAGS.output, 'w') as f:
      json.dump({'target': target.name, 'rows': figures}, f, indent=1)
  return 0


if __name__ == '__main__':
  from ivt_jax.runtime import cli  # pylint: disable=g-import-not-at-top
  cli.run_absl(main)
