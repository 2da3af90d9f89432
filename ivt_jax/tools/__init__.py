"""Command-line tools: each module is a program (`python -m ivt_jax.tools.NAME --help`)."""
