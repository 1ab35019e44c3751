"""LookSAM against references derived by hand on the quadratic of helpers."""

from __future__ import annotations

from absl.testing import absltest
from absl.testing import parameterized
import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import sharpjax as sj

from tests import helpers

Q = helpers.QUADRATIC_4
W0 = Q.w0
chain, reject, unit = helpers.with_sgd, helpers.reject, helpers.unit


def looksam_reference(rho, k, alpha, steps, per_tensor=False, momentum=0.9):
  parts = [slice(0, 2), slice(2, 4)] if per_tensor else [slice(0, 4)]
  cache = {"g_v": np.zeros(4)}

  def direction(t, w):
    g = Q.grad(w)
    if t % k == 0:
      g_s = Q.sam_grad(w, rho)
      cache["g_v"] = np.concatenate([reject(g_s[s], g[s]) for s in parts])
      return g_s
    g_v = cache["g_v"]
    out = []
    for s in parts:
      n_v = np.linalg.norm(g_v[s])
      ratio = np.linalg.norm(g[s]) / n_v if n_v > 0 else 0.0
      out.append(g[s] + alpha * ratio * g_v[s])
    return np.concatenate(out)

  return Q.descend(direction, steps, momentum=momentum)


def host_scheduled_run(tx, steps, loss_fn=Q.loss):
  """Runs ``tx`` with LookSAM's branch chosen on the host (``full_step``).

  Returns the parameters and states after each step, and the two compiled
  steps' HLO texts.
  """

  def step(params, state, batch, full_step):
    grads = jax.grad(lambda p: Q.loss(p, batch).mean())(params)
    updates, state = tx.update(grads, state, params, loss_fn=loss_fn,
                               batch=batch, full_step=full_step)
    return optax.apply_updates(params, updates), state

  step = jax.jit(step, static_argnums=3)
  params = Q.params()
  state = tx.init(params)
  # Read once; from then on the count is kept on the host.
  count, period = int(state[0].count), int(state[0].period)
  history = []
  for _ in range(steps):
    params, state = step(params, state, Q.batch, count % period == 0)
    count += 1
    history.append((params, state))
  texts = {flag: step.lower(params, state, Q.batch, flag).compile().as_text()
           for flag in (True, False)}
  return history, texts


class LookSAMTest(parameterized.TestCase):

  @parameterized.product(k=[2, 3], granularity=["global", "per_tensor"],
                         branch=["cond", "select"])
  def test_matches_hand_derived_recursion_across_k_boundaries(
      self, k, granularity, branch):
    rho, alpha, steps = 0.3, 0.7, 8
    got, state = Q.run(chain(sj.looksam(rho=rho, k=k, alpha=alpha,
                                        granularity=granularity,
                                        branch=branch)), steps)
    want = looksam_reference(rho, k, alpha, steps,
                             per_tensor=granularity == "per_tensor")
    np.testing.assert_allclose(Q.flat(got), want, rtol=1e-5, atol=1e-6)
    self.assertIsInstance(state[0], sj.LookSAMState)

  def test_reuse_step_adds_a_nonzero_correction(self):
    # Guards the reference above against a degenerate g_v: after one full
    # step, the reuse direction differs from the plain gradient.
    tx = sj.looksam(rho=0.3, k=5, alpha=0.7)
    params = Q.params()
    grads = jax.grad(lambda p: Q.loss(p, Q.batch).mean())(params)
    _, state = helpers.jit_update(tx, grads, tx.init(params), params,
                                  loss_fn=Q.loss, batch=Q.batch)
    d, _ = helpers.jit_update(tx, grads, state, params, loss_fn=Q.loss,
                              batch=Q.batch)
    g_v = Q.flat(state.g_v)
    self.assertGreater(np.linalg.norm(g_v), 1e-2)
    np.testing.assert_allclose(
        Q.flat(d), Q.grad(W0) + 0.7 * np.linalg.norm(Q.grad(W0)) * unit(g_v),
        rtol=1e-5)

  def test_k_one_is_sam(self):
    got, _ = Q.run(chain(sj.looksam(rho=0.3, k=1)), 5)
    want, _ = Q.run(chain(sj.sam(rho=0.3)), 5)
    chex.assert_trees_all_close(got, want, atol=1e-7)

  @staticmethod
  def _steps_with_a_second_pass(branch, num_steps):
    """Runs jitted LookSAM (k=3) steps; returns the steps whose perturbed
    loss was evaluated, and the compiled step's HLO text.

    The loss_fn reports, from inside the compiled step, the step at which it
    is evaluated; the clean gradient uses a loss without the callback.
    """
    seen = []

    def counting_loss(params, batch):
      jax.debug.callback(lambda s: seen.append(int(s)), batch["step"][0])
      return Q.loss(params, batch)

    tx = chain(sj.looksam(rho=0.3, k=3, alpha=0.7, branch=branch))

    @jax.jit
    def step(params, state, batch):
      grads = jax.grad(lambda p: Q.loss(p, batch).mean())(params)
      updates, state = tx.update(grads, state, params, loss_fn=counting_loss,
                                 batch=batch)
      return optax.apply_updates(params, updates), state

    params = Q.params()
    state = tx.init(params)
    for t in range(num_steps):
      batch = {**Q.batch, "step": jnp.full((4,), t, jnp.int32)}
      params, state = step(params, state, batch)
    jax.effects_barrier()
    return sorted(set(seen)), step.lower(params, state, batch).compile(
        ).as_text()

  def test_skipped_steps_do_not_run_the_second_pass(self):
    seen, hlo = self._steps_with_a_second_pass("cond", 8)
    self.assertEqual(seen, [0, 3, 6])
    # And the compiled step branches instead of computing both and selecting.
    self.assertIn("conditional", hlo)

  def test_select_branch_runs_the_second_pass_on_every_step(self):
    # The control for the test above: branch="select" has no conditional and
    # evaluates the perturbed loss at every step (keeping it on full steps).
    seen, hlo = self._steps_with_a_second_pass("select", 4)
    self.assertEqual(seen, [0, 1, 2, 3])
    self.assertNotIn("conditional", hlo)

  def test_diagnostics_on_full_and_reuse_steps(self):
    tx = sj.looksam(rho=0.3, k=2)
    params = Q.params()
    grads = jax.grad(lambda p: Q.loss(p, Q.batch).mean())(params)
    _, state = helpers.jit_update(tx, grads, tx.init(params), params,
                                  loss_fn=Q.loss, batch=Q.batch)
    full = sj.diagnostics(state)
    np.testing.assert_allclose(full["perturbation_norm"], 0.3, rtol=1e-6)
    np.testing.assert_allclose(full["grad_norm"], np.linalg.norm(Q.grad(W0)),
                               rtol=1e-6)
    self.assertEqual(float(full["measured"]), 1.0)
    _, state = helpers.jit_update(tx, grads, state, params, loss_fn=Q.loss,
                                  batch=Q.batch, value=jnp.asarray(1.5))
    reuse = sj.diagnostics(state)
    # Not measured on this step: flagged, and 0 rather than NaN.
    self.assertEqual(float(reuse["measured"]), 0.0)
    for name in ("perturbation_norm", "applied_perturbation_norm",
                 "perturbed_loss", "cosine"):
      self.assertEqual(float(reuse[name]), 0.0, name)
    self.assertEqual(float(reuse["clean_loss"]), 1.5)
    np.testing.assert_allclose(reuse["grad_norm"], np.linalg.norm(Q.grad(W0)),
                               rtol=1e-6)

  def test_k_injected_as_a_hyperparameter_is_live(self):
    tx = chain(optax.inject_hyperparams(sj.looksam)(rho=0.3, k=3, alpha=0.7))
    got, state = Q.run(tx, 7)
    np.testing.assert_allclose(Q.flat(got), looksam_reference(0.3, 3, 0.7, 7),
                               rtol=1e-5, atol=1e-6)
    self.assertEqual(int(state[0].inner_state.period), 3)

  def test_cache_is_float32_with_bfloat16_parameters(self):
    tx = sj.looksam(rho=0.05, k=2)
    params = helpers.tiny_params(jnp.bfloat16)
    batch = helpers.tiny_batch()
    grads = helpers.clean_grads(params, batch)
    updates, state = helpers.jit_update(
        tx, grads, tx.init(params), params,
        **helpers.update_kwargs(params, batch))
    chex.assert_trees_all_equal_dtypes(updates, params)
    for leaf in jax.tree.leaves(state.g_v):
      chex.assert_type(leaf, jnp.float32)
    # The cache is the float32 rejection of the (upcast) perturbed gradient
    # from the clean one, not a bfloat16 rounding of it.
    g_s = jax.tree.map(lambda u: u.astype(jnp.float32), updates)
    g = jax.tree.map(lambda x: x.astype(jnp.float32), grads)
    flat = lambda t: np.concatenate(
        [np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(t)])
    np.testing.assert_allclose(flat(state.g_v), reject(flat(g_s), flat(g)),
                               rtol=1e-4, atol=1e-6)


class HostScheduleTest(parameterized.TestCase):

  def test_state_declares_the_host_schedule(self):
    self.assertTrue(sj.LookSAMState.HOST_SCHEDULED)
    self.assertNotIn("HOST_SCHEDULED", sj.LookSAMState._fields)
    state = sj.looksam(k=4).init(Q.params())
    chex.assert_type(state.period, jnp.int32)
    self.assertEqual(int(state.period), 4)
    self.assertEqual(jnp.shape(state.period), ())

  @parameterized.product(granularity=["global", "per_tensor"], k=[2, 3])
  def test_host_flag_equals_the_cond_run_step_for_step(self, granularity, k):
    tx = chain(sj.looksam(rho=0.3, k=k, alpha=0.7, granularity=granularity))
    history, texts = host_scheduled_run(tx, 7)
    # The compiled steps hold no conditional: the branch was chosen on the
    # host (the cond run below does hold one, see LookSAMTest).
    for flag, text in texts.items():
      self.assertNotIn("conditional", text, flag)
    cond_history = []
    params = Q.params()
    state = tx.init(params)

    @jax.jit
    def cond_step(params, state):
      grads = jax.grad(lambda p: Q.loss(p, Q.batch).mean())(params)
      updates, state = tx.update(grads, state, params, loss_fn=Q.loss,
                                 batch=Q.batch)
      return optax.apply_updates(params, updates), state

    for _ in range(7):
      params, state = cond_step(params, state)
      cond_history.append((params, state))
    for t, ((p_host, s_host), (p_cond, s_cond)) in enumerate(
        zip(history, cond_history)):
      chex.assert_trees_all_close(p_host, p_cond, atol=1e-7, rtol=1e-6,
                                  custom_message=f"step {t}")
      chex.assert_trees_all_close(s_host, s_cond, atol=1e-7, rtol=1e-6,
                                  custom_message=f"step {t}")
    np.testing.assert_allclose(
        Q.flat(history[-1][0]), looksam_reference(0.3, k, 0.7, 7,
                                                  granularity == "per_tensor"),
        rtol=1e-5, atol=1e-6)

  def test_reuse_step_skips_the_second_pass(self):
    seen = []

    def counting_loss(params, batch):
      jax.debug.callback(lambda: seen.append(1))
      return Q.loss(params, batch)

    tx = chain(sj.looksam(rho=0.3, k=3))
    history, _ = host_scheduled_run(tx, 6, loss_fn=counting_loss)
    jax.effects_barrier()
    self.assertLen(seen, 2)  # steps 0 and 3
    measured = [float(s[0].diagnostics.measured) for _, s in history]
    self.assertEqual(measured, [1.0, 0.0, 0.0, 1.0, 0.0, 0.0])

  def test_full_step_must_be_a_python_bool(self):
    tx = sj.looksam(k=2)
    params = Q.params()
    grads = jax.grad(lambda p: Q.loss(p, Q.batch).mean())(params)
    with self.assertRaisesRegex(TypeError, "full_step must be a Python bool"):
      jax.jit(lambda s, f: tx.update(grads, s, params, loss_fn=Q.loss,
                                     batch=Q.batch, full_step=f))(
                                         tx.init(params), True)


class LookSAMValidationTest(parameterized.TestCase):

  def test_validation(self):
    for bad in (0, 2.5, -1):
      with self.assertRaisesRegex(ValueError, "k must be"):
        sj.looksam(k=bad)
    with self.assertRaisesRegex(ValueError, "granularity"):
      sj.looksam(granularity="layer")
    with self.assertRaisesRegex(ValueError, r"branch must be one of \('cond', "
                                r"'select'\), got 'where'"):
      sj.looksam(branch="where")
    with self.assertRaisesRegex(ValueError, "alpha"):
      sj.looksam(alpha=-0.5)


if __name__ == "__main__":
  absltest.main()
