"""The documentation builds offline without warnings, renders what it shows
(math, notebooks, the command line, benchmark tables) and covers every public
name; the getting-started code runs; the choosing guide agrees with its
numbers."""

from __future__ import annotations

import argparse
import html as htmllib
import importlib
import inspect
import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

import sharpjax

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(DOCS / "_ext"))

# Every SAM-family and trajectory constructor documents its update rule.
TRANSFORMATIONS = ["sam", "asam", "gsam", "looksam", "fsam", "msam", "esam",
                   "ssam", "ausam", "sagm", "saf", "mesa", "momentum_sam",
                   "sampa", "late_phase"]


def public_modules():
  """sharpjax and its public subpackages (those not starting with _)."""
  import pkgutil  # pylint: disable=g-import-not-at-top
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


def offline_env():
  """The environment of a build with no network: any HTTP(S) request goes to
  a closed local port and fails at once."""
  env = dict(os.environ)
  for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY",
              "all_proxy", "ALL_PROXY"):
    env[var] = "http://127.0.0.1:9"
  for var in ("no_proxy", "NO_PROXY"):
    env.pop(var, None)
  env["PYTHONPATH"] = os.pathsep.join(
      [str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep)
                     if p])
  return env


class Site:
  """The built HTML site."""

  def __init__(self, path: pathlib.Path):
    self.path = path

  def page(self, name: str) -> str:
    return (self.path / name).read_text()

  def pages(self):
    return sorted(self.path.rglob("*.html"))

  def all_html(self) -> str:
    return "\n".join(p.read_text() for p in self.pages())

  def reference_html(self) -> str:
    """The API reference and method pages (not the highlighted sources)."""
    return "\n".join(p.read_text() for p in self.pages()
                     if p.parent.name in ("api", "methods"))


def _build_site(out: pathlib.Path) -> None:
  proc = subprocess.run(
      [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b",
       "html", str(DOCS), str(out)],
      capture_output=True, text=True, cwd=ROOT, env=offline_env())
  assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.fixture(scope="session")
def site(tmp_path_factory):
  """The site, built once per test session with warnings as errors and no
  network; under pytest-xdist the workers share one build."""
  pytest.importorskip("sphinx")
  pytest.importorskip("myst_nb")
  pytest.importorskip("latex2mathml")
  if os.environ.get("PYTEST_XDIST_WORKER") and os.name == "posix":
    import fcntl  # pylint: disable=g-import-not-at-top
    shared = tmp_path_factory.getbasetemp().parent  # common to the workers
    out, done = shared / "docs-html", shared / "docs-html.ok"
    with open(shared / "docs-html.lock", "w") as lock:
      fcntl.flock(lock, fcntl.LOCK_EX)  # one worker builds, the others wait
      if not done.exists():
        _build_site(out)
        done.touch()
    return Site(out)
  out = tmp_path_factory.mktemp("html")
  _build_site(out)
  return Site(out)


def _text(html: str) -> str:
  return htmllib.unescape(re.sub(r"<[^>]+>", "", html))


# ---------------------------------------------------------------------------
# The reference
# ---------------------------------------------------------------------------


def test_every_public_name_has_a_reference_entry(site):
  html = site.all_html()
  missing = []
  for module_name in public_modules():
    for name in public_names(module_name):
      if f'id="{module_name}.{name}"' not in html:
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


def test_signatures_show_defaults_as_written_types_and_source(site):
  saf = site.page("methods/saf.html")
  # The default as written in the source, not its repr.
  assert re.search(r'bank_dtype.{0,200}<span class="pre">jnp\.float32</span>',
                   saf, re.S), "bank_dtype's default is not shown as written"
  assert "&lt;class" not in site.reference_html(), "a default shows as <class>"
  # Types in the parameter list, linked to Python's and optax's docs.
  assert re.search(r"<strong>num_examples</strong> \(<a [^>]*"
                   r'href="https://docs.python.org/3/library/functions.html'
                   r'#int"', saf), "num_examples' type is missing"
  assert ("https://optax.readthedocs.io/en/latest/api/generated/"
          "optax.GradientTransformationExtraArgs.html") in saf
  sam = site.page("methods/sam.html")
  assert "https://docs.jax.dev/en/latest/_autosummary/jax.Array.html" in sam
  # A private module path never shows in a type.
  assert "jaxlib._jax" not in _text(site.reference_html())
  assert "optax._src" not in _text(site.reference_html())
  # [source] links (viewcode) into the highlighted module.
  assert 'href="../_modules/sharpjax/_src/saf.html#saf"' in saf
  assert (site.path / "_modules/sharpjax/_src/saf.html").exists()


def test_guides_link_inline_names_to_the_reference(site):
  scaling = site.page("guides/scaling.html")
  assert ('href="../api/training.html#sharpjax.training.make_trainer"'
          in scaling)
  assert ('href="../api/training.html#sharpjax.training.Trainer.shard_batch"'
          in scaling)
  saf_mesa = site.page("guides/saf_mesa.html")
  assert 'href="../methods/saf.html#sharpjax.saf"' in saf_mesa
  assert 'href="../api/core.html#sharpjax.trajectory_penalty"' in saf_mesa


# ---------------------------------------------------------------------------
# Offline: math rendered at build time, no remote script
# ---------------------------------------------------------------------------


MATH_PAGES = [f"methods/{n}.html" for n in TRANSFORMATIONS] + [
    "guides/saf_mesa.html"]


@pytest.mark.parametrize("page", MATH_PAGES)
def test_math_is_rendered_to_mathml(site, page):
  html = site.page(page)
  assert html.count("<math") >= 1, f"{page} has no rendered math"
  body = re.sub(r"<(pre|code)[^>]*>.*?</\1>", "", html, flags=re.S)
  body = re.sub(r"<script.*?</script>", "", body, flags=re.S)
  for raw in (r"\(", r"\)", r"\[", r"\]", "$$"):
    assert raw not in _text(body), f"{page} shows raw TeX {raw!r}"


def test_no_page_loads_a_remote_script_or_stylesheet(site):
  for page in site.pages():
    html = page.read_text()
    remote = re.findall(r'<script[^>]+src="(https?:[^"]+)"', html)
    remote += re.findall(
        r'<link[^>]+rel="stylesheet"[^>]+href="(https?:[^"]+)"', html)
    assert not remote, f"{page.name} loads {remote}"
    scripts = " ".join(re.findall(r"<script[^>]*>", html)).lower()
    assert "mathjax" not in scripts, f"{page.name} loads MathJax"


def test_tex_to_mathml_converts_and_refuses_unknown_commands():
  sharpjax_math = pytest.importorskip("sharpjax_math")
  out = sharpjax_math.tex_to_mathml(
      r"\epsilon = \rho \frac{g}{\|g\|_2}", display=True)
  assert out.startswith("<math") and 'display="block"' in out
  assert "<mfrac>" in out and "<mi>&#x003C1;</mi>" in out  # rho
  # Line breaks get an environment; text-mode underscores lose the backslash.
  out = sharpjax_math.tex_to_mathml(r"a &= b \\ c &= \text{x\_y}", True)
  assert "<mtable" in out and "x_y" in out
  assert "𝔼" in sharpjax_math.tex_to_mathml(r"\mathbb E", False)
  with pytest.raises(Exception):
    sharpjax_math.tex_to_mathml(r"\notacommand{x}", False)


# ---------------------------------------------------------------------------
# Pages a newcomer reads first
# ---------------------------------------------------------------------------


def test_getting_started_comes_first_and_the_entry_page_leads_in(site):
  index_md = (DOCS / "index.md").read_text()
  toctrees = re.findall(r"```\{toctree\}\n(.*?)```", index_md, re.S)
  first = [l for l in toctrees[0].splitlines()
           if l.strip() and not l.startswith(":")][0]
  assert first.strip() == "getting_started"
  index = site.page("index.html")
  for method in TRANSFORMATIONS:  # the Methods list links every method page
    assert f'href="methods/{method}.html"' in index, method
  for target in ("getting_started.html", "notebooks/index.html",
                 "examples.html", "cli.html"):
    assert f'href="{target}"' in index, target
  assert "pip install sharpjax" not in _text(site.all_html())
  footer = re.search(r'<div class="copyright">(.*?)</div>', index, re.S)
  assert footer and re.search(r"20\d\d, sharpjax developers",
                              _text(footer.group(1))), "footer lacks holder"


def test_examples_page_shows_the_quickstart_script(site):
  html = _text(site.page("examples.html"))
  assert "def loss_fn(params, batch):" in html
  assert "python examples/quickstart.py" in html


def test_changelog_stability_and_license_pages(site):
  assert (ROOT / "LICENSE").read_text().lstrip().startswith("Apache License")
  changelog = _text(site.page("changelog.html"))
  assert "Unreleased" in changelog and "0.1.0" in changelog
  assert "Apache License" in _text(site.page("license.html"))
  stability = _text(site.page("stability.html"))
  for name in ("sharpjax.sam", "sharpjax.saf", "sharpjax.mesa",
               "sharpjax.trajectory_penalty", "sharpjax.diagnostics",
               "sharpjax.training.make_trainer"):
    assert name in stability, name


def _code_blocks(page: str):
  text = (DOCS / page).read_text()
  return re.findall(r"```python\n(.*?)```", text, re.S)


DOC_CODE = [(page, i) for page in ("index.md", "getting_started.md")
            for i in range(len(_code_blocks(page)))]


@pytest.mark.parametrize("page,index", DOC_CODE,
                         ids=[f"{p}-{i}" for p, i in DOC_CODE])
def test_documentation_code_blocks_run(page, index, tmp_path):
  """Each Python block of the entry and getting-started pages runs on its
  own, as a reader would paste it, and its model learns."""
  code = _code_blocks(page)[index]
  env = offline_env()
  env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="")
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True,
                        text=True, cwd=tmp_path, env=env, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  for accuracy in re.findall(r"test accuracy (\d\.\d+)", proc.stdout):
    assert float(accuracy) > 0.5, proc.stdout  # chance is 0.25 or 0.1


def test_getting_started_has_the_sam_and_saf_loops():
  blocks = _code_blocks("getting_started.md")
  assert any("sj.sam(" in b and "for epoch in range" in b for b in blocks)
  assert any("sj.saf(" in b and "trajectory_penalty" in b
             and "for epoch in range" in b for b in blocks)
  assert any("make_trainer" in b and "load_mnist1d" in b for b in blocks)


# ---------------------------------------------------------------------------
# Notebooks, rendered from their stored outputs
# ---------------------------------------------------------------------------


NOTEBOOKS = sorted(p.stem for p in (ROOT / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebooks_are_rendered_with_their_outputs(site, name):
  nbformat = pytest.importorskip("nbformat")
  notebook = nbformat.read(ROOT / "notebooks" / f"{name}.ipynb", as_version=4)
  images = sum("image/png" in o.get("data", {})
               for c in notebook.cells if c.cell_type == "code"
               for o in c.outputs)
  streams = [o.text for c in notebook.cells if c.cell_type == "code"
             for o in c.outputs if o.output_type == "stream"]
  html = site.page(f"notebooks/{name}.html")
  assert html.count("<img") >= images
  assert "cell_output" in html
  text = _text(html)
  for stream in streams:  # every printed line is on the page
    for line in stream.splitlines()[:3]:
      if line.strip():
        words = line.split()[:3]
        assert " ".join(words) in " ".join(text.split()), line
  assert "What this shows" in text


# ---------------------------------------------------------------------------
# The command line, generated from its parser
# ---------------------------------------------------------------------------


def _option_id(prog: str, option: str) -> str:
  """The anchor Sphinx gives `.. option::` (positional arguments: arg-NAME)."""
  if not option.startswith("-"):
    option = "arg-" + option
  return "cmdoption-" + re.sub(r"[^\w]+", "-", f"{prog} {option}".lower()
                               ).strip("-")


def test_cli_reference_lists_every_option_of_the_parser(site):
  from sharpjax.cli import _main  # pylint: disable=g-import-not-at-top
  html = site.page("cli.html")
  parser = _main.build_parser()
  sub = next(a for a in parser._actions  # pylint: disable=protected-access
             if isinstance(a, argparse._SubParsersAction))  # pylint: disable=protected-access
  assert set(sub.choices) >= {"compare", "train", "measure"}
  missing = []
  for name, subparser in sub.choices.items():
    assert f'id="cli-{name}"' in html, name
    for action in subparser._actions:  # pylint: disable=protected-access
      if isinstance(action, argparse._HelpAction):  # pylint: disable=protected-access
        continue
      option = action.option_strings[-1] if action.option_strings else action.dest
      if f'id="{_option_id(subparser.prog, option)}"' not in html:
        missing.append(f"{subparser.prog} {option}")
  assert not missing, f"options missing from the CLI reference: {missing}"


def test_cli_reference_follows_the_parser():
  """A flag added to a parser appears in the generated reference."""
  sharpjax_cli = pytest.importorskip("sharpjax_cli")
  parser = argparse.ArgumentParser(prog="tool", description="A tool.")
  sub = parser.add_subparsers(dest="command")
  run = sub.add_parser("run", help="run it")
  run.add_argument("--brand-new-flag", type=int, default=3,
                   help="a flag added later, see `tool run` (default 3)")
  run.add_argument("--mode", choices=("a", "b"), default="a", help="mode")
  rst = "\n".join(sharpjax_cli.parser_rst(parser))
  assert ".. program:: tool run" in rst
  assert ".. option:: --brand-new-flag BRAND_NEW_FLAG" in rst
  assert "``tool run``" in rst and "(default 3)" in rst
  assert "(one of: a, b)" in rst


# ---------------------------------------------------------------------------
# Benchmark tables and numbers, generated from the JSON
# ---------------------------------------------------------------------------


def _results(name):
  return json.loads((RESULTS / name).read_text())


def _row(name, **match):
  rows = [r for r in _results(name)["results"]
          if all(r.get(k) == v for k, v in match.items())]
  assert len(rows) == 1, (name, match, len(rows))
  return rows[0]


def _tables(html: str):
  """The benchmark tables of a page: a list of rows of cell texts."""
  tables = []
  for table in re.findall(r'<table class="[^"]*benchmark-table.*?</table>',
                          html, re.S):
    rows = []
    for tr in re.findall(r"<tr.*?</tr>", table, re.S):
      rows.append([" ".join(_text(c).split()) for c in
                   re.findall(r"<t[dh][^>]*>(.*?)</t[dh]>", tr, re.S)])
    tables.append(rows)
  return tables


def test_table_formats():
  tables = pytest.importorskip("sharpjax_tables")
  fmt = tables.format_value
  assert fmt(969310976, "mib") == "924.4"
  assert fmt(4602.889, "ms") == "4,603" and fmt(0.7731, "ms") == "0.77"
  assert fmt(1, "ratio") == "1.00x" and fmt(1.981, "ratio") == "1.98x"
  assert fmt(0.9063, "pct", std=0.0012) == "90.6 ± 0.1"
  assert fmt(4602.0, "sig") == "4,602" and fmt(0.018, "sig") == "0.0180"
  assert fmt(None, "ratio") == ""
  with pytest.raises(ValueError):
    fmt(1.0, "percent")


def test_choosing_guide_tables_are_generated_from_the_json(site):
  tables_ext = pytest.importorskip("sharpjax_tables")
  fmt = tables_ext.format_value
  tables = _tables(site.page("guides/choosing.html"))
  assert len(tables) == 4
  for table, name in zip(tables[:2], ("overhead.json",
                                      "overhead-resnet18.json")):
    compute = name == "overhead.json"  # the ResNet-18 table predates it
    assert table[0] == ["method", "ms / step", "× SGD"] + [
        "compute × SGD"] * compute + ["XLA temp MiB", "note"]
    body = {row[0]: row for row in table[1:]}
    results = _results(name)["results"]
    assert len(body) == len(results)
    for r in results:
      assert body[r["method"]][1:-1] == [
          fmt(r["ms_per_step"], "ms"), fmt(r["ratio_to_sgd"], "ratio")] + [
              fmt(r.get("flops_ratio"), "ratio")] * compute + [
                  fmt(r["temp_bytes"], "mib")], r["method"]
  for table, name in zip(tables[2:], ("generalization.json",
                                      "generalization-width25.json")):
    assert table[0] == ["method", "test acc % (clean)",
                        "test acc % (20% noise)", "λ_max (20% noise)",
                        "tr H (20% noise)", "× SGD"]
    body = {row[0]: row for row in table[1:]}
    for method in _results(name)["meta"]["methods"]:
      clean = _row(name, method=method, noise=0.0)
      noisy = _row(name, method=method, noise=0.2)
      assert body[method][1:] == [
          fmt(clean["test_accuracy_mean"], "pct", clean["test_accuracy_std"]),
          fmt(noisy["test_accuracy_mean"], "pct", noisy["test_accuracy_std"]),
          fmt(noisy["top_eigenvalue_mean"], "sig"),
          fmt(noisy["hessian_trace_mean"], "sig"),
          fmt(noisy["cost_ratio"], "ratio")], method
  text = _text(site.page("guides/choosing.html"))
  meta = _results("generalization.json")["meta"]
  assert f"width {meta['width']}, {meta['epochs']} epochs" in text
  # No raw JSON keys, exponents or bare byte counts.
  for raw in ("ms_per_step", "ratio_to_sgd", "temp_bytes", "e+0"):
    assert raw not in text, raw


def _ratio(name, method):
  return _row(name, method=method)["ratio_to_sgd"]


def _acc(name, method, noise):
  r = _row(name, method=method, noise=noise)
  return r["test_accuracy_mean"], r["test_accuracy_std"]


TWO_PASS = ["sam", "asam", "gsam", "looksam", "fsam", "msam", "esam", "ssam",
            "ausam", "sagm"]


def test_choosing_guide_claims_agree_with_the_benchmarks():
  """Each sentence of docs/guides/choosing.md whose truth depends on a
  measured number, checked against the JSON it quotes. When a benchmark is
  rerun and one fails, reword that sentence."""
  cpu, resnet = "overhead.json", "overhead-resnet18.json"
  wide, narrow = "generalization.json", "generalization-width25.json"
  failures = []

  def claim(sentence, holds):
    if not holds:
      failures.append(sentence)

  claim("'[SAM] costs two forward-backward passes per step, and so do ASAM, "
        "GSAM, F-SAM, SAGM and (on a CPU) ESAM, within about a tenth of it'",
        all(abs(_ratio(cpu, m) / _ratio(cpu, "sam") - 1) < 0.1 for m in
            ("asam", "gsam", "fsam", "sagm", "esam")))
  claim("'SSAM adds its Fisher mask on top' (and costs 'about what SAM "
        "costs')", 0.95 < _ratio(cpu, "ssam") / _ratio(cpu, "sam") < 1.3)
  claim("'SAM ... as much as optax.contrib.sam'",
        abs(_ratio(cpu, "sam") / _ratio(cpu, "optax.contrib.sam (opaque)")
            - 1) < 0.1)
  claim("'SAF ... at SGD's cost' (CNN and ResNet-18 ratios below 1.15x)",
        _ratio(cpu, "saf") < 1.15 and _ratio(resnet, "saf") < 1.15)
  claim("'MESA, which adds one teacher forward' (between SAF and SAM)",
        _ratio(cpu, "saf") <= _ratio(cpu, "mesa") < _ratio(cpu, "sam"))
  claim("'LookSAM ... On the CPU CNN it did not [cost less than SAM]'",
        _ratio(cpu, "looksam") >= 0.95 * _ratio(cpu, "sam"))
  claim("'mSAM ... is for m-sharpness, not for speed'",
        _ratio(cpu, "msam") > _ratio(cpu, "sam"))
  claim("'AUSAM runs both passes on a sampled half' (cheaper than SAM)",
        _ratio(cpu, "ausam") < _ratio(cpu, "sam"))
  for run in (wide, narrow):
    sgd_eig = _row(run, method="sgd", noise=0.2)["top_eigenvalue_mean"]
    claim(f"'their top Hessian eigenvalue ends close to SGD's or above it' "
          f"({run})", all(_row(run, method=m, noise=0.2)["top_eigenvalue_mean"]
                          >= 0.9 * sgd_eig for m in ("saf", "mesa")))
    claim(f"'every two-pass method's [λ_max] ends below it' ({run})",
          all(_row(run, method=m, noise=0.2)["top_eigenvalue_mean"] < sgd_eig
              for m in TWO_PASS))
  claim("'SGD's final training loss is [small] even with 20% of the labels "
        "wrong' (width 100)",
        _row(wide, method="sgd", noise=0.2)["train_loss_mean"] < 0.1)
  sgd_clean, _ = _acc(wide, "sgd", 0.0)
  gains = [_acc(wide, m, 0.0)[0] - sgd_clean for m in TWO_PASS + ["saf", "mesa"]]
  claim("'On clean labels every method ends above SGD, by up to about three "
        "points'", min(gains) > 0 and 0.02 < max(gains) < 0.04)
  sgd_noisy, sgd_std = _acc(wide, "sgd", 0.2)
  for m in ("saf", "mesa"):
    mean, std = _acc(wide, m, 0.2)
    claim(f"'{m} end[s] above SGD by more than the spread over seeds'",
          mean - sgd_noisy > max(std, sgd_std))
  for m in ("saf", "mesa"):
    claim(f"'their λ_max and tr H are higher than SGD's' ({m}, width 100)",
          all(_row(wide, method=m, noise=0.2)[k]
              > _row(wide, method="sgd", noise=0.2)[k]
              for k in ("top_eigenvalue_mean", "hessian_trace_mean")))
  mean, std = _acc(wide, "sam", 0.2)
  claim("'SAM is ahead of SGD by less than its spread over seeds'",
        0 < mean - sgd_noisy < max(std, sgd_std))
  claim("'mSAM and AUSAM gain about three points'",
        all(0.02 < _acc(wide, m, 0.2)[0] - sgd_noisy < 0.045
            for m in ("msam", "ausam")))
  looksam = _acc(wide, "looksam", 0.2)[0]
  claim("'LookSAM ... far above every other method' (width 100, 20% noise)",
        all(looksam - _acc(wide, m, 0.2)[0] > 0.05
            for m in TWO_PASS + ["saf", "mesa", "sgd"] if m != "looksam"))
  claim("'because it does not fit the noisy labels' (train loss > 0.5)",
        _row(wide, method="looksam", noise=0.2)["train_loss_mean"] > 0.5)
  for noise in (0.0, 0.2):
    sgd_mean, sgd_std = _acc(narrow, "sgd", noise)
    claim(f"'no method beats SGD by more than about one standard deviation' "
          f"(width 25, noise {noise})",
          all(_acc(narrow, m, noise)[0] - sgd_mean
              <= 1.25 * max(_acc(narrow, m, noise)[1], sgd_std)
              for m in TWO_PASS + ["saf", "mesa"]))
    claim(f"'LookSAM ... is the worst here' (width 25, noise {noise})",
          _acc(narrow, "looksam", noise)[0] == min(
              _acc(narrow, m, noise)[0] for m in TWO_PASS + ["saf", "mesa",
                                                             "sgd"]))
  sgd_clean, _ = _acc(narrow, "sgd", 0.0)
  claim("'Here SAF and MESA end below SGD on clean labels' (width 25)",
        all(_acc(narrow, m, 0.0)[0] < sgd_clean for m in ("saf", "mesa")))
  claim("'ESAM ends about ten points below SGD with noise' (width 25)",
        0.07 < _acc(narrow, "sgd", 0.2)[0] - _acc(narrow, "esam", 0.2)[0]
        < 0.13)
  assert not failures, ("docs/guides/choosing.md says what the benchmark "
                        "JSON no longer shows:\n" + "\n".join(failures))


def test_reference_shows_exported_names_and_each_method_once_in_the_sidebar(
    site):
  """A private path of an exported type (a state's field typed
  ``sharpjax._src.perturbed.Diagnostics``) reads as ``sharpjax.Diagnostics``;
  the method pages are listed once in the navigation."""
  shown = []
  for page in site.pages():
    if page.parent.name not in ("api", "methods"):
      continue
    for path in set(re.findall(r"sharpjax\._src\.[\w.]+",
                               _text(page.read_text()))):
      if hasattr(sharpjax, path.rsplit(".", 1)[1]):
        shown.append(f"{page.name}: {path}")
  assert not shown, shown
  html = site.page("index.html")
  start = html.index('class="sidebar-tree"')
  sidebar = html[start:html.index("<article", start)]
  for name in TRANSFORMATIONS:
    assert sidebar.count(f'href="methods/{name}.html"') == 1, name


def test_cli_reference_lists_the_presets_one_per_item(site):
  """The presets `compare --help` prints one per line are a list on the
  page, not one run-on sentence."""
  from sharpjax.cli import _setup  # pylint: disable=g-import-not-at-top
  html = site.page("cli.html")
  for name in _setup.PRESETS:
    assert re.search(r'<li><p><code [^>]*><span class="pre">'
                     + re.escape(name) + "</span></code>", html), name
