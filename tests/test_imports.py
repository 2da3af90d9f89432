"""Floors point one way: configs and input_pipeline never import the training side (ivt_jax), a room of ivt_jax
imports only the rooms below it, and no module imports its importer, directly or around a circle. Every import
statement counts, also those inside functions. The tree shows the rooms: at most 10 modules directly in ivt_jax/
(the programs), no source file over 600 lines."""
import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ('configs', 'input_pipeline', 'ivt_jax')
# Which packages each package may import (itself included).
ALLOWED = {'configs': {'configs'}, 'input_pipeline': {'input_pipeline'},
           'ivt_jax': {'ivt_jax', 'input_pipeline', 'configs'}}
# The rooms of ivt_jax, lowest first (docs/architecture.md); the modules directly in ivt_jax/ (the programs) stand
# above them all.
ROOMS = ('runtime', 'objectives', 'models', 'weights', 'evaluation', 'training', 'search', 'bench', 'planner',
         'tools')


def _modules() -> dict[str, str]:
  found = {}
  for package in PACKAGES:
    for folder, _, files in os.walk(os.path.join(ROOT, package)):
      for f in files:
        if f.endswith('.py'):
          rel = os.path.relpath(os.path.join(folder, f), ROOT)[:-3].replace(os.sep, '.')
          found[rel[:-len('.__init__')] if rel.endswith('.__init__') else rel] = os.path.join(folder, f)
  return found


def _imports(path: str, modules: dict[str, str]) -> set[str]:
  """The project modules a file imports (a `from package import name` counts as package.name when that is a
  module of the project, else as the package)."""
  out = set()
  for node in ast.walk(ast.parse(open(path).read(), path)):
    names = []
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      names = [f'{node.module}.{a.name}' if f'{node.module}.{a.name}' in modules else node.module
               for a in node.names]
    for name in names:
      while name and name not in modules:
        name = name.rpartition('.')[0]
      if name:
        out.add(name)
  return out


def graph() -> dict[str, set[str]]:
  modules = _modules()
  return {m: _imports(p, modules) - {m} for m, p in modules.items()}


def test_lower_floors_never_import_higher_ones():
  bad = [f'{m} imports {d}' for m, deps in graph().items() for d in deps
         if d.split('.')[0] not in ALLOWED[m.split('.')[0]]]
  assert not bad, bad


def _room(module: str) -> int:
  """The floor of an ivt_jax module: its room's place in ROOMS; the programs directly in ivt_jax/ above all."""
  parts = module.split('.')
  if len(parts) > 2 or (len(parts) == 2 and parts[1] in ROOMS):
    assert parts[1] in ROOMS, f'{module} is in no room of {ROOMS}'
    return ROOMS.index(parts[1])
  return len(ROOMS)


def test_rooms_import_only_rooms_below():
  bad = [f'{m} imports {d}' for m, deps in graph().items() if m.startswith('ivt_jax.') for d in deps
         if d.startswith('ivt_jax.') and _room(d) > _room(m)]
  assert not bad, bad


def test_the_tree_shows_the_rooms():
  top = sorted(f for f in os.listdir(os.path.join(ROOT, 'ivt_jax')) if f.endswith('.py'))
  assert len(top) <= 10, top
  assert {d for d in os.listdir(os.path.join(ROOT, 'ivt_jax'))
          if os.path.isfile(os.path.join(ROOT, 'ivt_jax', d, '__init__.py'))} == set(ROOMS)
  long = {}
  for path in _modules().values():
    with open(path) as f:
      n = sum(1 for _ in f)
    if n > 600:
      long[os.path.relpath(path, ROOT)] = n
  assert not long, long
  for room in ROOMS:  # each __init__.py short: a docstring and a few re-exports
    with open(os.path.join(ROOT, 'ivt_jax', room, '__init__.py')) as f:
      assert sum(1 for _ in f) <= 15, room


def test_no_module_imports_its_importer():
  g = graph()
  state, cycles = {}, []

  def visit(m, path):
    state[m] = 'open'
    for d in sorted(g.get(m, ())):
      if state.get(d) == 'open':
        cycles.append(' -> '.join(path[path.index(d):] + [d]))
      elif d not in state:
        visit(d, path + [d])
    state[m] = 'done'

  for m in sorted(g):
    if m not in state:
      visit(m, [m])
  assert not cycles, cycles


def test_the_check_sees_a_backward_import(tmp_path, monkeypatch):
  """The check itself: a stand-in input_pipeline module importing ivt_jax is caught."""
  modules = {'input_pipeline.x': str(tmp_path / 'x.py'), 'ivt_jax.models.encoder': '', 'ivt_jax': ''}
  (tmp_path / 'x.py').write_text('def f():\n  from ivt_jax.models import encoder\n')
  assert _imports(modules['input_pipeline.x'], modules) == {'ivt_jax.models.encoder'}
  monkeypatch.setitem(globals(), 'graph', lambda: {'input_pipeline.x': {'ivt_jax.models.encoder'}})
  with pytest.raises(AssertionError, match='input_pipeline.x imports ivt_jax.models.encoder'):
    test_lower_floors_never_import_higher_ones()
  monkeypatch.setitem(globals(), 'graph', lambda: {'ivt_jax.models.x': {'ivt_jax.training.step'}})
  with pytest.raises(AssertionError, match='ivt_jax.models.x imports ivt_jax.training.step'):
    test_rooms_import_only_rooms_below()
  monkeypatch.setitem(globals(), 'graph', lambda: {'ivt_jax.a': {'ivt_jax.b'}, 'ivt_jax.b': {'ivt_jax.a'}})
  with pytest.raises(AssertionError, match='ivt_jax.a -> ivt_jax.b -> ivt_jax.a'):
    test_no_module_imports_its_importer()
