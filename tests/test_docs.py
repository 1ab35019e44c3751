"""The documentation builds without warnings and covers every public name."""

from __future__ import annotations

import importlib
import inspect
import pathlib
import pkgutil
import subprocess
import sys

import pytest

import sharpjax

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Every SAM-family and trajectory constructor documents its update rule.
TRANSFORMATIONS = ["sam", "asam", "gsam", "looksam", "fsam", "msam", "esam",
                   "ssam", "ausam", "sagm", "saf", "mesa"]


def public_modules():
  """sharpjax and its public subpackages (those not starting with _)."""
  names = ["sharpjax"]
  for info in pkgutil.iter_modules(sharpjax.__path__):
    if not info.name.startswith("_"):
      names.append(f"sharpjax.{info.name}")
  return names


def public_names(module_name):
  module = importlib.import_module(module_name)
  for name in dir(module):
    obj = getattr(module, name)
    if name.startswith("_") or inspect.ismodule(obj):
      continue
    if not getattr(obj, "__module__", "").startswith("sharpjax"):
      continue  # re-exported third-party names (typing, jax, ...)
    yield name


@pytest.fixture(scope="module")
def built_html(tmp_path_factory):
  pytest.importorskip("sphinx")
  out = tmp_path_factory.mktemp("html")
  proc = subprocess.run(
      [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b",
       "html", str(ROOT / "docs"), str(out)],
      capture_output=True, text=True, cwd=ROOT)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  return "\n".join(p.read_text() for p in out.rglob("*.html"))


def test_every_public_name_has_a_reference_entry(built_html):
  missing = []
  for module_name in public_modules():
    for name in public_names(module_name):
      if f'id="{module_name}.{name}"' not in built_html:
        missing.append(f"{module_name}.{name}")
  assert not missing, f"undocumented public names: {missing}"


@pytest.mark.parametrize("name", TRANSFORMATIONS)
def test_transformation_docstrings_carry_math_paper_and_example(name):
  if not hasattr(sharpjax, name):
    pytest.skip(f"sj.{name} is not in this version")
  doc = inspect.getdoc(getattr(sharpjax, name))
  for needle in (".. math::", "Args:", "Returns:", ">>>",
                 "https://arxiv.org/abs/", " et al., "):
    assert needle in doc, f"sj.{name}'s docstring lacks {needle!r}"
