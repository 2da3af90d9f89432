"""What the planner compiles for: Cloud TPU slices and NVIDIA GPU hosts, by the names people use.

A target is a chip (the vendor's peaks: one table, `CHIPS`) times a count, laid out as its compiler wants it:
a libtpu topology ('v5e:16x16') for a TPU, a CUDA topology ('1x2x8': slices x hosts x GPUs per host) with an
XLA GPU target description for a GPU (`gpu_target_config`, written from the same table).

  v4-8, v4-32, v5p-8, v5p-128      TensorCores as Google counts them (2 per chip; one JAX device per chip)
  v5e-16, v5e-256, v6e-256         chips (v5litepod-N is v5e-N)
  v5e:4x4, v4:2x2x4                libtpu's own topology names
  h100x8, h200x16, h100            NVIDIA GPUs (SXM), 8 per host
"""
import dataclasses
import re

GIB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class Chip:
  """One accelerator chip: the vendor's published peaks (dense, no sparsity) and an on-demand price."""
  kind: str
  platform: str                 # 'tpu' | 'cuda'
  hbm_bytes: int
  bf16_flops: float             # peak bfloat16 matrix FLOP/s
  f32_flops: float              # FLOP/s of float32 dots at JAX's default precision (TPU: one bfloat16 pass;
                                # NVIDIA: TF32 tensor cores)
  hbm_bandwidth: float          # bytes/s
  link_bandwidth: float         # bytes/s per chip over the interconnect (ICI / NVLink), all links, one way
  usd_per_chip_hour: float      # on-demand list price (see docs/scaling.md for the date); --price overrides
  cores: int = 1                # TensorCores per chip (Cloud TPU names count these for v4 and v5p)


# Sources: Cloud TPU system architecture pages (v4, v5e, v5p, v6e), NVIDIA H100 / H200 SXM datasheets; prices:
# Cloud TPU on-demand list prices per chip-hour (us-central), GPU: a typical on-demand price per GPU-hour.
CHIPS = {
    'v4': Chip('TPU v4', 'tpu', 32 * GIB, 275e12, 275e12, 1.2e12, 300e9, 3.22, cores=2),
    'v5e': Chip('TPU v5 lite', 'tpu', 16 * GIB, 197e12, 197e12, 819e9, 200e9, 1.20),
    'v5p': Chip('TPU v5p', 'tpu', 95 * GIB, 459e12, 459e12, 2.765e12, 600e9, 4.20, cores=2),
    'v6e': Chip('TPU v6 lite', 'tpu', 32 * GIB, 918e12, 918e12, 1.64e12, 448e9, 2.70),
    'h100': Chip('NVIDIA H100 80GB HBM3', 'cuda', 80 * 10 ** 9, 989e12, 494e12, 3.35e12, 450e9, 3.00),
    'h200': Chip('NVIDIA H200', 'cuda', 141 * 10 ** 9, 989e12, 494e12, 4.8e12, 450e9, 3.80),
}
# XLA's GPU target description per GPU: compute capability and the facts the compiler's cost model reads.
_GPU_FACTS = {
    'h100': dict(core_count=132, clock_rate_ghz=1.98, l2_cache_size=50 * 2 ** 20, memory_size=79_646_851_072,
                 memory_bandwidth=3_352_320_000_000, cc=(9, 0)),
    'h200': dict(core_count=132, clock_rate_ghz=1.98, l2_cache_size=60 * 2 ** 20, memory_size=150_754_820_096,
                 memory_bandwidth=4_800_000_000_000, cc=(9, 0)),
}
GPUS_PER_HOST = 8
_TPU_CHIP_GRIDS = {  # chips -> libtpu grid, per generation family
    '3d': {1: '1x1x1', 4: '2x2x1', 8: '2x2x2', 16: '2x2x4', 32: '2x4x4', 64: '4x4x4', 128: '4x4x8',
           256: '4x8x8', 512: '8x8x8', 1024: '8x8x16', 2048: '8x16x16', 4096: '16x16x16'},
    '2d': {1: '1x1', 4: '2x2', 8: '2x4', 16: '4x4', 32: '4x8', 64: '8x8', 128: '8x16', 256: '16x16'},
}
_FAMILY = {'v4': '3d', 'v5p': '3d', 'v5e': '2d', 'v6e': '2d'}
_CLOUD = re.compile(r'^(v4|v5p|v5e|v5litepod|v6e)-([1-9][0-9]*)$')
_LIBTPU = re.compile(r'^(v4|v5p|v5e|v6e):([0-9]+(?:x[0-9]+){1,2})$')
_GPU = re.compile(r'^(h100|h200)(?:x([1-9][0-9]*))?$')


class TargetError(ValueError):
  """A target name the planner does not know: the message lists what it does."""


@dataclasses.dataclass(frozen=True)
class Target:
  name: str        # as given, e.g. 'v5e-256'
  chip_name: str   # a key of CHIPS
  chips: int
  topology: str    # libtpu 'v5e:16x16' | cuda '1x2x8'

  @property
  def chip(self) -> Chip:
    return CHIPS[self.chip_name]

  @property
  def platform(self) -> str:
    return self.chip.platform

  @property
  def cloud_name(self) -> str:
    if self.platform == 'cuda':
      return f'{self.chip_name}x{self.chips}'
    return f'{self.chip_name}-{self.chips * self.chip.cores}'


def _tpu(generation: str, chips: int, name: str) -> Target:
  grids = _TPU_CHIP_GRIDS[_FAMILY[generation]]
  if chips not in grids:
    raise TargetError(f'--target={name}: a {generation} slice of {chips} chips is not one of '
                      f'{sorted(grids)} chips')
  return Target(name, generation, chips, f'{generation}:{grids[chips]}')


def parse_target(name: str) -> Target:
  """'v5e-256' | 'v4-8' | 'v5e:16x16' | 'h100x8' -> Target; TargetError naming what is accepted."""
  key = name.strip().lower()
  if m := _CLOUD.match(key):
    generation = 'v5e' if m.group(1) == 'v5litepod' else m.group(1)
    count = int(m.group(2))
    cores = CHIPS[generation].cores
    if count % cores:
      raise TargetError(f'--target={name}: {generation} sizes count TensorCores ({cores} per chip): '
                        f'{count} is not a multiple of {cores}')
    return _tpu(generation, count // cores, name)
  if m := _LIBTPU.match(key):
    generation, grid = m.groups()
    dims = [int(d) for d in grid.split('x')]
    if len(dims) != (3 if _FAMILY[generation] == '3d' else 2):
      raise TargetError(f'--target={name}: {generation} topologies have '
                        f'{3 if _FAMILY[generation] == "3d" else 2} dimensions, like '
                        f'{generation}:{_TPU_CHIP_GRIDS[_FAMILY[generation]][16]}')
    chips = 1
    for d in dims:
      chips *= d
    return Target(name, generation, chips, key)
  if m := _GPU.match(key):
    gpu, count = m.group(1), int(m.group(2) or 1)
    if count > GPUS_PER_HOST and count % GPUS_PER_HOST:
      raise TargetError(f'--target={name}: more than {GPUS_PER_HOST} GPUs come in hosts of {GPUS_PER_HOST}')
    hosts = max(1, count // GPUS_PER_HOST)
    return Target(name, gpu, count, f'1x{hosts}x{count // hosts}')
  raise TargetError(f'--target={name!r} is not a target: use a Cloud TPU name (v4-8, v4-32, v5p-8, v5e-16, '
                    f'v5e-256, v6e-256, ...), a libtpu topology (v5e:4x4, v4:2x2x4) or GPUs (h100x8, h200x16)')


def listed_targets() -> list[str]:
  """Every Cloud name the planner maps (the installed libtpu decides which it compiles for)."""
  out = []
  for generation in ('v4', 'v5p', 'v5e', 'v6e'):
    cores = CHIPS[generation].cores
    out += [f'{generation}-{chips * cores}' for chips in _TPU_CHIP_GRIDS[_FAMILY[generation]]]
  out += [f'{gpu}x{n}' for gpu in _GPU_FACTS for n in (1, 2, 4, 8, 16, 32)]
  return out


def gpu_target_config(chip_name: str) -> str:
  """XLA's GpuTargetConfig (text proto) for a GPU of `_GPU_FACTS`: what a deviceless CUDA compile needs."""
  f = _GPU_FACTS[chip_name]
  major, minor = f['cc']
  return f"""gpu_device_info {{
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: 233472
  threads_per_core_limit: 2048
  core_count: {f['core_count']}
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: {f['memory_bandwidth']}
  l2_cache_size: {f['l2_cache_size']}
  clock_rate_ghz: {f['clock_rate_ghz']}
  device_memory_size: {f['memory_size']}
  shared_memory_per_block_optin: 232448
  cuda_compute_capability {{ major: {major} minor: {minor} }}
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 10 }}
device_description_str: "{CHIPS[chip_name].kind}"
"""
