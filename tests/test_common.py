"""One battery of checks that every sharpjax transformation passes.

Adding a transformation to the library means adding one line to CASES. The
method-specific references (hand-derived formulas) live in each method's own
test file; here we check the contract every transformation shares: extra
arguments, jit, dtypes, wrappers (inject_hyperparams, MultiSteps), schedules,
state structure, recompilation and data-parallel sharding. A case that cannot
pass a check by its nature names the check and the reason in its entry
(``exempt``); the test is then skipped with that reason.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from absl.testing import absltest
from absl.testing import parameterized
import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import sharpjax as sj
from sharpjax import quant
from sharpjax import robustness

from tests import helpers


@dataclasses.dataclass(frozen=True)
class Case:
  name: str
  factory: Callable[..., Any]
  kwargs: dict[str, Any]
  # The hyper-parameter that accepts a schedule and inject_hyperparams.
  scheduled: str | None = None
  # Hyper-parameters that set static shapes, kept out of inject_hyperparams.
  static_args: tuple[str, ...] = ()
  # Checks the transformation cannot pass by its nature: check -> why.
  exempt: tuple[tuple[str, str], ...] = ()
  # The factory returns a whole optimizer (its own base optimizer included):
  # the checks use it as is instead of chaining the battery's SGD after it.
  whole_optimizer: bool = False


def _biases_are_steps(path, leaf) -> bool:
  """The tiny MLP has no quantizer steps: its biases stand in for them."""
  del leaf
  return "bias" in jax.tree_util.keystr(path)


# The scale-gradient filters, on the tiny MLP's biases; window 2 so that the
# 2- and 3-step checks cross a window refresh.
FILTER = dict(window=2, scale_label=_biases_are_steps)


CASES = [
    Case("sam", sj.sam, dict(rho=0.05), scheduled="rho"),
    Case("asam", sj.asam, dict(rho=0.5, eta=0.01), scheduled="rho"),
    Case("saf", sj.saf, dict(num_examples=64, num_classes=helpers.NUM_CLASSES,
                             steps_per_epoch=2, delay_epochs=1,
                             start_epoch=0)),
    Case("mesa", sj.mesa, dict(decay=0.9, start_epoch=0)),
    Case("esam", sj.esam, dict(rho=0.05, beta=0.6, gamma=0.5),
         scheduled="rho", static_args=("gamma",)),
    Case("ssam", sj.ssam, dict(rho=0.05, sparsity=0.5, num_fisher_samples=8,
                               update_every=2),
         scheduled="rho", static_args=("num_fisher_samples",)),
    Case("ausam", sj.ausam, dict(rho=0.05, keep=0.5, num_examples=64),
         scheduled="rho", static_args=("keep",)),
    Case("gsam", sj.gsam, dict(rho=0.05, alpha=0.1), scheduled="rho"),
    # k=2: the 2- and 3-step checks cross a full step and a reuse step.
    Case("looksam", sj.looksam, dict(rho=0.05, k=2, alpha=0.7),
         scheduled="rho"),
    Case("looksam_select", sj.looksam,
         dict(rho=0.05, k=2, alpha=0.7, branch="select"), scheduled="rho"),
    Case("fsam", sj.fsam, dict(rho=0.05, sigma=1.0, lam=0.95), scheduled="rho"),
    Case("msam", sj.msam, dict(rho=0.05, num_chunks=4), scheduled="rho",
         static_args=("num_chunks",)),
    # alpha=0: the battery checks that rho=0 gives a zero perturbation, and
    # SAGM's is -alpha g there (alpha > 0 is checked in test_sagm.py).
    Case("sagm", sj.sagm, dict(rho=0.05, alpha=0.0), scheduled="rho"),
    # every=2: the checks cross a refresh step and a reuse step. No scheduled
    # case: its strength takes a schedule, but it has no perturbation for the
    # inject_hyperparams / schedule checks to read (test_renyi.py checks the
    # strength).
    Case("renyi", sj.renyi_regularizer,
         dict(strength=0.1, every=2, num_probes=2)),
    Case("sat", robustness.sat, dict(learning_rate=0.05, rho=0.05),
         scheduled="rho", whole_optimizer=True,
         exempt=(("namedtuple_state",
                  "a recipe: it returns the chain (ASAM, Adam), whose state "
                  "is the chain's tuple; ASAM's state is the asam case's."),)),
    # alpha=0 as for sagm.
    Case("gaqat", quant.gaqat, dict(rho=0.05, alpha=0.0), scheduled="rho",
         exempt=(("namedtuple_state",
                  "GAQATState holds two states, SAGM's and the filter's, "
                  "and each has its own count."),)),
    # The point of a step is set by the previous update (where the official
    # codes move the weights), so an injected radius takes effect one step
    # later: the same-step check of inject_hyperparams does not apply.
    Case("momentum_sam", sj.momentum_sam, dict(rho=0.3, momentum=0.9),
         scheduled="rho",
         exempt=(("inject_live", "the point of a step is fixed at the end "
                  "of the previous update; an injected rho moves the next "
                  "point (test_momentum_sam.py checks it)"),)),
    Case("sampa", sj.sampa, dict(rho=0.1, lam=0.2, learning_rate=0.1),
         scheduled="rho", static_args=("momentum",),
         exempt=(("inject_live", "the points of a step are fixed at the end "
                  "of the previous update; an injected rho moves the next "
                  "ones (test_sampa.py checks it)"),)),
    # start=1: the 2- and 3-step checks cross the switch to SAM.
    Case("late_sam", sj.late_sam, dict(rho=0.05, start=1), scheduled="rho",
         static_args=("start", "total_steps")),
    # The filters have no hyper-parameter that takes a schedule.
    Case("scale_gradient_filter", quant.scale_gradient_filter, FILTER),
    Case("gaqat_scale_filter", quant.gaqat_scale_filter, FILTER),
    Case("fqat_layer_filter", quant.fqat_layer_filter, FILTER),
]

NAMED_CASES = [dict(testcase_name=c.name, case=c) for c in CASES]
SCHEDULED_CASES = [
    dict(testcase_name=c.name, case=c) for c in CASES if c.scheduled
]


def _skip_if_exempt(test, case: Case, check: str) -> None:
  reason = dict(case.exempt).get(check)
  if reason is not None:
    test.skipTest(f"{case.name} is exempt from {check}: {reason}")


def _base_optimizer(case: Case):
  """What follows the transformation in the battery's chains."""
  if case.whole_optimizer:
    return optax.identity()
  return optax.sgd(0.1, momentum=0.9)


def _chain(case: Case, **overrides):
  kwargs = {**case.kwargs, **overrides}
  return optax.chain(case.factory(**kwargs), _base_optimizer(case))


def _run(tx, params, batch, num_steps: int, jit: bool = True):
  state = tx.init(params)
  step = helpers.train_step
  if jit:
    step = jax.jit(step, static_argnums=0)
  for _ in range(num_steps):
    params, state = step(tx, params, state, batch)
  return params, state


class CommonTest(chex.TestCase):

  @parameterized.named_parameters(*NAMED_CASES)
  def test_state_is_a_namedtuple_with_a_count(self, case):
    _skip_if_exempt(self, case, "namedtuple_state")
    state = case.factory(**case.kwargs).init(helpers.tiny_params())
    self.assertTrue(hasattr(state, "_fields"), type(state))
    self.assertIn("count", state._fields)
    chex.assert_type(state.count, jnp.int32)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(*NAMED_CASES)
  def test_jit_and_eager_agree(self, case):
    tx = _chain(case)
    params, batch = helpers.tiny_params(), helpers.tiny_batch()
    expected, _ = _run(tx, params, batch, 2, jit=False)

    @self.variant
    def step(params, state):
      return helpers.train_step(tx, params, state, batch)

    state = tx.init(params)
    for _ in range(2):
      params, state = step(params, state)
    chex.assert_trees_all_close(params, expected, atol=1e-6, rtol=1e-6)

  @parameterized.named_parameters(*NAMED_CASES)
  def test_ignores_unknown_extra_args(self, case):
    tx = case.factory(**case.kwargs)
    params, batch = helpers.tiny_params(), helpers.tiny_batch()
    grads = helpers.clean_grads(params, batch)
    kwargs = helpers.update_kwargs(params, batch)
    updates, _ = tx.update(grads, tx.init(params), params, **kwargs,
                           not_an_argument_of_anything=1.0)
    chex.assert_tree_all_finite(updates)

  @parameterized.named_parameters(*NAMED_CASES)
  def test_reduces_the_loss(self, case):
    params, batch = helpers.tiny_params(), helpers.tiny_batch()
    before = float(jnp.mean(helpers.loss_fn(params, batch)))
    params, _ = _run(_chain(case), params, batch, 30)
    after = float(jnp.mean(helpers.loss_fn(params, batch)))
    self.assertLess(after, 0.5 * before)

  @parameterized.named_parameters(*NAMED_CASES)
  def test_state_keeps_shapes_and_dtypes(self, case):
    tx = _chain(case)
    params, batch = helpers.tiny_params(), helpers.tiny_batch()
    state0 = tx.init(params)
    _, state1 = helpers.train_step(tx, params, state0, batch)
    chex.assert_trees_all_equal_shapes_and_dtypes(state0, state1)

  @parameterized.named_parameters(*NAMED_CASES)
  def test_preserves_parameter_dtype(self, case):
    tx = case.factory(**case.kwargs)
    params = helpers.tiny_params(jnp.bfloat16)
    batch = helpers.tiny_batch()
    grads = helpers.clean_grads(params, batch)
    updates, state = jax.jit(
        lambda g, s, p: tx.update(g, s, p, **helpers.update_kwargs(p, batch))
    )(grads, tx.init(params), params)
    chex.assert_trees_all_equal_dtypes(updates, params)
    chex.assert_tree_all_finite(updates)

  @parameterized.named_parameters(*NAMED_CASES)
  def test_zero_gradient_is_finite(self, case):
    tx = case.factory(**case.kwargs)
    params, batch = helpers.tiny_params(), helpers.tiny_batch()
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, state = tx.update(zeros, tx.init(params), params,
                               **helpers.update_kwargs(params, batch))
    chex.assert_tree_all_finite((updates, state))

  @parameterized.named_parameters(*NAMED_CASES)
  def test_multisteps_wrapper(self, case):
    tx = optax.MultiSteps(_chain(case), every_k_schedule=2)
    params, batch = helpers.tiny_params(), helpers.tiny_batch()
    new_params, state = _run(tx, params, batch, 1)
    # The first of two accumulation steps leaves the parameters alone.
    chex.assert_trees_all_close(new_params, params)
    new_params, state = _run(tx, params, batch, 2)
    self.assertGreater(
        float(optax.tree.norm(optax.tree.sub(new_params, params))), 0.0
    )
    chex.assert_tree_all_finite(new_params)

  @parameterized.named_parameters(*SCHEDULED_CASES)
  def test_inject_hyperparams(self, case):
    params, batch = helpers.tiny_params(), helpers.tiny_batch()
    expected, _ = _run(_chain(case), params, batch, 2)
    injected = optax.chain(
        optax.inject_hyperparams(case.factory, static_args=case.static_args)(
            **case.kwargs),
        _base_optimizer(case),
    )
    got, state = _run(injected, params, batch, 2)
    chex.assert_trees_all_close(got, expected, atol=1e-6)
    _skip_if_exempt(self, case, "inject_live")
    # The injected value is live: setting it to 0 turns the perturbation off.
    state = optax.tree.set(state, **{case.scheduled: jnp.asarray(0.0)})
    grads = helpers.clean_grads(params, batch)
    updates, state = injected.update(
        grads, state, params, **helpers.update_kwargs(params, batch))
    self.assertEqual(float(sj.diagnostics(state)["perturbation_norm"]), 0.0)

  @parameterized.named_parameters(*SCHEDULED_CASES)
  def test_accepts_a_schedule(self, case):
    params, batch = helpers.tiny_params(), helpers.tiny_batch()
    value = case.kwargs[case.scheduled]
    expected, _ = _run(_chain(case), params, batch, 3)
    schedule = optax.constant_schedule(value)
    got, _ = _run(_chain(case, **{case.scheduled: schedule}), params, batch, 3)
    chex.assert_trees_all_close(got, expected, atol=1e-6)
    # A schedule that changes is evaluated at the transformation's own count.
    ramp = lambda count: value * count.astype(jnp.float32)
    tx = _chain(case, **{case.scheduled: ramp})
    state = tx.init(params)
    norms = []
    for _ in range(3):
      params, state = helpers.train_step(tx, params, state, batch)
      norms.append(float(sj.diagnostics(state)["perturbation_norm"]))
    self.assertEqual(norms[0], 0.0)
    self.assertGreater(norms[2], norms[1])

  @parameterized.named_parameters(*NAMED_CASES)
  def test_no_recompilation_across_steps(self, case):
    tx = _chain(case)
    params, batch = helpers.tiny_params(), helpers.tiny_batch()
    traces = []

    @jax.jit
    def step(params, state, batch):
      traces.append(1)
      return helpers.train_step(tx, params, state, batch)

    state = tx.init(params)
    for seed in range(5):
      params, state = step(params, state, helpers.tiny_batch(seed=seed))
    self.assertLen(traces, 1)

  @parameterized.named_parameters(*NAMED_CASES)
  def test_sharded_batch_matches_single_device(self, case):
    devices = jax.devices()
    self.assertGreaterEqual(len(devices), 8, "conftest asks for 8 devices")
    mesh = jax.sharding.Mesh(np.array(devices[:8]), ("data",))
    data = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    tx = _chain(case)
    params, batch = helpers.tiny_params(), helpers.tiny_batch(size=32)
    expected, expected_state = _run(tx, params, batch, 3)

    sharded_batch = jax.device_put(batch, data)
    state = jax.device_put(tx.init(params), replicated)
    sharded_params = jax.device_put(params, replicated)
    step = jax.jit(helpers.train_step, static_argnums=0)
    for _ in range(3):
      sharded_params, state = step(tx, sharded_params, state, sharded_batch)
    chex.assert_trees_all_close(sharded_params, expected, atol=1e-5, rtol=1e-5)
    chex.assert_trees_all_close(state, expected_state, atol=1e-5, rtol=1e-5)


if __name__ == "__main__":
  absltest.main()
