"""MESA: the EMA teacher against a hand-computed sequence, the gate, the KL."""

from __future__ import annotations

import warnings

from absl.testing import parameterized
import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import sharpjax as sj
from sharpjax import training

from tests.test_saf import np_penalty

B, C = 4, 3


class MesaTest(parameterized.TestCase):

  def test_ema_of_parameters_and_model_state(self):
    d = 0.9
    tx = sj.mesa(decay=d, start_epoch=0)
    thetas = [np.array([1.0, -2.0]), np.array([3.0, 0.5]),
              np.array([-1.0, 4.0]), np.array([0.0, 0.0])]
    stats = [np.array([0.5]), np.array([1.5]), np.array([2.5]),
             np.array([3.5])]
    state = tx.init({"w": jnp.asarray(thetas[0], jnp.bfloat16)})
    state = sj.init_teacher_model_state(state, {"mean": jnp.asarray(stats[0])})
    v, s = thetas[0].copy(), stats[0].copy()  # v_0 = theta_0
    update = jax.jit(lambda st, p, m: tx.update(None, st, p, model_state=m))
    for theta, stat in zip(thetas, stats):
      teacher_params, teacher_state = sj.teacher(state)
      np.testing.assert_allclose(teacher_params["w"], v, rtol=1e-6)
      np.testing.assert_allclose(teacher_state["mean"], s, rtol=1e-6)
      _, state = update(state, {"w": jnp.asarray(theta, jnp.bfloat16)},
                        {"mean": jnp.asarray(stat)})
      v = d * v + (1 - d) * theta
      s = d * s + (1 - d) * stat
    # Kept in float32 even for bfloat16 parameters: 1 - decay is below the
    # resolution of bfloat16, whose EMA would not move.
    chex.assert_type(sj.teacher(state)[0]["w"], jnp.float32)
    np.testing.assert_allclose(sj.teacher(state)[0]["w"], v, rtol=1e-6)

  def test_model_state_must_be_passed_once_tracked(self):
    tx = sj.mesa(start_epoch=0)
    state = sj.init_teacher_model_state(tx.init({"w": jnp.ones(2)}),
                                        {"mean": jnp.zeros(1)})
    with pytest.raises(TypeError, match="model_state"):
      tx.update(None, state, {"w": jnp.ones(2)})

  def test_penalty_is_the_tempered_kl_to_the_teacher(self):
    tx = sj.mesa(temperature=2.0, strength=0.5, start_epoch=0)
    state = tx.init({"w": jnp.ones((2, C))})
    x = jnp.asarray(np.random.default_rng(0).normal(size=(B, 2)), jnp.float32)
    logits = jnp.asarray(np.random.default_rng(1).normal(size=(B, C)),
                         jnp.float32)
    teacher_fn = lambda params, model_state: x @ params["w"]
    got = sj.trajectory_penalty(state, logits, teacher_fn=teacher_fn)
    want = np_penalty(np.asarray(logits), np.asarray(x @ jnp.ones((2, C))),
                      np.ones(B, bool), 2.0, 0.5)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    given = sj.trajectory_penalty(state, logits,
                                  teacher_logits=x @ jnp.ones((2, C)))
    np.testing.assert_allclose(given, want, rtol=1e-5)
    per_example = sj.trajectory_penalty(state, logits, teacher_fn=teacher_fn,
                                        per_example=True)
    np.testing.assert_allclose(per_example.mean(), want, rtol=1e-5)
    # The teacher is a constant: the gradient flows only through the logits.
    g = jax.grad(lambda w: sj.trajectory_penalty(
        state, logits, teacher_fn=lambda p, _: x @ w))(jnp.ones((2, C)))
    np.testing.assert_array_equal(g, np.zeros((2, C)))

  def test_no_teacher_forward_before_start_epoch(self):
    """The teacher forward sits under lax.cond: it runs only from start_epoch
    on (counted by a host callback that fires when the branch executes)."""
    calls = []
    tx = optax.chain(sj.mesa(start_epoch=2, steps_per_epoch=3), optax.sgd(0.1))
    params = {"w": jnp.ones((2, C))}
    x = jnp.ones((B, 2))
    y = jnp.zeros(B, jnp.int32)

    def teacher_fn(teacher_params, _):
      jax.debug.callback(lambda: calls.append(1))
      return x @ teacher_params["w"]

    @jax.jit
    def step(params, opt_state):
      def loss(p):
        logits = x @ p["w"]
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return ce + sj.trajectory_penalty(opt_state, logits,
                                          teacher_fn=teacher_fn)
      grads = jax.grad(loss)(params)
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state

    opt_state = tx.init(params)
    counts = []
    for _ in range(9):  # epochs 0, 1 (no teacher), then 2
      params, opt_state = step(params, opt_state)
      jax.effects_barrier()
      counts.append(len(calls))
    self.assertEqual(counts[:6], [0] * 6)
    self.assertEqual(counts[6:], [1, 2, 3])

  def test_errors(self):
    with pytest.raises(ValueError, match="steps_per_epoch"):
      sj.mesa()  # start_epoch=5 needs to know where epoch 5 begins
    with pytest.raises(ValueError, match="decay"):
      sj.mesa(decay=1.0, start_epoch=0)
    with pytest.raises(ValueError, match="temperature"):
      sj.mesa(temperature=-1.0, start_epoch=0)
    tx = sj.mesa(start_epoch=0)
    state = tx.init({"w": jnp.ones((2, C))})
    with pytest.raises(TypeError, match="teacher_fn"):
      sj.trajectory_penalty(state, jnp.zeros((B, C)))
    with pytest.raises(ValueError, match="teacher_fn returned shape"):
      sj.trajectory_penalty(state, jnp.zeros((B, C)),
                            teacher_fn=lambda p, s: jnp.zeros((B, C + 1)))
    with pytest.raises(TypeError, match="params"):
      tx.update(None, state)
    with pytest.raises(ValueError, match="exactly one"):
      sj.teacher(optax.sgd(0.1).init({"w": jnp.ones(2)}))

  def test_teacher_shares_no_buffer_with_the_parameters(self):
    """A user's step that donates params and the optimizer state (and the
    model state) must run: the teacher holds copies, not the same arrays."""
    params = {"w": jnp.asarray(np.random.default_rng(0).normal(size=(2, C)),
                               jnp.float32)}
    stats = {"mean": jnp.zeros(C, jnp.float32)}
    tx = optax.chain(sj.mesa(decay=0.5, start_epoch=0), optax.sgd(0.1))
    opt_state = sj.init_teacher_model_state(tx.init(params), stats)
    teacher_params, teacher_stats = sj.teacher(opt_state)
    self.assertNotEqual(teacher_params["w"].unsafe_buffer_pointer(),
                        params["w"].unsafe_buffer_pointer())
    self.assertNotEqual(teacher_stats["mean"].unsafe_buffer_pointer(),
                        stats["mean"].unsafe_buffer_pointer())
    x = jnp.ones((B, 2))

    def step(params, stats, opt_state):
      def loss(p):
        logits = x @ p["w"] - stats["mean"]
        return jnp.mean(logits ** 2) + sj.trajectory_penalty(
            opt_state, logits,
            teacher_fn=lambda tp, ts: x @ tp["w"] - ts["mean"])
      grads = jax.grad(loss)(params)
      new_stats = {"mean": 0.5 * stats["mean"]
                   + 0.5 * jnp.mean(x @ params["w"], axis=0)}
      updates, opt_state = tx.update(grads, opt_state, params,
                                     model_state=new_stats)
      return optax.apply_updates(params, updates), new_stats, opt_state

    step = jax.jit(step, donate_argnums=(0, 1, 2))
    for _ in range(2):
      params, stats, opt_state = step(params, stats, opt_state)
    chex.assert_tree_all_finite((params, opt_state))

  def test_teacher_batchnorm_statistics_are_their_own_ema(self):
    """make_trainer with a BatchNorm model over three steps: the teacher's
    statistics are the EMA of the student's (not the student's own, which
    differ from step 1 on with decay 0.5 and BatchNorm momentum 0.5), and
    the penalty is the tempered KL to the teacher run in eval mode with them,
    computed here by hand."""

    class Net(nn.Module):

      @nn.compact
      def __call__(self, x, train: bool):
        h = nn.BatchNorm(use_running_average=not train, momentum=0.5)(
            nn.Dense(4)(x))
        return nn.Dense(C)(jnp.tanh(h))

    d, temperature, strength = 0.5, 2.0, 0.5
    tx = optax.chain(sj.mesa(decay=d, temperature=temperature,
                             strength=strength, start_epoch=0),
                     optax.sgd(0.3))
    model = Net()
    trainer = training.make_trainer(model, tx, donate=False)
    rng = np.random.default_rng(3)
    batches = [{"x": rng.normal(size=(8, 3)).astype(np.float32) + k,
                "y": (np.arange(8) % C).astype(np.int32),
                "ids": np.arange(8, dtype=np.int32)} for k in range(3)]
    state = trainer.init(jax.random.key(0), batches[0])
    v = jax.device_get(state.params)  # teacher params by hand
    t = jax.device_get(state.model_state["batch_stats"])  # teacher stats
    separated = False
    for batch in batches:
      teacher_params, teacher_state = sj.teacher(state.opt_state)
      chex.assert_trees_all_close(teacher_params, v, rtol=1e-5, atol=1e-6)
      chex.assert_trees_all_close(teacher_state["batch_stats"], t,
                                  rtol=1e-5, atol=1e-6)
      student, new_stats = model.apply(
          {"params": state.params, **state.model_state}, batch["x"],
          train=True, mutable=["batch_stats"])
      teacher_logits = model.apply({"params": v, "batch_stats": t},
                                   batch["x"], train=False)
      separated |= not np.allclose(
          jax.tree.leaves(t)[0],
          jax.tree.leaves(state.model_state["batch_stats"])[0])
      want = np_penalty(np.asarray(student), np.asarray(teacher_logits),
                        np.ones(8, bool), temperature, strength)
      params_before = jax.device_get(state.params)
      state, metrics = trainer.step(state, batch)
      np.testing.assert_allclose(metrics["penalty"], want, rtol=1e-4,
                                 atol=1e-7)
      self.assertGreater(float(metrics["penalty"]), 0.0)
      v = jax.tree.map(lambda a, b: d * a + (1 - d) * b, v, params_before)
      t = jax.tree.map(lambda a, b: d * a + (1 - d) * b, t,
                       jax.device_get(new_stats["batch_stats"]))
    self.assertTrue(separated, "teacher and student statistics never differed")

  @parameterized.parameters(620, 78_200, 1)
  def test_auto_decay_from_the_planned_steps(self, total_steps):
    tx = sj.mesa(decay="auto", total_steps=total_steps, start_epoch=0)
    state = tx.init({"w": jnp.zeros(2)})
    d = 1.0 - 1.0 / max(2.0, total_steps / 16.0)  # horizon: 1/16 of the run
    self.assertAlmostEqual(sj.mesa_auto_decay(total_steps), d, places=12)
    np.testing.assert_allclose(state.decay, d, rtol=1e-7)
    # The EMA uses it: one update from 0 towards 1 moves the teacher by 1 - d.
    _, state = tx.update(None, state, {"w": jnp.ones(2)})
    np.testing.assert_allclose(sj.teacher(state)[0]["w"],
                               1.0 - np.float32(d), rtol=1e-6)

  def test_a_decay_that_outlasts_the_run_warns(self):
    with pytest.warns(UserWarning, match=r"5000 steps.*total_steps=620"):
      sj.mesa(decay=0.9998, total_steps=620, start_epoch=0)
    with warnings.catch_warnings():
      warnings.simplefilter("error")
      sj.mesa(decay=0.9998, total_steps=78_200, start_epoch=0)
      sj.mesa(decay=0.99, total_steps=620, start_epoch=0)
      sj.mesa(decay=0.9998, start_epoch=0)  # no plan given: nothing to check
    with pytest.raises(ValueError, match="total_steps"):
      sj.mesa(decay="auto", start_epoch=0)
    with pytest.raises(ValueError, match="'auto'"):
      sj.mesa(decay="fast", start_epoch=0)
    with pytest.raises(ValueError, match="total_steps"):
      sj.mesa(decay="auto", total_steps=0, start_epoch=0)

  def test_tracks_model_state_is_a_class_attribute(self):
    self.assertIs(sj.MESAState.TRACKS_MODEL_STATE, True)
    self.assertNotIn("TRACKS_MODEL_STATE", sj.MESAState._fields)
    self.assertFalse(hasattr(sj.SAFState, "TRACKS_MODEL_STATE"))

  @parameterized.named_parameters(
      ("saf", lambda: sj.saf(num_examples=8, num_classes=C, steps_per_epoch=1,
                             delay_epochs=1, start_epoch=0)),
      ("mesa", lambda: sj.mesa(start_epoch=0)),
  )
  def test_penalty_takes_ids_and_teacher_fn_together(self, make):
    """A trainer passes both without knowing the method: each method uses the
    one it needs and ignores the other (same value as with that one only)."""
    tx = optax.chain(make(), optax.sgd(0.1))
    params = {"w": jnp.asarray(np.random.default_rng(2).normal(size=(2, C)),
                               jnp.float32)}
    x = jnp.asarray(np.random.default_rng(0).normal(size=(B, 2)), jnp.float32)
    ids = jnp.arange(B)
    state = tx.init(params)
    logits0 = x @ params["w"]
    _, state = tx.update(params, state, params, logits=logits0, ids=ids)
    logits = 0.5 * logits0
    teacher_fn = lambda p, _: x @ p["w"] + 1.0
    both = sj.trajectory_penalty(state, logits, ids, teacher_fn=teacher_fn)
    if isinstance(sj.find_trajectory_state(state), sj.SAFState):
      alone = sj.trajectory_penalty(state, logits, ids)
    else:
      alone = sj.trajectory_penalty(state, logits, teacher_fn=teacher_fn)
    self.assertGreater(float(alone), 0.0)
    np.testing.assert_array_equal(both, alone)

  def test_one_trajectory_regularizer_per_chain(self):
    tx = optax.chain(sj.mesa(start_epoch=0),
                     sj.saf(num_examples=8, num_classes=C, steps_per_epoch=1))
    with pytest.raises(ValueError, match="several"):
      sj.find_trajectory_state(tx.init({"w": jnp.ones(2)}))
