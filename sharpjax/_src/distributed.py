"""Multi-process runs: the runtime's initialization and sharded checkpoints.

One Python process per host (per TPU-pod host, per GPU node, or, for testing,
per group of host CPU devices on one machine) runs the same program. The
processes connect through ``jax.distributed``; a ``jax.sharding.Mesh`` over
``jax.devices()`` (every process's devices) makes the arrays global.
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


# ---------------------------------------------------------------------------
# Checkpoints of sharded state.
# ---------------------------------------------------------------------------


def _manager(directory: str, keep: Optional[int], create: bool):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, create=create, enable_async_checkpointing=False)
  return ocp.CheckpointManager(os.path.abspath(directory), options=options,
                               item_names=("state", "meta"))


def _is_typed_key(x: Any) -> bool:
  return isinstance(x, jax.Array) and jax.dtypes.issubdtype(
      x.dtype, jax.dtypes.prng_key)


def _keys_as_data(tree: Any) -> Any:
  """Typed PRNG keys replaced by their raw ``uint32`` data (what orbax stores)."""
  return jax.tree.map(
      lambda x: jax.random.key_data(x) if _is_typed_key(x) else x, tree)


def _data_as_keys(tree: Any, template: Any) -> Any:
  """Raw key data back into typed keys wherever ``template`` holds one."""
  return jax.tree.map(
      lambda x, t: (jax.random.wrap_key_data(x, impl=jax.random.key_impl(t))
                    if _is_typed_key(t) else x), tree, template)


def save_state(directory: str, step: int, state: Any,
               meta: Optional[dict] = None, *, keep: Optional[int] = 2) -> int:
  """Writes a (possibly sharded, multi-process) state with orbax.

  Every process must call it with its part of the same global arrays: each
  process writes the shards it holds (one copy of replicated arrays), process
  0 the metadata, and orbax renames the step directory only once every
  process has finished, so a run killed during a save leaves the previous
  step as the latest complete one. No array is gathered onto one host: a
  logit bank sharded by example is written by the hosts that hold its rows.

  Args:
    directory: the run's checkpoint directory (shared by all processes:
      a network file system or a bucket on a pod).
    step: the step number (a checkpoint of that step already there is kept).
    state: the pytree, e.g. a :class:`sharpjax.training.TrainState`. Typed
      PRNG keys (``jax.random.key``) are stored as their raw key data and
      come back typed when the template of :func:`restore_state` holds a
      typed key there.
    meta: JSON-serialisable extras, e.g. the data-iterator position
      ``{"epoch": e, "batch": b}``.
    keep: how many of the latest checkpoints to keep (None: all).

  Returns:
    ``step``.

  Example:
    >>> import tempfile, jax.numpy as jnp
    >>> from sharpjax import launch
    >>> ckpt = tempfile.mkdtemp()
    >>> launch.save_state(ckpt, 7, {"w": jnp.ones(3)}, {"epoch": 1})
    7
    >>> launch.restore_state(ckpt, {"w": jnp.zeros(3)})
    ({'w': Array([1., 1., 1.], dtype=float32)}, {'epoch': 1})
  """
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  state = _keys_as_data(state)
  mngr = _manager(directory, keep, create=True)
  if step not in mngr.all_steps():
    mngr.save(int(step), args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        meta=ocp.args.JsonSave(dict(meta or {}))))
    mngr.wait_until_finished()
  mngr.close()
  return int(step)


def latest_step(directory: str) -> Optional[int]:
  """The latest complete checkpoint step in ``directory`` (None: none)."""
  if not os.path.isdir(directory):
    return None
  mngr = _manager(directory, None, create=False)
  step = mngr.latest_step()
  mngr.close()
  return step


def restore_state(directory: str, template: Any,
                  step: Optional[int] = None) -> tuple[Any, dict]:
  """Restores a checkpoint of :func:`save_state` onto ``template``'s layout.

  The arrays come back with the shardings of ``template``'s arrays (e.g. a
  fresh ``trainer.init`` of this run), so a checkpoint written by 2
  processes restores into 1 process, or into 4, over whatever mesh the new
  run uses; each process reads only the shards it will hold.

  Args:
    directory: the checkpoint directory.
    template: a state with the wanted structure, shapes, dtypes and
      shardings (its values are not used).
    step: which checkpoint (default: the latest complete one).

  Returns:
    ``(state, meta)``.
  """
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  mngr = _manager(directory, None, create=False)
  if step is None:
    step = mngr.latest_step()
    if step is None:
      raise FileNotFoundError(f"restore_state: no complete checkpoint in "
                              f"{directory}.")
  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
      if isinstance(x, jax.Array) else x, _keys_as_data(template))
  out = mngr.restore(int(step), args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
  mngr.close()
  state = jax.tree.unflatten(jax.tree.structure(template),
                             jax.tree.leaves(out["state"]))
  return _data_as_keys(state, template), dict(out["meta"] or {})
