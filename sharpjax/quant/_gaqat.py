r"""GAQAT's scale-gradient freezing and FQAT's layer-wise variant.

Under a flatness-seeking optimizer (SAGM) the direction :math:`d` handed to
the base optimizer has, for every LSQ step size :math:`s_l`, a task part and a
smoothness part,

.. math::
  g_{task,l} = \partial L_B(\theta)/\partial s_l, \qquad
  g_{smooth,l} = d_l - g_{task,l} = \tfrac12 (g_{p,l} - g_{task,l}),

and in some layers the two push :math:`s_l` in opposite directions. The
filter keeps the signs of both over the last :math:`K` steps (an ``int8``
ring buffer per step leaf), computes a per-layer *gradient disorder*
:math:`D_l` and, for the layers on the chosen side of a threshold
:math:`\tau`, freezes a component of :math:`d_l` (replaces :math:`d_l` by
:math:`d_l - g_{task,l}`, by :math:`g_{task,l}`, or by 0). Disorder kinds,
over the window's steps :math:`t = 1..K` and averaged over channels:

.. math::
  D^{flip}_l = \frac{1}{K-1}\sum_{t=2}^{K}
    1[\mathrm{sign}\,x_{l,t} \ne \mathrm{sign}\,x_{l,t-1}], \qquad
  D^{pair}_l = \frac{1}{K}\sum_{t=1}^{K}
    1[\mathrm{sign}\,g_{task,l,t} \ne \mathrm{sign}\,g_{smooth,l,t}],

with :math:`x = g_{smooth}` (default) or :math:`g_{task}`.

What is the paper's and what is this library's construction: the scale
gradient conflict, a per-layer disorder over a window of K steps re-evaluated
every K steps, freezing the task-loss component of the scale gradient of the
low-disorder layers and unfreezing at the next window, and FQAT's per-step
layer-wise choice of unstable layers, are the papers' (from their abstracts
and the ICLR 2025 reviews of GAQAT). The papers' exact disorder formula,
threshold, window, what FQAT freezes inside a chosen layer and how many
layers it picks are not public: the two disorder kinds, the
``freeze_component`` options, the defaults (K = 10, tau = 0.3 for GAQAT,
tau = 0.5 for FQAT, freeze everything of the chosen layers' steps in FQAT),
the top-k option, and the treatment of a partial window by FQAT (the disorder
over the steps seen so far) are this library's construction. Weights are
never frozen. A "layer" is one step-size leaf (``w_step`` or ``a_step`` of a
quantized layer).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sharpjax._src import base
from sharpjax._src import sagm as sagm_lib
from sharpjax.quant import _lsq

Label = Callable[[tuple, Any], bool]

_KINDS = ("flip", "pair")
_SOURCES = ("smooth", "task")
_COMPONENTS = ("task", "smooth", "all")
_SIDES = ("below", "above")
_SCHEDULES = ("window", "step")


class ScaleFilterState(NamedTuple):
  """State of :func:`scale_gradient_filter`.

  Attributes:
    count: number of updates taken (int32).
    task_signs: per step leaf (a tuple, in the parameters' leaf order), the
      ``int8`` signs of :math:`g_{task}` over the ring buffer, ``[K, *shape]``.
    smooth_signs: the same for :math:`g_{smooth}`.
    disorder: per step leaf, the last computed disorder (float32 scalars).
    frozen: per step leaf, 1.0 where the chosen component is frozen now.
  """

  count: jax.Array
  task_signs: tuple
  smooth_signs: tuple
  disorder: tuple
  frozen: tuple


def _step_indices(params: Any, label: Label) -> list[int]:
  leaves = jax.tree_util.tree_leaves_with_path(params)
  return [i for i, (p, x) in enumerate(leaves) if label(p, x)]


def step_leaf_names(params: Any, label: Label = _lsq.is_step) -> list[str]:
  """The paths of the step leaves, in the order the filter's state uses."""
  leaves = jax.tree_util.tree_leaves_with_path(params)
  return [
      jax.tree_util.keystr(p) for p, x in leaves if label(p, x)
  ]


def chronological(buffer: jax.Array, count: jax.Array) -> tuple[jax.Array, jax.Array]:
  """A ring buffer ``[K, ...]`` in time order (oldest first) and its validity.

  ``count`` is the index of the newest step written (slot ``count % K``).
  Returns the reordered buffer and a ``[K]`` bool vector, True for slots
  holding a step (all once ``count >= K - 1``).
  """
  k = buffer.shape[0]
  times = count - (k - 1) + jnp.arange(k)
  idx = jnp.mod(times, k)
  return jnp.take(buffer, idx, axis=0), times >= 0


def disorder(
    task_signs: jax.Array,
    smooth_signs: jax.Array,
    count: jax.Array,
    kind: str = "flip",
    source: str = "smooth",
) -> jax.Array:
  """The gradient disorder of one step leaf from its sign ring buffers.

  ``count`` is the step of the newest entry. Only the slots already written
  count (before the first full window the statistic is over the steps seen
  so far; with fewer than two steps ``flip`` is 0). Averaged over channels.
  """
  task, valid = chronological(task_signs, count)
  smooth, _ = chronological(smooth_signs, count)
  vshape = (-1,) + (1,) * (task.ndim - 1)
  if kind == "flip":
    x = smooth if source == "smooth" else task
    flips = (x[1:] != x[:-1]).astype(jnp.float32)
    pair_valid = valid[:-1].reshape(vshape).astype(jnp.float32)
    n = jnp.sum(valid[:-1].astype(jnp.float32))
    per_channel = jnp.sum(flips * pair_valid, axis=0) * base.safe_inverse(n)
  else:
    diff = (task != smooth).astype(jnp.float32)
    n = jnp.sum(valid.astype(jnp.float32))
    per_channel = jnp.sum(
        diff * valid.reshape(vshape).astype(jnp.float32), axis=0
    ) * base.safe_inverse(n)
  return jnp.mean(per_channel)


def freeze_mask(
    disorders: jax.Array,
    threshold: float,
    side: str,
    top_k: Optional[int] = None,
) -> jax.Array:
  """1.0 for the layers to freeze, from the vector of their disorders.

  ``side="below"``: :math:`D_l < \\tau` (GAQAT); ``"above"``:
  :math:`D_l > \\tau` (FQAT's unstable layers). With ``top_k`` the ``top_k``
  layers with the largest (``above``) or smallest (``below``) disorder are
  chosen instead (ties to the lower index).
  """
  if top_k is not None:
    key = disorders if side == "above" else -disorders
    _, idx = jax.lax.top_k(key, top_k)
    return jnp.zeros_like(disorders).at[idx].set(1.0)
  hit = disorders < threshold if side == "below" else disorders > threshold
  return hit.astype(jnp.float32)


def scale_gradient_filter(
    *,
    window: int = 10,
    threshold: float = 0.3,
    disorder_kind: str = "flip",
    flip_source: str = "smooth",
    freeze_component: str = "task",
    freeze_when: str = "below",
    schedule: str = "window",
    top_k: Optional[int] = None,
    scale_label: Label = _lsq.is_step,
) -> optax.GradientTransformationExtraArgs:
  r"""The general scale-gradient filter behind GAQAT and FQAT.

  Place it after the SAGM combiner; ``update`` needs the clean gradient as the
  extra argument ``task_grads``. Every step it writes the signs of
  :math:`g_{task,l}` and :math:`g_{smooth,l} = d_l - g_{task,l}` of every
  step leaf into its ring buffer. With ``schedule="window"`` (GAQAT) the
  disorders and the freezing mask are recomputed when a window of ``window``
  steps completes (steps ``K-1, 2K-1, ...``, counting from 0) and kept until
  the next; with ``schedule="step"`` (FQAT) they are recomputed every step
  over the last ``window`` steps. The step is then filtered with the current
  mask:

  .. math::
    d_l \leftarrow \begin{cases}
      d_l - g_{task,l} & \text{freeze\_component = task} \\
      g_{task,l} & \text{smooth} \\ 0 & \text{all}\end{cases}
    \quad\text{where frozen}, \qquad d_l \text{ elsewhere};

  every other leaf passes unchanged. See the module docstring for which parts
  are the papers' and which are this library's construction.

  Args:
    window: :math:`K`, the number of steps in the disorder window (>= 2).
    threshold: :math:`\tau` in [0, 1].
    disorder_kind: ``"flip"`` (sign changes of one sequence) or ``"pair"``
      (sign disagreement between :math:`g_{task}` and :math:`g_{smooth}`).
    flip_source: for ``flip``, ``"smooth"`` or ``"task"``.
    freeze_component: ``"task"``, ``"smooth"`` or ``"all"``.
    freeze_when: ``"below"`` or ``"above"`` the threshold.
    schedule: ``"window"`` or ``"step"``.
    top_k: freeze this many layers (the most or least disordered, following
      ``freeze_when``) instead of thresholding; None thresholds.
    scale_label: ``(path, leaf) -> bool`` selecting the step leaves; default
      the ``w_step``/``a_step`` parameters of :mod:`sharpjax.quant`'s layers.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is a
    :class:`ScaleFilterState`.
  """
  window = base.check_int("window", window, low=2)
  base.check_range("threshold", threshold, low=0.0, high=1.0)
  for name, value, allowed in (
      ("disorder_kind", disorder_kind, _KINDS),
      ("flip_source", flip_source, _SOURCES),
      ("freeze_component", freeze_component, _COMPONENTS),
      ("freeze_when", freeze_when, _SIDES),
      ("schedule", schedule, _SCHEDULES),
  ):
    if value not in allowed:
      raise ValueError(f"{name} must be one of {allowed}, got {value!r}.")
  if top_k is not None:
    top_k = base.check_int("top_k", top_k, low=1)

  def init_fn(params):
    leaves = jax.tree.leaves(params)
    idx = _step_indices(params, scale_label)
    if top_k is not None and top_k > len(idx):
      raise ValueError(
          f"top_k={top_k} is larger than the number of step leaves "
          f"({len(idx)})."
      )
    signs = tuple(
        jnp.zeros((window,) + jnp.shape(leaves[i]), jnp.int8) for i in idx
    )
    zeros = tuple(jnp.zeros((), jnp.float32) for _ in idx)
    return ScaleFilterState(
        count=jnp.zeros([], jnp.int32), task_signs=signs, smooth_signs=signs,
        disorder=zeros, frozen=zeros,
    )

  def update_fn(updates, state, params=None, *, task_grads=None, **extra_args):
    del params, extra_args
    if task_grads is None:
      raise TypeError(
          "sharpjax.quant scale-gradient filter: update() needs task_grads=, "
          "the clean gradient (the one passed to the SAGM transformation in "
          "front of it). sharpjax.quant.gaqat does this wiring."
      )
    leaves, treedef = jax.tree.flatten(updates)
    task_leaves = treedef.flatten_up_to(task_grads)
    paths = [p for p, _ in jax.tree_util.tree_leaves_with_path(updates)]
    idx = [i for i, p in enumerate(paths) if scale_label(p, leaves[i])]
    if len(idx) != len(state.task_signs):
      raise ValueError(
          f"the filter was initialised with {len(state.task_signs)} step "
          f"leaves but the update has {len(idx)}."
      )
    count = state.count
    slot = jnp.mod(count, window)
    task_signs, smooth_signs, current = [], [], []
    for j, i in enumerate(idx):
      g_task = task_leaves[i].astype(jnp.float32)
      g_smooth = leaves[i].astype(jnp.float32) - g_task
      ts = state.task_signs[j].at[slot].set(jnp.sign(g_task).astype(jnp.int8))
      ss = state.smooth_signs[j].at[slot].set(
          jnp.sign(g_smooth).astype(jnp.int8)
      )
      task_signs.append(ts)
      smooth_signs.append(ss)
      current.append(disorder(ts, ss, count, disorder_kind, flip_source))
    if idx:
      d_now = jnp.stack(current)
      mask_now = freeze_mask(d_now, threshold, freeze_when, top_k)
      if schedule == "window":
        refresh = jnp.mod(count + 1, window) == 0
        d_now = jnp.where(refresh, d_now, jnp.stack(state.disorder))
        mask_now = jnp.where(refresh, mask_now, jnp.stack(state.frozen))
      disorders = tuple(d_now[j] for j in range(len(idx)))
      frozen = tuple(mask_now[j] for j in range(len(idx)))
    else:
      disorders, frozen = (), ()
    out = list(leaves)
    for j, i in enumerate(idx):
      d = leaves[i].astype(jnp.float32)
      g_task = task_leaves[i].astype(jnp.float32)
      if freeze_component == "task":
        replaced = d - g_task
      elif freeze_component == "smooth":
        replaced = g_task
      else:
        replaced = jnp.zeros_like(d)
      out[i] = jnp.where(frozen[j] > 0, replaced, d).astype(leaves[i].dtype)
    new_state = ScaleFilterState(
        count=optax.safe_increment(count),
        task_signs=tuple(task_signs),
        smooth_signs=tuple(smooth_signs),
        disorder=disorders,
        frozen=frozen,
    )
    return jax.tree.unflatten(treedef, out), new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def gaqat_scale_filter(
    *,
    window: int = 10,
    threshold: float = 0.3,
    disorder_kind: str = "flip",
    flip_source: str = "smooth",
    freeze_component: str = "task",
    scale_label: Label = _lsq.is_step,
) -> optax.GradientTransformationExtraArgs:
  r"""GAQAT's filter: every K steps, freeze the task part of calm layers' steps.

  :func:`scale_gradient_filter` with ``schedule="window"`` and
  ``freeze_when="below"``: when a window of :math:`K` steps completes, the
  layers with disorder :math:`D_l < \tau` get :math:`d_l - g_{task,l}` (the
  smoothness part only) until the next window, when the choice is made again
  (so layers unfreeze). Place it after :func:`sharpjax.sagm` and pass
  ``task_grads=`` (the clean gradient) to ``update``, or use :func:`gaqat`.
  :math:`K = 10` and :math:`\tau = 0.3` are this library's defaults (the
  papers' are not public; the spec suggests sweeping K in {5, 10, 20, 50} and
  tau in {0.1, 0.2, 0.3, 0.5}).

  Args:
    window: see :func:`scale_gradient_filter`, like ``threshold``,
      ``disorder_kind``, ``flip_source``, ``freeze_component`` and
      ``scale_label``.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` (state
    :class:`ScaleFilterState`).

  Example:
    >>> import optax, sharpjax as sj
    >>> from sharpjax import quant
    >>> tx = optax.chain(sj.sagm(), quant.gaqat_scale_filter(), optax.adam(1e-3))
    >>> # tx.update(grads, state, params, loss_fn=..., batch=..., task_grads=grads)

  References:
    Jiang et al., GAQAT: Gradient-Adaptive Quantization-Aware Training for
    Domain Generalization, 2024. https://arxiv.org/abs/2412.05551
  """
  return scale_gradient_filter(
      window=window, threshold=threshold, disorder_kind=disorder_kind,
      flip_source=flip_source, freeze_component=freeze_component,
      freeze_when="below", schedule="window", scale_label=scale_label,
  )


def fqat_layer_filter(
    *,
    window: int = 10,
    threshold: float = 0.5,
    top_k: Optional[int] = None,
    disorder_kind: str = "flip",
    flip_source: str = "smooth",
    freeze_component: str = "all",
    scale_label: Label = _lsq.is_step,
) -> optax.GradientTransformationExtraArgs:
  r"""FQAT's variant: every step, freeze the steps of the unstable layers.

  :func:`scale_gradient_filter` with ``schedule="step"`` and
  ``freeze_when="above"``: at every step the disorder of each layer over the
  last :math:`K` steps is recomputed and the layers with :math:`D_l > \tau`
  (or the ``top_k`` most disordered) have their step-size update frozen
  (``freeze_component="all"`` by default: :math:`d_l = 0`). Which component
  FQAT freezes, and whether it thresholds or picks a top-k, are not public;
  the defaults are this library's.

  Args:
    window: see :func:`scale_gradient_filter`, like ``threshold``,
      ``top_k``, ``disorder_kind``, ``flip_source``, ``freeze_component`` and
      ``scale_label``.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` (state
    :class:`ScaleFilterState`).

  References:
    Jiang et al., Quantization Meets OOD: Generalizable Quantization-aware
    Training from a Flatness Perspective, ACM MM 2025.
    https://arxiv.org/abs/2509.00859
  """
  return scale_gradient_filter(
      window=window, threshold=threshold, disorder_kind=disorder_kind,
      flip_source=flip_source, freeze_component=freeze_component,
      freeze_when="above", schedule="step", top_k=top_k,
      scale_label=scale_label,
  )


class GAQATState(NamedTuple):
  """State of :func:`gaqat`: the SAGM state and the filter's."""

  sagm: Any
  filter: ScaleFilterState


def gaqat(
    rho: base.ScalarOrSchedule = 0.05,
    alpha: base.ScalarOrSchedule = 0.001,
    *,
    scale_filter: Optional[optax.GradientTransformationExtraArgs] = None,
    axis_name: Optional[str] = None,
) -> optax.GradientTransformationExtraArgs:
  r"""SAGM followed by a scale-gradient filter, wired together.

  One transformation that runs :func:`sharpjax.sagm` on the clean gradient
  and hands its direction, with the clean gradient as ``task_grads``, to the
  filter (default :func:`gaqat_scale_filter`; pass
  :func:`fqat_layer_filter` for FQAT). Put it first in a chain, called as
  :func:`sharpjax.sam`.

  Args:
    rho: SAGM's radius (>= 0), a number or a schedule.
    alpha: SAGM's step back (>= 0), a number or a schedule.
    scale_filter: the filter; default ``gaqat_scale_filter()``.
    axis_name: see :func:`sharpjax.sharpness_aware`.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with state
    :class:`GAQATState`; :func:`sharpjax.diagnostics` reads its SAGM record.

  Example:
    >>> import optax
    >>> from sharpjax import quant
    >>> tx = optax.chain(quant.gaqat(rho=0.05, alpha=0.001), optax.adam(1e-3))

  References:
    Jiang et al., GAQAT: Gradient-Adaptive Quantization-Aware Training for
    Domain Generalization, 2024. https://arxiv.org/abs/2412.05551
  """
  inner = sagm_lib.sagm(rho=rho, alpha=alpha, axis_name=axis_name)
  filt = gaqat_scale_filter() if scale_filter is None else scale_filter

  def init_fn(params):
    return GAQATState(inner.init(params), filt.init(params))

  def update_fn(updates, state, params=None, **extra_args):
    extra_args.pop("task_grads", None)
    direction, s1 = inner.update(updates, state.sagm, params, **extra_args)
    out, s2 = filt.update(
        direction, state.filter, params, task_grads=updates, **extra_args
    )
    return out, GAQATState(s1, s2)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def filter_summary(opt_state: Any) -> dict[str, np.ndarray]:
  """The disorders and freezing mask of the first filter state in ``opt_state``.

  Returns a dict with ``disorder`` and ``frozen`` (one entry per step leaf, in
  the order of :func:`step_leaf_names`) and ``frozen_fraction``.
  """
  found = base.find_states(opt_state, (ScaleFilterState,))
  if not found:
    raise ValueError("no scale-gradient filter state in opt_state.")
  s = found[0]
  d = np.asarray([float(x) for x in s.disorder], np.float32)
  f = np.asarray([float(x) for x in s.frozen], np.float32)
  return {
      "disorder": d,
      "frozen": f,
      "frozen_fraction": float(f.mean()) if f.size else 0.0,
  }
