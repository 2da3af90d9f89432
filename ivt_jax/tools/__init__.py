"""Command-line tools and what they share."""
import sys
from typing import Callable, Optional, Sequence


def run_cli(main: Callable[[Optional[Sequence[str]]], int], argv: Optional[Sequence[str]] = None) -> int:
  """`main(argv)` with bad input (FileNotFoundError, ValueError) reported as one line on stderr, status 2."""
  try:
    return main(argv)
  except (FileNotFoundError, ValueError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
