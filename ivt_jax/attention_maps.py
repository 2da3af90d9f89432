"""`python -m ivt_jax.attention_maps --checkpoint=DIR --image=FILE [--text=...] --out=FILE.png`: where the model
looks (ivt_jax.search.attention_maps)."""
import sys

from ivt_jax.search import attention_maps

if __name__ == '__main__':
  sys.exit(attention_maps.cli())
