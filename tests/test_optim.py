"""The learning-rate schedules (per step, and the reference's per epoch) and the optimizer's parameter groups."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import base
from ivt_jax import optim


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
