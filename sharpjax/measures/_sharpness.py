r"""Worst-case and average-case (adaptive) sharpness, and m-sharpness.

Andriushchenko et al. (2023) define, with :math:`c = |w|` (adaptive) or
:math:`c = 1` (standard) and subsets :math:`S` of ``m`` examples,

.. math::
  S_{max}^{\rho,p}(w) = \mathbb E_S\Big[\max_{\|\delta \oslash c\|_p \le \rho}
  L_S(w + \delta) - L_S(w)\Big],\qquad
  S_{avg}^{\rho}(w) = \mathbb E_{S,\delta}\big[L_S(w+\delta) - L_S(w)\big],

with :math:`\delta_i \sim \mathcal N(0, \rho^2 c_i^2)` or
:math:`\mathcal U[-\rho c_i, \rho c_i]` in the average case. Every parameter is
perturbed (BatchNorm scales too, with the model in eval mode). Each measure
also reports the increase of the error rate when given an ``error_fn``.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from sharpjax._src import base
from sharpjax.measures import _data

LossFn = _data.LossFn


class SharpnessResult(NamedTuple):
  """A sharpness measurement, averaged over the subsets.

  Attributes:
    sharpness: the loss increase :math:`L(w+\\delta) - L(w)` (worst case: at
      the best perturbation found; average case: mean over draws).
    error_increase: the matching increase of the error rate; NaN without an
      ``error_fn``.
    clean_loss: :math:`L(w)`.
    perturbed_loss: :math:`L(w+\\delta)`.
    clean_error: error rate at ``w`` (NaN without an ``error_fn``).
    perturbed_error: error rate at ``w + delta`` (NaN without an ``error_fn``).
    perturbation_norm: worst case: the largest plain L2 norm of a best
      perturbation over the subsets (as the reference reports); average case:
      the mean L2 norm of the draws.
    perturbation: worst case with ``return_perturbation=True``: the best
      perturbation of every subset, a float32 pytree shaped like the
      parameters with a leading ``[num_subsets]`` axis; otherwise None.
    num_subsets: the number of subsets averaged over.
  """

  sharpness: jax.Array
  error_increase: jax.Array
  clean_loss: jax.Array
  perturbed_loss: jax.Array
  clean_error: jax.Array
  perturbed_error: jax.Array
  perturbation_norm: jax.Array
  perturbation: Any
  num_subsets: int


# ---------------------------------------------------------------------------
# Classification helpers.
# ---------------------------------------------------------------------------


def normalize_logits(logits: jax.Array, floor: float = 1e-10) -> jax.Array:
  r"""Centres the logits and scales them to unit L2 norm (last axis).

  :math:`z \mapsto (z - \bar z) / \max(\|z - \bar z\|_2, 10^{-10})`. This
  removes the logit-scale symmetry from sharpness (the reference's
  ``--normalize_logits``).
  """
  z = logits.astype(jnp.float32)
  z = z - jnp.mean(z, axis=-1, keepdims=True)
  norm = jnp.linalg.norm(z, axis=-1, keepdims=True)
  return z / jnp.maximum(norm, floor)


def classification_loss(
    apply_fn: Callable[[Any, Any], jax.Array],
    *,
    normalize: bool = False,
    x_key: str = "x",
    y_key: str = "y",
) -> LossFn:
  """Per-example cross-entropy ``loss_fn(params, batch)`` from ``apply_fn``.

  Args:
    apply_fn: ``apply_fn(params, x) -> logits [B, C]`` (eval mode).
    normalize: apply :func:`normalize_logits` first.
    x_key: the inputs' key in the batch dict.
    y_key: the integer labels' key.

  Returns:
    ``loss_fn(params, batch) -> [B]``.
  """

  def loss_fn(params, batch):
    logits = apply_fn(params, batch[x_key])
    if normalize:
      logits = normalize_logits(logits)
    return optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), batch[y_key]
    )

  return loss_fn


def classification_error(
    apply_fn: Callable[[Any, Any], jax.Array],
    *,
    x_key: str = "x",
    y_key: str = "y",
) -> LossFn:
  """Per-example 0/1 error ``error_fn(params, batch)`` from ``apply_fn``."""

  def error_fn(params, batch):
    logits = apply_fn(params, batch[x_key])
    return (jnp.argmax(logits, axis=-1) != batch[y_key]).astype(jnp.float32)

  return error_fn


# ---------------------------------------------------------------------------
# Geometry: scaling, ascent directions, projections.
# ---------------------------------------------------------------------------


def _scale(params: Any, adaptive: bool) -> Any:
  if adaptive:
    return jax.tree.map(lambda w: jnp.abs(w.astype(jnp.float32)), params)
  return jax.tree.map(lambda w: jnp.ones(jnp.shape(w), jnp.float32), params)


def _weighted_norm(delta: Any, c: Any) -> jax.Array:
  """:math:`\\|\\delta \\oslash c\\|_2`, with 0/0 = 0 (c = 0 forces delta = 0)."""
  scaled = jax.tree.map(
      lambda d, s: jnp.where(s > 0, d / jnp.where(s > 0, s, 1.0), 0.0), delta, c
  )
  return base.tree_norm_f32(scaled)


def project_ellipsoid(
    delta: Any, c: Any, rho: jax.Array, *, tol: float = 1e-5, max_iters: int = 100
) -> Any:
  r"""Euclidean projection onto :math:`\{\delta: \|\delta\oslash c\|_2\le\rho\}`.

  The projection is :math:`\delta_i / (1 + 2\lambda / c_i^2)` with
  :math:`\lambda \ge 0` found by bisection until the weighted norm is within
  ``tol`` of :math:`\rho` (the reference's tolerance); the feasible end of the
  bracket is returned, so the constraint holds exactly.
  """
  c2 = jax.tree.map(lambda s: s * s, c)

  def shrink(lam):
    return jax.tree.map(
        lambda d, s2: jnp.where(s2 > 0, d / (1.0 + 2.0 * lam / jnp.where(s2 > 0, s2, 1.0)), 0.0),
        delta,
        c2,
    )

  def norm_at(lam):
    return _weighted_norm(shrink(lam), c)

  # Bracket: grow the upper end until it is feasible.
  def grow_cond(s):
    hi, it = s
    return (norm_at(hi) > rho) & (it < 200)

  hi, _ = jax.lax.while_loop(
      grow_cond, lambda s: (s[0] * 2.0, s[1] + 1), (jnp.float32(10.0), 0)
  )

  def cond(s):
    lo, hi, it = s
    return (jnp.abs(norm_at(hi) - rho) > tol) & (it < max_iters)

  def body(s):
    lo, hi, it = s
    mid = 0.5 * (lo + hi)
    feasible = norm_at(mid) <= rho
    return jnp.where(feasible, lo, mid), jnp.where(feasible, mid, hi), it + 1

  _, hi, _ = jax.lax.while_loop(cond, body, (jnp.float32(0.0), hi, 0))
  inside = _weighted_norm(delta, c) <= rho
  projected = shrink(hi)
  return jax.tree.map(lambda d, p: jnp.where(inside, d, p), delta, projected)


def _project(delta, c, rho, norm, adaptive, scaled):
  if norm == "linf":
    return jax.tree.map(
        lambda d, s: jnp.clip(d, -rho * s, rho * s), delta, c
    )
  if not adaptive or scaled:
    n = _weighted_norm(delta, c)
    factor = jnp.where(n > rho, rho * base.safe_inverse(n), 1.0)
    return jax.tree.map(lambda d: d * factor, delta)
  return project_ellipsoid(delta, c, rho)


def _ascent(delta, grads, c, step, norm, scaled):
  """One unprojected ascent step from ``delta`` along the scaled gradient."""
  grads = jax.tree.map(lambda g: g.astype(jnp.float32), grads)
  if norm == "l2" and scaled:
    # c^2 g / ||c g||: the maximiser of the linearisation over ||d / c|| <= 1.
    cg = jax.tree.map(lambda g, s: s * g, grads, c)
    factor = step / (base.tree_norm_f32(cg) + 1e-12)
    return jax.tree.map(lambda d, t, s: d + factor * s * t, delta, cg, c)
  if norm == "l2":
    factor = step / (base.tree_norm_f32(grads) + 1e-12)
    return jax.tree.map(lambda d, g, s: d + factor * g * s, delta, grads, c)
  return jax.tree.map(lambda d, g, s: d + step * jnp.sign(g) * s, delta, grads, c)


def apgd_checkpoints(n_iters: int) -> tuple[int, ...]:
  """The iterations (0-indexed) where APGD may halve its step size.

  :math:`p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + \\max(p_j - p_{j-1} - 0.03,
  0.06)`, checkpoints :math:`\\lceil p_j n \\rceil` for ``j >= 1``: for
  ``n_iters=20`` that is (5, 9, 12, 15, 16, 18, 19, 20).
  """
  p = [0.0, 0.22]
  w = [0, math.ceil(n_iters * 0.22)]
  while w[-1] < n_iters and w[-1] != w[-2]:
    p.append(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06))
    w.append(math.ceil(p[-1] * n_iters))
  return tuple(w[1:])


# ---------------------------------------------------------------------------
# Worst case: m-APGD.
# ---------------------------------------------------------------------------


def _check_common(rho, norm, m, name):
  base.check_range("rho", rho, low=0.0)
  if norm not in ("l2", "linf"):
    raise ValueError(f"norm must be 'l2' or 'linf', got {norm!r}.")
  if m is not None:
    m = base.check_int("m", m, low=1)
  return m


def worst_case_sharpness(
    loss_fn: LossFn,
    params: Any,
    data: Any,
    *,
    rho: float,
    norm: str = "linf",
    adaptive: bool = True,
    m: int | None = 128,
    n_iters: int = 20,
    step_size: float | None = None,
    momentum: float = 0.75,
    min_update_ratio: float = 0.75,
    error_fn: LossFn | None = None,
    return_perturbation: bool = False,
    subsets_per_step: int | None = None,
    ascent: str = "scaled",
    loop: str = "lax",
) -> SharpnessResult:
  r"""Worst-case (adaptive) m-sharpness by projected gradient ascent (m-APGD).

  For each subset :math:`S` of ``m`` examples, independently,
  :math:`\max_{\|\delta\oslash c\|_p\le\rho} L_S(w+\delta) - L_S(w)` is
  estimated by ``n_iters`` steps of APGD from :math:`\delta = 0`:

  .. math::
    z = P\big(\delta_k + \eta\, c^2\odot g/\|c\odot g\|_2\big)\ (\ell_2)
    \quad\text{or}\quad
    z = P\big(\delta_k + \eta\, c\odot\mathrm{sign}(g)\big)\ (\ell_\infty),
    \qquad \delta_{k+1} = \mu z + (1-\mu)\,\delta_{k-1},

  with :math:`g = \nabla L_S(w+\delta_k)`, :math:`P` the projection onto the
  box (``linf``), the ball (standard ``l2``) or the ellipsoid
  :math:`\|\delta/c\|_2\le\rho` (adaptive ``l2``, see ``ascent``), initial step
  :math:`\eta = 2\rho` and :math:`\mu = 0.75`. The best loss seen is kept; at
  the checkpoints of :func:`apgd_checkpoints` the step is halved, and the
  iterate moved to the best perturbation, when fewer than
  ``min_update_ratio`` of the iterations since the last checkpoint improved
  the best loss, or when neither the step nor the best loss changed since. The
  result is averaged over subsets. Cost: ``n_iters + 1`` gradients per subset
  (the loss at each iterate comes with the next gradient) and one error
  evaluation.

  Differences from the reference code: by default the adaptive ``l2`` step
  and projection (``ascent="scaled"``; ``ascent="reference"`` reproduces the
  code's); after a halving the next gradient *and*
  the iterate restart from the best perturbation (the code reloads the best
  weights for the gradient but keeps the running perturbation); random
  initialisation and restarts are not offered (off by default there).

  References:
    Andriushchenko, Croce, Müller, Hein, Flammarion, A Modern Look at the
    Relationship between Sharpness and Generalization, ICML 2023,
    https://arxiv.org/abs/2302.07011.

  Args:
    loss_fn: ``loss_fn(params, batch)`` returning per-example losses ``[B]``
      (the model in eval mode). For normalised logits build it with
      :func:`classification_loss` (``normalize=True``).
    params: the parameters, any pytree. Every leaf is perturbed.
    data: one batch or an iterable of batches.
    rho: the radius :math:`\rho \ge 0`.
    norm: ``"linf"`` (the paper's showcased setting) or ``"l2"``.
    adaptive: :math:`c = |w|` (True) or :math:`c = 1`.
    m: subset size; the examples are re-split into consecutive subsets of
      ``m`` (their number must divide by ``m``); ``None`` uses the batches as
      given. The reference uses 1024 examples and ``m=128``.
    n_iters: ascent iterations (default 20).
    step_size: initial step :math:`\eta`; default :math:`2\rho`.
    momentum: :math:`\mu` in (0, 1].
    min_update_ratio: fraction of improving iterations below which the step
      is halved at a checkpoint.
    error_fn: optional ``error_fn(params, batch) -> [B]`` of 0/1 errors, for
      the error increase (e.g. :func:`classification_error`).
    return_perturbation: also return the best perturbation of every subset.
    subsets_per_step: subsets processed together with ``vmap`` (more memory);
      ``None`` processes one at a time.
    ascent: how adaptive ``l2`` ascends (the other settings are the same
      either way). ``"scaled"`` (default) runs APGD in the coordinates
      :math:`u = \delta\oslash c`, where the set is a ball: the step is
      :math:`\eta\, c^2\odot g/\|c\odot g\|` (the maximiser of the
      linearised loss over the ellipsoid, ASAM's direction) and the
      projection rescales :math:`\delta` onto :math:`\|\delta/c\| = \rho`.
      ``"reference"`` reproduces the reference code: step
      :math:`\eta\, c\odot g/\|g\|` and the Euclidean projection onto the
      ellipsoid by bisection (:func:`project_ellipsoid`). That mix of a
      preconditioned step and a Euclidean projection has fixed points that
      are not maxima: on a small MLP it stalls below the one-step estimate
      even after 100 iterations.

    loop: ``"lax"`` (default): one ``jax.jit`` with ``lax`` loops;
      ``"host"``: a Python loop over subsets and iterations, one compiled
      step per gradient (faster for convolutional networks on CPU, see
      :func:`hessian_trace`).

  Returns:
    A :class:`SharpnessResult`.

  Example:
    >>> import jax.numpy as jnp, sharpjax.measures as sm
    >>> loss = lambda w, b: 0.5 * b * jnp.sum(w ** 2)
    >>> r = sm.worst_case_sharpness(loss, jnp.ones(4), jnp.ones(8), rho=0.1,
    ...                             norm="linf", adaptive=True, m=None)
    >>> round(float(r.sharpness), 4)   # 0.5 * 4 * (1.1**2 - 1)
    0.42
  """
  m = _check_common(rho, norm, m, "worst_case_sharpness")
  n_iters = base.check_int("n_iters", n_iters, low=1)
  if step_size is not None:
    base.check_range("step_size", step_size, low=0.0, low_inclusive=False)
  base.check_range("momentum", momentum, low=0.0, high=1.0, low_inclusive=False)
  base.check_range("min_update_ratio", min_update_ratio, low=0.0, high=1.0)
  if ascent not in ("scaled", "reference"):
    raise ValueError(
        f"ascent must be 'scaled' or 'reference', got {ascent!r}."
    )
  batches = _data.subsets(
      _data.as_batches(data, "worst_case_sharpness"), m, "worst_case_sharpness"
  )
  step = 2.0 * rho if step_size is None else step_size
  if loop not in ("lax", "host"):
    raise ValueError(f"loop must be 'lax' or 'host', got {loop!r}.")
  cfg = (norm, bool(adaptive), n_iters, float(momentum), float(min_update_ratio),
         bool(return_perturbation), subsets_per_step, ascent == "scaled")
  run = _worst_jit if loop == "lax" else _worst_host
  return run(
      loss_fn, error_fn, params, batches, jnp.float32(rho), jnp.float32(step),
      cfg,
  )


class ApgdState(NamedTuple):
  """m-APGD's iterate and step-size book-keeping on one subset.

  ``x`` is the current perturbation and ``prev`` the one before it (for the
  momentum); ``best_*`` the highest-loss point seen and its gradient; the
  ``prev_*`` fields and ``n_up`` (improvements since the last checkpoint) decide
  at each checkpoint whether the step is halved (Croce & Hein, 2020).
  """

  x: Any
  prev: Any
  best_x: Any
  best_grad: Any
  best_loss: jax.Array
  clean_loss: jax.Array
  step: jax.Array
  prev_step: jax.Array
  prev_best: jax.Array
  prev_cp: jax.Array
  n_up: jax.Array


def apgd_init(zeros: Any, step0) -> ApgdState:
  """The state before iteration 0: every point ``zeros``, step ``step0``."""
  f0 = jnp.zeros((), jnp.float32)
  i0 = jnp.zeros((), jnp.int32)
  step0 = jnp.asarray(step0, jnp.float32)
  return ApgdState(zeros, zeros, zeros, zeros, f0, f0, step0, step0, f0, i0,
                   i0)


def apgd_iteration(
    state: ApgdState, k, loss, grad, *, n_iters: int, momentum: float,
    min_update_ratio: float, propose: Callable[[Any, Any, Any], Any],
) -> ApgdState:
  """Iteration ``k`` of m-APGD given ``loss`` and ``grad`` at ``state.x``.

  Records the best point; at a checkpoint of :func:`apgd_checkpoints` halves
  the step and restarts from the best point when fewer than
  ``min_update_ratio`` of the iterations since the last checkpoint improved
  (or nothing changed); then moves to ``momentum * z + (1 - momentum) * prev``
  with ``z = propose(x, grad, step)`` (an ascent step, projected). Iteration
  ``k = n_iters`` only evaluates: ``x`` stays.
  """
  checkpoints = jnp.zeros((n_iters + 1,), bool).at[
      jnp.array([w for w in apgd_checkpoints(n_iters) if w <= n_iters])
  ].set(True)
  where = lambda cond, a, b: jax.tree.map(
      lambda x, y: jnp.where(cond, x, y), a, b)
  first = k == 0
  clean_loss = jnp.where(first, loss, state.clean_loss)
  # Book-keeping for the iterate produced by step i = k - 1.
  i = k - 1
  improved = (~first) & (loss > state.best_loss)
  best_x = where(improved, state.x, state.best_x)
  best_grad = where(first | improved, grad, state.best_grad)
  best_loss = jnp.where(first | improved, loss, state.best_loss)
  prev_best = jnp.where(first, loss, state.prev_best)
  n_up = state.n_up + improved.astype(jnp.int32)
  at_cp = (~first) & checkpoints[jnp.maximum(i, 0)]
  cond1 = n_up < min_update_ratio * (i - state.prev_cp)
  cond2 = (state.prev_step == state.step) & (prev_best == best_loss)
  halve = at_cp & (cond1 | cond2)
  prev_step = jnp.where(at_cp, state.step, state.prev_step)
  prev_best = jnp.where(at_cp, best_loss, prev_best)
  prev_cp = jnp.where(at_cp, i, state.prev_cp)
  n_up = jnp.where(at_cp, 0, n_up)
  step = jnp.where(halve, 0.5 * state.step, state.step)
  x = where(halve, best_x, state.x)
  grad = where(halve, best_grad, grad)
  z = propose(x, grad, step)
  moved = jax.tree.map(
      lambda a, b: momentum * a + (1.0 - momentum) * b, z, state.prev)
  last = k == n_iters
  return ApgdState(where(last, x, moved), where(last, state.prev, x), best_x,
                   best_grad, best_loss, clean_loss, step, prev_step,
                   prev_best, prev_cp, n_up)


def _apgd_init(params, step0):
  return apgd_init(
      jax.tree.map(lambda w: jnp.zeros(jnp.shape(w), jnp.float32), params),
      step0)


def _apgd_body(loss_fn, params, batch, rho, cfg, k, state):
  """Iteration ``k`` of m-APGD on one subset (``k = n_iters`` only evaluates)."""
  norm, adaptive, n_iters, mu, min_ratio, _, _, scaled = cfg
  c = _scale(params, adaptive)
  loss, grad = jax.value_and_grad(
      lambda d: _data.mean_loss(
          loss_fn, _data.tree_add_scaled(params, d, 1.0), batch,
          "worst_case_sharpness",
      )
  )(state.x)
  grad = jax.tree.map(lambda g: g.astype(jnp.float32), grad)
  return apgd_iteration(
      state, k, loss, grad, n_iters=n_iters, momentum=mu,
      min_update_ratio=min_ratio,
      propose=lambda x, g, step: _project(
          _ascent(x, g, c, step, norm, scaled), c, rho, norm, adaptive, scaled
      ),
  )


def _apgd_finish(error_fn, params, batch, state, keep_delta):
  best_delta, best_loss, clean_loss = (
      state.best_x, state.best_loss, state.clean_loss)
  name = "worst_case_sharpness"
  if error_fn is None:
    clean_err = perturbed_err = jnp.float32(jnp.nan)
  else:
    clean_err = _data.mean_error(error_fn, params, batch, name)
    perturbed_err = _data.mean_error(
        error_fn, _data.tree_add_scaled(params, best_delta, 1.0), batch, name
    )
  result = dict(
      clean_loss=clean_loss,
      perturbed_loss=best_loss,
      clean_error=clean_err,
      perturbed_error=perturbed_err,
      norm=base.tree_norm_f32(best_delta),
  )
  return result, (best_delta if keep_delta else None)


@functools.partial(jax.jit, static_argnums=(0, 1, 6))
def _worst_jit(loss_fn, error_fn, params, batches, rho, step0, cfg):
  n_iters, keep_delta, chunk = cfg[2], cfg[5], cfg[6]

  def one_subset(batch):
    state = jax.lax.fori_loop(
        0, n_iters + 1,
        lambda k, st: _apgd_body(loss_fn, params, batch, rho, cfg, k, st),
        _apgd_init(params, step0),
    )
    return _apgd_finish(error_fn, params, batch, state, keep_delta)

  means, per_group = _map_with_delta(one_subset, batches, chunk)
  return _worst_result(means, per_group, keep_delta, batches)


@functools.partial(jax.jit, static_argnums=(0, 4))
def _host_apgd_step(loss_fn, params, batch, rho, cfg, k, state):
  return _apgd_body(loss_fn, params, batch, rho, cfg, k, state)


@functools.partial(jax.jit, static_argnums=(0, 4))
def _host_apgd_finish(error_fn, params, batch, state, keep_delta):
  return _apgd_finish(error_fn, params, batch, state, keep_delta)


def _worst_host(loss_fn, error_fn, params, batches, rho, step0, cfg):
  n_iters, keep_delta = cfg[2], cfg[5]
  init = jax.jit(_apgd_init)
  per_group = []
  for group, (count, _) in zip(batches.groups, batches.group_shapes):
    outs = []
    for j in range(count):
      batch = jax.tree.map(lambda x, j=j: x[j], group)
      state = init(params, step0)
      for k in range(n_iters + 1):
        state = _host_apgd_step(
            loss_fn, params, batch, rho, cfg, jnp.int32(k), state
        )
      outs.append(_host_apgd_finish(error_fn, params, batch, state, keep_delta))
    per_group.append(jax.tree.map(lambda *xs: jnp.stack(xs), *outs))
  total = None
  for out, (_, size) in zip(per_group, batches.group_shapes):
    sums = jax.tree.map(lambda o: size * jnp.sum(o, axis=0), out[0])
    total = sums if total is None else jax.tree.map(jnp.add, total, sums)
  means = jax.tree.map(lambda t: t / float(batches.num_examples), total)
  return _worst_result(means, per_group, keep_delta, batches)


def _worst_result(means, per_group, keep_delta, batches):
  norms = jnp.concatenate([g[0]["norm"] for g in per_group])
  perturbation = None
  if keep_delta:
    perturbation = jax.tree.map(
        lambda *xs: jnp.concatenate(xs), *[g[1] for g in per_group]
    )
  return _result(means, jnp.max(norms), perturbation, batches)


def _map_with_delta(one_subset, batches, chunk):
  total, per_group = None, []
  for group, (_, size) in zip(batches.groups, batches.group_shapes):
    out = _data.chunked_map(one_subset, group, chunk)
    per_group.append(out)
    s = jax.tree.map(lambda o: size * jnp.sum(o, axis=0), out[0])
    total = s if total is None else jax.tree.map(jnp.add, total, s)
  n = float(batches.num_examples)
  return jax.tree.map(lambda t: t / n, total), per_group


def _result(means, norm, perturbation, batches):
  return SharpnessResult(
      sharpness=means["perturbed_loss"] - means["clean_loss"],
      error_increase=means["perturbed_error"] - means["clean_error"],
      clean_loss=means["clean_loss"],
      perturbed_loss=means["perturbed_loss"],
      clean_error=means["clean_error"],
      perturbed_error=means["perturbed_error"],
      perturbation_norm=norm,
      perturbation=perturbation,
      num_subsets=sum(n for n, _ in batches.group_shapes),
  )


# ---------------------------------------------------------------------------
# Average case.
# ---------------------------------------------------------------------------


def average_case_sharpness(
    loss_fn: LossFn,
    params: Any,
    data: Any,
    key: jax.Array,
    *,
    rho: float,
    noise: str = "gaussian",
    adaptive: bool = True,
    m: int | None = 128,
    n_samples: int = 20,
    error_fn: LossFn | None = None,
    subsets_per_step: int | None = None,
) -> SharpnessResult:
  r"""Average-case (adaptive) m-sharpness under random perturbations.

  .. math::
    S_{avg}^\rho(w) = \mathbb E_{S,\delta}\big[L_S(w+\delta) - L_S(w)\big],
    \qquad \delta_i \sim \mathcal N(0, \rho^2c_i^2)\ \text{(gaussian)}
    \ \text{or}\ \mathcal U[-\rho c_i, \rho c_i]\ \text{(uniform)},

  with :math:`c = |w|` (adaptive) or 1, ``n_samples`` draws per subset of
  ``m`` examples (forward passes only). Subset ``j`` draws its noise from
  ``fold_in(key, j)``, so a fixed key gives a fixed result.

  References:
    Andriushchenko et al., A Modern Look at the Relationship between Sharpness
    and Generalization, ICML 2023, https://arxiv.org/abs/2302.07011.

  Args:
    loss_fn: ``loss_fn(params, batch)`` returning per-example losses ``[B]``.
    params: the parameters, any pytree. Every leaf is perturbed.
    data: one batch or an iterable of batches.
    key: PRNG key for the noise.
    rho: the noise scale :math:`\rho \ge 0`.
    noise: ``"gaussian"`` (the paper's l2 variant) or ``"uniform"`` (linf).
    adaptive: :math:`c = |w|` (True) or :math:`c = 1`.
    m: subset size (see :func:`worst_case_sharpness`); ``None`` uses the
      batches as given.
    n_samples: noise draws per subset (default 20).
    error_fn: optional ``error_fn(params, batch) -> [B]`` of 0/1 errors.
    subsets_per_step: subsets processed together with ``vmap``.

  Returns:
    A :class:`SharpnessResult` (``perturbation`` is None).

  Example:
    >>> import jax, jax.numpy as jnp, sharpjax.measures as sm
    >>> loss = lambda w, b: 0.5 * b * jnp.sum(w ** 2)
    >>> r = sm.average_case_sharpness(loss, jnp.ones(4), jnp.ones(8),
    ...     jax.random.PRNGKey(0), rho=0.1, m=None, n_samples=2000)
    >>> round(float(r.sharpness), 2)   # 0.5 * 4 * 0.1**2
    0.02
  """
  m = _check_common(rho, "l2", m, "average_case_sharpness")
  if noise not in ("gaussian", "uniform"):
    raise ValueError(f"noise must be 'gaussian' or 'uniform', got {noise!r}.")
  n_samples = base.check_int("n_samples", n_samples, low=1)
  batches = _data.subsets(
      _data.as_batches(data, "average_case_sharpness"), m,
      "average_case_sharpness",
  )
  cfg = (noise, bool(adaptive), n_samples, subsets_per_step)
  return _average_jit(loss_fn, error_fn, params, batches, key, jnp.float32(rho), cfg)


@functools.partial(jax.jit, static_argnums=(0, 1, 6))
def _average_jit(loss_fn, error_fn, params, batches, key, rho, cfg):
  noise, adaptive, n_samples, chunk = cfg
  c = _scale(params, adaptive)
  leaves, treedef = jax.tree.flatten(c)
  name = "average_case_sharpness"

  def draw(k):
    keys = jax.random.split(k, len(leaves))
    if noise == "gaussian":
      parts = [jax.random.normal(kk, s.shape) for kk, s in zip(keys, leaves)]
    else:
      parts = [jax.random.uniform(kk, s.shape, minval=-1.0, maxval=1.0)
               for kk, s in zip(keys, leaves)]
    return jax.tree.map(lambda u, s: rho * s * u,
                        jax.tree.unflatten(treedef, parts), c)

  def evaluate(p, batch):
    loss = _data.mean_loss(loss_fn, p, batch, name)
    if error_fn is None:
      return loss, jnp.float32(jnp.nan)
    return loss, _data.mean_error(error_fn, p, batch, name)

  def one_subset(args):
    index, batch = args
    clean_loss, clean_err = evaluate(params, batch)
    sub_key = jax.random.fold_in(key, index)

    def sample(s, acc):
      delta = draw(jax.random.fold_in(sub_key, s))
      loss, err = evaluate(_data.tree_add_scaled(params, delta, 1.0), batch)
      return (acc[0] + loss, acc[1] + err, acc[2] + base.tree_norm_f32(delta))

    f0 = jnp.zeros((), jnp.float32)
    loss, err, dn = jax.lax.fori_loop(0, n_samples, sample, (f0, f0, f0))
    return dict(
        clean_loss=clean_loss,
        perturbed_loss=loss / n_samples,
        clean_error=clean_err,
        perturbed_error=err / n_samples,
        norm=dn / n_samples,
    )

  total, offset, n_sub = None, 0, 0
  for group, (nb, size) in zip(batches.groups, batches.group_shapes):
    idx = jnp.arange(offset, offset + nb)
    out = _data.chunked_map(one_subset, (idx, group), chunk)
    s = jax.tree.map(lambda o: size * jnp.sum(o, axis=0), out)
    total = s if total is None else jax.tree.map(jnp.add, total, s)
    offset += nb
  means = jax.tree.map(lambda t: t / float(batches.num_examples), total)
  return _result(means, means["norm"], None, batches)
