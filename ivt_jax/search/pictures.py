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
