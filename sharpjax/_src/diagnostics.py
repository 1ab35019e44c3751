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
  states. For the SAM family the dict holds ``grad_norm``,
  ``perturbation_norm``, ``clean_loss`` (NaN unless ``value=`` was passed to
  ``update``), ``perturbed_loss`` and ``cosine``; SAF and MESA add their own
  fields. These are computed from values the step already has.

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
