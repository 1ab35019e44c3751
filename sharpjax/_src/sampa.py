r"""SAMPa: SAM's two gradients made independent, so they can run in parallel.

SAM's second gradient needs the first (the ascent direction). SAMPa takes
its ascent direction from the gradient at an auxiliary sequence :math:`y`
computed in the previous step, so both gradients of a step are taken at
points known from the state before the step starts
(:meth:`SAMPaState.gradient_points`): on one device they are one batched
computation, on two groups of devices they run at the same time.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from sharpjax._src import base
from sharpjax._src import perturbed as perturbed_lib
from sharpjax._src import points as points_lib
from sharpjax._src import sharpness_aware as wrapper

# The official code's guard on the norm: rho / (||g_y|| + 1e-12).
NORM_EPS = 1e-12


class SAMPaState(NamedTuple):
  r"""State of :func:`sampa`.

  Attributes:
    count: number of updates taken (int32).
    g_y: float32 gradient at the last auxiliary point :math:`y_t`, shaped
      like the parameters (zero before the first step).
    velocity: float32 copy of the base optimizer's momentum buffer
      (:math:`m \leftarrow \mu m + d + \lambda_{wd} w`), used for
      :math:`y`; None when ``momentum`` is 0.
    ascent_scale: float32 scalar :math:`\rho / (\|g_y\| + 10^{-12})`, set
      at the end of the previous update for the coming step.
    learning_rate: float32 scalar :math:`\eta` of the coming step (0 before
      the first update, so the first :math:`y` is :math:`x_0`, as in the
      official code).
    momentum: float32 scalar, the base optimizer's momentum :math:`\mu`.
    weight_decay: float32 scalar, the base optimizer's weight decay.
    diagnostics: what the last step saw. SAMPa takes no gradient at
      :math:`x_t`: the "clean" gradient and loss are those at
      :math:`y_{t+1}` (the caller's ``value=`` when it takes the passes
      itself), the perturbed ones those at :math:`\tilde x_t`.

  ``PASSES = "points"`` (the protocol of :func:`sharpjax.passes`): a step
  takes its gradients at ``gradient_points(params)``, :math:`(\tilde x_t,
  y_{t+1})`, never at ``params``. ``FIRST_IN_CHAIN = True``
  (:func:`sharpjax.check_chain`): it mixes its first argument with the
  second point's gradient as taken, so nothing that changes the gradient
  may precede it.
  """

  count: jax.Array
  g_y: Any
  velocity: Any
  ascent_scale: jax.Array
  learning_rate: jax.Array
  momentum: jax.Array
  weight_decay: jax.Array
  diagnostics: perturbed_lib.Diagnostics

  PASSES = "points"
  FIRST_IN_CHAIN = True

  def gradient_points(self, params: Any) -> tuple:
    r"""``(x + rho g_y / ||g_y||, y)``: where the step's gradients are taken.

    :math:`y` is the base optimizer's step from ``params`` with the stored
    gradient :math:`g_y` (:func:`sampa` gives its form). Each point in the
    parameters' dtypes (formed in float32).
    """
    ascent = jax.tree.map(lambda g: self.ascent_scale * g, self.g_y)

    def descent(g, p, m=None):
      d = g + self.weight_decay * p.astype(jnp.float32)
      if m is not None:
        d = d + self.momentum * m
      return -self.learning_rate * d

    if self.velocity is None:
      step = jax.tree.map(descent, self.g_y, params)
    else:
      step = jax.tree.map(descent, self.g_y, params, self.velocity)
    return (points_lib.add_to(params, ascent), points_lib.add_to(params, step))


def sampa(
    rho: base.ScalarOrSchedule = 0.1,
    lam: base.ScalarOrSchedule = 0.2,
    *,
    learning_rate: base.ScalarOrSchedule,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    axis_name: Optional[str] = None,
) -> optax.GradientTransformationExtraArgs:
  r"""SAMPa: SAM with its two gradients taken in parallel.

  With :math:`g_y = \nabla L(y_t)` kept from the previous step,

  .. math::
    \tilde x_t &= x_t + \rho \frac{g_y}{\|g_y\|_2 + 10^{-12}}, \qquad
    y_{t+1} = x_t - \eta_t\, g_y, \\
    d_t &= (1 - \lambda) \nabla L_B(\tilde x_t) + \lambda \nabla L_B(y_{t+1}),

  :math:`d_t` goes on to the base optimizer (:math:`x_{t+1} = x_t - \eta_t
  d_t` for SGD) and :math:`\nabla L_B(y_{t+1})` is kept as the next
  :math:`g_y`. Both points depend only on :math:`x_t` and the state, so the
  two gradients are independent: :func:`sharpjax.gradient_points` gives them
  before
  the step. :math:`g_y = 0` at the start, so the first step takes both
  gradients at :math:`x_0`.

  The auxiliary point :math:`y_{t+1}` is the base optimizer's step from
  :math:`x_t` with the gradient :math:`g_y`. With ``momentum=0`` and
  ``weight_decay=0`` it is the paper's :math:`x_t - \eta_t g_y`. The official
  code (LIONS-EPFL/SAMPa, ``train.py``) uses SGD with momentum and weight
  decay and forms :math:`y_{t+1} = x_t - \eta_t(g_y + \lambda_{wd} x_t +
  \mu m_t)`, with :math:`m_t` SGD's momentum buffer; give the base
  optimizer's ``momentum`` and ``weight_decay`` (as in
  ``optax.chain(sj.sampa(..., learning_rate=lr, momentum=mu,
  weight_decay=wd), optax.add_decayed_weights(wd), optax.sgd(lr,
  momentum=mu))``) to get that: the state then keeps its own float32 copy of
  the momentum buffer (nothing checks that the numbers match the base
  optimizer's). The official code takes :math:`\nabla L(\tilde x_t)` on the
  previous minibatch (its device had it at hand); here both gradients are
  on the step's batch.

  Taking the passes. A loop computes the gradients at
  :func:`sharpjax.gradient_points` and passes them as ``point_passes=``, a
  tuple of two :class:`sharpjax.PerturbedPass` (:math:`\tilde x_t` first);
  :func:`sharpjax.training.make_trainer` does so itself: on one device both
  passes in one compiled program, or one gradient per half of the devices on
  a mesh with a ``"pair"`` axis of size 2 (``make_trainer(..., mesh=mesh)``,
  its ``point_axis``). The trainer's metrics (loss, accuracy) and BatchNorm
  statistics are those of the pass at :math:`\tilde x_t`, as in the
  official code, whose first device holds that pass. Without
  ``point_passes``,
  ``update`` takes both passes itself from ``loss_fn`` and ``batch``.

  Cost: two forward-backward passes per step (SAM's FLOPs), independent of
  each other; two float32 buffers the size of the parameters with momentum
  (one without).

  Args:
    rho: radius (>= 0), a number or an optax schedule, evaluated at the step
      whose point it sets. The official default is 0.1 (the paper's tables
      use SAM's tuned radius).
    lam: :math:`\lambda` in [0, 1], the weight of the gradient at
      :math:`y_{t+1}` (a number or a schedule). 0.2 is the official default
      ("SAMPa-0.2"); 0 keeps only the perturbed gradient.
    learning_rate: :math:`\eta_t` of the base optimizer (a number or the
      same optax schedule), used to form :math:`y_{t+1}`; a schedule is
      evaluated at the step whose point it sets. (Injected with
      ``optax.inject_hyperparams``, the value of the current step sets the
      next point.)
    momentum: the base optimizer's SGD momentum, in [0, 1) (0: the paper's
      rule). A static number (it decides whether the state keeps a momentum
      buffer): with ``optax.inject_hyperparams`` name it in ``static_args``.
    weight_decay: the base optimizer's weight decay (>= 0; 0: the paper's
      rule).
    axis_name: see :func:`sharpjax.sharpness_aware`; only for ``pmap`` /
      ``shard_map``: both gradients are averaged over it.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` to put first in a chain. Its
    ``update(grads, state, params, *, point_passes=None, loss_fn=None,
    batch=None, has_aux=False, value=None, data_axis_name=None)`` needs
    ``point_passes`` or ``loss_fn`` and
    ``batch``; its state is a :class:`SAMPaState`.

  Example:
    >>> import jax, jax.numpy as jnp, optax, sharpjax as sj
    >>> tx = optax.chain(sj.sampa(rho=0.1, lam=0.2, learning_rate=0.1),
    ...                  optax.sgd(0.1))
    >>> params = {"w": jnp.array([1.0, -2.0])}
    >>> batch = {"x": jnp.eye(2)}
    >>> loss_fn = lambda p, b: 0.5 * (b["x"] @ p["w"]) ** 2
    >>> grad = jax.value_and_grad(lambda p: loss_fn(p, batch).mean())
    >>> state = tx.init(params)
    >>> for _ in range(2):
    ...   x_tilde, y = sj.gradient_points(state, params)
    ...   taken = tuple(sj.PerturbedPass(*grad(p), losses=None, aux=None)
    ...                 for p in (x_tilde, y))  # independent: in parallel
    ...   updates, state = tx.update(taken[0].grads, state, params,
    ...                              point_passes=taken)
    ...   params = optax.apply_updates(params, updates)
    >>> y  # the second step's y = x_1 - 0.1 g_y, g_y = x_0 / 2 (x_1 = 0.95 x_0)
    {'w': Array([ 0.9, -1.8], dtype=float32)}
    >>> params["w"]
    Array([ 0.90121114, -1.8024223 ], dtype=float32)

  References:
    Xie et al., SAMPa: Sharpness-aware Minimization Parallelized, NeurIPS
    2024. https://arxiv.org/abs/2410.10683
  """
  base.check_range("rho", rho, low=0.0)
  base.check_range("lam", lam, low=0.0, high=1.0)
  base.check_range("learning_rate", learning_rate, low=0.0)
  mu = base.static_number("momentum", momentum, "sampa")
  base.check_range("momentum", mu, low=0.0, high=1.0, high_inclusive=False)
  base.check_range("weight_decay", weight_decay, low=0.0)
  name = "sampa"

  def init_fn(params):
    return SAMPaState(
        count=jnp.zeros([], jnp.int32),
        g_y=jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), jnp.float32),
                         params),
        velocity=(jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), jnp.float32),
                               params) if mu else None),
        ascent_scale=jnp.zeros([], jnp.float32),
        # No step with g_y yet: the first y is x_0 itself.
        learning_rate=jnp.zeros([], jnp.float32),
        momentum=jnp.asarray(mu, jnp.float32),
        weight_decay=jnp.asarray(weight_decay, jnp.float32),
        diagnostics=perturbed_lib.init_diagnostics(),
    )

  def update_fn(updates, state, params=None, *, point_passes=None,
                loss_fn=None, batch=None,
                has_aux: bool = False, value=None, data_axis_name=None,
                **extra_args):
    del extra_args
    wrapper.check_axis(name, axis_name, data_axis_name)
    if params is None:
      raise TypeError(
          "sharpjax.sampa: update() needs params (its points and the base "
          "step are formed from them): tx.update(grads, opt_state, params, "
          "point_passes=...).")
    x_tilde, y = state.gradient_points(params)
    taken = points_lib.given(point_passes, 2, updates, name)
    if taken is None:
      perturbed_lib.require_extra_args(name, params, loss_fn, batch)
      taken = points_lib.passes(loss_fn, (x_tilde, y), batch,
                                has_aux=has_aux, name=name)
    (g_tilde, g_y), (loss_tilde, loss_y) = taken.grads, taken.losses
    if axis_name is not None:
      g_tilde, g_y, loss_tilde, loss_y = jax.lax.pmean(
          (g_tilde, g_y, loss_tilde, loss_y), axis_name)
    count = state.count
    weight = base.resolve(lam, count)
    direction = jax.tree.map(
        lambda a, b: (1.0 - weight) * a.astype(jnp.float32)
        + weight * b.astype(jnp.float32), g_tilde, g_y)
    new_g_y = jax.tree.map(lambda g: g.astype(jnp.float32), g_y)
    if mu:
      velocity = jax.tree.map(
          lambda m, d, p: state.momentum * m + d
          + state.weight_decay * p.astype(jnp.float32),
          state.velocity, direction, params)
    else:
      velocity = state.velocity
    next_count = optax.safe_increment(count)
    ascent_scale = base.resolve_radius(rho, next_count) / (
        base.tree_norm_f32(new_g_y) + NORM_EPS)
    eps = jax.tree.map(lambda g: state.ascent_scale * g, state.g_y)
    diagnostics = perturbed_lib.diagnostics_of(
        g_y, eps, g_tilde, loss_tilde, params=params,
        clean_loss=loss_y if point_passes is not None or value is None
        else value)
    new_state = SAMPaState(
        count=next_count, g_y=new_g_y, velocity=velocity,
        ascent_scale=ascent_scale.astype(jnp.float32),
        learning_rate=base.resolve(learning_rate, next_count),
        momentum=state.momentum, weight_decay=state.weight_decay,
        diagnostics=diagnostics)
    return base.tree_cast_like(direction, updates), new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
