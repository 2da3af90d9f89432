"""The CLIP-family objectives of text-based person retrieval (IRRA, CVPR'23, `model/objectives.py`), in JAX.

All take a batch of B image and B text features (rows paired: image i and text i show the same sample) and the
persons' ids (B,); `logit_scale` multiplies cosines (IRRA: 1 / temperature, 50 for temperature 0.02).

  sdm_loss   similarity distribution matching: for each image (row) the softmax over the texts of the scaled
             cosines is pulled towards the identity-match distribution by KL(pred || match), and the same for each
             text over the images; summed over rows, averaged over the batch, both directions added.
  itc_loss   InfoNCE over the batch (sample i's image and text are the only positives), both directions averaged.
  id_loss    a classifier over the training identities on each modality's features, cross-entropy averaged over
             the two.

Returned as float32 scalars; features of any float dtype are upcast.
"""
import jax
import jax.numpy as jnp


def _normalize(x: jax.Array) -> jax.Array:
  x = x.astype(jnp.float32)
  return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def match_distribution(person_ids: jax.Array, image_ids=None, factor: float = 0.3) -> jax.Array:
  """(B, B) the target of SDM, as IRRA computes it: 1 where the persons match, optionally softened with image
  ids (the same image 1, the same person in another image `factor`), then divided by the row sums broadcast
  along the last axis (`labels / labels.sum(dim=1)`: entry (i, j) by the sum of row j; the same as each row by
  its own sum when the labels are person ids only, whose match matrix is symmetric with equal row sums within a
  person)."""
  pid = person_ids.reshape(-1, 1)
  labels = (pid == pid.T).astype(jnp.float32)
  if image_ids is not None:
    iid = image_ids.reshape(-1, 1)
    same_image = (iid == iid.T).astype(jnp.float32)
    labels = (labels - same_image) * factor + same_image
  return labels / labels.sum(axis=1)[None, :]


def sdm_loss(image_features: jax.Array, text_features: jax.Array, person_ids: jax.Array, logit_scale,
             image_ids=None, factor: float = 0.3, epsilon: float = 1e-8) -> jax.Array:
  """Similarity distribution matching (module docstring); image_features, text_features (B, D); ids (B,)."""
  image, text = _normalize(image_features), _normalize(text_features)
  t2i = logit_scale * (text @ image.T)   # (B texts, B images)
  i2t = t2i.T
  log_target = jnp.log(match_distribution(person_ids, image_ids, factor) + epsilon)

  def direction(logits):
    log_pred = jax.nn.log_softmax(logits, axis=1)
    return jnp.mean(jnp.sum(jnp.exp(log_pred) * (log_pred - log_target), axis=1))

  return direction(i2t) + direction(t2i)


def itc_loss(image_features: jax.Array, text_features: jax.Array, logit_scale) -> jax.Array:
  """InfoNCE (module docstring); image_features, text_features (B, D)."""
  image, text = _normalize(image_features), _normalize(text_features)
  logits = logit_scale * (image @ text.T)
  diagonal = jnp.arange(logits.shape[0])

  def cross_entropy(l):
    return -jnp.mean(jax.nn.log_softmax(l, axis=1)[diagonal, diagonal])

  return (cross_entropy(logits) + cross_entropy(logits.T)) / 2


def id_loss(image_logits: jax.Array, text_logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Identity classification (module docstring); logits (B, num_ids) from the shared classifier, labels (B,)
  class indices (training identities numbered 0..num_ids-1)."""
  def cross_entropy(l):
    log_p = jax.nn.log_softmax(l.astype(jnp.float32), axis=1)
    return -jnp.mean(jnp.take_along_axis(log_p, labels[:, None].astype(jnp.int32), axis=1))

  return (cross_entropy(image_logits) + cross_entropy(text_logits)) / 2
