"""``.. method-table::``: the methods' table, built from their cards.

The cards (:mod:`sharpjax._src.registry`) are the one source of each method's
rule, cost, defaults (read from the constructor's signature) and paper; this
page, the README's table and the command line's registry all read them.
"""

from __future__ import annotations

from docutils import nodes
from docutils.parsers.rst import Directive


def _cell(*children):
  entry = nodes.entry()
  paragraph = nodes.paragraph()
  paragraph.extend(children)
  entry += paragraph
  return entry


class MethodTable(Directive):
  """A table row per method: call, rule, defaults, cost, paper."""

  def run(self):
    from sharpjax._src import registry  # pylint: disable=g-import-not-at-top

    header = ("transformation", "rule", "defaults", "cost per step", "paper")
    table = nodes.table(classes=["sharpjax-wide"])
    group = nodes.tgroup(cols=len(header))
    table += group
    group.extend(nodes.colspec(colwidth=1) for _ in header)
    head = nodes.thead()
    row = nodes.row()
    row.extend(_cell(nodes.Text(h)) for h in header)
    head += row
    group += head
    body = nodes.tbody()
    for card in registry.CARDS:
      if card.constructor is None:
        continue
      defaults = ", ".join(f"{k}={v!r}" for k, v in card.defaults().items())
      paper = card.papers[0]
      row = nodes.row()
      row += _cell(nodes.literal(text=card.call))
      row += _cell(nodes.Text(card.rule))
      row += _cell(nodes.literal(text=defaults))
      row += _cell(nodes.Text(card.cost))
      row += _cell(nodes.reference(text=paper.citation, refuri=paper.url))
      body += row
    group += body
    return [table]


def setup(app):
  app.add_directive("method-table", MethodTable)
  return {"parallel_read_safe": True, "parallel_write_safe": True}
