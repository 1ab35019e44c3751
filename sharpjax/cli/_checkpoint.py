"""The command line's run bookkeeping on top of sharpjax's checkpoints.

Saving, restoring, verifying (shapes, dtypes, SHA-256 of every leaf), the
fallback past a corrupt latest checkpoint and the removal of unfinished saves
are :mod:`sharpjax._src.checkpoint`'s, the module behind
:func:`sharpjax.launch.save_state` / :func:`~sharpjax.launch.restore_state`.
What this module adds is the ``meta`` of a ``sharpjax train`` checkpoint:

- ``format`` / ``version``: what wrote it;
- ``run``: the run's definition (config, method, resolved hyper-parameters,
  seed, steps per epoch), compared with the current one on ``--resume`` so
  that a checkpoint of another run is refused with what differs;
- ``progress``: the :class:`~sharpjax.cli._runner.Progress` (step, per-epoch
  history, the current epoch's running sums) and ``data_position``: the
  next batch is epoch ``step // steps_per_epoch``, batch
  ``step % steps_per_epoch``;
- ``loader``: the input pipeline that wrote it (:func:`loader_settings`); a
  grain iterator's saved state is used on ``--resume`` only by the same
  pipeline (:func:`grain_state_usable`), any other run starts its loader at
  the step (the batches of a step do not depend on the loader, the process
  count or the worker count).

It also writes the run's record, ``train.json``, at every checkpoint
(:func:`write_train_json`).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
from typing import Any, Callable, Mapping, Optional

from sharpjax._src import checkpoint as _ckpt

FORMAT = "sharpjax.cli checkpoint"
VERSION = 2

CheckpointError = _ckpt.CheckpointError


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


@contextlib.contextmanager
def _stderr_dropped_on_failure():
  """Holds back what is written to file descriptor 2 during a save.

  When a save fails (a full disk), tensorstore's callbacks in orbax's other
  writer threads print tracebacks from C++ ("Event loop is closed") straight
  to the file descriptor; the command reports the failure in one line
  instead, so that output is dropped. After a save that succeeds, anything
  held back is written out.
  """
  try:
    sys.stderr.flush()
    saved = os.dup(2)
  except (OSError, ValueError):  # no real stderr: nothing to hold back
    yield
    return
  failed = False
  with tempfile.TemporaryFile() as held:
    os.dup2(held.fileno(), 2)
    try:
      yield
    except CheckpointError:
      failed = True
      raise
    finally:
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)
      if not failed:
        held.seek(0)
        text = held.read()
        if text:
          os.write(2, text)


class Checkpointer:
  """One ``sharpjax train`` run's checkpoints in ``directory``.

  Args:
    directory: the run's checkpoint directory (created on the first save).
    keep: how many of the latest checkpoints to keep.
  """

  def __init__(self, directory: str, keep: int = 2):
    self.directory = os.path.abspath(directory)
    self.keep = keep

  def steps(self) -> list[int]:
    """Steps with a complete checkpoint, ascending."""
    return _ckpt.all_steps(self.directory)

  def clean(self) -> list[str]:
    """Removes unfinished saves (a writer calls it when it starts)."""
    return _ckpt.clean_unfinished(self.directory)

  def set_aside_after(self, step: int) -> list[str]:
    """Renames the checkpoints newer than ``step`` to ``STEP.superseded``.

    ``train --resume --step`` does, so that the resumed run writes its own
    checkpoints of those steps instead of keeping the old ones (kept aside).
    """
    moved = [_ckpt.set_aside(self.directory, s, ".superseded")
             for s in self.steps() if s > step]
    return [m for m in moved if m]

  def save(self, state: Any, run: Mapping[str, Any],
           progress: Mapping[str, Any], extra: Optional[Mapping] = None,
           data_iterator: Any = None) -> int:
    """Writes ``state`` at step ``progress["step"]``; returns that step.

    ``data_iterator``: a grain iterator whose state is saved in the same
    step (:func:`sharpjax.launch.save_state`'s ``data_iterator``).
    """
    meta = {"format": FORMAT, "version": VERSION, "run": dict(run),
            "progress": dict(progress), **(dict(extra) if extra else {})}
    with _stderr_dropped_on_failure():
      return _ckpt.save(self.directory, int(progress["step"]), state, meta,
                        keep=self.keep, data_iterator=data_iterator)

  def _check_format(self, step: int, meta: Mapping[str, Any]) -> None:
    where = f"checkpoint {self.directory} step {step}"
    if meta.get("format") != FORMAT:
      raise CheckpointError(f"{where} is not a sharpjax command-line "
                            f"checkpoint (format {meta.get('format')!r}).")
    if meta.get("version") != VERSION:
      raise CheckpointError(
          f"{where} has format version {meta.get('version')}; this sharpjax "
          f"reads version {VERSION}: finish that run with the sharpjax that "
          "started it, or start a new one.")

  def read_meta(self, step: Optional[int] = None) -> tuple[int, dict]:
    """``(step, meta)`` of ``step``, default the newest readable one.

    The arrays are not read: a step chosen here may still be skipped by
    :meth:`restore` if its arrays are corrupt (same run, older step).
    """
    steps = self.steps()
    if not steps:
      if not os.path.isdir(self.directory):
        raise CheckpointError(f"no checkpoint directory {self.directory}.")
      raise CheckpointError(
          f"no checkpoint in {self.directory} (an empty directory, or every "
          "save was interrupted before it completed).")
    if step is not None and step not in steps:
      raise CheckpointError(
          f"no checkpoint for step {step} in {self.directory}; available "
          f"steps: {steps}.")
    candidates = [step] if step is not None else steps[::-1]
    why = []
    for s in candidates:
      try:
        meta = _ckpt.read_meta(self.directory, s)
      except CheckpointError as e:
        why.append(f"step {s}: {e}")
        continue
      self._check_format(s, meta)
      return s, meta
    raise CheckpointError(f"checkpoint {self.directory}: "
                          + "; ".join(why) + ".")

  def check_run(self, run: Mapping[str, Any],
                step: Optional[int] = None) -> tuple[int, dict]:
    """``read_meta``, raising if the checkpoint's run differs from ``run``."""
    step, meta = self.read_meta(step)
    self._check_same_run(step, meta, run)
    return step, meta

  def _check_same_run(self, step: int, meta: Mapping[str, Any],
                      run: Mapping[str, Any]) -> None:
    diff = run_mismatches(meta["run"], run)
    if diff:
      raise CheckpointError(
          f"checkpoint {self.directory} step {step} was written by a "
          "different run: " + "; ".join(diff[:8]) + ". Resume with the "
          "checkpoint's settings, or start a new run in another --ckpt-dir.")

  def restore(self, template: Any, run: Optional[Mapping[str, Any]] = None,
              step: Optional[int] = None, *, writer: bool = False,
              data_iterator: Any = None) -> tuple[Any, dict, int]:
    """Restores into ``template``'s layout; returns ``(state, meta, step)``.

    Per-example tables rounded up to a multiple of the devices of the run
    that saved them are fitted to the template's rows, so that the run
    resumes on any number of devices (``--shard-example-tables`` or not).

    Args:
      template: a state of the same run (e.g. a fresh ``init``).
      run: the current run's definition; when given, it must equal the
        checkpoint's.
      step: which checkpoint (default: the newest intact one, skipping a
        corrupt latest one with a warning).
      writer: the caller will save into this directory again (``train``):
        a skipped corrupt step is renamed ``STEP.corrupt`` so that it is
        saved again.
      data_iterator: a fresh grain iterator of the same pipeline: set to
        the saved position (this process's) when the checkpoint has one;
        ``meta["data_restored"]`` says whether it had.

    Raises:
      CheckpointError: naming the first differences (run settings, leaf
        paths, shapes or dtypes), or each corrupt checkpoint and why.
    """
    def check(s, meta):
      self._check_format(s, meta)
      if run is not None:
        self._check_same_run(s, meta, run)

    try:
      r = _ckpt.restore(self.directory, template, step, check=check,
                        rename=writer, data_iterator=data_iterator,
                        fit_example_rows=True)
    except FileNotFoundError as e:
      raise CheckpointError(str(e)) from None
    return r.state, r.meta, r.step


  def resume(self, template: Any, run: Mapping[str, Any],
             step: Optional[int], loader_kind: str, loader: Any,
             total_steps: int, log: Callable[[str], None]
             ) -> tuple[Any, dict, int, Any, int]:
    """``train --resume``: the state, and where the data goes on.

    The run definition is compared before any array is read. A grain
    iterator's saved state is restored only into the same pipeline
    (:func:`grain_state_usable`, saying why not otherwise); else a grain
    run's iterator starts at the checkpoint's step, which reads the same
    batches.

    Returns:
      ``(state, meta, step, feed, data_start)``: ``feed`` the grain iterator
      over ``[data_start, total_steps)`` (None with the numpy loader, which
      restarts from the step by itself).
    """
    first, meta = self.check_run(run, step)  # before any array
    why = grain_state_usable(meta.get("loader"),
                             loader_settings(loader_kind, loader))
    saved_kind = (meta.get("loader") or {}).get("kind")
    if why is not None and loader_kind == "grain" and saved_kind == "grain":
      log(f"note: the grain iterator state of checkpoint {first} is not used "
          f"({why}); the loader starts at step {meta['progress']['step']}, "
          "which reads the same batches.")
    data_start = int(meta["loader"].get("start", 0)) if why is None else 0
    feed = loader.batches(data_start, total_steps) if why is None else None
    state, meta, step = self.restore(template, run, step, writer=True,
                                     data_iterator=feed)
    if meta["data_restored"] and (meta.get("loader") or {}).get(
        "start", 0) != data_start:  # an older step of another start
      meta["data_restored"] = False
    if loader_kind == "grain" and not meta["data_restored"]:
      if feed is not None:
        feed.close()
      data_start = int(meta["progress"]["step"])
      feed = loader.batches(data_start, total_steps)
    return state, meta, step, feed, data_start


def load_run(directory: str, step: Optional[int] = None):
  """A ``sharpjax train`` checkpoint with what it needs to be used.

  Returns:
    ``(runner, state, meta, step)``: the run's
    :class:`~sharpjax.cli._runner.MethodRunner` (its data, model and method
    rebuilt from the checkpoint's run definition) and the restored state.
  """
  from sharpjax.cli import _runner  # pylint: disable=g-import-not-at-top
  from sharpjax.cli import _setup  # pylint: disable=g-import-not-at-top
  ckpt = Checkpointer(directory)
  _, meta = ckpt.read_meta(step)
  run = meta["run"]
  env = _setup.make_env(_setup.Config.from_dict(run["config"]))
  runner = _runner.MethodRunner(env, run["method"], {}, run["hyper"])
  state, meta, step = ckpt.restore(runner.init_state(run["seed"]), run, step)
  return runner, state, meta, step


# ---------------------------------------------------------------------------
# The loader's part of a checkpoint, and train.json.
# ---------------------------------------------------------------------------


def loader_settings(kind: str, loader: Any, start: int = 0) -> dict:
  """What a checkpoint and ``train.json`` record of a run's loader.

  Args:
    kind: ``"numpy"`` or ``"grain"`` (``--loader``).
    loader: this process's :class:`~sharpjax.data.DataLoader` or
      :class:`~sharpjax.data.GrainLoader`.
    start: the global step the grain iterator whose state is saved started
      at (its state counts from there).
  """
  out = {"kind": kind, "batch_size": int(loader.batch_size),
         "seed": int(loader.seed), "shuffle": bool(loader.shuffle),
         "processes": int(loader.num_shards),
         "augment": (None if loader.augment is None
                     else type(loader.augment).__name__)}
  if kind == "grain":
    out.update(workers=int(loader.worker_count),
               worker_buffer_size=int(loader.worker_buffer_size),
               read_threads=int(loader.read_threads), start=int(start))
  else:
    out.update(prefetch=int(loader.prefetch))
  return out


def grain_state_usable(saved: Optional[Mapping[str, Any]],
                       current: Mapping[str, Any]) -> Optional[str]:
  """None if a checkpoint's grain state restores into this run's loader.

  Otherwise why not (the run then starts its loader at the checkpoint's
  step, which gives the same batches): grain saves one state per process,
  each with its workers' positions, so it fits only the same number of
  processes and workers.

  Args:
    saved: the checkpoint's ``meta["loader"]`` (None: a checkpoint written
      before loaders were recorded).
    current: :func:`loader_settings` of this run.
  """
  if current.get("kind") != "grain":
    return "this run uses the numpy loader"
  if not saved:
    return "the checkpoint does not record its loader"
  if saved.get("kind") != "grain":
    return f"the checkpoint was written with the {saved.get('kind')} loader"
  for key, what in (("processes", "processes"), ("workers", "grain workers")):
    if saved.get(key) != current.get(key):
      return (f"the checkpoint was written by {saved.get(key)} {what}, this "
              f"run has {current.get(key)}")
  return None


def write_train_json(path: str, *, command: str, run: Mapping[str, Any],
                     progress: Mapping[str, Any], total_steps: int,
                     checkpoint_dir: str, loader: Mapping[str, Any],
                     parallel: Mapping[str, Any],
                     result: Optional[Mapping[str, Any]] = None,
                     extra: Optional[Mapping[str, Any]] = None) -> dict:
  """Writes a ``sharpjax train`` run's record atomically; returns it.

  Called at every checkpoint (``result`` None: the run goes on) and at the
  end (``result``: the run's :class:`~sharpjax.cli._runner.RunResult`
  dict), by process 0 only, through a temporary file and ``os.replace``: a
  reader sees the previous record or the new one, never part of one.

  Args:
    path: ``OUT/train.json``.
    command: the command line.
    run: the run's definition (what a checkpoint's ``run`` holds).
    progress: the run's :class:`~sharpjax.cli._runner.Progress` dict.
    total_steps: steps of the whole run.
    checkpoint_dir: where its checkpoints are.
    loader: :func:`loader_settings`.
    parallel: the devices and processes (``Devices.to_dict()``).
    result: the finished (or stopped) run's summary, or None.
    extra: more top-level fields (e.g. the resolved configuration).
  """
  import jax  # pylint: disable=g-import-not-at-top
  from sharpjax.cli import _report  # pylint: disable=g-import-not-at-top
  step = int(progress["step"])
  payload = {
      "command": command, "updated": _report.utc_now(),
      "finished": _report.utc_now() if result is not None else None,
      "run": dict(run), "step": step, "total_steps": int(total_steps),
      "complete": result is not None and step >= total_steps,
      "checkpoint_dir": checkpoint_dir, "loader": dict(loader),
      "history": list(progress["history"]),
      "result": None if result is None else dict(result),
      "versions": _report.versions(), "device": _report.device_info(),
      "parallel": dict(parallel), **(dict(extra) if extra else {})}
  if jax.process_index() == 0:
    _report.write_json(path, payload)
  return payload


def train_json_done(path: str, step: int) -> bool:
  """Whether ``path`` is the final record of a run ended at ``step``."""
  try:
    with open(path) as f:
      payload = json.load(f)
    return payload.get("result") is not None and payload["step"] == step
  except (OSError, ValueError, KeyError, TypeError, AttributeError):
    return False
