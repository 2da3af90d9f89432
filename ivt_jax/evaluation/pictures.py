"""Pictures of evaluation: the retrieval grid (a caption and its top-k gallery images, hits marked), and the
drawing helpers the search pictures share (images from bytes or arrays, fonts, labels cut to fit, PNG files)."""
import io
import textwrap
from typing import Sequence, Union

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from input_pipeline import paths

HIT, MISS = (40, 170, 60), (210, 50, 40)
NEUTRAL = (150, 150, 150)
MISSING = (225, 225, 225)

ImageLike = Union[bytes, bytearray, memoryview, np.ndarray, Image.Image, None]


def decode(image_bytes) -> Image.Image:
  return Image.open(io.BytesIO(bytes(image_bytes))).convert('RGB')


def as_image(image: ImageLike, size) -> Image.Image:
  """Encoded bytes, a uint8 (H, W, 3) array or a PIL image -> RGB PIL image of size (h, w).

  None, or bytes that do not decode, give a light grey placeholder (a file that vanished or broke).
  """
  h, w = size
  if image is None:
    return Image.new('RGB', (w, h), MISSING)
  if isinstance(image, np.ndarray):
    pil = Image.fromarray(np.asarray(image, np.uint8)).convert('RGB')
  elif isinstance(image, Image.Image):
    pil = image.convert('RGB')
  else:
    try:
      pil = decode(image)
    except (OSError, ValueError, SyntaxError):
      return Image.new('RGB', (w, h), MISSING)
  return pil.resize((w, h), Image.BICUBIC)


def font(size: int = 11):
  try:
    return ImageFont.load_default(size=size)
  except TypeError:  # Pillow without FreeType: the fixed bitmap font
    return ImageFont.load_default()


def fit_text(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
  """text, cut in the middle with '..' until it is at most `width` pixels wide."""
  if draw.textlength(text, font=font) <= width:
    return text
  for keep in range(len(text) - 1, 1, -1):
    cut = text[:(keep + 1) // 2] + '..' + text[len(text) - keep // 2:]
    if draw.textlength(cut, font=font) <= width:
      return cut
  return text[:2]


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
      sheet.paste(decode(image).resize((w, h), Image.BICUBIC), (x, y))
      draw.text((x + w // 2 - 3, y + h + frame + 1), str(j + 1), fill='black', font=font)
  return sheet


def save_png(image: Image.Image, path: str) -> str:
  """Saves a PIL image as PNG (folders created; a local path or gs://); returns the absolute path or URL."""
  path = paths.resolve(path, 'picture')
  buf = io.BytesIO()
  image.save(buf, format='PNG')
  paths.write_bytes_atomic(path, buf.getvalue())
  return path


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
