"""SAGM against its formula, derived by hand, on a quadratic."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import sharpjax as sj

from tests import helpers

# Per-example loss l_i(w) = 0.5 (w - c_i)^T A (w - c_i), w = [kernel, bias].
Q = helpers.QUADRATIC_3
A, CENTRES, W0 = Q.a, Q.centres, Q.w0
quad_loss, flat = Q.loss, Q.flat
BATCH = Q.batch


def reference(rho, alpha, lr, steps):
  """SAGM with SGD in numpy: eps = (rho/|g| - alpha) g, d = (g + g_p)/2."""
  w = W0.copy()
  cbar = CENTRES.mean(0)
  directions = []
  for _ in range(steps):
    g = A @ (w - cbar)
    eps = (rho / np.linalg.norm(g) - alpha) * g
    g_p = A @ (w + eps - cbar)
    d = 0.5 * (g + g_p)
    directions.append(d)
    w = w - lr * d
  return w, directions


def run(tx, steps):
  """Runs ``tx`` eagerly, keeping the update of every step."""
  params = Q.params()
  state = tx.init(params)
  outs = []
  for _ in range(steps):
    grads = jax.grad(lambda p: quad_loss(p, BATCH).mean())(params)
    updates, state = tx.update(grads, state, params, loss_fn=quad_loss,
                               batch=BATCH)
    outs.append(flat(updates))
    params = optax.apply_updates(params, updates)
  return params, outs, state


@pytest.mark.parametrize("rho,alpha", [(0.1, 0.0), (0.3, 0.05)])
def test_matches_formula_on_quadratic(rho, alpha):
  w_ref, d_ref = reference(rho, alpha, lr=0.1, steps=4)
  tx = optax.chain(sj.sagm(rho=rho, alpha=alpha), optax.sgd(0.1))
  params, _, _ = run(tx, 4)
  np.testing.assert_allclose(flat(params), w_ref, rtol=1e-5, atol=1e-6)
  # The direction alone, one step.
  _, outs, state = run(sj.sagm(rho=rho, alpha=alpha), 1)
  np.testing.assert_allclose(outs[0], d_ref[0], rtol=1e-5, atol=1e-6)
  g = A @ (W0 - CENTRES.mean(0))
  diag = sj.diagnostics(state)
  np.testing.assert_allclose(diag["grad_norm"], np.linalg.norm(g), rtol=1e-5)
  np.testing.assert_allclose(
      diag["perturbation_norm"],
      abs(rho / np.linalg.norm(g) - alpha) * np.linalg.norm(g), rtol=1e-5)


def test_alpha_zero_is_half_clean_plus_half_sam():
  params = Q.params()
  grads = jax.grad(lambda p: quad_loss(p, BATCH).mean())(params)
  d, _ = sj.sagm(rho=0.2, alpha=0.0).update(
      grads, sj.sagm(rho=0.2, alpha=0.0).init(params), params,
      loss_fn=quad_loss, batch=BATCH)
  g_sam, _ = sj.sam(rho=0.2).update(
      grads, sj.sam(rho=0.2).init(params), params, loss_fn=quad_loss,
      batch=BATCH)
  np.testing.assert_allclose(
      flat(d), 0.5 * (flat(grads) + flat(g_sam)), rtol=1e-6, atol=1e-7)


def test_rho_alpha_zero_is_plain_gradient():
  params = Q.params()
  grads = jax.grad(lambda p: quad_loss(p, BATCH).mean())(params)
  tx = sj.sagm(rho=0.0, alpha=0.0)
  d, _ = tx.update(grads, tx.init(params), params, loss_fn=quad_loss,
                   batch=BATCH)
  np.testing.assert_array_equal(flat(d), flat(grads))


def test_zero_gradient_no_nan():
  c = np.tile(W0, (4, 1))
  params = Q.params()
  batch = {"c": jnp.asarray(c, jnp.float32)}
  grads = jax.tree.map(jnp.zeros_like, params)
  tx = sj.sagm()
  d, state = tx.update(grads, tx.init(params), params, loss_fn=quad_loss,
                       batch=batch)
  np.testing.assert_array_equal(flat(d), np.zeros(3))
  assert np.isfinite(sj.diagnostics(state)["perturbation_norm"])


@pytest.mark.parametrize("kwargs", [dict(rho=-0.1), dict(alpha=-1.0)])
def test_bad_hyperparameters(kwargs):
  name = next(iter(kwargs))
  with pytest.raises(ValueError, match=name):
    sj.sagm(**kwargs)
