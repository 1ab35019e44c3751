r"""Ascent directions: where the SAM family evaluates its gradient.

Every function here maps the clean gradient :math:`g` (and, for the adaptive
form, the parameters :math:`w`) to a float32 perturbation pytree
:math:`\epsilon`. All norms are global norms over the whole pytree, accumulated
in float32 whatever the parameter dtype, and a zero gradient gives a zero
perturbation (never NaN).
"""

from __future__ import annotations

from typing import Any, Callable, Union

import jax
import jax.numpy as jnp

from sharpjax._src import base

# A pytree of booleans shaped like the parameters, or a function
# ``(path, leaf) -> bool`` deciding leaf by leaf.
AdaptiveMask = Union[Any, Callable[[tuple, jax.Array], bool]]

_NOT_ADAPTIVE_NAMES = ("bias", "beta")


def _leaf_name(path: tuple) -> str | None:
  """The name of a leaf: its dict key, attribute or field name, if any."""
  if not path:
    return None
  for attr in ("key", "name"):
    name = getattr(path[-1], attr, None)
    if isinstance(name, str):
      return name
  return None


def default_adaptive_mask(path: tuple, leaf: jax.Array) -> bool:
  """ASAM's rule: rescale weight kernels and normalisation scales, not biases.

  The official ASAM code rescales every tensor whose name contains "weight"
  (convolution and linear weights, BatchNorm gamma) and leaves biases and
  BatchNorm beta alone. In Flax terms: ``kernel``, ``scale`` and ``embedding``
  are rescaled, ``bias`` is not. Leaves without a name (lists, bare arrays) are
  rescaled when they have two or more dimensions.

  Example:
    >>> import jax, jax.numpy as jnp, sharpjax as sj
    >>> params = {"dense": {"kernel": jnp.ones((3, 2)), "bias": jnp.ones(2)},
    ...           "norm": {"scale": jnp.ones(2), "bias": jnp.zeros(2)}}
    >>> jax.tree_util.tree_map_with_path(sj.default_adaptive_mask, params)
    {'dense': {'bias': False, 'kernel': True}, 'norm': {'bias': False, 'scale': True}}
  """
  name = _leaf_name(path)
  if name is None:
    return jnp.ndim(leaf) >= 2
  lname = name.lower()
  if lname == "b" or any(n in lname for n in _NOT_ADAPTIVE_NAMES):
    return False
  return True


def resolve_adaptive_mask(mask: AdaptiveMask, params: Any) -> Any:
  """A pytree of Python bools shaped like ``params``."""
  if callable(mask):
    return jax.tree_util.tree_map_with_path(
        lambda p, x: bool(mask(p, x)), params
    )
  return mask


def sam_perturbation(
    grads: Any, rho: jax.Array
) -> tuple[Any, jax.Array]:
  r"""SAM's ascent step :math:`\epsilon = \rho\, g / \|g\|_2`.

  Returns the float32 perturbation and :math:`\|g\|_2`.

  Example:
    >>> import jax.numpy as jnp, sharpjax as sj
    >>> eps, norm = sj.sam_perturbation({"w": jnp.array([3.0, 4.0])}, 0.5)
    >>> eps["w"], norm
    (Array([0.3, 0.4], dtype=float32), Array(5., dtype=float32))
  """
  grad_norm = base.tree_norm_f32(grads)
  scale = rho * base.safe_inverse(grad_norm)
  eps = jax.tree.map(lambda g: g.astype(jnp.float32) * scale, grads)
  return eps, grad_norm


def asam_perturbation(
    grads: Any,
    params: Any,
    rho: jax.Array,
    eta: jax.Array,
    mask: Any,
) -> tuple[Any, jax.Array]:
  r"""ASAM's ascent step :math:`\epsilon = \rho\, T^2 g / \|T g\|_2`.

  :math:`T = |w| + \eta` on leaves where ``mask`` is True, :math:`T = 1`
  elsewhere. Returns the float32 perturbation and the clean :math:`\|g\|_2`.

  Example:
    >>> import jax.numpy as jnp, sharpjax as sj
    >>> grads = {"kernel": jnp.array([1.0, 1.0]), "bias": jnp.array([1.0])}
    >>> params = {"kernel": jnp.array([2.0, 0.0]), "bias": jnp.array([5.0])}
    >>> mask = {"kernel": True, "bias": False}  # T = (|w|, |w|, 1), eta = 0
    >>> eps, norm = sj.asam_perturbation(grads, params, 1.0, 0.0, mask)
    >>> eps["kernel"], eps["bias"]  # T^2 g / |T g| = (4, 0, 1) / sqrt(5)
    (Array([1.7888544, 0.       ], dtype=float32), Array([0.4472136], dtype=float32))
  """

  def operator(g, w, adaptive):
    g = g.astype(jnp.float32)
    if not adaptive:
      return g, g
    t = jnp.abs(w.astype(jnp.float32)) + eta
    return t * g, t * t * g

  pairs = jax.tree.map(operator, grads, params, mask)
  is_pair = lambda x: isinstance(x, tuple)
  scaled = jax.tree.map(lambda p: p[0], pairs, is_leaf=is_pair)
  scaled_twice = jax.tree.map(lambda p: p[1], pairs, is_leaf=is_pair)
  scale = rho * base.safe_inverse(base.tree_norm_f32(scaled))
  eps = jax.tree.map(lambda x: x * scale, scaled_twice)
  return eps, base.tree_norm_f32(grads)
