"""What a loop must do around the library that no other test pinned down.

Each test here fails with a one-line change of behaviour that the suite
used to let through: AUSAM's devices counting only their own dropped ids, a
host-scheduled state inside ``optax.MultiSteps`` taken for the loop's own,
the trainer trusting its host count for a state it did not produce, and a
mesh evaluation counting its padding rows.
"""

from __future__ import annotations

import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import sharpjax as sj
from sharpjax import training
from sharpjax._src import protocol
from sharpjax.cli import _devices

from tests import helpers


def test_ausam_devices_count_every_devices_dropped_ids_under_pmap():
  """One out-of-range id on one device: every device's count says 1 (the
  copies of the state stay equal)."""
  n, size = 2, 4
  tx = optax.chain(sj.ausam(rho=0.05, keep=1.0, num_examples=64,
                            axis_name="d"), optax.sgd(0.1))
  params = helpers.tiny_params()
  batch = helpers.tiny_batch(size=n * size)
  ids = np.asarray(batch["ids"]).copy()
  ids[1] = 64  # one past the table, on device 0 only
  batch = dict(batch, ids=jnp.asarray(ids))
  shards = jax.tree.map(lambda x: x.reshape((n, size) + x.shape[1:]), batch)

  def device_step(state, shard):
    grads = helpers.clean_grads(params, shard)
    _, state = tx.update(grads, state, params, loss_fn=helpers.loss_fn,
                         batch=shard)
    return state

  state = jax.pmap(device_step, axis_name="d", in_axes=(None, 0),
                   devices=jax.devices()[:n])(tx.init(params), shards)
  np.testing.assert_array_equal(np.asarray(state[0].dropped_ids), [1, 1])


class _Tiny(nn.Module):
  @nn.compact
  def __call__(self, x, train=False):
    return nn.Dense(3)(x)


def _batch(n=8):
  rng = np.random.default_rng(0)
  return {"x": rng.normal(size=(n, 4)).astype(np.float32),
          "y": rng.integers(0, 3, n).astype(np.int32)}


def test_host_scheduled_states_inside_multisteps_are_not_the_loops():
  """Inside optax.MultiSteps a LookSAM count advances once per accumulated
  step, so the loop's count does not predict it: the protocol leaves it out
  (the loop then lets the step decide on the device). make_trainer refuses
  that chain outright; a loop of one's own that drives the protocol must
  not read the inner count."""
  params = {"w": jnp.ones(2)}
  inner = optax.chain(sj.looksam(0.05, k=2), optax.sgd(0.1))
  assert len(protocol.host_scheduled(inner.init(params))) == 1
  assert protocol.host_scheduled(optax.MultiSteps(inner, 2).init(params)) == []


def test_trainer_rereads_a_state_it_did_not_produce():
  """LookSAM with k=2 through make_trainer: after one step (count 1, the
  next one a reuse step) a fresh state from init (count 0) must take a full
  step, and a restored copy of an older state its own branch."""
  tx = optax.chain(sj.looksam(0.05, k=2), optax.sgd(0.1))
  trainer = training.make_trainer(_Tiny(), tx, donate=False)
  batch = _batch()
  fresh = trainer.init(jax.random.key(0), batch)
  after_one, metrics = trainer.step(fresh, batch)
  assert float(metrics["measured"]) == 1.0
  restored = jax.tree.map(jnp.array, fresh)  # count 0, not the trainer's
  _, metrics = trainer.step(restored, batch)
  assert float(metrics["measured"]) == 1.0
  # And the trainer's own state again: its count is 1, a reuse step.
  _, metrics = trainer.step(jax.tree.map(jnp.array, after_one), batch)
  assert float(metrics["measured"]) == 0.0


def test_mesh_evaluation_leaves_out_padding_rows():
  """10 examples on 8 devices: the mesh pads to 16 rows; the loss and the
  accuracy are those of the 10 examples (one device's numbers)."""
  model = _Tiny()
  x = np.random.default_rng(1).normal(size=(10, 4)).astype(np.float32)
  y = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2, 0], np.int32)
  params = model.init(jax.random.key(0), x)["params"]
  one = _devices.Devices(tuple(jax.devices()[:1]), None)
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]), ("data",))
  eight = _devices.Devices(tuple(jax.devices()[:8]), mesh)
  want = one.evaluate(model, params, {}, x, y)
  got = eight.evaluate(model, params, {}, x, y)
  logits = np.asarray(model.apply({"params": params}, x))
  np.testing.assert_allclose(want["test_accuracy"],
                             np.mean(logits.argmax(-1) == y), rtol=1e-6)
  np.testing.assert_allclose(got["test_loss"], want["test_loss"], rtol=1e-5)
  np.testing.assert_allclose(got["test_accuracy"], want["test_accuracy"],
                             rtol=1e-6)
