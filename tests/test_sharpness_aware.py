"""The wrapper every SAM-family method is built on: hooks, state, the
data-parallel checks and the hyper-parameter checks every method shares."""

from __future__ import annotations

import math
from typing import NamedTuple
import warnings

from absl.testing import absltest
from absl.testing import parameterized
import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import sharpjax as sj
from sharpjax._src import sharpness_aware as wrapper

from tests import helpers

Q = helpers.QUADRATIC_4
chain = helpers.with_sgd

# Every SAM-family constructor, with what it needs besides rho.
FAMILY = [
    (sj.sam, {}), (sj.asam, {}), (sj.gsam, {}), (sj.looksam, {}),
    (sj.fsam, {}), (sj.msam, dict(num_chunks=4)), (sj.sagm, dict(alpha=0.0)),
    (sj.esam, {}), (sj.ssam, dict(mask="random")),
    (sj.ausam, dict(num_examples=64)),
]
FAMILY_CASES = [dict(testcase_name=f.__name__, factory=f, kwargs=k)
                for f, k in FAMILY]


def grads_of(params, batch=None):
  batch = Q.batch if batch is None else batch
  return jax.grad(lambda p: Q.loss(p, batch).mean())(params)


class StepHookTest(parameterized.TestCase):

  def test_a_variant_written_on_the_hooks(self):
    # Sign-SAM: eps = r sign(g); the direction is the gradient at w + eps.
    r = 0.05

    def sign_step(inputs):
      eps = jax.tree.map(lambda g: r * jnp.sign(g), inputs.grads)
      return inputs.ascend(eps)

    tx = sj.sharpness_aware(sign_step, name="sign_sam")
    params = Q.params()
    d, state = helpers.jit_update(tx, grads_of(params), tx.init(params),
                                  params, loss_fn=Q.loss, batch=Q.batch)
    g = Q.grad(Q.w0)
    np.testing.assert_allclose(Q.flat(d), Q.grad(Q.w0 + r * np.sign(g)),
                               rtol=1e-6)
    self.assertIsInstance(state, sj.SharpnessAwareState)
    self.assertEqual(int(state.count), 1)
    np.testing.assert_allclose(sj.diagnostics(state)["perturbation_norm"],
                               r * 2.0, rtol=1e-6)  # sqrt(4) coordinates

  def test_memory_fields_are_kept_with_their_dtypes(self):

    class State(NamedTuple):
      count: jax.Array
      total: jax.Array
      diagnostics: sj.Diagnostics

    def step(inputs):
      out = inputs.ascend(jax.tree.map(jnp.zeros_like, inputs.grads))
      # Whatever the step computes is stored with the field's dtype.
      return out._replace(memory={"total": jnp.asarray(inputs.count + 1.5,
                                                       jnp.bfloat16)})

    tx = sj.sharpness_aware(step, name="counting", state_type=State,
                            init_memory=lambda p: {"total": jnp.zeros(())})
    params = Q.params()
    state = tx.init(params)
    for _ in range(3):
      _, state = tx.update(grads_of(params), state, params, loss_fn=Q.loss,
                           batch=Q.batch)
    self.assertEqual(float(state.total), 3.5)
    chex.assert_type(state.total, jnp.float32)
    self.assertEqual(int(state.count), 3)

  def test_the_direction_is_cast_to_the_gradient_dtypes(self):
    def step(inputs):
      out = inputs.ascend(jax.tree.map(jnp.zeros_like, inputs.grads))
      return out._replace(direction=jax.tree.map(
          lambda g: g.astype(jnp.float32), out.direction))

    tx = sj.sharpness_aware(step, name="cast")
    params = Q.params(dtype=jnp.bfloat16)
    updates, _ = tx.update(grads_of(params), tx.init(params), params,
                           loss_fn=Q.loss, batch=Q.batch)
    chex.assert_trees_all_equal_dtypes(updates, params)

  def test_misdeclared_memory_is_refused(self):

    class State(NamedTuple):
      count: jax.Array
      ema: jax.Array
      diagnostics: sj.Diagnostics

    class NoCount(NamedTuple):
      diagnostics: sj.Diagnostics

    step = lambda inputs: inputs.ascend(inputs.grads)
    params = Q.params()
    with self.assertRaisesRegex(ValueError, "pass init_memory"):
      sj.sharpness_aware(step, name="x", state_type=State)
    with self.assertRaisesRegex(ValueError, "must have the fields"):
      sj.sharpness_aware(step, name="x", state_type=NoCount)
    with self.assertRaisesRegex(ValueError, "init_memory returned the fields"):
      sj.sharpness_aware(step, name="x", state_type=State,
                         init_memory=lambda p: {"other": 0.0}).init(params)
    bad = lambda inputs: inputs.ascend(inputs.grads)._replace(
        memory={"other": 0.0})
    tx = sj.sharpness_aware(bad, name="x", state_type=State,
                            init_memory=lambda p: {"ema": jnp.zeros(())})
    with self.assertRaisesRegex(ValueError, "memory fields"):
      tx.update(grads_of(params), tx.init(params), params, loss_fn=Q.loss,
                batch=Q.batch)


class DataParallelTest(parameterized.TestCase):

  @parameterized.parameters(
      (sj.sam, dict(rho=0.3)),
      (sj.gsam, dict(rho=0.3, alpha=0.5)),
      (sj.looksam, dict(rho=0.3, k=2, alpha=0.7)),
      (sj.fsam, dict(rho=0.3, sigma=1.0, lam=0.6)),
      (sj.sagm, dict(rho=0.3, alpha=0.01)),
  )
  def test_axis_name_with_global_gradient_matches_one_device(self, factory,
                                                             kwargs):
    # One example per device; the clean gradient is pmean-ed first (a global
    # perturbation), so the memory and the direction, averaged over the axis,
    # equal the single-device step.
    want, want_state = Q.run(chain(factory(**kwargs)), 5)
    tx = chain(factory(**kwargs, axis_name="d"))

    def step(params, state, batch):
      grads = jax.lax.pmean(grads_of(params, batch), "d")
      updates, state = tx.update(grads, state, params, loss_fn=Q.loss,
                                 batch=batch, data_axis_name="d")
      return optax.apply_updates(params, updates), state

    step = jax.pmap(step, axis_name="d", devices=jax.devices()[:4])
    replicate = lambda t: jax.tree.map(lambda x: jnp.stack([x] * 4), t)
    params = replicate(Q.params())
    state = replicate(tx.init(Q.params()))
    batch = {"c": Q.batch["c"][:, None, :]}
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

  @parameterized.named_parameters(*FAMILY_CASES)
  def test_a_different_data_axis_is_refused_naming_the_fix(self, factory,
                                                          kwargs):
    params = helpers.tiny_params()
    batch = helpers.tiny_batch()
    for built_with in (None, "model"):
      tx = factory(**kwargs, axis_name=built_with) if built_with else factory(
          **kwargs)
      name = factory.__name__
      with self.assertRaisesRegex(
          ValueError, rf"sj\.{name}\(\.\.\., axis_name='batch'\)"):
        jax.jit(lambda s: tx.update(
            helpers.clean_grads(params, batch), s, params,
            data_axis_name="batch", **helpers.update_kwargs(params, batch)))(
                tx.init(params))

  def test_the_same_data_axis_is_accepted(self):
    tx = sj.sam(rho=0.1, axis_name="batch")
    params = Q.params()

    def device_step(params, batch):
      return tx.update(grads_of(params, batch), tx.init(params), params,
                       loss_fn=Q.loss, batch=batch, data_axis_name="batch")[0]

    out = jax.pmap(device_step, axis_name="batch", in_axes=(None, 0),
                   devices=jax.devices()[:2])(
                       params, {"c": Q.batch["c"].reshape(2, 2, 4)})
    chex.assert_tree_all_finite(out)

  def test_a_named_axis_without_axis_name_warns_once(self):
    wrapper._WARNED.discard("gsam")
    tx = sj.gsam(rho=0.1)
    params = Q.params()

    def device_step(params, batch):
      return tx.update(grads_of(params, batch), tx.init(params), params,
                       loss_fn=Q.loss, batch=batch)[0]

    shards = {"c": Q.batch["c"].reshape(2, 2, 4)}
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter("always")
      for _ in range(2):  # two traces, one warning
        jax.pmap(device_step, axis_name="devices", in_axes=(None, 0),
                 devices=jax.devices()[:2])(params, shards)
    messages = [str(w.message) for w in caught
                if "without axis_name" in str(w.message)]
    self.assertLen(messages, 1)
    self.assertIn("sj.gsam(..., axis_name='devices')", messages[0])

  def test_no_warning_with_axis_name_or_outside_a_mapped_axis(self):
    wrapper._WARNED.clear()
    params = Q.params()
    shards = {"c": Q.batch["c"].reshape(2, 2, 4)}
    with warnings.catch_warnings():
      warnings.simplefilter("error")
      tx = sj.sam(rho=0.1, axis_name="devices")
      jax.pmap(lambda p, b: tx.update(grads_of(p, b), tx.init(p), p,
                                      loss_fn=Q.loss, batch=b)[0],
               axis_name="devices", in_axes=(None, 0),
               devices=jax.devices()[:2])(params, shards)
      plain = sj.sam(rho=0.1)
      jax.jit(lambda p: plain.update(grads_of(p), plain.init(p), p,
                                     loss_fn=Q.loss, batch=Q.batch)[0])(params)


class HyperParameterTest(parameterized.TestCase):

  @parameterized.named_parameters(*FAMILY_CASES)
  def test_infinite_rho_is_refused(self, factory, kwargs):
    for bad in (math.inf, -math.inf, float("nan")):
      with pytest.raises(ValueError, match="rho must be"):
        factory(rho=bad, **kwargs)

  @parameterized.named_parameters(*FAMILY_CASES)
  def test_a_string_rho_is_refused(self, factory, kwargs):
    with pytest.raises(TypeError, match="rho.*string '0.05'"):
      factory(rho="0.05", **kwargs)

  @parameterized.named_parameters(*FAMILY_CASES)
  def test_a_negative_scheduled_rho_is_clipped_to_zero(self, factory, kwargs):
    params, batch = helpers.tiny_params(), helpers.tiny_batch()
    negative = lambda count: -0.5 + 0.0 * count
    tx = factory(rho=negative, **kwargs)
    grads = helpers.clean_grads(params, batch)
    _, state = helpers.jit_update(tx, grads, tx.init(params), params,
                                  **helpers.update_kwargs(params, batch))
    self.assertEqual(float(sj.diagnostics(state)["perturbation_norm"]), 0.0)


# ---------------------------------------------------------------------------
# The float32 tree reductions the ascent steps and the diagnostics share.
# ---------------------------------------------------------------------------


def test_tree_inner_products_match_numpy():
  from sharpjax._src import base  # pylint: disable=g-import-not-at-top
  # Leaves of several sizes and ranks, one bfloat16: each product of a leaf
  # accumulated in float32, and every leaf counted once.
  shapes = {"big": (300, 300), "bias": (7,), "scale": (3, 5),
            "kernel": (2**16 + 1,), "half": (40,)}
  def tree(seed):
    r = np.random.default_rng(seed)
    t = {k: jnp.asarray(r.normal(size=s), jnp.float32) for k, s in
         shapes.items()}
    t["half"] = t["half"].astype(jnp.bfloat16)
    return t
  a, b, c = tree(1), tree(2), tree(3)
  flat = lambda t: np.concatenate(
      [np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(t)])
  expected = [flat(a) @ flat(b), flat(b) @ flat(b), flat(a) @ flat(c)]
  got = jax.jit(base.tree_inner_products)((a, b), (b, b), (a, c))
  np.testing.assert_allclose(got, expected, rtol=1e-5)
  np.testing.assert_allclose(jax.jit(base.tree_vdot_f32)(a, c), expected[2],
                             rtol=1e-5)
  assert base.tree_vdot_f32({}, {}).dtype == jnp.float32
  assert float(base.tree_norm_f32({})) == 0.0


if __name__ == "__main__":
  absltest.main()
