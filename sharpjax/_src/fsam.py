r"""F-SAM: friendly SAM, which perturbs along the batch-specific noise.

A minibatch gradient is the full gradient plus batch-specific noise. F-SAM
estimates the full-gradient part with an EMA of past clean gradients and
removes it before normalising, keeping the part of the perturbation that helps
generalisation. On :func:`sharpjax.sharpness_aware` its step is SAM's on
:math:`g - \sigma m`, with the EMA :math:`m` kept as memory in the state.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from sharpjax._src import ascent
from sharpjax._src import base
from sharpjax._src import perturbed as perturbed_lib
from sharpjax._src import sharpness_aware as wrapper


class FSAMState(NamedTuple):
  """State of :func:`fsam`.

  Attributes:
    count: number of updates taken (int32).
    ema: float32 EMA of the clean gradients, shaped like the parameters.
    diagnostics: what the last step saw.
  """

  count: jax.Array
  ema: Any
  diagnostics: perturbed_lib.Diagnostics


def fsam(
    rho: base.ScalarOrSchedule = 0.05,
    sigma: base.ScalarOrSchedule = 1.0,
    lam: base.ScalarOrSchedule = 0.95,
    *,
    ema_first: bool = False,
    axis_name: Optional[str] = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Friendly SAM.

  On the first step :math:`m_0 = g_0` and :math:`d_0 = g_0` (no subtraction);
  after that, in the official code's order,

  .. math::
    d_t = g_t - \sigma m_{t-1}, \qquad
    m_t = \lambda m_{t-1} + (1 - \lambda) g_t, \qquad
    \epsilon = \rho \frac{d_t}{\|d_t\|_2}, \qquad
    \tilde g = \nabla L_B(w)\big|_{w + \epsilon}.

  With ``ema_first=True`` the EMA is updated first and
  :math:`d_t = g_t - \sigma m_t` (the order of some write-ups). Norms are
  global and in float32; a zero :math:`d_t` gives a zero perturbation. With
  :math:`\sigma = 0` F-SAM is SAM.

  Cost: two forward-backward passes per step, as SAM, and one float32 buffer
  the size of the parameters.

  Args:
    rho: radius (>= 0), a number or an optax schedule. The official CIFAR-100
      ResNet-18 script uses 0.2.
    sigma: weight of the EMA subtracted from the gradient (>= 0); 1 in every
      experiment of the paper.
    lam: EMA decay, in [0, 1]; 0.95 is the official default (0.6 in some of
      the official logs).
    ema_first: update the EMA before subtracting it (see above).
    axis_name: see :func:`sharpjax.sharpness_aware`; only for ``pmap``.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` to put first in a chain,
    called as :func:`sharpjax.sam`; its state is a :class:`FSAMState`.

  Example:
    >>> import optax, sharpjax as sj
    >>> tx = optax.chain(sj.fsam(rho=0.2, sigma=1.0, lam=0.95),
    ...                  optax.sgd(0.05, momentum=0.9))

  References:
    Li et al., Friendly Sharpness-Aware Minimization, CVPR 2024.
    https://arxiv.org/abs/2403.12350
  """
  base.check_range("rho", rho, low=0.0)
  base.check_range("sigma", sigma, low=0.0)
  base.check_range("lam", lam, low=0.0, high=1.0)

  def next_ema(grads, ema, count):
    decay = base.resolve(lam, count)
    first = count == 0
    return jax.tree.map(
        lambda g, m: jnp.where(
            first, g.astype(jnp.float32),
            decay * m + (1.0 - decay) * g.astype(jnp.float32)),
        grads, ema)

  def step(inputs):
    grads, count = inputs.grads, inputs.count
    ema = new_ema = next_ema(grads, inputs.memory["ema"], count)
    if not ema_first:
      ema = inputs.memory["ema"]
    s = jnp.where(count == 0, 0.0, base.resolve(sigma, count))
    direction = jax.tree.map(
        lambda g, m: g.astype(jnp.float32) - s * m, grads, ema
    )
    eps, _ = ascent.sam_perturbation(
        direction, base.resolve_radius(rho, count)
    )
    out = inputs.ascend(eps)
    # Per-device clean gradients give per-device EMAs: keep one.
    return out._replace(memory={"ema": inputs.mean_over_devices(new_ema)})

  def init_memory(params):
    return {"ema": jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), jnp.float32),
                                params)}

  return wrapper.sharpness_aware(
      step,
      name="fsam",
      axis_name=axis_name,
      init_memory=init_memory,
      state_type=FSAMState,
  )
