"""ivt_jax.runtime.host_memory: with it, an execution reuses the last one's temporaries instead of faulting them in
afresh; without it every execution faults in its whole temporary block (measured with the process's page-fault
counter, in fresh processes: the setting must precede JAX's CPU client)."""
import json
import os
import platform
import subprocess
import sys

import pytest

from ivt_jax.runtime import host_memory

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PROGRAM = r'''
import json, resource, sys
sys.path.insert(0, {root!r})
from ivt_jax.runtime import host_memory
applied = host_memory.reuse_step_memory()
import jax, jax.numpy as jnp
# Temporaries of 2 x (6000 x 6000) float32 = 288 MB in one block.
f = jax.jit(lambda x: jnp.sin(x[:, None] * x[None, :]).sum(axis=0) + jnp.cos(x[:, None] + x[None, :]).sum(axis=1))
x = jnp.linspace(0.0, 1.0, 6000)
temp = f.lower(x).compile().memory_analysis().temp_size_in_bytes
faults = []
for _ in range(10):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  f(x).block_until_ready()
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({{'applied': applied, 'async': bool(jax.config.read('jax_cpu_enable_async_dispatch')),
                  'temp': temp, 'faults': faults}}))
'''


def _run(setting: str) -> dict:
  env = dict(os.environ, JAX_PLATFORMS='cpu', **{host_memory.ENV: setting})
  env.pop('XLA_FLAGS', None)
  out = subprocess.run([sys.executable, '-c', PROGRAM.format(root=ROOT)], env=env, capture_output=True,
                       text=True, timeout=300, check=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(platform.system() != 'Linux' or platform.libc_ver()[0] != 'glibc', reason='glibc only')
def test_steps_reuse_their_memory_with_it_and_fault_it_in_without():
  pages = _run('1')
  assert pages['applied'] and not pages['async']
  block = pages['temp'] // 4096
  assert block > 50_000, pages
  steady = sorted(pages['faults'][3:])
  assert steady[len(steady) // 2] < 0.01 * block, pages   # median execution from the fourth on: nothing new
  # An execution that lands on a thread with a malloc arena of its own faults one block into that arena once
  # (seen once in a CI run on a busy machine); never more than twice in the 7.
  assert sum(f > 0.5 * block for f in steady) <= 2, pages
  off = _run('0')
  assert not off['applied'] and off['async']
  steady_off = sorted(off['faults'][3:])
  assert steady_off[len(steady_off) // 2] > 0.5 * block, off   # every execution maps its block afresh


def test_it_applies_only_to_the_cpu_backend(monkeypatch):
  assert not host_memory.cpu_backend_expected('tpu')
  assert not host_memory.cpu_backend_expected('cuda,cpu')
  assert host_memory.cpu_backend_expected('cpu')
  assert host_memory.cpu_backend_expected(' CPU ')
  monkeypatch.setenv(host_memory.ENV, '0')
  assert host_memory.reuse_step_memory() is False   # turned off: nothing changed
