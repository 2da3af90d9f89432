"""End to end: the training program on a tiny SynthPEDES (few steps, tiny model)."""
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from configs import demo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_demo(data_root):
  c = demo.get_config()
  c.data.manual_dir = os.path.join(data_root, 'synth')
  c.data.data_dir = os.path.join(data_root, 'tfds')
  c.data.synthetic.update(num_ids=24, images_per_id=2, image_size=(48, 24), val_ids=4, test_ids=6)
  c.data.image_size = (32, 16)
  c.data.text_length = 32
  c.data.sentencepiece_vocab_size = 200
  c.data.ids_per_batch = 4
  c.data.images_per_id = 2
  c.model.update(width=32, depth=1, num_heads=2, mlp_dim=64, patch_size=8, stride=8)
  # The reference's init. With the demo's wider one (0.08), a few of this 1-block model's qkv biases ended
  # about one Adam step (1e-4) apart between 1 and 8 devices: gradients near 0, where Adam's normalization
  # magnifies the rounding of a different reduction order. The comparisons below test the sharded arithmetic.
  c.model.init_std = 0.02
  # The demo's earlier weight decay (0.5 now): the sharded-against-one-device tolerances below and in
  # test_multiprocess.py were measured with it (one kernel element moved 2.1e-5 with 0.5, over the 2e-5 there).
  c.optim.weight_decay = 0.05
  c.num_epochs = 2
  c.eval_every_epochs = 1000
  c.log_every_steps = 2
  c.checkpoint_every_steps = 2
  c.eval_batch_size = 16
  return c


def _flags(c):
  """The command-line overrides that turn configs/demo.py into tiny_demo's config."""
  d = c.data
  pairs = {'data.manual_dir': d.manual_dir, 'data.data_dir': d.data_dir, 'data.image_size': '(32,16)',
           'data.text_length': d.text_length, 'data.sentencepiece_vocab_size': d.sentencepiece_vocab_size,
           'data.synthetic.num_ids': 24, 'data.synthetic.images_per_id': 2,
           'data.synthetic.image_size': '(48,24)', 'data.synthetic.val_ids': 4, 'data.synthetic.test_ids': 6,
           'eval_batch_size': c.eval_batch_size, 'optim.weight_decay': c.optim.weight_decay}
  pairs.update({f'model.{k}': c.model[k] for k in ('width', 'depth', 'num_heads', 'mlp_dim', 'patch_size',
                                                    'stride')})
  return [f'--config.{k}={v}' for k, v in pairs.items()]


@pytest.fixture(scope='module')
def data_root(tmp_path_factory):
  return str(tmp_path_factory.mktemp('data'))


def _final_params(workdir):
  from ivt_jax.training import checkpoints
  import orbax.checkpoint as ocp
  manager = ocp.CheckpointManager(os.path.join(workdir, 'checkpoints'), item_names=('state',))
  step = manager.latest_step()
  restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  del checkpoints
  return step, restored.state['params']


def _assert_trees(a, b, atol=0.0):
  la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
  assert len(la) == len(lb)
  for x, y in zip(la, lb):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=0)


def _run_whole_and_interrupted(c, tmp_path, steps: int) -> None:
  """Trains `steps` steps into tmp_path/full, and into tmp_path/half first half of them, then the rest resumed."""
  from ivt_jax.training import loop as train
  c.total_steps = steps
  train.train_and_evaluate(c, str(tmp_path / 'full'))
  c.total_steps = steps // 2
  train.train_and_evaluate(c, str(tmp_path / 'half'))
  c.total_steps = steps
  train.train_and_evaluate(c, str(tmp_path / 'half'))


@pytest.mark.slow
def test_end_to_end_and_exact_resume(data_root, tmp_path):
  from ivt_jax.training import loop as train
  c = tiny_demo(data_root)
  c.total_steps = 6
  full = str(tmp_path / 'full')
  result = train.train_and_evaluate(c, full)
  assert set(result['test']) == {'r1', 'r5', 'r10', 'mAP', 'mINP'}
  saved = json.load(open(os.path.join(full, 'metrics.json')))
  assert saved['test'] == pytest.approx(result['test'])
  assert os.path.exists(os.path.join(full, 'retrieval.png'))
  assert any(f.startswith('events.out.tfevents') for f in os.listdir(full))
  step, params_full = _final_params(full)
  assert step == 6
  # The evaluation program on the run's best parameters: the standard protocol gives the training's test
  # figures; the reference's protocol (its gallery: every second (image, caption) pair's image) keeps each
  # image once here, as every SynthPEDES image has two captions, so its R@k are the same.
  for protocol in ('standard', 'reference'):
    out = str(tmp_path / f'{protocol}.json')
    subprocess.run([sys.executable, '-m', 'ivt_jax.evaluate', '--config=configs/demo.py', f'--checkpoint={full}',
                    f'--protocol={protocol}', f'--output={out}', *_flags(c)], cwd=ROOT, check=True,
                   capture_output=True, timeout=300)
    got = json.load(open(out))
    assert got['protocol'] == protocol
    for k in ('r1', 'r5', 'r10'):
      assert got[k] == pytest.approx(result['test'][k], abs=1e-6), (protocol, k)
  # Interrupted: 3 steps, then the same run continued to 6 from its checkpoint (a longer total_steps and
  # another logging frequency are harmless changes).
  half = str(tmp_path / 'half')
  c.total_steps = 3
  train.train_and_evaluate(c, half)
  # Saved every checkpoint_every_steps (2) and at the last step (3), which is not a multiple of it; no extra
  # save at step 1.
  assert sorted(int(d) for d in os.listdir(os.path.join(half, 'checkpoints')) if d.isdigit()) == [2, 3]
  from ivt_jax.training import run_guard
  changed = c.copy_and_resolve_references()
  changed.model.mlp_dim, changed.optim.lr = 128, 5e-4
  with pytest.raises(run_guard.ConfigChangedError, match=r'model\.mlp_dim: 64 in the checkpoint, 128 now'):
    train.train_and_evaluate(changed, half)  # refused before anything is restored or trained
  c.total_steps = 6
  c.log_every_steps = 3
  train.train_and_evaluate(c, half)
  step, params_resumed = _final_params(half)
  assert step == 6
  _assert_trees(params_full, params_resumed)
  # A damaged latest checkpoint (its array data cut short, as a kill during the write or a full disk leaves
  # it): named, set aside, and the run resumes from the one before, to the same parameters.
  damaged = str(tmp_path / 'damaged')
  c.total_steps = 4
  train.train_and_evaluate(c, damaged)
  for d, _, fs in os.walk(os.path.join(damaged, 'checkpoints', '4', 'state')):
    for name in fs if os.path.basename(d) == 'd' else ():
      with open(os.path.join(d, name), 'r+b') as f:
        f.truncate(os.path.getsize(os.path.join(d, name)) // 2)
  c.total_steps = 6
  train.train_and_evaluate(c, damaged)
  assert os.listdir(os.path.join(damaged, 'damaged_checkpoints'))[0].startswith('4.')
  step, params_damaged = _final_params(damaged)
  assert step == 6
  _assert_trees(params_full, params_damaged)


@pytest.mark.slow
def test_fsdp_on_8_devices_matches_one_device(data_root, tmp_path):
  from ivt_jax.training import loop as train
  assert jax.device_count() == 8
  c = tiny_demo(data_root)
  c.total_steps = 3
  c.mesh.data, c.mesh.fsdp = 1, 1
  train.train_and_evaluate(c, str(tmp_path / 'one'))
  c.mesh.data, c.mesh.fsdp = 2, 4
  train.train_and_evaluate(c, str(tmp_path / 'eight'))
  _, p1 = _final_params(str(tmp_path / 'one'))
  _, p8 = _final_params(str(tmp_path / 'eight'))
  # The same numbers up to the order of float sums: Adam divides by the root of the squared gradients, so where
  # a gradient is near zero a last-bit difference moves the update by up to ~lr x 1e-2 (5e-5 after 3 steps at
  # lr 1e-3 here); a wrong sharding would move it by ~lr.
  _assert_trees(p1, p8, atol=5e-5)


@pytest.mark.slow
def test_chunked_run_resumes_exactly_and_trains_as_the_whole_batch(data_root, tmp_path):
  """train.contrastive_chunk with BMM tokens removed: a run interrupted and resumed ends on the parameters of an
  uninterrupted one, and those of a run without chunks (up to the order of float sums, as above)."""
  from ivt_jax.training import loop as train
  c = tiny_demo(data_root)
  c.data.bmm_drops = 'fixed'
  c.train.contrastive_chunk = 4
  _run_whole_and_interrupted(c, tmp_path, 4)
  c.train.contrastive_chunk = 0
  train.train_and_evaluate(c, str(tmp_path / 'whole'))
  _, full = _final_params(str(tmp_path / 'full'))
  _, resumed = _final_params(str(tmp_path / 'half'))
  _, whole = _final_params(str(tmp_path / 'whole'))
  _assert_trees(full, resumed)
  _assert_trees(full, whole, atol=5e-5)


@pytest.mark.slow
def test_non_finite_loss_stops_with_step(data_root, tmp_path):
  from ivt_jax.training import loop as train
  c = tiny_demo(data_root)
  c.total_steps = 6
  c.optim.lr = 1e30
  c.optim.warmup_init_lr = 1e30
  with pytest.raises(train.NonFiniteError, match=r'non-finite loss or gradient at step \d'):
    train.train_and_evaluate(c, str(tmp_path / 'nan'))


@pytest.mark.slow
def test_sigterm_leaves_restorable_checkpoint(data_root, tmp_path):
  workdir = str(tmp_path / 'sig')
  c = tiny_demo(data_root)
  args = [sys.executable, '-m', 'ivt_jax.main', '--config=configs/demo.py', f'--workdir={workdir}',
          f'--config.data.manual_dir={c.data.manual_dir}', f'--config.data.data_dir={c.data.data_dir}',
          '--config.data.synthetic.num_ids=24', '--config.data.synthetic.images_per_id=2',
          '--config.data.synthetic.image_size=(48, 24)', '--config.data.synthetic.val_ids=4',
          '--config.data.synthetic.test_ids=6', '--config.data.image_size=(32, 16)',
          '--config.data.text_length=32', '--config.data.sentencepiece_vocab_size=200',
          '--config.data.ids_per_batch=4', '--config.data.images_per_id=2', '--config.model.width=32',
          '--config.model.depth=1', '--config.model.num_heads=2', '--config.model.mlp_dim=64',
          '--config.model.patch_size=8', '--config.model.stride=8', '--config.num_epochs=1000',
          '--config.eval_every_epochs=100000', '--config.checkpoint_every_steps=1000000',
          '--config.log_every_steps=1', '--config.mesh.data=1']
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=1')
  proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  lines = []
  deadline = time.time() + 300
  for line in proc.stdout:
    lines.append(line)
    if 'train step' in line or time.time() > deadline:  # the progress line (ivt_jax.runtime.console)
      break
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=300)
  text = ''.join(lines) + out
  assert proc.returncode == 0, text[-3000:]
  assert 'SIGTERM received' in text
  step, params = _final_params(workdir)
  assert step >= 1
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree_util.tree_leaves(params))


@pytest.mark.slow
def test_text_buckets_train_as_the_fixed_length(data_root, tmp_path):
  """Batches padded to data.text_buckets (a compiled step per length) train as those padded to text_length:
  only padding differs, and padding is masked."""
  from ivt_jax.training import loop as train
  c = tiny_demo(data_root)
  c.total_steps = 4
  train.train_and_evaluate(c, str(tmp_path / 'fixed'))
  c.data.text_buckets = (12, 16, 20, 24, 28)
  result = train.train_and_evaluate(c, str(tmp_path / 'buckets'))
  _, fixed = _final_params(str(tmp_path / 'fixed'))
  _, bucketed = _final_params(str(tmp_path / 'buckets'))
  _assert_trees(fixed, bucketed, atol=1e-4)
  assert set(result['test']) == {'r1', 'r5', 'r10', 'mAP', 'mINP'}


@pytest.mark.slow
def test_packed_texts_train_as_unpacked_and_resume_exactly(data_root, tmp_path):
  """data.text_packing (a program per slot count, compiled as batches need them) with text buckets: a run
  interrupted and resumed ends where an uninterrupted one does, and without randomness in the text tower (the
  shorter MLA levels draw theirs per level when unpacked) on the parameters of an unpacked run."""
  from ivt_jax.training import loop as train
  c = tiny_demo(data_root)
  c.model.depth = 2  # a packed block before the [CLS]-only last one
  c.data.text_buckets = (16, 24)
  c.data.text_packing = True
  _run_whole_and_interrupted(c, tmp_path, 4)
  _assert_trees(_final_params(str(tmp_path / 'full'))[1], _final_params(str(tmp_path / 'half'))[1])
  c.model.drop_path = 0.0
  c.model.text_embed_dropout = 0.0
  train.train_and_evaluate(c, str(tmp_path / 'packed'))
  c.data.text_packing = False
  train.train_and_evaluate(c, str(tmp_path / 'unpacked'))
  _assert_trees(_final_params(str(tmp_path / 'packed'))[1], _final_params(str(tmp_path / 'unpacked'))[1],
                atol=5e-5)
