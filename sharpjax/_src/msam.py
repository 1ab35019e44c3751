r"""mSAM: m-sharpness, one SAM perturbation per chunk of the batch.

m-sharpness solves the worst-case perturbation separately for every subset of
m examples. mSAM splits the batch into ``num_chunks`` chunks of
:math:`m = B / \text{num\_chunks}` examples, takes a SAM step's perturbed
gradient on each (``vmap`` over chunks) and averages them. On the shared
mechanism it is SAM's ascent step with ``num_chunks`` set.
"""

from __future__ import annotations

from typing import Optional

import jax
import optax

from sharpjax._src import ascent
from sharpjax._src import base
from sharpjax._src import sam as sam_lib


def _static_num_chunks(num_chunks) -> int:
  if isinstance(num_chunks, (jax.Array, jax.core.Tracer)):
    raise ValueError(
        "num_chunks sets the shape of the chunked batch, so it must be a "
        f"Python int, got {type(num_chunks).__name__}. With optax.inject_hyperparams, "
        "pass static_args=('num_chunks',)."
    )
  return base.check_int("num_chunks", num_chunks, low=1)


def msam(
    rho: base.ScalarOrSchedule = 0.05,
    num_chunks: int = 8,
    *,
    axis_name: Optional[str] = None,
) -> optax.GradientTransformationExtraArgs:
  r"""m-sharpness SAM: a separate perturbation for each chunk of the batch.

  The batch is split into ``num_chunks`` equal chunks :math:`S_j` (in order,
  along the leading axis). For each chunk, in parallel (``vmap``):

  .. math::
    g_j = \nabla L_{S_j}(w), \qquad
    \epsilon_j = \rho \frac{g_j}{\|g_j\|_2}, \qquad
    h_j = \nabla L_{S_j}(w)\big|_{w + \epsilon_j},

  and the update direction is :math:`\frac{1}{k}\sum_j h_j`. With
  ``num_chunks=1`` mSAM is SAM (and uses the gradient passed in); with
  ``num_chunks`` equal to the batch size it is 1-SAM, a perturbation per
  example.

  With ``num_chunks > 1`` the chunks' clean gradients are computed here, so
  the gradient passed to ``update`` is used only for its structure and dtypes
  (under ``jit`` XLA drops the caller's backward pass when nothing else uses
  it). The diagnostics report the mean of the chunks' clean gradients (the
  batch gradient), the mean perturbation norm, the mean perturbed loss, and,
  when ``value=`` is not passed, the clean loss of the chunks.

  Cost: the FLOPs of SAM (two forward-backward passes over the batch); memory
  holds one gradient per chunk, so 1-SAM on a large model is memory-heavy.
  The perturbed pass runs each chunk at its own weights, which ``vmap`` turns
  into batched (grouped) convolutions: slower than SAM's on CPU.
  Under ``jit`` with the batch sharded over a mesh the chunks follow the batch
  sharding; BatchNorm statistics inside ``loss_fn`` become per chunk.

  Args:
    rho: radius (>= 0), a number or an optax schedule; the best radius grows
      as the chunks shrink.
    num_chunks: number of chunks (a Python int >= 1 that divides the batch
      size). There is no canonical value: it sets m, and Foret et al. report
      that smaller m correlates with better generalisation. With
      ``optax.inject_hyperparams`` name it in ``static_args``.
    axis_name: see :func:`sharpjax.sharpness_aware`; only for ``pmap``.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` to put first in a chain,
    called as :func:`sharpjax.sam`; its state is a
    :class:`sharpjax.SharpnessAwareState`.

  Example:
    >>> import optax, sharpjax as sj
    >>> tx = optax.chain(sj.msam(rho=0.05, num_chunks=8),
    ...                  optax.sgd(0.1, momentum=0.9))

  References:
    Foret et al., Sharpness-Aware Minimization for Efficiently Improving
    Generalization, ICLR 2021. https://arxiv.org/abs/2010.01412
    Andriushchenko and Flammarion, Towards Understanding Sharpness-Aware
    Minimization, ICML 2022. https://arxiv.org/abs/2206.06232
  """
  base.check_range("rho", rho, low=0.0)
  num_chunks = _static_num_chunks(num_chunks)

  def perturbation_fn(grads, params, count):
    del params
    return ascent.sam_perturbation(grads, base.resolve(rho, count))

  return sam_lib.sharpness_aware(
      perturbation_fn, name="msam", axis_name=axis_name, num_chunks=num_chunks
  )
