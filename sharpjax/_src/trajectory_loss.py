r"""The tempered KL to past outputs that SAF and MESA both add to the loss.

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

This module sits below the methods (``saf.py``, ``mesa.py``), which build on
its pieces; :mod:`sharpjax._src.trajectory` sits above them and finds their
state in an optimizer state. A method's state joins with
:func:`register_trajectory_state` and says itself how its penalty is computed
(a ``trajectory_penalty`` method), so nothing above tests a state's type.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

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


# State types of the trajectory regularizers (SAF, MESA, ...). Each defines
#   trajectory_penalty(self, logits, *, ids, teacher_fn, teacher_logits,
#                      per_example) -> jax.Array
# and ignores the arguments its method does not use, so a caller can pass all
# of them without knowing which method it drives.
STATE_TYPES: list[type] = []


def register_trajectory_state(state_type: type) -> type:
  """Class decorator: ``state_type`` is the state of a trajectory regularizer.

  :func:`sharpjax.find_trajectory_state` finds states of the registered types,
  and :func:`sharpjax.trajectory_penalty` calls their ``trajectory_penalty``
  method.
  """
  if not callable(getattr(state_type, "trajectory_penalty", None)):
    raise TypeError(
        f"{state_type.__name__} must define trajectory_penalty(self, logits, "
        "*, ids, teacher_fn, teacher_logits, per_example) to be registered as "
        "a trajectory state."
    )
  if state_type not in STATE_TYPES:
    STATE_TYPES.append(state_type)
  return state_type


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


def check_logits(logits: jax.Array, num_classes: int | None, name: str) -> int:
  """Trace-time check that logits are [B, C]; returns B."""
  shape = jnp.shape(logits)
  if len(shape) != 2 or (num_classes is not None and shape[1] != num_classes):
    want = f"[B, {num_classes}]" if num_classes is not None else "[B, C]"
    raise ValueError(
        f"sharpjax.{name}: logits must have shape {want}, got {shape}."
    )
  return shape[0]
