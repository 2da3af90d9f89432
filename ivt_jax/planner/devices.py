"""The accelerators' compilers on a host without the accelerators: libtpu for Cloud TPU, the CUDA PJRT plugin for
NVIDIA GPUs, each giving compile-only devices of a target's topology (jax.experimental.topologies).

The compilers live outside the project's environment (ordinary programs would otherwise try to start a TPU or a
GPU at every launch): `pip install --no-deps --target .compilers -r requirements-compilers.txt` puts them in
<repo>/.compilers, and `IVT_COMPILERS=DIR` names another folder. `prepare_environment()` must run before JAX
starts a backend: `python -m ivt_jax.aot` calls it first.
"""
import contextlib
import importlib.util
import os
import sys
import tempfile

from ivt_jax.planner import targets as targets_lib

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
INSTALL = ('pip install --no-deps --target .compilers -r requirements-compilers.txt  '
           '(in the repository; or set IVT_COMPILERS to the folder that holds them)')


class CompilerMissingError(RuntimeError):
  """A target's compiler is not installed: the message says how to install it."""


def compilers_dir() -> str:
  return os.path.abspath(os.path.expanduser(os.environ.get('IVT_COMPILERS', '') or os.path.join(_ROOT, '.compilers')))


def prepare_environment() -> None:
  """CPU as JAX's own backend, the compilers' folder on the path, libtpu told it runs on no TPU VM."""
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')
  os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')  # TensorFlow (imported by the data side) says nothing
  if os.environ.get('IVT_VERBOSE', '') in ('', '0'):
    os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  os.environ.setdefault('TPU_SKIP_MDS_QUERY', '1')           # no metadata server to ask
  os.environ.setdefault('TPU_ACCELERATOR_TYPE', 'v4-8')      # placeholders libtpu asks for at start-up; the
  os.environ.setdefault('TPU_WORKER_HOSTNAMES', 'localhost')  # topology compiled for is the target's
  os.environ.setdefault('TPU_WORKER_ID', '0')
  os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')  # compile-only: no lock on chips (there are none)
  path = compilers_dir()
  if os.path.isdir(path) and path not in sys.path:
    sys.path.insert(0, path)


def import_jax_quietly() -> None:
  """Imports JAX with the compilers' start-up lines hidden (the CUDA plugin writes its own at import), unless
  IVT_VERBOSE=1 or --verbosity=1 (or more) is on the command line."""
  from input_pipeline import cli  # pylint: disable=g-import-not-at-top
  with quiet_stderr(cli.verbose_argv()):
    import jax  # pylint: disable=g-import-not-at-top,unused-import
    jax.devices()


def have_compiler(platform: str) -> bool:
  try:
    if platform == 'tpu':
      return importlib.util.find_spec('libtpu') is not None
    return importlib.util.find_spec('jax_plugins.xla_cuda12') is not None
  except ModuleNotFoundError:  # no jax_plugins namespace at all
    return False


@contextlib.contextmanager
def quiet_stderr(verbose: bool = False):
  """The compilers' C++ start-up lines (written to file descriptor 2) hidden; replayed if the body raises."""
  if verbose:
    yield
    return
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile(mode='w+b') as sink:
    os.dup2(sink.fileno(), 2)
    try:
      yield
    except BaseException:
      os.dup2(saved, 2)
      sink.seek(0)
      text = sink.read().decode(errors='replace').strip()
      if text:
        print(text, file=sys.stderr)
      raise
    finally:
      os.dup2(saved, 2)
      os.close(saved)


def target_devices(target: targets_lib.Target, verbose: bool = False) -> list:
  """Compile-only jax devices of the target's topology (chips in the order of its grid)."""
  if not have_compiler(target.platform):
    what = 'libtpu' if target.platform == 'tpu' else 'jax-cuda12-plugin and jax-cuda12-pjrt'
    raise CompilerMissingError(f'--target={target.name} needs {what}, not installed here ({compilers_dir()} '
                               f'holds no compiler for it): {INSTALL}')
  import jax  # pylint: disable=g-import-not-at-top
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  with quiet_stderr(verbose):
    jax.devices()  # the host backend and the plugins' start-up lines, hidden with the compiler's
    if target.platform == 'tpu':
      dims = [int(d) for d in target.topology.split(':')[1].split('x')]
      per_host = tuple(min(d, 2) for d in dims) + (1,) * (3 - len(dims))
      topo = topologies.get_topology_desc(
          platform='tpu', topology_name=target.topology,
          chip_config_name='megacore' if target.chip.cores == 2 else 'default',
          chips_per_host_bounds=per_host, num_slices=1)
    else:
      topo = topologies.get_topology_desc(platform='cuda', topology_name='gpu', topology=target.topology,
                                          target_config=targets_lib.gpu_target_config(target.chip_name))
  devices = list(topo.devices)
  if len(devices) != target.chips:
    raise RuntimeError(f'{target.topology}: the compiler gave {len(devices)} devices, expected {target.chips}')
  return devices


def compiler_options(target: targets_lib.Target) -> dict:
  """XLA options a compile for this target needs. CUDA without a GPU cannot autotune, and XLA's Triton GEMM
  emitter then finds no tile sizes for some bfloat16 dots ("Couldn't find output tile sizes that satisfy hlo");
  cuBLAS GEMMs compile. On a real GPU the autotuner chooses, and training sets nothing."""
  if target.platform == 'cuda':
    return {'xla_gpu_enable_triton_gemm': False}
  return {}
