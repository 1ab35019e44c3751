"""Orbax checkpoints of a training state: atomic, verified, never a dead end.

The one checkpointing module of sharpjax: :func:`sharpjax.launch.save_state`,
:func:`~sharpjax.launch.restore_state` and
:func:`~sharpjax.launch.latest_step` are these functions, and the command
line's ``sharpjax train`` / ``measure`` add only their run bookkeeping (the run
definition and the epoch history, in ``meta``) on top of :func:`save` and
:func:`restore`.

A checkpoint is one orbax step directory ``DIR/STEP`` with three items:

- ``state``: the arrays (each process writes the shards it holds; typed PRNG
  keys are stored as their raw key data);
- ``meta``: the caller's JSON (a data position, a run's history);
- ``integrity``: each leaf's tree path, shape and dtype, and, when the state is
  fully addressable by this process (every single-process run), the SHA-256 of
  its bytes.

What it guarantees:

- **Atomic saves.** Orbax writes a step into ``STEP.orbax-checkpoint-tmp-*``
  and renames it when every process has finished, so a save killed half way
  (Ctrl-C, SIGTERM, a full disk) leaves the previous step as the latest
  complete one. The next :func:`save` in that directory removes such
  unfinished folders (:func:`clean_unfinished`) and says which.
- **Verified restores.** The arrays read back are checked against the recorded
  shapes, dtypes and SHA-256: a flipped byte, a truncated file or an
  unreadable metadata file is found, never silently restored.
- **Fallback.** Without an explicit ``step``, :func:`restore` starts at the
  latest step and falls back to the newest intact one, warning
  (:class:`CheckpointWarning`) with the skipped step and why; the skipped
  directory is renamed ``STEP.corrupt`` (kept, not deleted) so that the run
  saves that step again. An explicit ``step`` that is corrupt raises
  :class:`CheckpointError`. So does any corrupt step in a multi-process run:
  orbax's restore is collective (its barriers pair the processes' calls), so
  a process that fails half way cannot safely try another step while the
  others wait in a barrier; restart with an explicit older ``step``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import threading
import time
import warnings
from typing import Any, Callable, NamedTuple, Optional

import jax
import numpy as np

from sharpjax._src.grain_state import data_item

_ITEMS = ("state", "meta", "integrity", "data")
_TMP_MARK = ".orbax-checkpoint-tmp"
CORRUPT_SUFFIX = ".corrupt"


class CheckpointError(RuntimeError):
  """A checkpoint is missing, corrupt, or does not fit the state asked for."""


class CheckpointWarning(UserWarning):
  """A corrupt checkpoint was skipped, or unfinished saves were removed."""


class _Corrupt(CheckpointError):
  """A step whose files cannot be read or do not match their record."""


class Restored(NamedTuple):
  """What :func:`restore` read.

  Attributes:
    state: the state, on the template's structure and shardings.
    meta: the JSON saved with it.
    step: the step restored (older than the latest after a fallback).
    skipped: ``(step, reason)`` of each newer checkpoint skipped as corrupt.
  """

  state: Any
  meta: dict
  step: int
  skipped: tuple


# ---------------------------------------------------------------------------
# Typed PRNG keys: stored as key data, typed again from the template.
# ---------------------------------------------------------------------------


def _is_typed_key(x: Any) -> bool:
  return isinstance(x, jax.Array) and jax.dtypes.issubdtype(
      x.dtype, jax.dtypes.prng_key)


def _keys_as_data(tree: Any) -> Any:
  """Typed PRNG keys replaced by their raw ``uint32`` data (orbax stores it)."""
  return jax.tree.map(
      lambda x: jax.random.key_data(x) if _is_typed_key(x) else x, tree)


def _data_as_keys(tree: Any, template: Any) -> Any:
  """Raw key data back into typed keys wherever ``template`` holds one."""
  return jax.tree.map(
      lambda x, t: (jax.random.wrap_key_data(x, impl=jax.random.key_impl(t))
                    if _is_typed_key(t) else x), tree, template)


# ---------------------------------------------------------------------------
# The integrity record.
# ---------------------------------------------------------------------------


def _addressable(x: Any) -> bool:
  return not isinstance(x, jax.Array) or x.is_fully_addressable


def _sha256(x: Any) -> str:
  return hashlib.sha256(np.ascontiguousarray(np.asarray(x)).tobytes()
                        ).hexdigest()


def signature(tree: Any) -> list[dict]:
  """``[{path, shape, dtype}]`` of every leaf of ``tree`` (keys as key data)."""
  flat, _ = jax.tree_util.tree_flatten_with_path(_keys_as_data(tree))
  return [{"path": jax.tree_util.keystr(p), "shape": list(np.shape(x)),
           "dtype": str(np.dtype(x.dtype) if hasattr(x, "dtype")
                        else np.asarray(x).dtype)} for p, x in flat]


def _integrity(state: Any) -> dict:
  leaves = signature(state)
  arrays = jax.tree.leaves(state)
  if all(_addressable(x) for x in arrays):
    for d, x in zip(leaves, arrays):
      d["sha256"] = _sha256(x)
  return {"leaves": leaves}


def _signature_diff(saved: list, expected: list) -> str:
  if len(saved) != len(expected):
    s_paths = {d["path"] for d in saved}
    e_paths = {d["path"] for d in expected}
    return (f"it has {len(saved)} arrays, the template {len(expected)} (only "
            f"in the checkpoint: {sorted(s_paths - e_paths)[:4]}; only in the "
            f"template: {sorted(e_paths - s_paths)[:4]}).")
  out = [f"{a['path']}: checkpoint {a['dtype']}{a['shape']}, template "
         f"{b['dtype']}{b['shape']}" for a, b in zip(saved, expected)
         if (a["shape"], a["dtype"]) != (b["shape"], b["dtype"])]
  return "; ".join(out[:4]) + "."


# ---------------------------------------------------------------------------
# Directory helpers.
# ---------------------------------------------------------------------------


def _manager(directory: str, keep: Optional[int], create: bool):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, create=create, enable_async_checkpointing=False)
  return ocp.CheckpointManager(os.path.abspath(directory), options=options,
                               item_names=_ITEMS)


# tensorstore appends the JSON spec of the store it failed on, kilobytes of
# context options on one line; the reason comes before it.
_TENSORSTORE_SPEC = " [tensorstore_spec"


def _first_line(e: BaseException) -> str:
  """``Type: first line`` of an error, without tensorstore's spec dump."""
  text = str(e).strip().splitlines()
  line = text[0] if text else ""
  line = line.split(_TENSORSTORE_SPEC, 1)[0]
  return f"{type(e).__name__}: {line}".rstrip(": ")


def all_steps(directory: str) -> list[int]:
  """Steps with a complete (finalised) checkpoint in ``directory``, sorted."""
  if not os.path.isdir(directory):
    return []
  mngr = _manager(directory, None, create=False)
  try:
    return sorted(int(s) for s in mngr.all_steps())
  finally:
    mngr.close()


def latest_step(directory: str) -> Optional[int]:
  """The latest complete checkpoint step in ``directory`` (None: none).

  Complete means finalised by orbax (an interrupted save is not listed); its
  files are verified only when it is restored (:func:`restore_state` falls
  back past a corrupt one).

  Example:
    >>> import tempfile, jax.numpy as jnp
    >>> from sharpjax import launch
    >>> ckpt = tempfile.mkdtemp()
    >>> launch.latest_step(ckpt) is None
    True
    >>> launch.save_state(ckpt, 3, {"w": jnp.ones(2)})
    3
    >>> launch.latest_step(ckpt)
    3
  """
  steps = all_steps(directory)
  return steps[-1] if steps else None


def clean_unfinished(directory: str) -> list[str]:
  """Removes the folders of interrupted saves in ``directory``; returns them.

  Orbax writes a step as ``STEP.orbax-checkpoint-tmp-*`` and renames it when
  complete: what is left under such a name was never finished. Only the main
  process (``jax.process_index() == 0``) removes; call it when no save is
  under way in ``directory`` (a run's writer does, at its start).
  """
  if not os.path.isdir(directory) or jax.process_index() != 0:
    return []
  removed = []
  for name in sorted(os.listdir(directory)):
    if _TMP_MARK in name:
      path = os.path.join(directory, name)
      if os.path.isdir(path):
        shutil.rmtree(path, ignore_errors=True)
      else:
        os.remove(path)
      removed.append(path)
  if removed:
    warnings.warn(
        f"removed {len(removed)} unfinished checkpoint save"
        f"{'s' if len(removed) > 1 else ''} (interrupted before complete): "
        + ", ".join(removed), CheckpointWarning, stacklevel=2)
  return removed


# ---------------------------------------------------------------------------
# Save.
# ---------------------------------------------------------------------------


def _join_writer_threads(timeout: float = 30.0) -> None:
  """Waits for orbax's writer threads still running after a failed save.

  When one file of a save fails, the others' threads go on; left alone they
  fail later, at interpreter shutdown, with tracebacks of their own ("Event
  loop is closed"). Waiting here makes the failure complete when
  :func:`save` raises.
  """
  deadline = time.monotonic() + timeout
  for t in threading.enumerate():
    if (t is not threading.current_thread()
        and type(t).__name__ == "_SignalingThread"):
      try:
        t.join(max(0.0, deadline - time.monotonic()))
      except Exception:  # pylint: disable=broad-except
        pass  # its error is the one being reported (orbax's join re-raises)


def save(directory: str, step: int, state: Any, meta: Optional[dict] = None,
         *, keep: Optional[int] = 2, data_iterator: Any = None) -> int:
  """Writes ``state`` and ``meta`` as step ``step``; see :func:`save_state`."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  step = int(step)
  directory = os.path.abspath(directory)
  state = _keys_as_data(state)
  clean_unfinished(directory)
  try:
    mngr = _manager(directory, keep, create=True)
  except OSError as e:
    raise CheckpointError(f"cannot create the checkpoint directory "
                          f"{directory}: {_first_line(e)}") from e
  try:
    if step not in mngr.all_steps():
      mngr.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state),
          meta=ocp.args.JsonSave(dict(meta or {})),
          integrity=ocp.args.JsonSave(_integrity(state)),
          **data_item(data_iterator, save=True)))
      mngr.wait_until_finished()
  except Exception as e:  # pylint: disable=broad-except
    # A full disk or a permission error surfaces as OSError, ValueError or
    # tensorstore's errors depending on which file failed: one message.
    _join_writer_threads()
    raise CheckpointError(
        f"cannot write checkpoint step {step} in {directory} (the previous "
        f"complete checkpoint is kept): {_first_line(e)}") from e
  finally:
    mngr.close()
  return step


def save_state(directory: str, step: int, state: Any,
               meta: Optional[dict] = None, *, keep: Optional[int] = 2,
               data_iterator: Any = None) -> int:
  """Writes a (possibly sharded, multi-process) state with orbax.

  Every process must call it with its part of the same global arrays: each
  process writes the shards it holds (one copy of replicated arrays), process
  0 the metadata, and orbax renames the step directory only once every
  process has finished, so a run killed during a save leaves the previous
  step as the latest complete one; the next save removes the unfinished
  folder it left. No array is gathered onto one host: a logit bank sharded by
  example is written by the hosts that hold its rows. Each leaf's path, shape
  and dtype are recorded, and its SHA-256 when the state lives in one process,
  so that :func:`restore_state` can tell a corrupt checkpoint.

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
    data_iterator: a grain iterator (e.g.
      :meth:`sharpjax.data.GrainLoader.batches`, or
      :func:`sharpjax.data.prefetch_to_device` over one, which saves the
      position of the batches it has yielded) whose state is saved in the
      same checkpoint (item ``data``: one JSON file per process, each
      process's own position and workers' states), so that a restored run
      reads exactly the batches it would have read.

  Returns:
    ``step``.

  Raises:
    CheckpointError: the step could not be written (a full disk, no
      permission), naming the directory; the previous checkpoint is intact.

  Example:
    >>> import tempfile, jax.numpy as jnp
    >>> from sharpjax import launch
    >>> ckpt = tempfile.mkdtemp()
    >>> launch.save_state(ckpt, 7, {"w": jnp.ones(3)}, {"epoch": 1})
    7
    >>> launch.restore_state(ckpt, {"w": jnp.zeros(3)})
    ({'w': Array([1., 1., 1.], dtype=float32)}, {'epoch': 1})
  """
  return save(directory, step, state, meta, keep=keep,
              data_iterator=data_iterator)


# ---------------------------------------------------------------------------
# Restore.
# ---------------------------------------------------------------------------


def _step_dir(directory: str, step: int) -> str:
  return os.path.join(directory, str(step))


def read_meta(directory: str, step: int) -> dict:
  """The ``meta`` JSON of ``step``; :class:`CheckpointError` if unreadable."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  mngr = _manager(directory, None, create=False)
  try:
    meta = mngr.restore(step, args=ocp.args.Composite(
        meta=ocp.args.JsonRestore()))["meta"]
  except Exception as e:  # pylint: disable=broad-except
    raise _Corrupt(f"its metadata cannot be read ({_first_line(e)})") from e
  finally:
    mngr.close()
  if meta is None:
    return {}
  if not isinstance(meta, dict):
    raise _Corrupt(f"its metadata is a {type(meta).__name__}, not a JSON "
                   "object")
  return meta


def _example_axes(tree: Any) -> list[int]:
  """Per leaf of ``tree``: the example axis of a per-example table, else -1."""
  from sharpjax._src import protocol  # pylint: disable=g-import-not-at-top
  return jax.tree.leaves(protocol.map_example_tables(
      lambda leaf, axis: axis, tree, lambda leaf: -1))


def _rows_only(saved: list, expected: list, axes: list) -> Optional[dict]:
  """``{leaf index: example axis}`` when the checkpoint differs from the
  template only in the rows of per-example tables; else None."""
  if len(saved) != len(expected):
    return None
  fit = {}
  for i, (a, b, axis) in enumerate(zip(saved, expected, axes)):
    if (a["shape"], a["dtype"]) == (b["shape"], b["dtype"]):
      continue
    if (axis < 0 or a["dtype"] != b["dtype"]
        or len(a["shape"]) != len(b["shape"])
        or any(x != y for k, (x, y) in enumerate(zip(a["shape"], b["shape"]))
               if k != axis)):
      return None
    fit[i] = axis
  return fit


def _read_sharding(x: Any, shape: tuple) -> Any:
  """``x``'s sharding for an array of ``shape``, replicated over the same
  devices when ``shape`` does not divide over them."""
  sharding = x.sharding
  try:
    sharding.shard_shape(shape)
    return sharding
  except ValueError:
    if isinstance(sharding, jax.sharding.NamedSharding):
      return jax.sharding.NamedSharding(sharding.mesh,
                                        jax.sharding.PartitionSpec())
    return sharding


def _fit_rows(x: jax.Array, template: jax.Array, axis: int, where: str
              ) -> jax.Array:
  """A per-example table read with the checkpoint's rows, given the
  template's: rows past the template's are dropped (they must be padding,
  untouched since ``init``), missing rows come from the template (a fresh
  ``init``'s)."""
  n, m = template.shape[axis], x.shape[axis]
  if m > n:
    extra = jax.lax.slice_in_dim(x, n, m, axis=axis)
    fresh = jax.lax.slice_in_dim(template, 0, 1, axis=axis)
    if not bool(jax.jit(lambda a, b: jax.numpy.all(a == b))(extra, fresh)):
      raise CheckpointError(
          f"{where}: its rows {n}..{m - 1} hold values, but this run's "
          f"table has {n} rows; they are not padding: resume with the "
          "training set the checkpoint was written with.")

  def fit(a, t):
    if m >= n:
      return jax.lax.slice_in_dim(a, 0, n, axis=axis)
    return jax.numpy.concatenate(
        [a, jax.lax.slice_in_dim(t, m, n, axis=axis)], axis=axis)

  return jax.jit(fit, out_shardings=template.sharding)(x, template)


def _read_step(directory: str, step: int, template: Any,
               fit_rows: bool = False) -> tuple[Any, dict]:
  """Reads and verifies one step onto ``template``'s layout.

  With ``fit_rows``, per-example tables (``EXAMPLE_AXES``) saved with
  another number of rows than the template's (a run whose tables were
  rounded up to a multiple of its devices, resumed on another number of
  devices) are read at their saved shape and fitted to the template's
  (:func:`_fit_rows`).
  """
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  meta = read_meta(directory, step)
  stored = _keys_as_data(template)
  record, fit, saved_shapes = None, {}, []
  if os.path.isdir(os.path.join(_step_dir(directory, step), "integrity")):
    mngr = _manager(directory, None, create=False)
    try:
      record = mngr.restore(step, args=ocp.args.Composite(
          integrity=ocp.args.JsonRestore()))["integrity"]
      leaves = record["leaves"]
    except Exception as e:  # pylint: disable=broad-except
      raise _Corrupt(f"its integrity record cannot be read "
                     f"({_first_line(e)})") from e
    finally:
      mngr.close()
    expected = signature(stored)
    saved = [{k: d.get(k) for k in ("path", "shape", "dtype")} for d in leaves]
    if fit_rows:
      fit = _rows_only(saved, expected, _example_axes(stored)) or {}
      saved_shapes = [tuple(d["shape"]) for d in saved]
    if [(d["shape"], d["dtype"]) for d in saved] != [
        (d["shape"], d["dtype"]) for d in expected] and not fit:
      raise CheckpointError(f"checkpoint {directory} step {step} does not "
                            "fit the template: "
                            + _signature_diff(saved, expected))
  flat, treedef = jax.tree.flatten(stored)
  abstract = [
      (jax.ShapeDtypeStruct(saved_shapes[i], x.dtype,
                            sharding=_read_sharding(x, saved_shapes[i]))
       if i in fit else
       jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding))
      if isinstance(x, jax.Array) else x for i, x in enumerate(flat)]
  abstract = jax.tree.unflatten(treedef, abstract)
  mngr = _manager(directory, None, create=False)
  try:
    out = mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract)))["state"]
  except Exception as e:  # pylint: disable=broad-except
    raise _Corrupt(f"its arrays cannot be read ({_first_line(e)})") from e
  finally:
    mngr.close()
  arrays = jax.tree.leaves(out)
  if record is not None:
    for d, x in zip(record["leaves"], arrays):
      if (list(np.shape(x)) != d["shape"]
          or str(np.dtype(x.dtype)) != d["dtype"]):
        raise _Corrupt(f"leaf {d['path']} was read as {x.dtype}"
                       f"{list(np.shape(x))}, recorded {d['dtype']}"
                       f"{d['shape']}")
      if "sha256" in d and _addressable(x) and _sha256(x) != d["sha256"]:
        raise _Corrupt(f"leaf {d['path']} does not match its recorded "
                       "SHA-256 (its bytes changed on disk)")
  for i, axis in fit.items():
    arrays[i] = _fit_rows(arrays[i], flat[i], axis,
                          f"checkpoint {directory} step {step}, leaf "
                          f"{saved[i]['path']}")
  state = jax.tree.unflatten(jax.tree.structure(stored), arrays)
  return _data_as_keys(state, template), meta


def set_aside(directory: str, step: int,
              suffix: str = CORRUPT_SUFFIX) -> Optional[str]:
  """Renames checkpoint ``step`` to ``STEP{suffix}``; returns the new path.

  Orbax no longer lists it (nothing is deleted), so a run can save that step
  again. Only the main process renames; None if the rename failed.
  """
  src = _step_dir(directory, step)
  dst = src + suffix
  k = 1
  while os.path.exists(dst):
    k += 1
    dst = f"{src}{suffix}{k}"
  if jax.process_index() == 0:
    try:
      os.rename(src, dst)
    except OSError:
      return None
  return dst


def restore(directory: str, template: Any, step: Optional[int] = None, *,
            fallback: Optional[bool] = None,
            check: Optional[Callable[[int, dict], None]] = None,
            rename: bool = True, data_iterator: Any = None,
            fit_example_rows: bool = False) -> Restored:
  """Reads a checkpoint onto ``template``'s layout, verified; see below.

  Args:
    directory: the checkpoint directory.
    template: a state with the wanted structure, shapes, dtypes and
      shardings (its values are not used).
    step: the step to read (default: the latest complete one).
    fallback: when ``step`` is corrupt, try the next older steps (default:
      only when ``step`` is None; never in a multi-process run, see the
      module docstring).
    check: ``check(step, meta)`` before the arrays are read; what it raises
      propagates (no fallback): a checkpoint of another run is not corrupt.
    rename: rename each skipped corrupt step to ``STEP.corrupt`` (a writer
      does, so that it saves that step again; a reader should not).
    data_iterator: a fresh grain iterator of the pipeline saved with the
      step: set to this process's saved position when the step holds one
      (``meta["data_restored"]`` says whether it did).
    fit_example_rows: per-example tables (SAF's bank, AUSAM's scores)
      saved with another number of rows than the template's are fitted to
      it (padding rows dropped or added), so that a run whose tables were
      rounded up to a multiple of its devices resumes on other devices.

  Returns:
    :class:`Restored` ``(state, meta, step, skipped)``.

  Raises:
    FileNotFoundError: no complete checkpoint in ``directory``.
    CheckpointError: ``step`` is not there; the state does not fit the
      template; or every candidate is corrupt (each one named with why).
  """
  directory = os.path.abspath(directory)
  steps = all_steps(directory)
  if not steps:
    raise FileNotFoundError(
        f"no complete checkpoint in {directory} (an empty or missing "
        "directory, or every save was interrupted before it completed).")
  if step is not None and int(step) not in steps:
    raise CheckpointError(f"no checkpoint for step {step} in {directory}; "
                          f"available steps: {steps}.")
  if fallback is None:
    fallback = step is None
  fallback = fallback and jax.process_count() == 1
  start = steps[-1] if step is None else int(step)
  candidates = [s for s in reversed(steps) if s <= start]
  if not fallback:
    candidates = candidates[:1]
  skipped = []
  for s in candidates:
    try:
      meta = read_meta(directory, s)
      if check is not None:
        check(s, meta)
      state, meta = _read_step(directory, s, template, fit_example_rows)
    except _Corrupt as e:
      skipped.append((s, str(e)))
      continue
    if skipped:
      moved = [set_aside(directory, k) if rename else None
               for k, _ in skipped]
      warnings.warn(
          "; ".join(
              f"checkpoint step {k} in {directory} is corrupt ({w})"
              + (f", moved to {m}" if m else "")
              for (k, w), m in zip(skipped, moved))
          + f"; restored step {s}, the newest intact one.",
          CheckpointWarning, stacklevel=2)
    meta["data_restored"] = _restore_data(directory, s, data_iterator)
    return Restored(state, meta, s, tuple(skipped))
  detail = "; ".join(f"step {k}: {w}" for k, w in skipped)
  if fallback and len(candidates) > 1:
    raise CheckpointError(f"no intact checkpoint in {directory}: {detail}.")
  raise CheckpointError(f"checkpoint {directory} step {candidates[0]} is "
                        f"corrupt: {skipped[0][1]}; available steps: "
                        f"{steps}.")


def _restore_data(directory: str, step: int, data_iterator: Any) -> bool:
  """Sets ``data_iterator`` to the position saved with ``step``, if any."""
  if data_iterator is None or not os.path.isdir(
      os.path.join(_step_dir(directory, step), "data")):
    return False
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  folder = os.path.join(_step_dir(directory, step), "data")
  mine = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
  saved = sorted(n for n in os.listdir(folder) if n.startswith("process_"))
  if saved and mine not in saved:
    raise CheckpointError(
        f"checkpoint {directory} step {step} holds the data iterator "
        f"states of another number of processes ({', '.join(saved[:4])}); "
        f"this run has {jax.process_count()}: restore without "
        "data_iterator= and start the iterator at the checkpoint's step "
        "(a sharpjax GrainLoader's batches depend on the step alone).")
  mngr = _manager(directory, None, create=False)
  try:
    mngr.restore(step, args=ocp.args.Composite(
        **data_item(data_iterator, save=False)))
  finally:
    mngr.close()
  return True


def restore_state(directory: str, template: Any,
                  step: Optional[int] = None, *,
                  data_iterator: Any = None) -> tuple[Any, dict]:
  """Restores a checkpoint of :func:`save_state` onto ``template``'s layout.

  The arrays come back with the shardings of ``template``'s arrays (e.g. a
  fresh ``trainer.init`` of this run), so a checkpoint written by 2
  processes restores into 1 process, or into 4, over whatever mesh the new
  run uses; each process reads only the shards it will hold. They are
  checked against the shapes, dtypes and SHA-256 recorded at the save.

  Without ``step``, a corrupt latest checkpoint (unreadable files, changed
  bytes) is skipped with a :class:`CheckpointWarning` naming it, renamed
  ``STEP.corrupt`` (so that the run saves that step again), and the newest
  intact one is restored. In a multi-process run a corrupt checkpoint raises
  instead (orbax's restore is collective): pass an older ``step``.

  Args:
    directory: the checkpoint directory.
    template: a state with the wanted structure, shapes, dtypes and
      shardings (its values are not used).
    step: which checkpoint (default: the latest intact one).
    data_iterator: a grain iterator of the same pipeline as the one saved
      (:func:`save_state`'s ``data_iterator``); its state is set to this
      process's saved one.

  Returns:
    ``(state, meta)``.

  Raises:
    FileNotFoundError: there is no complete checkpoint in ``directory``.
    CheckpointError: ``step`` is missing or corrupt, every checkpoint is
      corrupt, or the checkpoint does not fit ``template`` (the message
      names the differing leaves).

  Example:
    >>> import tempfile, jax.numpy as jnp
    >>> from sharpjax import launch
    >>> ckpt = tempfile.mkdtemp()
    >>> launch.save_state(ckpt, 1, {"w": jnp.full(2, 1.0)})
    1
    >>> launch.save_state(ckpt, 2, {"w": jnp.full(2, 2.0)})
    2
    >>> launch.restore_state(ckpt, {"w": jnp.zeros(2)}, step=1)[0]
    {'w': Array([1., 1.], dtype=float32)}
  """
  r = restore(directory, template, step, data_iterator=data_iterator)
  if data_iterator is not None and not r.meta.pop("data_restored"):
    raise FileNotFoundError(
        f"restore_state: checkpoint {directory} step {r.step} holds no data "
        "iterator state (it was saved without data_iterator=).")
  r.meta.pop("data_restored", None)
  return r.state, r.meta
