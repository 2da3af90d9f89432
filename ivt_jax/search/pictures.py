"""Pictures of search: the contact sheet (a text query and its top-k files with scores) and attention-map panels
(heat maps over an image)."""
import textwrap
from typing import Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw

from ivt_jax.evaluation import pictures


def search_sheet(queries: Sequence[str], ranked_images: Sequence[Sequence[pictures.ImageLike]],
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
  font = pictures.font(11)
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
      draw.rectangle([x - frame, y - frame, x + w + frame - 1, y + h + frame - 1], fill=pictures.NEUTRAL)
      sheet.paste(pictures.as_image(image, (h, w)), (x, y))
      label = pictures.fit_text(draw, f'{j + 1}: {score:.3f}', font, w + pad - 2)
      if names is not None:
        label += '\n' + pictures.fit_text(draw, str(names[row][j]), font, w + pad - 2)
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
  font = pictures.font(12)
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


def clock(seconds: Optional[float]) -> str:
  """12.5 -> '0:12.5', 3725.0 -> '1:02:05.0'; None (a still) -> ''."""
  if seconds is None:
    return ''
  m, s = divmod(float(seconds), 60.0)
  h, m = divmod(int(m), 60)
  return f'{h}:{m:02d}:{s:04.1f}' if h else f'{m}:{s:04.1f}'


def boxed(frame: np.ndarray, box: Sequence[float], label: str = '', width: int = 0) -> Image.Image:
  """uint8 (H, W, 3) frame -> a PIL copy with the box (x0, y0, x1, y1 in its pixels) drawn and `label` above it."""
  image = Image.fromarray(np.ascontiguousarray(frame[..., :3], np.uint8))
  draw = ImageDraw.Draw(image)
  line = width or max(2, round(max(image.size) / 320))
  x0, y0, x1, y1 = (float(v) for v in box)
  for k in range(line):  # drawn outside the box, so the person stays uncovered
    draw.rectangle([x0 - 1 - k, y0 - 1 - k, x1 + k, y1 + k], outline=(255, 40, 40))
  if label:
    font = pictures.font(max(11, round(max(image.size) / 60)))
    tx, ty = max(0.0, x0 - line), max(0.0, y0 - line - getattr(font, "size", 11) - 4)
    left, top, right, bottom = draw.textbbox((tx, ty), label, font=font)
    draw.rectangle([left - 2, top - 2, right + 2, bottom + 2], fill=(255, 40, 40))
    draw.text((tx, ty), label, fill='white', font=font)
  return image


def context_crop(frame: np.ndarray, box: Sequence[float], aspect: float, context: float = 0.6,
                 cell: Optional[Sequence[int]] = None) -> Image.Image:
  """The region around a box (grown by `context` of its height, at width/height `aspect`) cut from the frame
  with the box drawn: a contact-sheet cell of a person found in a frame. Outside the frame is grey. With
  `cell` (h, w) the region is resized to it first, so the box is drawn at the cell's scale."""
  x0, y0, x1, y1 = (float(v) for v in box)
  h = (y1 - y0) * (1 + 2 * context)
  w = max((x1 - x0) * (1 + 2 * context), h * aspect)
  h = w / aspect
  cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
  left, top = int(np.floor(cx - w / 2)), int(np.floor(cy - h / 2))
  right, bottom = max(left + 1, int(np.ceil(cx + w / 2))), max(top + 1, int(np.ceil(cy + h / 2)))
  fh, fw = frame.shape[:2]
  out = np.empty((bottom - top, right - left, 3), np.uint8)
  out[:] = np.asarray(pictures.NEUTRAL, np.uint8)
  sx0, sy0, sx1, sy1 = max(0, left), max(0, top), min(fw, right), min(fh, bottom)
  if sx1 > sx0 and sy1 > sy0:
    out[sy0 - top:sy1 - top, sx0 - left:sx1 - left] = frame[sy0:sy1, sx0:sx1, :3]
  b = np.asarray([x0 - left, y0 - top, x1 - left, y1 - top], np.float64)
  if cell is not None:
    ch, cw = int(cell[0]), int(cell[1])
    b *= np.asarray([cw / out.shape[1], ch / out.shape[0]] * 2)
    out = np.asarray(Image.fromarray(out).resize((cw, ch), Image.BILINEAR))
  return boxed(out, tuple(b), width=2 if cell is not None else 0)
