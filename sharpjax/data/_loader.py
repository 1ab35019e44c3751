"""Batches with sample ids: deterministic shuffling and host-side prefetch."""

from __future__ import annotations

import queue
import threading
from typing import Any, Callable, Iterator, Optional

import numpy as np

from sharpjax._src import base
from sharpjax.data._dataset import ArrayDataset

Batch = dict[str, Any]
# (x, rng) -> x, applied to the inputs of each training batch on the host.
Augment = Callable[[np.ndarray, np.random.Generator], np.ndarray]

_SENTINEL = object()


def check_shards(batch_size: int, num_shards: Any,
                 shard_index: Any) -> tuple[int, int]:
  """``(num_shards, shard_index)`` checked: each shard takes an equal block.

  Shared by the loaders: ``shard_index`` in ``[0, num_shards)`` and a batch
  size that ``num_shards`` divides.
  """
  num_shards = base.check_int("num_shards", num_shards, low=1)
  shard_index = base.check_int("shard_index", shard_index, low=0)
  if shard_index >= num_shards:
    raise ValueError(f"shard_index must be in [0, {num_shards}) "
                     f"(num_shards), got {shard_index}.")
  if batch_size % num_shards:
    raise ValueError(
        f"batch_size ({batch_size}) must be a multiple of num_shards "
        f"({num_shards}): each shard gets an equal block of every batch.")
  return num_shards, shard_index


class DataLoader:
  """Yields ``{"x", "y", "ids"}`` batches of an :class:`ArrayDataset`.

  ``ids`` are the examples' indices in the data set (int32), carried through
  the shuffle, so per-example state such as SAF's logit bank can be keyed by
  them. No id appears twice in one epoch (every epoch is a permutation, cut
  into batches and, with ``num_shards``, into disjoint blocks): SAF records
  one row per example and epoch. The order of epoch ``e`` is a permutation drawn from
  ``(seed, e)`` alone, so a run restarted at epoch ``e`` sees the same batches;
  augmentation randomness is drawn from ``(seed, e, step)``, which keeps it
  deterministic with prefetching too.

  With ``drop_last=True`` (the default) every batch has ``batch_size``
  examples, so a jitted step compiles once; each epoch then covers
  ``steps_per_epoch * batch_size`` distinct examples (all of them when
  ``batch_size`` divides the data set). With ``drop_last=False`` the last
  batch is smaller and every example appears exactly once per epoch.

  Prefetching runs the batch assembly (gather, augmentation and ``transform``,
  e.g. :meth:`sharpjax.training.Trainer.shard_batch` to start the device
  transfer) in a background thread, ``prefetch`` batches ahead.

  Args:
    dataset: the data.
    batch_size: examples per batch.
    seed: seed of the shuffles and augmentation.
    shuffle: shuffle every epoch (False: data set order, e.g. for evaluation).
    drop_last: drop the last incomplete batch.
    augment: ``(x, rng) -> x`` applied to each batch's inputs, for example
      :class:`sharpjax.data.RandomCropFlip`.
    prefetch: batches prepared ahead in a background thread (0: none).
    transform: ``batch -> batch`` applied last (in the prefetch thread).
    num_shards: split every global batch of ``batch_size`` rows into this
      many row blocks, one per process of a multi-process run (e.g.
      ``jax.process_count()``); ``batch_size`` stays the global size and
      must be a multiple of it.
    shard_index: the block this loader yields (e.g. ``jax.process_index()``):
      rows ``[i * batch_size / num_shards, (i + 1) * batch_size /
      num_shards)`` of each global batch, ids included, so every process
      builds the same loader (same seed, same global order) and gathers only
      its own examples. Augmentation then draws from ``(seed, epoch, step,
      shard_index)``: the same run with another number of shards augments
      differently.

  Example:
    >>> from sharpjax import data
    >>> train = data.make_synthetic(num_examples=100)
    >>> loader = data.DataLoader(train, batch_size=32, seed=0)
    >>> len(loader)
    3
    >>> batch = next(iter(loader.epoch(0)))
    >>> sorted(batch), batch["x"].shape, batch["ids"].dtype
    (['ids', 'x', 'y'], (32, 16), dtype('int32'))
  """

  def __init__(
      self,
      dataset: ArrayDataset,
      batch_size: int,
      *,
      seed: int = 0,
      shuffle: bool = True,
      drop_last: bool = True,
      augment: Optional[Augment] = None,
      prefetch: int = 2,
      transform: Optional[Callable[[Batch], Any]] = None,
      num_shards: int = 1,
      shard_index: int = 0,
  ):
    self.dataset = dataset
    self.batch_size = base.check_int("batch_size", batch_size, low=1)
    self.seed = int(seed)
    self.shuffle = shuffle
    self.drop_last = drop_last
    self.augment = augment
    self.prefetch = base.check_int("prefetch", prefetch, low=0)
    self.transform = transform
    self.num_shards, self.shard_index = check_shards(
        self.batch_size, num_shards, shard_index)
    if self.num_shards > 1 and not drop_last:
      raise ValueError(
          "num_shards > 1 needs drop_last=True: a short last batch would not "
          "split into equal blocks.")
    if drop_last and self.batch_size > len(dataset):
      raise ValueError(
          f"batch_size ({batch_size}) is larger than the data set "
          f"({len(dataset)} examples) and drop_last=True: no batch would be "
          "yielded."
      )
    self._next_epoch = 0

  @property
  def steps_per_epoch(self) -> int:
    """Number of batches in one epoch."""
    n, b = len(self.dataset), self.batch_size
    return n // b if self.drop_last else -(-n // b)

  def __len__(self) -> int:
    return self.steps_per_epoch

  def order(self, epoch: int) -> np.ndarray:
    """The example order of epoch ``epoch`` (before dropping the tail)."""
    return epoch_order(len(self.dataset), self.seed, epoch, self.shuffle)

  def batch(self, epoch: int, step: int) -> Batch:
    """Batch ``step`` of epoch ``epoch`` (without ``transform``)."""
    order = self.order(epoch)
    ids = order[step * self.batch_size:(step + 1) * self.batch_size]
    return self._assemble(epoch, step, ids)

  def _assemble(self, epoch: int, step: int, ids: np.ndarray) -> Batch:
    ids = shard_block(ids, self.num_shards, self.shard_index)
    x = self.dataset.x[ids]
    if self.augment is not None:
      x = self.augment(x, augment_rng(self.seed, epoch, step, self.num_shards,
                                      self.shard_index))
    return {
        "x": x,
        "y": self.dataset.y[ids],
        "ids": ids.astype(np.int32),
    }

  def _batches(self, epoch: int) -> Iterator[Any]:
    order = self.order(epoch)
    for step in range(self.steps_per_epoch):
      ids = order[step * self.batch_size:(step + 1) * self.batch_size]
      batch = self._assemble(epoch, step, ids)
      yield self.transform(batch) if self.transform is not None else batch

  def epoch(self, epoch: int) -> Iterator[Any]:
    """Iterates over the batches of epoch ``epoch`` (0-indexed)."""
    if self.prefetch == 0:
      yield from self._batches(epoch)
      return
    yield from _prefetched(self._batches(epoch), self.prefetch)

  def batches(self, start: int = 0,
              stop: Optional[int] = None) -> Iterator[Any]:
    """Batches of global steps ``start, start + 1, ...`` up to ``stop``.

    Step ``k`` is batch ``k % steps_per_epoch`` of epoch ``k //
    steps_per_epoch``, so a run resumed at step ``k`` continues with the
    batches it would have seen; ``stop=None`` goes on forever. Prefetched and
    transformed like :meth:`epoch`.
    """
    start = base.check_int("start", start, low=0)

    def steps():
      k = start
      while stop is None or k < stop:
        epoch, step = divmod(k, self.steps_per_epoch)
        order = self.order(epoch)
        for step in range(step, self.steps_per_epoch):
          if stop is not None and k >= stop:
            return
          ids = order[step * self.batch_size:(step + 1) * self.batch_size]
          batch = self._assemble(epoch, step, ids)
          yield self.transform(batch) if self.transform is not None else batch
          k += 1

    if self.prefetch == 0:
      return steps()
    return _prefetched(steps(), self.prefetch)

  def __iter__(self) -> Iterator[Any]:
    """One epoch: the first ``iter`` gives epoch 0, the next epoch 1, ..."""
    epoch = self._next_epoch
    self._next_epoch += 1
    return self.epoch(epoch)


def epoch_order(num_examples: int, seed: int, epoch: int,
                shuffle: bool = True) -> np.ndarray:
  """The example order of an epoch: a permutation drawn from ``(seed, epoch)``.

  Both loaders (:class:`DataLoader`, :class:`sharpjax.data.GrainLoader`) use
  it, so they yield the same ids in the same order.
  """
  if not shuffle:
    return np.arange(num_examples)
  rng = np.random.default_rng(np.random.SeedSequence([int(seed), int(epoch)]))
  return rng.permutation(num_examples)


def shard_block(rows: np.ndarray, num_shards: int,
                shard_index: int) -> np.ndarray:
  """Block ``shard_index`` of ``num_shards`` equal blocks of a global batch."""
  if num_shards == 1:
    return rows
  b = len(rows) // num_shards
  return rows[shard_index * b:(shard_index + 1) * b]


def augment_rng(seed: int, epoch: int, step: int, num_shards: int = 1,
                shard_index: int = 0) -> np.random.Generator:
  """The generator that augments batch ``step`` of ``epoch`` (of one shard)."""
  entropy = [int(seed), int(epoch), int(step), 1]
  if num_shards > 1:
    entropy.append(int(shard_index))
  return np.random.default_rng(np.random.SeedSequence(entropy))


def _prefetched(source: Iterator[Any], size: int) -> Iterator[Any]:
  """Runs ``source`` in a daemon thread, ``size`` items ahead of the reader."""
  buffer: queue.Queue = queue.Queue(maxsize=size)
  stop = threading.Event()

  def put(item) -> bool:
    while not stop.is_set():
      try:
        buffer.put(item, timeout=0.1)
        return True
      except queue.Full:
        continue
    return False

  def produce():
    try:
      for item in source:
        if not put(item):
          return
      put(_SENTINEL)
    except BaseException as e:  # pylint: disable=broad-except
      put(e)

  thread = threading.Thread(target=produce, daemon=True)
  thread.start()
  try:
    while True:
      item = buffer.get()
      if item is _SENTINEL:
        return
      if isinstance(item, BaseException):
        raise item
      yield item
  finally:
    stop.set()
    thread.join(timeout=5.0)
