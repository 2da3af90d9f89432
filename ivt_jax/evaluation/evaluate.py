"""Evaluation: embed a split's gallery (each image once) and queries (each caption once), rank, metrics.

`python -m ivt_jax.evaluate --checkpoint=DIR` runs it. DIR is a training workdir (its best-by-validation
parameters, else its latest state), a best/ directory or what `ivt_jax.tools.convert` writes. Metrics are text-to-image, in percent (see ivt_jax.evaluation.metrics).

--protocol=standard (the default): every caption a query, every image of the split once in the gallery, R@k,
non-interpolated mAP and mINP over the full ranking. --protocol=reference: the reference implementation's own
test function, to compare with the paper's numbers to the decimal: the (image, caption) pairs in the split's
order, every caption a query, the gallery made of the pairs' images as its R1_mAP classes pick them
(`metrics.reference_gallery`: every second pair for CUHK-PEDES and RSTPReid, every pair for ICFG-PEDES,
repeats included), its CMC and trapezoid mAP (`metrics.reference_metrics`).
"""
import functools
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from ivt_jax.models import heads
from ivt_jax.evaluation import metrics as metrics_lib
from ivt_jax.models import encoder as model_lib
from ivt_jax.runtime import sharding as sharding_lib


class Embedder:
  """Jitted, batch-sharded embedding functions for one model and mesh."""

  def __init__(self, encoder: model_lib.Encoder, mesh: jax.sharding.Mesh, param_shardings):
    batch = sharding_lib.batch_sharding(mesh)
    self.mesh = mesh
    self.images = jax.jit(functools.partial(heads.embed_images, encoder=encoder),
                          in_shardings=(param_shardings, batch), out_shardings=batch)
    self.texts = jax.jit(functools.partial(heads.embed_texts, encoder=encoder),
                         in_shardings=(param_shardings, batch, batch), out_shardings=batch)


def _gather(x: jax.Array) -> np.ndarray:
  """A batch-sharded global array -> the full numpy array on every process."""
  if jax.process_count() == 1:
    return np.asarray(x)
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def embed_split(params, embedder: Embedder, eval_data, log_every: int = 20) -> dict:
  """-> dict(image_emb (G, D), image_pid (G,), image_index (G,), text_emb (Q, D), text_pid, text_index,
  text_image_index), in record order, padding removed. Logs progress."""
  out = {}
  streams = (('gallery', eval_data.gallery, eval_data.num_gallery_batches),
             ('queries', eval_data.queries, eval_data.num_query_batches))
  for name, stream, total in streams:
    chunks, t0 = [], time.time()
    for i, batch in enumerate(stream):
      glob = sharding_lib.global_batch(batch, embedder.mesh)
      if name == 'gallery':
        emb = embedder.images(params, glob['images'])
      else:
        emb = embedder.texts(params, glob['text_ids'], glob['text_mask'])
      keys = [k for k in ('person_id', 'index', 'image_index', 'valid') if k in glob]
      chunks.append({'emb': _gather(emb), **{k: _gather(glob[k]) for k in keys}})
      if (i + 1) % log_every == 0 or i + 1 == total:
        logging.debug('embedding %s: batch %d/%d (%.1f batches/s)', name, i + 1, total,
                      (i + 1) / max(time.time() - t0, 1e-9))
    cat = {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}
    valid = cat.pop('valid')
    order = np.argsort(cat['index'][valid], kind='stable')
    cat = {k: v[valid][order] for k, v in cat.items()}
    if name == 'gallery':
      out.update(image_emb=cat['emb'], image_pid=cat['person_id'], image_index=cat['index'])
    else:
      out.update(text_emb=cat['emb'], text_pid=cat['person_id'], text_index=cat['index'],
                 text_image_index=cat['image_index'])
  return out


def similarity(text_emb: np.ndarray, image_emb: np.ndarray) -> np.ndarray:
  """Scores (Q, G) as the plain dot product: the cosine of the IVT head's L2-normalized embeddings, or the part
  head's score from its composite vectors (ivt_jax.models.part)."""
  return np.asarray(jnp.asarray(text_emb) @ jnp.asarray(image_emb).T)


PROTOCOLS = ('standard', 'reference')


def evaluate_embeddings(emb: dict, protocol: str = 'standard', dataset: str = '') -> tuple[dict, np.ndarray]:
  """-> (metrics, similarity (Q, G) of the protocol's gallery). `dataset` (data.name) picks the reference's
  gallery rule."""
  if protocol == 'standard':
    sim = similarity(emb['text_emb'], emb['image_emb'])
    return metrics_lib.retrieval_metrics(sim, emb['text_pid'], emb['image_pid']), sim
  if protocol != 'reference':
    raise ValueError(f'protocol must be one of {PROTOCOLS}, got {protocol!r}')
  # Gallery entries are image records; the pair images are the queries' records, in caption order.
  position = np.searchsorted(emb['image_index'], emb['text_image_index'])
  gallery = metrics_lib.reference_gallery(position, dataset)
  sim = similarity(emb['text_emb'], emb['image_emb'][gallery])
  return metrics_lib.reference_metrics(sim, emb['text_pid'], emb['image_pid'][gallery]), sim


def build(config: ml_collections.ConfigDict, workdir: str):
  """Prepared data, tokenizer, encoder (vocab from the tokenizer), mesh and abstract params for a config."""
  from input_pipeline import prepare as prepare_lib
  from input_pipeline import tokenizers as tokenizers_lib
  prepared = prepare_lib.prepare(config, workdir)
  tokenizer = tokenizers_lib.load_tokenizer(prepared.tokenizer, prepared.tokenizer_path)
  config = ml_collections.ConfigDict(config.to_dict())
  config.model.vocab_size = int(tokenizer.vocab_size)
  if config.model.head == 'clip' and config.model.clip.id_weight and not config.model.clip.num_classes:
    config.model.clip.num_classes = len(class_table(config, prepared))
  encoder = heads.build(config)
  mesh = sharding_lib.make_mesh(config)
  abstract = jax.eval_shape(lambda: model_lib.init_module_params(encoder, jax.random.key(0)))
  shardings = sharding_lib.param_shardings(abstract, mesh)
  return config, prepared, tokenizer, encoder, mesh, abstract, shardings


def class_table(config: ml_collections.ConfigDict, prepared):
  """(C,) the sorted person ids of the training split: the CLIP head's ID classes (None for other heads or
  without the ID loss)."""
  if config.model.head != 'clip' or not config.model.clip.id_weight:
    return None
  from input_pipeline import examples  # pylint: disable=g-import-not-at-top
  from input_pipeline import prepare as prepare_lib  # pylint: disable=g-import-not-at-top
  table = np.unique(examples.scan_source(prepare_lib.open_split(prepared, 'train'))[0])
  if config.model.clip.num_classes and len(table) != config.model.clip.num_classes:
    raise ValueError(f'model.clip.num_classes={config.model.clip.num_classes}, but the training split of '
                     f'{prepared.dataset_dir} has {len(table)} identities')
  return table


def run_evaluation(config, params, encoder, mesh, shardings, prepared, tokenizer, split: str,
                   protocol: str = 'standard', embedder: Embedder | None = None):
  """Embeds and scores one split -> (metrics, embeddings, similarity, source). Pass the same `embedder` to
  every call of a run: its jitted functions then compile once, not at each evaluation."""
  from input_pipeline import eval_pipeline
  from input_pipeline import prepare as prepare_lib
  source = prepare_lib.open_split(prepared, split)
  data = eval_pipeline.eval_batches(config, source, tokenizer, shard_index=jax.process_index(),
                                   shard_count=jax.process_count())
  emb = embed_split(params, embedder or Embedder(encoder, mesh, shardings), data)
  metrics, sim = evaluate_embeddings(emb, protocol, config.data.name)
  return metrics, emb, sim, source

