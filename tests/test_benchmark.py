"""ivt_jax.benchmark: the CLI at a tiny size on 8 CPU devices, the peak table, the random batch."""
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from ivt_jax.bench import step as benchmark
from ivt_jax.training import setup as step_setup
from conftest import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LINE = re.compile(r'^([\w/.-]+): ([-+0-9.eE]+|nan|inf)$')


def test_peak_flops_table():
  assert benchmark.peak_flops('NVIDIA H100 80GB HBM3', 'bfloat16') == ('NVIDIA H100 SXM', 989.4e12)
  assert benchmark.peak_flops('NVIDIA H100 PCIe', 'bfloat16')[0] == 'NVIDIA H100 PCIe'
  assert benchmark.peak_flops('NVIDIA H200', 'float32') == ('NVIDIA H200', 494.7e12)
  assert benchmark.peak_flops('NVIDIA A100-SXM4-80GB', 'bfloat16')[1] == 312e12
  assert benchmark.peak_flops('TPU v4', 'bfloat16')[0] == 'TPU v4'
  assert benchmark.peak_flops('TPU v5 lite', 'bfloat16')[0] == 'TPU v5e'
  assert benchmark.peak_flops('TPU v5', 'bfloat16')[0] == 'TPU v5p'
  assert benchmark.peak_flops('TPU v6 lite', 'bfloat16')[0] == 'TPU v6e'
  assert benchmark.peak_flops('cpu', 'float32') is None


def test_random_batch_has_the_pipeline_shapes():
  c = tiny_config()
  batch = step_setup.random_batch(c, 4, seed=1)
  shapes = step_setup.batch_shapes(c, 4)
  assert set(batch) == set(shapes)
  for k, (shape, dtype) in shapes.items():
    assert batch[k].shape == shape and batch[k].dtype == dtype, k
  assert batch['text_ids'].max() < c.model.vocab_size
  assert np.all(batch['text_ids'][batch['text_mask'] == 0] == 0)
  assert batch['image_keep'][..., 0].all() and batch['text_keep'][..., 0].all()
  assert not batch['image_keep'].all()  # bmm_ratio 0.2 drops tokens
  np.testing.assert_array_equal(batch['person_id'], np.arange(4) // c.data.images_per_id)


@pytest.mark.slow
def test_cli_prints_positive_figures(tmp_path):
  """Tiny model, 8 devices: fsdp memory table, the timed step and retrieval, every figure `name: value`."""
  out = str(tmp_path / 'figures.json')
  args = [sys.executable, '-m', 'ivt_jax.benchmark', '--config=configs/demo.py', '--batch=8', '--steps=2',
          '--warmup=1', '--fsdp_memory=1,8', '--retrieval_queries=100', '--retrieval_gallery=5003',
          '--retrieval_repeats=2', '--gallery_chunk=512', f'--output={out}',
          # Matrix products dominate at this size (small vocabulary), so XLA's FLOPs meet the analytic count.
          '--config.model.width=128', '--config.model.depth=1', '--config.model.num_heads=2',
          '--config.model.mlp_dim=512', '--config.model.vocab_size=100', '--config.data.text_length=16',
          '--config.data.image_size=(32, 16)', '--config.model.patch_size=8', '--config.model.stride=8']
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8', JAX_PLATFORMS='cpu')
  proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-4000:]
  figures = {}
  for line in proc.stdout.splitlines():
    m = LINE.match(line.strip())
    if m:
      figures[m.group(1)] = float(m.group(2))
  expected = ['cpu/matmul_flops', 'train/pairs_per_s', 'train/samples_per_s', 'train/step_s', 'train/flops_xla',
              'train/flops_analytic', 'train/utilization_xla', 'train/utilization_analytic',
              'train/compiled_total_bytes', 'retrieval/s', 'retrieval/s_scaled_to_10k_x_1m',
              'fsdp1/compiled_total_bytes', 'fsdp8/compiled_total_bytes', 'fsdp1/param_bytes_per_device']
  for key in expected:
    assert key in figures, (key, proc.stdout)
    assert figures[key] > 0 and np.isfinite(figures[key]), (key, figures[key])
  assert figures['train/pairs_per_step'] == 24
  assert figures['train/pairs_per_s'] == pytest.approx(24 / figures['train/step_s'], rel=1e-4)
  assert 0.7 < figures['train/flops_xla'] / figures['train/flops_analytic'] < 1.6
  assert figures['train/utilization_xla'] < 1.5
  # Sharding the parameters and optimizer state over 8 devices leaves less on each.
  assert figures['fsdp8/param_bytes_per_device'] < figures['fsdp1/param_bytes_per_device'] / 2
  assert figures['fsdp8/compiled_argument_bytes'] < figures['fsdp1/compiled_argument_bytes']
  import json
  saved = json.load(open(out))
  assert saved['device_count'] == 8 and saved['train/step_s'] == pytest.approx(figures['train/step_s'], rel=1e-5)


def test_sentence_level_alone_trains_on_one_pair_per_sample():
  """data.mla_levels=('sentence',) (no MLA): batches of one level, a step that runs on them, a third of the work."""
  import jax
  from ivt_jax.runtime import sharding as sharding_lib
  c = tiny_config()
  n = jax.device_count()  # the batch splits over the devices
  full_flops = benchmark.analytic_train_flops(c, n)
  c.data.mla_levels = ('sentence',)
  shapes = step_setup.batch_shapes(c, n)
  assert shapes['images'][0][:2] == shapes['text_ids'][0][:2] == (n, 1)
  setup, compiled, _ = step_setup.compile_train_step(c, n)
  data = sharding_lib.global_batch(step_setup.local_rows(step_setup.random_batch(c, n, seed=0)), setup.mesh)
  state, metrics = compiled(setup.init_state(), data)
  assert int(state.step) == 1 and float(metrics['finite']) == 1.0 and np.isfinite(float(metrics['loss']))
  assert benchmark.analytic_train_flops(c, n) < 0.5 * full_flops
