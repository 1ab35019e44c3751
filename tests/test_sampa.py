"""SAMPa against the paper's rule and the official update, in numpy."""

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


def paper_rule(lr_fn, rho, lam, steps):
  """x~ = x + rho g_y/|g_y|, y' = x - lr g_y, x' = x - lr((1-lam) g(x~) +
  lam g(y')), with g_y = g(y) from the previous step (0 at first)."""
  x, g_y = Q.w0.copy(), np.zeros_like(Q.w0)
  y = x.copy()
  for t in range(steps):
    x_tilde = x + rho * g_y / (np.linalg.norm(g_y) + 1e-12)
    y = x - (lr_fn(t) if t else 0.0) * g_y  # y_1 = x_0 (g_y = 0)
    new_g_y = Q.grad(y)
    x = x - lr_fn(t) * ((1 - lam) * Q.grad(x_tilde) + lam * new_g_y)
    g_y = new_g_y
  return x


def official(lr, rho, lam, momentum, weight_decay, steps):
  """LIONS-EPFL/SAMPa train.py with torch's SGD (momentum, weight decay), on
  one full batch (so "the previous minibatch" is the same one)."""
  x = Q.w0.copy()
  y_grads = np.zeros_like(x)
  buf = None
  for _ in range(steps):
    # rank 0: the perturbed point from the stored y gradient.
    x_tilde = x + rho * y_grads / (np.linalg.norm(y_grads) + 1e-12)
    pert = Q.grad(x_tilde)
    # rank 1: y = x - lr (g_y + wd x + mu buf), no momentum term before
    # SGD has a buffer.
    extra = 0.0 if buf is None else weight_decay * x + momentum * buf
    y = x - lr * (y_grads + extra)
    y_grads = Q.grad(y)
    d = (1 - lam) * pert + lam * y_grads
    # torch.optim.SGD.step
    d_p = d + weight_decay * x
    buf = d_p.copy() if buf is None else momentum * buf + d_p
    x = x - lr * buf
  return x


def run_at_points(tx, steps):
  params, batch = Q.params(), Q.batch
  grad = jax.grad(lambda p: Q.loss(p, batch).mean())

  @jax.jit
  def step(params, state):
    x_tilde, y = sj.gradient_points(state, params)
    grads = (grad(x_tilde), grad(y))
    updates, state = tx.update(grads[0], state, params,
                               point_passes=tuple(map(taken, grads)))
    return optax.apply_updates(params, updates), state

  state = tx.init(params)
  for _ in range(steps):
    params, state = step(params, state)
  return params, state


class SAMPaTest(parameterized.TestCase):

  @parameterized.parameters(("constant",), ("cosine",))
  def test_paper_rule(self, schedule):
    rho, lam, steps = 0.2, 0.3, 7
    lr = (optax.constant_schedule(0.1) if schedule == "constant"
          else optax.cosine_decay_schedule(0.1, steps))
    want = paper_rule(lambda t: float(lr(t)), rho, lam, steps)
    tx = optax.chain(sj.sampa(rho=rho, lam=lam, learning_rate=lr),
                     optax.sgd(lr))
    got, _ = run_at_points(tx, steps)
    np.testing.assert_allclose(Q.flat(got), want, rtol=1e-5, atol=1e-6)
    # Without point_passes the update takes both passes itself (batched).
    got, _ = Q.run(tx, steps)
    np.testing.assert_allclose(Q.flat(got), want, rtol=1e-5, atol=1e-6)

  def test_official_update_with_momentum_and_weight_decay(self):
    lr, rho, lam, mu, wd, steps = 0.05, 0.1, 0.2, 0.9, 0.05, 8
    want = official(lr, rho, lam, mu, wd, steps)
    tx = optax.chain(
        sj.sampa(rho=rho, lam=lam, learning_rate=lr, momentum=mu,
                 weight_decay=wd),
        optax.add_decayed_weights(wd), optax.sgd(lr, momentum=mu))
    got, _ = run_at_points(tx, steps)
    np.testing.assert_allclose(Q.flat(got), want, rtol=1e-5, atol=1e-6)

  def test_lam_zero_and_one(self):
    # lam = 1 descends on the gradient at y only; y_{t+1} = x_t - lr g(y_t)
    # is then extra-gradient's look-ahead, with rho playing no part.
    a, _ = run_at_points(optax.chain(
        sj.sampa(rho=0.5, lam=1.0, learning_rate=0.1), optax.sgd(0.1)), 4)
    b, _ = run_at_points(optax.chain(
        sj.sampa(rho=0.0, lam=1.0, learning_rate=0.1), optax.sgd(0.1)), 4)
    np.testing.assert_allclose(Q.flat(a), Q.flat(b), rtol=1e-6)
    want = paper_rule(lambda t: 0.1, 0.5, 0.0, 4)
    got, _ = run_at_points(optax.chain(
        sj.sampa(rho=0.5, lam=0.0, learning_rate=0.1), optax.sgd(0.1)), 4)
    np.testing.assert_allclose(Q.flat(got), want, rtol=1e-5, atol=1e-6)

  def test_injected_rho_sets_the_next_points(self):
    tx = optax.inject_hyperparams(sj.sampa)(rho=0.1, lam=0.2,
                                            learning_rate=0.1)
    params = Q.params()
    g = jax.grad(lambda p: Q.loss(p, Q.batch).mean())(params)
    state = tx.init(params)
    for _ in range(2):
      _, state = tx.update(g, state, params,
                           point_passes=(taken(g), taken(g)))
    state = optax.tree.set(state, rho=jnp.asarray(0.0))
    _, state = tx.update(g, state, params, point_passes=(taken(g), taken(g)))
    self.assertAlmostEqual(
        float(sj.diagnostics(state)["perturbation_norm"]), 0.1, places=6)
    x_tilde, _ = sj.gradient_points(state, params)
    np.testing.assert_array_equal(Q.flat(x_tilde), Q.flat(params))

  def test_refuses_bad_arguments(self):
    with self.assertRaisesRegex(ValueError, r"lam must be in \[0.0, 1.0\]"):
      sj.sampa(lam=1.5, learning_rate=0.1)
    with self.assertRaisesRegex(ValueError, "learning_rate"):
      sj.sampa(learning_rate=-1.0)
    with self.assertRaisesRegex(TypeError, "learning_rate"):
      sj.sampa(rho=0.1)  # pylint: disable=missing-kwoa
    params = Q.params()
    g = jax.grad(lambda p: Q.loss(p, Q.batch).mean())(params)
    injected = optax.inject_hyperparams(sj.sampa)(learning_rate=0.1,
                                                  momentum=0.9)
    with self.assertRaisesRegex(ValueError, "static_args=\\('momentum',\\)"):
      helpers.jit_update(injected, g, injected.init(params), params,
                         point_passes=(taken(g), taken(g)))
    # It mixes its first argument with the second pass as taken: nothing
    # that changes the gradient may precede it.
    with self.assertRaisesRegex(ValueError, "not first in the chain"):
      sj.check_chain(optax.chain(optax.clip_by_global_norm(1.0),
                                 sj.sampa(learning_rate=0.1), optax.sgd(0.1)))
    tx = sj.sampa(learning_rate=0.1)
    with self.assertRaisesRegex(ValueError,
                                "point_passes must be a tuple of 2"):
      tx.update(g, tx.init(params), params, point_passes=(taken(g),))


if __name__ == "__main__":
  absltest.main()
