"""Model adapters: linen and nnx modules behind one functional interface.

An adapter has ``init(key, x) -> (params, model_state)`` and
``apply(params, model_state, x, *, train, key) -> (logits, model_state)``;
the step never sees which kind of module it drives.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp


class Linen:
  """A ``flax.linen.Module`` called as ``model.apply(variables, x, train=...)``."""

  def __init__(self, model: nn.Module, train_kwarg: Optional[str],
               rng_names: Sequence[str]):
    self.model = model
    self.train_kwarg = train_kwarg
    self.rng_names = tuple(rng_names)

  def _rngs(self, key):
    if key is None:
      return {}
    return {n: jax.random.fold_in(key, i) for i, n in enumerate(self.rng_names)}

  def _kwargs(self, train):
    return {self.train_kwarg: train} if self.train_kwarg else {}

  def init(self, key, x):
    k_params, k_rest = jax.random.split(key)
    rngs = {"params": k_params, **self._rngs(k_rest)}
    variables = dict(self.model.init(rngs, x, **self._kwargs(False)))
    params = variables.pop("params", {})
    return params, variables

  def apply(self, params, model_state, x, *, train, key):
    variables = {"params": params, **model_state}
    kwargs = self._kwargs(train)
    if train and model_state:
      logits, new_state = self.model.apply(
          variables, x, rngs=self._rngs(key), mutable=list(model_state),
          **kwargs,
      )
      return logits, {k: new_state.get(k, v) for k, v in model_state.items()}
    logits = self.model.apply(variables, x, rngs=self._rngs(key), **kwargs)
    return logits, model_state


class Nnx:
  """An nnx module through split/merge inside the traced step.

  The module's own ``nnx.Rngs`` streams (e.g. for ``nnx.Dropout``) live in the
  model state: both passes of a step start from the same stream state, and
  the clean pass's advanced stream is kept, so the key is the same in both
  passes and fresh every step. ``state.rng`` is not used.
  """

  def __init__(self, model):
    from flax import nnx  # pylint: disable=g-import-not-at-top

    self.nnx = nnx
    self.graphdef, params, stats, rest = nnx.split(
        model, nnx.Param, nnx.BatchStat, ...
    )
    self.initial = (params, {"batch_stats": stats, "rest": rest})

  def init(self, key, x):
    del key, x  # nnx modules are initialised when constructed
    params, model_state = self.initial
    return jax.tree.map(jnp.array, params), jax.tree.map(jnp.array, model_state)

  def apply(self, params, model_state, x, *, train, key):
    del key
    nnx = self.nnx
    # Fresh Variable objects owned by the current trace: the states may have
    # been made at an outer trace level (the perturbed pass runs inside
    # tx.update's own value_and_grad), where nnx refuses mutation.
    fresh = lambda tree: jax.tree.map(lambda v: v, tree)
    module = nnx.merge(self.graphdef, fresh(params),
                       fresh(model_state["batch_stats"]),
                       fresh(model_state["rest"]))
    if train:
      module.train()
    else:
      module.eval()
    logits = module(x)
    if not train:
      return logits, model_state
    _, _, stats, rest = nnx.split(module, nnx.Param, nnx.BatchStat, ...)
    return logits, {"batch_stats": stats, "rest": rest}


def adapter(model: Any, train_kwarg: Optional[str],
            rng_names: Sequence[str]) -> Any:
  """The adapter for a linen or nnx ``model``; a clear error otherwise."""
  if isinstance(model, nn.Module):
    return Linen(model, train_kwarg, rng_names)
  try:
    from flax import nnx  # pylint: disable=g-import-not-at-top
  except ImportError:  # pragma: no cover
    nnx = None
  if nnx is not None and isinstance(model, nnx.Module):
    return Nnx(model)
  raise TypeError(
      "make_trainer: model must be a flax.linen.Module or a flax.nnx.Module, "
      f"got {type(model).__name__}."
  )
