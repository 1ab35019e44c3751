"""``sharpjax train --profile-steps A:B``: a profiler trace of chosen steps.

Steps ``A`` to ``B - 1`` (0-based global step numbers, as a Python slice) are
traced with :func:`jax.profiler.start_trace` into ``OUT/profile`` (the
layout TensorBoard's profile plugin reads: ``plugins/profile/RUN/*.xplane.pb``),
on process 0 only (the other processes run the same program). Every training
step runs inside a :class:`jax.profiler.StepTraceAnnotation` named ``train``
with its step number, traced or not, so the trace viewer groups the work by
step. The trace stops after waiting for step ``B - 1`` to finish on the
device (the only wait it adds, once); a run that ends or is interrupted
inside the window closes the trace where it is.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import jax


def parse(text: Optional[str],
          total: Optional[int] = None) -> Optional[tuple[int, int]]:
  """``"2:4"`` -> ``(2, 4)``; a one-line ``ValueError`` when malformed or
  (given the run's ``total`` steps) past the run's end."""
  if text is None:
    return None
  parts = text.split(":")
  try:
    if len(parts) != 2:
      raise ValueError
    start, stop = int(parts[0]), int(parts[1])
  except ValueError:
    raise ValueError(f"--profile-steps expects A:B (steps A to B - 1, "
                     f"0-based), got {text!r}.") from None
  if not 0 <= start < stop:
    raise ValueError(f"--profile-steps {text}: needs 0 <= A < B (steps A to "
                     "B - 1 are traced).")
  if total is not None and start >= total:
    raise ValueError(f"--profile-steps {text}: the run has {total} steps "
                     f"(0 to {total - 1}).")
  return start, stop


class StepProfiler:
  """Starts a trace before step ``start`` and stops it after ``stop - 1``.

  Args:
    logdir: where the trace goes (``OUT/profile``).
    window: ``(start, stop)``; None: nothing is traced.
  """

  def __init__(self, logdir: str, window: Optional[tuple[int, int]]):
    self.logdir = os.path.abspath(logdir)
    self.window = window if jax.process_index() == 0 else None
    self.active = False
    self.traced: list[int] = []

  def before(self, step: int) -> None:
    if self.window is None or self.active:
      return
    if self.window[0] <= step < self.window[1]:
      os.makedirs(self.logdir, exist_ok=True)
      jax.profiler.start_trace(self.logdir)
      self.active = True

  def after(self, step: int, state: Any) -> None:
    if not self.active:
      return
    self.traced.append(int(step))
    if step + 1 >= self.window[1]:
      jax.block_until_ready(state)  # the traced steps' device work included
      self.close()

  def close(self) -> None:
    if self.active:
      jax.profiler.stop_trace()
      self.active = False
      self.window = None  # one trace per run
