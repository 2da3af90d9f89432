"""SynthPEDES: a procedurally drawn pedestrian dataset in the CUHK-PEDES layout.

Writes, under an output directory DIR, exactly what the real CUHK-PEDES ships:

  DIR/reid_raw.json                 [{"split", "captions": [str, str], "file_path", "processed_tokens", "id"}]
  DIR/imgs/<split>/<pid>_<n>.png    file_path is relative to DIR/imgs, e.g. "train/0001_00.png"
  DIR/synthpedes.json               the generation parameters and every identity's attributes

so the training and evaluation code read it through the CUHK-PEDES parser, unchanged.

Every identity is one fixed attribute set (gender, hair, upper garment with colour, pattern and sleeves,
lower garment, shoes, bag, hat, glasses, umbrella or scarf) unique among all identities; a fraction of
identities are hard negatives: a copy of another identity of the same split with one or two described
attributes changed. Each image draws the person (PIL + numpy) in a new pose, facing, position, background,
lighting, sometimes blurred or partly occluded; its two captions are sampled independently in the style
of CUHK-PEDES and name only drawn attributes, with colour names from a palette of 12 well separated colours.

Everything is deterministic given the arguments: identities from `seed`, each image from its own seed
(seed, split, the identity's position within its split, image index), so `workers` changes the speed and never
the bytes, and the val and test splits stay the same when the number of training identities changes.

CLI: python -m input_pipeline.synthetic --out DIR [--ids 500 --images-per-id 4 --eval-images-per-id 4 --seed 0
     --height 192 --width 64 --val-ids V --test-ids T --hard-negative-fraction 0.25 --workers 2]

The package, one subject per module (imports point down this list):
  vocabulary   colours, garments, attribute groups, generation constants
  identities   attribute sets, consistency rules, hard negatives
  captions     CUHK-PEDES-style captions of drawn attributes
  figure       the person, drawn part by part
  scene        background, occluders, lighting: one finished image
  writer       the dataset on disk (workers, reid_raw.json, synthpedes.json) and the CLI
"""
from input_pipeline.synthetic.vocabulary import (
    COLOURS, DEFAULT_IMAGE_SIZE, GROUPS, JSON_FILE, MIN_IMAGE_SIZE, PARAMS_FILE, SPLITS, VERSION)
from input_pipeline.synthetic.identities import (
    attribute_diff, check_identity, described_key, make_identities, split_sizes, weighted_choice)
from input_pipeline.synthetic.captions import caption, captions_for_image, colour_words, processed_tokens
from input_pipeline.synthetic.scene import render, sample_view
from input_pipeline.synthetic.writer import generate, is_complete, load_identities, main

__all__ = [
    'COLOURS', 'DEFAULT_IMAGE_SIZE', 'GROUPS', 'JSON_FILE', 'MIN_IMAGE_SIZE', 'PARAMS_FILE', 'SPLITS', 'VERSION',
    'attribute_diff', 'check_identity', 'described_key', 'make_identities', 'split_sizes', 'weighted_choice',
    'caption', 'captions_for_image', 'colour_words', 'processed_tokens', 'render', 'sample_view', 'generate',
    'is_complete', 'load_identities', 'main',
]
