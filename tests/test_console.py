"""ivt_jax.console: library INFO hidden (warnings and the project's own lines kept), the progress line, tables."""
import io
import logging
import os

from ivt_jax import console
from ivt_jax import train


def _record(path, level):
  return logging.LogRecord('absl', level, path, 1, 'message', None, None)


def test_filter_keeps_project_lines_and_every_warning():
  f = console.ProjectOrWarnings()
  ours = os.path.join(console.PROJECT_DIRS[0], 'train.py')
  lib = '/usr/lib/python3/site-packages/orbax/checkpoint/checkpoint_manager.py'
  assert f.filter(_record(ours, logging.INFO))
  assert not f.filter(_record(lib, logging.INFO))
  assert f.filter(_record(lib, logging.WARNING)) and f.filter(_record(lib, logging.ERROR))


def test_quiet_unless_asked(monkeypatch):
  from absl import logging as absl_logging
  handler = absl_logging.get_absl_handler()
  monkeypatch.setenv('IVT_VERBOSE', '1')
  assert console.quiet_libraries(0) is False
  monkeypatch.delenv('IVT_VERBOSE')
  assert console.quiet_libraries(1) is False
  try:
    assert console.quiet_libraries(0) is True
    assert any(isinstance(x, console.ProjectOrWarnings) for x in handler.filters)
  finally:
    for x in list(handler.filters):
      if isinstance(x, console.ProjectOrWarnings):
        handler.removeFilter(x)


class _Tty(io.StringIO):
  def isatty(self):
    return True


def test_progress_line_in_a_log_and_on_a_terminal():
  log = io.StringIO()
  p = console.Progress(100, stream=log, every_s=3600)
  p.update(10, loss=25.5, lr=5e-4)
  p.update(20, loss=20.0, lr=4e-4)  # within every_s: not written
  p.update(100, loss=12.3, lr=1e-5)  # the end: written
  lines = log.getvalue().splitlines()
  assert len(lines) == 2
  assert lines[0].startswith('train step 10/100') and 'loss 25.5' in lines[0] and 'lr 0.0005' in lines[0]
  assert lines[1].startswith('train step 100/100') and 'ETA 0s' in lines[1]
  tty = _Tty()
  p = console.Progress(100, stream=tty)
  p.update(5, loss=1.0)
  p.update(6, loss=0.9)
  p.clear()
  assert tty.getvalue().count('\r') == 2 and tty.getvalue().endswith('\n')
  assert console.Progress(10, stream=log, enabled=False).update(1) is None


def test_results_table_and_outputs():
  result = {'test': {'r1': 51.08, 'r5': 77.33, 'r10': 86.25, 'mAP': 51.88, 'mINP': 40.37},
            'best_val': {'r1': 64.25, 'r5': 91.0, 'r10': 95.75, 'mAP': 65.83, 'mINP': 55.4},
            'best_step': 1200, 'steps': 1200, 'seconds': 441.0}
  text = train._summary(result, '/tmp/run')  # pylint: disable=protected-access
  lines = text.strip().splitlines()
  assert lines[0] == 'text-to-image retrieval, 1200 steps, 7.3 min'
  assert lines[1].split() == ['split', 'R@1', 'R@5', 'R@10', 'mAP', 'mINP']
  assert lines[2].split() == ['val', '(best,', 'step', '1200)', '64.25', '91.00', '95.75', '65.83', '55.40']
  assert lines[3].split() == ['test', '51.08', '77.33', '86.25', '51.88', '40.37']
  assert '/tmp/run/metrics.json' in text and '/tmp/run/best' in text and 'tensorboard --logdir /tmp/run' in text
  assert len({len(l) for l in lines[1:4]}) == 1  # aligned
