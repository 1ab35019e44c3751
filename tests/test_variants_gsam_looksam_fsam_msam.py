"""GSAM, LookSAM, F-SAM and mSAM against references derived by hand.

Most checks run on a quadratic, where every gradient has a closed form:
per-example loss l_i(w) = 0.5 (w - c_i)^T A (w - c_i), so the gradient of the
mean loss over a set S of examples is A (w - mean_{i in S} c_i). The numpy
recursions below are written from the papers' update rules, not from the
library's code.
"""

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

# w = [kernel (2,), bias (2,)]; the batch holds 4 centres.
A = np.array([[3.0, 0.5, 0.0, 0.2],
              [0.5, 1.0, 0.2, 0.0],
              [0.0, 0.2, 0.5, 0.1],
              [0.2, 0.0, 0.1, 2.0]])
CENTRES = np.array([[1.0, -2.0, 0.5, 0.3],
                    [0.0, 1.0, 1.5, -1.0],
                    [2.0, 0.5, -1.0, 0.7],
                    [-1.0, 0.0, 0.0, 2.0]])
W0 = np.array([0.3, 0.8, -0.6, 0.1])
LR = 0.1


def quad_loss(params, batch):
  w = jnp.concatenate([params["kernel"], params["bias"]]).astype(jnp.float32)
  d = w[None, :] - batch["c"]
  return 0.5 * jnp.einsum("bi,ij,bj->b", d, jnp.asarray(A, jnp.float32), d)


def quad_params(w=W0):
  return {"kernel": jnp.asarray(w[:2], jnp.float32),
          "bias": jnp.asarray(w[2:], jnp.float32)}


BATCH = {"c": jnp.asarray(CENTRES, jnp.float32)}


def flat(params):
  return np.concatenate([np.asarray(params["kernel"], np.float64),
                         np.asarray(params["bias"], np.float64)])


def grad(w, centres=CENTRES):
  return A @ (w - centres.mean(0))


def unit(v):
  n = np.linalg.norm(v)
  return v / n if n > 0 else np.zeros_like(v)


def reject(a, b):
  """The component of a orthogonal to b."""
  return a - (a @ unit(b)) * unit(b)


def sam_grad(w, rho, centres=CENTRES):
  return grad(w + rho * unit(grad(w, centres)), centres)


def descend(direction_fn, steps, momentum=0.9):
  """Heavy-ball SGD (optax.sgd's form) on directions from direction_fn(t, w)."""
  w, m = W0.copy(), np.zeros_like(W0)
  for t in range(steps):
    m = momentum * m + direction_fn(t, w)
    w = w - LR * m
  return w


def run(tx, steps, batch=BATCH, jit=True, value=False):
  params = quad_params()
  state = tx.init(params)

  def step(params, state):
    grads = jax.grad(lambda p: quad_loss(p, batch).mean())(params)
    kwargs = dict(loss_fn=quad_loss, batch=batch)
    if value:
      kwargs["value"] = quad_loss(params, batch).mean()
    updates, state = tx.update(grads, state, params, **kwargs)
    return optax.apply_updates(params, updates), state

  step = jax.jit(step) if jit else step
  for _ in range(steps):
    params, state = step(params, state)
  return params, state


def jit_update(tx, grads, state, params, **kwargs):
  """One jit-compiled ``tx.update`` (eager dispatch is slower to test)."""
  return jax.jit(lambda g, s, p: tx.update(g, s, p, **kwargs))(
      grads, state, params)


def chain(tx, momentum=0.9):
  return optax.chain(tx, optax.sgd(LR, momentum=momentum or None))


class PmapTest(parameterized.TestCase):

  @parameterized.parameters(
      (sj.gsam, dict(rho=0.3, alpha=0.5)),
      (sj.looksam, dict(rho=0.3, k=2, alpha=0.7)),
      (sj.fsam, dict(rho=0.3, sigma=1.0, lam=0.6)),
  )
  def test_axis_name_with_global_gradient_matches_one_device(self, factory,
                                                             kwargs):
    # One example per device; the clean gradient is pmean-ed first (a global
    # perturbation), so the memory and the direction, averaged over the axis,
    # equal the single-device step.
    want, want_state = run(chain(factory(**kwargs)), 5)
    tx = chain(factory(**kwargs, axis_name="d"))

    def step(params, state, batch):
      grads = jax.grad(lambda p: quad_loss(p, batch).mean())(params)
      grads = jax.lax.pmean(grads, "d")
      updates, state = tx.update(grads, state, params, loss_fn=quad_loss,
                                 batch=batch)
      return optax.apply_updates(params, updates), state

    step = jax.pmap(step, axis_name="d", devices=jax.devices()[:4])
    replicate = lambda t: jax.tree.map(lambda x: jnp.stack([x] * 4), t)
    params = replicate(quad_params())
    state = replicate(tx.init(quad_params()))
    batch = {"c": BATCH["c"][:, None, :]}
    for _ in range(5):
      params, state = step(params, state, batch)
    chex.assert_trees_all_close(jax.tree.map(lambda x: x[0], params), want,
                                atol=1e-6, rtol=1e-5)
    # The state too, but for the cosine: a mean of per-device cosines.
    got_state = jax.tree.map(lambda x: x[0], state)
    for got_s, want_s in zip(got_state, want_state):
      if hasattr(got_s, "diagnostics"):
        got_s = got_s._replace(diagnostics=got_s.diagnostics._replace(
            cosine=want_s.diagnostics.cosine))
      chex.assert_trees_all_close(got_s, want_s, atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------------------
# GSAM
# ---------------------------------------------------------------------------


def gsam_direction(w, rho, alpha, minimize_fp=True):
  g = grad(w)
  g_p = sam_grad(w, rho)
  if minimize_fp:
    return g_p - alpha * reject(g, g_p)
  return g + alpha * reject(g_p, g)


class GSAMTest(parameterized.TestCase):

  @parameterized.product(momentum=[0.0, 0.9], alpha=[0.1, 0.7],
                         minimize_fp=[True, False])
  def test_matches_hand_derived_recursion(self, momentum, alpha, minimize_fp):
    rho = 0.3
    got, _ = run(chain(sj.gsam(rho=rho, alpha=alpha, minimize_fp=minimize_fp),
                       momentum), 6)
    want = descend(lambda t, w: gsam_direction(w, rho, alpha, minimize_fp), 6,
                   momentum)
    np.testing.assert_allclose(flat(got), want, rtol=1e-5, atol=1e-6)

  def test_alpha_zero_is_sam_on_a_small_network(self):
    params, batch = helpers.tiny_params(), helpers.tiny_batch()
    step = jax.jit(helpers.train_step, static_argnums=0)
    results = []
    for tx in (chain(sj.gsam(rho=0.1, alpha=0.0)), chain(sj.sam(rho=0.1))):
      p, s = params, tx.init(params)
      for _ in range(4):
        p, s = step(tx, p, s, batch)
      results.append(p)
    chex.assert_trees_all_close(results[0], results[1], atol=1e-7, rtol=1e-6)

  def test_the_step_is_orthogonal_correction_of_the_perturbed_gradient(self):
    # d - g_p is -alpha times the part of g orthogonal to g_p: it is
    # orthogonal to g_p, so the perturbed loss is unchanged to first order.
    params = quad_params()
    grads = jax.grad(lambda p: quad_loss(p, BATCH).mean())(params)
    d, _ = jit_update(sj.gsam(rho=0.3, alpha=0.5), grads,
        sj.gsam().init(params), params, loss_fn=quad_loss, batch=BATCH)
    g_p = sam_grad(W0, 0.3)
    self.assertAlmostEqual(float((flat(d) - g_p) @ g_p), 0.0, places=5)
    self.assertGreater(np.linalg.norm(flat(d) - g_p), 1e-3)

  def test_rho_and_alpha_schedules_are_evaluated_at_the_count(self):
    rho = lambda c: 0.1 + 0.05 * c
    alpha = lambda c: 0.2 * c
    got, state = run(chain(sj.gsam(rho=rho, alpha=alpha)), 5)
    want = descend(lambda t, w: gsam_direction(w, 0.1 + 0.05 * t, 0.2 * t), 5)
    np.testing.assert_allclose(flat(got), want, rtol=1e-5, atol=1e-6)
    self.assertEqual(int(state[0].count), 5)
    # The last step perturbed with rho(4).
    np.testing.assert_allclose(sj.diagnostics(state)["perturbation_norm"],
                               0.3, rtol=1e-6)

  def test_alpha_is_reachable_by_inject_hyperparams(self):
    tx = optax.inject_hyperparams(sj.gsam)(rho=0.3, alpha=0.1)
    params = quad_params()
    grads = jax.grad(lambda p: quad_loss(p, BATCH).mean())(params)
    state = optax.tree.set(tx.init(params), alpha=jnp.asarray(0.7))
    d, _ = jit_update(tx, grads, state, params, loss_fn=quad_loss, batch=BATCH)
    np.testing.assert_allclose(flat(d), gsam_direction(W0, 0.3, 0.7),
                               rtol=1e-5, atol=1e-6)

  def test_rho_schedule_tied_to_the_learning_rate(self):
    lr = optax.linear_schedule(1.6, 1.6e-2, 100)
    rho = sj.gsam_rho_schedule(lr, rho_max=0.04, rho_min=0.02, lr_max=1.6,
                               lr_min=1.6e-2)
    for count in (0, 37, 100):
      lr_t = float(lr(count))
      want = 0.02 + (0.04 - 0.02) * (lr_t - 1.6e-2) / (1.6 - 1.6e-2)
      np.testing.assert_allclose(float(rho(jnp.asarray(count))), want,
                                 rtol=1e-6)
    with self.assertRaisesRegex(ValueError, "lr_max and lr_min"):
      sj.gsam_rho_schedule(lr, rho_max=0.04, rho_min=0.02, lr_max=1.0,
                           lr_min=1.0)

  def test_validation(self):
    with self.assertRaisesRegex(ValueError, "alpha"):
      sj.gsam(alpha=-0.1)
    with self.assertRaisesRegex(ValueError, "rho"):
      sj.gsam(rho=-1.0)


# ---------------------------------------------------------------------------
# LookSAM
# ---------------------------------------------------------------------------


def looksam_reference(rho, k, alpha, steps, per_tensor=False, momentum=0.9):
  parts = [slice(0, 2), slice(2, 4)] if per_tensor else [slice(0, 4)]
  cache = {"g_v": np.zeros(4)}

  def direction(t, w):
    g = grad(w)
    if t % k == 0:
      g_s = sam_grad(w, rho)
      cache["g_v"] = np.concatenate([reject(g_s[s], g[s]) for s in parts])
      return g_s
    g_v = cache["g_v"]
    out = []
    for s in parts:
      n_v = np.linalg.norm(g_v[s])
      ratio = np.linalg.norm(g[s]) / n_v if n_v > 0 else 0.0
      out.append(g[s] + alpha * ratio * g_v[s])
    return np.concatenate(out)

  return descend(direction, steps, momentum)


class LookSAMTest(parameterized.TestCase):

  @parameterized.product(k=[2, 3], granularity=["global", "per_tensor"],
                         branch=["cond", "select"])
  def test_matches_hand_derived_recursion_across_k_boundaries(
      self, k, granularity, branch):
    rho, alpha, steps = 0.3, 0.7, 8
    got, state = run(chain(sj.looksam(rho=rho, k=k, alpha=alpha,
                                      granularity=granularity,
                                      branch=branch)), steps)
    want = looksam_reference(rho, k, alpha, steps,
                             per_tensor=granularity == "per_tensor")
    np.testing.assert_allclose(flat(got), want, rtol=1e-5, atol=1e-6)
    self.assertIsInstance(state[0], sj.LookSAMState)

  def test_reuse_step_adds_a_nonzero_correction(self):
    # Guards the reference above against a degenerate g_v: after one full
    # step, the reuse direction differs from the plain gradient.
    tx = sj.looksam(rho=0.3, k=5, alpha=0.7)
    params = quad_params()
    grads = jax.grad(lambda p: quad_loss(p, BATCH).mean())(params)
    _, state = jit_update(tx, grads, tx.init(params), params,
        loss_fn=quad_loss, batch=BATCH)
    d, _ = jit_update(tx, grads, state, params, loss_fn=quad_loss, batch=BATCH)
    g_v = np.concatenate([np.asarray(state.g_v["kernel"]),
                          np.asarray(state.g_v["bias"])])
    self.assertGreater(np.linalg.norm(g_v), 1e-2)
    np.testing.assert_allclose(
        flat(d), grad(W0) + 0.7 * np.linalg.norm(grad(W0)) * unit(g_v),
        rtol=1e-5)

  def test_k_one_is_sam(self):
    got, _ = run(chain(sj.looksam(rho=0.3, k=1)), 5)
    want, _ = run(chain(sj.sam(rho=0.3)), 5)
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
      return quad_loss(params, batch)

    tx = chain(sj.looksam(rho=0.3, k=3, alpha=0.7, branch=branch))

    @jax.jit
    def step(params, state, batch):
      grads = jax.grad(lambda p: quad_loss(p, batch).mean())(params)
      updates, state = tx.update(grads, state, params, loss_fn=counting_loss,
                                 batch=batch)
      return optax.apply_updates(params, updates), state

    params = quad_params()
    state = tx.init(params)
    for t in range(num_steps):
      batch = {**BATCH, "step": jnp.full((4,), t, jnp.int32)}
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
    params = quad_params()
    grads = jax.grad(lambda p: quad_loss(p, BATCH).mean())(params)
    _, state = jit_update(tx, grads, tx.init(params), params,
        loss_fn=quad_loss, batch=BATCH)
    full = sj.diagnostics(state)
    np.testing.assert_allclose(full["perturbation_norm"], 0.3, rtol=1e-6)
    np.testing.assert_allclose(full["grad_norm"], np.linalg.norm(grad(W0)),
                               rtol=1e-6)
    _, state = jit_update(tx, grads, state, params, loss_fn=quad_loss,
        batch=BATCH, value=jnp.asarray(1.5))
    reuse = sj.diagnostics(state)
    self.assertEqual(float(reuse["perturbation_norm"]), 0.0)
    self.assertTrue(np.isnan(reuse["perturbed_loss"]))
    self.assertTrue(np.isnan(reuse["cosine"]))
    self.assertEqual(float(reuse["clean_loss"]), 1.5)
    np.testing.assert_allclose(reuse["grad_norm"], np.linalg.norm(grad(W0)),
                               rtol=1e-6)

  def test_k_injected_as_a_hyperparameter_is_live(self):
    tx = chain(optax.inject_hyperparams(sj.looksam)(rho=0.3, k=3, alpha=0.7))
    got, _ = run(tx, 7)
    np.testing.assert_allclose(flat(got), looksam_reference(0.3, 3, 0.7, 7),
                               rtol=1e-5, atol=1e-6)

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


# ---------------------------------------------------------------------------
# F-SAM
# ---------------------------------------------------------------------------


def fsam_reference(rho, sigma, lam, steps, ema_first=False, momentum=0.9):
  cache = {}

  def direction(t, w):
    g = grad(w)
    if t == 0:
      cache["m"] = g
      d = g
    else:
      m_prev = cache["m"]
      cache["m"] = lam * m_prev + (1 - lam) * g
      d = g - sigma * (cache["m"] if ema_first else m_prev)
    return grad(w + rho * unit(d))

  return descend(direction, steps, momentum), cache["m"]


class FSAMTest(parameterized.TestCase):

  @parameterized.product(lam=[0.6, 0.95], ema_first=[False, True],
                         momentum=[0.0, 0.9])
  def test_matches_hand_derived_recursion(self, lam, ema_first, momentum):
    rho, sigma = 0.3, 1.0
    got, state = run(chain(sj.fsam(rho=rho, sigma=sigma, lam=lam,
                                   ema_first=ema_first), momentum), 6)
    want, ema = fsam_reference(rho, sigma, lam, 6, ema_first, momentum)
    np.testing.assert_allclose(flat(got), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        np.concatenate([state[0].ema["kernel"], state[0].ema["bias"]]), ema,
        rtol=1e-5, atol=1e-6)

  def test_first_step_has_no_subtraction(self):
    # Step 0 is SAM's step whatever sigma, and it seeds the EMA with g_0.
    got, state = run(chain(sj.fsam(rho=0.3, sigma=1.0, lam=0.5)), 1)
    want, _ = run(chain(sj.sam(rho=0.3)), 1)
    chex.assert_trees_all_close(got, want, atol=1e-7)
    np.testing.assert_allclose(
        np.concatenate([state[0].ema["kernel"], state[0].ema["bias"]]),
        grad(W0), rtol=1e-6)
    # The second step does subtract: it is no longer SAM's.
    got, _ = run(chain(sj.fsam(rho=0.3, sigma=1.0, lam=0.5)), 2)
    want, _ = run(chain(sj.sam(rho=0.3)), 2)
    self.assertGreater(np.abs(flat(got) - flat(want)).max(), 1e-4)

  def test_sigma_zero_is_sam(self):
    got, _ = run(chain(sj.fsam(rho=0.3, sigma=0.0)), 5)
    want, _ = run(chain(sj.sam(rho=0.3)), 5)
    chex.assert_trees_all_close(got, want, atol=1e-7)

  def test_validation(self):
    with self.assertRaisesRegex(ValueError, "lam"):
      sj.fsam(lam=1.5)
    with self.assertRaisesRegex(ValueError, "sigma"):
      sj.fsam(sigma=-1.0)


# ---------------------------------------------------------------------------
# mSAM
# ---------------------------------------------------------------------------


def msam_direction(w, rho, num_chunks):
  chunks = np.split(CENTRES, num_chunks)
  return np.mean([sam_grad(w, rho, c) for c in chunks], axis=0)


class MSAMTest(parameterized.TestCase):

  def test_one_chunk_is_sam(self):
    got, state = run(chain(sj.msam(rho=0.3, num_chunks=1)), 5)
    want, want_state = run(chain(sj.sam(rho=0.3)), 5)
    chex.assert_trees_all_equal(got, want)
    chex.assert_trees_all_equal(state, want_state)

  def test_one_chunk_per_example_is_the_per_example_formula(self):
    # 1-SAM: d = mean_i grad l_i(w + rho grad l_i(w) / |grad l_i(w)|).
    params = quad_params()
    grads = jax.grad(lambda p: quad_loss(p, BATCH).mean())(params)
    tx = sj.msam(rho=0.3, num_chunks=4)
    d, _ = jit_update(tx, grads, tx.init(params), params, loss_fn=quad_loss,
        batch=BATCH)
    want = np.mean([A @ (W0 + 0.3 * unit(A @ (W0 - c)) - c) for c in CENTRES],
                   axis=0)
    np.testing.assert_allclose(flat(d), want, rtol=1e-5, atol=1e-6)
    # It differs from SAM's direction: the per-example perturbations matter.
    self.assertGreater(np.abs(want - sam_grad(W0, 0.3)).max(), 1e-3)

  @parameterized.parameters(2, 4)
  def test_matches_hand_derived_recursion(self, num_chunks):
    got, _ = run(chain(sj.msam(rho=0.3, num_chunks=num_chunks)), 5)
    want = descend(lambda t, w: msam_direction(w, 0.3, num_chunks), 5)
    np.testing.assert_allclose(flat(got), want, rtol=1e-5, atol=1e-6)

  def test_diagnostics(self):
    params = quad_params()
    grads = jax.grad(lambda p: quad_loss(p, BATCH).mean())(params)
    tx = sj.msam(rho=0.3, num_chunks=2)
    _, state = jit_update(tx, grads, tx.init(params), params,
        loss_fn=quad_loss, batch=BATCH)
    d = sj.diagnostics(state)
    chunks = np.split(CENTRES, 2)

    def loss(w, cs):
      return np.mean([0.5 * (w - c) @ A @ (w - c) for c in cs])

    np.testing.assert_allclose(d["grad_norm"], np.linalg.norm(grad(W0)),
                               rtol=1e-5)
    np.testing.assert_allclose(d["perturbation_norm"], 0.3, rtol=1e-6)
    np.testing.assert_allclose(d["clean_loss"], loss(W0, CENTRES), rtol=1e-5)
    np.testing.assert_allclose(
        d["perturbed_loss"],
        np.mean([loss(W0 + 0.3 * unit(grad(W0, c)), c) for c in chunks]),
        rtol=1e-5)
    h = msam_direction(W0, 0.3, 2)
    np.testing.assert_allclose(
        d["cosine"], unit(grad(W0)) @ unit(h), rtol=1e-5)

  def test_sharded_batch_one_chunk_per_device(self):
    devices = jax.devices()[:8]
    mesh = jax.sharding.Mesh(np.array(devices), ("data",))
    data = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    tx = chain(sj.msam(rho=0.1, num_chunks=8))
    params, batch = helpers.tiny_params(), helpers.tiny_batch(size=32)
    step = jax.jit(helpers.train_step, static_argnums=0)
    p, s = params, tx.init(params)
    for _ in range(2):
      p, s = step(tx, p, s, batch)
    sp = jax.device_put(params, replicated)
    ss = jax.device_put(tx.init(params), replicated)
    sb = jax.device_put(batch, data)
    for _ in range(2):
      sp, ss = step(tx, sp, ss, sb)
    chex.assert_trees_all_close(sp, p, atol=1e-5, rtol=1e-5)
    chex.assert_trees_all_close(ss, s, atol=1e-5, rtol=1e-5)

  def test_has_aux_and_clear_errors(self):
    params = quad_params()
    grads = jax.grad(lambda p: quad_loss(p, BATCH).mean())(params)
    tx = sj.msam(rho=0.3, num_chunks=2)
    with_aux = lambda p, b: (quad_loss(p, b), {"n": jnp.ones(())})
    d, _ = jit_update(tx, grads, tx.init(params), params, loss_fn=with_aux,
        batch=BATCH, has_aux=True)
    np.testing.assert_allclose(flat(d), msam_direction(W0, 0.3, 2), rtol=1e-5)
    with self.assertRaisesRegex(ValueError, "not divisible by num_chunks=3"):
      sj.msam(num_chunks=3).update(grads, tx.init(params), params,
                                   loss_fn=quad_loss, batch=BATCH)
    with self.assertRaisesRegex(ValueError, "static_args"):
      optax.inject_hyperparams(sj.msam)(rho=0.1, num_chunks=2).init(params)
    with self.assertRaisesRegex(ValueError, "num_chunks"):
      sj.msam(num_chunks=0)


if __name__ == "__main__":
  absltest.main()
