"""Orbax checkpoints of a training run that resume bit-exactly.

A checkpoint is one orbax step directory with two items:

- ``state``: every leaf of the :class:`sharpjax.training.TrainState` (step,
  parameters, model state, the whole optimizer state: momentum, SAF's logit
  bank, MESA's teacher, the PRNG keys of the methods that sample, and the
  dropout key) as host arrays, saved synchronously;
- ``meta``: JSON with the run's definition (config, method, resolved
  hyper-parameters, seed), its :class:`~sharpjax.cli._runner.Progress` (step,
  per-epoch history, the current epoch's running sums; the data position
  follows: epoch ``step // steps_per_epoch``, batch ``step %
  steps_per_epoch``), and each leaf's path, shape, dtype and SHA-256.

Orbax writes a step into a temporary directory and renames it when complete,
so an interrupt or a crash during a save leaves the previous checkpoint as the
latest one. On restore the run definition is compared with the current one
and every leaf with the expected path, shape and dtype, and the SHA-256 of
the bytes read is checked: a mismatch or a corrupt file raises
:class:`CheckpointError` naming what differs.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Mapping, Optional

import jax
import numpy as np

from sharpjax._src.grain_state import data_item

FORMAT = "sharpjax.cli checkpoint"
VERSION = 1


class CheckpointError(RuntimeError):
  """A checkpoint is missing, corrupt, or belongs to a different run."""


def _leaf_name(i: int) -> str:
  return f"leaf_{i:05d}"


def _host_leaves(tree: Any) -> tuple[list, list]:
  paths_leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
  paths = [jax.tree_util.keystr(p) for p, _ in paths_leaves]
  leaves = []
  for _, x in paths_leaves:
    if jax.dtypes.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key):
      raise CheckpointError(
          "typed PRNG keys are not checkpointed; keep raw key data "
          "(jax.random.key_data) in the state.")
    if _spread(x):  # each process writes its own shards (orbax)
      leaves.append(x)
    else:
      leaves.append(np.asarray(jax.device_get(x)))
  return paths, leaves


def _spread(x: Any) -> bool:
  """A leaf no single process holds whole: a table sharded by example over
  several processes' devices. Saved and restored shard by shard, without a
  SHA-256 (no process sees all its bytes)."""
  return (isinstance(x, jax.Array) and not x.is_fully_addressable
          and not x.is_fully_replicated)


def _sha256(x: np.ndarray) -> str:
  return hashlib.sha256(np.ascontiguousarray(x).tobytes()).hexdigest()


def signature(tree: Any) -> list[dict]:
  """``[{path, shape, dtype}]`` of every leaf of ``tree``."""
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return [{"path": jax.tree_util.keystr(p), "shape": list(np.shape(x)),
           "dtype": str(np.dtype(x.dtype))} for p, x in flat]


def run_mismatches(saved: Mapping[str, Any], current: Mapping[str, Any],
                   prefix: str = "", saved_name: str = "checkpoint"
                   ) -> list[str]:
  """``["epochs: checkpoint 3, this run 5", ...]`` for differing entries."""
  out = []
  for k in sorted(set(saved) | set(current)):
    a, b = saved.get(k, "<absent>"), current.get(k, "<absent>")
    if isinstance(a, Mapping) and isinstance(b, Mapping):
      out += run_mismatches(a, b, f"{prefix}{k}.", saved_name)
    elif _normalize(a) != _normalize(b):
      out.append(f"{prefix}{k}: {saved_name} {a!r}, this run {b!r}")
  return out


def _normalize(v):
  return json.loads(json.dumps(v))


class Checkpointer:
  """Saves and restores one run's checkpoints in ``directory``.

  Args:
    directory: the run's checkpoint directory (created on the first save).
    keep: how many of the latest checkpoints to keep.
  """

  def __init__(self, directory: str, keep: int = 2):
    self.directory = os.path.abspath(directory)
    self.keep = keep
    self._manager = None

  def _mngr(self, create: bool):
    import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
    if self._manager is None:
      if not create and not os.path.isdir(self.directory):
        raise CheckpointError(f"no checkpoint directory {self.directory}.")
      options = ocp.CheckpointManagerOptions(
          max_to_keep=self.keep, create=create,
          enable_async_checkpointing=False)
      self._manager = ocp.CheckpointManager(
          self.directory, options=options,
          item_names=("state", "meta", "data"))
    return self._manager

  def steps(self) -> list[int]:
    """Steps with a complete checkpoint, ascending."""
    if not os.path.isdir(self.directory):
      return []
    return sorted(self._mngr(create=False).all_steps())

  def save(self, state: Any, run: Mapping[str, Any],
           progress: Mapping[str, Any], extra: Optional[Mapping] = None,
           data_iterator: Any = None) -> int:
    """Writes ``state`` at step ``progress["step"]``; returns that step.

    ``data_iterator``: a grain iterator whose state is saved in the same
    step (:func:`sharpjax.launch.save_state`'s ``data_iterator``).
    """
    import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
    paths, leaves = _host_leaves(state)
    meta = {
        "format": FORMAT, "version": VERSION, "run": dict(run),
        "progress": dict(progress),
        "leaves": [{"path": p, "shape": list(x.shape), "dtype": str(x.dtype),
                    "sha256": None if _spread(x) else _sha256(x)}
                   for p, x in zip(paths, leaves)],
        **(dict(extra) if extra else {}),
    }
    step = int(progress["step"])
    mngr = self._mngr(create=True)
    if step in mngr.all_steps():
      return step
    arrays = {_leaf_name(i): x for i, x in enumerate(leaves)}
    mngr.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(arrays), meta=ocp.args.JsonSave(meta),
        **data_item(data_iterator, save=True)))
    mngr.wait_until_finished()
    return step

  def read_meta(self, step: Optional[int] = None) -> tuple[int, dict]:
    """``(step, meta)`` of ``step`` (default: the latest checkpoint)."""
    import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
    steps = self.steps()
    if not steps:
      raise CheckpointError(
          f"no checkpoint in {self.directory} (an empty directory, or every "
          "save was interrupted before it completed).")
    if step is None:
      step = steps[-1]
    elif step not in steps:
      raise CheckpointError(
          f"no checkpoint for step {step} in {self.directory}; available "
          f"steps: {steps}.")
    try:
      meta = self._mngr(create=False).restore(
          step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointError(
          f"checkpoint {self.directory} step {step}: its metadata cannot be "
          f"read (corrupt or not a sharpjax checkpoint): {_first_line(e)}"
      ) from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
      raise CheckpointError(
          f"checkpoint {self.directory} step {step} is not a sharpjax "
          f"command-line checkpoint (format {meta.get('format')!r}).")
    if meta.get("version") != VERSION:
      raise CheckpointError(
          f"checkpoint {self.directory} step {step} has format version "
          f"{meta.get('version')}, this sharpjax reads version {VERSION}.")
    return step, meta

  def check_run(self, run: Mapping[str, Any],
                step: Optional[int] = None) -> tuple[int, dict]:
    """``read_meta``, raising if the checkpoint's run differs from ``run``."""
    step, meta = self.read_meta(step)
    diff = run_mismatches(meta["run"], run)
    if diff:
      raise CheckpointError(
          f"checkpoint {self.directory} step {step} was written by a "
          "different run: " + "; ".join(diff[:8]) + ". Resume with the "
          "checkpoint's settings, or start a new run in another --ckpt-dir.")
    return step, meta

  def restore(self, template: Any, run: Optional[Mapping[str, Any]] = None,
              step: Optional[int] = None,
              data_iterator: Any = None) -> tuple[Any, dict]:
    """Restores into the structure of ``template``; returns ``(state, meta)``.

    Args:
      template: a state of the same run (e.g. a fresh ``init``): its tree
        structure, shapes and dtypes are what the checkpoint must have.
      run: the current run's definition; when given, it must equal the
        checkpoint's.
      step: which checkpoint (default: the latest).
      data_iterator: a fresh grain iterator of the same pipeline: set to
        the saved position (this process's) when the checkpoint has one;
        ``meta["data_restored"]`` says whether it had.

    Raises:
      CheckpointError: naming the first differences (run settings, leaf
        paths, shapes or dtypes), or the leaf whose bytes are corrupt.
    """
    import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
    if run is not None:
      step, meta = self.check_run(run, step)
    else:
      step, meta = self.read_meta(step)
    where = f"checkpoint {self.directory} step {step}"
    expected = signature(template)
    saved = [{k: d[k] for k in ("path", "shape", "dtype")}
             for d in meta["leaves"]]
    if saved != expected:
      raise CheckpointError(f"{where} does not fit this run's state: "
                            + _signature_diff(saved, expected))
    t_leaves = jax.tree.leaves(template)
    target = {_leaf_name(i): (
        jax.ShapeDtypeStruct(t.shape, t.dtype, sharding=t.sharding)
        if _spread(t) else np.zeros(d["shape"], d["dtype"]))
              for i, (d, t) in enumerate(zip(expected, t_leaves))}
    try:
      arrays = self._mngr(create=False).restore(
          step, args=ocp.args.Composite(
              state=ocp.args.StandardRestore(target)))["state"]
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointError(
          f"{where}: the arrays cannot be read (corrupt or incomplete "
          f"files): {_first_line(e)}") from e
    leaves = []
    for i, d in enumerate(meta["leaves"]):
      if d["sha256"] is None:  # restored shard by shard, where it belongs
        leaves.append(arrays[_leaf_name(i)])
        continue
      x = np.asarray(arrays[_leaf_name(i)])
      if list(x.shape) != d["shape"] or str(x.dtype) != d["dtype"]:
        raise CheckpointError(
            f"{where}: leaf {d['path']} was read as {x.dtype}{list(x.shape)}, "
            f"expected {d['dtype']}{d['shape']} (corrupt files).")
      if _sha256(x) != d["sha256"]:
        raise CheckpointError(
            f"{where}: leaf {d['path']} does not match its recorded SHA-256 "
            "(the checkpoint files are corrupt).")
      leaves.append(x)
    treedef = jax.tree.structure(template)
    placed = [_place(x, t) for x, t in zip(leaves, t_leaves)]
    meta["data_restored"] = False
    if data_iterator is not None and os.path.isdir(
        os.path.join(self.directory, str(step), "data")):
      self._mngr(create=False).restore(step, args=ocp.args.Composite(
          **data_item(data_iterator, save=False)))
      meta["data_restored"] = True
    return jax.tree.unflatten(treedef, placed), meta


def _place(x: Any, template: Any) -> Any:
  """``x`` with ``template``'s sharding (over every process's devices)."""
  if not isinstance(template, jax.Array) or isinstance(x, jax.Array):
    return x
  return jax.make_array_from_callback(x.shape, template.sharding,
                                      lambda idx: x[idx])


def _signature_diff(saved: list, expected: list) -> str:
  if len(saved) != len(expected):
    s_paths = {d["path"] for d in saved}
    e_paths = {d["path"] for d in expected}
    only_s = sorted(s_paths - e_paths)[:4]
    only_e = sorted(e_paths - s_paths)[:4]
    return (f"it has {len(saved)} arrays, this run's state {len(expected)} "
            f"(only in the checkpoint: {only_s}; only in this run: "
            f"{only_e}).")
  out = []
  for a, b in zip(saved, expected):
    if a != b:
      out.append(f"{a['path']}: checkpoint {a['dtype']}{a['shape']}, this run "
                 f"{b['path']} {b['dtype']}{b['shape']}")
  return "; ".join(out[:4]) + "."


def _first_line(e: BaseException) -> str:
  text = str(e).strip().splitlines()
  return f"{type(e).__name__}: {text[0] if text else ''}"
