"""ESAM against references derived by hand on a quadratic and a tiny MLP."""

from __future__ import annotations

import math

from absl.testing import parameterized
import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import sharpjax as sj
from sharpjax._src import esam as esam_lib

from tests import helpers

# Per-example loss l_i(w) = 0.5 (w - c_i)^T A (w - c_i), w = [kernel, bias].
_RNG = np.random.default_rng(0)
_M = _RNG.normal(size=(5, 5))
A = _M @ _M.T / 5 + 0.5 * np.eye(5)
CENTRES = _RNG.normal(size=(8, 5)) * np.array([1.0, 2.0, 0.5, 1.5, 1.0])
W0 = np.array([0.3, 0.8, -0.6, 1.2, -0.4])


Q = helpers.Quadratic(A, CENTRES, W0, kernel_shape=(3,))
quad_loss, quad_params, flat, run = Q.loss, Q.params, Q.flat, Q.run
QUAD_BATCH = Q.batch


def sds_reference(rho, gamma, lr, steps):
  """ESAM without SWP (beta=1) in numpy: select by loss rise, descend on B+."""
  w = W0.copy()
  k = math.ceil(gamma * len(CENTRES))
  selections = []
  for _ in range(steps):
    g = A @ (w - CENTRES.mean(0))
    eps = rho * g / np.linalg.norm(g)
    loss = lambda v: 0.5 * np.einsum("bi,ij,bj->b", v - CENTRES, A,
                                     v - CENTRES)
    rise = loss(w + eps) - loss(w)
    keep = np.sort(np.argsort(-rise)[:k])
    selections.append(keep)
    w = w - lr * A @ (w + eps - CENTRES[keep].mean(0))
  return w, selections


class EsamTest(parameterized.TestCase):

  def test_beta_1_gamma_1_is_sam_exactly(self):
    batch = helpers.tiny_batch()
    p_sam = p_esam = helpers.tiny_params()
    tx_sam = optax.chain(sj.sam(rho=0.1), optax.sgd(0.1, momentum=0.9))
    tx_esam = optax.chain(sj.esam(rho=0.1, beta=1.0, gamma=1.0),
                          optax.sgd(0.1, momentum=0.9))
    s_sam, s_esam = tx_sam.init(p_sam), tx_esam.init(p_esam)
    step = jax.jit(helpers.train_step, static_argnums=0)
    for _ in range(4):
      p_sam, s_sam = step(tx_sam, p_sam, s_sam, batch)
      p_esam, s_esam = step(tx_esam, p_esam, s_esam, batch)
    chex.assert_trees_all_equal(p_esam, p_sam)
    for name, value in sj.diagnostics(s_sam).items():
      np.testing.assert_array_equal(sj.diagnostics(s_esam)[name], value)

  @parameterized.parameters(0.5, 0.3, 0.75)
  def test_sds_keeps_the_examples_whose_loss_rose_most(self, gamma):
    rho, lr = 0.5, 0.1
    tx = optax.chain(sj.esam(rho=rho, beta=1.0, gamma=gamma), optax.sgd(lr))
    got, _ = run(tx, 4)
    want, selections = sds_reference(rho, gamma, lr, 4)
    # The selection changes along the run, so the test sees several subsets.
    self.assertGreater(len({tuple(s) for s in selections}), 1)
    np.testing.assert_allclose(flat(got), want, rtol=1e-5, atol=1e-6)

  def test_sds_descent_gradient_is_the_mean_over_the_selection(self):
    # One step, read the update directly: -(A (w + eps - mean_{B+} c)).
    rho, gamma = 0.5, 0.25
    params = quad_params()
    tx = sj.esam(rho=rho, beta=1.0, gamma=gamma)
    grads = jax.grad(lambda p: quad_loss(p, QUAD_BATCH).mean())(params)
    updates, state = tx.update(grads, tx.init(params), params,
                               loss_fn=quad_loss, batch=QUAD_BATCH)
    g = A @ (W0 - CENTRES.mean(0))
    eps = rho * g / np.linalg.norm(g)
    loss = lambda v: 0.5 * np.einsum("bi,ij,bj->b", v - CENTRES, A,
                                     v - CENTRES)
    rise = loss(W0 + eps) - loss(W0)
    keep = np.argsort(-rise)[:2]  # ceil(0.25 * 8) = 2
    np.testing.assert_allclose(
        flat(updates), A @ (W0 + eps - CENTRES[keep].mean(0)), rtol=1e-5)
    # Any other pair of examples gives a different gradient.
    other = np.argsort(-rise)[1:3]
    self.assertGreater(
        np.abs(flat(updates) - A @ (W0 + eps - CENTRES[other].mean(0))).max(),
        1e-3)
    d = sj.diagnostics(state)
    np.testing.assert_allclose(d["perturbed_loss"], loss(W0 + eps).mean(),
                               rtol=1e-5)
    np.testing.assert_allclose(d["clean_loss"], loss(W0).mean(), rtol=1e-5)
    np.testing.assert_allclose(d["perturbation_norm"], rho, rtol=1e-5)

  def test_swp_perturbation_is_per_tensor_and_has_norm_rho_over_beta(self):
    rho, beta = 0.05, 0.6
    params = helpers.tiny_params()
    grads = helpers.clean_grads(params, helpers.tiny_batch())
    g = [np.asarray(x, np.float64) for x in jax.tree.leaves(grads)]
    swp = jax.jit(lambda key: esam_lib.swp_perturbation(grads, rho, beta, key))
    kept_counts = np.zeros(len(g))
    draws = 400
    for i in range(draws):
      eps = [np.asarray(x, np.float64)
             for x in jax.tree.leaves(swp(jax.random.key(i)))]
      kept = np.array([np.any(e != 0) for e in eps])
      kept_counts += kept
      if not kept.any():
        continue
      # Hand-derived: eps_j = (rho / beta) g_j / ||(g_j)_{j kept}||.
      norm = np.sqrt(sum(np.sum(gj ** 2) for gj, k in zip(g, kept) if k))
      for e, gj, k in zip(eps, g, kept):
        want = rho / beta * gj / norm if k else np.zeros_like(gj)
        np.testing.assert_allclose(e, want, rtol=1e-5, atol=1e-8)
      np.testing.assert_allclose(
          np.sqrt(sum(np.sum(e ** 2) for e in eps)), rho / beta, rtol=1e-5)
    # Each tensor kept with probability beta (4 sigma of a binomial).
    sigma = math.sqrt(beta * (1 - beta) / draws)
    np.testing.assert_array_less(np.abs(kept_counts / draws - beta), 4 * sigma)

  def test_keys_advance_and_masks_are_fresh_every_step(self):
    # lr 0 keeps the parameters and the clean gradient fixed: only the mask
    # drawn from the state's key changes the perturbation from step to step.
    tx = optax.chain(sj.esam(rho=0.05, beta=0.5, gamma=1.0), optax.sgd(0.0))
    params, batch = helpers.tiny_params(), helpers.tiny_batch()
    state = tx.init(params)
    step = jax.jit(helpers.train_step, static_argnums=0)
    keys, norms, cosines = [], [], []
    for _ in range(12):
      params, state = step(tx, params, state, batch)
      keys.append(tuple(np.asarray(state[0].key).tolist()))
      norms.append(float(sj.diagnostics(state)["perturbation_norm"]))
      cosines.append(round(float(sj.diagnostics(state)["cosine"]), 6))
    self.assertLen(set(keys), len(keys))
    # The norm is rho / beta, or 0 when every tensor is dropped.
    for n in norms:
      self.assertTrue(np.isclose(n, 0.1, rtol=1e-5) or n == 0.0, norms)
    self.assertGreater(len(set(cosines)), 3)

  def test_descent_pass_runs_on_a_static_sub_batch(self):
    tx = sj.esam(rho=0.05, beta=0.6, gamma=0.25)
    params, batch = helpers.tiny_params(), helpers.tiny_batch(size=16)
    grads = helpers.clean_grads(params, batch)
    jaxpr = jax.make_jaxpr(
        lambda g, s, p: tx.update(g, s, p, loss_fn=helpers.loss_fn,
                                  batch=batch))(grads, tx.init(params), params)
    text = str(jaxpr)
    self.assertIn("top_k", text)
    # The hidden layer is evaluated on the 4 selected examples only.
    self.assertIn("f32[4,8]", text)

  def test_per_device_selection_under_pmap(self):
    # As in the official DDP code: perturbation and SDS per device, the
    # descent gradients averaged. Reference: the mean of single-device steps.
    n = 4
    params = helpers.tiny_params()
    batch = helpers.tiny_batch(size=8 * n)
    shards = jax.tree.map(lambda x: x.reshape(n, 8, *x.shape[1:]), batch)
    tx = sj.esam(rho=0.1, beta=1.0, gamma=0.5, axis_name="devices")
    single = jax.jit(
        lambda p, b: sj.esam(rho=0.1, beta=1.0, gamma=0.5).update(
            helpers.clean_grads(p, b), sj.esam().init(p), p,
            loss_fn=helpers.loss_fn, batch=b)[0])

    def device_step(params, shard):
      return tx.update(helpers.clean_grads(params, shard), tx.init(params),
                       params, loss_fn=helpers.loss_fn, batch=shard)[0]

    got = jax.pmap(device_step, axis_name="devices", in_axes=(None, 0),
                   devices=jax.devices()[:n])(params, shards)
    per_device = [single(params, jax.tree.map(lambda x: x[i], shards))
                  for i in range(n)]
    want = jax.tree.map(lambda *u: jnp.mean(jnp.stack(u), 0), *per_device)
    for i in range(n):
      chex.assert_trees_all_close(jax.tree.map(lambda x: x[i], got), want,
                                  atol=1e-6)

  def test_the_step_holds_the_passes_of_the_cost_model_only(self):
    # Clean forward-backward (2 convolutions on this one-layer model, the
    # caller's), the scoring forward at w + eps on the batch (1), and the
    # descent forward-backward on the ceil(gamma B) = 8 kept examples (2). The
    # clean per-example losses share the caller's forward (no 6th).
    params, batch = helpers.conv_problem(16)
    tx = optax.chain(sj.esam(rho=0.1, beta=0.6, gamma=0.5), optax.sgd(0.1))
    shapes = helpers.compiled_convolutions(tx, params, batch)
    self.assertLen(shapes, 5)
    self.assertEqual(shapes.count("f32[16,10,4]"), 2)  # full-batch forwards
    self.assertEqual(shapes.count("f32[8,10,4]"), 1)  # the kept examples
    self.assertEqual(shapes.count("f32[2,3,4]"), 2)  # the kernel gradients
    sam = optax.chain(sj.sam(rho=0.1), optax.sgd(0.1))
    self.assertLen(helpers.compiled_convolutions(sam, params, batch), 4)

  def test_has_aux(self):
    def loss_aux(p, b):
      losses = quad_loss(p, b)
      return losses, {"mean": losses.mean()}

    params = quad_params()
    tx = sj.esam(rho=0.3, beta=1.0, gamma=0.5)
    grads = jax.grad(lambda p: quad_loss(p, QUAD_BATCH).mean())(params)
    want, _ = jax.jit(lambda s: tx.update(
        grads, s, params, loss_fn=quad_loss, batch=QUAD_BATCH))(
            tx.init(params))
    got, _ = jax.jit(lambda s: tx.update(
        grads, s, params, loss_fn=loss_aux, batch=QUAD_BATCH, has_aux=True))(
            tx.init(params))
    chex.assert_trees_all_close(got, want)


class EsamValidationTest(parameterized.TestCase):

  @parameterized.parameters(
      (dict(rho=-0.1), "rho"),
      (dict(beta=0.0), "beta"),
      (dict(beta=1.2), "beta"),
      (dict(gamma=0.0), "gamma"),
      (dict(gamma=1.5), "gamma"),
      (dict(gamma=-0.5), "gamma"),
  )
  def test_bad_hyperparameters_raise_at_construction(self, kwargs, name):
    with pytest.raises(ValueError, match=name):
      sj.esam(**kwargs)

  def test_traced_gamma_asks_for_static_args(self):
    tx = optax.inject_hyperparams(sj.esam)(rho=0.05, gamma=0.5)
    params, batch = helpers.tiny_params(), helpers.tiny_batch()
    grads = helpers.clean_grads(params, batch)
    with pytest.raises(ValueError, match="static_args"):
      jax.jit(lambda s: tx.update(grads, s, params, loss_fn=helpers.loss_fn,
                                  batch=batch))(tx.init(params))

  def test_loss_fn_must_return_per_example_losses(self):
    params, batch = helpers.tiny_params(), helpers.tiny_batch()
    tx = sj.esam()
    with pytest.raises(ValueError, match="per-example"):
      tx.update(helpers.clean_grads(params, batch), tx.init(params), params,
                loss_fn=lambda p, b: helpers.loss_fn(p, b).mean(), batch=batch)
