"""GAQAT / FQAT scale-gradient filters against a numpy version."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import sharpjax as sj
from sharpjax import quant

# A parameter tree with two "layers": steps of shape [3] and [], and a weight.
PARAMS = {
    "l1": {"kernel": jnp.ones((2, 3)), "w_step": jnp.ones((3,))},
    "l2": {"a_step": jnp.ones(())},
}


def random_steps(num, seed=0):
  """A sequence of (task grads, SAGM directions) pytrees shaped like PARAMS."""
  rng = np.random.default_rng(seed)
  out = []
  for t in range(num):
    def draw(shape, bias):
      return jnp.asarray(rng.normal(size=shape) + bias, jnp.float32)
    # l2's smooth part keeps one sign for a while (low disorder); l1 flips.
    task = {"l1": {"kernel": draw((2, 3), 0), "w_step": draw((3,), 0)},
            "l2": {"a_step": draw((), 2.0)}}
    smooth = {"l1": {"kernel": draw((2, 3), 0), "w_step": draw((3,), 0)},
              "l2": {"a_step": draw((), 3.0 if t < 13 else -3.0)}}
    d = jax.tree.map(jnp.add, task, smooth)
    out.append((task, d))
  return out


def np_disorder(task_seq, smooth_seq, kind, source):
  """D over a window, given [n, *shape] arrays (oldest first); mean over channels."""
  ts, ss = np.sign(task_seq), np.sign(smooth_seq)
  if kind == "flip":
    x = ss if source == "smooth" else ts
    if len(x) < 2:
      return 0.0
    return float(np.mean(np.mean(x[1:] != x[:-1], axis=0)))
  return float(np.mean(np.mean(ts != ss, axis=0)))


def np_filter(steps, window, tau, kind, source, component, side, schedule,
              top_k=None):
  """The filter in numpy: the outputs and (disorder, mask) after each step."""
  names = [("l1", "w_step"), ("l2", "a_step")]
  hist = {n: ([], []) for n in names}
  mask = np.zeros(2)
  dis = np.zeros(2)
  outs, records = [], []
  for t, (task, d) in enumerate(steps):
    for n in names:
      g = np.asarray(task[n[0]][n[1]])
      hist[n][0].append(g)
      hist[n][1].append(np.asarray(d[n[0]][n[1]]) - g)
    now = np.array([
        np_disorder(np.stack(hist[n][0][-window:]),
                    np.stack(hist[n][1][-window:]), kind, source)
        for n in names
    ])
    if top_k is not None:
      order = np.argsort(-now if side == "above" else now, kind="stable")
      m_now = np.zeros(2)
      m_now[order[:top_k]] = 1.0
    else:
      m_now = (now < tau if side == "below" else now > tau).astype(float)
    if schedule == "step" or (t + 1) % window == 0:
      dis, mask = now, m_now
    out = jax.tree.map(np.asarray, d)
    for j, n in enumerate(names):
      g = np.asarray(task[n[0]][n[1]])
      dd = np.asarray(d[n[0]][n[1]])
      frozen = {"task": dd - g, "smooth": g, "all": 0 * g}[component]
      out[n[0]][n[1]] = frozen if mask[j] else dd
    outs.append(out)
    records.append((dis.copy(), mask.copy()))
  return outs, records


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(window=4, threshold=0.3, disorder_kind="flip",
             flip_source="smooth", freeze_component="task",
             freeze_when="below", schedule="window"),
        dict(window=5, threshold=0.5, disorder_kind="pair",
             flip_source="smooth", freeze_component="smooth",
             freeze_when="below", schedule="window"),
        dict(window=3, threshold=0.5, disorder_kind="flip", flip_source="task",
             freeze_component="all", freeze_when="above", schedule="step"),
        dict(window=4, threshold=0.0, disorder_kind="flip",
             flip_source="smooth", freeze_component="all",
             freeze_when="above", schedule="step", top_k=1),
    ],
)
def test_filter_matches_numpy(kwargs):
  steps = random_steps(16)
  tx = quant.scale_gradient_filter(**kwargs)
  ref_outs, ref_records = np_filter(
      steps, kwargs["window"], kwargs["threshold"], kwargs["disorder_kind"],
      kwargs["flip_source"], kwargs["freeze_component"],
      kwargs["freeze_when"], kwargs["schedule"], kwargs.get("top_k"))
  state = tx.init(PARAMS)
  update = jax.jit(tx.update)
  num_frozen = 0
  for t, (task, d) in enumerate(steps):
    out, state = update(d, state, PARAMS, task_grads=task)
    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(ref_outs[t])):
      np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    summary = quant.filter_summary(state)
    np.testing.assert_allclose(summary["disorder"], ref_records[t][0],
                               atol=1e-6)
    np.testing.assert_array_equal(summary["frozen"], ref_records[t][1])
    num_frozen += summary["frozen"].sum()
    # Weights always pass through.
    np.testing.assert_array_equal(out["l1"]["kernel"], d["l1"]["kernel"])
  assert num_frozen > 0  # the case exercises freezing


def test_window_refresh_unfreezes():
  """l2's smooth part keeps its sign for 13 steps, then flips: frozen, then not."""
  steps = random_steps(16)
  tx = quant.gaqat_scale_filter(window=4, threshold=0.2)
  state = tx.init(PARAMS)
  history = []
  for task, d in steps:
    _, state = tx.update(d, state, PARAMS, task_grads=task)
    history.append(quant.filter_summary(state)["frozen"][1])
  assert history[2] == 0.0  # nothing frozen before the first full window
  assert history[3] == 1.0 and history[11] == 1.0  # calm: task part frozen
  assert history[15] == 0.0  # the flip at step 13 raised D to 1/3 > 0.2


def test_disorder_oracles():
  k = 4
  alt = jnp.asarray([1, -1, 1, -1], jnp.int8)
  const = jnp.ones((k,), jnp.int8)
  count = jnp.asarray(k - 1)
  assert float(quant.disorder(const, alt, count, "flip", "smooth")) == 1.0
  assert float(quant.disorder(alt, const, count, "flip", "smooth")) == 0.0
  assert float(quant.disorder(alt, -alt, count, "pair")) == 1.0
  assert float(quant.disorder(alt, alt, count, "pair")) == 0.0
  # The ring buffer is read in time order: the same sequence written with an
  # offset (newest in slot 1) gives the same statistic.
  seq = np.array([1, 1, -1, -1], np.int8)  # one flip in 3 pairs
  ring = np.roll(seq, 2)  # slot (t % 4) holds time t for t = 2..5
  got = quant.disorder(jnp.asarray(ring), jnp.asarray(ring), jnp.asarray(5),
                       "flip", "task")
  np.testing.assert_allclose(float(got), 1 / 3, rtol=1e-6)


def test_zero_mask_is_identity_and_all_frozen_task_gives_smooth():
  steps = random_steps(3)
  tx = quant.scale_gradient_filter(window=2, threshold=0.0,
                                   freeze_when="below")  # D < 0: never
  state = tx.init(PARAMS)
  for task, d in steps:
    out, state = tx.update(d, state, PARAMS, task_grads=task)
    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(d)):
      np.testing.assert_array_equal(a, b)
  tx = quant.scale_gradient_filter(window=2, threshold=1.0, schedule="step",
                                   freeze_when="below", disorder_kind="pair")
  state = tx.init(PARAMS)
  task, d = steps[0]
  out, state = tx.update(d, state, PARAMS, task_grads=task)
  # Pair disorder of one step is 0 for l2 (signs agree), so it is frozen.
  assert quant.filter_summary(state)["frozen"][1] == 1.0
  np.testing.assert_allclose(
      out["l2"]["a_step"], d["l2"]["a_step"] - task["l2"]["a_step"],
      rtol=1e-6)


def test_gaqat_equals_chain_with_task_grads_and_sagm_reduction():
  model = quant.QuantMLP(hidden=(8,), num_classes=3, w_bits=4, a_bits=4,
                         fp_first=False)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(16, 5)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 3, 16), jnp.int32)
  params = jax.jit(model.init)(jax.random.key(0), x)["params"]
  batch = {"x": x, "y": y}

  def loss_fn(p, b):
    logits = model.apply({"params": p}, b["x"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, b["y"])

  # top_k = all step leaves: every layer is frozen from the first window on.
  filt = quant.scale_gradient_filter(window=2, top_k=2, freeze_when="below")
  one = quant.gaqat(rho=0.05, alpha=0.001, scale_filter=filt)
  two = optax.chain(sj.sagm(rho=0.05, alpha=0.001), filt)
  s1, s2 = one.init(params), two.init(params)
  sagm = sj.sagm(rho=0.05, alpha=0.001)
  s3 = sagm.init(params)

  @jax.jit
  def step(p, s1, s2, s3):
    g = jax.grad(lambda q: loss_fn(q, batch).mean())(p)
    u1, s1 = one.update(g, s1, p, loss_fn=loss_fn, batch=batch)
    u2, s2 = two.update(g, s2, p, loss_fn=loss_fn, batch=batch, task_grads=g)
    d, s3 = sagm.update(g, s3, p, loss_fn=loss_fn, batch=batch)
    return g, u1, u2, d, s1, s2, s3

  for t in range(2):
    g, u1, u2, d, s1, s2, s3 = step(params, s1, s2, s3)
    chex_equal = jax.tree.map(lambda a, b: np.testing.assert_allclose(
        a, b, rtol=1e-6, atol=1e-7), u1, u2)
    del chex_equal
    frozen = quant.filter_summary(s1)["frozen"]
    names = quant.step_leaf_names(params)
    for path, leaf in jax.tree_util.tree_leaves_with_path(u1):
      key = jax.tree_util.keystr(path)
      dd = _at(d, path)
      if key in names and frozen[names.index(key)]:
        # Every step frozen with freeze_component="task": d_s = g_smooth.
        np.testing.assert_allclose(leaf, dd - _at(g, path), rtol=1e-5,
                                   atol=1e-7)
      else:
        np.testing.assert_allclose(leaf, dd, rtol=1e-6, atol=1e-7)
    params = optax.apply_updates(params, jax.tree.map(lambda u: -0.1 * u, u1))
  assert quant.filter_summary(s1)["frozen"].all()
  assert np.isfinite(sj.diagnostics(s1)["perturbed_loss"])


def _at(tree, path):
  for p in path:
    tree = tree[p.key]
  return tree


def test_bad_arguments():
  with pytest.raises(ValueError, match="window"):
    quant.gaqat_scale_filter(window=1)
  with pytest.raises(ValueError, match="threshold"):
    quant.gaqat_scale_filter(threshold=1.5)
  with pytest.raises(ValueError, match="freeze_component"):
    quant.gaqat_scale_filter(freeze_component="weights")
  with pytest.raises(ValueError, match="top_k"):
    quant.fqat_layer_filter(top_k=5).init(PARAMS)
  tx = quant.gaqat_scale_filter()
  with pytest.raises(TypeError, match="task_grads"):
    tx.update(PARAMS, tx.init(PARAMS), PARAMS)
