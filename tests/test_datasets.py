"""Dataset layer: source json parsers, TFDS builders (ArrayRecord) and prepare()."""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
import tensorflow_datasets as tfds

from configs import base
from input_pipeline import prepare as prepare_lib
from input_pipeline import text
from input_pipeline.datasets import records

CAPTIONS = [
    'A woman is wearing a gray shirt, a pair of brown pants and a pair of shoes.',
    'She is wearing a dark grey top and light colored pants.',
    'The person has short black hair and is wearing black pants, a long sleeve black top, and red sneakers.',
    'The man is wearing a grey jacket and a blue shirt.His trousers are black and his shoes are brown.',
]
SOURCE = {  # name -> (json file name, path key, splits cycled over records)
    'cuhk_pedes': ('reid_raw.json', 'file_path', ('train', 'val', 'test')),
    'icfg_pedes': ('ICFG-PEDES.json', 'file_path', ('train', 'test')),
    'rstpreid': ('data_captions.json', 'img_path', ('train', 'val', 'test')),
}


def write_image(path, seed, fmt):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  pixels = np.random.default_rng(seed).integers(0, 256, (24, 12, 3), dtype=np.uint8)
  Image.fromarray(pixels).save(path, format=fmt)


def make_source(root, name='cuhk_pedes', n=12, json_name=None, per_id=2, edit=None):
  """Writes <root>/<json> + <root>/imgs/... in the format of `name`; returns (root, items).

  Record i: id i // per_id (+1 for CUHK), split cycled per identity, PNG for odd i and JPEG for even,
  captions alternating between one and two real ones. `edit(items)` may corrupt the list before
  writing.
  """
  json_default, key, splits = SOURCE[name]
  items = []
  for i in range(n):
    sub = {'cuhk_pedes': 'CUHK01/', 'icfg_pedes': 'train/%04d/' % (i // per_id), 'rstpreid': ''}[name]
    path = f'{sub}{i:04d}_c1.' + ('png' if i % 2 else 'jpg')
    write_image(os.path.join(root, 'imgs', path), i, 'PNG' if i % 2 else 'JPEG')
    pid = i // per_id + (1 if name == 'cuhk_pedes' else 0)
    caps = [CAPTIONS[i % 4]] if name == 'icfg_pedes' else [CAPTIONS[i % 4], CAPTIONS[(i + 1) % 4]]
    items.append({'id': pid, key: path, 'captions': caps, 'split': splits[(i // per_id) % len(splits)]})
  if edit:
    edit(items)
  with open(os.path.join(root, json_name or json_default), 'w') as f:
    json.dump(items, f)
  return str(root), items


def build(name, manual_dir, data_dir, **kwargs):
  builder = tfds.builder(name, data_dir=str(data_dir), file_format='array_record', **kwargs)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir=str(manual_dir), try_download_gcs=False))
  return builder


def config_for(manual_dir, name='cuhk_pedes', **data):
  c = base.get_config()
  c.data.name = name
  c.data.manual_dir = str(manual_dir)
  c.data.tokenizer = 'sentencepiece'
  c.data.sentencepiece_vocab_size = 40
  c.data.update(data)
  return c


# ---- builders -------------------------------------------------------------------------------------


def test_cuhk_builder_round_trip(tmp_path):
  root, items = make_source(tmp_path / 'cuhk')
  build('cuhk_pedes', root, tmp_path / 'tfds')
  for split in ('train', 'val', 'test'):
    want = [it for it in items if it['split'] == split]
    source = tfds.data_source('cuhk_pedes', data_dir=str(tmp_path / 'tfds'), split=split, download=False)
    assert len(source) == len(want) == 4
    for k, it in enumerate(want):  # json order is kept
      ex = source[k]
      assert isinstance(ex['image'], bytes)
      with open(os.path.join(root, 'imgs', it['file_path']), 'rb') as f:
        assert ex['image'] == f.read()
      ex = prepare_lib.decode_example(ex)
      assert ex['image_path'] == it['file_path']
      assert ex['person_id'] == it['id']
      assert ex['captions'] == it['captions']
      mla = [text.mla_texts(c) for c in it['captions']]
      assert ex['phrases'] == [m['phrases'] for m in mla]
      assert ex['attributes'] == [m['attributes'] for m in mla]
  first = prepare_lib.decode_example(
      tfds.data_source('cuhk_pedes', data_dir=str(tmp_path / 'tfds'), split='train', download=False)[0])
  assert first['phrases'][0] == ['a pair of brown pants and a pair of shoes', 'a woman is wearing a gray shirt']


def test_build_needs_no_tensorflow(tmp_path):
  """A build in a fresh interpreter where `import tensorflow` fails."""
  root, _ = make_source(tmp_path / 'cuhk', n=4)
  code = f"""
import sys

class HideTensorFlow:  # wraps each import finder: tensorflow looks not installed
  def __init__(self, finder):
    self.finder = finder
  def __getattr__(self, name):
    return getattr(self.finder, name)
  def find_spec(self, name, path=None, target=None):
    if name == 'tensorflow' or name.startswith('tensorflow.'):
      return None
    return self.finder.find_spec(name, path, target)

sys.meta_path[:] = [HideTensorFlow(f) for f in sys.meta_path]
import importlib.util
assert importlib.util.find_spec('tensorflow') is None
import tensorflow_datasets as tfds
from input_pipeline.datasets import cuhk_pedes
b = tfds.builder('cuhk_pedes', data_dir={str(tmp_path / 'tfds')!r}, file_format='array_record')
b.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir={root!r}, try_download_gcs=False))
src = tfds.data_source('cuhk_pedes', data_dir={str(tmp_path / 'tfds')!r}, split='train', download=False)
assert len(src) == 2 and isinstance(src[0]['image'], bytes)
assert 'tensorflow' not in sys.modules
print('OK')
"""
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = subprocess.run([sys.executable, '-c', code], cwd=repo, capture_output=True, text=True, timeout=120,
                       env={**os.environ, 'PYTHONPATH': repo})
  assert out.returncode == 0 and 'OK' in out.stdout, out.stderr[-3000:]


def test_builder_error_names_file_and_record(tmp_path):
  def edit(items):
    items[5]['split'] = 'dev'
  root, _ = make_source(tmp_path / 'cuhk', edit=edit)
  with pytest.raises(records.RecordError, match=r"reid_raw\.json: record 5 \(id=3, file_path='CUHK01/0005_c1\.png'\)"
                     r": unknown split 'dev'"):
    build('cuhk_pedes', root, tmp_path / 'tfds')


def test_skip_bad_records_reports_count_and_which(tmp_path):
  def edit(items):
    items[2]['captions'] = ['  ']
    items[7]['id'] = '4'
  root, _ = make_source(tmp_path / 'cuhk', edit=edit)
  with open(os.path.join(root, 'imgs', 'CUHK01/0009_c1.png'), 'wb') as f:
    f.write(b'\x89PNG\r\n\x1a\n not an image')
  builder = build('cuhk_pedes', root, tmp_path / 'tfds', skip_bad_records=True)
  assert builder.info.metadata['num_bad_records'] == 3
  assert sum(s.num_examples for s in builder.info.splits.values()) == 12 - 3
  with open(os.path.join(builder.data_dir, 'bad_records.json')) as f:
    report = json.load(f)
  assert report['count'] == 3 and report['json_file'].endswith('reid_raw.json')
  assert [b['index'] for b in report['records']] == [2, 7, 9]
  assert report['records'][0]['reason'] == 'caption 0 is empty'
  assert report['records'][1]['person_id'] == '4' and 'must be an int' in report['records'][1]['reason']
  assert report['records'][2]['image_path'] == 'CUHK01/0009_c1.png'
  assert 'does not decode' in report['records'][2]['reason']
  # prepare() returns the same report.
  prepared = prepare_lib.prepare_here(config_for(root, skip_bad_records=True, data_dir=str(tmp_path / 'tfds')),
                                      str(tmp_path / 'work'))
  assert prepared.num_bad_records == 3 and prepared.bad_records_file.endswith('bad_records.json')
  assert sum(prepared.split_sizes.values()) == 9


# ---- validation errors ----------------------------------------------------------------------------


def _corrupt_image(root, items):
  with open(os.path.join(root, 'imgs', items[3]['file_path']), 'wb') as f:
    f.write(b'\x89PNG\r\n\x1a\n' + b'\0' * 40)


def _remove_image(root, items):
  os.remove(os.path.join(root, 'imgs', items[3]['file_path']))


@pytest.mark.parametrize('edit,after,pattern', [
    (lambda it: it[3].pop('captions'), None, r"missing field\(s\) \['captions'\]"),
    (lambda it: it[3].update(id='2'), None, r"field \"id\" must be an int, got str '2'"),
    (lambda it: it[3].update(file_path=7), None, r'field "file_path" must be a str, got int'),
    (lambda it: it[3].update(captions='A man in a red coat.'), None, r'field "captions" must be a list'),
    (lambda it: it[3].update(captions=[CAPTIONS[0], '']), None, r'caption 1 is empty'),
    (lambda it: it[3].update(split='query'), None, r"unknown split 'query'; CUHK-PEDES splits are train\|val\|test"),
    (None, _remove_image, r'image file .*0003_c1\.png does not exist'),
    (None, _corrupt_image, r'image file .*0003_c1\.png does not decode'),
], ids=['missing_field', 'id_as_str', 'path_as_int', 'captions_as_str', 'empty_caption', 'unknown_split',
        'missing_image', 'undecodable_image'])
def test_bad_record_error_names_file_and_record(tmp_path, edit, after, pattern):
  root, items = make_source(tmp_path / 'cuhk', edit=edit)
  if after:
    after(root, items)
  with pytest.raises(records.RecordError) as e:
    records.parse_records('cuhk_pedes', root)
  msg = str(e.value)
  assert msg.startswith(os.path.join(root, 'reid_raw.json') + ': record 3 (')
  assert 'id=' in msg
  assert re.search(pattern, msg), msg
  # The same file parses when bad records are skipped, and the bad one is reported.
  parsed = records.parse_records('cuhk_pedes', root, skip_bad_records=True)
  assert [b.index for b in parsed.bad] == [3] and len(parsed.records) == 11


def test_json_not_a_list(tmp_path):
  os.makedirs(tmp_path / 'c')
  with open(tmp_path / 'c' / 'reid_raw.json', 'w') as f:
    json.dump({'train': []}, f)
  with pytest.raises(records.RecordError, match=r'reid_raw\.json: expected a json list of records'):
    records.parse_records('cuhk_pedes', str(tmp_path / 'c'))


def test_duplicate_image_records_merge(tmp_path):
  def edit(items):
    items.append(dict(items[0], captions=['An extra caption for the first image.']))
    items.append(dict(items[1], id=99))
  root, items = make_source(tmp_path / 'cuhk', edit=edit)
  parsed = records.parse_records('cuhk_pedes', root, skip_bad_records=True)
  assert len(parsed.records) == 12
  assert parsed.records[0].captions == tuple(items[0]['captions']) + ('An extra caption for the first image.',)
  assert [b.index for b in parsed.bad] == [13] and 'different id/split' in parsed.bad[0].reason
  assert parsed.merged == [12]  # counted, and said at preparation


def test_merges_and_odd_captions_are_counted_and_said(tmp_path):
  def edit(items):
    items.append(dict(items[0], captions=['An extra caption for the first image.']))
    items[2]['captions'] = ['A man in a grey coat.', 'a man in a  grey coat. ']  # the same, case and spaces aside
  root, _ = make_source(tmp_path / 'cuhk', edit=edit)
  parsed = records.parse_records('cuhk_pedes', root)
  # make_source writes 4 real captions cycled over 6 people: each is on images of several of them
  assert parsed.oddities() == {'num_merged_records': 1, 'num_repeated_captions': 1, 'num_shared_captions': 4}
  said = prepare_lib.oddities_text({**parsed.oddities(), 'num_bad_records': 2})
  assert said == ('2 bad record(s) skipped; 1 record(s) merged into an earlier one naming the same image and id; '
                  '1 caption(s) repeated within a record (kept); 4 caption text(s) found on images of different '
                  'people (kept)')
  assert prepare_lib.oddities_text({'num_bad_records': 0}) == ''
  meta = build('cuhk_pedes', root, str(tmp_path / 'data')).info.metadata
  assert (meta['num_merged_records'], meta['num_repeated_captions'], meta['num_shared_captions']) == (1, 1, 4)


# ---- formats --------------------------------------------------------------------------------------


@pytest.mark.parametrize('json_name', ['ICFG-PEDES.json', 'ICFG_PEDES.json'])
def test_icfg_json_names_and_val_carve(tmp_path, json_name):
  root, items = make_source(tmp_path / 'icfg', 'icfg_pedes', n=40, json_name=json_name)
  train_ids = sorted({it['id'] for it in items if it['split'] == 'train'})
  assert len(train_ids) == 10
  parsed = records.parse_records('icfg_pedes', root, val_fraction_ids=0.2)
  assert parsed.json_file.endswith(json_name)
  val_ids = sorted({r.person_id for r in parsed.records if r.split == 'val'})
  # Sorted ids, permuted with the fixed seed; the first round(0.2 * 10) = 2 become val.
  perm = np.random.default_rng(records.VAL_SEED).permutation(len(train_ids))
  assert val_ids == sorted(train_ids[i] for i in perm[:2])
  assert not {r.person_id for r in parsed.records if r.split == 'train'} & set(val_ids)
  assert {r.person_id for r in parsed.records if r.split == 'test'} == {it['id'] for it in items
                                                                        if it['split'] == 'test'}
  assert records.parse_records('icfg_pedes', root, val_fraction_ids=0.2).records == parsed.records
  # The default is 5% of the train ids (at least one id); 0 keeps them all in train.
  default = records.parse_records('icfg_pedes', root)
  assert len({r.person_id for r in default.records if r.split == 'val'}) == 1
  none = records.parse_records('icfg_pedes', root, val_fraction_ids=0.0)
  assert not [r for r in none.records if r.split == 'val']
  # The builder option reaches the build and is recorded.
  builder = build('icfg_pedes', root, tmp_path / 'tfds', val_fraction_ids=0.2)
  assert builder.info.metadata['val_fraction_ids'] == 0.2
  assert builder.info.metadata['source_json'] == json_name
  val = tfds.data_source('icfg_pedes', data_dir=str(tmp_path / 'tfds'), split='val', download=False)
  assert len(val) == 4 and sorted({int(val[i]['person_id']) for i in range(4)}) == val_ids
  assert val[0]['image_path'].decode().startswith('train/')


def test_icfg_carve_is_a_fixed_function_of_the_ids():
  ids = list(range(100, 300))
  a = records.carve_val_ids(ids, 0.05)
  assert a == records.carve_val_ids(reversed(ids + ids), 0.05) and len(a) == 10
  assert records.carve_val_ids(ids, 0.0) == set()
  with pytest.raises(ValueError, match='val_fraction_ids'):
    records.carve_val_ids(ids, 1.0)


def test_rstpreid_format(tmp_path):
  root, items = make_source(tmp_path / 'rstp', 'rstpreid', n=9, per_id=1)
  builder = build('rstpreid', root, tmp_path / 'tfds')
  assert {s: builder.info.splits[s].num_examples for s in ('train', 'val', 'test')} == {
      'train': 3, 'val': 3, 'test': 3}
  source = tfds.data_source('rstpreid', data_dir=str(tmp_path / 'tfds'), split='val', download=False)
  ex = prepare_lib.decode_example(source[2])
  assert ex['image_path'] == items[7]['img_path'] and ex['person_id'] == 7
  assert ex['captions'] == items[7]['captions'] and len(ex['phrases']) == 2
  # A CUHK-style record in an RSTPReid file names the missing key.
  def edit(it):
    it[1]['file_path'] = it[1].pop('img_path')
  root2, _ = make_source(tmp_path / 'rstp2', 'rstpreid', n=3, per_id=1, edit=edit)
  with pytest.raises(records.RecordError, match=r"data_captions\.json: record 1 \(id=1\): missing field\(s\) "
                                                r"\['img_path'\]"):
    records.parse_records('rstpreid', root2)


# ---- prepare --------------------------------------------------------------------------------------


def test_missing_manual_dir_message(tmp_path):
  missing = str(tmp_path / 'nowhere' / 'CUHK-PEDES')
  with pytest.raises(records.ManualDirError) as e:
    prepare_lib.prepare_here(config_for(missing), str(tmp_path / 'work'))
  msg = str(e.value)
  assert f'config.data.manual_dir={missing!r}' in msg and 'does not exist' in msg
  assert os.path.join(missing, 'reid_raw.json') in msg and os.path.join(missing, 'imgs') in msg
  assert 'on request' in msg
  with pytest.raises(records.ManualDirError, match=r'(?s)does not exist.*reid_raw\.json'):
    build('cuhk_pedes', missing, tmp_path / 'tfds')  # the builder alone says the same
  os.makedirs(tmp_path / 'icfg')
  with pytest.raises(records.ManualDirError, match=r'ICFG-PEDES\.json / ICFG_PEDES\.json not found in'):
    prepare_lib.prepare_here(config_for(tmp_path / 'icfg', 'icfg_pedes'), str(tmp_path / 'work'))


def test_prepare_builds_once_and_opens(tmp_path, capfd, monkeypatch):
  monkeypatch.delenv('IVT_VERBOSE', raising=False)
  root, items = make_source(tmp_path / 'cuhk')
  config = config_for(root)
  prepared = prepare_lib.prepare(config, str(tmp_path / 'work'), workers=1)
  bars = capfd.readouterr().err
  for split in ('train', 'val', 'test'):  # the bars count the records written, TFDS's "0 examples" is gone
    assert f'cuhk_pedes: writing {split}: 100%' in bars and '4/4' in bars, bars
  assert 'Generating train examples' not in bars and '0 examples' not in bars, bars
  assert prepared.data_dir == str(tmp_path / 'work' / 'tfds')
  assert prepared.split_sizes == {'train': 4, 'val': 4, 'test': 4}
  assert prepared.tokenizer_path == os.path.join(prepared.data_dir, 'cuhk_pedes', 'spm_bpe_40.model')
  assert os.path.isfile(prepared.tokenizer_path) and prepared.num_bad_records == 0
  stamp = {p: os.path.getmtime(os.path.join(prepared.dataset_dir, p)) for p in os.listdir(prepared.dataset_dir)}
  stamp['spm'] = os.path.getmtime(prepared.tokenizer_path)
  # Second call: the source may even be gone; nothing is rebuilt.
  os.rename(root, root + '.moved')
  again = prepare_lib.prepare(config, str(tmp_path / 'work'), workers=1)
  assert again == prepared
  assert stamp == {**{p: os.path.getmtime(os.path.join(prepared.dataset_dir, p))
                      for p in os.listdir(prepared.dataset_dir)}, 'spm': os.path.getmtime(prepared.tokenizer_path)}
  test = prepare_lib.open_split(prepared, 'test')
  assert len(test) == 4 and int(test[0]['person_id']) == items[4]['id']
  with open(os.path.join(prepared.data_dir, 'cuhk_pedes', prepare_lib.MARKER_FILE)) as f:
    assert json.load(f)['prepared']['split_sizes'] == prepared.split_sizes
  # Another dataset is another build, from its own source.
  config.data.name = 'icfg_pedes'
  with pytest.raises(records.ManualDirError, match=r'config\.data\.manual_dir'):
    prepare_lib.prepare_here(config, str(tmp_path / 'work'))


def test_prepare_option_mismatch_and_tokenizer_errors(tmp_path):
  root, _ = make_source(tmp_path / 'icfg', 'icfg_pedes', n=20)
  config = config_for(root, 'icfg_pedes', val_fraction_ids=0.25, data_dir=str(tmp_path / 'tfds'))
  prepared = prepare_lib.prepare_here(config, str(tmp_path / 'work'))
  assert prepared.split_sizes == {'train': 8, 'val': 2, 'test': 10}
  config.data.val_fraction_ids = 0.5
  with pytest.raises(ValueError, match=r'prepared with val_fraction_ids=0\.25, but config\.data\.val_fraction_ids'):
    prepare_lib.prepare_here(config, str(tmp_path / 'work'))
  config.data.val_fraction_ids = 0.25
  config.data.tokenizer = 'wordpiece'
  with pytest.raises(FileNotFoundError, match=r'config\.data\.vocab_file'):
    prepare_lib.prepare_here(config, str(tmp_path / 'work'))
  vocab = tmp_path / 'vocab.txt'
  vocab.write_text('[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\nman\n')
  config.data.vocab_file = str(vocab)
  assert prepare_lib.prepare_here(config, str(tmp_path / 'work')).tokenizer_path == str(vocab)
  with pytest.raises(ValueError, match=r"no 'val' split"):
    prepare_lib.open_split(prepare_lib.PreparedData(**{**prepared.to_json(), 'split_sizes': {'val': 0}}), 'val')


def test_prepare_generates_synthpedes_when_enabled(tmp_path):
  manual = tmp_path / 'synth'
  config = config_for(manual)
  config.data.synthetic.update(enabled=True, num_ids=10, images_per_id=2, image_size=(64, 32))
  prepared = prepare_lib.prepare_here(config, str(tmp_path / 'work'))
  with open(manual / 'reid_raw.json') as f:
    items = json.load(f)
  sizes = {s: sum(it['split'] == s for it in items) for s in ('train', 'val', 'test')}
  assert prepared.split_sizes == sizes and sum(sizes.values()) == 20 and min(sizes.values()) > 0
  train = [it for it in items if it['split'] == 'train']
  source = prepare_lib.open_split(prepared, 'train')
  ex = prepare_lib.decode_example(source[len(source) - 1])
  assert ex['image_path'] == train[-1]['file_path'] and ex['captions'] == train[-1]['captions']
  with open(manual / 'imgs' / train[-1]['file_path'], 'rb') as f:
    assert ex['image'] == f.read()
  config.data.name = 'rstpreid'
  config.data.data_dir = str(tmp_path / 'other')
  with pytest.raises(ValueError, match=r"synthetic\.enabled .* set config\.data\.name='cuhk_pedes'"):
    prepare_lib.prepare_here(config, str(tmp_path / 'work'))


def test_other_processes_wait_for_the_marker(tmp_path, monkeypatch):
  import jax  # pylint: disable=g-import-not-at-top
  root, _ = make_source(tmp_path / 'cuhk', n=6)
  config = config_for(root)
  monkeypatch.setattr(jax, 'process_index', lambda: 1)
  with pytest.raises(TimeoutError, match=r'no marker .*prepared\.json from process 0'):
    prepare_lib.prepare(config, str(tmp_path / 'work'), wait_timeout_s=0.2, poll_s=0.1)
  monkeypatch.setattr(jax, 'process_index', lambda: 0)
  prepared = prepare_lib.prepare(config, str(tmp_path / 'work'), workers=1)
  monkeypatch.setattr(jax, 'process_index', lambda: 1)
  assert prepare_lib.prepare(config, str(tmp_path / 'work'), wait_timeout_s=5, poll_s=0.1) == prepared
  config.data.sentencepiece_vocab_size = 41  # another tokenizer: the marker no longer matches
  with pytest.raises(TimeoutError):
    prepare_lib.prepare(config, str(tmp_path / 'work'), wait_timeout_s=0.2, poll_s=0.1)


@pytest.mark.slow
def test_process_pool_matches_in_process(tmp_path, monkeypatch):
  """Image checks and MLA texts in 2 spawned processes give what one process gives (about 10 s)."""
  monkeypatch.setattr(records, 'POOL_MIN_IMAGES', 0)
  monkeypatch.setattr(records, 'POOL_MIN_CAPTIONS', 0)
  def edit(items):  # 300 distinct captions
    for i, item in enumerate(items):
      item['captions'] = [f'{c} Seen at place {i}.' for c in item['captions']]
  root, _ = make_source(tmp_path / 'cuhk', n=150, edit=edit)
  _corrupt_image(root, [None, None, None, {'file_path': 'CUHK01/0131_c1.png'}])
  one = records.parse_records('cuhk_pedes', root, skip_bad_records=True)
  with records.process_pool(2) as pool:
    two = records.parse_records('cuhk_pedes', root, skip_bad_records=True, workers=pool)
    assert two.records == one.records and two.bad == one.bad and [b.index for b in two.bad] == [131]
    assert records.mla_json_for(two.records, pool) == records.mla_json_for(one.records, 1)


# ---- prepared data follows its source ---------------------------------------------------------------------


def test_prepared_data_follows_its_source(tmp_path, caplog):
  """A build that skipped a bad record, the record fixed, the same workdir again: prepared again with it, saying
  why; the workdir pointed at another folder: prepared from that one. Unchanged: reused as it is."""
  def blank(items):
    items[3]['captions'] = ['  ']
  root, _ = make_source(tmp_path / 'cuhk', edit=blank)
  config = config_for(root, skip_bad_records=True)
  work = str(tmp_path / 'work')
  first = prepare_lib.prepare_here(config, work)
  assert first.num_bad_records == 1 and sum(first.split_sizes.values()) == 11
  assert os.path.isfile(os.path.join(first.dataset_dir, 'source.json'))
  made = os.path.getmtime(os.path.join(first.dataset_dir, 'dataset_info.json'))
  assert prepare_lib.prepare_here(config, work) == first  # the same source: reused
  assert os.path.getmtime(os.path.join(first.dataset_dir, 'dataset_info.json')) == made
  make_source(tmp_path / 'cuhk')  # the record fixed (every image rewritten the same)
  caplog.set_level('WARNING')
  fixed = prepare_lib.prepare_here(config, work)
  assert fixed.num_bad_records == 0 and sum(fixed.split_sizes.values()) == 12
  assert re.search(r'was prepared from another source \(reid_raw\.json changed \(\d+ -> \d+ bytes\).*\): '
                   r'preparing it again', caplog.text), caplog.text
  other, _ = make_source(tmp_path / 'other', n=8)
  config.data.manual_dir = other
  caplog.clear()
  moved = prepare_lib.prepare_here(config, work)
  assert sum(moved.split_sizes.values()) == 8
  assert f'the folder was {root}, now {other}' in caplog.text
  assert os.path.isfile(moved.tokenizer_path)  # trained again on the new captions


def test_what_can_be_checked_before_preparing_is(tmp_path, monkeypatch):
  """A missing vocabulary file and a disk too small are said before anything is built."""
  root, _ = make_source(tmp_path / 'cuhk')
  config = config_for(root, tokenizer='wordpiece', vocab_file=str(tmp_path / 'no_vocab.txt'))
  work = str(tmp_path / 'work')
  with pytest.raises(FileNotFoundError, match=r'config\.data\.vocab_file'):
    prepare_lib.prepare_here(config, work)
  assert not os.path.exists(os.path.join(work, 'tfds', 'cuhk_pedes', '1.0.0'))
  config.data.tokenizer = 'sentencepiece'
  import shutil
  from collections import namedtuple
  usage = namedtuple('usage', 'total used free')
  monkeypatch.setattr(shutil, 'disk_usage', lambda path: usage(10 << 20, 9 << 20, 1 << 20))
  with pytest.raises(OSError, match=r'config\.data\.data_dir: preparing .* needs about 0\.\d+ GiB in .*; its disk '
                                    r'has 0\.00 GiB free'):
    prepare_lib.prepare_here(config, work)
  assert not os.path.exists(os.path.join(work, 'tfds', 'cuhk_pedes', '1.0.0'))
