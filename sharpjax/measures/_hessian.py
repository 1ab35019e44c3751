r"""The loss Hessian through Hessian-vector products.

Everything here touches the Hessian only through products
:math:`Hv = \partial_\epsilon \nabla L(w + \epsilon v)|_{\epsilon=0}`, computed
forward-over-reverse (``jax.jvp`` of ``jax.grad``) at about twice the cost of a
gradient, and averaged over the data with batch-size weights. On top of them:
top eigenvalues (power iteration with deflation, or Lanczos), the trace
(Hutchinson), the spectral density (stochastic Lanczos quadrature) and Rényi
sharpness. The linear algebra runs on the flattened float32 parameter vector;
eigenvectors come back as pytrees shaped like the parameters.

Each measure is written once against a loop runner: :class:`_LaxLoops` traces
it whole inside one ``jax.jit`` (``loop="lax"``), :class:`_HostLoops` runs the
same loops from Python with one compiled call per step of Hessian-vector
products (``loop="host"``). Either way compilation time does not grow with the
number of iterations.

Flax models with BatchNorm must be measured in eval mode (running statistics):
build ``loss_fn`` with ``train=False`` / ``use_running_average=True``.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from sharpjax._src import base
from sharpjax._src import hessian
from sharpjax.measures import _data

LossFn = _data.LossFn
MatVec = hessian.MatVec


# ---------------------------------------------------------------------------
# Hessian-vector products of the mean loss over the data.
# ---------------------------------------------------------------------------


def _data_hvp(loss_fn, params, batches, v):
  def batch_hvp(batch):
    mean_loss = lambda p: _data.mean_loss(loss_fn, p, batch, "hvp")
    return hessian.hvp(mean_loss, params, v)

  return _data.weighted_mean(batch_hvp, batches)


def hvp(loss_fn: LossFn, params: Any, data: Any, v: Any) -> Any:
  r"""Hessian-vector product of the mean loss over ``data``.

  .. math::
    Hv = \frac{1}{N}\sum_{b} |b|\, \nabla^2_w \Big(\frac{1}{|b|}
    \sum_{i \in b} \ell_i(w)\Big) v,

  computed forward-over-reverse (``jax.jvp`` of ``jax.grad``) batch by batch
  and averaged with batch-size weights.

  Args:
    loss_fn: ``loss_fn(params, batch)`` returning per-example losses, shape
      ``[B]``.
    params: the parameters, any pytree.
    data: one batch, an iterable of batches, or :func:`as_batches`' result.
    v: a pytree shaped like ``params``.

  Returns:
    :math:`Hv` as a float32 pytree shaped like ``params``.

  Example:
    >>> import jax.numpy as jnp, sharpjax.measures as sm
    >>> loss = lambda w, b: 0.5 * b["s"] * jnp.sum(w ** 2)
    >>> sm.hvp(loss, jnp.ones(3), {"s": jnp.ones(4)}, jnp.arange(3.))
    Array([0., 1., 2.], dtype=float32)
  """
  batches = _data.as_batches(data, "hvp")
  return _hvp_jit(loss_fn, params, batches, v)


@functools.partial(jax.jit, static_argnums=0)
def _hvp_jit(loss_fn, params, batches, v):
  return _data_hvp(loss_fn, params, batches, v)


def _flat_matvec(loss_fn, params, batches) -> tuple[hessian.FlatView, MatVec]:
  flat = hessian.flat_view(params)

  def matvec(x):
    return flat.ravel(_data_hvp(loss_fn, params, batches, flat.unravel(x)))

  return flat, matvec


# ---------------------------------------------------------------------------
# Where the loops run. A step is ``body(matvec, dim, x, *args)``, a
# module-level function, so the host runner's compiled steps are cached
# across calls (``body`` and ``loss_fn`` are static arguments).
# ---------------------------------------------------------------------------


class _LaxLoops:
  """``lax`` loops and inline products: the measure traces into one jit."""

  def __init__(self, matvec: MatVec, dim: int):
    self.matvec, self.dim = matvec, dim

  fori_loop = staticmethod(jax.lax.fori_loop)
  while_loop = staticmethod(jax.lax.while_loop)

  def step(self, body, x, *args, donate=False):
    del donate
    return body(self.matvec, self.dim, x, *args)

  def map_steps(self, body, xs, chunk, *args):
    """``body`` over the leading axis of ``xs``, ``chunk`` at a time."""
    return hessian.chunked_map(
        lambda x: body(self.matvec, self.dim, x, *args), xs, chunk)

  def map(self, fn, xs):
    return hessian.chunked_map(fn, xs, None)


def _run_step(body, loss_fn, batched, params, batches, x, *args):
  flat, matvec = _flat_matvec(loss_fn, params, batches)
  one = lambda x: body(matvec, flat.dim, x, *args)
  return jax.vmap(one)(x) if batched else one(x)


_host_step = jax.jit(_run_step, static_argnums=(0, 1, 2))
# Donates ``x`` (Lanczos' carry holds the [m, dim] basis: no second copy).
_host_step_donating = jax.jit(_run_step, static_argnums=(0, 1, 2),
                              donate_argnums=5)


class _HostLoops:
  """Python loops; each step of products is one compiled call.

  XLA:CPU runs convolutions inside device loops several times slower than
  outside (jax-ml/jax#12868); these loops avoid device loops entirely.
  """

  def __init__(self, loss_fn: LossFn, params: Any, batches: _data.Batches):
    self.loss_fn, self.params, self.batches = loss_fn, params, batches
    self.dim = hessian.flat_view(params).dim

  @staticmethod
  def fori_loop(lower, upper, body, init):
    for i in range(lower, upper):
      init = body(i, init)
    return init

  @staticmethod
  def while_loop(cond, body, init):
    while bool(cond(init)):
      init = body(init)
    return init

  def step(self, body, x, *args, donate=False):
    run = _host_step_donating if donate else _host_step
    return run(body, self.loss_fn, False, self.params, self.batches, x, *args)

  def map_steps(self, body, xs, chunk, *args):
    chunk = 1 if chunk is None else chunk
    outs = [
        _host_step(body, self.loss_fn, True, self.params, self.batches,
                   xs[start:start + chunk], *args)
        for start in range(0, xs.shape[0], chunk)
    ]
    return jax.tree.map(lambda *o: jnp.concatenate(o), *outs)

  def map(self, fn, xs):
    outs = [fn(x) for x in xs]
    return jax.tree.map(lambda *o: jnp.stack(o), *outs)


Loops = _LaxLoops | _HostLoops


def _check_loop(loop):
  if loop not in ("lax", "host"):
    raise ValueError(f"loop must be 'lax' or 'host', got {loop!r}.")


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _in_one_jit(measure, loss_fn, static, params, batches, key):
  flat, matvec = _flat_matvec(loss_fn, params, batches)
  return measure(_LaxLoops(matvec, flat.dim), params, key, *static)


def _run_measure(measure, loop, loss_fn, params, batches, key, *static):
  """``measure(loops, params, key, *static)`` with the loops ``loop`` asks."""
  _check_loop(loop)
  if loop == "lax":
    return _in_one_jit(measure, loss_fn, static, params, batches, key)
  return measure(_HostLoops(loss_fn, params, batches), params, key, *static)


# ---------------------------------------------------------------------------
# Generic Krylov building blocks on flat vectors.
# ---------------------------------------------------------------------------


def _normalize(v: jax.Array) -> jax.Array:
  return v * base.safe_inverse(jnp.linalg.norm(v))


# Power iteration, one eigenpair at a time. ``found`` masks the rows of
# ``basis`` already holding eigenvectors; state = (v, lam, lam_prev, it).


def _orth(v, basis, found):
  for _ in range(2):
    v = v - basis.T @ (found * (basis @ v))
  return _normalize(v)


def _power_start(key, i, basis, found):
  v0 = jax.random.normal(jax.random.fold_in(key, i), (basis.shape[1],))
  inf = jnp.array(jnp.inf, jnp.float32)
  return (_orth(v0, basis, found), inf, inf, jnp.zeros((), jnp.int32))


def _power_continue(state, max_iters, tol):
  _, lam, lam_prev, it = state
  change = jnp.abs(lam - lam_prev) / (jnp.abs(lam_prev) + 1e-6)
  return (it < max_iters) & ((it < 2) | (change >= tol))


def _power_body(matvec, dim, state, basis, found):
  del dim
  v, lam, _, it = state
  v = _orth(v, basis, found)
  av = matvec(v)
  return _normalize(av), jnp.vdot(v, av), lam, it + 1


def _power_iteration(loops: Loops, key, k, max_iters, tol):
  def one(i, carry):
    basis, values, iters = carry
    found = (jnp.arange(k) < i).astype(jnp.float32)
    state = loops.while_loop(
        lambda st: _power_continue(st, max_iters, tol),
        lambda st: loops.step(_power_body, st, basis, found),
        _power_start(key, i, basis, found),
    )
    return (
        basis.at[i].set(_orth(state[0], basis, found)),
        values.at[i].set(state[1]),
        iters.at[i].set(state[3]),
    )

  init = (
      jnp.zeros((k, loops.dim), jnp.float32),
      jnp.zeros((k,), jnp.float32),
      jnp.zeros((k,), jnp.int32),
  )
  basis, values, iters = loops.fori_loop(0, k, one, init)
  return values, basis, iters


def power_iteration(
    matvec: MatVec,
    dim: int,
    key: jax.Array,
    *,
    k: int = 1,
    max_iters: int = 100,
    tol: float = 1e-3,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  r"""Top-``k`` eigenpairs of a symmetric operator by power iteration.

  PyHessian's scheme: start from a Gaussian vector; repeat
  :math:`v \leftarrow \mathrm{orth}(v)`, :math:`\lambda = v^\top A v`,
  :math:`v \leftarrow Av / \|Av\|` until
  :math:`|\lambda - \lambda_{prev}| / (|\lambda_{prev}| + 10^{-6}) < tol`;
  later eigenpairs are deflated by Gram-Schmidt against the ones found. Power
  iteration finds the largest-*magnitude* eigenvalues; their sign is kept.

  Args:
    matvec: ``x -> A x`` on float32 vectors of length ``dim``.
    dim: the vector length.
    key: a PRNG key for the starting vectors.
    k: how many eigenpairs.
    max_iters: the most iterations per eigenpair.
    tol: relative change of :math:`\lambda` that stops an eigenpair.

  Returns:
    ``(eigenvalues [k], eigenvectors [k, dim], iterations [k])``.
  """

  return _power_iteration(_LaxLoops(matvec, dim), key, k, max_iters, tol)


# Lanczos: carry = (basis, alphas, betas, v, v_prev, beta_prev).


def _lanczos_init(v0, num_steps):
  v = _normalize(v0.astype(jnp.float32))
  return (
      jnp.zeros((num_steps, v.shape[0]), jnp.float32),
      jnp.zeros((num_steps,), jnp.float32),
      jnp.zeros((num_steps,), jnp.float32), v,
      jnp.zeros_like(v), jnp.zeros((), jnp.float32),
  )


def _lanczos_body(matvec, dim, carry, j, key, breakdown_tol):
  del dim
  basis, alphas, betas, v, v_prev, beta_prev = carry

  def reorth(w):
    for _ in range(2):
      w = w - basis.T @ (basis @ w)
    return w

  basis = basis.at[j].set(v)
  av = matvec(v)
  alpha = jnp.vdot(v, av)
  w = reorth(av - alpha * v - beta_prev * v_prev)
  beta = jnp.linalg.norm(w)
  scale = jnp.maximum(jnp.linalg.norm(av), jnp.abs(alpha))
  broke = beta <= breakdown_tol * scale

  def restart(_):
    r = jax.random.normal(jax.random.fold_in(key, j), v.shape)
    r_norm0 = jnp.linalg.norm(r)
    r = reorth(r)
    return jnp.where(jnp.linalg.norm(r) > 1e-3 * r_norm0, _normalize(r), 0.0)

  v_next = jax.lax.cond(
      broke, restart, lambda _: w * base.safe_inverse(beta), None
  )
  beta = jnp.where(broke, 0.0, beta)
  return (basis, alphas.at[j].set(alpha), betas.at[j].set(beta), v_next, v, beta)


def _lanczos(loops: Loops, v0, num_steps, key, breakdown_tol=1e-5):
  carry = loops.fori_loop(
      0, num_steps,
      lambda j, c: loops.step(_lanczos_body, c, j, key, breakdown_tol,
                              donate=True),
      _lanczos_init(v0, num_steps),
  )
  basis, alphas, betas = carry[:3]
  return alphas, betas[:-1], basis


def lanczos(
    matvec: MatVec,
    v0: jax.Array,
    num_steps: int,
    *,
    key: jax.Array | None = None,
    breakdown_tol: float = 1e-5,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  r"""Lanczos tridiagonalisation with full re-orthogonalisation.

  Builds an orthonormal basis :math:`V` of the Krylov space of ``v0`` and the
  tridiagonal :math:`T = V^\top A V` (``alphas`` on the diagonal, ``betas`` off
  it). Every new vector is re-orthogonalised twice against all previous ones.
  When the Krylov space is exhausted (a residual below ``breakdown_tol``
  relative to :math:`\|Av\|`) the next vector is a random one orthogonal to the
  basis and the coupling :math:`\beta` is 0, so :math:`T` stays exact; once no
  such vector exists (``num_steps > dim``) the remaining vectors are zero.

  Args:
    matvec: ``x -> A x`` for a symmetric ``A`` on float32 vectors.
    v0: the starting vector (normalised here).
    num_steps: ``m``, the number of Lanczos steps (matrix-vector products).
    key: PRNG key for restarts after a breakdown (a fixed key if None).
    breakdown_tol: relative residual that counts as a breakdown.

  Returns:
    ``(alphas [m], betas [m-1], basis [m, dim])``.
  """
  key = jax.random.PRNGKey(0) if key is None else key
  return _lanczos(_LaxLoops(matvec, jnp.shape(v0)[0]), v0, num_steps, key,
                  breakdown_tol)


def tridiagonal_eigh(
    alphas: jax.Array, betas: jax.Array
) -> tuple[jax.Array, jax.Array]:
  r"""Eigen-decomposition of the Lanczos tridiagonal :math:`T` with ``eigh``.

  Returns ``(nodes, vectors)``: ascending eigenvalues :math:`\theta_k` and the
  columns :math:`u_k`. The Gauss quadrature weights of the starting vector are
  ``vectors[0] ** 2``.
  """
  t = jnp.diag(alphas) + jnp.diag(betas, 1) + jnp.diag(betas, -1)
  return jnp.linalg.eigh(t)


# ---------------------------------------------------------------------------
# Measures: each one function of its loops (see _run_measure).
# ---------------------------------------------------------------------------


class Eigenpairs(NamedTuple):
  """Top Hessian eigenpairs.

  Attributes:
    eigenvalues: ``[k]`` float32, in the order found (power iteration:
      decreasing magnitude; Lanczos: decreasing value).
    eigenvectors: a pytree shaped like the parameters with a leading ``[k]``
      axis, float32, unit global norm.
    num_iterations: power iteration: iterations used per eigenpair; Lanczos:
      the number of Lanczos steps.
  """

  eigenvalues: jax.Array
  eigenvectors: Any
  num_iterations: jax.Array


def hessian_eigenpairs(
    loss_fn: LossFn,
    params: Any,
    data: Any,
    key: jax.Array,
    *,
    k: int = 1,
    method: str = "power",
    max_iters: int = 100,
    tol: float = 1e-3,
    num_lanczos_steps: int | None = None,
    loop: str = "lax",
) -> Eigenpairs:
  r"""Top-``k`` eigenvalues and eigenvectors of the loss Hessian.

  ``method="power"`` is PyHessian's power iteration with deflation (defaults
  ``max_iters=100``, ``tol=1e-3``; it finds the largest-*magnitude*
  eigenvalues, with their sign). ``method="lanczos"`` runs
  ``num_lanczos_steps`` Lanczos steps with full re-orthogonalisation (default
  ``max(3k, 30)``, capped at the dimension) and returns the ``k`` largest Ritz
  values with their Ritz vectors; it needs fewer Hessian-vector products for
  several eigenpairs and finds the largest *algebraic* eigenvalues.

  Near a minimum the top eigenvalue :math:`\lambda_{max}` is the classic
  sharpness; GSAM's surrogate gap gives :math:`\lambda_{max} \approx
  2h/\rho^2`.

  References:
    Yao et al., PyHessian: Neural Networks Through the Lens of the Hessian,
    IEEE BigData 2020, https://arxiv.org/abs/1912.07145.

  Args:
    loss_fn: ``loss_fn(params, batch)`` returning per-example losses ``[B]``.
    params: the parameters, any pytree.
    data: one batch or an iterable of batches (batch-size weighted).
    key: PRNG key for the starting vectors.
    k: number of eigenpairs, ``>= 1``.
    method: ``"power"`` or ``"lanczos"``.
    max_iters: power iteration: iterations per eigenpair.
    tol: power iteration: relative change of the eigenvalue that stops.
    num_lanczos_steps: Lanczos: number of steps ``m >= k``.
    loop: ``"lax"`` (default) runs every loop as a ``lax`` loop inside one
      ``jax.jit`` (the function can be called inside the caller's ``jit``);
      ``"host"`` runs the same steps from a Python loop, one compiled step
      per Hessian-vector product. Use ``"host"`` for convolutional networks
      on CPU, where XLA runs convolutions inside device loops several times
      slower (jax-ml/jax#12868); compilation stays independent of the number
      of iterations either way.

  Returns:
    An :class:`Eigenpairs`.

  Example:
    >>> import jax, jax.numpy as jnp, sharpjax.measures as sm
    >>> a = jnp.diag(jnp.array([3., 2., 1.]))
    >>> loss = lambda w, b: 0.5 * b * (w @ a @ w)
    >>> r = sm.hessian_eigenpairs(loss, jnp.ones(3), jnp.ones(2),
    ...                           jax.random.PRNGKey(0), tol=1e-6)
    >>> round(float(r.eigenvalues[0]), 3)
    3.0
  """
  k = base.check_int("k", k, low=1)
  if method not in ("power", "lanczos"):
    raise ValueError(f"method must be 'power' or 'lanczos', got {method!r}.")
  max_iters = base.check_int("max_iters", max_iters, low=1)
  base.check_range("tol", tol, low=0.0)
  batches = _data.as_batches(data, "hessian_eigenpairs")
  dim = hessian.flat_view(params).dim
  if k > dim:
    raise ValueError(f"k must be in [1, {dim}] (the dimension), got {k}.")
  if method == "lanczos":
    m = max(3 * k, 30) if num_lanczos_steps is None else num_lanczos_steps
    m = min(base.check_int("num_lanczos_steps", m, low=k), dim)
  else:
    m = 0
  return _run_measure(_eigenpairs, loop, loss_fn, params, batches, key, k,
                      method, max_iters, float(tol), m)


def _eigenpairs(loops: Loops, params, key, k, method, max_iters, tol, m):
  if method == "power":
    values, vectors, iters = _power_iteration(loops, key, k, max_iters, tol)
  else:
    k0, k1 = jax.random.split(key)
    v0 = jax.random.normal(k0, (loops.dim,))
    alphas, betas, basis = _lanczos(loops, v0, m, k1)
    nodes, u = tridiagonal_eigh(alphas, betas)
    order = jnp.argsort(-nodes)[:k]
    values = nodes[order]
    vectors = jax.vmap(_normalize)((basis.T @ u[:, order]).T)
    iters = jnp.full((k,), m, jnp.int32)
  unravel = hessian.flat_view(params).unravel
  return Eigenpairs(values, jax.vmap(unravel)(vectors), iters)


class TraceEstimate(NamedTuple):
  r"""Hutchinson estimates from Rademacher probes.

  Attributes:
    trace: :math:`\mathrm{tr}\,H \approx \frac1K\sum_k z_k^\top H z_k`.
    trace_stderr: its standard error (sample std / :math:`\sqrt K`).
    trace_sq: :math:`\mathrm{tr}\,H^2 = \|H\|_F^2 \approx
      \frac1K\sum_k \|H z_k\|^2`, from the same probes.
    trace_sq_stderr: its standard error.
    diagonal: :math:`\mathrm{diag}\,H \approx \frac1K\sum_k z_k \odot H z_k`,
      a float32 pytree shaped like the parameters.
    num_probes: ``K``.
  """

  trace: jax.Array
  trace_stderr: jax.Array
  trace_sq: jax.Array
  trace_sq_stderr: jax.Array
  diagonal: Any
  num_probes: int


def hessian_trace(
    loss_fn: LossFn,
    params: Any,
    data: Any,
    key: jax.Array,
    *,
    num_probes: int = 100,
    probes_per_step: int | None = None,
    loop: str = "lax",
) -> TraceEstimate:
  r"""Hessian trace (and :math:`\mathrm{tr}\,H^2`, diagonal) by Hutchinson.

  .. math::
    \mathrm{tr}\,H \approx \frac1K \sum_{k=1}^K z_k^\top H z_k,\qquad
    z_k \in \{\pm 1\}^d \text{ uniform},

  with a standard error from the sample spread. The same probes give
  :math:`\mathrm{tr}\,H^2 \approx \frac1K\sum_k\|Hz_k\|^2` (for
  :func:`renyi_sharpness` of order 2) and the diagonal estimate. PyHessian
  stops on a tolerance; here ``K`` is fixed (``num_probes=100``, PyHessian's
  maximum) so the loop is one ``lax`` loop, and the standard error says how
  far to trust it. Cost: ``K`` Hessian-vector products.

  References:
    Hutchinson, A stochastic estimator of the trace of the influence matrix,
    1989; Yao et al., PyHessian, IEEE BigData 2020,
    https://arxiv.org/abs/1912.07145.

  Args:
    loss_fn: ``loss_fn(params, batch)`` returning per-example losses ``[B]``.
    params: the parameters, any pytree.
    data: one batch or an iterable of batches (batch-size weighted).
    key: PRNG key for the probes.
    num_probes: ``K >= 2``.
    probes_per_step: probes evaluated together with ``vmap`` (faster, more
      memory); ``None`` evaluates one at a time; ``num_probes`` evaluates all
      at once with no loop.
    loop: ``"lax"`` (default) or ``"host"``, as for
      :func:`hessian_eigenpairs` (``"host"`` for convolutional networks on
      CPU).

  Returns:
    A :class:`TraceEstimate`.

  Example:
    >>> import jax, jax.numpy as jnp, sharpjax.measures as sm
    >>> loss = lambda w, b: 0.5 * b * jnp.sum(jnp.array([3., 2., 1.]) * w ** 2)
    >>> r = sm.hessian_trace(loss, jnp.ones(3), jnp.ones(2), jax.random.PRNGKey(0))
    >>> round(float(r.trace), 3), round(float(r.trace_sq), 3)
    (6.0, 14.0)
  """
  num_probes = base.check_int("num_probes", num_probes, low=2)
  if probes_per_step is not None:
    probes_per_step = base.check_int("probes_per_step", probes_per_step, low=1)
  batches = _data.as_batches(data, "hessian_trace")
  estimate = _run_measure(_trace, loop, loss_fn, params, batches, key,
                          num_probes, probes_per_step)
  return estimate._replace(num_probes=num_probes)


def _trace(loops: Loops, params, key, num_probes, probes_per_step):
  quad, sq, diag = loops.map_steps(
      hessian.probe, jnp.arange(num_probes), probes_per_step, key)
  root = jnp.sqrt(float(num_probes))
  return TraceEstimate(
      trace=jnp.mean(quad),
      trace_stderr=jnp.std(quad, ddof=1) / root,
      trace_sq=jnp.mean(sq),
      trace_sq_stderr=jnp.std(sq, ddof=1) / root,
      diagonal=hessian.flat_view(params).unravel(jnp.mean(diag, axis=0)),
      num_probes=num_probes,
  )


class SpectralDensity(NamedTuple):
  r"""Hessian spectral density by stochastic Lanczos quadrature.

  Attributes:
    grid: ``[G]`` eigenvalue grid.
    density: ``[G]`` smoothed density on ``grid``, integrating to 1.
    nodes: ``[R, m]`` Gauss quadrature nodes :math:`\theta` (Ritz values) of
      each of the ``R`` runs.
    weights: ``[R, m]`` quadrature weights :math:`\tau = u_0^2`; each row sums
      to 1.
    dim: the number of parameters :math:`d`;
      :math:`\mathrm{tr} f(H) \approx d\cdot\mathrm{mean}_r\sum_k \tau_{rk}
      f(\theta_{rk})` (see :func:`spectral_moment`).
    sigma: the Gaussian smoothing width.
  """

  grid: jax.Array
  density: jax.Array
  nodes: jax.Array
  weights: jax.Array
  dim: int
  sigma: jax.Array


def spectral_density(
    loss_fn: LossFn,
    params: Any,
    data: Any,
    key: jax.Array,
    *,
    num_steps: int = 90,
    num_runs: int = 1,
    probe: str = "rademacher",
    grid_size: int = 10_000,
    sigma_squared: float = 1e-5,
    margin: float = 0.01,
    loop: str = "lax",
) -> SpectralDensity:
  r"""Hessian eigenvalue density by stochastic Lanczos quadrature (SLQ).

  For each run, ``num_steps`` (= ``m``) Lanczos steps with full
  re-orthogonalisation from a normalised random vector give a tridiagonal
  :math:`T`; ``eigh(T)`` gives nodes :math:`\theta_k` and weights
  :math:`\tau_k = (u_k)_0^2`. Then

  .. math::
    \phi(t) = \frac1R\sum_r \sum_k \tau_{rk}\,
    \mathcal N(t;\ \theta_{rk}, \sigma^2),\qquad
    \sigma^2 = 10^{-5}\max(1, \lambda_{max} - \lambda_{min}),

  on a ``grid_size``-point grid from the mean smallest node minus ``margin``
  to the mean largest plus ``margin``, normalised to integrate to 1 (PyHessian's
  ``density_generate``). Spectral moments are :math:`\mathrm{tr}\,f(H)
  \approx d\cdot\mathrm{mean}_r\sum_k\tau_{rk} f(\theta_{rk})`, exact for
  polynomials of degree below :math:`2m` up to the probe's randomness.
  Unlike PyHessian's current ``density()`` (which reads ``torch.linalg.eig``
  output in the old ``torch.eig`` layout), this uses ``eigh``. Cost:
  ``m * R`` Hessian-vector products and ``m`` vectors of memory.

  References:
    Ghorbani, Krishnan, Xiao, An Investigation into Neural Net Optimization via
    Hessian Eigenvalue Density, ICML 2019, https://arxiv.org/abs/1901.10159;
    Yao et al., PyHessian, https://arxiv.org/abs/1912.07145.

  Args:
    loss_fn: ``loss_fn(params, batch)`` returning per-example losses ``[B]``.
    params: the parameters, any pytree.
    data: one batch or an iterable of batches (batch-size weighted).
    key: PRNG key for the starting vectors.
    num_steps: Lanczos steps ``m`` per run (default 90).
    num_runs: independent runs ``R`` (PyHessian ``n_v``, default 1).
    probe: starting vector, ``"rademacher"`` (PyHessian) or ``"gaussian"``
      (Ghorbani et al.).
    grid_size: number of grid points.
    sigma_squared: relative Gaussian smoothing variance.
    margin: grid margin beyond the extreme nodes.
    loop: ``"lax"`` (default) or ``"host"``, as for
      :func:`hessian_eigenpairs` (``"host"`` for convolutional networks on
      CPU).

  Returns:
    A :class:`SpectralDensity`: the smoothed density on its grid, and the
    quadrature nodes and weights that :func:`spectral_moment` integrates.

  Example:
    With as many Lanczos steps as parameters, the quadrature is exact: the
    Hessian :math:`\mathrm{diag}(3, 2, 1)` has trace 6.

    >>> import jax, jax.numpy as jnp, sharpjax.measures as sm
    >>> def loss(w, b):
    ...   return 0.5 * b * jnp.sum(jnp.array([3., 2., 1.]) * w ** 2)
    >>> d = sm.spectral_density(loss, jnp.ones(3), jnp.ones(2),
    ...                         jax.random.PRNGKey(0), num_steps=3)
    >>> round(float(sm.spectral_moment(d, lambda t: t)), 3)
    6.0
  """
  num_steps = base.check_int("num_steps", num_steps, low=1)
  num_runs = base.check_int("num_runs", num_runs, low=1)
  grid_size = base.check_int("grid_size", grid_size, low=2)
  base.check_range("sigma_squared", sigma_squared, low=0.0, low_inclusive=False)
  base.check_range("margin", margin, low=0.0)
  if probe not in ("rademacher", "gaussian"):
    raise ValueError(f"probe must be 'rademacher' or 'gaussian', got {probe!r}.")
  batches = _data.as_batches(data, "spectral_density")
  density = _run_measure(
      _density, loop, loss_fn, params, batches, key, num_steps, num_runs,
      probe, grid_size, float(sigma_squared), float(margin),
  )
  return density._replace(dim=hessian.flat_view(params).dim)


def _density(loops: Loops, params, key, num_steps, num_runs, probe, grid_size,
             sigma_squared, margin):
  del params

  def run(r):
    k0, k1 = jax.random.split(jax.random.fold_in(key, r))
    if probe == "rademacher":
      v0 = jax.random.rademacher(k0, (loops.dim,), jnp.float32)
    else:
      v0 = jax.random.normal(k0, (loops.dim,))
    alphas, betas, _ = _lanczos(loops, v0, num_steps, k1)
    nodes, u = tridiagonal_eigh(alphas, betas)
    return nodes, u[0] ** 2

  nodes, weights = loops.map(run, jnp.arange(num_runs))
  grid, density, sigma = density_from_quadrature(
      nodes, weights, grid_size=grid_size, sigma_squared=sigma_squared,
      margin=margin,
  )
  return SpectralDensity(grid, density, nodes, weights, loops.dim, sigma)


def density_from_quadrature(
    nodes: jax.Array,
    weights: jax.Array,
    *,
    grid_size: int = 10_000,
    sigma_squared: float = 1e-5,
    margin: float = 0.01,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Gaussian-smoothed density from SLQ nodes/weights ``[R, m]``.

  Returns ``(grid, density, sigma)``; see :func:`spectral_density`.
  """
  # Zero-weight nodes (Lanczos restarts past the dimension) do not set the range.
  live = weights > 0
  big = jnp.finfo(jnp.float32).max
  top = jnp.mean(jnp.max(jnp.where(live, nodes, -big), axis=1)) + margin
  bottom = jnp.mean(jnp.min(jnp.where(live, nodes, big), axis=1)) - margin
  var = sigma_squared * jnp.maximum(1.0, top - bottom)
  grid = jnp.linspace(bottom, top, grid_size)
  diff = grid[:, None, None] - nodes[None]
  gauss = jnp.exp(-0.5 * diff**2 / var) / jnp.sqrt(2 * jnp.pi * var)
  density = jnp.mean(jnp.sum(gauss * weights[None], axis=2), axis=1)
  norm = jnp.sum(density) * (grid[1] - grid[0])
  density = density * base.safe_inverse(norm)
  return grid, density, jnp.sqrt(var)


def spectral_moment(
    density: SpectralDensity, fn: Callable[[jax.Array], jax.Array]
) -> jax.Array:
  r""":math:`\mathrm{tr} f(H) \approx d\cdot\mathrm{mean}_r\sum_k\tau_{rk}
  f(\theta_{rk})` from a :class:`SpectralDensity`.

  ``fn`` maps an array of eigenvalues elementwise, e.g. ``lambda t: t ** 2``
  for :math:`\mathrm{tr}\,H^2`.
  """
  values = jnp.where(density.weights > 0, fn(density.nodes), 0.0)
  per_run = jnp.sum(density.weights * values, axis=-1)
  return density.dim * jnp.mean(per_run)


def renyi_sharpness(
    estimate: TraceEstimate | SpectralDensity,
    alpha: float = 2.0,
    *,
    negative: str = "clip",
) -> jax.Array:
  r"""Rényi sharpness: minus the Rényi entropy of the normalised spectrum.

  With :math:`p_i = \lambda_i / \sum_j\lambda_j`,

  .. math::
    R_\alpha = -H_\alpha(p) = \frac{1}{\alpha-1}
    \log\frac{\sum_i\lambda_i^\alpha}{(\sum_i\lambda_i)^\alpha}
    \in[-\log d, 0],\qquad R_1 = \sum_i p_i\log p_i.

  0 means one dominant eigenvalue, :math:`-\log d` a flat spectrum; the value
  is invariant to rescaling :math:`H`. From a :class:`TraceEstimate`
  (Hutchinson), only order 2: :math:`R_2 = \log(\mathrm{tr}\,H^2 /
  (\mathrm{tr}\,H)^2)` (a ratio of estimates). From a
  :class:`SpectralDensity` (SLQ), any order :math:`\alpha > 0`, with
  :math:`\sum_i\lambda_i^\alpha \approx d\sum_k\tau_k\theta_k^\alpha`.
  Negative eigenvalues have no place in :math:`p`; ``negative="clip"`` sets
  them to 0 and ``negative="abs"`` uses :math:`|\lambda|` (the paper's policy
  is not stated). The order-2 Hutchinson form uses the signed trace.

  References:
    Zhang et al., Rényi Sharpness, 2025, https://arxiv.org/abs/2510.07758.

  Args:
    estimate: a :class:`TraceEstimate` or a :class:`SpectralDensity`.
    alpha: the order, ``> 0`` (must be 2 for a :class:`TraceEstimate`).
    negative: ``"clip"`` or ``"abs"``, for SLQ nodes below 0.

  Returns:
    A float32 scalar.
  """
  base.check_range("alpha", alpha, low=0.0, low_inclusive=False)
  if negative not in ("clip", "abs"):
    raise ValueError(f"negative must be 'clip' or 'abs', got {negative!r}.")
  if isinstance(estimate, TraceEstimate):
    if alpha != 2:
      raise ValueError(
          "alpha must be 2 with a TraceEstimate (Hutchinson gives tr H^2); "
          f"got {alpha}. Use a SpectralDensity for other orders."
      )
    return jnp.log(estimate.trace_sq / estimate.trace**2)
  if not isinstance(estimate, SpectralDensity):
    raise TypeError(
        "estimate must be a TraceEstimate or a SpectralDensity, got "
        f"{type(estimate).__name__}."
    )
  fix = (lambda t: jnp.maximum(t, 0.0)) if negative == "clip" else jnp.abs
  total = spectral_moment(estimate, fix)
  if alpha == 1:
    def plogp(t):
      t = fix(t)
      return jnp.where(t > 0, t * jnp.log(jnp.where(t > 0, t, 1.0)), 0.0)

    return spectral_moment(estimate, plogp) / total - jnp.log(total)
  power = spectral_moment(estimate, lambda t: fix(t) ** alpha)
  return (jnp.log(power) - alpha * jnp.log(total)) / (alpha - 1.0)
