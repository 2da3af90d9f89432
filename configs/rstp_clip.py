"""IRRA's CLIP recipe (configs/clip_recipe.py) on RSTPReid; IRRA reports R@1 60.20 (with its MLM loss).

  python -m ivt_jax.main --config=configs/rstp_clip.py --workdir=DIR \
      --config.data.manual_dir=/data/RSTPReid --config.init.clip=/weights/ViT-B-16.pt
"""
from configs import clip_recipe
from configs import rstp


def get_config():
  return clip_recipe.apply(rstp.get_config())
