"""The compile check the launch scripts run here before they start or use paid machines: the recipe compiled for
the target by `python -m ivt_jax.aot` (no accelerator needed), refused when it does not fit, with the largest
batch that does."""
import json
import pathlib
import subprocess
import sys
import tempfile
from typing import Callable

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent


def python() -> str:
  venv = REPO_ROOT / '.venv' / 'bin' / 'python'
  return str(venv) if venv.is_file() else sys.executable


def command(config: str, target: str, overrides: list[str], *extra: str) -> list[str]:
  return [python(), '-m', 'ivt_jax.aot', f'--config={config}', f'--target={target}', *overrides, *extra]


def comment(config: str, target: str, overrides: list[str]) -> str:
  """The check as a shell comment line, for --dry-run output."""
  import shlex  # pylint: disable=g-import-not-at-top
  return '# compile check first (--skip-compile-check skips it): ' + shlex.join(
      ['python', *command(config, target, overrides)[1:]])


def check(config: str, target: str, overrides: list[str], error: Callable[[str], Exception]) -> None:
  """Compiles the recipe for `target`; raises error(message) when it does not fit (naming the largest batch that
  does) or the check cannot run. Progress goes to stderr."""
  print(f'compile check: {config} on {target}, compiled here for the target (minutes for ViT-B on a laptop; '
        '--skip-compile-check skips it)...', file=sys.stderr, flush=True)
  run = subprocess.run(command(config, target, overrides), cwd=REPO_ROOT, capture_output=True, text=True,
                       check=False)
  if run.returncode == 0:
    fits = [line for line in run.stdout.splitlines() if line.startswith('fits')]
    print(f'compile check: it fits ({fits[0] if fits else "ok"})', file=sys.stderr, flush=True)
    return
  if run.returncode != 1 or 'does not fit' not in run.stdout.lower():
    raise error(f'the compile check could not run (python -m ivt_jax.aot, exit {run.returncode}): '
                f'{(run.stderr.strip() or run.stdout.strip())[-1500:]}')
  print('compile check: it does not fit; searching for the largest batch that does...', file=sys.stderr,
        flush=True)
  with tempfile.TemporaryDirectory() as tmp:
    out = pathlib.Path(tmp) / 'fit.json'
    subprocess.run(command(config, target, overrides, '--fit', '--fit_remat=config', f'--output={out}'),
                   cwd=REPO_ROOT, capture_output=True, text=True, check=False)
    try:
      largest = json.loads(out.read_text())[0]['largest_batch']
    except (OSError, ValueError, LookupError):
      largest = None
  said = (f'the largest batch that fits is {largest} samples' if largest else 'no batch fits')
  raise error(f'{config} does not fit a {target} at its batch: {said} (data.ids_per_batch x '
              f'data.images_per_id; --config.model.remat=True saves memory). Change the recipe, or pass '
              '--skip-compile-check to start the machines anyway.')
