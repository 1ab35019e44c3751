"""ResNets for 32x32 images (the CIFAR variant: 3x3 stem, no max-pool)."""

from __future__ import annotations

import functools
from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from sharpjax.models import _common


class BasicBlock(_common.ResidualBlock):
  """Two 3x3 convolutions with BatchNorm and an identity or 1x1 shortcut."""

  features: int
  strides: int = 1

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    norm, conv = _common.norm_and_conv(train, self.axis_name, self.dtype)
    y = conv(self.features, (3, 3), (self.strides, self.strides),
             padding=((1, 1), (1, 1)))(x)
    y = nn.relu(norm()(y))
    y = conv(self.features, (3, 3), padding=((1, 1), (1, 1)))(y)
    y = norm()(y)
    if self.strides != 1 or x.shape[-1] != self.features:
      x = conv(self.features, (1, 1), (self.strides, self.strides))(x)
      x = norm()(x)
    return nn.relu(x + y)


class ResNet(nn.Module):
  """A CIFAR-style ResNet with basic blocks and BatchNorm.

  Stem: a 3x3 convolution with ``width`` filters, BatchNorm, ReLU (no
  max-pool, as for 32x32 inputs). Then ``len(stage_sizes)`` stages of basic
  blocks with ``width * 2**k`` filters, the first block of every stage after
  the first with stride 2, global average pooling and a linear read-out.
  Convolutions have no bias. BatchNorm uses momentum 0.9 (PyTorch's 0.1)
  and epsilon 1e-5.

  ``ResNet18(num_classes=10)`` has 11,173,962 parameters (the figure of the
  widely used CIFAR ResNet-18); 11,220,132 with 100 classes.

  Attributes:
    stage_sizes: blocks per stage; (2, 2, 2, 2) is ResNet-18.
    num_classes: number of output logits.
    width: filters of the stem and the first stage.
    axis_name: BatchNorm's cross-device axis under ``jax.pmap`` (None under
      ``jit`` with a mesh, where the statistics are global already).
    dtype: computation dtype.

  Inputs are ``[B, H, W, C]``. Call with ``train=True`` and
  ``mutable=["batch_stats"]`` for training.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from sharpjax.models import ResNet18
    >>> model = ResNet18(num_classes=10, width=8)
    >>> x = jnp.zeros((2, 32, 32, 3))
    >>> # Shapes only (jax.eval_shape): call model.init / model.apply to compute.
    >>> variables = jax.eval_shape(model.init, jax.random.key(0), x)
    >>> jax.eval_shape(model.apply, variables, x).shape
    (2, 10)

  References:
    He et al., Deep Residual Learning for Image Recognition, CVPR 2016.
    https://arxiv.org/abs/1512.03385
  """

  stage_sizes: Sequence[int] = (2, 2, 2, 2)
  num_classes: int = 10
  width: int = 64
  axis_name: Optional[str] = None
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    _common.check_rank("ResNet", x, (4,), "[B, H, W, C]")
    norm, conv = _common.norm_and_conv(train, self.axis_name, self.dtype)
    x = conv(self.width, (3, 3), padding=((1, 1), (1, 1)))(
        x.astype(self.dtype))
    x = nn.relu(norm()(x))
    for stage, size in enumerate(self.stage_sizes):
      for block in range(size):
        strides = 2 if stage > 0 and block == 0 else 1
        x = BasicBlock(self.width * 2**stage, strides,
                       axis_name=self.axis_name, dtype=self.dtype)(x, train)
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, dtype=self.dtype)(x)


ResNet18 = functools.partial(ResNet, stage_sizes=(2, 2, 2, 2))
ResNet18.__doc__ = "ResNet-18 for 32x32 images: ``ResNet(stage_sizes=(2, 2, 2, 2))``."


class Bottleneck(_common.ResidualBlock):
  """1x1 reduce, 3x3 (strided), 1x1 expand to ``4 * features``, BatchNorm
  after each; a 1x1 projection shortcut when the shape changes. The last
  BatchNorm's scale starts at zero (the block starts as the identity), as
  in the large-batch ImageNet recipes (Goyal et al., 2017)."""

  features: int
  strides: int = 1

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    norm, conv = _common.norm_and_conv(train, self.axis_name, self.dtype)
    y = nn.relu(norm()(conv(self.features, (1, 1))(x)))
    y = conv(self.features, (3, 3), (self.strides, self.strides),
             padding=((1, 1), (1, 1)))(y)
    y = nn.relu(norm()(y))
    y = conv(4 * self.features, (1, 1))(y)
    y = norm(scale_init=nn.initializers.zeros)(y)
    if self.strides != 1 or x.shape[-1] != 4 * self.features:
      x = conv(4 * self.features, (1, 1), (self.strides, self.strides))(x)
      x = norm()(x)
    return nn.relu(x + y)


class ImageNetResNet(nn.Module):
  """The ImageNet ResNet with bottleneck blocks (ResNet-50 and deeper).

  Stem: a 7x7 stride-2 convolution with ``width`` filters, BatchNorm, ReLU
  and a 3x3 stride-2 max-pool; then ``len(stage_sizes)`` stages of
  :class:`Bottleneck` blocks of ``width * 2**k`` (x4 out) filters, the first
  block of every stage after the first with stride 2 (on the 3x3
  convolution, "ResNet v1.5"), global average pooling and a linear
  read-out. ``ResNet50(num_classes=1000)`` has 25,557,032 parameters, the
  usual ResNet-50 figure.

  Attributes:
    stage_sizes: blocks per stage; (3, 4, 6, 3) is ResNet-50.
    num_classes: number of output logits.
    width: filters of the stem and the first stage's bottlenecks.
    axis_name: BatchNorm's cross-device axis under ``jax.pmap``.
    dtype: computation dtype.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from sharpjax.models import ResNet50
    >>> model = ResNet50(num_classes=1000, width=8)
    >>> x = jnp.zeros((2, 64, 64, 3))
    >>> variables = jax.eval_shape(model.init, jax.random.key(0), x)
    >>> jax.eval_shape(model.apply, variables, x).shape
    (2, 1000)

  References:
    He et al., Deep Residual Learning for Image Recognition, CVPR 2016.
    https://arxiv.org/abs/1512.03385
  """

  stage_sizes: Sequence[int] = (3, 4, 6, 3)
  num_classes: int = 1000
  width: int = 64
  axis_name: Optional[str] = None
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    _common.check_rank("ImageNetResNet", x, (4,), "[B, H, W, C]")
    norm, conv = _common.norm_and_conv(train, self.axis_name, self.dtype)
    x = conv(self.width, (7, 7), (2, 2), padding=((3, 3), (3, 3)))(
        x.astype(self.dtype))
    x = nn.relu(norm()(x))
    x = nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))
    for stage, size in enumerate(self.stage_sizes):
      for block in range(size):
        strides = 2 if stage > 0 and block == 0 else 1
        x = Bottleneck(self.width * 2**stage, strides,
                       axis_name=self.axis_name, dtype=self.dtype)(x, train)
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, dtype=self.dtype)(x)


ResNet50 = functools.partial(ImageNetResNet, stage_sizes=(3, 4, 6, 3))
ResNet50.__doc__ = ("ResNet-50 for ImageNet: ``ImageNetResNet(stage_sizes=(3, "
                    "4, 6, 3))``.")
