"""Tests for input_pipeline.augment and input_pipeline.pipeline on an in-memory source."""
import io
import json
import math
import os
import signal
import time

from absl import flags
import grain
import numpy as np
import PIL.Image
import PIL.ImageDraw
import pytest

from configs import base
from input_pipeline import augment
from input_pipeline import pipeline
from input_pipeline import eval_pipeline
from input_pipeline import examples as examples_lib
from input_pipeline import sampler as sampler_lib

COLORS = ['red', 'blue', 'green', 'black', 'white', 'grey', 'yellow', 'pink']
# Units (captions) per identity: 1, 2, 3 or more than K, so that both sampler branches run.
IMAGES_PER_ID = {10: [2, 2], 11: [1], 12: [2, 2, 2, 2], 13: [3], 14: [2, 1], 15: [1, 1, 1],
                 16: [2, 2, 2, 1, 2]}


class CharTokenizer:
  """Byte-level tokenizer: [CLS]=1, bytes + 3, [SEP]=2, padding 0; invertible for checks."""
  vocab_size = 259
  pad_id = 0

  def encode(self, texts, length):
    ids = np.zeros((len(texts), length), np.int32)
    for i, t in enumerate(texts):
      row = [1] + [3 + b for b in t.encode('utf-8')][:length - 2] + [2]
      ids[i, :len(row)] = row
    return ids, (ids != 0).astype(np.int32)

  @staticmethod
  def decode(ids):
    ids = [int(i) for i in ids if i > 2]
    return bytes(i - 3 for i in ids).decode('utf-8')


def _png(h, w, seed):
  rng = np.random.default_rng(seed)
  im = PIL.Image.new('RGB', (w, h), tuple(int(x) for x in rng.integers(0, 255, 3)))
  draw = PIL.ImageDraw.Draw(im)
  for _ in range(4):
    x0, y0 = int(rng.integers(0, w - 2)), int(rng.integers(0, h - 2))
    draw.rectangle([x0, y0, x0 + int(rng.integers(2, w)), y0 + int(rng.integers(2, h))],
                   fill=tuple(int(x) for x in rng.integers(0, 255, 3)))
  buf = io.BytesIO()
  im.save(buf, format='PNG')
  return buf.getvalue()


def make_source():
  """Records of IMAGES_PER_ID (value: captions per image); some captions lack phrases/attributes."""
  records = []
  for pid, images in IMAGES_PER_ID.items():
    for n_caps in images:
      r = len(records)
      caps, phrases, attrs = [], [], []
      for c in range(n_caps):
        a, b = COLORS[(r + c) % 8], COLORS[(r + 3 * c + 1) % 8]
        caps.append(f'person {pid} image {r} text {c} wears a {a} shirt, {b} pants. '
                    f'carries a bag')
        ph = [f'wears a {a} shirt', f'{b} pants', 'carries a bag'] if (r + c) % 5 else []
        at = [f'{a} shirt', f'{b} pants', 'bag'][:1 + (r + c) % 3] if (r + c) % 4 else []
        phrases.append(json.dumps(ph))
        attrs.append(json.dumps(at).encode())  # bytes, as TFDS returns them
      records.append(dict(image=_png(40 + 7 * r % 23, 16 + r % 9, r),
                          image_path=f'imgs/{pid}/{r}.png', person_id=pid,
                          captions=np.array([c.encode() for c in caps], dtype=object),
                          phrases=phrases, attributes=attrs))
  return records


SOURCE = make_source()
CAPTIONS = {}  # caption -> (record, phrases, attributes)
for _i, _r in enumerate(SOURCE):
  for _c, _cap in enumerate(_r['captions']):
    CAPTIONS[_cap.decode()] = (_i, json.loads(_r['phrases'][_c]), json.loads(_r['attributes'][_c]))


def make_config(**data):
  c = base.get_config()
  c.data.image_size = (96, 32)
  c.data.text_length = 128
  c.data.text_buckets = ()    # fixed shapes here; test_text_buckets_* set their own
  c.data.ids_per_batch = 3
  c.data.images_per_id = 2
  c.data.worker_count = 0
  c.model.patch_size = 16
  c.model.stride = 8          # grid 11 x 3: N_img = 34
  c.eval_batch_size = 4
  for k, v in data.items():
    c.data[k] = v
  return c


N_IMG = 34


def take(it, n):
  return [next(it) for _ in range(n)]


def assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


# ---- augment -------------------------------------------------------------------------------------

def test_pad_crop_is_a_shifted_copy():
  img = np.random.default_rng(0).integers(1, 255, (20, 12, 3), dtype=np.uint8)
  for seed in range(20):
    out = augment.pad_crop(img, 4, np.random.default_rng(seed))
    rng = np.random.default_rng(seed)
    i, j = int(rng.integers(0, 9)), int(rng.integers(0, 9))
    padded = np.pad(img, ((4, 4), (4, 4), (0, 0)))
    np.testing.assert_array_equal(out, padded[i:i + 20, j:j + 12])
  np.testing.assert_array_equal(augment.pad_crop(img, 0, np.random.default_rng(0)), img)


def test_random_erase_box_follows_timm_ranges():
  img = np.full((96, 32, 3), 7, np.uint8)  # noise never rounds to 7 on all three channels
  areas = []
  for seed in range(200):
    out = augment.random_erase(img, 1.0, np.random.default_rng(seed))
    changed = np.any(out != img, axis=-1)
    if not changed.any():
      continue  # all 10 attempts rejected (possible for a 96x32 image)
    ys, xs = np.nonzero(changed)
    h, w = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
    areas.append(h * w / img[..., 0].size)
    assert h < 96 and w < 32
  assert len(areas) > 150
  assert min(areas) >= 0.015 and max(areas) <= 1 / 3 + 0.03
  np.testing.assert_array_equal(augment.random_erase(img, 0.0, np.random.default_rng(0)), img)


def test_irra_erasing_fills_clip_mean_up_to_40_percent():
  """data.augment.erase_fill='clip_mean', erase_max_area=0.4 (IRRA's RandomErasing(scale=(0.02, 0.4),
  value=mean) after CLIP's normalization): the box holds the pixel of CLIP's mean in CLIP-normalized units."""
  assert augment.CLIP_MEAN_PIXEL == (156, 147, 133)  # round(255 (m s + m)) per channel
  img = np.full((96, 32, 3), 7, np.uint8)
  areas = []
  for seed in range(300):
    out = img.copy()
    augment._erase_into(out, 1.0, np.random.default_rng(seed), 0.4, 'clip_mean')  # pylint: disable=protected-access
    changed = np.any(out != img, axis=-1)
    if changed.any():
      assert (out[changed] == augment.CLIP_MEAN_PIXEL).all()
      ys, xs = np.nonzero(changed)
      areas.append((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1) / (96 * 32))
  assert max(areas) > 1 / 3 + 0.01 and max(areas) <= 0.4 + 0.03
  c = base.get_config()
  c.data.augment.erase_fill = 'grey'
  with pytest.raises(ValueError, match='data.augment.erase_fill must be one of'):
    pipeline._Settings.from_config(c)  # pylint: disable=protected-access
  c = base.get_config()
  c.data.augment.erase_max_area = 1.5
  with pytest.raises(ValueError, match='data.augment.erase_max_area must be in'):
    pipeline._Settings.from_config(c)  # pylint: disable=protected-access


def test_fused_train_view_equals_the_composed_transforms():
  img = np.random.default_rng(1).integers(0, 256, (40, 16, 3), dtype=np.uint8)
  for seed in range(60):
    rng = np.random.default_rng(seed)
    expected = augment.random_erase(augment.random_hflip(augment.pad_crop(img, 5, rng), 0.5, rng),
                                    0.5, rng)
    got = augment.train_view(img, np.random.default_rng(seed), pad=5, flip_prob=0.5,
                             erase_prob=0.5)
    np.testing.assert_array_equal(got, expected)
  data = _png(50, 20, 3)
  resized = augment.load_resized(data, (96, 32), augment.TRAIN_RESAMPLE)
  for seed in range(8):  # train_views mirrors once with PIL; same result as the strided flip
    rng = np.random.default_rng(seed)
    expected = np.stack([augment.train_view(resized, rng, pad=10, flip_prob=0.5, erase_prob=0.5)
                         for _ in range(3)])
    np.testing.assert_array_equal(augment.train_views(data, (96, 32), np.random.default_rng(seed)),
                                  expected)


def test_train_views_deterministic_and_eval_is_plain_resize():
  data = _png(50, 20, 3)
  a = augment.train_views(data, (96, 32), np.random.default_rng(5))
  b = augment.train_views(data, (96, 32), np.random.default_rng(5))
  assert a.shape == (3, 96, 32, 3) and a.dtype == np.uint8
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a[0], a[1]) or not np.array_equal(a[1], a[2])
  ref = np.asarray(PIL.Image.open(io.BytesIO(data)).convert('RGB').resize(
      (32, 96), PIL.Image.Resampling.BILINEAR))
  np.testing.assert_array_equal(augment.eval_image(data, (96, 32)), ref)
  plain = augment.train_views(data, (96, 32), np.random.default_rng(0), pad=0, flip_prob=0,
                              erase_prob=0)
  ref = np.asarray(PIL.Image.open(io.BytesIO(data)).convert('RGB').resize(
      (32, 96), PIL.Image.Resampling.BICUBIC))
  np.testing.assert_array_equal(plain[0], ref)


def test_bad_image_names_the_record():
  with pytest.raises(ValueError, match='imgs/x.png'):
    augment.eval_image(b'not an image', (96, 32), name='imgs/x.png')


# ---- training ------------------------------------------------------------------------------------

def test_batch_shapes_and_dtypes():
  it = pipeline.train_iterator(make_config(), SOURCE, CharTokenizer(), seed=0, shard_index=0,
                               shard_count=1)
  batch = next(it)
  expected = dict(images=((6, 3, 96, 32, 3), np.uint8), text_ids=((6, 3, 128), np.int32),
                  text_mask=((6, 3, 128), np.int32), image_keep=((6, 3, N_IMG), np.bool_),
                  text_keep=((6, 3, 128), np.bool_), person_id=((6,), np.int32))
  assert set(batch) == set(expected)
  for k, (shape, dtype) in expected.items():
    assert batch[k].shape == shape and batch[k].dtype == dtype, k


def test_steps_per_epoch_counts_reference_chunks():
  config = make_config()
  # Captions per identity: 4, 1, 8, 3, 3, 3, 9 -> max(n, 2) // 2 = 2, 1, 4, 1, 1, 1, 4 = 14 chunks.
  assert sampler_lib.steps_per_epoch(config, SOURCE) == 14 // 3
  index = examples_lib.TrainIndex.from_source(SOURCE)
  assert sampler_lib.steps_per_epoch(config, index) == 4
  assert sampler_lib.steps_per_epoch(config, index.person_id) == 4
  config.data.sample_unit = 'image'  # images per identity: 2, 1, 4, 1, 2, 3, 5 -> 1+1+2+1+1+1+2
  assert sampler_lib.steps_per_epoch(config, SOURCE) == 9 // 3
  with pytest.raises(ValueError, match='data.ids_per_batch'):
    sampler_lib.steps_per_epoch(make_config(ids_per_batch=8), SOURCE)


def test_identity_sampler_epochs():
  index = examples_lib.TrainIndex.from_source(SOURCE)
  sampler = sampler_lib.IdentitySampler(index.person_id, 3, 2, seed=1)
  assert sampler.steps_per_epoch == 4
  plans = [sampler.epoch(e) for e in range(3)]
  assert not np.array_equal(plans[0], plans[1])
  again = sampler_lib.IdentitySampler(index.person_id, 3, 2, seed=1).epoch(0)
  np.testing.assert_array_equal(plans[0], again)
  for plan in plans:
    assert plan.shape == (4, 6)
    pids = index.person_id[plan].reshape(4, 3, 2)
    assert (pids[:, :, 0] == pids[:, :, 1]).all()
    assert all(len(set(row)) == 3 for row in pids[:, :, 0])
    # Identities with at least K units never repeat a unit within an epoch.
    for pid in np.unique(index.person_id):
      units = plan[index.person_id[plan] == pid]
      if (index.person_id == pid).sum() >= 2:
        assert len(set(units.tolist())) == len(units)


@pytest.mark.parametrize('unit', ['caption', 'image'])
def test_identity_balance_and_texts(unit):
  config = make_config(sample_unit=unit)
  it = pipeline.train_iterator(config, SOURCE, CharTokenizer(), seed=3, shard_index=0,
                               shard_count=1)
  seen_fallback = {'phrase': 0, 'word_phrase': 0, 'word_caption': 0}
  for batch in take(it, 8):
    pids = batch['person_id'].reshape(3, 2)
    assert (pids[:, 0] == pids[:, 1]).all() and len(set(pids[:, 0])) == 3
    for row in range(6):
      sentence, phrase, word = (CharTokenizer.decode(batch['text_ids'][row, l]) for l in range(3))
      assert sentence in CAPTIONS, sentence
      r, phrases, attrs = CAPTIONS[sentence]
      assert SOURCE[r]['person_id'] == batch['person_id'][row]
      if phrases:
        assert phrase in phrases
      else:
        assert phrase == sentence
        seen_fallback['phrase'] += 1
      if attrs:
        parts = word.split(',')
        assert 1 <= len(parts) <= len(attrs) and len(set(parts)) == len(parts)
        assert set(parts) <= set(attrs)
      elif phrases:
        assert word in phrases
        seen_fallback['word_phrase'] += 1
      else:
        assert word == sentence
        seen_fallback['word_caption'] += 1
      np.testing.assert_array_equal(batch['text_mask'][row], batch['text_ids'][row] != 0)
  assert all(seen_fallback.values()), seen_fallback


def test_word_level_max_attrs():
  rng = np.random.default_rng(0)
  attrs = ['a', 'b', 'c', 'd', 'e']
  sizes = {len(pipeline.level_texts('cap', ['p'], attrs, rng, max_attrs=2)[2].split(','))
           for _ in range(100)}
  assert sizes == {1, 2}
  sizes = {len(pipeline.level_texts('cap', ['p'], attrs, rng)[2].split(',')) for _ in range(300)}
  assert sizes == {1, 2, 3, 4, 5}


def test_bmm_keep_masks():
  it = pipeline.train_iterator(make_config(), SOURCE, CharTokenizer(), seed=0, shard_index=0,
                               shard_count=1)
  batches = take(it, 6)
  for key, n in (('image_keep', N_IMG), ('text_keep', 128)):
    keep = np.concatenate([b[key] for b in batches])  # (36, 3, n)
    assert keep[..., 0].all()
    dropped = (~keep).sum(-1)
    assert dropped.min() >= 0 and dropped.max() <= math.floor(0.2 * n)
    assert len(np.unique(dropped)) > 3                          # a random count, not fixed
    assert (dropped[:, 0] != dropped[:, 1]).any()               # independent per level
  # Bounds reached: U{0..6} over many draws.
  counts = {int((~pipeline.bmm_keep(34, 0.2, np.random.default_rng(s))).sum()) for s in range(300)}
  assert counts == set(range(7))


def test_batch_bmm_pattern_is_one_per_modality_per_batch_and_resumes():
  """data.bmm_pattern='batch' (the reference's): every image view of a batch shares one keep pattern, every
  text another, over the batch's longest text; drawn per batch, the same after a resume."""
  config = make_config(bmm_pattern='batch')
  it = pipeline.train_iterator(config, SOURCE, CharTokenizer(), seed=0, shard_index=0, shard_count=1)
  batches = take(it, 8)
  counts = set()
  for b in batches:
    image_rows = b['image_keep'].reshape(-1, N_IMG)
    assert (image_rows == image_rows[0]).all() and image_rows[0, 0]
    text_rows = b['text_keep'].reshape(-1, b['text_keep'].shape[-1])
    assert (text_rows == text_rows[0]).all() and text_rows[0, 0]
    longest = int(b['text_mask'].sum(-1).max())
    assert text_rows[0, longest:].all()  # nothing past the batch's longest text is 'dropped'
    assert (~text_rows[0]).sum() <= math.floor(0.2 * longest)
    assert (~image_rows[0]).sum() <= math.floor(0.2 * N_IMG)
    counts.add(int((~image_rows[0]).sum()))
  assert len(counts) > 2  # a count drawn per batch
  assert len({b['image_keep'][0, 0].tobytes() for b in batches}) > 2  # a pattern drawn per batch
  # The rest of each sample (views, texts) is what 'sample' gives: the pattern draws come after them.
  per_sample = take(pipeline.train_iterator(make_config(), SOURCE, CharTokenizer(), seed=0, shard_index=0,
                                            shard_count=1), 8)
  for b, s in zip(batches, per_sample):
    for key in ('images', 'text_ids', 'text_mask', 'person_id'):
      np.testing.assert_array_equal(b[key], s[key])
  resumed = pipeline.train_iterator(config, SOURCE, CharTokenizer(), seed=0, shard_index=0, shard_count=1)
  resumed.set_state({**it.get_state(), 'next_batch': 5})
  assert_batches_equal(take(resumed, 3), batches[5:])
  with pytest.raises(ValueError, match='data.bmm_pattern'):
    pipeline.train_iterator(make_config(bmm_pattern='step'), SOURCE, CharTokenizer(), seed=0, shard_index=0,
                            shard_count=1)


def test_level_text_lengths_cut_and_pad_each_level():
  config = make_config(phrase_text_length=20, word_text_length=12)
  it = pipeline.train_iterator(config, SOURCE, CharTokenizer(), seed=0, shard_index=0, shard_count=1)
  full = pipeline.train_iterator(make_config(), SOURCE, CharTokenizer(), seed=0, shard_index=0,
                                 shard_count=1)
  short, long_ = take(it, 4), take(full, 4)
  for b, f in zip(short, long_):
    assert b['text_ids'].shape == f['text_ids'].shape == (6, 3, 128)
    np.testing.assert_array_equal(b['images'], f['images'])          # same draws, only texts cut
    for level, n in enumerate((128, 20, 12)):
      ids, mask, keep = b['text_ids'][:, level], b['text_mask'][:, level], b['text_keep'][:, level]
      assert not mask[:, n:].any() and (ids[:, n:] == 0).all() and keep[:, n:].all()
      for row, ref in zip(ids, f['text_ids'][:, level]):
        text, whole = CharTokenizer.decode(row), CharTokenizer.decode(ref)
        assert whole.startswith(text) and len(text) == min(len(whole), n - 2)
        assert row[min(len(whole), n - 2) + 1] == 2                    # [SEP] kept at the cut
      dropped = (~keep[:, :n]).sum(-1)
      assert dropped.max() <= math.floor(0.2 * n)
  with pytest.raises(ValueError, match='data.word_text_length'):
    pipeline.train_iterator(make_config(word_text_length=1), SOURCE, CharTokenizer(), seed=0,
                            shard_index=0, shard_count=1)
  # Longer than data.text_length: cut to it, the same batches as the default.
  longer = pipeline.train_iterator(make_config(word_text_length=129, phrase_text_length=500), SOURCE,
                                   CharTokenizer(), seed=0, shard_index=0, shard_count=1)
  assert_batches_equal(take(longer, 2), long_[:2])


def test_determinism_and_seeds():
  config = make_config()
  a = take(pipeline.train_iterator(config, SOURCE, CharTokenizer(), seed=7, shard_index=0,
                                   shard_count=1), 3)
  b = take(pipeline.train_iterator(config, SOURCE, CharTokenizer(), seed=7, shard_index=0,
                                   shard_count=1), 3)
  c = take(pipeline.train_iterator(config, SOURCE, CharTokenizer(), seed=8, shard_index=0,
                                   shard_count=1), 3)
  assert_batches_equal(a, b)
  assert not np.array_equal(a[0]['images'], c[0]['images'])


def test_shards_are_disjoint_rows_of_the_global_batch():
  config = make_config()
  full = take(pipeline.train_iterator(config, SOURCE, CharTokenizer(), seed=2, shard_index=0,
                                      shard_count=1), 3)
  parts = [take(pipeline.train_iterator(config, SOURCE, CharTokenizer(), seed=2, shard_index=i,
                                        shard_count=2), 3) for i in range(2)]
  for step in range(3):
    assert parts[0][step]['images'].shape[0] == 3
    joined = {k: np.concatenate([parts[0][step][k], parts[1][step][k]]) for k in full[step]}
    assert_batches_equal([joined], [full[step]])
  with pytest.raises(ValueError, match='not divisible'):
    pipeline.train_iterator(config, SOURCE, CharTokenizer(), seed=2, shard_index=0, shard_count=4)


def test_resume_in_process_across_an_epoch():
  config = make_config()
  kw = dict(seed=11, shard_index=0, shard_count=1)
  it = pipeline.train_iterator(config, SOURCE, CharTokenizer(), **kw)
  first = take(it, 3)
  state = it.get_state()
  rest = take(it, 4)                      # steps 3..6 cross the epoch boundary (4 steps/epoch)
  resumed = pipeline.train_iterator(config, SOURCE, CharTokenizer(), **kw)
  resumed.set_state(state)
  assert_batches_equal(take(resumed, 4), rest)
  assert len(first) == 3


def test_orbax_checkpoints_the_iterator(tmp_path):
  ocp = pytest.importorskip('orbax.checkpoint')
  config = make_config()
  kw = dict(seed=4, shard_index=0, shard_count=1)
  it = pipeline.train_iterator(config, SOURCE, CharTokenizer(), **kw)
  take(it, 2)
  with ocp.CheckpointManager(tmp_path, item_names=('data',)) as mngr:
    mngr.save(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
    mngr.wait_until_finished()
  expected = take(it, 2)
  fresh = pipeline.train_iterator(config, SOURCE, CharTokenizer(), **kw)
  with ocp.CheckpointManager(tmp_path, item_names=('data',)) as mngr:
    restored = mngr.restore(2, args=ocp.args.Composite(
        data=grain.checkpoint.CheckpointRestore(fresh)))
  assert_batches_equal(take(restored['data'], 2), expected)


@pytest.mark.slow  # two spawned worker processes: about 10 s on 2 cores
def test_worker_processes_match_in_process_and_resume():
  """Worker processes give the in-process batches; states move between worker counts."""
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()  # what absl.app.run does; Grain's workers read its flags
  kw = dict(seed=5, shard_index=0, shard_count=1)
  it = pipeline.train_iterator(make_config(), SOURCE, CharTokenizer(), **kw)
  reference = take(it, 2)
  state = it.get_state()
  reference += take(it, 3)
  workers = pipeline.train_iterator(make_config(worker_count=2), SOURCE, CharTokenizer(), **kw)
  try:
    workers.set_state(state)              # a fresh 2-worker iterator resumes an in-process run
    assert_batches_equal(take(workers, 2), reference[2:4])
    state = workers.get_state()
  finally:
    workers.close()
  resumed = pipeline.train_iterator(make_config(), SOURCE, CharTokenizer(), **kw)
  resumed.set_state(state)                # and an in-process iterator resumes the 2-worker run
  assert_batches_equal(take(resumed, 1), reference[4:])


def _fails_at_5(i):  # module level: spawned worker processes import it
  if i == 5:
    if os.environ.get('IVT_TEST_WORKER_DIES'):
      os.kill(os.getpid(), signal.SIGKILL)
    raise ValueError('record 5 is broken')
  return i


@pytest.mark.slow  # spawned worker processes: about 15 s on 2 cores
@pytest.mark.parametrize('dies', [False, True], ids=['raises', 'killed'])
def test_a_failing_or_dying_grain_worker_is_a_clear_error_not_a_hang(dies, monkeypatch):
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  if dies:
    monkeypatch.setenv('IVT_TEST_WORKER_DIES', '1')  # inherited by the workers
  batches = grain.MapDataset.range(20).map(_fails_at_5)
  it = pipeline.TrainIterator(batches, worker_count=2, worker_buffer_size=1, check={})
  start = time.time()
  try:
    with pytest.raises(pipeline.InputPipelineError) as e:
      for _ in range(20):
        next(it)
  finally:
    it.close()
  assert time.time() - start < 120
  msg = str(e.value)
  assert 'in one of its 2 Grain worker processes, at or before training batch' in msg
  if dies:
    assert 'terminated unexpectedly' in msg and 'lower data.worker_count' in msg
  else:
    assert 'ValueError: record 5 is broken' in msg and 'batch 5' in msg


def test_state_mismatch_is_refused():
  kw = dict(shard_index=0, shard_count=1)
  state = pipeline.train_iterator(make_config(), SOURCE, CharTokenizer(), seed=1, **kw).get_state()
  other = pipeline.train_iterator(make_config(), SOURCE, CharTokenizer(), seed=2, **kw)
  with pytest.raises(ValueError, match='seed=1, this run 2'):
    other.set_state(state)


def test_bad_records_and_config():
  bad = [dict(r) for r in SOURCE]
  bad[3] = {k: v for k, v in bad[3].items() if k != 'person_id'}
  with pytest.raises(ValueError, match=r"record 3 \(imgs/12/3.png\).*person_id"):
    sampler_lib.steps_per_epoch(make_config(), bad)
  bad = [dict(r) for r in SOURCE]
  bad[0]['phrases'] = bad[0]['phrases'][:1]
  it = pipeline.train_iterator(make_config(), bad, CharTokenizer(), seed=0, shard_index=0,
                               shard_count=1)
  with pytest.raises(pipeline.InputPipelineError,  # the record's error, with where it happened
                     match=r"in the training process \(data.worker_count=0\), at or before training batch \d+: "
                           r"ValueError: record 0 .*'phrases' has 1 entries but captions has 2"):
    take(it, 4)
  with pytest.raises(ValueError, match='data.bmm_ratio'):
    pipeline.train_iterator(make_config(bmm_ratio=1.5), SOURCE, CharTokenizer(), seed=0,
                            shard_index=0, shard_count=1)


# ---- evaluation ----------------------------------------------------------------------------------

@pytest.mark.parametrize('shard_count', [1, 2])
def test_eval_covers_everything_once(shard_count):
  config = make_config()
  tok = CharTokenizer()
  streams = [eval_pipeline.eval_batches(config, SOURCE, tok, shard_index=i, shard_count=shard_count)
             for i in range(shard_count)]
  n_caps = sum(len(r['captions']) for r in SOURCE)
  gallery, queries = [], []
  for s in streams:
    assert (s.num_images, s.num_queries) == (len(SOURCE), n_caps)
    assert s.num_gallery_batches == streams[0].num_gallery_batches
    g = list(s.gallery)
    q = list(s.queries)
    assert len(g) == s.num_gallery_batches and len(q) == s.num_query_batches
    for b in g:
      assert b['images'].shape == (4, 96, 32, 3) and b['images'].dtype == np.uint8
      assert b['valid'].dtype == np.bool_ and b['person_id'].dtype == np.int32
    for b in q:
      assert b['text_ids'].shape == (4, 128) and b['text_mask'].dtype == np.int32
    gallery += g
    queries += q
  g_index = np.concatenate([b['index'] for b in gallery])
  g_valid = np.concatenate([b['valid'] for b in gallery])
  assert sorted(g_index[g_valid]) == list(range(len(SOURCE)))
  assert (g_index[~g_valid] == -1).all() and (~g_valid).sum() == len(g_valid) - len(SOURCE)
  assert len(g_valid) % (4 * shard_count) == 0
  g_pid = np.concatenate([b['person_id'] for b in gallery])
  assert (g_pid[g_valid] == [SOURCE[i]['person_id'] for i in g_index[g_valid]]).all()
  assert (g_pid[~g_valid] == -1).all()
  first = next(b for b in gallery if b['index'][0] == 0)
  np.testing.assert_array_equal(first['images'][0],
                                augment.eval_image(SOURCE[0]['image'], (96, 32)))
  q_index = np.concatenate([b['index'] for b in queries])
  q_valid = np.concatenate([b['valid'] for b in queries])
  assert sorted(q_index[q_valid]) == list(range(n_caps))
  texts = [CharTokenizer.decode(t) for b in queries for t in b['text_ids']]
  image_index = np.concatenate([b['image_index'] for b in queries])
  q_pid = np.concatenate([b['person_id'] for b in queries])
  valid_texts = [t for t, v in zip(texts, q_valid) if v]
  assert sorted(valid_texts) == sorted(CAPTIONS)
  for t, i, p in zip(valid_texts, image_index[q_valid], q_pid[q_valid]):
    assert CAPTIONS[t][0] == i and SOURCE[i]['person_id'] == p
  assert (q_pid[~q_valid] == -1).all()


@pytest.mark.parametrize('levels', [('sentence',), ('sentence', 'word'), ('phrase',)])
def test_mla_levels_subset(levels):
  """data.mla_levels keeps those levels (in sentence, phrase, word order), one view each."""
  config = make_config(mla_levels=levels, phrase_text_length=20, word_text_length=12)
  b = next(pipeline.train_iterator(config, SOURCE, CharTokenizer(), seed=0, shard_index=0, shard_count=1))
  v = len(levels)
  assert b['images'].shape[:2] == b['text_ids'].shape[:2] == b['image_keep'].shape[:2] == (6, v)
  full = next(pipeline.train_iterator(make_config(phrase_text_length=20, word_text_length=12), SOURCE,
                                      CharTokenizer(), seed=0, shard_index=0, shard_count=1))
  if levels == ('sentence',):  # the sentence level is the full caption either way
    np.testing.assert_array_equal(b['text_ids'][:, 0], full['text_ids'][:, 0])
  lengths = {'sentence': 128, 'phrase': 20, 'word': 12}
  for i, level in enumerate(levels):
    assert b['text_mask'][:, i, lengths[level]:].sum() == 0  # each level keeps its own length
  from input_pipeline import shapes
  assert shapes.level_text_lengths(config) == tuple(lengths[x] for x in levels)


def test_mla_levels_are_checked():
  from input_pipeline import shapes
  for bad in ((), ('sentence', 'sentence'), ('sentence', 'paragraph')):
    with pytest.raises(ValueError, match='data.mla_levels'):
      shapes.mla_levels(make_config(mla_levels=bad))
  assert shapes.mla_levels(make_config(mla_levels=('word', 'sentence'))) == ('sentence', 'word')
  assert shapes.mla_levels(make_config(mla_levels=('word,sentence',))) == ('sentence', 'word')  # the CLI's form


def test_text_buckets_pad_each_batch_to_the_smallest_that_holds_it():
  """data.text_buckets: a batch's texts are padded to the smallest bucket holding its longest text; nothing but
  padding goes, so the batch is the fixed-length one cut short. Evaluation queries are bucketed alike."""
  buckets = (40, 74, 80, 96)  # the longest texts of these batches: 74 or 75 bytes + [CLS] and [SEP]
  config = make_config(text_buckets=buckets)
  fixed = take(pipeline.train_iterator(make_config(), SOURCE, CharTokenizer(), seed=0, shard_index=0,
                                       shard_count=1), 8)
  bucketed = take(pipeline.train_iterator(config, SOURCE, CharTokenizer(), seed=0, shard_index=0,
                                          shard_count=1), 8)
  seen = set()
  for f, b in zip(fixed, bucketed):
    length = b['text_ids'].shape[-1]
    longest = int(f['text_mask'].sum(-1).max())
    assert length == min(x for x in buckets + (128,) if x >= longest)
    seen.add(length)
    for key in ('text_ids', 'text_mask', 'text_keep'):
      np.testing.assert_array_equal(b[key], f[key][..., :length])
    assert f['text_mask'][..., length:].sum() == 0 and f['text_ids'][..., length:].sum() == 0
    np.testing.assert_array_equal(b['images'], f['images'])
  assert len(seen) > 1  # the batches took different lengths
  # Several processes: every process must hand the step the same shape, so batches keep data.text_length.
  multi = next(pipeline.train_iterator(config, SOURCE, CharTokenizer(), seed=0, shard_index=0, shard_count=2))
  assert multi['text_ids'].shape[-1] == 128
  # Evaluation queries: the same ids and masks, cut to the bucket of each batch's longest query.
  from input_pipeline import eval_pipeline
  q_fixed = list(eval_pipeline.eval_batches(make_config(), SOURCE, CharTokenizer(), shard_index=0,
                                            shard_count=1).queries)
  q_bucketed = list(eval_pipeline.eval_batches(config, SOURCE, CharTokenizer(), shard_index=0,
                                               shard_count=1).queries)
  for f, b in zip(q_fixed, q_bucketed):
    length = b['text_ids'].shape[-1]
    assert length in buckets + (128,) and length < 128
    np.testing.assert_array_equal(b['text_ids'], f['text_ids'][:, :length])
    assert f['text_mask'][:, length:].sum() == 0


def test_text_buckets_are_read_from_the_config():
  from input_pipeline import shapes
  assert shapes.text_buckets(make_config(text_buckets=(96, 32, 64, 32))) == (32, 64, 96, 128)
  assert shapes.text_buckets(make_config(text_length=48, text_buckets=(32, 64))) == (32, 48)  # 64: not below
  assert shapes.text_buckets(make_config()) == (128,)
  with pytest.raises(ValueError, match='data.text_buckets'):
    shapes.text_buckets(make_config(text_buckets=(1,)))
  assert shapes.bucket_text_lengths((128, 20, 12), 16) == (16, 16, 12)


def test_levels_encoded_in_one_call_equal_one_call_per_level():
  """_encode_levels tokenizes the three level texts in one call and cuts each to its level's length: the same
  ids and mask as encoding each text at its own length (texts shorter, equal to and longer than each cut)."""
  tok = CharTokenizer()
  rng = np.random.default_rng(0)
  for _ in range(300):
    texts = ['x' * int(rng.integers(0, 30)) + 'é' * int(rng.integers(0, 3)) for _ in range(3)]
    lengths = [int(n) for n in rng.integers(2, 26, 3)]
    length = max(lengths) + int(rng.integers(0, 4))
    ids, mask = pipeline._encode_levels(tok, texts, lengths, length)
    for level, (t, n) in enumerate(zip(texts, lengths)):
      want_ids, want_mask = tok.encode([t], n)
      np.testing.assert_array_equal(ids[level, :n], want_ids[0])
      np.testing.assert_array_equal(mask[level, :n], want_mask[0])
      assert not ids[level, n:].any() and not mask[level, n:].any()
