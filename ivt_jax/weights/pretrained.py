"""Pretrained weights for the encoder: ImageNet ViT-B/16 (.npz), BERT, and released IVT checkpoints.

IVT initializes in layers, each applied on top of the previous one (config keys, in this order):
  config.init.vit_npz   ImageNet ViT-B/16 in the google-research/vision_transformer .npz format: the patch
                        embedding, CLS token, position embedding (bilinearly resized from the checkpoint's square
                        grid to the configured patch grid, as the reference's `resize_pos_embed`), every block's
                        norm1 / attention / norm2 / MLP (-> `mlp_vis`) and the final norm. The ViT has no type
                        embedding: `type_embed` keeps its initial value, as in the reference.
  config.init.bert      BERT (bert-base-uncased; .safetensors, a PyTorch .bin, or a Hugging Face model folder):
                        the text embeddings and every block's `mlp_txt` (intermediate.dense -> fc1,
                        output.dense -> fc2), as the reference's `load_param_hybrid`.
  config.init.ivt       a released IVT checkpoint (a PyTorch state_dict, bare or under 'state_dict' / 'model',
                        keys with or without 'module.' and 'encoder_vl.'; or .safetensors): the whole encoder.
  config.init.allow_random  comma-separated regexes, each matched against the whole parameter path (such as
                        'blocks_6/mlp_txt/fc1/kernel'), of parameters allowed to keep their fresh initialization.

Strict: a file key that maps to no parameter and is not known to be unused, a shape mismatch, and a parameter
that no file provides and no pattern allows are errors, all listed in one message. File keys that are unused by
design (classification heads, BERT's own attention) are named in the report, never dropped silently.

PyTorch files are read with `torch.load(weights_only=True)` (torch is an optional extra, imported only for
them); .safetensors and .npz files need no torch. Every converter is a pure function: a flat mapping of names to
numpy arrays in, arrays in the model's layout out.

Modules: ivt_jax.weights.files reads the files, ivt_jax.weights.mapping converts each source's keys to parameters,
ivt_jax.weights.report holds what a load did; this module composes the layers and checks the result.
"""
from __future__ import annotations

import collections
import os
import re
from typing import Any, Sequence

import ml_collections
import numpy as np
from flax import traverse_util

from ivt_jax.models import encoder as model_lib
from ivt_jax.weights import files as weight_files
from ivt_jax.weights import mapping as weight_mapping
from ivt_jax.weights import report as weight_report


def parse_allow_random(spec: str) -> list[re.Pattern]:
  """config.init.allow_random ('a,b,...') -> compiled patterns (each must match a whole parameter path)."""
  patterns = []
  for s in (spec or '').split(','):
    s = s.strip()
    if not s:
      continue
    try:
      patterns.append(re.compile(s))
    except re.error as e:
      raise ValueError(f'config.init.allow_random: {s!r} is not a valid regular expression ({e}); patterns '
                       'are separated by commas, so a pattern cannot contain one') from e
  return patterns


def merge(params: Any, converted: Sequence[weight_report.Converted], allow_random: Sequence[re.Pattern] = ()
          ) -> tuple[Any, weight_report.LoadReport]:
  """Applies converted files in order onto `params` and checks that every parameter is accounted for.

  A parameter is accounted for when a file provides it, a file leaves it at its initial value by design, or an
  `allow_random` pattern matches its whole path. Anything else, and the files' own `problems` (unexpected keys,
  shape mismatches), raise one WeightMappingError that lists them all. Returns (params with the loaded arrays
  as numpy, report).
  """
  flat = dict(traverse_util.flatten_dict(params, sep='/'))
  all_problems = []
  for c in converted:
    if c.problems:
      err = c.error()
      all_problems += [err.title] + ['  ' + p for p in err.problems]
  origin, replaced, by_design, files, ignored, notes = {}, collections.defaultdict(list), {}, {}, {}, {}
  shape_problems = []
  for c in converted:
    files[c.source] = c.file
    ignored[c.source] = dict(c.ignored)
    notes[c.source] = list(c.notes)
    for path, value in c.arrays.items():
      if path not in flat:
        shape_problems.append(f'{path} (from {c.source}) is not a parameter of the given tree')
        continue
      if tuple(np.shape(flat[path])) != tuple(value.shape):
        shape_problems.append(f'{path} (from {c.source}) has shape {value.shape}, the given parameter '
                              f'{tuple(np.shape(flat[path]))}')
        continue
      if path in origin:
        replaced[path].append(origin[path])
      origin[path] = c.source
      flat[path] = value
    for path, why in c.by_design.items():
      by_design.setdefault(path, why)
  all_problems += shape_problems
  allowed, matched, missing = {}, set(), []
  rejected = set().union(*[c.rejected for c in converted])
  for path in flat:
    hits = [p for p in allow_random if p.fullmatch(path)]
    matched.update(p.pattern for p in hits)
    if path in origin:
      continue
    if path in by_design:
      origin[path] = 'init'
    elif hits:
      origin[path] = 'random'
      allowed[path] = hits[0].pattern
    elif path not in rejected:  # a rejected array is listed as a mismatch already
      looked = [f'{weight_report.CONFIG_KEYS[c.source]} lacks {", ".join(repr(k) for k in c.absent[path])}'
                for c in converted if path in c.absent]
      missing.append(f'  {path} {tuple(np.shape(flat[path]))}' + (f' ({"; ".join(looked)})' if looked else
                                                                  ' (no configured file provides it)'))
  unmatched = [p.pattern for p in allow_random if p.pattern not in matched]
  if unmatched:
    all_problems.append(f'config.init.allow_random patterns that match no parameter path: {unmatched} '
                        "(paths look like 'blocks_0/mlp_txt/fc1/kernel'; each pattern must match a whole path)")
  if missing:
    all_problems.append(f'missing ({len(missing)}): parameters that no file provides and '
                        'config.init.allow_random does not allow to stay random:')
    all_problems += missing
  if all_problems:
    raise weight_report.WeightMappingError('pretrained weights do not fit the model:', all_problems)
  used = {p for p in by_design if origin.get(p) == 'init'}
  report = weight_report.LoadReport(
      files=files, origin={p: origin[p] for p in flat}, replaced=dict(replaced),
      by_design={p: by_design[p] for p in used}, allowed_random=allowed, ignored=ignored,
      notes=notes, sizes={p: int(np.prod(np.shape(v))) for p, v in flat.items()})
  return traverse_util.unflatten_dict(flat, sep='/'), report


def _load_clip(config, params, patterns):
  from ivt_jax.models import clip as clip_model  # pylint: disable=g-import-not-at-top
  from ivt_jax.weights import clip as clip_weights  # pylint: disable=g-import-not-at-top
  others = [k for k in ('vit_npz', 'bert', 'ivt') if config.init.get(k)]
  if others:
    raise ValueError(f"model.head='clip' loads config.init.clip only; unset config.init.{others[0]}")
  path = config.init.get('clip')
  arrays, notes = clip_weights.read_clip_file(path)
  c = clip_weights.convert_clip(arrays, clip_model.clip_config(config), file=os.path.expanduser(path),
                                strict=False)
  c.notes[:0] = notes
  return merge(params, [c], patterns)


CONVERTERS = {'vit': weight_mapping.convert_vit, 'bert': weight_mapping.convert_bert,
              'ivt': weight_mapping.convert_ivt}


def load_pretrained(config: ml_collections.ConfigDict, params: Any) -> tuple[Any, weight_report.LoadReport]:
  """Applies config.init.vit_npz, then .bert, then .ivt onto `params` (strict; see the module docstring).

  Args:
    config: the experiment config (model shape from config.model / config.data, files from config.init).
    params: the encoder's parameter tree (fresh initialization), host arrays.

  Returns:
    (params with every loaded array replaced by a numpy array, LoadReport).
  """
  patterns = parse_allow_random(config.init.get('allow_random', ''))
  if config.model.head == 'clip':
    return _load_clip(config, params, patterns)
  if config.init.get('clip'):
    raise ValueError(f"config.init.clip is for model.head='clip' (got model.head={config.model.head!r})")
  cfg = model_lib.encoder_config(config)
  converted = []
  for source, key in (('vit', 'vit_npz'), ('bert', 'bert'), ('ivt', 'ivt')):
    path = config.init.get(key)
    if not path:
      continue
    arrays, notes = weight_files.read_arrays(path, weight_report.CONFIG_KEYS[source])
    c = CONVERTERS[source](arrays, cfg, file=os.path.expanduser(path), strict=False)
    c.notes[:0] = notes
    converted.append(c)
  return merge(params, converted, patterns)
