r"""LSQ fake quantization: learned step sizes with straight-through rounding.

A tensor :math:`v` is quantized with a learned step size :math:`s` as

.. math::
  \hat v = s\,\lfloor \mathrm{clip}(v/s, -Q_N, Q_P) \rceil, \qquad
  \frac{\partial \hat v}{\partial v} = 1[-Q_N < v/s < Q_P],

  \frac{\partial \hat v}{\partial s} = \gamma \cdot
  \begin{cases} \lfloor v/s \rceil - v/s & -Q_N < v/s < Q_P \\
  -Q_N & v/s \le -Q_N \\ Q_P & v/s \ge Q_P \end{cases},
  \qquad \gamma = 1/\sqrt{Q_P \cdot N},

with :math:`N` the number of elements of :math:`v`. The step-size gradient
scale :math:`\gamma` is applied as ``s * g + stop_gradient(s - s * g)``, which
leaves the forward value unchanged. Weights are signed
(:math:`Q_N = 2^{b-1}, Q_P = 2^{b-1}-1`) with one step per output channel;
activations are unsigned (:math:`Q_N = 0, Q_P = 2^b - 1`, post-ReLU inputs)
with one scalar step, or signed for a network's raw input. Steps start at
:math:`s_0 = 2\,\mathrm{mean}|v|/\sqrt{Q_P}` (per output channel for weights).

These facts follow the first GAQAT author's LSQ fork (JachinJiang/lsq-net),
including its activation :math:`N` that counts the batch dimension (the LSQ
paper counts features per example; pass ``grad_scale_per_example=True``).
"""

from __future__ import annotations

import dataclasses

import math
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

# Names of the step-size parameters; the GAQAT filter selects them by name.
WEIGHT_STEP = "w_step"
ACT_STEP = "a_step"
CALIBRATION = "lsq_calibration"
_MIN_STEP = 1e-8


def quant_range(bits: int, signed: bool, symmetric: bool = False):
  """``(Q_N, Q_P)`` for ``bits``: signed ``(2^(b-1), 2^(b-1)-1)``, unsigned ``(0, 2^b-1)``.

  ``symmetric=True`` (signed only) gives ``Q_N = Q_P = 2^(b-1) - 1``.
  """
  if isinstance(bits, bool) or not isinstance(bits, int) or bits < 2:
    raise ValueError(f"bits must be an integer >= 2, got {bits!r}.")
  if signed:
    qp = 2 ** (bits - 1) - 1
    return (qp if symmetric else qp + 1), qp
  return 0, 2**bits - 1


def round_ste(x: jax.Array) -> jax.Array:
  """Rounds to the nearest integer (half to even) with an identity gradient."""
  return x + jax.lax.stop_gradient(jnp.round(x) - x)


def scale_gradient(x: jax.Array, scale: Any) -> jax.Array:
  """``x`` in the forward pass, ``scale * dx`` in the backward pass."""
  return x * scale + jax.lax.stop_gradient(x - x * scale)


def lsq_grad_scale(qp: int, numel: int) -> float:
  r""":math:`\gamma = 1/\sqrt{Q_P \cdot N}` (LSQ's step-size gradient scale)."""
  return 1.0 / math.sqrt(qp * numel)


def lsq_quantize(
    v: jax.Array,
    step: jax.Array,
    qn: int,
    qp: int,
    grad_scale: float = 1.0,
) -> jax.Array:
  r"""LSQ fake quantization of ``v`` with step ``step`` (see the module doc).

  Args:
    v: the tensor.
    step: the step size, broadcastable to ``v`` (a scalar, or one per output
      channel along the last axis). Steps below 1e-8 are clamped to 1e-8 in
      the forward pass (the clamp has zero gradient there).
    qn: :math:`Q_N \ge 0`, the number of negative levels.
    qp: :math:`Q_P > 0`, the number of positive levels.
    grad_scale: :math:`\gamma`, multiplies the gradient reaching ``step``.

  Returns:
    :math:`\hat v`, every element a multiple of the step in
    :math:`[-Q_N s, Q_P s]`, in ``v``'s dtype.

  Example:
    >>> import jax.numpy as jnp
    >>> from sharpjax.quant import lsq_quantize
    >>> lsq_quantize(jnp.array([-3.0, 0.26, 9.0]), jnp.float32(0.5), 4, 3)
    Array([-2. ,  0.5,  1.5], dtype=float32)

  References:
    Esser et al., Learned Step Size Quantization, ICLR 2020.
    https://arxiv.org/abs/1902.08153
  """
  dtype = v.dtype
  s = scale_gradient(step.astype(jnp.float32), grad_scale)
  s = jnp.maximum(s, _MIN_STEP)
  x = v.astype(jnp.float32) / s
  inside = (x > -qn) & (x < qp)
  # Outside the range the value is a constant level times s: no gradient to
  # v, and d/ds = -Q_N or Q_P through the trailing multiplication by s.
  clipped = jax.lax.stop_gradient(jnp.clip(x, -qn, qp))
  x = jnp.where(inside, x, clipped)
  return (round_ste(x) * s).astype(dtype)


def lsq_init_step(
    v: jax.Array, qp: int, axis: Optional[Sequence[int]] = None
) -> jax.Array:
  r"""LSQ's initial step :math:`s_0 = 2\,\mathrm{mean}|v|/\sqrt{Q_P}`.

  ``axis`` are the axes averaged over (all by default; all but the last for
  per-output-channel weight steps). A zero tensor gives a step of 1.
  """
  m = jnp.mean(jnp.abs(v.astype(jnp.float32)), axis=axis)
  return jnp.where(m > 0, 2.0 * m / math.sqrt(qp), 1.0)


class _Quantizers(nn.Module):
  """Base of the quantized layers: their shared options and quantizers.

  The options are keyword-only fields (a subclass's own fields, ``features``
  first, stay positional): the initialisers and computation dtype of the
  layer, and the weight and input quantizers' bits and scaling.
  """

  kernel_init: Callable = dataclasses.field(
      default=nn.initializers.lecun_normal(), kw_only=True)
  bias_init: Callable = dataclasses.field(default=nn.initializers.zeros,
                                          kw_only=True)
  dtype: Any = dataclasses.field(default=jnp.float32, kw_only=True)
  w_bits: Optional[int] = dataclasses.field(default=4, kw_only=True)
  a_bits: Optional[int] = dataclasses.field(default=4, kw_only=True)
  a_signed: bool = dataclasses.field(default=False, kw_only=True)
  grad_scale_per_example: bool = dataclasses.field(default=False,
                                                   kw_only=True)

  def _quantize_kernel(self, kernel: jax.Array) -> jax.Array:
    if self.w_bits is None:
      return kernel
    qn, qp = quant_range(self.w_bits, signed=True)
    axes = tuple(range(kernel.ndim - 1))
    step = self.param(
        WEIGHT_STEP, lambda _, k: lsq_init_step(k, qp, axes), kernel
    )
    if self.is_mutable_collection(CALIBRATION) and not self.is_initializing():
      self.sow(CALIBRATION, WEIGHT_STEP, lsq_init_step(kernel, qp, axes))
    return lsq_quantize(kernel, step, qn, qp, lsq_grad_scale(qp, kernel.size))

  def _quantize_input(self, x: jax.Array) -> jax.Array:
    if self.a_bits is None:
      return x
    qn, qp = quant_range(self.a_bits, signed=self.a_signed)
    step = self.param(ACT_STEP, lambda _, v: lsq_init_step(v, qp), x)
    if self.is_mutable_collection(CALIBRATION) and not self.is_initializing():
      self.sow(CALIBRATION, ACT_STEP, lsq_init_step(x, qp))
    numel = x.size // x.shape[0] if self.grad_scale_per_example else x.size
    return lsq_quantize(x, step, qn, qp, lsq_grad_scale(qp, numel))


class QuantDense(_Quantizers):
  """A ``Dense`` layer with LSQ fake-quantized kernel and input.

  The kernel is quantized per output channel (signed, ``w_bits``), the input
  with one step (unsigned by default, ``a_bits``); ``None`` keeps that side in
  full precision. The bias stays in full precision. The steps are parameters
  named ``w_step`` (shape ``[features]``) and ``a_step`` (a scalar),
  initialised from the kernel and from the input seen at ``init``: initialise
  with a real batch, or call :func:`calibrate` afterwards.

  Attributes:
    features: output width.
    use_bias: whether to add a bias.
    w_bits: weight bits (>= 2) or None for full precision.
    a_bits: input bits (>= 2) or None for full precision.
    a_signed: quantize the input with the signed range (a network's raw
      input, or inputs that are not post-ReLU).
    grad_scale_per_example: count the input's elements per example in
      :math:`\\gamma` (the LSQ paper) instead of per tensor (the fork).
    kernel_init, bias_init, dtype: as in ``flax.linen.Dense``.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from sharpjax.quant import QuantDense
    >>> layer = QuantDense(3, w_bits=4, a_bits=4)
    >>> x = jax.random.uniform(jax.random.key(0), (8, 5))
    >>> variables = layer.init(jax.random.key(1), x)
    >>> sorted(variables["params"])
    ['a_step', 'bias', 'kernel', 'w_step']
  """

  features: int = 1
  use_bias: bool = True

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = self._quantize_input(x.astype(self.dtype))
    kernel = self.param(
        "kernel", self.kernel_init, (x.shape[-1], self.features), jnp.float32
    )
    kernel = self._quantize_kernel(kernel).astype(self.dtype)
    y = jnp.dot(x, kernel)
    if self.use_bias:
      bias = self.param("bias", self.bias_init, (self.features,), jnp.float32)
      y = y + bias.astype(self.dtype)
    return y


class QuantConv(_Quantizers):
  """A ``Conv`` layer (channels last) with LSQ fake-quantized kernel and input.

  As :class:`QuantDense`; the kernel ``[*kernel_size, in, out]`` gets one step
  per output channel.

  Attributes:
    features: output channels.
    kernel_size: the window, a tuple.
    strides: strides, a tuple (default 1).
    padding: as in ``flax.linen.Conv`` ("SAME", "VALID" or pairs).
    use_bias: whether to add a bias.
    w_bits, a_bits, a_signed, grad_scale_per_example: as in
      :class:`QuantDense`.
    kernel_init, bias_init, dtype: as in ``flax.linen.Conv``.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from sharpjax.quant import QuantConv
    >>> conv = QuantConv(4, (3,), w_bits=3, a_bits=3)
    >>> x = jax.random.uniform(jax.random.key(0), (2, 10, 1))
    >>> conv.apply(conv.init(jax.random.key(1), x), x).shape
    (2, 10, 4)
  """

  features: int = 1
  kernel_size: Sequence[int] = (3,)
  strides: Optional[Sequence[int]] = None
  padding: Any = "SAME"
  use_bias: bool = True

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    nd = len(self.kernel_size)
    if x.ndim != nd + 2:
      raise ValueError(
          f"sharpjax.quant.QuantConv: a {nd}-D kernel needs inputs of rank "
          f"{nd + 2} ([B, *spatial, C]), got shape {x.shape}."
      )
    x = self._quantize_input(x.astype(self.dtype))
    shape = tuple(self.kernel_size) + (x.shape[-1], self.features)
    kernel = self.param("kernel", self.kernel_init, shape, jnp.float32)
    kernel = self._quantize_kernel(kernel).astype(self.dtype)
    strides = tuple(self.strides) if self.strides else (1,) * nd
    padding = self.padding
    if not isinstance(padding, str):
      padding = [tuple(p) for p in padding]
    spec = ("NHC", "HIO", "NHC") if nd == 1 else None
    if nd == 2:
      spec = ("NHWC", "HWIO", "NHWC")
    elif nd > 2:
      raise ValueError("sharpjax.quant.QuantConv supports 1-D and 2-D kernels.")
    y = jax.lax.conv_general_dilated(
        x, kernel, strides, padding, dimension_numbers=spec
    )
    if self.use_bias:
      bias = self.param("bias", self.bias_init, (self.features,), jnp.float32)
      y = y + bias.astype(self.dtype)
    return y


def is_step(path: tuple, leaf: Any = None) -> bool:
  """Whether a parameter path ends in an LSQ step (``w_step`` or ``a_step``)."""
  del leaf
  if not path:
    return False
  last = path[-1]
  name = getattr(last, "key", getattr(last, "name", last))
  return name in (WEIGHT_STEP, ACT_STEP)


def calibrate(
    model: nn.Module, variables: Any, *args: Any, **kwargs: Any
) -> Any:
  """Re-initialises every LSQ step from the current weights and the data.

  Runs ``model.apply(variables, *args, **kwargs)`` once and sets each
  ``w_step`` to :math:`2\\,\\mathrm{mean}|W|/\\sqrt{Q_P}` of its (current)
  kernel and each ``a_step`` to the same statistic of the input that layer
  sees on this batch: LSQ's initialisation, for a model whose weights were
  replaced after ``init`` (for example by pretrained full-precision ones) or
  that was initialised with a dummy input. The inputs of later layers are
  quantized with the old steps during this pass, as when LSQ initialises on
  its first training batch.

  Returns:
    ``variables`` with the steps replaced.
  """
  _, sown = model.apply(variables, *args, mutable=[CALIBRATION], **kwargs)
  fresh = sown[CALIBRATION]

  def replace(params, new):
    out = dict(params)
    for k, v in new.items():
      if isinstance(v, tuple):  # sow keeps a tuple of values.
        out[k] = jnp.asarray(v[0], jnp.asarray(params[k]).dtype)
      else:
        out[k] = replace(params[k], v)
    return out

  result = dict(variables)
  result["params"] = replace(variables["params"], fresh)
  return result
