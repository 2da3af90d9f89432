"""Search a folder of images by text with a trained model.

  python -m ivt_jax.search index --checkpoint=DIR --images=FOLDER --out=INDEX [--batch=64] [--dtype=float16]
  python -m ivt_jax.search query --index=INDEX "a man in a grey hoodie with a black backpack" [--top=10]
      [--sheet=results.png]
  python -m ivt_jax.search compact --index=INDEX [--shard_rows=1048576] [--dtype=float16]
  python -m ivt_jax.search convert --index=INDEX     (a first-format index, manifest.json, to this format)
  python -m ivt_jax.search ann --index=INDEX [--kind=ivf|hnsw] [--rebuild]

`index` embeds every image under FOLDER (recursively; .jpg .jpeg .png .webp, any case) in batches sharded
over all local devices, preprocessed exactly as the evaluation gallery (`augment.eval_image`: a bilinear
resize to data.image_size). Re-running it embeds only the files that are new or whose size or modification
time changed, drops the rows of files that disappeared from FOLDER, and keeps rows of files under other
folders indexed into the same INDEX. Files that cannot be read or decoded are listed and skipped (and not
retried until they change).

`query` embeds the text with the model that built the index and prints the files ranked by score;
--sheet writes a PNG contact sheet of the results.

DIR is what `ivt_jax.evaluate` accepts: a training workdir (its best-by-validation parameters, else the
latest state), a best/ directory, or a converted checkpoint. The config and the tokenizer come from the
checkpoint's saved meta (the training program saves 'config' and the tokenizer 'identity'): the tokenizer
file is found through the prepared data of that config (<data.data_dir or workdir/tfds>/<name>/prepared.json)
or data.vocab_file for WordPiece. --config=FILE and --tokenizer=PATH --tokenizer_kind=KIND override them
(for a checkpoint saved without a config, or a vocabulary that moved). `query` uses the checkpoint and
tokenizer recorded in the index unless --checkpoint / --tokenizer are given.

INDEX is a directory (ivt_jax/search/store.py): index.json (a small header: the model identity, config,
tokenizer and checkpoint, the indexed roots, the shards in row order, the deleted rows' file), shards/<name>.npy
(float32 or float16 (n, D) image embeddings, `evaluate.Embedder.images`: L2-normalized CLS vectors, or the part
head's composite vectors; memory-mapped when read) with shards/<name>.parquet (their rows: path, size,
mtime_ns and the columns of video frames). An update writes new shards (every 5,000 images: a killed run loses
at most those since its last shard, and the next run adopts the finished ones) and then a new header; old shards
are never rewritten: a changed or vanished file's row is listed as deleted until `compact` rewrites the live
rows. `ann` builds or updates the saved approximate index (INDEX/ann/) that `ivt_jax.serve --approximate` uses.
A first-format index (manifest.json) is read as it is, converted by `convert`, and converted on its next update.

A query's score is the plain dot product of its text embedding with each row, as in evaluation.

The model identity is a fingerprint of the parameters, of config.model (without the execution-only keys
'attention' and 'remat') with data.image_size (and config.part for the part head), and of the tokenizer's
identity(); `index` and `query` refuse an index whose identity differs from their model's, naming the parts
that differ.

Runs in one process on all its local devices, or in several (one per host) under jax.distributed:
`index --coordinator_address=HOST:PORT --num_processes=N --process_id=I` on every host (or `--distributed` where
jax finds them itself, as on Cloud TPU VMs), each embedding every N-th file to embed with its own devices and
writing its own shards into the shared INDEX; process 0 writes the header at the end. A process killed loses at
most its images since its last shard.

Modules: ivt_jax.search.model loads the model and embeds, ivt_jax.search.index builds and loads indexes; this
module ranks (`search`), draws the contact sheet and runs the command line. The package (`from ivt_jax import
search`) re-exports the search API from these three.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

import numpy as np

from input_pipeline import paths
from ivt_jax.search import index as search_index
from ivt_jax.search import model as search_model
from ivt_jax.search import store as search_store
from ivt_jax.runtime import cli as cli_lib


def search(model: search_model.LoadedModel, index: search_index.Index, texts: Sequence[str],
           top: int = 10) -> list[list[tuple[str, float]]]:
  """Per text, the top files of the index by score (dot product of the embeddings; the cosine for the IVT
  head): [[(path, score), ...], ...] best first, ties in path order."""
  search_index.check_identity(index, model)
  empty = [i for i, t in enumerate(texts) if not str(t).strip()]
  if empty:
    raise ValueError(f'query {empty[0] + 1} is empty: a query describes the person to find')
  if index.live == 0:
    return [[] for _ in texts]
  q = search_model.embed_texts(model, texts)
  scores = index.scores(q)  # (Q, N) over the memory-mapped shards; deleted rows -inf
  # Score descending, then row (path order): the server's ranking (search_index.top_k).
  return [[(index.path(i), float(row[i])) for i in search_index.top_k(row, 0, int(top)) if np.isfinite(row[i])]
          for row in scores]


def contact_sheet(results: Sequence[Sequence[tuple[str, float]]], texts: Sequence[str],
                  image_size: Sequence[int], height: int = 128):
  """A PIL contact sheet of `search` results (search_pictures.search_sheet), thumbnails at the model's aspect."""
  from ivt_jax.search import pictures as search_pictures  # pylint: disable=g-import-not-at-top
  h, w = image_size
  cell = (height, max(16, int(round(height * w / h))))
  images, scores, names = [], [], []
  for ranked in results:
    row = []
    for p, _ in ranked:
      try:
        with open(p, 'rb') as f:
          row.append(f.read())
      except OSError:
        row.append(None)
    images.append(row)
    scores.append([s for _, s in ranked])
    names.append([os.path.splitext(os.path.basename(p))[0] for p, _ in ranked])
  return search_pictures.search_sheet(list(texts), images, scores, names, cell=cell)


# ---- command line -------------------------------------------------------------------------------


def _add_model_flags(parser: argparse.ArgumentParser, required: bool) -> None:
  parser.add_argument('--checkpoint', required=required,
                      help='training workdir, best/ or converted checkpoint directory')
  parser.add_argument('--config', default='', help='config file overriding the checkpoint\'s saved config')
  parser.add_argument('--tokenizer', default='', help='tokenizer file (.model or vocab.txt)')
  parser.add_argument('--tokenizer_kind', default='', choices=('', 'sentencepiece', 'wordpiece', 'clip'),
                      help='kind of --tokenizer (default: the config\'s data.tokenizer)')


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(prog='python -m ivt_jax.search', description=__doc__.split('\n')[0])
  sub = parser.add_subparsers(dest='command', required=True)
  p = sub.add_parser('index', help='embed every image in a folder into an index')
  _add_model_flags(p, required=True)
  p.add_argument('--images', required=True, help='folder of images (recursive: jpg, jpeg, png, webp)')
  p.add_argument('--out', required=True, help='index directory (created or updated)')
  p.add_argument('--batch', type=int, default=64, help='images per batch (rounded to the device count)')
  p.add_argument('--workers', type=int, default=0, help='image decoding threads (0: min(8, CPUs))')
  p.add_argument('--rebuild', action='store_true', help='discard an existing index in --out')
  p.add_argument('--dtype', default='float32', choices=search_store.DTYPES, help='of the new shards\' embeddings')
  p.add_argument('--save_every', type=int, default=5000, help='images per shard (a killed run loses at most these)')
  p.add_argument('--coordinator_address', default='', help='HOST:PORT of process 0 (jax.distributed: several hosts)')
  p.add_argument('--num_processes', type=int, default=1)
  p.add_argument('--process_id', type=int, default=0)
  p.add_argument('--distributed', action='store_true', help='jax.distributed.initialize() with what jax finds')
  p.add_argument('--cpu_collectives', default='', help="CPU processes on one machine (a test setting): 'gloo'")
  q = sub.add_parser('query', help='rank the indexed images for text queries')
  q.add_argument('--index', required=True, help='index directory')
  q.add_argument('texts', nargs='+', help='query texts')
  q.add_argument('--top', type=int, default=10, help='results per query')
  q.add_argument('--sheet', default='', help='write a PNG contact sheet of the results here')
  _add_model_flags(q, required=False)
  c = sub.add_parser('compact', help='rewrite the live rows into new shards (deleted rows dropped)')
  c.add_argument('--index', required=True, help='index directory')
  c.add_argument('--shard_rows', type=int, default=1 << 20, help='rows per new shard')
  c.add_argument('--dtype', default='', choices=('',) + search_store.DTYPES, help='default: as stored')
  v = sub.add_parser('convert', help='rewrite a first-format index (manifest.json) in this format')
  v.add_argument('--index', required=True, help='index directory')
  a = sub.add_parser('ann', help='build or update the saved approximate index (for ivt_jax.serve --approximate)')
  a.add_argument('--index', required=True, help='index directory')
  a.add_argument('--kind', default='ivf', choices=('ivf', 'hnsw'))
  a.add_argument('--rebuild', action='store_true', help='build it anew even when a saved one can be updated')
  args = parser.parse_args(argv)
  if args.command == 'index' and args.save_every < 1:
    parser.error(f'--save_every must be >= 1, got {args.save_every}')
  if args.command == 'index' and not (args.num_processes >= 1 and 0 <= args.process_id < args.num_processes):
    parser.error(f'--process_id={args.process_id} must be in 0..--num_processes-1 ({args.num_processes - 1})')
  if args.command == 'compact' and args.shard_rows < 1:
    parser.error(f'--shard_rows must be >= 1, got {args.shard_rows}')
  if args.command == 'index' and args.batch < 1:
    parser.error(f'--batch must be >= 1, got {args.batch}')
  if args.command == 'query' and args.top < 1:
    parser.error(f'--top must be >= 1, got {args.top}')
  if args.command == 'query':
    for i, text in enumerate(args.texts, 1):
      if not text.strip():
        parser.error(f'query {i} is empty: a query describes the person to find')
  return args


def _log(line: str) -> None:
  print(line, file=sys.stderr, flush=True)


def _distributed(args: argparse.Namespace) -> None:
  import jax  # pylint: disable=g-import-not-at-top
  if args.cpu_collectives:
    jax.config.update('jax_cpu_collectives_implementation', args.cpu_collectives)
  if args.coordinator_address:
    jax.distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)
  elif args.distributed:
    jax.distributed.initialize()


def main(argv: Optional[Sequence[str]] = None) -> int:
  args = parse_args(argv)
  if args.command in ('compact', 'convert'):
    run = search_store.compact if args.command == 'compact' else search_store.convert
    kwargs = {'shard_rows': args.shard_rows, 'dtype': args.dtype} if args.command == 'compact' else {}
    result = run(paths.resolve(args.index, '--index'), log=_log, **kwargs)
    print(f'{result["rows"]} images in {result["shards"]} shard(s) in {args.index} ({result["deleted"]} deleted '
          'rows dropped)')
    return 0
  if args.command == 'ann':
    from ivt_jax.search import ann as search_ann  # pylint: disable=g-import-not-at-top
    index = search_index.load_index(args.index)
    if not index.live:
      raise ValueError(f'{args.index} holds no images: nothing to build an approximate index over')
    ann = search_ann.ensure(index, args.kind, rebuild=args.rebuild, log=_log)
    print(f'approximate index ({args.kind}) over {ann.size} images: {search_ann.saved_paths(index.directory, args.kind)[0]}')
    return 0
  config = search_model.load_config_file(args.config) if args.config else None
  if args.command == 'index':
    _distributed(args)
    model = search_model.load_model(args.checkpoint, config, args.tokenizer, args.tokenizer_kind)
    _log(f'model {model.checkpoint} (step {model.meta.get("step")}), identity {model.identity["fingerprint"]}, '
         f'{model.mesh.size} device(s)')
    result = search_index.build_index(model, args.images, args.out, batch_size=args.batch,
                                      workers=args.workers or None, rebuild=args.rebuild,
                                      save_every=args.save_every, dtype=args.dtype, log=_log)
    for u in result['unreadable']:
      print(f'unreadable: {u["path"]} ({u["error"]})')
    print(f'{result["images"]} images indexed in {os.path.abspath(args.out)} ({result["embedded"]} embedded '
          f'now, {result["unchanged"]} unchanged, {result["removed"]} removed, {len(result["unreadable"])} '
          'unreadable)')
    return 0
  index = search_index.load_index(args.index)
  model = search_index.model_for_index(index, args.checkpoint, args.config, args.tokenizer, args.tokenizer_kind)
  length = int(model.config.data.text_length) - 2
  for i, pieces in enumerate(model.tokenizer.pieces(args.texts), 1):
    if len(pieces) > length:
      _log(f'note: query {i} is {len(pieces)} tokens long; its first {length} are used (data.text_length)')
  results = search(model, index, args.texts, args.top)
  for text, ranked in zip(args.texts, results):
    print(f'query: {text}')
    for rank, (path, score) in enumerate(ranked, 1):
      print(f'{rank:4d}  {score:+.4f}  {path}')
  if args.sheet:
    from ivt_jax.evaluation import pictures as visualize  # pylint: disable=g-import-not-at-top
    path = visualize.save_png(contact_sheet(results, args.texts, model.image_size), args.sheet)
    print(f'contact sheet: {path}')
  return 0


def cli(argv: Optional[Sequence[str]] = None) -> int:
  """`main` with bad input (missing files, another model's index, ...) reported as one line, status 2."""
  return cli_lib.run_cli(main, argv)

