r"""ESAM: Efficient SAM, with stochastic weights and a selected sub-batch.

ESAM cuts SAM's second pass in two ways, each of which can be switched off:

* **Stochastic weight perturbation (SWP).** Each parameter tensor is perturbed
  with probability :math:`\beta`, and the perturbation is scaled by
  :math:`1/\beta`.
* **Sharpness-sensitive data selection (SDS).** A forward pass at the perturbed
  point gives every example's loss rise
  :math:`s_i = \ell_i(w + \epsilon) - \ell_i(w)`; the descent gradient is
  computed on the :math:`\lceil \gamma B \rceil` examples with the largest
  rise only.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from sharpjax._src import ascent
from sharpjax._src import base
from sharpjax._src import perturbed as perturbed_lib


class ESAMState(NamedTuple):
  """State of :func:`esam`.

  Attributes:
    count: number of updates taken (int32).
    key: raw ``uint32`` data of the PRNG key that draws the SWP masks; it
      advances every step.
    diagnostics: what the last step saw; read it with
      :func:`sharpjax.diagnostics`.
  """

  count: jax.Array
  key: jax.Array
  diagnostics: perturbed_lib.Diagnostics


def swp_mask(key: jax.Array, tree, beta) -> list:
  """One Bernoulli(beta) draw per leaf of ``tree`` (a list of bool scalars)."""
  num_leaves = len(jax.tree.leaves(tree))
  keep = jax.random.uniform(key, (num_leaves,)) < jnp.asarray(beta, jnp.float32)
  return [keep[i] for i in range(num_leaves)]


def swp_perturbation(grads, rho, beta, key):
  r"""SWP's ascent step: :math:`\epsilon = \frac{\rho}{\beta}\, m \odot g / \|m \odot g\|_2`.

  ``m`` keeps or drops whole tensors, each with probability ``beta``; the norm
  is that of the kept gradients (the official code zeroes the dropped ones
  before taking it), so :math:`\|\epsilon\|_2 = \rho / \beta` unless every
  tensor is dropped, which gives :math:`\epsilon = 0`.

  Returns the float32 perturbation.
  """
  keep = swp_mask(key, grads, beta)
  treedef = jax.tree.structure(grads)
  masked = jax.tree.unflatten(
      treedef,
      [
          jnp.where(k, g.astype(jnp.float32), 0.0)
          for k, g in zip(keep, jax.tree.leaves(grads))
      ],
  )
  eps, _ = ascent.sam_perturbation(masked, rho / beta)
  return eps


def esam(
    rho: base.ScalarOrSchedule = 0.05,
    beta: float = 0.6,
    gamma: float = 0.5,
    *,
    seed: int = 0,
    axis_name: Optional[str] = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Efficient Sharpness-Aware Minimization (ESAM).

  With the clean gradient :math:`g` of the whole batch :math:`B`:

  .. math::
    m_j \sim \mathrm{Bernoulli}(\beta) \text{ per tensor } j, \qquad
    \epsilon = \frac{\rho}{\beta} \frac{m \odot g}{\|m \odot g\|_2},

  .. math::
    s_i = \ell_i(w + \epsilon) - \ell_i(w), \qquad
    B^+ = \mathrm{top}_{\lceil\gamma |B|\rceil}(s), \qquad
    \tilde g = \nabla_w \tfrac{1}{|B^+|}\textstyle\sum_{i \in B^+}
    \ell_i(w)\big|_{w + \epsilon}.

  ``beta=1`` and ``gamma=1`` switch the two parts off; with both, the step is
  :func:`sharpjax.sam`'s, operation for operation.

  Cost. SDS is a real saving under XLA: the sub-batch has the static size
  :math:`k = \lceil\gamma B\rceil` (``lax.top_k`` then a gather), so the
  descent pass is a statically smaller forward-backward; the price is one
  forward pass at :math:`w+\epsilon` on the whole batch, plus the clean
  per-example losses :math:`\ell_i(w)`, which the transformation evaluates
  with ``loss_fn`` (XLA merges that forward with the caller's clean forward
  when both are in the same jitted step). Per step: the caller's clean
  forward-backward, one forward, and a forward-backward on :math:`\gamma B`
  examples. SWP changes the perturbation only: in the official code it also
  skips the weight-gradient work of the dropped tensors in the clean backward,
  but here the clean gradient is computed by the caller before ``update``, so
  nothing is saved by it (a traced per-step mask would save nothing under XLA
  anyway).

  Differences from the official code (dydjw9/Efficient_SAM), on purpose:
  the SWP mask is drawn fresh each step from the key in the state (the
  official code draws it at the end of the previous step and uses no mask on
  the first step), and SDS keeps exactly :math:`\lceil\gamma B\rceil`
  examples (the official strict comparison keeps :math:`\lfloor\gamma
  B\rfloor - 1`, fewer with ties, and can keep none).

  Args:
    rho: radius (>= 0), a number or an optax schedule. The official CIFAR
      runs use 0.05 (ResNet-18), 0.1 (WRN-28-10), 0.2 (PyramidNet).
    beta: probability that a tensor is perturbed, in (0, 1]; 0.6 in the
      official ResNet-18 runs (0.5 for the larger models). 1 turns SWP off.
    gamma: fraction of the batch kept for the descent pass, in (0, 1]; 0.5
      officially. 1 turns SDS off. It sets a static shape: with
      ``optax.inject_hyperparams`` list it in ``static_args``.
    seed: seed of the key kept in the state for the SWP masks.
    axis_name: inside ``jax.pmap`` / ``shard_map``, the descent gradient and
      the diagnostics are averaged over this axis; the perturbation and the
      selection are per device, as in the official DDP code.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` to put first in a chain,
    called as :func:`sharpjax.sam`: ``update(grads, state, params, *,
    loss_fn, batch, has_aux=False, value=None)`` with ``loss_fn(params,
    batch)`` returning per-example losses of shape [B]. The diagnostics'
    ``perturbed_loss`` is the mean over the whole batch at
    :math:`w + \epsilon` and ``clean_loss`` is ``value``, or, when SDS is on
    and ``value`` is not given, the mean of the clean per-example losses.

  Example:
    >>> import optax, sharpjax as sj
    >>> tx = optax.chain(sj.esam(rho=0.05, beta=0.6, gamma=0.5),
    ...                  optax.sgd(0.05, momentum=0.9))

  References:
    Du et al., Efficient Sharpness-aware Minimization for Improved Training of
    Neural Networks, ICLR 2022. https://arxiv.org/abs/2110.03141
  """
  base.check_range("rho", rho, low=0.0)
  base.check_range("beta", beta, low=0.0, low_inclusive=False, high=1.0)
  base.check_range("gamma", gamma, low=0.0, low_inclusive=False, high=1.0)
  base.check_int_like("seed", seed, low=0)
  # beta may be traced (optax.inject_hyperparams); 1 is a static shortcut.
  swp_off = not base.is_traced(beta) and float(beta) == 1.0

  def init_fn(params):
    del params
    return ESAMState(
        count=jnp.zeros([], jnp.int32),
        key=base.init_key_data(seed),
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
    perturbed_lib.require_extra_args("esam", params, loss_fn, batch)
    keep_fraction = base.static_number("gamma", gamma, "esam")
    size = perturbed_lib.batch_size(batch)
    new_key, key = base.next_key(state.key)
    r = base.resolve(rho, state.count)

    grad_norm = base.tree_norm_f32(updates)
    if swp_off:
      eps, _ = ascent.sam_perturbation(updates, r)
    else:
      eps = swp_perturbation(updates, r, jnp.asarray(beta, jnp.float32), key)

    k = base.fraction_size(keep_fraction, size)
    if k == size:  # SDS off: SAM's pass on the whole batch.
      result = perturbed_lib.perturbed_pass(
          loss_fn, params, eps, batch, has_aux=has_aux, name="esam"
      )
      perturbed_loss, clean_loss = result.loss, value
    else:
      losses_before = perturbed_lib.per_example_losses(
          loss_fn, params, batch, has_aux=has_aux, name="esam"
      )
      losses_after = perturbed_lib.per_example_losses(
          loss_fn, perturbed_lib.add_perturbation(params, eps), batch,
          has_aux=has_aux, name="esam",
      )
      rise = jax.lax.stop_gradient(losses_after - losses_before)
      _, selected = jax.lax.top_k(rise, k)
      sub_batch = perturbed_lib.take_examples(batch, selected)
      result = perturbed_lib.perturbed_pass(
          loss_fn, params, eps, sub_batch, has_aux=has_aux, name="esam"
      )
      perturbed_loss = jnp.mean(losses_after)
      clean_loss = jnp.mean(losses_before) if value is None else value

    diagnostics = perturbed_lib.diagnostics_of(
        updates, eps, result.grads, perturbed_loss,
        grad_norm=grad_norm, clean_loss=clean_loss,
    )
    grads = result.grads
    if axis_name is not None:
      grads, diagnostics = jax.lax.pmean((grads, diagnostics), axis_name)
    new_state = ESAMState(
        count=optax.safe_increment(state.count),
        key=new_key,
        diagnostics=diagnostics,
    )
    return base.tree_cast_like(grads, updates), new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
