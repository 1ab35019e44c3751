"""Helpers shared by the model zoo."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp


def check_rank(name: str, x: jax.Array, ranks: tuple[int, ...], layout: str):
  """A clear error when the input does not have one of the accepted ranks."""
  if jnp.ndim(x) not in ranks:
    raise ValueError(
        f"sharpjax.models.{name}: expected input of rank "
        f"{' or '.join(map(str, ranks))} ({layout}), got shape {jnp.shape(x)}."
    )


def param_count(variables: Any) -> int:
  """Number of scalars in the ``params`` collection (or in a params tree).

  Works on arrays and on ``jax.eval_shape`` outputs (``ShapeDtypeStruct``)
  alike, so the count of a large model costs no memory::

    shapes = jax.eval_shape(model.init, jax.random.key(0), x)
    param_count(shapes)
  """
  if isinstance(variables, dict) and "params" in variables:
    variables = variables["params"]
  return sum(math.prod(jnp.shape(x)) for x in jax.tree.leaves(variables))
