"""LSQ fake quantization: the grid, the STE mask, the step-size gradient."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sharpjax import quant


@pytest.mark.parametrize(
    "bits,signed,grid",
    [(4, True, (-8, 7)), (4, False, (0, 15)), (3, True, (-4, 3)),
     (3, False, (0, 7))],
)
def test_grid(bits, signed, grid):
  qn, qp = quant.quant_range(bits, signed)
  assert (-qn, qp) == grid
  v = jnp.asarray(np.random.default_rng(0).normal(scale=3.0, size=500),
                  jnp.float32)
  s = jnp.float32(0.37)
  q = np.asarray(quant.lsq_quantize(v, s, qn, qp)) / 0.37
  np.testing.assert_allclose(q, np.round(q), atol=1e-4)
  levels = set(np.round(q).astype(int).tolist())
  assert min(levels) == grid[0] and max(levels) == grid[1]
  assert levels <= set(range(grid[0], grid[1] + 1))


def test_symmetric_flag_and_bad_bits():
  assert quant.quant_range(4, True, symmetric=True) == (7, 7)
  with pytest.raises(ValueError, match="bits"):
    quant.quant_range(1, True)


def test_ste_mask():
  qn, qp = 8, 7
  s = 0.5
  v = jnp.asarray(np.linspace(-6.0, 6.0, 97), jnp.float32)
  grad = jax.grad(lambda x: jnp.sum(quant.lsq_quantize(x, jnp.float32(s),
                                                       qn, qp)))(v)
  x = np.asarray(v) / s
  mask = ((x > -qn) & (x < qp)).astype(np.float32)
  assert set(np.unique(np.asarray(grad)).tolist()) <= {0.0, 1.0}
  np.testing.assert_array_equal(np.asarray(grad), mask)
  assert 0 < mask.sum() < mask.size  # both regions are exercised


def test_step_gradient_identity():
  qn, qp = 8, 7
  s = jnp.float32(0.3)
  v = jnp.asarray(np.random.default_rng(1).normal(scale=2.0, size=50),
                  jnp.float32)
  gamma = 0.25
  # Per element: d vhat_i / ds.
  jac = jax.jacrev(lambda s_: quant.lsq_quantize(v, s_, qn, qp, gamma))(s)
  x = np.asarray(v) / 0.3
  xr = np.round(x)
  expected = np.where(x <= -qn, -qn, np.where(x >= qp, qp, xr - x)) * gamma
  np.testing.assert_allclose(np.asarray(jac), expected, rtol=1e-4, atol=1e-5)
  vhat = np.asarray(quant.lsq_quantize(v, s, qn, qp))
  inside = (x > -qn) & (x < qp)
  np.testing.assert_allclose(
      np.asarray(jac)[inside] / gamma, (vhat - np.asarray(v))[inside] / 0.3,
      rtol=1e-4, atol=1e-5)
  assert np.all(np.abs(np.asarray(jac)[inside] / gamma) <= 0.5 + 1e-6)


def test_step_gradient_on_grid_and_saturated():
  qn, qp = 8, 7
  s = jnp.float32(0.5)
  on_grid = jnp.asarray([-3.0, -1.5, 0.0, 1.0, 2.5], jnp.float32)
  g = jax.grad(lambda s_: jnp.sum(quant.lsq_quantize(on_grid, s_, qn, qp)))(s)
  assert float(g) == 0.0
  gamma = quant.lsq_grad_scale(qp, 1)
  sat = jnp.asarray([10.0 * 0.5 * qp], jnp.float32)
  g = jax.grad(lambda s_: jnp.sum(quant.lsq_quantize(sat, s_, qn, qp, gamma)))(s)
  np.testing.assert_allclose(float(g), gamma * qp, rtol=1e-6)


def test_grad_scale_leaves_forward_unchanged():
  qn, qp = 8, 7
  v = jnp.asarray(np.random.default_rng(2).normal(size=64), jnp.float32)
  s = jnp.float32(0.4)
  gamma = 1.0 / math.sqrt(64 * qp)
  a = quant.lsq_quantize(v, s, qn, qp, 1.0)
  b = quant.lsq_quantize(v, s, qn, qp, gamma)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  ga = jax.grad(lambda s_: jnp.sum(quant.lsq_quantize(v, s_, qn, qp, 1.0)))(s)
  gb = jax.grad(lambda s_: jnp.sum(quant.lsq_quantize(v, s_, qn, qp, gamma)))(s)
  np.testing.assert_allclose(float(gb), gamma * float(ga), rtol=1e-5)


def test_init():
  v = jnp.asarray([1.0, -1.0, 1.0, -1.0])
  _, qp = quant.quant_range(4, True)
  np.testing.assert_allclose(float(quant.lsq_init_step(v, qp)),
                             2.0 / math.sqrt(7.0), rtol=1e-6)
  np.testing.assert_allclose(2.0 / math.sqrt(7.0), 0.7559, atol=1e-4)
  k = jnp.asarray([[1.0, 2.0], [-3.0, 0.0]])  # per output channel (last axis)
  np.testing.assert_allclose(quant.lsq_init_step(k, 7, (0,)),
                             [2 * 2.0 / math.sqrt(7), 2 * 1.0 / math.sqrt(7)],
                             rtol=1e-6)


def test_quant_dense_matches_manual():
  x = jax.random.uniform(jax.random.key(0), (6, 5))
  layer = quant.QuantDense(3, w_bits=4, a_bits=3)
  variables = jax.jit(layer.init)(jax.random.key(1), x)
  p = variables["params"]
  assert p["w_step"].shape == (3,) and p["a_step"].shape == ()
  np.testing.assert_allclose(
      p["w_step"], 2 * np.abs(np.asarray(p["kernel"])).mean(0) / math.sqrt(7),
      rtol=1e-5)
  np.testing.assert_allclose(
      p["a_step"], 2 * np.abs(np.asarray(x)).mean() / math.sqrt(7), rtol=1e-5)
  y = jax.jit(layer.apply)(variables, x)
  xq = np.clip(np.round(np.asarray(x) / p["a_step"]), 0, 7) * p["a_step"]
  kq = np.clip(np.round(np.asarray(p["kernel"]) / p["w_step"]), -8, 7) * p["w_step"]
  np.testing.assert_allclose(y, xq @ kq + np.asarray(p["bias"]), rtol=1e-5,
                             atol=1e-5)
  # Full precision on both sides is a plain Dense.
  fp = quant.QuantDense(3, w_bits=None, a_bits=None)
  v = fp.init(jax.random.key(1), x)
  assert sorted(v["params"]) == ["bias", "kernel"]
  np.testing.assert_allclose(fp.apply(v, x),
                             np.asarray(x) @ v["params"]["kernel"], atol=1e-6)


def test_quant_conv_matches_manual():
  x = jax.random.normal(jax.random.key(3), (2, 9, 2))
  conv = quant.QuantConv(4, (3,), strides=(2,), padding=((1, 1),), w_bits=3,
                         a_bits=4, a_signed=True)
  v = jax.jit(conv.init)(jax.random.key(4), x)
  p = v["params"]
  xq = np.clip(np.round(np.asarray(x) / p["a_step"]), -8, 7) * p["a_step"]
  kq = np.clip(np.round(np.asarray(p["kernel"]) / p["w_step"]), -4, 3) * p["w_step"]
  xp = np.pad(xq, ((0, 0), (1, 1), (0, 0)))
  out = np.stack([
      np.einsum("bki,kio->bo", xp[:, t:t + 3], kq) for t in range(0, 9, 2)
  ], axis=1) + np.asarray(p["bias"])
  np.testing.assert_allclose(jax.jit(conv.apply)(v, x), out, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="rank"):
    conv.apply(v, jnp.ones((2, 9)))


def test_models_keep_first_weights_and_classifier_full_precision():
  x = jax.random.normal(jax.random.key(0), (4, 40))
  # Structure only: eval_shape traces without running.
  init = lambda m, x: jax.eval_shape(m.init, jax.random.key(1), x)
  p = init(quant.QuantCNN1D(w_bits=3, a_bits=3), x)["params"]
  assert "w_step" not in p["QuantConv_0"] and "a_step" in p["QuantConv_0"]
  assert "w_step" in p["QuantConv_1"] and "a_step" in p["QuantConv_2"]
  assert sorted(p["QuantDense_0"]) == ["bias", "kernel"]
  v = init(quant.QuantCNN1D(w_bits=None, a_bits=None), x)
  assert not quant.step_leaf_names(v["params"])
  m = quant.QuantMLP(hidden=(8, 8), num_classes=3, fp_first=False,
                     fp_last=False)
  p = init(m, jnp.ones((2, 5)))["params"]
  assert all("w_step" in p[f"QuantDense_{i}"] for i in range(3))


def test_calibrate_resets_steps_from_current_weights():
  x = jax.random.normal(jax.random.key(0), (16, 5))
  model = quant.QuantMLP(hidden=(8,), num_classes=3, fp_first=False)
  v = jax.jit(model.init)(jax.random.key(1), jnp.zeros((16, 5)))
  # Initialised on zeros: the first input step falls back to 1.
  assert float(v["params"]["QuantDense_0"]["a_step"]) == 1.0
  v = jax.tree.map(lambda a: a, v)
  v["params"]["QuantDense_0"]["kernel"] = 3.0 * v["params"]["QuantDense_0"]["kernel"]
  c = quant.calibrate(model, v, x)
  k = np.asarray(c["params"]["QuantDense_0"]["kernel"])
  np.testing.assert_allclose(c["params"]["QuantDense_0"]["w_step"],
                             2 * np.abs(k).mean(0) / math.sqrt(7), rtol=1e-5)
  np.testing.assert_allclose(c["params"]["QuantDense_0"]["a_step"],
                             2 * np.abs(np.asarray(x)).mean() / math.sqrt(7),
                             rtol=1e-5)
  assert jax.tree.structure(c) == jax.tree.structure(v)
