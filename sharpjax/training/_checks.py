"""Batch checks that never make the host wait for the device.

A batch that arrives as host (numpy) arrays is checked completely on the host
before it is transferred: keys, leading axes, divisibility by the devices,
input rank and the label range. A batch already on the device gets the checks
that need only shapes and dtypes; its label range is computed inside the
compiled step and read back later, once the device has produced it
(:class:`PendingLabelChecks`), so the host keeps queueing steps ahead of the
device (JAX's asynchronous dispatch).
"""

from __future__ import annotations

import collections
from typing import Any, Mapping, Optional

import jax
import numpy as np

from sharpjax.training import _host


def check_keys(batch: Any, needs_ids: bool) -> None:
  """A batch is a dict with ``x``, ``y`` (and ``ids`` when the state needs them)."""
  if not isinstance(batch, Mapping):
    raise TypeError(
        "sharpjax.training: a batch must be a dict with 'x', 'y' (and 'ids' "
        f"for SAF), got {type(batch).__name__}.")
  missing = [k for k in ("x", "y") if k not in batch]
  if needs_ids and "ids" not in batch:
    missing.append("ids")
  if missing:
    why = (" (the optimizer state keeps per-example rows, SAF's logit bank or "
           "AUSAM's scores, keyed by the examples' dataset ids: use "
           "sharpjax.data.DataLoader, which yields them)"
           if "ids" in missing else "")
    raise KeyError(
        f"sharpjax.training: the batch lacks {missing}{why}; it has "
        f"{sorted(batch)}.")


def label_error(lo: int, hi: int, num_classes: int, where: str = "") -> str:
  return (f"sharpjax.training: labels must be in [0, {num_classes}), got "
          f"values in [{lo}, {hi}]{where}.")


def check_shapes(batch: Mapping[str, Any], *, per_device: bool,
                 num_devices: int, process_count: int,
                 x_ndim: Optional[int]) -> None:
  """Leading axes, divisibility by the devices and input rank (shapes only)."""
  lead_ndim = 2 if per_device else 1
  lead = {k: np.shape(v)[:lead_ndim] for k, v in batch.items()}
  if len(set(lead.values())) != 1 or len(next(iter(lead.values()))) < lead_ndim:
    raise ValueError(
        "sharpjax.training: every batch entry needs the same leading batch "
        f"axis; got leading shapes {lead}.")
  size = int(np.prod(next(iter(lead.values())))) * process_count
  if size % num_devices:
    raise ValueError(
        f"sharpjax.training: batch size {size} is not divisible by the "
        f"{num_devices} devices it is split over; use a batch size that is "
        f"a multiple of {num_devices} (DataLoader(drop_last=True) keeps "
        "every batch full).")
  rank = np.ndim(batch["x"]) - (1 if per_device else 0)
  if x_ndim is not None and rank != x_ndim:
    raise ValueError(
        f"sharpjax.training: batch['x'] has rank {rank} (shape "
        f"{np.shape(batch['x'])}), but the state was initialised with "
        f"rank-{x_ndim} inputs.")


def check_host_labels(y: Any, num_classes: Optional[int],
                      lead_ndim: int) -> None:
  """The label range of host (numpy) integer labels; device labels are left
  to the compiled step."""
  if (num_classes is not None and not isinstance(y, jax.Array)
      and np.ndim(y) == lead_ndim):
    y = np.asarray(y)
    if np.issubdtype(y.dtype, np.integer) and y.size:
      lo, hi = int(y.min()), int(y.max())
      if lo < 0 or hi >= num_classes:
        raise ValueError(label_error(lo, hi, num_classes))


class PendingLabelChecks:
  """Label ranges of device batches, checked once the device has them.

  ``add`` keeps the ``[min, max]`` array a compiled step returned; ``poll``
  (every ``every`` calls, to keep the per-step cost to a few microseconds)
  reads back those that are ready, in one transfer, and raises on the first
  bad one; a ready array is read without waiting. ``drain`` waits for all.
  """

  def __init__(self, every: int = 16):
    self._pending: collections.deque = collections.deque()
    self._every = every
    self._calls = 0

  def add(self, label_range: Optional[jax.Array], where: str) -> None:
    if label_range is not None:
      self._pending.append((label_range, where))

  def poll(self, num_classes: Optional[int]) -> None:
    self._calls += 1
    if not self._pending or self._calls % self._every:
      return
    ready = []
    while self._pending and self._pending[0][0].is_ready():
      ready.append(self._pending.popleft())
    self._check(ready, num_classes)

  def drain(self, num_classes: Optional[int]) -> None:
    items, self._pending = list(self._pending), collections.deque()
    self._check(items, num_classes)

  def _check(self, items, num_classes) -> None:
    if num_classes is None or not items:
      return
    # The range is replicated: this process's first shard holds all of it.
    ranges = _host.to_host([r for r, _ in items])
    for value, (_, where) in zip(ranges, items):
      lo, hi = (int(v) for v in np.reshape(value, (-1, 2))[0])
      if lo < 0 or hi >= num_classes:
        self._pending.clear()
        raise ValueError(label_error(lo, hi, num_classes, where))
