"""What a reader sees in the docs, README, examples, notebooks and docstrings:
no file outside the repository or word of internal tracking is named, the
README's Quickstart runs as it stands, and every Python block pastes into an
interactive prompt."""

from __future__ import annotations

import ast
import code
import json
import pathlib
import re
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Files outside the repository (the notes the code was written from) and words
# of internal tracking, which a reader of the published text cannot follow.
FORBIDDEN = [
    (re.compile(r"\.\./shared|shared/reference|/work/"), "a path outside the "
     "repository"),
    (re.compile(r"\b(API|STYLE)\.md\b|performance-notes\.md|jax-anchors\.md|"
                r"saf-esam-sam\.md|variants-and-measures\.md|"
                r"frontier-and-pods\.md|gaqat-geodesic\.md"),
     "a file outside the repository"),
    (re.compile(r"console battery|branch of issue|\bsession\b", re.I),
     "an internal word"),
]
# "issue N" is internal unless it names a public repository's issue
# ("jax-ml/jax issue 12868").
ISSUE = re.compile(r"\bissues? #?\d+", re.I)
PUBLIC_ISSUE = re.compile(r"[\w.-]+/[\w.-]+,?\s+$")


def _texts():
  """(where, text) for every page, example, notebook cell and docstring."""
  for path in sorted([ROOT / "README.md", ROOT / "CHANGELOG.md",
                      *(ROOT / "docs").rglob("*.md"),
                      *(ROOT / "docs").rglob("*.rst")]):
    yield str(path.relative_to(ROOT)), path.read_text()
  for path in sorted((ROOT / "examples").rglob("*.py")):
    yield str(path.relative_to(ROOT)), path.read_text()
  for path in sorted((ROOT / "notebooks").glob("*.ipynb")):
    for i, cell in enumerate(json.loads(path.read_text())["cells"]):
      yield f"{path.relative_to(ROOT)} cell {i}", "".join(cell["source"])
  for path in sorted([*(ROOT / "sharpjax").rglob("*.py"),
                      *(ROOT / "benchmarks").glob("*.py")]):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
      if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef,
                           ast.AsyncFunctionDef)):
        doc = ast.get_docstring(node, clean=False)
        if doc:
          name = getattr(node, "name", "module")
          yield f"{path.relative_to(ROOT)}:{name}", doc


def test_no_text_names_a_file_outside_the_repository_or_internal_words():
  found = []
  for where, text in _texts():
    for pattern, what in FORBIDDEN:
      for match in pattern.finditer(text):
        found.append(f"{where}: {match.group(0)!r} ({what})")
    for match in ISSUE.finditer(text):
      if not PUBLIC_ISSUE.search(text[max(0, match.start() - 60):
                                      match.start()]):
        found.append(f"{where}: {match.group(0)!r} (an internal issue)")
  assert not found, "\n".join(found)


def test_the_checks_catch_what_they_are_for():
  bad = ("See ../shared/API.md; another branch of issue 20 (console "
         "battery), this session.")
  assert all(p.search(bad) for p, _ in FORBIDDEN)
  assert ISSUE.search(bad) and not PUBLIC_ISSUE.search(bad[:bad.index("issue")])
  ok = "XLA:CPU (jax-ml/jax issue 12868)"
  match = ISSUE.search(ok)
  assert PUBLIC_ISSUE.search(ok[:match.start()])


def _python_blocks(path: pathlib.Path):
  text = path.read_text()
  return re.findall(r"^```python\n(.*?)^```", text, re.S | re.M)


def _readme_quickstart() -> str:
  readme = (ROOT / "README.md").read_text()
  section = readme.split("\n## Quickstart\n", 1)[1].split("\n## ", 1)[0]
  return re.findall(r"^```python\n(.*?)^```", section, re.S | re.M)[0]


def test_readme_quickstart_runs_as_it_stands(capsys):
  """The block runs on its own, in a fresh namespace, and prints the
  diagnostics of one SAM step (rho: the perturbation's norm)."""
  namespace = {"__name__": "__main__"}
  exec(compile(_readme_quickstart(), "README.md Quickstart", "exec"),  # pylint: disable=exec-used
       namespace)
  assert "perturbation_norm" in capsys.readouterr().out
  sj = namespace["sj"]
  norm = float(sj.diagnostics(namespace["opt_state"])["perturbation_norm"])
  assert abs(norm - 0.05) < 1e-6


class _Prompt(code.InteractiveConsole):
  """Python's interactive prompt, reading pasted lines without running
  them: a statement that would not compile there is recorded."""

  def __init__(self):
    super().__init__()
    self.errors = []

  def runcode(self, code_object):
    del code_object

  def showsyntaxerror(self, filename=None, **kwargs):
    del filename, kwargs
    self.errors.append(self.buffer[-1] if self.buffer else "")


def paste_errors(block: str) -> list[str]:
  prompt = _Prompt()
  for line in block.splitlines():
    prompt.push(line)
  prompt.push("")
  return prompt.errors


def _pages_with_python():
  pages = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
  return [p for p in pages if _python_blocks(p)]


@pytest.mark.parametrize("path", _pages_with_python(),
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_python_blocks_paste_into_a_prompt(path):
  """An indented block must end with a blank line before the next statement,
  or the interactive prompt refuses the paste."""
  bad = [(i, err) for i, block in enumerate(_python_blocks(path))
         for err in paste_errors(block)]
  assert not bad, bad


def test_paste_check_catches_a_loop_without_a_blank_line():
  assert paste_errors("for i in range(2):\n    x = i\nprint(x)\n")
  assert not paste_errors("for i in range(2):\n    x = i\n\nprint(x)\n")
  assert not paste_errors("f = dict(\n    a=1,\n)\nprint(f)\n")
