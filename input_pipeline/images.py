"""One way to turn an image file into RGB pixels, for training, evaluation and search alike.

The rules for odd files (docs/reliability.md lists them with their tests):
- Anything PIL reads is accepted (JPEG, PNG, WebP, TIFF, BMP, GIF's first frame, ...). Bytes that are not an
  image, or an image cut short, are refused with a ValueError naming the file.
- Size: any image from 1 x 1 up to MAX_PIXELS pixels; the resize to the model's input follows. The size is read
  from the file's header before anything is decoded, so a decompression bomb (a few KB of PNG that claims
  30000 x 30000 pixels) is refused without allocating its pixels.
- EXIF orientation is applied (`PIL.ImageOps.exif_transpose`): a phone photo taken on its side is seen upright,
  as every photo viewer shows it. The datasets' crops carry no orientation, so this changes nothing there.
- Colour: RGB as is; grayscale (1, L) repeated over the three channels; CMYK, YCbCr, LAB and HSV converted by
  PIL; palette images through their palette; 16-bit grayscale (I;16, I) scaled to 8 bits (v / 257, rounded),
  not clipped at 255 as PIL's own conversion does; 32-bit float images are refused (no agreed range).
  16-bit RGB PNGs are read by PIL at 8 bits per channel.
- Transparency (RGBA, LA, PA, a palette or a PNG with a transparent colour): composited over white, as image
  viewers and thumbnailers show a cut-out; the colours hidden under transparent pixels are never used.
"""
from __future__ import annotations

import io
import os
import stat
import warnings

import numpy as np
import PIL
import PIL.Image
import PIL.ImageOps

MAX_PIXELS = 150_000_000          # width x height; a 150-megapixel photo (about 450 MB of RGB) at most
BACKGROUND = (255, 255, 255)      # what transparent pixels become



class ImageError(ValueError):
  """An image file refused by the rules above: `name` (the file) and `reason` (what is wrong with it)."""

  def __init__(self, name: str, reason: str):
    super().__init__(f'image {name!r}: {reason}')
    self.name, self.reason = name, reason


_CONVERTED_BY_PIL = ('RGB', '1', 'L', 'P', 'CMYK', 'YCbCr', 'LAB', 'HSV')
_TRANSPARENT = ('RGBA', 'RGBa', 'LA', 'La', 'PA')


def _open(data: bytes, name: str) -> PIL.Image.Image:
  try:
    with warnings.catch_warnings():  # PIL warns over 89 MP; the limit below decides
      warnings.simplefilter('ignore', PIL.Image.DecompressionBombWarning)
      image = PIL.Image.open(io.BytesIO(data))
  except PIL.Image.DecompressionBombError as e:
    raise ImageError(name, f'refused, too large to decode safely ({e})') from None
  except PIL.UnidentifiedImageError:
    raise ImageError(name, 'not an image PIL can read (unknown format)') from None
  except (OSError, ValueError, SyntaxError) as e:
    raise ImageError(name, f'not an image PIL can read ({e})') from None
  w, h = image.size
  if w * h > MAX_PIXELS:
    raise ImageError(name, f'refused, {w} x {h} pixels is over the limit of {MAX_PIXELS:,} '
                     '(input_pipeline.images.MAX_PIXELS); a decompression bomb, or a photo to downscale first')
  if w < 1 or h < 1:
    raise ImageError(name, f'has no pixels ({w} x {h})')
  return image


def _sixteen_bit(image: PIL.Image.Image, name: str) -> PIL.Image.Image:
  a = np.asarray(image).astype(np.int64)
  if a.size and (a.min() < 0 or a.max() > 65535):
    raise ImageError(name, f'{image.mode} values from {a.min()} to {a.max()} are outside the 16-bit '
                     'range this program reads')
  gray = ((a + 128) // 257).astype(np.uint8)  # round(v / 257): 0 -> 0, 65535 -> 255
  return PIL.Image.fromarray(np.repeat(gray[..., None], 3, axis=-1), 'RGB')


def _over_background(image: PIL.Image.Image) -> PIL.Image.Image:
  rgba = image.convert('RGBA')
  out = PIL.Image.new('RGB', rgba.size, BACKGROUND)
  out.paste(rgba, mask=rgba.getchannel('A'))
  return out


def to_rgb(image: PIL.Image.Image, name: str = '') -> PIL.Image.Image:
  """An opened PIL image -> decoded RGB PIL image by the module's rules (orientation, colour, transparency)."""
  with warnings.catch_warnings():  # PIL's chatter on odd files (EXIF, palettes); the errors still raise
    warnings.simplefilter('ignore')
    try:
      image.load()
      image = PIL.ImageOps.exif_transpose(image)
    except (OSError, ValueError, SyntaxError, EOFError) as e:  # truncated or damaged data
      raise ImageError(name, f'cannot decode ({e})') from None
    mode = image.mode
    if mode in _TRANSPARENT or 'transparency' in image.info:
      return _over_background(image)
    if mode in ('I;16', 'I;16B', 'I;16L', 'I;16N', 'I'):
      return _sixteen_bit(image, name)
    if mode == 'F':
      raise ImageError(name, 'a 32-bit float image has no agreed pixel range; convert it to 8 or '
                       '16 bits first')
    if mode not in _CONVERTED_BY_PIL:
      raise ImageError(name, f'unsupported image mode {mode!r}')
    return image if mode == 'RGB' else image.convert('RGB')


def decode(data, *, name: str = '') -> PIL.Image.Image:
  """Encoded image bytes -> RGB PIL image (see the module docstring); ValueError naming `name` otherwise."""
  if isinstance(data, memoryview):
    data = data.tobytes()
  if not isinstance(data, (bytes, bytearray)) or len(data) == 0:
    raise ImageError(name, f'expected encoded image bytes, got {type(data).__name__}'
                     f'{" (empty)" if isinstance(data, (bytes, bytearray)) else ""}')
  return to_rgb(_open(bytes(data), name), name)


def read_file(path: str) -> bytes:
  """A regular file's bytes; a FIFO, device or directory under an image name is refused, never opened (a FIFO
  would block the reader forever). OSError (missing, unreadable, a symlink loop) propagates."""
  st = os.stat(path)
  if not stat.S_ISREG(st.st_mode):
    raise ImageError(path, 'not a regular file')
  with open(path, 'rb') as f:
    return f.read()
