"""Search a folder of images by text with a trained model.

  python -m ivt_jax.search index --checkpoint=DIR --images=FOLDER --out=INDEX [--batch=64] [--dtype=float16]
      [--detect [--detector=ssdlite|hog|FILE.onnx] [--fps=2] [--min_height=64] [--threshold=0.5]
       [--track [--track_gap=2] [--track_crops=4]]]
  python -m ivt_jax.search query --index=INDEX "a man in a grey hoodie with a black backpack" [--top=10]
      [--sheet=results.png] [--json] [--per_track]
  python -m ivt_jax.search compact --index=INDEX [--shard_rows=1048576] [--dtype=float16]
  python -m ivt_jax.search convert --index=INDEX     (a first-format index, manifest.json, to this format)
  python -m ivt_jax.search ann --index=INDEX [--kind=ivf|hnsw] [--rebuild]

`index` embeds every image under FOLDER (recursively; .jpg .jpeg .png .webp, any case) in batches sharded
over all local devices, preprocessed exactly as the evaluation gallery (`augment.eval_image`: a bilinear
resize to data.image_size). Re-running it embeds only the files that are new or whose size or modification
time changed, drops the rows of files that disappeared from FOLDER, and keeps rows of files under other
folders indexed into the same INDEX. Files that cannot be read or decoded are listed and skipped (and not
retried until they change).

With --detect, FOLDER holds full frames and videos (.mp4 .mkv .avi .mov .webm): a detector finds the people in
each frame (a video's every 1/--fps seconds) and each person's crop, widened to the model's aspect, is a row
with its source file, time, frame index, box and detector score (ivt_jax/search/footage.py; docs/search.md,
"Footage"). A frame without people is remembered, a video killed midway resumes after its last saved frame;
--track embeds a few crops per tracked person.

`query` embeds the text with the model that built the index and prints the files ranked by score (for footage
also the time and the box); --json prints them as JSON (rank, row, score, path, and time, frame_index, box,
detector_score, track, source for footage); --per_track keeps the best hit of each tracked person; --sheet
writes a PNG contact sheet of the results (footage: the frame around the person, the box drawn, the time).

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
from ivt_jax.search import footage as search_footage
from ivt_jax.search import index as search_index
from ivt_jax.search import model as search_model
from ivt_jax.search import store as search_store
from ivt_jax.runtime import cli as cli_lib


def rank(model: search_model.LoadedModel, index: search_index.Index, texts: Sequence[str], top: int = 10,
         per_track: bool = False) -> list[list[tuple[int, float]]]:
  """Per text, the top rows of the index by score (dot product of the embeddings; the cosine for the IVT head):
  [[(row, score), ...], ...] best first, ties in row order. `per_track`: only the best row of each tracked
  person (the same video and track) and of each untracked row."""
  search_index.check_identity(index, model)
  empty = [i for i, t in enumerate(texts) if not str(t).strip()]
  if empty:
    raise ValueError(f'query {empty[0] + 1} is empty: a query describes the person to find')
  if index.live == 0:
    return [[] for _ in texts]
  q = search_model.embed_texts(model, texts)
  scores = index.scores(q)  # (Q, N) over the memory-mapped shards; deleted rows -inf
  out = []
  for row_scores in scores:
    if not per_track:
      # Score descending, then row (path order): the server's ranking (search_index.top_k).
      out.append([(int(i), float(row_scores[i])) for i in search_index.top_k(row_scores, 0, int(top))
                  if np.isfinite(row_scores[i])])
      continue
    depth, picked = int(top) * 4, []
    while True:
      seen, picked = set(), []
      ranked = search_index.top_k(row_scores, 0, depth)
      for i in ranked:
        if not np.isfinite(row_scores[i]):
          break
        e = index.entry(int(i))
        group = (e['path'], e['track']) if e.get('track') is not None else ('row', int(i))
        if group not in seen:
          seen.add(group)
          picked.append((int(i), float(row_scores[i])))
          if len(picked) == top:
            break
      if len(picked) == top or len(ranked) < depth:
        break
      depth *= 4
    out.append(picked)
  return out


def search(model: search_model.LoadedModel, index: search_index.Index, texts: Sequence[str],
           top: int = 10) -> list[list[tuple[str, float]]]:
  """Per text, the top files of the index by score: [[(path, score), ...], ...] best first (`rank` by path)."""
  return [[(index.path(i), s) for i, s in ranked] for ranked in rank(model, index, texts, top)]


def hit(index: search_index.Index, row: int, score: float, rank_: int) -> dict:
  """One result as `query --json` prints it: rank, row, score, path and, for a person found in footage,
  time (s; None for a still), frame_index, box [x0, y0, x1, y1] in the source's pixels, detector score,
  track and source (the detector)."""
  e = index.entry(row)
  out = {'rank': rank_, 'row': int(row), 'score': round(float(score), 6), 'path': e['path']}
  if search_footage.is_footage(e):
    out.update(time=e.get('frame_time'), frame_index=e.get('frame_index'),
               box=[round(v, 1) for v in search_footage.box_of(e)],
               detector_score=round(float(e['score']), 4), track=e.get('track'), source=e.get('source'))
  return out


def contact_sheet(results: Sequence[Sequence[tuple[str, float]]], texts: Sequence[str],
                  image_size: Sequence[int], height: int = 128, index: Optional[search_index.Index] = None,
                  rows: Optional[Sequence[Sequence[int]]] = None):
  """A PIL contact sheet of `search` results (search_pictures.search_sheet), thumbnails at the model's aspect.
  With the index and the results' rows, a person found in footage is shown in the frame region around them
  with the box drawn, and the time under it."""
  from ivt_jax.search import frames as search_frames  # pylint: disable=g-import-not-at-top
  from ivt_jax.search import pictures as search_pictures  # pylint: disable=g-import-not-at-top
  h, w = image_size
  cell = (height, max(16, int(round(height * w / h))))
  images, scores, names = [], [], []
  for qi, ranked in enumerate(results):
    row, label = [], []
    for j, (p, _) in enumerate(ranked):
      entry = index.entry(rows[qi][j]) if index is not None and rows is not None else {}
      name = os.path.splitext(os.path.basename(p))[0]
      try:
        if search_footage.is_footage(entry):
          row.append(search_pictures.context_crop(search_frames.frame_of(entry), search_footage.box_of(entry), w / h,
                                                  cell=cell))
          name = f'{name} {search_pictures.clock(entry.get("frame_time"))}'.strip()
        else:
          with open(p, 'rb') as f:
            row.append(f.read())
      except (OSError, ValueError):
        row.append(None)
      label.append(name)
    images.append(row)
    scores.append([s for _, s in ranked])
    names.append(label)
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
  p.add_argument('--detect', action='store_true',
                 help='FOLDER holds full frames and videos: index the people a detector finds in them')
  p.add_argument('--detector', default='ssdlite', help='with --detect: ssdlite (shipped), hog, or FILE.onnx')
  p.add_argument('--fps', type=float, default=2.0, help='with --detect: video frames looked at per second')
  p.add_argument('--min_height', type=float, default=64.0, help='with --detect: smallest box height (source px)')
  p.add_argument('--threshold', type=float, default=0.5, help='with --detect: smallest detector score (0..1)')
  p.add_argument('--track', action='store_true',
                 help='with --detect: follow people over a video\'s frames (IoU), embed a few crops per track')
  p.add_argument('--track_gap', type=float, default=2.0, help='with --track: seconds between a track\'s crops')
  p.add_argument('--track_crops', type=int, default=4, help='with --track: crops embedded per track at most')
  p.add_argument('--save_every_s', type=float, default=300.0,
                 help='with --detect: write a shard at least this often (s): a killed run resumes after it')
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
  q.add_argument('--json', action='store_true',
                 help='print the results as JSON: per hit rank, row, score, path and for footage time, box, '
                      'detector score, track')
  q.add_argument('--per_track', action='store_true', help='only the best hit of each tracked person')
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
  if args.command == 'index':
    footage_flags = [f for f in ('detector', 'fps', 'min_height', 'threshold', 'track', 'track_gap', 'track_crops',
                                 'save_every_s') if getattr(args, f) != p.get_default(f)]
    if footage_flags and not args.detect:
      parser.error(f'--{footage_flags[0]} is a --detect setting: add --detect (FOLDER holds full frames and videos)')
    if args.detect:
      try:
        args.footage = search_footage.FootageOptions(args.detector, args.fps, args.min_height, args.threshold,
                                                     args.track, track_gap=args.track_gap,
                                                     track_crops=args.track_crops)
      except ValueError as e:
        parser.error(str(e))
    else:
      args.footage = None
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
  from ivt_jax.runtime import console  # pylint: disable=g-import-not-at-top
  console.quiet_libraries()  # TensorFlow's start-up lines (the detector), unless IVT_VERBOSE=1
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
                                      save_every=args.save_every, dtype=args.dtype, footage=args.footage,
                                      save_every_s=args.save_every_s, log=_log)
    for u in result['unreadable']:
      print(f'unreadable: {u["path"]} ({u["error"]})')
    what = 'rows (people in frames, and crops)' if args.footage else 'images'
    found = (f', {result["people"]} people in {result["frames"]} frames looked at' if args.footage else '')
    print(f'{result["images"]} {what} indexed in {os.path.abspath(args.out)} ({result["embedded"]} embedded '
          f'now{found}, {result["unchanged"]} files unchanged, {result["removed"]} removed, '
          f'{len(result["unreadable"])} unreadable)')
    return 0
  index = search_index.load_index(args.index)
  model = search_index.model_for_index(index, args.checkpoint, args.config, args.tokenizer, args.tokenizer_kind)
  length = int(model.config.data.text_length) - 2
  for i, pieces in enumerate(model.tokenizer.pieces(args.texts), 1):
    if len(pieces) > length:
      _log(f'note: query {i} is {len(pieces)} tokens long; its first {length} are used (data.text_length)')
  ranked_rows = rank(model, index, args.texts, args.top, per_track=args.per_track)
  results = [[(index.path(i), s) for i, s in ranked] for ranked in ranked_rows]
  if args.json:
    import json  # pylint: disable=g-import-not-at-top
    print(json.dumps({'index': os.path.abspath(args.index), 'queries': [
        {'query': text, 'results': [hit(index, i, s, k) for k, (i, s) in enumerate(ranked, 1)]}
        for text, ranked in zip(args.texts, ranked_rows)]}, indent=1))
  else:
    from ivt_jax.search import pictures as search_pictures  # pylint: disable=g-import-not-at-top
    for text, ranked in zip(args.texts, ranked_rows):
      print(f'query: {text}')
      for k, (i, score) in enumerate(ranked, 1):
        h = hit(index, i, score, k)
        where = ''
        if 'box' in h:
          at = f' @ {search_pictures.clock(h["time"])}' if h['time'] is not None else ''
          where = (f'{at}  box {",".join(str(round(v)) for v in h["box"])}'
                   + (f'  track {h["track"]}' if h['track'] is not None else ''))
        print(f'{k:4d}  {score:+.4f}  {h["path"]}{where}')
  if args.sheet:
    from ivt_jax.evaluation import pictures as visualize  # pylint: disable=g-import-not-at-top
    sheet = contact_sheet(results, args.texts, model.image_size, index=index,
                          rows=[[i for i, _ in ranked] for ranked in ranked_rows])
    path = visualize.save_png(sheet, args.sheet)
    print(f'contact sheet: {path}', file=sys.stderr if args.json else sys.stdout)
  return 0


def cli(argv: Optional[Sequence[str]] = None) -> int:
  """`main` with bad input (missing files, another model's index, ...) reported as one line, status 2."""
  return cli_lib.run_cli(main, argv)

