"""The command-line reference, generated from the argument parser itself.

``.. argparse-reference:: sharpjax.cli._main:build_parser`` imports the
function, builds the :class:`argparse.ArgumentParser` and writes, for the
program and for each sub-command: its usage, description, every argument group
with every option (as Sphinx ``program`` / ``option`` entries, so
``:option:`sharpjax compare --methods``` links to it) and its epilog. A flag
added to the parser appears on the site at the next build; nothing is copied
by hand.

The directive emits reStructuredText, so it is used from a ``.rst`` page (or a
MyST ``{eval-rst}`` block).
"""

from __future__ import annotations

import argparse
import importlib
import pathlib
import re

from docutils import nodes
from docutils.statemachine import StringList
from sphinx.util.docutils import SphinxDirective
from sphinx.util.nodes import nested_parse_with_titles

# Usage lines wrapped at a fixed width, whatever the terminal's (argparse
# reads $COLUMNS), so the page is the same on every machine.
WIDTH = 88
_HEADING = {1: "-", 2: "~"}


def _escape(text: str) -> str:
  """Plain help text as reST: `quoted` spans become literals, the rest is
  escaped so that *, _ and | are never markup."""
  text = " ".join(text.split())
  pieces = text.split("`")
  if len(pieces) % 2 == 0:  # an unpaired backtick: treat all as plain text
    pieces = [text]
  out = []
  for i, piece in enumerate(pieces):
    if i % 2:
      out.append(f"``{piece}``" if piece else "")
    else:
      # Options named in the text are set as literals (and so keep their
      # two hyphens, which typography would merge into a dash).
      for j, part in enumerate(re.split(r"(--[a-z][a-z0-9-]*)", piece)):
        out.append(f"``{part}``" if j % 2 else
                   re.sub(r"([\\*_|`<>\[\]])", r"\\\1", part))
  return "".join(out)


def _paragraphs(text: str) -> list[str]:
  return [p for p in re.split(r"\n\s*\n", text or "") if p.strip()]


def _formatter(parser: argparse.ArgumentParser) -> argparse.HelpFormatter:
  return argparse.HelpFormatter(parser.prog, width=WIDTH)


def _usage(parser: argparse.ArgumentParser) -> str:
  f = _formatter(parser)
  f.add_usage(parser.usage, parser._actions,  # pylint: disable=protected-access
              parser._mutually_exclusive_groups)  # pylint: disable=protected-access
  return f.format_help().strip()


def _invocation(parser, action) -> str:
  f = _formatter(parser)
  return f._format_action_invocation(action)  # pylint: disable=protected-access


def _subcommands(parser):
  for action in parser._actions:  # pylint: disable=protected-access
    if isinstance(action, argparse._SubParsersAction):  # pylint: disable=protected-access
      helps = {a.dest: a.help for a in action._choices_actions}  # pylint: disable=protected-access
      for name, sub in action.choices.items():
        yield name, sub, helps.get(name)


def _epilog(parser) -> list[str]:
  if not parser.epilog:
    return []
  if parser.formatter_class is argparse.RawDescriptionHelpFormatter:
    return ["::", ""] + ["   " + l for l in parser.epilog.splitlines()] + [""]
  return [x for p in _paragraphs(parser.epilog) for x in (_escape(p), "")]


# A line "  name     text" (two spaces, a name, two or more spaces) starts an
# item of a list printed by the parser (the presets of `compare`); deeper
# indented lines continue it.
_ITEM = re.compile(r"^  (\S+)\s{2,}(.*)$")


def _paragraph_rst(paragraph: str) -> list[str]:
  """One paragraph of help text as reST lines: its list lines (``_ITEM``) as
  a bullet list, so they do not run into one sentence."""
  lead, items = [], []
  for line in paragraph.splitlines():
    match = _ITEM.match(line)
    if match:
      items.append([match.group(1), match.group(2)])
    elif items and line.startswith("   "):
      items[-1][1] += " " + line.strip()
    elif items:
      return [_escape(paragraph), ""]  # not a list after all
    else:
      lead.append(line)
  out = [_escape("\n".join(lead)), ""] if "".join(lead).strip() else []
  if items:
    out += [f"- ``{name}``: {_escape(text)}" for name, text in items] + [""]
  return out


def _description(parser) -> list[str]:
  return [x for p in _paragraphs(parser.description)
          for x in _paragraph_rst(p)]


def _options(parser, is_sub: bool = False) -> list[str]:
  lines = []
  for group in parser._action_groups:  # pylint: disable=protected-access
    # --help is listed once, for the program, not for every sub-command.
    actions = [a for a in group._group_actions  # pylint: disable=protected-access
               if a.help is not argparse.SUPPRESS
               and not isinstance(a, argparse._SubParsersAction)  # pylint: disable=protected-access
               and not (is_sub and isinstance(a, argparse._HelpAction))]  # pylint: disable=protected-access
    if not actions:
      continue
    lines += [f".. rubric:: {_escape(group.title or 'options')}", ""]
    if group.description:
      lines += [_escape(group.description), ""]
    for action in actions:
      lines += [f".. option:: {_invocation(parser, action)}", ""]
      help_text = action.help or ""
      if "%(" in help_text:  # argparse's own placeholders, e.g. %(default)s
        help_text = help_text % {**vars(action), "prog": parser.prog}
      if action.choices is not None and not isinstance(action.choices, dict):
        choices = ", ".join(str(c) for c in action.choices)
        help_text += f" (one of: {choices})"
      lines += ["   " + (_escape(help_text) or "(no help text)"), ""]
  return lines


def parser_rst(parser: argparse.ArgumentParser) -> list[str]:
  """The whole reference for ``parser`` and its sub-commands, as reST lines."""
  lines = [f".. program:: {parser.prog}", ""]
  lines += ["::", "", "   " + _usage(parser).replace("\n", "\n   "), ""]
  lines += _description(parser)
  subs = list(_subcommands(parser))
  if subs:
    lines += [".. rubric:: commands", ""]
    for name, _, help_text in subs:
      lines += [f"- :ref:`{parser.prog} {name} <cli-{name}>`: "
                f"{_escape(help_text or '')}"]
    lines.append("")
  lines += _options(parser)
  lines += _epilog(parser)
  seen_epilogs = {}
  for name, sub, help_text in subs:
    title = f"``{sub.prog}``"
    lines += [f".. _cli-{name}:", "", title, _HEADING[1] * len(title), ""]
    if help_text:
      lines += [_escape(help_text[0].upper() + help_text[1:]) + ".", ""]
    lines += [f".. program:: {sub.prog}", ""]
    lines += ["::", "", "   " + _usage(sub).replace("\n", "\n   "), ""]
    lines += _description(sub)
    lines += _options(sub, is_sub=True)
    if sub.epilog:
      if sub.epilog in seen_epilogs:
        lines += [f"The methods and their hyper-parameters are listed under "
                  f":ref:`cli-{seen_epilogs[sub.epilog]}`.", ""]
      else:
        seen_epilogs[sub.epilog] = name
        lines += [".. rubric:: notes", ""] + _epilog(sub)
  # One line per item: docutils reads the list line by line.
  return "\n".join(lines).splitlines()


def load_parser(target: str) -> argparse.ArgumentParser:
  module_name, _, attr = target.partition(":")
  if not attr:
    raise ValueError(f"expected MODULE:FUNCTION, got {target!r}")
  return getattr(importlib.import_module(module_name), attr)()


class ArgparseReference(SphinxDirective):
  required_arguments = 1
  has_content = False

  def run(self):
    module_name = self.arguments[0].partition(":")[0]
    try:
      parser = load_parser(self.arguments[0])
    except Exception as err:  # pylint: disable=broad-except
      return [self.state_machine.reporter.warning(
          f"argparse-reference: cannot build {self.arguments[0]}: {err}",
          line=self.lineno)]
    # Rebuild the page when any module of the parser's package changes (the
    # methods registry and the defaults live beside the parser).
    module = importlib.import_module(module_name)
    if getattr(module, "__file__", None):
      for path in pathlib.Path(module.__file__).parent.glob("*.py"):
        self.env.note_dependency(str(path))
    container = nodes.container()
    content = StringList(parser_rst(parser), source=f"<{self.arguments[0]}>")
    nested_parse_with_titles(self.state, content, container)
    return container.children


def setup(app):
  app.add_directive("argparse-reference", ArgparseReference)
  return {"parallel_read_safe": True, "parallel_write_safe": True}
