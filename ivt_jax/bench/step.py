"""Speed and memory of the training step and of gallery retrieval; no prepared dataset needed.

  python -m ivt_jax.benchmark --config=configs/cuhk.py [--batch N] [--steps N] [--config.key=value ...]
  python -m ivt_jax.benchmark --config=configs/cuhk.py --batch 8 --fsdp_memory=1,2,4,8 --notrain --noretrieval
  python -m ivt_jax.benchmark --config=configs/demo.py --loop --notrain --noretrieval   # step, pipeline, loop
  python -m ivt_jax.benchmark --config=configs/demo_part.py --part_cost --noretrieval   # the part head's cost
  python -m ivt_jax.benchmark --config=configs/demo.py --notrain --noretrieval \
      --variants=uniform_mask,fixed_mask,fixed_remove,chunked          # less work: removal, chunks

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
import math
import statistics
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from input_pipeline import shapes
from ivt_jax.models import encoder as model_lib
from ivt_jax.evaluation import retrieval
from ivt_jax.runtime import sharding as sharding_lib
from ivt_jax.training import setup as step_setup

TARGET_QUERIES, TARGET_GALLERY = 10_000, 1_000_000

# Peak dense matrix FLOP/s per device (no sparsity), from the vendors' data sheets. 'float32' is the rate of a
# float32 matmul at JAX's default precision: TF32 tensor cores on NVIDIA (A100 and later), one bfloat16 pass on
# the TPU MXU. Keys are matched against jax.Device.device_kind (lower case, first match wins).
PEAK_FLOPS = (
    # (device_kind substring, name, bfloat16, float32 at default precision)
    ('h200', 'NVIDIA H200', 989.4e12, 494.7e12),
    ('h100 pcie', 'NVIDIA H100 PCIe', 756.5e12, 378.0e12),
    ('h100 nvl', 'NVIDIA H100 NVL', 835.5e12, 417.5e12),
    ('h100', 'NVIDIA H100 SXM', 989.4e12, 494.7e12),
    ('a100', 'NVIDIA A100', 312.0e12, 156.0e12),
    ('tpu v4', 'TPU v4', 275.0e12, 275.0e12),
    ('tpu v5 lite', 'TPU v5e', 197.0e12, 197.0e12),
    ('tpu v5e', 'TPU v5e', 197.0e12, 197.0e12),
    ('tpu v5p', 'TPU v5p', 459.0e12, 459.0e12),
    ('tpu v5', 'TPU v5p', 459.0e12, 459.0e12),
    ('tpu v6 lite', 'TPU v6e', 918.0e12, 918.0e12),
    ('tpu v6e', 'TPU v6e', 918.0e12, 918.0e12),
)


def peak_flops(device_kind: str, dtype: str) -> Optional[tuple[str, float]]:
  """(name, peak FLOP/s per device) for a device kind and compute dtype ('bfloat16' | 'float32'); None if unknown."""
  kind = device_kind.lower()
  for key, name, bf16, fp32 in PEAK_FLOPS:
    if key in kind:
      return name, bf16 if dtype == 'bfloat16' else fp32
  return None


def measure_matmul_flops(dtype: str = 'float32', n: int = 1024, repeats: int = 5,
                         device: Optional[jax.Device] = None) -> float:
  """Best FLOP/s of an (n, n) @ (n, n) matmul on one device (the CPU's practical peak for XLA)."""
  device = device or jax.local_devices()[0]
  a = jax.device_put(jnp.ones((n, n), dtype), device)
  b = jax.device_put(jnp.full((n, n), 0.5, dtype), device)
  f = jax.jit(lambda x, y: x @ y)
  f(a, b).block_until_ready()
  best = math.inf
  for _ in range(repeats):
    t0 = time.perf_counter()
    f(a, b).block_until_ready()
    best = min(best, time.perf_counter() - t0)
  return 2.0 * n ** 3 / best


def analytic_train_flops(config: ml_collections.ConfigDict, batch: int) -> float:
  """Matrix-product FLOPs of one training step for `batch` samples (3 pairs each), forward + backward.

  Per sequence of n tokens and layer: qkv 6nD^2, scores and values 4n^2D, projection 2nD^2, MLP 4nDM
  (multiply-add = 2 FLOPs); the last layer computes the CLS query alone (the embedding uses nothing else):
  keys and values 4nD^2, the query 2D^2, scores and values 4nD, projection 2D^2, MLP 4DM. Tokens dropped by
  BMM are masked, not removed, so n is the full length. The patch
  convolution counts 2 (P^2 3) D per patch. Backward = 2x forward (gradients of activations and weights),
  except the patch convolution, whose input (the image) needs no gradient: 1x. The CMPM similarity
  (3B x 3B x D) is included; elementwise operations, norms and the optimizer are not. Each MLA level's text
  counts its own length (input_pipeline.shapes.level_text_lengths).
  """
  enc = model_lib.encoder_config(config)
  d, m, depth = enc.width, enc.mlp_dim, enc.depth
  def transformer(n):
    full = n * (8 * d * d + 4 * d * m) + 4 * n * n * d
    cls_only = 4 * n * d * d + 4 * d * d + 4 * n * d + 4 * d * m
    return (depth - 1) * full + cls_only
  n_img = enc.num_image_tokens
  patches = n_img - 1
  patch_fwd = 2 * patches * enc.patch_size ** 2 * 3 * d
  pairs = len(shapes.mla_levels(config)) * batch
  forward = batch * sum(transformer(n_img) + transformer(n) for n in shapes.level_text_lengths(config))
  cmpm = 2 * pairs * pairs * d
  return float(3 * (forward + cmpm) + 2 * pairs * patch_fwd)


def compiled_flops(compiled) -> Optional[float]:
  """XLA's FLOP count of a compiled computation (one device's program), None if the backend has none."""
  try:
    cost = compiled.cost_analysis()
  except NotImplementedError:
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  if not cost or 'flops' not in cost:
    return None
  return float(cost['flops'])


def compiled_memory(compiled) -> dict[str, int]:
  """Per-device bytes of a compiled computation: arguments, outputs, temporaries, aliased (donated) and total."""
  m = compiled.memory_analysis()
  out = {'argument': int(m.argument_size_in_bytes), 'output': int(m.output_size_in_bytes),
         'temp': int(m.temp_size_in_bytes), 'alias': int(m.alias_size_in_bytes)}
  out['total'] = out['argument'] + out['output'] + out['temp'] - out['alias']
  return out


def peak_memory_in_use() -> Optional[int]:
  """The largest 'peak_bytes_in_use' over this process's devices; None where the backend does not track it."""
  peaks = []
  for d in jax.local_devices():
    try:
      stats = d.memory_stats()
    except Exception:  # pylint: disable=broad-except  (backends without allocator statistics)
      stats = None
    if stats and 'peak_bytes_in_use' in stats:
      peaks.append(int(stats['peak_bytes_in_use']))
  return max(peaks) if peaks else None


def _peak(platform: str, device_kind: str, dtype: str, cpu_peak: Optional[float], n: int):
  """(description, peak FLOP/s of the run's n devices) or (reason, None)."""
  if platform == 'cpu':
    if cpu_peak is None:
      cpu_peak = measure_matmul_flops('bfloat16' if dtype == 'bfloat16' else 'float32')
    # The simulated CPU devices of a process share its cores: the measured rate is per process.
    return f'measured {dtype} matmul on this CPU', cpu_peak * jax.process_count()
  known = peak_flops(device_kind, dtype)
  if known is None:
    return f'unknown device kind {device_kind!r} (add it to PEAK_FLOPS)', None
  return f'{known[0]} {dtype} data sheet', known[1] * n


def benchmark_train(config: ml_collections.ConfigDict, batch: int, steps: int, warmup: int,
                    cpu_peak: Optional[float] = None, log=print) -> dict[str, Any]:
  """Compiles, runs and times the training step; -> the figures (see the module docstring)."""
  setup, compiled, compile_s = step_setup.compile_train_step(config, batch)
  mesh = setup.mesh
  dev = jax.devices()[0]
  levels = len(shapes.mla_levels(config))
  log(f'training step: {batch} samples x {levels} levels = {levels * batch} pairs per step, '
      f'{setup.num_params / 1e6:.1f}M parameters, mesh {dict(mesh.shape)} on {jax.device_count()} '
      f'{dev.platform} device(s) ({dev.device_kind}), dtype {config.model.dtype}, remat {config.model.remat}, '
      f'attention {config.model.attention}')
  flops_device = compiled_flops(compiled)
  memory = compiled_memory(compiled)
  state = setup.init_state()
  data = sharding_lib.global_batch(
      step_setup.local_rows(step_setup.random_batch(config, batch, seed=config.seed)), mesh)
  times, cpu_times = [], []
  for i in range(warmup + steps):
    t, c = time.perf_counter(), time.process_time()
    state, metrics = compiled(state, data)
    jax.block_until_ready((state, metrics))
    if i >= warmup:
      times.append(time.perf_counter() - t)
      cpu_times.append(time.process_time() - c)
  metrics = jax.device_get(metrics)
  if not metrics['finite'] > 0:
    raise FloatingPointError(f'the benchmarked step gave a non-finite loss ({metrics["loss"]})')
  step_s = sum(times) / len(times)
  out = {'train/batch_samples': batch, 'train/pairs_per_step': levels * batch,
         'train/compile_s': compile_s, 'train/step_s': step_s, 'train/step_s_median': statistics.median(times),
         'train/pairs_per_s': levels * batch / step_s, 'train/samples_per_s': batch / step_s,
         'train/flops_analytic': analytic_train_flops(config, batch),
         # CPU time of this process per step (all its threads): on a shared host, less sensitive to other load.
         'train/step_process_cpu_s': sum(cpu_times) / len(cpu_times)}
  if flops_device is not None:
    out['train/flops_xla'] = flops_device * mesh.size  # the same program runs on every device of the mesh
  desc, peak = _peak(dev.platform, dev.device_kind, config.model.dtype, cpu_peak, mesh.size)
  if peak is not None:
    out['train/peak_flops'] = peak
    out['train/utilization_analytic'] = out['train/flops_analytic'] / step_s / peak
    if 'train/flops_xla' in out:
      out['train/utilization_xla'] = out['train/flops_xla'] / step_s / peak
  out.update({f'train/compiled_{k}_bytes': v for k, v in memory.items()})
  in_use = peak_memory_in_use()
  if in_use is not None:
    out['train/peak_bytes_in_use'] = in_use
  log(f'peak FLOP/s: {desc}' + (f' = {peak:.4g} for the run' if peak else ''))
  return out


def fsdp_memory(config: ml_collections.ConfigDict, batch: int, sizes, log=print) -> dict[str, Any]:
  """Compiled per-device memory of the step for each fsdp size over all devices (compiled only)."""
  out = {}
  n = jax.device_count()
  for f in sizes:
    if f < 1 or n % f:
      raise ValueError(f'--fsdp_memory size {f} does not divide the {n} devices')
    c = ml_collections.ConfigDict(config.to_dict())
    c.mesh.data, c.mesh.fsdp = n // f, f
    setup, compiled, seconds = step_setup.compile_train_step(c, batch)
    memory = compiled_memory(compiled)
    params = sum(math.prod(s.sharding.shard_shape(s.shape)) * s.dtype.itemsize
                 for s in jax.tree_util.tree_leaves(setup.abstract_state.params))
    log(f'fsdp={f}: mesh data x fsdp = {n // f} x {f}, compiled in {seconds:.1f}s')
    out[f'fsdp{f}/param_bytes_per_device'] = int(params)
    out.update({f'fsdp{f}/compiled_{k}_bytes': v for k, v in memory.items()})
  return out


def benchmark_retrieval(num_queries: int, gallery_size: int, dim: int, dtype: str, k: int = 10,
                        repeats: int = 3, query_chunk: int = 1024, gallery_chunk: int = 65536,
                        log=print) -> dict[str, Any]:
  """Times `retrieval.topk` on random unit embeddings made on the devices (gallery sharded over all of them)."""
  mesh = retrieval.default_mesh()
  axes = tuple(mesh.axis_names)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  # Sharded over the devices when the size allows; else made whole (topk pads and shards it).
  gallery_sharding = (jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(axes))
                      if gallery_size % mesh.size == 0 else replicated)

  def unit(key, shape):
    x = jax.random.normal(key, shape, jnp.float32)
    return (x / jnp.linalg.norm(x, axis=-1, keepdims=True)).astype(dtype)

  key_t, key_g = jax.random.split(jax.random.PRNGKey(0))
  texts = jax.jit(lambda key: unit(key, (num_queries, dim)), out_shardings=replicated)(key_t)
  gallery = jax.jit(lambda key: unit(key, (gallery_size, dim)), out_shardings=gallery_sharding)(key_g)
  jax.block_until_ready((texts, gallery))
  log(f'retrieval: top-{k} of {num_queries} queries over {gallery_size} images, D={dim}, {dtype}, '
      f'{mesh.size} device(s)')
  run = functools.partial(retrieval.topk, texts, gallery, k, mesh, query_chunk, gallery_chunk)
  t0 = time.perf_counter()
  run()
  first = time.perf_counter() - t0
  best = best_cpu = math.inf
  for _ in range(repeats):
    t0, c0 = time.perf_counter(), time.process_time()
    scores, _ = run()
    best = min(best, time.perf_counter() - t0)
    best_cpu = min(best_cpu, time.process_time() - c0)
  if not np.all(np.isfinite(scores)):
    raise FloatingPointError('retrieval scores are not finite')
  scale = TARGET_QUERIES * TARGET_GALLERY / (num_queries * gallery_size)
  return {'retrieval/queries': num_queries, 'retrieval/gallery': gallery_size, 'retrieval/dim': dim,
          'retrieval/first_call_s': first, 'retrieval/s': best, 'retrieval/process_cpu_s': best_cpu,
          'retrieval/pairs_scored_per_s': num_queries * gallery_size / best,
          'retrieval/s_scaled_to_10k_x_1m': best * scale}


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
    cpu_peak = measure_matmul_flops(dtype)
    figures['cpu/matmul_flops'] = cpu_peak
    log(f'cpu/matmul_flops: {_format(cpu_peak)}')
  if FLAGS.fsdp_memory:
    sizes = [int(s) for s in FLAGS.fsdp_memory.split(',') if s.strip()]
    figures.update(fsdp_memory(config, batch, sizes, log=log))
    _print_new(figures, 'fsdp')
  if FLAGS.train:
    figures.update(benchmark_train(config, batch, FLAGS.steps, FLAGS.warmup, cpu_peak, log=log))
    _print_new(figures, 'train/')
  if FLAGS.variants:
    from ivt_jax.bench import variants  # pylint: disable=g-import-not-at-top
    names = [v.strip() for v in FLAGS.variants.split(',') if v.strip()]
    figures.update(variants.compare(config, batch, names, FLAGS.chunk, FLAGS.steps if FLAGS.train else 0,
                                    FLAGS.warmup, log=log))
    _print_new(figures, 'variant/')
    print(variants.table(figures, names), flush=True)
  if FLAGS.part_cost:
    from ivt_jax.bench import part_cost  # pylint: disable=g-import-not-at-top
    print(part_cost.format_cost(part_cost.cost_summary(config, FLAGS.steps if FLAGS.train else 0)), flush=True)
  if FLAGS.loop:
    from ivt_jax.bench import loop as loop_benchmark  # pylint: disable=g-import-not-at-top  (draws a source: only when asked)
    figures.update(loop_benchmark.benchmark_loop(config, FLAGS.steps, FLAGS.warmup, num_ids=FLAGS.loop_ids,
                                                 images_per_id=FLAGS.loop_images_per_id,
                                                 image_format=FLAGS.loop_format, log=log))
    _print_new(figures, 'loop/')
  if FLAGS.retrieval:
    accel = platform != 'cpu'
    q = FLAGS.retrieval_queries or (TARGET_QUERIES if accel else TARGET_QUERIES // 10)
    g = FLAGS.retrieval_gallery or (TARGET_GALLERY if accel else TARGET_GALLERY // 10)
    dtype = FLAGS.retrieval_dtype or ('bfloat16' if accel else 'float32')
    figures.update(benchmark_retrieval(q, g, FLAGS.retrieval_dim or config.model.width, dtype,
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

