"""TFDS builder `rstpreid`: RSTPReid from the manual dir.

Layout: <manual_dir>/data_captions.json + <manual_dir>/imgs/<img_path> (records.py); features and
options: input_pipeline/datasets/__init__.py. Splits train/val/test as in data_captions.json.
"""
from input_pipeline.datasets import PedesBuilder
from input_pipeline.datasets import records


class Rstpreid(PedesBuilder):
  """RSTPReid: 20,505 images of 4,101 identities, two captions per image."""

  SOURCE = 'rstpreid'
  MANUAL_DOWNLOAD_INSTRUCTIONS = records.expected_layout(SOURCE, '<manual_dir>')
