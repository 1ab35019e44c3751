"""SSAM against references derived by hand on a quadratic and a tiny MLP."""

from __future__ import annotations

import functools
import math

from absl.testing import parameterized
import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import sharpjax as sj
from sharpjax._src import ssam as ssam_lib

from tests import helpers

# Per-example loss l_i(w) = 0.5 (w - c_i)^T A (w - c_i), w = [kernel, bias]:
# the per-example gradient is A (w - c_i), so the Fisher diagonal is known.
_RNG = np.random.default_rng(3)
_M = _RNG.normal(size=(10, 10))
A = _M @ _M.T / 10 + 0.5 * np.eye(10)
CENTRES = _RNG.normal(size=(8, 10))
W0 = _RNG.normal(size=10)


Q = helpers.Quadratic(A, CENTRES, W0, kernel_shape=(2, 3))
quad_loss, quad_params, flat, run = Q.loss, Q.params, Q.flat, Q.run
QUAD_BATCH = Q.batch


def fisher(w, num):
  per_example = (w[None, :] - CENTRES[:num]) @ A  # A symmetric
  return np.sum(per_example ** 2, axis=0)


def reference(rho, sparsity, lr, steps, update_every, num_fisher):
  """SSAM-F in numpy: empty first mask, refresh after steps 0, k, 2k, ..."""
  w = W0.copy()
  mask = np.zeros(10, bool)
  kept = math.floor(10 * (1 - sparsity))
  masks = []
  for t in range(steps):
    g = A @ (w - CENTRES.mean(0))
    eps = mask * rho * g / np.linalg.norm(g)
    if t % update_every == 0:
      mask = np.zeros(10, bool)
      mask[np.argsort(-fisher(w, num_fisher))[:kept]] = True
      masks.append(mask.copy())
    w = w - lr * A @ (w + eps - CENTRES.mean(0))
  return w, masks


class SsamTest(parameterized.TestCase):

  @parameterized.parameters((0.5, 2, 5), (0.7, 3, 8), (0.2, 1, 3))
  def test_fisher_ssam_matches_hand_derived_recursion(
      self, sparsity, update_every, num_fisher):
    rho, lr, steps = 0.5, 0.1, 7
    tx = optax.chain(
        sj.ssam(rho=rho, sparsity=sparsity, num_fisher_samples=num_fisher,
                update_every=update_every),
        optax.sgd(lr))
    got, state = run(tx, steps)
    want, masks = reference(rho, sparsity, lr, steps, update_every, num_fisher)
    np.testing.assert_allclose(flat(got), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(flat(state[0].mask).astype(bool), masks[-1])

  def test_first_step_is_a_plain_gradient_step(self):
    params = quad_params()
    tx = sj.ssam(rho=0.5, sparsity=0.5, update_every=5)
    grads = jax.grad(lambda p: quad_loss(p, QUAD_BATCH).mean())(params)
    updates, state = jax.jit(
        lambda s: tx.update(grads, s, params, loss_fn=quad_loss,
                            batch=QUAD_BATCH))(tx.init(params))
    chex.assert_trees_all_close(updates, grads, rtol=1e-6)
    self.assertEqual(float(sj.diagnostics(state)["perturbation_norm"]), 0.0)
    # The mask was refreshed after the step, from the Fisher at w0.
    self.assertEqual(int(np.sum(flat(state.mask))), 5)

  @parameterized.parameters(0.0, 0.25, 0.5, 0.9, 0.99)
  def test_mask_density_and_largest_fisher_entries(self, sparsity):
    fisher_tree = _tiny_fisher()
    mask = ssam_lib.top_mask(fisher_tree, sparsity)
    f = np.concatenate([np.ravel(x) for x in jax.tree.leaves(fisher_tree)])
    m = np.concatenate([np.ravel(x) for x in jax.tree.leaves(mask)])
    n = f.size
    self.assertEqual(int(m.sum()), math.floor(n * (1 - sparsity)))
    if 0 < m.sum() < n:
      self.assertGreaterEqual(f[m].min(), f[~m].max())

  # None: the whole batch in one vmap (small model); 1, 2, 3: a scan over
  # chunks, as for a model too large to hold every per-example gradient.
  @parameterized.parameters(None, 1, 2, 3, 6)
  def test_fisher_diagonal_is_the_sum_of_squared_per_example_gradients(
      self, chunk_size):
    params = helpers.tiny_params()
    batch = helpers.tiny_batch(size=6)
    got = jax.jit(lambda p, b: ssam_lib.fisher_diagonal(
        helpers.loss_fn, p, b, chunk_size=chunk_size))(params, batch)
    # One jax.grad per example, by a Python loop.
    grad_fn = jax.jit(jax.grad(lambda p, one: helpers.loss_fn(p, one)[0]))
    want = jax.tree.map(jnp.zeros_like, params)
    for i in range(6):
      g = grad_fn(params, jax.tree.map(lambda x: x[i:i + 1], batch))
      want = jax.tree.map(lambda a, b: a + b ** 2, want, g)
    chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-7)

  def test_fisher_chunk_must_divide_the_batch(self):
    with self.assertRaisesRegex(ValueError, "chunk_size=4 must divide"):
      ssam_lib.fisher_diagonal(helpers.loss_fn, helpers.tiny_params(),
                               helpers.tiny_batch(size=6), chunk_size=4)

  def test_fisher_of_a_large_model_is_chunked(self):
    # 2**25 parameters: only 2 per-example gradients fit in the 2**26-float
    # budget, so 8 examples become a scan of 4 chunks of 2 (traced, not run).
    def loss_fn(params, batch):
      return jnp.sum(params["w"]) * batch["x"][:, 0]

    params = {"w": jax.ShapeDtypeStruct((2**25,), jnp.float32)}
    batch = {"x": jax.ShapeDtypeStruct((8, 1), jnp.float32)}
    jaxpr = jax.make_jaxpr(
        lambda p, b: ssam_lib.fisher_diagonal(loss_fn, p, b))(params, batch)
    scans = [e for e in jaxpr.eqns if e.primitive.name == "scan"]
    self.assertLen(scans, 1)
    self.assertEqual(scans[0].params["length"], 4)

  def test_sparsity_zero_is_sam(self):
    tx_ssam = optax.chain(sj.ssam(rho=0.3, sparsity=0.0, update_every=2),
                          optax.sgd(0.1, momentum=0.9))
    tx_sam = optax.chain(sj.sam(rho=0.3), optax.sgd(0.1, momentum=0.9))
    got, _ = run(tx_ssam, 5)
    want, _ = run(tx_sam, 5)
    chex.assert_trees_all_close(got, want, rtol=1e-6, atol=1e-7)

  def test_random_mask_density_and_refresh(self):
    params = helpers.tiny_params()
    batch = helpers.tiny_batch()
    n = sum(x.size for x in jax.tree.leaves(params))
    tx = optax.chain(sj.ssam(rho=0.05, sparsity=0.75, mask="random",
                             update_every=2), optax.sgd(0.1))
    state = tx.init(params)
    step = jax.jit(helpers.train_step, static_argnums=0)
    masks, keys = [flat_mask(state[0].mask)], []
    for _ in range(4):
      params, state = step(tx, params, state, batch)
      masks.append(flat_mask(state[0].mask))
      keys.append(tuple(np.asarray(state[0].key).tolist()))
    for m in masks:
      self.assertEqual(int(m.sum()), math.floor(n * 0.25))
    # Refreshed after steps 0 and 2 only.
    self.assertFalse(np.array_equal(masks[0], masks[1]))
    np.testing.assert_array_equal(masks[1], masks[2])
    self.assertFalse(np.array_equal(masks[2], masks[3]))
    np.testing.assert_array_equal(masks[3], masks[4])
    self.assertLen(set(keys), 4)

  def test_perturbation_is_the_masked_sam_perturbation(self):
    # Unmasked norm, as in the official code: ||eps|| = rho ||m g|| / ||g||.
    rho = 0.2
    tx = sj.ssam(rho=rho, sparsity=0.5, mask="random")
    params = helpers.tiny_params()
    batch = helpers.tiny_batch()
    grads = helpers.clean_grads(params, batch)
    state = tx.init(params)
    _, new_state = jax.jit(
        lambda s: tx.update(grads, s, params, loss_fn=helpers.loss_fn,
                            batch=batch))(state)
    g = np.concatenate([np.ravel(x) for x in jax.tree.leaves(grads)])
    m = flat_mask(state.mask)
    np.testing.assert_allclose(
        sj.diagnostics(new_state)["perturbation_norm"],
        rho * np.linalg.norm(g[m]) / np.linalg.norm(g), rtol=1e-5)

  def test_refresh_is_under_a_cond(self):
    tx = sj.ssam(rho=0.05, update_every=3, num_fisher_samples=4)
    params, batch = helpers.tiny_params(), helpers.tiny_batch()
    jaxpr = jax.make_jaxpr(
        lambda g, s, p: tx.update(g, s, p, loss_fn=helpers.loss_fn,
                                  batch=batch))(
                                      helpers.clean_grads(params, batch),
                                      tx.init(params), params)
    self.assertIn("cond[", str(jaxpr))

  def test_has_aux(self):
    def loss_aux(p, b):
      return quad_loss(p, b), {"n": b["c"].shape[0]}

    tx = sj.ssam(rho=0.5, sparsity=0.5, num_fisher_samples=5, update_every=1)
    params = quad_params()
    grads = jax.grad(lambda p: quad_loss(p, QUAD_BATCH).mean())(params)
    results = []
    for fn, has_aux in ((quad_loss, False), (loss_aux, True)):
      state = tx.init(params)
      for _ in range(2):  # the first refreshes the mask, the second uses it
        updates, state = tx.update(grads, state, params, loss_fn=fn,
                                   batch=QUAD_BATCH, has_aux=has_aux)
      results.append((updates, state.mask))
    chex.assert_trees_all_close(results[1], results[0])
    self.assertEqual(int(flat_mask(results[1][1]).sum()), 5)


@functools.cache
def _tiny_fisher():
  return jax.jit(
      lambda p, b: ssam_lib.fisher_diagonal(helpers.loss_fn, p, b)
  )(helpers.tiny_params(), helpers.tiny_batch())


def flat_mask(mask):
  return np.concatenate([np.ravel(np.asarray(x)) for x in
                         jax.tree.leaves(mask)]).astype(bool)


class SsamValidationTest(parameterized.TestCase):

  @parameterized.parameters(
      (dict(rho=-0.1), "rho"),
      (dict(sparsity=1.0), "sparsity"),
      (dict(sparsity=-0.1), "sparsity"),
      (dict(mask="magnitude"), "mask"),
      (dict(update_every=0), "update_every"),
      (dict(num_fisher_samples=0), "num_fisher_samples"),
      (dict(update_every=2.5), "update_every"),
  )
  def test_bad_hyperparameters_raise_at_construction(self, kwargs, name):
    with pytest.raises(ValueError, match=name):
      sj.ssam(**kwargs)
