"""The Optax optimizer from the config: the reference recipe (SGD momentum, bias lr x2, weight decay, linear
warmup then cosine, by step) and AdamW as an option; optional gradient clipping."""
import re

import jax
import jax.numpy as jnp
import ml_collections
import optax


def learning_rate_schedule(config: ml_collections.ConfigDict, steps_per_epoch: int) -> optax.Schedule:
  """lr(step): linear from warmup_init_lr to lr over warmup_epochs, then cosine to min_lr at num_epochs.

  As the reference's scheduler, the cosine phase is evaluated on the epoch counted from 0 (the warmup epochs
  are part of the cosine's period), here at every step (fractional epochs) rather than once per epoch.
  """
  o = config.optim
  total = float(config.num_epochs)
  warm = float(o.warmup_epochs)

  def schedule(step):
    epoch = jnp.asarray(step, jnp.float32) / steps_per_epoch
    warm_lr = o.warmup_init_lr + (o.lr - o.warmup_init_lr) * epoch / max(warm, 1e-9)
    cos_lr = o.min_lr + 0.5 * (o.lr - o.min_lr) * (1 + jnp.cos(jnp.pi * jnp.minimum(epoch, total) / total))
    return jnp.where(epoch < warm, warm_lr, cos_lr)

  return schedule


def _path_names(tree):
  return jax.tree_util.tree_map_with_path(
      lambda path, _: '/'.join(str(getattr(k, 'key', k)) for k in path), tree)


def is_bias(name: str) -> bool:
  """Biases (Dense/Conv/LayerNorm 'bias') get the bias lr factor, as the reference's parameter groups."""
  return bool(re.search(r'(^|/)bias$', name))


def is_decayed_for_adamw(name: str) -> bool:
  """AdamW decays matrices only (not biases, norms, embeddings' tokens)."""
  return bool(re.search(r'(kernel|embedding)$', name))


def make_optimizer(config: ml_collections.ConfigDict, steps_per_epoch: int):
  """-> (optax.GradientTransformation, lr schedule)."""
  o = config.optim
  schedule = learning_rate_schedule(config, steps_per_epoch)
  lr_factor = lambda params: jax.tree_util.tree_map(
      lambda n: o.bias_lr_factor if is_bias(n) else 1.0, _path_names(params))
  parts = []
  if o.grad_clip_norm > 0:
    parts.append(optax.clip_by_global_norm(o.grad_clip_norm))
  if o.name == 'sgd':
    # torch.optim.SGD: g += wd * p (every parameter, biases included as the reference); buf = m * buf + g.
    parts += [optax.add_decayed_weights(o.weight_decay), optax.trace(decay=o.momentum, nesterov=False)]
  elif o.name == 'adamw':
    decay_mask = lambda params: jax.tree_util.tree_map(is_decayed_for_adamw, _path_names(params))
    parts += [optax.scale_by_adam(b1=o.b1, b2=o.b2),
              optax.add_decayed_weights(o.weight_decay, mask=decay_mask)]
  else:
    raise ValueError(f"optim.name must be 'sgd' or 'adamw', got {o.name!r}")
  parts += [optax.scale_by_learning_rate(schedule),
            _scale_by_tree(lr_factor)]
  return optax.chain(*parts), schedule


def _scale_by_tree(factors_fn) -> optax.GradientTransformation:
  """Multiplies each update leaf by a constant factor derived from the parameter names."""
  def init(params):
    del params
    return optax.EmptyState()

  def update(updates, state, params=None):
    factors = factors_fn(updates)
    return jax.tree_util.tree_map(lambda u, f: u * f if f != 1.0 else u, updates, factors), state

  return optax.GradientTransformation(init, update)
