"""Multi-process runs: the runtime's initialization and each process's rows.

One Python process per host (per TPU-pod host, per GPU node, or, for testing,
per group of host CPU devices on one machine) runs the same program. The
processes connect through ``jax.distributed``; a ``jax.sharding.Mesh`` over
``jax.devices()`` (every process's devices) makes the arrays global. The
sharded checkpoints live in :mod:`sharpjax._src.checkpoint`.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import jax
import numpy as np

# Environment variables the launcher (sharpjax.launch) sets for its workers.
ENV_COORDINATOR = "SHARPJAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "SHARPJAX_NUM_PROCESSES"
ENV_PROCESS_ID = "SHARPJAX_PROCESS_ID"
ENV_HEARTBEAT = "SHARPJAX_HEARTBEAT_TIMEOUT"
ENV_INIT_TIMEOUT = "SHARPJAX_INIT_TIMEOUT"
ENV_SHUTDOWN_TIMEOUT = "SHARPJAX_SHUTDOWN_TIMEOUT"

_initialized = False


def initialize(
    coordinator_address: Optional[str] = None,
    num_processes: Optional[int] = None,
    process_id: Optional[int] = None,
    *,
    heartbeat_timeout: Optional[int] = None,
    initialization_timeout: Optional[int] = None,
    shutdown_timeout: Optional[int] = None,
) -> bool:
  """Connects this process to the others with ``jax.distributed.initialize``.

  Arguments left ``None`` are read from the environment the launcher sets
  (``SHARPJAX_COORDINATOR_ADDRESS``, ``SHARPJAX_NUM_PROCESSES``,
  ``SHARPJAX_PROCESS_ID`` and the timeouts). Without a coordinator address in
  either, ``jax.distributed.initialize()`` is called with no address, which
  detects a TPU pod or a SLURM/Open MPI cluster by itself; on a machine that
  is none of these (one plain process) nothing is done and False is returned.
  A second call is a no-op. On the CPU backend the cross-process collectives
  are switched to gloo first (XLA's CPU client has none by default).

  Must run before anything touches a JAX backend (``jax.devices()``, the first
  array).

  Args:
    coordinator_address: ``host:port`` of process 0's coordination service.
    num_processes: number of processes.
    process_id: this process's index in ``[0, num_processes)``.
    heartbeat_timeout: seconds without a heartbeat after which the
      coordination service declares a process dead and fails the others
      (default 100, jax's own default; the launcher passes 10).
    initialization_timeout: seconds to wait for every process to connect.
    shutdown_timeout: seconds the exit barrier waits for the others.

  Returns:
    True if this process is now part of a multi-process run.
  """
  global _initialized
  if _initialized:
    return True
  env = os.environ
  address = coordinator_address or env.get(ENV_COORDINATOR)
  if num_processes is None and env.get(ENV_NUM_PROCESSES):
    num_processes = int(env[ENV_NUM_PROCESSES])
  if process_id is None and env.get(ENV_PROCESS_ID):
    process_id = int(env[ENV_PROCESS_ID])
  kwargs = {}
  for name, value, var in (
      ("heartbeat_timeout_seconds", heartbeat_timeout, ENV_HEARTBEAT),
      ("initialization_timeout", initialization_timeout, ENV_INIT_TIMEOUT),
      ("shutdown_timeout_seconds", shutdown_timeout, ENV_SHUTDOWN_TIMEOUT)):
    if value is None and env.get(var):
      value = int(env[var])
    if value is not None:
      kwargs[name] = int(value)
  platforms = env.get("JAX_PLATFORMS", "") or str(
      jax.config.jax_platforms or "")
  if platforms.split(",")[0] == "cpu":
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if address is None:
    try:
      jax.distributed.initialize(**kwargs)
    except (ValueError, RuntimeError):
      return False  # no cluster to detect: a plain single process
  else:
    if address.startswith(("127.", "localhost:")):
      # A local run: bind the coordination service to loopback only.
      kwargs["coordinator_bind_address"] = address
    jax.distributed.initialize(address, num_processes, process_id, **kwargs)
  _initialized = True
  return True


def process_rows(batch: Any, index: Optional[int] = None,
                 count: Optional[int] = None) -> Any:
  """This process's rows of a global batch: block ``index`` of ``count``.

  Row block ``i`` of a global batch of ``B`` rows is rows
  ``[i * B / count, (i + 1) * B / count)``, matching the order in which
  ``jax.make_array_from_process_local_data`` lays the processes' rows out over
  a 1-D data mesh built from ``jax.devices()``.

  Args:
    batch: a pytree of arrays with a leading batch axis (``x``, ``y``,
      ``ids`` travel together).
    index: the block (default ``jax.process_index()``).
    count: the number of blocks (default ``jax.process_count()``).

  Returns:
    The same pytree with ``B / count`` rows per leaf.

  Example:
    >>> import numpy as np
    >>> from sharpjax import launch
    >>> batch = {"x": np.zeros((8, 3)), "ids": np.arange(8)}
    >>> launch.process_rows(batch, index=1, count=4)["ids"]
    array([2, 3])
  """
  index = jax.process_index() if index is None else int(index)
  count = jax.process_count() if count is None else int(count)
  sizes = {np.shape(x)[0] for x in jax.tree.leaves(batch)}
  if len(sizes) != 1:
    raise ValueError(f"process_rows: the batch's leaves have different "
                     f"leading sizes {sorted(sizes)}.")
  size = sizes.pop()
  if size % count:
    raise ValueError(
        f"process_rows: global batch size {size} is not divisible by the "
        f"{count} processes.")
  b = size // count
  return jax.tree.map(lambda x: x[index * b:(index + 1) * b], batch)
