"""Momentum-SAM against the official update, written in numpy on a quadratic.

The references transcribe MarlonBecker/MSAM's ``optimizer/msam.py`` (SGD) and
``optimizer/adamW_msam.py`` (AdamW) step by step, in the official form that
keeps the stored weights at the perturbed point and moves back at the end.
"""

from __future__ import annotations

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np
import optax
import sharpjax as sj

from tests import helpers

Q = helpers.QUADRATIC_4
taken = helpers.taken


def official_sgd_msam(grad_fn, w0, *, lr, momentum, weight_decay, rho, steps):
  """msam.py's step: returns (weights moved back, stored perturbed weights)."""
  p = np.array(w0, np.float64)
  buf = np.zeros_like(p)
  inverse_norm = 0.0
  for _ in range(steps):
    d_p = grad_fn(p) + weight_decay * p  # at the stored (perturbed) weights
    p = p + rho * inverse_norm * buf  # back to the unperturbed weights
    buf = momentum * buf + d_p
    p = p - lr * buf
    inverse_norm = 1.0 / (np.linalg.norm(buf) + 1e-12)
    p = p - rho * inverse_norm * buf  # up to the next point
  return p + rho * inverse_norm * buf, p


def official_adamw_msam(grad_fn, w0, *, lr, b1, b2, eps, weight_decay, rho,
                        steps):
  """adamW_msam.py's step: returns the weights moved back."""
  p = np.array(w0, np.float64)
  m, v = np.zeros_like(p), np.zeros_like(p)
  norm_factor = 0.0
  for step in range(1, steps + 1):
    g = grad_fn(p)
    p = p + m * norm_factor
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    denom = np.sqrt(v) / np.sqrt(1 - b2**step) + eps
    p = p - lr / (1 - b1**step) * m / denom
    p = p * (1 - lr * weight_decay)
    norm_factor = rho / (np.linalg.norm(m) + 1e-12)
    p = p - m * norm_factor
  return p + m * norm_factor


def l2_loss(weight_decay):
  """The quadratic plus (wd/2)|w|^2, so its gradient holds the decay term."""
  def loss(params, batch):
    w = jnp.concatenate([jnp.ravel(params["kernel"]), params["bias"]])
    return Q.loss(params, batch) + 0.5 * weight_decay * jnp.sum(w * w)
  return loss


def run_at_points(tx, steps, loss_fn=Q.loss):
  """Own loop: the one gradient of a step at the state's point."""
  params, batch = Q.params(), Q.batch

  @jax.jit
  def step(params, state):
    (point,) = sj.gradient_points(state, params)
    g = jax.grad(lambda p: loss_fn(p, batch).mean())(point)
    updates, state = tx.update(g, state, params, point_passes=(taken(g),))
    return optax.apply_updates(params, updates), state, point

  state = tx.init(params)
  for _ in range(steps):
    params, state, point = step(params, state)
  return params, state, point


class MomentumSAMTest(parameterized.TestCase):

  @parameterized.parameters(0.0, 0.05)
  def test_sgd_equals_the_official_step(self, weight_decay):
    lr, mu, rho, steps = 0.1, 0.9, 0.3, 8
    want, _ = official_sgd_msam(
        lambda w: Q.grad(w), Q.w0, lr=lr, momentum=mu,
        weight_decay=weight_decay, rho=rho, steps=steps)
    tx = optax.chain(sj.momentum_sam(rho=rho, momentum=mu),
                     optax.sgd(lr, momentum=mu))
    got, state, _ = run_at_points(tx, steps, l2_loss(weight_decay))
    np.testing.assert_allclose(Q.flat(got), want, rtol=1e-5, atol=1e-6)
    # The next point is the official stored (perturbed) weights after
    # `steps` steps: one more official step's input.
    _, stored = official_sgd_msam(
        lambda w: Q.grad(w), Q.w0, lr=lr, momentum=mu,
        weight_decay=weight_decay, rho=rho, steps=steps)
    (point,) = sj.gradient_points(state, got)
    np.testing.assert_allclose(Q.flat(point), stored, rtol=1e-5, atol=1e-6)

  def test_own_passes_equal_the_given_gradients(self):
    tx = optax.chain(sj.momentum_sam(rho=0.3), optax.sgd(0.1, momentum=0.9))
    want, _, _ = run_at_points(tx, 5)
    got, _ = Q.run(tx, 5)  # update takes its pass from loss_fn and batch
    np.testing.assert_allclose(Q.flat(got), Q.flat(want), rtol=1e-6,
                               atol=1e-7)

  def test_multisteps_accumulates_gradients_at_the_same_point(self):
    # Two micro-batches (halves of the examples) per update: the same steps
    # as the whole batch, since the point moves only with the inner update.
    tx = optax.chain(sj.momentum_sam(rho=0.3), optax.sgd(0.1, momentum=0.9))
    want, _, _ = run_at_points(tx, 3)
    multi = optax.MultiSteps(tx, every_k_schedule=2)
    params, state = Q.params(), multi.init(Q.params())
    halves = [{"c": Q.batch["c"][:2]}, {"c": Q.batch["c"][2:]}]

    @jax.jit
    def micro(params, state, batch):
      (point,) = sj.gradient_points(state, params)
      g = jax.grad(lambda p: Q.loss(p, batch).mean())(point)
      updates, state = multi.update(g, state, params,
                                    point_passes=(taken(g),))
      return optax.apply_updates(params, updates), state

    for _ in range(3):
      for half in halves:
        params, state = micro(params, state, half)
    np.testing.assert_allclose(Q.flat(params), Q.flat(want), rtol=1e-5,
                               atol=1e-6)

  def test_adamw_variant(self):
    lr, b1, b2, eps, rho, steps = 0.05, 0.9, 0.999, 1e-8, 1.0, 8
    want = official_adamw_msam(lambda w: Q.grad(w), Q.w0, lr=lr, b1=b1, b2=b2,
                               eps=eps, weight_decay=0.0, rho=rho, steps=steps)
    tx = optax.chain(sj.momentum_sam(rho=rho, momentum=b1),
                     optax.adamw(lr, b1=b1, b2=b2, eps=eps, weight_decay=0.0))
    got, _, _ = run_at_points(tx, steps)
    np.testing.assert_allclose(Q.flat(got), want, rtol=1e-5, atol=1e-6)
    # With weight decay optax decays before Adam's step and the official
    # code after: the runs differ by O(lr^2 wd) per step, no more.
    wd = 0.1
    want = official_adamw_msam(lambda w: Q.grad(w), Q.w0, lr=lr, b1=b1, b2=b2,
                               eps=eps, weight_decay=wd, rho=rho, steps=steps)
    tx = optax.chain(sj.momentum_sam(rho=rho, momentum=b1),
                     optax.adamw(lr, b1=b1, b2=b2, eps=eps, weight_decay=wd))
    got, _, _ = run_at_points(tx, steps)
    gap = np.abs(Q.flat(got) - want).max()
    self.assertLess(gap, 2 * steps * lr**2 * wd)

  def test_first_point_is_the_parameters_and_radius_is_rho(self):
    tx = sj.momentum_sam(rho=0.3)
    params = Q.params()
    state = tx.init(params)
    (point,) = sj.gradient_points(state, params)
    np.testing.assert_array_equal(Q.flat(point), Q.flat(params))
    g = jax.grad(lambda p: Q.loss(p, Q.batch).mean())(params)
    _, state = tx.update(g, state, params, point_passes=(taken(g),))
    (point,) = sj.gradient_points(state, params)
    # v_1 = g_0: the point is w - 0.3 g_0 / |g_0|.
    np.testing.assert_allclose(
        Q.flat(point), Q.flat(params) - 0.3 * helpers.unit(Q.grad(Q.w0)),
        rtol=1e-6)
    _, state = tx.update(g, state, params, point_passes=(taken(g),))
    self.assertAlmostEqual(
        float(sj.diagnostics(state)["perturbation_norm"]), 0.3, places=6)

  def test_injected_rho_sets_the_next_point(self):
    tx = optax.inject_hyperparams(sj.momentum_sam)(rho=0.3)
    params = Q.params()
    g = jax.grad(lambda p: Q.loss(p, Q.batch).mean())(params)
    state = tx.init(params)
    for _ in range(2):
      _, state = tx.update(g, state, params, point_passes=(taken(g),))
    state = optax.tree.set(state, rho=jnp.asarray(0.0))
    _, state = tx.update(g, state, params, point_passes=(taken(g),))
    # This step's point was set with 0.3; the next one with 0.
    self.assertAlmostEqual(
        float(sj.diagnostics(state)["perturbation_norm"]), 0.3, places=6)
    (point,) = sj.gradient_points(state, params)
    np.testing.assert_array_equal(Q.flat(point), Q.flat(params))

  def test_refuses_bad_arguments(self):
    with self.assertRaisesRegex(ValueError, "rho"):
      sj.momentum_sam(rho=-0.1)
    with self.assertRaisesRegex(ValueError,
                                r"momentum must be in \[0.0, 1.0\)"):
      sj.momentum_sam(momentum=1.0)
    tx = sj.momentum_sam()
    params = Q.params()
    g = jax.grad(lambda p: Q.loss(p, Q.batch).mean())(params)
    with self.assertRaisesRegex(ValueError,
                                "point_passes must be a tuple of 1"):
      tx.update(g, tx.init(params), params, point_passes=(taken(g), taken(g)))
    with self.assertRaisesRegex(TypeError, "loss_fn"):
      tx.update(g, tx.init(params), params)


if __name__ == "__main__":
  absltest.main()
