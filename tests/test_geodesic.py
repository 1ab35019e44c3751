"""Geodesic sharpness: the spec's geometry oracles and the ViT invariance."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import sharpjax.measures as sm
from sharpjax.measures import _geodesic as geo
from sharpjax.models import ViT

RNG = np.random.default_rng(0)


def rand(*shape):
  return jnp.asarray(RNG.normal(size=shape), jnp.float32)


def small_block(n=5, m=4, h=2, heads=()):
  return rand(*heads, n, h), rand(*heads, m, h)


@pytest.mark.parametrize("metric", ["inv", "mix"])
def test_metric_invariance(metric):
  g, h = small_block()
  eta = (rand(5, 2), rand(4, 2))
  zeta = (rand(5, 2), rand(4, 2))
  a = rand(2, 2) + 2 * jnp.eye(2)
  ai = jnp.linalg.inv(a)
  act = lambda p: (p[0] @ ai, p[1] @ a.T)
  before = geo.block_inner(g, h, eta, zeta, metric)
  after = geo.block_inner(g @ ai, h @ a.T, act(eta), act(zeta), metric)
  np.testing.assert_allclose(after, before, rtol=1e-4)
  euclid = lambda e, z: jnp.vdot(e[0], z[0]) + jnp.vdot(e[1], z[1])
  assert abs(float(euclid(act(eta), act(zeta)) - euclid(eta, zeta))) > 1e-2


@pytest.mark.parametrize("metric", ["inv", "mix"])
def test_horizontal_projection(metric):
  g, h = small_block(heads=(3,))
  xi = (rand(3, 5, 2), rand(3, 4, 2))
  p = geo.horizontal_projection(g, h, *xi, metric)
  for i in range(2):
    for j in range(2):
      x = jnp.zeros((2, 2)).at[i, j].set(1.0)
      vert = (-g @ x, h @ x.T)
      for head in range(3):
        inner = geo.block_inner(g[head], h[head], (p[0][head], p[1][head]),
                                (vert[0][head], vert[1][head]), metric)
        assert abs(float(inner)) < 1e-4
  p2 = geo.horizontal_projection(g, h, *p, metric)
  np.testing.assert_allclose(p2[0], p[0], atol=1e-5)
  np.testing.assert_allclose(p2[1], p[1], atol=1e-5)
  x = rand(2, 2)
  zero = geo.horizontal_projection(g, h, -g @ x, h @ x.T, metric)
  np.testing.assert_allclose(zero[0], 0.0, atol=1e-4)
  np.testing.assert_allclose(zero[1], 0.0, atol=1e-4)


def test_loss_invariance_along_orbit():
  g, h = small_block()
  x, y = rand(7, 5), rand(4, 3)
  t = rand(7, 3)
  loss = lambda g, h: jnp.sum((x @ g @ h.T @ y - t) ** 2)
  a = rand(2, 2) + 2 * jnp.eye(2)
  np.testing.assert_allclose(
      loss(g @ jnp.linalg.inv(a), h @ a.T), loss(g, h), rtol=1e-4)
  gg, gh = jax.grad(loss, argnums=(0, 1))(g, h)
  xv = rand(2, 2)
  vertical = jnp.vdot(gg, -g @ xv) + jnp.vdot(gh, h @ xv.T)
  assert abs(float(vertical)) < 1e-3 * float(jnp.linalg.norm(gg))


@pytest.mark.parametrize("metric", ["inv", "mix"])
def test_christoffel_against_geodesic_equation(metric):
  """Gamma(v, v) = g^-1 (Dg[v] v - 1/2 grad_x (v^T g v)), from the metric alone."""
  with jax.enable_x64(True):
    r = np.random.default_rng(1)
    g = jnp.asarray(r.normal(size=(5, 2)))
    h = jnp.asarray(r.normal(size=(4, 2)))
    vg, vh = jnp.asarray(r.normal(size=(5, 2))), jnp.asarray(r.normal(size=(4, 2)))
    split = lambda z: (z[:10].reshape(5, 2), z[10:].reshape(4, 2))
    q = lambda x, v: geo.block_inner(*split(x), split(v), split(v), metric)
    x0 = jnp.concatenate([g.ravel(), h.ravel()])
    v0 = jnp.concatenate([vg.ravel(), vh.ravel()])

    @jax.jit
    def reference(x0, v0):
      metric_mat = lambda x: 0.5 * jax.hessian(lambda v: q(x, v))(v0)
      gv = lambda x: metric_mat(x) @ v0
      dg_v_v = jax.jvp(gv, (x0,), (v0,))[1]
      grad_x = jax.grad(lambda x: q(x, v0))(x0)
      return jnp.linalg.solve(metric_mat(x0), dg_v_v - 0.5 * grad_x)

    gamma = reference(x0, v0)
    cg, ch = geo.christoffel(g, h, vg, vh, metric)
    np.testing.assert_allclose(
        jnp.concatenate([cg.ravel(), ch.ravel()]), gamma, rtol=1e-8,
        atol=1e-9)


def test_scalar_christoffel():
  g, h = jnp.array([[1.7]]), jnp.array([[0.6]])
  xi = jnp.array([[0.3]])
  cg, _ = geo.christoffel(g, h, xi, xi, "inv")
  np.testing.assert_allclose(cg, -(0.3**2) / 1.7, rtol=1e-6)


@pytest.mark.parametrize(
    "metric,expected",
    [("inv", (1.603781, -0.863575)), ("mix", (1.549129, -0.834146))])
def test_exact_diagonal_geodesics(metric, expected):
  u0, v0, b = 1.3, -0.7, 0.21
  u, v = geo.geodesic_block(jnp.array([[u0]]), jnp.array([[v0]]),
                            jnp.array([[b * u0]]), jnp.array([[b * v0]]),
                            metric, num_steps=40)
  np.testing.assert_allclose([float(u[0, 0]), float(v[0, 0])], expected,
                             atol=2e-6)


# The scalar toy of App. D: loss (G H x - y)^2 with G0=0.8, H0=1.5, x=1.1, y=0.4.
TOY_BATCH = {"x": jnp.array([1.1]), "y": jnp.array([0.4])}
TOY_BLOCK = sm.SymmetricBlock(g=("G",), h=("H",))


def toy_loss(p, b):
  return (p["G"][0, 0] * p["H"][0, 0] * b["x"] - b["y"]) ** 2


def toy_closed_form(rho, g0=0.8, h0=1.5, x=1.1, y=0.4):
  y0 = g0 * h0 * x
  b = np.linspace(-rho / np.sqrt(2), rho / np.sqrt(2), 20001)
  return np.max(y0**2 * (np.exp(4 * b) - 1) - 2 * y * y0 * (np.exp(2 * b) - 1))


def test_scalar_toy_value_and_invariance():
  assert abs(toy_closed_form(0.1) - 0.409167) < 1e-6
  values = []
  for a in (1.0, 3.0, -0.25):
    params = {"G": jnp.array([[0.8 * a]]), "H": jnp.array([[1.5 / a]])}
    r = sm.geodesic_sharpness(toy_loss, params, TOY_BATCH, rho=0.1,
                              blocks=[TOY_BLOCK], geodesic="exact")
    values.append(float(r.sharpness))
    np.testing.assert_allclose(float(r.perturbation_norm), 0.1, rtol=1e-5)
  np.testing.assert_allclose(values, 0.409167, atol=5e-6)
  # Second order: gamma(1) = G (1 + b + b^2/2), H likewise, b = rho/sqrt(2).
  b = 0.1 / np.sqrt(2)
  f = (1 + b + b * b / 2) ** 2
  expected = (1.32 * f - 0.4) ** 2 - 0.92**2
  params = {"G": jnp.array([[0.8]]), "H": jnp.array([[1.5]])}
  r = sm.geodesic_sharpness(toy_loss, params, TOY_BATCH, rho=0.1,
                            blocks=[TOY_BLOCK])
  np.testing.assert_allclose(float(r.sharpness), expected, rtol=1e-5)
  # Adaptive sharpness is not invariant on the same orbit.
  adaptive = [
      float(sm.worst_case_sharpness(
          toy_loss, {"G": jnp.array([[0.8 * a]]), "H": jnp.array([[1.5 / a]])},
          TOY_BATCH, rho=0.1, norm="l2", adaptive=True, m=None).sharpness)
      for a in (1.0, 3.0)
  ]
  # GL(1) is a rescaling, which adaptive sharpness already accounts for: on
  # this scalar orbit it is invariant too (but differs from the geodesic
  # value, being first order). The GL(h > 1) case is the ViT test below.
  np.testing.assert_allclose(adaptive[0], adaptive[1], rtol=1e-3)
  assert abs(adaptive[0] - 0.409167) > 5e-3


def test_small_rho_limit():
  rho = 1e-3
  params = {"G": jnp.array([[0.8]]), "H": jnp.array([[1.5]])}
  r = sm.geodesic_sharpness(toy_loss, params, TOY_BATCH, rho=rho,
                            blocks=[TOY_BLOCK], geodesic="exact")
  y0 = 1.32
  np.testing.assert_allclose(float(r.sharpness),
                             4 * rho / np.sqrt(2) * y0 * (y0 - 0.4), rtol=5e-3)


def test_bilinear_one_step_invariance():
  """One projected step on ||X G H^T Y^T - T||^2 is the same on the orbit."""
  g, h = small_block(n=5, m=4, h=2)
  r = np.random.default_rng(3)
  batch = {"x": jnp.asarray(r.normal(size=(6, 5)), jnp.float32),
           "t": jnp.asarray(r.normal(size=(6, 4)), jnp.float32)}
  loss = lambda p, b: jnp.sum((b["x"] @ p["G"] @ p["H"].T - b["t"]) ** 2, -1)
  block = sm.SymmetricBlock(g=("G",), h=("H",))
  for metric in ("inv", "mix"):
    vals = []
    for scale in (None, 0.1, 10.0):
      a = jnp.eye(2) if scale is None else scale * (rand(2, 2) + 2 * jnp.eye(2))
      p = {"G": g @ jnp.linalg.inv(a), "H": h @ a.T}
      vals.append(float(sm.geodesic_sharpness(
          loss, p, batch, rho=0.05, blocks=[block], metric=metric,
          n_iters=1).sharpness))
    np.testing.assert_allclose(vals, vals[0], rtol=2e-3)
    assert vals[0] > 0


def test_ill_conditioned_orbit_in_float64():
  """float64 parameters give float64 geometry: invariant even at cond(A) = 1e5."""
  with jax.enable_x64(True):
    r = np.random.default_rng(3)
    g = jnp.asarray(r.normal(size=(5, 2)))
    h = jnp.asarray(r.normal(size=(4, 2)))
    batch = {"x": jnp.asarray(r.normal(size=(6, 5))),
             "t": jnp.asarray(r.normal(size=(6, 4)))}
    loss = lambda p, b: jnp.sum((b["x"] @ p["G"] @ p["H"].T - b["t"]) ** 2, -1)
    block = sm.SymmetricBlock(g=("G",), h=("H",))
    u, _ = np.linalg.qr(r.normal(size=(2, 2)))
    for metric in ("inv", "mix"):
      vals = []
      for c in (1.0, 1e5):
        a = jnp.asarray(u @ np.diag([c, 1.0]))
        p = {"G": g @ jnp.linalg.inv(a), "H": h @ a.T}
        vals.append(float(sm.geodesic_sharpness(
            loss, p, batch, rho=0.3, blocks=[block], metric=metric).sharpness))
      np.testing.assert_allclose(vals[1], vals[0], rtol=1e-5)


def test_reduction_to_adaptive_worst_case():
  r = np.random.default_rng(4)
  params = {"dense": {"kernel": jnp.asarray(r.normal(size=(5, 3)), jnp.float32),
                      "bias": jnp.asarray(r.normal(size=(3,)), jnp.float32)}}
  batch = {"x": jnp.asarray(r.normal(size=(8, 5)), jnp.float32),
           "y": jnp.asarray(r.integers(0, 3, 8), jnp.int32)}

  def loss(p, b):
    logits = b["x"] @ p["dense"]["kernel"] + p["dense"]["bias"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, b["y"])

  got = sm.geodesic_sharpness(loss, params, batch, rho=0.05, blocks=[],
                              geodesic="first_order", n_iters=8)
  want = sm.worst_case_sharpness(loss, params, batch, rho=0.05, norm="l2",
                                 adaptive=True, m=None, n_iters=8,
                                 ascent="scaled")
  np.testing.assert_allclose(float(got.sharpness), float(want.sharpness),
                             rtol=1e-5)
  assert float(got.sharpness) > 0


def _vit_setup():
  model = ViT(num_classes=3, patch_size=4, hidden_size=8, depth=1,
              num_heads=2, mlp_dim=8)
  r = np.random.default_rng(5)
  x = jnp.asarray(r.normal(size=(8, 8, 8, 1)), jnp.float32)
  y = jnp.asarray(r.integers(0, 3, 8), jnp.int32)
  params = jax.jit(model.init)(jax.random.key(0), x)["params"]
  # Non-zero attention biases, so that the appended bias rows matter.
  params = jax.tree_util.tree_map_with_path(
      lambda p, w: w + 0.1 * jax.random.normal(jax.random.key(len(str(p))),
                                               w.shape)
      if "bias" in str(p[-1]) else w, params)

  def loss(p, b):
    logits = model.apply({"params": p}, b["x"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, b["y"])

  return params, {"x": x, "y": y}, loss


def _transform_head(params, head, a):
  """W_Q A, b_Q A; W_K A^-T, b_K A^-T on one head; and V/O likewise."""
  attn = params["EncoderBlock_0"]["MultiHeadDotProductAttention_0"]
  ait = jnp.linalg.inv(a).T
  new = jax.tree.map(lambda w: w, attn)
  for name, mat in (("query", a), ("key", ait), ("value", a)):
    new[name] = dict(new[name])
    new[name]["kernel"] = new[name]["kernel"].at[:, head].set(
        new[name]["kernel"][:, head] @ mat)
    new[name]["bias"] = new[name]["bias"].at[head].set(
        new[name]["bias"][head] @ mat)
  new["out"] = dict(new["out"])
  new["out"]["kernel"] = new["out"]["kernel"].at[head].set(
      jnp.linalg.inv(a) @ new["out"]["kernel"][head])
  out = dict(params)
  out["EncoderBlock_0"] = dict(params["EncoderBlock_0"])
  out["EncoderBlock_0"]["MultiHeadDotProductAttention_0"] = new
  return out


def test_vit_blocks_detected():
  model = ViT(num_classes=3, patch_size=4, hidden_size=8, depth=2,
              num_heads=2, mlp_dim=8)
  params = jax.eval_shape(model.init, jax.random.key(0),
                          jnp.zeros((1, 8, 8, 1)))["params"]
  blocks = sm.attention_blocks(params)
  assert len(blocks) == 4
  assert blocks[0].g[-2:] == ("query", "kernel")
  assert blocks[1].h[-2:] == ("out", "kernel") and blocks[1].h_layout == "Hhr"


def test_vit_geodesic_sharpness_invariant_adaptive_not():
  params, batch, loss = _vit_setup()
  r = np.random.default_rng(6)
  q, _ = np.linalg.qr(r.normal(size=(4, 4)))
  a = jnp.asarray(q @ np.diag([8.0, 2.0, 0.5, 0.1]), jnp.float32)
  moved = _transform_head(_transform_head(params, 0, a), 1, a.T)
  np.testing.assert_allclose(loss(moved, batch), loss(params, batch),
                             rtol=1e-4, atol=1e-5)
  kw = dict(rho=0.02, m=None, n_iters=6)
  # The inv metric here; the mix metric's invariance is checked on the
  # bilinear model above (one compilation each is what this test costs).
  s0 = float(sm.geodesic_sharpness(loss, params, batch, **kw).sharpness)
  s1 = float(sm.geodesic_sharpness(loss, moved, batch, **kw).sharpness)
  assert s0 > 0
  np.testing.assert_allclose(s1, s0, rtol=2e-3)
  ad0 = float(sm.worst_case_sharpness(loss, params, batch, norm="l2",
                                      adaptive=True, **kw).sharpness)
  ad1 = float(sm.worst_case_sharpness(loss, moved, batch, norm="l2",
                                      adaptive=True, **kw).sharpness)
  figures = dict(geodesic=s1 / s0, adaptive=ad1 / ad0)
  assert abs(ad1 / ad0 - 1) > 0.03, figures
  assert abs(ad1 / ad0 - 1) > 20 * abs(s1 / s0 - 1), figures


def test_bad_arguments():
  params = {"G": jnp.ones((3, 2)), "H": jnp.ones((4, 2))}
  with pytest.raises(ValueError, match="metric"):
    sm.geodesic_sharpness(toy_loss, params, TOY_BATCH, rho=0.1, metric="x")
  with pytest.raises(ValueError, match="rho"):
    sm.geodesic_sharpness(toy_loss, params, TOY_BATCH, rho=-1.0)
  with pytest.raises(ValueError, match="no parameter"):
    sm.geodesic_sharpness(toy_loss, params, TOY_BATCH, rho=0.1,
                          blocks=[sm.SymmetricBlock(g=("Q",), h=("H",))])
  with pytest.raises(ValueError, match="heads and h"):
    sm.geodesic_sharpness(
        toy_loss, {"G": jnp.ones((3, 2)), "H": jnp.ones((4, 3))}, TOY_BATCH,
        rho=0.1, blocks=[sm.SymmetricBlock(g=("G",), h=("H",))])
