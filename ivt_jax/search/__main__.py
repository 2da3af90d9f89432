"""`python -m ivt_jax.search index|query ...` (ivt_jax.search.command)."""
import sys

from ivt_jax.search import command

if __name__ == '__main__':
  sys.exit(command.cli())
