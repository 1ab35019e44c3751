r"""Late-phase SAM: plain gradients for most of the run, SAM at the end.

Zhou et al. find that SAM's advantage is decided late in training: SGD until
a switch point and SAM after reaches nearly full SAM's accuracy and
flatness. :func:`late_phase` wraps any SAM-family transformation: before the
switch step the clean gradient passes through to the base optimizer, after
it the wrapped transformation runs. The switch is known on the host from the
step count, so a trainer compiles one program per phase (``HOST_SCHEDULED``)
and no compiled step holds a conditional.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sharpjax._src import base
from sharpjax._src import protocol
from sharpjax._src import sam as sam_lib


class LatePhaseState(NamedTuple):
  """State of :func:`late_phase`.

  Attributes:
    count: number of updates taken (int32).
    period: int32 scalar, the switch step: updates with ``count >= period``
      run the wrapped transformation, the earlier ones pass the gradient
      through.
    inner: the wrapped transformation's state. It is untouched before the
      switch, so its own count (and a schedule evaluated at it) starts at
      the switch.
    total_steps: int32 scalar, the run's number of updates when it was
      given (0 otherwise), for the average cost of a step over the run.

  The class attribute ``HOST_SCHEDULED = True`` is the contract a trainer
  reads (see :mod:`sharpjax._src.protocol`); :meth:`full_step_at` gives
  the rule, ``count >= period``, and ``update`` accepts ``full_step=``, a
  Python bool that selects the phase statically.
  """

  count: jax.Array
  period: jax.Array
  inner: Any
  total_steps: jax.Array

  HOST_SCHEDULED = True

  @staticmethod
  def full_step_at(count: int, period: int) -> bool:
    """Whether update number ``count`` runs the wrapped transformation."""
    return count >= period

  @staticmethod
  def full_step_share(period: int, total_steps: Optional[int]) -> float:
    """The share of the run's ``total_steps`` updates that run the wrapped one."""
    if not total_steps:
      raise ValueError(
          "late_phase: the share of late-phase steps needs the run's length: "
          "build it with total_steps= (or pass total_steps to the cost "
          "report).")
    return min(max(total_steps - period, 0), total_steps) / total_steps


def switch_step(start: Union[int, float], total_steps: Optional[int]) -> int:
  """``start`` as a step: an int as is, a fraction of ``total_steps``.

  A float in [0, 1] is a fraction of the run (rounded to the nearest step)
  and needs ``total_steps``; an int (or an integral float above 1) is a
  step.
  """
  if isinstance(start, bool) or not isinstance(
      start, (int, float, np.integer, np.floating)):
    raise TypeError(
        "start must be a step (an int >= 0) or a fraction of total_steps (a "
        f"float in [0, 1]), got {type(start).__name__}. It is static: with "
        "optax.inject_hyperparams pass static_args=('start', 'total_steps').")
  if total_steps is not None:
    total_steps = base.check_int("total_steps", total_steps, low=1)
  if isinstance(start, (int, np.integer)):
    return base.check_int("start", int(start), low=0)
  start = float(start)
  if start > 1.0 and start.is_integer():  # a step written as a float
    return int(start)
  if not 0.0 <= start <= 1.0:
    raise ValueError(
        "start must be a fraction of the run in [0, 1] or a step (an integer "
        f">= 0), got {start!r}.")
  if total_steps is None:
    raise ValueError(
        f"start={start} is a fraction of the run: pass total_steps= (the "
        "number of updates of the run), or give start as an int step.")
  return int(round(float(start) * total_steps))


def late_phase(
    tx: optax.GradientTransformation,
    start: Union[int, float],
    *,
    total_steps: Optional[int] = None,
) -> optax.GradientTransformationExtraArgs:
  r"""The plain gradient before step ``start``, a SAM-family method after.

  .. math::
    d_t = \begin{cases} g_t & t < t_s \\
    \text{tx}(g_t, \ldots) & t \ge t_s \end{cases}

  with :math:`t_s` the switch step. Before it the clean gradient goes
  through unchanged, so the chain is the base optimizer alone (SGD with
  momentum in the paper); from it on ``tx`` (SAM, ASAM, ...) runs, its
  state starting fresh at the switch. The base optimizer's state (momentum,
  learning-rate schedule) runs through the switch unchanged.

  Choosing the phase. The switch is known on the host, so the cheapest form
  is two compiled steps chosen by the caller: pass ``update(...,
  full_step=state.full_step_at(count, switch))`` as a Python bool (the
  ``HOST_SCHEDULED`` contract of :class:`LatePhaseState`, which
  :func:`sharpjax.training.make_trainer` reads). Without ``full_step`` one
  compiled step decides on the device with a ``lax.cond`` (see
  :func:`sharpjax.looksam` for what a conditional costs).

  Cost: one forward-backward pass per step before the switch and the
  wrapped method's after. With SAM and ``start = 0.875`` of the run that is
  :math:`0.875 + 2 \times 0.125 = 1.125` times SGD's passes over the run
  (the paper's WideResNet-16-8 example: SGD to epoch 175, SAM to 200).
  A cost report averages the two programs over the run
  (:meth:`LatePhaseState.full_step_share`), which needs ``total_steps``.

  Args:
    tx: the transformation of the late phase, one that goes first in a chain
      (:func:`sharpjax.sam` or any SAM-family transformation).
    start: the switch step :math:`t_s`: an int (a step count), or a float in
      [0, 1], a fraction of ``total_steps``. 0 runs ``tx`` throughout.
    total_steps: the run's number of updates; needed when ``start`` is a
      fraction.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` that takes ``tx``'s extra
    arguments plus ``full_step``; its state is a :class:`LatePhaseState`.

  Example:
    >>> import jax, jax.numpy as jnp, optax, sharpjax as sj
    >>> tx = optax.chain(sj.late_phase(sj.sam(rho=0.05), start=0.75,
    ...                                total_steps=8),
    ...                  optax.sgd(0.1, momentum=0.9))
    >>> params = {"w": jnp.array([1.0, -2.0])}
    >>> batch = {"x": jnp.eye(2)}
    >>> loss_fn = lambda p, b: 0.5 * (b["x"] @ p["w"]) ** 2
    >>> def step(params, state, full_step):
    ...   grads = jax.grad(lambda p: loss_fn(p, batch).mean())(params)
    ...   updates, state = tx.update(grads, state, params, loss_fn=loss_fn,
    ...                              batch=batch, full_step=full_step)
    ...   return optax.apply_updates(params, updates), state
    >>> step = jax.jit(step, static_argnums=2)  # one program per phase
    >>> state = tx.init(params)
    >>> switch = int(state[0].period)
    >>> for count in range(8):
    ...   params, state = step(params, state, count >= switch)
    >>> switch, int(state[0].inner.count)  # SAM ran for the last 2 steps
    (6, 2)

  References:
    Zhou et al., Sharpness-Aware Minimization Efficiently Selects Flatter
    Minima Late in Training, ICLR 2025. https://arxiv.org/abs/2410.10373
  """
  if not isinstance(tx, optax.GradientTransformation):
    raise TypeError(
        "tx must be an optax GradientTransformation (e.g. sj.sam(rho=0.05)), "
        f"got {type(tx).__name__}.")
  step_count = switch_step(start, total_steps)
  inner_tx = optax.with_extra_args_support(tx)

  def init_fn(params):
    inner = inner_tx.init(params)
    if protocol.passes(inner) != protocol.CLEAN:
      raise ValueError(
          "late_phase wraps a method that takes the clean gradient (SAM, "
          "ASAM, GSAM, ...); the wrapped one takes its gradients "
          f"{'at its own points' if protocol.passes(inner) == protocol.POINTS else 'in its own passes'}"
          ", so its early phase would not be SGD.")
    return LatePhaseState(
        count=jnp.zeros([], jnp.int32),
        period=jnp.asarray(step_count, jnp.int32),
        inner=inner,
        total_steps=jnp.asarray(total_steps or 0, jnp.int32),
    )

  def update_fn(updates, state, params=None, *, full_step=None, **extra):
    full_step = protocol.full_step_flag(full_step, "late_phase",
                                        "count >= period")

    def late():
      return inner_tx.update(updates, state.inner, params, **extra)

    def early():
      return updates, state.inner

    if full_step is True:
      new_updates, inner = late()
    elif full_step is False:
      new_updates, inner = early()
    else:
      new_updates, inner = jax.lax.cond(
          LatePhaseState.full_step_at(state.count, state.period), late, early)
    return new_updates, state._replace(
        count=optax.safe_increment(state.count), inner=inner)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def late_sam(
    rho: base.ScalarOrSchedule = 0.05,
    start: Union[int, float] = 0.875,
    *,
    total_steps: Optional[int] = None,
) -> optax.GradientTransformationExtraArgs:
  r"""SAM in the late phase: ``late_phase(sam(rho), start, total_steps=...)``.

  SGD (the base optimizer alone) until ``start``, :func:`sharpjax.sam` after.
  The default switch, 0.875 of the run, is the paper's WideResNet-16-8
  CIFAR-10 example (SAM for the last 25 of 200 epochs), about 1.125x SGD's
  passes; the official script's default switches at epoch 150 of 160.

  Args:
    rho: SAM's radius (>= 0), a number or an optax schedule.
    start: the switch, a step or a fraction of ``total_steps``.
    total_steps: the run's number of updates (for a fractional ``start``).

  Returns:
    The :func:`late_phase` transformation.

  Example:
    >>> import optax, sharpjax as sj
    >>> tx = optax.chain(sj.late_sam(rho=0.05, start=0.875, total_steps=1000),
    ...                  optax.sgd(0.1, momentum=0.9))

  References:
    Zhou et al., Sharpness-Aware Minimization Efficiently Selects Flatter
    Minima Late in Training, ICLR 2025. https://arxiv.org/abs/2410.10373
    Foret et al., Sharpness-Aware Minimization for Efficiently Improving
    Generalization, ICLR 2021. https://arxiv.org/abs/2010.01412
  """
  return late_phase(sam_lib.sam(rho=rho), start, total_steps=total_steps)
