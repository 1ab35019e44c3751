"""AUSAM against references derived by hand: probabilities, sampling, scores."""

from __future__ import annotations

import math
import re

from absl.testing import parameterized
import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import sharpjax as sj
from sharpjax._src import ausam as ausam_lib

from tests import helpers

# Per-example loss l_i(w) = 0.5 (w - c_i)^T A (w - c_i), w = [kernel, bias].
_RNG = np.random.default_rng(5)
_M = _RNG.normal(size=(4, 4))
A = _M @ _M.T / 4 + 0.5 * np.eye(4)
CENTRES = _RNG.normal(size=(10, 4)) * 2.0
W0 = np.array([0.3, -0.8, 0.6, 1.1])
NUM_EXAMPLES = 20
IDS = np.array([3, 17, 0, 9, 12, 5, 19, 8, 1, 14], np.int32)


Q = helpers.Quadratic(A, CENTRES, W0, kernel_shape=(2,))
quad_loss, quad_params, flat, np_losses = Q.loss, Q.params, Q.flat, Q.losses


def quad_batch(ids=IDS):
  return {**Q.batch, "ids": jnp.asarray(ids)}


def np_probabilities(scores, visited, f_min, f_high):
  """The paper's q_i, with unseen examples at the batch's largest score."""
  s = np.asarray(scores, np.float64).copy()
  high = s[visited].max() if visited.any() else 0.0
  s[~visited] = high
  spread = s.max() - s.min()
  unit = (s - s.min()) / spread if spread > 0 else np.zeros_like(s)
  q = f_min + unit * (f_high - f_min)
  return q / q.sum()


def np_upper_frequency(t, f_min, f_max, trans):
  if trans == 0 or t > trans:
    return f_max
  return f_max - (trans - t) / trans * (f_max - f_min)


class AusamTest(parameterized.TestCase):

  @parameterized.parameters((0, 0.1, 0.5, 30), (10, 0.1, 0.5, 30),
                            (45, 0.1, 0.5, 30), (7, 0.2, 0.3, 0))
  def test_upper_frequency_schedule(self, t, f_min, f_max, trans):
    got = ausam_lib.upper_frequency(jnp.int32(t), f_min, f_max, trans)
    np.testing.assert_allclose(got, np_upper_frequency(t, f_min, f_max, trans),
                               rtol=1e-6)

  @parameterized.parameters(0, 3, 7, 10)
  def test_probabilities_match_numpy(self, num_unseen):
    rng = np.random.default_rng(num_unseen)
    scores = rng.uniform(0, 2, size=10).astype(np.float32)
    visited = np.ones(10, bool)
    visited[rng.permutation(10)[:num_unseen]] = False
    for f_high in (0.1, 0.3, 0.5):
      got = ausam_lib.sampling_probabilities(
          jnp.asarray(scores), jnp.asarray(visited), 0.1, f_high)
      want = np_probabilities(scores, visited, 0.1, f_high)
      np.testing.assert_allclose(got, want, rtol=1e-5)
    # At f_max(0) = f_min the sampling is uniform whatever the scores.
    got = ausam_lib.sampling_probabilities(
        jnp.asarray(scores), jnp.asarray(visited), 0.1, 0.1)
    np.testing.assert_allclose(got, np.full(10, 0.1), rtol=1e-6)

  def test_sampler_draws_in_proportion_and_without_replacement(self):
    p = jnp.asarray(np_probabilities(np.arange(6.0), np.ones(6, bool), 0.1,
                                     0.5))
    keys = jax.random.split(jax.random.key(0), 20000)
    one = jax.vmap(lambda k: ausam_lib.sample_without_replacement(k, p, 1))(
        keys)
    freq = np.bincount(np.asarray(one[:, 0]), minlength=6) / 20000
    sigma = np.sqrt(np.asarray(p) * (1 - np.asarray(p)) / 20000)
    np.testing.assert_array_less(np.abs(freq - np.asarray(p)), 4 * sigma)
    three = jax.vmap(lambda k: ausam_lib.sample_without_replacement(k, p, 3))(
        keys[:500])
    for row in np.asarray(three):
      self.assertLen(set(row.tolist()), 3)

  @parameterized.parameters(0.5, 0.3, 0.8)
  def test_one_step_matches_numpy(self, keep):
    rho, lr, f_min, f_max, trans = 0.4, 0.1, 0.1, 0.5, 4
    tx = sj.ausam(rho=rho, keep=keep, f_min=f_min, f_max=f_max,
                  transition_steps=trans, num_examples=NUM_EXAMPLES)
    params, batch = quad_params(), quad_batch()
    rng = np.random.default_rng(1)
    # A table with some history: scores and visit counts per id.
    table = rng.uniform(0.1, 3.0, NUM_EXAMPLES).astype(np.float32)
    visits = rng.integers(0, 4, NUM_EXAMPLES).astype(np.int32)
    state = tx.init(params)._replace(
        count=jnp.int32(2), scores=jnp.asarray(table),
        visits=jnp.asarray(visits))
    grads = jax.grad(lambda p: quad_loss(p, batch).mean())(params)
    updates, new = jax.jit(
        lambda s: tx.update(grads, s, params, loss_fn=quad_loss, batch=batch)
    )(state)

    # The sample is the set of ids whose visit count went up by one.
    new_visits = np.asarray(new.visits)
    changed = np.flatnonzero(new_visits != visits)
    np.testing.assert_array_equal(new_visits[changed], visits[changed] + 1)
    k = math.ceil(keep * len(IDS))
    self.assertLen(changed, k)
    sample = np.array([np.flatnonzero(IDS == i)[0] for i in changed])

    # The sampler's probabilities, from the key the state held.
    _, key = jax.random.split(jax.random.wrap_key_data(state.key))
    p = np_probabilities(table[IDS], visits[IDS] > 0, f_min,
                         np_upper_frequency(2, f_min, f_max, trans))
    want_sample = ausam_lib.sample_without_replacement(key, jnp.asarray(p), k)
    self.assertEqual(set(sample.tolist()), set(np.asarray(want_sample).tolist()))

    # SAM on the sample, by hand.
    c = CENTRES[sample]
    g = A @ (W0 - c.mean(0))
    eps = rho * g / np.linalg.norm(g)
    np.testing.assert_allclose(flat(updates), A @ (W0 + eps - c.mean(0)),
                               rtol=1e-5)
    change = np.abs(np_losses(W0 + eps, c) - np_losses(W0, c))
    ids = IDS[sample]
    want_table = table.copy()
    want_table[ids] = (table[ids] * visits[ids] + change) / (visits[ids] + 1)
    np.testing.assert_allclose(new.scores, want_table, rtol=1e-5)
    self.assertEqual(int(new.dropped_ids), 0)
    d = sj.diagnostics(new)
    np.testing.assert_allclose(d["clean_loss"], np_losses(W0, c).mean(),
                               rtol=1e-5)
    np.testing.assert_allclose(d["perturbed_loss"],
                               np_losses(W0 + eps, c).mean(), rtol=1e-5)
    np.testing.assert_allclose(d["perturbation_norm"], rho, rtol=1e-5)

  def test_keep_one_is_sam(self):
    batch = helpers.tiny_batch()
    step = jax.jit(helpers.train_step, static_argnums=0)
    tx_au = optax.chain(sj.ausam(rho=0.1, keep=1.0, num_examples=64),
                        optax.sgd(0.1, momentum=0.9))
    tx_sam = optax.chain(sj.sam(rho=0.1), optax.sgd(0.1, momentum=0.9))
    p1 = p2 = helpers.tiny_params()
    s1, s2 = tx_au.init(p1), tx_sam.init(p2)
    for _ in range(4):
      p1, s1 = step(tx_au, p1, s1, batch)
      p2, s2 = step(tx_sam, p2, s2, batch)
    chex.assert_trees_all_close(p1, p2, rtol=1e-6, atol=1e-7)
    # Every example of the batch was scored, every step.
    visits = np.asarray(s1[0].visits)
    np.testing.assert_array_equal(visits[np.asarray(batch["ids"])], 4)
    self.assertEqual(visits.sum(), 4 * 16)

  def test_keys_advance_and_samples_change(self):
    tx = optax.chain(sj.ausam(rho=0.05, keep=0.25, num_examples=64),
                     optax.sgd(0.0))
    params, batch = helpers.tiny_params(), helpers.tiny_batch()
    state = tx.init(params)
    step = jax.jit(helpers.train_step, static_argnums=0)
    keys, samples = [], []
    before = np.asarray(state[0].visits)
    for _ in range(6):
      params, state = step(tx, params, state, batch)
      after = np.asarray(state[0].visits)
      samples.append(tuple(np.flatnonzero(after != before)))
      before = after
      keys.append(tuple(np.asarray(state[0].key).tolist()))
    self.assertLen(set(keys), 6)
    self.assertGreater(len(set(samples)), 1)
    for s in samples:
      self.assertLen(s, 4)

  def test_out_of_range_ids_never_touch_another_row(self):
    n = 8
    ids = np.array([0, -1, n, 3, n + 5, -n, 7], np.int32)
    batch = {"x": jnp.asarray(np.random.default_rng(0).normal(size=(7, 5)),
                              jnp.float32),
             "y": jnp.asarray([0, 1, 2, 0, 1, 2, 0], jnp.int32),
             "ids": jnp.asarray(ids)}
    tx = sj.ausam(rho=0.05, keep=1.0, num_examples=n)
    params = helpers.tiny_params()
    state = tx.init(params)
    marker = jnp.arange(n, dtype=jnp.float32) + 100.0
    state = state._replace(scores=marker, visits=jnp.full((n,), 5, jnp.int32))
    grads = helpers.clean_grads(params, batch)
    updates, new = jax.jit(
        lambda s: tx.update(grads, s, params, loss_fn=helpers.loss_fn,
                            batch=batch))(state)
    chex.assert_tree_all_finite(updates)
    scores, visits = np.asarray(new.scores), np.asarray(new.visits)
    # Rows 0, 3, 7 were written once; every other row (the wrap-around
    # targets of -1 and -n included) is untouched.
    np.testing.assert_array_equal(np.flatnonzero(visits == 6), [0, 3, 7])
    untouched = [1, 2, 4, 5, 6]
    np.testing.assert_array_equal(visits[untouched], 5)
    np.testing.assert_array_equal(scores[untouched], np.asarray(marker)[untouched])
    self.assertEqual(int(new.dropped_ids), 4)

  def _update_with_ids(self, ids, n=8, state=None, jit=True):
    """One keep=1 AUSAM update on a batch with ``ids``; returns the state."""
    size = len(ids)
    rng = np.random.default_rng(0)
    batch = {"x": jnp.asarray(rng.normal(size=(size, 5)), jnp.float32),
             "y": jnp.asarray(np.arange(size) % 3, jnp.int32),
             "ids": ids}
    tx = sj.ausam(rho=0.05, keep=1.0, num_examples=n)
    params = helpers.tiny_params()
    if state is None:
      state = tx.init(params)
      state = state._replace(scores=jnp.arange(n, dtype=jnp.float32) + 100.0,
                             visits=jnp.full((n,), 5, jnp.int32))
    grads = helpers.clean_grads(params, batch)
    update = lambda s, b: tx.update(grads, s, params, loss_fn=helpers.loss_fn,
                                    batch=b)
    if jit:
      update = jax.jit(update)
    return update(state, batch)[1]

  def test_ids_wider_than_int32_never_touch_another_row(self):
    """2**32 + 5 narrowed to int32 would be row 5, -(2**32) + 1 row 1."""
    ids = np.array([0, 2**32 + 5, 3, -(2**32) + 1], np.int64)

    def check(new):
      visits = np.asarray(new.visits)
      np.testing.assert_array_equal(np.flatnonzero(visits == 6), [0, 3])
      np.testing.assert_array_equal(np.asarray(new.scores)[[1, 5]],
                                    [101.0, 105.0])
      self.assertEqual(int(new.dropped_ids), 2)

    with jax.enable_x64(True):
      check(self._update_with_ids(jnp.asarray(ids)))
    # Without x64: a NumPy int64 array is checked before JAX narrows it.
    check(self._update_with_ids(ids, jit=False))

  def test_dropped_ids_is_a_running_total(self):
    state = self._update_with_ids(jnp.array([0, -1, 8, 3]))
    self.assertEqual(int(state.dropped_ids), 2)
    state = self._update_with_ids(jnp.array([9, 1, -4, 12]), state=state)
    self.assertEqual(int(state.dropped_ids), 5)

  def test_example_axes_name_the_score_table(self):
    self.assertNotIn("EXAMPLE_AXES", sj.AUSAMState._fields)
    self.assertEqual(sj.AUSAMState.EXAMPLE_AXES, {"scores": 0, "visits": 0})
    state = sj.ausam(rho=0.05, num_examples=11).init(helpers.tiny_params())
    for field, axis in state.EXAMPLE_AXES.items():
      self.assertEqual(getattr(state, field).shape[axis], 11, field)

  def test_table_is_updated_in_place(self):
    # A donated state must not be copied: the compiled step holds no copy of
    # an array of the table's shape.
    n = 5003
    tx = optax.chain(sj.ausam(rho=0.05, keep=0.5, num_examples=n),
                     optax.sgd(0.1))
    params, batch = helpers.tiny_params(), helpers.tiny_batch(size=16,
                                                              num_examples=n)

    def step(params, state, batch):
      return helpers.train_step(tx, params, state, batch)

    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(
        params, tx.init(params), batch).compile()
    text = compiled.as_text()
    self.assertIn(f"[{n}]", text)
    copies = [line for line in text.splitlines()
              if re.search(r"\bcopy(-start)?\(", line) and f"[{n}]" in line]
    self.assertEqual(copies, [])

  def test_both_passes_run_on_the_static_sample(self):
    tx = sj.ausam(rho=0.05, keep=0.25, num_examples=64)
    params, batch = helpers.tiny_params(), helpers.tiny_batch(size=16)
    grads = helpers.clean_grads(params, batch)
    text = str(jax.make_jaxpr(
        lambda g, s, p: tx.update(g, s, p, loss_fn=helpers.loss_fn,
                                  batch=batch))(grads, tx.init(params), params))
    self.assertIn("f32[4,8]", text)  # hidden layer on the 4 sampled examples
    self.assertNotIn("f32[16,8]", text)  # never on the whole batch


class AusamCostTest(parameterized.TestCase):

  def test_both_passes_and_nothing_else_run_on_the_sample(self):
    # Two forward-backward passes on the 8 sampled examples (2 convolutions
    # each on this one-layer model); the caller's clean pass on the whole
    # batch is dead code, since AUSAM does not use its gradient or value.
    params, batch = helpers.conv_problem(16)
    tx = optax.chain(sj.ausam(rho=0.1, keep=0.5, num_examples=16),
                     optax.sgd(0.1))
    shapes = helpers.compiled_convolutions(tx, params, batch)
    self.assertEqual(sorted(shapes), ["f32[2,3,4]"] * 2 + ["f32[8,10,4]"] * 2)


class AusamValidationTest(parameterized.TestCase):

  @parameterized.parameters(
      (dict(rho=-0.1), "rho"),
      (dict(keep=0.0), "keep"),
      (dict(keep=1.01), "keep"),
      (dict(f_min=0.0), "f_min"),
      (dict(f_min=0.6, f_max=0.5), "f_max"),
      (dict(transition_steps=-1), "transition_steps"),
      (dict(num_examples=0), "num_examples"),
  )
  def test_bad_hyperparameters_raise_at_construction(self, kwargs, name):
    with pytest.raises(ValueError, match=name):
      sj.ausam(**{"num_examples": 10, **kwargs})

  def test_num_examples_is_required(self):
    with pytest.raises(ValueError, match="num_examples"):
      sj.ausam(rho=0.05)

  def test_batch_without_ids_raises(self):
    tx = sj.ausam(num_examples=64)
    params, batch = helpers.tiny_params(), helpers.tiny_batch()
    batch = {"x": batch["x"], "y": batch["y"]}
    with pytest.raises(ValueError, match="ids"):
      tx.update(helpers.clean_grads(params, batch), tx.init(params), params,
                loss_fn=helpers.loss_fn, batch=batch)
    with pytest.raises(ValueError, match="ids"):
      tx.update(helpers.clean_grads(params, batch), tx.init(params), params,
                loss_fn=lambda p, b: helpers.loss_fn(p, {"x": b[0], "y": b[1]}),
                batch=(batch["x"], batch["y"]))


class AusamPmapTest(parameterized.TestCase):

  def test_devices_stay_identical_under_pmap(self):
    # Each device samples from its own shard; the gradients are averaged and
    # every device writes every device's score rows, so after two steps the
    # parameters and the tables are the same on every device.
    n = 4
    tx = optax.chain(
        sj.ausam(rho=0.1, keep=0.5, num_examples=64, axis_name="d"),
        optax.sgd(0.1, momentum=0.9))
    single = optax.chain(sj.ausam(rho=0.1, keep=0.5, num_examples=64),
                         optax.sgd(0.1, momentum=0.9))
    params = helpers.tiny_params()
    batch = helpers.tiny_batch(size=8 * n)
    shards = jax.tree.map(lambda x: x.reshape(n, 8, *x.shape[1:]), batch)

    def device_step(params, state, shard):
      grads = helpers.clean_grads(params, shard)
      updates, state = tx.update(grads, state, params, loss_fn=helpers.loss_fn,
                                 batch=shard, data_axis_name="d")
      return optax.apply_updates(params, updates), state, updates

    step = jax.pmap(device_step, axis_name="d", devices=jax.devices()[:n])
    replicate = lambda t: jax.tree.map(lambda x: jnp.stack([x] * n), t)
    p, s = replicate(params), replicate(tx.init(params))
    for t in range(2):
      p, s, updates = step(p, s, shards)
      if t == 0:
        # The update is the mean of the devices' own AUSAM updates.
        per_device = [
            single.update(helpers.clean_grads(params, shard), single.init(
                params), params, loss_fn=helpers.loss_fn, batch=shard)[0]
            for shard in (jax.tree.map(lambda x, i=i: x[i], shards)
                          for i in range(n))]
        want = jax.tree.map(lambda *u: jnp.mean(jnp.stack(u), 0), *per_device)
        chex.assert_trees_all_close(jax.tree.map(lambda x: x[0], updates),
                                    want, atol=1e-6, rtol=1e-5)
    for i in range(1, n):
      chex.assert_trees_all_equal(jax.tree.map(lambda x, i=i: x[i], p),
                                  jax.tree.map(lambda x: x[0], p))
      chex.assert_trees_all_equal(jax.tree.map(lambda x, i=i: x[i], s),
                                  jax.tree.map(lambda x: x[0], s))
    # Every device's 4 sampled rows were written, on both steps.
    visits = np.asarray(s[0].visits[0])
    self.assertEqual(int(visits.sum()), 2 * n * 4)
    self.assertTrue(set(np.flatnonzero(visits)) <= set(
        np.asarray(batch["ids"]).tolist()))
