"""What every benchmark script records beside its numbers."""

from __future__ import annotations

import pathlib
import subprocess


def git_commit() -> str:
  """The short hash of the checkout's HEAD, or "unknown" outside git."""
  try:
    return subprocess.check_output(
        ["git", "rev-parse", "--short", "HEAD"], text=True,
        cwd=pathlib.Path(__file__).parent, stderr=subprocess.DEVNULL).strip()
  except Exception:  # pylint: disable=broad-except
    return "unknown"
