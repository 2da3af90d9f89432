"""The training loop's three speeds for one config, in steps per second: the step alone (one random batch, the
same every step), the input pipeline alone (the real Grain pipeline, each batch read in full), and the loop (the
pipeline feeding the step as ivt_jax.training.loop does: batches read and placed `data.prefetch` ahead by
ivt_jax.training.prefetch, metrics checked one step late) - and the loop with the pipeline in series (data.prefetch = 0)
for comparison. When the overlap works, the loop runs at about min(step, pipeline) steps/s rather than at
1 / (1 / step + 1 / pipeline); on a machine whose cores the step already fills, the pipeline's CPU work still
competes with it.

The source is in memory (input_pipeline.memory_source): `num_ids` SynthPEDES identities x `images_per_id` images
drawn at data.synthetic.image_size when the config sets one (the demo's drawn size), else at data.image_size,
stored as PNG or JPEG, with a tokenizer as the config asks (its vocabulary size becomes model.vocab_size).
"""
from __future__ import annotations

import statistics
import tempfile
import time
from typing import Any, Callable

import jax
import ml_collections

from ivt_jax.training import prefetch
from ivt_jax.runtime import sharding as sharding_lib
from ivt_jax.training import setup as step_setup


def _rate(times: list[float]) -> float:
  return len(times) / sum(times)


def _source_and_tokenizer(config, num_ids: int, images_per_id: int, image_format: str, tmpdir: str):
  from input_pipeline import memory_source  # pylint: disable=g-import-not-at-top  (drawing: only when asked)
  drawn = tuple(config.data.synthetic.get('image_size', (0, 0)) or (0, 0))
  hw = drawn if all(drawn) else tuple(config.data.image_size)
  source = memory_source.synthetic_source(num_ids, images_per_id, hw, seed=int(config.seed),
                                          image_format=image_format)
  return source, memory_source.tokenizer_for(config, source, tmpdir), hw


def _pipeline(config, source, tokenizer, index):
  from input_pipeline import pipeline  # pylint: disable=g-import-not-at-top
  return pipeline.train_iterator(config, source, tokenizer, seed=int(config.seed), index=index)


def _time_pipeline(config, source, tokenizer, index, steps: int, warmup: int) -> list[float]:
  it = _pipeline(config, source, tokenizer, index)
  times = []
  try:
    for i in range(warmup + steps):
      t = time.perf_counter()
      batch = next(it)
      for v in batch.values():  # read in full, as the transfer to the devices does
        v.max()
      if i >= warmup:
        times.append(time.perf_counter() - t)
  finally:
    it.close()
  return times


def _time_loop(config, source, tokenizer, index, compiled, setup, steps: int, warmup: int) -> list[float]:
  """Per-step wall times of the loop as ivt_jax.training.loop runs it (dispatch, then the previous step's metrics)."""
  feed = prefetch.training_feed(config, _pipeline(config, source, tokenizer, index), setup.mesh)
  state = setup.init_state()
  pending, times = None, []
  try:
    for i in range(warmup + steps):
      t = time.perf_counter()
      state, metrics = compiled(state, next(feed))
      if pending is not None:
        jax.device_get(pending)
      pending = metrics
      if i >= warmup:
        times.append(time.perf_counter() - t)
    jax.block_until_ready(state)
  finally:
    feed.close()
  return times


def benchmark_loop(config: ml_collections.ConfigDict, steps: int, warmup: int, *, num_ids: int = 64,
                   images_per_id: int = 4, image_format: str = 'png',
                   log: Callable[..., Any] = print) -> dict[str, Any]:
  """-> {'loop/...': figures}: step alone, pipeline alone, loop (prefetch) and loop in series, in steps/s."""
  from input_pipeline import examples as examples_lib  # pylint: disable=g-import-not-at-top
  config = ml_collections.ConfigDict(config.to_dict())
  config.data.text_buckets = ()  # one compiled step: every batch padded to data.text_length
  config.data.text_packing = False  # (packing compiles a step per slot count: ivt_jax.training.loop)
  batch = int(config.data.ids_per_batch) * int(config.data.images_per_id)
  with tempfile.TemporaryDirectory() as tmpdir:
    t0 = time.perf_counter()
    source, tokenizer, hw = _source_and_tokenizer(config, num_ids, images_per_id, image_format, tmpdir)
    config.model.vocab_size = int(tokenizer.vocab_size)
    log(f'loop: in-memory SynthPEDES {len(source)} {image_format.upper()} images {hw[0]}x{hw[1]} '
        f'(drawn in {time.perf_counter() - t0:.1f}s), {tokenizer!r}, batch {batch} samples, '
        f'data.worker_count={config.data.worker_count}, data.prefetch={config.data.get("prefetch", 2)}')
    index = examples_lib.TrainIndex.from_source(source, config.data.get('sample_unit', 'caption'))
    setup, compiled, _ = step_setup.compile_train_step(config, batch)
    state = setup.init_state()
    data = sharding_lib.global_batch(
        step_setup.local_rows(step_setup.random_batch(config, batch, seed=int(config.seed))), setup.mesh)
    step_times = []
    for i in range(warmup + steps):
      t = time.perf_counter()
      state, metrics = compiled(state, data)
      jax.block_until_ready((state, metrics))
      if i >= warmup:
        step_times.append(time.perf_counter() - t)
    del state
    pipe_times = _time_pipeline(config, source, tokenizer, index, steps, warmup)
    loops = {}
    for name, n in (('loop', max(1, int(config.data.get('prefetch', 2)))), ('loop_in_series', 0)):
      c = ml_collections.ConfigDict(config.to_dict())
      c.data.prefetch = n
      loops[name] = _time_loop(c, source, tokenizer, index, compiled, setup, steps, warmup)
  out = {'loop/step_alone_steps_per_s': _rate(step_times),
         'loop/pipeline_alone_steps_per_s': _rate(pipe_times),
         'loop/loop_steps_per_s': _rate(loops['loop']),
         'loop/loop_in_series_steps_per_s': _rate(loops['loop_in_series']),
         'loop/step_alone_s_median': statistics.median(step_times),
         'loop/pipeline_alone_s_median': statistics.median(pipe_times),
         'loop/loop_s_median': statistics.median(loops['loop']),
         'loop/loop_in_series_s_median': statistics.median(loops['loop_in_series'])}
  # 1.0: the loop runs as fast as its slower part alone; 0.0: as slow as the two in series would be.
  slow = min(out['loop/step_alone_steps_per_s'], out['loop/pipeline_alone_steps_per_s'])
  series = 1.0 / (1.0 / out['loop/step_alone_steps_per_s'] + 1.0 / out['loop/pipeline_alone_steps_per_s'])
  out['loop/overlap'] = (out['loop/loop_steps_per_s'] - series) / max(slow - series, 1e-12)
  return out
