"""What an optimizer state asks of the loop that drives it.

A training loop (:func:`sharpjax.training.make_trainer`, the command line, a
user's own loop) must never test a method's type. A transformation whose state
needs something from the loop says so on its state class, with plain class
attributes of the ``NamedTuple``; the functions here find them anywhere in an
optimizer state (inside ``optax.chain`` tuples, ``inject_hyperparams`` and so
on). A new method with such needs declares them and no loop changes.

The declarations:

- ``EXAMPLE_AXES``: a mapping ``field name -> axis``; that field of the state
  holds one row per training example along that axis, indexed by the
  examples' dataset ids (SAF's logit bank, AUSAM's score table). The loop must
  pass ``ids=`` to ``update``, and may shard those fields by example.
- ``TRACKS_MODEL_STATE = True``: the state keeps a copy of the model state
  (MESA's teacher averages BatchNorm statistics). The loop calls
  :func:`attach_model_state` once after ``tx.init`` and passes
  ``model_state=`` (this step's new model state) to every ``update``.
- ``HOST_SCHEDULED = True``: the state has int32 scalar fields ``count`` and
  ``period``; a full step is taken iff ``count % period == 0``, and ``update``
  accepts ``full_step=`` (a Python bool) to take that branch statically,
  without a device conditional (LookSAM's skipped second pass). A loop that
  knows the count on the host compiles one step per branch. A class with
  another rule gives it as ``full_step_at(count, period) -> bool`` and the
  share of full steps as ``full_step_share(period, total_steps) -> float``
  (static methods; :func:`full_step_at`, :func:`full_step_share`):
  late-phase SAM's full steps are those with ``count >= period``.
- ``PASSES``: where the step's gradients are taken (:func:`passes`). Absent
  (or ``"clean"``): at the current parameters, the loop's clean
  forward-backward pass, whose gradient is ``update``'s first argument.
  ``"points"``: at the points the state's method ``gradient_points(self,
  params) -> tuple`` computes from the state and the parameters (one or
  several, a static number), and nowhere else: the loop takes one gradient
  per point (several as one ``vmap`` over the points), passes the first
  point's gradient as ``update``'s first argument and all of them as
  ``point_passes=`` (a tuple of :class:`sharpjax.PerturbedPass`,
  one per point, in order: mean loss, gradient, per-example losses, aux);
  the step's metrics and new model state come from the first point.
  ``"own"``: nowhere; the method runs its own passes on its own examples.
  The loop runs no pass, hands zeros as the gradient and ``report_passes=True``;
  the state then carries a :class:`StepPasses` in its field ``passes`` (None
  otherwise), which the loop takes out (:func:`pop_step_passes`) for the
  step's per-example losses, metrics and new model state.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sharpjax._src import trajectory_loss

CLEAN = "clean"
POINTS = "points"
OWN = "own"
_KINDS = (CLEAN, POINTS, OWN)


def _declares(attribute: str) -> Callable[[Any], bool]:
  return lambda x: isinstance(x, tuple) and hasattr(type(x), attribute)


def _find(tree: Any, attribute: str) -> list[Any]:
  is_node = _declares(attribute)
  return [x for x in jax.tree.leaves(tree, is_leaf=is_node) if is_node(x)]


def example_tables(opt_state: Any) -> list[Any]:
  """The states in ``opt_state`` that hold per-example rows (``EXAMPLE_AXES``).

  Example:
    >>> import optax, jax.numpy as jnp, sharpjax as sj
    >>> from sharpjax._src import protocol
    >>> tx = optax.chain(sj.saf(num_examples=8, num_classes=3,
    ...                         steps_per_epoch=2), optax.sgd(0.1))
    >>> [type(s).__name__ for s in protocol.example_tables(
    ...     tx.init({"w": jnp.zeros(2)}))]
    ['SAFState']
  """
  return _find(opt_state, "EXAMPLE_AXES")


def needs_example_ids(opt_state: Any) -> bool:
  """Whether ``update`` needs the batch's dataset ids (``ids=``)."""
  return bool(example_tables(opt_state))


def map_example_tables(
    fn: Callable[[jax.Array, int], Any],
    opt_state: Any,
    otherwise: Callable[[Any], Any],
) -> Any:
  """Maps ``fn(field, axis)`` over the per-example fields, ``otherwise`` elsewhere.

  Every leaf of ``opt_state`` that is a per-example field (see
  :func:`example_tables`) becomes ``fn(leaf, axis)``; every other leaf becomes
  ``otherwise(leaf)``. Used to build shardings that split those fields by
  example and replicate the rest.
  """
  is_table = _declares("EXAMPLE_AXES")

  def node(x):
    if not is_table(x):
      return otherwise(x)
    axes: Mapping[str, int] = type(x).EXAMPLE_AXES
    return type(x)(**{
        f: (fn(getattr(x, f), axes[f]) if f in axes
            else jax.tree.map(otherwise, getattr(x, f)))
        for f in x._fields
    })

  return jax.tree.map(node, opt_state, is_leaf=is_table)


def tracks_model_state(opt_state: Any) -> bool:
  """Whether a state keeps a copy of the model state (``TRACKS_MODEL_STATE``)."""
  return bool(_find(opt_state, "TRACKS_MODEL_STATE"))


def attach_model_state(opt_state: Any, model_state: Any) -> Any:
  """Hands ``model_state`` to every state that tracks one; others unchanged.

  Each such state class provides ``with_model_state(model_state)``, which
  returns the state holding its own copy (never the caller's buffers, so a
  step may donate both).
  """
  is_tracker = _declares("TRACKS_MODEL_STATE")
  return jax.tree.map(
      lambda x: x.with_model_state(model_state) if is_tracker(x) else x,
      opt_state, is_leaf=is_tracker)


def float_collections(model_state: Any) -> dict:
  """The collections of a model state whose leaves are all floating point.

  What a state that tracks the model state averages (BatchNorm statistics),
  leaving out integer or key-valued collections (counters, nnx rng streams).
  """
  out = {}
  for name, value in dict(model_state).items():
    leaves = jax.tree.leaves(value)
    if leaves and all(jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating)
                      for x in leaves):
      out[name] = value
  return out


def full_step_at(state: Any, count: int, period: int) -> bool:
  """Whether update number ``count`` of a host-scheduled ``state`` is full.

  ``count % period == 0`` (LookSAM), unless the state's class gives its own
  rule, ``full_step_at(count, period)``.
  """
  rule = getattr(type(state), "full_step_at", None)
  if rule is not None:
    return bool(rule(count, period))
  return count % period == 0


def full_step_flag(full_step: Any, name: str, rule: str) -> Optional[bool]:
  """A host-scheduled ``update``'s ``full_step``: None, or a bool known at trace time.

  ``rule`` is the host-side formula the error message suggests (e.g.
  ``"count % period == 0"``). Raises a ``TypeError`` for anything else (a
  traced value).
  """
  if full_step is None or isinstance(full_step, bool):
    return full_step
  if isinstance(full_step, np.bool_):
    return bool(full_step)
  raise TypeError(
      f"sharpjax.{name}: full_step must be a Python bool known when the step "
      f"is traced, got {type(full_step).__name__}. Compute it on the host as "
      f"{rule} from the state's count and period (and mark it static, e.g. "
      "jax.jit(..., static_argnums=...)), or leave it out to let the step "
      "decide on the device."
  )


def full_step_share(state: Any, total_steps: Optional[int] = None) -> float:
  """The share of a host-scheduled ``state``'s updates that are full steps.

  ``1 / period`` (LookSAM), unless the state's class gives its own,
  ``full_step_share(period, total_steps)``; ``total_steps`` is the state's
  field of that name when it has one and the argument is None. Reads the
  state's ``period`` from the device (for cost reports, not inside a step).
  """
  period = int(np.ravel(jax.device_get(state.period))[0])
  rule = getattr(type(state), "full_step_share", None)
  if rule is None:
    return 1.0 / period
  if total_steps is None and "total_steps" in state._fields:
    total_steps = int(np.ravel(jax.device_get(state.total_steps))[0])
  return float(rule(period, total_steps))


def _walk(tree: Any, attribute: str, into_multisteps: bool) -> list[tuple]:
  """``(state, inside_multisteps)`` for every state declaring ``attribute``."""
  found = []
  is_node = _declares(attribute)

  def walk(x, inside):
    if isinstance(x, optax.MultiStepsState):
      if into_multisteps:
        for y in x:
          walk(y, True)
      return
    if is_node(x):
      found.append((x, inside))
      return
    if isinstance(x, (tuple, list)):
      for y in x:
        walk(y, inside)
    elif isinstance(x, dict):
      for y in x.values():
        walk(y, inside)

  walk(tree, False)
  return found


def host_scheduled(opt_state: Any) -> list[Any]:
  """The states whose full steps follow a host-known period (``HOST_SCHEDULED``).

  A state nested inside ``optax.MultiSteps`` is left out: there the inner
  count advances once per accumulated step, not once per call, so the loop's
  count does not predict it.
  """
  return [s for s, _ in _walk(opt_state, "HOST_SCHEDULED",
                              into_multisteps=False)]


class StepPasses(NamedTuple):
  """What a method that runs its own passes (``PASSES = "own"``) reports.

  The method's clean passes (at the step's parameters) give the step's
  per-example losses, and the aux the loop's ``loss_fn`` returned with them
  (the trainer's: new model state, logits, task losses, penalties).

  Attributes:
    losses: float32 ``[n]``, the per-example losses (``loss_fn``'s first
      output) of the examples the passes covered.
    aux: ``loss_fn``'s aux of each pass (None without ``has_aux``), stacked
      along a new leading axis of one entry per pass: ``k`` passes over
      ``n / k`` examples each (mSAM's chunks in order; ``k = 1`` for AUSAM's
      one sample). A per-example entry of the aux is then ``[k, n / k,
      ...]``, a model state ``[k, ...]`` (the loop averages it over passes).
    examples: int32 ``[n]``, the rows of the batch the losses belong to, or
      None when they are the whole batch in order.
  """

  losses: jax.Array
  aux: Any
  examples: Optional[jax.Array] = None


def _passes_state(opt_state: Any) -> tuple[Any, str, bool]:
  """The one state that declares ``PASSES`` (or None), the kind it asks, and
  whether it sits inside ``optax.MultiSteps``."""
  found = [(s, inside) for s, inside in _walk(opt_state, "PASSES", True)
           if type(s).PASSES != CLEAN]
  if not found:
    return None, CLEAN, False
  if len(found) > 1:
    raise ValueError(
        "sharpjax: the optimizer state holds several states that choose where "
        f"the step's gradients are taken ({', '.join(type(s).__name__ for s, _ in found)}); "
        "a chain takes at most one such method.")
  state, inside_multisteps = found[0]
  kind = type(state).PASSES
  if kind not in _KINDS:
    raise ValueError(f"{type(state).__name__}.PASSES must be one of {_KINDS}, "
                     f"got {kind!r}.")
  if kind == OWN and (inside_multisteps or _has_trajectory_state(opt_state)):
    # Inside MultiSteps the loop's gradient is accumulated, and SAF/MESA read
    # the clean pass's logits: the method then runs as with any caller that
    # passes a clean gradient (its own passes still run, the loop's too).
    return state, CLEAN, inside_multisteps
  return state, kind, inside_multisteps


def _has_trajectory_state(opt_state: Any) -> bool:
  """Whether the chain holds SAF or MESA (they read the clean pass's logits)."""
  types = tuple(trajectory_loss.STATE_TYPES)
  is_match = lambda x: bool(types) and isinstance(x, types)
  return any(is_match(x)
             for x in jax.tree.leaves(opt_state, is_leaf=is_match))


def passes(opt_state: Any) -> str:
  """Where a step's gradients are taken: ``"clean"``, ``"points"`` or ``"own"``.

  ``"clean"``: one forward-backward pass at the current parameters, its
  gradient passed to ``update`` (every plain optax optimizer, and most
  sharpjax methods, which run their extra passes inside ``update``).
  ``"points"``: one gradient at each of :func:`gradient_points`, and none at
  the current parameters. ``"own"``: no pass at all outside ``update``: the
  method runs its own passes on its own examples (AUSAM, mSAM); call
  ``update`` with zeros as the gradient and ``report_passes=True``, then
  :func:`pop_step_passes` gives the step's per-example losses and aux.

  An ``"own"`` method asks for the clean pass after all when it sits inside
  ``optax.MultiSteps`` (which accumulates the loop's gradient) or shares the
  chain with SAF or MESA (which read the clean pass's logits).

  Example:
    >>> import optax, jax.numpy as jnp, sharpjax as sj
    >>> params = {"w": jnp.zeros(2)}
    >>> sj.passes(optax.chain(sj.sam(), optax.sgd(0.1)).init(params))
    'clean'
    >>> sj.passes(optax.chain(sj.msam(num_chunks=4),
    ...                       optax.sgd(0.1)).init(params))
    'own'
  """
  return _passes_state(opt_state)[1]


def gradient_points(opt_state: Any, params: Any) -> tuple:
  """The parameters at which a step's gradients are to be taken.

  ``(params,)`` for a chain that takes the clean gradient, the method's
  points for one that declares ``PASSES = "points"`` (the first is the one
  whose gradient is ``update``'s first argument and whose losses are the
  step's), and ``()`` when the method runs its own passes (:func:`passes`).
  For a user's own loop, as ``optax.contrib.schedule_free_eval_params``
  gives schedule-free's evaluation point.

  Example:
    >>> import optax, jax.numpy as jnp, sharpjax as sj
    >>> params = {"w": jnp.ones(2)}
    >>> opt_state = optax.chain(sj.sam(), optax.sgd(0.1)).init(params)
    >>> sj.gradient_points(opt_state, params)
    ({'w': Array([1., 1.], dtype=float32)},)
  """
  state, kind, inside = _passes_state(opt_state)
  if kind == CLEAN:
    return (params,)
  if kind == OWN:
    return ()
  points = tuple(state.gradient_points(params))
  if not points:
    raise ValueError(f"{type(state).__name__}.gradient_points returned no "
                     "point.")
  if inside and len(points) > 1:
    raise ValueError(
        f"sharpjax: {type(state).__name__} takes gradients at {len(points)} "
        "points, which optax.MultiSteps cannot accumulate (it accumulates "
        "one gradient). Accumulate over a larger batch instead (a mesh or "
        "make_trainer with a bigger batch), without MultiSteps.")
  return points


def pop_step_passes(opt_state: Any) -> tuple[Optional[StepPasses], Any]:
  """``(record, opt_state)``: the :class:`StepPasses` an ``"own"`` method left.

  After ``update(..., report_passes=True)`` the method's state carries the
  step's per-example losses and aux in its ``passes`` field; this takes them
  out, so the state keeps the structure of ``tx.init``'s (None otherwise).

  Example:
    >>> import jax, jax.numpy as jnp, optax, sharpjax as sj
    >>> tx = optax.chain(sj.msam(rho=0.1, num_chunks=2), optax.sgd(0.1))
    >>> params = {"w": jnp.array([1.0, -2.0])}
    >>> batch = {"x": jnp.eye(2)}
    >>> loss_fn = lambda p, b: 0.5 * (b["x"] @ p["w"]) ** 2
    >>> zeros = jax.tree.map(jnp.zeros_like, params)
    >>> updates, state = tx.update(zeros, tx.init(params), params,
    ...                            loss_fn=loss_fn, batch=batch,
    ...                            report_passes=True)
    >>> record, state = sj.pop_step_passes(state)
    >>> record.losses  # the clean per-example losses of the two chunks
    Array([0.5, 2. ], dtype=float32)
  """
  is_node = _declares("PASSES")
  records = []

  def take(x):
    if is_node(x) and "passes" in x._fields and x.passes is not None:
      records.append(x.passes)
      return x._replace(passes=None)
    return x

  opt_state = jax.tree.map(take, opt_state, is_leaf=is_node)
  return (records[0] if records else None), opt_state
