"""IRRA's CLIP recipe (configs/clip_recipe.py) on ICFG-PEDES; IRRA reports R@1 63.46 (with its MLM loss).

  python -m ivt_jax.main --config=configs/icfg_clip.py --workdir=DIR \
      --config.data.manual_dir=/data/ICFG-PEDES --config.init.clip=/weights/ViT-B-16.pt
"""
from configs import clip_recipe
from configs import icfg


def get_config():
  return clip_recipe.apply(icfg.get_config())
