"""Shared fixtures: a tiny encoder configuration."""
import os

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')

import pytest  # noqa: E402

from configs import base  # noqa: E402


def tiny_config(**model):
  c = base.get_config()
  c.data.image_size = (64, 32)
  c.data.text_length = 16
  c.model.update(width=32, depth=2, num_heads=4, mlp_dim=64, patch_size=16, stride=12, vocab_size=100)
  c.model.update(**model)
  return c


@pytest.fixture
def tiny():
  return tiny_config()
