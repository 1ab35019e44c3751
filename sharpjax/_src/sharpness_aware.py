r"""The wrapper every SAM-family transformation is built on.

A SAM-family transformation goes first in an ``optax.chain``. It receives the
clean gradient :math:`g = \nabla L_B(w)` and the extra arguments ``loss_fn``
and ``batch``, and hands on a descent direction, for SAM the gradient at the
perturbed point

.. math::
  \tilde g = \nabla_w \tfrac{1}{|B|}\textstyle\sum_{i\in B} \ell_i(w)
  \big|_{w + \epsilon(g, w)},

which the base optimizer behind it in the chain turns into an update.

What every method shares lives in :func:`sharpness_aware`: checking the extra
arguments, the data-parallel checks and averaging over ``axis_name``, casting
the direction back to the gradient's dtypes, the step count and the
diagnostics record in the state. What makes a method different is one
function, its *step*: it receives a :class:`StepInputs` and returns a
:class:`Step`.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional
import warnings

import jax
import jax.numpy as jnp
import optax

from sharpjax._src import base
from sharpjax._src import perturbed as perturbed_lib

_RESERVED_FIELDS = ("count", "diagnostics")
# A state that runs its own passes (``PASSES = "own"``) has this field too.
_PASSES_FIELD = "passes"


class SharpnessAwareState(NamedTuple):
  """State of :func:`sam`, :func:`asam` and the methods without memory.

  Attributes:
    count: number of updates taken (int32), the step at which schedules for
      ``rho`` are evaluated.
    diagnostics: what the last step saw; read it with
      :func:`sharpjax.diagnostics`.
  """

  count: jax.Array
  diagnostics: perturbed_lib.Diagnostics


class Step(NamedTuple):
  """What a method's step returns to :func:`sharpness_aware`.

  Attributes:
    direction: the descent direction handed to the next transformation, a
      pytree shaped like the gradient (any float dtype: it is cast back to
      the gradient's dtypes).
    diagnostics: the :class:`sharpjax.Diagnostics` record of the step.
    memory: the new values of the state's extra fields (a dict keyed by field
      name), or None to keep them.
    passes: for a method that runs its own passes (its state declares
      ``PASSES = "own"``), the :class:`sharpjax.StepPasses` of the step: the
      per-example losses and aux of its passes at the clean parameters,
      stored in the state when ``update`` is called with
      ``report_passes=True``.
  """

  direction: Any
  diagnostics: perturbed_lib.Diagnostics
  memory: Optional[dict] = None
  passes: Optional[Any] = None


class StepInputs(NamedTuple):
  """What a method's step receives from :func:`sharpness_aware`.

  Attributes:
    grads: the clean gradient passed to ``update``.
    params: the clean parameters.
    count: the step count (int32), at which schedules are evaluated.
    memory: the state's extra fields, a dict keyed by field name (empty for
      a method without memory).
    loss_fn: ``loss_fn(params, batch)`` returning per-example losses [B].
    batch: the batch.
    has_aux: whether ``loss_fn`` returns ``(losses, aux)``.
    value: the clean mean loss passed as ``value=`` (None when not passed).
    extra: the other extra arguments of ``update`` (a dict).
    axis_name: the transformation's ``axis_name`` (None outside ``pmap``).
    name: the transformation's public name, for error messages.
  """

  grads: Any
  params: Any
  count: jax.Array
  memory: dict
  loss_fn: Callable[..., Any]
  batch: Any
  has_aux: bool
  value: Any
  extra: dict
  axis_name: Optional[str]
  name: str

  def ascend(self, perturbation: Any, *,
             grad_norm: Optional[jax.Array] = None) -> Step:
    """SAM's second pass at ``params + perturbation`` on the whole batch.

    Returns the :class:`Step` whose direction is the perturbed gradient, with
    its diagnostics and the memory unchanged. ``grad_norm``, when the ascent
    step already has the clean gradient's norm, saves recomputing it.
    """
    result = perturbed_lib.perturbed_pass(
        self.loss_fn, self.params, perturbation, self.batch,
        has_aux=self.has_aux, name=self.name,
    )
    diagnostics = perturbed_lib.diagnostics_of(
        self.grads, perturbation, result.grads, result.loss,
        params=self.params, grad_norm=grad_norm, clean_loss=self.value,
    )
    return Step(result.grads, diagnostics)

  def mean_over_devices(self, tree: Any) -> Any:
    """``tree`` averaged over ``axis_name`` (unchanged without one).

    :func:`sharpness_aware` averages the direction and the diagnostics; a
    step averages what else must agree across devices (a memory computed
    from per-device values, a perturbed gradient it combines).
    """
    if self.axis_name is None:
      return tree
    return jax.lax.pmean(tree, self.axis_name)


StepFn = Callable[[StepInputs], Step]


def memory_of(state: Any) -> dict:
  """The extra fields of a state (all but ``count`` and ``diagnostics``)."""
  return {f: getattr(state, f) for f in state._fields
          if f not in _RESERVED_FIELDS + (_PASSES_FIELD,)}


def _bound_axis_names() -> tuple:
  """The named mapped axes the current trace runs under (pmap, shard_map,
  named vmap); () when JAX does not expose them."""
  try:
    from jax._src import core as jax_core  # pylint: disable=g-import-not-at-top
    return tuple(jax_core.get_axis_env().axis_names())
  except Exception:  # pylint: disable=broad-except
    return ()


# Transformation names already warned about, so a retrace does not repeat it.
_WARNED: set = set()


def check_axis(name: str, axis_name: Optional[str],
               data_axis_name: Any) -> None:
  """The data-parallel checks, at trace time.

  ``data_axis_name`` is the mapped data axis the caller runs the update under
  (a trainer passes it); a transformation built without that axis would let
  every device drift apart. Without it, a named axis found in JAX's axis
  environment while ``axis_name`` is None gets a warning.
  """
  if data_axis_name is not None and data_axis_name != axis_name:
    raise ValueError(
        f"sharpjax.{name}: the update runs under the data axis "
        f"{data_axis_name!r}, but the transformation was built with "
        f"axis_name={axis_name!r}, so its gradients would not be averaged "
        "across devices and the devices' parameters would drift apart. Build "
        f"sj.{name}(..., axis_name={data_axis_name!r})."
    )
  if axis_name is not None or data_axis_name is not None:
    return
  bound = _bound_axis_names()
  if bound and name not in _WARNED:
    _WARNED.add(name)
    warnings.warn(
        f"sharpjax.{name} runs inside the named mapped axes {bound} (pmap, "
        "shard_map or a named vmap) but was built without axis_name: its "
        "perturbed gradients are not averaged across devices, so data-"
        "parallel copies of the parameters drift apart. Build "
        f"sj.{name}(..., axis_name={bound[0]!r}) (ignore this if you average "
        "the updates yourself).",
        stacklevel=4,
    )


def _has_masked_nodes(tree: Any) -> bool:
  """Whether ``tree`` comes from inside ``optax.masked`` / ``multi_transform``
  (the leaves left out are ``optax.MaskedNode``)."""
  is_node = lambda x: isinstance(x, optax.MaskedNode)
  return any(is_node(x) for x in jax.tree.leaves(tree, is_leaf=is_node))


def _masked_pass_failed(name: str, error: Exception) -> ValueError:
  """One line for a perturbed pass that met the parameters a mask left out."""
  return ValueError(
      f"sharpjax.{name} inside optax.masked or optax.multi_transform gets "
      "only the selected parameters, and loss_fn failed on that partial tree "
      f"({type(error).__name__}); perturb only some parameters with "
      f"sj.{name}(..., mask=mask) first in the chain instead: "
      "optax.chain(sj.sam(rho, mask=mask), base_optimizer)."
  )


def _apply_mask(mask: Any, grads: Any, params: Any) -> Any:
  """``grads`` with the leaves outside ``mask`` set to zero."""
  selected = mask(params) if callable(mask) else mask
  try:
    return jax.tree.map(
        lambda keep, g: (
            (g if keep else jnp.zeros_like(g)) if isinstance(keep, bool)
            else jnp.where(keep, g, jnp.zeros_like(g))), selected, grads)
  except ValueError as e:
    raise ValueError(
        "mask must be a pytree of bools with the structure of the parameters "
        f"(or a function of the parameters returning one): {e}") from None


def sharpness_aware(
    step_fn: StepFn,
    *,
    name: str,
    axis_name: Optional[str] = None,
    init_memory: Optional[Callable[[Any], dict]] = None,
    state_type: type = SharpnessAwareState,
    mask: Any = None,
) -> optax.GradientTransformationExtraArgs:
  """Builds a SAM-family transformation from its step.

  Every SAM-family method of sharpjax is this wrapper around one function,
  ``step_fn(inputs) -> Step``. The wrapper checks the extra arguments
  (``params``, ``loss_fn`` and ``batch`` are required), calls the step,
  averages the direction and the diagnostics over ``axis_name``, casts the
  direction back to the gradient's dtypes, advances ``count`` and stores the
  diagnostics and the memory in the state. The step computes a perturbation
  from ``inputs.grads`` and, most often, calls ``inputs.ascend(eps)`` for the
  perturbed pass; a method that changes the direction edits the returned
  :class:`Step` (``step._replace(direction=...)``), and one with memory
  returns ``memory=`` too.

  ``update(grads, state, params, *, loss_fn, batch, has_aux=False,
  value=None, data_axis_name=None, **extra)`` takes ``loss_fn(params,
  batch)`` returning per-example losses of shape [B] (or ``(losses, aux)``
  with ``has_aux=True``) and, optionally, ``value``, the clean mean loss,
  recorded in the diagnostics. ``data_axis_name`` is the name of the mapped
  data axis the caller runs the update under (a trainer passes it): if it
  differs from ``axis_name`` the update raises a ``ValueError`` at trace
  time, naming the fix. Without it, an update that runs inside a named
  mapped axis (the user's own ``jax.pmap``) while ``axis_name`` is None warns
  once. Other extra arguments reach the step in ``inputs.extra``.

  Args:
    step_fn: ``StepInputs -> Step``, the method (see :class:`StepInputs`).
    name: the public name, used in error messages.
    axis_name: when the update runs inside ``jax.pmap`` (or ``shard_map``),
      the direction and the diagnostics are averaged over this axis. The
      perturbation comes from the gradient passed in: pass per-device
      gradients for per-device perturbations (SAM's m-sharpness with m = the
      per-device batch), or ``pmean`` them first for a global one. The
      diagnostics are then per-device values averaged over devices (a mean of
      per-device cosines, not the cosine of the averaged gradients).
    init_memory: ``params -> dict`` of the state's extra fields; default none.
    state_type: the state ``NamedTuple`` (default
      :class:`SharpnessAwareState`): the fields ``count`` and ``diagnostics``
      plus one per key of ``init_memory(params)``, whose leaves keep their
      dtypes and shapes from step to step. The wrapper declares it
      ``FIRST_IN_CHAIN`` (see :func:`sharpjax.check_chain`).
    mask: perturb only some parameters (SAM-ON, Mueller et al., NeurIPS
      2023, perturbs the normalization layers only): a pytree of bools
      shaped like the parameters, or ``params -> pytree of bools`` (as
      ``optax.masked`` takes). The step sees the clean gradient of the
      selected leaves and zeros elsewhere, so its perturbation (and norm)
      covers the selected leaves only; the loss still sees every parameter,
      and every leaf receives the method's direction (for SAM the gradient
      at the perturbed point). None (default): every parameter. Only a
      method whose perturbation comes from ``inputs.grads`` honours it
      (:func:`sharpjax.sam` and :func:`sharpjax.asam` offer it; a step that
      takes clean gradients of its own, mSAM's per chunk, AUSAM's on its
      sample, would not see it).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` to put first in a chain.

  Example:
    A variant that perturbs along the sign of the gradient, written on the
    wrapper:

    >>> import jax, jax.numpy as jnp, optax, sharpjax as sj
    >>> def sign_step(inputs):
    ...   eps = jax.tree.map(lambda g: 0.01 * jnp.sign(g), inputs.grads)
    ...   return inputs.ascend(eps)
    >>> tx = optax.chain(sj.sharpness_aware(sign_step, name="sign_sam"),
    ...                  optax.sgd(0.1))
    >>> params = {"w": jnp.array([1.0, -2.0])}
    >>> batch = {"x": jnp.eye(2)}
    >>> loss_fn = lambda p, b: 0.5 * (b["x"] @ p["w"]) ** 2
    >>> grads = jax.grad(lambda p: loss_fn(p, batch).mean())(params)
    >>> state = tx.init(params)
    >>> updates, state = tx.update(grads, state, params, loss_fn=loss_fn,
    ...                            batch=batch)
    >>> updates["w"]  # -0.1 times the gradient at w + eps, (w + eps) / 2
    Array([-0.0505,  0.1005], dtype=float32)
    >>> float(sj.diagnostics(state)["perturbation_norm"])  # 0.01 * sqrt(2)
    0.014142...
  """
  memory_fields = tuple(
      f for f in state_type._fields
      if f not in _RESERVED_FIELDS + (_PASSES_FIELD,)
  )
  reports_passes = _PASSES_FIELD in state_type._fields
  if not set(_RESERVED_FIELDS) <= set(state_type._fields):
    raise ValueError(
        f"state_type must have the fields {_RESERVED_FIELDS}, got "
        f"{state_type._fields}."
    )
  if memory_fields and init_memory is None:
    raise ValueError(
        f"state_type has memory fields {memory_fields}; pass init_memory."
    )

  # Every state built here belongs to a SAM-family transformation: it needs
  # the clean gradient, so it goes first in a chain (sharpjax.check_chain).
  if not hasattr(state_type, "FIRST_IN_CHAIN"):
    state_type.FIRST_IN_CHAIN = True

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
    if reports_passes:
      memory[_PASSES_FIELD] = None
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
      data_axis_name=None,
      report_passes: bool = False,
      **extra_args,
  ):
    perturbed_lib.require_extra_args(name, params, loss_fn, batch)
    check_axis(name, axis_name, data_axis_name)
    grads = updates if mask is None else _apply_mask(mask, updates, params)
    memory = {f: getattr(state, f) for f in memory_fields}
    inputs = StepInputs(
        grads=grads, params=params, count=state.count, memory=memory,
        loss_fn=loss_fn, batch=batch, has_aux=has_aux, value=value,
        extra=extra_args, axis_name=axis_name, name=name,
    )
    if _has_masked_nodes(params):
      # Inside optax.masked: a loss_fn that merges the selected leaves into
      # the whole parameters itself works (sharpjax.tta does); any other
      # fails on the MaskedNode leaves, which is said in one line.
      try:
        step = step_fn(inputs)
      except (TypeError, ValueError, AttributeError) as e:
        raise _masked_pass_failed(name, e) from None
    else:
      step = step_fn(inputs)
    direction, diagnostics = step.direction, step.diagnostics
    if axis_name is not None:
      direction, diagnostics = jax.lax.pmean(
          (direction, diagnostics), axis_name
      )
    if step.memory is not None:
      if set(step.memory) != set(memory_fields):
        raise ValueError(
            f"sharpjax.{name}: the step returned the memory fields "
            f"{sorted(step.memory)}, expected {sorted(memory_fields)}."
        )
      memory = keep_dtypes(step.memory, memory)
    if reports_passes:
      if report_passes and step.passes is None:
        raise ValueError(
            f"sharpjax.{name}: update(report_passes=True), but the step "
            "returned no record of its passes (Step.passes).")
      memory = dict(memory, **{
          _PASSES_FIELD: step.passes if report_passes else None})
    new_state = state_type(
        count=optax.safe_increment(state.count),
        diagnostics=diagnostics,
        **memory,
    )
    return base.tree_cast_like(direction, updates), new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
