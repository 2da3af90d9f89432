"""What the command-line programs share: a user's error (a bad flag or config key, a missing file or folder, a bad
record) reported as its message alone with exit status 2; a traceback only for our own bugs, or when asked for
(--verbosity=1 or IVT_VERBOSE=1)."""
import linecache
import os
import re
import sys
from typing import Callable, Optional, Sequence

# Raised on purpose by the project about its input (the raise site is a project file, see `is_user_error`).
USER_ERRORS = (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError, ValueError)
_PROJECT = tuple(os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), d)
                 + os.sep for d in ('ivt_jax', 'input_pipeline', 'configs'))
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


def is_user_error(e: BaseException) -> bool:
  """An error about the user's input: an OSError of USER_ERRORS from a project line (a file or folder it was told
  to read), or a ValueError the project raises on purpose (a `raise` statement in its own code). A ValueError
  from a library, or from a library call in our code, is a bug and keeps its traceback."""
  if not isinstance(e, USER_ERRORS):
    return False
  tb = e.__traceback__
  if tb is None:
    return True
  while tb.tb_next is not None:
    tb = tb.tb_next
  filename = tb.tb_frame.f_code.co_filename
  if not filename.startswith(_PROJECT):
    return False
  if isinstance(e, OSError):
    return True
  return linecache.getline(filename, tb.tb_lineno).strip().startswith('raise')


def _say(e: BaseException) -> None:
  message = str(e) if not isinstance(e, OSError) or not e.filename else \
      f'{e.strerror or e}: {e.filename}'
  print(f'error: {message}', file=sys.stderr)


def run_cli(main: Callable[[Optional[Sequence[str]]], int], argv: Optional[Sequence[str]] = None) -> int:
  """`main(argv)` with a user's error reported as one line on stderr, status 2 (argparse programs)."""
  try:
    return main(argv)
  except USER_ERRORS as e:
    if verbose_argv(argv or ()) or not is_user_error(e):
      raise
    _say(e)
    return 2


def _parse_flags(argv: Sequence[str]) -> Sequence[str]:
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


def run_absl(main: Callable[[Sequence[str]], Optional[int]]) -> None:
  """absl's app.run(main): its help flags exit 0 (absl exits 1 after printing help); a bad flag or config
  override, and a user's error raised by `main`, print one line and exit 2 (`is_user_error`)."""
  from absl import app  # pylint: disable=g-import-not-at-top
  try:
    app.run(main, flags_parser=_parse_flags)
  except SystemExit as e:
    if e.code == 1 and any(a.split('=')[0] in HELP_FLAGS for a in sys.argv[1:]):
      sys.exit(0)
    raise
  except USER_ERRORS as e:
    if verbose_argv() or not is_user_error(e):
      raise
    _say(e)
    sys.exit(2)
