"""Reading what the last step saw out of an optimizer state."""

from __future__ import annotations

from typing import Any

import jax

from sharpjax._src import base
from sharpjax._src import perturbed as perturbed_lib

# Record types kept in sharpjax states; each contributes its fields to
# `diagnostics`. Modules that add a record type register it here.
RECORD_TYPES: list[type] = [perturbed_lib.Diagnostics]


def register_record(record_type: type) -> type:
  """Registers a NamedTuple type whose fields `diagnostics` should report."""
  if record_type not in RECORD_TYPES:
    RECORD_TYPES.append(record_type)
  return record_type


def diagnostics(opt_state: Any) -> dict[str, jax.Array]:
  """The last step's diagnostics, found anywhere inside an optimizer state.

  Works through ``optax.chain``, ``inject_hyperparams`` and ``MultiSteps``
  states. For the SAM family the dict holds the fields of
  :class:`sharpjax.Diagnostics`: ``grad_norm``, ``perturbation_norm`` (the
  perturbation computed), ``applied_perturbation_norm`` (what the
  parameters really moved by, smaller with bfloat16 parameters),
  ``clean_loss`` (NaN unless ``value=`` was passed to ``update``),
  ``perturbed_loss``, ``cosine`` and ``measured`` (0 on a step that took no
  perturbed pass, LookSAM's reuse steps, whose perturbed fields are then 0);
  SAF and MESA add their own fields. These are computed from values the step
  already has.

  Under ``jax.pmap`` / ``shard_map`` with ``axis_name``, each value is the
  mean over devices of the per-device values: the cosine is the mean of the
  devices' cosines between their own clean and perturbed gradients (it can
  read 0.56 where one device reads 0.99), not the cosine of the averaged
  gradients; the losses are means over the devices' batches.

  Example:
    >>> import jax, jax.numpy as jnp, optax, sharpjax as sj
    >>> params = {"w": jnp.array([3.0, 4.0])}
    >>> batch = {"x": jnp.eye(2)}
    >>> loss_fn = lambda p, b: 0.5 * (b["x"] @ p["w"]) ** 2
    >>> grads = jax.grad(lambda p: loss_fn(p, batch).mean())(params)
    >>> tx = optax.chain(sj.sam(rho=0.1), optax.sgd(0.1))
    >>> _, state = tx.update(grads, tx.init(params), params, loss_fn=loss_fn,
    ...                      batch=batch)
    >>> d = sj.diagnostics(state)
    >>> [round(float(d[k]), 4) for k in ("grad_norm", "perturbation_norm",
    ...                                  "applied_perturbation_norm", "cosine")]
    [2.5, 0.1, 0.1, 1.0]

  Raises:
    ValueError: if the state holds no sharpjax diagnostics, or two records of
      the same kind (two SAM-family transformations in one chain).
  """
  records = base.find_states(opt_state, tuple(RECORD_TYPES))
  if not records:
    raise ValueError(
        "sharpjax.diagnostics: this optimizer state holds no sharpjax "
        "transformation (sam, asam, saf, mesa, ...)."
    )
  out: dict[str, jax.Array] = {}
  seen: set[type] = set()
  for record in records:
    if type(record) in seen:
      raise ValueError(
          "sharpjax.diagnostics: the state holds several "
          f"{type(record).__name__} records (two transformations of the same "
          "kind in one chain); read them from the state directly."
      )
    seen.add(type(record))
    out.update(record._asdict())
  return out
