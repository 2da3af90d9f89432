"""Token-count arithmetic of the data (image tokens from the patch grid, per-level text lengths), read by the input
pipeline, the model and the weight loaders alike; the lowest floor: no imports."""


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


MLA_LEVELS = ('sentence', 'phrase', 'word')
_LENGTH_KEYS = {'phrase': 'phrase_text_length', 'word': 'word_text_length'}


def mla_levels(config) -> tuple[str, ...]:
  """The MLA levels trained on (data.mla_levels), in the batch's order along axis 1: a non-empty subset of
  ('sentence', 'phrase', 'word'), kept in that order. ('sentence',) alone is training without MLA. On the
  command line: --config.data.mla_levels=sentence,word (a tuple of names, or one comma-separated string)."""
  levels = config.data.get('mla_levels', MLA_LEVELS)
  levels = (levels,) if isinstance(levels, str) else tuple(levels)
  levels = tuple(x.strip(' ()\'"') for item in levels for x in str(item).split(',') if x.strip(' ()\'"'))
  unknown = [x for x in levels if x not in MLA_LEVELS]
  if not levels or unknown or len(set(levels)) != len(levels):
    raise ValueError(f'data.mla_levels must be a non-empty subset of {MLA_LEVELS} without repeats, got '
                     f'{tuple(levels)}')
  return tuple(x for x in MLA_LEVELS if x in levels)


def level_text_lengths(config) -> tuple[int, ...]:
  """Token positions used by the MLA texts of `mla_levels(config)` at training time, in that order.

  data.text_length for the sentence level (and every evaluation query); data.phrase_text_length and
  data.word_text_length for the shorter levels (0 = data.text_length; a larger value is cut to
  data.text_length, so that lowering data.text_length alone stays valid). The batch stays (B, levels,
  data.text_length); a level's positions past its own length are padding that the train step leaves out.
  """
  full = int(config.data.text_length)
  lengths = []
  for level in mla_levels(config):
    if level == 'sentence':
      lengths.append(full)
      continue
    key = _LENGTH_KEYS[level]
    n = int(config.data.get(key, 0))
    if n != 0 and n < 2:
      raise ValueError(f'data.{key} must be 0 (= data.text_length) or at least 2, got {n}')
    lengths.append(min(n, full) if n else full)
  return tuple(lengths)


def text_buckets(config, processes: int = 1) -> tuple[int, ...]:
  """The padded text lengths a training batch may take, ascending, data.text_length last.

  data.text_buckets lists shorter lengths (each >= 2; those not below data.text_length play no part, so that
  lowering data.text_length alone stays valid); a batch is padded to the smallest that holds its longest text
  (input_pipeline.pipeline), so short batches cost less while no caption is cut below data.text_length.
  (), or more than one process: every batch has data.text_length (every process must give the step the same
  shape, and no process knows the texts of the others' rows).
  """
  full = int(config.data.text_length)
  buckets = tuple(int(b) for b in config.data.get('text_buckets', ()))
  bad = [b for b in buckets if b < 2]
  if bad:
    raise ValueError(f'data.text_buckets must be lengths of at least 2, got {bad}')
  if processes > 1:
    return (full,)
  return tuple(sorted({b for b in buckets if b < full})) + (full,)


def bucket_text_lengths(level_lengths, bucket: int) -> tuple[int, ...]:
  """Each level's training positions (`level_text_lengths`) in a batch padded to `bucket`."""
  return tuple(min(int(n), int(bucket)) for n in level_lengths)
