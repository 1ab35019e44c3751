r"""Loss-landscape slices: interpolation and filter-normalised random directions.

A slice evaluates the mean loss (and optionally the error rate) over the data on
a line or plane of parameter space:

.. math::
  f(\alpha) = L\big((1-\alpha)\,w_a + \alpha\,w_b\big),\qquad
  f(a, b) = L(w + a\,d_1 + b\,d_2).

Random directions are *filter-normalised* (Li et al. 2018): each filter of the
Gaussian direction is rescaled to the norm of the same filter of the weights,
so slices of networks with different weight scales are comparable. In Flax
layouts (``Dense`` kernels ``[in, out]``, ``Conv`` kernels
``[..., in, out]``) a filter is one index of the *last* axis, the default
``filter_axis=-1``.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp

from sharpjax._src import base
from sharpjax.measures import _data

LossFn = _data.LossFn


class Slice1D(NamedTuple):
  """A 1D slice of the loss landscape.

  Attributes:
    coords: ``[n]`` positions along the line (:math:`\\alpha` or :math:`a`).
    loss: ``[n]`` mean loss at each position.
    error: ``[n]`` error rate at each position (NaN without an ``error_fn``).
    direction: the direction used (a float32 pytree), or None for an
      interpolation.
  """

  coords: jax.Array
  loss: jax.Array
  error: jax.Array
  direction: Any


class Slice2D(NamedTuple):
  """A 2D slice of the loss landscape.

  Attributes:
    x: ``[nx]`` coordinates along the first direction.
    y: ``[ny]`` coordinates along the second direction.
    loss: ``[ny, nx]`` mean loss; ``loss[j, i]`` is at ``(x[i], y[j])`` (the
      layout ``matplotlib``'s ``contour(x, y, loss)`` expects).
    error: ``[ny, nx]`` error rate (NaN without an ``error_fn``).
    directions: the two directions (float32 pytrees).
  """

  x: jax.Array
  y: jax.Array
  loss: jax.Array
  error: jax.Array
  directions: tuple


# ---------------------------------------------------------------------------
# Directions.
# ---------------------------------------------------------------------------


def _filter_normalize_leaf(d, w, filter_axis, ignore_1d):
  w = w.astype(jnp.float32)
  d = d.astype(jnp.float32)
  if w.ndim <= 1:
    return jnp.zeros_like(w) if ignore_1d else w
  axis = filter_axis % w.ndim
  others = tuple(a for a in range(w.ndim) if a != axis)
  w_norm = jnp.sqrt(jnp.sum(w * w, axis=others, keepdims=True))
  d_norm = jnp.sqrt(jnp.sum(d * d, axis=others, keepdims=True))
  return d * (w_norm / (d_norm + 1e-10))


def normalize_direction(
    direction: Any,
    params: Any,
    *,
    filter_axis: int = -1,
    ignore_1d: bool = True,
) -> Any:
  r"""Filter-normalises ``direction`` against ``params`` (Li et al. 2018).

  For every leaf with two or more axes and every filter :math:`f` (one index
  of ``filter_axis``): :math:`d_f \leftarrow d_f\, \|w_f\| / (\|d_f\| +
  10^{-10})`. Leaves with at most one axis (biases, normalisation parameters)
  are set to zero (``ignore_1d=True``, the paper's ``ignore='biasbn'``) or to
  the weights themselves (``ignore_1d=False``).

  Returns:
    A float32 pytree shaped like ``params``.
  """
  return jax.tree.map(
      lambda d, w: _filter_normalize_leaf(d, w, filter_axis, ignore_1d),
      direction,
      params,
  )


def filter_normalized_direction(
    key: jax.Array,
    params: Any,
    *,
    filter_axis: int = -1,
    ignore_1d: bool = True,
) -> Any:
  """A Gaussian random direction, filter-normalised against ``params``.

  See :func:`normalize_direction`.

  References:
    Li, Xu, Taylor, Studer, Goldstein, Visualizing the Loss Landscape of Neural
    Nets, NeurIPS 2018, https://arxiv.org/abs/1712.09913.

  Example:
    >>> import jax, jax.numpy as jnp, sharpjax.measures as sm
    >>> w = {"kernel": jnp.ones((3, 2)), "bias": jnp.ones(2)}
    >>> d = sm.filter_normalized_direction(jax.random.PRNGKey(0), w)
    >>> jnp.linalg.norm(d["kernel"], axis=0).tolist()  # each filter: sqrt(3)
    [1.73205..., 1.73205...]
    >>> d["bias"].tolist()
    [0.0, 0.0]
  """
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(key, max(len(leaves), 1))
  raw = jax.tree.unflatten(
      treedef,
      [jax.random.normal(k, jnp.shape(w)) for k, w in zip(keys, leaves)],
  )
  return normalize_direction(
      raw, params, filter_axis=filter_axis, ignore_1d=ignore_1d
  )


# ---------------------------------------------------------------------------
# Evaluation.
# ---------------------------------------------------------------------------


def _point_values(loss_fn, error_fn, batches, name):
  def values(p):
    def per_batch(b):
      loss = _data.mean_loss(loss_fn, p, b, name)
      err = (
          jnp.float32(jnp.nan)
          if error_fn is None
          else _data.mean_error(error_fn, p, b, name)
      )
      return loss, err

    return _data.weighted_mean(per_batch, batches)

  return values


@functools.partial(jax.jit, static_argnums=(0, 1, 6))
def _slice_jit(loss_fn, error_fn, origin, directions, coords, batches, chunk):
  """Loss/error at ``origin + sum_i coords[:, i] * directions[i]``."""
  values = _point_values(loss_fn, error_fn, batches, "landscape")

  def at(coord):
    p = origin
    for i, d in enumerate(directions):
      p = _data.tree_add_scaled(p, d, coord[i])
    return values(p)

  return _data.chunked_map(at, coords, chunk)


def _grid(span, num_points, name):
  lo, hi = (float(s) for s in span)
  if not hi > lo:
    raise ValueError(f"{name} must be (low, high) with high > low, got {span}.")
  return jnp.linspace(lo, hi, num_points, dtype=jnp.float32)


def interpolate(
    loss_fn: LossFn,
    params_a: Any,
    params_b: Any,
    data: Any,
    *,
    span: Sequence[float] = (-0.5, 1.5),
    num_points: int = 41,
    error_fn: LossFn | None = None,
    points_per_step: int | None = None,
) -> Slice1D:
  r"""Loss along the line through two parameter sets.

  :math:`f(\alpha) = L(w_a + \alpha (w_b - w_a))` for ``num_points`` values of
  :math:`\alpha` evenly spaced over ``span`` (0 is ``params_a``, 1 is
  ``params_b``), e.g. from initialisation to solution or between an SGD and a
  SAM solution.

  References:
    Goodfellow, Vinyals, Saxe, Qualitatively characterizing neural network
    optimization problems, ICLR 2015, https://arxiv.org/abs/1412.6544.

  Args:
    loss_fn: ``loss_fn(params, batch)`` returning per-example losses ``[B]``.
    params_a: the parameters at :math:`\alpha = 0`.
    params_b: the parameters at :math:`\alpha = 1` (same structure).
    data: one batch or an iterable of batches (batch-size weighted).
    span: ``(low, high)`` range of :math:`\alpha`.
    num_points: number of positions, ``>= 2``.
    error_fn: optional ``error_fn(params, batch) -> [B]`` of 0/1 errors.
    points_per_step: positions evaluated together with ``vmap``.

  Returns:
    A :class:`Slice1D` (``direction`` is None).
  """
  num_points = base.check_int("num_points", num_points, low=2)
  coords = _grid(span, num_points, "span")
  batches = _data.as_batches(data, "interpolate")
  diff = jax.tree.map(
      lambda a, b: b.astype(jnp.float32) - a.astype(jnp.float32),
      params_a,
      params_b,
  )
  loss, err = _slice_jit(
      loss_fn, error_fn, params_a, (diff,), coords[:, None], batches,
      points_per_step,
  )
  return Slice1D(coords, loss, err, None)


def landscape_1d(
    loss_fn: LossFn,
    params: Any,
    data: Any,
    key: jax.Array,
    *,
    span: Sequence[float] = (-1.0, 1.0),
    num_points: int = 51,
    direction: Any = None,
    filter_axis: int = -1,
    ignore_1d: bool = True,
    error_fn: LossFn | None = None,
    points_per_step: int | None = None,
) -> Slice1D:
  r"""Loss along a filter-normalised random direction, :math:`L(w + a\,d)`.

  Args:
    loss_fn: ``loss_fn(params, batch)`` returning per-example losses ``[B]``
      (the model in eval mode).
    params: the centre :math:`w`, any pytree.
    data: one batch or an iterable of batches (batch-size weighted).
    key: PRNG key for the direction (ignored when ``direction`` is given).
    span: ``(low, high)`` range of :math:`a`.
    num_points: number of positions, ``>= 2``.
    direction: a direction to use as is (shaped like ``params``); default a
      :func:`filter_normalized_direction`.
    filter_axis: the filter axis of multi-axis leaves (-1 in Flax).
    ignore_1d: zero the direction on leaves with at most one axis.
    error_fn: optional ``error_fn(params, batch) -> [B]`` of 0/1 errors.
    points_per_step: positions evaluated together with ``vmap``.

  Returns:
    A :class:`Slice1D`.

  Example:
    >>> import jax, jax.numpy as jnp, sharpjax.measures as sm
    >>> loss = lambda w, b: b * jnp.sum(w["k"] ** 2)
    >>> s = sm.landscape_1d(loss, {"k": jnp.ones((2, 2))}, jnp.ones(3),
    ...                     jax.random.PRNGKey(0), num_points=5)
    >>> s.loss.shape
    (5,)
  """
  num_points = base.check_int("num_points", num_points, low=2)
  coords = _grid(span, num_points, "span")
  if direction is None:
    direction = filter_normalized_direction(
        key, params, filter_axis=filter_axis, ignore_1d=ignore_1d
    )
  direction = jax.tree.map(lambda d: jnp.asarray(d, jnp.float32), direction)
  batches = _data.as_batches(data, "landscape_1d")
  loss, err = _slice_jit(
      loss_fn, error_fn, params, (direction,), coords[:, None], batches,
      points_per_step,
  )
  return Slice1D(coords, loss, err, direction)


def landscape_2d(
    loss_fn: LossFn,
    params: Any,
    data: Any,
    key: jax.Array,
    *,
    span: Sequence[float] = (-1.0, 1.0),
    span_y: Sequence[float] | None = None,
    num_points: int = 21,
    num_points_y: int | None = None,
    directions: tuple[Any, Any] | None = None,
    filter_axis: int = -1,
    ignore_1d: bool = True,
    error_fn: LossFn | None = None,
    points_per_step: int | None = None,
) -> Slice2D:
  r"""Loss on a plane of two filter-normalised random directions.

  :math:`f(a, b) = L(w + a\,d_1 + b\,d_2)` on a ``num_points_y x num_points``
  grid. The two Gaussian directions are drawn independently (nearly orthogonal
  in high dimension) and filter-normalised (Li et al. 2018).

  References:
    Li, Xu, Taylor, Studer, Goldstein, Visualizing the Loss Landscape of Neural
    Nets, NeurIPS 2018, https://arxiv.org/abs/1712.09913.

  Args:
    loss_fn: ``loss_fn(params, batch)`` returning per-example losses ``[B]``.
    params: the centre :math:`w`, any pytree.
    data: one batch or an iterable of batches (batch-size weighted).
    key: PRNG key for the directions (ignored when ``directions`` is given).
    span: ``(low, high)`` range of :math:`a` (and of :math:`b` unless
      ``span_y`` is given).
    span_y: range of :math:`b`.
    num_points: grid points along :math:`a` (and :math:`b` unless
      ``num_points_y``), ``>= 2``.
    num_points_y: grid points along :math:`b`.
    directions: two directions to use as they are.
    filter_axis: the filter axis of multi-axis leaves (-1 in Flax).
    ignore_1d: zero the directions on leaves with at most one axis.
    error_fn: optional ``error_fn(params, batch) -> [B]`` of 0/1 errors.
    points_per_step: grid points evaluated together with ``vmap``.

  Returns:
    A :class:`Slice2D`.
  """
  nx = base.check_int("num_points", num_points, low=2)
  ny = nx if num_points_y is None else base.check_int(
      "num_points_y", num_points_y, low=2
  )
  x = _grid(span, nx, "span")
  y = _grid(span if span_y is None else span_y, ny, "span_y")
  if directions is None:
    k1, k2 = jax.random.split(key)
    directions = tuple(
        filter_normalized_direction(
            k, params, filter_axis=filter_axis, ignore_1d=ignore_1d
        )
        for k in (k1, k2)
    )
  if len(directions) != 2:
    raise ValueError(f"directions must be a pair, got {len(directions)}.")
  directions = tuple(
      jax.tree.map(lambda d: jnp.asarray(d, jnp.float32), d) for d in directions
  )
  gx, gy = jnp.meshgrid(x, y)  # [ny, nx]
  coords = jnp.stack([gx.ravel(), gy.ravel()], axis=1)
  batches = _data.as_batches(data, "landscape_2d")
  loss, err = _slice_jit(
      loss_fn, error_fn, params, directions, coords, batches, points_per_step
  )
  return Slice2D(x, y, loss.reshape(ny, nx), err.reshape(ny, nx), directions)
