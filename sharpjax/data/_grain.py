r"""A grain input pipeline: records on disk, augmentation in worker processes.

`grain <https://github.com/google/grain>`_ (``pip install 'sharpjax[grain]'``)
reads random-access sources (ArrayRecord files, arrays), runs the per-batch
work in worker processes and checkpoints its iterator. :class:`GrainLoader`
builds its pipeline so that its batches are exactly
:class:`sharpjax.data.DataLoader`'s: the order of epoch ``e`` is the
permutation drawn from ``(seed, e)``, each process keeps its block of rows of
every global batch, and augmentation draws from ``(seed, e, step[, shard])``.
A run can switch loaders, or process counts, and see the same data.

Sources (:func:`grain_source`): numpy arrays or an
:class:`~sharpjax.data.ArrayDataset`, an ``.npz`` file, ArrayRecord files
written by :func:`write_array_record`, and the CIFAR folders read by
:func:`sharpjax.data.load_cifar`.
"""

from __future__ import annotations

import glob
import json
import os
import struct
import sys
import threading
import time
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np

from sharpjax._src import base
from sharpjax.data import _loader
from sharpjax.data._dataset import ArrayDataset

Augment = Callable[[np.ndarray, np.random.Generator], np.ndarray]

_MAGIC = b"SJX1"


def _grain():
  try:
    import grain  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
        "the grain input pipeline needs grain: pip install 'sharpjax[grain]'."
    ) from e
  # grain reads absl flags (worker profiling) that a program without
  # absl.app never parsed; their defaults are what such a program wants.
  from absl import flags  # pylint: disable=g-import-not-at-top
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  return grain


# ---------------------------------------------------------------------------
# Records: one example per ArrayRecord record.
# ---------------------------------------------------------------------------


def encode_example(x: np.ndarray, y: int) -> bytes:
  """One example as bytes: a small JSON header (dtype, shape, label), then x.

  Read back with :func:`decode_example`; no pickle is involved, so records
  from elsewhere cannot run code.
  """
  x = np.ascontiguousarray(x)
  header = json.dumps({"dtype": x.dtype.str, "shape": list(x.shape),
                       "y": int(y)}).encode()
  return _MAGIC + struct.pack("<I", len(header)) + header + x.tobytes()


def decode_example(record: bytes) -> tuple[np.ndarray, int]:
  """``(x, y)`` of a record written by :func:`encode_example`."""
  if record[:4] != _MAGIC:
    raise ValueError("not a sharpjax example record (written by "
                     "sharpjax.data.write_array_record).")
  (size,) = struct.unpack("<I", record[4:8])
  header = json.loads(record[8:8 + size])
  x = np.frombuffer(record, dtype=np.dtype(header["dtype"]),
                    offset=8 + size).reshape(header["shape"])
  return x, int(header["y"])


def write_array_record(path: str, dataset: ArrayDataset) -> str:
  """Writes ``dataset``'s examples to an ArrayRecord file, one per record.

  Record ``i`` is example ``i`` (its id). Written with ``group_size:1``,
  the layout for reading single records in any order.

  Args:
    path: the file to write (conventionally ``*.array_record``).
    dataset: the examples.

  Returns:
    ``path``.
  """
  _grain()
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  writer = array_record_module.ArrayRecordWriter(path, "group_size:1")
  try:
    for x, y in zip(dataset.x, dataset.y):
      writer.write(encode_example(x, y))
  finally:
    writer.close()
  return path


# ---------------------------------------------------------------------------
# Sources: random access to examples, and a batch gather.
# ---------------------------------------------------------------------------


class ArraySource:
  """Examples of in-memory arrays; record ``i`` is ``{"x", "y", "ids"}``.

  With worker processes the arrays are pickled to every worker: for data
  that outgrows memory, write it to ArrayRecord files instead.
  """

  def __init__(self, x: np.ndarray, y: np.ndarray):
    ds = ArrayDataset(x, y, int(np.max(y)) + 1 if len(y) else 1, name="source")
    self.x, self.y = ds.x, ds.y

  def __len__(self) -> int:
    return len(self.y)

  def __getitem__(self, i: int) -> dict:
    return {"x": self.x[i], "y": self.y[i], "ids": np.int32(i)}

  def gather(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(x, y)`` of the examples ``ids``, stacked."""
    return self.x[ids], self.y[ids]


class ArrayRecordSource:
  """Examples in ArrayRecord files (:func:`write_array_record`).

  Record ``i`` of the files, in order, is example ``i``. Each process (and
  each worker) opens the files itself and reads only the records of its
  batches.

  Args:
    paths: a file, a list of files, or a glob pattern.
  """

  def __init__(self, paths: Union[str, Sequence[str]]):
    grain = _grain()
    if isinstance(paths, str):
      found = sorted(glob.glob(paths)) if glob.has_magic(paths) else [paths]
    else:
      found = [str(p) for p in paths]
    missing = [p for p in found if not os.path.exists(p)]
    if not found or missing:
      raise FileNotFoundError(f"ArrayRecordSource: no file {missing or paths}.")
    self.paths = found
    self._records = grain.sources.ArrayRecordDataSource(found)

  def __len__(self) -> int:
    return len(self._records)

  def __getitem__(self, i: int) -> dict:
    x, y = decode_example(self._records[i])
    return {"x": x, "y": np.int32(y), "ids": np.int32(i)}

  def gather(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    records = self._records.__getitems__([int(i) for i in ids])
    pairs = [decode_example(r) for r in records]
    return (np.stack([x for x, _ in pairs]),
            np.array([y for _, y in pairs], np.int32))


def grain_source(spec: Any, *, split: str = "train", num_classes: int = 10):
  """A source for :class:`GrainLoader` from what the data is.

  Args:
    spec: an :class:`~sharpjax.data.ArrayDataset`; an ``(x, y)`` pair of
      arrays; a path to an ``.npz`` file (arrays ``x`` and ``y``, or
      ``x_train`` / ``y_train`` and ``x_test`` / ``y_test``, chosen by
      ``split``); ArrayRecord files (a path ending in ``.array_record``, a
      glob, or a list of paths); or a CIFAR directory
      (:func:`sharpjax.data.load_cifar`, images normalised, ``split`` and
      ``num_classes`` chosen here).
    split: ``"train"`` or ``"test"``, for ``.npz`` files with both and CIFAR.
    num_classes: 10 or 100, for a CIFAR directory.

  Returns:
    An :class:`ArraySource` or :class:`ArrayRecordSource`.

  Example:
    >>> import numpy as np
    >>> from sharpjax import data
    >>> source = data.grain_source((np.zeros((4, 3)), np.arange(4)))
    >>> len(source), source[2]["ids"]
    (4, np.int32(2))
  """
  if split not in ("train", "test"):
    raise ValueError(f"split must be 'train' or 'test', got {split!r}.")
  if hasattr(spec, "gather") and hasattr(spec, "__len__"):
    return spec  # a source already (ours, or a converted split's RecordSource)
  if isinstance(spec, ArrayDataset):
    return ArraySource(spec.x, spec.y)
  if isinstance(spec, tuple) and len(spec) == 2:
    return ArraySource(*spec)
  if isinstance(spec, (list, tuple)):
    return ArrayRecordSource(list(spec))
  if not isinstance(spec, (str, os.PathLike)):
    raise TypeError(f"grain_source: cannot read {type(spec).__name__}; pass "
                    "an ArrayDataset, (x, y), an .npz, ArrayRecord files or "
                    "a CIFAR directory.")
  path = os.fspath(spec)
  if path.endswith(".npz"):
    with np.load(path) as f:
      for xk, yk in (("x", "y"), (f"x_{split}", f"y_{split}")):
        if xk in f and yk in f:
          return ArraySource(f[xk], f[yk])
      raise ValueError(f"{path} has neither x / y nor x_{split} / y_{split} "
                       f"(it has {sorted(f.keys())}).")
  if os.path.isdir(path):
    from sharpjax.data import _sources  # pylint: disable=g-import-not-at-top
    splits = _sources.load_cifar(path, num_classes)
    ds = splits.train if split == "train" else splits.test
    return ArraySource(ds.x, ds.y)
  return ArrayRecordSource(path)


# ---------------------------------------------------------------------------
# The loader.
# ---------------------------------------------------------------------------


class _MakeBatch:
  """Global step ``k`` -> this shard's batch; runs in grain's workers."""

  def __init__(self, source, batch_size, steps_per_epoch, seed, shuffle,
               augment, num_shards, shard_index):
    self.source = source
    self.batch_size = batch_size
    self.steps_per_epoch = steps_per_epoch
    self.seed = seed
    self.shuffle = shuffle
    self.augment = augment
    self.num_shards = num_shards
    self.shard_index = shard_index
    self._order = (None, None)

  def order(self, epoch: int) -> np.ndarray:
    if self._order[0] != epoch:  # one permutation per epoch per worker
      self._order = (epoch, _loader.epoch_order(len(self.source), self.seed,
                                                epoch, self.shuffle))
    return self._order[1]

  def __call__(self, k: int) -> dict:
    epoch, step = divmod(int(k), self.steps_per_epoch)
    b = self.batch_size
    ids = _loader.shard_block(self.order(epoch)[step * b:(step + 1) * b],
                              self.num_shards, self.shard_index)
    x, y = self.source.gather(ids)
    if self.augment is not None:
      x = self.augment(x, _loader.augment_rng(self.seed, epoch, step,
                                              self.num_shards,
                                              self.shard_index))
    return {"x": x, "y": np.asarray(y, np.int32), "ids": ids.astype(np.int32)}


def die_with_parent(worker_index: int = 0, worker_count: int = 1,
                    interval: float = 0.5) -> None:
  """Ends this (worker) process as soon as the process that started it is gone.

  grain's worker processes wait on their queues; when the training process
  is killed (``kill -9``, the out-of-memory killer, a cluster pre-empting
  it) nothing tells them, and they would live on holding their memory (and,
  through them, multiprocessing's resource tracker). :class:`GrainLoader`
  passes this as grain's ``worker_init_fn``: a daemon thread of each worker
  checks every ``interval`` seconds that its parent is still the process
  that started it, and exits the worker when it is not. (Not
  ``PR_SET_PDEATHSIG``: that signal follows the parent *thread*, and grain
  may start its workers from a thread that ends before the process.)
  """
  del worker_index, worker_count
  parent = os.getppid()

  def watch():
    while os.getppid() == parent:
      time.sleep(interval)
    os._exit(1)  # pylint: disable=protected-access

  threading.Thread(target=watch, name="sharpjax-parent-watch",
                   daemon=True).start()


class GrainLoader:
  """Yields ``{"x", "y", "ids"}`` batches through a grain pipeline.

  The batches are those of :class:`sharpjax.data.DataLoader` with the same
  arguments (same ids in the same order, same augmentation), made by a grain
  pipeline: ``MapDataset.range`` over global steps, mapped to batches (the
  gather from the source and the augmentation), then, with ``worker_count``,
  ``mp_prefetch`` into that many worker processes, each making whole
  batches. ``ids`` are the examples' global indices in the source.

  Where it differs from :class:`~sharpjax.data.DataLoader`: it needs
  ``grain``; the source may be ArrayRecord files that are never loaded
  whole (each process reads only the records of its rows); the work runs in
  worker processes (not a host thread, so it is not limited by the GIL);
  its iterators have a state that checkpoints with the train state
  (:func:`sharpjax.launch.save_state` ``(data_iterator=...)``), the way grain
  pipelines resume; the last incomplete batch is always dropped; and each
  worker holds a copy of an in-memory source, and takes seconds to start
  (spawned processes import the pipeline). The workers end with the
  process that started them, even when it is killed (a thread in each watches it).

  Args:
    source: what :func:`grain_source` accepts (an ``ArrayDataset``,
      ``(x, y)``, an ``.npz``, ArrayRecord files, a CIFAR directory) or a
      source it returned.
    batch_size: global examples per batch (a multiple of ``num_shards``).
    seed: seed of the shuffles and augmentation.
    shuffle: a new permutation every epoch (False: source order).
    augment: ``(x, rng) -> x`` applied to each batch's inputs in the workers,
      e.g. :class:`sharpjax.data.RandomCropFlip`.
    num_shards: processes the global batches are split over
      (``jax.process_count()``).
    shard_index: this process's block of rows (``jax.process_index()``).
    worker_count: grain worker processes making batches (0: in this
      process, in ``read_threads`` threads).
    worker_buffer_size: batches each worker prepares ahead.
    read_threads: threads making batches in this process when
      ``worker_count`` is 0 (grain's ``ReadOptions.num_threads``).

  Example:
    >>> from sharpjax import data
    >>> train = data.make_synthetic(100)
    >>> loader = data.GrainLoader(train, batch_size=32, seed=0)
    >>> batches = loader.batches(0, 4)
    >>> [b["x"].shape[0] for b in batches], len(loader)
    ([32, 32, 32, 32], 3)
    >>> state = batches.get_state()     # what a checkpoint keeps
  """

  def __init__(
      self,
      source: Any,
      batch_size: int,
      *,
      seed: int = 0,
      shuffle: bool = True,
      augment: Optional[Augment] = None,
      num_shards: int = 1,
      shard_index: int = 0,
      worker_count: int = 0,
      worker_buffer_size: int = 2,
      read_threads: int = 1,
  ):
    self.source = grain_source(source)
    self.batch_size = base.check_int("batch_size", batch_size, low=1)
    self.seed = int(seed)
    self.shuffle = shuffle
    self.augment = augment
    self.num_shards, self.shard_index = _loader.check_shards(
        self.batch_size, num_shards, shard_index)
    self.worker_count = base.check_int("worker_count", worker_count, low=0)
    self.worker_buffer_size = base.check_int("worker_buffer_size",
                                             worker_buffer_size, low=1)
    self.read_threads = base.check_int("read_threads", read_threads, low=1)
    if self.batch_size > len(self.source):
      raise ValueError(f"batch_size ({batch_size}) is larger than the source "
                       f"({len(self.source)} examples): no batch would be "
                       "yielded.")
    self._make = _MakeBatch(self.source, self.batch_size,
                            self.steps_per_epoch, self.seed, shuffle, augment,
                            self.num_shards, self.shard_index)

  @property
  def steps_per_epoch(self) -> int:
    """Number of batches in one epoch (the incomplete last one dropped)."""
    return len(self.source) // self.batch_size

  def __len__(self) -> int:
    return self.steps_per_epoch

  def order(self, epoch: int) -> np.ndarray:
    """The example order of epoch ``epoch`` (before dropping the tail)."""
    return _loader.epoch_order(len(self.source), self.seed, epoch,
                               self.shuffle)

  def batch(self, epoch: int, step: int) -> dict:
    """Batch ``step`` of epoch ``epoch``, made here (no grain pipeline)."""
    return self._make(int(epoch) * self.steps_per_epoch + int(step))

  def dataset(self, start: int = 0, stop: Optional[int] = None):
    """The grain ``IterDataset`` of global steps ``[start, stop)``.

    ``stop=None``: no end. Batch ``k`` of the dataset is global step
    ``start + k``, batch ``(start + k) % steps_per_epoch`` of epoch
    ``(start + k) // steps_per_epoch``.
    """
    grain = _grain()
    start = base.check_int("start", start, low=0)
    stop = sys.maxsize if stop is None else base.check_int("stop", stop,
                                                            low=start)
    ds = grain.MapDataset.range(start, stop).map(self._make)
    ds = ds.to_iter_dataset(grain.ReadOptions(
        num_threads=self.read_threads,
        prefetch_buffer_size=max(2, self.read_threads)))
    if self.worker_count:
      options = grain.MultiprocessingOptions(
          num_workers=self.worker_count,
          per_worker_buffer_size=self.worker_buffer_size)
      ds = ds.mp_prefetch(options, worker_init_fn=die_with_parent)
    return ds

  def batches(self, start: int = 0, stop: Optional[int] = None):
    """A grain iterator over the batches of global steps ``[start, stop)``.

    Its ``get_state()`` / ``set_state()`` give and take the position (and
    the workers'); pass it to :func:`sharpjax.launch.save_state` and
    :func:`~sharpjax.launch.restore_state` as ``data_iterator`` to keep it in
    the checkpoint of the train state. A state restores into an iterator of
    the same ``(start, stop)`` and ``worker_count``. Close it (``close()``)
    when done with it if it has workers.
    """
    return iter(self.dataset(start, stop))

  def epoch(self, epoch: int):
    """Iterates over the batches of epoch ``epoch`` (0-indexed)."""
    spe = self.steps_per_epoch
    return self.batches(int(epoch) * spe, (int(epoch) + 1) * spe)
