"""GSAM against references derived by hand on the quadratic of helpers."""

from __future__ import annotations

from absl.testing import absltest
from absl.testing import parameterized
import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import sharpjax as sj

from tests import helpers

Q = helpers.QUADRATIC_4
W0 = Q.w0
chain, reject = helpers.with_sgd, helpers.reject


def gsam_direction(w, rho, alpha, minimize_fp=True):
  g = Q.grad(w)
  g_p = Q.sam_grad(w, rho)
  if minimize_fp:
    return g_p - alpha * reject(g, g_p)
  return g + alpha * reject(g_p, g)


class GSAMTest(parameterized.TestCase):

  @parameterized.product(momentum=[0.0, 0.9], alpha=[0.1, 0.7],
                         minimize_fp=[True, False])
  def test_matches_hand_derived_recursion(self, momentum, alpha, minimize_fp):
    rho = 0.3
    got, _ = Q.run(chain(sj.gsam(rho=rho, alpha=alpha,
                                 minimize_fp=minimize_fp), momentum=momentum),
                   6)
    want = Q.descend(lambda t, w: gsam_direction(w, rho, alpha, minimize_fp),
                     6, momentum=momentum)
    np.testing.assert_allclose(Q.flat(got), want, rtol=1e-5, atol=1e-6)

  def test_alpha_zero_is_sam_on_a_small_network(self):
    params, batch = helpers.tiny_params(), helpers.tiny_batch()
    step = jax.jit(helpers.train_step, static_argnums=0)
    results = []
    for tx in (chain(sj.gsam(rho=0.1, alpha=0.0)), chain(sj.sam(rho=0.1))):
      p, s = params, tx.init(params)
      for _ in range(4):
        p, s = step(tx, p, s, batch)
      results.append(p)
    chex.assert_trees_all_close(results[0], results[1], atol=1e-7, rtol=1e-6)

  def test_the_step_is_orthogonal_correction_of_the_perturbed_gradient(self):
    # d - g_p is -alpha times the part of g orthogonal to g_p: it is
    # orthogonal to g_p, so the perturbed loss is unchanged to first order.
    params = Q.params()
    grads = jax.grad(lambda p: Q.loss(p, Q.batch).mean())(params)
    d, _ = helpers.jit_update(sj.gsam(rho=0.3, alpha=0.5), grads,
                              sj.gsam().init(params), params,
                              loss_fn=Q.loss, batch=Q.batch)
    g_p = Q.sam_grad(W0, 0.3)
    self.assertAlmostEqual(float((Q.flat(d) - g_p) @ g_p), 0.0, places=5)
    self.assertGreater(np.linalg.norm(Q.flat(d) - g_p), 1e-3)

  def test_rho_and_alpha_schedules_are_evaluated_at_the_count(self):
    rho = lambda c: 0.1 + 0.05 * c
    alpha = lambda c: 0.2 * c
    got, state = Q.run(chain(sj.gsam(rho=rho, alpha=alpha)), 5)
    want = Q.descend(
        lambda t, w: gsam_direction(w, 0.1 + 0.05 * t, 0.2 * t), 5)
    np.testing.assert_allclose(Q.flat(got), want, rtol=1e-5, atol=1e-6)
    self.assertEqual(int(state[0].count), 5)
    # The last step perturbed with rho(4).
    np.testing.assert_allclose(sj.diagnostics(state)["perturbation_norm"],
                               0.3, rtol=1e-6)

  def test_alpha_is_reachable_by_inject_hyperparams(self):
    tx = optax.inject_hyperparams(sj.gsam)(rho=0.3, alpha=0.1)
    params = Q.params()
    grads = jax.grad(lambda p: Q.loss(p, Q.batch).mean())(params)
    state = optax.tree.set(tx.init(params), alpha=jnp.asarray(0.7))
    d, _ = helpers.jit_update(tx, grads, state, params, loss_fn=Q.loss,
                              batch=Q.batch)
    np.testing.assert_allclose(Q.flat(d), gsam_direction(W0, 0.3, 0.7),
                               rtol=1e-5, atol=1e-6)

  def test_rho_schedule_tied_to_the_learning_rate(self):
    lr = optax.linear_schedule(1.6, 1.6e-2, 100)
    rho = sj.gsam_rho_schedule(lr, rho_max=0.04, rho_min=0.02, lr_max=1.6,
                               lr_min=1.6e-2)
    for count in (0, 37, 100):
      lr_t = float(lr(count))
      want = 0.02 + (0.04 - 0.02) * (lr_t - 1.6e-2) / (1.6 - 1.6e-2)
      np.testing.assert_allclose(float(rho(jnp.asarray(count))), want,
                                 rtol=1e-6)
    with self.assertRaisesRegex(ValueError, "lr_max and lr_min"):
      sj.gsam_rho_schedule(lr, rho_max=0.04, rho_min=0.02, lr_max=1.0,
                           lr_min=1.0)

  def test_rho_schedule_is_clipped_during_warmup(self):
    # The warm-up starts at 0, below lr_min: the linear map gives a radius
    # below rho_min, negative at step 0 (-0.006); it is clipped to
    # [rho_min, rho_max].
    lr = optax.warmup_cosine_decay_schedule(0.0, 1.0, warmup_steps=10,
                                            decay_steps=100, end_value=0.2)
    rho = sj.gsam_rho_schedule(lr, rho_max=0.05, rho_min=0.005, lr_max=1.0,
                               lr_min=0.2)
    linear = lambda t: 0.005 + 0.045 * (float(lr(t)) - 0.2) / 0.8
    self.assertAlmostEqual(linear(0), -0.00625)
    values = np.array([float(rho(jnp.asarray(t))) for t in range(101)])
    self.assertEqual(values[0], np.float32(0.005))
    self.assertTrue(np.all(values >= np.float32(0.005)))
    self.assertTrue(np.all(values <= np.float32(0.05)))
    np.testing.assert_allclose(values[10], 0.05, rtol=1e-6)  # the peak
    # Between warm-up and decay it is the official linear map.
    np.testing.assert_allclose(values[50], linear(50), rtol=1e-5)

  def test_rho_schedule_derives_the_learning_rate_range(self):
    lr = optax.warmup_cosine_decay_schedule(0.001, 0.4, warmup_steps=20,
                                            decay_steps=200, end_value=0.004)
    derived = sj.gsam_rho_schedule(lr, rho_max=0.05, rho_min=0.01,
                                   num_steps=200)
    given = sj.gsam_rho_schedule(lr, rho_max=0.05, rho_min=0.01, lr_max=0.4,
                                 lr_min=0.001)
    for t in (0, 5, 20, 77, 200):
      np.testing.assert_allclose(float(derived(jnp.asarray(t))),
                                 float(given(jnp.asarray(t))), rtol=1e-5)
    # One of the two may be given, the other derived.
    half = sj.gsam_rho_schedule(lr, rho_max=0.05, rho_min=0.01, lr_min=0.004,
                                num_steps=200)
    np.testing.assert_allclose(float(half(jnp.asarray(200))), 0.01,
                               rtol=1e-5)
    with self.assertRaisesRegex(ValueError, "num_steps"):
      sj.gsam_rho_schedule(lr, rho_max=0.05, rho_min=0.01)
    with self.assertRaisesRegex(ValueError, "lr_max and lr_min must differ"):
      sj.gsam_rho_schedule(optax.constant_schedule(0.1), rho_max=0.05,
                           rho_min=0.01, num_steps=10)

  def test_validation(self):
    with self.assertRaisesRegex(ValueError, "alpha"):
      sj.gsam(alpha=-0.1)
    with self.assertRaisesRegex(ValueError, "rho"):
      sj.gsam(rho=-1.0)


if __name__ == "__main__":
  absltest.main()
