r"""MESA: SAF's memory-efficient variant, with an EMA teacher in the state."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional, Union
import warnings

import jax
import jax.numpy as jnp
import optax

from sharpjax._src import base
from sharpjax._src import trajectory_loss

TeacherFn = Callable[[Any, Any], jax.Array]


@trajectory_loss.register_trajectory_state
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

  Class attributes (not fields), read by trainers instead of testing the type:

  - ``TRACKS_MODEL_STATE = True``: the teacher keeps an EMA of the model state
    (e.g. BatchNorm statistics) once :func:`init_teacher_model_state` is
    called, and then ``update`` wants the ``model_state`` extra argument.
  - ``PASSES_GRADIENT = True``: ``update`` hands the gradient on unchanged
    (see :class:`SAFState`).
  """

  count: jax.Array
  teacher_params: Any
  teacher_model_state: Any
  decay: jax.Array
  temperature: jax.Array
  strength: jax.Array
  start_epoch: jax.Array
  steps_per_epoch: jax.Array
  diagnostics: trajectory_loss.TrajectoryDiagnostics

  TRACKS_MODEL_STATE = True
  PASSES_GRADIENT = True

  def trajectory_penalty(
      self, logits: jax.Array, *, ids=None,
      teacher_fn: Optional[TeacherFn] = None,
      teacher_logits: Optional[jax.Array] = None, per_example: bool = False,
  ) -> jax.Array:
    """The MESA penalty of :func:`sharpjax.trajectory_penalty`.

    Needs ``teacher_fn`` or ``teacher_logits``; ``ids`` (SAF's) are ignored.
    """
    del ids
    return _penalty(self, logits, teacher_fn, teacher_logits, per_example)

  def with_model_state(self, model_state: Any) -> "MESAState":
    """This state with its teacher tracking ``model_state`` (a float32 copy).

    What :func:`sharpjax._src.protocol.attach_model_state` calls for a state
    that declares ``TRACKS_MODEL_STATE``.
    """
    return self._replace(teacher_model_state=_f32_copy(model_state))


def _f32_copy(tree):
  """A float32 copy of ``tree`` that shares no buffer with it.

  ``jnp.asarray`` of a float32 array returns the array itself: a teacher
  holding the parameters' own buffers would make a step that donates both
  the parameters and the optimizer state fail ("Attempt to donate the same
  buffer twice").
  """
  return jax.tree.map(lambda x: jnp.array(x, jnp.float32, copy=True), tree)


def mesa_auto_decay(total_steps: int) -> float:
  r"""MESA's EMA decay for a run of ``total_steps``: a horizon of 1/16 of it.

  .. math::
    d = 1 - \frac{1}{\max(2,\ T / 16)},

  so the teacher averages over about :math:`1/(1-d) = T/16` steps, the
  paper's share: its 0.9998 (a 5,000-step horizon) in a 200-epoch CIFAR run of
  about 78,000 steps. The paper's 0.9998 in a run of a few thousand steps
  would keep the teacher near its initial weights. ``sj.mesa(decay="auto",
  total_steps=T)`` and the command line's ``auto`` use this rule.

  Args:
    total_steps: :math:`T`, the planned number of optimizer steps (>= 1).

  Returns:
    The decay, a float in [0.5, 1).

  Example:
    >>> import sharpjax as sj
    >>> round(sj.mesa_auto_decay(200 * 391), 5)  # the paper's CIFAR run
    0.9998
    >>> round(sj.mesa_auto_decay(620), 4)
    0.9742
  """
  total_steps = base.check_int("total_steps", total_steps, low=1)
  return 1.0 - 1.0 / max(2.0, total_steps / 16.0)


def _resolve_decay(decay: Any, total_steps: Optional[int]) -> Any:
  """``decay`` with ``"auto"`` resolved; warns when it outlasts the run."""
  if total_steps is not None:
    total_steps = base.check_int("total_steps", total_steps, low=1)
  if isinstance(decay, str):
    if decay != "auto":
      raise ValueError(
          f"sharpjax.mesa: decay must be a number in [0, 1) or 'auto', got "
          f"{decay!r}."
      )
    if total_steps is None:
      raise ValueError(
          "sharpjax.mesa: decay='auto' needs total_steps (the planned number "
          "of optimizer steps, an integer >= 1) to size the EMA horizon."
      )
    return mesa_auto_decay(total_steps)
  base.check_range("decay", decay, low=0.0, high=1.0, high_inclusive=False)
  if total_steps is not None and not (base.is_traced(decay) or callable(decay)):
    horizon = 1.0 / (1.0 - float(decay))
    if horizon > total_steps:
      warnings.warn(
          f"sharpjax.mesa: decay={float(decay)} averages over about "
          f"{horizon:.0f} steps (1 / (1 - decay)), more than the planned "
          f"total_steps={total_steps}: the teacher would stay near its "
          "initial weights. Use decay='auto' (here "
          f"{mesa_auto_decay(total_steps):.4f}) or a smaller decay.",
          UserWarning, stacklevel=3,
      )
  return decay


def mesa(
    decay: Union[float, str] = 0.9998,
    temperature: float = 5.0,
    strength: float = 0.8,
    start_epoch: int = 5,
    *,
    steps_per_epoch: Optional[int] = None,
    total_steps: Optional[int] = None,
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
  (and of the model state), made when the state is initialised: the teacher
  shares no buffer with the parameters, so a step may donate both.

  The decay sets the teacher's horizon, about :math:`1/(1-d)` steps: the
  paper's 0.9998 (5,000 steps) suits its 78,000-step CIFAR runs, but in a run
  of a few thousand steps the teacher hardly leaves its initial weights (a
  620-step run: 0.898 test accuracy against SGD's 0.939; with 0.99, 0.929).
  Give ``total_steps`` and ``decay="auto"`` for a horizon of 1/16 of the run
  (:func:`mesa_auto_decay`); with ``total_steps`` and a number, a decay whose
  horizon exceeds the run gets a warning.

  The penalty is not part of :func:`sharpjax.training.make_trainer`'s
  ``metrics["loss"]``, which is the task loss alone; it is reported as
  ``metrics["penalty"]`` (the gradient includes both).

  Args:
    decay: :math:`d`, in [0, 1) (paper: 0.9998), or ``"auto"``:
      ``mesa_auto_decay(total_steps)``.
    temperature: :math:`\tau` (> 0; paper: 5).
    strength: :math:`\lambda` (>= 0; paper: 0.8).
    start_epoch: first epoch with the penalty (>= 0; paper: 5). The
      official code's ``--kl_start_epoch K`` turns the penalty on for epochs
      ``> K``: pass ``start_epoch=K + 1``.
    steps_per_epoch: optimizer steps per epoch, to place ``start_epoch``;
      needed when ``start_epoch > 0``.
    total_steps: the planned number of optimizer steps (>= 1); needed by
      ``decay="auto"``, and checked against a numeric decay's horizon.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` that passes the gradient
    through unchanged; its ``update`` accepts the extra argument
    ``model_state`` (required once the teacher tracks a model state).

  Example:
    >>> import optax, sharpjax as sj
    >>> tx = optax.chain(sj.mesa(steps_per_epoch=100), optax.sgd(0.1))
    >>> tx = optax.chain(  # a 30-epoch run of 100 steps per epoch
    ...     sj.mesa(decay="auto", total_steps=3000, steps_per_epoch=100),
    ...     optax.sgd(0.1))

  References:
    Du et al., Sharpness-Aware Training for Free, NeurIPS 2022.
    https://arxiv.org/abs/2205.14083
  """
  decay = _resolve_decay(decay, total_steps)
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
        teacher_params=_f32_copy(params),
        teacher_model_state=(),
        decay=jnp.asarray(decay, jnp.float32),
        temperature=jnp.asarray(temperature, jnp.float32),
        strength=jnp.asarray(strength, jnp.float32),
        start_epoch=jnp.asarray(start_epoch, jnp.int32),
        steps_per_epoch=jnp.asarray(steps_per_epoch, jnp.int32),
        diagnostics=trajectory_loss.init_diagnostics(),
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
    epoch = trajectory_loss.epoch_of(state.count, state.steps_per_epoch)
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

  Example:
    >>> import jax.numpy as jnp, optax, sharpjax as sj
    >>> tx = optax.chain(sj.mesa(decay=0.5, start_epoch=0), optax.sgd(0.1))
    >>> params = {"w": jnp.zeros(2)}
    >>> _, opt_state = tx.update(params, tx.init(params), {"w": jnp.ones(2)})
    >>> sj.teacher(opt_state)  # 0.5 * 0 + 0.5 * 1
    ({'w': Array([0.5, 0.5], dtype=float32)}, ())
  """
  state = _only_mesa_state(opt_state, "teacher")
  return state.teacher_params, state.teacher_model_state


def _penalty(
    state: MESAState,
    logits: jax.Array,
    teacher_fn: Optional[TeacherFn],
    teacher_logits: Optional[jax.Array],
    per_example: bool,
) -> jax.Array:
  size = trajectory_loss.check_logits(logits, None, "trajectory_penalty")
  epoch = trajectory_loss.epoch_of(state.count, state.steps_per_epoch)
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
  kl = trajectory_loss.tempered_kl(teacher_logits, logits, state.temperature)
  valid = jnp.broadcast_to(active, (size,))
  return trajectory_loss.masked_penalty(kl, valid, state.temperature,
                                        state.strength, per_example)
