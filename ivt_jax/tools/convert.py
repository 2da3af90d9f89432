"""Pretrained weights -> an Orbax checkpoint of the encoder's parameters.

  python -m ivt_jax.tools.convert --config=configs/cuhk.py \\
      --config.init.ivt=/weights/ivt_cuhk_pedes.pth --out=/ckpt/ivt_cuhk

  python -m ivt_jax.tools.convert --config=configs/cuhk.py --config.init.vit_npz=/weights/ViT-B_16.npz \\
      --config.init.bert=/weights/bert-base-uncased --out=/ckpt/imagenet_bert_init

The files are applied as in training (config.init.vit_npz, then .bert, then .ivt; config.init.allow_random for
what may stay freshly initialized), strictly: see ivt_jax/weights/pretrained.py. The model's shape comes from the config
alone (image size, patch size, stride, width, ...); with a WordPiece vocab_file configured the vocabulary size is
read from it, as training does.

Output: an Orbax CheckpointManager directory with one step, 0, holding two items:
  <out>/0/params   the model's parameter tree (StandardSave; the tree training builds for config.model.head)
  <out>/0/meta     json: {'config': the config used, 'init_report': where every parameter came from, 'tool'}
`ivt_jax.training.checkpoints.restore_params(<out>, abstract_params)` reads it, and so does plain Orbax:
  ocp.CheckpointManager(out, item_names=('params', 'meta')).restore(
      0, args=ocp.args.Composite(params=ocp.args.StandardRestore(abstract_params)))
"""
from __future__ import annotations

import functools
import json
import os

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
from ml_collections import config_flags
import orbax.checkpoint as ocp

from input_pipeline import paths
from ivt_jax.training import checkpoints
from ivt_jax.models import heads
from ivt_jax.models import encoder as model_lib
from ivt_jax.weights import pretrained
from ivt_jax.weights import report as weight_report

FLAGS = flags.FLAGS


def _define_flags():
  """Defined only when run as a program, so importing this module next to other CLIs is safe."""
  config_flags.DEFINE_config_file('config', None, 'Experiment config file (configs/*.py).', lock_config=True)
  flags.DEFINE_string('out', None, 'Directory for the Orbax checkpoint (created).')
  flags.DEFINE_bool('overwrite', False, 'Replace a checkpoint already in --out.')

STEP = 0


def resolve_vocab_size(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A copy of `config` whose model.vocab_size is the WordPiece vocab_file's size when one is configured, or
  CLIP's BPE size with data.tokenizer='clip'."""
  from input_pipeline import tokenizers  # pylint: disable=g-import-not-at-top
  config = ml_collections.ConfigDict(config.to_dict())
  if config.data.tokenizer == 'clip':  # CLIP's BPE: 49,408 ids (data.vocab_file or open_clip's merges file)
    config.model.vocab_size = int(tokenizers.load_tokenizer('clip', config.data.vocab_file).vocab_size)
  if config.data.tokenizer == 'wordpiece' and config.data.vocab_file:
    size = int(tokenizers.load_tokenizer('wordpiece', config.data.vocab_file).vocab_size)
    if size != config.model.vocab_size:
      logging.info('model.vocab_size %d -> %d from data.vocab_file %s', config.model.vocab_size, size,
                   config.data.vocab_file)
    config.model.vocab_size = size
  return config


def convert(config: ml_collections.ConfigDict, out_dir: str, overwrite: bool = False) -> weight_report.LoadReport:
  """Builds the model's parameters from `config`, loads config.init.*, writes <out_dir>/0/{params, meta}."""
  if not any(config.init.get(k) for k in ('vit_npz', 'bert', 'ivt', 'clip')):
    raise ValueError('nothing to convert: set config.init.vit_npz, config.init.bert and/or config.init.ivt (or '
                     "config.init.clip with model.head='clip')")
  out_dir = paths.resolve(out_dir, '--out')
  existing = sorted(ocp.utils.checkpoint_steps(out_dir)) if paths.isdir(out_dir) else []
  if existing and not overwrite:
    raise FileExistsError(f'--out {out_dir} already holds a checkpoint (steps {existing}); pass --overwrite '
                          'to replace it')
  config = resolve_vocab_size(config)
  module = heads.build(config)  # the model config.model.head selects, as training builds it
  init = jax.jit(functools.partial(model_lib.init_module_params, module))
  params = jax.device_get(init(jax.random.key(config.seed)))
  params, report = pretrained.load_pretrained(config, params)
  logging.info('pretrained weights:\n%s', report)
  meta = {'tool': 'ivt_jax.tools.convert', 'config': json.loads(config.to_json_best_effort()),
          'init_report': report.summary()}
  manager = checkpoints.params_manager(out_dir)
  for step in manager.all_steps():  # only with overwrite=True
    manager.delete(step)
  checkpoints.save_params(manager, STEP, jax.tree_util.tree_map(jnp.asarray, params), meta)
  manager.close()
  logging.info('wrote %s/%d/{params, meta}: %d parameters', out_dir, STEP, model_lib.count_params(params))
  return report


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if FLAGS.out is None:
    raise app.UsageError('--out is required')
  report = convert(FLAGS.config, FLAGS.out, overwrite=FLAGS.overwrite)
  print(report)
  print(f'wrote {os.path.abspath(os.path.expanduser(FLAGS.out))}/{STEP}/{{params, meta}}')


if __name__ == '__main__':
  _define_flags()
  flags.mark_flags_as_required(['config'])
  from ivt_jax.runtime import cli
  cli.run_absl(main)
