"""TFDS builder `icfg_pedes`: ICFG-PEDES from the manual dir.

Layout: <manual_dir>/ICFG-PEDES.json (or ICFG_PEDES.json) + <manual_dir>/imgs/<file_path>
(records.py); features and options: input_pipeline/datasets/__init__.py. The source has train and
test only: val is carved from the training identities (`val_fraction_ids`, default 5% of the train
ids, a permutation with a fixed seed of the sorted ids; records.carve_val_ids).
"""
from input_pipeline.datasets import PedesBuilder
from input_pipeline.datasets import records


class IcfgPedes(PedesBuilder):
  """ICFG-PEDES: 54,522 images of 4,102 identities, one caption per image."""

  SOURCE = 'icfg_pedes'
  MANUAL_DOWNLOAD_INSTRUCTIONS = records.expected_layout(SOURCE, '<manual_dir>')
