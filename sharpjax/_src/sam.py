r"""SAM and ASAM: an ascent step and the shared perturbed pass.

Both are :func:`sharpjax.sharpness_aware` around a step that computes the
perturbation (:func:`sharpjax.sam_perturbation`,
:func:`sharpjax.asam_perturbation`) and takes the perturbed pass on the whole
batch.
"""

from __future__ import annotations

from typing import Any, Optional

import jax.numpy as jnp
import optax

from sharpjax._src import ascent
from sharpjax._src import base
from sharpjax._src import sharpness_aware as wrapper


def sam(
    rho: base.ScalarOrSchedule = 0.05,
    *,
    axis_name: Optional[str] = None,
    mask: Any = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Sharpness-Aware Minimization.

  .. math::
    \epsilon = \rho \frac{g}{\|g\|_2}, \qquad
    \tilde g = \nabla_w L_B(w)\big|_{w + \epsilon},

  with :math:`\|g\|_2` the global norm of the whole gradient pytree, computed in
  float32. A zero gradient gives :math:`\epsilon = 0` (never NaN). One
  ``update`` call is one full SAM step: it runs the second forward-backward
  pass itself through the ``loss_fn`` and ``batch`` extra arguments.

  Cost: two forward-backward passes per step (about 2x SGD).

  Args:
    rho: radius of the neighbourhood (>= 0), a number or an optax schedule.
      0.05 is the paper's default; the paper searched {0.01, ..., 0.5}. A
      schedule (or an injected value) below 0 is clipped to 0 in the step.
    axis_name: see :func:`sharpjax.sharpness_aware`; only for ``pmap`` /
      ``shard_map``.
    mask: perturb only the selected parameters (a pytree of bools shaped
      like them, or a function of them returning one): :math:`\epsilon =
      \rho\, g_S / \|g_S\|_2` on the selected leaves :math:`S`, zero
      elsewhere, and every leaf descends along the gradient at
      :math:`w + \epsilon` (the loss always sees all parameters; SAM-ON,
      Mueller et al., NeurIPS 2023, selects the normalization layers). The
      form that works for "SAM on some parameters": ``optax.masked`` or
      ``optax.multi_transform`` around SAM are refused. None: all. (With
      ``optax.inject_hyperparams``, name a callable mask in ``static_args``:
      callables are taken for schedules.)

  Returns:
    An ``optax.GradientTransformationExtraArgs`` to put first in a chain. Its
    ``update(grads, state, params, *, loss_fn, batch, has_aux=False,
    value=None, data_axis_name=None)`` takes ``loss_fn(params, batch)``
    returning per-example losses of shape [B] (or ``(losses, aux)`` with
    ``has_aux=True``; the aux of the perturbed pass is discarded) and,
    optionally, ``value``, the clean mean loss, recorded in the diagnostics,
    and ``data_axis_name``, checked against ``axis_name`` (see
    :func:`sharpjax.sharpness_aware`).

  Example:
    >>> import jax, jax.numpy as jnp, optax, sharpjax as sj
    >>> params = {"w": jnp.array([1.0, -2.0])}
    >>> batch = {"x": jnp.ones((4, 2)), "y": jnp.zeros(4)}
    >>> def loss_fn(p, b):
    ...   return (b["x"] @ p["w"] - b["y"]) ** 2
    >>> tx = optax.chain(sj.sam(rho=0.05), optax.sgd(0.1))
    >>> state = tx.init(params)
    >>> grads = jax.grad(lambda p: loss_fn(p, batch).mean())(params)
    >>> updates, state = tx.update(grads, state, params,
    ...                            loss_fn=loss_fn, batch=batch)
    >>> params = optax.apply_updates(params, updates)

  References:
    Foret et al., Sharpness-Aware Minimization for Efficiently Improving
    Generalization, ICLR 2021. https://arxiv.org/abs/2010.01412
  """
  base.check_range("rho", rho, low=0.0)

  def step(inputs):
    eps, grad_norm = ascent.sam_perturbation(
        inputs.grads, base.resolve_radius(rho, inputs.count)
    )
    return inputs.ascend(eps, grad_norm=grad_norm)

  return wrapper.sharpness_aware(step, name="sam", axis_name=axis_name,
                                 mask=mask)


def asam(
    rho: base.ScalarOrSchedule = 0.5,
    eta: float = 0.01,
    *,
    adaptive_mask: Optional[ascent.AdaptiveMask] = None,
    axis_name: Optional[str] = None,
    mask: Any = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Adaptive SAM: a scale-invariant neighbourhood.

  .. math::
    T_w = \mathrm{diag}(|w|) + \eta I, \qquad
    \epsilon = \rho \frac{T_w^2 g}{\|T_w g\|_2}, \qquad
    \tilde g = \nabla_w L_B(w)\big|_{w + \epsilon}.

  As in the official code, :math:`T_w` applies to weight kernels and
  normalisation scales; biases (and BatchNorm's shift) use :math:`T = 1`. The
  norm is global and in float32; a zero gradient gives a zero perturbation.

  Cost: two forward-backward passes per step, as SAM.

  Args:
    rho: radius (>= 0), a number or an optax schedule. The paper uses 0.5 on
      CIFAR-10 and 1.0 on CIFAR-100 (ten times SAM's, since the neighbourhood
      is relative to the weights).
    eta: the additive term of :math:`T_w` (>= 0); 0.01 is the official class
      default (the official CIFAR script passes 0.0).
    adaptive_mask: which leaves get :math:`T = |w| + \eta`: a pytree of bools
      shaped like the parameters, or ``(path, leaf) -> bool``. The default
      (None) is :func:`default_adaptive_mask`: every leaf except those named
      ``bias``/``beta``/``b``. (With ``optax.inject_hyperparams``, name a
      callable mask in ``static_args``: callables are taken for schedules.)
    axis_name: see :func:`sharpjax.sharpness_aware`.
    mask: perturb only the selected parameters, as in :func:`sam`.

  Returns:
    An ``optax.GradientTransformationExtraArgs``, called as :func:`sam`.

  Example:
    >>> import optax, sharpjax as sj
    >>> tx = optax.chain(sj.asam(rho=0.5, eta=0.01), optax.sgd(0.1, momentum=0.9))

  References:
    Kwon et al., ASAM: Adaptive Sharpness-Aware Minimization for
    Scale-Invariant Learning of Deep Neural Networks, ICML 2021.
    https://arxiv.org/abs/2102.11600
  """
  base.check_range("rho", rho, low=0.0)
  base.check_range("eta", eta, low=0.0)

  def step(inputs):
    mask = ascent.resolve_adaptive_mask(
        ascent.default_adaptive_mask if adaptive_mask is None else adaptive_mask,
        inputs.params,
    )
    eps, grad_norm = ascent.asam_perturbation(
        inputs.grads, inputs.params, base.resolve_radius(rho, inputs.count),
        jnp.asarray(eta, jnp.float32), mask,
    )
    return inputs.ascend(eps, grad_norm=grad_norm)

  return wrapper.sharpness_aware(step, name="asam", axis_name=axis_name,
                                 mask=mask)
