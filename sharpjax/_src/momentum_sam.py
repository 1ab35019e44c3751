r"""Momentum-SAM: SAM's ascent along the momentum, at no extra pass.

SAM spends a forward-backward pass on finding its ascent direction. MSAM uses
the (negated, normalised) momentum buffer instead, which is already known
before the step: the only gradient of a step is taken at the point
:math:`w - \rho\, v / \|v\|`, and the state says where that point is
(:meth:`MomentumSAMState.gradient_points`), so a training loop takes one
pass.
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

# The official code's guard on the momentum norm: rho / (||v|| + 1e-12).
NORM_EPS = 1e-12


class MomentumSAMState(NamedTuple):
  r"""State of :func:`momentum_sam`.

  Attributes:
    count: number of updates taken (int32).
    momentum: float32 buffer :math:`v` of the gradients taken,
      :math:`v \leftarrow \mu v + g`, shaped like the parameters.
    scale: float32 scalar :math:`\rho_t / (\|v\| + 10^{-12})`, set at the
      end of the previous update (with ``rho`` evaluated at the coming step),
      so that the next point is known from the state alone.
    diagnostics: what the last step saw. Given the point's gradient, no
      pass is taken at the parameters: ``grad_norm`` is then the norm of
      the point's gradient, ``cosine`` 1 and ``clean_loss`` NaN.

  ``PASSES = "points"`` (the protocol of :func:`sharpjax.passes`): a step
  takes its one gradient at ``gradient_points(params)[0]``, never at
  ``params``.
  """

  count: jax.Array
  momentum: Any
  scale: jax.Array
  diagnostics: perturbed_lib.Diagnostics

  PASSES = "points"

  def perturbation(self) -> Any:
    r""":math:`-\rho\, v / (\|v\| + 10^{-12})`, float32, shaped like ``v``."""
    return jax.tree.map(lambda v: -self.scale * v, self.momentum)

  def gradient_points(self, params: Any) -> tuple:
    r"""``(w - rho v / ||v||,)``: where the next step's gradient is taken.

    In each parameter's dtype (the sum is formed in float32). Before the
    first update :math:`v = 0`, so the point is ``params``.
    """
    return (points_lib.add_to(params, self.perturbation()),)


def momentum_sam(
    rho: base.ScalarOrSchedule = 0.3,
    momentum: float = 0.9,
    *,
    axis_name: Optional[str] = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Momentum-SAM (MSAM): the gradient at a point along the momentum.

  With :math:`v_t` the momentum buffer of the gradients taken so far,

  .. math::
    \tilde w_t = w_t - \rho_t \frac{v_t}{\|v_t\|_2 + 10^{-12}}, \qquad
    g_t = \nabla L_B(\tilde w_t), \qquad
    v_{t+1} = \mu v_t + g_t,

  and :math:`g_t` goes on to the base optimizer (SGD with momentum
  :math:`\mu` makes :math:`w_{t+1} = w_t - \eta_t v_{t+1}`). The norm is
  global over the pytree, in float32; :math:`v_0 = 0`, so the first step
  takes its gradient at :math:`w_0`. Since :math:`-v_t` is (up to the
  learning rate) the last step's descent, the ascent costs nothing: one
  forward-backward pass per step, at :math:`\tilde w_t`, and no pass at
  :math:`w_t`.

  Taking the passes. The point of a step is known before it starts:
  :func:`sharpjax.gradient_points` (``opt_state, params``) gives it. A loop
  computes the gradient there and passes it as ``grads`` with
  ``point_passes=``, a tuple of one :class:`sharpjax.PerturbedPass` (it says
  that ``grads`` is taken at the point; its ``loss`` is recorded in the
  diagnostics, the rest is not read). Under ``optax.MultiSteps`` the
  accumulated gradient is then the mean of the micro-batches' gradients at
  the same point (the point moves only when the inner update runs).
  :func:`sharpjax.training.make_trainer` does so itself and takes no pass at
  the current parameters. Without ``point_passes``, ``update`` takes the pass
  itself from ``loss_fn`` and ``batch`` (a SAM-like call; the gradient passed
  in is then used for the diagnostics' clean norm and cosine only).

  The official code (MarlonBecker/MSAM, ``optimizer/msam.py``) keeps the
  model's parameters at :math:`\tilde w_t` between steps and moves back
  before evaluating; here the parameters stay at :math:`w_t` and the point
  is formed for the pass, so ``params`` are always the ones to evaluate.
  Chained as ``optax.chain(sj.momentum_sam(rho, momentum=mu),
  optax.sgd(lr, momentum=mu))`` it is step for step the official SGD
  variant, with these differences an optax chain imposes:

  * the buffer :math:`v` is kept twice (here and in SGD's ``trace``): one
    float32 copy of the parameters more than the official optimizer;
  * the official weight decay is added to the gradient at
    :math:`\tilde w_t` (:math:`g + \lambda \tilde w_t`, inside the momentum).
    Put the L2 term :math:`\frac{\lambda}{2}\|w\|^2` in the loss to get
    exactly that; ``optax.add_decayed_weights`` after this transformation
    decays :math:`w_t` instead and keeps it out of this buffer (a
    difference of order :math:`\lambda \rho` per step);
  * ``momentum`` must equal the base optimizer's; nothing checks it.

  The official AdamW variant (``optimizer/adamW_msam.py``) perturbs along
  Adam's first moment, :math:`(1-\beta_1)\sum_s \beta_1^{t-s} g_s`, which
  normalised is this buffer with :math:`\mu = \beta_1`:
  ``optax.chain(sj.momentum_sam(rho, momentum=b1), optax.adamw(lr, b1=b1,
  ...))`` is it, except that optax decays the weights before Adam's step
  and the official code after (a difference of order
  :math:`\eta^2 \lambda` per step).

  Cost: one forward-backward pass per step (SGD's) and one float32 buffer
  the size of the parameters.

  Args:
    rho: radius (>= 0), a number or an optax schedule, evaluated at the step
      whose point it sets. Much larger than SAM's: the official default is
      0.3 (the paper's CIFAR configurations reach about 3, and 1 for the
      AdamW variant).
    momentum: :math:`\mu` in [0, 1), the base optimizer's momentum (its
      ``b1`` for Adam).
    axis_name: see :func:`sharpjax.sharpness_aware`; only for ``pmap`` /
      ``shard_map``: the gradients at the point are averaged over it before
      they enter the buffer.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` to put first in a chain. Its
    ``update(grads, state, params, *, point_passes=None, loss_fn=None,
    batch=None, has_aux=False, value=None, data_axis_name=None)`` needs
    ``point_passes`` or ``loss_fn`` and
    ``batch`` (see above); its state is a :class:`MomentumSAMState`.

  Example:
    >>> import jax, jax.numpy as jnp, optax, sharpjax as sj
    >>> tx = optax.chain(sj.momentum_sam(rho=0.3, momentum=0.9),
    ...                  optax.sgd(0.1, momentum=0.9))
    >>> params = {"w": jnp.array([1.0, -2.0])}
    >>> batch = {"x": jnp.eye(2)}
    >>> loss_fn = lambda p, b: 0.5 * (b["x"] @ p["w"]) ** 2
    >>> mean_loss = lambda p: loss_fn(p, batch).mean()
    >>> state = tx.init(params)
    >>> for _ in range(2):  # one gradient per step, at the state's point
    ...   (point,) = sj.gradient_points(state, params)
    ...   loss, g = jax.value_and_grad(mean_loss)(point)
    ...   taken = sj.PerturbedPass(loss, g, losses=None, aux=None)
    ...   updates, state = tx.update(g, state, params, point_passes=(taken,))
    ...   params = optax.apply_updates(params, updates)
    >>> point  # w_1 - 0.3 v_1 / |v_1|, v_1 = w_0 / 2
    {'w': Array([ 0.8158359, -1.6316718], dtype=float32)}

  References:
    Becker et al., Momentum-SAM: Sharpness Aware Minimization without
    Computational Overhead, 2024. https://arxiv.org/abs/2401.12033
  """
  base.check_range("rho", rho, low=0.0)
  base.check_range("momentum", momentum, low=0.0, high=1.0,
                   high_inclusive=False)
  name = "momentum_sam"

  def init_fn(params):
    return MomentumSAMState(
        count=jnp.zeros([], jnp.int32),
        momentum=jax.tree.map(
            lambda p: jnp.zeros(jnp.shape(p), jnp.float32), params),
        scale=jnp.zeros([], jnp.float32),
        diagnostics=perturbed_lib.init_diagnostics(),
    )

  def update_fn(updates, state, params=None, *, point_passes=None,
                loss_fn=None, batch=None,
                has_aux: bool = False, value=None, data_axis_name=None,
                **extra_args):
    del extra_args
    wrapper.check_axis(name, axis_name, data_axis_name)
    eps = state.perturbation()
    taken = points_lib.given(point_passes, 1, updates, name)
    if taken is None:
      perturbed_lib.require_extra_args(name, params, loss_fn, batch)
      taken = points_lib.passes(loss_fn, state.gradient_points(params), batch,
                                has_aux=has_aux, name=name)
      clean = updates
      g = taken.grads[0]
    else:
      # The point's gradient is `updates` (under optax.MultiSteps, the mean
      # over the accumulated micro-batches; point_passes holds the last
      # one's). No gradient nor loss at w: the diagnostics use g_t, and the
      # clean loss is not known (a loop's value= is the point's loss).
      g = clean = updates
      value = None
    loss = taken.losses[0]
    if axis_name is not None:
      g, loss = jax.lax.pmean((g, loss), axis_name)
    mu = base.resolve(momentum, state.count)
    new_v = jax.tree.map(lambda v, x: mu * v + x.astype(jnp.float32),
                         state.momentum, g)
    rho_next = base.resolve_radius(rho, optax.safe_increment(state.count))
    scale = rho_next / (base.tree_norm_f32(new_v) + NORM_EPS)
    diagnostics = perturbed_lib.diagnostics_of(
        clean, eps, g, loss, params=params, clean_loss=value)
    if axis_name is not None:
      diagnostics = jax.lax.pmean(diagnostics, axis_name)
    new_state = MomentumSAMState(
        count=optax.safe_increment(state.count), momentum=new_v,
        scale=scale.astype(jnp.float32), diagnostics=diagnostics)
    return base.tree_cast_like(g, updates), new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
