"""Wide residual networks (pre-activation, for 32x32 images)."""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from sharpjax.models import _common


class WideBlock(_common.ResidualBlock):
  """BN-ReLU-conv3x3-BN-ReLU-dropout-conv3x3 with a 1x1 shortcut on change."""

  features: int
  strides: int = 1
  dropout_rate: float = 0.0

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    norm, conv = _common.norm_and_conv(train, self.axis_name, self.dtype)
    pre = nn.relu(norm()(x))
    y = conv(self.features, (3, 3), (self.strides, self.strides),
             padding=((1, 1), (1, 1)))(pre)
    y = nn.relu(norm()(y))
    if self.dropout_rate > 0:
      y = nn.Dropout(self.dropout_rate, deterministic=not train)(y)
    y = conv(self.features, (3, 3), padding=((1, 1), (1, 1)))(y)
    if self.strides != 1 or x.shape[-1] != self.features:
      x = conv(self.features, (1, 1), (self.strides, self.strides))(pre)
    return x + y


class WideResNet(nn.Module):
  """WRN-depth-k: pre-activation ResNet with three stages of widened blocks.

  ``(depth - 4) / 6`` blocks per stage with ``16k, 32k, 64k`` filters (strides
  1, 2, 2), a 16-filter 3x3 stem, BatchNorm-ReLU, global average pooling and a
  linear read-out. Convolutions have no bias. The default WRN-28-10 has
  36,479,194 parameters for 10 classes (36,536,884 for 100); WRN-16-8 has
  10,961,370 for 10 classes.

  Attributes:
    depth: total depth, ``6n + 4``.
    widen_factor: the width multiplier k.
    num_classes: number of output logits.
    dropout_rate: dropout between the two convolutions of a block (0.3 in the
      paper's dropout runs; 0.0 in most SAM papers). Needs a ``"dropout"`` rng.
    axis_name: BatchNorm's cross-device axis under ``jax.pmap``.
    dtype: computation dtype.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from sharpjax.models import WideResNet
    >>> model = WideResNet(depth=10, widen_factor=1)
    >>> x = jnp.zeros((2, 32, 32, 3))
    >>> variables = jax.jit(model.init)(jax.random.key(0), x)  # one compile
    >>> jax.jit(model.apply)(variables, x).shape
    (2, 10)

  References:
    Zagoruyko and Komodakis, Wide Residual Networks, BMVC 2016.
    https://arxiv.org/abs/1605.07146
  """

  depth: int = 28
  widen_factor: int = 10
  num_classes: int = 10
  dropout_rate: float = 0.0
  axis_name: Optional[str] = None
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    if (self.depth - 4) % 6 != 0 or self.depth < 10:
      raise ValueError(
          f"sharpjax.models.WideResNet: depth must be 6n + 4 with n >= 1 "
          f"(10, 16, 22, 28, ...), got {self.depth}."
      )
    _common.check_rank("WideResNet", x, (4,), "[B, H, W, C]")
    blocks = (self.depth - 4) // 6
    norm, conv = _common.norm_and_conv(train, self.axis_name, self.dtype)
    x = conv(16, (3, 3), padding=((1, 1), (1, 1)))(x.astype(self.dtype))
    for stage, strides in enumerate((1, 2, 2)):
      for block in range(blocks):
        x = WideBlock(
            16 * 2**stage * self.widen_factor,
            strides if block == 0 else 1,
            dropout_rate=self.dropout_rate,
            axis_name=self.axis_name,
            dtype=self.dtype,
        )(x, train)
    x = jnp.mean(nn.relu(norm()(x)), axis=(1, 2))
    return nn.Dense(self.num_classes, dtype=self.dtype)(x)
