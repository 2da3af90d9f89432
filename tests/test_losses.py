import jax
import jax.numpy as jnp
import numpy as np

from ivt_jax.objectives import cmpm as losses


def numpy_cmpm(x, z, ids, eps=1e-8):
  """The formula, transcribed loop by loop."""
  n = len(ids)
  total = 0.0
  for a, b in ((x, z), (z, x)):
    bhat = b / np.linalg.norm(b, axis=1, keepdims=True)
    direction = 0.0
    for i in range(n):
      logits = np.array([a[i] @ bhat[j] for j in range(n)], np.float64)
      p = np.exp(logits - logits.max())
      p /= p.sum()
      y = np.array([1.0 if ids[i] == ids[j] else 0.0 for j in range(n)])
      q = y / np.sqrt(y.sum())
      direction += sum(p[j] * (np.log(p[j]) - np.log(q[j] + eps)) for j in range(n))
    total += direction / n
  return total


def test_cmpm_matches_numpy_transcription():
  rng = np.random.default_rng(0)
  for n, d in ((6, 8), (12, 16)):
    x = rng.normal(size=(n, d)) * 3
    z = rng.normal(size=(n, d)) * 3
    ids = rng.integers(0, n // 2, n)
    got = losses.cmpm_loss(jnp.asarray(x, jnp.float32), jnp.asarray(z, jnp.float32), jnp.asarray(ids))
    np.testing.assert_allclose(float(got), numpy_cmpm(x, z, ids), rtol=1e-4)


def test_cmpm_lower_for_matching_pairs():
  rng = np.random.default_rng(1)
  ids = np.repeat(np.arange(8), 2)
  centers = rng.normal(size=(8, 32)) * 4
  x = centers[ids] + 0.1 * rng.normal(size=(16, 32))
  z = centers[ids] + 0.1 * rng.normal(size=(16, 32))
  matched = losses.cmpm_loss(jnp.asarray(x), jnp.asarray(z), jnp.asarray(ids))
  shuffled = losses.cmpm_loss(jnp.asarray(x), jnp.asarray(z[rng.permutation(16)]), jnp.asarray(ids))
  # q is normalised by its L2 norm (as the reference), so the loss is not a true KL and may go below 0.
  assert float(matched) < float(shuffled) - 1.0


def test_cmpm_gradients_finite():
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.normal(size=(9, 16)), jnp.float32)
  z = jnp.asarray(rng.normal(size=(9, 16)), jnp.float32)
  ids = jnp.asarray([0, 0, 1, 1, 2, 2, 3, 4, 4])
  gx, gz = jax.grad(losses.cmpm_loss, argnums=(0, 1))(x, z, ids)
  assert np.isfinite(gx).all() and np.isfinite(gz).all()
  assert np.abs(gx).sum() > 0 and np.abs(gz).sum() > 0
  # Large norms (no temperature) stay finite too.
  gx, gz = jax.grad(losses.cmpm_loss, argnums=(0, 1))(x * 100, z * 100, ids)
  assert np.isfinite(gx).all() and np.isfinite(gz).all()
