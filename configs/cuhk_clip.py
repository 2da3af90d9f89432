"""IRRA's CLIP recipe (configs/clip_recipe.py) on CUHK-PEDES; IRRA reports R@1 73.38 (with its MLM loss).

  python -m ivt_jax.main --config=configs/cuhk_clip.py --workdir=DIR \
      --config.data.manual_dir=/data/CUHK-PEDES --config.init.clip=/weights/ViT-B-16.pt
"""
from configs import clip_recipe
from configs import cuhk


def get_config():
  return clip_recipe.apply(cuhk.get_config())
