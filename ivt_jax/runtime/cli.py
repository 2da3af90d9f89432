"""What the command-line programs share: a user's error (a bad flag or config key, a missing file or folder, a bad
record) reported as its message alone with exit status 2; a traceback only for our own bugs, or when asked for
(--verbosity=1 or IVT_VERBOSE=1)."""
import linecache
import os
import sys
from typing import Callable, Optional, Sequence

from input_pipeline import cli as input_cli

verbose_argv = input_cli.verbose_argv

# Raised on purpose by the project about its input (the raise site is a project file, see `is_user_error`).
USER_ERRORS = (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError, ValueError)
_PROJECT = tuple(os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), d)
                 + os.sep for d in ('ivt_jax', 'input_pipeline', 'configs'))


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


def run_absl(main: Callable[[Sequence[str]], Optional[int]]) -> None:
  """`input_pipeline.cli.run_app(main)` (flags parsed with bad ones as one line; help exits 0), and a user's
  error raised by `main` printed as one line, exit 2 (`is_user_error`)."""
  try:
    input_cli.run_app(main)
  except USER_ERRORS as e:
    if verbose_argv() or not is_user_error(e):
      raise
    _say(e)
    sys.exit(2)
