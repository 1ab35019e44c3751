"""Data sources: MNIST-1D, scikit-learn digits, synthetic data and CIFAR.

Nothing here downloads anything: MNIST-1D is generated on the host by the
``mnist1d`` package (and cached on disk), digits ship with scikit-learn, and
CIFAR is read from a local directory.
"""

from __future__ import annotations

import os
import pickle
import random
import tempfile
import warnings
from typing import Optional, Sequence

import numpy as np

from sharpjax._src import base
from sharpjax.data._dataset import ArrayDataset
from sharpjax.data._dataset import Splits

CIFAR_MEAN = {
    10: np.array([0.4914, 0.4822, 0.4465], np.float32),
    100: np.array([0.5071, 0.4865, 0.4409], np.float32),
}
CIFAR_STD = {
    10: np.array([0.2470, 0.2435, 0.2616], np.float32),
    100: np.array([0.2673, 0.2564, 0.2762], np.float32),
}


def default_cache_dir() -> str:
  """``$SHARPJAX_CACHE``, else ``$XDG_CACHE_HOME/sharpjax``, else ``~/.cache/sharpjax``."""
  if os.environ.get("SHARPJAX_CACHE"):
    return os.environ["SHARPJAX_CACHE"]
  root = os.environ.get("XDG_CACHE_HOME") or os.path.join(
      os.path.expanduser("~"), ".cache"
  )
  return os.path.join(root, "sharpjax")


def _generate_mnist1d(num_examples: int, train_split: float, seed: int):
  """Runs the mnist1d generator without touching the global RNG state."""
  try:
    from mnist1d.data import get_dataset_args, make_dataset  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
        "load_mnist1d needs the mnist1d package: pip install 'sharpjax[data]'."
    ) from e
  args = get_dataset_args()
  args.num_samples = num_examples
  args.train_split = train_split
  args.seed = seed
  np_state, py_state = np.random.get_state(), random.getstate()
  try:
    data = make_dataset(args)  # seeds numpy's global RNG; restored below
  finally:
    np.random.set_state(np_state)
    random.setstate(py_state)
  return {
      "x": np.asarray(data["x"], np.float32),
      "y": np.asarray(data["y"], np.int32),
      "x_test": np.asarray(data["x_test"], np.float32),
      "y_test": np.asarray(data["y_test"], np.int32),
  }


_MNIST1D_KEYS = ("x", "y", "x_test", "y_test")


def _mnist1d_problem(arrays: dict, num_examples: int,
                     train_split: float) -> Optional[str]:
  """What is wrong with cached MNIST-1D arrays for these arguments, or None."""
  n_train = len(arrays["y"])
  n_test = len(arrays["y_test"])
  if n_train + n_test != num_examples // 10 * 10 or n_train == 0:
    return (f"it holds {n_train} + {n_test} examples, expected "
            f"{num_examples // 10 * 10} split {train_split:g}")
  for x, y in ((arrays["x"], arrays["y"]), (arrays["x_test"],
                                            arrays["y_test"])):
    if x.ndim != 2 or x.shape[0] != y.shape[0] or x.dtype != np.float32:
      return f"its inputs have shape {x.shape} / dtype {x.dtype}"
    if y.dtype != np.int32 or y.min() < 0 or y.max() > 9:
      return "its labels are not int32 classes 0..9"
    if not np.isfinite(x).all():
      return "its inputs are not finite"
  return None


def _read_mnist1d_cache(path: str, num_examples: int,
                        train_split: float) -> Optional[dict]:
  """The cached arrays, or None (with a warning naming the file) if bad.

  Reading every array in full checks each one's CRC-32 (the .npz is a zip):
  a truncated or altered file fails here instead of training on it.
  """
  try:
    with open(path, "rb") as fh, np.load(fh) as f:
      arrays = {k: np.asarray(f[k]) for k in _MNIST1D_KEYS}
    why = _mnist1d_problem(arrays, num_examples, train_split)
  except Exception as e:  # pylint: disable=broad-except
    # BadZipFile (truncated, bad CRC), KeyError (an array missing),
    # ValueError / OSError / EOFError: all mean the same, a bad cache.
    text = str(e).strip().splitlines()
    why = f"{type(e).__name__}: {text[0] if text else ''}"
  if why is None:
    return arrays
  warnings.warn(f"the MNIST-1D cache {path} is unusable ({why}); it is "
                "generated again.", stacklevel=3)
  return None


def _write_mnist1d_cache(path: str, arrays: dict) -> None:
  """Writes the cache atomically; a failure only warns (it is a cache)."""
  folder = os.path.dirname(path)
  tmp = None
  try:
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".npz.tmp")
    with os.fdopen(fd, "wb") as f:
      np.savez(f, **arrays)
    os.replace(tmp, path)
  except OSError as e:
    if tmp is not None and os.path.exists(tmp):
      os.remove(tmp)
    warnings.warn(f"cannot write the MNIST-1D cache {path} ({e.strerror or e}"
                  "); the data is generated again next time.", stacklevel=3)


def load_mnist1d(
    num_examples: int = 5000,
    *,
    train_split: float = 0.8,
    seed: int = 42,
    cache_dir: Optional[str] = None,
    use_cache: bool = True,
) -> Splits:
  """MNIST-1D, generated offline with the ``mnist1d`` package.

  The generator's own defaults (``num_examples=5000``, 80/20 split, seed 42)
  reproduce the standard 4,000/1,000 data set; the package's ``get_dataset``
  would download a pickle, this calls its generator instead. Generation takes
  about 0.2 s per 1,000 examples, so the arrays are cached as an ``.npz`` in
  ``cache_dir`` (default :func:`default_cache_dir`) keyed by the arguments,
  written atomically. A cache file that cannot be read in full (truncated,
  a CRC-32 mismatch) or holds the wrong shapes is generated again, with a
  warning naming it; a cache directory that cannot be written only warns.

  Args:
    num_examples: total examples, train + test (rounded down to a multiple of
      10: the generator makes the same number per class).
    train_split: share of the examples in the training set, in (0, 1).
    seed: the generator's seed.
    cache_dir: where to cache; None for the default.
    use_cache: read and write the cache (False: always generate).

  Returns:
    ``Splits(train, test)`` with x ``[N, 40]`` float32 (standardised by the
    generator) and 10 classes.

  Example:
    >>> from sharpjax import data
    >>> train, test = data.load_mnist1d(num_examples=1000)   # doctest: +SKIP
    >>> train.x.shape, test.x.shape                           # doctest: +SKIP
    ((800, 40), (200, 40))

  References:
    Greydanus and Kobak, Scaling Down Deep Learning with MNIST-1D, ICML 2024.
    https://arxiv.org/abs/2011.14439
  """
  num_examples = base.check_int("num_examples", num_examples, low=10)
  base.check_range("train_split", train_split, low=0.0, high=1.0,
                   low_inclusive=False, high_inclusive=False)
  path = None
  if use_cache:
    folder = cache_dir or default_cache_dir()
    path = os.path.join(
        folder, f"mnist1d_n{num_examples}_split{train_split:g}_seed{seed}.npz"
    )
  arrays = None
  if path is not None and os.path.exists(path):
    arrays = _read_mnist1d_cache(path, num_examples, train_split)
  if arrays is None:
    arrays = _generate_mnist1d(num_examples, train_split, seed)
    if path is not None:
      _write_mnist1d_cache(path, arrays)
  return Splits(
      ArrayDataset(arrays["x"], arrays["y"], 10, name="mnist1d/train"),
      ArrayDataset(arrays["x_test"], arrays["y_test"], 10, name="mnist1d/test"),
  )


def load_digits(
    *, test_fraction: float = 0.2, seed: int = 0, as_images: bool = False
) -> Splits:
  """scikit-learn's bundled 8x8 digits (1,797 examples, 10 classes).

  Pixel values are scaled from [0, 16] to [0, 1]. The split is a seeded
  permutation.

  Args:
    test_fraction: share of the examples in the test set, in (0, 1).
    seed: seed of the split.
    as_images: x as ``[N, 8, 8, 1]`` instead of ``[N, 64]``.

  Returns:
    ``Splits(train, test)``.
  """
  base.check_range("test_fraction", test_fraction, low=0.0, high=1.0,
                   low_inclusive=False, high_inclusive=False)
  try:
    from sklearn.datasets import load_digits as sk_load_digits  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
        "load_digits needs scikit-learn: pip install 'sharpjax[data]'."
    ) from e
  digits = sk_load_digits()
  x = (digits.data / 16.0).astype(np.float32)
  if as_images:
    x = x.reshape(-1, 8, 8, 1)
  y = digits.target.astype(np.int32)
  order = np.random.default_rng(seed).permutation(len(y))
  n_test = int(round(test_fraction * len(y)))
  test, train = order[:n_test], order[n_test:]
  return Splits(
      ArrayDataset(x[train], y[train], 10, name="digits/train"),
      ArrayDataset(x[test], y[test], 10, name="digits/test"),
  )


def make_synthetic(
    num_examples: int = 512,
    *,
    input_shape: Sequence[int] = (16,),
    num_classes: int = 4,
    noise: float = 1.0,
    seed: int = 0,
) -> ArrayDataset:
  """Gaussian blobs: a small learnable classification problem for tests.

  Class ``c`` has a mean drawn from N(0, 1) per input coordinate; an example
  is its class mean plus ``noise`` times standard normal noise. Labels cycle
  through the classes, so every class has ``num_examples // num_classes`` or
  one more examples.

  Args:
    num_examples: number of examples.
    input_shape: shape of one input.
    num_classes: number of classes.
    noise: standard deviation of the noise around the class means.
    seed: everything is a function of this seed.

  Returns:
    An :class:`ArrayDataset` with float32 x of shape ``[N, *input_shape]``.
  """
  num_examples = base.check_int("num_examples", num_examples, low=1)
  num_classes = base.check_int("num_classes", num_classes, low=1)
  base.check_range("noise", noise, low=0.0)
  rng = np.random.default_rng(seed)
  shape = tuple(int(s) for s in input_shape)
  means = rng.standard_normal((num_classes,) + shape).astype(np.float32)
  y = (np.arange(num_examples) % num_classes).astype(np.int32)
  rng.shuffle(y)
  x = means[y] + noise * rng.standard_normal((num_examples,) + shape)
  return ArrayDataset(x.astype(np.float32), y, num_classes, name="synthetic")


def _cifar_layouts(root: str, num_classes: int):
  if num_classes == 10:
    folder, train_files, test_files, key = (
        "cifar-10-batches-py",
        [f"data_batch_{i}" for i in range(1, 6)],
        ["test_batch"],
        b"labels",
    )
  else:
    folder, train_files, test_files, key = (
        "cifar-100-python", ["train"], ["test"], b"fine_labels"
    )
  dirs = [os.path.join(root, folder), root]
  npz = [os.path.join(root, f"cifar{num_classes}.npz")]
  return dirs, train_files, test_files, key, npz


def _release_folder(dirs: Sequence[str], files: Sequence[str]):
  """The first of ``dirs`` holding all of the release's ``files``, or None."""
  return next((d for d in dirs
               if all(os.path.exists(os.path.join(d, f)) for f in files)),
              None)


class RefusedPickle(pickle.UnpicklingError):
  """A file holds what CIFAR's python-pickle release never does."""


class _ReleaseUnpickler(pickle.Unpickler):
  """Admits only what CIFAR's python-pickle release holds.

  The release's batches are dicts of bytes keys whose values are bytes,
  lists of ints or bytes, and one uint8 array (pickled through numpy's
  ``_reconstruct`` / ``dtype``). Any other global a file names (``os.system``,
  ``builtins.eval``, a class) is refused before it is imported, so a file
  from elsewhere cannot run code; arrays of another dtype are refused too.
  """

  def find_class(self, module: str, name: str):
    found = _RELEASE_GLOBALS.get((module, name))
    if found is None:
      raise RefusedPickle(
          f"it names {module}.{name}, which a CIFAR release never holds (only "
          "dicts, bytes, lists, ints and uint8 arrays are admitted); nothing "
          "was imported")
    return found


def _only_uint8(dt) -> np.dtype:
  dt = np.dtype(dt)
  if dt != np.uint8:
    raise RefusedPickle(f"it holds a {dt} array (only uint8 arrays "
                                 "are admitted)")
  return dt


def _np_dtype(name, *args):
  _only_uint8(name)
  return np.dtype(name, *args)


def _np_reconstruct(subtype, shape, dtype):
  if subtype is not np.ndarray:
    raise RefusedPickle("it reconstructs a numpy subclass")
  # numpy's placeholder; the array's dtype comes with its state (a checked
  # numpy.dtype), and the loaded arrays are checked again at the end.
  return np.ndarray.__new__(np.ndarray, shape, np.dtype(dtype))


def _np_frombuffer(buf, dtype, shape, order):
  a = np.frombuffer(buf, _only_uint8(dtype))
  return a.reshape(shape, order=order).copy()


def _latin1(text, encoding="utf-8"):
  # How python 3 writes bytes at protocol 2: _codecs.encode(str, "latin1").
  if encoding != "latin1" or not isinstance(text, str):
    raise RefusedPickle("it calls _codecs.encode unlike a bytes value")
  return text.encode("latin1")


_RELEASE_GLOBALS = {
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): _np_dtype,
    ("numpy.core.multiarray", "_reconstruct"): _np_reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _np_reconstruct,
    ("numpy.core.numeric", "_frombuffer"): _np_frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _np_frombuffer,
    ("_codecs", "encode"): _latin1,
}


def _check_release_values(value, depth: int = 0) -> None:
  """What was loaded is only dicts, lists, bytes, str, ints and uint8 arrays."""
  if depth > 4:
    raise RefusedPickle("it nests deeper than a CIFAR batch")
  if isinstance(value, dict):
    for k, v in value.items():
      _check_release_values(k, depth + 1)
      _check_release_values(v, depth + 1)
  elif isinstance(value, (list, tuple)):
    for v in value:
      _check_release_values(v, depth + 1)
  elif isinstance(value, np.ndarray):
    _only_uint8(value.dtype)
  elif not isinstance(value, (bytes, str, int)) or isinstance(value, bool):
    raise RefusedPickle(
        f"it holds a {type(value).__name__} (only dicts, bytes, lists, ints "
        "and uint8 arrays are admitted)")


def load_release_pickle(path: str):
  """One file of CIFAR's python-pickle release, through a restricted unpickler.

  Only the globals the release's files use are admitted (numpy's array
  reconstruction for uint8 arrays); anything else, a call to ``os.system``
  or any class, raises :class:`RefusedPickle` (an ``UnpicklingError``) naming it, before it is
  imported.
  """
  with open(path, "rb") as f:
    value = _ReleaseUnpickler(f, encoding="bytes").load()
  _check_release_values(value)
  return value


def _read_pickles(folder: str, files: Sequence[str], key: bytes):
  xs, ys = [], []
  for name in files:
    path = os.path.join(folder, name)
    try:
      entry = load_release_pickle(path)
      x = np.asarray(entry[b"data"])
      y = np.asarray(entry[key])
      if x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3072:
        raise ValueError(f"data is {x.dtype}{list(x.shape)}")
      if y.shape != (x.shape[0],) or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"{x.shape[0]} images but labels "
                         f"{y.dtype}{list(y.shape)}")
    except OSError:
      raise
    except RefusedPickle as e:
      raise ValueError(f"{path} is refused: {e}.") from None
    except Exception as e:  # pylint: disable=broad-except
      # A truncated or foreign file fails inside pickle in many ways
      # ("invalid literal for int()", EOFError, UnpicklingError, KeyError).
      raise ValueError(
          f"{path} is not a CIFAR python-pickle batch (a dict with b'data': "
          f"uint8 [N, 3072] and {key!r}: N integer labels): "
          f"{_first_line(e)}.") from None
    xs.append(x.reshape(-1, 3, 32, 32))
    ys.append(y.astype(np.int64))
  x = np.concatenate(xs).transpose(0, 2, 3, 1)
  return x, np.concatenate(ys)


def _first_line(e: BaseException) -> str:
  text = str(e).strip().splitlines()
  return f"{type(e).__name__}: {text[0] if text else ''}"


def _read_npz(path: str):
  keys = ("x_train", "y_train", "x_test", "y_test")
  try:
    with open(path, "rb") as fh, np.load(fh) as f:
      missing = [k for k in keys if k not in f]
      if missing:
        raise ValueError(f"it lacks the arrays {missing}")
      return tuple(np.asarray(f[k]) for k in keys)
  except OSError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    # Object arrays ("load it unsafely with allow_pickle"), a bad zip, ...
    raise ValueError(
        f"{path} is not a CIFAR .npz of numeric arrays x_train, y_train, "
        f"x_test, y_test: {_first_line(e)}.") from None


def _check_cifar_arrays(where: str, arrays, num_classes: int):
  """Images in NHWC float, labels int32 in range; errors name ``where``."""
  x_train, y_train, x_test, y_test = arrays
  out = []
  for part, x, y in (("train", x_train, y_train), ("test", x_test, y_test)):
    try:
      x = _as_nhwc_unit(x)
    except ValueError as e:
      raise ValueError(f"{where}: {part} {e}") from None
    y = np.asarray(y).reshape(-1)
    if not np.issubdtype(y.dtype, np.integer) or len(y) != len(x):
      raise ValueError(f"{where}: {len(x)} {part} images but labels "
                       f"{y.dtype}{list(y.shape)}; expected {len(x)} integer "
                       "labels.")
    if len(y) and (y.min() < 0 or y.max() >= num_classes):
      raise ValueError(f"{where}: {part} labels in [{y.min()}, {y.max()}], "
                       f"expected classes 0..{num_classes - 1}.")
    out += [x, y.astype(np.int32)]
  return out


def _as_nhwc_unit(x: np.ndarray) -> np.ndarray:
  x = np.asarray(x)
  if x.ndim == 2 and x.shape[1] == 3072:
    x = x.reshape(-1, 3, 32, 32)
  if x.ndim == 4 and x.shape[1] == 3 and x.shape[-1] != 3:
    x = x.transpose(0, 2, 3, 1)
  if x.ndim != 4 or x.shape[-1] != 3:
    raise ValueError(f"CIFAR images must be [N, 32, 32, 3], got {x.shape}.")
  if np.issubdtype(x.dtype, np.integer):
    return x.astype(np.float32) / 255.0
  return x.astype(np.float32)


def load_cifar(
    root: str, num_classes: int = 10, *, normalize: bool = True
) -> Splits:
  """CIFAR-10 or CIFAR-100 from a local directory (never downloaded).

  Looks, in order, for the standard python-pickle release unpacked in
  ``root`` (``cifar-10-batches-py/data_batch_1..5`` and ``test_batch``, or
  ``cifar-100-python/train`` and ``test``; the same files directly in
  ``root`` also work), then for ``root/cifar10.npz`` / ``root/cifar100.npz``
  holding ``x_train``, ``y_train``, ``x_test``, ``y_test`` (images uint8 or
  float in [0, 1], NHWC or NCHW).

  Args:
    root: the directory.
    num_classes: 10 or 100.
    normalize: subtract the per-channel mean and divide by the standard
      deviation of the training set (the usual constants).

  Returns:
    ``Splits(train, test)`` with float32 images ``[N, 32, 32, 3]``.

  Raises:
    FileNotFoundError: naming the files it looked for, when none is there.
    ValueError: naming the file, when one is not what it should be (a
      truncated or foreign pickle, object arrays in the .npz, wrong shapes,
      labels out of range).
  """
  if num_classes not in (10, 100):
    raise ValueError(f"num_classes must be 10 or 100, got {num_classes}.")
  dirs, train_files, test_files, key, npz = _cifar_layouts(root, num_classes)
  arrays = where = None
  folder = _release_folder(dirs, train_files + test_files)
  if folder is not None:
    x_train, y_train = _read_pickles(folder, train_files, key)
    x_test, y_test = _read_pickles(folder, test_files, key)
    arrays, where = (x_train, y_train, x_test, y_test), folder
  if arrays is None:
    for path in npz:
      if os.path.exists(path):
        arrays, where = _read_npz(path), path
        break
  if arrays is None:
    expected = [os.path.join(dirs[0], f) for f in train_files + test_files]
    raise FileNotFoundError(
        f"CIFAR-{num_classes} not found under {root!r}. Expected the "
        f"python-pickle release ({', '.join(expected)}) or {npz[0]} with "
        "x_train, y_train, x_test, y_test. sharpjax never downloads data: "
        "fetch the data set yourself (for example from "
        "https://www.cs.toronto.edu/~kriz/cifar.html) and unpack it there."
    )
  x_train, y_train, x_test, y_test = _check_cifar_arrays(where, arrays,
                                                         num_classes)
  if normalize:
    mean, std = CIFAR_MEAN[num_classes], CIFAR_STD[num_classes]
    x_train = (x_train - mean) / std
    x_test = (x_test - mean) / std
  name = f"cifar{num_classes}"
  return Splits(
      ArrayDataset(x_train, y_train, num_classes, name=f"{name}/train"),
      ArrayDataset(x_test, y_test, num_classes, name=f"{name}/test"),
  )
