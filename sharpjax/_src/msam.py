r"""mSAM: m-sharpness, one SAM perturbation per chunk of the batch.

m-sharpness solves the worst-case perturbation separately for every subset of
m examples. mSAM splits the batch into ``num_chunks`` chunks of
:math:`m = B / \text{num\_chunks}` examples, takes a SAM step's perturbed
gradient on each and averages them. Its step on
:func:`sharpjax.sharpness_aware` loops over the chunks.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from sharpjax._src import ascent
from sharpjax._src import base
from sharpjax._src import perturbed as perturbed_lib
from sharpjax._src import protocol
from sharpjax._src import sharpness_aware as wrapper

_CHUNK_LOOPS = ("unrolled", "vmap")


def _static_num_chunks(num_chunks) -> int:
  if isinstance(num_chunks, (jax.Array, jax.core.Tracer)):
    raise ValueError(
        "num_chunks sets the shape of the chunked batch, so it must be a "
        f"Python int, got {type(num_chunks).__name__}. With "
        "optax.inject_hyperparams, pass static_args=('num_chunks',)."
    )
  return base.check_int("num_chunks", num_chunks, low=1)


class MSAMState(NamedTuple):
  """State of :func:`msam` with ``num_chunks > 1``.

  Attributes:
    count: number of updates taken (int32).
    diagnostics: what the last step saw; read it with
      :func:`sharpjax.diagnostics`.
    passes: None between steps; after ``update(..., report_passes=True)``
      the :class:`sharpjax.StepPasses` of the chunks' clean passes (taken
      out by :func:`sharpjax.pop_step_passes`).

  Class attributes (not fields), read by trainers instead of testing the type:

  - ``PASSES = "own"``: mSAM runs its own passes (a clean and a perturbed
    one per chunk); the loop runs none, and the chunks' clean passes give
    the step's losses, logits and model state.
  """

  count: jax.Array
  diagnostics: perturbed_lib.Diagnostics
  passes: Optional[protocol.StepPasses] = None

  PASSES = protocol.OWN


def split_batch(batch: Any, num_chunks: int, *, name: str = "msam") -> Any:
  """Splits ``batch`` into chunks: leaves [B, ...] become [num_chunks, m, ...].

  ``m = B / num_chunks``; the chunks are consecutive slices of the batch.
  Raises a clear error at trace time when ``num_chunks`` does not divide B.
  """
  size = perturbed_lib.batch_size(batch)
  if size % num_chunks:
    raise ValueError(
        f"sharpjax.{name}: the batch size {size} is not divisible by "
        f"num_chunks={num_chunks}."
    )
  return jax.tree.map(
      lambda x: x.reshape((num_chunks, size // num_chunks) + x.shape[1:]),
      batch,
  )


def _mean(trees: list) -> Any:
  """The float32 mean of a list of pytrees."""
  return jax.tree.map(
      lambda *xs: sum(x.astype(jnp.float32) for x in xs) / len(xs), *trees
  )


def msam(
    rho: base.ScalarOrSchedule = 0.05,
    num_chunks: int = 8,
    *,
    chunk_loop: str = "unrolled",
    axis_name: Optional[str] = None,
) -> optax.GradientTransformationExtraArgs:
  r"""m-sharpness SAM: a separate perturbation for each chunk of the batch.

  The batch is split into ``num_chunks`` equal chunks :math:`S_j` (in order,
  along the leading axis). For each chunk:

  .. math::
    g_j = \nabla L_{S_j}(w), \qquad
    \epsilon_j = \rho \frac{g_j}{\|g_j\|_2}, \qquad
    h_j = \nabla L_{S_j}(w)\big|_{w + \epsilon_j},

  and the update direction is :math:`\frac{1}{k}\sum_j h_j`. With
  ``num_chunks=1`` mSAM is SAM (and uses the gradient passed in); with
  ``num_chunks`` equal to the batch size it is 1-SAM, a perturbation per
  example.

  With ``num_chunks > 1`` the chunks' clean gradients are computed here, so
  the gradient passed to ``update`` is used only for its structure and dtypes;
  the state (:class:`sharpjax.MSAMState`) declares ``PASSES = "own"``, so
  :func:`sharpjax.training.make_trainer` runs no clean pass at all and takes
  the step's losses, logits and BatchNorm statistics from the chunks' clean
  passes (``update(..., report_passes=True)`` records them, see
  :func:`sharpjax.pop_step_passes`). The diagnostics report the mean of the chunks' clean gradients (the
  batch gradient), the mean perturbation norms, the mean perturbed loss, and
  the mean of the chunks' clean losses (the batch's mean loss, computed here):
  ``value=`` is not used either, so a clean forward pass the caller runs only
  to pass ``value=`` is dead code too.

  Cost: the FLOPs of SAM (two forward-backward passes over the batch). How
  the chunks are looped over decides what the compiler sees:

  * ``chunk_loop="unrolled"`` (default): a Python loop inside the step, one
    pair of passes per chunk, each an ordinary computation on ``m``
    examples at its own weights, so convolutions stay plain convolutions.
    Compile time and program size grow with ``num_chunks``: for 1-SAM on a
    large batch prefer ``"vmap"`` or per-device perturbations (below).
  * ``chunk_loop="vmap"``: one ``vmap`` over the chunks. The per-chunk
    weights make every convolution a grouped (batched) one, which XLA runs
    far slower (about 4.2x SGD against 2.5x unrolled on the CPU CNN1D of
    ``benchmarks/overhead.py``, 8 chunks; 4.9x SGD measured on a GPU
    ResNet-18), while dense layers become batched matrix products; the
    program is compiled once whatever ``num_chunks``.

  Memory holds a gradient per chunk at most. BatchNorm statistics inside
  ``loss_fn`` become per chunk. The scalable route on several devices needs
  no chunking at all: give every device its own shard's gradient and build
  :func:`sharpjax.sam` with ``axis_name`` (``jax.pmap`` or ``shard_map``),
  so each device perturbs with its own gradient, m-sharpness with m = the
  per-device batch at SAM's cost, as the original SAM code did.

  Args:
    rho: radius (>= 0), a number or an optax schedule; the best radius grows
      as the chunks shrink.
    num_chunks: number of chunks (a Python int >= 1 that divides the batch
      size). There is no canonical value: it sets m, and Foret et al. report
      that smaller m correlates with better generalisation. With
      ``optax.inject_hyperparams`` name it in ``static_args``.
    chunk_loop: ``"unrolled"`` or ``"vmap"`` (see Cost); both give the same
      step.
    axis_name: see :func:`sharpjax.sharpness_aware`; only for ``pmap``.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` to put first in a chain,
    called as :func:`sharpjax.sam`; its state is a
    :class:`sharpjax.SharpnessAwareState` with ``num_chunks=1``, else a
    :class:`sharpjax.MSAMState`.

  Example:
    >>> import optax, sharpjax as sj
    >>> tx = optax.chain(sj.msam(rho=0.05, num_chunks=8),
    ...                  optax.sgd(0.1, momentum=0.9))

  References:
    Behdin et al., mSAM: Micro-Batch-Averaged Sharpness-Aware Minimization,
    2022. https://arxiv.org/abs/2212.04343
    Foret et al., Sharpness-Aware Minimization for Efficiently Improving
    Generalization, ICLR 2021. https://arxiv.org/abs/2010.01412
    Andriushchenko and Flammarion, Towards Understanding Sharpness-Aware
    Minimization, ICML 2022. https://arxiv.org/abs/2206.06232
  """
  base.check_range("rho", rho, low=0.0)
  num_chunks = _static_num_chunks(num_chunks)
  if chunk_loop not in _CHUNK_LOOPS:
    raise ValueError(
        f"chunk_loop must be one of {_CHUNK_LOOPS}, got {chunk_loop!r}."
    )

  def step(inputs):
    r = base.resolve_radius(rho, inputs.count)
    if num_chunks == 1:
      eps, grad_norm = ascent.sam_perturbation(inputs.grads, r)
      return inputs.ascend(eps, grad_norm=grad_norm)
    params = inputs.params

    def one_chunk(chunk):
      clean = perturbed_lib.gradient_pass(
          inputs.loss_fn, params, chunk, has_aux=inputs.has_aux,
          name=inputs.name,
      )
      eps, _ = ascent.sam_perturbation(clean.grads, r)
      result = perturbed_lib.perturbed_pass(
          inputs.loss_fn, params, eps, chunk, has_aux=inputs.has_aux,
          name=inputs.name,
      )
      applied = perturbed_lib.applied_perturbation(params, eps)
      eps_norm = base.tree_norm_f32(eps)
      return dict(
          clean_loss=clean.loss, clean_grads=clean.grads, eps_norm=eps_norm,
          applied_norm=eps_norm if applied is None
          else base.tree_norm_f32(applied),
          loss=result.loss, grads=result.grads,
      ), (clean.losses.astype(jnp.float32), clean.aux)

    chunks = split_batch(inputs.batch, num_chunks, name=inputs.name)
    if chunk_loop == "vmap":
      out, (losses, aux) = jax.vmap(one_chunk)(chunks)
      mean = jax.tree.map(
          lambda x: jnp.mean(x.astype(jnp.float32), axis=0), out)
    else:
      outs, records = zip(*[
          one_chunk(jax.tree.map(lambda x, j=j: x[j], chunks))
          for j in range(num_chunks)
      ])
      mean = _mean(list(outs))
      losses = jnp.stack([r[0] for r in records])
      aux = jax.tree.map(lambda *xs: jnp.stack(xs), *[r[1] for r in records])
    diagnostics = perturbed_lib.diagnostics_of(
        mean["clean_grads"], None, mean["grads"], mean["loss"],
        clean_loss=mean["clean_loss"],
        perturbation_norm=mean["eps_norm"],
        applied_perturbation_norm=mean["applied_norm"],
    )
    return wrapper.Step(
        mean["grads"], diagnostics,
        passes=protocol.StepPasses(losses.reshape(-1), aux))

  return wrapper.sharpness_aware(
      step, name="msam", axis_name=axis_name,
      state_type=wrapper.SharpnessAwareState if num_chunks == 1
      else MSAMState)
