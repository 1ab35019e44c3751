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
from sharpjax._src import sharpness_aware as wrapper


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

  Cost model, in units of one forward pass over the batch :math:`B` (a
  backward pass costs about two; SGD is 3, SAM 6):

  * the caller's clean forward-backward on :math:`B`: 3;
  * the clean per-example losses :math:`\ell_i(w)`: 0. A caller that has
    them passes ``clean_losses=`` (shape ``[B]``, ``loss_fn``'s losses at
    :math:`w`; :func:`sharpjax.training.make_trainer` does). Otherwise the
    transformation evaluates ``loss_fn`` at :math:`w` again, and XLA merges
    that forward with the caller's only when both are the same computation
    in one jitted step (the CNN1D step of ``benchmarks/overhead.py``
    compiles to 19 convolutions: 8 for the clean forward-backward, 3 for the
    scoring forward, 8 for the descent pass; a test counts them on a
    one-layer model; a ResNet-18 step with BatchNorm was not merged). A
    caller whose clean forward differs pays 1 more;
  * SDS's scoring forward at :math:`w + \epsilon` on the whole batch: 1. It
    cannot be skipped: every example must be ranked;
  * the descent forward-backward on the :math:`k = \lceil\gamma B\rceil` kept
    examples: :math:`3\gamma`. This is SDS's saving, and it is real under
    XLA: the sub-batch has a static size (``lax.top_k`` then a gather), so
    the pass is a statically smaller computation;
  * SWP: 0 saved. The official code skips the weight-gradient work of the
    dropped tensors in the clean backward, but here the clean gradient is the
    caller's, computed before ``update``, and an XLA program cannot skip the
    backward of weights masked out by a per-step random draw anyway: it
    computes them and multiplies by zero (only a mask fixed at compile time,
    one program per mask, could).

  In all :math:`4 + 3\gamma`: 5.5 at :math:`\gamma = 0.5`, about 1.8x SGD
  (the fixed per-step costs of the optimizer bring measured ratios a little
  lower: 1.76x on an H200 ResNet-18). Getting under 1.6x needs
  :math:`\gamma \le 0.25`. With ``gamma=1`` the step is SAM's (6).

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

  def step(inputs):
    grads, count, batch = inputs.grads, inputs.count, inputs.batch
    keep_fraction = base.static_number("gamma", gamma, "esam")
    size = perturbed_lib.batch_size(batch)
    new_key, key = base.next_key(inputs.memory["key"])
    r = base.resolve_radius(rho, count)

    grad_norm = base.tree_norm_f32(grads)
    if swp_off:
      eps, _ = ascent.sam_perturbation(grads, r)
    else:
      eps = swp_perturbation(grads, r, jnp.asarray(beta, jnp.float32), key)
    memory = {"key": new_key}

    k = base.fraction_size(keep_fraction, size)
    if k == size:  # SDS off: SAM's pass on the whole batch.
      return inputs.ascend(eps, grad_norm=grad_norm)._replace(memory=memory)
    pass_args = dict(has_aux=inputs.has_aux, name="esam")
    losses_before = inputs.extra.get("clean_losses")
    if losses_before is None or jnp.shape(losses_before) != (size,):
      losses_before = perturbed_lib.per_example_losses(
          inputs.loss_fn, inputs.params, batch, **pass_args
      )
    losses_after = perturbed_lib.per_example_losses(
        inputs.loss_fn, perturbed_lib.add_perturbation(inputs.params, eps),
        batch, **pass_args,
    )
    rise = jax.lax.stop_gradient(losses_after - losses_before)
    _, selected = jax.lax.top_k(rise, k)
    sub_batch = perturbed_lib.take_examples(batch, selected)
    result = perturbed_lib.perturbed_pass(
        inputs.loss_fn, inputs.params, eps, sub_batch, **pass_args
    )
    diagnostics = perturbed_lib.diagnostics_of(
        grads, eps, result.grads, jnp.mean(losses_after),
        params=inputs.params, grad_norm=grad_norm,
        clean_loss=jnp.mean(losses_before) if inputs.value is None
        else inputs.value,
    )
    return wrapper.Step(result.grads, diagnostics, memory)

  return wrapper.sharpness_aware(
      step,
      name="esam",
      axis_name=axis_name,
      init_memory=lambda params: {"key": base.init_key_data(seed)},
      state_type=ESAMState,
  )
