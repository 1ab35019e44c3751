"""SAF: the penalty against a numpy replay of the bank, gates, ids, cost."""

from __future__ import annotations

import re

from absl.testing import parameterized
import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import sharpjax as sj

N, C, D, B = 14, 4, 3, 4  # examples, classes, features, batch
FEATURES = np.random.default_rng(0).normal(size=(N, D)).astype(np.float32)
LABELS = np.arange(N) % C


def np_log_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def np_penalty(logits, targets, valid, temperature, strength):
  """strength * T^2 * mean over valid examples of KL(past || now)."""
  if not valid.any():
    return 0.0
  log_p = np_log_softmax(targets / temperature)
  log_q = np_log_softmax(logits / temperature)
  kl = (np.exp(log_p) * (log_p - log_q)).sum(-1)
  return strength * temperature**2 * kl[valid].mean()


def make_batch(ids):
  ids = np.asarray(ids, np.int32)
  return {"x": jnp.asarray(FEATURES[np.clip(ids, 0, N - 1)]),
          "y": jnp.asarray(LABELS[np.clip(ids, 0, N - 1)]),
          "ids": jnp.asarray(ids)}


def logits_of(params, x):
  return x @ params["w"]


def make_step(tx):
  def step(params, opt_state, batch):
    def loss_fn(p):
      logits = logits_of(p, batch["x"])
      ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])
      penalty = sj.trajectory_penalty(opt_state, logits, batch["ids"])
      return ce.mean() + penalty, (logits, penalty)

    (_, (logits, penalty)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params)
    updates, opt_state = tx.update(grads, opt_state, params, logits=logits,
                                   ids=batch["ids"])
    return optax.apply_updates(params, updates), opt_state, penalty
  return step


def init_params():
  return {"w": jnp.asarray(
      np.random.default_rng(1).normal(size=(D, C)), jnp.float32)}


class SafReplayTest(parameterized.TestCase):

  @parameterized.parameters((2, 2), (3, 4), (1, 0))
  def test_penalty_matches_a_numpy_replay(self, delay, start):
    """Reshuffled ids every epoch; 2 of 14 examples miss each epoch (3 batches
    of 4), so some targets are absent and those examples must not count."""
    spe, temperature, strength = 3, 2.0, 0.5
    tx = optax.chain(
        sj.saf(num_examples=N, num_classes=C, steps_per_epoch=spe,
               delay_epochs=delay, temperature=temperature,
               strength=strength, start_epoch=start),
        optax.sgd(0.5))
    params, opt_state = init_params(), None
    opt_state = tx.init(params)
    step = jax.jit(make_step(tx))
    history = {}  # (epoch, id) -> logits written in that epoch
    rng = np.random.default_rng(2)
    checked_partial = False
    for epoch in range(7):
      order = rng.permutation(N)
      for b in range(spe):
        ids = order[b * B:(b + 1) * B]
        batch = make_batch(ids)
        now = np.asarray(logits_of(params, batch["x"]))
        targets = np.zeros_like(now)
        valid = np.zeros(B, bool)
        for k, i in enumerate(ids):
          if epoch >= start and (epoch - delay, i) in history:
            targets[k], valid[k] = history[(epoch - delay, i)], True
        want = np_penalty(now, targets, valid, temperature, strength)
        params, opt_state, got = step(params, opt_state, batch)
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-6)
        checked_partial |= 0 < valid.sum() < B
        for k, i in enumerate(ids):
          history[(epoch, i)] = now[k]
    self.assertTrue(checked_partial, "the schedule never had missing targets")

  def test_only_a_record_from_exactly_delay_epochs_ago_counts(self):
    # Example 0 is seen in epoch 0, skipped in epoch 1, seen in epoch 2. With
    # one slot (delay 1) its row still holds epoch 0's logits at epoch 2: stale.
    tx = sj.saf(num_examples=N, num_classes=C, steps_per_epoch=1,
                delay_epochs=1, start_epoch=0)
    state = tx.init(None)
    logits = jnp.ones((1, C)) * jnp.arange(C)
    _, state = tx.update(None, state, logits=logits, ids=jnp.array([0]))
    self.assertGreater(float(sj.trajectory_penalty(
        state, jnp.zeros((1, C)), jnp.array([0]))), 0.0)  # epoch 1: target
    _, state = tx.update(None, state, logits=logits, ids=jnp.array([5]))
    self.assertEqual(float(sj.trajectory_penalty(
        state, jnp.zeros((1, C)), jnp.array([0]))), 0.0)  # epoch 2: stale

  def test_start_epoch_gates_the_penalty(self):
    tx = sj.saf(num_examples=N, num_classes=C, steps_per_epoch=1,
                delay_epochs=1, start_epoch=3)
    state = tx.init(None)
    ids = jnp.arange(B)
    penalties = []
    for epoch in range(5):
      logits = jnp.full((B, C), float(epoch)) * jnp.arange(C)
      penalties.append(float(sj.trajectory_penalty(state, logits * 0.5, ids)))
      _, state = tx.update(None, state, logits=logits, ids=ids)
    self.assertEqual(penalties[:3], [0.0, 0.0, 0.0])
    self.assertGreater(penalties[3], 0.0)
    self.assertTrue(bool(state.diagnostics.penalty_active))

  def test_gradient_is_that_of_ce_plus_the_hand_derived_penalty(self):
    """d/dz of s T^2 KL(p || softmax(z/T)) is s T (softmax(z/T) - p)."""
    temperature, strength = 3.0, 0.7
    tx = sj.saf(num_examples=N, num_classes=C, steps_per_epoch=1,
                delay_epochs=1, temperature=temperature, strength=strength,
                start_epoch=0)
    state = tx.init(None)
    ids = np.array([1, 4, 7, 9])
    past = np.random.default_rng(3).normal(size=(B, C)).astype(np.float32)
    # Only ids 1, 4, 9 get a record: example 7 must not contribute.
    _, state = tx.update(None, state, logits=jnp.asarray(past[[0, 1, 3]]),
                         ids=jnp.asarray(ids[[0, 1, 3]]))
    params, batch = init_params(), make_batch(ids)

    def loss(p):
      logits = logits_of(p, batch["x"])
      ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])
      return ce.mean() + sj.trajectory_penalty(state, logits, batch["ids"])

    grads = jax.grad(loss)(params)
    x = np.asarray(batch["x"])
    z = x @ np.asarray(params["w"])
    softmax = lambda a: np.exp(np_log_softmax(a))
    onehot = np.eye(C)[np.asarray(batch["y"])]
    valid = np.array([1.0, 1.0, 0.0, 1.0])[:, None]
    dz = (softmax(z) - onehot) / B + strength * temperature * valid * (
        softmax(z / temperature) - softmax(past / temperature)) / valid.sum()
    np.testing.assert_allclose(grads["w"], x.T @ dz, rtol=1e-5, atol=1e-6)


class SafIdsTest(parameterized.TestCase):

  def test_out_of_range_ids_touch_no_row(self):
    tx = sj.saf(num_examples=N, num_classes=C, steps_per_epoch=1,
                delay_epochs=1, start_epoch=0)
    state = tx.init(None)
    ids = jnp.array([-1, N, 2, N + 100])  # -1 would wrap to row N-1 in numpy
    logits = jnp.arange(B * C, dtype=jnp.float32).reshape(B, C) + 1.0
    _, state = jax.jit(lambda s: tx.update(None, s, logits=logits, ids=ids))(
        state)
    bank = np.asarray(state.logit_bank[0])
    written = np.flatnonzero(np.abs(bank).sum(-1))
    np.testing.assert_array_equal(written, [2])
    np.testing.assert_array_equal(bank[2], np.asarray(logits[2]))
    np.testing.assert_array_equal(np.asarray(state.recorded_epoch[0]) >= 0,
                                  np.arange(N) == 2)
    self.assertEqual(int(sj.diagnostics(state)["dropped_ids"]), 3)
    # Reading: bad ids have no target, so only example 2 counts.
    penalty = sj.trajectory_penalty(state, jnp.zeros((B, C)), ids)
    want = np_penalty(np.zeros((1, C)), np.asarray(logits[2:3]),
                      np.array([True]), 5.0, 0.3)
    np.testing.assert_allclose(penalty, want, rtol=1e-5)

  @parameterized.named_parameters(
      ("int64", np.int64, [2**32 + 5, 3, -(2**32) + 1, 2**31 + 2]),
      ("uint64", np.uint64, [2**32 + 5, 3, 2**63 + 1, 2**33 + 2]),
  )
  def test_ids_wider_than_int32_touch_no_row(self, dtype, id_list):
    """Checked in their own dtype before any narrowing: 2**32 + 5 is not row 5
    and -(2**32) + 1 is not row 1 (narrowed to int32 they would be)."""
    ids_np = np.asarray(id_list, dtype)
    logits = jnp.arange(B * C, dtype=jnp.float32).reshape(B, C) + 1.0

    def run(ids, jit):
      tx = sj.saf(num_examples=8, num_classes=C, steps_per_epoch=1,
                  delay_epochs=1, start_epoch=0)
      update = lambda s, ids: tx.update(None, s, logits=logits, ids=ids)
      if jit:
        update = jax.jit(update)
      _, state = update(tx.init(None), ids)
      bank = np.asarray(state.logit_bank[0])
      np.testing.assert_array_equal(np.flatnonzero(np.abs(bank).sum(-1)), [3])
      np.testing.assert_array_equal(bank[3], np.asarray(logits[1]))
      self.assertEqual(int(sj.diagnostics(state)["dropped_ids"]), 3)
      penalty = sj.trajectory_penalty(state, jnp.zeros((B, C)), ids)
      want = np_penalty(np.zeros((1, C)), np.asarray(logits[1:2]),
                        np.array([True]), 5.0, 0.3)
      np.testing.assert_allclose(penalty, want, rtol=1e-5)

    with jax.enable_x64(True):  # JAX arrays of the wide dtype, eager and jit
      run(jnp.asarray(ids_np), jit=False)
      run(jnp.asarray(ids_np), jit=True)
    # Without x64 a NumPy array of the wide dtype is checked on the host,
    # before JAX would narrow it.
    run(ids_np, jit=False)

  def test_dropped_ids_is_a_running_total(self):
    tx = sj.saf(num_examples=N, num_classes=C, steps_per_epoch=1,
                delay_epochs=1, start_epoch=0)
    update = jax.jit(lambda s, ids: tx.update(None, s, logits=jnp.ones((B, C)),
                                              ids=ids))
    state = tx.init(None)
    _, state = update(state, jnp.array([-1, 0, N, 1]))
    self.assertEqual(int(sj.diagnostics(state)["dropped_ids"]), 2)
    _, state = update(state, jnp.array([2, N + 7, -5, -3]))
    self.assertEqual(int(sj.diagnostics(state)["dropped_ids"]), 5)
    _, state = update(state, jnp.arange(B))
    self.assertEqual(int(sj.diagnostics(state)["dropped_ids"]), 5)

  def test_an_id_repeated_within_an_epoch_keeps_its_first_row(self):
    """Two steps per epoch, delay 1; id 0 appears twice in epoch 1. Its first
    appearance reads epoch 0's record and writes epoch 1's; the second has no
    target (its slot now holds epoch 1) and must not overwrite that record,
    so epoch 2 reads the logits of id 0's first appearance in epoch 1."""
    temperature, strength = 2.0, 0.5
    tx = sj.saf(num_examples=N, num_classes=C, steps_per_epoch=2,
                delay_epochs=1, temperature=temperature, strength=strength,
                start_epoch=0)
    rng = np.random.default_rng(5)
    schedule = [[0, 1], [2, 3],   # epoch 0
                [0, 1], [0, 2],   # epoch 1: id 0 twice
                [0, 3], [1, 2]]   # epoch 2
    written = {}  # (epoch, id) -> the record a correct bank holds
    valids = []
    state = tx.init(None)
    update = jax.jit(lambda s, z, ids: tx.update(None, s, logits=z, ids=ids))
    for step, ids in enumerate(schedule):
      epoch = step // 2
      logits = jnp.asarray(rng.normal(size=(2, C)), jnp.float32)
      now = jnp.asarray(rng.normal(size=(2, C)), jnp.float32)
      targets = np.zeros((2, C), np.float32)
      valid = np.zeros(2, bool)
      for k, i in enumerate(ids):
        if (epoch - 1, i) in written and (epoch, i) not in written:
          targets[k], valid[k] = written[(epoch - 1, i)], True
      got = sj.trajectory_penalty(state, now, jnp.asarray(ids))
      want = np_penalty(np.asarray(now), targets, valid, temperature,
                        strength)
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
      valids.append(valid)
      _, state = update(state, logits, jnp.asarray(ids))
      for k, i in enumerate(ids):
        written.setdefault((epoch, i), np.asarray(logits[k]))
    # The replay's expectations: step 3 (id 0's second appearance) has no
    # target for id 0, step 4 reads the first row of epoch 1.
    np.testing.assert_array_equal(valids[3], [False, True])
    np.testing.assert_array_equal(valids[4], [True, False])
    np.testing.assert_array_equal(np.asarray(state.logit_bank[0, 0]),
                                  written[(2, 0)])

  def test_bfloat16_bank(self):
    kwargs = dict(num_examples=N, num_classes=C, steps_per_epoch=1,
                  delay_epochs=1, start_epoch=0)
    ids = jnp.arange(B)
    logits = jax.random.normal(jax.random.PRNGKey(0), (B, C))
    out = []
    for dtype in (jnp.float32, jnp.bfloat16):
      tx = sj.saf(**kwargs, bank_dtype=dtype)
      state = tx.init(None)
      _, state = tx.update(None, state, logits=logits, ids=ids)
      chex.assert_type(state.logit_bank, dtype)
      out.append(sj.trajectory_penalty(state, logits * 0.3, ids))
    chex.assert_type(out[1], jnp.float32)
    np.testing.assert_allclose(out[1], out[0], rtol=2e-2)
    self.assertEqual(sj.saf_bank_bytes(N, C, 3, jnp.bfloat16),
                     N * 3 * C * 2 + N * 3 * 4)


class SafStateTest(parameterized.TestCase):

  def test_state_structure(self):
    tx = sj.saf(num_examples=N, num_classes=C, steps_per_epoch=3)
    state = tx.init(init_params())
    self.assertIsInstance(state, sj.SAFState)
    chex.assert_shape(state.logit_bank, (3, N, C))
    chex.assert_shape(state.recorded_epoch, (3, N))
    chex.assert_type(state.recorded_epoch, jnp.int32)
    _, new = tx.update(None, state, logits=jnp.zeros((B, C)),
                       ids=jnp.arange(B))
    chex.assert_trees_all_equal_shapes_and_dtypes(state, new)

  def test_example_axes_name_the_per_example_tables(self):
    """The protocol a trainer reads: each field of EXAMPLE_AXES has the
    examples along the named axis, and the attribute is no pytree field."""
    self.assertNotIn("EXAMPLE_AXES", sj.SAFState._fields)
    self.assertEqual(sj.SAFState.EXAMPLE_AXES,
                     {"logit_bank": 1, "recorded_epoch": 1})
    state = sj.saf(num_examples=N, num_classes=C, steps_per_epoch=3).init(None)
    for field, axis in state.EXAMPLE_AXES.items():
      self.assertEqual(getattr(state, field).shape[axis], N, field)
    self.assertLen(jax.tree.leaves(state), len(sj.SAFState._fields) + 2)

  def test_no_recompilation_across_epoch_boundaries(self):
    tx = optax.chain(sj.saf(num_examples=N, num_classes=C, steps_per_epoch=2,
                            delay_epochs=1, start_epoch=1), optax.sgd(0.1))
    traces = []
    step = make_step(tx)

    @jax.jit
    def counted(params, opt_state, batch):
      traces.append(1)
      return step(params, opt_state, batch)

    params = init_params()
    opt_state = tx.init(params)
    penalties = []
    for k in range(8):  # four epochs: the penalty switches on at epoch 1
      params, opt_state, penalty = counted(
          params, opt_state, make_batch((np.arange(B) + k * B) % N))
      penalties.append(float(penalty))
    self.assertLen(traces, 1)
    self.assertEqual(penalties[:2], [0.0, 0.0])
    self.assertGreater(max(penalties[2:]), 0.0)

  @parameterized.named_parameters(
      ("nested_chain", lambda saf: optax.chain(
          optax.chain(optax.clip(1.0), saf), optax.sgd(0.1))),
      ("inject_hyperparams", lambda saf: optax.chain(
          optax.inject_hyperparams(optax.sgd)(learning_rate=0.1), saf)),
      ("multisteps", lambda saf: optax.MultiSteps(
          optax.chain(saf, optax.sgd(0.1)), every_k_schedule=2)),
  )
  def test_penalty_finds_the_state_in_wrappers(self, wrap):
    saf = sj.saf(num_examples=N, num_classes=C, steps_per_epoch=1,
                 delay_epochs=1, start_epoch=0)
    opt_state = wrap(saf).init(init_params())
    state = sj.find_trajectory_state(opt_state)
    self.assertIsInstance(state, sj.SAFState)
    self.assertEqual(
        float(sj.trajectory_penalty(opt_state, jnp.zeros((B, C)),
                                    jnp.arange(B))), 0.0)

  def test_saf_in_inject_hyperparams_with_static_sizes(self):
    tx = optax.inject_hyperparams(
        sj.saf, static_args=("num_examples", "num_classes", "steps_per_epoch",
                             "delay_epochs", "start_epoch", "bank_dtype"))(
        num_examples=N, num_classes=C, steps_per_epoch=1, delay_epochs=1,
        start_epoch=0, strength=0.3)
    state = tx.init(None)
    state = optax.tree.set(state, strength=jnp.asarray(0.6))
    _, state = tx.update(None, state, logits=jnp.ones((B, C)),
                         ids=jnp.arange(B))
    self.assertAlmostEqual(float(sj.find_trajectory_state(state).strength),
                           0.6, places=6)

  def test_errors(self):
    with pytest.raises(ValueError, match="no SAF or MESA"):
      sj.trajectory_penalty(optax.sgd(0.1).init(init_params()),
                            jnp.zeros((B, C)), jnp.arange(B))
    tx = sj.saf(num_examples=N, num_classes=C, steps_per_epoch=1)
    state = tx.init(None)
    with pytest.raises(TypeError, match="logits"):
      tx.update(None, state, ids=jnp.arange(B))
    with pytest.raises(ValueError, match=r"\[B, 4\]"):
      jax.jit(lambda s: tx.update(None, s, logits=jnp.zeros((B, C + 1)),
                                  ids=jnp.arange(B)))(state)
    with pytest.raises(ValueError, match=r"\[B, 4\]"):
      sj.trajectory_penalty(state, jnp.zeros((B,)), jnp.arange(B))
    with pytest.raises(ValueError, match="integers"):
      tx.update(None, state, logits=jnp.zeros((B, C)), ids=jnp.zeros(B))
    with pytest.raises(ValueError, match="ids must have shape"):
      sj.trajectory_penalty(state, jnp.zeros((B, C)), jnp.arange(B + 1))
    with pytest.raises(TypeError, match="ids"):
      sj.trajectory_penalty(state, jnp.zeros((B, C)))

  @parameterized.parameters(
      (dict(num_examples=0), "num_examples"),
      (dict(num_classes=-1), "num_classes"),
      (dict(steps_per_epoch=0), "steps_per_epoch"),
      (dict(delay_epochs=0), "delay_epochs"),
      (dict(temperature=0.0), "temperature"),
      (dict(strength=-0.1), "strength"),
      (dict(start_epoch=-1), "start_epoch"),
      (dict(num_examples=2.5), "num_examples"),
      (dict(bank_dtype=jnp.int32), "bank_dtype"),
  )
  def test_bad_hyperparameters(self, override, name):
    kwargs = dict(num_examples=N, num_classes=C, steps_per_epoch=1)
    with pytest.raises(ValueError, match=name):
      sj.saf(**{**kwargs, **override})

  def test_a_bank_too_large_is_refused_before_allocation(self):
    with pytest.raises(ValueError, match="GiB"):
      sj.saf(num_examples=10**9, num_classes=1000, steps_per_epoch=1)
    # Sharded over many devices it may fit: the check can be turned off
    # (nothing is allocated until init).
    sj.saf(num_examples=10**9, num_classes=1000, steps_per_epoch=1,
           check_memory=False)


class SafCompositionTest(parameterized.TestCase):

  def test_per_example_penalty_averages_to_the_penalty(self):
    tx = sj.saf(num_examples=N, num_classes=C, steps_per_epoch=1,
                delay_epochs=1, start_epoch=0)
    state = tx.init(None)
    _, state = tx.update(None, state, logits=jnp.ones((2, C)) * jnp.arange(C),
                         ids=jnp.array([0, 1]))
    logits, ids = jnp.zeros((B, C)), jnp.array([0, 5, 1, 6])
    per_example = sj.trajectory_penalty(state, logits, ids, per_example=True)
    chex.assert_shape(per_example, (B,))
    np.testing.assert_allclose(per_example.mean(),
                               sj.trajectory_penalty(state, logits, ids),
                               rtol=1e-6)
    self.assertEqual(float(per_example[1]), 0.0)

  def test_saf_then_sam_in_one_chain(self):
    """The SAM loss_fn carries the per-example penalty: the chain's update is
    -lr times the gradient of CE + penalty at w + rho g / |g|."""
    rho, lr = 0.1, 0.1
    tx = optax.chain(
        sj.saf(num_examples=N, num_classes=C, steps_per_epoch=1,
               delay_epochs=1, start_epoch=0),
        sj.sam(rho=rho), optax.sgd(lr))
    batch = make_batch(np.arange(B))

    def per_example_loss(opt_state):
      def loss(p, b):
        logits = logits_of(p, b["x"])
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, b["y"])
        return ce + sj.trajectory_penalty(opt_state, logits, b["ids"],
                                          per_example=True)
      return loss

    @jax.jit
    def step(params, opt_state):
      loss = per_example_loss(opt_state)
      grads = jax.grad(lambda p: loss(p, batch).mean())(params)
      updates, opt_state = tx.update(
          grads, opt_state, params, loss_fn=loss, batch=batch,
          logits=logits_of(params, batch["x"]), ids=batch["ids"])
      return optax.apply_updates(params, updates), opt_state, updates

    params = init_params()
    params, opt_state, _ = step(params, tx.init(params))  # fills the bank
    loss = per_example_loss(opt_state)
    g = jax.grad(lambda p: loss(p, batch).mean())(params)
    eps = jax.tree.map(lambda x: rho * x / optax.tree.norm(g), g)
    g_sam = jax.grad(lambda p: loss(optax.apply_updates(p, eps), batch).mean())(
        params)
    self.assertGreater(float(sj.trajectory_penalty(
        opt_state, logits_of(params, batch["x"]) * 2.0, batch["ids"])), 0.0)
    _, opt_state, updates = step(params, opt_state)
    chex.assert_trees_all_close(
        updates, jax.tree.map(lambda x: -lr * x, g_sam), rtol=1e-5, atol=1e-7)
    self.assertEqual(int(sj.diagnostics(opt_state)["epoch"]), 1)
    self.assertTrue(bool(sj.diagnostics(opt_state)["penalty_active"]))

  @parameterized.parameters(
      lambda: optax.sgd(0.1, momentum=0.9),
      lambda: optax.adamw(1e-2),
      lambda: optax.lion(1e-3),
  )
  def test_any_base_optimizer(self, base):
    tx = optax.chain(sj.saf(num_examples=N, num_classes=C, steps_per_epoch=2,
                            delay_epochs=1, start_epoch=0), base())
    params = init_params()
    opt_state = tx.init(params)
    step = jax.jit(make_step(tx))
    for k in range(6):  # each epoch sees ids {e, ..., e + 7}: one of each
      ids = ((k % 2) * B + np.arange(B) + k // 2) % N
      params, opt_state, penalty = step(params, opt_state, make_batch(ids))
    chex.assert_tree_all_finite((params, penalty))
    self.assertGreater(float(penalty), 0.0)


def bank_copies(hlo: str, shape: str) -> list[str]:
  return [l for l in hlo.splitlines() if re.search(r"\bcopy(-start)?\(", l)
          and shape in l.split("=")[1].split("copy")[0]]


class SafCostTest(parameterized.TestCase):

  def test_compiled_step_updates_the_bank_in_place(self):
    n, c = 2000, 10
    tx = optax.chain(sj.saf(num_examples=n, num_classes=c, steps_per_epoch=10,
                            start_epoch=0), optax.sgd(0.1))
    params = {"w": jnp.zeros((D, c))}
    batch = {"x": jnp.ones((8, D)), "y": jnp.zeros(8, jnp.int32),
             "ids": jnp.arange(8)}
    opt_state = tx.init(params)
    step = jax.jit(make_step(tx), donate_argnums=(0, 1))
    hlo = step.lower(params, opt_state, batch).compile().as_text()
    self.assertEmpty(bank_copies(hlo, f"f32[3,{n},{c}]"))

    # Control: the naive write (values independent of the read) does copy the
    # bank, so the check above can fail.
    def naive(bank, logits, ids):
      past = bank.at[0, ids].get()
      return bank.at[0, ids].set(logits), past.sum()

    naive_hlo = jax.jit(naive, donate_argnums=0).lower(
        opt_state[0].logit_bank, jnp.ones((8, c)), jnp.arange(8)
    ).compile().as_text()
    self.assertNotEmpty(bank_copies(naive_hlo, f"f32[3,{n},{c}]"))


class SafShardingTest(parameterized.TestCase):

  def test_bank_sharded_by_example_over_a_mesh(self):
    """Batch sharded over 8 devices, bank sharded over them by example id:
    the same penalties, bank and parameters as one device, and no collective
    moves anything of the bank's size (only batch-sized rows)."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
    n, batch_size, spe = 64, 16, 4
    tx = optax.chain(sj.saf(num_examples=n, num_classes=C, steps_per_epoch=spe,
                            delay_epochs=1, start_epoch=0), optax.sgd(0.5))
    features = np.random.default_rng(4).normal(size=(n, D)).astype(np.float32)

    def batch_at(k):
      ids = np.random.default_rng(k // spe).permutation(n)[
          (k % spe) * batch_size:(k % spe + 1) * batch_size]
      return {"x": jnp.asarray(features[ids]), "y": jnp.asarray(ids % C),
              "ids": jnp.asarray(ids, jnp.int32)}

    def by_example(x):
      if x.ndim >= 2 and x.shape[1] == n:  # bank [slots, n, C], stamps [slots, n]
        return NamedSharding(mesh, P(None, "data"))
      return NamedSharding(mesh, P())

    step = jax.jit(make_step(tx))
    params = init_params()
    single = (params, tx.init(params))
    state = tx.init(params)
    sharded = (jax.device_put(params, NamedSharding(mesh, P())),
               jax.tree.map(lambda x: jax.device_put(x, by_example(x)), state))
    hlo = step.lower(*sharded, jax.device_put(
        batch_at(0), NamedSharding(mesh, P("data")))).compile().as_text()
    for line in hlo.splitlines():
      if re.search(r"all-gather\(|all-reduce\(|all-to-all\(", line):
        self.assertNotRegex(line.split("=")[1].split("(")[0],
                            rf"[\[,]{n}[,\]]")
    for k in range(3 * spe):
      batch = batch_at(k)
      *single, want = step(*single, batch)
      *sharded, got = step(*sharded, jax.device_put(
          batch, NamedSharding(mesh, P("data"))))
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    self.assertGreater(float(want), 0.0)
    chex.assert_trees_all_close(sharded, single, rtol=1e-5, atol=1e-6)
    self.assertEqual(sharded[1][0].logit_bank.sharding.spec[1], "data")
