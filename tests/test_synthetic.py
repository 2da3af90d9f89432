"""SynthPEDES: the CUHK-PEDES record format, determinism, splits, hard negatives, captions, CLI."""
import io
import json
import os
import re
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest

from input_pipeline import synthetic
from input_pipeline.datasets import records as records_lib

SIZE = (64, 32)  # (H, W)
ARGS = dict(num_ids=12, images_per_id=2, seed=3, image_size=SIZE, val_ids=2, test_ids=2,
            hard_negative_fraction=0.25)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tree(out_dir):
  """{relative path: bytes} of everything generated under out_dir."""
  files = {}
  for root, _, names in os.walk(out_dir):
    for name in names:
      path = os.path.join(root, name)
      with open(path, 'rb') as f:
        files[os.path.relpath(path, out_dir)] = f.read()
  return files


@pytest.fixture(scope='module')
def generated(tmp_path_factory):
  out = str(tmp_path_factory.mktemp('synth') / 'a')
  path = synthetic.generate(out, **ARGS)
  with open(path) as f:
    return out, json.load(f)


def test_records_have_the_cuhk_pedes_format(generated):
  out, recs = generated
  assert len(recs) == ARGS['num_ids'] * ARGS['images_per_id']
  assert sorted({r['id'] for r in recs}) == list(range(1, ARGS['num_ids'] + 1))
  for r in recs:
    assert list(r) == ['split', 'captions', 'file_path', 'processed_tokens', 'id']
    assert r['split'] in ('train', 'val', 'test') and isinstance(r['id'], int)
    assert re.fullmatch(rf"{r['split']}/{r['id']:04d}_\d\d\.png", r['file_path'])
    assert len(r['captions']) == 2 and all(isinstance(c, str) and len(c) > 10 for c in r['captions'])
    assert r['captions'][0] != r['captions'][1]
    words = [re.findall(r"[a-z0-9]+(?:['-][a-z0-9]+)*", c.lower()) for c in r['captions']]
    assert r['processed_tokens'] == words
    with open(os.path.join(out, 'imgs', r['file_path']), 'rb') as f:
      data = f.read()
    assert data[:8] == b'\x89PNG\r\n\x1a\n'
    with Image.open(io.BytesIO(data)) as im:
      assert im.format == 'PNG' and im.mode == 'RGB' and im.size == (SIZE[1], SIZE[0])
      assert np.asarray(im).std() > 10  # a drawn scene, not a flat fill


def test_parsed_by_the_cuhk_pedes_parser(generated):
  out, recs = generated
  result = records_lib.parse_records('cuhk_pedes', out)
  assert not result.bad
  assert len(result.records) == len(recs)
  assert {(r.image_path, r.person_id, r.split) for r in result.records} == {
      (r['file_path'], r['id'], r['split']) for r in recs}


def test_splits_are_disjoint_by_identity(generated):
  out, recs = generated
  ids = {s: {r['id'] for r in recs if r['split'] == s} for s in synthetic.SPLITS}
  assert [len(ids[s]) for s in synthetic.SPLITS] == [8, 2, 2]
  assert not (ids['train'] & ids['val'] or ids['train'] & ids['test'] or ids['val'] & ids['test'])
  # Each identity's images all live in its split's folder.
  for r in recs:
    assert r['file_path'].startswith(r['split'] + '/')


def test_deterministic_and_seed_dependent(generated, tmp_path):
  out, _ = generated
  first = _tree(out)
  synthetic.generate(str(tmp_path / 'same'), **ARGS)
  assert _tree(str(tmp_path / 'same')) == first
  synthetic.generate(str(tmp_path / 'other'), **{**ARGS, 'seed': 4})
  other = _tree(str(tmp_path / 'other'))
  assert other['reid_raw.json'] != first['reid_raw.json']
  pngs = [k for k in first if k.endswith('.png')]
  assert sum(other[k] != first[k] for k in pngs if k in other) >= 0.9 * len(pngs)


def test_workers_give_identical_bytes(generated, tmp_path):
  out, _ = generated
  synthetic.generate(str(tmp_path / 'w2'), **ARGS, workers=2)
  assert _tree(str(tmp_path / 'w2')) == _tree(out)


def test_skips_when_parameters_match_and_regenerates_otherwise(tmp_path):
  out = str(tmp_path / 's')
  args = {**ARGS, 'num_ids': 4, 'images_per_id': 1, 'val_ids': 1, 'test_ids': 1}
  path = synthetic.generate(out, **args)
  stamp = os.stat(path).st_mtime_ns
  assert synthetic.generate(out, **args) == path
  assert os.stat(path).st_mtime_ns == stamp
  synthetic.generate(out, **{**args, 'num_ids': 5})
  with open(path) as f:
    assert len({r['id'] for r in json.load(f)}) == 5
  assert len(os.listdir(os.path.join(out, 'imgs', 'train'))) == 3  # no stale images of the old run


def test_eval_images_per_id_sets_the_val_and_test_images(tmp_path):
  args = {**ARGS, 'num_ids': 6, 'images_per_id': 1, 'val_ids': 1, 'test_ids': 2}
  with open(synthetic.generate(str(tmp_path / 'e'), **args, eval_images_per_id=3)) as f:
    recs = json.load(f)
  per_id = {}
  for r in recs:
    per_id.setdefault((r['split'], r['id']), []).append(r['file_path'])
  assert sorted(len(v) for (s, _), v in per_id.items() if s == 'train') == [1, 1, 1]
  assert sorted(len(v) for (s, _), v in per_id.items() if s != 'train') == [3, 3, 3]
  # The same identities and training images as without it: only val/test identities gain images.
  with open(synthetic.generate(str(tmp_path / 'same'), **args)) as f:
    plain = json.load(f)
  assert [r for r in plain if r['split'] == 'train'] == [r for r in recs if r['split'] == 'train']
  with pytest.raises(ValueError, match='eval_images_per_id'):
    synthetic.generate(str(tmp_path / 'bad'), **args, eval_images_per_id=0)


def test_more_training_identities_leave_val_and_test_unchanged(tmp_path):
  small = {**ARGS, 'num_ids': 8, 'val_ids': 2, 'test_ids': 2}
  with open(synthetic.generate(str(tmp_path / 'small'), **small)) as f:
    a = json.load(f)
  with open(synthetic.generate(str(tmp_path / 'large'), **{**small, 'num_ids': 11})) as f:
    b = json.load(f)
  def evaluation(recs, out):  # ids shift with the training split's size; everything else stays
    first = min(r['id'] for r in recs if r['split'] != 'train')
    rows = []
    for r in recs:
      if r['split'] != 'train':
        with open(os.path.join(out, 'imgs', r['file_path']), 'rb') as f:
          rows.append((r['split'], r['id'] - first, r['captions'], f.read()))
    return rows
  assert evaluation(a, tmp_path / 'small') == evaluation(b, tmp_path / 'large')
  assert len([r for r in b if r['split'] == 'train']) > len([r for r in a if r['split'] == 'train'])


def test_training_hard_negatives_alone_leave_val_and_test_unchanged():
  from input_pipeline.synthetic import identities
  base = identities.make_identities(200, seed=3, val_ids=20, test_ids=40, hard_negative_fraction=0.25)
  more = identities.make_identities(200, seed=3, val_ids=20, test_ids=40, hard_negative_fraction=0.25,
                                    train_hard_negative_fraction=0.5)
  same = identities.make_identities(200, seed=3, val_ids=20, test_ids=40, hard_negative_fraction=0.25,
                                    train_hard_negative_fraction=0.25)
  assert same == base
  evaluation = lambda ids: [a for a in ids if a['split'] != 'train']
  assert evaluation(more) == evaluation(base)
  hard = lambda ids: sum(a['hard_negative_of'] is not None for a in ids if a['split'] == 'train')
  assert (hard(base), hard(more)) == (35, 70)  # round(0.25 * 140), round(0.5 * 140)
  with pytest.raises(ValueError, match='train_hard_negative_fraction must be in'):
    identities.make_identities(20, train_hard_negative_fraction=1.0)


def test_weighted_choice_draws_as_numpy_choice():
  options, weights = list('abcdefghijkl'), [3.0, 1.0, 0.5, 2.0, 1.0, 1.0, 4.0, 0.25, 1.0, 1.0, 2.0, 1.5]
  ours, numpys = np.random.default_rng(11), np.random.default_rng(11)
  p = np.asarray(weights) / np.sum(weights)
  drawn = [synthetic.weighted_choice(ours, options, weights) for _ in range(2000)]
  assert drawn == [options[int(numpys.choice(len(options), p=p))] for _ in range(2000)]
  assert len(set(drawn)) == len(options)


def test_refuses_to_overwrite_other_directories(tmp_path):
  os.makedirs(tmp_path / 'imgs')
  with pytest.raises(FileExistsError, match='not a SynthPEDES directory'):
    synthetic.generate(str(tmp_path), **ARGS)


def test_bad_arguments_are_named():
  with pytest.raises(ValueError, match='image_size'):
    synthetic.generate('/nonexistent', 4, 1, image_size=(10, 10))
  with pytest.raises(ValueError, match='no training identity'):
    synthetic.make_identities(4, val_ids=2, test_ids=2)
  with pytest.raises(ValueError, match='hard_negative_fraction'):
    synthetic.make_identities(10, hard_negative_fraction=1.0)


def test_identities_unique_and_hard_negatives_differ_in_one_or_two_attributes():
  ids = synthetic.make_identities(300, seed=1, val_ids=40, test_ids=60, hard_negative_fraction=0.25)
  assert [a['id'] for a in ids] == list(range(1, 301))
  keys = [synthetic.described_key(a) for a in ids]
  assert len(set(keys)) == len(keys)
  by_id = {a['id']: a for a in ids}
  for split, n in (('train', 200), ('val', 40), ('test', 60)):
    members = [a for a in ids if a['split'] == split]
    hard = [a for a in members if a['hard_negative_of'] is not None]
    assert len(members) == n and len(hard) == round(0.25 * n)
    for a in hard:
      src = by_id[a['hard_negative_of']]
      assert src['split'] == split and src['hard_negative_of'] is None
      assert 1 <= len(synthetic.attribute_diff(a, src)) <= 2
      assert a['render_seed'] == src['render_seed']  # same body, only the attributes differ
  for a in ids:
    synthetic.check_identity(a)


def test_captions_name_the_drawn_colours(generated):
  out, recs = generated
  ids = {a['id']: a for a in synthetic.load_identities(out)}
  rng = np.random.default_rng(0)
  caps = [(ids[r['id']], c) for r in recs for c in r['captions']]
  for a in synthetic.make_identities(60, seed=5):  # more identities, captions only
    facing = synthetic.sample_view(rng)
    caps += [(a, c) for c in synthetic.captions_for_image(a, facing, rng)]
  def names(a, key, c):
    return any(re.search(rf'\b{w}\b', c.lower()) for w in synthetic.colour_words(a[key]))
  upper = np.mean([names(a, 'upper_colour', c) for a, c in caps])
  lower = np.mean([names(a, 'lower_colour', c) for a, c in caps if a['lower_type']])
  assert upper >= 0.85 and lower >= 0.8, (upper, lower)
  # Never a colour the identity does not show: strip the worn ones, no colour word may remain.
  for a, c in caps:
    worn = {a[k] for k in ('upper_colour', 'lower_colour', 'shoes_colour', 'bag_colour', 'hat_colour',
                           'accessory_colour', 'pattern_colour', 'hair_colour')} | {'black'}  # black glasses
    text = c.lower()
    for w in sorted((w for k in worn if k in synthetic.COLOURS for w in synthetic.colour_words(k)), key=len,
                    reverse=True):
      text = re.sub(rf'\b{w}\b', '', text)
    for k in synthetic.COLOURS:
      if k not in worn:
        assert not any(re.search(rf'\b{w}\b', text) for w in synthetic.colour_words(k)), (c, a)


def test_two_images_of_an_identity_get_different_captions(generated):
  _, recs = generated
  by_id = {}
  for r in recs:
    by_id.setdefault(r['id'], []).append(tuple(r['captions']))
  assert all(len(set(v)) == len(v) for v in by_id.values())


def test_cli(tmp_path):
  out = str(tmp_path / 'cli')
  cmd = [sys.executable, '-m', 'input_pipeline.synthetic', '--out', out, '--ids', '5', '--images-per-id', '1',
         '--height', '48', '--width', '24', '--val-ids', '1', '--test-ids', '1', '--seed', '7']
  proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.strip() == os.path.join(out, 'reid_raw.json')
  assert '5/5' in proc.stderr and 'drew 5 images' in proc.stderr  # the progress bar, then the summary
  with open(os.path.join(out, 'reid_raw.json')) as f:
    assert len(json.load(f)) == 5
  bad_args = ['--out', str(tmp_path / 'bad'), '--ids', '2', '--val-ids', '1', '--test-ids', '1']
  bad = subprocess.run(cmd[:3] + bad_args, cwd=REPO, capture_output=True, text=True, timeout=120)
  assert bad.returncode != 0 and 'no training identity' in bad.stderr
