r"""SAM and ASAM, and the factory every perturb-then-descend method shares.

A SAM-family transformation goes first in an ``optax.chain``. It receives the
clean gradient :math:`g = \nabla L_B(w)` and the extra arguments ``loss_fn`` and
``batch``, and returns the gradient at the perturbed point,

.. math::
  \tilde g = \nabla_w \tfrac{1}{|B|}\textstyle\sum_{i\in B} \ell_i(w)
  \big|_{w + \epsilon(g, w)},

which the base optimizer behind it in the chain turns into an update.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from sharpjax._src import ascent
from sharpjax._src import base
from sharpjax._src import perturbed as perturbed_lib

# (clean_grads, params, count) -> (float32 perturbation, clean gradient norm)
PerturbationFn = Callable[[Any, Any, jax.Array], tuple[Any, jax.Array]]


class SharpnessAwareState(NamedTuple):
  """State of :func:`sam` and :func:`asam`.

  Attributes:
    count: number of updates taken (int32), the step at which schedules for
      ``rho`` are evaluated.
    diagnostics: what the last step saw; read it with
      :func:`sharpjax.diagnostics`.
  """

  count: jax.Array
  diagnostics: perturbed_lib.Diagnostics


def sharpness_aware(
    perturbation_fn: PerturbationFn,
    *,
    name: str,
    axis_name: Optional[str] = None,
) -> optax.GradientTransformationExtraArgs:
  """Builds a perturb-then-descend transformation from its ascent step.

  This is the shared mechanism of the SAM family: compute a perturbation from
  the clean gradient, evaluate the gradient of the mean per-example loss at the
  perturbed point, record the diagnostics, and hand the perturbed gradient to
  the next transformation in the chain.

  Args:
    perturbation_fn: ``(clean_grads, params, count) -> (eps, grad_norm)``
      giving a float32 perturbation and the clean gradient's global norm.
    name: the public name, used in error messages.
    axis_name: when the update runs inside ``jax.pmap`` (or ``shard_map``),
      the perturbed gradient, loss and diagnostics are averaged over this axis.
      The perturbation itself comes from the gradient passed in: pass
      per-device gradients for per-device perturbations (SAM's m-sharpness
      with m = per-device batch), or ``pmean`` them first for a global one.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.
  """

  def init_fn(params):
    del params
    return SharpnessAwareState(
        count=jnp.zeros([], jnp.int32),
        diagnostics=perturbed_lib.init_diagnostics(),
    )

  def update_fn(
      updates,
      state,
      params=None,
      *,
      loss_fn=None,
      batch=None,
      has_aux: bool = False,
      value=None,
      **extra_args,
  ):
    del extra_args
    perturbed_lib.require_extra_args(name, params, loss_fn, batch)
    eps, grad_norm = perturbation_fn(updates, params, state.count)
    result = perturbed_lib.perturbed_pass(
        loss_fn, params, eps, batch, has_aux=has_aux, name=name
    )
    diagnostics = perturbed_lib.diagnostics_of(
        updates,
        eps,
        result.grads,
        result.loss,
        grad_norm=grad_norm,
        clean_loss=value,
    )
    grads = result.grads
    if axis_name is not None:
      grads, diagnostics = jax.lax.pmean((grads, diagnostics), axis_name)
    new_state = SharpnessAwareState(
        count=optax.safe_increment(state.count), diagnostics=diagnostics
    )
    return base.tree_cast_like(grads, updates), new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def sam(
    rho: base.ScalarOrSchedule = 0.05,
    *,
    axis_name: Optional[str] = None,
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
      0.05 is the paper's default; the paper searched {0.01, ..., 0.5}.
    axis_name: see :func:`sharpness_aware`; only for ``pmap``/``shard_map``.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` to put first in a chain. Its
    ``update(grads, state, params, *, loss_fn, batch, has_aux=False,
    value=None)`` takes ``loss_fn(params, batch)`` returning per-example
    losses of shape [B] (or ``(losses, aux)`` with ``has_aux=True``; the aux of
    the perturbed pass is discarded) and, optionally, ``value``, the clean
    mean loss, recorded in the diagnostics.

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

  def perturbation_fn(grads, params, count):
    del params
    return ascent.sam_perturbation(grads, base.resolve(rho, count))

  return sharpness_aware(perturbation_fn, name="sam", axis_name=axis_name)


def asam(
    rho: base.ScalarOrSchedule = 0.5,
    eta: float = 0.01,
    *,
    adaptive_mask: Optional[ascent.AdaptiveMask] = None,
    axis_name: Optional[str] = None,
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
    axis_name: see :func:`sharpness_aware`.

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

  def perturbation_fn(grads, params, count):
    mask = ascent.resolve_adaptive_mask(
        ascent.default_adaptive_mask if adaptive_mask is None else adaptive_mask,
        params,
    )
    return ascent.asam_perturbation(
        grads, params, base.resolve(rho, count), jnp.asarray(eta, jnp.float32),
        mask,
    )

  return sharpness_aware(perturbation_fn, name="asam", axis_name=axis_name)
