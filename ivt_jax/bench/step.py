"""The measurements of `python -m ivt_jax.benchmark` (its docstring says what is measured and printed):
the training step's speed, FLOPs and compiled memory, the fsdp memory sweep and gallery retrieval.
"""
import functools
import math
import resource
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


def _minor_faults() -> int:
  return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


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
  host_batch = step_setup.random_batch(config, batch, seed=config.seed)
  slots = step_setup.text_slots(config, host_batch)
  setup, compiled, compile_s = step_setup.compile_train_step(config, batch, slots)
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
  if slots:
    per_device = batch // mesh.size * levels * host_batch['text_ids'].shape[-1]
    log(f'texts packed: {slots} slots per device for {per_device} text positions')
  data = sharding_lib.global_batch(step_setup.local_rows(host_batch), mesh)
  times, cpu_times, faults = [], [], []
  for i in range(warmup + steps):
    t, c, f = time.perf_counter(), time.process_time(), _minor_faults()
    state, metrics = compiled(state, data)
    jax.block_until_ready((state, metrics))
    if i >= warmup:
      times.append(time.perf_counter() - t)
      cpu_times.append(time.process_time() - c)
      faults.append(_minor_faults() - f)
  metrics = jax.device_get(metrics)
  if not metrics['finite'] > 0:
    raise FloatingPointError(f'the benchmarked step gave a non-finite loss ({metrics["loss"]})')
  step_s = sum(times) / len(times)
  out = {'train/batch_samples': batch, 'train/pairs_per_step': levels * batch,
         'train/text_slots_per_device': slots,
         'train/compile_s': compile_s, 'train/step_s': step_s, 'train/step_s_median': statistics.median(times),
         'train/pairs_per_s': levels * batch / step_s, 'train/samples_per_s': batch / step_s,
         'train/flops_analytic': analytic_train_flops(config, batch),
         # CPU time of this process per step (all its threads): on a shared host, less sensitive to other load.
         'train/step_process_cpu_s': sum(cpu_times) / len(cpu_times),
         # Pages faulted in per step: ~0 when a step reuses the last one's memory (ivt_jax.runtime.host_memory),
         # about the compiled temporaries' bytes / 4 KiB when every step maps them afresh.
         'train/minor_faults_per_step': statistics.median(faults)}
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
