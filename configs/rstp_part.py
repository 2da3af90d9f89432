"""The part head (ivt_jax/models/part.py) on RSTPReid: the rstp.py recipe with model.head='part'.

The encoder's parameters keep the IVT names, so config.init.{vit_npz,bert,ivt} load as for the IVT head; the
part decoder's parameters (paths starting with 'part_') are allowed to stay randomly initialized.
"""
from configs import rstp


def get_config():
  c = rstp.get_config()
  c.model.head = 'part'
  c.init.allow_random = 'part_.*'
  return c
