r"""ivt-jax on GPUs: one node (one process, all its GPUs) or several nodes over ssh (jax.distributed).

  python launch/gpu.py install [--nodes h1,h2] [--repo-url URL] [--cuda 12|13]
  python launch/gpu.py run --workdir DIR [--nodes h1,h2] [--gpus-per-node 8] [--port 12345] \
      [--config configs/cuhk.py] [--env NAME=VALUE ...] [--config.key=value ...]
  python launch/gpu.py run --slurm --workdir DIR --num-nodes 2 --gpus-per-node 8 ...   # prints an sbatch script
  python launch/gpu.py logs [--nodes h1,h2] [--tail N]
  python launch/gpu.py stop [--nodes h1,h2]

Without --nodes everything runs on this machine, in this checkout. With --nodes (ssh-reachable hosts, the
first one is the coordinator) each node runs one process with all its GPUs, started over ssh with
--coordinator_address=<first node>:PORT --num_processes=<nodes> --process_id=<i>; one node needs no
coordinator. `run` first compiles the recipe for the GPUs here (python -m ivt_jax.aot --target=h100x16 for 2
nodes of 8; no GPU needed) and refuses one that does not fit their memory, naming the largest batch that does.
Every subcommand takes --dry-run: print the exact commands, one per line, valid shell, and run
nothing (`run` also prints the equivalent SLURM srun line, as a comment).
"""
import argparse
import pathlib
import re
import shlex
import subprocess
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import fit_check  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
DEFAULT_JAX_VERSION = '0.10.2'   # used when requirements.txt does not exist
REMOTE_REPO = '~/ivt-jax'
DEFAULT_LOGS = '~/ivt-logs'
PROG = 'gpu.py'


class LaunchError(Exception):
  """Bad input or a failed command: the message says which flag or file."""


def jax_version(requirements: str) -> str:
  """The jax pin of requirements.txt ('jax==X'); DEFAULT_JAX_VERSION when the file does not exist."""
  path = pathlib.Path(requirements)
  if not path.exists():
    return DEFAULT_JAX_VERSION
  for line in path.read_text(encoding='utf-8').splitlines():
    m = re.match(r'^\s*jax\s*==\s*([0-9][0-9A-Za-z.+-]*)\s*(#.*)?$', line)
    if m:
      return m.group(1)
  raise LaunchError(f'{path}: no "jax==<version>" line; pin jax there or pass --jax-version.')


def sh_path(path: str) -> str:
  """A path as one shell word: '~/x' -> "$HOME"/x (expanded by the shell that runs it), else quoted."""
  if path == '~':
    return '"$HOME"'
  if path.startswith('~/'):
    return '"$HOME"/' + shlex.quote(path[2:])
  if path.startswith('~'):
    raise LaunchError(f'path {path!r}: only ~/ (the home directory) is supported, not ~user.')
  return shlex.quote(path)


def scp_path(path: str) -> str:
  """A remote path for scp: home-relative for '~/x' (scp starts in the remote home)."""
  if path == '~':
    return '.'
  if path.startswith('~/'):
    return path[2:]
  if path.startswith('~'):
    raise LaunchError(f'path {path!r}: only ~/ (the home directory) is supported, not ~user.')
  return path


def check_overrides(extra: list[str]) -> list[str]:
  """Extra arguments must be absl config overrides: --config.key=value (passed through unchanged)."""
  for arg in extra:
    if not re.match(r'^--config\.[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*=', arg):
      raise LaunchError(f'unrecognized argument {arg!r}: only config overrides of the form '
                        '--config.key=value are passed through to the training program.')
  return extra


def check_env(items: list[str]) -> list[str]:
  for item in items:
    if not re.match(r'^[A-Za-z_][A-Za-z0-9_]*=', item):
      raise LaunchError(f'--env {item!r}: expected NAME=VALUE.')
  return items


def check_config_file(config: str) -> str:
  """A relative --config must exist in this checkout (the nodes run a clone of it)."""
  path = config.split(':', 1)[0]
  if not path.endswith('.py'):
    raise LaunchError(f'--config {config!r}: expected a config file such as configs/cuhk.py.')
  if not pathlib.PurePath(path).is_absolute() and not (REPO_ROOT / path).is_file():
    raise LaunchError(f'--config {config!r}: {REPO_ROOT / path} does not exist.')
  return config


def parse_nodes(nodes) -> list[str]:
  """'h1,user@h2' -> ['h1', 'user@h2']; [] when --nodes is not given (this machine)."""
  if nodes is None:
    return []
  hosts = [h.strip() for h in nodes.split(',')]
  if not any(hosts):
    raise LaunchError(f'--nodes {nodes!r}: no hosts (0 nodes); give host1[,host2,...] or leave --nodes out '
                      'to run on this machine.')
  for h in hosts:
    if not re.match(r'^([A-Za-z0-9._-]+@)?[A-Za-z0-9._-]+$', h):
      raise LaunchError(f'--nodes {nodes!r}: bad host name {h!r} (expected host or user@host, comma-separated).')
  if len(set(hosts)) != len(hosts):
    raise LaunchError(f'--nodes {nodes!r}: a host is listed twice; each node runs one process with all its GPUs.')
  return hosts


def check_positive(flag: str, value: int) -> int:
  if value is None or value < 1:
    raise LaunchError(f'{flag} {value}: must be >= 1.')
  return value


# ---- commands -------------------------------------------------------------------------------------

def on_node(args, host: str, script: str) -> list[str]:
  """Runs a shell script on a node (ssh) or, without --nodes, here."""
  if not host:
    return ['bash', '-c', script]
  opts = [w for o in args.ssh_option for w in ('-o', o)]
  return ['ssh', *opts, host, script]


def repo_dir(args, host: str) -> str:
  return args.repo_dir or (REMOTE_REPO if host else str(REPO_ROOT))


def install_script(args, host: str, jax_spec: str) -> str:
  """Shell: (clone or update the repository,) make .venv, pip install the pins and the CUDA jax."""
  repo = sh_path(repo_dir(args, host))
  py = shlex.quote(args.python)
  steps = ['set -e']
  if host:
    steps.append(f'if [ -d {repo}/.git ]; then git -C {repo} pull --ff-only; '
                 f'else git clone {shlex.quote(args.repo_url or default_repo_url())} {repo}; fi')
    if args.ref:
      steps.append(f'git -C {repo} checkout {shlex.quote(args.ref)}')
  steps += [
      f'cd {repo}',
      f"{py} -c 'import sys; assert sys.version_info >= (3, 11), \"Python >= 3.11 needed, got \" + sys.version'",
      f'{py} -m venv .venv',
      '.venv/bin/pip install -q --upgrade pip',
      '.venv/bin/pip install -r requirements.txt',
      'if [ -f requirements-nodeps.txt ]; then .venv/bin/pip install --no-deps -r requirements-nodeps.txt; fi',
      f'.venv/bin/pip install {shlex.quote(jax_spec)}',
      ".venv/bin/python -c 'import jax; print(jax.__version__, jax.devices())'",
  ]
  return '; '.join(steps)


def default_repo_url() -> str:
  try:
    out = subprocess.run(['git', '-C', str(REPO_ROOT), 'remote', 'get-url', 'origin'], capture_output=True,
                         text=True, check=False)
  except OSError:
    out = None
  if out is None or out.returncode or not out.stdout.strip():
    raise LaunchError('--repo-url is needed: this checkout has no "origin" remote to clone on the nodes.')
  return out.stdout.strip()


def install_commands(args) -> list[list[str]]:
  # jax 0.10.x has the extras cuda12 (jax-cuda12-plugin, NVIDIA driver >= 525) and cuda13 (driver >= 580).
  spec = f'jax[cuda{args.cuda}]=={args.jax_version or jax_version(args.requirements)}'
  hosts = parse_nodes(args.nodes) or ['']
  return [on_node(args, h, install_script(args, h, spec)) for h in hosts]


def coordinator(args, hosts: list[str]) -> str:
  host = args.coordinator_host or hosts[0].split('@')[-1]
  if not re.match(r'^[A-Za-z0-9._-]+$', host):
    raise LaunchError(f'--coordinator-host {host!r}: expected a host name or IP address.')
  if not 1 <= args.port <= 65535:
    raise LaunchError(f'--port {args.port}: must be in 1..65535.')
  return f'{host}:{args.port}'


def process_env(args) -> list[str]:
  env = []
  if args.gpus_per_node:
    env.append('CUDA_VISIBLE_DEVICES=' + ','.join(str(i) for i in range(args.gpus_per_node)))
  if args.mem_fraction != 0:
    if not 0.0 < args.mem_fraction <= 1.0:
      raise LaunchError(f'--mem-fraction {args.mem_fraction}: must be in (0, 1] (0 leaves it unset).')
    env.append(f'XLA_PYTHON_CLIENT_MEM_FRACTION={args.mem_fraction:g}')
  return env + check_env(args.env)


def train_argv(args, extra: list[str]) -> list[str]:
  return ['-m', 'ivt_jax.main', f'--config={args.config}', f'--workdir={args.workdir}', *extra]


def log_base(args, index: int) -> str:
  return f'{sh_path(args.log_dir)}/{args.run_name}-node{index}'


def run_commands(args, extra: list[str]) -> list[list[str]]:
  """One `ssh host script` per node (or `bash -c script` here); each script starts the process with nohup."""
  hosts = parse_nodes(args.nodes)
  coord = coordinator(args, hosts) if len(hosts) > 1 else ''
  env = process_env(args)
  cmds = []
  for i, host in enumerate(hosts or ['']):
    dist = ([f'--coordinator_address={coord}', f'--num_processes={len(hosts)}', f'--process_id={i}']
            if coord else [])
    words = (['env', *env] if env else []) + [args.python_bin] + train_argv(args, [*dist, *extra])
    base = log_base(args, i)
    script = (f'cd {sh_path(repo_dir(args, host))} && mkdir -p {sh_path(args.log_dir)} && '
              f'(nohup {shlex.join(words)} > {base}.log 2>&1 < /dev/null & echo $! > {base}.pid) && '
              f'echo "node {i}: started, log" {base}.log')
    cmds.append(on_node(args, host, script))
  return cmds


def srun_line(args, extra: list[str], num_nodes: int) -> str:
  """The SLURM equivalent: one task per node with all its GPUs, rank and coordinator from SLURM's variables.

  SLURM_LOCALID is removed from the process's environment: with it jax.distributed's SLURM detection would
  give each process only GPU <SLURM_LOCALID> (it assumes one process per GPU).
  """
  env = [e for e in process_env(args) if not e.startswith('CUDA_VISIBLE_DEVICES=')]   # SLURM sets it
  dist = []
  if num_nodes > 1:
    if not 1 <= args.port <= 65535:
      raise LaunchError(f'--port {args.port}: must be in 1..65535.')
    head = '"$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"'
    dist = [f'--coordinator_address={head}:{int(args.port)}', '--num_processes="$SLURM_NTASKS"',
            '--process_id="$SLURM_PROCID"']
  program = (['env', '-u', 'SLURM_LOCALID', *env, args.python_bin]
             + train_argv(args, []))
  inner = (f'cd {sh_path(args.repo_dir or str(REPO_ROOT))} && exec {shlex.join(program)} {" ".join(dist)} '
           f'{shlex.join(extra)}').rstrip()
  srun = ['srun', f'--nodes={num_nodes}', '--ntasks-per-node=1']
  if args.gpus_per_node:
    srun.append(f'--gpus-per-node={args.gpus_per_node}')
  return (f'{shlex.join(srun)} --output={sh_path(args.log_dir)}/{args.run_name}-%j-node%t.log '
          f'bash -c {shlex.quote(inner)}')


def sbatch_script(args, extra: list[str]) -> str:
  nodes = parse_nodes(args.nodes)
  num_nodes = check_positive('--num-nodes', args.num_nodes if args.num_nodes is not None else (len(nodes) or 1))
  if args.gpus_per_node is None:
    raise LaunchError('--slurm needs --gpus-per-node N (the GPUs SLURM allocates on each node).')
  gpus = check_positive('--gpus-per-node', args.gpus_per_node)
  lines = ['#!/bin/bash', f'#SBATCH --job-name={args.run_name}', f'#SBATCH --nodes={num_nodes}',
           '#SBATCH --ntasks-per-node=1', f'#SBATCH --gpus-per-node={gpus}',
           f'#SBATCH --output={args.run_name}-%j.out']
  if args.partition:
    lines.append(f'#SBATCH --partition={args.partition}')
  if args.time:
    lines.append(f'#SBATCH --time={args.time}')
  lines += [f'#SBATCH {o}' for o in args.sbatch_option]
  for value in [args.partition, args.time, *args.sbatch_option]:
    if '\n' in value:
      raise LaunchError(f'--slurm: {value!r} spans several lines.')
  for o in args.sbatch_option:
    if not o.startswith('--'):
      raise LaunchError(f'--sbatch-option {o!r}: expected an sbatch option such as --account=X.')
  lines += [f'# One process per node with all its GPUs; logs: {args.log_dir}/{args.run_name}-<job>-node<i>.log',
            'set -euo pipefail', f'mkdir -p {sh_path(args.log_dir)}', srun_line(args, extra, num_nodes)]
  return '\n'.join(lines) + '\n'


def logs_commands(args) -> list[list[str]]:
  hosts = parse_nodes(args.nodes)
  if args.tail:
    if args.tail < 0:
      raise LaunchError(f'--tail {args.tail}: must be > 0.')
    return [on_node(args, h, f'echo "== node {i}" && tail -n {int(args.tail)} {log_base(args, i)}.log')
            for i, h in enumerate(hosts or [''])]
  if not hosts:
    raise LaunchError(f'the log is on this machine ({args.log_dir}/{args.run_name}-node0.log); '
                      'use --tail N to print it, or --nodes to fetch logs from other nodes.')
  local = str(pathlib.Path(args.local_dir or 'logs'))
  opts = [w for o in args.ssh_option for w in ('-o', o)]
  cmds = [['mkdir', '-p', local]]
  for i, h in enumerate(hosts):
    cmds.append(['scp', *opts, f'{h}:{scp_path(args.log_dir)}/{args.run_name}-node{i}.log', f'{local}/'])
  return cmds


def stop_commands(args) -> list[list[str]]:
  cmds = []
  for i, h in enumerate(parse_nodes(args.nodes) or ['']):
    pid = f'{log_base(args, i)}.pid'
    cmds.append(on_node(args, h, f'if [ -f {pid} ] && kill "$(cat {pid})" 2>/dev/null; then rm -f {pid}; '
                                 f'echo "node {i}: stopped"; else echo "node {i}: not running"; fi'))
  return cmds


# ---- command line ---------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
  common = argparse.ArgumentParser(add_help=False)
  common.add_argument('--nodes', default=None, help='host1,host2,... reachable with ssh (default: this machine).')
  common.add_argument('--repo-dir', default='', help=f'Checkout on the nodes (default {REMOTE_REPO}; here: '
                      'this checkout).')
  common.add_argument('--ssh-option', action='append', default=[], help='ssh/scp -o option, e.g. Port=2222.')
  common.add_argument('--dry-run', action='store_true', help='Print the commands, run nothing.')
  logs = argparse.ArgumentParser(add_help=False)
  logs.add_argument('--log-dir', default=DEFAULT_LOGS, help='Log directory on each node.')
  logs.add_argument('--run-name', default='train', help='Names the log/pid files: <run-name>-node<i>.log.')

  p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  sub = p.add_subparsers(dest='command', required=True)
  s = sub.add_parser('install', parents=[common], help='Clone and install on each node (or here).')
  s.add_argument('--repo-url', default='', help="git URL (default: this checkout's origin).")
  s.add_argument('--ref', default='', help='Branch, tag or commit to check out.')
  s.add_argument('--python', default='python3', help='Interpreter (>= 3.11) that makes .venv.')
  s.add_argument('--cuda', choices=('12', '13'), default='12', help='jax[cuda12] (driver >= 525) or '
                 'jax[cuda13] (driver >= 580).')
  s.add_argument('--jax-version', default='', help='Default: the jax pin of requirements.txt.')
  s.add_argument('--requirements', default=str(REPO_ROOT / 'requirements.txt'), help=argparse.SUPPRESS)

  s = sub.add_parser('run', parents=[common, logs], help='Start training: one process per node.')
  s.add_argument('--config', default='configs/cuhk.py', help='Config file, relative to the repository.')
  s.add_argument('--workdir', required=True, help='Checkpoints and metrics; shared by all nodes (NFS, ...).')
  s.add_argument('--gpus-per-node', type=int, default=None, help='GPUs 0..N-1 of each node (default: all).')
  s.add_argument('--port', type=int, default=12345, help='Coordinator port on the first node.')
  s.add_argument('--coordinator-host', default='', help='Address of the first node as the others see it.')
  s.add_argument('--mem-fraction', type=float, default=0.9, help='XLA_PYTHON_CLIENT_MEM_FRACTION (0: unset).')
  s.add_argument('--env', action='append', default=[], help='NAME=VALUE for the training process.')
  s.add_argument('--python-bin', default='.venv/bin/python', help='Relative to the checkout.')
  s.add_argument('--gpu', choices=('h100', 'h200'), default='h100', help='The GPUs, for the compile check.')
  s.add_argument('--skip-compile-check', action='store_true',
                 help='Start without compiling the recipe for the GPUs here first.')
  s.add_argument('--slurm', action='store_true', help='Print an sbatch script instead (runs nothing).')
  s.add_argument('--num-nodes', type=int, default=None, help='--slurm: nodes (default: len(--nodes) or 1).')
  s.add_argument('--partition', default='', help='--slurm: partition.')
  s.add_argument('--time', default='', help='--slurm: time limit, e.g. 24:00:00.')
  s.add_argument('--sbatch-option', action='append', default=[], help='--slurm: another #SBATCH line.')

  s = sub.add_parser('logs', parents=[common, logs], help='Fetch the per-node logs (or tail them).')
  s.add_argument('--local-dir', default='', help='Default: logs/.')
  s.add_argument('--tail', type=int, default=0, help='Print the last N lines of each log instead.')
  sub.add_parser('stop', parents=[common, logs], help='SIGTERM the training process on each node.')
  return p


def main(argv=None) -> int:
  parser = build_parser()
  args, extra = parser.parse_known_args(argv)
  try:
    if args.command != 'run' and extra:
      raise LaunchError(f'unrecognized arguments for {args.command}: {" ".join(extra)}')
    if hasattr(args, 'run_name') and not re.match(r'^[A-Za-z0-9_.-]+$', args.run_name):
      raise LaunchError(f'--run-name {args.run_name!r}: letters, digits, ".", "_" and "-" only.')
    srun = ''
    if args.command == 'run':
      check_config_file(args.config)
      extra = check_overrides(extra)
      if not args.workdir.strip():
        raise LaunchError('--workdir is empty: give the run directory (shared by all nodes).')
      if args.gpus_per_node is not None:
        check_positive('--gpus-per-node', args.gpus_per_node)
      if args.slurm:
        print(sbatch_script(args, extra), end='')
        return 0
      cmds = run_commands(args, extra)
      nodes = len(parse_nodes(args.nodes)) or 1
      srun = srun_line(args, extra, nodes)
      if not args.skip_compile_check:
        target = f'{args.gpu}x{nodes * (args.gpus_per_node or 8)}'  # all GPUs of a node: 8 assumed
        if args.dry_run:
          print(fit_check.comment(args.config, target, extra))
        else:
          fit_check.check(args.config, target, extra, LaunchError)
    else:
      cmds = {'install': install_commands, 'logs': logs_commands, 'stop': stop_commands}[args.command](args)
  except LaunchError as e:
    print(f'{PROG}: error: {e}', file=sys.stderr)
    return 2
  for i, cmd in enumerate(cmds):
    line = shlex.join(cmd)
    if args.dry_run:
      print(line)
      continue
    print(f'+ {line}', file=sys.stderr, flush=True)
    rc = subprocess.run(cmd, check=False).returncode
    if rc:
      print(f'{PROG}: error: command failed with exit status {rc}: {line}', file=sys.stderr)
      if args.command == 'run' and i:
        print(f'{PROG}: the processes started on the nodes before it wait for the others: end them with '
              f'`{PROG} stop` and the same --nodes.', file=sys.stderr)
      return rc
  if srun:
    print(f'# SLURM equivalent (inside an allocation): {srun}', file=sys.stdout if args.dry_run else sys.stderr)
  return 0


if __name__ == '__main__':
  sys.exit(main())
