r"""Hessian-vector products and Hutchinson's trace estimator.

The two pieces the sharpness measures (:mod:`sharpjax.measures`) and the Rényi
regularizer (:func:`sharpjax.renyi_sharpness_penalty`) share. A product

.. math::
  Hv = \partial_\epsilon \nabla f(w + \epsilon v)\big|_{\epsilon=0}

is computed forward-over-reverse (``jax.jvp`` of ``jax.grad``) at about twice
the cost of a gradient, and is itself differentiable (the regularizer takes
its gradient). The linear algebra runs on the flattened float32 parameter
vector (:func:`flat_view`); Rademacher probe ``k`` is drawn from
``fold_in(key, k)``, so the measures and the regularizer see the same probes
for the same key.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from sharpjax._src import base

MatVec = Callable[[jax.Array], jax.Array]


class FlatView(NamedTuple):
  """The parameters as one flat float32 vector.

  Attributes:
    dim: the number of parameters.
    unravel: flat float32 vector -> float32 pytree shaped like the parameters.
    ravel: pytree shaped like the parameters -> flat float32 vector.
  """

  dim: int
  unravel: Callable[[jax.Array], Any]
  ravel: Callable[[Any], jax.Array]


def flat_view(params: Any) -> FlatView:
  """A :class:`FlatView` of ``params`` (leaves in ``jax.tree.leaves`` order).

  Example:
    >>> import jax.numpy as jnp
    >>> from sharpjax._src import hessian
    >>> flat = hessian.flat_view({"a": jnp.ones((2, 2)), "b": jnp.zeros(1)})
    >>> flat.dim, flat.unravel(jnp.arange(5.))["b"]
    (5, Array([4.], dtype=float32))
  """
  leaves, treedef = jax.tree.flatten(params)
  shapes = [jnp.shape(x) for x in leaves]
  sizes = [int(jnp.size(x)) for x in leaves]
  splits = [sum(sizes[: i + 1]) for i in range(len(sizes) - 1)]

  def ravel(tree):
    parts = [jnp.ravel(x).astype(jnp.float32) for x in jax.tree.leaves(tree)]
    return jnp.concatenate(parts) if parts else jnp.zeros((0,), jnp.float32)

  def unravel(flat):
    parts = jnp.split(flat, splits) if splits else [flat]
    return jax.tree.unflatten(
        treedef, [p.reshape(s) for p, s in zip(parts, shapes)]
    )

  return FlatView(sum(sizes), unravel, ravel)


def hvp(fun: Callable[[Any], jax.Array], params: Any, v: Any) -> Any:
  r"""Hessian-vector product :math:`\nabla^2 f(w)\, v` of a scalar function.

  Forward-over-reverse: ``jax.jvp`` of ``jax.grad(fun)`` at ``params`` along
  ``v`` (cast to the parameters' dtypes), about twice the cost of a gradient.

  Args:
    fun: ``fun(params)`` returning a scalar.
    params: the point :math:`w`, any pytree.
    v: a pytree shaped like ``params``.

  Returns:
    :math:`Hv`, a float32 pytree shaped like ``params``.

  Example:
    >>> import jax.numpy as jnp
    >>> from sharpjax._src import hessian
    >>> f = lambda w: 0.5 * jnp.sum(jnp.array([3., 1.]) * w ** 2)
    >>> hessian.hvp(f, jnp.ones(2), jnp.array([1., 2.]))
    Array([3., 2.], dtype=float32)
  """
  tangent = base.tree_cast_like(v, params)
  _, hv = jax.jvp(jax.grad(fun), (params,), (tangent,))
  return jax.tree.map(lambda x: x.astype(jnp.float32), hv)


def probe(
    matvec: MatVec, dim: int, index: jax.Array, key: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
  r"""One Rademacher probe ``z`` from ``fold_in(key, index)``.

  Returns :math:`(z^\top A z,\ \|Az\|^2,\ z \odot Az)`.
  """
  z = jax.random.rademacher(jax.random.fold_in(key, index), (dim,),
                            jnp.float32)
  az = matvec(z)
  return jnp.vdot(z, az), jnp.vdot(az, az), z * az


def hutchinson(
    matvec: MatVec,
    dim: int,
    key: jax.Array,
    num_probes: int,
    *,
    probes_per_step: int | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  r"""Rademacher probes of a symmetric operator for trace estimation.

  For probes :math:`z_k \in \{\pm1\}^{d}` returns the samples
  :math:`z_k^\top A z_k` (mean: :math:`\mathrm{tr}\,A`) and
  :math:`\|A z_k\|^2` (mean: :math:`\mathrm{tr}\,A^2`), and the diagonal
  estimate :math:`\frac1K \sum_k z_k \odot A z_k`.

  Args:
    matvec: ``x -> A x`` on float32 vectors of length ``dim``.
    dim: the vector length.
    key: PRNG key; probe ``k`` uses ``fold_in(key, k)``.
    num_probes: ``K``.
    probes_per_step: probes evaluated together (vectorised); ``None`` runs
      them one at a time; ``K`` or more runs them all at once, with no loop.

  Returns:
    ``(quad_samples [K], sq_norm_samples [K], diagonal [dim])``.

  Example:
    >>> import jax, jax.numpy as jnp, sharpjax.measures as sm
    >>> a = jnp.array([3., 2., 1.])
    >>> quad, sq, diag = sm.hutchinson(lambda z: a * z, 3,
    ...                                jax.random.PRNGKey(0), 4)
    >>> quad.tolist(), sq.tolist(), diag.tolist()  # exact for a diagonal A
    ([6.0, 6.0, 6.0, 6.0], [14.0, 14.0, 14.0, 14.0], [3.0, 2.0, 1.0])
  """
  quad, sq, diag = chunked_map(
      lambda i: probe(matvec, dim, i, key), jnp.arange(num_probes),
      probes_per_step,
  )
  return quad, sq, jnp.mean(diag, axis=0)


def chunked_map(fn: Callable[[Any], Any], xs: Any, chunk: int | None) -> Any:
  """``lax.map`` of ``fn`` over the leading axis, ``chunk`` at a time.

  ``chunk=None`` maps one element at a time; a ``chunk`` covering all elements
  is a plain ``vmap``, with no loop at all (XLA:CPU runs convolutions inside
  loops several times slower, jax-ml/jax#12868).
  """
  n = jax.tree.leaves(xs)[0].shape[0]
  if n == 1:
    return jax.tree.map(lambda o: o[None], fn(jax.tree.map(lambda x: x[0], xs)))
  if chunk is not None and chunk >= n:
    return jax.vmap(fn)(xs)
  return jax.lax.map(fn, xs, batch_size=chunk)
