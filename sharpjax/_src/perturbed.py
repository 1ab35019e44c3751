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
  """What the last SAM-family step saw (all float32 scalars).

  Attributes:
    grad_norm: global L2 norm of the clean gradient.
    perturbation_norm: global L2 norm of the perturbation.
    clean_loss: mean loss at the clean parameters, as passed in ``value=``
      (optax's convention for the loss of the current step); NaN when the
      caller did not pass it, since the transformation never evaluates it.
    perturbed_loss: mean loss at the perturbed parameters.
    cosine: cosine between the clean and the perturbed gradient.
  """

  grad_norm: jax.Array
  perturbation_norm: jax.Array
  clean_loss: jax.Array
  perturbed_loss: jax.Array
  cosine: jax.Array


def init_diagnostics() -> Diagnostics:
  zero = jnp.zeros((), jnp.float32)
  return Diagnostics(zero, zero, zero, zero, zero)


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


def perturbed_pass(
    loss_fn: LossFn,
    params: Any,
    perturbation: Any,
    batch: Any,
    *,
    has_aux: bool = False,
    name: str = "sam",
) -> PerturbedPass:
  """Gradient of the mean of ``loss_fn`` at ``params + perturbation``.

  The perturbation is added in float32 and the sum cast back to each
  parameter's dtype.
  """
  perturbed = jax.tree.map(
      lambda w, e: (w.astype(jnp.float32) + e).astype(w.dtype),
      params,
      perturbation,
  )
  return gradient_pass(loss_fn, perturbed, batch, has_aux=has_aux, name=name)


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
  that need clean gradients of their own (for example one per chunk of the
  batch) call it directly.
  """
  size = batch_size(batch)

  def mean_loss(p):
    losses, aux = split_loss_output(loss_fn(p, batch), has_aux, size, name)
    return jnp.mean(losses.astype(jnp.float32)), (losses, aux)

  (loss, (losses, aux)), grads = jax.value_and_grad(mean_loss, has_aux=True)(
      params
  )
  return PerturbedPass(loss, grads, losses, aux)


def split_batch(batch: Any, num_chunks: int, *, name: str = "sam") -> Any:
  """Splits ``batch`` into chunks: leaves [B, ...] become [num_chunks, m, ...].

  ``m = B / num_chunks``; the chunks are consecutive slices of the batch.

  Raises a clear error at trace time when ``num_chunks`` does not divide B.
  """
  size = batch_size(batch)
  if size % num_chunks:
    raise ValueError(
        f"sharpjax.{name}: the batch size {size} is not divisible by "
        f"num_chunks={num_chunks}."
    )
  return jax.tree.map(
      lambda x: x.reshape((num_chunks, size // num_chunks) + x.shape[1:]),
      batch,
  )


def diagnostics_of(
    clean_grads: Any,
    perturbation: Any,
    perturbed_grads: Any,
    perturbed_loss: jax.Array,
    *,
    grad_norm: jax.Array | None = None,
    clean_loss: Any = None,
    perturbation_norm: jax.Array | None = None,
) -> Diagnostics:
  """Builds the diagnostics record from values the step already has.

  ``perturbation_norm``, when given, is recorded instead of the norm of
  ``perturbation`` (which may then be None): variants with several
  perturbations per step report their mean norm.
  """
  pairs = [(clean_grads, perturbed_grads), (perturbed_grads, perturbed_grads)]
  if perturbation_norm is None:
    pairs.append((perturbation, perturbation))
  if grad_norm is None:
    pairs.append((clean_grads, clean_grads))
  products = base.tree_inner_products(*pairs)
  if grad_norm is None:
    grad_norm = jnp.sqrt(products[-1])
  if perturbation_norm is None:
    perturbation_norm = jnp.sqrt(products[2])
  cosine = (
      products[0]
      * base.safe_inverse(grad_norm)
      * base.safe_inverse(jnp.sqrt(products[1]))
  )
  if clean_loss is None:
    clean_loss = jnp.nan
  return Diagnostics(
      grad_norm=jnp.asarray(grad_norm, jnp.float32),
      perturbation_norm=jnp.asarray(perturbation_norm, jnp.float32),
      clean_loss=jnp.asarray(clean_loss, jnp.float32).reshape(()),
      perturbed_loss=jnp.asarray(perturbed_loss, jnp.float32),
      cosine=cosine,
  )


def take_examples(batch: Any, indices: jax.Array) -> Any:
  """The sub-batch of ``batch`` at ``indices`` (shape ``[k]``, ``k`` static).

  The sub-batch has a static size, so the passes run on it are statically
  smaller computations: this is where example-selecting variants save work.
  Indices must be in range (they come from ``lax.top_k`` or a sampler).
  """
  return jax.tree.map(lambda x: jnp.take(x, indices, axis=0), batch)


def add_perturbation(params: Any, perturbation: Any) -> Any:
  """``params + perturbation``, added in float32 and cast back per leaf."""
  return jax.tree.map(
      lambda w, e: (w.astype(jnp.float32) + e).astype(w.dtype),
      params,
      perturbation,
  )


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
