"""A small MNIST-1D network with normalization layers, for adaptation demos."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


class NormCNN1D(nn.Module):
  """MNIST-1D's ConvNet with a normalization layer after each convolution.

  The layout of :class:`sharpjax.models.CNN1D` (three width-5/3/3 stride-2
  convolutions, ReLU, a linear read-out) with ``Conv -> Norm -> ReLU``, so
  that test-time adaptation (:func:`sharpjax.tta.sar`, :func:`sharpjax.tta.tent`)
  has normalization scales and biases to adapt. GroupNorm is the default, as
  in SAR's ResNet-50-GN: it normalises each example on its own, so a batch of
  one or a label-imbalanced batch does not change the features.

  Attributes:
    num_classes: number of output logits.
    channels: filters per convolution.
    norm: ``"group"``, ``"layer"`` or ``"batch"`` (BatchNorm keeps running
      statistics in ``batch_stats``; ``train=True`` normalises with the
      batch's statistics).
    num_groups: groups of GroupNorm (must divide ``channels``).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from sharpjax.tta import NormCNN1D
    >>> variables = NormCNN1D().init(jax.random.key(0), jnp.zeros((2, 40)))
    >>> NormCNN1D().apply(variables, jnp.zeros((2, 40))).shape
    (2, 10)
  """

  num_classes: int = 10
  channels: int = 32
  norm: str = "group"
  num_groups: int = 8

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    if x.ndim == 2:
      x = x[..., None]
    if x.ndim != 3:
      raise ValueError(
          f"NormCNN1D: expected [B, L] or [B, L, 1] inputs, got {x.shape}."
      )
    for width in (5, 3, 3):
      x = nn.Conv(self.channels, (width,), strides=(2,), padding=((1, 1),))(x)
      if self.norm == "group":
        x = nn.GroupNorm(num_groups=self.num_groups)(x)
      elif self.norm == "layer":
        x = nn.LayerNorm()(x)
      elif self.norm == "batch":
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
      else:
        raise ValueError(
            f"NormCNN1D: norm must be 'group', 'layer' or 'batch', got "
            f"{self.norm!r}."
        )
      x = nn.relu(x)
    x = jnp.reshape(x, (x.shape[0], -1))
    return nn.Dense(self.num_classes)(x)
