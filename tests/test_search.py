"""Search: index a folder with a tiny demo workdir's model, update it incrementally, skip unreadable files,
refuse another model's index, query and draw the contact sheet."""
import os
import re
import shutil

import jax
import numpy as np
import pytest
from PIL import Image

from ivt_jax import search


def make_demo_workdir(root: str):
  """A tiny demo workdir as the training program leaves it: SynthPEDES in <workdir>/synthpedes, prepared
  data and the SentencePiece model in <workdir>/tfds, parameters with train.py's meta ('config' after
  evaluate.build, 'tokenizer' identity) in <workdir>/best. The parameters are freshly initialized (training
  does not matter here and would take minutes on 2 cores). -> (workdir, config)."""
  from ivt_jax.training import checkpoints
  from ivt_jax.evaluation import evaluate
  from ivt_jax.models import encoder as model_lib
  from input_pipeline import prepare
  from tests.test_train import tiny_demo
  workdir = os.path.join(root, 'work')
  config = tiny_demo(root)
  config.data.data_dir = ''  # the demo's default: <workdir>/tfds
  config.data.manual_dir = os.path.join(workdir, 'synthpedes')
  prepare.prepare(config, workdir, workers=1)
  config, _, tokenizer, encoder, _, _, shardings = evaluate.build(config, workdir)
  params = jax.jit(lambda k: model_lib.init_module_params(encoder, k), out_shardings=shardings)(
      jax.random.key(3))
  meta = {'best_val': None, 'best_step': 1, 'step': 1, 'config': config.to_dict(),
          'tokenizer': tokenizer.identity()}
  checkpoints.save_params(checkpoints.params_manager(os.path.join(workdir, 'best')), 1, params, meta)
  return workdir, config


@pytest.fixture(scope='session')
def tiny_run(tmp_path_factory):
  """(workdir, config) of a tiny demo run (`make_demo_workdir`)."""
  return make_demo_workdir(str(tmp_path_factory.mktemp('tiny_run')))


@pytest.fixture(scope='session')
def tiny_model(tiny_run):
  return search.load_model(tiny_run[0])


def _test_images(tiny_run):
  return os.path.join(tiny_run[1].data.manual_dir, 'imgs', 'test')


def test_workdir_is_enough(tiny_run, tiny_model):
  workdir, config = tiny_run
  m = tiny_model
  assert m.meta['config']['model']['width'] == config.model.width
  assert m.tokenizer.identity() == m.meta['tokenizer']
  assert m.config.model.vocab_size == m.tokenizer.vocab_size
  assert m.image_size == tuple(config.data.image_size)
  assert set(m.identity) == {'fingerprint', 'params', 'model_config', 'tokenizer'}
  # The same checkpoint gives the same identity; the execution-only keys do not count.
  again = search.model_identity(m.params, m.config, m.tokenizer.identity())
  assert again == m.identity
  c = m.config.copy_and_resolve_references()
  c.model.attention = 'cudnn'
  assert search.model_identity(m.params, c, m.tokenizer.identity()) == m.identity
  c.model.ln_eps = 1e-5
  changed = search.model_identity(m.params, c, m.tokenizer.identity())
  assert changed['model_config'] != m.identity['model_config'] and changed['params'] == m.identity['params']


def test_config_file_overrides_saved_config(tiny_run, tiny_model, tmp_path):
  workdir, config = tiny_run
  path = tmp_path / 'my_config.py'
  path.write_text('from tests.test_train import tiny_demo\n\n\ndef get_config():\n'
                  f'  c = tiny_demo({os.path.dirname(workdir)!r})\n'
                  f'  c.data.data_dir = ""\n  c.data.manual_dir = {config.data.manual_dir!r}\n  return c\n')
  loaded = search.load_model(workdir, config=search.load_config_file(str(path)))
  assert loaded.identity == tiny_model.identity
  wrong = search.load_config_file(str(path))
  wrong.model.width = 48
  with pytest.raises(ValueError, match='do not match the configured model'):
    search.load_model(workdir, config=wrong)


def test_index_matches_evaluation_gallery_and_query(tiny_run, tiny_model, tmp_path, capsys):
  from ivt_jax.evaluation import evaluate
  from input_pipeline import prepare
  workdir, config = tiny_run
  folder, out = _test_images(tiny_run), str(tmp_path / 'index')
  assert search.main(['index', f'--checkpoint={workdir}', f'--images={folder}', f'--out={out}',
                      '--batch=3']) == 0
  files = sorted(os.path.join(folder, f) for f in os.listdir(folder))
  index = search.load_index(out)
  assert index.paths == files
  assert index.header['identity'] == tiny_model.identity
  assert index.unreadable == [] and index.version == 2
  d = tiny_model.config.model.width
  assert [s.embeddings.dtype for s in index.shards] == [np.float32] and isinstance(index.shards[0].embeddings, np.memmap)
  assert index.dense().shape == (len(files), d)
  np.testing.assert_allclose(np.linalg.norm(index.dense(), axis=1), 1.0, atol=1e-5)

  # The same vectors as the evaluation gallery of the test split (same preprocessing, same model).
  cfg, prepared, tok, encoder, mesh, abstract, shardings = evaluate.build(tiny_model.config, workdir)
  from ivt_jax.training import checkpoints
  params, _ = checkpoints.restore_params(workdir, abstract, shardings)
  _, emb, _, source = evaluate.run_evaluation(cfg, params, encoder, mesh, shardings, prepared, tok, 'test')
  by_name = {}
  for row, i in enumerate(emb['image_index']):
    by_name[os.path.basename(prepare.decode_example(source[int(i)])['image_path'])] = emb['image_emb'][row]
  assert sorted(by_name) == [os.path.basename(p) for p in files]
  gallery = np.stack([by_name[os.path.basename(p)] for p in files])
  np.testing.assert_allclose(index.dense(), gallery, atol=2e-5)

  # Query: ranked files with the dot-product scores, best first; a contact sheet.
  capsys.readouterr()
  text = 'a woman in a red coat with a black backpack'
  sheet = str(tmp_path / 'sheet.png')
  assert search.main(['query', f'--index={out}', text, '--top', '5', '--sheet', sheet]) == 0
  printed = capsys.readouterr().out.splitlines()
  assert printed[0] == f'query: {text}'
  rows = [re.match(r'^\s*(\d+)\s+([+-]\d\.\d{4})\s+(\S.*)$', line) for line in printed[1:6]]
  assert all(rows), printed
  q = search.embed_texts(tiny_model, [text])[0]
  want = index.dense() @ q
  order = np.argsort(-want, kind='stable')[:5]
  assert [r.group(3) for r in rows] == [files[i] for i in order]
  np.testing.assert_allclose([float(r.group(2)) for r in rows], want[order], atol=1e-4)
  assert printed[6] == f'contact sheet: {sheet}'
  image = Image.open(sheet)
  h, w = config.data.image_size
  cell_w = int(round(128 * w / h))
  assert image.format == 'PNG' and image.size == (220 + 5 * (cell_w + 8) + 8, 128 + 4 + 28 + 8 + 8)


def _png_bytes(path):
  with open(path, 'rb') as f:
    return f.read()


def test_unreadable_files_skipped_and_incremental_update(tiny_run, tiny_model, tmp_path):
  source = sorted(os.path.join(_test_images(tiny_run), f) for f in os.listdir(_test_images(tiny_run)))
  folder = tmp_path / 'photos'
  (folder / 'nested' / 'deeper').mkdir(parents=True)
  good = [str(folder / 'a.png'), str(folder / 'nested' / 'b.png'), str(folder / 'nested' / 'deeper' / 'c.PNG')]
  for src, dst in zip(source, good):
    shutil.copy(src, dst)
  jpg = str(folder / 'nested' / 'd.jpeg')
  Image.open(source[3]).convert('RGB').save(jpg, format='JPEG', quality=95)
  webp = str(folder / 'e.webp')
  Image.open(source[4]).convert('RGB').save(webp, format='WEBP')
  good += [jpg, webp]
  data = _png_bytes(source[5])
  bad = {str(folder / 'truncated.png'): data[:len(data) // 2],
         str(folder / 'nested' / 'notes.jpg'): b'this is a text file, not a JPEG\n',
         str(folder / 'empty.png'): b''}
  for path, content in bad.items():
    with open(path, 'wb') as f:
      f.write(content)
  (folder / 'readme.txt').write_text('not an image extension: not listed')
  out = str(tmp_path / 'index')
  lines = []
  log = lines.append

  first = search.build_index(tiny_model, str(folder), out, batch_size=2, log=log)
  assert first['embedded'] == len(good) and first['unchanged'] == 0
  assert sorted(u['path'] for u in first['unreadable']) == sorted(bad)
  assert all(u['error'] for u in first['unreadable'])
  assert any('unreadable, skipped' in line and 'notes.jpg' in line for line in lines)
  index = search.load_index(out)
  assert index.paths == sorted(good)
  assert sorted(u['path'] for u in index.unreadable) == sorted(bad)
  # Preprocessed as the gallery: the row of each file is the model's embedding of eval_image(file).
  direct = search.embed_images(tiny_model, np.stack([search.load_image(p, tiny_model.image_size)
                                                     for p in index.paths]))
  np.testing.assert_allclose(index.dense(), direct, atol=2e-5)

  # Nothing changed: nothing embedded, unreadable files listed but not retried.
  second = search.build_index(tiny_model, str(folder), out, batch_size=2, log=log)
  assert (second['embedded'], second['unchanged'], second['removed']) == (0, len(good), 0)
  assert second['new_unreadable'] == [] and len(second['unreadable']) == len(bad)
  np.testing.assert_array_equal(search.load_index(out).dense(), index.dense())
  assert [s.name for s in search.load_index(out).shards] == [s.name for s in index.shards]  # nothing rewritten

  # One new file, one changed file, one removed file, one broken file repaired.
  new = str(folder / 'nested' / 'f.png')
  shutil.copy(source[6], new)
  with open(good[0], 'wb') as f:
    f.write(_png_bytes(source[7]))
  os.utime(good[0], ns=(10**18, 10**18))
  os.remove(good[1])
  with open(str(folder / 'empty.png'), 'wb') as f:
    f.write(_png_bytes(source[8]))
  third = search.build_index(tiny_model, str(folder), out, batch_size=2, log=log)
  assert (third['embedded'], third['unchanged'], third['removed']) == (3, len(good) - 2, 1)
  assert sorted(u['path'] for u in third['unreadable']) == sorted(set(bad) - {str(folder / 'empty.png')})
  updated = search.load_index(out)
  expect = sorted(set(good) - {good[1]} | {new, str(folder / 'empty.png')})
  assert sorted(updated.paths) == expect and len(set(updated.paths)) == len(expect)
  # The old shards are kept as they were; the changed and the removed file's old rows are deleted, the new
  # embeddings are in a new shard.
  assert [s.name for s in updated.shards[:len(index.shards)]] == [s.name for s in index.shards]
  assert len(updated.shards) == len(index.shards) + 1  # the 3 embedded in one shard (one per 5000)
  row_of = {updated.path(int(r)): int(r) for r in updated.live_rows}
  old_row = {index.path(int(r)): int(r) for r in index.live_rows}
  assert sorted(updated.deleted.tolist()) == sorted([old_row[good[0]], old_row[good[1]]])
  for p in set(good) - {good[0], good[1]}:  # untouched rows are carried over bit for bit, at the same row
    assert row_of[p] == old_row[p]
    np.testing.assert_array_equal(updated.vector(row_of[p]), index.vector(old_row[p]))
  want = search.embed_images(tiny_model, search.load_image(good[0], tiny_model.image_size)[None])[0]
  np.testing.assert_allclose(updated.vector(row_of[good[0]]), want, atol=2e-5)
  assert not updated.is_live(old_row[good[0]]) and np.isneginf(updated.scores(want)[old_row[good[0]]])
  header_files = {s.name + e for s in updated.shards for e in ('.npy', '.parquet')}
  assert set(os.listdir(os.path.join(out, 'shards'))) == header_files

  # Files indexed from another folder are kept when this one is updated.
  other = tmp_path / 'other'
  other.mkdir()
  shutil.copy(source[9], str(other / 'g.png'))
  search.build_index(tiny_model, str(other), out, log=log)
  search.build_index(tiny_model, str(folder), out, log=log)
  assert str(other / 'g.png') in search.load_index(out).paths
  assert len(search.load_index(out).header['roots']) == 2


def test_index_from_another_model_or_tokenizer_refused(tiny_run, tiny_model, tmp_path, capsys):
  from ivt_jax.training import checkpoints
  from input_pipeline import tokenizers
  workdir = tiny_run[0]
  folder, out = _test_images(tiny_run), str(tmp_path / 'index')
  search.build_index(tiny_model, folder, out, log=lambda _: None)
  # Another model: the same architecture and tokenizer, different parameters.
  other_dir = str(tmp_path / 'other_model')
  params = jax.tree_util.tree_map(lambda x: np.asarray(x) * 1.01, jax.device_get(tiny_model.params))
  meta = {k: tiny_model.meta[k] for k in ('config', 'tokenizer')}
  checkpoints.save_params(checkpoints.params_manager(other_dir), 7, params, meta)
  other = search.load_model(other_dir, tokenizer_path=tiny_model.tokenizer.path)
  assert other.identity['params'] != tiny_model.identity['params']
  assert other.identity['tokenizer'] == tiny_model.identity['tokenizer']
  with pytest.raises(search.IdentityMismatchError, match=r'another model.*parameters'):
    search.search(other, search.load_index(out), ['a man'])
  with pytest.raises(search.IdentityMismatchError, match='another model'):
    search.build_index(other, folder, out, log=lambda _: None)
  capsys.readouterr()
  status = search.cli(['query', f'--index={out}', f'--checkpoint={other_dir}',
                       f'--tokenizer={tiny_model.tokenizer.path}', 'a man in a grey hoodie'])
  err = capsys.readouterr().err
  assert status == 2 and 'error: index' in err and 'another model' in err and 'parameters' in err
  # --rebuild replaces it.
  result = search.build_index(other, folder, out, rebuild=True, log=lambda _: None)
  assert result['embedded'] == len(os.listdir(folder))
  assert search.load_index(out).header['identity'] == other.identity
  # A tokenizer that is not the checkpoint's is refused before anything is embedded.
  spm = tokenizers.train_sentencepiece(['a red coat and blue jeans', 'a man with a black bag'] * 20,
                                       str(tmp_path / 'spm' / 'other'), 30)
  with pytest.raises(ValueError, match='was trained with'):
    search.load_model(workdir, tokenizer_path=spm, tokenizer_kind='sentencepiece')
  # An index built with another tokenizer identity is refused, naming the tokenizer.
  index = search.load_index(out)
  index.header['identity'] = dict(index.header['identity'], tokenizer='sentencepiece:sha256:0', fingerprint='x')
  with pytest.raises(search.IdentityMismatchError, match='tokenizer sentencepiece:sha256:0'):
    search.check_identity(index, other)


def test_command_line_errors(tiny_run, tmp_path, capsys):
  assert search.cli(['query', f'--index={tmp_path}', 'a man']) == 2
  assert 'is not an index' in capsys.readouterr().err
  assert search.cli(['index', f'--checkpoint={tmp_path / "nothing"}', f'--images={tmp_path}',
                     f'--out={tmp_path / "i"}']) == 2
  assert 'does not exist' in capsys.readouterr().err
  with pytest.raises(SystemExit):
    search.parse_args(['query', '--index=x', 'a man', '--top=0'])
  with pytest.raises(FileNotFoundError, match='image folder'):
    search.list_images(str(tmp_path / 'missing'))


def test_list_images_recursive_and_case_insensitive(tmp_path):
  for name in ('a.JPG', 'b.jpeg', 'c.png', 'd.WebP', 'e.gif', 'f.txt', 'sub/g.png', 'sub/deep/h.jpg'):
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b'')
  names = [os.path.relpath(p, tmp_path) for p in search.list_images(str(tmp_path))]
  assert names == ['a.JPG', 'b.jpeg', 'c.png', 'd.WebP', 'sub/deep/h.jpg', 'sub/g.png']


def test_top_k_ranks_by_score_then_row_and_pages():
  from ivt_jax.search import index as search_index
  scores = np.array([0.5, 0.9, 0.5, 0.1, 0.9, 0.5], np.float32)
  full = [1, 4, 0, 2, 5, 3]  # score descending, ties in row order
  for start in range(0, 8):
    for k in range(1, 8):
      assert search_index.top_k(scores, start, k).tolist() == full[start:start + k], (start, k)
  assert search_index.top_k(np.zeros((0,), np.float32), 0, 10).tolist() == []
