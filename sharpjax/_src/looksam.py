r"""LookSAM: SAM's second pass once every k steps.

The SAM gradient :math:`g_s` splits into a part parallel to the clean gradient
:math:`g` and an orthogonal part :math:`g_v`, which changes slowly. LookSAM
runs the perturbed pass every ``k`` steps only, caches :math:`g_v`, and on the
steps in between adds it back to the clean gradient. On the shared mechanism
it is SAM's ascent step, a descent hook that caches :math:`g_v`, and a
``lax.cond`` reuse branch that takes no second pass.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from sharpjax._src import ascent
from sharpjax._src import base
from sharpjax._src import perturbed as perturbed_lib
from sharpjax._src import sam as sam_lib

_GRANULARITIES = ("global", "per_tensor")


class LookSAMState(NamedTuple):
  """State of :func:`looksam`.

  Attributes:
    count: number of updates taken (int32); steps with ``count % k == 0``
      take the perturbed pass.
    g_v: float32 cache of the component of the last SAM gradient orthogonal
      to the clean gradient of that step, shaped like the parameters.
    diagnostics: what the last step saw. On reuse steps
      ``perturbation_norm`` is 0 and ``perturbed_loss`` and ``cosine`` are NaN
      (not evaluated).
  """

  count: jax.Array
  g_v: Any
  diagnostics: perturbed_lib.Diagnostics


def _static_k(k: Any) -> Optional[int]:
  """``k`` as a Python int, or None when it is traced (inject_hyperparams)."""
  if isinstance(k, jax.core.Tracer):
    return None
  if isinstance(k, (jax.Array,)) or hasattr(k, "dtype"):
    if jnp.ndim(k) != 0 or not jnp.issubdtype(jnp.asarray(k).dtype, jnp.number):
      raise ValueError(f"k must be an integer >= 1, got {k!r}.")
    value = float(k)
    if not value.is_integer():
      raise ValueError(f"k must be an integer >= 1, got {k!r}.")
    k = int(value)
  return base.check_int("k", k, low=1)


def looksam(
    rho: base.ScalarOrSchedule = 0.05,
    k: int = 5,
    alpha: base.ScalarOrSchedule = 0.7,
    *,
    granularity: str = "global",
    branch: str = "cond",
    axis_name: Optional[str] = None,
) -> optax.GradientTransformationExtraArgs:
  r"""LookSAM: full SAM every ``k`` steps, a cached correction in between.

  On steps :math:`t` with :math:`t \bmod k = 0`:

  .. math::
    \epsilon = \rho \frac{g_t}{\|g_t\|}, \quad
    g_s = \nabla L_B(w)\big|_{w + \epsilon}, \quad
    g_v = g_s - \langle g_s, \hat g_t\rangle \hat g_t, \quad d = g_s,

  and on the other steps, with one forward-backward pass only (the caller's),

  .. math::
    d = g_t + \alpha \frac{\|g_t\|}{\|g_v\|} g_v .

  Norms and inner products are global over the pytree, in float32; with
  ``granularity="per_tensor"`` the decomposition and the ratio are taken leaf
  by leaf (as in the unofficial PyTorch port). A zero :math:`g_v` adds
  nothing. The branch is a ``lax.cond`` on the step count, so under ``jit``
  the skipped perturbed pass is not executed. With ``k=1`` LookSAM is SAM.

  Cost: :math:`(k+1)/k` forward-backward passes per step on average (1.2 at
  k=5), and one float32 buffer the size of the parameters. Caveat on XLA:CPU
  only: the backward pass of a convolution compiled inside a ``lax.cond``
  branch takes a slow path (jax-ml/jax issue 12868; about 25x on the 1D CNN of
  ``benchmarks/overhead.py``), so convolutional models on CPU pay more than a
  SAM step on the full steps (far more on a ResNet-18); ``branch="select"``
  avoids the slow path by running the perturbed pass on every step and
  keeping its result on the full steps only (the updates are the same; the
  cost is SAM's). Dense models on CPU, and GPUs, are unaffected: keep the
  default ``"cond"`` there.

  Args:
    rho: radius (>= 0), a number or an optax schedule; set as for SAM.
    k: period of the full SAM step (integer >= 1). 5 is the setting usually
      quoted ("LookSAM-5").
    alpha: weight of the cached component on reuse steps (>= 0), a number or
      an optax schedule; 0.7 is the unofficial port's default.
    granularity: ``"global"`` (the paper's formula) or ``"per_tensor"``.
    branch: ``"cond"`` (default: the skipped pass is not run) or
      ``"select"`` (both branches run, for convolutional models on XLA:CPU).
    axis_name: see :func:`sharpjax.sharpness_aware`; only for ``pmap``.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` to put first in a chain,
    called as :func:`sharpjax.sam`; its state is a :class:`LookSAMState`.

  Example:
    >>> import optax, sharpjax as sj
    >>> tx = optax.chain(sj.looksam(rho=0.05, k=5, alpha=0.7),
    ...                  optax.sgd(0.1, momentum=0.9))

  References:
    Liu et al., Towards Efficient and Scalable Sharpness-Aware Minimization,
    CVPR 2022. https://arxiv.org/abs/2203.02714
  """
  base.check_range("rho", rho, low=0.0)
  base.check_range("alpha", alpha, low=0.0)
  static_k = _static_k(k)
  if granularity not in _GRANULARITIES:
    raise ValueError(
        f"granularity must be one of {_GRANULARITIES}, got {granularity!r}."
    )
  per_tensor = granularity == "per_tensor"

  def perturbation_fn(grads, params, count, memory):
    del params, memory
    return ascent.sam_perturbation(grads, base.resolve(rho, count))

  def orthogonal(perturbed, clean):
    if per_tensor:
      return jax.tree.map(base.tree_orthogonal, perturbed, clean)
    return base.tree_orthogonal(perturbed, clean)

  def descent_fn(clean, perturbed, count, memory):
    del count, memory
    return perturbed, {"g_v": orthogonal(perturbed, clean)}

  def reuse_fn(clean, params, count, memory):
    del params
    a = base.resolve(alpha, count)
    g_v = memory["g_v"]

    def add(g, v):
      ratio = base.tree_norm_f32(g) * base.safe_inverse(base.tree_norm_f32(v))
      return jax.tree.map(
          lambda x, y: x.astype(jnp.float32) + a * ratio * y, g, v
      )

    if per_tensor:
      direction = jax.tree.map(add, clean, g_v)
    else:
      direction = add(clean, g_v)
    return direction, memory

  def init_memory(params):
    return {"g_v": jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), jnp.float32),
                                params)}

  if static_k == 1:
    full_step_fn = reuse = None
  else:
    def full_step_fn(count):
      period = static_k if static_k is not None else jnp.asarray(k, jnp.int32)
      return count % period == 0
    reuse = reuse_fn

  return sam_lib.sharpness_aware(
      perturbation_fn,
      name="looksam",
      axis_name=axis_name,
      descent_fn=descent_fn,
      init_memory=init_memory,
      state_type=LookSAMState,
      full_step_fn=full_step_fn,
      reuse_fn=reuse,
      branch=branch,
  )
