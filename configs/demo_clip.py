"""CLIP's two towers (model.head='clip') on the CPU demo: the same SynthPEDES, tokenizer, batches, MLA and BMM
as configs/demo.py, trained from scratch with IRRA's objectives (SDM + ID), for a comparison at equal steps with
the IVT encoder (docs/clip.md).

  python -m ivt_jax.main --config=configs/demo_clip.py --workdir=/tmp/ivt_demo_clip

Each tower is the demo encoder's size (2 blocks of width 128, 4 heads, MLP 512 as CLIP's 4 x width), so the
two towers hold about twice the encoder's block parameters (the shared encoder shares attention and norms).
"""
from configs import demo


def get_config():
  c = demo.get_config()
  c.model.head = 'clip'
  c.model.clip.vision_width = 128
  c.model.clip.vision_layers = 2
  c.model.clip.vision_heads = 4
  c.model.clip.text_width = 128
  c.model.clip.text_layers = 2
  c.model.clip.text_heads = 4
  c.model.clip.embed_dim = 128
  c.model.clip.context_length = c.model.max_text_positions
  c.model.clip.sdm_weight = 1.0
  c.model.clip.id_weight = 1.0
  c.model.clip.temperature = 0.02
  c.optim.weight_decay = 0.05         # as the comparison in docs/clip.md and the IVT ablation (docs/fidelity.md)
  return c
