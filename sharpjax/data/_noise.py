"""Label noise: replace a fraction of the training labels."""

from __future__ import annotations

import dataclasses

import numpy as np

from sharpjax._src import base
from sharpjax.data._dataset import ArrayDataset


def add_label_noise(
    dataset: ArrayDataset, fraction: float, *, seed: int = 0
) -> ArrayDataset:
  r"""Symmetric label noise: exactly ``round(fraction * N)`` labels are wrong.

  A set of :math:`\mathrm{round}(fN)` examples is drawn uniformly without
  replacement, and each gets a label drawn uniformly from the
  :math:`C - 1` *other* classes, so the fraction of wrong labels is ``fraction``
  (up to rounding), not :math:`f (C-1)/C` as with noise that may redraw the
  true class. The labels before the noise are kept in ``clean_y``; noise is
  applied to the clean labels, so calling this twice does not compound.

  Args:
    dataset: the data set (its ``clean_y``, when set, is the starting point).
    fraction: share of labels to replace, in [0, 1].
    seed: the noise is a deterministic function of ``seed``.

  Returns:
    A copy of ``dataset`` with noisy ``y`` and the original ``clean_y``.

  Example:
    >>> from sharpjax import data
    >>> train = data.make_synthetic(num_examples=100, num_classes=4)
    >>> noisy = data.add_label_noise(train, 0.2, seed=0)
    >>> int(noisy.noisy.sum())
    20
  """
  base.check_range("fraction", fraction, low=0.0, high=1.0)
  if dataset.num_classes < 2 and fraction > 0:
    raise ValueError("add_label_noise needs num_classes >= 2.")
  clean = dataset.y if dataset.clean_y is None else dataset.clean_y
  n = len(dataset)
  rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x4E015E]))
  chosen = rng.choice(n, size=int(round(fraction * n)), replace=False)
  shift = rng.integers(1, dataset.num_classes, size=chosen.shape[0])
  y = clean.copy()
  y[chosen] = (clean[chosen] + shift) % dataset.num_classes
  return dataclasses.replace(dataset, y=y, clean_y=clean.copy())
