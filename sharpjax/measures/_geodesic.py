r"""Geodesic sharpness: worst-case sharpness on the quotient by GL(h) symmetries.

A *GL(h) block* is a pair of matrices :math:`G \in \mathbb R^{n\times h}`,
:math:`H \in \mathbb R^{m\times h}` that enters the network only through
:math:`G H^\top`, so :math:`(G, H) \mapsto (G A^{-1}, H A^\top)` leaves the
function unchanged for every invertible :math:`A`. In attention every head
has two: :math:`(W_Q^i, W_K^i)` and :math:`(W_V^i, (W_O^i)^\top)`, with the
biases appended as a last row of :math:`G` (and of :math:`H` for the key).
Adaptive sharpness is not invariant under these maps. Geodesic sharpness
(da Silva, Dangel and Oore, ICML 2025) measures the worst loss increase over
*horizontal* tangent vectors :math:`\xi` (orthogonal to the orbit under a
GL-invariant metric) of metric norm at most :math:`\rho`, moving along the
geodesic :math:`\gamma_\xi` instead of a straight line:

.. math::
  S^\rho_{max}(w) = \mathbb E_S\Big[\max_{\xi\ \mathrm{horizontal},\
    \|\xi\|_{g,w}\le\rho} L_S(\gamma_\xi(1)) - L_S(w)\Big], \qquad
  \gamma_\xi(1) \approx w + \xi - \tfrac12 \Gamma_w(\xi, \xi).

Metrics on a block (Eq. 9, "inv", and Eq. 10, "mix"):

.. math::
  \langle\eta,\zeta\rangle^{inv} = \mathrm{tr}[(G^\top G)^{-1}\eta_G^\top
  \zeta_G + (H^\top H)^{-1}\eta_H^\top\zeta_H], \qquad
  \langle\eta,\zeta\rangle^{mix} = \mathrm{tr}[(H^\top H)\eta_G^\top\zeta_G
  + (G^\top G)\eta_H^\top\zeta_H];

every other parameter uses the adaptive metric
:math:`\|\xi_w\| = \|\xi_w / |w|\|_2` and moves to first order.

Which parts are the paper's and which this library's construction:

* the metrics, the Riemannian gradients (inv: :math:`\nabla_G L\, G^\top G`;
  mix: :math:`\nabla_G L\,(H^\top H)^{-1}`), the Christoffel term of the inv
  metric (Eq. 11) and of the mix metric's G block (Eq. 12), the mix
  metric's horizontal projection, and Auto-PGD over :math:`\xi` are the
  paper's;
* the mix metric's H block Christoffel term (Eq. 12 with the roles swapped),
  and the inv metric's horizontal projection, are the spec's *derived*
  corrections (the paper's printed inv condition is not horizontal, checked
  numerically): solve :math:`AX + XA = B` with :math:`A = G^\top G H^\top H`,
  :math:`B = G^\top G H^\top\xi_H - \xi_G^\top G H^\top H`,
  :math:`\Lambda = X^\top`, then :math:`\xi \mapsto (\xi_G + G\Lambda,\
  \xi_H - H\Lambda^\top)`; solved in closed form through
  :math:`S = (G^\top G)^{1/2}`, :math:`C = S H^\top H S = Q\,\mathrm{diag}
  (\lambda)\,Q^\top`;
* the constraint set's projection (horizontal projection, then rescaling to
  the metric ball, which is exact because the set is a ball in a linear
  subspace), the ascent direction (the horizontal Riemannian gradient
  normalised in the metric, the maximiser of the linearised loss), and the
  APGD bookkeeping (initial step :math:`2\rho`, momentum 0.75, the
  checkpoints of :func:`~sharpjax.measures.apgd_checkpoints`, the update
  :math:`\xi_{k+1} = \mu z + (1-\mu)\xi_{k-1}`) are those of
  :func:`~sharpjax.measures.worst_case_sharpness` (``ascent="scaled"``), so
  that with no blocks and ``geodesic="first_order"`` the two measures agree;
* ``geodesic="exact"`` (the geodesic ODE :math:`\ddot x = -\Gamma_x(\dot x,
  \dot x)` integrated by RK4 on the blocks) is this library's addition; the
  paper uses the second-order form.
"""

from __future__ import annotations

import collections.abc
import functools
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp

from sharpjax._src import base
from sharpjax.measures import _data
from sharpjax.measures import _sharpness

LossFn = _data.LossFn

_LAYOUTS = ("rh", "rHh", "Hhr")
_METRICS = ("inv", "mix")
_GEODESICS = ("first_order", "second_order", "exact")


class SymmetricBlock(NamedTuple):
  """Where a GL(h) symmetric pair :math:`(G, H)`, used as :math:`G H^\\top`, lives.

  Paths are tuples of dict keys into the parameters. A kernel's layout says
  how to read per-head matrices ``[rows, h]`` from it:

  * ``"rh"``: ``[rows, h]``, one head (a plain pair, LoRA's factors);
  * ``"rHh"``: ``[rows, heads, h]`` (Flax attention's query/key/value kernel);
  * ``"Hhr"``: ``[heads, h, rows]`` (Flax attention's output kernel, read
    transposed: :math:`H = (W_O^i)^\\top`).

  A bias (``[h]`` for ``rh``, ``[heads, h]`` for ``rHh``; none for ``Hhr``)
  is appended to its kernel as one more row.

  Attributes:
    g: path of G's kernel.
    h: path of H's kernel.
    g_bias: path of G's bias, or None.
    h_bias: path of H's bias, or None.
    g_layout: layout of G's kernel.
    h_layout: layout of H's kernel.

  Example:
    >>> from sharpjax.measures import SymmetricBlock
    >>> lora = SymmetricBlock(g=("lora", "L"), h=("lora", "R"))
  """

  g: tuple
  h: tuple
  g_bias: Optional[tuple] = None
  h_bias: Optional[tuple] = None
  g_layout: str = "rh"
  h_layout: str = "rh"


def attention_blocks(params: Any) -> list[SymmetricBlock]:
  """The Q/K and V/O blocks of every Flax ``MultiHeadDotProductAttention``.

  Finds each dict with ``query``, ``key``, ``value`` and ``out`` sub-dicts
  holding a ``kernel`` (the parameters of ``nn.MultiHeadDotProductAttention``,
  as in the zoo's ViT), and returns for it the block
  :math:`([W_Q; b_Q], [W_K; b_K])` and the block
  :math:`([W_V; b_V], W_O^\\top)` (per head, via the layouts).
  """
  found = []

  def walk(node, path):
    if not isinstance(node, collections.abc.Mapping):
      return
    names = ("query", "key", "value", "out")
    if all(isinstance(node.get(k), collections.abc.Mapping)
           and "kernel" in node[k] for k in names):
      bias = lambda k: (path + (k, "bias")) if "bias" in node[k] else None
      found.append(SymmetricBlock(
          g=path + ("query", "kernel"), h=path + ("key", "kernel"),
          g_bias=bias("query"), h_bias=bias("key"),
          g_layout="rHh", h_layout="rHh"))
      found.append(SymmetricBlock(
          g=path + ("value", "kernel"), h=path + ("out", "kernel"),
          g_bias=bias("value"), h_bias=None,
          g_layout="rHh", h_layout="Hhr"))
      return
    for k in sorted(node):
      walk(node[k], path + (k,))

  walk(params, ())
  return found


# ---------------------------------------------------------------------------
# Per-block geometry on [..., n, h] arrays (leading axes: heads).
# ---------------------------------------------------------------------------


def _t(x):
  return jnp.swapaxes(x, -1, -2)


def _gram(x, eps):
  h = x.shape[-1]
  return _t(x) @ x + eps * jnp.eye(h, dtype=x.dtype)


def block_inner(g, h, eta, zeta, metric: str = "inv", eps: float = 0.0):
  """The metric's inner product of two tangent vectors of a block.

  ``eta`` and ``zeta`` are pairs ``(d_G, d_H)``; leading axes (heads) are
  summed over.
  """
  pg, ph = _gram(g, eps), _gram(h, eps)
  if metric == "inv":
    wg, wh = jnp.linalg.inv(pg), jnp.linalg.inv(ph)
  else:
    wg, wh = ph, pg
  tr = lambda w, a, b: jnp.sum(jnp.trace(w @ _t(a) @ b, axis1=-2, axis2=-1))
  return tr(wg, eta[0], zeta[0]) + tr(wh, eta[1], zeta[1])


def riemannian_gradient(g, h, grad_g, grad_h, metric: str = "inv",
                        eps: float = 0.0):
  """Converts the Euclidean gradient of a block into the metric's gradient."""
  pg, ph = _gram(g, eps), _gram(h, eps)
  if metric == "inv":
    return grad_g @ pg, grad_h @ ph
  return grad_g @ jnp.linalg.inv(ph), grad_h @ jnp.linalg.inv(pg)


def horizontal_projection(g, h, xi_g, xi_h, metric: str = "inv",
                          eps: float = 0.0):
  r"""Projects a tangent vector of a block onto the horizontal space.

  :math:`\xi \mapsto (\xi_G + G\Lambda, \xi_H - H\Lambda^\top)`, the metric
  orthogonal projection (the vertical space is
  :math:`\{(-GX, HX^\top)\}`). mix: :math:`\Lambda = \frac12[\xi_H^\top H
  (H^\top H)^{-1} - (G^\top G)^{-1}G^\top\xi_G]`. inv: the spec's derived
  Sylvester form (module docstring).
  """
  pg, ph = _gram(g, eps), _gram(h, eps)
  if metric == "mix":
    lam = 0.5 * (_t(xi_h) @ h @ jnp.linalg.inv(ph)
                 - jnp.linalg.inv(pg) @ _t(g) @ xi_g)
  else:
    b = pg @ _t(h) @ xi_h - _t(xi_g) @ g @ ph
    sig, u = jnp.linalg.eigh(pg)
    root = jnp.sqrt(jnp.maximum(sig, 0.0))
    s = (u * root[..., None, :]) @ _t(u)
    s_inv = (u * (1.0 / root)[..., None, :]) @ _t(u)
    lam_c, q = jnp.linalg.eigh(s @ ph @ s)
    m = _t(q) @ s_inv @ b @ s @ q
    y = m / (lam_c[..., :, None] + lam_c[..., None, :])
    x = s @ q @ y @ _t(q) @ s_inv
    lam = _t(x)
  return xi_g + g @ lam, xi_h - h @ _t(lam)


def christoffel(g, h, xi_g, xi_h, metric: str = "inv", eps: float = 0.0):
  r""":math:`\Gamma_{(G,H)}(\xi, \xi)` of the metric (Eq. 11 inv, Eq. 12 mix)."""
  pg_inv = jnp.linalg.inv(_gram(g, eps))
  ph_inv = jnp.linalg.inv(_gram(h, eps))
  sym = lambda a, x: _t(x) @ a + _t(a) @ x
  if metric == "inv":
    one = lambda a, x, p_inv: (-x @ p_inv @ sym(a, x)
                               + a @ p_inv @ _t(x) @ x)
    return one(g, xi_g, pg_inv), one(h, xi_h, ph_inv)
  gam_g = xi_g @ sym(h, xi_h) @ ph_inv - g @ (_t(xi_h) @ xi_h) @ ph_inv
  gam_h = xi_h @ sym(g, xi_g) @ pg_inv - h @ (_t(xi_g) @ xi_g) @ pg_inv
  return gam_g, gam_h


def geodesic_block(g, h, v_g, v_h, metric: str = "inv", num_steps: int = 20,
                   eps: float = 0.0, t: float = 1.0):
  r"""The geodesic :math:`\gamma(t)` from ``(g, h)`` with velocity ``(v_g, v_h)``.

  Integrates :math:`\ddot x = -\Gamma_x(\dot x, \dot x)` with ``num_steps``
  RK4 steps (this library's addition; the paper's estimator uses the second
  order form :math:`x + \xi - \frac12\Gamma(\xi, \xi)`).
  """
  dt = t / num_steps

  def accel(state):
    x_g, x_h, u_g, u_h = state
    a_g, a_h = christoffel(x_g, x_h, u_g, u_h, metric, eps)
    return (u_g, u_h, -a_g, -a_h)

  def rk4(state, _):
    add = lambda s, k, c: tuple(a + c * b for a, b in zip(s, k))
    k1 = accel(state)
    k2 = accel(add(state, k1, 0.5 * dt))
    k3 = accel(add(state, k2, 0.5 * dt))
    k4 = accel(add(state, k3, dt))
    new = tuple(
        s + dt / 6.0 * (a + 2 * b + 2 * c + d)
        for s, a, b, c, d in zip(state, k1, k2, k3, k4)
    )
    return new, None

  (x_g, x_h, _, _), _ = jax.lax.scan(rk4, (g, h, v_g, v_h), None,
                                     length=num_steps)
  return x_g, x_h


# ---------------------------------------------------------------------------
# Reading blocks out of a parameter pytree and writing them back.
# ---------------------------------------------------------------------------


def _get(tree, path):
  for k in path:
    tree = tree[k]
  return tree


def _set(tree, path, value):
  if not path:
    return value
  out = dict(tree)
  out[path[0]] = _set(tree[path[0]], path[1:], value)
  return out


def _kernel_heads(k, layout):
  if layout == "rh":
    return k[None]
  if layout == "rHh":
    return jnp.transpose(k, (1, 0, 2))
  return jnp.transpose(k, (0, 2, 1))


def _heads_kernel(x, layout):
  if layout == "rh":
    return x[0]
  if layout == "rHh":
    return jnp.transpose(x, (1, 0, 2))
  return jnp.transpose(x, (0, 2, 1))


def _bias_heads(b, layout):
  return b[None, None, :] if layout == "rh" else b[:, None, :]


def _heads_bias(x, layout):
  return x[0, 0] if layout == "rh" else x[:, 0, :]


def _work_dtype(x):
  """float32, or float64 for float64 leaves (with jax_enable_x64)."""
  return jnp.promote_types(jnp.asarray(x).dtype, jnp.float32)


def _read_side(tree, kernel_path, bias_path, layout):
  kernel = _get(tree, kernel_path)
  k = _kernel_heads(kernel.astype(_work_dtype(kernel)), layout)
  if bias_path is None:
    return k
  bias = _get(tree, bias_path)
  b = _bias_heads(bias.astype(_work_dtype(bias)), layout)
  return jnp.concatenate([k, b], axis=-2)


def _write_side(tree, x, kernel_path, bias_path, layout):
  if bias_path is None:
    return _set(tree, kernel_path, _heads_kernel(x, layout))
  tree = _set(tree, kernel_path, _heads_kernel(x[..., :-1, :], layout))
  return _set(tree, bias_path, _heads_bias(x[..., -1:, :], layout))


def _read(tree, block):
  return (_read_side(tree, block.g, block.g_bias, block.g_layout),
          _read_side(tree, block.h, block.h_bias, block.h_layout))


def _write(tree, block, pair):
  tree = _write_side(tree, pair[0], block.g, block.g_bias, block.g_layout)
  return _write_side(tree, pair[1], block.h, block.h_bias, block.h_layout)


def _block_paths(blocks):
  paths = set()
  for b in blocks:
    for p in (b.g, b.h, b.g_bias, b.h_bias):
      if p is not None:
        if p in paths:
          raise ValueError(f"parameter {p} belongs to two symmetric blocks.")
        paths.add(p)
  return paths


def _check_blocks(params, blocks):
  """Validates the blocks against the parameters (trace time, clear errors)."""
  for b in blocks:
    if b.g_layout not in _LAYOUTS or b.h_layout not in _LAYOUTS:
      raise ValueError(f"layouts must be in {_LAYOUTS}, got {b}.")
    for side, bias, layout in ((b.g, b.g_bias, b.g_layout),
                               (b.h, b.h_bias, b.h_layout)):
      try:
        k = _get(params, side)
      except (KeyError, TypeError):
        raise ValueError(f"no parameter at path {side}.") from None
      want = {"rh": 2, "rHh": 3, "Hhr": 3}[layout]
      if jnp.ndim(k) != want:
        raise ValueError(
            f"the kernel at {side} has shape {jnp.shape(k)}; layout "
            f"{layout!r} needs rank {want}.")
      if bias is not None and layout == "Hhr":
        raise ValueError("a bias cannot be attached to an 'Hhr' kernel.")
    g, h = _read(params, b)
    if g.shape[0] != h.shape[0] or g.shape[-1] != h.shape[-1]:
      raise ValueError(
          f"block {b}: G has [heads, rows, h] = {g.shape} and H {h.shape}; "
          "the heads and h must match.")
  _block_paths(blocks)


def _leaf_paths(tree):
  return [tuple(k.key for k in p)
          for p, _ in jax.tree_util.tree_leaves_with_path(tree)]


# ---------------------------------------------------------------------------
# The measure.
# ---------------------------------------------------------------------------


class _Geometry:
  """The metric, projections and geodesic at the base point ``params``."""

  def __init__(self, params, blocks, metric, eps, geodesic, ode_steps):
    self.params = params
    self.blocks = blocks
    self.metric, self.eps = metric, eps
    self.geodesic, self.ode_steps = geodesic, ode_steps
    in_block = _block_paths(blocks)
    paths = _leaf_paths(params)
    treedef = jax.tree.structure(params)
    self.rest = jax.tree.unflatten(treedef, [p not in in_block for p in paths])
    self.c = jax.tree.map(
        lambda w, r: jnp.abs(w.astype(_work_dtype(w))) if r else
        jnp.zeros(jnp.shape(w), _work_dtype(w)), params, self.rest)
    self.base = [_read(params, b) for b in blocks]

  def _split(self, tree):
    return [_read(tree, b) for b in self.blocks]

  def _merge(self, tree, pairs):
    for b, pair in zip(self.blocks, pairs):
      tree = _write(tree, b, pair)
    return tree

  def norm(self, xi):
    rest = jax.tree.map(
        lambda d, s: jnp.where(s > 0, d / jnp.where(s > 0, s, 1.0), 0.0),
        xi, self.c)
    total = base.tree_vdot_f32(rest, rest)
    for (g, h), pair in zip(self.base, self._split(xi)):
      total = total + block_inner(g, h, pair, pair, self.metric, self.eps)
    return jnp.sqrt(jnp.maximum(total, 0.0))

  def riemannian(self, grad):
    grad = jax.tree.map(lambda x, s: x.astype(s.dtype), grad, self.c)
    out = jax.tree.map(lambda x, s: s * s * x, grad, self.c)
    pairs = [riemannian_gradient(g, h, p[0], p[1], self.metric, self.eps)
             for (g, h), p in zip(self.base, self._split(grad))]
    return self._merge(out, pairs)

  def horizontal(self, xi):
    pairs = [horizontal_projection(g, h, p[0], p[1], self.metric, self.eps)
             for (g, h), p in zip(self.base, self._split(xi))]
    return self._merge(xi, pairs)

  def project(self, xi, rho):
    xi = self.horizontal(xi)
    n = self.norm(xi)
    factor = jnp.where(n > rho, rho * base.safe_inverse(n), 1.0)
    return jax.tree.map(lambda d: d * factor, xi)

  def point(self, xi):
    """The (approximate) geodesic's end point, in the parameters' dtypes."""
    moved = _data.tree_add_scaled(self.params, xi, 1.0)
    if self.geodesic == "first_order" or not self.blocks:
      return moved
    pairs = []
    for (g, h), (xg, xh) in zip(self.base, self._split(xi)):
      if self.geodesic == "second_order":
        cg, ch = christoffel(g, h, xg, xh, self.metric, self.eps)
        pairs.append((g + xg - 0.5 * cg, h + xh - 0.5 * ch))
      else:
        pairs.append(geodesic_block(g, h, xg, xh, self.metric,
                                    self.ode_steps, self.eps))
    dtypes = jax.tree.map(lambda w: jnp.asarray(w).dtype, self.params)
    out = self._merge(moved, pairs)
    return jax.tree.map(lambda x, d: x.astype(d), out, dtypes)


def geodesic_sharpness(
    loss_fn: LossFn,
    params: Any,
    data: Any,
    *,
    rho: float,
    metric: str = "inv",
    blocks: Any = "attention",
    geodesic: str = "second_order",
    eps: float = 0.0,
    m: int | None = None,
    n_iters: int = 20,
    step_size: float | None = None,
    momentum: float = 0.75,
    min_update_ratio: float = 0.75,
    ode_steps: int = 20,
    error_fn: LossFn | None = None,
    return_perturbation: bool = False,
    subsets_per_step: int | None = None,
) -> _sharpness.SharpnessResult:
  r"""Worst-case geodesic sharpness by Riemannian Auto-PGD (Algorithm 1).

  For each subset :math:`S` (``m`` examples), from :math:`\xi = 0`, ``n_iters``
  steps of

  .. math::
    v = w + \xi - \tfrac12\Gamma_w(\xi,\xi), \quad
    g = \nabla_\xi L_S(v), \quad
    d = P_h(\mathrm{grad}_R\, g), \quad
    z = P_\rho\big(\xi + \eta\, d/\|d\|_{g,w}\big), \quad
    \xi \leftarrow \mu z + (1-\mu)\,\xi_{prev},

  where :math:`\mathrm{grad}_R` is the metric's gradient, :math:`P_h` the
  horizontal projection and :math:`P_\rho` the horizontal projection followed
  by rescaling to the metric ball of radius :math:`\rho`; the best loss is
  kept, and at APGD checkpoints the step is halved and the iterate restarted
  from the best :math:`\xi` (as in :func:`worst_case_sharpness`). The result
  is the mean over subsets of the best loss minus the clean loss. See the
  module docstring for the metrics, :math:`\Gamma` and which parts are this
  library's construction. With ``blocks=[]`` (or a model without attention)
  and ``geodesic="first_order"`` it equals
  ``worst_case_sharpness(norm="l2", adaptive=True, ascent="scaled")``.

  Cost per subset: ``n_iters + 1`` gradients through the geodesic, plus per
  head a few :math:`h\times h` inverses/eigendecompositions per iteration.

  Args:
    loss_fn: ``loss_fn(params, batch)`` returning per-example losses ``[B]``
      (eval mode).
    params: the parameters, a pytree of nested dicts (Flax ``params``).
    data: one batch or an iterable of batches.
    rho: the radius :math:`\rho \ge 0` in the metric norm.
    metric: ``"inv"`` (Eq. 9) or ``"mix"`` (Eq. 10) on the blocks.
    blocks: the GL(h) symmetric blocks: ``"attention"`` (default: every
      Flax multi-head attention found by :func:`attention_blocks`, none for
      other models) or a sequence of :class:`SymmetricBlock`.
    geodesic: ``"second_order"`` (the paper's
      :math:`w + \xi - \frac12\Gamma(\xi,\xi)`), ``"exact"`` (RK4 on the
      geodesic equation with ``ode_steps`` steps) or ``"first_order"``
      (:math:`w + \xi`, no Christoffel term).
    eps: :math:`\epsilon` added to :math:`G^\top G` and :math:`H^\top H`
      (rank-deficient heads); any :math:`\epsilon > 0` breaks the exact
      invariance. Default 0. The block geometry runs in the parameters'
      precision (float32, or float64 for float64 parameters): in float32 the
      invariance holds to about 1e-5 for well-conditioned heads, but a head
      moved by an :math:`A` with condition number around 1e3 loses it (the
      Gram matrices' condition numbers square); measure such models with
      float64 parameters (``jax_enable_x64``).
    m: subset size (``None``: the batches as given).
    n_iters: APGD iterations (default 20).
    step_size: initial step :math:`\eta`; default :math:`2\rho`.
    momentum: :math:`\mu` in (0, 1].
    min_update_ratio: APGD's step-halving condition.
    ode_steps: RK4 steps for ``geodesic="exact"``.
    error_fn: optional per-example 0/1 errors, for the error increase.
    return_perturbation: also return the best :math:`\xi` of every subset.
    subsets_per_step: subsets processed together with ``vmap``.

  Returns:
    A :class:`~sharpjax.measures.SharpnessResult`; ``perturbation_norm`` is
    the largest metric norm of a best :math:`\xi` over the subsets.

  Example:
    >>> import jax.numpy as jnp, sharpjax.measures as sm
    >>> params = {"G": jnp.array([[0.8]]), "H": jnp.array([[1.5]])}
    >>> batch = {"x": jnp.array([1.1]), "y": jnp.array([0.4])}
    >>> loss = lambda p, b: (p["G"][0, 0] * p["H"][0, 0] * b["x"] - b["y"]) ** 2
    >>> block = sm.SymmetricBlock(g=("G",), h=("H",))
    >>> r = sm.geodesic_sharpness(loss, params, batch, rho=0.1,
    ...                           blocks=[block], geodesic="exact")
    >>> round(float(r.sharpness), 4)
    0.4092

  References:
    da Silva, Dangel and Oore, Hide & Seek: Transformer Symmetries Obscure
    Sharpness & Riemannian Geometry Finds It, ICML 2025.
    https://arxiv.org/abs/2505.05409
  """
  base.check_range("rho", rho, low=0.0)
  if metric not in _METRICS:
    raise ValueError(f"metric must be one of {_METRICS}, got {metric!r}.")
  if geodesic not in _GEODESICS:
    raise ValueError(
        f"geodesic must be one of {_GEODESICS}, got {geodesic!r}.")
  base.check_range("eps", eps, low=0.0)
  n_iters = base.check_int("n_iters", n_iters, low=1)
  ode_steps = base.check_int("ode_steps", ode_steps, low=1)
  if m is not None:
    m = base.check_int("m", m, low=1)
  if step_size is not None:
    base.check_range("step_size", step_size, low=0.0, low_inclusive=False)
  base.check_range("momentum", momentum, low=0.0, high=1.0,
                   low_inclusive=False)
  base.check_range("min_update_ratio", min_update_ratio, low=0.0, high=1.0)
  if isinstance(blocks, str):
    if blocks != "attention":
      raise ValueError(
          f"blocks must be 'attention' or a sequence of SymmetricBlock, got "
          f"{blocks!r}.")
    blocks = attention_blocks(params)
  as_path = lambda p: None if p is None else tuple(p)
  blocks = tuple(
      SymmetricBlock(*b)._replace(
          g=as_path(b[0]), h=as_path(b[1]), g_bias=as_path(SymmetricBlock(*b).g_bias),
          h_bias=as_path(SymmetricBlock(*b).h_bias))
      for b in blocks)
  _check_blocks(params, blocks)
  batches = _data.subsets(
      _data.as_batches(data, "geodesic_sharpness"), m, "geodesic_sharpness")
  step = 2.0 * rho if step_size is None else step_size
  cfg = (blocks, metric, float(eps), geodesic, ode_steps, n_iters,
         float(momentum), float(min_update_ratio), bool(return_perturbation),
         subsets_per_step)
  return _geodesic_jit(loss_fn, error_fn, params, batches, jnp.float32(rho),
                       jnp.float32(step), cfg)


@functools.partial(jax.jit, static_argnums=(0, 1, 6))
def _geodesic_jit(loss_fn, error_fn, params, batches, rho, step0, cfg):
  (blocks, metric, eps, geodesic, ode_steps, n_iters, mu, min_ratio,
   keep_xi, chunk) = cfg
  geo = _Geometry(params, blocks, metric, eps, geodesic, ode_steps)
  # The tangent vectors live in float32 (float64 for float64 parameters).
  zeros = jax.tree.map(lambda w: jnp.zeros(jnp.shape(w), _work_dtype(w)),
                       params)
  name = "geodesic_sharpness"

  def ascent(xi, grad, step):
    d = geo.horizontal(geo.riemannian(grad))
    factor = step / (geo.norm(d) + 1e-12)
    return jax.tree.map(lambda x, y: x + factor * y, xi, d)

  def one_subset(batch):
    value_and_grad = jax.value_and_grad(
        lambda xi: _data.mean_loss(loss_fn, geo.point(xi), batch, name))

    def body(k, state):
      loss, grad = value_and_grad(state.x)
      grad = jax.tree.map(lambda g, z: g.astype(z.dtype), grad, zeros)
      return _sharpness.apgd_iteration(
          state, k, loss, grad, n_iters=n_iters, momentum=mu,
          min_update_ratio=min_ratio,
          propose=lambda xi, g, step: geo.project(ascent(xi, g, step), rho))

    out = jax.lax.fori_loop(0, n_iters + 1, body,
                            _sharpness.apgd_init(zeros, step0))
    best_xi, best_loss, clean_loss = out.best_x, out.best_loss, out.clean_loss
    if error_fn is None:
      clean_err = perturbed_err = jnp.float32(jnp.nan)
    else:
      clean_err = _data.mean_error(error_fn, params, batch, name)
      perturbed_err = _data.mean_error(error_fn, geo.point(best_xi), batch,
                                       name)
    result = dict(clean_loss=clean_loss, perturbed_loss=best_loss,
                  clean_error=clean_err, perturbed_error=perturbed_err,
                  norm=geo.norm(best_xi))
    return result, (best_xi if keep_xi else None)

  means, per_group = _sharpness._map_with_delta(one_subset, batches, chunk)
  return _sharpness._worst_result(means, per_group, keep_xi, batches)
