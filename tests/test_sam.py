"""SAM and ASAM against references derived by hand on a quadratic."""

from __future__ import annotations

from absl.testing import parameterized
import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import sharpjax as sj

from tests import helpers

# Per-example loss l_i(w) = 0.5 (w - c_i)^T A (w - c_i) with w = [kernel, bias].
Q = helpers.QUADRATIC_3
A, CENTRES, W0 = Q.a, Q.centres, Q.w0
quad_loss, quad_params, flat, run = Q.loss, Q.params, Q.flat, Q.run
QUAD_BATCH = Q.batch


def reference(rho, lr, momentum, steps, adaptive=False, eta=0.0):
  """The SAM / ASAM recursion in numpy, derived from the papers' formulas."""
  w, m = W0.copy(), np.zeros(3)
  cbar = CENTRES.mean(0)
  for _ in range(steps):
    g = A @ (w - cbar)
    if adaptive:  # T = |w| + eta on the kernel, 1 on the bias.
      t = np.concatenate([np.abs(w[:2]) + eta, [1.0]])
      eps = rho * t * t * g / np.linalg.norm(t * g)
    else:
      eps = rho * g / np.linalg.norm(g)
    g_sam = A @ (w + eps - cbar)
    m = momentum * m + g_sam
    w = w - lr * m
  return w


class SamReferenceTest(parameterized.TestCase):

  @parameterized.product(momentum=[0.0, 0.9], rho=[0.05, 0.3])
  def test_sam_matches_hand_derived_recursion(self, momentum, rho):
    tx = optax.chain(sj.sam(rho=rho), optax.sgd(0.1, momentum=momentum or None))
    got, _ = run(tx, 6)
    np.testing.assert_allclose(flat(got), reference(rho, 0.1, momentum, 6),
                               rtol=1e-5, atol=1e-6)

  @parameterized.product(momentum=[0.0, 0.9], eta=[0.0, 0.01, 0.5])
  def test_asam_matches_hand_derived_recursion(self, momentum, eta):
    tx = optax.chain(sj.asam(rho=0.5, eta=eta),
                     optax.sgd(0.1, momentum=momentum or None))
    got, _ = run(tx, 6)
    want = reference(0.5, 0.1, momentum, 6, adaptive=True, eta=eta)
    np.testing.assert_allclose(flat(got), want, rtol=1e-5, atol=1e-6)

  def test_asam_mask_can_be_given_as_a_pytree(self):
    # Rescaling nothing makes ASAM exactly SAM.
    mask = {"kernel": False, "bias": False}
    got, _ = run(optax.chain(sj.asam(rho=0.2, adaptive_mask=mask),
                             optax.sgd(0.1)), 3)
    want, _ = run(optax.chain(sj.sam(rho=0.2), optax.sgd(0.1)), 3)
    chex.assert_trees_all_close(got, want, atol=1e-7)

  def test_default_adaptive_mask_follows_asam_naming(self):
    params = {"conv": {"kernel": jnp.ones((3, 3, 2, 4)), "bias": jnp.ones(4)},
              "bn": {"scale": jnp.ones(4), "bias": jnp.ones(4)},
              "embed": {"embedding": jnp.ones((5, 4))},
              "raw": [jnp.ones((2, 2)), jnp.ones(2)]}
    mask = jax.tree_util.tree_map_with_path(sj.default_adaptive_mask, params)
    self.assertEqual(mask, {"conv": {"kernel": True, "bias": False},
                            "bn": {"scale": True, "bias": False},
                            "embed": {"embedding": True},
                            "raw": [True, False]})

  def test_diagnostics_hold_the_step_values(self):
    rho = 0.1
    params = quad_params()
    tx = sj.sam(rho=rho)
    grads = jax.grad(lambda p: quad_loss(p, QUAD_BATCH).mean())(params)
    clean = quad_loss(params, QUAD_BATCH).mean()
    _, state = tx.update(grads, tx.init(params), params, loss_fn=quad_loss,
                         batch=QUAD_BATCH, value=clean)
    d = sj.diagnostics(state)
    cbar = CENTRES.mean(0)
    g = A @ (W0 - cbar)
    eps = rho * g / np.linalg.norm(g)
    g_sam = A @ (W0 + eps - cbar)
    perturbed = np.mean([0.5 * (W0 + eps - c) @ A @ (W0 + eps - c)
                         for c in CENTRES])
    np.testing.assert_allclose(d["grad_norm"], np.linalg.norm(g), rtol=1e-5)
    np.testing.assert_allclose(d["perturbation_norm"], rho, rtol=1e-5)
    np.testing.assert_allclose(d["perturbed_loss"], perturbed, rtol=1e-5)
    np.testing.assert_allclose(d["clean_loss"], clean, rtol=1e-6)
    np.testing.assert_allclose(
        d["cosine"], g @ g_sam / np.linalg.norm(g) / np.linalg.norm(g_sam),
        rtol=1e-5)
    # Without value= the clean loss is unknown, and says so.
    _, state = tx.update(grads, tx.init(params), params, loss_fn=quad_loss,
                         batch=QUAD_BATCH)
    self.assertTrue(np.isnan(sj.diagnostics(state)["clean_loss"]))

  @parameterized.parameters(sj.sam, sj.asam)
  def test_zero_gradient_gives_zero_perturbation(self, factory):
    # Every centre at w0: the loss and its gradient are exactly zero.
    batch = {"c": jnp.tile(jnp.asarray(W0, jnp.float32), (4, 1))}
    params = quad_params()
    grads = jax.grad(lambda p: quad_loss(p, batch).mean())(params)
    tx = factory()
    updates, state = tx.update(grads, tx.init(params), params,
                               loss_fn=quad_loss, batch=batch)
    chex.assert_trees_all_equal(updates, jax.tree.map(jnp.zeros_like, params))
    self.assertEqual(float(sj.diagnostics(state)["perturbation_norm"]), 0.0)
    self.assertEqual(float(sj.diagnostics(state)["cosine"]), 0.0)

  def test_applied_perturbation_with_bfloat16_parameters(self):
    # w + eps is rounded to bfloat16: the parameters move by less than eps.
    rho = 0.05
    params = helpers.tiny_params(jnp.bfloat16)
    batch = helpers.tiny_batch()
    grads = helpers.clean_grads(params, batch)
    tx = sj.sam(rho=rho)
    _, state = helpers.jit_update(tx, grads, tx.init(params), params,
                                  loss_fn=helpers.loss_fn, batch=batch)
    d = sj.diagnostics(state)
    # The reference, in numpy: eps from the float32 gradient, then the
    # round trip through bfloat16.
    g = [np.asarray(x, np.float32) for x in jax.tree.leaves(grads)]
    scale = rho / np.sqrt(sum(float(np.sum(x.astype(np.float64) ** 2))
                              for x in g))
    moved = []
    for w, x in zip(jax.tree.leaves(params), g):
      w32 = np.asarray(w, np.float32)
      back = np.asarray(jnp.asarray(w32 + x * scale).astype(jnp.bfloat16),
                        np.float32)
      moved.append(back - w32)
    applied = np.sqrt(sum(float(np.sum(m.astype(np.float64) ** 2))
                          for m in moved))
    np.testing.assert_allclose(d["perturbation_norm"], rho, rtol=1e-5)
    np.testing.assert_allclose(d["applied_perturbation_norm"], applied,
                               rtol=1e-5)
    self.assertGreater(abs(float(d["applied_perturbation_norm"]) - rho),
                       0.01 * rho)

  def test_a_small_perturbation_rounds_away_on_a_large_bfloat16_kernel(self):
    # Weights in [1, 2) have a bfloat16 spacing of 2**-7; rho = 0.05 spread
    # over 4096 coordinates is about 1e-3 each: most of it rounds away.
    kernel = 1.0 + jax.random.uniform(jax.random.key(0), (64, 64))
    params = {"kernel": kernel.astype(jnp.bfloat16)}
    batch = {"x": jax.random.normal(jax.random.key(1), (8, 64))}
    loss_fn = lambda p, b: 0.5 * jnp.sum(
        (b["x"] @ p["kernel"].astype(jnp.float32)) ** 2, axis=1)
    grads = jax.grad(lambda p: loss_fn(p, batch).mean())(params)
    tx = sj.sam(rho=0.05)
    _, state = helpers.jit_update(tx, grads, tx.init(params), params,
                                  loss_fn=loss_fn, batch=batch)
    d = sj.diagnostics(state)
    np.testing.assert_allclose(d["perturbation_norm"], 0.05, rtol=1e-5)
    self.assertLess(float(d["applied_perturbation_norm"]), 0.025)

  def test_applied_perturbation_is_the_perturbation_in_float32(self):
    params = quad_params()
    grads = jax.grad(lambda p: quad_loss(p, QUAD_BATCH).mean())(params)
    tx = sj.sam(rho=0.1)
    _, state = helpers.jit_update(tx, grads, tx.init(params), params,
                                  loss_fn=quad_loss, batch=QUAD_BATCH)
    d = sj.diagnostics(state)
    self.assertEqual(float(d["applied_perturbation_norm"]),
                     float(d["perturbation_norm"]))
    self.assertEqual(float(d["measured"]), 1.0)

  @parameterized.parameters(sj.sam, sj.asam)
  def test_bfloat16_parameters(self, factory):
    tx = optax.chain(factory(), optax.sgd(0.05))
    got, state = run(tx, 3, params=quad_params(dtype=jnp.bfloat16))
    want, _ = run(tx, 3)
    chex.assert_trees_all_equal_dtypes(got, quad_params(dtype=jnp.bfloat16))
    np.testing.assert_allclose(flat(got), flat(want), rtol=2e-2, atol=2e-2)
    chex.assert_type(sj.diagnostics(state)["grad_norm"], jnp.float32)


class OptaxContribAgreementTest(parameterized.TestCase):

  @parameterized.parameters(0.0, 0.9)
  def test_matches_optax_contrib_sam_opaque_mode(self, momentum):
    rho, lr = 0.05, 0.1
    base_opt = lambda: optax.sgd(lr, momentum=momentum or None)
    ours = optax.chain(sj.sam(rho=rho), base_opt())
    theirs = optax.contrib.sam(
        base_opt(), optax.chain(optax.contrib.normalize(), optax.sgd(rho)),
        sync_period=2, opaque_mode=True)
    batch = helpers.tiny_batch()
    p1 = p2 = helpers.tiny_params()
    s1, s2 = ours.init(p1), theirs.init(p2)
    grad_fn = lambda p, _: helpers.clean_grads(p, batch)
    for _ in range(5):
      p1, s1 = helpers.train_step(ours, p1, s1, batch)
      updates, s2 = theirs.update(helpers.clean_grads(p2, batch), s2, p2,
                                  grad_fn=grad_fn)
      p2 = optax.apply_updates(p2, updates)
    chex.assert_trees_all_close(p1, p2, atol=1e-5, rtol=1e-5)


class ValidationTest(parameterized.TestCase):

  @parameterized.parameters(
      (sj.sam, dict(rho=-0.1), "rho"),
      (sj.sam, dict(rho=float("nan")), "rho"),
      (sj.asam, dict(rho=-1.0), "rho"),
      (sj.asam, dict(eta=-0.01), "eta"),
  )
  def test_bad_hyperparameters_raise_at_construction(self, factory, kwargs,
                                                     name):
    with pytest.raises(ValueError, match=name):
      factory(**kwargs)

  def test_non_number_rho(self):
    with pytest.raises(TypeError, match="rho"):
      sj.sam(rho="large")

  def test_missing_extra_args(self):
    tx = sj.sam()
    params = quad_params()
    with pytest.raises(TypeError, match="loss_fn"):
      tx.update(params, tx.init(params), params, batch=QUAD_BATCH)
    with pytest.raises(TypeError, match="batch"):
      tx.update(params, tx.init(params), params, loss_fn=quad_loss)
    with pytest.raises(TypeError, match="params"):
      tx.update(params, tx.init(params), None, loss_fn=quad_loss,
                batch=QUAD_BATCH)

  def test_scalar_loss_is_refused_at_trace_time(self):
    tx = sj.sam()
    params = quad_params()
    mean_loss = lambda p, b: quad_loss(p, b).mean()
    with pytest.raises(ValueError, match=r"shape \[B\] = \(4,\)"):
      jax.jit(lambda p, s: tx.update(p, s, p, loss_fn=mean_loss,
                                     batch=QUAD_BATCH))(params, tx.init(params))

  def test_has_aux(self):
    tx = sj.sam()
    params = quad_params()
    with_aux = lambda p, b: (quad_loss(p, b), {"stats": jnp.ones(2)})
    with pytest.raises(ValueError, match="has_aux=True"):
      tx.update(params, tx.init(params), params, loss_fn=with_aux,
                batch=QUAD_BATCH)
    got, _ = tx.update(params, tx.init(params), params, loss_fn=with_aux,
                       batch=QUAD_BATCH, has_aux=True)
    want, _ = tx.update(params, tx.init(params), params, loss_fn=quad_loss,
                        batch=QUAD_BATCH)
    chex.assert_trees_all_close(got, want)
    with pytest.raises(ValueError, match="has_aux=True"):
      tx.update(params, tx.init(params), params, loss_fn=quad_loss,
                batch=QUAD_BATCH, has_aux=True)

  def test_batch_leaves_must_share_a_leading_axis(self):
    tx = sj.sam()
    params = quad_params()
    bad = {"c": QUAD_BATCH["c"], "w": jnp.ones(3)}
    with pytest.raises(ValueError, match="leading batch axis"):
      tx.update(params, tx.init(params), params, loss_fn=quad_loss, batch=bad)

  def test_diagnostics_of_a_plain_optax_state(self):
    with pytest.raises(ValueError, match="no sharpjax"):
      sj.diagnostics(optax.sgd(0.1).init(quad_params()))


class PmapTest(parameterized.TestCase):

  def test_per_device_perturbations_under_pmap(self):
    """With axis_name, each device perturbs with its own gradient (m-sharpness)
    and the perturbed gradients are averaged: the reference is the mean over
    devices of single-device SAM gradients."""
    n = 8
    params = helpers.tiny_params()
    batch = helpers.tiny_batch(size=4 * n)
    shards = jax.tree.map(lambda x: x.reshape(n, 4, *x.shape[1:]), batch)
    tx = sj.sam(rho=0.1, axis_name="devices")

    def device_step(params, shard):
      grads = helpers.clean_grads(params, shard)  # local: per-device epsilon
      updates, state = tx.update(grads, tx.init(params), params,
                                 loss_fn=helpers.loss_fn, batch=shard)
      return updates, state

    got, state = jax.pmap(device_step, axis_name="devices",
                          in_axes=(None, 0))(params, shards)
    per_device = []
    for i in range(n):
      shard = jax.tree.map(lambda x: x[i], shards)
      single = sj.sam(rho=0.1)
      u, _ = single.update(helpers.clean_grads(params, shard),
                           single.init(params), params,
                           loss_fn=helpers.loss_fn, batch=shard)
      per_device.append(u)
    want = jax.tree.map(lambda *u: jnp.mean(jnp.stack(u), 0), *per_device)
    for i in range(n):  # every device holds the same averaged gradient
      chex.assert_trees_all_close(jax.tree.map(lambda x: x[i], got), want,
                                  atol=1e-6)
    chex.assert_trees_all_close(state.diagnostics.perturbation_norm,
                                jnp.full((n,), 0.1), atol=1e-6)
