"""IVT on CUHK-PEDES: the reference recipe (stride 12, batch 28 x 3 levels, SGD, 120 epochs).

  python -m ivt_jax.main --config=configs/cuhk.py --workdir=DIR \
      --config.data.manual_dir=/data/CUHK-PEDES --config.data.vocab_file=/weights/bert-base-uncased/vocab.txt
"""
from configs import base


def get_config():
  c = base.get_config()
  c.data.name = 'cuhk_pedes'
  c.data.manual_dir = '~/data/CUHK-PEDES'
  c.model.stride = 12
  return c
