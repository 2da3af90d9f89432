"""The compile planner: the tiny config compiled for Cloud TPU slices (libtpu) and 8 H100s (the CUDA plugin) on
this CPU, its figures read back, a batch too big for the chip refused, and the target's backend choices used."""
import json
import os
import subprocess
import sys

import pytest

from ivt_jax.planner import analysis
from ivt_jax.planner import devices as devices_lib
from ivt_jax.planner import targets
from tests.conftest import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
devices_lib.prepare_environment()  # the compilers' folder on the path (libtpu loads at its first topology)
needs_tpu = pytest.mark.skipif(not devices_lib.have_compiler('tpu'),
                               reason=f'libtpu not installed: {devices_lib.INSTALL}')
needs_cuda = pytest.mark.skipif(not devices_lib.have_compiler('cuda'),
                                reason=f'the CUDA plugin not installed: {devices_lib.INSTALL}')
TINY_FLAGS = ['--config.model.width=32', '--config.model.depth=2', '--config.model.num_heads=4',
              '--config.model.mlp_dim=64', '--config.data.image_size=(64, 32)', '--config.data.text_length=16',
              '--config.data.text_buckets=()', '--config.model.vocab_size=100']


def test_cloud_names_map_to_compiler_topologies():
  assert targets.parse_target('v4-8').topology == 'v4:2x2x1' and targets.parse_target('v4-8').chips == 4
  assert targets.parse_target('v4-32').topology == 'v4:2x2x4'
  assert targets.parse_target('v5p-128').topology == 'v5p:4x4x4'
  assert targets.parse_target('v5e-256').topology == 'v5e:16x16'
  assert targets.parse_target('v5litepod-16').topology == 'v5e:4x4'
  assert targets.parse_target('v6e-256').chips == 256
  assert targets.parse_target('v5e:4x4').cloud_name == 'v5e-16'
  assert targets.parse_target('h100x8').topology == '1x1x8'
  assert targets.parse_target('h200x16').topology == '1x2x8'
  for bad, says in (('v4-7', 'multiple of 2'), ('v5e-12', 'not one of'), ('tpu', 'not a target'),
                    ('h100x12', 'hosts of 8'), ('v4:4x4', '3 dimensions')):
    with pytest.raises(targets.TargetError, match=says):
      targets.parse_target(bad)


def test_collectives_are_read_with_their_groups_and_bytes():
  hlo = '\n'.join([
      "  %all-gather.1 = bf16[128,256]{0,1} all-gather(%p), channel_id=9, "
      "replica_groups=mesh['axis_0'=2,'axis_1'=4] {'axis_1'}, dimensions={1}",
      '  %all-reduce.2 = (f32[16,128]{1,0}, f32[8]{0}) all-reduce(%a, %b), replica_groups={{0,1},{2,3}}',
      '  %reduce-scatter.3 = f32[64]{0} reduce-scatter(%g), replica_groups=[2,4]<=[8], dimensions={0}',
      '  %all-reduce-done = f32[8]{0} all-reduce-done(%s)',
  ])
  c = analysis.collectives(hlo, 8)
  assert c['all-gather'] == {'count': 1, 'bytes': 128 * 256 * 2, 'sent_bytes': 128 * 256 * 2 * 3 // 4}
  assert c['all-reduce']['bytes'] == (16 * 128 + 8) * 4 and c['all-reduce']['sent_bytes'] == (16 * 128 + 8) * 4
  assert c['reduce-scatter'] == {'count': 1, 'bytes': 256, 'sent_bytes': 256 * 3}
  assert set(c) == {'all-gather', 'all-reduce', 'reduce-scatter'}


@needs_tpu
@pytest.mark.parametrize('name,fsdp', [('v4-8', 1), ('v5e-16', 4)])
def test_tiny_config_compiles_for_tpu_slices(name, fsdp):
  from ivt_jax.planner import plan
  c = tiny_config()
  c.mesh.fsdp = fsdp
  c.model.dtype = 'bfloat16'
  target = targets.parse_target(name)
  p = plan.compile_for(c, target)
  assert p.mesh == {'data': target.chips // fsdp, 'fsdp': fsdp}
  assert p.batch % target.chips == 0 and p.batch >= 8  # the config's 2 x 4 raised to whole chips
  assert p.fits and 0 < p.memory['total'] < target.chip.hbm_bytes and p.memory['arguments'] > 0
  assert p.cost['source'] == 'compiled' and p.cost['flops'] > 1e6
  assert 'all-reduce' in p.collectives  # the gradients, summed over the data axis
  if fsdp > 1:
    assert p.collectives['all-gather']['count'] > 0  # parameters gathered over fsdp
  assert p.roofline['step_s'] > 0 and 0 < p.roofline['mfu'] <= 1
  assert p.config.model.patch_embed == 'conv'  # the TPU's choice, not this CPU's (matmul)


@needs_tpu
@needs_cuda
def test_chunks_and_token_removal_show_in_the_compiled_figures():
  """The less-work paths compiled: token removal cuts the FLOPs (a v4-8's compiled count), chunks the memory
  (one H100's compiled program), and the batch unit takes whole chunks."""
  from ivt_jax.planner import plan

  def compiled(**keys):
    c = tiny_config(width=64, mlp_dim=128, depth=4)
    c.data.image_size = (128, 64)
    c.data.bmm_drops, c.model.bmm_tokens = keys.get('drops', 'fixed'), keys.get('tokens', 'remove')
    c.train.contrastive_chunk = keys.get('chunk', 0)
    return plan.compile_for(c, targets.parse_target(keys.get('target', 'v4-8')), 64)

  assert compiled().cost['flops'] < 0.9 * compiled(tokens='mask').cost['flops']
  whole, chunked = compiled(target='h100'), compiled(target='h100', chunk=8)
  assert chunked.memory['temporaries'] < 0.5 * whole.memory['temporaries']
  c = tiny_config()
  c.train.contrastive_chunk = 24
  b = plan.config_batch(c)
  assert plan.batch_unit(c, 4) == 24 and plan.default_batch(c, 4) == 24 * -(-b // 24)  # raised to whole chunks


@needs_tpu
def test_a_batch_too_big_for_the_chip_is_refused():
  from ivt_jax.planner import plan
  with pytest.raises(plan.DoesNotFitError, match='does not fit v5e-16.*HBM'):
    plan.compile_for(tiny_config(), targets.parse_target('v5e-16'), batch=262144)


@needs_tpu
def test_fit_finds_the_largest_batch_by_compiling(monkeypatch):
  """The search itself, on a stand-in compiler: memory 1 GiB + 0.3 GiB per unit, with a compiler that refuses
  from 0.5 GiB below the HBM (as libtpu keeps some): the linear prediction, then the compiler's word."""
  from ivt_jax.planner import plan

  class P:
    def __init__(self, n):
      self.memory = {'total': int((1 + 0.3 * n) * 2 ** 30)}
      self.fits = True

  target = targets.parse_target('v4-8')  # 32 GiB
  calls = []

  def fake(config, target, batch, what, devices, verbose):
    calls.append(batch)
    p = P(batch // 4)  # units of 4 (4 chips, 4 images per id)
    if p.memory['total'] > target.chip.hbm_bytes - 2 ** 29:
      raise plan.DoesNotFitError('too big')
    return p

  monkeypatch.setattr(plan, 'compile_for', fake)
  devices = devices_lib.target_devices(target)
  batch, p, tried = plan.fit(tiny_config(), target, devices=devices)
  # 1 + 0.3 n <= 31.5  ->  n = 101 units; the prediction (32 GiB) says 103
  assert batch == 404 and p.memory['total'] == P(101).memory['total']
  assert len(calls) <= 7 and calls[:2] == [4, 8], calls
  assert all(ok == (b <= 404) for b, ok in tried)
  assert plan.fit(tiny_config(), target, devices=devices, max_batch=40)[0] == 40  # the cap
  monkeypatch.setattr(plan, 'compile_for', lambda *a: (_ for _ in ()).throw(plan.DoesNotFitError('no')))
  assert plan.fit(tiny_config(), target, devices=devices)[:2] == (0, None)


def _aot(*args, env_extra=None):
  env = dict(os.environ, **(env_extra or {}))
  env.pop('XLA_FLAGS', None)  # the planner's own host: one CPU device
  return subprocess.run([sys.executable, '-m', 'ivt_jax.aot', '--config=configs/demo.py', *TINY_FLAGS, *args],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@needs_cuda
def test_the_command_compiles_for_eight_h100s(tmp_path):
  out = tmp_path / 'plan.json'
  r = _aot('--target=h100x8', '--config.mesh.fsdp=2', '--config.model.dtype=bfloat16', f'--output={out}')
  assert r.returncode == 0, r.stderr[-3000:]
  assert 'mesh data 4 x fsdp 2' in r.stdout and 'fits' in r.stdout and 'TFLOP' in r.stdout
  assert 'Traceback' not in r.stderr and 'cudart_stub' not in r.stderr, r.stderr  # the plugins' lines hidden
  plan = json.loads(out.read_text())['plan']
  assert plan['platform'] == 'cuda' and plan['chips'] == 8 and plan['patch_embed'] == 'conv'
  assert plan['memory']['total'] > 0 and plan['cost']['flops'] > 0 and plan['fits']
  assert plan['collectives']


@needs_tpu
def test_the_command_refuses_what_does_not_fit_and_bad_targets():
  r = _aot('--target=v5e-16', '--batch=262144')
  assert r.returncode == 1 and 'does not fit v5e-16' in r.stdout and 'Traceback' not in r.stderr, r.stderr
  r = _aot('--target=v9-8')
  assert r.returncode == 2 and 'not a target' in r.stderr and 'Traceback' not in r.stderr
  r = _aot('--target=v5e-16', '--batch=20')
  assert r.returncode == 2 and 'not a multiple of the 16 chips' in r.stderr and 'Traceback' not in r.stderr


def test_a_missing_compiler_is_named_with_the_install_command(tmp_path):
  r = _aot('--target=v4-8', env_extra={'IVT_COMPILERS': str(tmp_path)})
  if devices_lib.have_compiler('tpu') and 'libtpu' not in r.stderr:
    pytest.skip('libtpu is importable from the environment itself')
  assert r.returncode == 2 and 'needs libtpu' in r.stderr and 'requirements-compilers.txt' in r.stderr


def test_backend_choices_follow_the_target_not_the_host():
  from ivt_jax.models import encoder
  c = tiny_config()
  assert c.model.patch_embed == 'auto'
  assert encoder.for_platform(c, 'cpu').model.patch_embed == 'matmul'
  assert encoder.for_platform(c, 'tpu').model.patch_embed == 'conv'
  assert encoder.for_platform(c, 'cuda').model.patch_embed == 'conv'
  c.model.patch_embed = 'matmul'  # a choice the user made is kept
  assert encoder.for_platform(c, 'tpu').model.patch_embed == 'matmul'
  assert devices_lib.compiler_options(targets.parse_target('h100x8')) == {'xla_gpu_enable_triton_gemm': False}
  assert devices_lib.compiler_options(targets.parse_target('v4-8')) == {}


@needs_tpu
def test_the_evaluation_embedders_compile_too():
  from ivt_jax.planner import plan
  c = tiny_config()
  c.eval_batch_size = 10
  p = plan.compile_for(c, targets.parse_target('v4-8'), what='embed')
  assert p.what == 'embed' and p.batch == 12  # eval_batch_size raised to a multiple of the 4 chips
  assert p.fits and p.memory['total'] > 0 and p.cost['flops'] > 0
  assert 'all-reduce' not in p.collectives  # no gradients: nothing summed over the data axis
