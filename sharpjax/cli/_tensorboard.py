"""``--tensorboard DIR``: the run's scalars as TensorBoard event files.

Written with tensorboardX's event writer (``pip install
'sharpjax[tensorboard]'``; no TensorFlow), by process 0 only in a
multi-process run. Tags:

- ``train/loss``, ``train/accuracy``, ``train/learning_rate``,
  ``train/penalty`` (SAF/MESA) and every scalar diagnostic of the method
  (``train/grad_norm``, ``train/perturbation_norm``, ``train/cosine``, ...):
  means over each log interval, at its last step (the log points: every 10
  steps, every ``--save-every`` steps and each epoch's end; they depend on
  the step alone, so a resumed run logs where an uninterrupted one does);
- ``test/loss``, ``test/accuracy``, ``epoch/train_loss``,
  ``epoch/train_accuracy``: at the last step of every epoch.

A run resumed from its checkpoint at step ``K`` purges the events after
``K`` (TensorBoard's ``purge_step``: ``K + 1``) that the interrupted run wrote
past it, and keeps those at ``K`` and before, which the resumed run does not
write again: its events are an uninterrupted run's. The events are flushed
to disk before every checkpoint (:meth:`TensorBoardLog.flush`), so that a run
killed after a checkpoint has written every event up to it.
"""

from __future__ import annotations

import os
import time
from typing import Mapping, Optional

import jax


class TensorBoardLog:
  """Scalars to ``logdir`` (created); a no-op on processes other than 0.

  The events are written by this thread into one new event file (no
  background writer: :meth:`flush` puts every event written so far on disk,
  which tensorboardX's asynchronous ``SummaryWriter`` cannot promise).

  Args:
    logdir: the event files' directory.
    resumed_at: the step of the checkpoint a resumed run starts from: the
      events after it that an earlier run wrote into ``logdir`` are dropped
      (None: a new run).
  """

  def __init__(self, logdir: str, resumed_at: Optional[int] = None):
    self.logdir = os.path.abspath(logdir)
    self._writer = None
    if jax.process_index() != 0:
      return
    try:
      # pylint: disable=g-import-not-at-top
      from tensorboardX import event_file_writer
      from tensorboardX import summary
      from tensorboardX.proto import event_pb2
      # pylint: enable=g-import-not-at-top
    except ImportError as e:
      raise ValueError(
          "--tensorboard writes event files with tensorboardX: pip install "
          "'sharpjax[tensorboard]'.") from e
    self._summary, self._pb = summary, event_pb2
    os.makedirs(self.logdir, exist_ok=True)
    # Event files are named by the second they were opened and the host,
    # and TensorBoard reads them in the order of their names: the suffix
    # (the time in nanoseconds) keeps two runs of the same second apart, in
    # the order they ran (a resumed run's purge must come after the events
    # it purges).
    self._writer = event_file_writer.EventsWriter(
        os.path.join(self.logdir, "events"),
        f".{time.time_ns():020d}.{os.getpid()}")
    if resumed_at is not None:  # TensorBoard's purge: a session start
      self._writer.write_event(event_pb2.Event(
          step=int(resumed_at) + 1, wall_time=time.time(),
          session_log=event_pb2.SessionLog(
              status=event_pb2.SessionLog.START)))

  def scalars(self, step: int, values: Mapping[str, float]) -> None:
    """Writes ``values`` (``tag -> number``) at ``step``."""
    if self._writer is None:
      return
    now = time.time()
    for tag, value in values.items():
      self._writer.write_event(self._pb.Event(
          step=int(step), wall_time=now,
          summary=self._summary.scalar(tag, float(value))))

  def flush(self) -> None:
    """Puts the events written so far on disk (before a checkpoint)."""
    if self._writer is not None:
      self._writer.flush()

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()
      self._writer = None
