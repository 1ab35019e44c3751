"""Tables built from the project's own benchmark results.

``.. benchmark-table:: benchmarks/results/overhead.json`` renders the rows of
a results JSON written by the scripts in ``benchmarks/`` (a ``meta`` dict and a
``results`` list of dicts), so the documentation shows the measured numbers
and never copies of them.
"""

from __future__ import annotations

import json
import pathlib

from docutils import nodes
from docutils.parsers.rst import Directive, directives

ROOT = pathlib.Path(__file__).resolve().parents[2]


class BenchmarkTable(Directive):
  required_arguments = 1
  option_spec = {"columns": directives.unchanged_required}

  def run(self):
    path = ROOT / self.arguments[0]
    env = self.state.document.settings.env
    env.note_dependency(str(path))
    if not path.exists():
      return [self.state_machine.reporter.warning(
          f"benchmark results {path} not found", line=self.lineno)]
    data = json.loads(path.read_text())
    rows = data["results"]
    columns = [c.strip() for c in self.options.get(
        "columns", ",".join(rows[0].keys())).split(",")]
    table = nodes.table()
    group = nodes.tgroup(cols=len(columns))
    table += group
    group.extend(nodes.colspec(colwidth=1) for _ in columns)
    head = nodes.thead()
    group += head
    head += self._row(columns)
    body = nodes.tbody()
    group += body
    for row in rows:
      body += self._row([_fmt(row.get(c, "")) for c in columns])
    meta = data.get("meta", {})
    caption = nodes.paragraph(text=(
        f"Measured by {self.arguments[0]}"
        + (f" at commit {meta['commit']}" if "commit" in meta else "")
        + (f" on {meta['date']}" if "date" in meta else "")
        + (f", {meta['device']}" if "device" in meta else "") + "."))
    return [table, caption]

  @staticmethod
  def _row(cells):
    row = nodes.row()
    for cell in cells:
      entry = nodes.entry()
      entry += nodes.paragraph(text=str(cell))
      row += entry
    return row


def _fmt(value):
  if value is None:  # a row that was not measured (its note says why)
    return ""
  if isinstance(value, float):
    return f"{value:.3g}"
  return value


def setup(app):
  app.add_directive("benchmark-table", BenchmarkTable)
  return {"parallel_read_safe": True, "parallel_write_safe": True}
