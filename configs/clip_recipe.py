"""IRRA's recipe (CVPR'23, anosorae/IRRA) on the CLIP head, shared by cuhk_clip.py, icfg_clip.py and rstp_clip.py.

  CLIP ViT-B/16 and its text transformer, from OpenAI's ViT-B-16.pt (config.init.clip; open_clip and Hugging Face
  CLIPModel files load too), 384 x 128 images in 16 x 16 patches, CLIP's BPE with 77 tokens; SDM + ID (IRRA's
  optional masked-language relation loss is not implemented); temperature 0.02; Adam (betas 0.9 / 0.999, eps
  1e-3, L2 weight decay 4e-5 except biases), lr 1e-5, biases 2x, the new ID classifier 5x; 60 epochs, 5 of linear
  warmup from 0.1 x lr, then a cosine to 0, stepped per epoch; batch 64.

Differences from IRRA, on purpose: batches are identity-balanced (64 = 64 identities x 1 image: almost every
sample a different person, as IRRA's random sampler), the checkpoint is chosen on the val split (IRRA picks it on
test). The augmentation is IRRA's --img_aug: flip, pad 10 and crop, erasing (probability 0.5, up to 40% of the
image, filled with CLIP's mean colour); the images are resized with bicubic interpolation (IRRA: bilinear). MLA and
BMM, IVT's contributions, are switches:
  --config.data.mla_levels="('sentence','phrase','word')"   the three MLA levels (default here: the sentence)
  --config.data.bmm_ratio=0.2                                BMM token drops in both towers (default here: 0)
"""
from configs import base


def apply(c):
  """IRRA's recipe onto a dataset config `c` (its data.name, manual_dir and split options kept)."""
  c.model.head = 'clip'
  c.model.patch_size = 16
  c.model.stride = 16
  c.model.dtype = 'float32'
  c.model.clip.update(vision_width=768, vision_layers=12, vision_heads=12, embed_dim=512, context_length=77,
                      text_width=512, text_layers=12, text_heads=8, sdm_weight=1.0, id_weight=1.0, itc_weight=0.0,
                      cmpm_weight=0.0, temperature=0.02)
  c.init.clip = '~/data/weights/ViT-B-16.pt'
  c.data.image_size = (384, 128)
  c.data.tokenizer = 'clip'
  c.data.vocab_file = ''              # '' = the merges file the open_clip package ships
  c.data.text_length = 77
  c.data.phrase_text_length = 0
  c.data.word_text_length = 0
  c.data.mla_levels = ('sentence',)
  c.data.bmm_ratio = 0.0
  c.data.augment.update(pad=10, flip_prob=0.5, erase_prob=0.5, erase_max_area=0.4, erase_fill='clip_mean')
  c.data.ids_per_batch = 64
  c.data.images_per_id = 1
  c.optim.name = 'adam'
  c.optim.lr = 1e-5
  c.optim.b1, c.optim.b2, c.optim.eps = 0.9, 0.999, 1e-3
  c.optim.weight_decay = 4e-5
  c.optim.bias_lr_factor = 2.0
  c.optim.new_layers = r'^classifier/'
  c.optim.new_layer_lr_factor = 5.0
  c.optim.schedule_shape = 'warmup_then_cosine'
  c.optim.schedule_unit = 'epoch'
  c.optim.warmup_epochs = 5.0
  c.optim.warmup_init_lr = 1e-6       # IRRA's warmup_factor 0.1
  c.optim.min_lr = 0.0
  c.num_epochs = 60.0
  c.eval_every_epochs = 1
  return c


def get_config():
  """The recipe on base's dataset defaults (CUHK-PEDES); the dataset files set their own."""
  return apply(base.get_config())
