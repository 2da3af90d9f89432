"""A search page and JSON API over an image index: type a description, see the people.

  python -m ivt_jax.serve --index=DIR [--checkpoint=...] [--host=127.0.0.1] [--port=8000] [--token=...]
      [--approximate=ivf|hnsw]

The page (/) has a text box and shows the results as a grid (rank, score, file name; for a person found in
footage, the file, the time and the track) with paging; clicking an image shows it large (a person found in
footage: the whole frame at that moment, the box drawn) beside the query's text-match map
(ivt_jax.search.attention_maps) and offers "more like this". The API (FastAPI; its schema at /openapi.json and
/docs):

  GET /api/search?q=TEXT&k=20&offset=0    images ranked for a description
  GET /api/similar?id=ROW&k=20&offset=0   images ranked by their likeness to indexed image ROW
  GET /api/image/ROW                      the file of indexed image ROW; for a person found in footage (a full
                                          frame or a video), a JPEG of the person cut from the frame
  GET /api/frame/ROW?box=1                JPEG: the whole frame footage row ROW was found in, its box and time
                                          drawn (box=0: the plain frame); 404 for a person crop
  GET /api/match/ROW?q=TEXT               PNG: image ROW (a footage row: its person crop), its CLS attention and
                                          the text-match map of TEXT
  GET /api/info                           the index, the model, the limits, the counters

A result of a person found in footage carries `frame` {time, index, box, score, track, source} (null for a
crop), and a video's result is named with its time ("cam1.mp4 @ 0:12.5"); ivt_jax/search/footage_serving.py
makes its pictures (decoded in the thread pool, the last frames cached).

Safe by default: it binds 127.0.0.1; binding any other address needs a token (--token or IVT_SERVE_TOKEN) that
every request must carry (`Authorization: Bearer TOKEN`, or open the page once as /?token=TOKEN, which sets a
cookie). Files are named by row number only and sent only when they are in the index and resolve inside the
indexed folders. Query length, k, offset, request size and waiting work are limited, each with a clear 4xx/503.
The index may be rebuilt or updated while serving (`python -m ivt_jax.search index ...`): the new one is picked
up within a second (ivt_jax/search/state.py). Search is exact (every embedding scored) unless --approximate asks
for a faiss index (ivt_jax/search/ann.py: IVF with a float rerank, or HNSW) for galleries of millions, saved beside
the index (INDEX/ann/), loaded and brought up to date from there next time; pages deeper than 1000 results stay
exact.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import hmac
import io
import ipaddress
import os
import sys
from typing import Optional, Sequence

import numpy as np

from ivt_jax.search import api_schemas as schemas
from ivt_jax.search import footage_serving as footage
from ivt_jax.search import model as search_model
from ivt_jax.search import state as serve_state

WEB_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'web')
TOKEN_ENV = 'IVT_SERVE_TOKEN'
COOKIE = 'ivt_token'


@dataclasses.dataclass(frozen=True)
class Limits:
  max_query_chars: int = 1000     # characters of a text query
  max_k: int = 200                # results per page
  max_offset: int = 10_000        # how deep paging may go
  max_request_bytes: int = 16_384  # a request's body (the API takes none) and its URL
  max_pending: int = 256          # text queries waiting for the embedder
  max_batch: int = 64             # text queries embedded in one call
  batch_window_s: float = 0.005   # how long the first waiting query waits for others


def is_loopback(host: str) -> bool:
  if host == 'localhost':
    return True
  try:
    return ipaddress.ip_address(host).is_loopback
  except ValueError:
    return False


def _padded_embedder(model: search_model.LoadedModel):
  """Texts -> (n, D); batches padded to a power of two so that only a few shapes are ever compiled."""
  def embed(texts):
    n = len(texts)
    size = 1 << max(0, (n - 1).bit_length())
    return search_model.embed_texts(model, list(texts) + ['a'] * (size - n))[:n]
  return embed


def warm_up(model: search_model.LoadedModel, max_batch: int) -> int:
  """Compiles the text embedder for every padded batch size up front (the first queries then wait for no
  compilation); -> the number of sizes."""
  embed = _padded_embedder(model)
  sizes = [1 << i for i in range(max(1, max_batch - 1).bit_length() + 1) if 1 << i <= max(1, max_batch)]
  for n in sizes:
    embed(['a'] * n)
  return len(sizes)


def create_app(holder: serve_state.IndexHolder, *, token: str = '', limits: Limits = Limits()):
  """The FastAPI application over an `IndexHolder` (its model embeds the queries)."""
  import fastapi  # pylint: disable=g-import-not-at-top
  from fastapi import responses, staticfiles  # pylint: disable=g-import-not-at-top
  from starlette.concurrency import run_in_threadpool  # pylint: disable=g-import-not-at-top

  model = holder.model
  batcher = serve_state.TextBatcher(_padded_embedder(model), max_batch=limits.max_batch,
                                    window_s=limits.batch_window_s, max_pending=limits.max_pending)

  @contextlib.asynccontextmanager
  async def lifespan(_):
    yield
    batcher.close()

  app = fastapi.FastAPI(title='ivt-jax search', description='Text-based person retrieval over an image index.',
                        version='1', lifespan=lifespan)
  frames = footage.Frames()
  app.state.holder, app.state.batcher, app.state.limits, app.state.frames = holder, batcher, limits, frames
  app.add_exception_handler(fastapi.exceptions.RequestValidationError, schemas.validation_handler(limits))

  @app.middleware('http')
  async def guard(request: fastapi.Request, call_next):
    length = request.headers.get('content-length')
    if (length and (not length.isdigit() or int(length) > limits.max_request_bytes)) or \
        len(str(request.url)) > limits.max_request_bytes:
      return responses.JSONResponse({'detail': f'request larger than {limits.max_request_bytes} bytes'}, 413)
    if token:
      given = request.query_params.get('token') or request.cookies.get(COOKIE) or ''
      auth = request.headers.get('authorization', '')
      if auth.lower().startswith('bearer '):
        given = auth[7:].strip()
      if not hmac.compare_digest(given.encode(), token.encode()):
        return responses.JSONResponse({'detail': 'a valid token is required (Authorization: Bearer TOKEN, or '
                                                 'open the page as /?token=TOKEN)'}, 401)
    response = await call_next(request)
    if token and request.query_params.get('token'):
      response.set_cookie(COOKIE, token, httponly=True, samesite='strict')
    return response

  async def embed_query(q: str) -> np.ndarray:
    try:
      future = batcher.submit(q)
    except serve_state.Busy as e:
      raise fastapi.HTTPException(503, f'busy: {e}; try again shortly') from None
    return await asyncio.wrap_future(future)

  def page(snap, pairs, k, offset, **extra):
    """The results page (run in the thread pool: a shard of footage has its row metadata read when first asked
    for; a shard of crops only its paths, read at open)."""
    index = snap.index
    roots = index.header.get('roots', [])
    def name(path):
      root = next((r for r in roots if path.startswith(r.rstrip(os.sep) + os.sep)), '')
      return os.path.relpath(path, root) if root else os.path.basename(path)
    results = []
    for i, (row, score) in enumerate(pairs):
      try:
        entry = index.footage_entry(row)
      except (OSError, ValueError):  # the shard's rows file replaced after this snapshot opened (a compaction):
        entry = {'path': index.path(row)}  # its paths were read at open
      results.append({'rank': offset + i + 1, 'id': row, 'score': round(score, 6),
                      'name': footage.display_name(name(entry['path']), entry),
                      'frame': footage.frame_info(entry)})
    return {**extra, 'total': index.live, 'offset': offset, 'k': k, 'results': results}

  @app.get('/', include_in_schema=False)
  async def home():
    return responses.FileResponse(os.path.join(WEB_DIR, 'index.html'), headers={'Cache-Control': 'no-store'})

  app.mount('/static', staticfiles.StaticFiles(directory=WEB_DIR), name='static')

  Q = lambda description: fastapi.Query(..., min_length=1, max_length=limits.max_query_chars, pattern=r'\S',
                                        description=description)
  K = fastapi.Query(20, ge=1, le=limits.max_k, description='results per page')
  OFFSET = fastapi.Query(0, ge=0, le=limits.max_offset, description='results skipped (paging)')

  @app.get('/api/search', summary='Images ranked for a description', response_model=schemas.SearchPage,
           responses=schemas.errors(413, 401, 503))
  async def search(q: str = Q('what the person looks like'), k: int = K, offset: int = OFFSET):
    query = await embed_query(q)
    snap = holder.current()
    pairs = await run_in_threadpool(holder.rank, snap, query, offset, k)
    return await run_in_threadpool(page, snap, pairs, k, offset, query=q)

  @app.get('/api/similar', summary='Images ranked by their likeness to an indexed image',
           response_model=schemas.SimilarPage, responses=schemas.errors(404, 413, 401))
  async def similar(id: int = fastapi.Query(..., ge=0, description='the row of an indexed image'),  # pylint: disable=redefined-builtin
                    k: int = K, offset: int = OFFSET):
    snap = holder.current()
    if not snap.index.is_live(id):
      raise fastapi.HTTPException(404, f'no image {id}: the index numbers 0..{len(snap.index) - 1} and holds '
                                  f'{snap.index.live}')
    pairs = await run_in_threadpool(holder.rank, snap, snap.index.vector(id), offset, k, id)
    return await run_in_threadpool(page, snap, pairs, k, offset, id=id)

  def file_of(snap: serve_state.Snapshot, row: int) -> str:
    try:
      return holder.servable_path(snap, row)
    except IndexError as e:
      raise fastapi.HTTPException(404, str(e)) from None
    except PermissionError as e:
      raise fastapi.HTTPException(403, str(e)) from None

  async def row_of(row: int) -> tuple[str, dict]:
    """(the real path of row `row`, checked servable; its metadata) from one snapshot."""
    snap = holder.current()
    path = file_of(snap, row)
    try:
      return path, await run_in_threadpool(snap.index.footage_entry, row)
    except (OSError, ValueError):  # a compaction replaced the shard's rows file (and renumbered the rows)
      raise fastapi.HTTPException(404, f'row {row}: the index was rewritten while answering (its rows are '
                                  'numbered anew); search again') from None

  async def picture(make, *args) -> bytes:
    """A footage picture made in the thread pool; footage.Unavailable -> its status and message."""
    try:
      return await run_in_threadpool(make, frames, *args)
    except footage.Unavailable as e:
      raise fastapi.HTTPException(e.status, str(e)) from None

  ROW = fastapi.Path(..., ge=0, description='the row of an indexed image')

  @app.get('/api/image/{row}', summary='The file of an indexed image (a person found in footage: a JPEG of the crop)',
           response_class=responses.Response,
           responses={200: schemas.content(schemas.IMAGE_TYPES.values(), 'the image file, or the person cut from '
                                                                         'the frame (JPEG)'),
                      **schemas.errors(403, 404, 413, 401)})
  async def image(row: int = ROW):
    path, entry = await row_of(row)
    if footage.is_footage(entry):
      return responses.Response(await picture(footage.crop_jpeg, row, entry, path, model.image_size),
                                media_type='image/jpeg')
    if not os.path.isfile(path):
      raise fastapi.HTTPException(404, f'image {row} is no longer on disk')
    media = schemas.IMAGE_TYPES.get(os.path.splitext(path)[1].lower())
    if media is None:
      raise fastapi.HTTPException(404, f'image {row} is not a file type the index holds')
    return responses.FileResponse(path, media_type=media)

  @app.get('/api/match/{row}', summary='PNG: the image, its attention and the text-match map of a query',
           response_class=responses.Response,
           responses={200: schemas.content(['image/png'], 'the figure'), **schemas.errors(403, 404, 413, 401)})
  async def match(row: int = ROW, q: str = Q('the description to match')):
    path, entry = await row_of(row)
    crop = await picture(footage.crop_png, row, entry, path, model.image_size) \
        if footage.is_footage(entry) else None
    def draw():
      from ivt_jax.search import attention_maps  # pylint: disable=g-import-not-at-top
      fig, _ = attention_maps.figure(model, path if crop is None else crop, [q], height=256)
      buf = io.BytesIO()
      fig.save(buf, format='PNG')
      return buf.getvalue()
    try:
      png = await run_in_threadpool(draw)
    except (OSError, ValueError) as e:
      raise fastapi.HTTPException(404, f'image {row} cannot be read now: {e}') from None
    return responses.Response(png, media_type='image/png')

  @app.get('/api/frame/{row}', summary='JPEG: the whole frame a person in footage was found in, the box drawn',
           response_class=responses.Response,
           responses={200: schemas.content(['image/jpeg'], 'the frame at that moment'),
                      **schemas.errors(403, 404, 413, 401, notes={
                          404: 'no such row, its file is gone or changed, or the row is a person crop (no frame)'})})
  async def frame(row: int = fastapi.Path(..., ge=0, description='the row of a person found in footage'),
                  box: bool = fastapi.Query(True, description='draw the box and the time (false: the plain frame)')):
    path, entry = await row_of(row)
    return responses.Response(await picture(footage.frame_jpeg, row, entry, path, box), media_type='image/jpeg')

  @app.get('/api/info', summary='The index, the model, the limits and the counters',
           responses=schemas.errors(413, 401))
  async def info():
    snap = holder.current()
    return {'images': snap.index.live, 'index': holder.directory,
            'updated': snap.index.header.get('stats', {}).get('updated'), 'reloads': holder.reloads,
            'model': {'checkpoint': model.checkpoint, 'step': model.meta.get('step')},
            'approximate': snap.ann is not None,
            'limits': dataclasses.asdict(limits),
            'embedder': {'calls': batcher.calls, 'queries': batcher.queries},
            'frames_decoded': frames.decoded}

  return app


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog='python -m ivt_jax.serve', description=__doc__.split('\n')[0])
  p.add_argument('--index', required=True, help='an index directory (python -m ivt_jax.search index)')
  p.add_argument('--checkpoint', default='', help='the model (default: the one the index was built with)')
  p.add_argument('--config', default='', help='config file overriding the checkpoint\'s saved config')
  p.add_argument('--host', default='127.0.0.1', help='address to bind (another than loopback needs a token)')
  p.add_argument('--port', type=int, default=8000)
  p.add_argument('--token', default='', help=f'required of every request (default: ${TOKEN_ENV})')
  p.add_argument('--approximate', choices=('', 'ivf', 'hnsw'), default='',
                 help='search an approximate index (faiss IVF with a float rerank, or HNSW; ivt_jax/search/ann.py), '
                      'saved beside the index, instead of every embedding')
  args = p.parse_args(argv)
  args.token = args.token or os.environ.get(TOKEN_ENV, '')
  if not is_loopback(args.host) and not args.token:
    p.error(f'--host={args.host} lets other machines in: give a token (--token or ${TOKEN_ENV}) that every request '
            'must carry, or keep the default 127.0.0.1')
  if not 0 <= args.port <= 65535:
    p.error(f'--port must be 0..65535, got {args.port}')
  return args


def load(args: argparse.Namespace, log=print) -> serve_state.IndexHolder:
  from input_pipeline import paths  # pylint: disable=g-import-not-at-top
  from ivt_jax.search import index as search_index  # pylint: disable=g-import-not-at-top
  directory = paths.resolve(args.index, '--index')
  model = search_index.model_for_index(search_index.load_index(directory), args.checkpoint, args.config)
  approximate = None
  if args.approximate:
    from ivt_jax.search import ann as serve_ann  # pylint: disable=g-import-not-at-top
    approximate = serve_ann.for_index(args.approximate, log)
  return serve_state.IndexHolder(directory, model, approximate=approximate, log=log)


def main(argv: Optional[Sequence[str]] = None) -> int:
  args = parse_args(argv)
  import uvicorn  # pylint: disable=g-import-not-at-top
  log = lambda line: print(line, file=sys.stderr, flush=True)
  holder = load(args, log)
  limits = Limits()
  log(f'compiled the text embedder for {warm_up(holder.model, limits.max_batch)} batch sizes')
  app = create_app(holder, token=args.token, limits=limits)
  where = f'http://{args.host}:{args.port}/'
  log(f'serving {holder.current().index.live} images of {holder.directory} at {where}'
      + (f' (every request needs the token: open {where}?token=... once)' if args.token else '')
      + '; API schema at /docs')
  uvicorn.run(app, host=args.host, port=args.port, log_level='warning')
  return 0


def cli(argv: Optional[Sequence[str]] = None) -> int:
  from ivt_jax.runtime import cli as cli_lib  # pylint: disable=g-import-not-at-top
  return cli_lib.run_cli(main, argv)

