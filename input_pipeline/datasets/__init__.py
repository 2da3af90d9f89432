"""TFDS builders for text-based person retrieval datasets, built from the user's manual copy.

`PedesBuilder` holds everything the three builders share; cuhk_pedes.py, icfg_pedes.py and
rstpreid.py only name their source format (records.py). One example per image:

  image        bytes            the image file's bytes, PNG/JPEG as stored (decode with PIL)
  image_path   text             path relative to <manual_dir>/imgs/
  person_id    int64            the dataset's identity number
  captions     sequence(text)   the descriptions
  phrases      sequence(text)   per caption, a JSON list: text.mla_texts(caption)['phrases']
  attributes   sequence(text)   per caption, a JSON list: text.mla_texts(caption)['attributes']

Splits train, val, test (ICFG-PEDES: val carved from train ids, see records.py). Read back with
`tfds.data_source(name, data_dir=..., split=...)` (ArrayRecord): text values come back as utf-8
bytes; `input_pipeline.prepare.decode_example` turns an example into Python strings and lists.

Builder options are constructor keyword arguments (`tfds.builder(name, data_dir=..., **kwargs)`):
  skip_bad_records  False: a bad record stops the build with an error naming file and record;
                    True: bad records are left out, logged, listed in `<version dir>/bad_records.json`
                    and counted in the dataset metadata (`builder.info.metadata`).
  val_fraction_ids  ICFG-PEDES: fraction of training ids carved into val (None: 5%).
  workers           processes for image checks and MLA texts (1: in this process; more are
                    spawned, so a script must guard its entry point with `if __name__ == '__main__':`).
Keyword arguments (not BuilderConfigs) because they change how the data is built, not where it is
stored: reading back needs none of them, so `tfds.data_source(name, data_dir=...)` opens the data
whatever options built it; the options used are recorded in `builder.info.metadata` and prepare.py
checks them against the configuration. Building needs no TensorFlow: images are stored as bytes.
"""
import json
import logging
import os
from typing import Any

from etils import epath
import numpy as np
import tensorflow_datasets as tfds
import tqdm

from input_pipeline.datasets import records

SPLITS = ('train', 'val', 'test')
BAD_RECORDS_FILE = 'bad_records.json'


def features() -> tfds.features.FeaturesDict:
  return tfds.features.FeaturesDict({
      'image': tfds.features.Tensor(shape=(), dtype=np.object_),
      'image_path': tfds.features.Text(),
      'person_id': tfds.features.Scalar(dtype=np.int64),
      'captions': tfds.features.Sequence(tfds.features.Text()),
      'phrases': tfds.features.Sequence(tfds.features.Text()),
      'attributes': tfds.features.Sequence(tfds.features.Text()),
  })


class PedesBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Shared builder: records.parse_records -> MLA texts -> one example per image."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Images as encoded bytes, captions with precomputed MLA texts.'}
  SOURCE = ''  # records.FORMATS key, set by each builder

  def __init__(self, *, skip_bad_records: bool = False, val_fraction_ids: float | None = None,
               workers: int = 1, **kwargs):
    self._skip_bad_records = bool(skip_bad_records)
    self._val_fraction_ids = val_fraction_ids
    self._workers = max(1, int(workers))
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    fmt = records.get_format(self.SOURCE)
    return self.dataset_info_from_configs(
        description=f'{fmt.title}: person images with natural-language descriptions, one example per '
                    'image, with precomputed phrase-level and attribute-level (MLA) texts.',
        features=features(),
        metadata=tfds.core.MetadataDict(),
        disable_shuffling=True,
    )

  def _manual_dir(self, dl_manager) -> str:
    try:
      path = os.fspath(dl_manager.manual_dir)
    except AssertionError as e:  # tfds: missing or empty manual dir
      raise records.ManualDirError(f'{e}\n{records.expected_layout(self.SOURCE, "<manual_dir>")}') from None
    records.find_json(self.SOURCE, path)  # names the expected files when the json is absent
    return path

  def _split_generators(self, dl_manager):
    manual_dir = self._manual_dir(dl_manager)
    with records.process_pool(self._workers) as pool:
      parsed = records.parse_records(self.SOURCE, manual_dir, skip_bad_records=self._skip_bad_records,
                                     val_fraction_ids=self._val_fraction_ids, workers=pool)
      mla = records.mla_json_for(parsed.records, workers=pool)
    fraction = None
    if 'val' not in records.get_format(self.SOURCE).splits:
      fraction = (records.DEFAULT_ICFG_VAL_FRACTION if self._val_fraction_ids is None
                  else float(self._val_fraction_ids))
    self.info.metadata.update({
        'source_json': os.path.basename(parsed.json_file),
        'manual_dir': os.path.dirname(parsed.json_file),
        'skip_bad_records': self._skip_bad_records,
        'num_bad_records': len(parsed.bad),
        **parsed.oddities(),
        'val_fraction_ids': fraction,
        'val_seed': records.VAL_SEED if fraction is not None else None,
        'split_sizes': parsed.split_sizes(),
    })
    if self._skip_bad_records:
      # self.data_dir is the incomplete build dir here; it becomes the version dir on success.
      (epath.Path(self.data_dir) / BAD_RECORDS_FILE).write_text(json.dumps(parsed.bad_report(), indent=1))
    by_split: dict[str, list[int]] = {s: [] for s in SPLITS}
    for i, r in enumerate(parsed.records):
      by_split[r.split].append(i)
    for split, idx in by_split.items():
      if not idx:
        logging.warning('%s: split %r has no examples.', parsed.json_file, split)
    return {split: self._generate_examples([(parsed.records[i], mla[i]) for i in idx], split)
            for split, idx in by_split.items() if idx}

  def _generate_examples(self, items: list[tuple[records.Record, tuple[list[str], list[str]]]], split: str = ''):
    # The bar counts the records written (TFDS's own bars are off unless IVT_VERBOSE: see prepare.prepare_here).
    bar = tqdm.tqdm(items, desc=f'{self.name}: writing {split}', unit=' records', mininterval=1.0, leave=True)
    for record, (phrases, attributes) in bar:
      with open(record.file, 'rb') as f:
        image = f.read()
      yield record.image_path, {
          'image': image,
          'image_path': record.image_path,
          'person_id': record.person_id,
          'captions': list(record.captions),
          'phrases': phrases,
          'attributes': attributes,
      }


def decode_json_list(value: Any) -> list[str]:
  """One stored 'phrases'/'attributes' entry (bytes or str JSON) -> list of str."""
  if isinstance(value, bytes):
    value = value.decode('utf-8')
  return json.loads(value)
