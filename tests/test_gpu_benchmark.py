"""The one-call GPU benchmark (launch/gpu_benchmark.sh -> ivt_jax.tools.gpu_benchmark) at a tiny size on the CPU,
its wheel list, its report, and the reference harness (ivt_jax.tools.reference) where torch and a checkout of
the reference are at hand (IVT_REFERENCE_REPO=DIR)."""
import json
import os
import re
import subprocess
import sys

import pytest

from ivt_jax.tools import gpu_benchmark
from ivt_jax.tools import reference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _pins(path):
  pins = {}
  for line in open(os.path.join(ROOT, path)):
    line = line.split('#')[0].strip()
    if line:
      name, version = line.split('==')
      pins[re.sub(r'[-_.]+', '-', name).lower()] = version
  return pins


def test_wheel_list_pins_what_the_requirements_pin():
  wheels = _pins('launch/gpu_wheels.txt')
  project = {**_pins('requirements.txt'), **_pins('requirements-nodeps.txt')}
  assert {'grain', 'ml-collections', 'nltk', 'textblob-aptagger', 'array-record'} <= set(wheels)
  for name, version in wheels.items():
    assert project.get(name) == version, (name, version, project.get(name))
  # Every required distribution the GPU machines lack is in the list.
  on_gpu_machines = {'jax', 'flax', 'optax', 'numpy', 'pillow', 'sentencepiece', 'tokenizers'}
  for dist in gpu_benchmark.REQUIRED.values():
    assert dist in wheels or dist in on_gpu_machines, dist


def test_a_missing_package_stops_the_run_naming_it(monkeypatch, tmp_path, capsys):
  monkeypatch.setitem(gpu_benchmark.REQUIRED, 'no_such_module_for_ivt', 'no-such-dist')
  assert gpu_benchmark.main(['--size=tiny', f'--out={tmp_path}']) == 2
  err = capsys.readouterr().err
  assert 'missing packages: no-such-dist' in err and 'launch/gpu_wheels.txt' in err
  assert not os.listdir(tmp_path)  # nothing ran


def test_report_tables_and_ratio():
  f = {'train/device': 'NVIDIA H200',
       'train/s12/bfloat16/xla/pairs_per_s': 300.0, 'train/s12/bfloat16/cudnn/pairs_per_s': 400.0,
       'train/s12/bfloat16/xla/step_s_median': 0.28, 'train/s12/bfloat16/cudnn/step_s_median': 0.21,
       'train/s12/float32/xla/pairs_per_s': 150.0, 'train/s12/float32/xla/step_s_median': 0.56,
       'train/s12/float32/cudnn/error': 'RuntimeError: cuDNN attention needs float16 or bfloat16',
       'reference/s12/pairs_per_s': 100.0, 'reference/s12/step_s_median': 0.84,
       'reference/s16/error': 'ReferenceError: boom',
       'mfu/xla/batch_samples': 96, 'mfu/xla/pairs_per_s': 900.0, 'mfu/xla/utilization_analytic': 0.41,
       'retrieval/s': 0.5, 'retrieval/queries': 10000, 'retrieval/gallery': 1000000, 'retrieval/dim': 768,
       'pipeline/problem': 'stopped at its time limit of 60 s (figures so far kept)'}
  table = gpu_benchmark.report(f, {'date': '2026-11-30', 'size': 'full', 'seconds': 400, 'batch': 28})
  assert 'NVIDIA H200' in table
  assert '| stride 12 | 100.0 | 840.0 | 4.00x | 1.50x |' in table  # best bf16 (cudnn 400) / 100; fp32 150 / 100
  assert '| stride 16 | ReferenceError: boom |' in table
  assert 'not run: RuntimeError: cuDNN attention needs float16 or bfloat16' in table
  assert '| xla attention | 96 x 3 | 900.0 | 41.0% |' in table
  assert '| top-10 of 10,000 queries over 1,000,000 images (768-d) | 0.500 s |' in table
  assert 'stopped at its time limit of 60 s' in table
  assert '| uniform_mask | not run |' in table
  f.update({'lesswork/fixed_remove/flops_xla': 9.0e11, 'lesswork/fixed_remove/step_s_median': 0.2,
            'lesswork/fixed_remove/pairs_per_s': 420.0, 'lesswork/fixed_remove/compiled_total_bytes': 2 * 2 ** 30,
            'lesswork/chunked/largest_fitted': 9000, 'lesswork/chunked/timed_batch': 2044,
            'lesswork/chunked/largest/step_s_median': 4.0, 'lesswork/chunked/largest/pairs_per_s': 1533.0})
  table = gpu_benchmark.report(f, {'date': '2026-11-30', 'size': 'full', 'seconds': 400, 'batch': 28})
  assert '| fixed_remove | 900.0 | 200.0 | 420.0 | 2.00 |' in table
  assert '| chunked: the largest batch that fits 9000 x 3 (fitted), timed at 2044 x 3 | | 4,000.0 | 1,533.0 |' in table


def test_reference_harness_names_a_wrong_directory(tmp_path):
  with pytest.raises(reference.ReferenceError, match='is not a directory'):
    reference.load_reference(str(tmp_path / 'absent'))
  with pytest.raises(reference.ReferenceError, match=r'model/backbones/vit_vl.py not found'):
    reference.load_reference(str(tmp_path))


@pytest.mark.skipif(not (os.environ.get('IVT_REFERENCE_REPO') and
                         __import__('importlib').util.find_spec('torch')),
                    reason='needs torch and IVT_REFERENCE_REPO (a checkout of the reference)')
def test_reference_step_runs():
  f = reference.time_train_step(os.environ['IVT_REFERENCE_REPO'], stride=16, ids=1, images_per_id=2,
                                text_length=16, image_size=(64, 32), steps=2, warmup=1,
                                model_kwargs=dict(width=64, depth=2, num_heads=2, vocab_size=1000))
  assert f['reference/pairs_per_s'] > 0 and f['reference/pairs_per_step'] == 6


@pytest.mark.slow
def test_the_script_runs_every_section_at_a_tiny_size(tmp_path):
  env = dict(os.environ, PYTHON=sys.executable, JAX_PLATFORMS='cpu', IVT_WHEELS=str(tmp_path / 'no-wheels'))
  env.pop('XLA_FLAGS', None)  # one CPU device, as one GPU
  out = tmp_path / 'out'
  # A generous budget: CI runs other tests beside this one on its two cores.
  args = ['bash', 'launch/gpu_benchmark.sh', '--size=tiny', f'--out={out}', '--budget_s=2400']
  proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  saved = json.load(open(out / 'gpu_benchmark.json'))
  f = saved['figures']
  for stride in (12, 16):
    for dtype in ('float32', 'bfloat16'):
      assert f[f'train/s{stride}/{dtype}/xla/pairs_per_s'] > 0
      assert f[f'train/s{stride}/{dtype}/xla/compiled_total_bytes'] > 0
      assert 'cuDNN' in f[f'train/s{stride}/{dtype}/cudnn/error']  # no cuDNN on a CPU: named, not a crash
  assert 0 < f['mfu/xla/utilization_analytic'] < 1.5
  assert f['retrieval/s'] > 0 and f['pipeline/samples_per_s'] > 0
  assert f['loop/step_alone_steps_per_s'] > 0 and f['loop/loop_steps_per_s'] > 0
  assert f['reference/skipped']
  for name in ('uniform_mask', 'fixed_mask', 'fixed_remove', 'chunked', 'packed'):
    assert f[f'lesswork/{name}/pairs_per_s'] > 0 and f[f'lesswork/{name}/compiled_total_bytes'] > 0
  assert f['lesswork/fixed_remove/flops_xla'] < f['lesswork/fixed_mask/flops_xla']
  assert f['lesswork/packed/flops_xla'] < f['lesswork/fixed_remove/flops_xla']
  for name in ('fixed_remove', 'chunked'):
    assert f[f'lesswork/{name}/largest_fitted'] >= f[f'lesswork/{name}/timed_batch'] > 0
    assert f[f'lesswork/{name}/largest/pairs_per_s'] > 0
  table = open(out / 'gpu_benchmark.md').read()
  assert table in proc.stdout
  assert re.search(r'\| stride 12 \| float32 \| xla \| [\d,.]+ \| [\d,.]+ \| [\d.]+ \|', table), table
