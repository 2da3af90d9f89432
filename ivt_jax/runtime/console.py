"""What a run shows a person: the project's own messages as plain lines and every warning and error, with the
libraries' INFO lines (checkpointing, dataset building, metric writers) and TensorFlow's start-up notices hidden
unless asked for; one progress line for training; results as small tables.

`quiet_libraries(verbosity)`: with verbosity <= 0 (the default) INFO records of code outside this project are
dropped and the rest are written without absl's prefix; `--verbosity=1` (absl's flag) or IVT_VERBOSE=1 shows
everything, as the libraries log it, and the project's DEBUG lines too. TensorFlow's oneDNN custom operations are
off either way (TF_ENABLE_ONEDNN_OPTS=0; TensorFlow only reads and writes data here), so output does not depend on
the verbosity.
"""
from __future__ import annotations

import logging
import os
import sys
import time
from typing import Mapping, Optional, Sequence, TextIO

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # ivt_jax/runtime/ -> repo
PROJECT_DIRS = tuple(os.path.join(_ROOT, d) + os.sep for d in ('ivt_jax', 'input_pipeline', 'configs'))


class ProjectOrWarnings(logging.Filter):
  """Passes warnings and errors from anywhere, and every record logged by this project's own modules."""

  def filter(self, record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING or record.pathname.startswith(PROJECT_DIRS)


_FILTER = ProjectOrWarnings()


def verbose_requested(verbosity: int = 0) -> bool:
  return verbosity >= 1 or os.environ.get('IVT_VERBOSE', '') not in ('', '0')


class Plain(logging.Formatter):
  """A record as a person reads it: the message, with 'warning: ' or 'error: ' before it when it is one."""

  def format(self, record: logging.LogRecord) -> str:
    message = record.getMessage()
    if record.exc_info:
      message = f'{message}\n{self.formatException(record.exc_info)}'
    if record.levelno >= logging.ERROR:
      return f'error: {message}'
    return f'warning: {message}' if record.levelno >= logging.WARNING else message


def quiet_libraries(verbosity: int = 0) -> bool:
  """Hides the libraries' INFO lines (see the module docstring); -> True when they are hidden.

  Call before TensorFlow is imported (its C++ notices read the environment once). Sets IVT_VERBOSE=1 when
  verbose, so that input_pipeline (which does not import this package) and child processes see it too.
  """
  os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')  # its notice, printed at every TensorFlow import
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
  if verbose_requested(verbosity):
    os.environ['IVT_VERBOSE'] = '1'
    if absl_logging.get_verbosity() < absl_logging.DEBUG:  # IVT_VERBOSE=1 as --verbosity=1
      absl_logging.set_verbosity(absl_logging.DEBUG)
    return False
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')  # TensorFlow's C++ start-up lines
  handlers = list(logging.getLogger().handlers)
  absl_handler = absl_logging.get_absl_handler()
  if absl_handler not in handlers:
    handlers.append(absl_handler)
  for h in handlers:
    if _FILTER not in h.filters:
      h.addFilter(_FILTER)
  absl_handler.setFormatter(Plain())
  return True


def _duration(seconds: float) -> str:
  seconds = max(0, int(round(seconds)))
  h, rest = divmod(seconds, 3600)
  m, s = divmod(rest, 60)
  return f'{h}h{m:02d}m' if h else (f'{m}m{s:02d}s' if m else f'{s}s')


class Progress:
  """The training progress line: step, steps/s, ETA, loss, lr.

  On a terminal one line is rewritten in place; elsewhere (a log file) a line is written every `every_s`
  seconds and at the end. Only process 0 writes (pass enabled=False elsewhere).
  """

  def __init__(self, total: int, start: int = 0, stream: Optional[TextIO] = None, every_s: float = 30.0,
               enabled: bool = True, label: str = 'train'):
    self.total, self.label, self.enabled = int(total), label, enabled
    self.stream = stream or sys.stderr
    self.tty = bool(getattr(self.stream, 'isatty', lambda: False)())
    self.every_s = every_s
    self._t0, self._s0 = time.time(), int(start)
    self._last_write = 0.0
    self._open = False
    self.last_line = ''

  def line(self, step: int, loss: Optional[float] = None, lr: Optional[float] = None) -> str:
    elapsed = time.time() - self._t0
    done = step - self._s0
    rate = done / elapsed if elapsed > 0 and done > 0 else 0.0
    eta = (self.total - step) / rate if rate > 0 else float('nan')
    parts = [f'{self.label} step {step}/{self.total}', f'{rate:.2f} steps/s' if rate else '- steps/s',
             f'ETA {_duration(eta)}' if eta == eta else 'ETA -']
    if loss is not None:
      parts.append(f'loss {loss:.4g}')
    if lr is not None:
      parts.append(f'lr {lr:.3g}')
    return '  '.join(parts)

  def update(self, step: int, loss: Optional[float] = None, lr: Optional[float] = None) -> None:
    if not self.enabled:
      return
    self.last_line = self.line(step, loss, lr)
    now = time.time()
    if self.tty:
      self.stream.write('\r\033[K' + self.last_line)
      self._open = True
      self.stream.flush()
    elif now - self._last_write >= self.every_s or step >= self.total:
      self.stream.write(self.last_line + '\n')
      self.stream.flush()
      self._last_write = now

  def clear(self) -> None:
    """Ends the in-place line (before other output on a terminal)."""
    if self._open:
      self.stream.write('\n')
      self.stream.flush()
      self._open = False


def table(rows: Sequence[Mapping[str, object]], columns: Sequence[str], *, digits: int = 2) -> str:
  """A small aligned text table: one row per mapping, floats with `digits` decimals, '-' where absent."""
  def cell(v):
    if v is None:
      return '-'
    return f'{v:.{digits}f}' if isinstance(v, float) else str(v)
  cells = [[cell(r.get(c)) for c in columns] for r in rows]
  widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
  lines = ['  '.join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(columns, widths)))]
  for row in cells:
    lines.append('  '.join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(row, widths))))
  return '\n'.join(lines)
