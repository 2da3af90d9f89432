"""TFDS builder `cuhk_pedes`: CUHK-PEDES (and SynthPEDES, same layout) from the manual dir.

Layout: <manual_dir>/reid_raw.json + <manual_dir>/imgs/<file_path> (records.py); features and
options: input_pipeline/datasets/__init__.py. Splits train/val/test as in reid_raw.json.
"""
from input_pipeline.datasets import PedesBuilder
from input_pipeline.datasets import records


class CuhkPedes(PedesBuilder):
  """CUHK-PEDES: 40,206 images of 13,003 identities, about two captions per image."""

  SOURCE = 'cuhk_pedes'
  MANUAL_DOWNLOAD_INSTRUCTIONS = records.expected_layout(SOURCE, '<manual_dir>')
