"""launch/colab_demo.ipynb runs top to bottom, headless on CPU, at a reduced size (IVT_SIZE=tiny)."""
import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, 'launch', 'colab_demo.ipynb')


def _kernel_manager(tmp_path):
  """A kernel running this interpreter (the venv's python), whatever `python` is on PATH."""
  from jupyter_client.kernelspec import KernelSpecManager
  from jupyter_client.manager import KernelManager
  kernels = tmp_path / 'kernels'
  spec = kernels / 'python3'
  spec.mkdir(parents=True)
  (spec / 'kernel.json').write_text(json.dumps({
      'argv': [sys.executable, '-m', 'ipykernel_launcher', '-f', '{connection_file}'],
      'display_name': 'Python 3 (ivt-jax venv)', 'language': 'python'}))
  ksm = KernelSpecManager(kernel_dirs=[str(kernels)], ensure_native_kernel=False)
  return KernelManager(kernel_name='python3', kernel_spec_manager=ksm)


def test_notebook_is_clean_and_parameterized_in_one_cell():
  import nbformat
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(nb)
  code = [c for c in nb.cells if c.cell_type == 'code']
  assert all(not c.outputs and c.execution_count is None for c in code)  # saved without outputs
  settings = [c for c in code if "_env('SIZE'" in c.source]
  assert len(settings) == 1 and code.index(settings[0]) == 0
  for name in ('SKIP_INSTALL', 'TRAIN_STEPS', 'WORKDIR', 'CHECKPOINT', 'IMAGES', 'REPO_URL'):
    assert f"_env('{name}'" in settings[0].source


@pytest.mark.slow
def test_notebook_runs_at_tiny_size(tmp_path, monkeypatch):
  import nbformat
  from nbclient import NotebookClient
  workdir = tmp_path / 'run'
  monkeypatch.setenv('IVT_SKIP_INSTALL', '1')
  monkeypatch.setenv('IVT_SIZE', 'tiny')
  monkeypatch.setenv('IVT_TRAIN_STEPS', '2')
  monkeypatch.setenv('IVT_WORKDIR', str(workdir))
  monkeypatch.setenv('IVT_TOP', '4')
  monkeypatch.setenv('XLA_FLAGS', '--xla_force_host_platform_device_count=2')
  monkeypatch.setenv('JAX_PLATFORMS', 'cpu')
  nb = nbformat.read(NOTEBOOK, as_version=4)
  client = NotebookClient(nb, km=_kernel_manager(tmp_path), timeout=600,
                          resources={'metadata': {'path': ROOT}})
  client.execute()  # raises CellExecutionError, with the cell and its traceback, if any cell fails
  text = '\n'.join(o.get('text', '') for c in nb.cells if c.cell_type == 'code' for o in c.outputs)
  assert 'SIZE=tiny TRAIN_STEPS=2' in text
  assert 'install skipped' in text
  assert 'trained 2 steps' in text
  images = [o for c in nb.cells if c.cell_type == 'code' for o in c.outputs if 'image/png' in o.get('data', {})]
  assert len(images) == 3  # retrieval picture, search contact sheet, attention map
  for name in ('metrics.json', 'retrieval.png', 'search_sheet.png', 'attention_map.png',
               'search_index/index.json'):
    assert (workdir / name).exists(), name
  manifest = json.loads((workdir / 'search_index' / 'index.json').read_text())
  assert manifest['stats']['images'] == len(os.listdir(workdir / 'synthpedes' / 'imgs' / 'test'))
