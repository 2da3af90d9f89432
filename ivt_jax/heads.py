"""The model chosen by `config.model.head`: the one module that imports every head (a head never imports it).

  'ivt'   the IVT encoder (ivt_jax.model): CLS embeddings compared by cosine;
  'part'  the encoder plus the shared-query part decoder (ivt_jax.part_model); the encoder's parameters keep
          their names;
  'clip'  CLIP's two towers (ivt_jax.clip_model), trained with the CLIP-family objectives (SDM, ID, ITC).
"""
import flax.linen as nn
import ml_collections

from ivt_jax import clip_model
from ivt_jax import model as model_lib
from ivt_jax import part_model

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
