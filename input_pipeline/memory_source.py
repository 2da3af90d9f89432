"""An in-memory training source of SynthPEDES records and a tokenizer for it: input speed measurements and
benchmarks run the real pipeline without a prepared dataset (nothing downloaded, nothing written but a
tokenizer model in a directory the caller gives).

Records have the prepared datasets' fields (input_pipeline.pipeline's module docstring): encoded image bytes
(PNG like the generator, or JPEG like the real datasets), path, person id, captions and their MLA phrase and
attribute lists as JSON.
"""
from __future__ import annotations

import io
import json
import os

import numpy as np

from input_pipeline import synthetic
from input_pipeline import text
from input_pipeline import tokenizers

FORMATS = ('png', 'jpeg')


def synthetic_source(num_ids: int, images_per_id: int, image_hw, seed: int = 0,
                     image_format: str = 'png') -> list[dict]:
  """Training records of `num_ids` SynthPEDES identities x `images_per_id` images drawn at image_hw = (H, W)."""
  if image_format not in FORMATS:
    raise ValueError(f'image_format must be one of {FORMATS}, got {image_format!r}')
  if num_ids < 1 or images_per_id < 1:
    raise ValueError(f'need at least one identity and one image each, got {num_ids} x {images_per_id}')
  identities = synthetic.make_identities(num_ids, seed=seed, val_ids=0, test_ids=0)
  records = []
  for a in identities:
    for n in range(images_per_id):
      rng = np.random.default_rng([seed, a['id'], n, 1])
      facing = synthetic.sample_view(rng)
      image = synthetic.render(a, facing, tuple(image_hw), [seed, a['id'], n, 0])
      buf = io.BytesIO()
      if image_format == 'png':
        image.save(buf, format='PNG', compress_level=6)
      else:
        image.save(buf, format='JPEG', quality=90)
      captions = synthetic.captions_for_image(a, facing, rng)
      levels = text.mla_texts_batch(captions)
      records.append(dict(
          image=buf.getvalue(), image_path=f'train/{a["id"]:04d}_{n:02d}.{image_format}',
          person_id=a['id'],
          captions=[c.encode() for c in captions],
          phrases=[json.dumps(m['phrases']).encode() for m in levels],
          attributes=[json.dumps(m['attributes']).encode() for m in levels]))
  return records


def tokenizer_for(config, records, tmpdir: str):
  """The config's WordPiece vocabulary (data.vocab_file) when it is 'wordpiece' and the file exists, else a
  SentencePiece model (data.sentencepiece_vocab_size, data.sentencepiece_model_type) trained on the records'
  captions into tmpdir."""
  vocab = os.path.expanduser(config.data.vocab_file)
  if config.data.tokenizer == 'wordpiece' and os.path.isfile(vocab):
    return tokenizers.load_tokenizer('wordpiece', vocab)
  caps = [c.decode() for r in records for c in r['captions']]
  path = tokenizers.train_sentencepiece(caps, os.path.join(tmpdir, 'sp'),
                                        int(config.data.sentencepiece_vocab_size),
                                        config.data.sentencepiece_model_type)
  return tokenizers.load_tokenizer('sentencepiece', path)
