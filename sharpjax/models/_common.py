"""Helpers shared by the model zoo."""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Optional

import flax.linen as nn
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


class ResidualBlock(nn.Module):
  """Base of the residual blocks: the keyword-only options they share.

  Attributes:
    axis_name: BatchNorm's cross-device axis under ``jax.pmap``.
    dtype: computation dtype.
  """

  axis_name: Optional[str] = dataclasses.field(default=None, kw_only=True)
  dtype: Any = dataclasses.field(default=jnp.float32, kw_only=True)


def norm_and_conv(train: bool, axis_name: Optional[str], dtype: Any):
  """The BatchNorm and bias-free convolution of the residual blocks.

  BatchNorm with momentum 0.9 and epsilon 1e-5 (PyTorch's 0.1 / 1e-5, as the
  papers' CIFAR code), running averages in eval mode, statistics averaged
  over ``axis_name`` under ``pmap``.
  """
  norm = functools.partial(
      nn.BatchNorm, use_running_average=not train, momentum=0.9,
      epsilon=1e-5, axis_name=axis_name, dtype=dtype)
  conv = functools.partial(nn.Conv, use_bias=False, dtype=dtype)
  return norm, conv
