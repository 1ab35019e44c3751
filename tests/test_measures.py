"""Tests of sharpjax.measures against references derived by hand.

Quadratics 0.5 s w^T A w with a known spectrum (eigh of A), a small MLP against
its dense jax.hessian, and the geometry of the sharpness measures.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sharpjax.measures as sm

# ---------------------------------------------------------------------------
# Fixtures.
# ---------------------------------------------------------------------------

SPECTRUM = np.array([10.0, 6.0, 4.0, 3.0, 2.5, 2.0, 1.5, 1.0, 0.5, 0.25,
                     0.1, 0.0, -0.2, -0.5, 0.05, 0.3, 0.7, 1.2])  # d = 18


def _params_like(dim):
  """A dict pytree with ``dim`` entries (matrix + vector leaves)."""
  return {"w": jnp.zeros((3, 4), jnp.float32), "b": jnp.zeros((dim - 12,))}


def _flat(tree):
  return jnp.concatenate([tree["b"].ravel(), tree["w"].ravel()])  # leaf order


def _quadratic(a):
  """Per-example loss 0.5 * s_i * w^T A w over the flattened dict params."""
  a = jnp.asarray(a, jnp.float32)

  def loss_fn(params, batch):
    w = _flat(params)
    return 0.5 * batch["s"] * (w @ a @ w)

  return loss_fn


def _rotated(spectrum, seed=0):
  q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(len(spectrum),) * 2))
  return (q * spectrum) @ q.T


def _ones_batch(n=4):
  return {"s": jnp.ones((n,), jnp.float32)}


def _mlp():
  rng = np.random.default_rng(1)
  params = {
      "dense1": {"kernel": jnp.asarray(rng.normal(size=(4, 6)) * 0.8, jnp.float32),
                 "bias": jnp.asarray(rng.normal(size=(6,)) * 0.1, jnp.float32)},
      "dense2": {"kernel": jnp.asarray(rng.normal(size=(6, 3)) * 0.8, jnp.float32),
                 "bias": jnp.zeros((3,), jnp.float32)},
  }

  def apply_fn(p, x):
    h = jnp.tanh(x @ p["dense1"]["kernel"] + p["dense1"]["bias"])
    return h @ p["dense2"]["kernel"] + p["dense2"]["bias"]

  batch = {"x": jnp.asarray(rng.normal(size=(16, 4)), jnp.float32),
           "y": jnp.asarray(rng.integers(0, 3, size=(16,)), jnp.int32)}
  return params, apply_fn, batch


def _dense_hessian(loss_fn, params, batch):
  flat, unravel = jax.flatten_util.ravel_pytree(params)
  mean_loss = lambda f: jnp.mean(loss_fn(unravel(f), batch))
  return np.asarray(jax.jit(jax.hessian(mean_loss))(flat), np.float64), flat, unravel


KEY = jax.random.PRNGKey(0)

# ---------------------------------------------------------------------------
# Hessian-vector products.
# ---------------------------------------------------------------------------


def test_hvp_quadratic_and_batch_weighting():
  a = _rotated(SPECTRUM)
  loss_fn = _quadratic(a)
  params = _params_like(18)
  params = jax.tree.map(lambda x: x + 0.3, params)
  v = jax.tree.map(lambda x: jnp.arange(x.size, dtype=jnp.float32).reshape(x.shape), params)
  # Two batches of sizes 3 and 5: the Hessian is mean(s) * A over all 8 examples.
  s = np.array([1.0, 2.0, 3.0, 0.5, 0.5, 4.0, 1.0, 2.0], np.float32)
  batches = [{"s": jnp.asarray(s[:3])}, {"s": jnp.asarray(s[3:])}]
  hv = sm.hvp(loss_fn, params, batches, v)
  expected = s.mean() * (a @ np.asarray(_flat(v)))
  np.testing.assert_allclose(_flat(hv), expected, rtol=1e-5, atol=1e-4)
  # One concatenated batch gives the same product.
  hv1 = sm.hvp(loss_fn, params, {"s": jnp.asarray(s)}, v)
  np.testing.assert_allclose(_flat(hv1), _flat(hv), rtol=1e-5, atol=1e-5)


def test_hvp_mlp_matches_dense_hessian():
  params, apply_fn, batch = _mlp()
  loss_fn = sm.classification_loss(apply_fn)
  hess, flat, unravel = _dense_hessian(loss_fn, params, batch)
  rng = np.random.default_rng(2)
  for _ in range(2):
    v = rng.normal(size=flat.shape).astype(np.float32)
    hv = sm.hvp(loss_fn, params, batch, unravel(jnp.asarray(v)))
    got = jax.flatten_util.ravel_pytree(hv)[0]
    np.testing.assert_allclose(got, hess @ v, rtol=1e-4, atol=1e-5)


def test_loss_fn_must_return_per_example_losses():
  loss_fn = lambda p, b: jnp.mean(b["s"]) * jnp.sum(p["b"] ** 2)  # a scalar
  with pytest.raises(ValueError, match=r"per-example losses of shape \[B\]"):
    sm.hvp(loss_fn, _params_like(14), _ones_batch(), _params_like(14))
  with pytest.raises(ValueError, match="leading batch axis"):
    sm.as_batches({"x": jnp.ones((3, 2)), "y": jnp.ones((4,))})


# ---------------------------------------------------------------------------
# Eigenpairs, trace, SLQ on quadratics with a known spectrum.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["power", "lanczos"])
def test_top_k_eigenpairs_quadratic(method):
  a = _rotated(SPECTRUM)
  evals, evecs = np.linalg.eigh(a)
  order = np.argsort(-np.abs(evals)) if method == "power" else np.argsort(-evals)
  k = 3
  res = sm.hessian_eigenpairs(
      _quadratic(a), _params_like(18), _ones_batch(), KEY, k=k, method=method,
      max_iters=500, tol=1e-7, num_lanczos_steps=18,
  )
  np.testing.assert_allclose(res.eigenvalues, evals[order[:k]], rtol=1e-4)
  vecs = jax.vmap(_flat)(res.eigenvectors)
  cos = np.abs(np.sum(np.asarray(vecs) * evecs[:, order[:k]].T, axis=1))
  np.testing.assert_allclose(cos, 1.0, atol=2e-3)


def test_power_iteration_keeps_sign_of_dominant_negative_eigenvalue():
  spectrum = np.array([-5.0, 2.0, 1.0, 0.5])
  a = _rotated(spectrum, seed=3)
  vals, _, _ = sm.power_iteration(
      lambda x: jnp.asarray(a, jnp.float32) @ x, 4, KEY, k=2, max_iters=500, tol=1e-7
  )
  np.testing.assert_allclose(vals, [-5.0, 2.0], rtol=1e-4)


def test_trace_exact_for_diagonal_quadratic():
  # Rademacher probes are exact for a diagonal A: z^T A z = tr A, ||Az||^2 = tr A^2.
  a = np.diag(SPECTRUM)
  s = jnp.array([1.0, 2.0, 3.0])  # mean 2: H = 2 A
  res = sm.hessian_trace(_quadratic(a), _params_like(18), {"s": s}, KEY, num_probes=4)
  np.testing.assert_allclose(res.trace, 2 * SPECTRUM.sum(), rtol=1e-5)
  np.testing.assert_allclose(res.trace_sq, 4 * (SPECTRUM**2).sum(), rtol=1e-5)
  np.testing.assert_allclose(res.trace_stderr, 0.0, atol=1e-4)
  np.testing.assert_allclose(_flat(res.diagonal), 2 * SPECTRUM, rtol=1e-5, atol=1e-6)


def test_trace_rotated_quadratic_within_standard_error():
  a = _rotated(SPECTRUM)
  res = sm.hessian_trace(
      _quadratic(a), _params_like(18), _ones_batch(), KEY, num_probes=400,
      probes_per_step=50,
  )
  # Hutchinson variance for Rademacher probes: 2 * sum_{i != j} A_ij^2.
  off = a - np.diag(np.diag(a))
  true_stderr = np.sqrt(2 * np.sum(off**2) / 400)
  np.testing.assert_allclose(res.trace_stderr, true_stderr, rtol=0.25)
  assert abs(float(res.trace) - SPECTRUM.sum()) < 4 * true_stderr
  # ||A z||^2 = z^T A^2 z: the same variance formula with A^2 in place of A.
  a2 = a @ a
  off2 = a2 - np.diag(np.diag(a2))
  true_sq_stderr = np.sqrt(2 * np.sum(off2**2) / 400)
  np.testing.assert_allclose(res.trace_sq_stderr, true_sq_stderr, rtol=0.25)
  assert abs(float(res.trace_sq) - (SPECTRUM**2).sum()) < 4 * true_sq_stderr


def test_slq_moments_match_eigh():
  a = np.diag(SPECTRUM)
  evals = np.linalg.eigh(a)[0]
  # m >= d: the nodes with weight are the eigenvalues, every moment is exact.
  dens = sm.spectral_density(
      _quadratic(a), _params_like(18), _ones_batch(), KEY, num_steps=24,
      grid_size=2000,
  )
  live = np.asarray(dens.weights[0]) > 1e-6
  np.testing.assert_allclose(np.sort(np.asarray(dens.nodes[0])[live]), evals, atol=1e-4)
  for p in (1, 2, 3):
    np.testing.assert_allclose(
        sm.spectral_moment(dens, lambda t, p=p: t**p), np.sum(evals**p),
        rtol=1e-4, atol=1e-3,
    )
  np.testing.assert_allclose(
      sm.spectral_moment(dens, jnp.exp), np.sum(np.exp(evals)), rtol=1e-4
  )
  np.testing.assert_allclose(jnp.sum(dens.density) * (dens.grid[1] - dens.grid[0]), 1.0, rtol=1e-4)
  np.testing.assert_allclose(jnp.sum(dens.weights, axis=1), 1.0, rtol=1e-5)
  # m < d: Gauss quadrature with m nodes is exact for degree < 2m.
  dens4 = sm.spectral_density(
      _quadratic(a), _params_like(18), _ones_batch(), KEY, num_steps=4,
      num_runs=2, grid_size=100,
  )
  assert dens4.nodes.shape == (2, 4)
  for p in range(8):
    np.testing.assert_allclose(
        sm.spectral_moment(dens4, lambda t, p=p: t**p), np.sum(evals**p), rtol=2e-4
    )


def test_lanczos_quadrature_exact_for_rotated_matrix():
  a = _rotated(SPECTRUM)
  v0 = np.random.default_rng(4).normal(size=18)
  v0 /= np.linalg.norm(v0)
  m = 5
  alphas, betas, basis = sm.lanczos(
      lambda x: jnp.asarray(a, jnp.float32) @ x, jnp.asarray(v0, jnp.float32), m
  )
  np.testing.assert_allclose(basis @ basis.T, np.eye(m), atol=1e-5)
  nodes, u = sm.tridiagonal_eigh(alphas, betas)
  weights = np.asarray(u[0]) ** 2
  for p in range(2 * m):
    exact = v0 @ np.linalg.matrix_power(a, p) @ v0
    np.testing.assert_allclose(np.sum(weights * np.asarray(nodes) ** p), exact,
                               rtol=1e-3, atol=1e-3)


def test_renyi_sharpness():
  lam = np.array([5.0, 3.0, 1.0, 0.5, 0.5, 0.0])
  a = np.diag(np.concatenate([lam, np.full(12, 0.25)]))
  evals = np.diag(a)
  p = evals / evals.sum()
  loss_fn, params = _quadratic(a), _params_like(18)
  tr = sm.hessian_trace(loss_fn, params, _ones_batch(), KEY, num_probes=2)
  np.testing.assert_allclose(sm.renyi_sharpness(tr), np.log(np.sum(p**2)), rtol=1e-5)
  dens = sm.spectral_density(loss_fn, params, _ones_batch(), KEY, num_steps=20, grid_size=10)
  for alpha in (0.5, 2.0, 3.0):
    expected = np.log(np.sum(p**alpha)) / (alpha - 1)
    np.testing.assert_allclose(sm.renyi_sharpness(dens, alpha), expected, rtol=1e-4)
  shannon = np.sum(p[p > 0] * np.log(p[p > 0]))
  np.testing.assert_allclose(sm.renyi_sharpness(dens, 1.0), shannon, rtol=1e-4)
  assert -np.log(18) <= float(sm.renyi_sharpness(dens, 2.0)) <= 0.0
  with pytest.raises(ValueError, match="alpha must be 2"):
    sm.renyi_sharpness(tr, 3.0)


def test_mlp_top_eigenvalue_matches_dense_eigh():
  params, apply_fn, batch = _mlp()
  loss_fn = sm.classification_loss(apply_fn)
  hess, _, _ = _dense_hessian(loss_fn, params, batch)
  evals = np.linalg.eigh(hess)[0]
  power = sm.hessian_eigenpairs(loss_fn, params, batch, KEY, max_iters=1000, tol=1e-8)
  np.testing.assert_allclose(power.eigenvalues[0], evals[np.argmax(np.abs(evals))], rtol=1e-3)
  lanczos = sm.hessian_eigenpairs(loss_fn, params, batch, KEY, k=2, method="lanczos")
  np.testing.assert_allclose(lanczos.eigenvalues, evals[::-1][:2], rtol=1e-3)
  trace = sm.hessian_trace(loss_fn, params, batch, KEY, num_probes=50)
  assert abs(float(trace.trace) - np.trace(hess)) < 4 * float(trace.trace_stderr) + 1e-4


# ---------------------------------------------------------------------------
# Worst-case and average-case sharpness.
# ---------------------------------------------------------------------------


def test_apgd_checkpoints_match_reference_schedule():
  assert sm.apgd_checkpoints(20) == (5, 9, 12, 15, 16, 18, 19, 20)


def _constraint(delta, params, norm, adaptive):
  """||delta / c||_p per subset (delta has a leading subset axis)."""
  c = jax.tree.map(lambda w: jnp.abs(w) if adaptive else jnp.ones_like(w), params)
  # Where c = 0 the perturbation must be 0 (checked below), and counts as 0.
  for d, s in zip(jax.tree.leaves(delta), jax.tree.leaves(c)):
    assert np.all(np.asarray(d)[:, np.asarray(s) == 0] == 0)
  safe = lambda d, s: jnp.where(s > 0, d / jnp.where(s > 0, s, 1.0), 0.0)
  ratio = jax.tree.map(lambda d, s: safe(d, s[None]), delta, c)
  flat = jnp.concatenate([x.reshape(x.shape[0], -1) for x in jax.tree.leaves(ratio)], 1)
  return jnp.max(jnp.abs(flat), 1) if norm == "linf" else jnp.linalg.norm(flat, axis=1)


@pytest.mark.parametrize("norm,adaptive,rho,ascent", [
    ("l2", False, 0.5, "scaled"), ("l2", True, 0.3, "scaled"),
    ("l2", True, 0.3, "reference"), ("linf", False, 0.05, "scaled"),
    ("linf", True, 0.1, "scaled"),
])
def test_worst_case_bounds_and_constraint(norm, adaptive, rho, ascent):
  params, apply_fn, batch = _mlp()
  loss_fn = sm.classification_loss(apply_fn)
  error_fn = sm.classification_error(apply_fn)
  worst = sm.worst_case_sharpness(
      loss_fn, params, batch, rho=rho, norm=norm, adaptive=adaptive, m=8,
      error_fn=error_fn, return_perturbation=True, ascent=ascent,
  )
  assert worst.perturbation is not None
  assert jax.tree.leaves(worst.perturbation)[0].shape[0] == 2 == worst.num_subsets
  # The perturbation respects its constraint.
  assert np.all(np.asarray(_constraint(worst.perturbation, params, norm, adaptive)) <= rho * (1 + 1e-5))
  # Recomputing the loss at the returned perturbations gives the reported value.
  halves = [jax.tree.map(lambda x, i=i: x[8 * i: 8 * i + 8], batch) for i in range(2)]
  losses = [
      jnp.mean(loss_fn(jax.tree.map(lambda w, d, i=i: w + d[i], params, worst.perturbation), b))
      for i, b in enumerate(halves)
  ]
  clean = [jnp.mean(loss_fn(params, b)) for b in halves]
  np.testing.assert_allclose(worst.sharpness, np.mean(losses) - np.mean(clean), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(worst.clean_error, jnp.mean(error_fn(params, batch)), atol=1e-6)
  assert np.isfinite(float(worst.error_increase))

  # At least the one-step (SAM-style) estimate on each subset, within the same set.
  @jax.jit
  def one_step(b):
    g = jax.grad(lambda p: jnp.mean(loss_fn(p, b)))(params)
    c = jax.tree.map(lambda w: jnp.abs(w) if adaptive else jnp.ones_like(w), params)
    if norm == "linf":
      eps = jax.tree.map(lambda gg, s: rho * s * jnp.sign(gg), g, c)
    else:  # the maximiser of the linearisation over ||eps / c|| <= rho
      tg = jax.tree.map(lambda gg, s: s * gg, g, c)
      n = optax.tree.norm(tg)
      eps = jax.tree.map(lambda t, s: rho * s * t / n, tg, c)
    return jnp.mean(loss_fn(jax.tree.map(jnp.add, params, eps), b)) - jnp.mean(loss_fn(params, b))

  sam_estimate = np.mean([one_step(b) for b in halves])
  if ascent == "scaled":
    assert float(worst.sharpness) >= sam_estimate - 1e-6
  else:  # the reference's adaptive-l2 ascent stalls below it (documented)
    assert float(worst.sharpness) >= 0.9 * sam_estimate
  # At least the average case with noise inside the same set.
  if norm == "linf":
    avg = sm.average_case_sharpness(
        loss_fn, params, batch, KEY, rho=rho, noise="uniform", adaptive=adaptive, m=8,
    )
  else:
    d = sum(x.size for x in jax.tree.leaves(params))
    avg = sm.average_case_sharpness(
        loss_fn, params, batch, KEY, rho=rho / np.sqrt(d), noise="gaussian",
        adaptive=adaptive, m=8,
    )
  assert float(worst.sharpness) >= float(avg.sharpness)
  assert float(worst.sharpness) > 0


def test_worst_case_quadratic_exact_maximum():
  # L = 0.5 ||w||^2: over the box |delta_i| <= rho |w_i| the maximum is at
  # delta = rho * w, sharpness 0.5 * ((1 + rho)^2 - 1) ||w||^2.
  loss_fn = lambda w, b: 0.5 * b * jnp.sum(w**2)
  w = jnp.array([1.0, -2.0, 0.5, 3.0])
  res = sm.worst_case_sharpness(loss_fn, w, jnp.ones(4), rho=0.1, norm="linf", m=None,
                                return_perturbation=True)
  np.testing.assert_allclose(res.sharpness, 0.5 * (1.1**2 - 1) * float(w @ w), rtol=1e-5)
  np.testing.assert_allclose(res.perturbation[0], 0.1 * w, rtol=1e-5)
  # Standard l2: delta = rho * w / ||w||.
  res = sm.worst_case_sharpness(loss_fn, w, jnp.ones(4), rho=0.5, norm="l2",
                                adaptive=False, m=None)
  n = float(jnp.linalg.norm(w))
  np.testing.assert_allclose(res.sharpness, 0.5 * ((n + 0.5) ** 2 - n**2), rtol=1e-4)


def test_project_ellipsoid_is_the_euclidean_projection():
  rng = np.random.default_rng(5)
  c = {"a": jnp.asarray(rng.uniform(0.1, 2.0, size=(7,)), jnp.float32),
       "b": jnp.asarray(rng.uniform(0.1, 2.0, size=(2, 3)), jnp.float32)}
  p = {"a": jnp.asarray(rng.normal(size=(7,)), jnp.float32),
       "b": jnp.asarray(rng.normal(size=(2, 3)), jnp.float32)}
  rho = 0.5
  x = sm.project_ellipsoid(p, c, jnp.float32(rho))
  flat = lambda t: np.concatenate([np.ravel(t["a"]), np.ravel(t["b"])])
  xf, pf, cf = flat(x), flat(p), flat(c)
  np.testing.assert_allclose(np.linalg.norm(xf / cf), rho, rtol=1e-4)
  assert np.linalg.norm(xf / cf) <= rho
  # KKT: p - x is parallel to the constraint gradient x / c^2.
  lam = (pf - xf) * cf**2 / xf
  np.testing.assert_allclose(lam, lam.mean(), rtol=1e-3)
  assert lam.mean() > 0
  # A point inside is left alone.
  inside = jax.tree.map(lambda v: v * 1e-3, p)
  y = sm.project_ellipsoid(inside, c, jnp.float32(rho))
  np.testing.assert_allclose(flat(y), flat(inside), rtol=1e-6)


def test_average_case_matches_closed_form_and_m_subsets():
  # L = 0.5 ||w||^2 with delta ~ N(0, rho^2 w^2): E[increase] = 0.5 rho^2 ||w||^2.
  loss_fn = lambda w, b: 0.5 * b * jnp.sum(w**2)
  w = jnp.linspace(0.5, 2.0, 50)
  res = sm.average_case_sharpness(loss_fn, w, jnp.ones(8), KEY, rho=0.2, m=4,
                                  n_samples=200)
  assert res.num_subsets == 2
  expected = 0.5 * 0.04 * float(w @ w)
  # Standard error: (rho^2 sum w^4 + 0.5 rho^4 sum w^4)^0.5 / sqrt(400) ~ 0.024.
  assert abs(float(res.sharpness) - expected) < 0.1
  # m must divide the number of examples.
  with pytest.raises(ValueError, match="must divide"):
    sm.average_case_sharpness(loss_fn, w, jnp.ones(10), KEY, rho=0.2, m=4)
  with pytest.raises(ValueError, match="rho"):
    sm.worst_case_sharpness(loss_fn, w, jnp.ones(8), rho=-1.0)
  with pytest.raises(ValueError, match="norm"):
    sm.worst_case_sharpness(loss_fn, w, jnp.ones(8), rho=1.0, norm="l1")


def test_m_none_uses_given_batches():
  params, apply_fn, batch = _mlp()
  loss_fn = sm.classification_loss(apply_fn)
  halves = [jax.tree.map(lambda x, i=i: x[8 * i: 8 * i + 8], batch) for i in range(2)]
  a = sm.worst_case_sharpness(loss_fn, params, halves, rho=0.05, m=None)
  b = sm.worst_case_sharpness(loss_fn, params, batch, rho=0.05, m=8)
  np.testing.assert_allclose(a.sharpness, b.sharpness, rtol=1e-6)


def test_normalized_logits():
  logits = jnp.array([[1.0, 2.0, 6.0], [0.0, 0.0, 0.0]])
  z = sm.normalize_logits(logits)
  np.testing.assert_allclose(jnp.sum(z, -1), 0.0, atol=1e-6)
  np.testing.assert_allclose(jnp.linalg.norm(z[0]), 1.0, rtol=1e-6)
  assert np.all(np.isfinite(np.asarray(z)))
  # With normalised logits the loss no longer sees the logit scale.
  params, apply_fn, batch = _mlp()
  loss_n = sm.classification_loss(apply_fn, normalize=True)
  scaled = jax.tree.map(lambda x: x, params)
  scaled["dense2"] = jax.tree.map(lambda x: 5.0 * x, params["dense2"])
  np.testing.assert_allclose(loss_n(scaled, batch), loss_n(params, batch), rtol=1e-5)


# ---------------------------------------------------------------------------
# Landscapes.
# ---------------------------------------------------------------------------


def test_filter_normalization():
  rng = np.random.default_rng(6)
  params = {"conv": {"kernel": jnp.asarray(rng.normal(size=(3, 2, 8)), jnp.float32),
                     "bias": jnp.ones((8,))},
            "dense": {"kernel": jnp.asarray(rng.normal(size=(5, 4)), jnp.float32)}}
  d = sm.filter_normalized_direction(KEY, params)
  for name, axes in (("conv", (0, 1)), ("dense", (0,))):
    np.testing.assert_allclose(
        jnp.linalg.norm(d[name]["kernel"].reshape(-1, d[name]["kernel"].shape[-1]), axis=0),
        jnp.linalg.norm(params[name]["kernel"].reshape(-1, params[name]["kernel"].shape[-1]), axis=0),
        rtol=1e-5,
    )
    del axes
  np.testing.assert_array_equal(d["conv"]["bias"], 0.0)
  # Filters along axis 0 (PyTorch layout); 1D leaves copied when not ignored.
  d0 = sm.filter_normalized_direction(KEY, params, filter_axis=0, ignore_1d=False)
  np.testing.assert_allclose(
      jnp.linalg.norm(d0["dense"]["kernel"], axis=1),
      jnp.linalg.norm(params["dense"]["kernel"], axis=1), rtol=1e-5,
  )
  np.testing.assert_array_equal(d0["conv"]["bias"], params["conv"]["bias"])
  # The direction is random: not proportional to the weights.
  ratio = d["dense"]["kernel"] / params["dense"]["kernel"]
  assert float(jnp.std(ratio)) > 0.1


def test_slices_and_interpolation():
  params, apply_fn, batch = _mlp()
  loss_fn = sm.classification_loss(apply_fn)
  error_fn = sm.classification_error(apply_fn)
  other = jax.tree.map(lambda x: 0.5 * x, params)
  line = sm.interpolate(loss_fn, params, other, batch, span=(0.0, 1.0), num_points=3,
                        error_fn=error_fn)
  np.testing.assert_allclose(line.loss[0], jnp.mean(loss_fn(params, batch)), rtol=1e-5)
  np.testing.assert_allclose(line.loss[-1], jnp.mean(loss_fn(other, batch)), rtol=1e-5)
  np.testing.assert_allclose(line.error[0], jnp.mean(error_fn(params, batch)), rtol=1e-6)
  s1 = sm.landscape_1d(loss_fn, params, batch, KEY, num_points=5)
  np.testing.assert_allclose(s1.loss[2], jnp.mean(loss_fn(params, batch)), rtol=1e-5)
  moved = jax.tree.map(lambda w, d: w + d, params, s1.direction)
  np.testing.assert_allclose(s1.loss[-1], jnp.mean(loss_fn(moved, batch)), rtol=1e-5)
  s2 = sm.landscape_2d(loss_fn, params, [batch], KEY, num_points=3, num_points_y=5,
                       span_y=(-2.0, 2.0), points_per_step=4)
  assert s2.loss.shape == (5, 3)
  np.testing.assert_allclose(s2.loss[2, 1], jnp.mean(loss_fn(params, batch)), rtol=1e-5)
  d1, d2 = s2.directions
  corner = jax.tree.map(lambda w, a, b: w + 1.0 * a - 2.0 * b, params, d1, d2)
  np.testing.assert_allclose(s2.loss[0, 2], jnp.mean(loss_fn(corner, batch)), rtol=1e-5)


def test_plots_return_figures():
  matplotlib = pytest.importorskip("matplotlib")
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  params, apply_fn, batch = _mlp()
  loss_fn = sm.classification_loss(apply_fn)
  dens = sm.spectral_density(loss_fn, params, batch, KEY, num_steps=8, grid_size=200)
  s1 = sm.landscape_1d(loss_fn, params, batch, KEY, num_points=3)
  s2 = sm.landscape_2d(loss_fn, params, batch, KEY, num_points=3)
  figs = [sm.plot_spectral_density(dens), sm.plot_slice_1d(s1, show_error=True),
          sm.plot_slice_2d(s2), sm.plot_slice_2d(s2, kind="surface")]
  for fig in figs:
    assert isinstance(fig, matplotlib.figure.Figure)
    assert fig.axes
    plt.close(fig)


# ---------------------------------------------------------------------------
# Determinism and compilation.
# ---------------------------------------------------------------------------


def test_deterministic_for_fixed_key():
  params, apply_fn, batch = _mlp()
  loss_fn = sm.classification_loss(apply_fn)
  key2 = jax.random.PRNGKey(1)
  calls = [
      lambda k: sm.hessian_trace(loss_fn, params, batch, k, num_probes=4).trace,
      lambda k: sm.spectral_density(loss_fn, params, batch, k, num_steps=6, grid_size=50).nodes,
      lambda k: sm.average_case_sharpness(loss_fn, params, batch, k, rho=0.1, m=8, n_samples=3).sharpness,
      lambda k: sm.landscape_1d(loss_fn, params, batch, k, num_points=3).loss,
  ]
  for call in calls:
    a, b, c = call(KEY), call(KEY), call(key2)
    jax.tree.map(np.testing.assert_array_equal, a, b)
    assert not all(jax.tree.leaves(jax.tree.map(lambda x, y: bool(jnp.all(x == y)), a, c)))


def test_host_loops_match_lax_loops():
  params, apply_fn, batch = _mlp()
  loss_fn = sm.classification_loss(apply_fn)
  close = lambda a, b: jax.tree.map(
      lambda x, y: np.testing.assert_allclose(x, y, rtol=2e-4, atol=2e-5), a, b)
  kw = dict(k=2, max_iters=20)
  close(sm.hessian_eigenpairs(loss_fn, params, batch, KEY, **kw),
        sm.hessian_eigenpairs(loss_fn, params, batch, KEY, loop="host", **kw))
  kw = dict(num_probes=6, probes_per_step=3)
  close(sm.hessian_trace(loss_fn, params, batch, KEY, **kw),
        sm.hessian_trace(loss_fn, params, batch, KEY, loop="host", **kw))
  kw = dict(num_steps=6, grid_size=50)
  a = sm.spectral_density(loss_fn, params, batch, KEY, **kw)
  b = sm.spectral_density(loss_fn, params, batch, KEY, loop="host", **kw)
  close((a.nodes, a.weights), (b.nodes, b.weights))
  kw = dict(rho=0.05, m=None, n_iters=4, return_perturbation=True)
  close(sm.worst_case_sharpness(loss_fn, params, batch, **kw),
        sm.worst_case_sharpness(loss_fn, params, batch, loop="host", **kw))
  with pytest.raises(ValueError, match="loop"):
    sm.hessian_trace(loss_fn, params, batch, KEY, loop="python")


def test_no_retrace_on_new_params_or_key():
  traces = []
  a = jnp.asarray(_rotated(SPECTRUM), jnp.float32)

  def loss_fn(params, batch):
    traces.append(1)
    w = _flat(params)
    return 0.5 * batch["s"] * (w @ a @ w)

  for i in range(3):
    params = jax.tree.map(lambda x, i=i: x + i, _params_like(18))
    sm.hessian_trace(loss_fn, params, _ones_batch(), jax.random.PRNGKey(i), num_probes=3)
  first = len(traces)
  assert first > 0
  params = jax.tree.map(lambda x: x + 7.0, _params_like(18))
  sm.hessian_trace(loss_fn, params, _ones_batch(), jax.random.PRNGKey(9), num_probes=3)
  assert len(traces) == first
