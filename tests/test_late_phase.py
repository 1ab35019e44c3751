"""Late-phase SAM: heavy-ball SGD before the switch, SAM after (numpy)."""

from __future__ import annotations

from absl.testing import absltest
from absl.testing import parameterized
import jax
import numpy as np
import optax
import sharpjax as sj

from tests import helpers

Q = helpers.QUADRATIC_4


def reference(rho, switch, steps):
  return Q.descend(
      lambda t, w: Q.grad(w) if t < switch else Q.sam_grad(w, rho), steps)


class LatePhaseTest(parameterized.TestCase):

  @parameterized.parameters(True, False)
  def test_sgd_then_sam(self, host_scheduled):
    rho, steps = 0.3, 7
    tx = helpers.with_sgd(sj.late_phase(sj.sam(rho=rho), start=4))
    params, batch, state = Q.params(), Q.batch, None
    state = tx.init(params)
    switch = int(state[0].period)
    self.assertEqual(switch, 4)
    traces = []

    def step(params, state, full_step):
      traces.append(full_step)
      grads = jax.grad(lambda p: Q.loss(p, batch).mean())(params)
      kwargs = dict(loss_fn=Q.loss, batch=batch)
      if full_step is not None:
        kwargs["full_step"] = full_step
      updates, state = tx.update(grads, state, params, **kwargs)
      return optax.apply_updates(params, updates), state

    step = jax.jit(step, static_argnums=2)
    for count in range(steps):
      flag = state[0].full_step_at(count, switch) if host_scheduled else None
      params, state = step(params, state, flag)
    np.testing.assert_allclose(Q.flat(params), reference(rho, 4, steps),
                               rtol=1e-5, atol=1e-6)
    # SAM's own count starts at the switch; one program per phase.
    self.assertEqual(int(state[0].inner.count), steps - 4)
    self.assertLen(set(traces), 2 if host_scheduled else 1)

  def test_fraction_of_the_run(self):
    state = sj.late_sam(start=0.875, total_steps=200).init(Q.params())
    self.assertEqual(int(state.period), 175)
    state = sj.late_phase(sj.sam(), start=0.0, total_steps=10).init(Q.params())
    self.assertEqual(int(state.period), 0)
    # start = 0: SAM throughout.
    got, _ = Q.run(helpers.with_sgd(sj.late_phase(sj.sam(rho=0.3), 0)), 3)
    want, _ = Q.run(helpers.with_sgd(sj.sam(rho=0.3)), 3)
    np.testing.assert_allclose(Q.flat(got), Q.flat(want), rtol=1e-6)
    from sharpjax._src import protocol  # pylint: disable=g-import-not-at-top
    state = sj.late_sam(start=0.875, total_steps=200).init(Q.params())
    self.assertAlmostEqual(protocol.full_step_share(state), 0.125)
    self.assertTrue(protocol.full_step_at(state, 175, 175))
    self.assertFalse(protocol.full_step_at(state, 174, 175))
    with self.assertRaisesRegex(ValueError, "total_steps="):
      protocol.full_step_share(sj.late_sam(start=3).init(Q.params()))

  def test_refuses_bad_arguments(self):
    with self.assertRaisesRegex(ValueError, "pass total_steps="):
      sj.late_sam(start=0.5)
    with self.assertRaisesRegex(ValueError, r"fraction of the run in \[0, 1\]"):
      sj.late_sam(start=1.5, total_steps=10)
    self.assertEqual(int(sj.late_sam(start=150.0).init(Q.params()).period),
                     150)
    with self.assertRaisesRegex(ValueError, "start must be an integer >= 0"):
      sj.late_sam(start=-3)
    with self.assertRaisesRegex(TypeError, "start must be a step"):
      sj.late_sam(start="0.5")
    with self.assertRaisesRegex(TypeError, "tx must be an optax"):
      sj.late_phase("sam", 3)
    with self.assertRaisesRegex(ValueError, "at its own points"):
      sj.late_phase(sj.momentum_sam(), 3).init(Q.params())
    tx = sj.late_sam(start=2)
    params = Q.params()
    g = jax.grad(lambda p: Q.loss(p, Q.batch).mean())(params)
    with self.assertRaisesRegex(TypeError, "full_step must be a Python bool"):
      tx.update(g, tx.init(params), params, loss_fn=Q.loss, batch=Q.batch,
                full_step=np.int32(1))


if __name__ == "__main__":
  absltest.main()
