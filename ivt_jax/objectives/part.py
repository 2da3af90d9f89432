"""Part-level objectives: part matching (SDM / InfoNCE / CMPM) and the commonality-based margin ranking loss.

Notation for a batch of N (image, text) pairs, pair n = (image n, text n), person ids y_n, K parts:
  S^k_ij = cos(p^I_ik, p^T_jk)              part-k similarity of image i and text j, (K, N, N)
  S^w_ij = sum_k w_jk S^k_ij                 the text-weighted part similarity, (N, N) (w_j: text j's weights)
  neg_ij = [y_i != y_j]                      different identities

Part matching (part.match_loss) on the fine scores:
  'sdm'     IRRA's similarity distribution matching on S^w / tau, both directions:
            L = mean_i KL(softmax_j(S^w_ij / tau) || q_i.) + the same over columns, q_ij = [y_i=y_j] / #pos_i.
  'infonce' multi-positive InfoNCE on S^w / tau, both directions:
            L = -mean_i (1 / #pos_i) sum_{j: y_j = y_i} log softmax_j(S^w_ij / tau) + the same over columns.
  'cmpm'    CMPM (losses.cmpm_loss) per part on the raw part embeddings, averaged over k (ignores w).

Commonality-based margin ranking (L_CMR):
  commonality   C_k = sum_ij neg_ij S^k_ij / sum_ij neg_ij   (mean cross-modal part-k cosine over pairs of
                different identities), stop-gradient, mapped to [0, 1]:
                'clip': c_k = clip(C_k, 0, 1)   (unrelated or opposed parts count as not common)
                'affine': c_k = (1 + C_k) / 2
  margin        m_k = max(m_min, m_0 (1 - c_k))  (a part alike across people asks for little separation)
  ranking       anchor image i, positive its own text i, a negative text j with neg_ij:
                  l^k_i = max(0, m_k - S^k_ii + S^k_ij*),
                and the same with text anchors over the columns (S^k_ii vs S^k_j*i). The negative j*:
                'hardest':  argmax_{j: neg_ij} S^k_ij;
                'semihard': uniformly at random among the negatives with 0 < m_k - S^k_ii + S^k_ij < m_k
                            (the SSAN family's random semi-hard negative), the hardest if there is none.
                L_CMR = mean_{k, i} l^k_i (image anchors) + mean_{k, j} l^k_j (text anchors); anchors without
                any negative in the batch contribute 0.
"""
import jax
import jax.numpy as jnp

from ivt_jax.objectives import cmpm as losses

MATCH_LOSSES = ('sdm', 'infonce', 'cmpm')
NEGATIVES = ('hardest', 'semihard')
COMMONALITY_MAPS = ('clip', 'affine')


def _l2(x):
  return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def per_part_similarity(image_parts: jax.Array, text_parts: jax.Array) -> jax.Array:
  """image_parts (Ni, K, D), text_parts (Nt, K, D) -> S (K, Ni, Nt), S[k, i, j] = cos(p^I_ik, p^T_jk)."""
  return jnp.einsum('ikd,jkd->kij', _l2(image_parts.astype(jnp.float32)), _l2(text_parts.astype(jnp.float32)))


def weighted_part_similarity(per_part: jax.Array, weights: jax.Array) -> jax.Array:
  """S (K, Ni, Nt), text weights (Nt, K) -> S^w (Ni, Nt) = sum_k w_jk S^k_ij."""
  return jnp.einsum('kij,jk->ij', per_part, weights.astype(jnp.float32))


def _same(person_ids):
  return (person_ids[:, None] == person_ids[None, :]).astype(jnp.float32)


def sdm_loss(sim: jax.Array, person_ids: jax.Array, temperature: float, eps: float = 1e-8) -> jax.Array:
  """Similarity distribution matching, both directions: sim (N, N) image x text -> scalar."""
  y = _same(person_ids)
  log_q = jnp.log(y / jnp.sum(y, axis=1, keepdims=True) + eps)

  def direction(s):
    log_p = jax.nn.log_softmax(s / temperature, axis=1)
    return jnp.mean(jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=1))

  return direction(sim) + direction(sim.T)


def infonce_loss(sim: jax.Array, person_ids: jax.Array, temperature: float) -> jax.Array:
  """Multi-positive InfoNCE, both directions: sim (N, N) image x text -> scalar."""
  y = _same(person_ids)

  def direction(s):
    log_p = jax.nn.log_softmax(s / temperature, axis=1)
    return -jnp.mean(jnp.sum(y * log_p, axis=1) / jnp.sum(y, axis=1))

  return direction(sim) + direction(sim.T)


def part_cmpm_loss(image_parts: jax.Array, text_parts: jax.Array, person_ids: jax.Array) -> jax.Array:
  """CMPM per part on (N, K, D) part embeddings, averaged over the K parts."""
  per = jax.vmap(lambda a, b: losses.cmpm_loss(a, b, person_ids), in_axes=(1, 1))(image_parts, text_parts)
  return jnp.mean(per)


def match_loss(name: str, image_parts, text_parts, weights, person_ids, temperature: float,
               per_part=None) -> jax.Array:
  """The configured part matching loss (see the module docstring); per_part: S if already computed."""
  if name == 'cmpm':
    return part_cmpm_loss(image_parts, text_parts, person_ids)
  if per_part is None:
    per_part = per_part_similarity(image_parts, text_parts)
  sim = weighted_part_similarity(per_part, weights)
  if name == 'sdm':
    return sdm_loss(sim, person_ids, temperature)
  if name == 'infonce':
    return infonce_loss(sim, person_ids, temperature)
  raise ValueError(f'part.match_loss must be one of {MATCH_LOSSES}, got {name!r}')


def commonality(per_part: jax.Array, person_ids: jax.Array, mapping: str = 'clip') -> jax.Array:
  """S (K, N, N) -> c (K,) in [0, 1]: mean part-k cosine between different identities, mapped; no gradient."""
  neg = 1.0 - _same(person_ids)
  mean = jnp.sum(per_part * neg[None], axis=(1, 2)) / jnp.maximum(jnp.sum(neg), 1.0)
  mean = jax.lax.stop_gradient(mean)
  if mapping == 'clip':
    return jnp.clip(mean, 0.0, 1.0)
  if mapping == 'affine':
    return jnp.clip((1.0 + mean) / 2.0, 0.0, 1.0)
  raise ValueError(f'part.commonality must be one of {COMMONALITY_MAPS}, got {mapping!r}')


def cmr_margins(common: jax.Array, margin: float, min_margin: float) -> jax.Array:
  """c (K,) -> m (K,) = max(m_min, m_0 (1 - c))."""
  return jnp.maximum(min_margin, margin * (1.0 - common))


def ranking_losses(sim: jax.Array, neg: jax.Array, margins: jax.Array, negatives: str, rng=None) -> jax.Array:
  """Anchors on the rows: sim (K, N, M) with the positive of row i at column i, neg (N, M) bool, margins (K,)
  -> (K, N) hinge losses l^k_i (0 for an anchor without negatives)."""
  k, n, _ = sim.shape
  pos = jnp.diagonal(sim, axis1=1, axis2=2)[..., None]  # (K, N, 1)
  m = margins[:, None, None]
  masked = jnp.where(neg[None], sim, -jnp.inf)
  hardest = jnp.max(masked, axis=2)  # (K, N)
  if negatives == 'hardest':
    chosen = hardest
  elif negatives == 'semihard':
    if rng is None:
      raise ValueError("the 'semihard' negatives need an rng")
    hinge = m - pos + sim
    semi = neg[None] & (hinge > 0) & (hinge < m)
    noise = jax.random.uniform(rng, sim.shape)
    pick = jnp.argmax(jnp.where(semi, noise, -1.0), axis=2)  # a uniform choice among the semi-hard ones
    picked = jnp.take_along_axis(sim, pick[..., None], axis=2)[..., 0]
    chosen = jnp.where(jnp.any(semi, axis=2), picked, hardest)
  else:
    raise ValueError(f'part.cmr_negatives must be one of {NEGATIVES}, got {negatives!r}')
  has_neg = jnp.any(neg, axis=1)[None, :]  # (1, N)
  return jnp.where(has_neg, jax.nn.relu(m[..., 0] - pos[..., 0] + jnp.where(has_neg, chosen, 0.0)), 0.0)


def cmr_loss(per_part: jax.Array, person_ids: jax.Array, margins: jax.Array, negatives: str = 'hardest',
             rng=None) -> jax.Array:
  """L_CMR: S (K, N, N) image x text with pairs on the diagonal, margins (K,) -> scalar (both directions)."""
  neg = person_ids[:, None] != person_ids[None, :]
  r1, r2 = (None, None) if rng is None else jax.random.split(rng)
  i2t = ranking_losses(per_part, neg, margins, negatives, r1)
  t2i = ranking_losses(jnp.swapaxes(per_part, 1, 2), neg.T, margins, negatives, r2)
  return jnp.mean(i2t) + jnp.mean(t2i)
