r"""Accuracy under weight perturbations: Gaussian noise and quantisation.

A model deployed on analog or physical hardware does not run with the weights
it was trained with: they drift, are programmed with noise, or are stored
with few bits. The functions here perturb a parameter pytree in three ways

.. math::
  \text{multiplicative: } w \odot (1 + \sigma z), \qquad
  \text{additive: } w + \sigma z, \qquad
  \text{quantize: } \Delta\,\mathrm{round}(w / \Delta),\;
  \Delta = \frac{\max|w|}{2^{k-1} - 1},

with :math:`z \sim \mathcal N(0, I)` and the quantisation symmetric, uniform
and per tensor (``k`` bits, :math:`\max|w|` over the tensor), and sweep the
strength (:math:`\sigma`, or the number of bits ``k``) to trace accuracy
against perturbation.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from sharpjax._src import base

KINDS = ("multiplicative", "additive", "quantize")
Mask = Union[None, Any, Callable[[tuple, jax.Array], bool]]


def _resolve_mask(mask: Mask, params: Any) -> Any:
  if mask is None:
    return jax.tree.map(lambda _: True, params)
  if callable(mask):
    return jax.tree_util.tree_map_with_path(
        lambda p, x: bool(mask(p, x)), params
    )
  return mask


def _check_kind(kind: str) -> None:
  if kind not in KINDS:
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}.")


def quantize(w: jax.Array, bits: Any) -> jax.Array:
  r"""Symmetric uniform quantisation of one tensor to ``bits`` bits.

  :math:`\Delta\,\mathrm{round}(w/\Delta)` with
  :math:`\Delta = \max|w| / (2^{k-1}-1)`: ``2^k - 1`` levels, zero exact, the
  largest magnitude kept. ``bits`` >= 2 (may be a traced number); a zero
  tensor stays zero.
  """
  w32 = w.astype(jnp.float32)
  levels = 2.0 ** (jnp.asarray(bits, jnp.float32) - 1.0) - 1.0
  step = jnp.max(jnp.abs(w32)) / levels
  safe = jnp.where(step > 0, step, 1.0)
  q = jnp.where(step > 0, jnp.round(w32 / safe) * safe, w32)
  return q.astype(w.dtype)


def perturb_weights(
    params: Any,
    key: Optional[jax.Array],
    *,
    kind: str,
    strength: Any,
    mask: Mask = None,
) -> Any:
  r"""One perturbed copy of ``params``.

  Args:
    params: any pytree of arrays.
    key: PRNG key for the noise (leaf ``i`` uses ``fold_in(key, i)``);
      ignored (may be None) for ``kind="quantize"``.
    kind: ``"multiplicative"`` (:math:`w(1+\sigma z)`), ``"additive"``
      (:math:`w + \sigma z`) or ``"quantize"`` (``strength`` = bits).
    strength: :math:`\sigma \ge 0`, or the number of bits (>= 2).
    mask: which leaves to perturb: None (all), a pytree of bools, or
      ``(path, leaf) -> bool``. Physical-hardware studies usually perturb
      every weight; pass ``lambda p, x: x.ndim >= 2`` for kernels only.

  Returns:
    A pytree like ``params`` (same dtypes).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from sharpjax import robustness
    >>> w = {"k": jnp.array([0.6, -1.0, 0.26])}
    >>> robustness.perturb_weights(w, None, kind="quantize", strength=2)["k"]
    Array([ 1., -1.,  0.], dtype=float32)
  """
  _check_kind(kind)
  mask_tree = _resolve_mask(mask, params)
  leaves, treedef = jax.tree.flatten(params)
  flags = treedef.flatten_up_to(mask_tree)
  if kind != "quantize" and key is None:
    raise ValueError(f"kind={kind!r} needs a PRNG key.")
  out = []
  for i, (w, on) in enumerate(zip(leaves, flags)):
    if not on:
      out.append(w)
      continue
    if kind == "quantize":
      out.append(quantize(w, strength))
      continue
    z = jax.random.normal(jax.random.fold_in(key, i), jnp.shape(w), jnp.float32)
    w32 = jnp.asarray(w).astype(jnp.float32)
    sigma = jnp.asarray(strength, jnp.float32)
    new = w32 * (1.0 + sigma * z) if kind == "multiplicative" else w32 + sigma * z
    out.append(new.astype(jnp.asarray(w).dtype))
  return jax.tree.unflatten(treedef, out)


class PerturbationSweep(NamedTuple):
  """Accuracy against perturbation strength.

  Attributes:
    kind: the perturbation (see :func:`perturb_weights`).
    strengths: ``[S]`` the strengths swept (sigma, or bits).
    accuracies: ``[S, N]`` the accuracy of each of the ``N`` noise draws (for
      quantisation ``N = 1``: it is deterministic).
    mean: ``[S]`` mean over draws.
    std: ``[S]`` standard deviation over draws (0 when ``N = 1``).
    clean: accuracy of the unperturbed parameters.
  """

  kind: str
  strengths: np.ndarray
  accuracies: np.ndarray
  mean: np.ndarray
  std: np.ndarray
  clean: float


@functools.lru_cache(maxsize=32)
def _sweep_runner(accuracy_fn, kind, num_samples, mask_key):
  """One jitted sweep per (accuracy_fn, kind, draws, mask): reused across
  parameter sets (e.g. the SGD and the SAT model on the same data)."""
  mask_def, mask_leaves = mask_key
  mask_tree = jax.tree.unflatten(mask_def, list(mask_leaves))

  @jax.jit
  def run(params, key, strengths):
    keys = jax.vmap(lambda j: jax.random.fold_in(key, j))(
        jnp.arange(num_samples)
    )

    def at_strength(s):
      def one(k):
        noisy = perturb_weights(params, k, kind=kind, strength=s,
                                mask=mask_tree)
        return jnp.asarray(accuracy_fn(noisy), jnp.float32)

      return jax.vmap(one)(keys)

    return jax.lax.map(at_strength, strengths), jnp.asarray(
        accuracy_fn(params), jnp.float32
    )

  return run


def accuracy_under_perturbation(
    accuracy_fn: Callable[[Any], jax.Array],
    params: Any,
    key: Optional[jax.Array],
    *,
    kind: str = "multiplicative",
    strengths: Sequence[float] = (0.0, 0.05, 0.1, 0.2, 0.3),
    num_samples: int = 5,
    mask: Mask = None,
) -> PerturbationSweep:
  r"""Sweeps a weight perturbation's strength and records the accuracy.

  For each strength :math:`s` and draw :math:`j`, the accuracy of
  ``perturb_weights(params, fold_in(key, j), kind=kind, strength=s)``. The
  same noise draws :math:`z_j` are used at every strength (common random
  numbers: the curve is smooth in :math:`s`), so the result is a
  deterministic function of ``key``. Everything runs in one ``jax.jit``
  (draws vectorised, strengths in a ``lax.map``).

  Args:
    accuracy_fn: ``params -> accuracy`` (a scalar in [0, 1]) on the
      evaluation data, traceable by JAX.
    params: the trained parameters.
    key: PRNG key (unused for ``"quantize"``).
    kind: ``"multiplicative"``, ``"additive"`` or ``"quantize"``.
    strengths: the sigmas (>= 0) or bit widths (integers >= 2).
    num_samples: noise draws per strength (>= 1; 1 for quantisation).
    mask: which leaves to perturb (see :func:`perturb_weights`).

  Returns:
    A :class:`PerturbationSweep` of numpy arrays.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from sharpjax import robustness
    >>> x = jax.random.normal(jax.random.key(0), (64, 3))
    >>> y = (x[:, 0] > 0).astype(jnp.int32)
    >>> params = {"w": jnp.array([[-1., 1.], [0., 0.], [0., 0.]])}
    >>> acc = lambda p: jnp.mean(jnp.argmax(x @ p["w"], -1) == y)
    >>> sweep = robustness.accuracy_under_perturbation(
    ...     acc, params, jax.random.key(1), strengths=[0.0, 0.5])
    >>> float(sweep.mean[0])
    1.0
  """
  _check_kind(kind)
  num_samples = base.check_int("num_samples", num_samples, low=1)
  strengths = np.asarray(list(strengths), np.float32)
  if strengths.ndim != 1 or strengths.size == 0:
    raise ValueError("strengths must be a non-empty sequence of numbers.")
  if kind == "quantize":
    if np.any(strengths < 2) or np.any(strengths != np.round(strengths)):
      raise ValueError(
          f"for kind='quantize' strengths are bit widths (integers >= 2), got "
          f"{strengths.tolist()}."
      )
    num_samples = 1
    key = jax.random.key(0) if key is None else key
  elif np.any(strengths < 0):
    raise ValueError(f"strengths must be >= 0, got {strengths.tolist()}.")
  elif key is None:
    raise ValueError(f"kind={kind!r} needs a PRNG key.")
  mask_tree = _resolve_mask(mask, params)
  mask_leaves, mask_def = jax.tree.flatten(mask_tree)
  runner_args = (accuracy_fn, kind, num_samples,
                 (mask_def, tuple(bool(m) for m in mask_leaves)))
  try:
    run = _sweep_runner(*runner_args)
  except TypeError:  # an unhashable accuracy_fn: no reuse across calls.
    run = _sweep_runner.__wrapped__(*runner_args)
  accs, clean = run(params, key, jnp.asarray(strengths))
  accs = np.asarray(accs, np.float64)
  std = accs.std(axis=1, ddof=1) if num_samples > 1 else np.zeros(len(accs))
  return PerturbationSweep(
      kind=kind,
      strengths=strengths,
      accuracies=accs,
      mean=accs.mean(axis=1),
      std=std,
      clean=float(clean),
  )


def plot_perturbation_sweeps(
    sweeps: dict[str, PerturbationSweep],
    *,
    ax: Any = None,
    title: Optional[str] = None,
):
  """Accuracy against strength, one line (mean +- std band) per sweep.

  ``sweeps`` maps a label (e.g. ``"SGD"``, ``"SAT"``) to a
  :class:`PerturbationSweep`; all should share the kind. matplotlib is
  imported here, on first use. Quantisation sweeps put the bit width on a
  reversed x axis (fewer bits to the right). Returns the figure.
  """
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  if ax is None:
    fig, ax = plt.subplots(figsize=(4.5, 3.2))
  else:
    fig = ax.figure
  kinds = {s.kind for s in sweeps.values()}
  for label, sweep in sweeps.items():
    line = ax.plot(sweep.strengths, sweep.mean, marker="o", label=label)[0]
    if np.any(sweep.std > 0):
      ax.fill_between(sweep.strengths, sweep.mean - sweep.std,
                      sweep.mean + sweep.std, alpha=0.2,
                      color=line.get_color())
  kind = kinds.pop() if len(kinds) == 1 else "mixed"
  if kind == "quantize":
    ax.set_xlabel("bits")
    ax.invert_xaxis()
  else:
    ax.set_xlabel(f"{kind} noise sigma")
  ax.set_ylabel("accuracy")
  ax.grid(alpha=0.3)
  ax.legend()
  if title:
    ax.set_title(title)
  fig.tight_layout()
  return fig
