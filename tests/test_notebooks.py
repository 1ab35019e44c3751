"""Every notebook in notebooks/ is stored executed, top to bottom, ends with
what it shows, and still runs top to bottom with its default settings.

The documentation renders the stored outputs (it never runs a notebook), so
a notebook stored unexecuted, or executed out of order, would show a reader
outputs that no longer follow from its code. Re-execute one after editing it
(``jupyter execute --inplace notebooks/NAME.ipynb``, one at a time).
Executing the four takes about 2, 2, 2.5 and 4 minutes on 2 shared CPU cores.

Each notebook keeps its budget (epochs, timing repeats) in one code cell
tagged ``parameters`` (papermill's convention); the suite runs every notebook
top to bottom with a smaller budget, set by a cell inserted after that one.
"""

from __future__ import annotations

import os
import pathlib
import re
import sys

import pytest

NOTEBOOKS = sorted(
    (pathlib.Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_stored_executed_and_ends_with_what_it_shows(path):
  nbformat = pytest.importorskip("nbformat")
  notebook = nbformat.read(path, as_version=4)
  code = [c for c in notebook.cells if c.cell_type == "code"]
  counts = [c.execution_count for c in code]
  assert counts == list(range(1, len(code) + 1)), (
      f"{path.name} is not stored executed top to bottom: execution counts "
      f"{counts}")
  outputs = [o for c in code for o in c.outputs]
  assert outputs, f"{path.name} is stored without outputs"
  errors = [o for o in outputs if o.output_type == "error"]
  assert not errors, f"{path.name} is stored with an error: {errors[0]}"
  last = notebook.cells[-1]
  assert last.cell_type == "markdown" and last.source.startswith(
      "## What this shows"), f"{path.name} does not end with what it shows"


# The budgets the suite runs each notebook with: every code path, a fraction of
# the time (SAF and MESA still start: START < EPOCHS).
SMALL_BUDGETS = {
    "quickstart": {"EPOCHS": 2, "TIMING_STEPS": 5, "TIMING_REPEATS": 2},
    "saf_mesa": {"EPOCHS": 4, "START": 2, "TIMING_STEPS": 5,
                 "TIMING_REPEATS": 2},
    "sharpness": {"EPOCHS": 4, "MAX_ITERS": 5, "NUM_PROBES": 2,
                  "SLQ_STEPS": 5},
    "beyond_training": {"EPOCHS": 2, "TTA_EPOCHS": 2},
}


def _parameters_cell(notebook):
  cells = [i for i, c in enumerate(notebook.cells)
           if "parameters" in c.metadata.get("tags", [])]
  assert len(cells) == 1, "one code cell tagged 'parameters' holds the budget"
  return cells[0]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path, monkeypatch, tmp_path):
  nbformat = pytest.importorskip("nbformat")
  nbclient = pytest.importorskip("nbclient")
  # The kernel is "python" on PATH: make it this interpreter (the venv's).
  monkeypatch.setenv("PATH", os.path.dirname(sys.executable) + os.pathsep
                     + os.environ.get("PATH", ""))
  monkeypatch.setenv("MPLBACKEND", "Agg")
  # One host device in the kernel, as a user's laptop would have.
  monkeypatch.setenv("XLA_FLAGS", "")
  notebook = nbformat.read(path, as_version=4)
  at = _parameters_cell(notebook)
  budget = SMALL_BUDGETS[path.stem]
  assigned = notebook.cells[at].source
  missing = [name for name in budget
             if not re.search(rf"^[^=#\n]*\b{name}\b[^=\n]*=", assigned, re.M)]
  assert not missing, f"{path.name}'s parameters cell sets no {missing}"
  notebook.cells.insert(at + 1, nbformat.v4.new_code_cell(
      "\n".join(f"{name} = {value!r}" for name, value in budget.items())))
  client = nbclient.NotebookClient(
      notebook, timeout=600, kernel_name="python3",
      resources={"metadata": {"path": str(tmp_path)}})
  client.execute()  # raises CellExecutionError on the first failing cell
