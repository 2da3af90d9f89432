"""`python -m ivt_jax.benchmark --config=... [--batch N]`: speed and memory of the train step and of retrieval.

The program is ivt_jax.bench.step (its docstring says what is measured and printed).
"""
from ivt_jax.bench import step
from ivt_jax.runtime import cli

if __name__ == '__main__':
  from absl import flags
  step.define_flags()
  flags.adopt_module_key_flags(step)  # --help lists them
  cli.run_absl(step.main)
