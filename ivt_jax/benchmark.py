"""`python -m ivt_jax.benchmark`: speed and memory of the training step and of gallery retrieval; no prepared
dataset needed (the measurements are ivt_jax.bench.*).

  python -m ivt_jax.benchmark --config=configs/cuhk.py [--batch N] [--steps N] [--config.key=value ...]
  python -m ivt_jax.benchmark --config=configs/cuhk.py --batch 8 --fsdp_memory=1,2,4,8 --notrain --noretrieval
  python -m ivt_jax.benchmark --config=configs/demo.py --loop --notrain --noretrieval   # step, pipeline, loop
  python -m ivt_jax.benchmark --config=configs/demo_part.py --part_cost --noretrieval   # the part head's cost
  python -m ivt_jax.benchmark --config=configs/demo.py --notrain --noretrieval \
      --variants=uniform_mask,fixed_mask,fixed_remove,chunked,packed   # less work: removal, chunks, packing

Training step: the real `step.train_step` with `optim.make_optimizer`, jitted with the shardings of training
(mesh data x fsdp from config.mesh, parameters by sharding.param_shardings, optimizer state as its parameters,
the batch split over every device, the state donated), on a random batch of the configured shapes: images
uint8 (B, 3, H, W, 3), token ids below config.model.vocab_size with random lengths, BMM keep masks from
`model.draw_keep_mask` (config.data.bmm_ratio), K = data.images_per_id samples per identity. The input pipeline
is left out (the batch is the same every step). A pair is one image view + one text; a sample is 3 pairs (the
MLA levels). Printed:
  pairs per second (steady state: after compilation and --warmup steps, the mean over --steps steps), step time
  (mean, median), model FLOPs per step (XLA's count for the compiled step, `cost_analysis()['flops']`, summed
  over the devices; and the analytic count of the matrix products, forward + backward), the utilization they
  imply against the devices' peak (`PEAK_FLOPS`; on CPU a measured matmul rate), the compiled memory per device
  (`memory_analysis()`: arguments + outputs + temporaries - aliased) and the peak device memory in use
  (`device.memory_stats()` where the backend has it).
--fsdp_memory=1,2,4,8: for each fsdp size, the compiled memory per device of the step on all devices as a
  (devices / fsdp) x fsdp mesh, compiled only (nothing runs, no parameters are allocated).
--loop: the training loop's three speeds in steps/s (ivt_jax.bench.loop): the step alone, the input pipeline
  alone (in-memory SynthPEDES, --loop_ids x --loop_images_per_id images), the loop with batches placed ahead
  (data.prefetch) and the loop with the pipeline in series; the vocabulary is the tokenizer's.
Retrieval: the time of `retrieval.topk` (top-k of Q text queries over a G-image gallery of random unit
  embeddings, sharded over the devices), best of --retrieval_repeats after a compiling call; on CPU at a
  reduced size by default, with the time scaled linearly to the 10,000 x 1,000,000 target.
Every figure is printed as a line `name: value` (`--output` also writes them as JSON).
"""
import functools
import json
import sys

import jax

from ivt_jax.bench import part_cost
from ivt_jax.bench import step
from ivt_jax.bench import variants
from ivt_jax.runtime import cli


def _format(value) -> str:
  if isinstance(value, int):
    return str(value)
  return f'{value:.6g}'


def main(argv):
  from absl import flags
  from ivt_jax.runtime import console
  del argv
  FLAGS = flags.FLAGS
  console.quiet_libraries(FLAGS.verbosity)
  config = FLAGS.config
  if FLAGS.cpu_collectives:
    jax.config.update('jax_cpu_collectives_implementation', FLAGS.cpu_collectives)
  if FLAGS.coordinator_address:
    jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  batch = FLAGS.batch or config.data.ids_per_batch * config.data.images_per_id
  platform = jax.devices()[0].platform
  figures = {'device_kind': jax.devices()[0].device_kind, 'platform': platform,
             'device_count': jax.device_count(), 'process_count': jax.process_count()}
  print(f'JAX {jax.__version__}: {jax.device_count()} {platform} device(s) ({figures["device_kind"]}), '
        f'{jax.process_count()} process(es)', flush=True)
  log = functools.partial(print, flush=True)
  cpu_peak = None
  if platform == 'cpu' and (FLAGS.train or FLAGS.cpu_peak):
    dtype = 'bfloat16' if config.model.dtype == 'bfloat16' else 'float32'
    cpu_peak = step.measure_matmul_flops(dtype)
    figures['cpu/matmul_flops'] = cpu_peak
    log(f'cpu/matmul_flops: {_format(cpu_peak)}')
  if FLAGS.fsdp_memory:
    sizes = [int(s) for s in FLAGS.fsdp_memory.split(',') if s.strip()]
    figures.update(step.fsdp_memory(config, batch, sizes, log=log))
    _print_new(figures, 'fsdp')
  if FLAGS.train:
    figures.update(step.benchmark_train(config, batch, FLAGS.steps, FLAGS.warmup, cpu_peak, log=log))
    _print_new(figures, 'train/')
  if FLAGS.variants:
    names = [v.strip() for v in FLAGS.variants.split(',') if v.strip()]
    figures.update(variants.compare(config, batch, names, FLAGS.chunk, FLAGS.steps if FLAGS.train else 0,
                                    FLAGS.warmup, log=log))
    _print_new(figures, 'variant/')
    print(variants.table(figures, names), flush=True)
  if FLAGS.part_cost:
    print(part_cost.format_cost(part_cost.cost_summary(config, FLAGS.steps if FLAGS.train else 0)), flush=True)
  if FLAGS.loop:
    from ivt_jax.bench import loop as loop_benchmark  # pylint: disable=g-import-not-at-top  (draws a source: only when asked)
    figures.update(loop_benchmark.benchmark_loop(config, FLAGS.steps, FLAGS.warmup, num_ids=FLAGS.loop_ids,
                                                 images_per_id=FLAGS.loop_images_per_id,
                                                 image_format=FLAGS.loop_format, log=log))
    _print_new(figures, 'loop/')
  if FLAGS.retrieval:
    accel = platform != 'cpu'
    q = FLAGS.retrieval_queries or (step.TARGET_QUERIES if accel else step.TARGET_QUERIES // 10)
    g = FLAGS.retrieval_gallery or (step.TARGET_GALLERY if accel else step.TARGET_GALLERY // 10)
    dtype = FLAGS.retrieval_dtype or ('bfloat16' if accel else 'float32')
    figures.update(step.benchmark_retrieval(q, g, FLAGS.retrieval_dim or config.model.width, dtype,
                                       FLAGS.retrieval_k, FLAGS.retrieval_repeats, FLAGS.query_chunk,
                                       FLAGS.gallery_chunk, log=log))
    _print_new(figures, 'retrieval/')
  if FLAGS.output and jax.process_index() == 0:
    with open(FLAGS.output, 'w') as f:
      json.dump(figures, f, indent=1)


def _print_new(figures: dict, prefix: str) -> None:
  for key, value in figures.items():
    if key.startswith(prefix):
      print(f'{key}: {_format(value)}', flush=True)


def define_flags():
  """The flags of `python -m ivt_jax.benchmark` (defined by the program, not on import)."""
  from absl import flags
  from ml_collections import config_flags
  config_flags.DEFINE_config_file('config', None, 'Experiment config (configs/*.py).', lock_config=True)
  flags.DEFINE_integer('batch', 0, 'Samples per step (x3 pairs); 0 = data.ids_per_batch x data.images_per_id.')
  flags.DEFINE_integer('steps', 10, 'Timed training steps.')
  flags.DEFINE_integer('warmup', 2, 'Untimed steps after compilation.')
  flags.DEFINE_bool('train', True, 'Run and time the training step.')
  flags.DEFINE_string('fsdp_memory', '', 'Comma-separated fsdp sizes: compiled memory per device for each.')
  flags.DEFINE_string('variants', '', 'Comma-separated step variants side by side (ivt_jax.bench.variants): '
                      'uniform_mask, fixed_mask, fixed_remove, chunked: FLOPs, compiled memory and, with --train, '
                      'the step time.')
  flags.DEFINE_integer('chunk', 0, '--variants chunked: samples per chunk (0 = a quarter of the batch).')
  flags.DEFINE_bool('cpu_peak', False, 'Measure the CPU matmul rate even without --train.')
  flags.DEFINE_bool('part_cost', False, "The part head's extra cost against the IVT head (ivt_jax.bench.part_cost): "
                    'parameters, embedding size and, with --train, the step.')
  flags.DEFINE_bool('loop', False, 'Also the loop: the step alone, the input pipeline alone and the two together '
                    '(ivt_jax.bench.loop), in steps/s, on an in-memory SynthPEDES source.')
  flags.DEFINE_integer('loop_ids', 64, '--loop: identities in the in-memory source.')
  flags.DEFINE_integer('loop_images_per_id', 4, '--loop: images per identity.')
  flags.DEFINE_enum('loop_format', 'png', ['png', 'jpeg'], '--loop: image encoding of the source.')
  flags.DEFINE_bool('retrieval', True, 'Time top-k retrieval over a random gallery.')
  flags.DEFINE_integer('retrieval_queries', 0, 'Queries (0 = 10,000 on accelerators, 1,000 on CPU).')
  flags.DEFINE_integer('retrieval_gallery', 0, 'Gallery images (0 = 1,000,000 on accelerators, 100,000 on CPU).')
  flags.DEFINE_integer('retrieval_dim', 0, 'Embedding size (0 = model.width).')
  flags.DEFINE_string('retrieval_dtype', '', 'Embedding dtype ('' = bfloat16 on accelerators, float32 on CPU).')
  flags.DEFINE_integer('retrieval_k', 10, 'Top-k.')
  flags.DEFINE_integer('retrieval_repeats', 3, 'Timed retrieval calls (the best is reported).')
  flags.DEFINE_integer('query_chunk', 1024, 'retrieval.topk query_chunk.')
  flags.DEFINE_integer('gallery_chunk', 65536, 'retrieval.topk gallery_chunk.')
  flags.DEFINE_string('output', '', 'Optional JSON file for every figure.')
  flags.DEFINE_string('coordinator_address', '', 'HOST:PORT of process 0 for jax.distributed (several processes).')
  flags.DEFINE_integer('num_processes', None, 'Number of processes (jax.distributed).')
  flags.DEFINE_integer('process_id', None, 'This process (jax.distributed).')
  flags.DEFINE_string('cpu_collectives', '', "CPU collectives for several CPU processes, e.g. 'gloo'.")
  flags.mark_flags_as_required(['config'])


if __name__ == '__main__':
  from absl import flags
  define_flags()
  flags.adopt_module_key_flags(sys.modules[__name__])  # --help lists them
  from ivt_jax.runtime import host_memory
  host_memory.reuse_step_memory()  # before any device exists
  cli.run_absl(main)
