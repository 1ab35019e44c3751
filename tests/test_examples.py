"""The example scripts run and print what they promise."""

import pathlib
import os
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_quickstart_example_trains_sgd_and_sam():
  proc = subprocess.run(
      [sys.executable, str(ROOT / "examples" / "quickstart.py")],
      capture_output=True, text=True, timeout=600,
      env={"PATH": "", "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "",
           # The suite's compile settings (conftest.py).
           **{k: v for k, v in os.environ.items()
              if k.startswith(("JAX_DISABLE", "JAX_COMPILATION",
                               "JAX_PERSISTENT"))}})
  assert proc.returncode == 0, proc.stderr
  lines = proc.stdout.splitlines()
  assert lines[0].split() == ["method", "test", "acc", "train", "loss",
                              "seconds"]
  for method in ("sgd", "sam"):
    row = next(l.split() for l in lines if l.split()[:1] == [method])
    assert 0.5 < float(row[1]) <= 1.0  # test accuracy on the spirals
  assert "perturbed loss=" in proc.stdout  # SAM's diagnostics are printed
