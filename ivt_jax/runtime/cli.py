"""What the command-line programs share: bad input reported as one line, not a traceback."""
import sys
from typing import Callable, Optional, Sequence


def run_cli(main: Callable[[Optional[Sequence[str]]], int], argv: Optional[Sequence[str]] = None) -> int:
  """`main(argv)` with bad input (FileNotFoundError, ValueError) reported as one line on stderr, status 2."""
  try:
    return main(argv)
  except (FileNotFoundError, ValueError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2


HELP_FLAGS = ('--help', '-?', '--helpshort', '--helpfull', '--helpxml')


def run_absl(main: Callable[[Sequence[str]], Optional[int]]) -> None:
  """absl's app.run(main), with its help flags exiting 0 (absl exits 1 after printing help)."""
  from absl import app  # pylint: disable=g-import-not-at-top
  try:
    app.run(main)
  except SystemExit as e:
    if e.code == 1 and any(a.split('=')[0] in HELP_FLAGS for a in sys.argv[1:]):
      sys.exit(0)
    raise
