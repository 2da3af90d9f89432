"""Every accelerator figure in one call: `bash launch/gpu_benchmark.sh` (which runs this module).

  python -m ivt_jax.tools.gpu_benchmark [--reference_repo=DIR] [--out=DIR] [--size=full|tiny]

Sections, each run in its own process with a time limit (a crash or a time-out costs that section alone; figures
are kept as they come), in this order:
  train      ours at the reference batch (7 ids x 4 = 28 samples x 3 MLA levels), ViT-B at stride 12 and 16,
             float32 and bfloat16, XLA attention and cuDNN fused attention: pairs/s, step time, compiled memory
             per device (the 8 steps are traced one by one and compiled by XLA in parallel threads);
  reference  the public reference's training step on the same device at the same batch with its own fp16 AMP
             (ivt_jax.tools.reference, needs torch and --reference_repo), stride 12 and 16, and ours / reference;
  mfu        model-FLOPs utilization in bfloat16 at a batch that fills the device (--mfu_batch, halved on
             out-of-memory), stride 16;
  retrieval  top-10 of 10,000 text queries over 1,000,000 images (random unit embeddings, 768-d, bfloat16);
  pipeline   the Grain input pipeline at CUHK-PEDES's shapes (384x128 output, text 64, stride 12) on JPEG images
             (in-memory SynthPEDES drawn at --pipeline_image_hw) with --pipeline_workers workers: samples/s;
  loop       the training loop of configs/cuhk.py in bfloat16 (ivt_jax.bench.loop): the step alone, that
             pipeline alone and the two together as ivt_jax.training.loop runs them, in steps/s;
  lesswork   the step with less work, bfloat16, stride 12 (ivt_jax.bench.variants): BMM masked (the reference's
             drop count, and fixed drops), by token removal, removal with the chunked contrastive gradient
             (chunks of a quarter of it) and removal with packed texts, each at the reference batch: step time, pairs/s, compiled memory;
             then for removal without and with chunks the largest batch whose compiled step fits the device
             (compiled memory fitted over three batches, ivt_jax.planner.memory_fit, read at 90% of the
             device's memory; chunks of one reference batch) and the step time at it (at most 2,048 samples, so that the step stays seconds
             long; halved on out-of-memory).
Writes <out>/gpu_benchmark.json (every figure) and <out>/gpu_benchmark.md (the tables), and prints the tables.
--size=tiny runs the same program on a tiny model and small sizes (the CPU check in CI).
Packages: jax, flax, optax, numpy, pillow, sentencepiece and tokenizers are on the GPU machines; grain,
ml-collections, nltk and the tagger data come as wheels (launch/gpu_wheels.txt). A missing one stops the run
before any section starts, naming it.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable

SECTIONS = ('train', 'reference', 'mfu', 'retrieval', 'pipeline', 'loop', 'lesswork')
# Section time limits (seconds), scaled by --budget_s / BUDGET_UNIT so that the whole run fits its budget.
LIMITS = {'train': 200, 'reference': 70, 'mfu': 70, 'retrieval': 35, 'pipeline': 45, 'loop': 60, 'lesswork': 110}
BUDGET_UNIT = float(sum(LIMITS.values()))  # --budget_s scales the limits to add up to it
REQUIRED = {'jax': 'jax', 'flax': 'flax', 'optax': 'optax', 'numpy': 'numpy', 'PIL': 'pillow',
            'ml_collections': 'ml-collections', 'grain': 'grain', 'array_record': 'array-record',
            'nltk': 'nltk', 'sentencepiece': 'sentencepiece', 'tokenizers': 'tokenizers',
            'textblob_aptagger': 'textblob-aptagger'}
WHEELS_HINT = ('bring them as wheels: on a machine with network access, run the download command in '
               'launch/README.md ("GPU benchmark"), which fetches launch/gpu_wheels.txt into launch/wheels/, and '
               'run launch/gpu_benchmark.sh, which installs them')
GIB = 2.0 ** 30


def missing_packages(required: dict[str, str] = REQUIRED) -> list[str]:
  """The distribution names of the required modules that cannot be imported here."""
  return [dist for module, dist in required.items() if importlib.util.find_spec(module) is None]


# ---- sizes and configs ---------------------------------------------------------------------------------------

def _sizes(size: str) -> dict[str, Any]:
  if size == 'full':
    return dict(ids=7, images_per_id=4, steps=10, warmup=3, mfu_batch=192, retrieval=(10_000, 1_000_000, 768),
                pipeline_ids=64, pipeline_images_per_id=4, pipeline_batches=20, ref_steps=10, ref_warmup=3,
                largest_cap=2048)
  if size == 'tiny':
    return dict(ids=2, images_per_id=2, steps=2, warmup=1, mfu_batch=8, retrieval=(64, 3000, 64),
                pipeline_ids=8, pipeline_images_per_id=2, pipeline_batches=2, ref_steps=2, ref_warmup=1,
                largest_cap=16)
  raise ValueError(f'--size must be full or tiny, got {size!r}')


def model_config(size: str, stride: int, dtype: str, attention: str):
  """configs/cuhk.py (ViT-B/16, 384x128, text 64) at a stride, dtype and attention; tiny: a small stand-in."""
  from configs import cuhk  # pylint: disable=g-import-not-at-top
  c = cuhk.get_config()
  c.model.update(stride=stride, dtype=dtype, attention=attention)
  c.data.text_length, c.data.text_buckets = 64, ()  # every batch at 64 positions, as the reference harness's
  if size == 'tiny':
    c.data.image_size = (64, 32)
    c.data.text_length = 16
    c.model.update(width=64, depth=2, num_heads=2, mlp_dim=128, vocab_size=1000)
  s = _sizes(size)
  c.data.ids_per_batch, c.data.images_per_id = s['ids'], s['images_per_id']
  return c


def _short(e: BaseException) -> str:
  text = f'{type(e).__name__}: {e}'.strip().splitlines()
  return (text[0] if text else type(e).__name__)[:300]


# ---- sections (each runs in its own process) ---------------------------------------------------------------

def _emit_step_figures(emit, prefix: str, figures: dict, keys) -> None:
  """benchmark.benchmark_train's figures `train/<key>` as `<prefix>/<key>`."""
  for key in keys:
    if f'train/{key}' in figures:
      emit(f'{prefix}/{key}', figures[f'train/{key}'])


def section_train(size: str, emit: Callable[[str, Any], None], args) -> None:
  import jax  # pylint: disable=g-import-not-at-top
  from ivt_jax.bench import step as benchmark  # pylint: disable=g-import-not-at-top
  from ivt_jax.training import setup as step_setup  # pylint: disable=g-import-not-at-top
  s = _sizes(size)
  batch = s['ids'] * s['images_per_id']
  rows = [(stride, dtype, attn) for stride in (12, 16) for dtype in ('float32', 'bfloat16')
          for attn in ('xla', 'cudnn')]
  configs = [model_config(size, *r) for r in rows]
  emit('train/device', jax.devices()[0].device_kind)
  t0 = time.perf_counter()
  errors = step_setup.compile_many(configs, batch, max_workers=args.compile_workers)
  emit('train/compile_all_s', time.perf_counter() - t0)
  for (stride, dtype, attn), c, err in zip(rows, configs, errors):
    name = f'train/s{stride}/{dtype}/{attn}'
    if err is not None:
      emit(f'{name}/error', _short(err))
      continue
    try:
      f = benchmark.benchmark_train(c, batch, s['steps'], s['warmup'], log=lambda *a: None)
    except Exception as e:  # pylint: disable=broad-except
      emit(f'{name}/error', _short(e))
      continue
    _emit_step_figures(emit, name, f, ('pairs_per_s', 'step_s', 'step_s_median', 'compiled_total_bytes',
                                       'compile_s', 'peak_bytes_in_use', 'utilization_analytic'))
    print(f'{name}: {f["train/pairs_per_s"]:.1f} pairs/s, step {f["train/step_s_median"] * 1e3:.1f} ms, '
          f'compiled memory {f["train/compiled_total_bytes"] / GIB:.2f} GiB', flush=True)


def section_reference(size: str, emit, args) -> None:
  if not args.reference_repo:
    emit('reference/skipped', 'no --reference_repo given')
    return
  if importlib.util.find_spec('torch') is None:
    emit('reference/skipped', 'torch is not importable')
    return
  from ivt_jax.tools import reference  # pylint: disable=g-import-not-at-top
  s = _sizes(size)
  kwargs = {}
  text_length, image_size = 64, (384, 128)
  if size == 'tiny':
    kwargs = dict(model_kwargs=dict(width=64, depth=2, num_heads=2, vocab_size=1000))
    text_length, image_size = 16, (64, 32)
  for stride in (12, 16):
    try:
      f = reference.time_train_step(args.reference_repo, stride=stride, ids=s['ids'],
                                    images_per_id=s['images_per_id'], text_length=text_length,
                                    image_size=image_size, steps=s['ref_steps'], warmup=s['ref_warmup'], **kwargs)
    except Exception as e:  # pylint: disable=broad-except
      emit(f'reference/s{stride}/error', _short(e))
      continue
    for k, v in f.items():
      emit(k.replace('reference/', f'reference/s{stride}/'), v)


def section_mfu(size: str, emit, args) -> None:
  from ivt_jax.bench import step as benchmark  # pylint: disable=g-import-not-at-top
  s = _sizes(size)
  for attn in ('xla', 'cudnn'):
    batch = args.mfu_batch or s['mfu_batch']
    c = model_config(size, 16, 'bfloat16', attn)
    while True:
      try:
        f = benchmark.benchmark_train(c, batch, s['steps'], s['warmup'], log=lambda *a: None)
        break
      except Exception as e:  # pylint: disable=broad-except
        oom = 'RESOURCE_EXHAUSTED' in str(e) or 'out of memory' in str(e).lower()
        if oom and batch > 8:
          print(f'mfu/{attn}: batch {batch} does not fit, trying {batch // 2}', flush=True)
          batch //= 2
          continue
        emit(f'mfu/{attn}/error', _short(e))
        f = None
        break
    if f is None:
      continue
    emit(f'mfu/{attn}/batch_samples', batch)
    _emit_step_figures(emit, f'mfu/{attn}', f, ('pairs_per_s', 'step_s_median', 'utilization_analytic',
                                                'utilization_xla', 'flops_analytic', 'peak_flops',
                                                'compiled_total_bytes'))
    print(f'mfu/{attn}: batch {batch} x 3, {f["train/pairs_per_s"]:.1f} pairs/s, model-FLOPs utilization '
          f'{f.get("train/utilization_analytic", float("nan")):.3f}', flush=True)


def section_retrieval(size: str, emit, args) -> None:
  import jax  # pylint: disable=g-import-not-at-top
  from ivt_jax.bench import step as benchmark  # pylint: disable=g-import-not-at-top
  q, g, d = _sizes(size)['retrieval']
  dtype = 'float32' if jax.devices()[0].platform == 'cpu' else 'bfloat16'
  f = benchmark.benchmark_retrieval(q, g, d, dtype, k=10, repeats=3, log=lambda *a: None)
  for k, v in f.items():
    emit(k, v)
  print(f'retrieval: top-10 of {q} queries over {g} images: {f["retrieval/s"]:.3f} s', flush=True)


def section_pipeline(size: str, emit, args) -> None:
  from input_pipeline import benchmark as input_benchmark  # pylint: disable=g-import-not-at-top
  from input_pipeline import examples as examples_lib  # pylint: disable=g-import-not-at-top
  from input_pipeline import memory_source  # pylint: disable=g-import-not-at-top
  s = _sizes(size)
  c = model_config(size, 12, 'float32', 'xla')
  if size == 'full':
    c.model.vocab_size = 30522
  workers = args.pipeline_workers if args.pipeline_workers >= 0 else min(16, os.cpu_count() or 1)
  hw = tuple(int(x) for x in args.pipeline_image_hw.split(',')) if size == 'full' else (48, 24)
  with tempfile.TemporaryDirectory() as tmpdir:
    t0 = time.perf_counter()
    source = memory_source.synthetic_source(s['pipeline_ids'], s['pipeline_images_per_id'], hw,
                                            image_format='jpeg')
    tokenizer = memory_source.tokenizer_for(c, source, tmpdir)
    emit('pipeline/source_s', time.perf_counter() - t0)
    index = examples_lib.TrainIndex.from_source(source)
    rate, main_ms = input_benchmark.measure(c, source, tokenizer, workers, s['pipeline_batches'], 2, index)
  emit('pipeline/workers', workers)
  emit('pipeline/stored_image_hw', list(hw))
  emit('pipeline/output_image_hw', list(c.data.image_size))
  emit('pipeline/samples_per_s', rate)
  emit('pipeline/main_process_ms_per_batch', main_ms)
  print(f'pipeline: {workers} workers, {rate:.1f} samples/s', flush=True)


def section_loop(size: str, emit, args) -> None:
  from ivt_jax.bench import loop as loop_benchmark  # pylint: disable=g-import-not-at-top
  s = _sizes(size)
  c = model_config(size, 12, 'bfloat16', 'xla')
  c.data.worker_count = (args.pipeline_workers if args.pipeline_workers >= 0 else min(16, os.cpu_count() or 1)
                         ) if size == 'full' else 0
  if size == 'full':
    c.data.synthetic.image_size = tuple(int(x) for x in args.pipeline_image_hw.split(','))
  else:
    c.data.synthetic.image_size = (48, 24)
  f = loop_benchmark.benchmark_loop(c, s['steps'], s['warmup'], num_ids=s['pipeline_ids'],
                                    images_per_id=s['pipeline_images_per_id'], image_format='jpeg',
                                    log=lambda *a: None)
  emit('loop/workers', int(c.data.worker_count))
  for k, v in f.items():
    emit(k, v)
  print(f'loop: step alone {f["loop/step_alone_steps_per_s"]:.2f}, pipeline alone '
        f'{f["loop/pipeline_alone_steps_per_s"]:.2f}, loop {f["loop/loop_steps_per_s"]:.2f} steps/s', flush=True)


def _device_limit_bytes() -> float:
  import jax  # pylint: disable=g-import-not-at-top
  try:
    stats = jax.devices()[0].memory_stats() or {}
  except Exception:  # pylint: disable=broad-except  (backends without memory stats)
    stats = {}
  return float(stats.get('bytes_limit') or 0) or 16 * GIB


def section_lesswork(size: str, emit, args) -> None:
  from ivt_jax.bench import step as benchmark  # pylint: disable=g-import-not-at-top
  from ivt_jax.bench import variants  # pylint: disable=g-import-not-at-top
  from ivt_jax.planner import memory_fit  # pylint: disable=g-import-not-at-top
  from ivt_jax.training import setup as step_setup  # pylint: disable=g-import-not-at-top
  s = _sizes(size)
  batch = s['ids'] * s['images_per_id']
  base = model_config(size, 12, 'bfloat16', 'xla')
  f = variants.compare(base, batch, variants.VARIANTS, max(1, batch // 4), s['steps'], s['warmup'], log=lambda *a: None)
  for k, v in f.items():
    emit('lesswork/' + k[len('variant/'):], v)
  print(variants.table(f, variants.VARIANTS), flush=True)
  device_bytes = _device_limit_bytes()
  emit('lesswork/device_limit_bytes', device_bytes)
  limit = 0.9 * device_bytes
  for name, points in (('fixed_remove', (1, 2, 4)), ('chunked', (4, 16, 64))):
    c = variants.variant_config(base, name, batch)
    pts = [batch * p for p in points]
    totals = []
    for b in pts:
      _, compiled, _ = step_setup.compile_train_step(c, b)
      totals.append(float(benchmark.compiled_memory(compiled)['total']))
    coef = memory_fit.fit_memory(pts, totals, quadratic=name == 'chunked')
    fitted = memory_fit.largest_batch(coef, limit, batch)
    emit(f'lesswork/{name}/fit_points', pts)
    emit(f'lesswork/{name}/fit_totals_bytes', totals)
    emit(f'lesswork/{name}/largest_fitted', fitted)
    top = min(fitted, s['largest_cap'] // batch * batch)  # the step is timed at most at the cap
    while top >= batch:
      try:
        r = benchmark.benchmark_train(c, top, 2, 1, log=lambda *a: None)
        break
      except Exception as e:  # pylint: disable=broad-except
        if 'RESOURCE_EXHAUSTED' not in str(e) and 'out of memory' not in str(e).lower():
          raise
        top = (top // 2) // batch * batch
    else:
      emit(f'lesswork/{name}/largest_error', f'no batch of {batch} or more fits')
      continue
    emit(f'lesswork/{name}/timed_batch', top)
    _emit_step_figures(emit, f'lesswork/{name}/largest', r, ('pairs_per_s', 'step_s_median', 'compiled_total_bytes'))
    print(f'lesswork/{name}: the largest batch that fits {fitted} x 3 (fitted); at {top}: '
          f'{r["train/pairs_per_s"]:.1f} pairs/s', flush=True)


SECTION_FNS = {'loop': section_loop, 'train': section_train, 'reference': section_reference, 'mfu': section_mfu,
               'retrieval': section_retrieval, 'pipeline': section_pipeline, 'lesswork': section_lesswork}


def run_section(name: str, args) -> int:
  """In the section's own process: runs it, writing every figure to --json as it comes."""
  figures: dict[str, Any] = {}

  def emit(key, value):
    figures[key] = value
    tmp = args.json + '.tmp'
    with open(tmp, 'w') as f:
      json.dump(figures, f, indent=1)
    os.replace(tmp, args.json)

  SECTION_FNS[name](args.size, emit, args)
  return 0


# ---- the whole run -----------------------------------------------------------------------------------------

def _run_child(name: str, args, json_path: str, limit: float) -> tuple[dict, str]:
  """Runs one section in a child process within `limit` seconds -> (its figures, '' or what went wrong)."""
  cmd = [sys.executable, '-m', 'ivt_jax.tools.gpu_benchmark', f'--section={name}', f'--size={args.size}',
         f'--json={json_path}', f'--compile_workers={args.compile_workers}', f'--mfu_batch={args.mfu_batch}',
         f'--pipeline_workers={args.pipeline_workers}', f'--pipeline_image_hw={args.pipeline_image_hw}']
  if args.reference_repo:
    cmd.append(f'--reference_repo={args.reference_repo}')
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL=os.environ.get('TF_CPP_MIN_LOG_LEVEL', '2'))
  problem = ''
  try:
    proc = subprocess.run(cmd, env=env, timeout=limit, stdout=None, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
      tail = [l for l in proc.stderr.strip().splitlines() if l.strip()][-3:]
      problem = f'exit status {proc.returncode}: ' + ' | '.join(tail)[-400:]
  except subprocess.TimeoutExpired:
    problem = f'stopped at its time limit of {limit:.0f} s (figures so far kept)'
  figures = {}
  if os.path.exists(json_path):
    with open(json_path) as f:
      figures = json.load(f)
  return figures, problem


def _fmt(v, unit='', digits=1):
  if v is None:
    return '-'
  if isinstance(v, float) and (math.isnan(v) or math.isinf(v)):
    return '-'
  return f'{v:,.{digits}f}{unit}'


def report(figures: dict[str, Any], meta: dict[str, Any]) -> str:
  """The markdown tables of a run's figures."""
  g = figures.get
  lines = [f'GPU benchmark, {meta.get("date", "")}: {g("train/device", meta.get("device", "?"))}, '
           f'size {meta.get("size")}, {meta.get("seconds", 0):.0f} s', '']
  b = meta.get('batch', 28)
  lines += [f'| ours, {b} x 3 pairs | dtype | attention | pairs/s | step (ms) | compiled memory (GiB) |',
            '|---|---|---|---|---|---|']
  for stride in (12, 16):
    for dtype in ('float32', 'bfloat16'):
      for attn in ('xla', 'cudnn'):
        n = f'train/s{stride}/{dtype}/{attn}'
        err = g(f'{n}/error')
        if err:
          lines.append(f'| stride {stride} | {dtype} | {attn} | not run: {err[:120]} | | |')
          continue
        mem = g(f'{n}/compiled_total_bytes')
        lines.append(f'| stride {stride} | {dtype} | {attn} | {_fmt(g(f"{n}/pairs_per_s"))} | '
                     f'{_fmt((g(f"{n}/step_s_median") or math.nan) * 1e3)} | '
                     f'{_fmt(mem / GIB if mem else None, digits=2)} |')
  lines += ['', f'| reference (fp16 AMP on CUDA), {b} x 3 pairs | pairs/s | step (ms) | ours bf16 best / reference | '
            'ours fp32 XLA / reference |', '|---|---|---|---|---|']
  for stride in (12, 16):
    r = g(f'reference/s{stride}/pairs_per_s')
    if r is None:
      why = g(f'reference/s{stride}/error') or g('reference/skipped') or g('reference/problem') or 'not run'
      lines.append(f'| stride {stride} | {why[:120]} | | | |')
      continue
    best = max([g(f'train/s{stride}/bfloat16/{a}/pairs_per_s') or 0 for a in ('xla', 'cudnn')])
    fp32 = g(f'train/s{stride}/float32/xla/pairs_per_s')
    lines.append(f'| stride {stride} | {_fmt(r)} | {_fmt(g(f"reference/s{stride}/step_s_median") * 1e3)} | '
                 f'{_fmt(best / r if best else None, "x", 2)} | {_fmt(fp32 / r if fp32 else None, "x", 2)} |')
  lines += ['', '| model-FLOPs utilization, bfloat16, stride 16 | batch | pairs/s | MFU (analytic) | MFU (XLA count) |',
            '|---|---|---|---|---|']
  for attn in ('xla', 'cudnn'):
    err = g(f'mfu/{attn}/error')
    if err or g(f'mfu/{attn}/pairs_per_s') is None:
      lines.append(f'| {attn} attention | {(err or g("mfu/problem") or "not run")[:120]} | | | |')
      continue
    ua, ux = g(f'mfu/{attn}/utilization_analytic'), g(f'mfu/{attn}/utilization_xla')
    lines.append(f'| {attn} attention | {g(f"mfu/{attn}/batch_samples")} x 3 | {_fmt(g(f"mfu/{attn}/pairs_per_s"))} | '
                 f'{_fmt(100 * ua if ua else None, "%")} | {_fmt(100 * ux if ux else None, "%")} |')
  lines += ['', '| other | figure |', '|---|---|']
  if g('retrieval/s') is not None:
    lines.append(f'| top-10 of {g("retrieval/queries"):,} queries over {g("retrieval/gallery"):,} images '
                 f'({g("retrieval/dim")}-d) | {_fmt(g("retrieval/s"), " s", 3)} |')
  else:
    lines.append(f'| retrieval | {g("retrieval/problem", "not run")} |')
  if g('pipeline/samples_per_s') is not None:
    hw = g('pipeline/stored_image_hw')
    lines.append(f'| input pipeline, {g("pipeline/workers")} workers, JPEG {hw[0]}x{hw[1]} -> '
                 f'{"x".join(map(str, g("pipeline/output_image_hw")))} | {_fmt(g("pipeline/samples_per_s"))} '
                 'samples/s |')
  else:
    lines.append(f'| input pipeline | {g("pipeline/problem", "not run")} |')
  if g('loop/loop_steps_per_s') is not None:
    lines.append(f'| loop of configs/cuhk.py (bfloat16, {g("loop/workers")} workers): step alone / pipeline alone / '
                 'loop / loop in series | ' + ' / '.join(
                     _fmt(g(f'loop/{k}_steps_per_s'), digits=2)
                     for k in ('step_alone', 'pipeline_alone', 'loop', 'loop_in_series')) + ' steps/s |')
  else:
    lines.append(f'| training loop | {g("loop/problem", "not run")} |')
  lines += ['', f'| less work, bfloat16, stride 12, {b} x 3 pairs | GFLOP per step | step (ms) | pairs/s | compiled memory (GiB) |',
            '|---|---|---|---|---|']
  for name in ('uniform_mask', 'fixed_mask', 'fixed_remove', 'chunked', 'packed'):
    n = f'lesswork/{name}'
    if g(f'{n}/step_s_median') is None:
      lines.append(f'| {name} | {(g("lesswork/problem") or "not run")[:120]} | | | |')
      continue
    flops, mem = g(f'{n}/flops_xla'), g(f'{n}/compiled_total_bytes')
    lines.append(f'| {name} | {_fmt(flops / 1e9 if flops else None)} | {_fmt(g(f"{n}/step_s_median") * 1e3)} | '
                 f'{_fmt(g(f"{n}/pairs_per_s"))} | {_fmt(mem / GIB if mem else None, digits=2)} |')
  for name in ('fixed_remove', 'chunked'):
    top, fitted = g(f'lesswork/{name}/timed_batch'), g(f'lesswork/{name}/largest_fitted')
    if top:
      mem = g(f'lesswork/{name}/largest/compiled_total_bytes')
      lines.append(f'| {name}: the largest batch that fits {fitted} x 3 (fitted), timed at {top} x 3 | | '
                   f'{_fmt((g(f"lesswork/{name}/largest/step_s_median") or math.nan) * 1e3)} | '
                   f'{_fmt(g(f"lesswork/{name}/largest/pairs_per_s"))} | {_fmt(mem / GIB if mem else None, digits=2)} |')
  return '\n'.join(lines) + '\n'


def orchestrate(args) -> int:
  missing = missing_packages()
  if args.reference_repo and importlib.util.find_spec('torch') is None:
    missing.append('torch (for --reference_repo)')
  if missing:
    print(f'gpu_benchmark: missing packages: {", ".join(missing)}; {WHEELS_HINT}', file=sys.stderr)
    return 2
  out = os.path.abspath(args.out)
  os.makedirs(out, exist_ok=True)
  scale = args.budget_s / BUDGET_UNIT
  start = time.time()
  figures: dict[str, Any] = {}
  sections = [s for s in SECTIONS if s in args.sections.split(',')]
  with tempfile.TemporaryDirectory() as tmp:
    for name in sections:
      print(f'== {name}', flush=True)
      t0 = time.time()
      part, problem = _run_child(name, args, os.path.join(tmp, f'{name}.json'), LIMITS[name] * scale)
      figures.update(part)
      figures[f'{name}/section_s'] = time.time() - t0
      if problem:
        figures[f'{name}/problem'] = problem
        print(f'{name}: {problem}', flush=True)
  sizes = _sizes(args.size)
  meta = {'date': time.strftime('%Y-%m-%d'), 'size': args.size, 'batch': sizes['ids'] * sizes['images_per_id'],
          'seconds': time.time() - start, 'reference_repo': args.reference_repo or None, 'python': sys.version.split()[0]}
  try:
    import jax  # pylint: disable=g-import-not-at-top
    meta.update(jax=jax.__version__, device=jax.devices()[0].device_kind)
  except Exception:  # pylint: disable=broad-except
    pass
  table = report(figures, meta)
  with open(os.path.join(out, 'gpu_benchmark.json'), 'w') as f:
    json.dump({'meta': meta, 'figures': figures}, f, indent=1)
  with open(os.path.join(out, 'gpu_benchmark.md'), 'w') as f:
    f.write(table)
  print(table)
  print(f'written: {os.path.join(out, "gpu_benchmark.md")}, {os.path.join(out, "gpu_benchmark.json")}')
  return 0


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--reference_repo', default='', help='a checkout of TencentYoutuResearch/PersonRetrieval-IVT')
  p.add_argument('--out', default='gpu_benchmark_out', help='where the JSON and markdown go')
  p.add_argument('--size', default='full', choices=('full', 'tiny'))
  p.add_argument('--sections', default=','.join(SECTIONS), help='comma-separated subset of ' + ','.join(SECTIONS))
  p.add_argument('--budget_s', type=float, default=540.0, help='time for all sections together')
  p.add_argument('--compile_workers', type=int, default=8, help='steps compiled at once in the train section')
  p.add_argument('--mfu_batch', type=int, default=0, help='samples per step for the MFU figure (0: 192)')
  p.add_argument('--pipeline_workers', type=int, default=-1, help='Grain workers (-1: min(16, cores))')
  p.add_argument('--pipeline_image_hw', default='256,96', help='stored JPEG size H,W (resized to 384x128)')
  p.add_argument('--section', default='', help=argparse.SUPPRESS)
  p.add_argument('--json', default='', help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  unknown = set(args.sections.split(',')) - set(SECTIONS)
  if unknown:
    p.error(f'--sections: unknown {sorted(unknown)}; choose from {",".join(SECTIONS)}')
  if args.section:
    return run_section(args.section, args)
  return orchestrate(args)


if __name__ == '__main__':
  sys.exit(main())
