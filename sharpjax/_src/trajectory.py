r"""Finding a trajectory regularizer's state and reading its penalty.

SAF and MESA add to the training loss a distillation term against the
network's own past outputs (:mod:`sharpjax._src.trajectory_loss` holds the
pieces they share). This module sits above both: it finds their state inside
an optimizer state and asks that state for its penalty, without knowing which
method it holds.
"""

from __future__ import annotations

from typing import Any

import jax

from sharpjax._src import base
# Imported for their registration as trajectory states.
from sharpjax._src import mesa  # pylint: disable=unused-import
from sharpjax._src import saf  # pylint: disable=unused-import
from sharpjax._src import trajectory_loss

# Re-exported: sharpjax.TrajectoryDiagnostics.
TrajectoryDiagnostics = trajectory_loss.TrajectoryDiagnostics


def find_trajectory_state(opt_state: Any) -> Any:
  """The SAF or MESA state inside an optimizer state, or None if there is none.

  Looks through nested ``optax.chain`` states, ``inject_hyperparams`` and
  ``MultiSteps`` wrappers for a state of any registered trajectory
  regularizer.

  Raises:
    ValueError: if the state holds more than one SAF/MESA state.

  Example:
    >>> import jax.numpy as jnp, optax, sharpjax as sj
    >>> tx = optax.chain(sj.mesa(start_epoch=0), optax.sgd(0.1))
    >>> type(sj.find_trajectory_state(tx.init({"w": jnp.zeros(2)}))).__name__
    'MESAState'
    >>> sj.find_trajectory_state(optax.sgd(0.1).init({"w": jnp.zeros(2)}))
  """
  found = base.find_states(opt_state, tuple(trajectory_loss.STATE_TYPES))
  if len(found) > 1:
    raise ValueError(
        "sharpjax: the optimizer state holds several SAF/MESA states; a chain "
        "takes at most one trajectory regularizer."
    )
  return found[0] if found else None


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

  Each method reads the arguments it needs and ignores the others, so a
  trainer can pass ``ids`` and ``teacher_fn`` together without knowing which
  method the chain holds.

  Args:
    opt_state: the optimizer state of a chain holding :func:`sharpjax.saf` or
      :func:`sharpjax.mesa` (anywhere: nested chains, ``inject_hyperparams``,
      ``MultiSteps``). Use the state *before* this step's update.
    logits: this step's logits, shape [B, C]. The gradient flows through them.
    ids: SAF (required; ignored by MESA): dataset indices of the examples,
      shape [B], in ``[0, num_examples)``; out-of-range ids contribute
      nothing.
    teacher_fn: MESA (ignored by SAF): ``teacher_fn(teacher_params, teacher_model_state)``
      returning the teacher's logits on this batch (run the model in eval
      mode). It is only evaluated from ``start_epoch`` on (``lax.cond``).
    teacher_logits: MESA (ignored by SAF): the teacher's logits, if already computed
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
  state = find_trajectory_state(opt_state)
  if state is None:
    raise ValueError(
        "sharpjax.trajectory_penalty: no SAF or MESA state in this optimizer "
        "state. Put sj.saf(...) or sj.mesa(...) in the chain, e.g. "
        "optax.chain(sj.saf(...), optax.sgd(...))."
    )
  return state.trajectory_penalty(
      logits, ids=ids, teacher_fn=teacher_fn, teacher_logits=teacher_logits,
      per_example=per_example,
  )
