"""model.dense_grad: the dense layers' row-contracting backward gives JAX's own gradients, and its forward is
nn.Dense's, with the same parameters; the whole encoder trains to the same gradients either way."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ivt_jax.models import dense
from ivt_jax.models import encoder as model_lib
from ivt_jax.models import heads
from ivt_jax.training import setup as setup_lib
from ivt_jax.training import step as step_lib
from tests.conftest import tiny_config
from tests.test_chunked import _assert_close


def test_dense_equals_nn_dense_forward_and_backward():
  x = jax.random.normal(jax.random.key(0), (3, 5, 8))
  init = nn.initializers.normal(0.5)
  ours, theirs = dense.Dense(6, kernel_init=init, grad='rows'), nn.Dense(6, kernel_init=init)
  params = theirs.init(jax.random.key(1), x)
  params = jax.tree_util.tree_map(lambda p: p + 0.1, params)  # a non-zero bias
  assert jax.tree_util.tree_structure(ours.init(jax.random.key(1), x)) == jax.tree_util.tree_structure(params)
  np.testing.assert_allclose(ours.apply(params, x), theirs.apply(params, x), rtol=1e-6, atol=1e-6)
  loss = lambda m: lambda p, x: jnp.sum(jnp.sin(m.apply(p, x)))
  g_ours = jax.grad(loss(ours), argnums=(0, 1))(params, x)
  g_theirs = jax.grad(loss(theirs), argnums=(0, 1))(params, x)
  _assert_close(g_ours, g_theirs, 1e-6)


def test_auto_is_rows_on_cpu_and_jaxs_own_elsewhere():
  assert dense.resolve('auto') == 'rows'  # the tests run on CPU
  assert dense.resolve('auto', 'tpu') == 'xla' and dense.resolve('xla') == 'xla'
  c = tiny_config()
  assert model_lib.for_platform(c, 'cuda').model.dense_grad == 'xla'
  assert model_lib.for_platform(c, 'cpu').model.dense_grad == 'rows'
  c.model.dense_grad = 'fast'
  with pytest.raises(ValueError, match='model.dense_grad'):
    model_lib.encoder_config(c)


@pytest.mark.parametrize('head', ['ivt', 'part'])
def test_the_training_gradients_equal_jaxs_own(head):
  grads = {}
  for grad in ('rows', 'xla'):
    c = tiny_config(width=32, mlp_dim=64, drop_path=0.2, dense_grad=grad)
    c.model.head = head
    c.data.ids_per_batch, c.data.images_per_id = 4, 2
    module = heads.build(c)
    params = model_lib.init_module_params(module, jax.random.key(0))
    batch = setup_lib.random_batch(c, 8, seed=1)
    if head == 'part':
      fn = lambda p: step_lib.part_loss_fn(p, batch, jax.random.key(5), module, jnp.asarray(10), 1)[0]
    else:
      fn = lambda p: step_lib.loss_fn(p, batch, jax.random.key(5), module)
    grads[grad] = jax.device_get(jax.jit(jax.value_and_grad(fn))(params))
  np.testing.assert_allclose(grads['rows'][0], grads['xla'][0], rtol=1e-6)
  _assert_close(grads['rows'][1], grads['xla'][1], 1e-5)
