"""`python -m ivt_jax.serve --index=DIR`: the search page and its JSON API (ivt_jax.search.server)."""
import sys

from ivt_jax.search import server

if __name__ == '__main__':
  sys.exit(server.cli())
