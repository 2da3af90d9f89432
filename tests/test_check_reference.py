"""ivt_jax.tools.check_reference: the verdict, the refusals, and (with torch and a checkout) the check itself."""
import importlib.util
import os

import pytest

from ivt_jax.tools import check_reference

HAVE_TORCH = importlib.util.find_spec('torch') is not None
REPO = os.environ.get('IVT_REFERENCE_REPO', '')


def _figures(**changes):
  f = {'embedding/image_relative': 1e-7, 'embedding/text_relative': 2e-7, 'step1/loss_relative': 2e-7,
       'step2/loss_relative': 3e-7, 'params/max_relative': 8e-6, 'params/worst': 'norm/bias'}
  f.update(changes)
  return f


def test_verdict_names_each_figure_past_its_tolerance():
  assert check_reference.verdict(_figures()) == []
  bad = check_reference.verdict(_figures(**{'step2/loss_relative': 1e-3, 'params/max_relative': 0.5}))
  assert len(bad) == 2 and bad[0].startswith('step2/loss_relative') and 'norm/bias' in bad[1]
  assert check_reference.verdict(_figures(**{'embedding/text_relative': 1e-2}))[0].startswith('embedding/text')


def test_our_side_switches_off_what_is_random_and_uses_the_reference_recipe():
  c = check_reference.our_config(check_reference.SIZES['small'], 32)
  assert c.model.drop_path == 0 and c.model.text_embed_dropout == 0 and c.data.bmm_ratio == 0
  assert (c.optim.name, c.optim.lr, c.optim.bias_lr_factor, c.optim.momentum, c.optim.weight_decay) == \
      ('sgd', 0.005, 2.0, 0.9, 1e-4)
  from ivt_jax.training import optim
  schedule = optim.learning_rate_schedule(c, 1000)
  assert float(schedule(0)) == pytest.approx(0.005) and float(schedule(1)) == pytest.approx(0.005)


@pytest.mark.skipif(HAVE_TORCH, reason='checks the message given where torch is absent')
def test_without_torch_it_says_so(capsys):
  assert check_reference.main(['--reference_repo=/nonexistent']) == 2
  assert 'needs PyTorch' in capsys.readouterr().err


def test_bad_arguments_are_refused():
  with pytest.raises(SystemExit):
    check_reference.main(['--reference_repo=x', '--batch=3', '--images_per_id=2'])


@pytest.mark.skipif(not (HAVE_TORCH and REPO), reason='needs torch and IVT_REFERENCE_REPO (a checkout of the '
                                                      'reference)')
def test_the_small_check_passes_against_the_reference():
  figures = check_reference.check(REPO, 'small', steps=2)
  assert check_reference.verdict(figures) == [], figures
  assert figures['params/changed_by_training'] == figures['params/compared']
