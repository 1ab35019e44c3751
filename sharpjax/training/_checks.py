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


def check_batch(batch: Mapping[str, Any], *, needs_ids: bool,
                per_device: bool, num_devices: int, process_count: int,
                x_ndim: Optional[int], num_classes: Optional[int]) -> None:
  """Every check of a batch that needs no device value.

  Args:
    batch: the batch (host or device arrays).
    needs_ids: the optimizer state keeps per-example rows.
    per_device: the batch is already split ``[devices, B / devices, ...]``.
    num_devices: devices the global batch is split over.
    process_count: processes each holding a slice of the global batch.
    x_ndim: the rank of an example batch's ``x`` at ``init`` (None: unknown).
    num_classes: labels must be in ``[0, num_classes)`` (None: no check);
      checked here only for host labels.
  """
  check_keys(batch, needs_ids)
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
  y = batch["y"]
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
  checks those that are ready (reading a ready array does not wait) and
  raises on the first bad one; ``drain`` waits for all of them.
  """

  def __init__(self):
    self._pending: collections.deque = collections.deque()

  def add(self, label_range: Optional[jax.Array], where: str) -> None:
    if label_range is not None:
      self._pending.append((label_range, where))

  def poll(self, num_classes: Optional[int]) -> None:
    while self._pending and self._pending[0][0].is_ready():
      self._check(self._pending.popleft(), num_classes)

  def drain(self, num_classes: Optional[int]) -> None:
    while self._pending:
      self._check(self._pending.popleft(), num_classes)

  def _check(self, item, num_classes) -> None:
    label_range, where = item
    if num_classes is None:
      return
    # The first local shard holds the whole (replicated) range.
    local = np.asarray(label_range.addressable_shards[0].data)
    lo, hi = (int(v) for v in local.reshape(-1, 2)[0])
    if lo < 0 or hi >= num_classes:
      self._pending.clear()
      raise ValueError(label_error(lo, hi, num_classes, where))
