r"""GSAM: surrogate-gap guided sharpness-aware minimization.

SAM descends on the perturbed loss :math:`f_p(w) = \max_{\|\epsilon\| \le
\rho} f(w + \epsilon)`. GSAM also shrinks the surrogate gap :math:`h = f_p -
f`, by ascending on the clean loss :math:`f` only in the direction orthogonal
to :math:`\nabla f_p`, which leaves :math:`f_p` unchanged to first order. On
:func:`sharpjax.sharpness_aware` its step is SAM's, with the direction
combined from both gradients.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sharpjax._src import ascent
from sharpjax._src import base
from sharpjax._src import sharpness_aware as wrapper


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
    ...                            num_steps=1000)
    >>> tx = optax.chain(sj.gsam(rho=rho, alpha=0.1), optax.sgd(lr))

  References:
    Zhuang et al., Surrogate Gap Minimization Improves Sharpness-Aware
    Training, ICLR 2022. https://arxiv.org/abs/2203.08065
  """
  base.check_range("rho", rho, low=0.0)
  base.check_range("alpha", alpha, low=0.0)

  def step(inputs):
    clean, count = inputs.grads, inputs.count
    eps, grad_norm = ascent.sam_perturbation(
        clean, base.resolve_radius(rho, count)
    )
    out = inputs.ascend(eps, grad_norm=grad_norm)
    # The combination sees the whole batch's perturbed gradient.
    perturbed = inputs.mean_over_devices(out.direction)
    a = base.resolve(alpha, count)
    if minimize_fp:
      start, residual = perturbed, base.tree_orthogonal(clean, perturbed)
      a = -a
    else:
      start, residual = clean, base.tree_orthogonal(perturbed, clean)
    direction = jax.tree.map(
        lambda s, r: s.astype(jnp.float32) + a * r, start, residual
    )
    return out._replace(direction=direction)

  return wrapper.sharpness_aware(step, name="gsam", axis_name=axis_name)


def gsam_rho_schedule(
    learning_rate: optax.Schedule,
    *,
    rho_max: float,
    rho_min: float,
    lr_max: Optional[float] = None,
    lr_min: Optional[float] = None,
    num_steps: Optional[int] = None,
) -> optax.Schedule:
  r"""GSAM's radius, tied linearly to the learning-rate schedule.

  .. math::
    \rho_t = \mathrm{clip}\Big(\rho_{min} + (\rho_{max} - \rho_{min})
      \frac{\eta_t - \eta_{min}}{\eta_{max} - \eta_{min}},\;
      \rho_{min}, \rho_{max}\Big),

  as in the official code (big_vision ``gsam_gradient``), clipped to
  :math:`[\rho_{min}, \rho_{max}]` so that a learning rate outside
  :math:`[\eta_{min}, \eta_{max}]` (a warm-up that starts below
  :math:`\eta_{min}`) never gives a radius outside that range, nor a
  negative one. The schedule is evaluated at GSAM's own step count, which
  moves with the base optimizer's (both count ``update`` calls).

  :math:`\eta_{max}` and :math:`\eta_{min}` are the largest and the smallest
  learning rate of the run. Pass them, or pass ``num_steps`` and leave them
  out: the schedule is then evaluated once, here, at every step
  ``0 .. num_steps`` and its maximum and minimum are used.

  Args:
    learning_rate: the base optimizer's learning-rate schedule.
    rho_max: radius at ``lr_max`` (>= 0).
    rho_min: radius at ``lr_min`` (>= 0).
    lr_max: the largest learning rate of the schedule; default: derived.
    lr_min: the smallest (must differ from ``lr_max``); default: derived.
    num_steps: the length of the run, to derive ``lr_max`` / ``lr_min`` when
      they are not given.

  Returns:
    An optax schedule for ``gsam(rho=...)``.

  Example:
    >>> import optax, sharpjax as sj
    >>> lr = optax.warmup_cosine_decay_schedule(
    ...     0.0, 0.1, warmup_steps=100, decay_steps=1000, end_value=0.001)
    >>> rho = sj.gsam_rho_schedule(lr, rho_max=0.05, rho_min=0.01,
    ...                            num_steps=1000)
    >>> [round(float(rho(t)), 4) for t in (0, 100, 1000)]
    [0.01, 0.05, 0.01]
  """
  base.check_range("rho_max", rho_max, low=0.0)
  base.check_range("rho_min", rho_min, low=0.0)
  if not callable(learning_rate):
    raise TypeError("learning_rate must be an optax schedule (a callable).")
  if lr_max is None or lr_min is None:
    if num_steps is None:
      raise ValueError(
          "gsam_rho_schedule: pass lr_max and lr_min, or num_steps (the "
          "length of the run) to take them from the schedule."
      )
    num_steps = base.check_int("num_steps", num_steps, low=1)
    rates = np.asarray(
        jax.vmap(learning_rate)(jnp.arange(num_steps + 1)), np.float64
    )
    lr_max = float(rates.max()) if lr_max is None else lr_max
    lr_min = float(rates.min()) if lr_min is None else lr_min
  base.check_range("lr_max", lr_max)
  base.check_range("lr_min", lr_min)
  if float(lr_max) == float(lr_min):
    raise ValueError(
        f"lr_max and lr_min must differ, got {lr_max!r} and {lr_min!r}."
    )
  low, high = sorted((float(rho_min), float(rho_max)))

  def schedule(count):
    lr = jnp.asarray(learning_rate(count), jnp.float32)
    frac = (lr - lr_min) / (lr_max - lr_min)
    return jnp.clip(rho_min + (rho_max - rho_min) * frac, low, high)

  return schedule
