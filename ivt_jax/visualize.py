"""Pictures: the retrieval grid (a caption and its top-k gallery images, hits marked)."""
import io
import textwrap
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

HIT, MISS = (40, 170, 60), (210, 50, 40)


def _decode(image_bytes) -> Image.Image:
  return Image.open(io.BytesIO(bytes(image_bytes))).convert('RGB')


def retrieval_grid(captions: Sequence[str], ranked_images: Sequence[Sequence[bytes]],
                   hits: Sequence[Sequence[bool]], cell=(128, 48), text_width: int = 260) -> Image.Image:
  """One row per query: the wrapped caption, then its ranked images with a green (hit) or red (miss) frame.

  captions: Q strings; ranked_images: Q lists of encoded images (best first); hits: Q lists of bools.
  """
  h, w = cell
  pad, frame = 6, 3
  k = max(len(r) for r in ranked_images)
  width = text_width + k * (w + pad) + pad
  height = len(captions) * (h + 2 * pad + 14) + pad
  sheet = Image.new('RGB', (width, height), 'white')
  draw = ImageDraw.Draw(sheet)
  font = ImageFont.load_default()
  for row, (caption, images, marks) in enumerate(zip(captions, ranked_images, hits)):
    y = pad + row * (h + 2 * pad + 14)
    lines = textwrap.wrap(caption, width=max(10, text_width // 6))[: max(1, h // 11)]
    draw.multiline_text((pad, y), '\n'.join(lines), fill='black', font=font, spacing=1)
    for j, (image, hit) in enumerate(zip(images, marks)):
      x = text_width + j * (w + pad)
      draw.rectangle([x - frame, y - frame, x + w + frame - 1, y + h + frame - 1], fill=HIT if hit else MISS)
      sheet.paste(_decode(image).resize((w, h), Image.BICUBIC), (x, y))
      draw.text((x + w // 2 - 3, y + h + frame + 1), str(j + 1), fill='black', font=font)
  return sheet


def retrieval_picture(sim: np.ndarray, text_pid: np.ndarray, image_pid: np.ndarray, captions: Sequence[str],
                      image_bytes: Sequence[bytes], num_queries: int = 4, k: int = 10, seed: int = 0,
                      cell=(128, 48)) -> Image.Image:
  """Top-k of a few queries (chosen with a fixed seed) as a retrieval grid."""
  rng = np.random.default_rng(seed)
  queries = rng.choice(len(text_pid), size=min(num_queries, len(text_pid)), replace=False)
  ranked, marks = [], []
  for q in queries:
    top = np.argsort(-sim[q], kind='stable')[:k]
    ranked.append([image_bytes[g] for g in top])
    marks.append([bool(image_pid[g] == text_pid[q]) for g in top])
  return retrieval_grid([captions[q] for q in queries], ranked, marks, cell=cell)
