"""Pictures: the retrieval grid (a caption and its top-k gallery images, hits marked), the search contact
sheet (a text query and its top-k files with scores) and attention-map panels (heat maps over an image)."""
import io
import textwrap
from typing import Optional, Sequence, Union

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from input_pipeline import paths

HIT, MISS = (40, 170, 60), (210, 50, 40)
NEUTRAL = (150, 150, 150)
MISSING = (225, 225, 225)

ImageLike = Union[bytes, bytearray, memoryview, np.ndarray, Image.Image, None]


def _decode(image_bytes) -> Image.Image:
  return Image.open(io.BytesIO(bytes(image_bytes))).convert('RGB')


def _as_image(image: ImageLike, size) -> Image.Image:
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
      pil = _decode(image)
    except (OSError, ValueError, SyntaxError):
      return Image.new('RGB', (w, h), MISSING)
  return pil.resize((w, h), Image.BICUBIC)


def _font(size: int = 11):
  try:
    return ImageFont.load_default(size=size)
  except TypeError:  # Pillow without FreeType: the fixed bitmap font
    return ImageFont.load_default()


def _fit(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
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
      sheet.paste(_decode(image).resize((w, h), Image.BICUBIC), (x, y))
      draw.text((x + w // 2 - 3, y + h + frame + 1), str(j + 1), fill='black', font=font)
  return sheet


def search_sheet(queries: Sequence[str], ranked_images: Sequence[Sequence[ImageLike]],
                 scores: Sequence[Sequence[float]], names: Optional[Sequence[Sequence[str]]] = None,
                 cell=(128, 48), text_width: int = 220) -> Image.Image:
  """A contact sheet of text-search results: one row per query, its ranked images left to right.

  Under each image: its rank and cosine score, then (optional) its file name, cut to the cell width.

  Args:
    queries: Q query texts.
    ranked_images: Q lists of images, best first: encoded bytes, uint8 (H, W, 3) arrays or PIL images;
      None (or undecodable bytes) draws a grey placeholder.
    scores: Q lists of similarity scores, aligned with ranked_images.
    names: optional Q lists of labels (e.g. file names), aligned with ranked_images.
    cell: (h, w) of each thumbnail.
    text_width: pixels left for the wrapped query text.
  Returns:
    The RGB sheet.
  """
  if not (len(queries) == len(ranked_images) == len(scores)):
    raise ValueError(f'{len(queries)} queries, {len(ranked_images)} image lists and {len(scores)} score lists '
                     'must match')
  h, w = cell
  pad, frame = 8, 2
  font = _font(11)
  label_lines = 2 if names is not None else 1
  label_h = 13 * label_lines + 2
  k = max([len(r) for r in ranked_images] + [1])
  row_h = h + 2 * frame + label_h + pad
  width = text_width + k * (w + pad) + pad
  sheet = Image.new('RGB', (width, len(queries) * row_h + pad), 'white')
  draw = ImageDraw.Draw(sheet)
  for row, (query, images, row_scores) in enumerate(zip(queries, ranked_images, scores)):
    y = pad + row * row_h
    lines = textwrap.wrap(f'"{query}"', width=max(10, text_width // 7))[: max(1, (h + label_h) // 13)]
    draw.multiline_text((pad, y), '\n'.join(lines), fill='black', font=font, spacing=2)
    for j, (image, score) in enumerate(zip(images, row_scores)):
      x = text_width + j * (w + pad)
      draw.rectangle([x - frame, y - frame, x + w + frame - 1, y + h + frame - 1], fill=NEUTRAL)
      sheet.paste(_as_image(image, (h, w)), (x, y))
      label = _fit(draw, f'{j + 1}: {score:.3f}', font, w + pad - 2)
      if names is not None:
        label += '\n' + _fit(draw, str(names[row][j]), font, w + pad - 2)
      draw.multiline_text((x, y + h + frame + 1), label, fill='black', font=font, spacing=2)
  return sheet


def colormap(values: np.ndarray, name: str = 'jet') -> np.ndarray:
  """(H, W) values in [0, 1] -> uint8 (H, W, 3) colours of a matplotlib colour map."""
  from matplotlib import colormaps  # pylint: disable=g-import-not-at-top (heavy, only for heat maps)
  rgba = colormaps[name](np.clip(np.asarray(values, np.float64), 0.0, 1.0))
  return np.round(rgba[..., :3] * 255.0).astype(np.uint8)


def overlay(image: np.ndarray, heat: np.ndarray, alpha: float = 0.5, cmap: str = 'jet') -> np.ndarray:
  """A heat map over an image: uint8 (H, W, 3) image, (H, W) heat in [0, 1] -> uint8 (H, W, 3) blend."""
  if image.shape[:2] != heat.shape:
    raise ValueError(f'image {image.shape[:2]} and heat map {heat.shape} differ in size')
  mixed = (1.0 - alpha) * image.astype(np.float32) + alpha * colormap(heat, cmap).astype(np.float32)
  return np.clip(np.round(mixed), 0, 255).astype(np.uint8)


def attention_figure(image: np.ndarray, panels: Sequence[tuple[str, Optional[np.ndarray], str]],
                     title: str = '', alpha: float = 0.5, cmap: str = 'jet') -> Image.Image:
  """Side-by-side panels over one image, each with a title above and a note below.

  Args:
    image: uint8 (H, W, 3), already at display size.
    panels: (title, heat, note) per panel; heat (H, W) in [0, 1] is blended over the image, None shows
      the image alone.
    title: an optional line above everything.
    alpha: heat-map opacity.
    cmap: matplotlib colour map name.
  Returns:
    The RGB figure.
  """
  h, w = image.shape[:2]
  pad = 8
  font = _font(12)
  chars = max(8, (w + pad) // 7)
  wrapped = [(textwrap.wrap(t, chars) or [''], textwrap.wrap(n, chars) or ['']) for t, _, n in panels]
  top_lines = max(len(t) for t, _ in wrapped)
  bottom_lines = max(len(n) for _, n in wrapped)
  title_h = 18 if title else 0
  y0 = pad + title_h + 15 * top_lines
  width = pad + len(panels) * (w + pad)
  height = y0 + h + 4 + 15 * bottom_lines + pad
  fig = Image.new('RGB', (width, height), 'white')
  draw = ImageDraw.Draw(fig)
  if title:
    draw.text((pad, pad), title, fill='black', font=font)
  for i, ((_, heat, _), (t_lines, n_lines)) in enumerate(zip(panels, wrapped)):
    x = pad + i * (w + pad)
    shown = image if heat is None else overlay(image, heat, alpha, cmap)
    draw.multiline_text((x, pad + title_h), '\n'.join(t_lines), fill='black', font=font, spacing=3)
    fig.paste(Image.fromarray(shown), (x, y0))
    draw.multiline_text((x, y0 + h + 4), '\n'.join(n_lines), fill=(70, 70, 70), font=font, spacing=3)
  return fig


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
