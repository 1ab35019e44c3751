r"""What SAF and MESA share: the tempered KL penalty and finding their state.

Both methods add to the training loss a distillation term against the network's
own past outputs,

.. math::
  L^{tra} = \lambda\,\tau^2\,\frac{1}{|V|}\sum_{i \in V}
  \mathrm{KL}\big(\mathrm{softmax}(z^{past}_i/\tau)\,\|\,
  \mathrm{softmax}(z_i/\tau)\big),

where :math:`z_i` are the current logits, :math:`z^{past}_i` the target (SAF: the
logits recorded for example :math:`i` a few epochs ago; MESA: the output of an
EMA teacher), and :math:`V` the examples that have a target. Gradients flow only
through :math:`z_i`.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from sharpjax._src import base
from sharpjax._src import diagnostics as diagnostics_lib


class TrajectoryDiagnostics(NamedTuple):
  """What the last SAF/MESA update saw.

  Attributes:
    epoch: the epoch (0-indexed) of the last update.
    penalty_active: whether the penalty was on in that epoch.
    dropped_ids: SAF only: how many out-of-range ids were ignored so far
      (always 0 for MESA).
  """

  epoch: jax.Array
  penalty_active: jax.Array
  dropped_ids: jax.Array


diagnostics_lib.register_record(TrajectoryDiagnostics)


def init_diagnostics() -> TrajectoryDiagnostics:
  return TrajectoryDiagnostics(
      epoch=jnp.zeros([], jnp.int32),
      penalty_active=jnp.zeros([], jnp.bool_),
      dropped_ids=jnp.zeros([], jnp.int32),
  )


def tempered_kl(
    target_logits: jax.Array, logits: jax.Array, temperature: jax.Array
) -> jax.Array:
  r"""Per-example :math:`\mathrm{KL}(\mathrm{softmax}(t/\tau)\|\mathrm{softmax}(z/\tau))`.

  Computed with ``log_softmax`` in float32; the target is a constant.
  """
  target = jax.lax.stop_gradient(target_logits.astype(jnp.float32))
  log_p = jax.nn.log_softmax(target / temperature, axis=-1)
  log_q = jax.nn.log_softmax(logits.astype(jnp.float32) / temperature, axis=-1)
  return jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)


def masked_penalty(
    kl: jax.Array,
    valid: jax.Array,
    temperature: jax.Array,
    strength: jax.Array,
    per_example: bool,
) -> jax.Array:
  r""":math:`\lambda\tau^2` times the mean KL over the valid examples.

  With ``per_example=True`` returns a [B] vector whose mean is that penalty,
  for use inside a SAM-family ``loss_fn`` that returns per-example losses.
  """
  valid = valid.astype(jnp.float32)
  num_valid = jnp.maximum(jnp.sum(valid), 1.0)
  scale = strength * temperature**2
  if per_example:
    return scale * kl * valid * (kl.shape[0] / num_valid)
  return scale * jnp.sum(kl * valid) / num_valid


def epoch_of(count: jax.Array, steps_per_epoch: jax.Array) -> jax.Array:
  return count // steps_per_epoch


def _state_types() -> tuple[type, ...]:
  # Imported here: saf.py and mesa.py import this module.
  from sharpjax._src import mesa
  from sharpjax._src import saf

  return (saf.SAFState, mesa.MESAState)


def find_trajectory_state(opt_state: Any) -> Any:
  """The SAF or MESA state inside an optimizer state, or None if there is none.

  Looks through nested ``optax.chain`` states, ``inject_hyperparams`` and
  ``MultiSteps`` wrappers.

  Raises:
    ValueError: if the state holds more than one SAF/MESA state.
  """
  found = base.find_states(opt_state, _state_types())
  if len(found) > 1:
    raise ValueError(
        "sharpjax: the optimizer state holds several SAF/MESA states; a chain "
        "takes at most one trajectory regularizer."
    )
  return found[0] if found else None


def check_logits(logits: jax.Array, num_classes: int | None, name: str) -> int:
  """Trace-time check that logits are [B, C]; returns B."""
  shape = jnp.shape(logits)
  if len(shape) != 2 or (num_classes is not None and shape[1] != num_classes):
    want = f"[B, {num_classes}]" if num_classes is not None else "[B, C]"
    raise ValueError(
        f"sharpjax.{name}: logits must have shape {want}, got {shape}."
    )
  return shape[0]


def trajectory_penalty(
    opt_state: Any,
    logits: jax.Array,
    ids: jax.Array | None = None,
    *,
    teacher_fn=None,
    teacher_logits: jax.Array | None = None,
    per_example: bool = False,
) -> jax.Array:
  r"""The SAF or MESA penalty to add to the loss, read from the optimizer state.

  .. math::
    \lambda\,\tau^2\,\frac{1}{|V|}\sum_{i\in V}
    \mathrm{KL}\big(\mathrm{softmax}(z^{past}_i/\tau)\,\|\,
    \mathrm{softmax}(z_i/\tau)\big)

  and 0 before ``start_epoch``. For SAF the target of example ``i`` is the row
  of the logit bank written for it exactly ``delay_epochs`` epochs ago, and
  :math:`V` holds the examples that have one. For MESA the target is the EMA
  teacher's output on the same batch and :math:`V` is the whole batch.

  Args:
    opt_state: the optimizer state of a chain holding :func:`sharpjax.saf` or
      :func:`sharpjax.mesa` (anywhere: nested chains, ``inject_hyperparams``,
      ``MultiSteps``). Use the state *before* this step's update.
    logits: this step's logits, shape [B, C]. The gradient flows through them.
    ids: SAF only: dataset indices of the examples, shape [B], in
      ``[0, num_examples)``; out-of-range ids contribute nothing.
    teacher_fn: MESA only: ``teacher_fn(teacher_params, teacher_model_state)``
      returning the teacher's logits on this batch (run the model in eval
      mode). It is only evaluated from ``start_epoch`` on (``lax.cond``).
    teacher_logits: MESA only: the teacher's logits, if already computed
      (then ``teacher_fn`` is not needed).
    per_example: return a [B] vector whose mean is the penalty, to add to the
      per-example losses of a SAM-family ``loss_fn``.

  Returns:
    A float32 scalar (or [B] vector with ``per_example=True``).

  Example:
    >>> import jax.numpy as jnp, optax, sharpjax as sj
    >>> tx = optax.chain(sj.saf(num_examples=100, num_classes=3,
    ...                         steps_per_epoch=10), optax.sgd(0.1))
    >>> state = tx.init({"w": jnp.zeros(2)})
    >>> sj.trajectory_penalty(state, jnp.zeros((4, 3)), jnp.arange(4))
    Array(0., dtype=float32)
  """
  from sharpjax._src import mesa
  from sharpjax._src import saf

  state = find_trajectory_state(opt_state)
  if state is None:
    raise ValueError(
        "sharpjax.trajectory_penalty: no SAF or MESA state in this optimizer "
        "state. Put sj.saf(...) or sj.mesa(...) in the chain, e.g. "
        "optax.chain(sj.saf(...), optax.sgd(...))."
    )
  if isinstance(state, saf.SAFState):
    if ids is None:
      raise TypeError(
          "sharpjax.trajectory_penalty: SAF needs the ids of the examples "
          "(their dataset indices): trajectory_penalty(opt_state, logits, ids)."
      )
    return saf.penalty(state, logits, ids, per_example=per_example)
  assert isinstance(state, mesa.MESAState)
  return mesa.penalty(
      state, logits, teacher_fn=teacher_fn, teacher_logits=teacher_logits,
      per_example=per_example,
  )
