"""Host-side (numpy) augmentation for image batches."""

from __future__ import annotations

import numpy as np


def random_crop_flip(
    x: np.ndarray,
    rng: np.random.Generator,
    *,
    padding: int = 4,
    flip: bool = True,
) -> np.ndarray:
  """The standard CIFAR augmentation: padded random crop and horizontal flip.

  Each image of ``x`` (``[B, H, W, C]``) is zero-padded by ``padding`` pixels
  on every side, a random ``H x W`` window is cut out of it, and with
  probability 1/2 the result is mirrored left-right. Zero padding of
  normalised images pads with the data set mean colour.

  Args:
    x: a batch of images, ``[B, H, W, C]``.
    rng: a numpy ``Generator``; the result is a function of its state.
    padding: pixels of padding on each side (>= 0).
    flip: whether to apply random horizontal flips.

  Returns:
    The augmented batch, same shape and dtype.

  Example:
    >>> import numpy as np
    >>> from sharpjax.data import random_crop_flip
    >>> x = np.zeros((8, 32, 32, 3), np.float32)
    >>> random_crop_flip(x, np.random.default_rng(0)).shape
    (8, 32, 32, 3)
  """
  if x.ndim != 4:
    raise ValueError(
        f"random_crop_flip expects images [B, H, W, C], got shape {x.shape}."
    )
  if padding < 0:
    raise ValueError(f"padding must be >= 0, got {padding}.")
  b, h, w, _ = x.shape
  out = x
  if padding:
    padded = np.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    oy = rng.integers(0, 2 * padding + 1, size=b)
    ox = rng.integers(0, 2 * padding + 1, size=b)
    rows = oy[:, None] + np.arange(h)[None, :]
    cols = ox[:, None] + np.arange(w)[None, :]
    out = padded[np.arange(b)[:, None, None], rows[:, :, None], cols[:, None, :]]
  if flip:
    mirror = rng.random(b) < 0.5
    out = np.where(mirror[:, None, None, None], out[:, :, ::-1], out)
  return out.astype(x.dtype, copy=False)


class RandomCropFlip:
  """:func:`random_crop_flip` as a loader ``augment`` callable."""

  def __init__(self, padding: int = 4, flip: bool = True):
    if padding < 0:
      raise ValueError(f"padding must be >= 0, got {padding}.")
    self.padding = padding
    self.flip = flip

  def __call__(self, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return random_crop_flip(x, rng, padding=self.padding, flip=self.flip)
