"""Small quantized classifiers with the LSQ layer-precision convention.

The convention of the GAQAT author's LSQ fork: the first layer keeps
full-precision weights but quantizes its input (the raw signal) with the
signed range; the classifier keeps full-precision weights and input; every
other layer quantizes its weights (signed, per output channel) and its
post-ReLU input (unsigned). Whether GAQAT itself keeps exactly this exception
is not verified.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from sharpjax.quant import _lsq


class _QuantNet(nn.Module):
  """Base of the quantized classifiers: the precision options (keyword-only)
  and the convention that turns them into each layer's bits."""

  w_bits: Optional[int] = dataclasses.field(default=4, kw_only=True)
  a_bits: Optional[int] = dataclasses.field(default=4, kw_only=True)
  fp_first: bool = dataclasses.field(default=True, kw_only=True)
  fp_last: bool = dataclasses.field(default=True, kw_only=True)

  def layer_bits(self, index: int, num_layers: int):
    """``(w_bits, a_bits, a_signed)`` of layer ``index`` under the convention."""
    if index == num_layers - 1 and self.fp_last:
      return None, None, False
    if index == 0:
      return (None if self.fp_first else self.w_bits), self.a_bits, True
    return self.w_bits, self.a_bits, False


class QuantCNN1D(_QuantNet):
  """The zoo's :class:`~sharpjax.models.CNN1D` with LSQ fake quantization.

  Three convolutions (widths 5, 3, 3, stride 2, padding 1, ReLU) and a linear
  read-out, for MNIST-1D style ``[B, L]`` inputs. ``w_bits``/``a_bits`` set
  the precision of the quantized layers (None: full precision everywhere,
  the same network as ``CNN1D``).

  Attributes:
    num_classes: number of logits.
    channels: filters per convolution.
    w_bits: weight bits (e.g. 4 for W4A4, 3 for W3A3) or None.
    a_bits: activation bits or None.
    fp_first: keep the first layer's weights in full precision.
    fp_last: keep the classifier in full precision (weights and input).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from sharpjax.quant import QuantCNN1D
    >>> model = QuantCNN1D(w_bits=4, a_bits=4)
    >>> x = jax.random.normal(jax.random.key(0), (4, 40))
    >>> variables = jax.jit(model.init)(jax.random.key(1), x)
    >>> jax.jit(model.apply)(variables, x).shape
    (4, 10)
  """

  num_classes: int = 10
  channels: int = 25

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    del train
    if x.ndim == 2:
      x = x[..., None]
    if x.ndim != 3:
      raise ValueError(
          f"sharpjax.quant.QuantCNN1D: expected [B, L] or [B, L, 1], got "
          f"shape {x.shape}."
      )
    for i, width in enumerate((5, 3, 3)):
      wb, ab, signed = self.layer_bits(i, 4)
      x = _lsq.QuantConv(
          self.channels, (width,), strides=(2,), padding=((1, 1),),
          w_bits=wb, a_bits=ab, a_signed=signed,
      )(x)
      x = nn.relu(x)
    x = jnp.reshape(x, (x.shape[0], -1))
    wb, ab, signed = self.layer_bits(3, 4)
    return _lsq.QuantDense(
        self.num_classes, w_bits=wb, a_bits=ab, a_signed=signed
    )(x)


class QuantMLP(_QuantNet):
  """A ReLU MLP with LSQ fake quantization and the same layer convention.

  Attributes:
    hidden: the hidden widths.
    num_classes: number of logits.
    w_bits, a_bits, fp_first, fp_last: as in :class:`QuantCNN1D`.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from sharpjax.quant import QuantMLP
    >>> model = QuantMLP(hidden=(16,), num_classes=3, w_bits=3, a_bits=3)
    >>> x = jnp.ones((2, 5))
    >>> model.apply(model.init(jax.random.key(0), x), x).shape
    (2, 3)
  """

  hidden: Sequence[int] = (100, 100)
  num_classes: int = 10

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    del train
    x = jnp.reshape(x, (x.shape[0], -1))
    n = len(self.hidden) + 1
    for i, width in enumerate(tuple(self.hidden) + (self.num_classes,)):
      wb, ab, signed = self.layer_bits(i, n)
      x = _lsq.QuantDense(width, w_bits=wb, a_bits=ab, a_signed=signed)(x)
      if i < n - 1:
        x = nn.relu(x)
    return x
