"""The chaos check: kill the training program with SIGKILL in every phase, restart it, and get the same results.

  python -m ivt_jax.tools.chaos --workdir=DIR [--kills=21] [--phases=draw,prepare,...] [--seed=0]
      [--config=configs/demo.py] [--size=tiny|demo] [--set=key=value ...]

First a reference run, never interrupted: `python -m ivt_jax.main --config=CONFIG --workdir=DIR/reference` with
the size's overrides. Then episodes, each in a fresh workdir (DIR/episode_N) with the very same command: the
tool starts it, watches it, and kills its whole process group with SIGKILL (as a preempted machine: no handler
runs) at a random moment inside a chosen phase, then starts it again, one phase after the other:

  draw        SynthPEDES being drawn (its folder there, its completion marker not yet)
  prepare     the dataset being prepared (TFDS build, tokenizer; its marker not yet written)
  compile     after preparation, before the first training step (state init or restore, compilation)
  train       the training loop
  checkpoint  an asynchronous training checkpoint being written (an unfinished Orbax step directory)
  eval        the validation evaluation
  best        the best parameters being saved

(--phases picks some of them, in this order.) A phase the run does not reach ends the episode there. After the last kill the run goes to the end, and its results must be
bit-identical to the reference's: the test metrics, the best validation metrics and step (metrics.json), and the
checksums of the best parameters and of the final training state (every array, bit for bit: ivt_jax/training/integrity.py).
Episodes follow until --kills kills were made. The tool prints a table (kills per phase, restarts, results equal)
and writes DIR/chaos.json; it exits 1 if any episode's results differ or a run fails.

--size=tiny (the default) is a small SynthPEDES and model: an attempt takes about 30 s on 2 CPU cores, 21 kills
about 15 minutes. --size=demo is configs/demo.py as it is.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import random
import signal
import subprocess
import sys
import time
from typing import Optional, Sequence

PHASES = ('draw', 'prepare', 'compile', 'train', 'checkpoint', 'eval', 'best')
TINY = {
    'data.synthetic.num_ids': 40, 'data.synthetic.images_per_id': 2, 'data.synthetic.image_size': '(48,24)',
    'data.synthetic.val_ids': 6, 'data.synthetic.test_ids': 8, 'data.image_size': '(32,16)',
    'data.text_length': 32, 'data.phrase_text_length': 16, 'data.word_text_length': 16,
    'data.sentencepiece_vocab_size': 200, 'data.ids_per_batch': 4,
    'model.width': 32, 'model.depth': 1, 'model.num_heads': 2, 'model.mlp_dim': 64, 'model.patch_size': 8,
    'model.stride': 8, 'num_epochs': 4, 'eval_every_epochs': 1, 'checkpoint_every_steps': 2,
    'log_every_steps': 2, 'eval_batch_size': 16,
}
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def command(config: str, workdir: str, overrides: Sequence[str]) -> list[str]:
  return [sys.executable, '-m', 'ivt_jax.main', f'--config={config}', f'--workdir={workdir}',
          *(f'--config.{o}' for o in overrides)]


def _unfinished_step(directory: str) -> bool:
  return bool(glob.glob(os.path.join(directory, '*.orbax-checkpoint-tmp*')))


def phase(workdir: str, log: str) -> Optional[str]:
  """The phase a run in `workdir` is in, from its files and its log (this attempt's); None before drawing or
  after the end of training."""
  if _unfinished_step(os.path.join(workdir, 'best')):
    return 'best'
  if _unfinished_step(os.path.join(workdir, 'checkpoints')):
    return 'checkpoint'
  synth = os.path.join(workdir, 'synthpedes')
  if os.path.isdir(synth):
    try:  # written first with complete=false, replaced atomically with complete=true at the end
      with open(os.path.join(synth, 'synthpedes.json')) as f:
        complete = bool(json.load(f).get('complete'))
    except (OSError, ValueError):
      complete = False
    if not complete:
      return 'draw'
    if not glob.glob(os.path.join(workdir, 'tfds', '*', 'prepared.json')):
      return 'prepare'
  if 'evaluating on test' in log:
    return None
  if log.rfind('evaluating on val') > log.rfind(' val: '):  # started, its result not yet logged
    return 'eval'
  if 'training from step' in log:
    return 'train'
  if 'steps per epoch' in log:
    return 'compile'
  return None


def _kill_group(proc: subprocess.Popen) -> None:
  try:
    os.killpg(proc.pid, signal.SIGKILL)
  except ProcessLookupError:
    pass
  proc.wait()


def attempt(cmd: Sequence[str], workdir: str, log_path: str, target: Optional[str], rng: random.Random,
            timeout_s: float) -> tuple[str, Optional[str]]:
  """Runs the command once; kills it in phase `target` (None: never) -> ('killed', phase) | ('finished', None)
  | ('failed', reason)."""
  with open(log_path, 'w') as log_file:
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True,
                            env=dict(os.environ, IVT_VERBOSE='1'))  # the phases' log lines
  start, kill_at = time.time(), None
  while True:
    rc = proc.poll()
    if rc is not None:
      if rc == 0:
        return 'finished', None
      with open(log_path) as f:
        tail = f.read()[-2000:]
      return 'failed', f'exit status {rc}; the log ends with:\n{tail}'
    if time.time() - start > timeout_s:
      _kill_group(proc)
      return 'failed', f'no end after {timeout_s:.0f} s'
    if target is not None:
      with open(log_path, errors='replace') as f:
        now = phase(workdir, f.read())
      if now == target and kill_at is None:
        # At a random point: up to 1.5 s into the long phases, at once in the short ones (a checkpoint write,
        # the best save), early in those that last a few seconds on a small config.
        span = {'compile': 1.5, 'train': 1.5, 'prepare': 0.5, 'draw': 0.2, 'eval': 0.2}.get(target, 0.0)
        kill_at = time.time() + rng.uniform(0.0, span)
      if kill_at is not None and time.time() >= kill_at:
        with open(log_path, errors='replace') as f:
          at = phase(workdir, f.read())
        _kill_group(proc)
        return 'killed', at or target
    time.sleep(0.01)


def results(workdir: str) -> dict:
  """What must be bit-identical: metrics.json's figures and the checksums of the best params and final state."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  with open(os.path.join(workdir, 'metrics.json')) as f:
    m = json.load(f)
  out = {k: m[k] for k in ('test', 'best_val', 'best_step', 'steps')}
  for name, items in (('best', ('params', 'meta')), ('checkpoints', ('state', 'data_iter', 'meta'))):
    directory = os.path.join(workdir, name)
    if not os.path.isdir(directory):
      continue
    manager = ocp.CheckpointManager(directory, item_names=items)
    step = manager.latest_step()
    meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
    out[f'{name}_step'] = step
    out[f'{name}_digest'] = meta.get('digest')
  return out


def run(args: argparse.Namespace) -> dict:
  workdir = os.path.abspath(os.path.expanduser(args.workdir))
  os.makedirs(workdir, exist_ok=True)
  overrides = [f'{k}={v}' for k, v in (TINY.items() if args.size == 'tiny' else ())]
  overrides += [f'seed={args.seed}', *args.set]
  rng = random.Random(args.seed)
  reference_dir = os.path.join(workdir, 'reference')
  if not os.path.exists(os.path.join(reference_dir, 'metrics.json')):
    print(f'reference run (uninterrupted) in {reference_dir}', flush=True)
    status, reason = attempt(command(args.config, reference_dir, overrides), reference_dir,
                             os.path.join(workdir, 'reference.log'), None, rng, args.timeout)
    if status != 'finished':
      raise RuntimeError(f'the reference run failed: {reason}')
  reference = results(reference_dir)
  kills, episodes = [], []
  n = 0
  while len(kills) < args.kills and n < args.max_episodes:
    ep_dir = os.path.join(workdir, f'episode_{n}')
    if os.path.exists(ep_dir):
      import shutil  # pylint: disable=g-import-not-at-top
      shutil.rmtree(ep_dir)
    cmd = command(args.config, ep_dir, overrides)
    ep = {'episode': n, 'kills': [], 'missed': [], 'attempts': 0}
    status = 'killed'
    for target in args.phases:
      if len(kills) >= args.kills:
        break
      ep['attempts'] += 1
      status, info = attempt(cmd, ep_dir, os.path.join(workdir, f'episode_{n}.{ep["attempts"]}.log'), target,
                             rng, args.timeout)
      if status == 'failed':
        ep['error'] = info
        break
      if status == 'finished':  # the run ended before reaching the phase
        ep['missed'].append(target)
        break
      ep['kills'].append(info)
      kills.append(info)
      print(f'episode {n}: killed in phase {info} (kill {len(kills)}/{args.kills})', flush=True)
    if status == 'killed':  # then the same command, uninterrupted, to the end
      ep['attempts'] += 1
      status, info = attempt(cmd, ep_dir, os.path.join(workdir, f'episode_{n}.{ep["attempts"]}.log'), None,
                             rng, args.timeout)
      if status != 'finished':
        ep['error'] = info
    if 'error' not in ep:
      got = results(ep_dir)
      ep['identical'] = got == reference
      if not ep['identical']:
        ep['differences'] = sorted(k for k in set(got) | set(reference) if got.get(k) != reference.get(k))
    if not ep['kills'] and 'error' not in ep:
      ep['error'] = (f'phase {ep["missed"][0]!r} was never seen before the run ended: nothing to kill in it '
                     '(see --phases)')
    episodes.append(ep)
    print(f'episode {n}: {len(ep["kills"])} kills, {ep["attempts"]} starts, '
          + ('results bit-identical to the reference' if ep.get('identical') else
             f'DIFFERENT: {ep.get("differences")}' if 'differences' in ep else f'FAILED: {ep.get("error")}'),
          flush=True)
    n += 1
    if 'error' in ep:
      break
  summary = {'kills': len(kills), 'by_phase': {p: kills.count(p) for p in PHASES}, 'episodes': episodes,
             'all_identical': bool(episodes) and all(e.get('identical') for e in episodes),
             'reference_test': reference['test'], 'size': args.size, 'seed': args.seed}
  with open(os.path.join(workdir, 'chaos.json'), 'w') as f:
    json.dump(summary, f, indent=2)
  return summary


def table(summary: dict) -> str:
  lines = ['| phase | kills |', '|---|---:|']
  lines += [f'| {p} | {summary["by_phase"][p]} |' for p in PHASES]
  starts = sum(e['attempts'] for e in summary['episodes'])
  lines.append(f'| all | {summary["kills"]} ({len(summary["episodes"])} episodes, {starts} starts) |')
  verdict = ('every episode finished with test metrics, best parameters and final state bit-identical to the '
             'uninterrupted run' if summary['all_identical'] else 'RESULTS DIFFER (see chaos.json)')
  return '\n'.join(lines) + f'\n\n{verdict}; reference test R@1 {summary["reference_test"]["r1"]:.2f}'


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog='python -m ivt_jax.tools.chaos', description=__doc__.split('\n')[0])
  p.add_argument('--workdir', required=True)
  p.add_argument('--kills', type=int, default=21, help='SIGKILLs in all (one per phase per episode)')
  p.add_argument('--phases', default=','.join(PHASES), help='the phases to kill in, comma-separated')
  p.add_argument('--seed', type=int, default=0, help='the runs\' seed and the kill moments\'')
  p.add_argument('--config', default='configs/demo.py')
  p.add_argument('--size', choices=('tiny', 'demo'), default='tiny')
  p.add_argument('--set', action='append', default=[], help='another config override, key=value')
  p.add_argument('--timeout', type=float, default=1800.0, help='seconds one start may take')
  p.add_argument('--max_episodes', type=int, default=20)
  args = p.parse_args(argv)
  if args.kills < 1:
    p.error(f'--kills must be >= 1, got {args.kills}')
  phases = [x.strip() for x in args.phases.split(',') if x.strip()]
  unknown = sorted(set(phases) - set(PHASES))
  if unknown or not phases:
    p.error(f'--phases: unknown {unknown}; the phases are {",".join(PHASES)}')
  args.phases = [x for x in PHASES if x in phases]
  return args


def main(argv: Optional[Sequence[str]] = None) -> int:
  summary = run(parse_args(argv))
  print(table(summary))
  return 0 if summary['all_identical'] else 1


if __name__ == '__main__':
  sys.exit(main())
