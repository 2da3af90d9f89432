"""What footage costs on this machine: frames/s to decode a video and to find people in its frames, and the
cost of an hour of it.

  python -m ivt_jax.tools.footage_benchmark [--video=FILE] [--seconds=20] [--size=1280x720] [--fps=2]
      [--detectors=ssdlite,hog]

Without --video, a clip of --seconds at 25 frames/s and --size is written first (H.264, moving noise blocks: the
decoder's work depends on the size and the codec, not on what is shown). Printed: decode frames/s over every
frame (sampling still decodes every frame), and per detector the sampled frames/s (whole frame plus tiles for
frames over 640 px), then the hours of this machine that one hour of footage at --fps takes for decoding and
detection (embedding the crops comes on top: `python -m ivt_jax.benchmark` measures the model).
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


def main(argv: Optional[Sequence[str]] = None) -> int:
  p = argparse.ArgumentParser(prog='python -m ivt_jax.tools.footage_benchmark', description=__doc__.split('\n')[0])
  p.add_argument('--video', default='')
  p.add_argument('--seconds', type=float, default=20.0)
  p.add_argument('--size', default='1280x720')
  p.add_argument('--fps', type=float, default=2.0)
  p.add_argument('--detectors', default='ssdlite,hog')
  args = p.parse_args(argv)
  try:
    width, height = (int(v) for v in args.size.lower().split('x'))
  except ValueError:
    p.error(f'--size: WIDTHxHEIGHT, got {args.size!r}')
  if args.fps <= 0 or args.seconds <= 0:
    p.error('--fps and --seconds must be > 0')
  log = lambda line: print(line, file=sys.stderr, flush=True)
  with tempfile.TemporaryDirectory() as tmp:
    video = args.video
    if not video:
      video = os.path.join(tmp, 'clip.mp4')
      write_clip(video, args.seconds, width - width % 16, height - height % 16)
    r = run(video, args.fps, [d for d in args.detectors.split(',') if d], log)
  print(f'{r["frames"]} frames of {r["size"]}: decode {r["decode_frames_per_s"]} frames/s; sampling at '
        f'{args.fps}/s keeps {r["sampled"]} ({r["sample_pass_s"]} s for the pass)')
  print('| detector | sampled frames/s | hours of this machine per hour of footage (decode + detect) |')
  print('|---|---:|---:|')
  for name in args.detectors.split(','):
    if name in r:
      print(f'| {name} | {r[name]["frames_per_s"]} | {r[name]["hours_per_footage_hour"]} |')
  return 0


if __name__ == '__main__':
  sys.exit(main())
