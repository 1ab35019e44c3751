"""Data for sharpness-aware training: batches ``{"x", "y", "ids"}``.

``ids`` are dataset indices that travel with their examples through
shuffling (SAF keys its logit bank by them). Sources never download:

- :func:`load_mnist1d`: MNIST-1D generated offline by the ``mnist1d`` package
  (cached on disk);
- :func:`load_digits`: scikit-learn's bundled 8x8 digits;
- :func:`make_synthetic`: Gaussian blobs, for tests;
- :func:`load_cifar`: CIFAR-10/100 from a local directory.

:class:`DataLoader` shuffles deterministically per epoch, drops the last
incomplete batch, prefetches on a host thread and augments
(:class:`RandomCropFlip`); :func:`add_label_noise` replaces a fraction of the
labels and keeps the clean ones. :class:`GrainLoader` yields the same batches
through a grain pipeline (``pip install 'sharpjax[grain]'``): ArrayRecord
files (:func:`write_array_record`), worker processes and a checkpointable
iterator; :func:`convert_cifar` and :func:`convert_imagefolder` write
ArrayRecord shards that :func:`load_arrayrecord` opens for it.
:func:`prefetch_to_device` keeps the next batches' transfers in
flight while a step runs.

Example:
  >>> from sharpjax import data
  >>> train = data.add_label_noise(data.make_synthetic(256), 0.1, seed=0)
  >>> loader = data.DataLoader(train, batch_size=64, seed=0)
  >>> for batch in loader.epoch(0):
  ...   pass
"""

from sharpjax.data._arrayrecord import convert_cifar
from sharpjax.data._arrayrecord import convert_imagefolder
from sharpjax.data._arrayrecord import load_arrayrecord
from sharpjax.data._augment import random_crop_flip
from sharpjax.data._augment import RandomCropFlip
from sharpjax.data._dataset import ArrayDataset
from sharpjax.data._dataset import Splits
from sharpjax.data._grain import ArrayRecordSource
from sharpjax.data._grain import ArraySource
from sharpjax.data._grain import decode_example
from sharpjax.data._grain import encode_example
from sharpjax.data._grain import grain_source
from sharpjax.data._grain import GrainLoader
from sharpjax.data._grain import write_array_record
from sharpjax.data._loader import DataLoader
from sharpjax.data._noise import add_label_noise
from sharpjax.data._prefetch import DevicePrefetch
from sharpjax.data._prefetch import prefetch_to_device
from sharpjax.data._sources import default_cache_dir
from sharpjax.data._sources import load_cifar
from sharpjax.data._sources import load_digits
from sharpjax.data._sources import load_mnist1d
from sharpjax.data._sources import make_synthetic

__all__ = [
    "ArrayDataset",
    "ArrayRecordSource",
    "ArraySource",
    "DataLoader",
    "DevicePrefetch",
    "GrainLoader",
    "RandomCropFlip",
    "Splits",
    "add_label_noise",
    "convert_cifar",
    "convert_imagefolder",
    "decode_example",
    "default_cache_dir",
    "encode_example",
    "grain_source",
    "load_arrayrecord",
    "load_cifar",
    "load_digits",
    "load_mnist1d",
    "make_synthetic",
    "prefetch_to_device",
    "random_crop_flip",
    "write_array_record",
]
