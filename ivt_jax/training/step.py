"""The pure, jit-ready training step: MLA batch + BMM drops -> the head's objective -> one optimizer update.

The head decides the objective and the embeddings: the IVT encoder trains CMPM on its CLS embeddings and embeds
with them; the part model (ivt_jax.models.part) adds the part losses of ivt_jax.objectives.part and embeds with the
composite vectors whose dot product is its score; the CLIP towers (ivt_jax.models.clip) train the weighted
CLIP-family objectives (ivt_jax.objectives.clip). The embedders of each head are ivt_jax.models.heads'.
"""
from typing import Any, Optional, Sequence

import flax
import jax
import jax.numpy as jnp
import optax

from ivt_jax.objectives import clip as clip_losses
from ivt_jax.models import clip as clip_model
from ivt_jax.objectives import cmpm as losses
from ivt_jax.models import encoder as model_lib
from ivt_jax.models import packing
from ivt_jax.objectives import part as part_losses
from ivt_jax.models import part as part_model
from ivt_jax.training import chunked

LEVELS = 3  # MLA: sentence, phrase, word (data.mla_levels may train on fewer: the batch's axis 1 says how many)


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array


def create_state(params, tx: optax.GradientTransformation, rng: jax.Array) -> TrainState:
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), rng=rng)


def flatten_levels(batch: dict) -> dict:
  """(B, V, ...) per-sample MLA arrays -> (V B, ...) pairs, sample-major; person ids repeated per level."""
  out = {k: v.reshape((-1,) + v.shape[2:]) for k, v in batch.items() if k != 'person_id'}
  out['person_id'] = jnp.repeat(batch['person_id'], batch['text_ids'].shape[1])
  return out


def pair_rows(rows: Optional[jax.Array], samples: int, levels: int) -> jax.Array:
  """(V B,) the flattened pairs' indices in the whole batch (sample-major) from the samples' indices `rows`
  (None: 0..samples-1)."""
  rows = jnp.arange(samples, dtype=jnp.int32) if rows is None else rows
  return (rows[:, None] * levels + jnp.arange(levels, dtype=jnp.int32)[None]).reshape(-1)


def apply_texts(params, batch: dict, rng: jax.Array, encoder, method: str,
                text_lengths: Optional[Sequence[int]] = None, rows: Optional[jax.Array] = None,
                text_packing: Optional[tuple[int, int]] = None):
  """encoder.apply(method) on the V B texts of the MLA batch, in `flatten_levels` order. rows: (B,) the
  samples' indices in the whole batch (None: 0..B-1), keying the models' randomness per pair.

  text_packing: (groups, slots), static: the IVT encoder's embeddings of texts packed (`packing`; method
  'embed_texts' only): every level in one forward, each level cut to its length, (groups, slots) as
  `ivt_jax.models.packing.slots_for` chose them.

  text_lengths: positions per level (input_pipeline.shapes.level_text_lengths); a level shorter than the batch's
  L runs as its own forward on its first positions (the rest is padding, masked either way), so the
  short phrase and word texts cost what they hold. None (or all equal to L): one forward over (3B, L).
  """
  samples, levels, length = batch['text_ids'].shape
  sample_rows = jnp.arange(samples, dtype=jnp.int32) if rows is None else rows
  if text_packing is not None:
    if method != 'embed_texts':
      raise ValueError(f'text packing embeds texts with embed_texts, not {method}')
    groups, slots = text_packing
    valid = packing.batch_valid(batch['text_mask'], batch['text_keep'], text_lengths)
    return encoder.apply({'params': params}, batch['text_ids'].reshape(valid.shape), valid,
                         jnp.ones_like(valid), pair_rows(sample_rows, samples, levels), groups=groups,
                         slots=slots, method='embed_texts_packed', rngs={'dropout': rng})
  run = lambda ids, mask, keep, r, idx: encoder.apply({'params': params}, ids, mask, keep, True, rows=idx,
                                                      method=method, rngs={'dropout': r})
  if text_lengths is None or all(int(n) == length for n in text_lengths):
    pairs = flatten_levels({k: batch[k] for k in ('text_ids', 'text_mask', 'text_keep', 'person_id')})
    return run(pairs['text_ids'], pairs['text_mask'], pairs['text_keep'], rng,
               pair_rows(sample_rows, samples, levels))
  if len(text_lengths) != levels or max(text_lengths) > length:
    raise ValueError(f'text_lengths {tuple(text_lengths)} do not fit the batch\'s {levels} levels of {length}')
  outs = [run(batch['text_ids'][:, l, :n], batch['text_mask'][:, l, :n], batch['text_keep'][:, l, :n],
              jax.random.fold_in(rng, l), sample_rows) for l, n in enumerate(text_lengths)]
  # (B, ...) per level -> (B, V, ...) -> (V B, ...): sample-major, as flatten_levels.
  return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs, axis=1).reshape((-1,) + xs[0].shape[1:]), *outs)


def pair_embeddings(params, batch: dict, rng: jax.Array, encoder, text_lengths: Optional[Sequence[int]] = None,
                    rows: Optional[jax.Array] = None, text_packing: Optional[tuple[int, int]] = None):
  """-> (image embeddings (V B, D), text embeddings (V B, D), the flattened pairs) of the MLA batch at training
  time, with its BMM keep masks. rows, text_packing: see `apply_texts`."""
  pairs = flatten_levels(batch)
  samples, levels = batch['text_ids'].shape[:2]
  rng_img, rng_txt = jax.random.split(rng)
  images = model_lib.normalize_images(pairs['images'])
  x = encoder.apply({'params': params}, images, pairs['image_keep'], True, rows=pair_rows(rows, samples, levels),
                    method='embed_images', rngs={'dropout': rng_img})
  z = apply_texts(params, batch, rng_txt, encoder, 'embed_texts', text_lengths, rows, text_packing)
  return x, z, pairs


def loss_fn(params, batch: dict, rng: jax.Array, encoder: model_lib.Encoder,
            text_lengths: Optional[Sequence[int]] = None, text_packing: Optional[tuple[int, int]] = None):
  """CMPM over the V B (image view, text) pairs of the MLA batch, with the batch's BMM keep masks."""
  x, z, pairs = pair_embeddings(params, batch, rng, encoder, text_lengths, text_packing=text_packing)
  return losses.cmpm_loss(x, z, pairs['person_id'])


def part_loss_fn(params, batch: dict, rng: jax.Array, encoder: part_model.PartModel, step: jax.Array,
                 steps_per_epoch: int, text_lengths: Optional[Sequence[int]] = None):
  """The part head's objective over the 3B pairs -> (loss, aux metrics).

    loss = CMPM(g_i, g_t) + on * (match_weight * L_match + cmr_weight * L_CMR),
    on = [step >= part.start_epoch * steps_per_epoch]
  (L_match and L_CMR: ivt_jax.objectives.part). A zero weight skips its term; before the start epoch the part
  terms are computed (reported in aux) but contribute neither loss nor gradient.
  """
  p = encoder.part
  pairs = flatten_levels(batch)
  rng_img, rng_txt, rng_cmr = jax.random.split(rng, 3)
  images = model_lib.normalize_images(pairs['images'])
  gi, pi = encoder.apply({'params': params}, images, pairs['image_keep'], True, method='image_parts',
                         rngs={'dropout': rng_img})
  gt, pt = apply_texts(params, batch, rng_txt, encoder, 'text_parts', text_lengths)
  pid = pairs['person_id']
  global_loss = losses.cmpm_loss(gi, gt, pid)
  on = (step >= jnp.ceil(p.start_epoch * steps_per_epoch)).astype(jnp.float32)
  aux = {'loss_global': global_loss, 'part_on': on}
  total = global_loss
  per_part = None
  if p.match_weight:
    weights = encoder.apply({'params': params}, gt, method='part_weights')
    if p.match_loss != 'cmpm':
      per_part = part_losses.per_part_similarity(pi, pt)
    match = part_losses.match_loss(p.match_loss, pi, pt, weights, pid, p.temperature, per_part=per_part)
    total = total + on * p.match_weight * match
    aux['loss_match'] = match
  if p.cmr_weight:
    if per_part is None:
      per_part = part_losses.per_part_similarity(pi, pt)
    common = part_losses.commonality(per_part, pid, p.commonality)
    margins = part_losses.cmr_margins(common, p.cmr_margin, p.cmr_min_margin)
    cmr = part_losses.cmr_loss(per_part, pid, margins, p.cmr_negatives, rng_cmr)
    total = total + on * p.cmr_weight * cmr
    aux.update(loss_cmr=cmr, commonality_mean=jnp.mean(common), margin_mean=jnp.mean(margins))
  return total, aux


def clip_objective(params, x, z, pid, encoder: clip_model.ClipModel, class_table=None):
  """The CLIP head's objective on the (V B, D) embeddings -> (loss, aux): the weighted sum of SDM, ID, ITC and
  CMPM (model.clip.*_weight; a zero weight skips its term). class_table: (C,) the sorted training person ids; the
  ID classifier's class of a person is its rank there."""
  c = encoder.cfg
  scale = 1.0 / c.temperature
  terms = {}
  if c.sdm_weight:
    terms['sdm'] = (c.sdm_weight, clip_losses.sdm_loss(x, z, pid, scale))
  if c.itc_weight:
    terms['itc'] = (c.itc_weight, clip_losses.itc_loss(x, z, scale))
  if c.cmpm_weight:
    terms['cmpm'] = (c.cmpm_weight, losses.cmpm_loss(x, z, pid))
  if c.id_weight:
    if class_table is None:
      raise ValueError('model.clip.id_weight > 0 needs the training identities (class_table)')
    classes = jnp.searchsorted(jnp.asarray(class_table), pid)
    logits = lambda f: encoder.apply({'params': params}, f, method='classify')
    terms['id'] = (c.id_weight, clip_losses.id_loss(logits(x), logits(z), classes))
  total = sum(w * v for w, v in terms.values())
  return total, {f'loss_{k}': v for k, (_, v) in terms.items()}


def clip_loss_fn(params, batch: dict, rng: jax.Array, encoder: clip_model.ClipModel,
                 text_lengths: Optional[Sequence[int]] = None, class_table=None):
  """The CLIP head's objective over the V B pairs -> (loss, aux) (`clip_objective`)."""
  x, z, pairs = pair_embeddings(params, batch, rng, encoder, text_lengths)
  return clip_objective(params, x, z, pairs['person_id'], encoder, class_table)


def chunked_value_and_grad(params, batch: dict, rng: jax.Array, encoder, chunk: int,
                           text_lengths: Optional[Sequence[int]] = None, class_table=None):
  """((loss, aux), grads) of the IVT or CLIP objective over the whole batch, `chunk` samples at a time
  (train.contrastive_chunk; ivt_jax.training.chunked): the same loss and gradients as the unchunked step."""
  if isinstance(encoder, part_model.PartModel):
    raise ValueError('train.contrastive_chunk is not supported for model.head=part (its part losses read token '
                     'features, not only the embeddings); set train.contrastive_chunk=0')
  samples, levels = batch['text_ids'].shape[:2]
  chunked.check_chunk(samples, chunk)
  pid = jnp.repeat(batch['person_id'], levels)

  def embed(p, part, rows):
    x, z, _ = pair_embeddings(p, part, rng, encoder, text_lengths, rows)
    return x, z

  if isinstance(encoder, clip_model.ClipModel):
    objective = lambda p, x, z: clip_objective(p, x, z, pid, encoder, class_table)
  else:
    objective = lambda p, x, z: (losses.cmpm_loss(x, z, pid), {})
  return chunked.value_and_grad(embed, objective, params, batch, chunk, levels)


def train_step(state: TrainState, batch: dict, *, encoder: model_lib.Encoder,
               tx: optax.GradientTransformation, schedule: optax.Schedule, steps_per_epoch: int,
               text_lengths: Optional[Sequence[int]] = None, class_table=None, gathered_params=None,
               contrastive_chunk: int = 0, text_packing: Optional[tuple[int, int]] = None):
  """One optimizer step. A non-finite loss or gradient leaves params and optimizer state unchanged (the step
  still counts) and sets metrics['finite'] = 0 for the loop to stop on. The part head adds its loss terms to
  the metrics (loss_global, loss_match, loss_cmr, commonality_mean, margin_mean, part_on), the CLIP head its
  terms (loss_sdm, loss_id, loss_itc, loss_cmpm). text_lengths: see `apply_texts` (static). class_table: the
  CLIP head's training identities (`clip_loss_fn`). gathered_params: shardings (replicated over fsdp) the
  parameters are constrained to before the forward (mesh.gather_params: weights gathered, ZeRO-3 style, instead
  of the partitioner's own choice); None leaves the choice to XLA. contrastive_chunk: samples per chunk of the
  exact chunked gradient (`chunked_value_and_grad`; 0 or the whole batch: at once).

  With BMM tokens removed (`encoder.image_keep_length` below the image tokens), a batch whose keep masks keep
  more image tokens than that would lose some: such a step is skipped like a non-finite one, with
  metrics['bmm_fits'] = 0 for the loop to stop on.

  text_packing: (groups, slots), static, or None: the IVT encoder's texts packed (`apply_texts`; not with the
  part or CLIP heads or chunks). A batch with more text tokens in a group than `slots` (the caller chose them
  for another batch) is skipped the same way, with metrics['text_fits'] = 0."""
  rng = jax.random.fold_in(state.rng, state.step)
  aux = {}
  fits = jnp.asarray(True)
  keep_length = getattr(encoder.cfg, 'image_keep_length', None)
  if keep_length is not None and keep_length < batch['image_keep'].shape[-1]:
    fits = ~model_lib.kept_overflow(batch['image_keep'], keep_length)
    aux['bmm_fits'] = fits.astype(jnp.float32)
  samples = batch['person_id'].shape[0]
  chunk = int(contrastive_chunk)
  if text_packing is not None:
    if chunked.check_chunk(samples, chunk) > 1 or type(encoder) is not model_lib.Encoder:  # pylint: disable=unidiomatic-typecheck
      raise ValueError('data.text_packing packs the IVT encoder\'s texts (model.head=ivt) without '
                       'train.contrastive_chunk')
    groups, slots = text_packing
    valid = packing.batch_valid(batch['text_mask'], batch['text_keep'], text_lengths)
    text_fits = jnp.all(packing.group_tokens(valid, groups) <= slots)
    aux['text_fits'] = text_fits.astype(jnp.float32)
    fits = fits & text_fits

  def gathered(fn):
    if gathered_params is None:
      return fn
    return lambda params, *args: fn(jax.lax.with_sharding_constraint(params, gathered_params), *args)

  if chunked.check_chunk(samples, chunk) > 1:
    params = state.params if gathered_params is None else jax.lax.with_sharding_constraint(
        state.params, gathered_params)
    (loss, head_aux), grads = chunked_value_and_grad(params, batch, rng, encoder, chunk, text_lengths, class_table)
    aux.update(head_aux)
  elif isinstance(encoder, part_model.PartModel):
    (loss, head_aux), grads = jax.value_and_grad(gathered(part_loss_fn), has_aux=True)(
        state.params, batch, rng, encoder, state.step, steps_per_epoch, text_lengths)
    aux.update(head_aux)
  elif isinstance(encoder, clip_model.ClipModel):
    (loss, head_aux), grads = jax.value_and_grad(gathered(clip_loss_fn), has_aux=True)(
        state.params, batch, rng, encoder, text_lengths, class_table)
    aux.update(head_aux)
  else:
    loss, grads = jax.value_and_grad(gathered(loss_fn))(state.params, batch, rng, encoder, text_lengths,
                                                        text_packing)
  grad_norm = optax.global_norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  apply = finite & fits
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  keep_old = lambda new, old: jax.tree_util.tree_map(lambda n, o: jnp.where(apply, n, o), new, old)
  new_state = state.replace(step=state.step + 1,
                            params=keep_old(params, state.params),
                            opt_state=keep_old(opt_state, state.opt_state))
  metrics = {'loss': loss, 'grad_norm': grad_norm, 'learning_rate': schedule(state.step),
             'finite': finite.astype(jnp.float32), **aux}
  return new_state, metrics

