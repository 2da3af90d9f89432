r"""The life cycle of a Cloud TPU VM or pod slice for ivt-jax, with gcloud.

  python launch/tpu_vm.py create    --name ivt --zone us-central2-b --accelerator-type v4-32 [--spot] \
      [--config configs/cuhk.py] [--config.key=value ...] [--skip-compile-check]
  python launch/tpu_vm.py install   --name ivt --zone us-central2-b [--repo-url URL] [--ref BRANCH]
  python launch/tpu_vm.py copy-data --name ivt --zone us-central2-b --src gs://BUCKET/tfds [--dest ~/data]
  python launch/tpu_vm.py mount     --name ivt --zone us-central2-b --bucket gs://BUCKET [--mount-point ~/gcs]
  python launch/tpu_vm.py run       --name ivt --zone us-central2-b --workdir '~/gcs/runs/cuhk' \
      [--config configs/cuhk.py] [--env KEY=VALUE ...] [--config.key=value ...]
  python launch/tpu_vm.py logs      --name ivt --zone us-central2-b --accelerator-type v4-32 [--tail N]
  python launch/tpu_vm.py stop      --name ivt --zone us-central2-b
  python launch/tpu_vm.py delete    --name ivt --zone us-central2-b [--yes]

`create` first compiles the recipe for the slice here (python -m ivt_jax.aot, no TPU needed) and refuses one
that does not fit the chips' memory, naming the largest batch that does. Every subcommand takes --project P and --dry-run (print the exact commands, one per line, valid shell, and
run nothing). Commands on the TPU VMs go through `gcloud compute tpus tpu-vm ssh --worker=all` (all workers
at once); the training program runs once per worker (one JAX process per TPU VM host) with --distributed,
and jax.distributed.initialize() reads the slice layout from the TPU VM metadata.
"""
import argparse
import dataclasses
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
REMOTE_LOGS = '~/ivt-logs'
PROG = 'tpu_vm.py'

# Software versions (the --version of `gcloud compute tpus tpu-vm create`) for JAX, per TPU generation.
RUNTIMES = {'2': 'tpu-ubuntu2204-base', '3': 'tpu-ubuntu2204-base', '4': 'tpu-ubuntu2204-base',
            '5p': 'v2-alpha-tpuv5', '5litepod': 'v2-alpha-tpuv5-lite', '6e': 'v2-alpha-tpuv6e'}
_ACCELERATOR = re.compile(r'^v(2|3|4|5p|5litepod|6e)-([1-9][0-9]*)$')
_CHIP_SIZES = (1, 4, 8, 16, 32, 64, 128, 256)   # v5litepod-N and v6e-N: N chips
_WORKER_NUMBER = ('"$(curl -sf -H Metadata-Flavor:Google '
                  'http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number)"')


class LaunchError(Exception):
  """Bad input or a failed command: the message says which flag or file."""


@dataclasses.dataclass(frozen=True)
class TpuSlice:
  """What an accelerator type means: hosts (TPU VMs = workers = JAX processes) and JAX devices."""
  accelerator_type: str
  generation: str     # '2', '3', '4', '5p', '5litepod', '6e'
  workers: int
  devices: int
  runtime: str        # default software version for JAX


def parse_accelerator(accelerator_type: str) -> TpuSlice:
  """'v4-32' -> TpuSlice(workers=4, devices=16, ...); LaunchError for an unknown format or size.

  v2, v3, v4, v5p: the size counts TensorCores (2 per chip, 8 per TPU VM); v4 and v5p chips are one JAX
  device each (megacore), v2 and v3 cores are. v5litepod (v5e) and v6e: the size counts chips (one device
  each); 1, 4 or 8 chips are one TPU VM, larger slices have 4 chips per TPU VM.
  """
  m = _ACCELERATOR.match(accelerator_type or '')
  if not m:
    raise LaunchError(
        f'--accelerator-type {accelerator_type!r}: expected v<generation>-<size> with generation 2, 3, 4, '
        '5p, 5litepod (v5e) or 6e, e.g. v4-8, v4-32, v5p-16, v5litepod-16, v6e-8.')
  gen, size = m.group(1), int(m.group(2))
  if gen in ('2', '3', '4', '5p'):
    if size % 8:
      raise LaunchError(f'--accelerator-type {accelerator_type}: the size of a v{gen} slice counts '
                        'TensorCores and must be a multiple of 8 (8 per TPU VM), e.g. v4-8, v4-32.')
    workers, devices = size // 8, (size if gen in ('2', '3') else size // 2)
  else:
    if size not in _CHIP_SIZES:
      raise LaunchError(f'--accelerator-type {accelerator_type}: the size of a v{gen} slice counts chips '
                        f'and must be one of {", ".join(map(str, _CHIP_SIZES))}.')
    workers, devices = (1 if size <= 8 else size // 4), size
  return TpuSlice(accelerator_type, gen, workers, devices, RUNTIMES[gen])


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
  """A path on the remote machine as one shell word: '~/x' -> "$HOME"/x (expanded there), else quoted."""
  if path == '~':
    return '"$HOME"'
  if path.startswith('~/'):
    return '"$HOME"/' + shlex.quote(path[2:])
  if path.startswith('~'):
    raise LaunchError(f'path {path!r}: only ~/ (the remote home) is supported, not ~user.')
  return shlex.quote(path)


def scp_path(path: str) -> str:
  """A remote path for scp: home-relative for '~/x' (scp starts in the remote home)."""
  if path == '~':
    return '.'
  if path.startswith('~/'):
    return path[2:]
  if path.startswith('~'):
    raise LaunchError(f'path {path!r}: only ~/ (the remote home) is supported, not ~user.')
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
  """A relative --config must exist in this checkout (the machines run a clone of it)."""
  path = config.split(':', 1)[0]
  if not path.endswith('.py'):
    raise LaunchError(f'--config {config!r}: expected a config file such as configs/cuhk.py.')
  if not pathlib.PurePath(path).is_absolute() and not (REPO_ROOT / path).is_file():
    raise LaunchError(f'--config {config!r}: {REPO_ROOT / path} does not exist.')
  return config


def check_name(name: str) -> str:
  if not re.match(r'^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$', name or ''):
    raise LaunchError(f'--name {name!r}: a TPU name is lowercase letters, digits and hyphens, starts with '
                      'a letter, does not end with a hyphen, at most 63 characters.')
  return name


def check_zone(zone: str) -> str:
  if not re.match(r'^[a-z]+-[a-z]+[0-9]+-[a-z]$', zone or ''):
    raise LaunchError(f'--zone {zone!r}: expected a zone such as us-central2-b or europe-west4-a.')
  return zone


def check_run_name(run_name: str) -> str:
  if not re.match(r'^[A-Za-z0-9_.-]+$', run_name):
    raise LaunchError(f'--run-name {run_name!r}: letters, digits, ".", "_" and "-" only (it names log files).')
  return run_name


# ---- commands -------------------------------------------------------------------------------------

def _gcloud(args, *words: str) -> list[str]:
  cmd = ['gcloud', 'compute', 'tpus', 'tpu-vm', *words]
  if args.project:
    cmd.append(f'--project={args.project}')
  return cmd


def ssh_all(args, remote: str) -> list[str]:
  """The same shell command on every worker of the slice at once."""
  return _gcloud(args, 'ssh', args.name, f'--zone={args.zone}', '--worker=all', '--command', remote)


def create_commands(args, extra=()) -> list[list[str]]:
  tpu = parse_accelerator(args.accelerator_type)
  check_config_file(args.config)
  args.overrides = check_overrides(list(extra))
  cmd = _gcloud(args, 'create', args.name, f'--zone={args.zone}', f'--accelerator-type={tpu.accelerator_type}',
                f'--version={args.version or tpu.runtime}')
  if args.spot:
    cmd.append('--spot')
  if args.scopes:
    cmd.append(f'--scopes={args.scopes}')
  return [cmd]


def install_script(repo_url: str, ref: str, python: str, jax_spec: str, repo_dir: str = REMOTE_REPO) -> str:
  """Shell: clone (or update) the repository, make .venv with `python`, pip install the pins and jax_spec."""
  repo = sh_path(repo_dir)
  py = shlex.quote(python)
  steps = ['set -e']
  if re.match(r'^python3(\.[0-9]+)?$', python):
    # Ubuntu 22.04 (the TPU VM images) ships Python 3.10; the pins need 3.11: apt installs it if absent.
    steps.append(f"if ! {py} -c 'import ensurepip, venv' >/dev/null 2>&1; then sudo apt-get update -q && "
                 f'sudo apt-get install -y -q {py} {py}-venv; fi')
  steps.append(f'if [ -d {repo}/.git ]; then git -C {repo} pull --ff-only; '
               f'else git clone {shlex.quote(repo_url)} {repo}; fi')
  if ref:
    steps.append(f'git -C {repo} checkout {shlex.quote(ref)}')
  steps += [
      f'cd {repo}',
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
    raise LaunchError('--repo-url is needed: this checkout has no "origin" remote to clone on the TPU VMs.')
  return out.stdout.strip()


def install_commands(args) -> list[list[str]]:
  version = args.jax_version or jax_version(args.requirements)
  script = install_script(args.repo_url or default_repo_url(), args.ref, args.python, f'jax[tpu]=={version}')
  return [ssh_all(args, script)]


def copy_data_commands(args) -> list[list[str]]:
  """gs:// sources are copied by each worker (gcloud storage); local ones are sent with tpu-vm scp."""
  dest = args.dest.rstrip('/') or '/'
  if args.src.startswith('gs://'):
    remote = f'mkdir -p {sh_path(dest)} && gcloud storage cp -r {shlex.quote(args.src)} {sh_path(dest)}/'
    return [ssh_all(args, remote)]
  if not pathlib.Path(args.src).exists():
    raise LaunchError(f'--src {args.src!r}: no such local file or directory (or give a gs:// path).')
  scp = _gcloud(args, 'scp', '--recurse', args.src, f'{args.name}:{scp_path(dest)}', f'--zone={args.zone}',
                '--worker=all')
  return [ssh_all(args, f'mkdir -p {sh_path(dest)}'), scp]


def mount_commands(args) -> list[list[str]]:
  """Mount a bucket with Cloud Storage FUSE at the same path on every worker (installs gcsfuse if absent)."""
  m = re.match(r'^(?:gs://)?([a-z0-9][-a-z0-9_.]{1,220}[a-z0-9])(?:/(.*))?$', args.bucket)
  if not m:
    raise LaunchError(f'--bucket {args.bucket!r}: expected gs://BUCKET or gs://BUCKET/DIR.')
  bucket, only_dir = m.group(1), (m.group(2) or '').strip('/')
  mp = sh_path(args.mount_point)
  if args.unmount:
    return [ssh_all(args, f'if mountpoint -q {mp}; then fusermount -u {mp}; fi')]
  key = '/usr/share/keyrings/cloud.google.asc'
  install = ('if ! command -v gcsfuse >/dev/null 2>&1; then '
             f'curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo tee {key} >/dev/null; '
             f'echo "deb [signed-by={key}] https://packages.cloud.google.com/apt gcsfuse-$(lsb_release -c -s) '
             'main" | sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null; '
             'sudo apt-get update -q; sudo apt-get install -y -q gcsfuse; fi')
  only = f'--only-dir {shlex.quote(only_dir)} ' if only_dir else ''
  # Orbax finalizes a checkpoint by renaming its directory (needs --rename-dir-limit); no metadata cache,
  # so that what one worker writes (checkpoints, the prepared-data marker) is seen at once by the others.
  mount = (f'if ! mountpoint -q {mp}; then gcsfuse --implicit-dirs --rename-dir-limit=200000 '
           f'--metadata-cache-ttl-secs=0 {only}{shlex.quote(bucket)} {mp}; fi')
  return [ssh_all(args, f'set -e; {install}; mkdir -p {mp}; {mount}')]


def log_name(run_name: str, worker: str) -> str:
  return f'{run_name}-worker{worker}'


def train_argv(args, extra: list[str]) -> list[str]:
  """The training program's arguments (one process per worker)."""
  return ['-m', 'ivt_jax.main', f'--config={args.config}', f'--workdir={args.workdir}', '--distributed', *extra]


def run_commands(args, extra: list[str]) -> list[list[str]]:
  check_config_file(args.config)
  env = check_env(args.env)
  extra = check_overrides(extra)
  if not args.workdir.strip():
    raise LaunchError('--workdir is required (gs://BUCKET/DIR, or a directory all workers share).')
  logs = sh_path(args.log_dir)
  base = f'{logs}/{log_name(args.run_name, "$W")}'
  program = ' '.join(shlex.quote(w) for w in (['env', *env] if env else []) + ['.venv/bin/python']
                     + train_argv(args, extra))
  remote = (f'cd {sh_path(args.repo_dir)} && mkdir -p {logs} && W={_WORKER_NUMBER} && '
            f'(nohup {program} > {base}.log 2>&1 < /dev/null & echo $! > {base}.pid) && '
            f'echo "worker $W: started, log" {base}.log')
  return [ssh_all(args, remote)]


def num_workers(args) -> int:
  if args.num_workers is not None:
    if args.num_workers < 1:
      raise LaunchError(f'--num-workers {args.num_workers}: must be >= 1.')
    return args.num_workers
  if not args.accelerator_type:
    raise LaunchError('give --accelerator-type (e.g. v4-32) or --num-workers: logs are fetched per worker.')
  return parse_accelerator(args.accelerator_type).workers


def logs_commands(args) -> list[list[str]]:
  if args.tail:
    if args.tail < 0:
      raise LaunchError(f'--tail {args.tail}: must be > 0.')
    log = f'{sh_path(args.log_dir)}/{log_name(args.run_name, "$W")}.log'
    return [ssh_all(args, f'W={_WORKER_NUMBER} && echo "== worker $W" && tail -n {int(args.tail)} {log}')]
  local = str(pathlib.Path(args.local_dir or f'logs/{args.name}'))
  cmds = [['mkdir', '-p', local]]
  for w in range(num_workers(args)):
    src = f'{args.name}:{scp_path(args.log_dir)}/{log_name(args.run_name, str(w))}.log'
    cmds.append(_gcloud(args, 'scp', src, f'{local}/', f'--zone={args.zone}', f'--worker={w}'))
  return cmds


def stop_commands(args) -> list[list[str]]:
  pid = f'{sh_path(args.log_dir)}/{log_name(args.run_name, "$W")}.pid'
  remote = (f'W={_WORKER_NUMBER} && if [ -f {pid} ] && kill "$(cat {pid})" 2>/dev/null; then rm -f {pid}; '
            'echo "worker $W: stopped"; else echo "worker $W: not running"; fi')
  return [ssh_all(args, remote)]


def delete_commands(args) -> list[list[str]]:
  cmd = _gcloud(args, 'delete', args.name, f'--zone={args.zone}')
  if args.yes:
    cmd.append('--quiet')
  return [cmd]


# ---- command line ---------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
  common = argparse.ArgumentParser(add_help=False)
  common.add_argument('--name', required=True, help='TPU VM (slice) name.')
  common.add_argument('--zone', required=True, help='e.g. us-central2-b (v4), us-east5-a (v5p/v6e).')
  common.add_argument('--project', default='', help='Google Cloud project (default: gcloud config).')
  common.add_argument('--dry-run', action='store_true', help='Print the commands, run nothing.')
  remote = argparse.ArgumentParser(add_help=False)
  remote.add_argument('--repo-dir', default=REMOTE_REPO, help='Checkout on the workers.')
  remote.add_argument('--log-dir', default=REMOTE_LOGS, help='Log directory on each worker (its own disk).')
  remote.add_argument('--run-name', default='train', help='Names the log/pid files: <run-name>-worker<i>.log.')

  p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  sub = p.add_subparsers(dest='command', required=True)
  s = sub.add_parser('create', parents=[common], help='Create the TPU VM / pod slice.')
  s.add_argument('--accelerator-type', required=True, help='e.g. v4-8, v4-32, v5p-16, v5litepod-16, v6e-8.')
  s.add_argument('--version', default='', help='TPU software version (default: per generation, '
                 + ', '.join(f'v{k}: {v}' for k, v in RUNTIMES.items()) + ').')
  s.add_argument('--spot', action='store_true', help='Spot capacity (cheaper, can be preempted).')
  s.add_argument('--scopes', default='', help='Access scopes of the VMs, e.g. cloud-platform (gs:// access).')
  s.add_argument('--config', default='configs/cuhk.py', help='The recipe the compile check compiles.')
  s.add_argument('--skip-compile-check', action='store_true',
                 help='Create without compiling the recipe for the slice first.')

  s = sub.add_parser('install', parents=[common], help='Clone the repository and install it on every worker.')
  s.add_argument('--repo-url', default='', help="git URL (default: this checkout's origin).")
  s.add_argument('--ref', default='', help='Branch, tag or commit to check out.')
  s.add_argument('--python', default='python3.11', help='Interpreter for .venv (apt-installed if absent).')
  s.add_argument('--jax-version', default='', help='Default: the jax pin of requirements.txt.')
  s.add_argument('--requirements', default=str(REPO_ROOT / 'requirements.txt'), help=argparse.SUPPRESS)

  s = sub.add_parser('copy-data', parents=[common], help='Copy a directory to the same path on every worker.')
  s.add_argument('--src', required=True, help='gs://BUCKET/DIR or a local directory.')
  s.add_argument('--dest', default='~/data', help='Parent directory on each worker (SRC lands in DEST/).')

  s = sub.add_parser('mount', parents=[common], help='Mount a bucket (gcsfuse) on every worker.')
  s.add_argument('--bucket', required=True, help='gs://BUCKET or gs://BUCKET/DIR.')
  s.add_argument('--mount-point', default='~/gcs')
  s.add_argument('--unmount', action='store_true')

  s = sub.add_parser('run', parents=[common, remote], help='Start training on all workers (nohup, logs).')
  s.add_argument('--config', default='configs/cuhk.py', help='Config file, relative to the repository.')
  s.add_argument('--workdir', required=True, help='Shared by all workers: gs://... or a mounted bucket.')
  s.add_argument('--env', action='append', default=[], help='NAME=VALUE for the training process.')

  s = sub.add_parser('logs', parents=[common, remote], help='Fetch the per-worker logs (or tail them).')
  s.add_argument('--accelerator-type', default='', help='Gives the number of workers.')
  s.add_argument('--num-workers', type=int, default=None, help='Instead of --accelerator-type.')
  s.add_argument('--local-dir', default='', help='Default: logs/<name>.')
  s.add_argument('--tail', type=int, default=0, help='Print the last N lines of each log instead.')

  sub.add_parser('stop', parents=[common, remote], help='SIGTERM the training process on every worker.')
  s = sub.add_parser('delete', parents=[common], help='Delete the TPU VM / slice.')
  s.add_argument('--yes', action='store_true', help='No confirmation prompt (gcloud --quiet).')
  return p


def commands_for(args, extra: list[str]) -> list[list[str]]:
  check_name(args.name)
  check_zone(args.zone)
  if args.command not in ('run', 'create') and extra:
    raise LaunchError(f'unrecognized arguments for {args.command}: {" ".join(extra)}')
  if hasattr(args, 'run_name'):
    check_run_name(args.run_name)
  build = {'create': create_commands, 'install': install_commands, 'copy-data': copy_data_commands,
           'mount': mount_commands, 'logs': logs_commands, 'stop': stop_commands, 'delete': delete_commands}
  if args.command == 'run':
    return run_commands(args, extra)
  if args.command == 'create':
    return create_commands(args, extra)
  return build[args.command](args)


def main(argv=None) -> int:
  parser = build_parser()
  args, extra = parser.parse_known_args(argv)
  try:
    cmds = commands_for(args, extra)
    if args.command == 'create' and parse_accelerator(args.accelerator_type).generation in ('2', '3'):
      print(f'{PROG}: note: no compile check for {args.accelerator_type} (the planner compiles for v4 and newer)',
            file=sys.stderr)
    elif args.command == 'create' and not args.skip_compile_check:
      if args.dry_run:
        print(fit_check.comment(args.config, args.accelerator_type, args.overrides))
      else:
        fit_check.check(args.config, args.accelerator_type, args.overrides, LaunchError)
  except LaunchError as e:
    print(f'{PROG}: error: {e}', file=sys.stderr)
    return 2
  for cmd in cmds:
    line = shlex.join(cmd)
    if args.dry_run:
      print(line)
      continue
    print(f'+ {line}', file=sys.stderr, flush=True)
    rc = subprocess.run(cmd, check=False).returncode
    if rc:
      print(f'{PROG}: error: command failed with exit status {rc}: {line}', file=sys.stderr)
      return rc
  return 0


if __name__ == '__main__':
  sys.exit(main())
