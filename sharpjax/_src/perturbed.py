"""The perturbed pass and the diagnostics record of the SAM family.

Every SAM-family transformation receives the clean gradient and the extra
arguments ``loss_fn`` and ``batch``; it computes a perturbation, evaluates the
gradient of the mean loss at ``params + perturbation`` here, and records what
it saw in a :class:`Diagnostics` tuple kept in its state.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from sharpjax._src import base

LossFn = Callable[..., Any]


class Diagnostics(NamedTuple):
  r"""What the last SAM-family step saw (all float32 scalars).

  Attributes:
    grad_norm: global L2 norm of the clean gradient.
    perturbation_norm: global L2 norm of the perturbation :math:`\epsilon`
      the method computed (in float32).
    applied_perturbation_norm: global L2 norm of the perturbation the
      parameters actually moved by, :math:`\|\mathrm{cast}(w + \epsilon) -
      w\|_2` in float32. It equals ``perturbation_norm`` when every
      parameter is float32 (or wider); with bfloat16 or float16 parameters
      :math:`w + \epsilon` is rounded to the parameter dtype and most of a
      small :math:`\epsilon` can vanish (a 2048 x 2048 bfloat16 kernel with
      :math:`\rho = 0.05` kept a quarter of its coordinates' perturbation),
      which this field shows. Keep float32 parameters (and compute in
      bfloat16 inside the model) when it is much smaller than
      ``perturbation_norm``.
    clean_loss: mean loss at the clean parameters, as passed in ``value=``
      (optax's convention for the loss of the current step); NaN when the
      caller did not pass it, since the transformation never evaluates it.
    perturbed_loss: mean loss at the perturbed parameters.
    cosine: cosine between the clean and the perturbed gradient.
    measured: 1.0 when this step took the perturbed pass, 0.0 when it did not
      (LookSAM's reuse steps). On an unmeasured step the perturbation norms,
      ``perturbed_loss`` and ``cosine`` are 0 (not measured, never NaN):
      to average them over a logging interval, weight each step by
      ``measured`` (``sum(x * measured) / sum(measured)``).
  """

  grad_norm: jax.Array
  perturbation_norm: jax.Array
  applied_perturbation_norm: jax.Array
  clean_loss: jax.Array
  perturbed_loss: jax.Array
  cosine: jax.Array
  measured: jax.Array


def init_diagnostics() -> Diagnostics:
  zero = jnp.zeros((), jnp.float32)
  return Diagnostics(*([zero] * len(Diagnostics._fields)))


def unmeasured_diagnostics(clean_grads: Any, clean_loss: Any) -> Diagnostics:
  """The record of a step that took no perturbed pass (``measured`` = 0).

  The clean gradient norm and the clean loss are known; what the perturbed
  pass would have measured is 0.
  """
  zero = jnp.zeros((), jnp.float32)
  return Diagnostics(
      grad_norm=base.tree_norm_f32(clean_grads),
      perturbation_norm=zero,
      applied_perturbation_norm=zero,
      clean_loss=_clean_loss(clean_loss),
      perturbed_loss=zero,
      cosine=zero,
      measured=zero,
  )


def _clean_loss(value: Any) -> jax.Array:
  if value is None:
    return jnp.full((), jnp.nan, jnp.float32)
  return jnp.asarray(value, jnp.float32).reshape(())


class PerturbedPass(NamedTuple):
  """Result of one forward-backward pass at perturbed parameters."""

  loss: jax.Array  # mean of the per-example losses, float32
  grads: Any  # gradient of the mean loss, in the parameters' dtypes
  losses: jax.Array  # per-example losses, shape [B]
  aux: Any  # the loss_fn's aux (None without has_aux); discarded by a step


def require_extra_args(
    name: str, params: Any, loss_fn: LossFn | None, batch: Any
) -> None:
  """A clear error when a SAM-family update misses what it needs."""
  missing = [
      n
      for n, v in (("params", params), ("loss_fn", loss_fn), ("batch", batch))
      if v is None
  ]
  if missing:
    raise TypeError(
        f"sharpjax.{name}: update() needs {', '.join(missing)}. Call it as "
        "tx.update(grads, opt_state, params, loss_fn=loss_fn, batch=batch), "
        "where loss_fn(params, batch) returns per-example losses of shape [B]."
    )
  if not callable(loss_fn):
    raise TypeError(
        f"sharpjax.{name}: loss_fn must be callable, got {type(loss_fn)}."
    )


def batch_size(batch: Any) -> int:
  """The leading axis shared by every leaf of ``batch``."""
  sizes = {jnp.shape(x)[0] if jnp.ndim(x) else None for x in jax.tree.leaves(batch)}
  if not sizes or None in sizes or len(sizes) != 1:
    shapes = jax.tree.map(jnp.shape, batch)
    raise ValueError(
        "batch must be a pytree whose leaves share a leading batch axis; got "
        f"leaf shapes {shapes}."
    )
  return sizes.pop()


def split_loss_output(out: Any, has_aux: bool, size: int, name: str):
  """Unpacks ``loss_fn``'s output and checks it holds per-example losses."""
  if has_aux:
    if not (isinstance(out, tuple) and len(out) == 2):
      raise ValueError(
          f"sharpjax.{name}: with has_aux=True, loss_fn must return "
          f"(per_example_losses, aux); got {type(out).__name__}."
      )
    losses, aux = out
  else:
    if isinstance(out, tuple):
      raise ValueError(
          f"sharpjax.{name}: loss_fn returned a tuple; pass has_aux=True to "
          "update() if it returns (per_example_losses, aux)."
      )
    losses, aux = out, None
  if jnp.shape(losses) != (size,):
    raise ValueError(
        f"sharpjax.{name}: loss_fn must return per-example losses of shape "
        f"[B] = ({size},), got shape {jnp.shape(losses)}. Return the unreduced "
        "losses (for example optax.softmax_cross_entropy_with_integer_labels "
        "without .mean())."
    )
  return losses, aux


def add_perturbation(params: Any, perturbation: Any) -> Any:
  """``params + perturbation``, added in float32 and cast back per leaf."""
  return jax.tree.map(
      lambda w, e: (w.astype(jnp.float32) + e).astype(w.dtype),
      params,
      perturbation,
  )


def perturbed_pass(
    loss_fn: LossFn,
    params: Any,
    perturbation: Any,
    batch: Any,
    *,
    has_aux: bool = False,
    name: str = "sam",
) -> PerturbedPass:
  r"""Gradient of the mean of ``loss_fn`` at ``params + perturbation``.

  The second pass of the SAM family: :math:`\nabla_w \frac{1}{|B|}\sum_i
  \ell_i(w)\big|_{w+\epsilon}`. The perturbation is added in float32 and the
  sum cast back to each parameter's dtype (so with bfloat16 parameters part
  of a small perturbation rounds away: see
  :attr:`Diagnostics.applied_perturbation_norm`).

  Args:
    loss_fn: ``loss_fn(params, batch)`` returning per-example losses of shape
      ``[B]`` (or ``(losses, aux)`` with ``has_aux=True``).
    params: the clean parameters.
    perturbation: a pytree shaped like ``params`` (float32 or any float).
    batch: a pytree whose leaves share the leading batch axis.
    has_aux: whether ``loss_fn`` returns ``(losses, aux)``.
    name: the transformation's name, used in error messages.

  Returns:
    A :class:`PerturbedPass`: the mean loss (float32), the gradient (in the
    parameters' dtypes), the per-example losses and the aux.

  Example:
    >>> import jax.numpy as jnp, sharpjax as sj
    >>> params = {"w": jnp.array([1.0, -2.0])}
    >>> batch = {"x": jnp.eye(2)}
    >>> loss_fn = lambda p, b: 0.5 * (b["x"] @ p["w"]) ** 2
    >>> out = sj.perturbed_pass(loss_fn, params, {"w": jnp.array([0.5, 0.0])},
    ...                         batch)
    >>> out.losses  # at w + eps = [1.5, -2]
    Array([1.125, 2.   ], dtype=float32)
    >>> out.grads["w"]  # the gradient of the mean: (w + eps) / 2
    Array([ 0.75, -1.  ], dtype=float32)
  """
  return gradient_pass(
      loss_fn, add_perturbation(params, perturbation), batch,
      has_aux=has_aux, name=name,
  )


def gradient_pass(
    loss_fn: LossFn,
    params: Any,
    batch: Any,
    *,
    has_aux: bool = False,
    name: str = "sam",
) -> PerturbedPass:
  """Gradient of the mean of ``loss_fn`` at ``params`` (one forward-backward).

  The pass :func:`perturbed_pass` runs after moving the parameters; variants
  that need clean gradients of their own (one per chunk of the batch, or of a
  sample of it) call it directly.
  """
  size = batch_size(batch)

  def mean_loss(p):
    losses, aux = split_loss_output(loss_fn(p, batch), has_aux, size, name)
    return jnp.mean(losses.astype(jnp.float32)), (losses, aux)

  (loss, (losses, aux)), grads = jax.value_and_grad(mean_loss, has_aux=True)(
      vary_like(params, batch)
  )
  return PerturbedPass(loss, grads, losses, aux)


def _varying_axes(x: Any) -> frozenset:
  """The mesh axes a value varies over inside ``shard_map`` (its vma)."""
  aval = jax.typeof(x) if hasattr(jax, "typeof") else jax.core.get_aval(x)
  mat = getattr(aval, "mat", None)  # JAX >= 0.10
  axes = getattr(mat, "varying", None) if mat is not None else None
  if axes is None:
    axes = getattr(aval, "vma", None)  # JAX 0.6 - 0.9
  return frozenset(axes or ())


def _cast_varying(x: Any, axes: tuple) -> Any:
  if hasattr(jax.lax, "pcast"):
    return jax.lax.pcast(x, axes, to="varying")
  return jax.lax.pvary(x, axes)


def vary_like(params: Any, batch: Any) -> Any:
  r"""``params`` marked as varying over the mesh axes ``batch`` varies over.

  Inside ``jax.shard_map`` with ``check_vma=True`` (the default), JAX
  differentiates a replicated (device-invariant) input of a per-device loss
  through an implicit ``pvary``, whose transpose is a ``psum``: the gradient
  it returns is already the *sum* of the devices' gradients, and the
  ``pmean`` that follows leaves an invariant value unchanged, so a step that
  averages per-device gradients would get :math:`n` times the mean. Taking
  the gradient at a point marked as varying (``jax.lax.pcast(..., to=
  "varying")``, formerly ``pvary``) gives each device its own gradient, which
  the caller averages. Outside ``shard_map`` (``jit``, ``pmap``, a named
  ``vmap``) no value carries such axes and ``params`` is returned as is.
  """
  axes = frozenset().union(*map(_varying_axes, jax.tree.leaves(batch)))
  if not axes:
    return params

  def cast(w):
    missing = tuple(sorted(axes - _varying_axes(w), key=str))
    return _cast_varying(w, missing) if missing else w

  return jax.tree.map(cast, params)


def gather_examples(tree: Any, axis_name: str) -> Any:
  """Every device's rows of ``tree``, concatenated along the first axis.

  ``jax.lax.all_gather(..., tiled=True)`` whose result is the same on every
  device, also as a type: inside ``jax.shard_map`` with ``check_vma=True``
  a plain ``all_gather`` still counts as varying by device, so a state
  written from it (SAF's logit bank, AUSAM's score table) could not leave
  the map replicated (``out_specs=P()``). Under ``pmap`` it is
  ``all_gather``. For a loop of one's own that passes ``logits=`` and
  ``ids=`` of the whole global batch to :func:`sharpjax.saf` or
  :func:`sharpjax.mesa`.

  Example:
    >>> import jax, jax.numpy as jnp, numpy as np, sharpjax as sj
    >>> from jax.sharding import Mesh, PartitionSpec as P
    >>> mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
    >>> gather = jax.shard_map(lambda x: sj.gather_examples(x, "data"),
    ...                        mesh=mesh, in_specs=P("data"), out_specs=P())
    >>> gather(jnp.arange(3))
    Array([0, 1, 2], dtype=int32)
  """
  from jax._src.lax import parallel  # pylint: disable=g-import-not-at-top
  invariant = getattr(parallel, "all_gather_invariant", None)

  def gather(x):
    if invariant is not None and axis_name in _varying_axes(x):
      return invariant(x, axis_name, axis=0, tiled=True)
    return jax.lax.all_gather(x, axis_name, axis=0, tiled=True)

  return jax.tree.map(gather, tree)


def _is_narrow_float(x: Any) -> bool:
  dtype = jnp.asarray(x).dtype
  return jnp.issubdtype(dtype, jnp.floating) and jnp.finfo(dtype).bits < 32


def applied_perturbation(params: Any, perturbation: Any) -> Any | None:
  """What the parameters actually move by, or None when it is ``perturbation``.

  ``cast(w + eps) - w`` in float32 for bfloat16 / float16 leaves, ``eps``
  itself for float32 and wider ones. None (a static answer, from the dtypes
  only) when every leaf is float32 or wider: then nothing rounds away and no
  work is done.
  """
  if not any(_is_narrow_float(w) for w in jax.tree.leaves(params)):
    return None

  def moved(w, e):
    if not _is_narrow_float(w):
      return e
    w32 = w.astype(jnp.float32)
    return (w32 + e).astype(w.dtype).astype(jnp.float32) - w32

  return jax.tree.map(moved, params, perturbation)


def diagnostics_of(
    clean_grads: Any,
    perturbation: Any,
    perturbed_grads: Any,
    perturbed_loss: jax.Array,
    *,
    params: Any = None,
    grad_norm: jax.Array | None = None,
    clean_loss: Any = None,
    perturbation_norm: jax.Array | None = None,
    applied_perturbation_norm: jax.Array | None = None,
) -> Diagnostics:
  """Builds the diagnostics record from values the step already has.

  ``params`` (the clean parameters) gives the applied perturbation norm; it
  costs nothing when every parameter is float32. ``perturbation_norm`` and
  ``applied_perturbation_norm``, when given, are recorded instead of the norms
  of ``perturbation`` (which may then be None): variants with several
  perturbations per step report their mean norms.
  """
  pairs = [(clean_grads, perturbed_grads), (perturbed_grads, perturbed_grads)]
  slots = {}
  if perturbation_norm is None:
    slots["perturbation"] = len(pairs)
    pairs.append((perturbation, perturbation))
  if applied_perturbation_norm is None and params is not None:
    applied = applied_perturbation(params, perturbation)
    if applied is not None:
      slots["applied"] = len(pairs)
      pairs.append((applied, applied))
  if grad_norm is None:
    slots["grad"] = len(pairs)
    pairs.append((clean_grads, clean_grads))
  products = base.tree_inner_products(*pairs)
  if grad_norm is None:
    grad_norm = jnp.sqrt(products[slots["grad"]])
  if perturbation_norm is None:
    perturbation_norm = jnp.sqrt(products[slots["perturbation"]])
  if applied_perturbation_norm is None:
    applied_perturbation_norm = (
        jnp.sqrt(products[slots["applied"]]) if "applied" in slots
        else perturbation_norm
    )
  cosine = (
      products[0]
      * base.safe_inverse(grad_norm)
      * base.safe_inverse(jnp.sqrt(products[1]))
  )
  return Diagnostics(
      grad_norm=jnp.asarray(grad_norm, jnp.float32),
      perturbation_norm=jnp.asarray(perturbation_norm, jnp.float32),
      applied_perturbation_norm=jnp.asarray(applied_perturbation_norm,
                                            jnp.float32),
      clean_loss=_clean_loss(clean_loss),
      perturbed_loss=jnp.asarray(perturbed_loss, jnp.float32),
      cosine=cosine,
      measured=jnp.ones((), jnp.float32),
  )


def take_examples(batch: Any, indices: jax.Array) -> Any:
  """The sub-batch of ``batch`` at ``indices`` (shape ``[k]``, ``k`` static).

  The sub-batch has a static size, so the passes run on it are statically
  smaller computations: this is where example-selecting variants save work.
  Indices must be in range (they come from ``lax.top_k`` or a sampler).
  """
  return jax.tree.map(lambda x: jnp.take(x, indices, axis=0), batch)


def per_example_losses(
    loss_fn: LossFn,
    params: Any,
    batch: Any,
    *,
    has_aux: bool = False,
    name: str = "sam",
) -> jax.Array:
  """The per-example losses of ``batch`` at ``params``, forward only (float32)."""
  size = batch_size(batch)
  losses, _ = split_loss_output(loss_fn(params, batch), has_aux, size, name)
  return losses.astype(jnp.float32)
