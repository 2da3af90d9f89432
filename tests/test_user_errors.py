"""A user's error (bad flag or config key, missing config file, missing tokenizer file, a config value the model
refuses) prints its message alone with exit status 2; --verbosity=1 shows the traceback; our own bugs keep it."""
import os
import subprocess
import sys

import numpy as np
import pytest

from ivt_jax.runtime import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(module, *args):
  env = dict(os.environ)
  env.pop('IVT_VERBOSE', None)
  return subprocess.run([sys.executable, '-m', module, *args], cwd=ROOT, capture_output=True, text=True,
                        timeout=300, env=env)


@pytest.mark.parametrize('args,says', [
    (['--config=configs/demo.py', '--config.nope=1'], "'nope'"),
    (['--config=configs/nope.py'], "No such file or directory: 'configs/nope.py'"),
    (['--config=configs/demo.py', '--config.model.depth=abc'], "--config.model.depth=abc"),
    (['--config=configs/cuhk.py', '--config.data.vocab_file=/no/vocab.txt'], "'/no/vocab.txt', which is not a file"),
])
def test_the_training_program_says_a_users_error_in_one_line(tmp_path, args, says):
  r = _run('ivt_jax.main', *args, f'--workdir={tmp_path / "w"}')
  assert r.returncode == 2, r.stderr
  assert 'Traceback' not in r.stderr and says in r.stderr, r.stderr
  assert r.stderr.splitlines()[0].startswith('error: ') and len(r.stderr.splitlines()) <= 2, r.stderr


def test_verbosity_shows_the_traceback(tmp_path):
  r = _run('ivt_jax.main', '--config=configs/cuhk.py', '--config.data.vocab_file=/no/vocab.txt',
           f'--workdir={tmp_path / "w"}', '--verbosity=1')
  assert r.returncode != 0 and 'Traceback' in r.stderr and '/no/vocab.txt' in r.stderr


def test_the_benchmark_and_the_planner_say_it_too():
  r = _run('ivt_jax.benchmark', '--config=configs/demo.py', '--config.model.nope=3')
  assert r.returncode == 2 and 'Traceback' not in r.stderr and "'nope'" in r.stderr, r.stderr
  from ivt_jax.planner import devices
  devices.prepare_environment()
  if devices.have_compiler('tpu'):
    r = _run('ivt_jax.aot', '--config=configs/demo.py', '--target=v4-8', '--config.model.width=33')
    assert r.returncode == 2 and 'Traceback' not in r.stderr and 'divisible' in r.stderr, r.stderr


def _project_value_error():
  raise ValueError('data.bmm_ratio must be in [0, 1), got 2')


def test_only_errors_raised_on_purpose_by_the_project_count_as_the_users():
  with pytest.raises(ValueError) as ours:
    _project_value_error()
  assert not cli.is_user_error(ours.value)  # tests/ is not the project's code
  from ivt_jax.models import encoder
  from tests.conftest import tiny_config
  c = tiny_config()
  c.data.bmm_ratio = 2.0
  with pytest.raises(ValueError) as config_error:
    encoder.encoder_config(c)
  assert cli.is_user_error(config_error.value)
  with pytest.raises(ValueError) as library_error:
    np.zeros((2, 3)).reshape(4)  # a bug: raised inside numpy
  assert not cli.is_user_error(library_error.value)


@pytest.mark.parametrize('module,args,says', [
    ('ivt_jax.search', ['index', '--checkpoint', '/no/ckpt', '--images', '/tmp', '--out', '/tmp/never'],
     'checkpoint directory /no/ckpt does not exist'),
    ('ivt_jax.search', ['query', '--index', '/no/index', 'a man in a red coat'], '/no/index'),
    ('ivt_jax.serve', ['--index', '/no/index'], '/no/index is not an index'),
    ('input_pipeline.check', ['--dataset=cuhk_pedes', '--manual_dir=/no/dir', '--nope'], 'nope'),
])
def test_search_serve_and_the_checker_say_it_in_one_line(module, args, says):
  r = _run(module, *args)
  assert r.returncode == 2 and 'Traceback' not in r.stderr and says in r.stderr, r.stderr
