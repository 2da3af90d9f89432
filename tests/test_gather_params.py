"""mesh.gather_params: every weight gathered over fsdp before the forward (ZeRO-3 style) trains the same step as
the partitioner's own choice, and the compiled program gathers whole weights."""
import jax
import numpy as np

from ivt_jax.planner import analysis
from ivt_jax.runtime import sharding as sharding_lib
from ivt_jax.training import setup as setup_lib
from tests.conftest import tiny_config


def _step(gather: bool):
  c = tiny_config(width=64, mlp_dim=128)
  c.mesh.data, c.mesh.fsdp = 2, 4
  c.mesh.gather_params = gather
  mesh = sharding_lib.make_mesh(c)
  s = setup_lib.TrainSetup(c, mesh, batch=8)
  batch = sharding_lib.global_batch(setup_lib.random_batch(c, 8, seed=1), mesh)
  compiled = s.compile()
  state, metrics = compiled(s.init_state(), batch)
  return jax.device_get(state.params), jax.device_get(metrics), compiled.as_text()


def test_gathered_weights_train_the_same_step():
  p0, m0, hlo0 = _step(False)
  p1, m1, hlo1 = _step(True)
  np.testing.assert_allclose(m1['loss'], m0['loss'], rtol=1e-6)
  for a, b in zip(jax.tree_util.tree_leaves(p0), jax.tree_util.tree_leaves(p1)):
    np.testing.assert_allclose(b, a, atol=1e-6)
  c = tiny_config(width=64, mlp_dim=128)
  s = setup_lib.TrainSetup(c, sharding_lib.make_mesh(c), batch=8)
  sharded = sum(int(np.prod(l.shape)) * 4 for l, sh in zip(jax.tree_util.tree_leaves(s.abstract_state.params),
                                                           jax.tree_util.tree_leaves(s.param_shardings))
                if l.size >= sharding_lib.MIN_FSDP_SIZE)
  gathered = analysis.collectives(hlo1, 8).get('all-gather', {}).get('bytes', 0)
  assert gathered >= sharded, (gathered, sharded)  # every fsdp-sharded weight arrives whole
