"""The layering of docs/architecture.md, checked on the source.

Each layer imports only the layers below it: no module of ``sharpjax/_src``
imports the packages above it, and no two modules import each other, even
through function-local imports. The training package's functions stay short
enough to read.
"""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "sharpjax"
ABOVE_SRC = ("sharpjax.cli", "sharpjax.measures", "sharpjax.training",
             "sharpjax.data", "sharpjax.launch")


def _module_name(path):
  parts = path.relative_to(ROOT).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules():
  return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _imports(path, modules):
  """The sharpjax modules ``path`` imports (anywhere in the file)."""
  found = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
      # "from pkg import mod" imports pkg.mod; "from mod import name", mod.
      names = [f"{node.module}.{a.name}"
               if f"{node.module}.{a.name}" in modules else node.module
               for a in node.names]
    else:
      continue
    found.update(n for n in names if n in modules and n != "sharpjax")
  found.discard(_module_name(path))
  return found


def test_src_imports_nothing_above_it():
  modules = _modules()
  for name, path in modules.items():
    if name.startswith("sharpjax._src"):
      upward = [m for m in _imports(path, modules) if m.startswith(ABOVE_SRC)]
      assert not upward, f"{name} imports {upward}"


def test_no_import_cycle():
  modules = _modules()
  graph = {name: _imports(path, modules) for name, path in modules.items()}
  state = {}

  def visit(name, stack):
    state[name] = "open"
    for dep in sorted(graph[name]):
      if state.get(dep) == "open":
        cycle = stack[stack.index(dep):] + [dep]
        pytest.fail("import cycle: " + " -> ".join(cycle))
      if dep not in state:
        visit(dep, stack + [dep])
    state[name] = "done"

  for name in sorted(graph):
    if name not in state:
      visit(name, [name])


def test_training_functions_are_short():
  for path in (PACKAGE / "training").glob("*.py"):
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        length = node.end_lineno - node.lineno + 1
        assert length <= 120, f"{path.name}:{node.name} has {length} lines"
