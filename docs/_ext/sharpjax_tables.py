"""Tables and numbers built from the project's own benchmark results.

The scripts in ``benchmarks/`` write a JSON file with a ``meta`` dict and a
``results`` list of dicts. The documentation shows what they measured and never
copies of it:

``benchmark-table`` renders rows of a results file, one column per line of
its content, ``FIELD | HEADER | FORMAT``::

  ```{benchmark-table} benchmarks/results/overhead.json
  :rows: method
  method       | method
  ms_per_step  | ms / step   | ms
  ratio_to_sgd | × SGD       | ratio
  temp_bytes   | XLA temp MiB | mib
  ```

- ``FIELD`` is a key of the result rows; ``MEAN±STD`` (two keys) renders as
  ``90.6 ± 0.1``; a ``[key=value]`` prefix takes the value from the row that
  also has ``key == value`` (with ``:rows: method``, one table row per method:
  a pivot, e.g. ``[noise=0.2]test_accuracy_mean``).
- ``FORMAT`` (default ``text``): ``int`` (thousands separators), ``ms`` (two
  decimals below 100, none above), ``ratio`` (``1.98x``), ``mib`` (bytes as
  MiB), ``pct`` (a fraction as a percentage, one decimal), ``sig`` (three
  significant digits, never an exponent).
- ``:only: key=value`` keeps the rows that match; ``:caption:`` is a text
  formatted with the file's ``meta`` (``{epochs}``, ``{model_note}``, ...).

Every table is followed by the file, commit, date and device it came from and
sits in a horizontally scrolling wrapper (``_static/sharpjax.css``), so a wide
table never runs off the page.

The ``bench`` role puts one number from a results file into a sentence:
``{bench}`overhead.json | method=looksam | ratio_to_sgd | ratio``` renders
``1.98x`` (``FILE | SELECTOR | FIELD [| FORMAT]``; the selector is
``key=value`` pairs joined by commas and must match exactly one row; files are
looked up in ``benchmarks/results/``). A file, row or field that is missing is
a build warning, never a silently stale number.
"""

from __future__ import annotations

import json
import math
import pathlib
import re

from docutils import nodes
from docutils.parsers.rst import directives
from sphinx.util import logging
from sphinx.util.docutils import SphinxDirective, SphinxRole

ROOT = pathlib.Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"
logger = logging.getLogger(__name__)


def _sig(value: float, digits: int = 3) -> str:
  """``value`` to ``digits`` significant digits, in positional notation."""
  if value == 0 or not math.isfinite(value):
    return f"{value:g}"
  decimals = max(0, digits - 1 - int(math.floor(math.log10(abs(value)))))
  return f"{value:,.{decimals}f}"


def _number(value) -> float:
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    raise TypeError(f"expected a number, got {value!r}")
  return float(value)


FORMATS = {
    "text": lambda v: f"{v:,}" if isinstance(v, int) else (
        _sig(v) if isinstance(v, float) else str(v)),
    "int": lambda v: f"{int(round(_number(v))):,}",
    "ms": lambda v: (f"{_number(v):,.2f}" if abs(_number(v)) < 100
                     else f"{_number(v):,.0f}"),
    "ratio": lambda v: f"{_number(v):.2f}x",
    "mib": lambda v: f"{_number(v) / 2**20:,.1f}",
    "pct": lambda v: f"{100 * _number(v):.1f}",
    "sig": lambda v: _sig(_number(v)),
}
NUMERIC = {"int", "ms", "ratio", "mib", "pct", "sig"}


def format_value(value, fmt: str = "text", std=None) -> str:
  """One cell; ``None`` (a row that was not measured) is an empty cell."""
  if fmt not in FORMATS:
    raise ValueError(f"unknown format {fmt!r}; one of {sorted(FORMATS)}")
  if value is None:
    return ""
  text = FORMATS[fmt](value)
  if std is not None:
    text += " ± " + FORMATS[fmt](std)
  return text


def _matches(row: dict, key: str, value: str) -> bool:
  if key not in row:
    return False
  have = row[key]
  if isinstance(have, (int, float)) and not isinstance(have, bool):
    try:
      return float(value) == float(have)
    except ValueError:
      return False
  return str(have) == value


def parse_selector(text: str) -> list[tuple[str, str]]:
  pairs = []
  for item in filter(None, (s.strip() for s in text.split(","))):
    if "=" not in item:
      raise ValueError(f"selector {item!r} is not key=value")
    key, value = item.split("=", 1)
    pairs.append((key.strip(), value.strip()))
  return pairs


def select(rows: list[dict], pairs) -> list[dict]:
  return [r for r in rows if all(_matches(r, k, v) for k, v in pairs)]


class Column:
  """One ``FIELD | HEADER | FORMAT`` line."""

  def __init__(self, line: str):
    parts = [p.strip() for p in line.split("|")]
    if not 1 <= len(parts) <= 3 or not parts[0]:
      raise ValueError(f"column {line!r} is not FIELD | HEADER | FORMAT")
    field = parts[0]
    self.pairs = []
    m = re.fullmatch(r"\[([^\]]*)\](.*)", field)
    if m:
      self.pairs, field = parse_selector(m.group(1)), m.group(2).strip()
    self.key, _, self.std_key = (k.strip() for k in field.partition("±"))
    self.header = parts[1] if len(parts) > 1 and parts[1] else self.key
    self.fmt = parts[2] if len(parts) > 2 and parts[2] else "text"
    if self.fmt not in FORMATS:
      raise ValueError(f"column {line!r}: unknown format {self.fmt!r}; one of "
                       f"{sorted(FORMATS)}")

  def cell(self, group: list[dict]) -> str:
    rows = select(group, self.pairs) if self.pairs else group[:1]
    if not rows:
      return ""
    row = rows[0]
    std = row.get(self.std_key) if self.std_key else None
    return format_value(row.get(self.key), self.fmt, std)


def load_results(path: pathlib.Path) -> dict:
  data = json.loads(path.read_text())
  if not isinstance(data.get("results"), list):
    raise ValueError(f"{path} has no 'results' list")
  return data


class BenchmarkTable(SphinxDirective):
  required_arguments = 1
  has_content = True
  option_spec = {"rows": directives.unchanged_required,
                 "only": directives.unchanged_required,
                 "caption": directives.unchanged}

  def run(self):
    path = ROOT / self.arguments[0]
    self.env.note_dependency(str(path))
    try:
      data = load_results(path)
      columns = [Column(l) for l in self.content if l.strip()]
      if not columns:
        raise ValueError("no columns: one FIELD | HEADER | FORMAT per line")
      rows = data["results"]
      if "only" in self.options:
        rows = select(rows, parse_selector(self.options["only"]))
      groups = self._groups(rows)
      meta = data.get("meta", {})
      caption = self.options.get("caption", "").format(**meta)
    except (OSError, ValueError, KeyError, TypeError) as err:
      return [self.state_machine.reporter.warning(
          f"benchmark-table {self.arguments[0]}: {err}", line=self.lineno)]
    table = nodes.table(classes=["benchmark-table"])
    group_node = nodes.tgroup(cols=len(columns))
    table += group_node
    group_node.extend(nodes.colspec(colwidth=1) for _ in columns)
    head = nodes.thead()
    group_node += head
    head += self._row([c.header for c in columns], columns)
    body = nodes.tbody()
    group_node += body
    for group in groups:
      body += self._row([c.cell(group) for c in columns], columns)
    source = nodes.paragraph(classes=["benchmark-source"])
    if caption:
      source += nodes.Text(caption.rstrip(".") + ". ")
    device = meta.get("device", "")
    if device and "cpu_count" in meta and "core" not in device:
      device += f" ({meta['cpu_count']} cores)"
    source += nodes.Text("Source: ")
    source += nodes.literal(text=self.arguments[0])
    source += nodes.Text(
        (f", commit {meta['commit']}" if "commit" in meta else "")
        + (f", {meta['date'][:10]}" if "date" in meta else "")
        + (f", {device}" if device else "") + ".")
    command = str(meta.get("command", "")).strip()
    if command:
      source += nodes.Text(" Command: ")
      source += nodes.literal(text=command)
      source += nodes.Text(".")
    wrapper = nodes.container(classes=["benchmark-table-wrapper"])
    wrapper += table
    return [wrapper, source]

  def _groups(self, rows):
    """Table rows: each result row, or with ``:rows: key`` the result rows
    grouped by that key (first-seen order)."""
    key = self.options.get("rows")
    if not key:
      return [[r] for r in rows]
    order, groups = [], {}
    for r in rows:
      if key not in r:
        raise KeyError(f"a result row has no {key!r}")
      if r[key] not in groups:
        order.append(r[key])
        groups[r[key]] = []
      groups[r[key]].append(r)
    return [groups[k] for k in order]

  @staticmethod
  def _row(cells, columns):
    row = nodes.row()
    for cell, column in zip(cells, columns):
      entry = nodes.entry(classes=["num"] if column.fmt in NUMERIC else [])
      entry += nodes.paragraph(text=str(cell))
      row += entry
    return row


class BenchRole(SphinxRole):
  """``FILE | SELECTOR | FIELD [| FORMAT]``: one number from a results file."""

  def run(self):
    try:
      parts = [p.strip() for p in self.text.split("|")]
      if len(parts) not in (3, 4):
        raise ValueError("expected FILE | SELECTOR | FIELD [| FORMAT]")
      name, selector, key = parts[:3]
      fmt = parts[3] if len(parts) == 4 else "text"
      path = RESULTS / name
      self.env.note_dependency(str(path))
      rows = select(load_results(path)["results"], parse_selector(selector))
      if len(rows) != 1:
        raise ValueError(f"{selector} matches {len(rows)} rows of {name}")
      if rows[0].get(key) is None:
        raise ValueError(f"{selector} has no value for {key!r} in {name}")
      text = format_value(rows[0][key], fmt)
    except (OSError, ValueError, KeyError, TypeError) as err:
      msg = self.inliner.reporter.warning(f"bench `{self.text}`: {err}",
                                          line=self.lineno)
      return [nodes.problematic(self.rawtext, self.rawtext)], [msg]
    return [nodes.inline(self.rawtext, text, classes=["bench-value"])], []


def setup(app):
  app.add_directive("benchmark-table", BenchmarkTable)
  app.add_role("bench", BenchRole())
  return {"parallel_read_safe": True, "parallel_write_safe": True}
