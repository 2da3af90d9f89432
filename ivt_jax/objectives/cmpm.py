"""The training objective: cross-modal projection matching (CMPM), as IVT uses it."""
import jax
import jax.numpy as jnp


def _l2_normalize(x):
  return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def cmpm_loss(image_emb: jax.Array, text_emb: jax.Array, person_ids: jax.Array,
              eps: float = 1e-8) -> jax.Array:
  """CMPM summed over both directions: a scalar.

  image_emb x, text_emb z: (N, D); person_ids: (N,), pair i is (x_i, z_i). With zhat_j = z_j / |z_j|:
    P_ij = softmax_j(x_i . zhat_j),  q_ij = y_ij / |y_i|,  y_ij = [id_i == id_j],
    L_i2t = mean_i sum_j P_ij (log P_ij - log(q_ij + eps)),
  L_t2i the same with z projected on xhat; the loss is L_i2t + L_t2i. No temperature: the image (text) norm
  acts as the inverse temperature, as in the reference.
  """
  x = image_emb.astype(jnp.float32)
  z = text_emb.astype(jnp.float32)
  y = (person_ids[:, None] == person_ids[None, :]).astype(jnp.float32)
  log_q = jnp.log(y / jnp.linalg.norm(y, axis=1, keepdims=True) + eps)

  def direction(a, b):
    logits = a @ _l2_normalize(b).T
    log_p = jax.nn.log_softmax(logits, axis=1)
    return jnp.mean(jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=1))

  return direction(x, z) + direction(z, x)
