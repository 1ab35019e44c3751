"""sharpjax.tta: SAR's filtering, SAM step, EMA and reset; Tent; the norm mask."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sharpjax import models
from sharpjax import tta

C = 3


# ---------------------------------------------------------------------------
# A tiny model with one "normalization" layer: logits = (x * s + b) @ K.
# ---------------------------------------------------------------------------


def toy_params():
  return {
      "LayerNorm_0": {"scale": jnp.array([1.0, 0.8, 1.2]),
                      "bias": jnp.array([0.1, -0.2, 0.0])},
      "Dense_0": {"kernel": jnp.array([[1.5, -0.5, 0.2],
                                       [0.3, 1.0, -0.4],
                                       [-0.2, 0.6, 1.1]])},
  }


def toy_apply(params, x):
  n = params["LayerNorm_0"]
  return (x * n["scale"] + n["bias"]) @ params["Dense_0"]["kernel"]


def toy_batches():
  rng = np.random.default_rng(0)
  return [jnp.asarray(rng.normal(scale=2.0, size=(6, C)), jnp.float32)
          for _ in range(4)]


def entropy_np(logits):
  z = logits - logits.max(-1, keepdims=True)
  p = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
  return -(p * np.log(p)).sum(-1)


def reference_sar(params, batches, *, margin, rho, lr, momentum, decay,
                  threshold):
  """SAR written the official way: boolean indexing, empty means are NaN.

  Only LayerNorm_0 is adapted. Gradients of subset means come from jax.grad
  on the *selected rows*; everything else is numpy.
  """
  adapted = ("scale", "bias")
  source = {k: np.asarray(v) for k, v in params["LayerNorm_0"].items()}
  theta = dict(source)
  kernel = params["Dense_0"]["kernel"]
  buf = {k: np.zeros_like(v) for k, v in theta.items()}
  ema = None
  log = []

  def logits_of(th, x):
    return np.asarray(toy_apply({"LayerNorm_0": th, "Dense_0": {"kernel": kernel}}, x))

  def grad_of_mean_entropy(th, x):
    def f(t):
      logits = toy_apply({"LayerNorm_0": t, "Dense_0": {"kernel": kernel}}, x)
      logp = jax.nn.log_softmax(logits, -1)
      return jnp.mean(-jnp.sum(jnp.exp(logp) * logp, -1))
    g = jax.grad(f)({k: jnp.asarray(v) for k, v in th.items()})
    return {k: np.asarray(v, np.float64) for k, v in g.items()}

  for x in batches:
    x = np.asarray(x)
    ent = entropy_np(logits_of(theta, x))
    s1 = np.where(ent < margin)[0]
    if len(s1):
      g = grad_of_mean_entropy(theta, x[s1])
    else:
      g = {k: np.zeros_like(v) for k, v in theta.items()}
    norm = math.sqrt(sum(float((v**2).sum()) for v in g.values()))
    eps = {k: (rho * v / norm if norm > 0 else 0 * v) for k, v in g.items()}
    perturbed = {k: theta[k] + eps[k] for k in adapted}
    ent2 = entropy_np(logits_of(perturbed, x[s1])) if len(s1) else np.zeros(0)
    s2 = s1[ent2 < margin]
    loss2 = float(ent2[ent2 < margin].mean()) if len(s2) else float("nan")
    if len(s2):
      g2 = grad_of_mean_entropy(perturbed, x[s2])
    else:
      g2 = {k: np.zeros_like(v) for k, v in theta.items()}
    for k in adapted:  # torch SGD(momentum), dampening 0
      buf[k] = g2[k] + momentum * buf[k]
      theta[k] = theta[k] - lr * buf[k]
    if not math.isnan(loss2):
      ema = loss2 if ema is None else decay * ema + (1 - decay) * loss2
    ema_after_update = ema
    reset = ema is not None and ema < threshold
    if reset:
      theta = dict(source)
      buf = {k: np.zeros_like(v) for k, v in theta.items()}
      ema = None
    log.append(dict(ent=ent, s1=s1, s2=s2, loss2=loss2,
                    ema=ema_after_update, reset=reset,
                    theta={k: v.copy() for k, v in theta.items()}))
  return log


def run_sar(batches, **kwargs):
  adapter = tta.sar(toy_apply, **kwargs)
  state = adapter.init(toy_params())
  out = []
  for x in batches:
    state, info = adapter.step(state, x)
    out.append((state, info))
  return out


def _margin_between(batches):
  """A margin that splits the first batch's clean entropies."""
  ent = np.sort(entropy_np(np.asarray(toy_apply(toy_params(), batches[0]))))
  return float(0.5 * (ent[2] + ent[3])), ent


def test_entropy_and_filtered_mean_by_hand():
  logits = jnp.array([[0.0, 0.0], [math.log(3.0), 0.0]])
  p = 0.75
  np.testing.assert_allclose(
      tta.softmax_entropy(logits),
      [math.log(2.0), -(p * math.log(p) + (1 - p) * math.log(1 - p))],
      rtol=1e-6)
  v = jnp.array([1.0, 2.0, 4.0])
  assert float(tta.filtered_mean(v, jnp.array([True, False, True]))) == 2.5
  assert float(tta.filtered_mean(v, jnp.zeros(3, bool))) == 0.0
  g = jax.grad(lambda v: tta.filtered_mean(v, jnp.zeros(3, bool)))(v)
  np.testing.assert_array_equal(g, 0.0)


def test_sar_filtering_sam_step_and_ema_match_reference():
  batches = toy_batches()
  margin, _ = _margin_between(batches)
  cfg = dict(margin=margin, rho=0.5, lr=0.05, momentum=0.9, decay=0.9,
             threshold=0.0)
  ref = reference_sar(toy_params(), batches, **cfg)
  # The hand example exercises both filters: some samples are dropped by
  # S1, and the SAM perturbation pushes some of S1 over the margin.
  assert 0 < len(ref[0]["s1"]) < 6
  assert any(0 < len(r["s2"]) < len(r["s1"]) for r in ref)
  got = run_sar(batches, margin=margin, rho=0.5, learning_rate=0.05,
                momentum=0.9, ema_decay=0.9, reset_threshold=0.0)
  for r, (state, info) in zip(ref, got):
    assert int(info.num_reliable) == len(r["s1"])
    np.testing.assert_allclose(info.entropy, r["ent"], rtol=1e-5)
    np.testing.assert_allclose(info.perturbed_loss, r["loss2"], rtol=1e-5)
    np.testing.assert_allclose(info.ema, r["ema"], rtol=1e-5)
    assert not bool(info.reset)
    for k in ("scale", "bias"):
      np.testing.assert_allclose(state.params["LayerNorm_0"][k],
                                 r["theta"][k], rtol=1e-5, atol=1e-6)
    # The frozen kernel never moves.
    np.testing.assert_array_equal(state.params["Dense_0"]["kernel"],
                                  toy_params()["Dense_0"]["kernel"])


def test_sar_empty_reliable_set_skips_the_ema():
  batches = toy_batches()
  _, ent = _margin_between(batches)
  margin = float(ent[0]) * 0.5  # below every entropy of the first batch
  got = run_sar(batches[:1], margin=margin, learning_rate=0.05,
                reset_threshold=10.0)
  state, info = got[0]
  assert int(info.num_reliable) == 0
  assert math.isnan(float(info.loss)) and math.isnan(float(info.perturbed_loss))
  assert math.isnan(float(state.ema)) and not bool(info.reset)
  for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(toy_params())):
    np.testing.assert_array_equal(a, b)  # zero gradient, zero momentum
    assert np.all(np.isfinite(np.asarray(a)))


def test_sar_reset_restores_source_model_and_optimizer():
  batches = toy_batches()
  margin, _ = _margin_between(batches)
  cfg = dict(margin=margin, rho=0.5, lr=0.05, momentum=0.9, decay=0.9)
  # Pick a threshold that the EMA first crosses at some step k >= 1, so
  # that the first k steps do not reset and step k does.
  free = reference_sar(toy_params(), batches, threshold=0.0, **cfg)
  emas = [r["ema"] for r in free]
  k = next(i for i in range(1, len(emas)) if emas[i] < min(emas[:i]))
  threshold = 0.5 * (min(emas[:k]) + emas[k])
  ref = reference_sar(toy_params(), batches, threshold=threshold, **cfg)
  assert [r["reset"] for r in ref][: k + 1] == [False] * k + [True]
  got = run_sar(batches, margin=margin, rho=0.5, learning_rate=0.05,
                momentum=0.9, ema_decay=0.9, reset_threshold=threshold)
  source = toy_params()
  for t, (r, (state, info)) in enumerate(zip(ref, got)):
    assert bool(info.reset) == r["reset"], t
    np.testing.assert_allclose(state.params["LayerNorm_0"]["scale"],
                               r["theta"]["scale"], rtol=1e-5, atol=1e-6)
  state, info = got[k]
  assert int(state.num_resets) == 1 and math.isnan(float(state.ema))
  for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(source)):
    np.testing.assert_array_equal(a, b)
  for a, b in zip(jax.tree.leaves(state.opt_state),
                  jax.tree.leaves(state.anchor_opt_state)):
    np.testing.assert_array_equal(a, b)
  # After the reset the EMA restarts from the next second-pass loss.
  if k + 1 < len(ref) and not math.isnan(ref[k + 1]["loss2"]):
    np.testing.assert_allclose(got[k + 1][1].ema, ref[k + 1]["loss2"],
                               rtol=1e-5)


def test_tent_one_step_by_hand():
  x = toy_batches()[0]
  lr, momentum = 0.1, 0.9
  adapter = tta.tent(toy_apply, learning_rate=lr, momentum=momentum)
  state = adapter.init(toy_params())
  s1, info = adapter.step(state, x)
  s2, _ = adapter.step(s1, x)

  def mean_entropy(norm):
    p = dict(toy_params(), LayerNorm_0=norm)
    return jnp.mean(tta.softmax_entropy(toy_apply(p, x)))

  n0 = toy_params()["LayerNorm_0"]
  g0 = jax.grad(mean_entropy)(n0)
  n1 = jax.tree.map(lambda w, g: w - lr * g, n0, g0)
  g1 = jax.grad(mean_entropy)(n1)
  n2 = jax.tree.map(lambda w, a, b: w - lr * (b + momentum * a), n1, g0, g1)
  np.testing.assert_allclose(info.loss, mean_entropy(n0), rtol=1e-6)
  for k in ("scale", "bias"):
    np.testing.assert_allclose(s1.params["LayerNorm_0"][k], n1[k], rtol=1e-5)
    np.testing.assert_allclose(s2.params["LayerNorm_0"][k], n2[k], rtol=1e-5)
  np.testing.assert_array_equal(s2.params["Dense_0"]["kernel"],
                                toy_params()["Dense_0"]["kernel"])


# ---------------------------------------------------------------------------
# The adapted set is exactly the normalization parameters.
# ---------------------------------------------------------------------------


def _expected_norm_mask(params, prefixes):
  def select(path, _):
    keys = [p.key for p in path]
    return keys[-1] in ("scale", "bias") and keys[-2].startswith(prefixes)
  return jax.tree_util.tree_map_with_path(select, params)


@pytest.mark.parametrize("norm, prefix", [("group", "GroupNorm"),
                                          ("layer", "LayerNorm"),
                                          ("batch", "BatchNorm")])
def test_mask_is_exactly_the_norm_params_of_norm_cnn(norm, prefix):
  model = tta.NormCNN1D(norm=norm)
  x = jnp.zeros((2, 40))
  variables = model.init(jax.random.key(0), x)
  params = variables["params"]
  state = {k: v for k, v in variables.items() if k != "params"}
  exact = tta.norm_param_mask(params, model=model, inputs=x,
                              model_state=state)
  assert exact == _expected_norm_mask(params, (prefix,))
  assert tta.norm_param_mask(params) == exact
  assert len(tta.mask_paths(exact)) == 6


def test_mask_on_resnet_matches_batch_stats_and_honours_exclude():
  model = models.ResNet18(num_classes=10)
  x = jnp.zeros((1, 32, 32, 3))
  variables = jax.eval_shape(model.init, jax.random.key(0), x)
  params = variables["params"]
  exact = tta.norm_param_mask(params, model=model, inputs=x,
                              model_state={"batch_stats":
                                           variables["batch_stats"]})
  # Every BatchNorm has running statistics: the norm modules are exactly the
  # modules in batch_stats.
  stats_modules = {"/".join(p.key for p in path[:-1]) for path, _ in
                   jax.tree_util.tree_flatten_with_path(
                       variables["batch_stats"])[0]}
  mask_modules = {p.rsplit("/", 1)[0] for p in tta.mask_paths(exact)}
  assert mask_modules == stats_modules
  assert len(tta.mask_paths(exact)) == 2 * len(stats_modules)
  assert tta.norm_param_mask(params) == exact
  last = sorted(k for k in params if k.startswith("BasicBlock"))[-1]
  trimmed = tta.norm_param_mask(params, model=model, inputs=x,
                                model_state={"batch_stats":
                                             variables["batch_stats"]},
                                exclude=[f"^{last}/"])
  assert not any(p.startswith(last + "/") for p in tta.mask_paths(trimmed))
  assert len(tta.mask_paths(trimmed)) < len(tta.mask_paths(exact))


def test_mask_on_vit_selects_layer_norms_only():
  model = models.ViT(num_classes=10, depth=2)
  x = jnp.zeros((1, 32, 32, 3))
  params = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
  exact = tta.norm_param_mask(params, model=model, inputs=x)
  paths = tta.mask_paths(exact)
  assert paths and all("LayerNorm" in p.rsplit("/", 2)[-2] for p in paths)
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  ln_leaves = ["/".join(k.key for k in path) for path, _ in flat
               if len(path) >= 2 and "LayerNorm" in path[-2].key]
  assert sorted(paths) == sorted(ln_leaves)


def test_sar_adapts_exactly_the_norm_params_of_a_flax_model():
  model = tta.NormCNN1D(norm="batch", channels=8, num_groups=2)
  x = jax.random.normal(jax.random.key(1), (16, 40))
  variables = model.init(jax.random.key(0), x)
  params = variables["params"]
  mask = tta.norm_param_mask(params, model=model, inputs=x,
                             model_state={"batch_stats":
                                          variables["batch_stats"]})
  apply_fn = tta.flax_apply_fn(model, {"batch_stats":
                                       variables["batch_stats"]})
  # A margin above ln C keeps every sample, so the step really moves.
  adapter = tta.sar(apply_fn, learning_rate=0.5, margin=10.0, mask=mask,
                    reset_threshold=0.0)
  state, info = adapter.step(adapter.init(params), x)
  assert int(info.num_reliable) == 16
  moved = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), state.params,
                       params)
  assert moved == mask


@pytest.mark.parametrize(
    "kwargs, name",
    [({"num_classes": 10, "rho": -0.1}, "rho"),
     ({"margin": 0.0}, "margin"),
     ({"num_classes": 10, "ema_decay": 1.0}, "ema_decay"),
     ({"num_classes": 10, "momentum": -0.5}, "momentum"),
     ({"num_classes": 10, "reset_threshold": -1.0}, "reset_threshold")],
)
def test_sar_bad_hyperparameters(kwargs, name):
  with pytest.raises(ValueError, match=name):
    tta.sar(toy_apply, learning_rate=0.1, **kwargs)


def test_sar_needs_a_margin_and_a_mask():
  with pytest.raises(ValueError, match="num_classes"):
    tta.sar(toy_apply, learning_rate=0.1)
  adapter = tta.sar(toy_apply, learning_rate=0.1, num_classes=3)
  assert adapter  # default margin 0.4 ln 3
  with pytest.raises(ValueError, match="selects no parameter"):
    adapter.init({"Dense_0": {"kernel": jnp.ones((3, 3))}})
