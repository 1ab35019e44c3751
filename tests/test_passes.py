"""Where a step's gradients are taken (the passes protocol) and step_cost.

A state declares it (``PASSES``): the clean pass (default), points it
computes, or its own passes (AUSAM, mSAM). Each kind is checked against a
hand-written step on one device and under every placement; the FLOP counts
of :meth:`Trainer.step_cost` are checked for every registered method.
"""

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sharpjax as sj
from sharpjax import models
from sharpjax import training
from sharpjax._src import ausam as ausam_lib
from sharpjax._src import base
from sharpjax.cli import _methods
from tests import helpers

NUM_CLASSES = 3


class TinyBN(nn.Module):
  """Dense - BatchNorm - tanh - Dense."""

  @nn.compact
  def __call__(self, x, train=False):
    x = nn.Dense(8)(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.8)(x)
    return nn.Dense(NUM_CLASSES)(jnp.tanh(x))


class Tiny(nn.Module):
  """Dense - tanh - Dense, no model state (placements agree exactly)."""

  @nn.compact
  def __call__(self, x, train=False):
    del train
    return nn.Dense(NUM_CLASSES)(jnp.tanh(nn.Dense(8)(x)))


def _key(seed=0):
  return jax.random.key(seed, impl="unsafe_rbg")


def _batch(n=16, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, 5)).astype(np.float32)
  y = ((x[:, 0] > 0).astype(np.int32) + (x[:, 1] > 0.5)).astype(np.int32)
  return {"x": x, "y": y, "ids": np.arange(n, dtype=np.int32)}


def _ce(logits, y):
  return optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), y)


def _close(a, b, tol=1e-5):
  jax.tree.map(lambda u, v: np.testing.assert_allclose(
      np.asarray(u), np.asarray(v), rtol=tol, atol=tol), a, b)


def _copy(tree):
  return jax.tree.map(np.array, tree)


def _apply_bn(model, params, stats, x):
  """Train-mode forward: (logits, new batch_stats)."""
  logits, new = model.apply({"params": params, "batch_stats": stats}, x,
                            train=True, mutable=["batch_stats"])
  return logits, new["batch_stats"]


# A method that takes its two gradients at w - d and w + d and steps along
# their mean: the smallest "points" method.
SHIFT = 0.1


class TwoPointState(NamedTuple):
  count: jax.Array

  PASSES = "points"

  def gradient_points(self, params):
    return (jax.tree.map(lambda p: p - SHIFT, params),
            jax.tree.map(lambda p: p + SHIFT, params))


class OnePointState(NamedTuple):
  count: jax.Array

  PASSES = "points"

  def gradient_points(self, params):
    return (jax.tree.map(lambda p: p - SHIFT, params),)


def _points_method(state_type, axis_name=None):
  def init(params):
    del params
    return state_type(jnp.zeros([], jnp.int32))

  def update(updates, state, params=None, *, point_passes=None, **extra):
    del params, extra
    assert point_passes is not None
    direction = jax.tree.map(lambda *g: sum(g) / len(g),
                             *[p.grads for p in point_passes])
    # update's gradient is the first point's.
    assert updates is point_passes[0].grads
    if axis_name is not None:
      direction = jax.lax.pmean(direction, axis_name)
    return direction, state_type(state.count + 1)

  return optax.GradientTransformationExtraArgs(init, update)


def _points_reference(model, params, batch, points, lr):
  def mean_loss(p):
    return _ce(model.apply({"params": p}, batch["x"]), batch["y"]).mean()

  grads = [jax.grad(mean_loss)(point) for point in points]
  direction = jax.tree.map(lambda *g: sum(g) / len(g), *grads)
  return jax.tree.map(lambda w, d: w - lr * d, params, direction)


# ---------------------------------------------------------------------------
# What a chain asks for.
# ---------------------------------------------------------------------------


def test_each_chain_says_where_its_gradients_are_taken():
  params = {"w": jnp.ones(3)}
  sgd = optax.sgd(0.1)

  def kind(tx):
    return sj.passes(tx.init(params))

  assert kind(sgd) == "clean"
  assert kind(optax.chain(sj.sam(), sgd)) == "clean"
  assert kind(optax.chain(sj.msam(num_chunks=1), sgd)) == "clean"
  assert kind(optax.chain(sj.msam(num_chunks=4), sgd)) == "own"
  assert kind(optax.chain(sj.ausam(num_examples=8), sgd)) == "own"
  two = optax.chain(_points_method(TwoPointState), sgd)
  assert kind(two) == "points"
  # inject_hyperparams is looked through.
  assert kind(optax.inject_hyperparams(sj.msam, static_args=("num_chunks",))(
      rho=0.1, num_chunks=2)) == "own"
  # Inside MultiSteps (which accumulates the loop's gradient) or beside SAF
  # (which reads the clean pass's logits) a method's own passes are not
  # enough: the clean pass is taken.
  assert kind(optax.MultiSteps(optax.chain(sj.msam(num_chunks=4), sgd),
                               2)) == "clean"
  assert kind(optax.chain(
      sj.ausam(num_examples=8),
      sj.saf(num_examples=8, num_classes=3, steps_per_epoch=2), sgd)) == "clean"

  assert sj.gradient_points(optax.chain(sj.sam(), sgd).init(params),
                            params)[0] is params
  assert sj.gradient_points(
      optax.chain(sj.msam(num_chunks=4), sgd).init(params), params) == ()
  points = sj.gradient_points(two.init(params), params)
  _close(points, ({"w": np.full(3, 0.9)}, {"w": np.full(3, 1.1)}))
  # One point may be accumulated by MultiSteps; two may not.
  one = optax.MultiSteps(optax.chain(_points_method(OnePointState), sgd), 2)
  assert len(sj.gradient_points(one.init(params), params)) == 1
  with pytest.raises(ValueError, match="MultiSteps cannot accumulate"):
    sj.gradient_points(optax.MultiSteps(two, 2).init(params), params)
  with pytest.raises(ValueError, match="at most one such method"):
    sj.passes(optax.chain(sj.msam(num_chunks=2), two).init(params))


# ---------------------------------------------------------------------------
# Points.
# ---------------------------------------------------------------------------


def test_points_take_the_gradients_there_and_no_clean_pass():
  model, lr = TinyBN(), 0.1
  batch = _batch(16)
  trainer = training.make_trainer(
      model, optax.chain(_points_method(TwoPointState), optax.sgd(lr)),
      donate=False)
  state = trainer.init(_key(), batch)
  p0, s0 = _copy(state.params), _copy(state.model_state["batch_stats"])
  new_state, metrics = trainer.step(state, batch)

  def mean_loss(p):
    logits, stats = _apply_bn(model, p, s0, batch["x"])
    return _ce(logits, batch["y"]).mean(), (logits, stats)

  low = jax.tree.map(lambda p: p - SHIFT, p0)
  high = jax.tree.map(lambda p: p + SHIFT, p0)
  (loss, (logits, stats)), g_low = jax.value_and_grad(
      mean_loss, has_aux=True)(low)
  g_high = jax.grad(lambda p: mean_loss(p)[0])(high)
  _close(new_state.params, jax.tree.map(
      lambda w, a, b: w - lr * (a + b) / 2, p0, g_low, g_high))
  # The step's loss, accuracy and BatchNorm statistics are the first point's.
  np.testing.assert_allclose(metrics["loss"], loss, rtol=1e-6)
  np.testing.assert_allclose(metrics["accuracy"],
                             np.mean(np.argmax(logits, -1) == batch["y"]))
  _close(new_state.model_state["batch_stats"], stats, tol=1e-6)
  # No gradient at the current parameters: the program holds two backward
  # passes' worth of FLOPs (as SAM), not three.
  sgd = training.make_trainer(model, optax.sgd(lr))
  ratio = (trainer.step_cost(state, batch)["flops"]
           / sgd.step_cost(sgd.init(_key(), batch), batch)["flops"])
  assert 1.8 < ratio < 2.3, ratio


def _first_replica(tree):
  return jax.tree.map(lambda a: np.asarray(a)[0], tree)


def test_points_under_every_placement_match_one_device():
  model, lr = Tiny(), 0.1
  batch = _batch(16)
  devices = jax.devices()
  placements = {
      "mesh": dict(mesh=jax.make_mesh((8,), ("data",))),
      "pair mesh": dict(mesh=jax.make_mesh((2, 4), ("pair", "data"))),
      "per-device mesh": dict(mesh=jax.make_mesh((8,), ("data",)),
                              per_device_perturbation=True),
      "pmap": dict(axis_name="data", devices=devices[:2]),
  }
  one = training.make_trainer(
      model, optax.chain(_points_method(TwoPointState), optax.sgd(lr)),
      donate=False)
  state = one.init(_key(), batch)
  p0 = _copy(state.params)
  expected = _points_reference(
      model, p0, batch, TwoPointState(0).gradient_points(p0), lr)
  _close(one.step(state, batch)[0].params, expected)
  for name, kwargs in placements.items():
    axis = "data" if name in ("per-device mesh", "pmap") else None
    trainer = training.make_trainer(
        model, optax.chain(_points_method(TwoPointState, axis),
                           optax.sgd(lr)), **kwargs)
    start = trainer.init(_key(), batch)
    _close(start.params if name != "pmap" else _first_replica(start.params),
           p0)
    params = trainer.step(start, batch)[0].params
    if name == "pmap":
      params = _first_replica(params)
    _close(params, expected)


def test_a_pair_axis_gives_each_half_of_the_devices_one_point():
  """On a {"pair": 2, "data": 2} mesh each device computes one point's
  gradient on its half of the batch: half the FLOPs of a device of a
  {"data": 2} mesh, which computes both."""
  model = Tiny()
  batch = _batch(64)
  tx = optax.chain(_points_method(TwoPointState), optax.sgd(0.1))
  devices = np.array(jax.devices()[:4])
  flops = {}
  for name, mesh in [
      ("pair", jax.sharding.Mesh(devices.reshape(2, 2), ("pair", "data"))),
      ("data", jax.sharding.Mesh(devices[:2], ("data",)))]:
    trainer = training.make_trainer(model, tx, mesh=mesh)
    flops[name] = trainer.step_cost(trainer.init(_key(), batch),
                                    batch)["flops"]
  assert flops["pair"] < 0.65 * flops["data"], flops


# ---------------------------------------------------------------------------
# A method's own passes (mSAM, AUSAM).
# ---------------------------------------------------------------------------


def test_msam_metrics_and_batch_stats_come_from_its_chunks():
  """No clean pass: the step's loss, accuracy and BatchNorm statistics are
  those of mSAM's clean chunk passes (each chunk's statistics, averaged)."""
  model, num_chunks = TinyBN(), 2
  batch = _batch(16)
  tx = optax.chain(sj.msam(rho=0.1, num_chunks=num_chunks), optax.sgd(0.1))
  trainer = training.make_trainer(model, tx, donate=False)
  state = trainer.init(_key(), batch)
  s0 = _copy(state.model_state["batch_stats"])
  new_state, metrics = trainer.step(state, batch)

  losses, hits, stats = [], [], []
  for x, y in zip(np.split(batch["x"], num_chunks),
                  np.split(batch["y"], num_chunks)):
    logits, chunk_stats = _apply_bn(model, state.params, s0, x)
    losses.append(_ce(logits, y))
    hits.append(np.argmax(logits, -1) == y)
    stats.append(chunk_stats)
  np.testing.assert_allclose(metrics["loss"], np.mean(losses), rtol=1e-6)
  np.testing.assert_allclose(metrics["accuracy"], np.mean(hits))
  _close(new_state.model_state["batch_stats"],
         jax.tree.map(lambda *s: np.mean(s, axis=0), *stats), tol=1e-6)
  # The full batch's statistics differ (so the test would catch them).
  full = _apply_bn(model, state.params, s0, batch["x"])[1]
  gap = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), full,
                     new_state.model_state["batch_stats"])
  assert max(jax.tree.leaves(gap)) > 1e-4


def test_ausam_metrics_and_batch_stats_come_from_its_sample():
  model, n = TinyBN(), 16
  batch = _batch(n)
  tx = optax.chain(sj.ausam(rho=0.1, keep=0.5, num_examples=n),
                   optax.sgd(0.1))
  trainer = training.make_trainer(model, tx, donate=False)
  state = trainer.init(_key(), batch)
  s0 = _copy(state.model_state["batch_stats"])
  new_state, metrics = trainer.step(state, batch)

  # The sample AUSAM draws at step 0: nothing visited, so uniform.
  ausam_state = state.opt_state[0]
  _, key = base.next_key(ausam_state.key)
  sample = np.asarray(ausam_lib.sample_without_replacement(
      key, jnp.full((n,), 1.0 / n), n // 2))
  logits, stats = _apply_bn(model, state.params, s0, batch["x"][sample])
  y = batch["y"][sample]
  np.testing.assert_allclose(metrics["loss"], np.mean(_ce(logits, y)),
                             rtol=1e-6)
  np.testing.assert_allclose(metrics["accuracy"],
                             np.mean(np.argmax(logits, -1) == y))
  _close(new_state.model_state["batch_stats"], stats, tol=1e-6)
  # The sampled rows got their scores: the record matched the sample.
  visits = np.asarray(new_state.opt_state[0].visits)
  assert sorted(np.flatnonzero(visits)) == sorted(batch["ids"][sample])


@pytest.mark.parametrize("name", ["msam", "ausam"])
def test_own_passes_give_the_update_a_clean_gradient_gave(name):
  """mSAM and AUSAM never used the clean gradient: the trainer without its
  clean pass steps exactly as a loop that computes and hands it over, on one
  device and on a mesh of 8."""
  model, n = Tiny(), 16
  batch = _batch(n)

  def method():
    if name == "msam":
      return sj.msam(rho=0.1, num_chunks=4)
    return sj.ausam(rho=0.1, keep=0.5, num_examples=n)

  tx = optax.chain(method(), optax.sgd(0.1))
  trainer = training.make_trainer(model, tx, donate=False)
  state = trainer.init(_key(), batch)
  p0 = _copy(state.params)

  def loss_fn(p, b):
    return _ce(model.apply({"params": p}, b["x"]), b["y"])

  expected, expected_opt = helpers.own_loop_step(tx, loss_fn)(
      p0, tx.init(p0), batch)
  mesh = training.make_trainer(model, tx, mesh=jax.make_mesh((8,), ("data",)))
  for t in (trainer, mesh):
    new_state = t.step(t.init(_key(), batch), batch)[0]
    _close(new_state.params, expected)
    _close(sj.diagnostics(new_state.opt_state), sj.diagnostics(expected_opt))
    # The state keeps tx.init's structure (the record was taken out).
    assert (jax.tree.structure(new_state.opt_state)
            == jax.tree.structure(state.opt_state))


def test_msam_own_passes_under_pmap_and_per_device_mesh():
  """mSAM with axis_name on 2 devices (2 chunks each) is mSAM with 4 chunks
  on one device; the metrics are the chunks' means."""
  model, lr = Tiny(), 0.1
  batch = _batch(16)
  one = training.make_trainer(
      model, optax.chain(sj.msam(rho=0.1, num_chunks=4), optax.sgd(lr)))
  state, metrics = one.step(one.init(_key(), batch), batch)
  devices = jax.devices()[:2]
  for kwargs in (dict(axis_name="data", devices=devices),
                 dict(mesh=jax.sharding.Mesh(np.array(devices), ("data",)),
                      per_device_perturbation=True)):
    tx = optax.chain(sj.msam(rho=0.1, num_chunks=2, axis_name="data"),
                     optax.sgd(lr))
    trainer = training.make_trainer(model, tx, **kwargs)
    new_state, new_metrics = trainer.step(trainer.init(_key(), batch), batch)
    params = (_first_replica(new_state.params) if "axis_name" in kwargs
              else new_state.params)
    _close(params, state.params)
    np.testing.assert_allclose(new_metrics["loss"], metrics["loss"],
                               rtol=1e-6)


def test_a_users_loop_gets_the_record_with_the_public_functions():
  params = {"w": jnp.array([1.0, -2.0, 0.5, 3.0])}
  batch = {"x": jnp.eye(4)}
  tx = optax.chain(sj.msam(rho=0.1, num_chunks=2), optax.sgd(0.1))
  opt_state = tx.init(params)

  def loss_fn(p, b):
    losses = 0.5 * (b["x"] @ p["w"]) ** 2
    return losses, {"twice": 2 * losses}

  assert sj.gradient_points(opt_state, params) == ()
  zeros = jax.tree.map(jnp.zeros_like, params)
  _, new_state = tx.update(zeros, opt_state, params, loss_fn=loss_fn,
                           batch=batch, has_aux=True, report_passes=True)
  record, new_state = sj.pop_step_passes(new_state)
  assert isinstance(record, sj.StepPasses)
  _close(record.losses, [0.5, 2.0, 0.125, 4.5])
  # The aux is stacked one entry per pass (chunk).
  _close(record.aux["twice"], [[1.0, 4.0], [0.25, 9.0]])
  assert record.examples is None
  assert jax.tree.structure(new_state) == jax.tree.structure(opt_state)
  # Without report_passes nothing is recorded.
  _, plain = tx.update(zeros, opt_state, params, loss_fn=loss_fn,
                       batch=batch, has_aux=True)
  assert sj.pop_step_passes(plain)[0] is None


# ---------------------------------------------------------------------------
# step_cost.
# ---------------------------------------------------------------------------

# Upper bounds of each method's FLOPs x SGD on the small CNN below (the
# passes it runs, over the batch: SAM's two, AUSAM's two on half of it,
# LookSAM's one full step in five, SAF/MESA's penalty, ...) and lower bounds
# that catch a pass not run.
_FLOP_RATIOS = {
    "sgd": (1.0, 1.0),
    "sam": (1.95, 2.02), "asam": (1.95, 2.02), "gsam": (1.95, 2.02),
    "fsam": (1.95, 2.02), "sagm": (1.95, 2.02),
    "looksam": (1.15, 1.21),
    "msam": (1.95, 2.07),
    "esam": (1.5, 1.9),
    "ssam": (1.95, 2.1),
    "ausam": (0.95, 1.05),
    "saf": (1.0, 1.02),
    "mesa": (1.3, 1.36),
    # One pass at its point, none at the parameters.
    "momentum_sam": (0.98, 1.02),
    # Two independent passes.
    "sampa": (1.95, 2.02),
    # SGD's program for 21 of the 24 steps, SAM's for 3: 1.125.
    "late_sam": (1.1, 1.15),
}


def test_step_cost_flop_ratios_of_every_method():
  assert set(_FLOP_RATIOS) == set(_methods.names()), (
      "a registered method has no FLOP bound here")
  model = models.CNN1D(num_classes=4, channels=8)
  rng = np.random.default_rng(0)
  size = 64
  batch = {"x": rng.normal(size=(size, 40, 1)).astype(np.float32),
           "y": rng.integers(0, 4, size).astype(np.int32),
           "ids": np.arange(size, dtype=np.int32)}
  budget = _methods.Budget(num_examples=size, num_classes=4,
                           steps_per_epoch=4, epochs=6, learning_rate=0.1,
                           momentum=0.9)
  sgd_flops, ratios = None, {}
  for name in _methods.names():
    method = _methods.get(name)
    hyper = _methods.resolve(method, budget, {}, {})
    if name == "msam":
      hyper["num_chunks"] = 4
    if name == "ssam":
      hyper["num_fisher_samples"] = 4
    front = _methods.build(method, hyper, budget)
    tx = optax.sgd(0.1) if front is None else optax.chain(front,
                                                          optax.sgd(0.1))
    trainer = training.make_trainer(model, tx)
    cost = trainer.step_cost(trainer.init(_key(), batch), batch)
    assert set(cost) >= {"flops", "bytes_accessed"}
    assert cost["bytes_accessed"] > 0
    sgd_flops = sgd_flops or cost["flops"]
    ratios[name] = cost["flops"] / sgd_flops
  for name, (low, high) in _FLOP_RATIOS.items():
    assert low <= ratios[name] <= high, (name, ratios[name])


def test_step_cost_counts_the_optimized_program():
  """The suite turns most XLA optimizations off; step_cost compiles with
  them on and leaves the setting as it was. A chain that ignores its
  gradient costs a forward pass, not a backward that nothing uses."""
  model = Tiny()
  batch = _batch(64)
  before = jax.config.read("jax_disable_most_optimizations")

  def flops(tx):
    trainer = training.make_trainer(model, tx, validate=False)
    return trainer.step_cost(trainer.init(_key(), batch), batch)["flops"]

  sgd = flops(optax.sgd(0.1))
  ignored = flops(optax.with_extra_args_support(optax.set_to_zero()))
  assert ignored < 0.5 * sgd, (ignored, sgd)
  assert jax.config.read("jax_disable_most_optimizations") == before


def test_step_cost_averages_a_host_scheduled_method_over_its_period():
  model, k = Tiny(), 4
  batch = _batch(64)
  trainer = training.make_trainer(
      model, optax.chain(sj.looksam(k=k), optax.sgd(0.1)), donate=False)
  state = trainer.init(_key(), batch)
  cost = trainer.step_cost(state, batch)
  placed = trainer.shard_batch(batch)

  full, skip = (helpers.program_flops(trainer, state, placed, full_step)
                for full_step in (True, False))
  assert full > 1.5 * skip
  np.testing.assert_allclose(cost["flops"], (full + (k - 1) * skip) / k,
                             rtol=1e-6)
