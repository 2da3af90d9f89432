"""XLA's CPU backend: reuse one step's memory in the next instead of faulting it in afresh.

XLA's CPU runtime allocates each execution's temporaries as one block (3.7 GB for the ViT-B training step at
batch 4) and frees it at the end. glibc serves a block that large with mmap and returns it with munmap, so every
step faults the whole block in again, page by page: about 915,000 page faults and 5 to 7 s of kernel time per
9 s step on the 2-core machine (docs/benchmarks.md). `reuse_step_memory()`:
- tells glibc's malloc never to mmap and never to trim, so a freed block stays in the heap for the next step;
- runs executions on the calling thread (jax_cpu_enable_async_dispatch=False): the block then comes from the
  main thread's heap, where the worker threads' small allocations, which live in their own arenas, never
  split it (with asynchronous dispatch a worker allocates it, and its arena cannot hold it: mmap again).
From the second or third step on, a step faults in nothing. The cost: the process keeps its peak heap, which a
training process holds anyway, and the Python thread waits for each step (on a CPU the step and the host's work
share the same cores either way).

It must run before JAX creates its CPU client (the dispatch mode is fixed then): the programs call it first,
before any device is asked for. Only when the backend will be the CPU (JAX_PLATFORMS says so, or no accelerator
plugin is installed) and the C library is glibc; IVT_REUSE_STEP_MEMORY=0 turns it off, =1 forces it.
"""
import ctypes
import importlib.metadata
import importlib.util
import os
import platform

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
ENV = 'IVT_REUSE_STEP_MEMORY'


def cpu_backend_expected(platforms: str | None = None) -> bool:
  """Whether JAX's default backend will be the CPU, judged without creating a backend: `platforms` (default: the
  jax_platforms option, or JAX_PLATFORMS) if set, otherwise no accelerator plugin (jax_plugins entry points,
  libtpu) installed."""
  if platforms is None:
    import jax  # pylint: disable=g-import-not-at-top  (importing jax creates no backend)
    platforms = jax.config.jax_platforms or os.environ.get('JAX_PLATFORMS', '')
  if platforms:
    return platforms.split(',')[0].strip().lower() == 'cpu'
  if importlib.metadata.entry_points(group='jax_plugins'):
    return False
  return importlib.util.find_spec('libtpu') is None and importlib.util.find_spec('jax_plugins') is None


def _glibc_keep_freed_memory() -> bool:
  if platform.system() != 'Linux' or platform.libc_ver()[0] != 'glibc':
    return False
  mallopt = getattr(ctypes.CDLL(None), 'mallopt', None)
  if mallopt is None:
    return False
  mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
  # M_TRIM_THRESHOLD takes a size_t through an int: -1 is the largest, i.e. never trim.
  return mallopt(_M_MMAP_MAX, 0) == 1 and mallopt(_M_TRIM_THRESHOLD, -1) == 1


def reuse_step_memory(force: bool | None = None) -> bool:
  """Keeps freed memory in the heap and dispatches CPU executions synchronously; -> whether it did.

  force=None: as IVT_REUSE_STEP_MEMORY says (0 off, 1 on), else only when the CPU backend is expected."""
  if force is None:
    env = os.environ.get(ENV, '').strip().lower()
    force = None if env == '' else env not in ('0', 'false', 'no', 'off')
  if force is False or (force is None and not cpu_backend_expected()):
    return False
  if not _glibc_keep_freed_memory():
    return False
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update('jax_cpu_enable_async_dispatch', False)
  return True
