"""IVT on RSTPReid: non-overlapping patches (stride 16), otherwise the CUHK-PEDES recipe."""
from configs import base


def get_config():
  c = base.get_config()
  c.data.name = 'rstpreid'
  c.data.manual_dir = '~/data/RSTPReid'
  c.model.stride = 16
  return c
