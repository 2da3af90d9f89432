"""What footage costs on this machine: frames/s to decode a video and to find people in its frames, and the
cost of an hour of it.

  python -m ivt_jax.tools.footage_benchmark [--video=FILE] [--seconds=20] [--size=1280x720] [--fps=2]
      [--detectors=ssdlite,hog] [--embed_config=configs/cuhk.py | --checkpoint=DIR] [--people=3]

Without --video, a clip of --seconds at 25 frames/s and --size is written first (H.264, moving noise blocks: the
decoder's work depends on the size and the codec, not on what is shown). Printed: decode frames/s over every
frame (sampling still decodes every frame), and per detector the sampled frames/s (whole frame plus tiles for
frames over 640 px), then the hours of this machine that one hour of footage at --fps takes for decoding and
detection. With --embed_config (a model of that config with random parameters: the speed is the same as a trained
one's) or --checkpoint, also person crops embedded per second (batches of --embed_batch, after compiling) and the
hours per footage hour with embedding, for --people people embedded per sampled frame (no tracking; --track
embeds fewer).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from typing import Optional, Sequence

import numpy as np


def write_clip(path: str, seconds: float, width: int, height: int, rate: int = 25) -> None:
  import av  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  base = rng.integers(0, 255, (height // 16, width // 16, 3), dtype=np.uint8)
  with av.open(path, 'w') as out:
    stream = out.add_stream('libx264', rate=rate)
    stream.width, stream.height, stream.pix_fmt = width, height, 'yuv420p'
    for k in range(int(seconds * rate)):
      img = np.kron(np.roll(base, k, axis=1), np.ones((16, 16, 1), np.uint8))
      for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format='rgb24')):
        out.mux(packet)
    for packet in stream.encode():
      out.mux(packet)


def run(video: str, fps: float, detectors: Sequence[str], log=lambda _: None) -> dict:
  from ivt_jax.search import detect, frames  # pylint: disable=g-import-not-at-top
  t = time.perf_counter()
  sampled = [f for _, _, f in frames.sample(video, fps=1000.0)]  # every frame
  decode_s = time.perf_counter() - t
  n = len(sampled)
  duration = n / 25.0
  t = time.perf_counter()
  picks = list(frames.sample(video, fps=fps))
  sample_s = time.perf_counter() - t
  out = {'video': video, 'frames': n, 'size': f'{sampled[0].shape[1]}x{sampled[0].shape[0]}',
         'decode_frames_per_s': round(n / decode_s, 1), 'sampled': len(picks),
         'sample_pass_s': round(sample_s, 2)}
  for name in detectors:
    d = detect.make(name)
    d(picks[0][2])  # warm up (graph construction)
    t = time.perf_counter()
    for _, _, f in picks:
      d(f)
    per = (time.perf_counter() - t) / len(picks)
    out[name] = {'frames_per_s': round(1 / per, 2),
                 'hours_per_footage_hour': round((sample_s / max(duration, 1e-9) * 3600 + fps * 3600 * per) / 3600,
                                                 2)}
    log(f'{name}: {out[name]}')
  return out


def embed_rate(config_file: str = '', checkpoint: str = '', batch: int = 32, batches: int = 3) -> dict:
  """Crops embedded per second by the model of `config_file` (random parameters) or `checkpoint`."""
  import jax  # pylint: disable=g-import-not-at-top
  from ivt_jax.search import model as search_model  # pylint: disable=g-import-not-at-top
  if checkpoint:
    model = search_model.load_model(checkpoint)
    size, mesh, embed = model.image_size, model.mesh, lambda x: search_model.embed_images(model, x, pad_to=batch)
    name = checkpoint
  else:
    from ivt_jax.evaluation import evaluate as evaluate_lib  # pylint: disable=g-import-not-at-top
    from ivt_jax.models import encoder as model_lib  # pylint: disable=g-import-not-at-top
    from ivt_jax.models import heads  # pylint: disable=g-import-not-at-top
    from ivt_jax.runtime import sharding as sharding_lib  # pylint: disable=g-import-not-at-top
    config = search_model.load_config_file(config_file)
    config.model.vocab_size = int(config.model.get('vocab_size') or 0) or 30522
    config = search_model._search_mesh_config(config)  # pylint: disable=protected-access
    encoder = heads.build(config)
    mesh = sharding_lib.make_mesh(config, jax.local_devices())
    abstract = jax.eval_shape(lambda: model_lib.init_module_params(encoder, jax.random.key(0)))
    shardings = sharding_lib.param_shardings(abstract, mesh)
    params = jax.jit(lambda: model_lib.init_module_params(encoder, jax.random.key(0)), out_shardings=shardings)()
    embedder = evaluate_lib.Embedder(encoder, mesh, shardings)
    size = tuple(int(v) for v in config.data.image_size)
    fake = search_model.LoadedModel(config, None, encoder, mesh, params, embedder, '', {}, {})
    embed = lambda x: search_model.embed_images(fake, x, pad_to=batch)
    name = config_file
  crops = np.random.default_rng(0).integers(0, 255, (batch,) + tuple(size) + (3,), dtype=np.uint8)
  embed(crops)  # compile
  times = []
  for _ in range(batches):
    t = time.perf_counter()
    embed(crops)
    times.append(time.perf_counter() - t)
  per = float(np.median(times)) / batch
  return {'model': name, 'image_size': list(size), 'devices': int(mesh.size), 'batch': batch,
          'crops_per_s': round(1 / per, 2), 'spread_s': [round(min(times), 2), round(max(times), 2)]}


def main(argv: Optional[Sequence[str]] = None) -> int:
  p = argparse.ArgumentParser(prog='python -m ivt_jax.tools.footage_benchmark', description=__doc__.split('\n')[0])
  p.add_argument('--video', default='')
  p.add_argument('--seconds', type=float, default=20.0)
  p.add_argument('--size', default='1280x720')
  p.add_argument('--fps', type=float, default=2.0)
  p.add_argument('--detectors', default='ssdlite,hog')
  p.add_argument('--embed_config', default='', help='also time embedding with a model of this config (random)')
  p.add_argument('--checkpoint', default='', help='also time embedding with this checkpoint')
  p.add_argument('--embed_batch', type=int, default=32)
  p.add_argument('--people', type=float, default=3.0, help='people embedded per sampled frame, for the hour')
  args = p.parse_args(argv)
  try:
    width, height = (int(v) for v in args.size.lower().split('x'))
  except ValueError:
    p.error(f'--size: WIDTHxHEIGHT, got {args.size!r}')
  if args.fps <= 0 or args.seconds <= 0:
    p.error('--fps and --seconds must be > 0')
  from ivt_jax.runtime import console  # pylint: disable=g-import-not-at-top
  console.quiet_libraries()
  log = lambda line: print(line, file=sys.stderr, flush=True)
  with tempfile.TemporaryDirectory() as tmp:
    video = args.video
    if not video:
      video = os.path.join(tmp, 'clip.mp4')
      write_clip(video, args.seconds, width - width % 16, height - height % 16)
    r = run(video, args.fps, [d for d in args.detectors.split(',') if d], log)
  print(f'{r["frames"]} frames of {r["size"]}: decode {r["decode_frames_per_s"]} frames/s; sampling at '
        f'{args.fps}/s keeps {r["sampled"]} ({r["sample_pass_s"]} s for the pass)')
  embed = None
  if args.embed_config or args.checkpoint:
    embed = embed_rate(args.embed_config, args.checkpoint, args.embed_batch)
    print(f'embedding: {embed["crops_per_s"]} crops/s ({embed["model"]}, {embed["image_size"][0]}x'
          f'{embed["image_size"][1]}, batch {embed["batch"]} on {embed["devices"]} device(s); batch time '
          f'{embed["spread_s"][0]}..{embed["spread_s"][1]} s)')
  extra = f' | with embedding {args.people:g} people per sampled frame' if embed else ''
  print(f'| detector | sampled frames/s | hours of this machine per hour of footage (decode + detect){extra} |')
  print('|---|---:|---:|' + ('---:|' if embed else ''))
  for name in args.detectors.split(','):
    if name in r:
      row = f'| {name} | {r[name]["frames_per_s"]} | {r[name]["hours_per_footage_hour"]} |'
      if embed:
        row += f' {r[name]["hours_per_footage_hour"] + args.fps * 3600 * args.people / embed["crops_per_s"] / 3600:.2f} |'
      print(row)
  return 0


if __name__ == '__main__':
  sys.exit(main())
