"""Prefetch to the devices: the next batches' transfers overlap the step."""

from __future__ import annotations

import collections
import itertools
from typing import Any, Callable, Iterable, Iterator

from sharpjax._src import base


def prefetch_to_device(
    batches: Iterable[Any],
    put: Callable[[Any], Any],
    size: int = 2,
) -> "DevicePrefetch":
  """Yields ``put(batch)`` for each batch, with ``size`` batches already put.

  ``put`` starts a host-to-device transfer and returns at once (JAX's
  ``device_put`` is asynchronous), so while the training step of batch ``k``
  runs on the devices, batches ``k + 1 .. k + size`` are already on their way
  there; the step then never waits for its input to be copied. The host work
  that makes a batch (gather, augmentation) is not moved by this: run it in a
  loader thread (``DataLoader(prefetch=...)``) or in grain's worker processes
  (``GrainLoader(worker_count=...)``), and ``prefetch_to_device`` on top.

  This is flax's ``jax_utils.prefetch_to_device`` (the ImageNet example's
  input pipeline) for any placement: ``put`` is typically
  :meth:`sharpjax.training.Trainer.shard_batch`, which shards the batch over
  the trainer's mesh (assembling a global batch from every process's rows in
  a multi-process run) or splits it for ``pmap``; the default-device
  ``jax.device_put`` works too.

  Checkpoints: the source is read ``size`` batches ahead of the caller, so
  its own state (a grain iterator's ``get_state()``) is ahead of the run.
  When the source has ``get_state``, the returned iterator's ``get_state()``
  is the source's state *before the first batch not yet yielded*: save that
  one (pass the returned iterator as :func:`sharpjax.launch.save_state`'s
  ``data_iterator``), and restore into a fresh source before prefetching
  from it again.

  Each queued batch holds device memory: ``size`` of 2 is enough to hide a
  transfer that takes less than a step; more only helps against irregular
  host loading, which a deeper host-side queue (the loader's own prefetch)
  absorbs more cheaply.

  Args:
    batches: host batches (any iterable; consumed lazily).
    put: ``batch -> device batch``, asynchronous.
    size: batches in flight ahead of the one yielded (>= 1).

  Returns:
    An iterator of ``put(batch)`` for every batch, in order.

  Example:
    >>> import jax
    >>> from sharpjax import data
    >>> loader = data.DataLoader(data.make_synthetic(64), 16, seed=0)
    >>> for batch in data.prefetch_to_device(loader.epoch(0), jax.device_put):
    ...   assert isinstance(batch["x"], jax.Array)
  """
  return DevicePrefetch(batches, put, size)


class DevicePrefetch:
  """The iterator of :func:`prefetch_to_device`."""

  def __init__(self, batches: Iterable[Any], put: Callable[[Any], Any],
               size: int = 2):
    self.size = base.check_int("size", size, low=1)
    self._source = iter(batches)
    self._put = put
    self._stateful = hasattr(self._source, "get_state")
    # (source state before the batch, the put batch), oldest first.
    self._queue: collections.deque = collections.deque()
    self._started = False
    self._closed_state = None

  def _enqueue(self, n: int) -> None:
    for _ in range(n):
      state = self._source.get_state() if self._stateful else None
      try:
        batch = next(self._source)
      except StopIteration:
        return
      self._queue.append((state, self._put(batch)))

  def __iter__(self) -> "DevicePrefetch":
    return self

  def __next__(self) -> Any:
    if not self._started:
      self._started = True
      self._enqueue(self.size)
    if not self._queue:
      raise StopIteration
    # Refill before yielding: the transfer of batch k + size starts before
    # the caller dispatches the step of batch k.
    _, batch = self._queue.popleft()
    self._enqueue(1)
    return batch

  def get_state(self) -> Any:
    """The source's state before the first batch not yet yielded (kept
    when closed, for a last checkpoint)."""
    if not self._stateful:
      raise TypeError("prefetch_to_device: the source has no get_state().")
    if self._closed_state is not None:
      return self._closed_state
    if self._queue:
      return self._queue[0][0]
    return self._source.get_state()

  def close(self) -> None:
    """Closes the source (grain iterators with worker processes)."""
    if self._stateful and self._closed_state is None:
      self._closed_state = self.get_state()
    self._queue.clear()
    if hasattr(self._source, "close"):
      self._source.close()
