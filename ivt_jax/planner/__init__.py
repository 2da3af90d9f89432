"""Compile plans for accelerators this host does not have: memory, FLOPs, collectives and a roofline per chip of a
Cloud TPU slice or GPU host, from the real compilers (`python -m ivt_jax.aot`)."""
