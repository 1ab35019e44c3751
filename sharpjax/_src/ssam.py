r"""SSAM: Sparse SAM, a perturbation restricted to a sparse mask of weights.

.. math::
  \epsilon = m \odot \rho \frac{g}{\|g\|_2}, \qquad
  \tilde g = \nabla_w L_B(w)\big|_{w + \epsilon},

with :math:`m` a binary mask over all the weights that keeps a fraction
:math:`1 - s` of them. SSAM-F chooses the weights with the largest empirical
Fisher information, :math:`F_i = \sum_n (\partial \ell_n / \partial w_i)^2`,
and refreshes the mask every few steps.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sharpjax._src import ascent
from sharpjax._src import base
from sharpjax._src import perturbed as perturbed_lib
from sharpjax._src import sharpness_aware as wrapper

_MASKS = ("fisher", "random")
_REFRESH_AT = ("this_step", "next_step")


class SSAMState(NamedTuple):
  """State of :func:`ssam`.

  Attributes:
    count: number of updates taken (int32).
    mask: booleans shaped like the parameters, True where the weight is
      perturbed.
    key: raw ``uint32`` key data (draws the random masks); advances every step.
    period: int32 scalar, ``update_every`` (constant): the mask is refreshed
      on the steps whose ``count % period == 0``.
    diagnostics: what the last step saw; read it with
      :func:`sharpjax.diagnostics`.

  Class attributes (not fields), read by trainers instead of testing the type:

  - ``HOST_SCHEDULED = True``: the refresh follows ``count % period == 0``
    and ``update`` accepts ``full_step=`` (a Python bool, that value): a
    loop that keeps the count on the host compiles a step with the refresh
    and one without, instead of a device conditional (whose untaken Fisher
    branch XLA's cost analysis would count on every step).
  """

  count: jax.Array
  mask: Any
  key: jax.Array
  period: jax.Array
  diagnostics: perturbed_lib.Diagnostics

  HOST_SCHEDULED = True


def _num_kept(sparsity, size: int):
  """floor(size * (1 - sparsity)): static when sparsity is a number."""
  if base.is_traced(sparsity):
    kept = jnp.floor(size * (1.0 - sparsity.astype(jnp.float32)) + 1e-6)
    return kept.astype(jnp.int32)
  return int(math.floor(size * (1.0 - float(sparsity)) + 1e-6))


def top_mask(scores: Any, sparsity) -> Any:
  """A mask keeping the ``floor(n (1 - sparsity))`` largest entries of ``scores``.

  The top-k is global over the whole pytree (all leaves flattened together);
  ties go to the earlier entry in leaf order. Returns booleans shaped like
  ``scores``.
  """
  leaves, treedef = jax.tree.flatten(scores)
  flat = jnp.concatenate([jnp.ravel(x).astype(jnp.float32) for x in leaves])
  order = jnp.argsort(-flat, stable=True)
  return _unflatten_mask(order, _num_kept(sparsity, flat.size), leaves, treedef)


def random_mask(key: jax.Array, like: Any, sparsity) -> Any:
  """A uniformly random mask keeping ``floor(n (1 - sparsity))`` entries."""
  leaves, treedef = jax.tree.flatten(like)
  size = sum(int(np.prod(jnp.shape(x))) for x in leaves)
  order = jax.random.permutation(key, size)
  return _unflatten_mask(order, _num_kept(sparsity, size), leaves, treedef)


def _unflatten_mask(order, kept, leaves, treedef):
  size = order.shape[0]
  flat = jnp.zeros((size,), bool).at[order].set(jnp.arange(size) < kept)
  out, start = [], 0
  for x in leaves:
    n = int(np.prod(jnp.shape(x)))
    out.append(flat[start:start + n].reshape(jnp.shape(x)))
    start += n
  return jax.tree.unflatten(treedef, out)


# Per-example gradients held at once by `fisher_diagonal` (in float32 entries):
# 2**26 (256 MiB) keeps a ResNet-18 Fisher to chunks of 4 examples while a
# small model's whole batch goes through one vmap.
_FISHER_BUDGET = 2**26


def fisher_diagonal(
    loss_fn, params: Any, batch: Any, *, has_aux: bool = False,
    name: str = "ssam", chunk_size: int | None = None,
) -> Any:
  r"""Empirical Fisher diagonal :math:`\sum_n (\nabla_w \ell_n)^2` over ``batch``.

  Per-example gradients come from ``jax.vmap`` of ``jax.grad`` over single
  examples (each seen by ``loss_fn`` as a batch of one), ``chunk_size``
  examples at a time, their squares summed by a ``lax.scan`` over the chunks,
  so memory is ``chunk_size`` gradients rather than one per example. The
  default ``chunk_size`` (``None``) is the largest divisor of the batch size
  whose gradients fit in :math:`2^{26}` floats (the whole batch for small
  models). Float32, shaped like ``params``.
  """
  size = perturbed_lib.batch_size(batch)
  if chunk_size is None:
    num_params = max(1, sum(x.size for x in jax.tree.leaves(params)))
    limit = max(1, min(size, _FISHER_BUDGET // num_params))
    chunk_size = max(d for d in range(1, limit + 1) if size % d == 0)
  elif size % chunk_size:
    raise ValueError(
        f"{name}: chunk_size={chunk_size} must divide the batch size {size}"
    )

  def example_grad(example):
    one = jax.tree.map(lambda x: x[None], example)

    def loss(p):
      losses, _ = perturbed_lib.split_loss_output(
          loss_fn(p, one), has_aux, 1, name
      )
      return losses[0].astype(jnp.float32)

    return jax.grad(loss)(perturbed_lib.vary_like(params, example))

  def chunk_fisher(chunk):
    return jax.tree.map(
        lambda g: jnp.sum(jnp.square(g.astype(jnp.float32)), axis=0),
        jax.vmap(example_grad)(chunk),
    )

  if chunk_size == size:
    return chunk_fisher(batch)
  chunks = jax.tree.map(
      lambda x: x.reshape(size // chunk_size, chunk_size, *x.shape[1:]), batch
  )

  def accumulate(total, chunk):
    return jax.tree.map(jnp.add, total, chunk_fisher(chunk)), None

  zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
  return jax.lax.scan(accumulate, zeros, chunks)[0]


def ssam(
    rho: base.ScalarOrSchedule = 0.05,
    sparsity: float = 0.5,
    mask: str = "fisher",
    num_fisher_samples: int = 128,
    update_every: int = 1000,
    *,
    seed: int = 0,
    refresh_at: str = "this_step",
    axis_name: Optional[str] = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Sparse SAM: SAM's perturbation on a sparse mask of the weights.

  .. math::
    \epsilon = m \odot \rho \frac{g}{\|g\|_2}, \qquad
    \tilde g = \nabla_w L_B(w)\big|_{w + \epsilon},

  with :math:`\|g\|_2` the norm of the whole (unmasked) gradient, as in the
  official code, so :math:`\|\epsilon\|_2 \le \rho`. The mask keeps exactly
  :math:`\lfloor n (1 - s) \rfloor` of the :math:`n` weights, chosen over the
  whole parameter pytree at once:

  * ``mask="fisher"`` (SSAM-F): the largest entries of the empirical Fisher
    diagonal :math:`F_i = \sum_{n \le N_s} (\partial\ell_n/\partial w_i)^2`,
    from per-example gradients (``jax.vmap``) of the first
    :math:`N_s` = ``num_fisher_samples`` examples of the batch, at the
    current parameters. As in the official code, the mask starts empty, so
    the first step is a plain gradient step (:math:`\epsilon = 0`).
  * ``mask="random"``: a uniformly random mask of the same density, drawn at
    ``init`` from ``seed`` (the starting mask of SSAM-D) and redrawn at each
    refresh.

  With ``refresh_at="this_step"`` (the default) the mask is refreshed after
  the perturbed pass of every step whose count is a multiple of
  ``update_every`` (steps 0, ``update_every``, ...), at that step's weights
  before the update, and used from the next step on. With
  ``refresh_at="next_step"`` it is refreshed at the start of the step that
  follows (counts 1, ``update_every + 1``, ...), at that step's weights, that
  is after the base optimizer's update, and used by that step already: the
  official code's timing (it refreshes after ``optimizer.step()``). The
  refresh runs inside ``lax.cond``, so the Fisher computation runs only on
  those steps. With the default timing a caller that keeps the count on the
  host passes ``update(..., full_step=count % update_every == 0)`` (a Python
  bool) and compiles one step per value, with no conditional
  (:class:`sharpjax.SSAMState` declares ``HOST_SCHEDULED``;
  :func:`sharpjax.training.make_trainer` does this); ``"next_step"`` keeps its
  ``lax.cond`` and ignores ``full_step`` (so ``Trainer.step_cost`` counts its
  Fisher branch on every step). With ``sparsity=0`` every weight is perturbed
  from the first step, and the step is SAM's.

  Differences from the official code (class ``SSAMF`` of
  Mi-Peng/Sparse-Sharpness-Aware-Minimization), measured on the 195-weight
  MLP of ``benchmarks/official_agreement.py`` (full-batch steps, a refresh
  every 2 steps): with the default timing the parameters leave the official run's by
  6.4e-4 after 10 steps; with ``refresh_at="next_step"`` by 1.3e-4. That
  remainder comes from the official refresh, whose first Fisher sample adds
  its gradient to the step's perturbed gradient still held in ``.grad``;
  with ``.grad`` cleared first the two agree to 6e-8. The official code draws
  its :math:`N_s` Fisher samples from the whole training set (a shuffled
  loader of batch size 1); here they are the first :math:`N_s` examples of
  the step's batch. The official ``int(n (1 - s))`` kept weights is the
  :math:`\lfloor n (1 - s) \rfloor` used here.

  Cost: two forward-backward passes per step, as SAM (the kernels stay
  dense; the paper's FLOP saving needs sparse backpropagation), plus
  :math:`N_s` per-example gradients every ``update_every`` steps.

  Args:
    rho: radius (>= 0), a number or an optax schedule. The paper uses 0.1 on
      CIFAR-10 and 0.2 on CIFAR-100 (ResNet-18).
    sparsity: the fraction :math:`s` of weights NOT perturbed, in [0, 1);
      0.5 in the headline runs.
    mask: ``"fisher"`` or ``"random"``.
    num_fisher_samples: :math:`N_s` (>= 1; 128 or 1024 in the paper), capped
      at the batch size. It sets a static shape: with
      ``optax.inject_hyperparams`` list it in ``static_args``.
    update_every: steps between mask refreshes (>= 1). The paper refreshes
      every 1 to 5 epochs: pass ``epochs * steps_per_epoch``.
    seed: seed of the key kept in the state (random masks).
    refresh_at: ``"this_step"`` (refresh at the weights of the steps
      0, ``update_every``, ...; the mask serves from the next step) or
      ``"next_step"`` (refresh at the weights after those steps' updates,
      the official code's timing).
    axis_name: inside ``jax.pmap`` / ``shard_map``, the perturbed gradient,
      the diagnostics and the Fisher diagonal are averaged over this axis
      (so every device keeps the same mask).

  Returns:
    An ``optax.GradientTransformationExtraArgs``, called as
    :func:`sharpjax.sam`.

  Example:
    >>> import optax, sharpjax as sj
    >>> tx = optax.chain(sj.ssam(rho=0.1, sparsity=0.5, update_every=390),
    ...                  optax.sgd(0.05, momentum=0.9))

  References:
    Mi et al., Make Sharpness-Aware Minimization Stronger: A Sparsified
    Perturbation Approach, NeurIPS 2022. https://arxiv.org/abs/2210.05177
  """
  base.check_range("rho", rho, low=0.0)
  base.check_range("sparsity", sparsity, low=0.0, high=1.0,
                   high_inclusive=False)
  if mask not in _MASKS:
    raise ValueError(f"mask must be one of {_MASKS}, got {mask!r}.")
  base.check_int_like("num_fisher_samples", num_fisher_samples, low=1)
  base.check_int_like("update_every", update_every, low=1)
  base.check_int_like("seed", seed, low=0)
  if refresh_at not in _REFRESH_AT:
    raise ValueError(
        f"refresh_at must be one of {_REFRESH_AT}, got {refresh_at!r}.")
  dense = not base.is_traced(sparsity) and float(sparsity) == 0.0

  def init_memory(params):
    key = base.init_key_data(seed)
    if dense:
      start = jax.tree.map(lambda p: jnp.ones(jnp.shape(p), bool), params)
    elif mask == "random":
      start = random_mask(jax.random.wrap_key_data(key), params, sparsity)
    else:  # The official SSAM-F starts with an empty mask.
      start = jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), bool), params)
    return {"mask": start, "key": key,
            "period": jnp.asarray(update_every, jnp.int32)}

  def step(inputs):
    params, batch, count = inputs.params, inputs.batch, inputs.count
    num_samples = int(
        base.static_number("num_fisher_samples", num_fisher_samples, "ssam")
    )
    new_key, key = base.next_key(inputs.memory["key"])
    old_mask = inputs.memory["mask"]
    every = jnp.asarray(update_every, jnp.int32)

    def refresh(_):
      if mask == "random":
        return random_mask(key, params, sparsity)
      size = perturbed_lib.batch_size(batch)
      head = jax.tree.map(lambda x: x[:min(num_samples, size)], batch)
      fisher = fisher_diagonal(inputs.loss_fn, params, head,
                               has_aux=inputs.has_aux)
      # Every device keeps the same mask.
      return top_mask(inputs.mean_over_devices(fisher), sparsity)

    if not dense and refresh_at == "next_step":
      # The official timing: the mask of the weights after the update of
      # steps 0, update_every, ..., i.e. of this step's weights.
      due = (count > 0) & ((count - 1) % every == 0)
      old_mask = jax.lax.cond(due, refresh, lambda _: old_mask, None)

    eps, grad_norm = ascent.sam_perturbation(
        inputs.grads, base.resolve_radius(rho, count)
    )
    eps = jax.tree.map(lambda e, m: jnp.where(m, e, 0.0), eps, old_mask)
    out = inputs.ascend(eps, grad_norm=grad_norm)

    full_step = inputs.extra.get("full_step")
    if full_step is not None and not isinstance(full_step, (bool, np.bool_)):
      raise ValueError(
          "sharpjax.ssam: full_step must be a Python bool known when the step "
          f"is traced (count % update_every == 0), got "
          f"{type(full_step).__name__}.")
    if dense or refresh_at == "next_step" or full_step is False:
      new_mask = old_mask
    elif full_step:
      new_mask = refresh(None)
    else:
      due = count % every == 0
      new_mask = jax.lax.cond(due, refresh, lambda _: old_mask, None)
    return out._replace(memory={"mask": new_mask, "key": new_key,
                                "period": inputs.memory["period"]})

  return wrapper.sharpness_aware(
      step,
      name="ssam",
      axis_name=axis_name,
      init_memory=init_memory,
      state_type=SSAMState,
  )
