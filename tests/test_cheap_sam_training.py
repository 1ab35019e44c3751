"""Momentum-SAM, SAMPa and late-phase SAM through make_trainer.

Each against the same transformation stepped by hand through the public
functions a user's own loop has (sj.gradient_points, point_passes=), on a
small MLP; SAMPa's two gradients on a mesh with a pair axis against one
device; late-phase SAM's two programs chosen on the host.
"""

import jax
import numpy as np
import optax
import pytest

import sharpjax as sj
from sharpjax import data
from sharpjax import models
from sharpjax import training
from tests import helpers

NUM_CLASSES = 5


def _key(seed=0):
  return jax.random.key(seed, impl="unsafe_rbg")


def _loader(n=64, batch=16):
  ds = data.make_synthetic(n, input_shape=(6,), num_classes=NUM_CLASSES,
                           seed=0)
  return data.DataLoader(ds, batch, seed=0)


def _close(a, b, tol=1e-5):
  jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=tol,
                                                       atol=tol), a, b)


def _own_loop(model, tx, params, batches):
  """The documented own loop: gradients at sj.gradient_points, handed over
  as point_passes."""
  def losses(p, b):
    logits = model.apply({"params": p}, b["x"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, b["y"])

  @jax.jit
  def step(params, opt_state, batch):
    taken = []
    for point in sj.gradient_points(opt_state, params):
      loss, g = jax.value_and_grad(lambda p: losses(p, batch).mean())(point)
      taken.append(sj.PerturbedPass(loss, g, None, None))
    updates, opt_state = tx.update(taken[0].grads, opt_state, params,
                                   point_passes=tuple(taken))
    return optax.apply_updates(params, updates), opt_state, taken[0].loss

  opt_state = tx.init(params)
  out = []
  for batch in batches:
    params, opt_state, loss = step(params, opt_state,
                                   {"x": batch["x"], "y": batch["y"]})
    out.append(float(loss))
  return params, out


@pytest.mark.parametrize("method", ["momentum_sam", "sampa"])
def test_trainer_takes_the_gradients_at_the_states_points(method):
  model = models.MLP(features=(8,), num_classes=NUM_CLASSES)
  make = dict(
      momentum_sam=lambda: sj.momentum_sam(rho=0.5, momentum=0.9),
      sampa=lambda: sj.sampa(rho=0.2, lam=0.2, learning_rate=0.1,
                             momentum=0.9))[method]
  tx = optax.chain(make(), optax.sgd(0.1, momentum=0.9))
  loader = _loader()
  batches = [loader.batch(0, k) for k in range(3)]
  trainer = training.make_trainer(model, tx, donate=False)
  state = trainer.init(_key(), batches[0])
  assert sj.passes(state.opt_state) == "points"
  want, want_losses = _own_loop(model, tx, state.params, batches)
  losses = []
  for batch in batches:
    state, metrics = trainer.step(state, batch)
    losses.append(float(metrics["loss"]))
  _close(state.params, want)
  # The step's loss is the one at the (first) point.
  np.testing.assert_allclose(losses, want_losses, rtol=1e-5)


def test_sampa_on_a_pair_mesh_matches_one_device():
  """A {"pair": 2, "data": 2} mesh of 4 host devices: each half computes
  one of the two gradients on the whole batch (sharded over "data")."""
  model = models.MLP(features=(8,), num_classes=NUM_CLASSES)
  tx = optax.chain(sj.sampa(rho=0.2, lam=0.2, learning_rate=0.1),
                   optax.sgd(0.1))
  loader = _loader()
  batches = [loader.batch(0, k) for k in range(3)]
  one = training.make_trainer(model, tx, donate=False)
  state = one.init(_key(), batches[0])
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:4]).reshape(2, 2),
                           ("pair", "data"))
  pair = training.make_trainer(model, tx, mesh=mesh, donate=False)
  pair_state = pair.init(_key(), batches[0])
  _close(pair_state.params, state.params)
  for batch in batches:
    state, m1 = one.step(state, batch)
    pair_state, m2 = pair.step(pair_state, batch)
    np.testing.assert_allclose(m2["loss"], m1["loss"], rtol=1e-5)
  _close(pair_state.params, state.params)
  _close(pair_state.opt_state[0].g_y, state.opt_state[0].g_y)


def test_late_sam_switches_on_the_host():
  """Two compiled programs (SGD's and SAM's), no device conditional, the
  same parameters as lax.cond on the device."""
  model = models.MLP(features=(8,), num_classes=NUM_CLASSES)
  tx = optax.chain(sj.late_sam(rho=0.1, start=0.5, total_steps=4),
                   optax.sgd(0.1))
  loader = _loader()
  host = training.make_trainer(model, tx)
  state = host.init(_key(), loader.batch(0, 0))
  placed = host.shard_batch(loader.batch(0, 0))
  for full_step in (True, False):
    text = host._step.lower(state, placed, full_step).compile().as_text()  # pylint: disable=protected-access
    assert text.count("conditional(") == 0

  params, opt_state = jax.tree.map(np.array, state.params), tx.init(
      state.params)

  cond_step = helpers.own_loop_step(
      tx, lambda p, b: optax.softmax_cross_entropy_with_integer_labels(
          model.apply({"params": p}, b["x"]), b["y"]))

  measured = []
  for k in range(4):
    batch = loader.batch(0, k)
    state, metrics = host.step(state, batch)
    params, opt_state = cond_step(params, opt_state,
                                  {"x": batch["x"], "y": batch["y"]})
    measured.append(float(metrics["measured"]))
    _close(state.params, params)
  assert measured == [0.0, 0.0, 1.0, 1.0]


def _convolutions(tx, full_step=None):
  """Convolutions in a make_trainer step of the CLI's CNN, as traced (before
  XLA removes anything): the passes the step asks for."""
  model = models.CNN1D(num_classes=NUM_CLASSES, channels=4)
  rng = np.random.default_rng(0)
  batch = {"x": rng.normal(size=(8, 40, 1)).astype(np.float32),
           "y": rng.integers(0, NUM_CLASSES, 8).astype(np.int32)}
  trainer = training.make_trainer(model, tx, validate=False)
  state = jax.eval_shape(lambda: trainer.init(_key(), batch))  # no compile
  text = trainer._step.lower(state, trainer.shard_batch(batch),  # pylint: disable=protected-access
                             full_step).as_text()
  return text.count("convolution")


def test_passes_per_step_are_the_methods_own():
  """Momentum-SAM's step holds SGD's passes (one forward-backward, at the
  point), SAMPa's two, late-phase SAM's SGD's then SAM's."""
  sgd = lambda: optax.sgd(0.1, momentum=0.9)
  one = _convolutions(sgd())
  assert one > 0
  assert _convolutions(optax.chain(sj.momentum_sam(), sgd())) == one
  assert _convolutions(optax.chain(
      sj.sampa(learning_rate=0.1), sgd())) == 2 * one
  late = optax.chain(sj.late_sam(start=2), sgd())
  assert _convolutions(late, False) == one
  assert _convolutions(late, True) == 2 * one


def test_step_cost_averages_late_sam_over_the_run():
  """The SGD program for the first 6 of 8 steps, SAM's for the last 2."""
  model = models.MLP(features=(8,), num_classes=NUM_CLASSES)
  loader = _loader()
  batch = loader.batch(0, 0)
  trainer = training.make_trainer(model, optax.chain(
      sj.late_sam(rho=0.1, start=0.75, total_steps=8), optax.sgd(0.1)),
                                  donate=False)
  state = trainer.init(_key(), batch)
  placed = trainer.shard_batch(batch)

  late, early = (helpers.program_flops(trainer, state, placed, full_step)
                 for full_step in (True, False))
  assert late > 1.5 * early
  np.testing.assert_allclose(trainer.step_cost(state, batch)["flops"],
                             0.25 * late + 0.75 * early, rtol=1e-6)
  # Without the run's length the share is unknown: a clear error.
  no_total = training.make_trainer(model, optax.chain(
      sj.late_sam(start=6), optax.sgd(0.1)))
  with pytest.raises(ValueError, match="total_steps="):
    no_total.step_cost(no_total.init(_key(), batch), batch)
