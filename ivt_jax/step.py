"""The pure, jit-ready functions: the training step (MLA batch + BMM drops -> CMPM) and the embedders."""
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from ivt_jax import losses
from ivt_jax import model as model_lib

LEVELS = 3  # MLA: sentence, phrase, word


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array


def create_state(params, tx: optax.GradientTransformation, rng: jax.Array) -> TrainState:
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), rng=rng)


def flatten_levels(batch: dict) -> dict:
  """(B, 3, ...) per-sample MLA arrays -> (3B, ...) pairs; person ids repeated per level."""
  out = {k: v.reshape((-1,) + v.shape[2:]) for k, v in batch.items() if k != 'person_id'}
  out['person_id'] = jnp.repeat(batch['person_id'], LEVELS)
  return out


def loss_fn(params, batch: dict, rng: jax.Array, encoder: model_lib.Encoder):
  """CMPM over the 3B (image view, text) pairs of the MLA batch, with the batch's BMM keep masks."""
  pairs = flatten_levels(batch)
  rng_img, rng_txt = jax.random.split(rng)
  images = model_lib.normalize_images(pairs['images'])
  x = encoder.apply({'params': params}, images, pairs['image_keep'], True, method='embed_images',
                    rngs={'dropout': rng_img})
  z = encoder.apply({'params': params}, pairs['text_ids'], pairs['text_mask'], pairs['text_keep'], True,
                    method='embed_texts', rngs={'dropout': rng_txt})
  return losses.cmpm_loss(x, z, pairs['person_id'])


def train_step(state: TrainState, batch: dict, *, encoder: model_lib.Encoder,
               tx: optax.GradientTransformation, schedule: optax.Schedule, steps_per_epoch: int):
  """One optimizer step. A non-finite loss or gradient leaves params and optimizer state unchanged (the step
  still counts) and sets metrics['finite'] = 0 for the loop to stop on."""
  del steps_per_epoch  # used by heads whose losses start at a given epoch
  rng = jax.random.fold_in(state.rng, state.step)
  loss, grads = jax.value_and_grad(loss_fn)(state.params, batch, rng, encoder)
  grad_norm = optax.global_norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  keep_old = lambda new, old: jax.tree_util.tree_map(lambda n, o: jnp.where(finite, n, o), new, old)
  new_state = state.replace(step=state.step + 1,
                            params=keep_old(params, state.params),
                            opt_state=keep_old(opt_state, state.opt_state))
  metrics = {'loss': loss, 'grad_norm': grad_norm, 'learning_rate': schedule(state.step),
             'finite': finite.astype(jnp.float32)}
  return new_state, metrics


def embed_images(params, images_uint8, *, encoder: model_lib.Encoder):
  """(B, H, W, 3) uint8 -> (B, D) L2-normalized embeddings."""
  x = encoder.apply({'params': params}, model_lib.normalize_images(images_uint8), method='embed_images')
  return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def embed_texts(params, ids, mask, *, encoder: model_lib.Encoder):
  """(B, L) ids and mask -> (B, D) L2-normalized embeddings."""
  z = encoder.apply({'params': params}, ids, mask, method='embed_texts')
  return z / jnp.linalg.norm(z, axis=-1, keepdims=True)
