r"""Gradients at points a method takes from its state.

Momentum-SAM and SAMPa take no gradient at the current parameters: the
point (or points) where a step's gradients are taken are known from the
state and the parameters before the step starts. The state says where
(``PASSES = "points"`` and ``gradient_points(params)``, the protocol of
:mod:`sharpjax._src.protocol`); whoever drives the step computes the
gradients there and passes them to ``update`` as ``point_passes=`` (a tuple
of :class:`sharpjax.PerturbedPass`, one per point, in order). Without
``point_passes`` the transformation takes those passes itself from the
``loss_fn`` and ``batch`` extra arguments (then the gradient passed to
``update`` is used for the diagnostics only).

This module holds what both methods share: reading ``point_passes``, and
the passes at the points when the caller did not take them.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp

from sharpjax._src import perturbed as perturbed_lib


class PointPasses(NamedTuple):
  """Gradients (and mean losses) at a method's points.

  Attributes:
    grads: a tuple of gradients, one per point, each shaped like the
      parameters.
    losses: a tuple of float32 mean losses, one per point (NaN when the
      caller passed the gradients without ``point_losses``).
  """

  grads: tuple
  losses: tuple


def add_to(params: Any, delta: Any) -> Any:
  """``params + delta`` in float32, cast back to each parameter's dtype."""
  return jax.tree.map(
      lambda p, d: (p.astype(jnp.float32) + d).astype(p.dtype), params, delta)


def given(point_passes: Any, num_points: int, updates: Any,
          name: str) -> Optional[PointPasses]:
  """The caller's ``point_passes`` checked (None when not passed).

  Each entry is a :class:`sharpjax.PerturbedPass` (or any object with
  ``grads`` and ``loss``; ``loss`` may be None). Raises a ``ValueError`` at
  trace time when the count differs from the method's points or a gradient
  is not shaped like ``updates``.
  """
  if point_passes is None:
    return None
  if (not isinstance(point_passes, (tuple, list))
      or len(point_passes) != num_points):
    raise ValueError(
        f"sharpjax.{name}: point_passes must be a tuple of {num_points} "
        "pass(es) (sj.PerturbedPass), one per point of "
        "sj.gradient_points(opt_state, params), got "
        f"{type(point_passes).__name__}"
        + (f" of length {len(point_passes)}"
           if isinstance(point_passes, (tuple, list)) else "") + ".")
  want = jax.tree.structure(updates)
  grads, losses = [], []
  for i, p in enumerate(point_passes):
    if not hasattr(p, "grads"):
      raise ValueError(
          f"sharpjax.{name}: point_passes[{i}] must be a sj.PerturbedPass "
          f"(loss, grads, losses, aux), got {type(p).__name__}.")
    if jax.tree.structure(p.grads) != want:
      raise ValueError(
          f"sharpjax.{name}: point_passes[{i}].grads is not shaped like the "
          f"gradient: {jax.tree.structure(p.grads)} vs {want}.")
    grads.append(p.grads)
    losses.append(jnp.full((), jnp.nan, jnp.float32) if p.loss is None
                  else jnp.asarray(p.loss, jnp.float32).reshape(()))
  return PointPasses(tuple(grads), tuple(losses))


def passes(loss_fn: perturbed_lib.LossFn, points: Sequence[Any], batch: Any,
           *, has_aux: bool, name: str) -> PointPasses:
  """The gradient of the mean loss on ``batch`` at each of ``points``.

  One forward-backward pass per point, written one after the other (they
  are independent, so XLA may overlap them). Not a ``jax.vmap`` over the
  stacked points: that turns every convolution into a grouped one with
  per-point kernels, about twice the time of two plain passes on a CPU CNN.
  """
  grads, losses = [], []
  for point in points:
    out = perturbed_lib.gradient_pass(loss_fn, point, batch,
                                      has_aux=has_aux, name=name)
    grads.append(out.grads)
    losses.append(out.loss)
  return PointPasses(tuple(grads), tuple(losses))
