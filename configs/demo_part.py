"""The part head on a reduced CPU demo: SynthPEDES (with its hard-negative identities), a small encoder plus
the part decoder, a short schedule sized so that one run takes a few minutes on 2 CPU cores (the ablation in
notes runs 12 of them).

  python -m ivt_jax.main --config=configs/demo_part.py --workdir=/tmp/ivt_demo_part

The IVT head on the same budget: --config.model.head=ivt.
"""
from configs import demo


def get_config():
  c = demo.get_config()
  c.data.synthetic.num_ids = 300      # 200 train, 20 val, 80 test identities (chance R@1 = 1.25%)
  c.data.synthetic.images_per_id = 4
  c.data.synthetic.val_ids = 20
  c.data.synthetic.test_ids = 80
  c.data.synthetic.hard_negative_fraction = 0.25
  c.data.ids_per_batch = 8
  c.data.images_per_id = 2
  c.data.image_size = (96, 32)        # the image and patch setup the part-head figures were measured with
  c.model.patch_size = 8
  c.model.stride = 8
  c.model.head = 'part'
  c.model.width = 64
  c.model.depth = 2
  c.model.num_heads = 4
  c.model.mlp_dim = 128
  c.part.num_parts = 4
  c.part.depth = 1
  c.part.start_epoch = 0.5            # part losses on after 50 steps
  c.num_epochs = 3                    # 3 x 100 steps (800 images x 2 captions / 16 per step)
  c.optim.warmup_epochs = 0
  c.optim.lr = 1e-3
  c.data.phrase_text_length = 0       # every level at data.text_length, as when the ablation was measured
  c.data.word_text_length = 0
  c.model.init_std = 0.02             # the reference's init, as when the ablation was measured
  c.model.pos_embed_init = 'trunc_normal'  # likewise
  c.eval_every_epochs = 1000          # val once at the end, then test
  c.log_every_steps = 25
  c.checkpoint_every_steps = 10000
  return c
