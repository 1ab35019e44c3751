"""sharpjax.robustness: weight perturbations, the sweep, the plot, the SAT recipe."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sharpjax as sj
from sharpjax import robustness
from tests import helpers


def _batch():
  return helpers.tiny_batch(size=64, seed=3)


def _accuracy_fn(batch):
  def accuracy(params):
    logits = helpers.apply(params, batch["x"])
    return jnp.mean(jnp.argmax(logits, -1) == batch["y"])

  return accuracy


def test_gaussian_perturbations_match_hand_formulas():
  params = helpers.tiny_params()
  key = jax.random.key(5)
  sigma = 0.3
  leaves, _ = jax.tree.flatten(params)
  zs = [np.asarray(jax.random.normal(jax.random.fold_in(key, i), x.shape))
        for i, x in enumerate(leaves)]
  mult = jax.tree.leaves(robustness.perturb_weights(
      params, key, kind="multiplicative", strength=sigma))
  add = jax.tree.leaves(robustness.perturb_weights(
      params, key, kind="additive", strength=sigma))
  for w, z, m, a in zip(leaves, zs, mult, add):
    np.testing.assert_allclose(m, np.asarray(w) * (1 + sigma * z), rtol=1e-6)
    np.testing.assert_allclose(a, np.asarray(w) + sigma * z, rtol=1e-6,
                               atol=1e-7)


def test_quantize_hand_example_and_mask():
  # 3 bits: 2^2 - 1 = 3 levels per sign, step 0.9 / 3 = 0.3.
  w = jnp.array([0.9, -0.3, 0.5, 0.1, -0.74])
  np.testing.assert_allclose(robustness.quantize(w, 3),
                             [0.9, -0.3, 0.6, 0.0, -0.6], atol=1e-6)
  np.testing.assert_array_equal(robustness.quantize(jnp.zeros(3), 4),
                                jnp.zeros(3))
  params = helpers.tiny_params()
  out = robustness.perturb_weights(params, None, kind="quantize", strength=2,
                                   mask=lambda path, x: x.ndim >= 2)
  np.testing.assert_array_equal(out["dense1"]["bias"],
                                params["dense1"]["bias"])
  kernel = np.asarray(out["dense1"]["kernel"])
  assert len(np.unique(np.abs(kernel))) <= 2  # {0, max|w|}


def test_sweep_is_deterministic_for_a_key_and_uses_common_noise():
  params = helpers.tiny_params()
  batch = _batch()
  accuracy = _accuracy_fn(batch)
  strengths = [0.0, 0.5, 1.5]
  run = lambda key: robustness.accuracy_under_perturbation(
      accuracy, params, key, kind="multiplicative", strengths=strengths,
      num_samples=4)
  a, b = run(jax.random.key(0)), run(jax.random.key(0))
  np.testing.assert_array_equal(a.accuracies, b.accuracies)
  c = run(jax.random.key(1))
  assert not np.array_equal(a.accuracies[1:], c.accuracies[1:])
  # Strength 0 is the clean accuracy for every draw.
  np.testing.assert_allclose(a.accuracies[0], a.clean)
  assert a.clean == pytest.approx(float(accuracy(params)))
  # Draw j at strength s is perturb_weights with fold_in(key, j).
  by_hand = jax.jit(lambda k: accuracy(robustness.perturb_weights(
      params, k, kind="multiplicative", strength=1.5)))
  for j in range(4):
    key_j = jax.random.fold_in(jax.random.key(0), j)
    assert a.accuracies[2, j] == pytest.approx(float(by_hand(key_j)))
  np.testing.assert_allclose(a.mean, a.accuracies.mean(1))
  # Strong noise hurts on average.
  assert a.mean[2] < a.clean


def test_quantize_sweep():
  params = helpers.tiny_params()
  accuracy = _accuracy_fn(_batch())
  sweep = robustness.accuracy_under_perturbation(
      accuracy, params, None, kind="quantize", strengths=[16, 2])
  assert sweep.accuracies.shape == (2, 1)
  assert sweep.accuracies[0, 0] == pytest.approx(sweep.clean)
  two_bit = robustness.perturb_weights(params, None, kind="quantize",
                                       strength=2)
  assert sweep.accuracies[1, 0] == pytest.approx(float(accuracy(two_bit)))
  with pytest.raises(ValueError, match="bit widths"):
    robustness.accuracy_under_perturbation(
        accuracy, params, None, kind="quantize", strengths=[1.5])


def test_bad_arguments():
  params = helpers.tiny_params()
  acc = _accuracy_fn(_batch())
  with pytest.raises(ValueError, match="kind"):
    robustness.perturb_weights(params, None, kind="dropout", strength=0.1)
  with pytest.raises(ValueError, match="key"):
    robustness.accuracy_under_perturbation(acc, params, None,
                                           kind="additive")
  with pytest.raises(ValueError, match="strengths"):
    robustness.accuracy_under_perturbation(
        acc, params, jax.random.key(0), strengths=[-0.1])
  with pytest.raises(ValueError, match="rho"):
    robustness.sat(rho=-1.0)


def test_plot_draws_one_line_per_sweep():
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  strengths = np.array([0.0, 0.1, 0.2], np.float32)
  make = lambda m: robustness.PerturbationSweep(
      "multiplicative", strengths, np.tile(m[:, None], (1, 2)), m,
      np.full(3, 0.01), float(m[0]))
  fig = robustness.plot_perturbation_sweeps(
      {"SGD": make(np.array([0.9, 0.7, 0.4])),
       "SAT": make(np.array([0.9, 0.85, 0.7]))}, title="t")
  ax = fig.axes[0]
  assert len(ax.lines) == 2
  np.testing.assert_allclose(ax.lines[1].get_ydata(), [0.9, 0.85, 0.7])
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  plt.close(fig)


def test_sat_first_step_matches_hand_adaptive_sam_and_adam():
  # Loss 0.5 * sum(a * w^2) on one example: g = a * w.
  a = np.array([2.0, 1.0, 0.5], np.float32)
  w = np.array([1.0, -2.0, 0.0], np.float32)
  loss_fn = lambda p, b: 0.5 * jnp.sum(a * p["w"] ** 2) * b["one"]
  batch = {"one": jnp.ones(1)}
  params = {"w": jnp.asarray(w)}
  rho, lr = 0.5, 0.01
  tx = robustness.sat(lr, rho=rho)
  state = tx.init(params)
  grads = {"w": jnp.asarray(a * w)}
  updates, state = tx.update(grads, state, params, loss_fn=loss_fn,
                             batch=batch)
  g = a * w
  eps = rho * w**2 * g / np.linalg.norm(np.abs(w) * g)  # davda54 adaptive
  g_sam = a * (w + eps)
  # Adam's first step: -lr * m_hat / (sqrt(v_hat) + 1e-8) = -lr * sign(g).
  expected = -lr * g_sam / (np.abs(g_sam) + 1e-8)
  np.testing.assert_allclose(updates["w"], expected, rtol=1e-5, atol=1e-9)
  # The zero weight gets no perturbation (|w| = 0) and no update.
  assert float(updates["w"][2]) == 0.0

  plain = robustness.sat(lr, rho=rho, adaptive=False)
  reference = optax.chain(sj.sam(rho), optax.adam(lr))
  u1, _ = plain.update(grads, plain.init(params), params, loss_fn=loss_fn,
                       batch=batch)
  u2, _ = reference.update(grads, reference.init(params), params,
                           loss_fn=loss_fn, batch=batch)
  np.testing.assert_allclose(u1["w"], u2["w"], rtol=1e-6)
