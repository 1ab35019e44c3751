r"""LookSAM: SAM's second pass once every k steps.

The SAM gradient :math:`g_s` splits into a part parallel to the clean gradient
:math:`g` and an orthogonal part :math:`g_v`, which changes slowly. LookSAM
runs the perturbed pass every ``k`` steps only, caches :math:`g_v`, and on the
steps in between adds it back to the clean gradient. Its step on
:func:`sharpjax.sharpness_aware` chooses between SAM's step (which caches
:math:`g_v`) and a reuse step that takes no second pass: statically when the
caller says which (``full_step=``, the host-scheduled form), else with a
``lax.cond`` or a select on the step count.
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

_GRANULARITIES = ("global", "per_tensor")
# How the step chooses its branch when the caller does not pass full_step.
_BRANCHES = ("cond", "select")


class LookSAMState(NamedTuple):
  """State of :func:`looksam`.

  Attributes:
    count: number of updates taken (int32); steps with
      ``count % period == 0`` take the perturbed pass.
    period: int32 scalar, the period ``k`` of the full step (constant; with
      ``optax.inject_hyperparams``, the ``k`` of the last step).
    g_v: float32 cache of the component of the last SAM gradient orthogonal
      to the clean gradient of that step, shaped like the parameters
      (float32 whatever the parameters' dtype).
    diagnostics: what the last step saw. On reuse steps ``measured`` is 0 and
      the perturbation norms, ``perturbed_loss`` and ``cosine`` are 0 (not
      measured on this step).

  The class attribute ``HOST_SCHEDULED = True`` is the contract a trainer
  reads: a full step is taken if and only if ``count % period == 0``, and
  ``update`` accepts the extra argument ``full_step``, a Python bool that
  selects the branch statically (the compiled step holds no conditional).
  The caller guarantees that it equals ``count % period == 0``: read
  ``count`` and ``period`` from the state once, keep the count on the host,
  and compile two steps (one per value of ``full_step``).
  """

  count: jax.Array
  period: jax.Array
  g_v: Any
  diagnostics: perturbed_lib.Diagnostics

  HOST_SCHEDULED = True


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

  Norms and inner products are global over the pytree, in float32, and
  :math:`g_v` is computed and cached in float32; with
  ``granularity="per_tensor"`` the decomposition and the ratio are taken leaf
  by leaf (as in the unofficial PyTorch port). A zero :math:`g_v` adds
  nothing. With ``k=1`` LookSAM is SAM.

  Choosing the branch. The schedule is known on the host (the step count), so
  the cheapest form is two compiled steps, one per branch, chosen by the
  caller: pass ``update(..., full_step=count % k == 0)`` as a Python bool
  (:class:`LookSAMState` documents the contract, ``HOST_SCHEDULED``, that a
  trainer reads). Without ``full_step`` one
  compiled step decides on the device, as ``branch`` says:

  * ``"cond"`` (default): a ``lax.cond`` on the count, so the skipped pass is
    not executed. The conditional has costs of its own: on a GPU its
    predicate is read back by the host, about 0.8 ms per step measured on an
    H200 (ResNet-18, batch 128: 1.53x SGD at k=5 where the arithmetic gives
    about 1.23x), and on XLA:CPU the backward pass of a convolution compiled
    inside a conditional branch takes a slow single-threaded path (jax-ml/jax
    issue 12868; about 25x on the 1D CNN of ``benchmarks/overhead.py``, far
    more on a ResNet-18).
  * ``"select"``: both branches run on every step and ``jnp.where`` keeps
    one, so the cost is SAM's; it avoids XLA:CPU's slow path.

  Cost: :math:`(k+1)/k` forward-backward passes per step on average (1.2 at
  k=5) with ``full_step`` or ``"cond"``, and one float32 buffer the size of
  the parameters.

  Args:
    rho: radius (>= 0), a number or an optax schedule; set as for SAM.
    k: period of the full SAM step (integer >= 1). 5 is the setting usually
      quoted ("LookSAM-5").
    alpha: weight of the cached component on reuse steps (>= 0), a number or
      an optax schedule; 0.7 is the unofficial port's default. It can fail:
      on the clean MNIST-1D CNN of ``sharpjax compare --preset clean12``,
      k=5 and alpha=0.7 ended 28 points below SGD (56% against 84%, the
      training loss stalled at 1.16 against 0.28), while ``alpha=0.0``
      reached SGD's accuracy. When the training loss stalls far above
      SGD's, use ``alpha=0.0`` or SAM (``k=1``).
    granularity: ``"global"`` (the paper's formula) or ``"per_tensor"``.
    branch: without ``full_step``, ``"cond"`` (the skipped pass is not run)
      or ``"select"`` (both branches run).
    axis_name: see :func:`sharpjax.sharpness_aware`; only for ``pmap``.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` to put first in a chain,
    called as :func:`sharpjax.sam` plus the optional extra argument
    ``full_step`` (a Python bool); its state is a :class:`LookSAMState`.

  Example:
    >>> import jax, jax.numpy as jnp, optax, sharpjax as sj
    >>> tx = optax.chain(sj.looksam(rho=0.05, k=5, alpha=0.7),
    ...                  optax.sgd(0.1, momentum=0.9))
    >>> # Host-scheduled: one compiled step per branch, no conditional.
    >>> params = {"w": jnp.array([1.0, -2.0])}
    >>> batch = {"x": jnp.eye(2)}
    >>> loss_fn = lambda p, b: 0.5 * (b["x"] @ p["w"]) ** 2
    >>> def step(params, state, full_step):
    ...   grads = jax.grad(lambda p: loss_fn(p, batch).mean())(params)
    ...   updates, state = tx.update(grads, state, params, loss_fn=loss_fn,
    ...                              batch=batch, full_step=full_step)
    ...   return optax.apply_updates(params, updates), state
    >>> step = jax.jit(step, static_argnums=2)
    >>> state = tx.init(params)
    >>> looksam_state = state[0]
    >>> count, period = int(looksam_state.count), int(looksam_state.period)
    >>> for _ in range(6):
    ...   params, state = step(params, state, count % period == 0)
    ...   count += 1
    >>> [float(state[0].diagnostics.measured), int(state[0].count)]
    [1.0, 6]

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
  if branch not in _BRANCHES:
    raise ValueError(f"branch must be one of {_BRANCHES}, got {branch!r}.")
  per_tensor = granularity == "per_tensor"

  def period() -> jax.Array:
    return jnp.asarray(k if static_k is None else static_k, jnp.int32)

  def orthogonal(perturbed, clean):
    if per_tensor:
      return jax.tree.map(base.tree_orthogonal, perturbed, clean)
    return base.tree_orthogonal(perturbed, clean)

  def add_cached(clean, g_v, a):
    def add(g, v):
      ratio = base.tree_norm_f32(g) * base.safe_inverse(base.tree_norm_f32(v))
      return jax.tree.map(
          lambda x, y: x.astype(jnp.float32) + a * ratio * y, g, v
      )

    if per_tensor:
      return jax.tree.map(add, clean, g_v)
    return add(clean, g_v)

  def step(inputs):
    clean, count = inputs.grads, inputs.count
    full_step = protocol.full_step_flag(
        inputs.extra.get("full_step"), "looksam", "count % period == 0")

    def full():
      eps, grad_norm = ascent.sam_perturbation(
          clean, base.resolve_radius(rho, count)
      )
      out = inputs.ascend(eps, grad_norm=grad_norm)
      # The cached component comes from the whole batch's perturbed gradient.
      perturbed = inputs.mean_over_devices(out.direction)
      g_v = inputs.mean_over_devices(orthogonal(perturbed, clean))
      return (base.tree_cast_like(perturbed, clean),
              {"period": period(), "g_v": g_v}, out.diagnostics)

    def reuse():
      g_v = inputs.memory["g_v"]
      direction = add_cached(clean, g_v, base.resolve(alpha, count))
      return (base.tree_cast_like(direction, clean),
              {"period": period(), "g_v": g_v},
              perturbed_lib.unmeasured_diagnostics(clean, inputs.value))

    if static_k == 1 or full_step is True:
      direction, memory, diagnostics = full()
    elif full_step is False:
      direction, memory, diagnostics = reuse()
    elif branch == "cond":
      # Inside shard_map the branches must agree on what varies by device:
      # the direction and the diagnostics vary with the batch in both (the
      # wrapper averages them), the memory is averaged in both.
      def varying(branch_fn):
        def run():
          direction, memory, diagnostics = branch_fn()
          return (perturbed_lib.vary_like(direction, inputs.batch), memory,
                  perturbed_lib.vary_like(diagnostics, inputs.batch))
        return run

      direction, memory, diagnostics = jax.lax.cond(
          count % period() == 0, varying(full), varying(reuse)
      )
    else:
      is_full = count % period() == 0
      direction, memory, diagnostics = jax.tree.map(
          lambda a, b: jnp.where(is_full, a, b), full(), reuse()
      )
    return wrapper.Step(direction, diagnostics, memory)

  def init_memory(params):
    return {
        "period": period(),
        "g_v": jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), jnp.float32),
                            params),
    }

  return wrapper.sharpness_aware(
      step,
      name="looksam",
      axis_name=axis_name,
      init_memory=init_memory,
      state_type=LookSAMState,
  )
