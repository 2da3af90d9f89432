"""Odd and hostile input, one test per case: image files (in dataset preparation, the training and evaluation
decode, and a search folder), captions and queries, json files and weight files. Each case is handled by the
documented rule (input_pipeline/images.py, docs/reliability.md) or refused with a message naming the file."""
import io
import os
import re
import shutil
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from input_pipeline import augment
from input_pipeline import images
from input_pipeline import prepare as prepare_lib
from input_pipeline.datasets import records
from ivt_jax.weights import files as weight_files
from tests.test_datasets import config_for, make_source
from tests.test_search import tiny_model, tiny_run  # noqa: F401 (session fixtures: a tiny demo workdir)

SIZE = (24, 12)  # (H, W) of the images written here


def png_bytes(w, h, depth, color_type, rows):
  """A PNG written chunk by chunk (PIL cannot write 16-bit RGB, nor a bomb without its pixels in memory)."""
  def chunk(tag, data):
    return struct.pack('>I', len(data)) + tag + data + struct.pack('>I', zlib.crc32(tag + data) & 0xffffffff)
  comp = zlib.compressobj(9)
  idat = b''.join(comp.compress(b'\0' + r) for r in rows) + comp.flush()
  return (b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', struct.pack('>IIBBBBB', w, h, depth, color_type, 0, 0, 0))
          + chunk(b'IDAT', idat) + chunk(b'IEND', b''))


def encode(image, fmt='PNG', **kw):
  b = io.BytesIO()
  image.save(b, format=fmt, **kw)
  return b.getvalue()


def pixels(data):
  return np.asarray(images.decode(data, name='x'))


def photo(seed=0, size=SIZE):
  return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8))


def bomb():
  """109 KB of PNG that claims 30000 x 30000 pixels (900 million)."""
  return png_bytes(30000, 30000, 1, 0, [bytes(3750)] * 30000)


def exif_rotated():
  """(JPEG-free PNG bytes of a 12x24 photo stored on its side with EXIF orientation 6, the upright photo)."""
  upright = photo(5)
  stored = upright.transpose(Image.Transpose.ROTATE_90)  # what a camera held sideways writes
  exif = Image.Exif()
  exif[0x0112] = 6  # "rotate 90 CW to display"
  return encode(stored, exif=exif.tobytes()), upright


# ---- the decode rules (images.decode, used by training, evaluation and search) ---------------------------------


def test_cmyk_jpeg():
  data = encode(Image.new('CMYK', (12, 24), (0, 255, 255, 0)), 'JPEG', quality=95)  # red, in ink
  p = pixels(data)
  assert p.shape == (24, 12, 3) and np.abs(p.astype(int) - [255, 0, 0]).max() <= 3


def test_16_bit_grayscale_is_scaled_not_clipped():
  a = np.array([[0, 257 * 100, 40000, 65535]], np.uint16)
  data = encode(Image.fromarray(a))
  assert Image.open(io.BytesIO(data)).mode == 'I;16'
  assert np.asarray(Image.open(io.BytesIO(data)).convert('RGB'))[0, 2, 0] == 255  # PIL's own: clipped
  p = pixels(data)
  np.testing.assert_array_equal(p[0, :, 0], [0, 100, 156, 255])  # round(v / 257)
  np.testing.assert_array_equal(p[..., 0], p[..., 2])


def test_16_bit_rgb_reads_the_high_byte():
  row = bytes.fromhex('1234abcdffff') * 3
  p = pixels(png_bytes(3, 2, 16, 2, [row, row]))
  np.testing.assert_array_equal(p[0, 0], [0x12, 0xab, 0xff])


def test_palette_with_transparency_over_white():
  im = Image.new('P', (4, 2), 0)
  im.putpalette([0, 0, 0, 200, 10, 20] + [0] * 762)
  im.putpixel((1, 0), 1)
  data = encode(im, transparency=0)  # index 0 (black) is transparent
  p = pixels(data)
  np.testing.assert_array_equal(p[0, 0], images.BACKGROUND)
  np.testing.assert_array_equal(p[0, 1], [200, 10, 20])


def test_rgba_and_la_composited():
  a = np.zeros((1, 3, 4), np.uint8)
  a[0, :, :3] = [10, 20, 30]
  a[0, :, 3] = [0, 255, 128]
  p = pixels(encode(Image.fromarray(a, 'RGBA')))
  np.testing.assert_array_equal(p[0, 0], [255, 255, 255])      # transparent: the background
  np.testing.assert_array_equal(p[0, 1], [10, 20, 30])         # opaque: the colour
  assert np.abs(p[0, 2].astype(int) - [132, 137, 142]).max() <= 1  # half: the blend
  la = pixels(encode(Image.fromarray(np.array([[[40, 0], [40, 255]]], np.uint8), 'LA')))
  np.testing.assert_array_equal(la[0], [[255] * 3, [40] * 3])


def test_grayscale_and_bilevel():
  g = pixels(encode(Image.fromarray(np.array([[0, 77, 255]], np.uint8), 'L'), 'JPEG', quality=100))
  assert g.shape == (1, 3, 3) and (g[..., 0] == g[..., 1]).all() and (g[..., 1] == g[..., 2]).all()
  b = pixels(encode(Image.fromarray(np.array([[True, False]])).convert('1')))
  np.testing.assert_array_equal(b[0], [[255] * 3, [0] * 3])


def test_exif_orientation_applied_identically_in_training_evaluation_and_search(tmp_path):
  data, upright = exif_rotated()
  assert Image.open(io.BytesIO(data)).size == (24, 12)  # stored sideways
  plain = encode(upright)
  np.testing.assert_array_equal(pixels(data), np.asarray(upright))
  for fn in (lambda d: augment.eval_image(d, (48, 24)),
             lambda d: augment.load_resized(d, (48, 24), augment.TRAIN_RESAMPLE)):
    np.testing.assert_array_equal(fn(data), fn(plain))
  from ivt_jax.search import index as search_index
  (tmp_path / 'side.png').write_bytes(data)
  np.testing.assert_array_equal(search_index.load_image(str(tmp_path / 'side.png'), (48, 24)),
                                augment.eval_image(plain, (48, 24)))


def test_one_by_one_image_is_resized():
  p = augment.eval_image(encode(Image.new('RGB', (1, 1), (9, 99, 199))), (48, 24))
  assert p.shape == (48, 24, 3) and (p == [9, 99, 199]).all()


def test_decompression_bomb_refused_without_decoding():
  data = bomb()
  assert len(data) < 200_000
  with pytest.raises(ValueError, match=r"image 'b\.png': refused, too large"):
    images.decode(data, name='b.png')
  # Under PIL's own bomb threshold but over ours: refused by the header check, before any pixel is decoded.
  wide = png_bytes(20000, 8000, 1, 0, [bytes(2500)] * 2)  # 160 MP, IDAT cut short: never read
  with pytest.raises(ValueError, match=r'20000 x 8000 pixels is over the limit'):
    images.decode(wide, name='w.png')


@pytest.mark.parametrize('data,pattern', [
    (b'<html>404 not found</html>', r'not an image PIL can read'),
    (b'', r'\(empty\)'),
], ids=['html_bytes', 'empty_file'])
def test_bytes_that_are_not_an_image(data, pattern):
  with pytest.raises(ValueError, match=r"image 'a\.jpg': .*" + pattern):
    images.decode(data, name='a.jpg')


def test_truncated_and_float_images_refused():
  data = encode(photo(1, (64, 32)), 'JPEG', quality=90)
  with pytest.raises(ValueError, match=r"image 't\.jpg': cannot decode"):
    images.decode(data[:len(data) // 2], name='t.jpg')
  with pytest.raises(ValueError, match=r'32-bit float image'):
    images.decode(encode(Image.fromarray(np.ones((2, 2), np.float32)), 'TIFF'), name='f.tif')


# ---- dataset preparation -----------------------------------------------------------------------------------------

ODD_CAPTIONS = {
    'long': ('The man wears a grey coat and black shoes. ' * 240)[:10_000],
    'emoji': 'A woman in a red coat 🧥 with a black backpack 🎒 and white shoes 👟.',
    'chinese': '一名穿着红色外套、背着黑色背包的女子。 A woman in a red coat.',
    'arabic': 'امرأة ترتدي معطفا أحمر وتحمل حقيبة ظهر سوداء. A woman in a red coat.',
}
ODD_IMAGES = {  # record index -> image bytes that are odd but valid
    0: lambda: encode(Image.new('CMYK', (12, 24), (0, 255, 255, 0)), 'JPEG'),
    2: lambda: encode(Image.fromarray((np.arange(288).reshape(24, 12) * 200).astype(np.uint16))),
    4: lambda: exif_rotated()[0],
    6: lambda: encode(Image.new('RGB', (1, 1), (9, 99, 199))),
    8: lambda: encode(Image.fromarray(np.full((24, 12), 80, np.uint8), 'L')),
}


def _odd_source(root):
  def edit(items):
    for i, caption in enumerate(ODD_CAPTIONS.values()):
      items[i]['captions'] = [caption]
  root, items = make_source(root, edit=edit)
  for i, make in ODD_IMAGES.items():  # written under the record's own name (PIL reads by content)
    with open(os.path.join(root, 'imgs', items[i]['file_path']), 'wb') as f:
      f.write(make())
  return root, items


def test_odd_images_and_captions_are_prepared_and_read_back(tmp_path):
  root, items = _odd_source(tmp_path / 'cuhk')
  prepared = prepare_lib.prepare(config_for(root), str(tmp_path / 'work'), workers=1)
  assert prepared.num_bad_records == 0 and sum(prepared.split_sizes.values()) == len(items)
  from input_pipeline import tokenizers
  tok = tokenizers.load_tokenizer(prepared.tokenizer, prepared.tokenizer_path)
  by_path = {}
  for split in ('train', 'val', 'test'):
    for ex in prepare_lib.open_split(prepared, split):
      ex = prepare_lib.decode_example(ex)
      by_path[ex['image_path']] = ex
  for i, make in ODD_IMAGES.items():
    ex = by_path[items[i]['file_path']]
    np.testing.assert_array_equal(augment.eval_image(ex['image'], SIZE), augment.eval_image(make(), SIZE))
  for i, caption in enumerate(ODD_CAPTIONS.values()):
    assert by_path[items[i]['file_path']]['captions'] == [caption]  # stored as written, every character
    ids, mask = tok.encode([caption], 64)
    assert mask.sum() >= 3 and ids[0, 0] == tok.cls_id
  long_ids, long_mask = tok.encode([ODD_CAPTIONS['long']], 64)
  assert long_mask.all()  # 10,000 characters: cut to the text length, CLS ... SEP


@pytest.mark.parametrize('case,pattern', [
    ('bomb', r'refused, too large'),
    ('html', r'not an image PIL can read'),
    ('truncated', r'cannot decode|does not decode'),
    ('fifo', r'does not exist or is not a regular file'),
], ids=['decompression_bomb', 'not_an_image', 'truncated', 'fifo'])
def test_hostile_image_refused_in_preparation_naming_file_and_record(tmp_path, case, pattern):
  root, items = make_source(tmp_path / 'cuhk')
  target = os.path.join(root, 'imgs', items[3]['file_path'])
  os.remove(target)
  if case == 'fifo':
    os.mkfifo(target)  # would block a reader forever
  else:
    data = {'bomb': bomb, 'html': lambda: b'<html></html>',
            'truncated': lambda: encode(photo(3, (64, 32)), 'PNG')[:300]}[case]()
    with open(target, 'wb') as f:
      f.write(data)
  with pytest.raises(records.RecordError, match=r"record 3 \(id=2, file_path='CUHK01/0003_c1\.png'\)") as e:
    records.parse_records('cuhk_pedes', root)
  assert re.search(pattern, str(e.value)), str(e.value)
  kept = records.parse_records('cuhk_pedes', root, skip_bad_records=True)
  assert len(kept.records) == len(items) - 1 and kept.bad[0].index == 3


@pytest.mark.parametrize('content,pattern', [
    ('[{"id": 1, "captions": ["Un homme vêtu"]}]'.encode('latin-1'), r'not UTF-8 text'),
    (b'{"id": 1, "captions": [', r'not valid json'),
    (b'\x00\x01binary', r'not valid json|not UTF-8'),
], ids=['latin1', 'cut_short', 'binary'])
def test_json_not_utf8_or_not_json(tmp_path, content, pattern):
  (tmp_path / 'reid_raw.json').write_bytes(content)
  with pytest.raises(records.RecordError, match=r'reid_raw\.json: ' + f'({pattern})'):
    records.parse_records('cuhk_pedes', str(tmp_path))


def test_json_with_utf8_byte_order_mark_is_read(tmp_path):
  root, items = make_source(tmp_path / 'cuhk')
  path = os.path.join(root, 'reid_raw.json')
  with open(path, 'rb') as f:
    body = f.read()
  with open(path, 'wb') as f:
    f.write(b'\xef\xbb\xbf' + body)  # what some Windows editors write
  assert len(records.parse_records('cuhk_pedes', root).records) == len(items)


# ---- weights -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize('fmt', ['npz', 'safetensors'])
def test_nan_or_inf_in_weights_refused_before_training(tmp_path, fmt):
  arrays = {'a': np.ones((2, 3), np.float32), 'b': np.array([1.0, np.nan, np.inf, -np.inf], np.float32),
            'step': np.array(3, np.int64)}
  path = str(tmp_path / f'w.{fmt}')
  if fmt == 'npz':
    np.savez(path, **arrays)
  else:
    from safetensors.numpy import save_file
    save_file(arrays, path)
  with pytest.raises(ValueError, match=r'config\.init\.vit_npz: .*w\.' + fmt + r': refused, 1 array\(s\) hold NaN or '
                     r'infinite values: b \(1 NaN, 2 infinite of 4\)'):
    weight_files.read_arrays(path, 'config.init.vit_npz')
  # The training program loads weights through this reader before its first step (pretrained.load_pretrained).
  from configs import demo
  from ivt_jax.weights import pretrained
  config = demo.get_config()
  config.init.vit_npz = path
  with pytest.raises(ValueError, match=r'hold NaN or infinite'):
    pretrained.load_pretrained(config, {})


# ---- a search folder ---------------------------------------------------------------------------------------------


@pytest.fixture(scope='module')
def hostile_folder(tiny_run, tiny_model, tmp_path_factory):  # noqa: F811
  """A folder with good photos and every hostile case, indexed once: (folder, build result, index)."""
  from ivt_jax import search
  source = os.path.join(tiny_run[1].data.manual_dir, 'imgs', 'test')
  folder = tmp_path_factory.mktemp('hostile')
  for i, f in enumerate(sorted(os.listdir(source))[:3]):
    shutil.copy(os.path.join(source, f), folder / f'good{i}.png')
  (folder / 'bomb.png').write_bytes(bomb())
  (folder / 'page.jpg').write_bytes(b'<html>not an image</html>')
  (folder / 'side.png').write_bytes(exif_rotated()[0])
  (folder / 'cmyk.jpg').write_bytes(ODD_IMAGES[0]())
  (folder / 'tiny.png').write_bytes(ODD_IMAGES[6]())
  (folder / 'loop_a.jpg').symlink_to(folder / 'loop_b.jpg')
  (folder / 'loop_b.jpg').symlink_to(folder / 'loop_a.jpg')
  (folder / 'sub').mkdir()
  (folder / 'sub' / 'up').symlink_to(folder)  # a folder loop
  os.mkfifo(folder / 'pipe.png')
  locked = folder / 'locked.png'
  shutil.copy(folder / 'good0.png', locked)
  os.chmod(locked, 0)
  index_dir = str(tmp_path_factory.mktemp('hostile_index'))
  result = search.build_index(tiny_model, str(folder), index_dir, log=lambda _: None)
  return folder, result, index_dir


def _reason(hostile_folder, name):
  _, result, _ = hostile_folder
  return {os.path.basename(u['path']): u['error'] for u in result['unreadable']}.get(name)


def test_search_index_is_built_with_the_readable_files(hostile_folder):
  folder, result, _ = hostile_folder
  readable = {'good0.png', 'good1.png', 'good2.png', 'side.png', 'cmyk.jpg', 'tiny.png'}
  if os.geteuid() == 0:
    readable.add('locked.png')  # root reads even a mode-000 file
  assert result['images'] == len(readable)
  assert len(result['unreadable']) == result['files'] - len(readable)


def test_search_bomb_listed_not_decoded(hostile_folder):
  assert 'refused, too large' in _reason(hostile_folder, 'bomb.png')


def test_search_non_image_bytes_listed(hostile_folder):
  assert 'not an image PIL can read' in _reason(hostile_folder, 'page.jpg')


def test_search_symlink_loop_listed_and_folder_loop_not_followed(hostile_folder):
  assert 'Too many levels of symbolic links' in _reason(hostile_folder, 'loop_a.jpg')
  assert 'Too many levels of symbolic links' in _reason(hostile_folder, 'loop_b.jpg')
  folder, result, _ = hostile_folder
  assert result['files'] == 12  # sub/up (a link to the folder itself) is not walked into


def test_search_fifo_listed_without_blocking(hostile_folder):
  assert 'not a regular file' in _reason(hostile_folder, 'pipe.png')


def test_search_unreadable_file(hostile_folder):
  if os.geteuid() == 0:
    pytest.skip('root reads a mode-000 file; covered by the monkeypatched test below')
  assert 'Permission denied' in _reason(hostile_folder, 'locked.png')


def test_search_unreadable_file_simulated(tiny_model, tmp_path, monkeypatch):  # noqa: F811
  from ivt_jax import search
  folder = tmp_path / 'f'
  folder.mkdir()
  Image.new('RGB', (12, 24)).save(folder / 'a.png')
  Image.new('RGB', (12, 24)).save(folder / 'b.png')
  real = images.read_file

  def read_file(path):
    if path.endswith('b.png'):
      raise PermissionError(13, 'Permission denied', path)
    return real(path)
  monkeypatch.setattr(images, 'read_file', read_file)
  result = search.build_index(tiny_model, str(folder), str(tmp_path / 'i'), log=lambda _: None)
  assert result['images'] == 1 and 'Permission denied' in result['unreadable'][0]['error']


def test_search_odd_but_valid_images_indexed_like_their_plain_versions(hostile_folder, tiny_model):  # noqa: F811
  folder, _, index_dir = hostile_folder
  from ivt_jax import search
  index = search.load_index(index_dir)
  plain = {'side.png': encode(exif_rotated()[1]), 'cmyk.jpg': ODD_IMAGES[0](), 'tiny.png': ODD_IMAGES[6]()}
  for name, data in plain.items():
    row = index.vector(index.live_rows[index.paths.index(str(folder / name))])
    expected = search.embed_images(tiny_model, augment.eval_image(data, tiny_model.image_size)[None])[0]
    np.testing.assert_allclose(row, expected, atol=1e-5, err_msg=name)


@pytest.mark.parametrize('query', list(ODD_CAPTIONS.values()), ids=list(ODD_CAPTIONS))
def test_search_odd_queries(tiny_model, query):  # noqa: F811
  from ivt_jax.search import model as search_model
  q = search_model.embed_texts(tiny_model, [query])
  assert q.shape[0] == 1 and np.isfinite(q).all() and abs(np.linalg.norm(q) - 1) < 1e-4


def test_search_empty_query_refused(hostile_folder, tiny_model, capsys):  # noqa: F811
  from ivt_jax import search
  with pytest.raises(SystemExit):
    search.parse_args(['query', '--index', 'x', 'a man in black', '  '])
  assert 'query 2 is empty' in capsys.readouterr().err
  index = search.load_index(hostile_folder[2])
  with pytest.raises(ValueError, match='query 1 is empty'):
    search.search(tiny_model, index, [''])



# ---- paths -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize('url', ['s3://bucket/run', 'https://example.com/run', 'HDFS://n/x'])
def test_url_paths_refused_by_name(url, tmp_path, monkeypatch):
  """Schemes the program cannot write are refused by name, before anything is created (gs:// is supported:
  tests/test_gcs.py)."""
  from input_pipeline import paths
  from ivt_jax.search import index as search_index
  from ivt_jax.training import loop as train
  from tests.test_train import tiny_demo
  monkeypatch.chdir(tmp_path)
  scheme = url.split(':')[0].lower()
  with pytest.raises(paths.UnsupportedPathError, match=r"workdir='" + re.escape(url) + f"': {scheme}:// paths are "
                     r'not supported; this program reads and writes local or mounted file systems and Cloud '
                     'Storage'):
    train.train_and_evaluate(tiny_demo(str(tmp_path)), url)
  assert os.listdir(tmp_path) == []  # nothing was created under the current directory (no ./s3:/bucket/run)
  with pytest.raises(paths.UnsupportedPathError, match='index directory'):
    search_index.load_index(url)
  config = config_for(str(tmp_path))
  config.data.data_dir = url
  with pytest.raises(paths.UnsupportedPathError, match='config.data.data_dir'):
    prepare_lib.prepare(config, str(tmp_path / 'w'), workers=1)


def test_gcs_paths_where_a_local_disk_is_needed(tmp_path):
  """The raw dataset and image folders to index are read from a local disk: a gs:// path there is refused,
  saying how to copy or mount it; nothing is contacted."""
  from input_pipeline import paths
  from ivt_jax.search import index as search_index
  config = config_for(str(tmp_path))
  config.data.manual_dir = 'gs://bucket/CUHK-PEDES'
  with pytest.raises(paths.UnsupportedPathError, match=r"data path='gs://bucket/CUHK-PEDES': .*local .*disk.*"
                     'gcloud storage cp -r .*Cloud Storage FUSE'):
    prepare_lib.prepare(config, str(tmp_path / 'w'), workers=1)
  with pytest.raises(paths.UnsupportedPathError, match='image folder'):
    search_index.list_images('gs://bucket/photos')
  assert paths.resolve('GS://Bucket/run/', 'workdir') == 'gs://Bucket/run'
  with pytest.raises(paths.UnsupportedPathError, match='name a bucket'):
    paths.resolve('gs://', 'workdir')
