r"""MESA: SAF's memory-efficient variant, with an EMA teacher in the state."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from sharpjax._src import base
from sharpjax._src import trajectory

TeacherFn = Callable[[Any, Any], jax.Array]


class MESAState(NamedTuple):
  """State of :func:`mesa`.

  Attributes:
    count: number of updates taken (int32).
    teacher_params: the EMA of the parameters, in float32 (a bfloat16 EMA
      would not move: 1 - decay is below its resolution).
    teacher_model_state: the EMA of the model state (e.g. BatchNorm
      statistics), float32; ``()`` until :func:`init_teacher_model_state`.
    decay, temperature, strength: float32 scalars.
    start_epoch, steps_per_epoch: int32 scalars.
    diagnostics: epoch and whether the penalty is on.
  """

  count: jax.Array
  teacher_params: Any
  teacher_model_state: Any
  decay: jax.Array
  temperature: jax.Array
  strength: jax.Array
  start_epoch: jax.Array
  steps_per_epoch: jax.Array
  diagnostics: trajectory.TrajectoryDiagnostics

  TRACKS_MODEL_STATE = True

  def with_model_state(self, model_state: Any) -> "MESAState":
    """This state with its teacher tracking ``model_state`` (a float32 copy)."""
    return self._replace(teacher_model_state=_to_f32(model_state))


def _to_f32(tree):
  # A copy even for float32 leaves: the teacher must not share buffers with
  # the student, or a step that donates both fails.
  return jax.tree.map(lambda x: jnp.array(x, jnp.float32, copy=True), tree)


def mesa(
    decay: float = 0.9998,
    temperature: float = 5.0,
    strength: float = 0.8,
    start_epoch: int = 5,
    *,
    steps_per_epoch: Optional[int] = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Memory-Efficient Sharpness-Aware training: SAF with an EMA teacher.

  The teacher is an exponential moving average of the parameters,

  .. math::
    v_0 = \theta_0, \qquad v_{t+1} = d\, v_t + (1 - d)\, \theta_t,

  updated by every ``update`` call from step 0 with the parameters
  :math:`\theta_t` of that step, and, when the model has it, of its state
  (BatchNorm statistics; see :func:`init_teacher_model_state`). From
  ``start_epoch`` on, the loss gains

  .. math::
    \lambda\,\tau^2\,\frac{1}{|B|}\sum_{i\in B}
    \mathrm{KL}\big(\mathrm{softmax}(f_{v}(x_i)/\tau)\,\|\,
    \mathrm{softmax}(f_\theta(x_i)/\tau)\big),

  read with :func:`sharpjax.trajectory_penalty` and a ``teacher_fn`` that runs
  the model in eval mode with the teacher's parameters on the same batch. No
  teacher forward runs before ``start_epoch`` (``lax.cond``), so early epochs
  cost what SGD costs; afterwards one extra forward (no backward).

  The teacher at step :math:`t` averages :math:`\theta_0..\theta_{t-1}`: one
  step behind timm's ``ModelEmaV2`` in the official code, which folds in the
  current parameters after the optimizer step; with :math:`d = 0.9998` that
  is a weight of 2e-4 on one step. Memory: one float32 copy of the parameters
  (and of the model state).

  Args:
    decay: :math:`d`, in [0, 1) (paper: 0.9998).
    temperature: :math:`\tau` (> 0; paper: 5).
    strength: :math:`\lambda` (>= 0; paper: 0.8).
    start_epoch: first epoch with the penalty (>= 0; paper: 5).
    steps_per_epoch: optimizer steps per epoch, to place ``start_epoch``;
      needed when ``start_epoch > 0``.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` that passes the gradient
    through unchanged; its ``update`` accepts the extra argument
    ``model_state`` (required once the teacher tracks a model state).

  Example:
    >>> import optax, sharpjax as sj
    >>> tx = optax.chain(sj.mesa(steps_per_epoch=100), optax.sgd(0.1))

  References:
    Du et al., Sharpness-Aware Training for Free, NeurIPS 2022.
    https://arxiv.org/abs/2205.14083
  """
  base.check_range("decay", decay, low=0.0, high=1.0, high_inclusive=False)
  base.check_range("temperature", temperature, low=0.0, low_inclusive=False)
  base.check_range("strength", strength, low=0.0)
  start_epoch = base.check_int("start_epoch", start_epoch, low=0)
  if steps_per_epoch is None:
    if start_epoch > 0:
      raise ValueError(
          f"sharpjax.mesa: start_epoch={start_epoch} needs steps_per_epoch "
          "(an integer >= 1) to know when that epoch begins."
      )
    steps_per_epoch = 1
  steps_per_epoch = base.check_int("steps_per_epoch", steps_per_epoch, low=1)

  def init_fn(params):
    return MESAState(
        count=jnp.zeros([], jnp.int32),
        teacher_params=_to_f32(params),
        teacher_model_state=(),
        decay=jnp.asarray(decay, jnp.float32),
        temperature=jnp.asarray(temperature, jnp.float32),
        strength=jnp.asarray(strength, jnp.float32),
        start_epoch=jnp.asarray(start_epoch, jnp.int32),
        steps_per_epoch=jnp.asarray(steps_per_epoch, jnp.int32),
        diagnostics=trajectory.init_diagnostics(),
    )

  def update_fn(updates, state, params=None, *, model_state=None,
                **extra_args):
    del extra_args
    if params is None:
      raise TypeError(
          "sharpjax.mesa: update() needs params (the teacher is their EMA): "
          "tx.update(grads, opt_state, params)."
      )
    d = jnp.asarray(decay, jnp.float32)
    ema = lambda v, x: d * v + (1.0 - d) * jnp.asarray(x, jnp.float32)
    teacher_model_state = state.teacher_model_state
    if jax.tree.leaves(teacher_model_state):
      if model_state is None:
        raise TypeError(
            "sharpjax.mesa: the teacher tracks a model state; pass this "
            "step's model_state= (e.g. the new batch_stats) to update()."
        )
      teacher_model_state = jax.tree.map(ema, teacher_model_state,
                                         model_state)
    epoch = trajectory.epoch_of(state.count, state.steps_per_epoch)
    new_state = state._replace(
        count=optax.safe_increment(state.count),
        teacher_params=jax.tree.map(ema, state.teacher_params, params),
        teacher_model_state=teacher_model_state,
        decay=d,
        temperature=jnp.asarray(temperature, jnp.float32),
        strength=jnp.asarray(strength, jnp.float32),
        diagnostics=state.diagnostics._replace(
            epoch=epoch, penalty_active=epoch >= state.start_epoch),
    )
    return updates, new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _replace_mesa_state(opt_state: Any, fn: Callable[[MESAState], Any]) -> Any:
  return jax.tree.map(
      lambda x: fn(x) if isinstance(x, MESAState) else x,
      opt_state,
      is_leaf=lambda x: isinstance(x, MESAState),
  )


def _only_mesa_state(opt_state: Any, name: str) -> MESAState:
  found = base.find_states(opt_state, (MESAState,))
  if len(found) != 1:
    raise ValueError(
        f"sharpjax.{name}: expected exactly one sj.mesa state in the optimizer "
        f"state, found {len(found)}."
    )
  return found[0]


def init_teacher_model_state(opt_state: Any, model_state: Any) -> Any:
  """Makes MESA's teacher track a model state (e.g. BatchNorm statistics).

  Call it once, right after ``tx.init(params)``, with the model's initial
  state; from then on pass ``model_state=`` (this step's new state) to every
  ``update``, and the teacher keeps an EMA of it like of the parameters.

  Example:
    >>> import jax.numpy as jnp, optax, sharpjax as sj
    >>> tx = optax.chain(sj.mesa(start_epoch=0), optax.sgd(0.1))
    >>> opt_state = tx.init({"w": jnp.zeros(3)})
    >>> opt_state = sj.init_teacher_model_state(
    ...     opt_state, {"batch_stats": {"mean": jnp.zeros(3)}})
  """
  _only_mesa_state(opt_state, "init_teacher_model_state")
  return _replace_mesa_state(
      opt_state, lambda s: s.with_model_state(model_state)
  )


def teacher(opt_state: Any) -> tuple[Any, Any]:
  """MESA's teacher: ``(teacher_params, teacher_model_state)``, float32.

  ``teacher_model_state`` is ``()`` unless :func:`init_teacher_model_state`
  was called.
  """
  state = _only_mesa_state(opt_state, "teacher")
  return state.teacher_params, state.teacher_model_state


def penalty(
    state: MESAState,
    logits: jax.Array,
    *,
    teacher_fn: Optional[TeacherFn] = None,
    teacher_logits: Optional[jax.Array] = None,
    per_example: bool = False,
) -> jax.Array:
  """The MESA penalty of :func:`sharpjax.trajectory_penalty`."""
  size = trajectory.check_logits(logits, None, "trajectory_penalty")
  epoch = trajectory.epoch_of(state.count, state.steps_per_epoch)
  active = epoch >= state.start_epoch
  if teacher_logits is None:
    if teacher_fn is None:
      raise TypeError(
          "sharpjax.trajectory_penalty: MESA needs teacher_fn(teacher_params, "
          "teacher_model_state) returning the teacher's logits on this batch "
          "(or teacher_logits=)."
      )

    def run_teacher():
      out = teacher_fn(state.teacher_params, state.teacher_model_state)
      if jnp.shape(out) != jnp.shape(logits):
        raise ValueError(
            "sharpjax.trajectory_penalty: teacher_fn returned shape "
            f"{jnp.shape(out)}, the logits have shape {jnp.shape(logits)}."
        )
      return jnp.asarray(out, jnp.float32)

    # No teacher forward before start_epoch: early epochs cost what SGD costs.
    teacher_logits = jax.lax.cond(
        active, run_teacher, lambda: jnp.zeros(jnp.shape(logits), jnp.float32)
    )
  elif jnp.shape(teacher_logits) != jnp.shape(logits):
    raise ValueError(
        "sharpjax.trajectory_penalty: teacher_logits have shape "
        f"{jnp.shape(teacher_logits)}, the logits {jnp.shape(logits)}."
    )
  kl = trajectory.tempered_kl(teacher_logits, logits, state.temperature)
  valid = jnp.broadcast_to(active, (size,))
  return trajectory.masked_penalty(kl, valid, state.temperature,
                                   state.strength, per_example)
