"""The Rényi-sharpness regularizer: hand references and the measures module."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sharpjax as sj
import sharpjax.measures as sm
from tests import helpers

C = jnp.array([3.0, 1.0, 0.5])


def quartic_loss(w, batch):
  """Per-example f(w) = s * sum_i c_i w_i^4 / 12, so H = s * diag(c_i w_i^2).

  A diagonal Hessian makes every Rademacher probe exact: z^T H z = tr H and
  ||Hz||^2 = tr H^2, so the estimate equals the closed form for any key.
  """
  return batch["s"] * jnp.sum(C * w**4) / 12.0


def closed_form_r2(w):
  lam = C * w**2
  return jnp.log(jnp.sum(lam**2) / jnp.sum(lam) ** 2)


BATCH = {"s": jnp.array([1.0, 2.0, 3.0])}


def test_penalty_matches_closed_form_value_and_gradient():
  w = jnp.array([1.0, -0.7, 2.0])
  key = jax.random.key(3)
  value, grad = jax.value_and_grad(
      lambda p: sj.renyi_sharpness_penalty(quartic_loss, p, BATCH, key,
                                           num_probes=2)
  )(w)
  expected_value, expected_grad = jax.value_and_grad(closed_form_r2)(w)
  # Hand numbers: lambda = (3, 0.49, 2), tr = 5.49, tr H^2 = 13.2401.
  np.testing.assert_allclose(value, np.log(13.2401 / 5.49**2), rtol=1e-5)
  np.testing.assert_allclose(value, expected_value, rtol=1e-5)
  np.testing.assert_allclose(grad, expected_grad, rtol=1e-4, atol=1e-6)


def test_penalty_matches_measures_renyi_estimate():
  params = helpers.tiny_params()
  batch = helpers.tiny_batch(size=16)
  key = jax.random.key(7)
  penalty = sj.renyi_sharpness_penalty(helpers.loss_fn, params, batch, key,
                                       num_probes=4)
  estimate = sm.hessian_trace(helpers.loss_fn, params, batch, key,
                              num_probes=4)
  measured = sm.renyi_sharpness(estimate, alpha=2.0)
  np.testing.assert_allclose(penalty, measured, rtol=1e-4)
  assert np.isfinite(float(penalty))
  # A different key gives a different estimate (the probes matter).
  other = sj.renyi_sharpness_penalty(helpers.loss_fn, params, batch,
                                     jax.random.key(8), num_probes=4)
  assert float(other) != float(penalty)


def test_gradient_descent_on_penalty_flattens_the_spectrum():
  # Minimising R_2 equalises c_i w_i^2, the flat spectrum (R_2 = -log 3).
  key = jax.random.key(0)
  penalty = lambda p: sj.renyi_sharpness_penalty(quartic_loss, p, BATCH, key,
                                                 num_probes=1)
  w = jnp.array([1.0, 1.0, 1.0])
  start = float(penalty(w))
  descend = jax.jit(lambda w: w - 0.2 * jax.grad(penalty)(w))
  for _ in range(200):
    w = descend(w)
  end = float(penalty(w))
  assert end < start - 0.1
  assert end == pytest.approx(-np.log(3.0), abs=0.02)


def test_regularizer_refreshes_every_k_steps_and_adds_gradient():
  gamma, every, seed = 0.5, 3, 11
  tx = sj.renyi_regularizer(gamma, every=every, num_probes=2, seed=seed)
  params = helpers.tiny_params()
  state = tx.init(params)
  zeros = jax.tree.map(jnp.zeros_like, params)
  update = jax.jit(
      lambda g, s, p, b: tx.update(g, s, p, loss_fn=helpers.loss_fn, batch=b)
  )
  base_key = jax.random.key(seed)
  values = []
  for t in range(5):
    batch = helpers.tiny_batch(size=16, seed=100 + t)
    p = jax.tree.map(lambda x: x * (1.0 + 0.1 * t), params)  # moving params
    updates, state = update(zeros, state, p, batch)
    values.append(float(state.value))
    if t % every == 0:
      # Fresh: the penalty and its gradient at this step's params and batch,
      # probes from fold_in(key(seed), t).
      key = jax.random.fold_in(base_key, t)
      fn = lambda q: sj.renyi_sharpness_penalty(helpers.loss_fn, q, batch,
                                                key, num_probes=2)
      value, grad = jax.value_and_grad(fn)(p)
      np.testing.assert_allclose(state.value, value, rtol=1e-5)
      chex_close(updates, jax.tree.map(lambda x: gamma * x, grad))
      fresh = updates
    else:
      # Reused: the same update as the last refresh.
      chex_close(updates, fresh)
  assert values[1] == values[0] and values[2] == values[0]
  assert values[3] != values[0] and values[4] == values[3]
  assert int(state.count) == 5


def chex_close(a, b):
  # The penalty's gradient is a third derivative of the loss, in float32: the
  # jitted and the reference computation differ by ~1e-7 in absolute terms
  # on entries of ~1e-3.
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)


def test_regularizer_in_a_chain_trains():
  tx = optax.chain(sj.renyi_regularizer(0.01, every=2), optax.sgd(0.3))
  params = helpers.tiny_params()
  state = tx.init(params)
  batch = helpers.tiny_batch(size=32)
  loss0 = float(jnp.mean(helpers.loss_fn(params, batch)))
  step = jax.jit(lambda p, s: helpers.train_step(tx, p, s, batch))
  for _ in range(10):
    params, state = step(params, state)
  assert float(jnp.mean(helpers.loss_fn(params, batch))) < loss0
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(params))


@pytest.mark.parametrize(
    "kwargs, name",
    [({"strength": -1.0}, "strength"), ({"every": 0}, "every"),
     ({"num_probes": 0}, "num_probes")],
)
def test_bad_hyperparameters(kwargs, name):
  with pytest.raises(ValueError, match=name):
    sj.renyi_regularizer(**kwargs)


def test_missing_extra_args_is_a_clear_error():
  tx = sj.renyi_regularizer()
  params = helpers.tiny_params()
  with pytest.raises(TypeError, match="loss_fn"):
    tx.update(params, tx.init(params), params)
