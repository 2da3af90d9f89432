"""IVT on ICFG-PEDES: stride 12 as CUHK-PEDES; ICFG has no val split, 5% of train identities are carved out."""
from configs import base


def get_config():
  c = base.get_config()
  c.data.name = 'icfg_pedes'
  c.data.manual_dir = '~/data/ICFG-PEDES'
  c.data.val_fraction_ids = 0.05
  c.model.stride = 12
  return c
