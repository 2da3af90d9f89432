"""Command-line helpers shared by every program (the input pipeline's and the training side's): absl flag parsing
that turns a bad flag, a config file that does not load or a bad config override into one line and exit status
2, and the verbosity asked for on the command line."""
import os
import re
import sys
from typing import Callable, Optional, Sequence

HELP_FLAGS = ('--help', '-?', '--helpshort', '--helpfull', '--helpxml')


def verbose_argv(argv: Sequence[str] = ()) -> bool:
  """--verbosity=N (N >= 1), -v N or IVT_VERBOSE=1: the full story, tracebacks included."""
  if os.environ.get('IVT_VERBOSE', '') not in ('', '0'):
    return True
  args = list(argv or sys.argv[1:])
  for i, a in enumerate(args):
    m = re.fullmatch(r'--(?:verbosity|v)=(-?[0-9]+)', a)
    if m and int(m.group(1)) >= 1:
      return True
    if a in ('--verbosity', '-v') and i + 1 < len(args) and args[i + 1].lstrip('-').isdigit() and \
        int(args[i + 1]) >= 1:
      return True
  return False


def parse_flags(argv: Sequence[str]) -> Sequence[str]:
  """absl's flag parsing with a bad flag, a missing config file or a bad config override as one line, status 2."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  try:
    rest = flags.FLAGS(argv)
    if 'config' in flags.FLAGS and flags.FLAGS['config'].present:
      getattr(flags.FLAGS.config, 'to_dict')  # a config file that failed to load raises on first use
    return rest
  except flags.Error as e:
    print(f'error: {e}\n(--helpfull lists the flags)', file=sys.stderr)
  except Exception as e:  # pylint: disable=broad-except  (config_flags: a config file that cannot load, a bad key)
    if verbose_argv(argv[1:]):
      raise
    config = [a for a in argv[1:] if a.startswith('--config')]
    text = ' '.join(str(e).split())
    print(f'error: {" ".join(config) or "--config"}: {type(e).__name__}: {text[:600]}\n'
          '(configs/base.py lists every config key)', file=sys.stderr)
  sys.exit(2)


def run_app(main: Callable[[Sequence[str]], Optional[int]], argv: Optional[Sequence[str]] = None) -> None:
  """absl's app.run(main) with `parse_flags`, and its help flags exiting 0 (absl exits 1 after printing help)."""
  from absl import app  # pylint: disable=g-import-not-at-top
  try:
    app.run(main, argv=argv, flags_parser=parse_flags)
  except SystemExit as e:
    if e.code == 1 and any(a.split('=')[0] in HELP_FLAGS for a in (argv or sys.argv)[1:]):
      sys.exit(0)
    raise
