"""Math rendered at build time into MathML, so pages need no network.

Sphinx's default HTML math renderer, MathJax, is a script loaded from a CDN:
offline, every formula reads as raw TeX (``\\(\\lambda\\)``). This extension
registers a renderer named ``mathml`` (select it with
``html_math_renderer = "mathml"``) that converts each formula with the
pure-Python ``latex2mathml`` package while the site is built. Browsers render
MathML natively (Firefox, Safari, and Chromium since version 109), with no
script and no font download.

A formula that does not convert is a build warning naming the page and the
line (so ``sphinx -W`` fails), and the page shows its TeX source instead.

Display math follows Sphinx's conventions: blank lines separate equations (one
``<math>`` element each), a part with ``\\\\`` line breaks and no environment
of its own is set in a ``split`` environment, and numbered equations keep
their number and permalink.
"""

from __future__ import annotations

import html
import re
import unicodedata

from docutils import nodes
from sphinx.locale import _
from sphinx.util import logging
from sphinx.util.math import get_node_equation_number

import latex2mathml.converter

logger = logging.getLogger(__name__)

# MathML Core (what Chromium implements) ignores `mathvariant` except
# "normal", so blackboard and calligraphic letters are written as the
# Unicode mathematical alphanumeric characters every browser shows.
_VARIANT_NAMES = {"double-struck": "DOUBLE-STRUCK", "script": "SCRIPT",
                  "fraktur": "FRAKTUR", "bold": "BOLD"}
_VARIANT_MI = re.compile(
    r'<mi mathvariant="(double-struck|script|fraktur|bold)">([A-Za-z])</mi>')


def _variant_letter(match: re.Match) -> str:
  style, letter = _VARIANT_NAMES[match.group(1)], match.group(2)
  case = "CAPITAL" if letter.isupper() else "SMALL"
  for name in (f"MATHEMATICAL {style} {case} {letter.upper()}",
               f"{style} {case} {letter.upper()}"):  # the Letterlike holes
    try:
      return f"<mi>{unicodedata.lookup(name)}</mi>"
    except KeyError:
      continue
  return match.group(0)


def tex_to_mathml(tex: str, display: bool) -> str:
  """One formula as a ``<math>`` element; raises on TeX it cannot parse."""
  tex = tex.strip()
  # latex2mathml sets `split` (and `align*`) as a table but not `aligned`,
  # which is what MathJax users write; line breaks with no environment get
  # `split`, as Sphinx's MathJax renderer does.
  tex = tex.replace(r"\begin{aligned}", r"\begin{split}").replace(
      r"\end{aligned}", r"\end{split}")
  if r"\\" in tex and not tex.startswith(r"\begin"):
    tex = r"\begin{split}" + tex + r"\end{split}"
  out = latex2mathml.converter.convert(
      tex, display="block" if display else "inline")
  # `\text{a\_b}`: latex2mathml keeps the backslash in text mode.
  out = out.replace("\\_", "_")
  out = _VARIANT_MI.sub(_variant_letter, out)
  if "\\" in out:  # a command it did not know, copied through as text
    raise ValueError(f"unconverted TeX left in {out!r}")
  if ">&<" in out or 'linebreak="newline"' in out:
    # An alignment or line break outside an environment it sets as a table.
    raise ValueError(f"unaligned '&' or '\\\\' left in {out!r}")
  return out


def _convert(self, node, tex: str, display: bool) -> str:
  try:
    return tex_to_mathml(tex, display)
  except Exception as err:  # pylint: disable=broad-except
    logger.warning("math did not convert to MathML (%s: %s): %s",
                   type(err).__name__, err, tex, location=node,
                   type="sharpjax", subtype="math")
    return f"<code>{html.escape(tex)}</code>"


def visit_math(self, node: nodes.math) -> None:
  self.body.append(self.starttag(node, "span", "",
                                 CLASS="math notranslate nohighlight"))
  self.body.append(_convert(self, node, node.astext(), display=False))
  self.body.append("</span>")
  raise nodes.SkipNode


def visit_displaymath(self, node: nodes.math_block) -> None:
  self.body.append(self.starttag(node, "div",
                                 CLASS="math notranslate nohighlight"))
  if node.get("number"):
    number = get_node_equation_number(self, node)
    self.body.append(f'<span class="eqno">({number})')
    self.add_permalink_ref(node, _("Link to this equation"))
    self.body.append("</span>")
  parts = [p for p in node.astext().split("\n\n") if p.strip()]
  for part in parts:
    self.body.append(_convert(self, node, part, display=True))
  self.body.append("</div>\n")
  raise nodes.SkipNode


def setup(app):
  app.add_html_math_renderer("mathml", inline_renderers=(visit_math, None),
                             block_renderers=(visit_displaymath, None))
  return {"parallel_read_safe": True, "parallel_write_safe": True}
