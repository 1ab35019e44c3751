"""Example ids to rows of a per-example table (SAF's logit bank, AUSAM's scores).

A per-example table keeps one row per example of the data set, indexed by the
example's id in ``[0, num_rows)``. JAX clamps out-of-range gather and scatter
indices and wraps negative ones, and narrowing an int64 id to int32 wraps it
modulo 2**32, so an unchecked bad id would read or write another example's row.
Here every id is checked against the table *in its own dtype*, before any cast,
and an out-of-range id is mapped to ``num_rows``, one past the end: gathers
with ``mode="fill"`` read the fill value there and scatters with
``mode="drop"`` drop the write.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def as_ids(ids: Any) -> Any:
  """``ids`` as an array without narrowing its dtype.

  A JAX array (or tracer) or a NumPy array is returned unchanged; anything
  else (a list, a Python int) becomes a NumPy array. ``jnp.asarray`` would
  turn a NumPy int64 array into int32 when ``jax_enable_x64`` is off,
  wrapping ids of 2**31 and more onto other rows before they can be checked.
  """
  if isinstance(ids, (jax.Array, np.ndarray, np.generic)):
    return ids
  return np.asarray(ids)


def table_rows(ids: Any, num_rows: int) -> tuple[jax.Array, jax.Array]:
  """Rows of a ``num_rows``-row table for ``ids``, and which ids are in range.

  Args:
    ids: integer ids, any shape and integer dtype (int64 and unsigned ids
      included); a NumPy array is checked on the host.
    num_rows: the table's number of rows (``<= 2**31 - 1``).

  Returns:
    ``(rows, in_range)``: int32 rows, equal to the id where
    ``0 <= id < num_rows`` and to ``num_rows`` (one past the end) elsewhere,
    and the boolean mask of in-range ids.

  Example:
    >>> import numpy as np
    >>> from sharpjax._src import example_ids
    >>> rows, ok = example_ids.table_rows(np.array([3, -1, 2**32 + 5]), 8)
    >>> rows.tolist(), ok.tolist()
    ([3, 8, 8], [True, False, False])
  """
  num_rows = int(num_rows)
  if not 0 < num_rows <= np.iinfo(np.int32).max:
    raise ValueError(
        f"a per-example table needs 1 to 2**31 - 1 rows, got {num_rows}."
    )
  ids = as_ids(ids)
  if not jnp.issubdtype(ids.dtype, jnp.integer):
    raise ValueError(f"example ids must be integers, got {ids.dtype}.")
  xp = np if isinstance(ids, (np.ndarray, np.generic)) else jnp
  info = np.iinfo(ids.dtype)
  # Compared in the ids' own dtype: a bound the dtype cannot hold is no bound.
  in_range = xp.ones(np.shape(ids), bool) if info.min == 0 else ids >= 0
  if num_rows <= info.max:
    in_range = in_range & (ids < num_rows)
  # Narrowed only where in range, so the cast cannot wrap onto a valid row.
  rows = xp.where(in_range, ids, 0).astype(np.int32)
  rows = xp.where(in_range, rows, np.int32(num_rows))
  return jnp.asarray(rows, jnp.int32), jnp.asarray(in_range)
