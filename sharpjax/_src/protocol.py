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
  knows the count on the host compiles one step per branch.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import optax


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


def host_scheduled(opt_state: Any) -> list[Any]:
  """The states whose full steps follow a host-known period (``HOST_SCHEDULED``).

  A state nested inside ``optax.MultiSteps`` is left out: there the inner
  count advances once per accumulated step, not once per call, so the loop's
  count does not predict it.
  """
  found = []

  def walk(x):
    if isinstance(x, optax.MultiStepsState):
      return
    if _declares("HOST_SCHEDULED")(x):
      found.append(x)
      return
    if isinstance(x, (tuple, list)):
      for y in x:
        walk(y)
    elif isinstance(x, dict):
      for y in x.values():
        walk(y)

  walk(opt_state)
  return found
