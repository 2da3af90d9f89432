"""Benchmarks: the train step, retrieval and memory (step), the training loop (loop), the part head's cost
(part_cost); the program is `python -m ivt_jax.benchmark`."""
