r"""GSAM: surrogate-gap guided sharpness-aware minimization.

SAM descends on the perturbed loss :math:`f_p(w) = \max_{\|\epsilon\| \le
\rho} f(w + \epsilon)`. GSAM also shrinks the surrogate gap :math:`h = f_p -
f`, by ascending on the clean loss :math:`f` only in the direction orthogonal
to :math:`\nabla f_p`, which leaves :math:`f_p` unchanged to first order. On
the shared mechanism it is SAM's ascent step plus a descent hook that sees both
gradients.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import optax

from sharpjax._src import ascent
from sharpjax._src import base
from sharpjax._src import sam as sam_lib


def gsam(
    rho: base.ScalarOrSchedule = 0.05,
    alpha: base.ScalarOrSchedule = 0.1,
    *,
    minimize_fp: bool = True,
    axis_name: Optional[str] = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Surrogate-gap guided SAM.

  .. math::
    \epsilon = \rho_t \frac{g}{\|g\|_2}, \qquad
    g_p = \nabla L_B(w)\big|_{w + \epsilon}, \qquad
    g_\perp = g - \langle g, \hat g_p\rangle \hat g_p, \qquad
    d = g_p - \alpha_t\, g_\perp,

  with :math:`g` the clean gradient and :math:`\hat g_p = g_p / \|g_p\|_2`
  (global norms over the pytree, in float32). With ``minimize_fp=False`` the
  roles swap (the official code's "more stable" branch):
  :math:`d = g + \alpha_t (g_p - \langle g_p, \hat g\rangle \hat g)`. With
  :math:`\alpha = 0` GSAM is SAM.

  The paper ties :math:`\rho_t` to the learning-rate schedule (it decays from
  :math:`\rho_{max}` to :math:`\rho_{min}` with the learning rate); pass
  ``rho=gsam_rho_schedule(...)`` for that.

  Cost: two forward-backward passes per step, as SAM, plus two inner products.

  Args:
    rho: radius (>= 0), a number or an optax schedule.
    alpha: weight of the ascent on the surrogate gap (>= 0), a number or an
      optax schedule. The paper's Table 4 uses 0.01 to 1.0 depending on the
      model (0.01 for ResNets, 0.4 for ViT-B/16).
    minimize_fp: True (the paper's rule) decomposes the clean gradient against
      the perturbed one; False decomposes the perturbed gradient against the
      clean one.
    axis_name: see :func:`sharpjax.sharpness_aware`; only for ``pmap``.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` to put first in a chain,
    called as :func:`sharpjax.sam`. Its state is a
    :class:`sharpjax.SharpnessAwareState`.

  Example:
    >>> import optax, sharpjax as sj
    >>> lr = optax.linear_schedule(0.1, 0.001, 1000)
    >>> rho = sj.gsam_rho_schedule(lr, rho_max=0.05, rho_min=0.01,
    ...                            lr_max=0.1, lr_min=0.001)
    >>> tx = optax.chain(sj.gsam(rho=rho, alpha=0.1), optax.sgd(lr))

  References:
    Zhuang et al., Surrogate Gap Minimization Improves Sharpness-Aware
    Training, ICLR 2022. https://arxiv.org/abs/2203.08065
  """
  base.check_range("rho", rho, low=0.0)
  base.check_range("alpha", alpha, low=0.0)

  def perturbation_fn(grads, params, count):
    del params
    return ascent.sam_perturbation(grads, base.resolve(rho, count))

  def descent_fn(clean, perturbed, count, memory):
    a = base.resolve(alpha, count)
    if minimize_fp:
      start, residual = perturbed, base.tree_orthogonal(clean, perturbed)
      a = -a
    else:
      start, residual = clean, base.tree_orthogonal(perturbed, clean)
    direction = jax.tree.map(
        lambda s, r: s.astype(jnp.float32) + a * r, start, residual
    )
    return direction, memory

  return sam_lib.sharpness_aware(
      perturbation_fn, name="gsam", axis_name=axis_name, descent_fn=descent_fn
  )


def gsam_rho_schedule(
    learning_rate: optax.Schedule,
    *,
    rho_max: float,
    rho_min: float,
    lr_max: float,
    lr_min: float,
) -> optax.Schedule:
  r"""GSAM's radius, tied linearly to the learning-rate schedule.

  .. math::
    \rho_t = \rho_{min} + (\rho_{max} - \rho_{min})
      \frac{\eta_t - \eta_{min}}{\eta_{max} - \eta_{min}},

  as in the official code (big_vision ``gsam_gradient``). The schedule is
  evaluated at GSAM's own step count, which moves with the base optimizer's
  (both count ``update`` calls).

  Args:
    learning_rate: the base optimizer's learning-rate schedule.
    rho_max: radius at ``lr_max`` (>= 0).
    rho_min: radius at ``lr_min`` (>= 0).
    lr_max: the largest learning rate of the schedule.
    lr_min: the smallest (must differ from ``lr_max``).

  Returns:
    An optax schedule for ``gsam(rho=...)``.
  """
  base.check_range("rho_max", rho_max, low=0.0)
  base.check_range("rho_min", rho_min, low=0.0)
  if float(lr_max) == float(lr_min):
    raise ValueError(
        f"lr_max and lr_min must differ, got {lr_max!r} and {lr_min!r}."
    )
  if not callable(learning_rate):
    raise TypeError("learning_rate must be an optax schedule (a callable).")

  def schedule(count):
    lr = jnp.asarray(learning_rate(count), jnp.float32)
    frac = (lr - lr_min) / (lr_max - lr_min)
    return rho_min + (rho_max - rho_min) * frac

  return schedule
