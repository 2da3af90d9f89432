"""The CLIP-family objectives against loop-by-loop numpy transcriptions of IRRA's `model/objectives.py`."""
import math

import jax.numpy as jnp
import numpy as np
import pytest

from ivt_jax.objectives import clip as clip_losses


def _norm_rows(x):
  out = np.zeros_like(x, dtype=np.float64)
  for i in range(len(x)):
    out[i] = x[i] / math.sqrt(sum(float(v) ** 2 for v in x[i]))
  return out


def _log_softmax_row(row):
  m = max(row)
  lse = m + math.log(sum(math.exp(v - m) for v in row))
  return [v - lse for v in row]


def sdm_loops(img, txt, pid, scale, image_id=None, factor=0.3, eps=1e-8):
  b = len(pid)
  labels = [[1.0 if pid[i] == pid[j] else 0.0 for j in range(b)] for i in range(b)]
  if image_id is not None:
    for i in range(b):
      for j in range(b):
        same = 1.0 if image_id[i] == image_id[j] else 0.0
        labels[i][j] = (labels[i][j] - same) * factor + same
  row_sums = [sum(labels[k]) for k in range(b)]
  dist = [[labels[i][j] / row_sums[j] for j in range(b)] for i in range(b)]  # torch's broadcast of sum(dim=1)
  im, tx = _norm_rows(img), _norm_rows(txt)
  t2i = [[scale * sum(tx[i][d] * im[j][d] for d in range(img.shape[1])) for j in range(b)] for i in range(b)]
  i2t = [[t2i[j][i] for j in range(b)] for i in range(b)]
  total = 0.0
  for logits in (i2t, t2i):
    rows = []
    for i in range(b):
      ls = _log_softmax_row(logits[i])
      rows.append(sum(math.exp(ls[j]) * (ls[j] - math.log(dist[i][j] + eps)) for j in range(b)))
    total += sum(rows) / b
  return total


def itc_loops(img, txt, scale):
  b = len(img)
  im, tx = _norm_rows(img), _norm_rows(txt)
  logits = [[scale * sum(im[i][d] * tx[j][d] for d in range(img.shape[1])) for j in range(b)] for i in range(b)]
  loss_i = -sum(_log_softmax_row(logits[i])[i] for i in range(b)) / b
  loss_t = -sum(_log_softmax_row([logits[j][i] for j in range(b)])[i] for i in range(b)) / b
  return (loss_i + loss_t) / 2


def id_loops(img_logits, txt_logits, labels):
  b = len(labels)
  ce = lambda l: -sum(_log_softmax_row(list(l[i]))[labels[i]] for i in range(b)) / b
  return (ce(img_logits) + ce(txt_logits)) / 2


@pytest.mark.parametrize('seed', [0, 1])
def test_sdm_matches_loops(seed):
  rng = np.random.default_rng(seed)
  pid = np.array([3, 7, 3, 1, 7, 7, 2, 3])
  img, txt = rng.normal(size=(8, 5)), rng.normal(size=(8, 5))
  got = clip_losses.sdm_loss(jnp.asarray(img), jnp.asarray(txt), jnp.asarray(pid), 50.0)
  np.testing.assert_allclose(float(got), sdm_loops(img, txt, pid, 50.0), rtol=2e-5)
  # The image-id softened target, whose broadcast normalization is not a per-row one: transcribed as it is.
  image_id = np.array([0, 1, 0, 2, 3, 3, 4, 5])
  got = clip_losses.sdm_loss(jnp.asarray(img), jnp.asarray(txt), jnp.asarray(pid), 50.0,
                             image_ids=jnp.asarray(image_id))
  np.testing.assert_allclose(float(got), sdm_loops(img, txt, pid, 50.0, image_id), rtol=2e-5)
  dist = np.asarray(clip_losses.match_distribution(jnp.asarray(pid), jnp.asarray(image_id)))
  assert not np.allclose(dist.sum(axis=1), 1.0)  # the reference's quirk is kept


def test_sdm_is_small_when_the_similarities_match_the_identities():
  pid = np.array([0, 0, 1, 1, 2, 2])
  centers = np.eye(6)[:3] * 10
  img = centers[pid] + 0.01 * np.random.default_rng(0).normal(size=(6, 6))
  good = float(clip_losses.sdm_loss(jnp.asarray(img), jnp.asarray(img), jnp.asarray(pid), 50.0))
  shuffled = float(clip_losses.sdm_loss(jnp.asarray(img), jnp.asarray(img[::-1]), jnp.asarray(pid), 50.0))
  assert good < 1e-3 < shuffled


def test_itc_and_id_match_loops():
  rng = np.random.default_rng(2)
  img, txt = rng.normal(size=(6, 4)), rng.normal(size=(6, 4))
  np.testing.assert_allclose(float(clip_losses.itc_loss(jnp.asarray(img), jnp.asarray(txt), 20.0)),
                             itc_loops(img, txt, 20.0), rtol=2e-5)
  il, tl = rng.normal(size=(6, 11)) * 3, rng.normal(size=(6, 11)) * 3
  labels = np.array([0, 10, 4, 4, 7, 1])
  np.testing.assert_allclose(float(clip_losses.id_loss(jnp.asarray(il), jnp.asarray(tl), jnp.asarray(labels))),
                             id_loops(il, tl, labels), rtol=2e-5)
  # bfloat16 features are upcast: the same loss within bfloat16's rounding of the inputs.
  low = clip_losses.itc_loss(jnp.asarray(img, jnp.bfloat16), jnp.asarray(txt, jnp.bfloat16), 20.0)
  assert low.dtype == jnp.float32
  np.testing.assert_allclose(float(low), itc_loops(img, txt, 20.0), rtol=3e-2)
