"""Sphinx configuration for the sharpjax documentation.

The site builds with no network: math is rendered to MathML at build time
(``_ext/sharpjax_math.py``), links into the Python, NumPy, JAX, optax, Flax and
chex documentation come from small inventories shipped in ``_inventories/``
(``_inventories/make_inventories.py`` writes them; ``_ext/sharpjax_xref.py``
maps private type-hint paths such as ``jaxlib._jax.Array`` to public names), notebooks are rendered
from their stored outputs (never executed here), and the command-line
reference is generated from the argument parser.
"""

import datetime
import os
import re
import sys

sys.path.insert(0, os.path.abspath(".."))
sys.path.insert(0, os.path.abspath("_ext"))

import sharpjax  # noqa: E402

project = "sharpjax"
author = "sharpjax developers"
# The year of the build, or of SOURCE_DATE_EPOCH for reproducible builds
# (Sphinx substitutes that too).
copyright = f"{datetime.date.today().year}, {author}"  # pylint: disable=redefined-builtin
release = version = sharpjax.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
    "sphinx.ext.intersphinx",
    "myst_nb",  # MyST Markdown pages and notebooks (it loads myst_parser)
    "sharpjax_math",
    "sharpjax_tables",
    "sharpjax_cli",
    "sharpjax_xref",
]
source_suffix = {".rst": "restructuredtext", ".md": "myst-nb",
                 ".ipynb": "myst-nb"}
exclude_patterns = ["_build", "_inventories", "**.ipynb_checkpoints"]
myst_enable_extensions = ["dollarmath", "amsmath", "substitution"]
myst_heading_anchors = 3


def _requirements():
  """Python and core dependency ranges, read from pyproject.toml."""
  text = open(os.path.join(os.path.dirname(__file__), "..",
                           "pyproject.toml")).read()
  python = re.search(r'requires-python\s*=\s*"([^"]+)"', text).group(1)
  block = re.search(r"dependencies\s*=\s*\[(.*?)\]", text, re.S).group(1)
  core = re.findall(r'"([^"]+)"', block)
  return python, core


def _installed(*names):
  from importlib import metadata  # pylint: disable=g-import-not-at-top
  return ", ".join(f"{n} {metadata.version(n)}" for n in names)


_python, _core = _requirements()
# `{{ name }}` in the Markdown pages: versions that can never drift from
# pyproject.toml and from what the site was built (and its examples run) with.
myst_substitutions = {
    "release": sharpjax.__version__,
    "python_requirement": _python,
    "core_requirements": ", ".join(f"`{r}`" for r in _core),
    "built_with": (f"Python {sys.version.split()[0]}, "
                   + _installed("jax", "optax", "flax", "chex", "numpy")),
}

# Math as MathML, rendered at build time (no MathJax, no CDN).
html_math_renderer = "mathml"

# Notebooks are stored executed (tests/test_notebooks.py runs them); the site
# shows their stored outputs and never runs them.
nb_execution_mode = "off"
nb_merge_streams = True

# Signatures: defaults as written in the source (`jnp.float32`, not
# "<class 'jax.numpy.float32'>"), types in the parameter descriptions.
autodoc_preserve_defaults = True
autodoc_typehints = "description"
autodoc_typehints_description_target = "documented_params"
autodoc_typehints_format = "short"
# Named unions and callables as their readers know them, not expanded to
# `Callable[[Array | ndarray | bool | number | ...], ...]`.
autodoc_type_aliases = {
    "base.ScalarOrSchedule": "float | jax.Array | optax.Schedule",
    "ScalarOrSchedule": "float | jax.Array | optax.Schedule",
    "optax.Schedule": "optax.Schedule",
}
autodoc_member_order = "bysource"
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False

# Offline intersphinx: each project's URL with a local inventory of the names
# these pages refer to (Python, NumPy, JAX, optax, Flax NNX and Linen). A name missing from an inventory stays plain text
# (`nitpicky` is off), so no network and no missing entry ever fails the build.
_INV = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_inventories")
intersphinx_mapping = {
    "python": ("https://docs.python.org/3/", os.path.join(_INV, "python.inv")),
    "numpy": ("https://numpy.org/doc/stable/", os.path.join(_INV, "numpy.inv")),
    "jax": ("https://docs.jax.dev/en/latest/", os.path.join(_INV, "jax.inv")),
    "optax": ("https://optax.readthedocs.io/en/latest/",
              os.path.join(_INV, "optax.inv")),
    "flax": ("https://flax.readthedocs.io/en/latest/",  # Flax NNX
             os.path.join(_INV, "flax.inv")),
    "flax_linen": ("https://flax-linen.readthedocs.io/en/latest/",
                   os.path.join(_INV, "flax_linen.inv")),
}
intersphinx_timeout = 1
intersphinx_disabled_reftypes = ["std:doc"]

html_theme = "furo"
html_title = f"sharpjax {release}"
html_static_path = ["_static"]
html_css_files = ["sharpjax.css"]
html_show_sphinx = True
