"""In-memory datasets with labels, clean labels and a class count."""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Optional

import numpy as np


@dataclasses.dataclass(frozen=True)
class ArrayDataset:
  """A classification data set held as host numpy arrays.

  The index of an example in these arrays is its sample id: the loader
  yields it as ``batch["ids"]``, and SAF keys its logit bank by it.

  Attributes:
    x: inputs, ``[N, ...]``.
    y: integer labels in ``[0, num_classes)``, ``[N]`` (int32). After
      :func:`add_label_noise` these are the noisy labels used for training.
    num_classes: number of classes.
    clean_y: the labels before any noise was added (None when no noise was
      added); use :meth:`with_clean_labels` to evaluate against them.
    name: a label for messages.
  """

  x: np.ndarray
  y: np.ndarray
  num_classes: int
  clean_y: Optional[np.ndarray] = None
  name: str = "dataset"

  def __post_init__(self):
    x = np.asarray(self.x)
    y = np.asarray(self.y)
    if x.ndim < 1 or y.ndim != 1 or x.shape[0] != y.shape[0]:
      raise ValueError(
          f"{self.name}: x must be [N, ...] and y [N] with the same N; got "
          f"x {x.shape} and y {y.shape}."
      )
    if not np.issubdtype(y.dtype, np.integer):
      raise ValueError(f"{self.name}: labels must be integers, got {y.dtype}.")
    if int(self.num_classes) < 1:
      raise ValueError(
          f"{self.name}: num_classes must be >= 1, got {self.num_classes}."
      )
    if y.size and (y.min() < 0 or y.max() >= self.num_classes):
      raise ValueError(
          f"{self.name}: labels must be in [0, {self.num_classes}), got range "
          f"[{y.min()}, {y.max()}]."
      )
    object.__setattr__(self, "x", x)
    object.__setattr__(self, "y", y.astype(np.int32, copy=False))
    if self.clean_y is not None:
      clean = np.asarray(self.clean_y).astype(np.int32, copy=False)
      if clean.shape != y.shape:
        raise ValueError(
            f"{self.name}: clean_y must have shape {y.shape}, got {clean.shape}."
        )
      object.__setattr__(self, "clean_y", clean)

  def __len__(self) -> int:
    return int(self.y.shape[0])

  @property
  def noisy(self) -> np.ndarray:
    """Boolean mask of the examples whose label was changed by noise."""
    if self.clean_y is None:
      return np.zeros(len(self), bool)
    return self.y != self.clean_y

  def with_clean_labels(self) -> "ArrayDataset":
    """The same examples (and ids) with the labels before noise."""
    if self.clean_y is None:
      return self
    return dataclasses.replace(self, y=self.clean_y, clean_y=None)

  def subset(self, n: int) -> "ArrayDataset":
    """The first ``n`` examples (ids are re-numbered from 0)."""
    clean = None if self.clean_y is None else self.clean_y[:n]
    return dataclasses.replace(self, x=self.x[:n], y=self.y[:n], clean_y=clean)


class Splits(NamedTuple):
  """A training and a test set."""

  train: ArrayDataset
  test: ArrayDataset
