"""The encoder's dense layers, with a backward pass that XLA's CPU backend runs without transposing activations.

JAX's own gradient of `x @ kernel` transposes its dot: XLA then materializes the transpose of the output's
gradient (B N x features, e.g. 2,088 x 3,072 for the ViT-B MLP at batch 4) in an elementwise loop that also
recomputes whatever produced it (the GELU's derivative): on a 2-core CPU that loop took about 40% of the MLP's
forward and backward (`docs/benchmarks.md`). `dense` computes the same three products itself - the input's
gradient g kernel^T, the kernel's x^T g as a contraction over the rows of x and g, and the bias's column sums -
which XLA runs as plain matrix products: the same numbers (up to the order of float sums), the MLP's forward and
backward about 1.7x faster there. `grad='xla'` keeps JAX's own rule (`grad='auto'`: this one on CPU, JAX's
elsewhere, where the compilers pick operand layouts for their matrix units themselves).
"""
from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

GRADS = ('auto', 'rows', 'xla')


@jax.custom_vjp
def dense(x: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
  """x (..., D_in) @ kernel (D_in, D_out) + bias (D_out,), with the row-contracting backward (module docstring)."""
  return x @ kernel + bias


def _forward(x, kernel, bias):
  return x @ kernel + bias, (x, kernel)


def _backward(saved, g):
  x, kernel = saved
  rows_x = x.reshape(-1, x.shape[-1])
  rows_g = g.reshape(-1, g.shape[-1])
  d_kernel = jnp.einsum('nd,nf->df', rows_x, rows_g).astype(kernel.dtype)
  d_bias = jnp.sum(rows_g, axis=0).astype(kernel.dtype)
  return (g @ kernel.T).astype(x.dtype), d_kernel, d_bias


dense.defvjp(_forward, _backward)


def resolve(grad: str, platform: str = '') -> str:
  """'rows' or 'xla' for a model.dense_grad setting ('auto': rows on CPU) on `platform` (default: JAX's backend)."""
  if grad not in GRADS:
    raise ValueError(f'model.dense_grad must be one of {GRADS}, got {grad!r}')
  if grad != 'auto':
    return grad
  return 'rows' if (platform or jax.default_backend()) == 'cpu' else 'xla'


def apply(x: jax.Array, kernel: jax.Array, bias: jax.Array, grad: str) -> jax.Array:
  """x @ kernel + bias with the backward `grad` names ('rows', 'xla' or 'auto')."""
  if resolve(grad) == 'rows':
    return dense(x, kernel, bias)
  return x @ kernel + bias


class Dense(nn.Module):
  """nn.Dense(features) with its parameters (`kernel` (D_in, D_out) and `bias`, float32) and numbers, and the
  backward `grad` chooses (`apply`)."""
  features: int
  dtype: Any = jnp.float32
  kernel_init: Callable = nn.initializers.lecun_normal()
  grad: str = 'auto'

  @nn.compact
  def __call__(self, x):
    kernel = self.param('kernel', self.kernel_init, (x.shape[-1], self.features), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros_init(), (self.features,), jnp.float32)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    return apply(x, kernel, bias, self.grad)
