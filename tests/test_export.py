"""The train step and the embedders lower for GPU ('cuda') and TPU without those devices (jax.export), in float32
and bfloat16: a platform-only lowering error shows up here, on the CPU, before any accelerator is at hand.

(cuDNN fused attention, model.attention='cudnn', looks for cuDNN while tracing and cannot be exported without it;
the GPU benchmark's first seconds on a GPU are where that path is proven.)
"""
import functools

import jax
import jax.numpy as jnp
import pytest

from ivt_jax.models import heads
from ivt_jax.models import encoder as model_lib
from ivt_jax.training import setup as step_setup
from conftest import tiny_config

PLATFORMS = ('cuda', 'tpu')


def _config(dtype):
  c = tiny_config(dtype=dtype)
  c.mesh.data, c.mesh.fsdp = 2, 4  # a data x fsdp mesh: the shardings of training travel with the export
  c.data.ids_per_batch, c.data.images_per_id = 4, 2
  c.data.phrase_text_length = c.data.word_text_length = 8
  return c


@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
def test_train_step_exports_for_gpu_and_tpu(dtype):
  c = _config(dtype)
  setup = step_setup.TrainSetup(c, step_setup.sharding_lib.make_mesh(c), batch=8)
  exported = jax.export.export(setup.step, platforms=PLATFORMS)(setup.abstract_state, setup.abstract_batch)
  assert exported.platforms == PLATFORMS
  assert exported.nr_devices == 8
  text = exported.mlir_module()
  assert 'stablehlo.dot_general' in text
  if dtype == 'bfloat16':
    assert 'bf16' in text
  assert 'sdy.sharding' in text and '"fsdp"' in text  # the parameters' fsdp shardings travel with it


@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
def test_embedders_export_for_gpu_and_tpu(dtype):
  c = _config(dtype)
  encoder = heads.build(c)
  params = jax.eval_shape(lambda: model_lib.init_module_params(encoder, jax.random.key(0)))
  h, w = c.data.image_size
  images = jax.ShapeDtypeStruct((4, h, w, 3), jnp.uint8)
  ids = jax.ShapeDtypeStruct((4, c.data.text_length), jnp.int32)
  img = jax.jit(functools.partial(heads.embed_images, encoder=encoder))
  txt = jax.jit(functools.partial(heads.embed_texts, encoder=encoder))
  e_img = jax.export.export(img, platforms=PLATFORMS)(params, images)
  e_txt = jax.export.export(txt, platforms=PLATFORMS)(params, ids, ids)
  for e in (e_img, e_txt):
    assert e.platforms == PLATFORMS
    assert e.out_avals[0].shape == (4, c.model.width) and e.out_avals[0].dtype == jnp.float32
    # The serialized artifact round-trips (what a GPU or TPU host would load and run).
    again = jax.export.deserialize(e.serialize())
    assert again.in_avals == e.in_avals and again.out_avals == e.out_avals
