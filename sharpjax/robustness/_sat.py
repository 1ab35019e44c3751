r"""The SAT recipe: sharpness-aware training for perturbation-robust weights."""

from __future__ import annotations

from typing import Optional

import optax

from sharpjax._src import base
from sharpjax._src import sam as sam_lib


def _everything(path, leaf) -> bool:
  del path, leaf
  return True


def sat(
    learning_rate: base.ScalarOrSchedule = 0.01,
    *,
    rho: base.ScalarOrSchedule = 0.5,
    adaptive: bool = True,
    base_optimizer: Optional[optax.GradientTransformation] = None,
) -> optax.GradientTransformationExtraArgs:
  r"""SAT (Xu et al.): SAM/ASAM on the deployed parameters, as an optax chain.

  SAT trains the parameters that a physical device will hold (tuning
  currents, phases, or plain weights) with a SAM-family step so that the
  solution sits in a flat region and keeps its accuracy when the parameters
  drift or are perturbed after deployment. The official in-silico recipe
  (MRR weight bank, LeNet-5 on MNIST) is ``SAM(base=Adam(lr=0.01), rho=0.5,
  adaptive=True)`` with the davda54 SAM file, whose adaptive ascent is

  .. math::
    \epsilon = \rho\,\frac{|w|^2 \odot g}{\|\,|w| \odot g\,\|_2},

  i.e. ASAM with :math:`\eta = 0` applied to *every* parameter (biases
  included). This function returns that chain:
  ``optax.chain(sj.asam(rho, eta=0, adaptive_mask=all), optax.adam(lr))``,
  or ``sj.sam(rho)`` in front with ``adaptive=False`` (the reference's
  free-space setting, rho in {0.1, 0.3}, lr 1e-3).

  The finite-difference ascent on non-differentiable system parameters
  (misalignment) of the paper's model-free experiments is not included.

  Args:
    learning_rate: Adam's step size (0.01 in the reference's in-silico run).
    rho: the radius (0.5 adaptive in the reference; 0.1-0.5 elsewhere).
    adaptive: ASAM-style (scale-invariant) neighbourhood, as the reference.
    base_optimizer: replaces ``optax.adam(learning_rate)``.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; call ``update`` with
    ``loss_fn`` and ``batch`` as for :func:`sharpjax.sam` (or hand it to
    :func:`sharpjax.training.make_trainer`).

  Example:
    >>> from sharpjax import robustness
    >>> tx = robustness.sat()                      # ASAM(0.5) + Adam(0.01)
    >>> tx = robustness.sat(1e-3, rho=0.1, adaptive=False)

  References:
    Xu et al., Perfecting Imperfect Physical Neural Networks with Transferable
    Robustness using Sharpness-Aware Training, 2024.
    https://arxiv.org/abs/2411.12352
  """
  base.check_range("rho", rho, low=0.0)
  if base_optimizer is None:
    base.check_range("learning_rate", learning_rate, low=0.0)
    base_optimizer = optax.adam(learning_rate)
  if adaptive:
    ascent = sam_lib.asam(rho, eta=0.0, adaptive_mask=_everything)
  else:
    ascent = sam_lib.sam(rho)
  return optax.chain(ascent, base_optimizer)
