"""Data plumbing shared by every measure: batches, weighted means, subsets.

A measure receives its data as one batch (any pytree whose leaves share a
leading batch axis) or as several batches (a ``list``, a generator or any other
iterable that is not itself a pytree container). Batches of the same shape are
stacked into one array per leaf so that every loop over the data is a
``lax.scan`` inside ``jax.jit``; a data set with a smaller last batch gives two
such groups. The data therefore live in device memory for the duration of a
measurement, which is what an evaluation subset of a few thousand examples
needs.
"""

from __future__ import annotations

import collections.abc
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from sharpjax._src import hessian

# Maps a function over probes, subsets or grid points, a chunk at a time.
chunked_map = hessian.chunked_map

# loss_fn(params, batch) -> per-example losses, shape [B].
LossFn = Callable[[Any, Any], jax.Array]


class Batches(NamedTuple):
  """Data prepared for the measures: batches stacked by shape.

  Attributes:
    groups: a tuple of pytrees; in group ``j`` every leaf has shape
      ``[num_batches_j, batch_size_j, ...]``.
  """

  groups: tuple

  @property
  def group_shapes(self) -> tuple[tuple[int, int], ...]:
    """``(num_batches, batch_size)`` of each group (static)."""
    out = []
    for g in self.groups:
      leaf = jax.tree.leaves(g)[0]
      out.append((int(leaf.shape[0]), int(leaf.shape[1])))
    return tuple(out)

  @property
  def num_examples(self) -> int:
    return sum(n * b for n, b in self.group_shapes)


def _is_single_batch(data: Any) -> bool:
  if isinstance(data, (list, collections.abc.Iterator)):
    return False
  if isinstance(data, (dict, tuple, collections.abc.Mapping)):
    return True
  if isinstance(data, (jax.Array, np.ndarray)):
    return True
  if isinstance(data, collections.abc.Iterable):
    return False
  return True  # a custom pytree node (dataclass, ...)


def batch_size(batch: Any, name: str = "measures") -> int:
  """The leading axis shared by every leaf of ``batch``."""
  leaves = jax.tree.leaves(batch)
  sizes = {np.shape(x)[0] if np.ndim(x) else None for x in leaves}
  if not leaves or None in sizes or len(sizes) != 1:
    raise ValueError(
        f"sharpjax.measures.{name}: a batch must be a pytree whose leaves "
        "share a leading batch axis; got leaf shapes "
        f"{jax.tree.map(np.shape, batch)}."
    )
  return sizes.pop()


def as_batches(data: Any, name: str = "measures") -> Batches:
  """Prepares ``data`` (one batch, or an iterable of batches) for a measure.

  Args:
    data: a :class:`Batches` (returned unchanged), one batch (a pytree whose
      leaves share a leading batch axis: a dict, a tuple, an array, ...) or
      several batches (a list, a generator or any other iterable). Averages over
      several batches are weighted by batch size, so they equal the average
      over all examples.
    name: the measure's name, for error messages.

  Returns:
    A :class:`Batches` whose groups stack the batches of equal shape, in order
    of first appearance.
  """
  if isinstance(data, Batches):
    return data
  batches = [data] if _is_single_batch(data) else list(data)
  if not batches:
    raise ValueError(f"sharpjax.measures.{name}: got no data (empty iterable).")
  keys, groups = [], {}
  for b in batches:
    batch_size(b, name)
    b = jax.tree.map(jnp.asarray, b)
    signature = (
        jax.tree.structure(b),
        tuple((x.shape, x.dtype) for x in jax.tree.leaves(b)),
    )
    if signature not in groups:
      keys.append(signature)
      groups[signature] = []
    groups[signature].append(b)
  stacked = tuple(
      jax.tree.map(lambda *xs: jnp.stack(xs), *groups[k]) for k in keys
  )
  return Batches(stacked)


def mean_loss(
    loss_fn: LossFn, params: Any, batch: Any, name: str = "measures"
) -> jax.Array:
  """Mean of ``loss_fn(params, batch)`` in float32, checking its shape is [B]."""
  size = batch_size(batch, name)
  losses = loss_fn(params, batch)
  if isinstance(losses, tuple) or jnp.shape(losses) != (size,):
    shape = "a tuple" if isinstance(losses, tuple) else jnp.shape(losses)
    raise ValueError(
        f"sharpjax.measures.{name}: loss_fn(params, batch) must return "
        f"per-example losses of shape [B] = ({size},), got {shape}. Return "
        "the unreduced losses (for example "
        "optax.softmax_cross_entropy_with_integer_labels without .mean()), and "
        "no aux."
    )
  return jnp.mean(losses.astype(jnp.float32))


def mean_error(
    error_fn: LossFn, params: Any, batch: Any, name: str = "measures"
) -> jax.Array:
  """Mean of ``error_fn(params, batch)`` (per-example 0/1) in float32."""
  size = batch_size(batch, name)
  errors = error_fn(params, batch)
  if jnp.shape(errors) != (size,):
    raise ValueError(
        f"sharpjax.measures.{name}: error_fn(params, batch) must return "
        f"per-example errors (0 or 1) of shape [B] = ({size},), got "
        f"{jnp.shape(errors)}."
    )
  return jnp.mean(errors.astype(jnp.float32))


def weighted_mean(fn: Callable[[Any], Any], batches: Batches) -> Any:
  """Batch-size weighted mean of ``fn(batch)`` over all batches.

  ``fn`` returns a pytree of float32 arrays. One ``lax.scan`` per group of
  equally shaped batches; the result equals the mean over all examples when
  ``fn`` returns a per-batch mean.
  """
  total = None
  for group, (count, size) in zip(batches.groups, batches.group_shapes):
    first = jax.tree.map(lambda x: x[0], group)
    if count == 1:  # no loop: XLA optimises a lone batch better
      acc = jax.tree.map(lambda o: size * o, fn(first))
      total = acc if total is None else jax.tree.map(jnp.add, total, acc)
      continue
    zeros = jax.tree.map(
        lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(fn, first)
    )

    def body(acc, batch, size=size):
      out = fn(batch)
      return jax.tree.map(lambda a, o: a + size * o, acc, out), None

    acc, _ = jax.lax.scan(body, zeros, group)
    total = acc if total is None else jax.tree.map(jnp.add, total, acc)
  n = float(batches.num_examples)
  return jax.tree.map(lambda t: t / n, total)


def subsets(batches: Batches, m: int | None, name: str = "measures") -> Batches:
  """Re-splits the examples into consecutive subsets of ``m`` examples.

  With ``m=None`` the batches as given are the subsets. Otherwise all examples
  (in group order) are split into ``N / m`` subsets; ``N`` must be a multiple
  of ``m``.
  """
  if m is None:
    return batches
  n = batches.num_examples
  if n % m:
    raise ValueError(
        f"sharpjax.measures.{name}: m={m} must divide the number of examples "
        f"N={n}; pass N = k * m examples (the reference uses 1024 examples and "
        "m=128)."
    )
  flat = [
      jax.tree.map(lambda x: x.reshape((-1,) + x.shape[2:]), g)
      for g in batches.groups
  ]
  structures = {jax.tree.structure(f) for f in flat}
  if len(structures) != 1:
    raise ValueError(
        f"sharpjax.measures.{name}: all batches must have the same structure."
    )
  allx = jax.tree.map(lambda *xs: jnp.concatenate(xs), *flat)
  return Batches(
      (jax.tree.map(lambda x: x.reshape((n // m, m) + x.shape[1:]), allx),)
  )


def tree_add_scaled(a: Any, b: Any, scale: Any) -> Any:
  """``a + scale * b`` leaf by leaf (float32 ``b``), cast to ``a``'s dtypes."""
  return jax.tree.map(
      lambda x, y: (x.astype(jnp.float32) + scale * y).astype(x.dtype), a, b
  )
