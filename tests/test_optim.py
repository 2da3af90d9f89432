"""The learning-rate schedules (per step, and the reference's per epoch) and the optimizer's parameter groups."""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import base
from ivt_jax.training import optim


def _config(unit, epochs=120, warmup=5.0, lr=0.005, warmup_init=5e-5, min_lr=1e-5):
  c = base.get_config()
  c.num_epochs = epochs
  c.optim.schedule_unit = unit
  c.optim.lr, c.optim.warmup_epochs, c.optim.warmup_init_lr, c.optim.min_lr = lr, warmup, warmup_init, min_lr
  return c


def _reference_epoch_lr(epoch, t_initial=120, lr=0.005, lr_min=1e-5, warmup_t=5, warmup_lr_init=5e-5):
  """A transcription of the reference's scheduler: timm's CosineLRScheduler(t_initial, lr_min, t_mul=1,
  decay_rate=0.1, warmup_lr_init, warmup_t, cycle_limit=1, t_in_epochs=True), `_get_lr(epoch)`."""
  t = epoch
  if t < warmup_t:
    return warmup_lr_init + t * (lr - warmup_lr_init) / warmup_t
  i = t // t_initial
  t_curr = t - t_initial * i
  gamma = 0.1 ** i
  if i < 1:  # cycle_limit = 1
    return lr_min * gamma + 0.5 * (lr * gamma - lr_min * gamma) * (1 + math.cos(math.pi * t_curr / t_initial))
  return lr_min


def test_epoch_schedule_is_the_reference_scheduler_stepped_once_per_epoch():
  steps_per_epoch = 7
  schedule = jax.jit(optim.learning_rate_schedule(_config('epoch'), steps_per_epoch))
  steps = np.arange(120 * steps_per_epoch)
  ours = np.asarray(jax.vmap(schedule)(jnp.asarray(steps)))
  # The reference's loop: scheduler.step(epoch) at the start of epoch = 1..120, every step of it at that lr.
  expected = np.array([_reference_epoch_lr(s // steps_per_epoch + 1) for s in steps])
  np.testing.assert_allclose(ours, expected, rtol=2e-6, atol=1e-10)
  # The figures the reference's first epochs and its last one run at.
  np.testing.assert_allclose(ours[0], 5e-5 + (0.005 - 5e-5) / 5, rtol=1e-6)  # 1.04e-3 for all of epoch 1
  assert len(set(ours[:steps_per_epoch].tolist())) == 1
  assert ours[steps_per_epoch] > ours[0]  # still warming up in epoch 2
  np.testing.assert_allclose(ours[-1], 1e-5, rtol=1e-6)  # epoch 120 is the cycle's end: lr_min


def test_step_schedule_warms_up_linearly_then_follows_the_cosine():
  steps_per_epoch = 10
  c = _config('step', epochs=20, warmup=2.0, lr=1e-3, warmup_init=1e-5, min_lr=1e-6)
  schedule = optim.learning_rate_schedule(c, steps_per_epoch)
  lr = lambda s: float(schedule(s))
  np.testing.assert_allclose(lr(0), 1e-5, rtol=1e-6)
  np.testing.assert_allclose(lr(10), 1e-5 + (1e-3 - 1e-5) / 2, rtol=1e-5)  # half-way through the warmup
  cos = lambda t: 1e-6 + 0.5 * (1e-3 - 1e-6) * (1 + math.cos(math.pi * t / 20))
  for s in (20, 55, 137, 199):
    np.testing.assert_allclose(lr(s), cos(s / steps_per_epoch), rtol=1e-5)
  np.testing.assert_allclose(lr(200), 1e-6, rtol=1e-5)
  np.testing.assert_allclose(lr(10_000), 1e-6, rtol=1e-5)  # past the end: min_lr, not a second cycle
  assert len({lr(s) for s in range(20, 30)}) == 10  # changes at every step


def test_schedule_unit_is_checked():
  with pytest.raises(ValueError, match='optim.schedule_unit'):
    optim.learning_rate_schedule(_config('batch'), 10)


def test_sgd_biases_get_the_bias_lr_factor_and_weight_decay_as_torch_sgd():
  c = _config('step', epochs=1, warmup=0.0, lr=0.1, min_lr=0.1)
  c.optim.name, c.optim.momentum, c.optim.weight_decay, c.optim.bias_lr_factor = 'sgd', 0.9, 0.01, 2.0
  tx, _ = optim.make_optimizer(c, steps_per_epoch=100)
  params = {'dense': {'kernel': jnp.full((2,), 1.0), 'bias': jnp.full((2,), 1.0)}}
  grads = {'dense': {'kernel': jnp.full((2,), 0.5), 'bias': jnp.full((2,), 0.5)}}
  state = tx.init(params)
  updates, state = tx.update(grads, state, params)
  # torch SGD, first step: buf = g + wd * p; p -= lr_group * buf (lr x2 for biases).
  np.testing.assert_allclose(updates['dense']['kernel'], -0.1 * (0.5 + 0.01), rtol=1e-6)
  np.testing.assert_allclose(updates['dense']['bias'], -0.2 * (0.5 + 0.01), rtol=1e-6)
  updates, state = tx.update(grads, state, params)  # second step: buf = 0.9 * buf + g + wd * p
  np.testing.assert_allclose(updates['dense']['kernel'], -0.1 * (0.9 * 0.51 + 0.51), rtol=1e-6)


def _irra_lr(epoch, base_lr=1e-5, warmup_factor=0.1, warmup_epochs=5, total=60, target_lr=0.0):
  """A transcription of IRRA's LRSchedulerWithWarmup(mode='cosine', warmup_method='linear').get_lr() for
  last_epoch = epoch (stepped once per epoch from 0)."""
  if epoch < warmup_epochs:
    alpha = epoch / warmup_epochs
    return base_lr * (warmup_factor * (1 - alpha) + alpha)
  ratio = (epoch - warmup_epochs) / (total - warmup_epochs)
  return target_lr + (base_lr - target_lr) * 0.5 * (1 + math.cos(math.pi * ratio))


def _irra_config():
  c = _config('epoch', epochs=60, warmup=5.0, lr=1e-5, warmup_init=1e-6, min_lr=0.0)
  c.optim.schedule_shape = 'warmup_then_cosine'
  return c


def test_irra_schedule_per_epoch():
  steps_per_epoch = 3
  schedule = jax.jit(optim.learning_rate_schedule(_irra_config(), steps_per_epoch))
  ours = np.asarray(jax.vmap(schedule)(jnp.arange(60 * steps_per_epoch)))
  want = np.repeat([_irra_lr(e) for e in range(60)], steps_per_epoch)
  np.testing.assert_allclose(ours, want, rtol=1e-5, atol=1e-12)
  c = _irra_config()
  c.optim.warmup_epochs = 60.0
  with pytest.raises(ValueError, match='warmup_epochs .* must be below num_epochs'):
    optim.learning_rate_schedule(c, steps_per_epoch)


def test_irra_adam_groups_match_torch_adam_loops():
  """optim.name='adam' as torch.optim.Adam(betas, eps=1e-3) with IRRA's parameter groups: weight decay (L2, added
  to the gradient) on all but biases, biases at 2x lr, the classifier (new_layers) at 5x lr (its bias too)."""
  c = _irra_config()
  c.optim.name = 'adam'
  c.optim.eps = 1e-3
  c.optim.weight_decay = 4e-5
  c.optim.bias_lr_factor = 2.0
  c.optim.new_layers = r'^classifier/'
  c.optim.new_layer_lr_factor = 5.0
  c.optim.schedule_unit = 'step'
  c.optim.warmup_epochs = 0.0
  c.num_epochs = 1000
  tx, schedule = optim.make_optimizer(c, 1)
  rng = np.random.default_rng(0)
  params = {'visual': {'proj': rng.normal(size=(3, 2)), 'ln_pre': {'bias': rng.normal(size=(2,))}},
            'classifier': {'kernel': rng.normal(size=(2, 4)), 'bias': rng.normal(size=(4,))}}
  params = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), params)
  grads = [jax.tree_util.tree_map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), params)
           for _ in range(3)]
  state = tx.init(params)
  p = params
  for g in grads:
    u, state = tx.update(g, state, p)
    p = jax.tree_util.tree_map(lambda a, b: a + b, p, u)
  factors = {('visual', 'proj'): (1.0, True), ('visual', 'ln_pre', 'bias'): (2.0, False),
             ('classifier', 'kernel'): (5.0, True), ('classifier', 'bias'): (5.0, False)}
  for path, (factor, decayed) in factors.items():
    get = lambda tree: np.asarray(functools.reduce(lambda t, k: t[k], path, tree), np.float64)
    x, m, v = get(params), 0.0, 0.0
    for t, g in enumerate(grads, start=1):
      grad = get(g) + (4e-5 * x if decayed else 0.0)
      m = 0.9 * m + 0.1 * grad
      v = 0.999 * v + 0.001 * grad * grad
      m_hat, v_hat = m / (1 - 0.9 ** t), v / (1 - 0.999 ** t)
      lr = float(schedule(t - 1)) * factor
      x = x - lr * m_hat / (np.sqrt(v_hat) + 1e-3)
    np.testing.assert_allclose(get(p), x, rtol=1e-5, atol=1e-9, err_msg=str(path))
