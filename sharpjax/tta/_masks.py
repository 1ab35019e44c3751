"""Which parameters test-time adaptation touches: normalization scale/bias.

SAR and Tent adapt only the affine parameters of the normalization layers
(BatchNorm, GroupNorm, LayerNorm, ...). :func:`norm_param_mask` builds the
boolean pytree that ``optax.partition`` / ``optax.masked`` need, either
exactly (by running the Flax model abstractly and recording which modules are
normalization layers) or from the parameter names alone.
"""

from __future__ import annotations

import re
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax

# Flax's normalization layers. Their affine parameters are ``scale`` and
# ``bias``.
NORM_TYPES: tuple[type, ...] = tuple(
    t
    for t in (
        getattr(nn, name, None)
        for name in ("BatchNorm", "LayerNorm", "GroupNorm", "RMSNorm",
                     "InstanceNorm")
    )
    if t is not None
)
AFFINE_NAMES = ("scale", "bias")
_NORM_NAME = re.compile(r"norm|(^|_)(bn|ln|gn)(\d+|_|$)", re.IGNORECASE)


def _keys(path: tuple) -> tuple[str, ...]:
  out = []
  for entry in path:
    for attr in ("key", "name", "idx"):
      if hasattr(entry, attr):
        out.append(str(getattr(entry, attr)))
        break
    else:
      out.append(str(entry))
  return tuple(out)


def _norm_module_paths(model: nn.Module, variables: Any, inputs: Any,
                       apply_kwargs: dict) -> set[tuple[str, ...]]:
  """Paths of every normalization module the model calls on ``inputs``."""
  found: set[tuple[str, ...]] = set()

  def interceptor(next_fun, args, kwargs, context):
    if isinstance(context.module, NORM_TYPES):
      found.add(tuple(context.module.path))
    return next_fun(*args, **kwargs)

  def run(variables, inputs):
    with nn.intercept_methods(interceptor):
      return model.apply(variables, inputs, mutable=True, **apply_kwargs)

  jax.eval_shape(run, variables, inputs)
  return found


def norm_param_mask(
    params: Any,
    *,
    model: Optional[nn.Module] = None,
    inputs: Any = None,
    model_state: Optional[dict] = None,
    apply_kwargs: Optional[dict] = None,
    exclude: Sequence[str] = (),
) -> Any:
  r"""Boolean pytree shaped like ``params``: True on normalization scale/bias.

  Two ways to decide what a normalization layer is:

  * with ``model`` and ``inputs`` (exact): the Flax linen model is applied
    abstractly (``jax.eval_shape``, no FLOPs) under ``nn.intercept_methods``,
    and every module that is a ``BatchNorm``, ``LayerNorm``, ``GroupNorm``,
    ``RMSNorm`` or ``InstanceNorm`` is recorded with its path; its ``scale``
    and ``bias`` leaves are selected, whatever the modules are named;
  * from ``params`` alone (by name): the ``scale``/``bias`` leaves of modules
    whose name contains ``norm`` (``BatchNorm_0``, ``LayerNorm_1``,
    ``GroupNorm_0``, ``norm1``) or is ``bn``/``ln``/``gn`` with an optional
    number or underscore (``bn1``, ``ln_f``). This covers Flax's automatic
    names and the usual hand-written ones.

  SAR (Niu et al., 2023) additionally leaves the deepest normalization layers
  alone (ResNet-50's ``layer4``, ViT-B's blocks 9-11 and final norm): pass
  such layers in ``exclude``.

  Args:
    params: the ``params`` collection of a Flax model (any pytree of dicts).
    model: a ``flax.linen.Module`` (optional, for the exact mode).
    inputs: an example input for ``model`` (only shapes matter).
    model_state: the other variable collections (e.g. ``batch_stats``).
    apply_kwargs: extra keyword arguments for ``model.apply`` (e.g.
      ``{"train": False}``).
    exclude: regular expressions; a leaf whose ``/``-joined path (e.g.
      ``"BasicBlock_7/BatchNorm_1/scale"``) matches one (``re.search``) is
      not selected.

  Returns:
    A pytree of Python bools with the structure of ``params``.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from sharpjax import tta
    >>> model = tta.NormCNN1D(norm="group")
    >>> x = jnp.zeros((2, 40))
    >>> params = model.init(jax.random.key(0), x)["params"]
    >>> mask = tta.norm_param_mask(params, model=model, inputs=x)
    >>> sorted(k for k, v in mask.items() if any(jax.tree.leaves(v)))
    ['GroupNorm_0', 'GroupNorm_1', 'GroupNorm_2']
  """
  patterns = [re.compile(p) for p in exclude]
  if model is not None:
    if inputs is None:
      raise ValueError("norm_param_mask: pass inputs= together with model=.")
    variables = {"params": params, **(model_state or {})}
    module_paths = _norm_module_paths(model, variables, inputs,
                                      dict(apply_kwargs or {}))

    def is_norm_module(keys):
      return keys in module_paths
  else:

    def is_norm_module(keys):
      return bool(keys) and _NORM_NAME.search(keys[-1]) is not None

  def select(path, leaf):
    del leaf
    keys = _keys(path)
    if not keys or keys[-1] not in AFFINE_NAMES:
      return False
    if not is_norm_module(keys[:-1]):
      return False
    joined = "/".join(keys)
    return not any(p.search(joined) for p in patterns)

  return jax.tree_util.tree_map_with_path(select, params)


def mask_paths(mask: Any) -> list[str]:
  """The ``/``-joined paths of the True leaves of a mask (for printing)."""
  flat = jax.tree_util.tree_flatten_with_path(mask)[0]
  return ["/".join(_keys(p)) for p, v in flat if v]
