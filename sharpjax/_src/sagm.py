r"""SAGM: sharpness-aware gradient matching.

SAGM minimises the clean loss, the perturbed loss and the gap between them
together. Its ascent step is SAM's shortened by a small step along the
gradient, and the direction it hands on is the mean of the clean and the
perturbed gradient. On :func:`sharpjax.sharpness_aware` its step is an ascent
step and a direction combined from both gradients, like GSAM's. It is the
flatness objective of the domain-generalisation baseline (LSQ + SAGM) that
GAQAT builds on; see :mod:`sharpjax.quant`.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import optax

from sharpjax._src import base
from sharpjax._src import sharpness_aware as wrapper


def sagm_perturbation(grads, rho: jax.Array, alpha: jax.Array):
  r"""SAGM's ascent step :math:`\epsilon = (\rho/\|g\|_2 - \alpha)\, g`.

  Returns the float32 perturbation and :math:`\|g\|_2` (global, float32). A
  zero gradient gives a zero perturbation.
  """
  grad_norm = base.tree_norm_f32(grads)
  coef = rho * base.safe_inverse(grad_norm) - alpha
  eps = jax.tree.map(lambda g: coef * g.astype(jnp.float32), grads)
  return eps, grad_norm


def sagm(
    rho: base.ScalarOrSchedule = 0.05,
    alpha: base.ScalarOrSchedule = 0.001,
    *,
    axis_name: Optional[str] = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Sharpness-Aware Gradient Matching.

  .. math::
    \epsilon = \Big(\frac{\rho}{\|g\|_2} - \alpha\Big) g, \qquad
    g_p = \nabla L_B(w)\big|_{w + \epsilon}, \qquad
    d = \tfrac12 (g + g_p),

  with :math:`g` the clean gradient and global float32 norms over the whole
  pytree. The objective is :math:`L(w) + L_p(w - \alpha\nabla L(w))` with
  :math:`L_p` the SAM loss; :math:`d` is the official code's
  ``gradient_decompose`` (:math:`g_p + \frac12 g - \frac12 g_p`). With
  :math:`\alpha = 0` the direction is :math:`\frac12(g + g_{SAM})`; with
  :math:`\rho = \alpha = 0` it is :math:`g`. A zero gradient gives a zero
  perturbation (the official code adds 1e-12 to the norm instead).

  Cost: two forward-backward passes per step, as SAM.

  Args:
    rho: radius (>= 0), a number or an optax schedule. The official DomainBed
      default is 0.05.
    alpha: the step back along the clean gradient (>= 0), a number or an
      optax schedule. Official default 0.001 (random search over
      {0.01, 0.02, 0.05, 0.1}).
    axis_name: see :func:`sharpjax.sharpness_aware`; only for ``pmap``.

  Returns:
    The transformation to put first in a chain (called as
    :func:`sharpjax.sam`; state :class:`sharpjax.SharpnessAwareState`).

  Example:
    One step on a quadratic with Adam behind it, as in the paper's
    DomainBed runs. The perturbation's norm is
    :math:`|\rho - \alpha\|g\||`, here :math:`0.05 - 0.001 \cdot 1.118`:

    >>> import jax, jax.numpy as jnp, optax, sharpjax as sj
    >>> params = {"w": jnp.array([1.0, -2.0])}
    >>> batch = {"x": jnp.eye(2)}
    >>> loss_fn = lambda p, b: 0.5 * (b["x"] @ p["w"]) ** 2
    >>> tx = optax.chain(sj.sagm(rho=0.05, alpha=0.001), optax.adam(5e-5))
    >>> state = tx.init(params)
    >>> grads = jax.grad(lambda p: loss_fn(p, batch).mean())(params)
    >>> updates, state = tx.update(grads, state, params, loss_fn=loss_fn,
    ...                            batch=batch)
    >>> round(float(sj.diagnostics(state)["perturbation_norm"]), 5)
    0.04888

  References:
    Wang et al., Sharpness-Aware Gradient Matching for Domain Generalization,
    CVPR 2023. https://arxiv.org/abs/2303.10353
  """
  base.check_range("rho", rho, low=0.0)
  base.check_range("alpha", alpha, low=0.0)

  def step(inputs):
    clean, count = inputs.grads, inputs.count
    eps, grad_norm = sagm_perturbation(
        clean, base.resolve_radius(rho, count), base.resolve(alpha, count)
    )
    out = inputs.ascend(eps, grad_norm=grad_norm)
    direction = jax.tree.map(
        lambda g, p: 0.5 * (g.astype(jnp.float32) + p.astype(jnp.float32)),
        clean, out.direction,
    )
    return out._replace(direction=direction)

  return wrapper.sharpness_aware(step, name="sagm", axis_name=axis_name)
