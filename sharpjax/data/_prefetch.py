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
) -> Iterator[Any]:
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

  Each queued batch holds device memory: ``size`` of 2 is enough to hide a
  transfer that takes less than a step; more only helps against irregular
  host loading, which a deeper host-side queue (the loader's own prefetch)
  absorbs more cheaply.

  Args:
    batches: host batches (any iterable; consumed lazily).
    put: ``batch -> device batch``, asynchronous.
    size: batches in flight ahead of the one yielded (>= 1).

  Yields:
    ``put(batch)`` for every batch, in order.

  Example:
    >>> import jax
    >>> from sharpjax import data
    >>> loader = data.DataLoader(data.make_synthetic(64), 16, seed=0)
    >>> for batch in data.prefetch_to_device(loader.epoch(0), jax.device_put):
    ...   assert isinstance(batch["x"], jax.Array)
  """
  size = base.check_int("size", size, low=1)
  source = iter(batches)
  queue: collections.deque = collections.deque()

  def enqueue(n: int) -> None:
    for batch in itertools.islice(source, n):
      queue.append(put(batch))

  enqueue(size)
  while queue:
    # Refill before yielding: the transfer of batch k + size starts before
    # the caller dispatches the step of batch k.
    batch = queue.popleft()
    enqueue(1)
    yield batch
