"""F-SAM against references derived by hand on the quadratic of helpers."""

from __future__ import annotations

from absl.testing import absltest
from absl.testing import parameterized
import chex
import numpy as np
import sharpjax as sj

from tests import helpers

Q = helpers.QUADRATIC_4
W0 = Q.w0
chain, unit = helpers.with_sgd, helpers.unit


def fsam_reference(rho, sigma, lam, steps, ema_first=False, momentum=0.9):
  cache = {}

  def direction(t, w):
    g = Q.grad(w)
    if t == 0:
      cache["m"] = g
      d = g
    else:
      m_prev = cache["m"]
      cache["m"] = lam * m_prev + (1 - lam) * g
      d = g - sigma * (cache["m"] if ema_first else m_prev)
    return Q.grad(w + rho * unit(d))

  return Q.descend(direction, steps, momentum=momentum), cache["m"]


class FSAMTest(parameterized.TestCase):

  @parameterized.product(lam=[0.6, 0.95], ema_first=[False, True],
                         momentum=[0.0, 0.9])
  def test_matches_hand_derived_recursion(self, lam, ema_first, momentum):
    rho, sigma = 0.3, 1.0
    got, state = Q.run(chain(sj.fsam(rho=rho, sigma=sigma, lam=lam,
                                     ema_first=ema_first), momentum=momentum),
                       6)
    want, ema = fsam_reference(rho, sigma, lam, 6, ema_first, momentum)
    np.testing.assert_allclose(Q.flat(got), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(Q.flat(state[0].ema), ema, rtol=1e-5,
                               atol=1e-6)

  def test_first_step_has_no_subtraction(self):
    # Step 0 is SAM's step whatever sigma, and it seeds the EMA with g_0.
    got, state = Q.run(chain(sj.fsam(rho=0.3, sigma=1.0, lam=0.5)), 1)
    want, _ = Q.run(chain(sj.sam(rho=0.3)), 1)
    chex.assert_trees_all_close(got, want, atol=1e-7)
    np.testing.assert_allclose(Q.flat(state[0].ema), Q.grad(W0), rtol=1e-6)
    # The second step does subtract: it is no longer SAM's.
    got, _ = Q.run(chain(sj.fsam(rho=0.3, sigma=1.0, lam=0.5)), 2)
    want, _ = Q.run(chain(sj.sam(rho=0.3)), 2)
    self.assertGreater(np.abs(Q.flat(got) - Q.flat(want)).max(), 1e-4)

  def test_sigma_zero_is_sam(self):
    got, _ = Q.run(chain(sj.fsam(rho=0.3, sigma=0.0)), 5)
    want, _ = Q.run(chain(sj.sam(rho=0.3)), 5)
    chex.assert_trees_all_close(got, want, atol=1e-7)

  def test_validation(self):
    with self.assertRaisesRegex(ValueError, "lam"):
      sj.fsam(lam=1.5)
    with self.assertRaisesRegex(ValueError, "sigma"):
      sj.fsam(sigma=-1.0)


if __name__ == "__main__":
  absltest.main()
