"""Token-count arithmetic shared by the model, the input pipeline and the weight loaders (no heavy imports)."""


def patch_grid(image_size, patch_size: int, stride: int) -> tuple[int, int]:
  """(rows, cols) of the patch convolution over an (H, W) image, no padding, row-major flattening."""
  h, w = image_size
  if h < patch_size or w < patch_size:
    raise ValueError(f'image size {tuple(image_size)} is smaller than the patch size {patch_size}')
  if stride <= 0:
    raise ValueError(f'model.stride must be positive, got {stride}')
  return (h - patch_size) // stride + 1, (w - patch_size) // stride + 1


def num_image_tokens(image_size, patch_size: int, stride: int) -> int:
  """Patches plus the CLS token."""
  gh, gw = patch_grid(image_size, patch_size, stride)
  return gh * gw + 1
