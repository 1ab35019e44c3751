"""``--tensorboard DIR``: the run's scalars as TensorBoard event files.

Written with tensorboardX (``pip install 'sharpjax[tensorboard]'``; no
TensorFlow), by process 0 only in a multi-process run. Tags:

- ``train/loss``, ``train/accuracy``, ``train/learning_rate``,
  ``train/penalty`` (SAF/MESA) and every scalar diagnostic of the method
  (``train/grad_norm``, ``train/perturbation_norm``, ``train/cosine``, ...):
  means over each log interval (the steps between two metric read-backs),
  at the interval's last step;
- ``test/loss``, ``test/accuracy``, ``epoch/train_loss``,
  ``epoch/train_accuracy``: at the last step of every epoch.

A resumed run purges the events past its checkpoint's step (TensorBoard's
``purge_step``), so the curves show each step once.
"""

from __future__ import annotations

import os
from typing import Mapping, Optional

import jax


class TensorBoardLog:
  """Scalars to ``logdir`` (created); a no-op on processes other than 0.

  Args:
    logdir: the event files' directory.
    purge_step: drop events at this step and later written by an earlier
      run into ``logdir`` (a resumed run's first step).
  """

  def __init__(self, logdir: str, purge_step: Optional[int] = None):
    self.logdir = os.path.abspath(logdir)
    self._writer = None
    if jax.process_index() != 0:
      return
    try:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise ValueError(
          "--tensorboard writes event files with tensorboardX: pip install "
          "'sharpjax[tensorboard]'.") from e
    self._writer = SummaryWriter(self.logdir, purge_step=purge_step,
                                 flush_secs=30)

  def scalars(self, step: int, values: Mapping[str, float]) -> None:
    """Writes ``values`` (``tag -> number``) at ``step``."""
    if self._writer is None:
      return
    for tag, value in values.items():
      self._writer.add_scalar(tag, float(value), int(step))

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()
      self._writer = None
