"""A multi-layer perceptron."""

from __future__ import annotations

from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp


class MLP(nn.Module):
  """Fully connected classifier: flatten, ``len(features)`` hidden layers, logits.

  Parameter count: :math:`\\sum_k (d_{k-1} + 1) d_k` over the layers, with
  :math:`d_0` the flattened input size and the last :math:`d` the number of
  classes. ``MLP(features=(100, 100), num_classes=10)`` on MNIST-1D's 40 inputs
  has 41*100 + 101*100 + 101*10 = 15,210 parameters.

  Attributes:
    features: widths of the hidden layers.
    num_classes: number of output logits.
    activation: the nonlinearity between layers.
    dropout_rate: dropout after each hidden activation (active when
      ``train=True``; needs a ``"dropout"`` rng).
    dtype: computation dtype (parameters stay float32).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from sharpjax.models import MLP
    >>> model = MLP(features=(32,), num_classes=10)
    >>> variables = model.init(jax.random.key(0), jnp.zeros((2, 40)))
    >>> model.apply(variables, jnp.zeros((2, 40))).shape
    (2, 10)
  """

  features: Sequence[int] = (100, 100)
  num_classes: int = 10
  activation: Callable[[jax.Array], jax.Array] = nn.relu
  dropout_rate: float = 0.0
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    if jnp.ndim(x) < 2:
      raise ValueError(
          "sharpjax.models.MLP: expected input of rank >= 2 ([B, ...]), got "
          f"shape {jnp.shape(x)}."
      )
    x = jnp.reshape(x, (x.shape[0], -1)).astype(self.dtype)
    for width in self.features:
      x = self.activation(nn.Dense(width, dtype=self.dtype)(x))
      if self.dropout_rate > 0:
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    return nn.Dense(self.num_classes, dtype=self.dtype)(x)
