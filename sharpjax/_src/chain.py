r"""Where a sharpness-aware transformation may sit in an optax program.

A SAM-family transformation turns the *clean* gradient of the loss into a
sharpness-aware one by running its own passes on ``loss_fn`` and ``batch``.
That is only right in some places of an optax program, and each wrong place
gives a wrong number without an error:

- **Not first in the chain.** ``optax.chain(optax.sgd(lr), sj.sam(rho))``
  hands SAM an update instead of a gradient (it then ascends);
  ``optax.chain(optax.clip_by_global_norm(c), sj.sam(rho), ...)`` clips a
  gradient SAM never returns (its direction comes from its own pass), so
  the clipping is undone. Clipping goes *after* the SAM-family
  transformation: ``optax.chain(sj.sam(rho), optax.clip_by_global_norm(c),
  optax.sgd(lr))``. Only transformations that hand the gradient on unchanged
  (SAF, MESA: they declare ``PASSES_GRADIENT``) may precede it.
- **Inside optax.MultiSteps.** ``optax.MultiSteps(optax.chain(sj.sam(rho),
  base), k)`` perturbs with the accumulated gradient but keeps only the last
  micro-batch's perturbed gradient; SAF inside it records one batch in k.
  Accumulate *behind* it: ``optax.chain(sj.sam(rho), optax.MultiSteps(base,
  k))`` gives the mean over the micro-batches of each one's sharpness-aware
  gradient (mSAM with one chunk per micro-batch), and every micro-batch is
  recorded by SAF.
- **Inside optax.masked / optax.multi_transform.** The perturbed pass must
  see every parameter; perturb only some with ``mask=`` on the SAM-family
  transformation (``sj.sam(rho, mask=...)``).

:func:`check_chain` finds these from the optimizer state alone (a state
declares what it is, as in :mod:`sharpjax._src.protocol`), so methods added
later are covered. :func:`sharpjax.training.make_trainer` calls it; a loop of
one's own calls it once after ``tx.init``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

# The declarations a state class may carry (plain class attributes).
FIRST_IN_CHAIN = "FIRST_IN_CHAIN"
PASSES_GRADIENT = "PASSES_GRADIENT"

_SHAPE_PROBE = {"w": jax.ShapeDtypeStruct((2,), jnp.float32)}


def _declares(x: Any, attribute: str) -> bool:
  return isinstance(x, tuple) and bool(getattr(type(x), attribute, False))


def _children(x: Any) -> list:
  if isinstance(x, (tuple, list)):
    return list(x)
  if isinstance(x, dict):
    return list(x.values())
  return []


def _nodes(x: Any):
  yield x
  for child in _children(x):
    yield from _nodes(child)


def _first(x: Any, attribute: str) -> Any:
  return next((n for n in _nodes(x) if _declares(n, attribute)), None)


def _passes(x: Any) -> bool:
  """Whether the transformation whose state is ``x`` hands gradients on."""
  if _declares(x, PASSES_GRADIENT):
    return True
  if type(x) is tuple:  # pylint: disable=unidiomatic-typecheck
    return all(_passes(e) for e in x)
  if isinstance(x, optax.InjectHyperparamsState):
    return _passes(x.inner_state)
  return False


def _name(x: Any) -> str:
  if type(x) is tuple:  # pylint: disable=unidiomatic-typecheck
    return "an optax.chain of (" + ", ".join(_name(e) for e in x) + ")"
  return type(x).__name__


def _what(state: Any) -> str:
  if _declares(state, FIRST_IN_CHAIN):
    return f"a SAM-family transformation (state {type(state).__name__})"
  return f"a trajectory regularizer (state {type(state).__name__})"


def _right_chain(state: Any) -> str:
  if _declares(state, FIRST_IN_CHAIN):
    return "optax.chain(sj.sam(rho), optax.MultiSteps(base_optimizer, k))"
  return "optax.chain(sj.saf(...), optax.MultiSteps(base_optimizer, k))"


def _refuse(message: str) -> None:
  raise ValueError("sharpjax.check_chain: " + message)


def _walk(x: Any) -> None:
  if isinstance(x, optax.MultiStepsState):
    inner = _first(x, FIRST_IN_CHAIN) or _first(x, PASSES_GRADIENT)
    if inner is not None:
      _refuse(
          f"optax.MultiSteps wraps {_what(inner)}, which must see every "
          "micro-batch (a SAM-family step would perturb with the accumulated "
          "gradient and keep the last micro-batch's perturbed gradient only; "
          "SAF would record one batch in k); accumulate behind it instead: "
          f"{_right_chain(inner)}.")
    return
  if isinstance(x, optax.MaskedState):
    inner = _first(x, FIRST_IN_CHAIN)
    if inner is not None:
      _refuse(
          f"{_what(inner)} is inside optax.masked or optax.multi_transform, "
          "where its perturbed pass cannot see the other parameters; perturb "
          "only some parameters with a mask on the transformation itself, "
          "first in the chain: optax.chain(sj.sam(rho, mask=mask), "
          "base_optimizer).")
    return
  if _declares(x, FIRST_IN_CHAIN):
    return
  if type(x) is tuple:  # pylint: disable=unidiomatic-typecheck
    # An optax.chain: whatever precedes a SAM-family transformation must hand
    # the gradient on unchanged.
    before = []
    for element in x:
      inner = _first(element, FIRST_IN_CHAIN)
      if inner is not None:
        changed = [_name(n) for n in before if not _passes(n)]
        if changed:
          _refuse(
              f"{_what(inner)} is not first in the chain: it follows "
              f"{', '.join(changed)}, which changes the gradient it needs. "
              "Put it first (only sj.saf or sj.mesa may precede it) and "
              "clipping or weight decay after it: optax.chain(sj.sam(rho), "
              "optax.clip_by_global_norm(c), optax.sgd(lr)).")
      before.append(element)
  for child in _children(x):
    _walk(child)


def _is_transformation(x: Any) -> bool:
  """A transformation (optax.MultiSteps is not a GradientTransformation but
  has init and update), as opposed to a state."""
  return (isinstance(x, optax.GradientTransformation)
          or (callable(getattr(x, "init", None))
              and callable(getattr(x, "update", None))))


def check_chain(tx_or_state: Any) -> None:
  r"""Refuses a chain in which a sharpness-aware transformation gives wrong numbers.

  Raises a ``ValueError`` of one line naming the chain that works when

  - a SAM-family transformation is not first in its ``optax.chain`` (only
    SAF or MESA may precede it; clipping and weight decay go after it);
  - ``optax.MultiSteps`` wraps a SAM-family, SAF or MESA transformation
    (accumulate behind it: ``optax.chain(sj.sam(rho),
    optax.MultiSteps(base_optimizer, k))``);
  - a SAM-family transformation is inside ``optax.masked`` or
    ``optax.multi_transform`` (use ``mask=`` on the transformation).

  It reads the structure of the optimizer state only (what each state class
  declares: ``FIRST_IN_CHAIN`` for every transformation built on
  :func:`sharpjax.sharpness_aware`, ``PASSES_GRADIENT`` for SAF and MESA),
  so it costs nothing on the device.
  :func:`sharpjax.training.make_trainer` calls it; call it once in a loop of
  your own.

  Args:
    tx_or_state: an optimizer state (what ``tx.init(params)`` returned), or
      the transformation itself (then its state is built abstractly, with
      ``jax.eval_shape``, for a two-element parameter vector).

  Example:
    >>> import optax, sharpjax as sj
    >>> sj.check_chain(optax.chain(sj.sam(0.05), optax.sgd(0.1)))  # fine
    >>> sj.check_chain(optax.chain(optax.sgd(0.1), sj.sam(0.05)))
    Traceback (most recent call last):
    ...
    ValueError: sharpjax.check_chain: a SAM-family transformation ...
  """
  if _is_transformation(tx_or_state):
    try:
      state = jax.eval_shape(tx_or_state.init, _SHAPE_PROBE)
    except Exception as e:  # pylint: disable=broad-except
      raise ValueError(
          "sharpjax.check_chain: this transformation's init does not accept "
          f"a probe parameter vector ({type(e).__name__}); pass the state, "
          "check_chain(tx.init(params)).") from None
  else:
    state = tx_or_state
  _walk(state)


def check_chain_if_possible(tx: optax.GradientTransformation) -> None:
  """:func:`check_chain` on ``tx`` where its init takes a probe vector.

  For a trainer's construction: a transformation whose init needs the real
  parameters (a mask shaped like them) is checked on its state later.
  """
  try:
    state = jax.eval_shape(tx.init, _SHAPE_PROBE)
  except Exception:  # pylint: disable=broad-except
    return
  _walk(state)
