"""The model chosen by `config.model.head`, and its embedding functions: the one module that imports every head
(a head never imports it).

  'ivt'   the IVT encoder (ivt_jax.models.encoder): CLS embeddings compared by cosine;
  'part'  the encoder plus the shared-query part decoder (ivt_jax.models.part); the encoder's parameters keep
          their names;
  'clip'  CLIP's two towers (ivt_jax.models.clip), trained with the CLIP-family objectives (SDM, ID, ITC).
"""
import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from ivt_jax.models import clip as clip_model
from ivt_jax.models import encoder as model_lib
from ivt_jax.models import part as part_model

HEADS = ('ivt', 'part', 'clip')


def build(config: ml_collections.ConfigDict) -> nn.Module:
  """The configured model (config.model.head)."""
  head = config.model.head
  if head == 'ivt':
    return model_lib.Encoder(model_lib.encoder_config(config))
  if head == 'part':
    return part_model.build(config)
  if head == 'clip':
    return clip_model.build(config)
  raise ValueError(f'model.head must be one of {HEADS}, got {head!r}')


def embed_images(params, images_uint8, *, encoder: model_lib.Encoder):
  """(B, H, W, 3) uint8 -> (B, D) L2-normalized embeddings; for the part head the composite (B, (1 + K) D)
  [ĝ, p̂_1..p̂_K] (each piece L2-normalized; see ivt_jax.models.part)."""
  if isinstance(encoder, part_model.PartModel):
    g, parts = encoder.apply({'params': params}, model_lib.normalize_images(images_uint8), method='image_parts')
    return part_model.image_composite(g, parts, encoder.part)
  x = encoder.apply({'params': params}, model_lib.normalize_images(images_uint8), method='embed_images')
  return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def embed_texts(params, ids, mask, *, encoder: model_lib.Encoder):
  """(B, L) ids and mask -> (B, D) L2-normalized embeddings; for the part head the composite (B, (1 + K) D)
  [ĝ, s w_1 p̂_1..s w_K p̂_K], whose dot product with the image composite is the part score."""
  if isinstance(encoder, part_model.PartModel):
    g, parts = encoder.apply({'params': params}, ids, mask, method='text_parts')
    weights = encoder.apply({'params': params}, g, method='part_weights')
    return part_model.text_composite(g, parts, weights, encoder.part)
  z = encoder.apply({'params': params}, ids, mask, method='embed_texts')
  return z / jnp.linalg.norm(z, axis=-1, keepdims=True)
