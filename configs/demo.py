"""The CPU demo: SynthPEDES generated on the spot, a small IVT trained from scratch, evaluated on test.

  python -m ivt_jax.main --config=configs/demo.py --workdir=/tmp/ivt_demo

Everything runs through the same code as the real datasets: the generator writes CUHK-PEDES's layout, the
cuhk_pedes builder prepares it, a SentencePiece tokenizer is trained on its training captions.
"""
from configs import base


def get_config():
  c = base.get_config()
  c.seed = 0
  c.data.name = 'cuhk_pedes'
  c.data.manual_dir = ''              # '' = <workdir>/synthpedes, generated if absent
  c.data.synthetic.enabled = True
  c.data.synthetic.num_ids = 1800     # 1600 train ids; 150 test identities: chance R@1 = 1/150 < 1%
  c.data.synthetic.images_per_id = 4
  c.data.synthetic.image_size = (128, 48)
  c.data.synthetic.val_ids = 50
  c.data.synthetic.test_ids = 150
  c.data.image_size = (128, 48)       # the drawn size: no resize
  c.data.text_length = 48            # captions: median 30 pieces, 99% under 51
  c.data.text_buckets = ()           # one text shape
  c.data.phrase_text_length = 24     # phrase and word levels: 95% under 24 pieces
  c.data.word_text_length = 24
  c.data.tokenizer = 'sentencepiece'
  c.data.sentencepiece_vocab_size = 1000  # BPE: ~840 pieces, every caption word whole
  c.data.ids_per_batch = 16
  c.data.images_per_id = 2
  c.data.worker_count = 0
  c.data.augment.pad = 4
  c.model.width = 128
  c.model.depth = 2                   # 2 blocks (3: docs/demo.md)
  c.model.num_heads = 4
  c.model.mlp_dim = 256
  c.model.patch_size = 16             # overlapping 16x16 patches every 10 pixels (the reference: 16 every 12):
  c.model.stride = 10                 # a 12x4 grid, 48 tokens, the cost of 8x8 patches on 96x32 (docs/demo.md)
  c.model.drop_path = 0.0
  c.model.init_std = 0.08             # ~1/sqrt(width): see ivt_jax/models/encoder.py (0.02 stalls a narrow model)
  c.model.pos_embed_init = 'sincos2d'  # image positions start as 2-D sine-cosine codes, then are learned
  c.model.text_embed_dropout = 0.0
  c.model.max_text_positions = 64
  c.optim.name = 'adamw'
  c.optim.lr = 1e-3                  # the other values tried: docs/demo.md
  c.optim.weight_decay = 0.5         # against 0.05, per seed: docs/demo.md
  c.optim.bias_lr_factor = 1.0
  c.optim.warmup_epochs = 0.25       # 100 steps
  c.optim.warmup_init_lr = 1e-5
  c.optim.min_lr = 1e-5
  c.num_epochs = 2                    # 400 steps per epoch: 800 steps
  c.log_every_steps = 20
  c.checkpoint_every_steps = 400
  c.eval_every_epochs = 1
  c.eval_batch_size = 128
  return c
