"""The run configuration and the data / model registries of the command line."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Optional

from sharpjax.cli import _methods

_EVAL_CHUNK = 2000


@dataclasses.dataclass(frozen=True)
class Config:
  """Everything that defines a training run except the method and the seed.

  Two runs with equal configs, method, hyper-parameters and seed compute the
  same thing; a checkpoint records it and ``--resume`` refuses a different one.

  Attributes:
    data: data set name (see :data:`DATA`).
    num_examples: examples to generate or keep (train + test for mnist1d and
      synthetic; a training subset for digits); None for the source's default.
    label_noise: fraction of training labels replaced (symmetric noise).
    model: model name (see :data:`MODELS`).
    width: the model's width (CNN1D channels, MLP hidden units).
    batch_size: examples per step.
    epochs: epochs of the run.
    lr: peak learning rate of the cosine schedule.
    momentum: SGD momentum.
    weight_decay: decoupled L2 added to the update (0: none).
    warmup_epochs: linear warm-up of the learning rate.
    sharpness_examples: training examples the Hessian measures use.
    data_dir: where data read from disk lives (CIFAR); None otherwise.
    dtype: the model's computation dtype (``"float32"`` or ``"bfloat16"``;
      parameters, optimizer state and loss stay float32).
    image_size: the side of the square inputs decoded from image-folder
      records (``--data arrayrecord``; None: 224).
    optimizer: the base optimizer, ``"sgd"`` (with ``momentum``) or
      ``"adamw"`` (b1 0.9, b2 0.999, ``weight_decay`` decoupled as AdamW's).

  The fields after ``dtype`` are recorded only when they differ from their
  defaults, so a checkpoint written before they existed still resumes.
  """

  data: str = "mnist1d"
  num_examples: Optional[int] = None
  label_noise: float = 0.0
  model: str = "cnn1d"
  width: Optional[int] = None
  batch_size: int = 128
  epochs: int = 30
  lr: float = 0.05
  momentum: float = 0.9
  weight_decay: float = 5e-4
  warmup_epochs: int = 0
  sharpness_examples: int = 500
  data_dir: Optional[str] = None
  dtype: str = "float32"
  image_size: Optional[int] = None
  optimizer: str = "sgd"

  def to_dict(self) -> dict:
    d = dataclasses.asdict(self)
    for name, default in _LATER_FIELDS.items():
      if d[name] == default:
        del d[name]
    return d

  @classmethod
  def from_dict(cls, d: dict) -> "Config":
    fields = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in fields})


# Fields added after checkpoints existed: written only when not the default.
_LATER_FIELDS = {"image_size": None, "optimizer": "sgd"}
OPTIMIZERS = ("sgd", "adamw")


# ---------------------------------------------------------------------------
# Data and models: name -> builder. One entry each.
# ---------------------------------------------------------------------------


def _mnist1d(n: Optional[int], data_dir: Optional[str] = None):
  del data_dir
  from sharpjax import data  # pylint: disable=g-import-not-at-top
  return data.load_mnist1d(5000 if n is None else n)


def _digits(n: Optional[int], data_dir: Optional[str] = None):
  del data_dir
  from sharpjax import data  # pylint: disable=g-import-not-at-top
  train, test = data.load_digits()
  return data.Splits(train if n is None else train.subset(n), test)


def _synthetic(name: str, default_n: int, input_shape: tuple[int, ...],
               noise: float):
  """Gaussian blobs, 10 classes: the first 80% train, the rest test."""
  def load(n: Optional[int], data_dir: Optional[str] = None):
    del data_dir
    from sharpjax import data  # pylint: disable=g-import-not-at-top
    n = default_n if n is None else n
    full = data.make_synthetic(n, input_shape=input_shape, num_classes=10,
                               noise=noise)
    n_train = int(0.8 * n)
    return data.Splits(
        data.ArrayDataset(full.x[:n_train], full.y[:n_train], 10,
                          name=f"{name}/train"),
        data.ArrayDataset(full.x[n_train:], full.y[n_train:], 10,
                          name=f"{name}/test"))
  return load


def _cifar(num_classes: int):
  def load(n: Optional[int], data_dir: Optional[str] = None):
    from sharpjax import data  # pylint: disable=g-import-not-at-top
    if data_dir is None:
      raise ValueError(
          f"--data cifar{num_classes} reads the data from disk: pass "
          "--data-dir DIR (the python-pickle release or a .npz; see "
          "sharpjax.data.load_cifar). Nothing is downloaded.")
    train, test = data.load_cifar(data_dir, num_classes)
    return data.Splits(train if n is None else train.subset(n), test)
  return load


def _arrayrecord(n: Optional[int], data_dir: Optional[str] = None,
                 image_size: Optional[int] = None):
  from sharpjax import data  # pylint: disable=g-import-not-at-top
  if data_dir is None:
    raise ValueError("--data arrayrecord reads the shards that `sharpjax data "
                     "convert` wrote: pass --data-dir DIR.")
  train, test = data.load_arrayrecord(data_dir, image_size=image_size)
  return data.Splits(train if n is None else train.subset(n), test)


DATA: dict[str, tuple[Callable[..., Any], str]] = {
    "mnist1d": (_mnist1d, "MNIST-1D, generated offline (default 5,000 "
                "examples: 4,000 train / 1,000 test, 40 x 1 signals)"),
    "digits": (_digits, "scikit-learn's 8x8 digits (1,437 train / 360 test)"),
    "synthetic": (_synthetic("synthetic", 2000, (40,), 2.0),
                  "Gaussian blobs, 40 inputs, 10 classes (tests)"),
    "cifar10": (_cifar(10), "CIFAR-10 from --data-dir (50,000 / 10,000, "
                "random crop + flip)"),
    "cifar100": (_cifar(100), "CIFAR-100 from --data-dir (50,000 / 10,000, "
                 "random crop + flip)"),
    "arrayrecord": (_arrayrecord, "ArrayRecord shards from --data-dir, "
                    "written by `sharpjax data convert`, read through grain "
                    "(random crop + flip for CIFAR, Inception crop + flip for "
                    "image folders)"),
    "synthetic_images": (_synthetic("synthetic_images", 320, (32, 32, 3), 3.0),
                         "Gaussian blobs as 32x32x3 images, 10 classes "
                         "(runlocal, tests)"),
}


def _cnn1d(num_classes: int, width: Optional[int]):
  from sharpjax import models  # pylint: disable=g-import-not-at-top
  return models.CNN1D(num_classes=num_classes, channels=width or 25)


def _mlp(num_classes: int, width: Optional[int]):
  from sharpjax import models  # pylint: disable=g-import-not-at-top
  w = width or 100
  return models.MLP(features=(w, w), num_classes=num_classes)


def _resnet18(num_classes: int, width: Optional[int]):
  from sharpjax import models  # pylint: disable=g-import-not-at-top
  return models.ResNet18(num_classes=num_classes, width=width or 64)


def _wrn(num_classes: int, width: Optional[int]):
  from sharpjax import models  # pylint: disable=g-import-not-at-top
  return models.WideResNet(depth=28, widen_factor=width or 10,
                           num_classes=num_classes)


def _resnet50(num_classes: int, width: Optional[int]):
  from sharpjax import models  # pylint: disable=g-import-not-at-top
  return models.ResNet50(num_classes=num_classes, width=width or 64)


def _vit_s16(num_classes: int, width: Optional[int]):
  from sharpjax import models  # pylint: disable=g-import-not-at-top
  d = width or 384
  return models.ViT(num_classes=num_classes, patch_size=16, hidden_size=d,
                    depth=12, num_heads=max(1, d // 64), mlp_dim=4 * d)


MODELS: dict[str, tuple[Callable[[int, Optional[int]], Any], str]] = {
    "cnn1d": (_cnn1d, "MNIST-1D's 1D CNN (3 strided convolutions, width 25: "
              "5,210 parameters)"),
    "mlp": (_mlp, "two hidden layers of width 100 (15,210 parameters on "
            "MNIST-1D)"),
    "resnet18": (_resnet18, "CIFAR ResNet-18 with BatchNorm (11.2M "
                 "parameters; --width is the first stage's channels)"),
    "wrn28": (_wrn, "WideResNet-28 (--width is the widen factor, default 10: "
              "36.5M parameters)"),
    "resnet50": (_resnet50, "ImageNet ResNet-50, bottleneck blocks, 7x7 stem "
                 "(25.6M parameters at 1,000 classes; --width is the stem's "
                 "channels)"),
    "vit_s16": (_vit_s16, "ViT-S/16: patches of 16, 12 blocks of width 384, "
                "6 heads (22.1M parameters at 1,000 classes; --width is the "
                "embedding width, heads = width / 64)"),
}


@dataclasses.dataclass(frozen=True)
class Preset:
  """The defaults of ``sharpjax compare --preset NAME``; explicit flags win.

  Attributes:
    summary: one line for ``--help``.
    flags: a value for each name of :data:`PRESET_FLAGS` (argparse
      destinations: ``methods`` is a list of registry names).
  """

  summary: str
  flags: dict


PRESET_FLAGS = ("label_noise", "width", "epochs", "methods", "seeds")

PRESETS: dict[str, Preset] = {
    # The regime where flat minima matter: a network that can memorise the
    # noisy labels of its training set within the budget (README, "Command
    # line", has the probes that chose it).
    "noisy": Preset(
        "MNIST-1D with 20% of the training labels flipped, the 1D CNN of "
        "width 32 (8,010 parameters), 60 epochs, 5 seeds; sgd sam saf mesa",
        {"label_noise": 0.2, "width": 32, "epochs": 60,
         "methods": ["sgd", "sam", "saf", "mesa"], "seeds": 5}),
    # The command's default before the noisy one: clean labels, the MNIST-1D
    # paper's 5,210-parameter CNN, 20 epochs, the first 12 methods.
    "clean12": Preset(
        "clean MNIST-1D, the 1D CNN of width 25 (5,210 parameters), 20 "
        "epochs, 3 seeds; the 12 methods before SAGM",
        {"label_noise": 0.0, "width": 25, "epochs": 20,
         "methods": ["sgd", "sam", "asam", "gsam", "looksam", "fsam", "msam",
                     "esam", "ssam", "ausam", "saf", "mesa"], "seeds": 3}),
}
DEFAULT_PRESET = "noisy"


def check_names(config: Config, methods=()) -> None:
  """Raises ``ValueError`` listing the valid names for an unknown one."""
  if config.data not in DATA:
    raise ValueError(_methods.unknown_name_message("data set", config.data,
                                                   DATA))
  if config.model not in MODELS:
    raise ValueError(_methods.unknown_name_message("model", config.model,
                                                   MODELS))
  for m in methods:
    _methods.get(m)


@dataclasses.dataclass
class Env:
  """The data, model and budget shared by every run of one command."""

  config: Config
  train: Any
  test: Any
  model: Any
  steps_per_epoch: int
  # How the runs are spread and fed (cli/_devices.py); None: one device.
  devices: Any = None
  loader_kind: str = "numpy"
  loader_workers: int = 0
  _initial: dict = dataclasses.field(default_factory=dict, repr=False)

  @property
  def num_classes(self) -> int:
    return int(self.train.num_classes)

  def budget(self, seed: int = 0) -> _methods.Budget:
    rows = len(self.train)
    if self.devices is not None:  # a multiple of the devices when sharded
      rows = self.devices.table_rows(rows)
    return _methods.Budget(num_examples=rows,
                           num_classes=self.num_classes,
                           steps_per_epoch=self.steps_per_epoch,
                           epochs=self.config.epochs, seed=seed)

  def initial_params(self, seed: int):
    """``(params, model_state, rng)`` of ``seed``: fresh device arrays.

    The model is initialised once per seed by one jitted function shared by
    every method (host copies are cached; every call returns new buffers,
    since a training step donates its state).
    """
    import jax  # pylint: disable=g-import-not-at-top
    if seed not in self._initial:
      init = _model_init_fn(self.model, tuple(self.train.x.shape[1:]))
      self._initial[seed] = jax.device_get(init(jax.random.PRNGKey(seed)))
    return jax.tree.map(jax.numpy.array, self._initial[seed])

  def evaluate(self, params, model_state) -> dict:
    """Test loss and accuracy (model in eval mode), one compiled function."""
    if self.devices is not None:  # sharded over the devices
      return self.devices.evaluate(self.model, params, model_state,
                                   self.test.x, self.test.y)
    import jax  # pylint: disable=g-import-not-at-top
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    from sharpjax import training  # pylint: disable=g-import-not-at-top
    eval_fn = _eval_fn(self.model)
    n = len(self.test)
    loss = acc = 0.0
    for i in range(0, n, _EVAL_CHUNK):
      l, a = jax.device_get(eval_fn(
          params, model_state, self.test.x[i:i + _EVAL_CHUNK],
          self.test.y[i:i + _EVAL_CHUNK]))
      loss += float(l)
      acc += float(a)
    return {"test_loss": loss / n, "test_accuracy": acc / n}

  def loader(self, seed: int):
    """This process's loader: its rows of every global batch."""
    import jax  # pylint: disable=g-import-not-at-top
    from sharpjax import data  # pylint: disable=g-import-not-at-top
    # Images get the standard augmentation (random crop with padding + flip);
    # converted records bring theirs (decoding included).
    augment = data.RandomCropFlip() if self.train.x.ndim == 4 else None
    source = self.train
    if hasattr(self.train, "grain_source"):  # --data arrayrecord
      source, augment = self.train.grain_source(), self.train.augment
    shards = {"num_shards": jax.process_count(),
              "shard_index": jax.process_index()}
    if self.loader_kind == "grain":
      return data.GrainLoader(source, self.config.batch_size, seed=seed,
                              augment=augment,
                              worker_count=self.loader_workers, **shards)
    return data.DataLoader(self.train, batch_size=self.config.batch_size,
                           seed=seed, prefetch=2, augment=augment, **shards)


# One jitted model init and evaluation per (model, input shape) in a process:
# every method and every command in it shares them, so they compile once.
@functools.lru_cache(maxsize=16)
def _model_init_fn(model, input_shape):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  def init(rng):
    k_model, k_rng = jax.random.split(rng)
    k_params, k_dropout = jax.random.split(k_model)
    x = jnp.zeros((1,) + input_shape, jnp.float32)
    variables = dict(model.init({"params": k_params, "dropout": k_dropout}, x,
                                train=False))
    params = variables.pop("params")
    return params, variables, k_rng

  return jax.jit(init)


@functools.lru_cache(maxsize=16)
def _eval_fn(model):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from sharpjax import training  # pylint: disable=g-import-not-at-top

  def sums(params, model_state, x, y):
    logits = model.apply({"params": params, **model_state}, x, train=False)
    losses = training.softmax_cross_entropy(logits, y)
    correct = jnp.argmax(logits, -1) == y
    return jnp.sum(losses), jnp.sum(correct.astype(jnp.float32))

  return jax.jit(sums)


def make_env(config: Config, devices: Any = None, loader: str = "numpy",
             loader_workers: int = 0) -> Env:
  """Loads the data and builds the model of ``config``.

  ``devices`` (a :class:`sharpjax.cli._devices.Devices`; None: one device),
  ``loader`` (``"numpy"`` or ``"grain"``) and ``loader_workers`` say how the
  runs are spread and fed; they do not change what is computed.
  """
  check_names(config)
  from sharpjax import data  # pylint: disable=g-import-not-at-top
  extra = ({"image_size": config.image_size} if config.data == "arrayrecord"
           else {})
  train, test = DATA[config.data][0](config.num_examples, config.data_dir,
                                     **extra)
  if config.label_noise and hasattr(train, "grain_source"):
    raise ValueError("--label-noise needs the labels in memory; it is not "
                     "available with --data arrayrecord.")
  if config.label_noise:
    train = data.add_label_noise(train, config.label_noise, seed=0)
  if config.batch_size > len(train):
    raise ValueError(
        f"--batch-size {config.batch_size} is larger than the training set "
        f"({len(train)} examples).")
  model = MODELS[config.model][0](int(train.num_classes), config.width)
  if config.dtype != "float32":
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    model = model.clone(dtype=jnp.dtype(config.dtype))
  steps = len(train) // config.batch_size
  return Env(config, train, test, model, steps, devices, loader,
             loader_workers)
