"""Every command in README.md, docs/ and launch/README.md still matches the code: the module exists, each flag is
defined by it, `--config=` files exist and `--config.a.b=` keys are in that config, scripts run by `bash` exist.

Commands are read from fenced bash blocks (backslash continuations joined, `&&` chains split) and from inline
code spans that start with `python -m`, `.venv/bin/python -m` or `bash `.
"""
import glob
import importlib.util
import os
import re
import shlex

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ['README.md', 'launch/README.md'] + sorted(
    os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, 'docs', '*.md')))
# Flags every absl program has.
ABSL_FLAGS = {'help', 'helpfull', 'helpshort', 'verbosity', 'v', 'logtostderr', 'alsologtostderr', 'log_dir'}
PROJECT_PACKAGES = ('ivt_jax', 'input_pipeline')


def _commands(text: str) -> list[str]:
  out = []
  for block in re.findall(r'```(?:bash|sh|shell)\n(.*?)```', text, re.S):
    joined = re.sub(r'\\\n\s*', ' ', block)
    for line in joined.split('\n'):
      line = line.strip()
      if line and not line.startswith('#'):
        out.extend(part.strip() for part in line.split('&&'))
  prose = re.sub(r'```.*?```', '', text, flags=re.S)
  for span in re.findall(r'`([^`]+)`', prose):
    span = ' '.join(span.split())  # a span may wrap across lines
    if re.match(r'(\.venv/bin/)?python3? -m |bash ', span):
      out.extend(part.strip() for part in span.split('&&'))
  return out


def _all_commands():
  found = []
  for doc in DOCS:
    with open(os.path.join(ROOT, doc)) as f:
      for cmd in _commands(f.read()):
        found.append((doc, cmd))
  return found


COMMANDS = _all_commands()


def _module_source(module: str) -> str:
  spec = importlib.util.find_spec(module)
  assert spec is not None, f'module {module} does not exist'
  path = spec.origin
  if path.endswith('__init__.py') and os.path.isfile(os.path.join(os.path.dirname(path), '__main__.py')):
    path = os.path.join(os.path.dirname(path), '__main__.py')
  sources = [path]
  # A package's __main__ or a thin CLI may take its flags from the module it runs.
  with open(path) as f:
    text = f.read()
  for package, name in re.findall(r'from ((?:ivt_jax|input_pipeline)[\w.]*) import (\w+)', text):
    spec = importlib.util.find_spec(f'{package}.{name}') if name != 'main' else None
    sources.append((spec or importlib.util.find_spec(package)).origin)
  return '\n'.join(open(p).read() for p in sources)


def _defines(source: str, name: str) -> bool:
  return bool(re.search(r"DEFINE_\w+\(\s*'" + re.escape(name) + "'", source)
              or re.search(r"'--" + re.escape(name) + "'", source))


def _config_keys(path: str, keys: list[str]) -> list[str]:
  spec = importlib.util.spec_from_file_location('doc_config', os.path.join(ROOT, path))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  missing = []
  for key in keys:
    node = config
    for part in key.split('.'):
      if part not in node:
        missing.append(key)
        break
      node = node[part]
  return missing


def test_the_docs_hold_commands():
  docs_with_commands = {doc for doc, _ in COMMANDS}
  assert 'README.md' in docs_with_commands
  assert sum(1 for _, c in COMMANDS if ' -m ivt_jax.' in c) >= 5


def test_checker_catches_a_rotten_command():
  assert not _defines(_module_source('ivt_jax.main'), 'no_such_flag')
  assert _defines(_module_source('ivt_jax.main'), 'workdir')
  assert _config_keys('configs/demo.py', ['data.no_such_key', 'data.image_size']) == ['data.no_such_key']


@pytest.mark.parametrize('doc,cmd', COMMANDS, ids=[f'{d}:{c[:60]}' for d, c in COMMANDS])
def test_command_matches_the_code(doc, cmd):
  words = shlex.split(cmd)
  if words[0] == 'bash':
    if '-c' in words:
      return  # an inline script
    script = next((w for w in words[1:] if not w.startswith('-')), None)
    if script is None:
      return  # prose about bash's options, not a command
    assert os.path.isfile(os.path.join(ROOT, script)), f'{doc}: {cmd!r} runs a script that does not exist'
    return
  if '-m' not in words or not words[0].split('/')[-1].startswith('python'):
    return  # pip, tensorboard, ...: not ours
  module = words[words.index('-m') + 1]
  args = words[words.index('-m') + 2:]
  if not module.startswith(PROJECT_PACKAGES):
    assert importlib.util.find_spec(module) is not None, f'{doc}: {cmd!r}: no module {module}'
    return
  source = _module_source(module)
  config_file, config_keys = None, []
  for arg in args:
    if not arg.startswith('--'):
      continue
    name, _, value = arg[2:].partition('=')
    if '...' in value:
      value = ''  # a placeholder in prose
    if name == 'config':
      if not value:
        continue
      config_file = value.split(':')[0]
      assert os.path.isfile(os.path.join(ROOT, config_file)), f'{doc}: {cmd!r}: no config file {config_file}'
    elif name.startswith('config.'):
      config_keys.append(name[len('config.'):])
    elif name not in ABSL_FLAGS and not _defines(source, name):
      bare = name[2:] if name.startswith('no') else name
      assert _defines(source, bare), f'{doc}: {cmd!r}: {module} defines no flag --{name}'
  if config_keys:
    assert config_file, f'{doc}: {cmd!r} sets config keys without --config'
    missing = _config_keys(config_file, config_keys)
    assert not missing, f'{doc}: {cmd!r}: {config_file} has no key(s) {missing}'


def _programs() -> list[tuple[str, ...]]:
  """Every program the docs, the notebook and the launch scripts name, as argv after the interpreter: ('-m',
  module[, subcommand]) for the project's modules, (script[, subcommand]) for `python launch/*.py`."""
  paths = [os.path.join(ROOT, d) for d in DOCS] + glob.glob(os.path.join(ROOT, 'launch', '*.sh')) + glob.glob(
      os.path.join(ROOT, 'launch', '*.ipynb'))
  texts = [re.sub(r'\\\n\s*', ' ', open(p).read().replace('\\n', '\n')) for p in paths]
  found = set()
  for text in texts:
    for module, sub in re.findall(r'python3? -m ((?:ivt_jax|input_pipeline)[\w.]*)(?: ([a-z][\w-]*))?', text):
      if module.split('.')[-1].isupper():
        continue  # a placeholder: ivt_jax.tools.NAME
      found.add(('-m', module))
      if module == 'ivt_jax.search' and sub:
        found.add(('-m', module, sub))
    for script, sub in re.findall(r'python3? (launch/\w+\.py)(?: ([a-z][\w-]*))?', text):
      found.add((script,))
      if sub:
        found.add((script, sub))
  return sorted(found)


PROGRAMS = _programs()


def test_the_programs_are_found():
  modules = {p[1] for p in PROGRAMS if p[0] == '-m'}
  assert {'ivt_jax.main', 'ivt_jax.search', 'ivt_jax.serve', 'ivt_jax.benchmark', 'ivt_jax.evaluate'} <= modules
  assert any(m.startswith('ivt_jax.tools.') for m in modules)
  assert ('-m', 'ivt_jax.search', 'index') in PROGRAMS and ('launch/gpu.py', 'run') in PROGRAMS


def test_every_named_program_answers_help():
  """`--help` of each: status 0, its flags listed on stdout, no traceback."""
  import concurrent.futures
  import subprocess
  import sys

  def run(argv):
    p = subprocess.run([sys.executable, *argv, '--help'], cwd=ROOT, capture_output=True, text=True, timeout=300)
    return argv, p

  failures = []
  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    for argv, p in pool.map(run, PROGRAMS):
      listed = re.search(r'^\s+--?\w', p.stdout, re.M)  # at least one flag listed (absl's or argparse's help)
      if p.returncode != 0 or not listed or 'Traceback' in p.stderr:
        failures.append(f'{" ".join(argv)} --help: status {p.returncode}\n{p.stdout[-500:]}\n{p.stderr[-1500:]}')
  assert not failures, '\n\n'.join(failures)
