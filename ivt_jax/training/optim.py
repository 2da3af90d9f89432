"""The Optax optimizer from the config: the reference recipe (SGD momentum, bias lr x2, weight decay, linear
warmup then cosine, by step or, as the reference, by epoch), AdamW, and IRRA's CLIP recipe (Adam with coupled L2
weight decay and its eps, the new layers at a higher lr, warmup then a cosine over the remaining epochs);
optional gradient clipping."""
import re

import jax
import jax.numpy as jnp
import ml_collections
import optax


SCHEDULE_UNITS = ('step', 'epoch')
SCHEDULE_SHAPES = ('cosine', 'warmup_then_cosine')


def learning_rate_schedule(config: ml_collections.ConfigDict, steps_per_epoch: int) -> optax.Schedule:
  """lr(step): linear from warmup_init_lr to lr over warmup_epochs, then cosine to min_lr at num_epochs.

  optim.schedule_unit = 'step' (the default): evaluated at every step on the fractional epoch
  t = step / steps_per_epoch, counted from 0. As the reference's scheduler, the warmup epochs are part of the
  cosine's period (the cosine phase starts at t = warmup_epochs, already below lr).

  optim.schedule_unit = 'epoch': the reference's schedule exactly. It sets the lr once at the start of each epoch
  with t = the 1-based epoch number (timm's CosineLRScheduler with t_in_epochs, stepped with `step(epoch)` for
  epoch = 1..num_epochs, cycle_limit 1): t < warmup_epochs -> warmup_init_lr + t * (lr - warmup_init_lr) /
  warmup_epochs; t < num_epochs -> min_lr + (lr - min_lr) (1 + cos(pi t / num_epochs)) / 2; from t = num_epochs
  on (the cycle's end: the last epoch) -> min_lr. So the lr is constant within an epoch and the first epoch
  already runs at the warmup value for t = 1.
  """
  o = config.optim
  total = float(config.num_epochs)
  warm = float(o.warmup_epochs)
  unit = o.schedule_unit
  if unit not in SCHEDULE_UNITS:
    raise ValueError(f'optim.schedule_unit must be one of {SCHEDULE_UNITS}, got {unit!r}')
  shape = o.get('schedule_shape', 'cosine')
  if shape not in SCHEDULE_SHAPES:
    raise ValueError(f'optim.schedule_shape must be one of {SCHEDULE_SHAPES}, got {shape!r}')
  if shape == 'warmup_then_cosine':
    return _warmup_then_cosine(o, total, warm, unit, steps_per_epoch)

  def warmup(t):
    return o.warmup_init_lr + (o.lr - o.warmup_init_lr) * t / max(warm, 1e-9)

  def cosine(t):
    return o.min_lr + 0.5 * (o.lr - o.min_lr) * (1 + jnp.cos(jnp.pi * jnp.minimum(t, total) / total))

  def per_step(step):
    t = jnp.asarray(step, jnp.float32) / steps_per_epoch
    return jnp.where(t < warm, warmup(t), cosine(t))

  def per_epoch(step):
    t = (jnp.asarray(step, jnp.int32) // steps_per_epoch + 1).astype(jnp.float32)
    return jnp.where(t < warm, warmup(t), jnp.where(t < total, cosine(t), o.min_lr))

  return per_epoch if unit == 'epoch' else per_step


def _warmup_then_cosine(o, total: float, warm: float, unit: str, steps_per_epoch: int) -> optax.Schedule:
  """IRRA's LRSchedulerWithWarmup (mode 'cosine', linear warmup): t < warmup_epochs -> warmup_init_lr + (lr -
  warmup_init_lr) t / warmup_epochs; then min_lr + (lr - min_lr) (1 + cos(pi (t - warmup) / (total - warmup))) / 2.
  unit 'epoch': t = the 0-based epoch (torch's scheduler stepped once per epoch, as IRRA); 'step': t = step /
  steps_per_epoch."""
  if total <= warm:
    raise ValueError(f'optim.warmup_epochs ({warm}) must be below num_epochs ({total}) for warmup_then_cosine')

  def schedule(step):
    t = jnp.asarray(step, jnp.float32) / steps_per_epoch
    if unit == 'epoch':
      t = jnp.floor(t)
    warmup = o.warmup_init_lr + (o.lr - o.warmup_init_lr) * t / max(warm, 1e-9)
    ratio = jnp.clip((t - warm) / (total - warm), 0.0, 1.0)
    cosine = o.min_lr + 0.5 * (o.lr - o.min_lr) * (1 + jnp.cos(jnp.pi * ratio))
    return jnp.where(t < warm, warmup, cosine)

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
  new_layers = re.compile(o.get('new_layers', '') or r'(?!x)x')  # '' matches nothing
  new_factor = float(o.get('new_layer_lr_factor', 1.0))
  lr_factor = lambda params: jax.tree_util.tree_map(
      lambda n: new_factor if new_layers.search(n) else (o.bias_lr_factor if is_bias(n) else 1.0),
      _path_names(params))
  parts = []
  if o.grad_clip_norm > 0:
    parts.append(optax.clip_by_global_norm(o.grad_clip_norm))
  if o.name == 'sgd':
    # torch.optim.SGD: g += wd * p (every parameter, biases included as the reference); buf = m * buf + g.
    parts += [optax.add_decayed_weights(o.weight_decay), optax.trace(decay=o.momentum, nesterov=False)]
  elif o.name == 'adamw':
    decay_mask = lambda params: jax.tree_util.tree_map(is_decayed_for_adamw, _path_names(params))
    parts += [optax.scale_by_adam(b1=o.b1, b2=o.b2, eps=float(o.get('eps', 1e-8))),
              optax.add_decayed_weights(o.weight_decay, mask=decay_mask)]
  elif o.name == 'adam':
    # torch.optim.Adam with weight_decay (IRRA): g += wd * p before the moments (L2, not decoupled), every
    # parameter but the biases (IRRA's weight_decay_bias = 0).
    not_bias = lambda params: jax.tree_util.tree_map(lambda n: not is_bias(n), _path_names(params))
    parts += [optax.add_decayed_weights(o.weight_decay, mask=not_bias),
              optax.scale_by_adam(b1=o.b1, b2=o.b2, eps=float(o.get('eps', 1e-8)))]
  else:
    raise ValueError(f"optim.name must be 'sgd', 'adamw' or 'adam', got {o.name!r}")
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
