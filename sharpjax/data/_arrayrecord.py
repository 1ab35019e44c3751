r"""Data sets converted to ArrayRecord shards, read through grain.

``sharpjax data convert`` (or :func:`convert_cifar` /
:func:`convert_imagefolder`) writes a directory of ArrayRecord files, one
example per record, and a small ``metadata.json``::

    DST/metadata.json                  format, classes, splits, normalisation
    DST/train-00000-of-00005.array_record ...
    DST/train_labels.npy               every record's label, in record order
    DST/test-00000-of-00001.array_record ...
    DST/test_labels.npy

Record ``i`` of a split (its files in order) is example ``i``: its id, which
SAF keys its logit bank by. CIFAR records hold the raw ``uint8 [32, 32, 3]``
image (:func:`sharpjax.data.encode_example`); image-folder records hold the
file's JPEG/PNG bytes, decoded in grain's workers.

:func:`load_arrayrecord` opens such a directory as two :class:`RecordSplit`\ s
that :class:`sharpjax.data.GrainLoader` reads (``sharpjax train --data
arrayrecord --data-dir DST``): every process reads only the records of its
rows of each global batch, and the decoding and augmentation run in the
loader's workers: a padded random crop and a flip for CIFAR, an Inception
crop (8%-100% of the area, aspect ratio 3/4-4/3) and a flip at the run's
resolution for image folders. The test split is decoded without
augmentation (image folders: the shorter side resized to ``size / 0.875``,
the centre ``size x size`` crop).
"""

from __future__ import annotations

import io
import json
import math
import os
from typing import Iterable, Optional, Sequence

import numpy as np

from sharpjax.data import _augment
from sharpjax.data import _grain
from sharpjax.data import _sources
from sharpjax.data._dataset import Splits

FORMAT = "sharpjax-arrayrecord/1"
METADATA = "metadata.json"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_IMAGE_SIZE = 224
_EVAL_RATIO = 0.875


def _image_module():
  try:
    from PIL import Image  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("image folders are decoded with Pillow: pip install "
                      "'sharpjax[grain]'.") from e
  return Image


# ---------------------------------------------------------------------------
# Writing.
# ---------------------------------------------------------------------------


def _check_dst(dst: str) -> None:
  if os.path.exists(os.path.join(dst, METADATA)):
    raise ValueError(f"{dst} already holds a converted data set "
                     f"({METADATA}); remove it or choose another DST.")
  os.makedirs(dst, exist_ok=True)


def _write_split(dst: str, split: str, records: Iterable[bytes],
                 labels: np.ndarray, records_per_shard: int) -> dict:
  """Writes ``records`` into ``ceil(n / records_per_shard)`` shards."""
  _grain._grain()  # pylint: disable=protected-access
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  n = len(labels)
  shards = max(1, math.ceil(n / records_per_shard))
  files = [f"{split}-{i:05d}-of-{shards:05d}.array_record"
           for i in range(shards)]
  it = iter(records)
  for i, name in enumerate(files):
    writer = array_record_module.ArrayRecordWriter(
        os.path.join(dst, name), "group_size:1")
    try:
      for _ in range(i * n // shards, (i + 1) * n // shards):
        writer.write(next(it))
    finally:
      writer.close()
  np.save(os.path.join(dst, f"{split}_labels.npy"),
          np.asarray(labels, np.int32))
  return {"files": files, "num_examples": int(n)}


def _write_metadata(dst: str, meta: dict) -> dict:
  meta = {"format": FORMAT, **meta}
  tmp = os.path.join(dst, METADATA + ".tmp")
  with open(tmp, "w") as f:
    json.dump(meta, f, indent=1)
  os.replace(tmp, os.path.join(dst, METADATA))  # written last: complete
  return meta


def convert_cifar(src: str, dst: str, num_classes: int = 10, *,
                  records_per_shard: int = 10_000) -> dict:
  """CIFAR-10/100's python-pickle release to ArrayRecord shards in ``dst``.

  The pickles are read through the restricted unpickler of
  :func:`sharpjax.data.load_cifar` (a file that would import anything but
  numpy's uint8 arrays is refused). Records hold the raw ``uint8 [32, 32,
  3]`` images, in the release's order.

  Args:
    src: the release's directory (``cifar-10-batches-py`` or
      ``cifar-100-python``, or the folder holding it).
    dst: the output directory (created; must not hold a converted set).
    num_classes: 10 or 100.
    records_per_shard: records per ArrayRecord file.

  Returns:
    The metadata written to ``dst/metadata.json``.
  """
  if num_classes not in (10, 100):
    raise ValueError(f"num_classes must be 10 or 100, got {num_classes}.")
  dirs, train_files, test_files, key, _ = _sources._cifar_layouts(  # pylint: disable=protected-access
      src, num_classes)
  folder = _sources._release_folder(dirs, train_files + test_files)  # pylint: disable=protected-access
  if folder is None:
    expected = [os.path.join(dirs[0], f) for f in train_files + test_files]
    raise FileNotFoundError(
        f"CIFAR-{num_classes}'s python-pickle release not found under {src} "
        f"(expected {', '.join(expected)}).")
  _check_dst(dst)
  splits = {}
  for split, files in (("train", train_files), ("test", test_files)):
    x, y = _sources._read_pickles(folder, files, key)  # pylint: disable=protected-access
    if y.size and (y.min() < 0 or y.max() >= num_classes):
      raise ValueError(f"{folder}: {split} labels in [{y.min()}, {y.max()}], "
                       f"expected 0..{num_classes - 1}.")
    records = (_grain.encode_example(xi, yi) for xi, yi in zip(x, y))
    splits[split] = _write_split(dst, split, records, y, records_per_shard)
  return _write_metadata(dst, {
      "source": f"cifar{num_classes}", "encoding": "raw",
      "num_classes": num_classes, "image_shape": [32, 32, 3],
      "mean": [round(float(v), 6) for v in _sources.CIFAR_MEAN[num_classes]],
      "std": [round(float(v), 6) for v in _sources.CIFAR_STD[num_classes]],
      "splits": splits})


def _image_files(folder: str, classes: Optional[Sequence[str]] = None):
  """``(classes, [(path, label)])`` of a folder with one folder per class."""
  found = sorted(d for d in os.listdir(folder)
                 if os.path.isdir(os.path.join(folder, d)))
  if classes is None:
    classes = found
  elif set(found) - set(classes):
    raise ValueError(f"{folder} has classes the training split lacks: "
                     f"{sorted(set(found) - set(classes))[:5]}.")
  index = {c: i for i, c in enumerate(classes)}
  items = []
  for c in found:
    for name in sorted(os.listdir(os.path.join(folder, c))):
      if name.lower().endswith(IMAGE_EXTENSIONS):
        items.append((os.path.join(folder, c, name), index[c]))
  if not items:
    raise ValueError(f"{folder} holds no {'/'.join(IMAGE_EXTENSIONS)} files "
                     "in class folders (expected FOLDER/CLASS/IMAGE).")
  return list(classes), items


def _image_records(items):
  image = _image_module()
  for path, label in items:
    with open(path, "rb") as f:
      raw = f.read()
    try:
      with image.open(io.BytesIO(raw)) as im:
        im.verify()  # the header and structure, without decoding the pixels
    except Exception as e:  # pylint: disable=broad-except
      raise ValueError(f"{path} is not a readable image: "
                       f"{_sources._first_line(e)}.") from None  # pylint: disable=protected-access
    yield _grain.encode_example(np.frombuffer(raw, np.uint8), label)


def convert_imagefolder(src: str, dst: str, *,
                        records_per_shard: int = 10_000) -> dict:
  """An image folder (ImageNet's layout) to ArrayRecord shards in ``dst``.

  ``src/train/CLASS/*.{jpg,jpeg,png}`` and ``src/val/CLASS/...`` (or
  ``test``) become the splits ``train`` and ``test``; a ``src`` without
  ``train/`` is a training split alone (``src/CLASS/...``). Classes are the
  training folders' names in sorted order (label ``i`` is the ``i``-th).
  Records hold the files' bytes (each checked to be a readable image);
  they are decoded when read.

  Returns:
    The metadata written to ``dst/metadata.json``.
  """
  if not os.path.isdir(src):
    raise FileNotFoundError(f"{src}: no such directory.")
  parts = {"train": os.path.join(src, "train")}
  if os.path.isdir(parts["train"]):
    for name in ("val", "test"):
      if os.path.isdir(os.path.join(src, name)):
        parts["test"] = os.path.join(src, name)
        break
  else:
    parts = {"train": src}
  classes, train_items = _image_files(parts["train"])
  _check_dst(dst)
  splits = {}
  for split, folder in parts.items():
    items = train_items if split == "train" else _image_files(folder,
                                                              classes)[1]
    labels = np.array([label for _, label in items], np.int32)
    splits[split] = _write_split(dst, split, _image_records(items), labels,
                                 records_per_shard)
  return _write_metadata(dst, {
      "source": "imagefolder", "encoding": "image",
      "num_classes": len(classes), "class_names": classes,
      "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
      "splits": splits})


# ---------------------------------------------------------------------------
# Decoding and augmentation (in grain's workers).
# ---------------------------------------------------------------------------


class Normalize:
  """``uint8 [B, H, W, C]`` -> float32 ``(x / 255 - mean) / std``."""

  def __init__(self, mean: Sequence[float], std: Sequence[float]):
    self.mean = np.asarray(mean, np.float32)
    self.std = np.asarray(std, np.float32)

  def __call__(self, x: np.ndarray) -> np.ndarray:
    return (np.asarray(x, np.float32) / 255.0 - self.mean) / self.std


class CropFlipNormalized:
  """CIFAR's training augmentation of raw records: normalise, then a padded
  random crop and a flip (:func:`sharpjax.data.random_crop_flip`)."""

  def __init__(self, mean, std, padding: int = 4):
    self.normalize = Normalize(mean, std)
    self.padding = padding

  def __call__(self, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return _augment.random_crop_flip(self.normalize(x), rng,
                                     padding=self.padding)


def _decode(raw: np.ndarray):
  image = _image_module()
  im = image.open(io.BytesIO(raw.tobytes()))
  return im.convert("RGB")


class InceptionCropFlip:
  """Decodes image records with an Inception crop and a flip at ``size``.

  A window of 8%-100% of the image's area with an aspect ratio drawn
  log-uniformly in [3/4, 4/3] (ten tries, else the central crop), resized
  to ``size x size`` (bilinear), mirrored with probability 1/2, normalised.
  Szegedy et al., Going Deeper with Convolutions, CVPR 2015.
  """

  def __init__(self, size: int, mean, std):
    self.size = int(size)
    self.normalize = Normalize(mean, std)

  def _window(self, w: int, h: int, rng: np.random.Generator):
    area = w * h
    for _ in range(10):
      target = area * rng.uniform(0.08, 1.0)
      ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
      cw = int(round(math.sqrt(target * ratio)))
      ch = int(round(math.sqrt(target / ratio)))
      if 0 < cw <= w and 0 < ch <= h:
        x0 = int(rng.integers(0, w - cw + 1))
        y0 = int(rng.integers(0, h - ch + 1))
        return x0, y0, cw, ch
    side = min(w, h)
    return (w - side) // 2, (h - side) // 2, side, side

  def __call__(self, raws, rng: np.random.Generator) -> np.ndarray:
    image = _image_module()
    out = np.empty((len(raws), self.size, self.size, 3), np.uint8)
    for i, raw in enumerate(raws):
      im = _decode(raw)
      x0, y0, cw, ch = self._window(im.width, im.height, rng)
      im = im.resize((self.size, self.size), image.BILINEAR,
                     box=(x0, y0, x0 + cw, y0 + ch))
      a = np.asarray(im)
      out[i] = a[:, ::-1] if rng.random() < 0.5 else a
    return self.normalize(out)


class CenterCrop:
  """Evaluation decoding: shorter side to ``size / 0.875``, centre crop."""

  def __init__(self, size: int, mean, std):
    self.size = int(size)
    self.normalize = Normalize(mean, std)

  def __call__(self, raws) -> np.ndarray:
    image = _image_module()
    out = np.empty((len(raws), self.size, self.size, 3), np.uint8)
    resize = int(round(self.size / _EVAL_RATIO))
    for i, raw in enumerate(raws):
      im = _decode(raw)
      scale = resize / min(im.width, im.height)
      w = max(self.size, int(round(im.width * scale)))
      h = max(self.size, int(round(im.height * scale)))
      im = im.resize((w, h), image.BILINEAR)
      x0, y0 = (w - self.size) // 2, (h - self.size) // 2
      out[i] = np.asarray(im.crop((x0, y0, x0 + self.size, y0 + self.size)))
    return self.normalize(out)


# ---------------------------------------------------------------------------
# Reading.
# ---------------------------------------------------------------------------


class RecordSource:
  """The first ``limit`` records of a split, for :class:`GrainLoader`.

  ``gather(ids)`` returns the raw images stacked (``uint8``) or, for image
  records, the list of each file's bytes (the loader's ``augment`` decodes
  them); ``ids`` are record indices.
  """

  def __init__(self, paths: Sequence[str], encoding: str, limit: int):
    self.paths = list(paths)
    self.encoding = encoding
    self.limit = int(limit)
    self._records = _grain._grain().sources.ArrayRecordDataSource(self.paths)  # pylint: disable=protected-access
    if len(self._records) < self.limit:
      raise ValueError(f"{self.paths[0]}...: {len(self._records)} records, "
                       f"the metadata says {self.limit}.")

  def __len__(self) -> int:
    return self.limit

  def __getitem__(self, i: int) -> dict:
    x, y = self.gather(np.array([i]))
    return {"x": x[0], "y": y[0], "ids": np.int32(i)}

  def gather(self, ids: np.ndarray):
    ids = np.asarray(ids)
    if ids.size and (ids.min() < 0 or ids.max() >= self.limit):
      raise IndexError(f"record ids must be in [0, {self.limit}).")
    pairs = [_grain.decode_example(r) for r in
             self._records.__getitems__([int(i) for i in ids])]
    y = np.array([label for _, label in pairs], np.int32)
    xs = [x for x, _ in pairs]
    return (xs if self.encoding == "image" else np.stack(xs)), y


class _EvalView:
  """The split's inputs as an array-like, decoded for evaluation on read:
  ``view[a:b]`` or ``view[ids]`` -> float32 ``[n, H, W, C]``."""

  def __init__(self, split: "RecordSplit"):
    self._split = split
    self.shape = (len(split),) + split.image_shape
    self.ndim = 4
    self.dtype = np.dtype(np.float32)

  def __len__(self) -> int:
    return self.shape[0]

  def __getitem__(self, key) -> np.ndarray:
    ids = np.arange(self.shape[0])[key]
    x, _ = self._split.source.gather(np.atleast_1d(ids))
    return self._split.decode_eval(x)


class RecordSplit:
  """One split of a converted directory, the way the command line uses it.

  ``len``, ``y`` (every label), ``num_classes`` and ``x`` (an array-like
  that decodes the records it is sliced for, without augmentation) stand in
  for an :class:`~sharpjax.data.ArrayDataset`'s; ``grain_source()`` and
  ``augment`` feed a :class:`~sharpjax.data.GrainLoader`.
  """

  def __init__(self, data_dir: str, meta: dict, split: str,
               image_size: Optional[int] = None,
               limit: Optional[int] = None):
    info = meta["splits"][split]
    self.data_dir, self.split, self.meta = data_dir, split, meta
    self.encoding = meta["encoding"]
    self.num_classes = int(meta["num_classes"])
    self.name = f"{meta['source']}/{split}"
    n = int(info["num_examples"]) if limit is None else int(limit)
    labels = np.load(os.path.join(data_dir, f"{split}_labels.npy"),
                     allow_pickle=False)
    self.y = np.asarray(labels[:n], np.int32)
    if self.y.size and (self.y.min() < 0 or self.y.max() >= self.num_classes):
      raise ValueError(f"{data_dir}: {split} labels outside 0.."
                       f"{self.num_classes - 1}.")
    self.source = RecordSource(
        [os.path.join(data_dir, f) for f in info["files"]], self.encoding, n)
    mean, std = meta["mean"], meta["std"]
    if self.encoding == "raw":
      if image_size not in (None, meta["image_shape"][0]):
        raise ValueError(f"{data_dir} holds {meta['image_shape'][0]}x"
                         f"{meta['image_shape'][1]} images: image_size "
                         f"{image_size} would need a resize; leave it unset.")
      self.image_shape = tuple(meta["image_shape"])
      self.augment = CropFlipNormalized(mean, std)
      self.decode_eval = Normalize(mean, std)
    else:
      size = image_size or DEFAULT_IMAGE_SIZE
      self.image_shape = (size, size, 3)
      self.augment = InceptionCropFlip(size, mean, std)
      self.decode_eval = CenterCrop(size, mean, std)
    self._image_size = image_size
    self.x = _EvalView(self)

  def __len__(self) -> int:
    return len(self.y)

  def grain_source(self) -> RecordSource:
    return self.source

  def subset(self, n: int) -> "RecordSplit":
    """The first ``n`` records (ids 0..n-1)."""
    return RecordSplit(self.data_dir, self.meta, self.split,
                       self._image_size, min(int(n), len(self)))


def read_metadata(data_dir: str) -> dict:
  path = os.path.join(data_dir, METADATA)
  if not os.path.exists(path):
    raise FileNotFoundError(
        f"{path} not found: --data arrayrecord reads a directory written by "
        "`sharpjax data convert` (cifar10, cifar100 or imagefolder).")
  with open(path) as f:
    meta = json.load(f)
  if meta.get("format") != FORMAT:
    raise ValueError(f"{path}: format {meta.get('format')!r}, expected "
                     f"{FORMAT!r}.")
  return meta


def load_arrayrecord(data_dir: str, *, image_size: Optional[int] = None
                     ) -> Splits:
  """The ``train`` and ``test`` splits of a converted directory.

  Args:
    data_dir: a directory written by :func:`convert_cifar` or
      :func:`convert_imagefolder`.
    image_size: the side of the square inputs of image-folder records
      (default 224); raw (CIFAR) records keep their 32x32.

  Returns:
    ``Splits(train, test)`` of :class:`RecordSplit`.

  Example:
    >>> from sharpjax import data
    >>> splits = data.load_arrayrecord("cifar10-ar")   # doctest: +SKIP
    >>> train = splits.train                              # doctest: +SKIP
    >>> loader = data.GrainLoader(train.grain_source(), 128,
    ...                           augment=train.augment)  # doctest: +SKIP
  """
  meta = read_metadata(data_dir)
  if "test" not in meta["splits"]:
    raise ValueError(f"{data_dir} has no test split: convert a folder with "
                     "train/ and val/ (or test/) subfolders.")
  return Splits(RecordSplit(data_dir, meta, "train", image_size),
                RecordSplit(data_dir, meta, "test", image_size))
