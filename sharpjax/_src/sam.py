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

# (clean_grads, params, count) -> (float32 perturbation, clean gradient norm).
# A variant with memory (``init_memory``) receives it as a fourth argument.
PerturbationFn = Callable[..., tuple[Any, jax.Array]]
# (clean_grads, perturbed_grads, count, memory) -> (descent direction, memory)
DescentFn = Callable[[Any, Any, jax.Array, dict], tuple[Any, dict]]
# (clean_grads, params, count, memory) -> (descent direction, memory)
ReuseFn = Callable[[Any, Any, jax.Array, dict], tuple[Any, dict]]

_RESERVED_FIELDS = ("count", "diagnostics")


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


def _reuse_diagnostics(clean_grads: Any, clean_loss: Any):
  """The record of a step that took no perturbed pass.

  Nothing was perturbed (norm 0) and the perturbed loss and the cosine were
  not evaluated: NaN, as the clean loss when the caller does not pass it.
  """
  nan = jnp.full((), jnp.nan, jnp.float32)
  if clean_loss is None:
    clean_loss = nan
  return perturbed_lib.Diagnostics(
      grad_norm=base.tree_norm_f32(clean_grads),
      perturbation_norm=jnp.zeros((), jnp.float32),
      clean_loss=jnp.asarray(clean_loss, jnp.float32).reshape(()),
      perturbed_loss=nan,
      cosine=nan,
  )


def _mean_over_chunks(tree: Any) -> Any:
  return jax.tree.map(
      lambda x: jnp.mean(x.astype(jnp.float32), axis=0).astype(x.dtype), tree
  )


# How a transformation with skipped steps chooses its branch (see `branch`).
_BRANCHES = ("cond", "select")


def sharpness_aware(
    perturbation_fn: PerturbationFn,
    *,
    name: str,
    axis_name: Optional[str] = None,
    descent_fn: Optional[DescentFn] = None,
    init_memory: Optional[Callable[[Any], dict]] = None,
    state_type: type = SharpnessAwareState,
    full_step_fn: Optional[Callable[[jax.Array], jax.Array]] = None,
    reuse_fn: Optional[ReuseFn] = None,
    num_chunks: int = 1,
    branch: str = "cond",
) -> optax.GradientTransformationExtraArgs:
  """Builds a perturb-then-descend transformation from its ascent step.

  This is the shared mechanism of the SAM family: compute a perturbation from
  the clean gradient, evaluate the gradient of the mean per-example loss at the
  perturbed point, record the diagnostics, and hand the perturbed gradient to
  the next transformation in the chain. The optional hooks express the
  variants without copying this loop:

  * ``descent_fn`` combines the clean and the perturbed gradient into the
    direction handed on (GSAM), and may update the memory (LookSAM's cached
    component, F-SAM's EMA);
  * ``init_memory`` and ``state_type`` add per-method state: ``state_type`` is
    a ``NamedTuple`` with the fields ``count`` and ``diagnostics`` plus one
    field per key of the dict ``init_memory(params)`` returns. The hooks see
    and return that dict (its leaves keep their dtypes and shapes);
  * ``full_step_fn`` and ``reuse_fn``: on steps where ``full_step_fn(count)``
    is False the perturbed pass is skipped and ``reuse_fn`` gives the
    direction from the clean gradient and the memory (LookSAM). With
    ``branch="cond"`` the choice is a ``lax.cond``, so under ``jit`` a skipped
    pass costs nothing; ``branch="select"`` runs both and keeps one;
  * ``num_chunks > 1`` splits the batch into that many equal chunks and, for
    each (``vmap``), computes the chunk's clean gradient, its own perturbation
    and the perturbed gradient; the perturbed gradients are averaged
    (m-sharpness, mSAM). The clean gradient handed to ``descent_fn`` and the
    diagnostics is the mean of the chunks' clean gradients (equal to the full
    batch's), and the gradient passed to ``update`` is used for its structure
    and dtypes only.

  Args:
    perturbation_fn: ``(clean_grads, params, count) -> (eps, grad_norm)``
      giving a float32 perturbation and the clean gradient's global norm; with
      ``init_memory`` it is called as ``(clean_grads, params, count, memory)``.
    name: the public name, used in error messages.
    axis_name: when the update runs inside ``jax.pmap`` (or ``shard_map``),
      the descent direction, memory, and diagnostics are averaged over this
      axis; with a ``descent_fn`` the perturbed gradient is averaged before
      it too, so the combination sees the whole batch's perturbed gradient.
      The perturbation itself comes from the gradient passed in: pass
      per-device gradients for per-device perturbations (SAM's m-sharpness
      with m = per-device batch), or ``pmean`` them first for a global one.
    descent_fn: ``(clean_grads, perturbed_grads, count, memory) ->
      (direction, memory)``; default: the perturbed gradient, memory unchanged.
    init_memory: ``params -> dict`` of the extra state fields; default none.
    state_type: the state ``NamedTuple`` (default :class:`SharpnessAwareState`).
    full_step_fn: ``count -> bool`` array, whether this step takes the
      perturbed pass; needs ``reuse_fn``. Default: every step does.
    reuse_fn: ``(clean_grads, params, count, memory) -> (direction, memory)``
      for the steps that skip the pass.
    num_chunks: number of chunks of the batch, each with its own perturbation
      (a static int >= 1; the batch size must be divisible by it).
    branch: how ``full_step_fn`` picks: ``"cond"`` (``lax.cond``) or
      ``"select"`` (both branches computed, ``jnp.where``).

  Returns:
    An ``optax.GradientTransformationExtraArgs``.
  """
  if (full_step_fn is None) != (reuse_fn is None):
    raise ValueError("full_step_fn and reuse_fn must be given together.")
  num_chunks = base.check_int("num_chunks", num_chunks, low=1)
  if branch not in _BRANCHES:
    raise ValueError(f"branch must be one of {_BRANCHES}, got {branch!r}.")
  memory_fields = tuple(
      f for f in state_type._fields if f not in _RESERVED_FIELDS
  )
  if not set(_RESERVED_FIELDS) <= set(state_type._fields):
    raise ValueError(
        f"state_type must have the fields {_RESERVED_FIELDS}, got "
        f"{state_type._fields}."
    )
  if memory_fields and init_memory is None:
    raise ValueError(
        f"state_type has memory fields {memory_fields}; pass init_memory."
    )

  def perturb(grads, params, count, memory):
    if init_memory is None:
      return perturbation_fn(grads, params, count)
    return perturbation_fn(grads, params, count, memory)

  def keep_dtypes(new_memory, memory):
    return jax.tree.map(
        lambda n, o: jnp.asarray(n, o.dtype).reshape(o.shape), new_memory,
        memory,
    )

  def init_fn(params):
    memory = {} if init_memory is None else dict(init_memory(params))
    if set(memory) != set(memory_fields):
      raise ValueError(
          f"init_memory returned the fields {sorted(memory)}, but state_type "
          f"{state_type.__name__} has {sorted(memory_fields)}."
      )
    return state_type(
        count=jnp.zeros([], jnp.int32),
        diagnostics=perturbed_lib.init_diagnostics(),
        **memory,
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
    count = state.count
    memory = {f: getattr(state, f) for f in memory_fields}

    def chunked_passes(memory):
      chunks = perturbed_lib.split_batch(batch, num_chunks, name=name)

      def one_chunk(chunk):
        clean = perturbed_lib.gradient_pass(
            loss_fn, params, chunk, has_aux=has_aux, name=name
        )
        eps, _ = perturb(clean.grads, params, count, memory)
        result = perturbed_lib.perturbed_pass(
            loss_fn, params, eps, chunk, has_aux=has_aux, name=name
        )
        return (clean.loss, clean.grads, base.tree_norm_f32(eps), result.loss,
                result.grads)

      clean_loss, clean_grads, eps_norm, loss, grads = jax.vmap(one_chunk)(
          chunks
      )
      clean_grads = base.tree_cast_like(_mean_over_chunks(clean_grads), updates)
      grads = _mean_over_chunks(grads)
      diagnostics = perturbed_lib.diagnostics_of(
          clean_grads,
          None,
          grads,
          jnp.mean(loss),
          clean_loss=jnp.mean(clean_loss) if value is None else value,
          perturbation_norm=jnp.mean(eps_norm),
      )
      return clean_grads, grads, diagnostics

    def full_step(memory):
      if num_chunks == 1:
        eps, grad_norm = perturb(updates, params, count, memory)
        result = perturbed_lib.perturbed_pass(
            loss_fn, params, eps, batch, has_aux=has_aux, name=name
        )
        clean_grads, grads = updates, result.grads
        diagnostics = perturbed_lib.diagnostics_of(
            updates,
            eps,
            result.grads,
            result.loss,
            grad_norm=grad_norm,
            clean_loss=value,
        )
      else:
        clean_grads, grads, diagnostics = chunked_passes(memory)
      new_memory = memory
      if descent_fn is not None:
        if axis_name is not None:
          # The combination sees the whole batch's perturbed gradient.
          grads, diagnostics = jax.lax.pmean((grads, diagnostics), axis_name)
        grads, new_memory = descent_fn(clean_grads, grads, count, memory)
        new_memory = keep_dtypes(new_memory, memory)
      return base.tree_cast_like(grads, updates), new_memory, diagnostics

    def reuse_step(memory):
      grads, new_memory = reuse_fn(updates, params, count, memory)
      return (
          base.tree_cast_like(grads, updates),
          keep_dtypes(new_memory, memory),
          _reuse_diagnostics(updates, value),
      )

    if full_step_fn is None:
      grads, memory, diagnostics = full_step(memory)
    elif branch == "cond":
      grads, memory, diagnostics = jax.lax.cond(
          full_step_fn(count), full_step, reuse_step, memory
      )
    else:
      is_full = full_step_fn(count)
      grads, memory, diagnostics = jax.tree.map(
          lambda a, b: jnp.where(is_full, a, b),
          full_step(memory), reuse_step(memory),
      )
    if axis_name is not None:
      grads, memory, diagnostics = jax.lax.pmean(
          (grads, memory, diagnostics), axis_name
      )
    new_state = state_type(
        count=optax.safe_increment(count), diagnostics=diagnostics, **memory
    )
    return grads, new_state

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
