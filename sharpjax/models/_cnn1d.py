"""The small 1D convolutional network of the MNIST-1D benchmark."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from sharpjax.models import _common


class CNN1D(nn.Module):
  """MNIST-1D's ConvNet: three strided 1D convolutions and a linear read-out.

  The layout follows the MNIST-1D paper's baseline ("ConvBase"): convolutions
  with ``channels`` filters of width 5, 3, 3, stride 2 and padding 1 each,
  ReLU after each, then a linear layer on the flattened features. A length-40
  signal becomes 19, 10, then 5 positions, so with the default 25 channels the
  network has

  .. math::
    (1\\cdot5 + 1)\\,25 + 2\\,(25\\cdot3 + 1)\\,25 + (125 + 1)\\,10 = 5{,}210

  parameters (the paper quotes "about 5K").

  Attributes:
    num_classes: number of output logits.
    channels: filters per convolution.
    dropout_rate: dropout before the read-out (0 in the paper).
    dtype: computation dtype.

  Inputs are ``[B, L]`` or ``[B, L, 1]`` (MNIST-1D has L = 40).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from sharpjax.models import CNN1D
    >>> model = CNN1D()
    >>> variables = model.init(jax.random.key(0), jnp.zeros((2, 40)))
    >>> model.apply(variables, jnp.zeros((2, 40))).shape
    (2, 10)

  References:
    Greydanus and Kobak, Scaling Down Deep Learning with MNIST-1D, ICML 2024.
    https://arxiv.org/abs/2011.14439
  """

  num_classes: int = 10
  channels: int = 25
  dropout_rate: float = 0.0
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    _common.check_rank("CNN1D", x, (2, 3), "[B, L] or [B, L, 1]")
    if x.ndim == 2:
      x = x[..., None]
    if x.shape[-1] != 1:
      raise ValueError(
          "sharpjax.models.CNN1D: expected one input channel ([B, L, 1]), got "
          f"shape {x.shape}."
      )
    x = x.astype(self.dtype)
    for width in (5, 3, 3):
      x = nn.Conv(
          self.channels, (width,), strides=(2,), padding=((1, 1),),
          dtype=self.dtype,
      )(x)
      x = nn.relu(x)
    x = jnp.reshape(x, (x.shape[0], -1))
    if self.dropout_rate > 0:
      x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    return nn.Dense(self.num_classes, dtype=self.dtype)(x)
