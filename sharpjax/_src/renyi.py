r"""A Rényi-sharpness regularizer (this library's construction).

Rényi sharpness (Zhang et al., 2025) is minus the Rényi entropy of the
normalised Hessian spectrum :math:`p_i = \lambda_i / \sum_j \lambda_j`. At
order 2 it has a closed form in two traces,

.. math::
  R_2(w) = \log\frac{\mathrm{tr}(H^2)}{(\mathrm{tr}\,H)^2}
  \in [-\log d, 0],

and both traces have Hutchinson estimates from the same Rademacher probes
:math:`z_k`: :math:`\mathrm{tr}\,H \approx \frac1K\sum_k z_k^\top H z_k`,
:math:`\mathrm{tr}\,H^2 \approx \frac1K\sum_k \|H z_k\|^2`. The paper (RSAM)
trains with "a variant of Rényi sharpness as regularizer" but its exact form,
order and weight are not public. What is here is **ours, built from the
paper's definition**: the order-2 Hutchinson estimate :math:`\hat R_2`,
differentiated through the Hessian-vector products (third-order autodiff),
added to the loss with a weight :math:`\gamma` and, to bound the cost,
recomputed only every ``k`` steps.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from sharpjax._src import base
from sharpjax._src import hessian
from sharpjax._src import perturbed as perturbed_lib

LossFn = Callable[[Any, Any], jax.Array]


def renyi_sharpness_penalty(
    loss_fn: LossFn,
    params: Any,
    batch: Any,
    key: jax.Array,
    *,
    num_probes: int = 4,
) -> jax.Array:
  r"""Differentiable order-2 Rényi sharpness from Hutchinson probes.

  .. math::
    \hat R_2(w) = \log \frac{\frac1K\sum_k\|H z_k\|^2}
      {\big(\frac1K\sum_k z_k^\top H z_k\big)^2},
    \qquad H = \nabla^2_w \tfrac{1}{|B|}\textstyle\sum_{i\in B}\ell_i(w),

  with Rademacher probes :math:`z_k` drawn exactly as
  :func:`sharpjax.measures.hessian_trace` draws them (probe ``k`` from
  ``fold_in(key, k)`` on the flattened float32 parameters), so for the same
  key, data and ``num_probes`` the value equals
  ``sharpjax.measures.renyi_sharpness(hessian_trace(...))``. It is a
  differentiable function of ``params``: use it as a loss term,
  ``loss = ce + gamma * renyi_sharpness_penalty(...)``. Its gradient is
  third-order autodiff (a gradient through ``K`` Hessian-vector products),
  about ``4K`` to ``6K`` passes; see :func:`renyi_regularizer` to refresh it
  only every ``k`` steps.

  This regularizer is this library's construction from the RSAM paper's
  definition of Rényi sharpness; the paper's own regularizer is not public.
  The ratio is of two estimates and is undefined when the trace estimate is
  0 (it is positive near a minimum of a cross-entropy loss).

  Args:
    loss_fn: ``loss_fn(params, batch)`` returning per-example losses ``[B]``.
    params: the parameters (any pytree).
    batch: one batch (a pytree with a leading batch axis).
    key: PRNG key of the probes.
    num_probes: ``K >= 1``.

  Returns:
    A float32 scalar in about :math:`[-\log d, 0]` (an estimate; a few
    probes can leave it slightly outside).

  Example:
    >>> import jax, jax.numpy as jnp, sharpjax as sj
    >>> loss = lambda w, b: 0.5 * b * jnp.sum(jnp.array([3., 1.]) * w ** 2)
    >>> r = sj.renyi_sharpness_penalty(loss, jnp.ones(2), jnp.ones(4),
    ...                                jax.random.key(0))
    >>> round(float(r), 4)   # log((9 + 1) / 4^2)
    -0.47

  References:
    Zhang et al., Rényi Sharpness: A Novel Sharpness that Strongly Correlates
    with Generalization, 2025. https://arxiv.org/abs/2510.07758
  """
  num_probes = base.check_int("num_probes", num_probes, low=1)
  size = perturbed_lib.batch_size(batch)
  flat = hessian.flat_view(params)

  def mean_loss(p):
    losses, _ = perturbed_lib.split_loss_output(
        loss_fn(p, batch), False, size, "renyi_sharpness_penalty"
    )
    return jnp.mean(losses.astype(jnp.float32))

  def matvec(v):
    return flat.ravel(hessian.hvp(mean_loss, params, flat.unravel(v)))

  quad, sq, _ = hessian.hutchinson(matvec, flat.dim, key, num_probes)
  return jnp.log(jnp.mean(sq) / jnp.mean(quad) ** 2)


class RenyiRegularizerState(NamedTuple):
  """State of :func:`renyi_regularizer`.

  Attributes:
    count: steps taken (int32).
    value: the penalty :math:`\\hat R_2` last computed (float32; NaN before
      the first step).
    penalty_grads: its gradient, reused until the next refresh.
    key: raw PRNG key data of the probes.
  """

  count: jax.Array
  value: jax.Array
  penalty_grads: Any
  key: jax.Array


def renyi_regularizer(
    strength: base.ScalarOrSchedule = 0.1,
    *,
    every: int = 10,
    num_probes: int = 2,
    seed: int = 0,
) -> optax.GradientTransformationExtraArgs:
  r"""Adds :math:`\gamma \nabla \hat R_2(w)` to the gradient, refreshed every k steps.

  The optimizer-side form of ``loss + gamma * renyi_sharpness_penalty(...)``
  (this library's construction from the RSAM paper's definition of Rényi
  sharpness; see :func:`renyi_sharpness_penalty`):

  .. math::
    u_t = g_t + \gamma_t\, \nabla_w \hat R_2(w_s), \qquad
    s = k \lfloor t / k \rfloor,

  i.e. on steps ``t % every == 0`` the penalty and its gradient are computed
  on the step's batch with probes from ``fold_in(key(seed), t)``, and on the
  other steps the stored gradient is reused (a ``lax.cond``: skipped steps
  cost nothing). Put it first in a chain, like the SAM family, and pass
  ``loss_fn`` and ``batch``:

  .. code-block:: python

    tx = optax.chain(sj.renyi_regularizer(0.1, every=10), optax.sgd(0.05))
    updates, state = tx.update(grads, state, params, loss_fn=loss_fn,
                               batch=batch)

  It composes with a SAM-family member placed after it (the SAM step then
  perturbs along the regularized gradient). Cost on a refresh step: about
  ``4-6 x num_probes`` passes; amortised ``/ every``.

  Args:
    strength: :math:`\gamma \ge 0`, a number or schedule.
    every: ``k >= 1``, the refresh period.
    num_probes: Hutchinson probes per refresh (>= 1).
    seed: seed of the probes.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with state
    :class:`RenyiRegularizerState` (its ``value`` is the last penalty).

  Example:
    >>> import jax, jax.numpy as jnp, optax, sharpjax as sj
    >>> tx = optax.chain(sj.renyi_regularizer(0.1, every=5), optax.sgd(0.1))

  References:
    Zhang et al., Rényi Sharpness: A Novel Sharpness that Strongly Correlates
    with Generalization, 2025. https://arxiv.org/abs/2510.07758
  """
  base.check_range("strength", strength, low=0.0)
  every = base.check_int("every", every, low=1)
  num_probes = base.check_int("num_probes", num_probes, low=1)

  def init_fn(params):
    return RenyiRegularizerState(
        count=jnp.zeros([], jnp.int32),
        value=jnp.full([], jnp.nan, jnp.float32),
        penalty_grads=jax.tree.map(jnp.zeros_like, params),
        key=base.init_key_data(seed),
    )

  def update_fn(updates, state, params=None, *, loss_fn=None, batch=None,
                **extra_args):
    del extra_args
    perturbed_lib.require_extra_args("renyi_regularizer", params, loss_fn,
                                     batch)
    key = jax.random.fold_in(jax.random.wrap_key_data(state.key), state.count)

    def refresh(_):
      value, grads = jax.value_and_grad(
          lambda p: renyi_sharpness_penalty(
              loss_fn, p, batch, key, num_probes=num_probes
          )
      )(params)
      return value, base.tree_cast_like(grads, state.penalty_grads)

    def reuse(_):
      return state.value, state.penalty_grads

    value, penalty_grads = jax.lax.cond(
        state.count % every == 0, refresh, reuse, None
    )
    gamma = base.resolve(strength, state.count)
    new_updates = jax.tree.map(
        lambda u, r: (u.astype(jnp.float32) + gamma * r.astype(jnp.float32))
        .astype(u.dtype),
        updates, penalty_grads,
    )
    return new_updates, RenyiRegularizerState(
        count=optax.safe_increment(state.count),
        value=jnp.asarray(value, jnp.float32),
        penalty_grads=penalty_grads,
        key=state.key,
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
