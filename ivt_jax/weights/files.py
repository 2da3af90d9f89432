"""Reading weight files into flat {name: numpy array} mappings: .npz, .safetensors, PyTorch .bin/.pth (torch is
imported only for those, with weights_only=True) and Hugging Face model folders."""
from __future__ import annotations

import os
from typing import Any, Callable, Mapping

import numpy as np


def read_arrays(path: str, what: str = 'weights') -> tuple[dict[str, np.ndarray], list[str]]:
  """A flat name -> numpy array mapping from a .safetensors, .npz or PyTorch file; plus notes.

  A file with NaN or infinite values in any array is refused (ValueError naming the file and the arrays), so a
  damaged download never reaches training.

  Args:
    path: the file; for BERT also a Hugging Face model folder (model.safetensors or pytorch_model.bin in it).
    what: the config key the path came from, for error messages.
  """
  path = os.path.expanduser(path)
  arrays, notes = _read(path, what)
  check_finite(arrays, f'{what}: {path}')
  return arrays, notes


def check_finite(arrays: Mapping[str, np.ndarray], what: str) -> None:
  """Raises ValueError naming `what` and each array (with its count of NaN and infinite values) that holds any."""
  bad = []
  for name, a in arrays.items():
    a = np.asarray(a)
    if a.dtype.kind not in 'fc':
      continue
    finite = np.isfinite(a)
    if not finite.all():
      nan = int(np.isnan(a).sum())
      bad.append(f'{name} ({nan} NaN, {int(a.size - finite.sum()) - nan} infinite of {a.size})')
  if bad:
    shown = ', '.join(bad[:10]) + (f' and {len(bad) - 10} more' if len(bad) > 10 else '')
    raise ValueError(f'{what}: refused, {len(bad)} array(s) hold NaN or infinite values: {shown}')


def _read(path: str, what: str) -> tuple[dict[str, np.ndarray], list[str]]:
  if os.path.isdir(path):
    for name in ('model.safetensors', 'pytorch_model.bin'):
      if os.path.isfile(os.path.join(path, name)):
        path = os.path.join(path, name)
        break
    else:
      raise FileNotFoundError(f'{what}: folder {path} has neither model.safetensors nor pytorch_model.bin')
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{what}: file {path} does not exist')
  if path.endswith('.safetensors'):
    from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
    try:
      return {k: np.asarray(v) for k, v in load_file(path).items()}, []
    except Exception as e:  # safetensors raises its own error types (bad header, unsupported dtype)
      raise ValueError(f'{what}: cannot read safetensors file {path}: {e}') from e
  if path.endswith('.npz'):
    try:
      with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}, []
    except ValueError as e:
      raise ValueError(f'{what}: cannot read .npz file {path} (object arrays are refused): {e}') from e
  return _read_torch(path, what)


def _numpy_safe_globals() -> list[Any]:
  """numpy scalars and dtypes, which the reference's checkpoints hold (e.g. 'best_acc'); data only, no code."""
  core = getattr(np, '_core', None) or np.core  # numpy 2 / numpy 1
  scalar = core.multiarray.scalar
  allowed = [(scalar, 'numpy.core.multiarray.scalar'), (scalar, 'numpy._core.multiarray.scalar'), np.dtype]
  allowed += [getattr(np.dtypes, n) for n in getattr(np.dtypes, '__all__', [])]
  return allowed


def _read_torch(path: str, what: str) -> tuple[dict[str, np.ndarray], list[str]]:
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ImportError(f'{what}: {path} is a PyTorch file; reading it needs torch (an optional extra: '
                      'pip install torch, the CPU build is enough), or convert it to .safetensors '
                      'elsewhere') from None
  try:
    with torch.serialization.safe_globals(_numpy_safe_globals()):
      obj = torch.load(path, map_location='cpu', weights_only=True)
  except Exception as e:  # torch raises UnpicklingError, RuntimeError, ... for unreadable or unsafe files
    raise ValueError(f'{what}: cannot read {path} with torch.load(weights_only=True) (only tensors and plain '
                     f'containers are accepted): {e}') from e
  state_dict, notes = select_state_dict(obj, what=f'{what} {path}', is_array=torch.is_tensor)
  out = {}
  for k, t in state_dict.items():
    t = t.detach().cpu()
    if t.is_floating_point() and t.dtype not in (torch.float32, torch.float64, torch.float16):
      t = t.float()  # bfloat16 and friends have no numpy dtype
    out[k] = t.numpy()
  return out, notes


def select_state_dict(obj: Any, what: str = 'checkpoint',
                      is_array: Callable[[Any], bool] = lambda v: isinstance(v, np.ndarray)
                      ) -> tuple[dict[str, Any], list[str]]:
  """The state_dict inside a loaded checkpoint: `obj` itself, or under 'state_dict' or 'model' (nested).

  Returns (state_dict, notes); raises ValueError naming `what` when there is none.
  """
  notes = []
  while isinstance(obj, Mapping):
    if obj and all(isinstance(k, str) and is_array(v) for k, v in obj.items()):
      return dict(obj), notes
    for key in ('state_dict', 'model'):
      if isinstance(obj.get(key), Mapping):
        others = sorted(str(k) for k in obj if k != key)
        notes.append(f"read the '{key}' entry" + (f' (other entries, unused: {", ".join(others)})'
                                                   if others else ''))
        obj = obj[key]
        break
    else:
      break
  found = (f'a mapping with keys {sorted(map(str, obj))[:10]}' if isinstance(obj, Mapping)
           else type(obj).__name__)
  raise ValueError(f'{what}: no state_dict (a mapping of names to tensors, bare or under "state_dict" or '
                   f'"model"); found {found}')
