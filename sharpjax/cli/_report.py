"""Outputs of ``sharpjax compare``: strict JSON, the result table, PNG plots.

Every file is written atomically (a temporary file in the same folder, then
``os.replace``), so an interrupt leaves the previous version whole; JSON is
strict (non-finite numbers become ``null``), so any JSON parser reads it.

The table compares every method with SGD run with the same seeds: with the
same seed two methods start from the same weights and see the same batches in
the same order, so the per-seed differences are paired, and the interval of
their mean is Student's t with ``n - 1`` degrees of freedom.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import subprocess
import tempfile
import textwrap
import uuid
from typing import Any, Mapping, Optional, Sequence

import numpy as np

BASELINE = "sgd"

# One colour per registered method, fixed by name so a method keeps its colour
# in every plot: the baseline black, the methods of the default comparison the
# strongest hues, the other variants distinct hues of a qualitative palette.
COLORS = {
    "sgd": "#000000", "sam": "#1f77b4", "saf": "#d62728", "mesa": "#2ca02c",
    "asam": "#ff7f0e", "gsam": "#9467bd", "looksam": "#8c564b",
    "fsam": "#17becf", "msam": "#e377c2", "esam": "#7f7f7f",
    "ssam": "#bcbd22", "ausam": "#66d900", "sagm": "#f0b000",
    "momentum_sam": "#6a3d9a", "sampa": "#b15928", "late_sam": "#fb9a99",
}
_SPARE_COLORS = ("#6a3d9a", "#b15928", "#33a02c", "#fb9a99", "#a6cee3")

# Two-sided 95% quantiles of Student's t for 1..30 degrees of freedom.
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
         2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
         2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def versions() -> dict:
  """Versions of the libraries and of Python, and the git commit if any."""
  import importlib.metadata as md  # pylint: disable=g-import-not-at-top
  out = {"python": platform.python_version()}
  for pkg in ("sharpjax", "jax", "jaxlib", "optax", "flax", "numpy",
              "orbax-checkpoint"):
    try:
      out[pkg] = md.version(pkg)
    except md.PackageNotFoundError:
      out[pkg] = None
  try:
    here = os.path.dirname(os.path.abspath(__file__))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here,
                            capture_output=True, text=True, timeout=5)
    out["git_commit"] = commit.stdout.strip() or None
  except Exception:  # pylint: disable=broad-except
    out["git_commit"] = None
  return out


def device_info() -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  dev = jax.devices()[0]
  try:
    cores = len(os.sched_getaffinity(0))
  except AttributeError:  # pragma: no cover
    cores = os.cpu_count()
  return {"platform": dev.platform, "device_kind": dev.device_kind,
          "num_devices": jax.device_count(), "cpu_cores": cores,
          "machine": platform.machine(), "system": platform.system()}


def utc_now() -> str:
  return datetime.datetime.now(datetime.timezone.utc).isoformat(
      timespec="seconds")


# ---------------------------------------------------------------------------
# Files.
# ---------------------------------------------------------------------------


def check_out_dir(path: str, flag: str = "--out") -> str:
  """Creates ``path`` and checks a file can be written there.

  Raises ``ValueError`` naming ``flag`` when ``path`` is a file, lies under a
  file, or is not writable, so a command refuses it before any training.
  """
  if os.path.exists(path) and not os.path.isdir(path):
    raise ValueError(f"{flag} {path} is a file, not a directory.")
  try:
    os.makedirs(path, exist_ok=True)
    fd, probe = tempfile.mkstemp(dir=path, prefix=".sharpjax-write-test-")
    os.close(fd)
    os.remove(probe)
  except OSError as e:
    raise ValueError(f"{flag} {path} is not a writable directory "
                     f"({e.strerror or e}).") from None
  return path


def write_text(path: str, text: str) -> None:
  """Writes ``text`` to ``path`` atomically (temporary file + ``os.replace``)."""
  folder, name = os.path.split(os.path.abspath(path))
  # Not mkstemp: its files are private (0600); "x" creates with the umask's.
  tmp = os.path.join(folder, f".{name}.{os.getpid()}.{uuid.uuid4().hex[:8]}")
  try:
    with open(tmp, "x") as f:
      f.write(text)
    os.replace(tmp, path)
  except BaseException as e:
    if os.path.exists(tmp):
      os.remove(tmp)
    if isinstance(e, OSError):  # name the file meant, not the temporary one
      raise OSError(e.errno, f"cannot write ({e.strerror or e})",
                    path) from e
    raise


def strict(x: Any) -> Any:
  """``x`` as plain JSON values: NumPy to Python, non-finite floats to None.

  >>> strict({"a": float("nan"), "b": [np.float32(1.5), np.inf], "c": (1,)})
  {'a': None, 'b': [1.5, None], 'c': [1]}
  """
  if isinstance(x, Mapping):
    return {str(k): strict(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [strict(v) for v in x]
  if isinstance(x, np.ndarray):
    return strict(x.tolist())
  if isinstance(x, (np.floating, np.integer, np.bool_)):
    x = x.item()
  if isinstance(x, float) and not math.isfinite(x):
    return None
  if x is None or isinstance(x, (bool, int, float, str)):
    return x
  if hasattr(x, "tolist"):  # jax arrays
    return strict(np.asarray(x).tolist())
  return str(x)


def write_json(path: str, payload: Any) -> None:
  """Writes ``payload`` as strict JSON (``null`` for NaN/inf), atomically."""
  write_text(path, json.dumps(strict(payload), indent=1, allow_nan=False)
             + "\n")


# ---------------------------------------------------------------------------
# Statistics.
# ---------------------------------------------------------------------------


def t_quantile_975(df: int) -> float:
  """The 0.975 quantile of Student's t with ``df`` degrees of freedom.

  A table up to 30, then the Cornish-Fisher expansion (error < 1e-5).

  >>> t_quantile_975(2), round(t_quantile_975(60), 3)
  (4.303, 2.0)
  """
  if df < 1:
    raise ValueError(f"df must be >= 1, got {df}.")
  if df <= len(_T975):
    return _T975[df - 1]
  z = 1.959964
  return (z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z)
          / (96 * df**2) + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z)
          / (384 * df**3))


def paired_difference(a: Mapping[int, float],
                      b: Mapping[int, float]) -> dict:
  r"""Mean of ``a[s] - b[s]`` over the seeds both have, with a 95% t-interval.

  With :math:`d_s = a_s - b_s` over the :math:`n` common seeds, mean
  :math:`\bar d` and sample standard deviation :math:`s_d`, the interval is
  :math:`\bar d \pm t_{0.975,\,n-1}\, s_d / \sqrt{n}` (paired Student t:
  the seed fixes the initial weights and the data order, so the two runs of a
  seed share their luck and the pairs' differences are what varies).

  Returns ``{"mean", "low", "high", "n"}``; the interval is None for fewer
  than two pairs.

  >>> d = paired_difference({0: 0.80, 1: 0.78, 2: 0.79},
  ...                       {0: 0.75, 1: 0.74, 2: 0.76})
  >>> round(d["mean"], 4), round(d["low"], 4), round(d["high"], 4), d["n"]
  (0.04, 0.0152, 0.0648, 3)
  """
  seeds = sorted(set(a) & set(b))
  d = np.asarray([a[s] - b[s] for s in seeds], float)
  if d.size == 0:
    return {"mean": None, "low": None, "high": None, "n": 0}
  mean = float(d.mean())
  if d.size < 2:
    return {"mean": mean, "low": None, "high": None, "n": 1}
  half = t_quantile_975(d.size - 1) * float(d.std(ddof=1)) / math.sqrt(d.size)
  return {"mean": mean, "low": mean - half, "high": mean + half,
          "n": int(d.size)}


def _mean_std(xs: Sequence[Optional[float]]) -> tuple[float, float]:
  a = np.asarray([x for x in xs if x is not None], float)
  if a.size == 0:
    return float("nan"), float("nan")
  return float(a.mean()), float(a.std(ddof=1)) if a.size > 1 else 0.0


def summarize(results: Sequence[Any], methods: Sequence[str]) -> list[dict]:
  """One row per method with a run: the figures of the table.

  Accuracy, loss and sharpness are means (and sample std) over the method's
  finished seeds; ``delta_vs_sgd`` is :func:`paired_difference` of its test
  accuracy and SGD's; ``cost_ratio`` is the median time per step over seeds
  divided by SGD's; ``flops_per_step`` is XLA's FLOP count of one compiled
  step and ``flops_ratio`` its ratio to SGD's (the compute a step needs,
  which the time ratio approaches on a compute-bound accelerator); ``failed``
  lists the seeds whose loss became non-finite.
  """
  by = {m: [r for r in results if r.method == m] for m in methods}
  ok = {m: [r for r in rs if not r.failed] for m, rs in by.items()}
  acc_of = lambda m: {r.seed: r.final["test_accuracy"] for r in ok.get(m, ())
                      if "test_accuracy" in r.final}
  base_ms = _median([r.ms_per_step for r in ok.get(BASELINE, ())])
  base_flops = _median([r.flops_per_step for r in by.get(BASELINE, ())])
  rows = []
  for m in methods:
    rs, good = by[m], ok[m]
    if not rs:
      continue
    acc = _mean_std([r.final.get("test_accuracy") for r in good])
    loss = _mean_std([r.final.get("train_loss") for r in good])
    sharp = _mean_std([r.sharpness for r in good])
    trace = _mean_std([r.hessian_trace for r in good])
    ms = _median([r.ms_per_step for r in good])
    flops = _median([r.flops_per_step for r in rs])
    rows.append({
        "method": m, "seeds": len(good),
        "failed": [{"seed": r.seed, "error": r.failed}
                   for r in rs if r.failed],
        "test_accuracy_mean": acc[0], "test_accuracy_std": acc[1],
        "delta_vs_sgd": (None if m == BASELINE
                         else paired_difference(acc_of(m), acc_of(BASELINE))),
        "train_loss_mean": loss[0], "train_loss_std": loss[1],
        "ms_per_step": ms, "cost_ratio": ms / base_ms,
        "flops_per_step": flops, "flops_ratio": flops / base_flops,
        "compile_s": _mean([r.compile_s for r in rs]),
        "peak_rss_mib": max(r.peak_rss_mib for r in rs),
        "state_kib": _mean([r.state_bytes / 1024.0 for r in good
                            if r.state_bytes]),
        "top_eigenvalue_mean": sharp[0], "top_eigenvalue_std": sharp[1],
        "hessian_trace_mean": trace[0], "hessian_trace_std": trace[1],
        "hyper": rs[0].hyper,
    })
  return rows


def _median(xs) -> float:
  a = [x for x in xs if x is not None and np.isfinite(x)]
  return float(np.median(a)) if a else float("nan")


def _mean(xs) -> float:
  a = [x for x in xs if x is not None and np.isfinite(x)]
  return float(np.mean(a)) if a else float("nan")


# ---------------------------------------------------------------------------
# The table.
# ---------------------------------------------------------------------------


def _fmt(x, spec):
  return "n/a" if x is None or not np.isfinite(x) else format(x, spec)


def _times(x: Optional[float]) -> str:
  """A ratio as ``2.00x`` (``n/a`` when missing)."""
  return "n/a" if x is None or not np.isfinite(x) else f"{x:.2f}x"


def _points(x: Optional[float]) -> str:
  """A difference of accuracies in points, signed: ``+4.6``."""
  return "n/a" if x is None else f"{100 * x:+.1f}"


def _delta_cell(d: Optional[dict]) -> str:
  if d is None:
    return "(baseline)"
  if d["mean"] is None:
    return "n/a"
  if d["low"] is None:
    return f"{_points(d['mean'])} (1 seed)"
  return f"{_points(d['mean'])} [{_points(d['low'])}, {_points(d['high'])}]"


def markdown(rows: Sequence[dict], header: str = "") -> str:
  """The result table, then one summary line per method.

  Columns: test accuracy (mean ± std over seeds), its paired difference to
  SGD with a 95% interval, time per step as a multiple of SGD's, the FLOPs
  of one compiled step as a multiple of SGD's ("compute × SGD"), the top
  Hessian eigenvalue and the Hutchinson trace (when measured), the final
  train loss, time per step, and the state size.
  """
  sharp = any(np.isfinite(r["top_eigenvalue_mean"]) for r in rows)
  traced = any(np.isfinite(r["hessian_trace_mean"]) for r in rows)
  cols = ["method", "test acc %", "Δ vs SGD, points [95% CI]",
          "step time × SGD", "compute × SGD"]
  cols += ["λ_max"] * sharp + ["tr H"] * traced
  cols += ["train loss", "ms / step", "state KiB"]
  lines = [f"| {' | '.join(cols)} |",
           "|" + "|".join(["---"] + ["---:"] * (len(cols) - 1)) + "|"]
  for r in rows:
    if r["failed"]:
      failed = f"failed ({len(r['failed'])} of " \
               f"{len(r['failed']) + r['seeds']} seeds)"
      lines.append(f"| {r['method']} | {failed} |"
                   + " |" * (len(cols) - 2))
      continue
    cells = [r["method"],
             f"{_fmt(100 * r['test_accuracy_mean'], '.2f')} ± "
             f"{_fmt(100 * r['test_accuracy_std'], '.2f')}",
             _delta_cell(r["delta_vs_sgd"]),
             _fmt(r["cost_ratio"], ".2f") + "x",
             _times(r.get("flops_ratio"))]
    if sharp:
      cells.append(_fmt(r["top_eigenvalue_mean"], ".2f"))
    if traced:
      cells.append(_fmt(r["hessian_trace_mean"], ".1f"))
    cells += [_fmt(r["train_loss_mean"], ".4f"), _fmt(r["ms_per_step"], ".2f"),
              _fmt(r["state_kib"], ".1f")]
    lines.append(f"| {' | '.join(cells)} |")
  text = "\n".join(lines) + "\n\n" + "\n".join(summary_lines(rows)) + "\n"
  return (header.rstrip() + "\n\n" + text) if header else text


def summary_lines(rows: Sequence[dict]) -> list[str]:
  """``- saf: +4.6 points over sgd [+3.1, +6.1] at 1.01x its step time``."""
  out = []
  for r in rows:
    m, d = r["method"], r["delta_vs_sgd"]
    if r["failed"]:
      f = r["failed"][0]
      out.append(f"- {m}: failed on seed {f['seed']}: {f['error']}")
    elif d is not None and d["mean"] is not None:
      ci = ("1 seed, no interval" if d["low"] is None else
            f"95% CI {_points(d['low'])} to {_points(d['high'])} over "
            f"{d['n']} paired seeds")
      out.append(f"- {m}: {_points(d['mean'])} points over {BASELINE} "
                 f"({ci}) at {_fmt(r['cost_ratio'], '.2f')}x its step time")
  return out


# ---------------------------------------------------------------------------
# Plots.
# ---------------------------------------------------------------------------


def color_of(method: str) -> str:
  """The method's fixed colour (:data:`COLORS`; a spare one for others)."""
  if method in COLORS:
    return COLORS[method]
  return _SPARE_COLORS[sum(map(ord, method)) % len(_SPARE_COLORS)]


def seeds_phrase(n: int) -> str:
  """``"1 seed"``, ``"3 seeds"``."""
  return f"{n} seed" + ("" if n == 1 else "s")


def _curves(results, methods, key):
  out = {}
  for m in methods:
    rs = [r for r in results if r.method == m and r.history]
    if not rs:
      continue
    n = min(len(r.history) for r in rs)
    a = np.asarray([[h[key] for h in r.history[:n]] for r in rs], float)
    out[m] = (np.arange(1, n + 1), a.mean(0), a.std(0))
  return out


def label_points(ax, xs, ys, labels, colors, yerr=None) -> None:
  """Annotates each point with its label where it overlaps nothing drawn.

  For each point (in order) the candidate positions are rings of growing
  distance around it; the first whose text box overlaps no other label, no
  marker or error bar (``yerr``: half-heights, data units) and stays inside
  the axes is taken, tied to its point by a thin line when it is not next to
  it. Call it once the figure's layout is final.
  """
  from matplotlib.text import Text  # pylint: disable=g-import-not-at-top
  from matplotlib.transforms import Bbox  # pylint: disable=g-import-not-at-top
  fig = ax.figure
  fig.canvas.draw()
  renderer = fig.canvas.get_renderer()
  inside = ax.get_window_extent(renderer)
  pad = 5 * fig.dpi / 72  # a marker's half-width, in pixels
  yerr = [0.0] * len(xs) if yerr is None else yerr
  taken = []
  for x, y, e in zip(xs, ys, yerr):
    (x0, y0), (x1, y1) = ax.transData.transform([(x, y - e), (x, y + e)])
    taken.append(Bbox.from_extents(x0 - pad, y0 - pad, x1 + pad, y1 + pad))
  angles = (0, 180, 30, -30, 150, -150, 90, -90, 60, -60, 120, -120)
  candidates = [(r, a) for r in (7, 18, 30, 44, 60, 80) for a in angles]
  for x, y, text, color in zip(xs, ys, labels, colors):
    for radius, angle in candidates:
      dx = radius * math.cos(math.radians(angle))
      dy = radius * math.sin(math.radians(angle))
      t = ax.annotate(
          text, (x, y), xytext=(dx, dy), textcoords="offset points",
          ha="left" if dx > 1 else "right" if dx < -1 else "center",
          va="bottom" if dy > 1 else "top" if dy < -1 else "center",
          fontsize=8, color=color,
          arrowprops=(dict(arrowstyle="-", color=color, lw=0.6, alpha=0.6,
                           shrinkA=0, shrinkB=4) if radius > 7 else None))
      t.update_positions(renderer)
      box = Text.get_window_extent(t, renderer).padded(2)  # the text alone
      if (inside.x0 <= box.x0 and box.x1 <= inside.x1 and inside.y0 <= box.y0
          and box.y1 <= inside.y1 and not any(box.overlaps(b) for b in taken)):
        taken.append(box)
        break
      t.remove()
    else:  # nowhere free: beside the point, overlapping
      ax.annotate(text, (x, y), xytext=(6, 0), textcoords="offset points",
                  va="center", fontsize=8, color=color)


def plot(results: Sequence[Any], rows: Sequence[dict], methods: Sequence[str],
         out_dir: str, title: str = "") -> list[str]:
  """Writes accuracy.png, train_loss.png, tradeoff.png and compare.png."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  from matplotlib.ticker import FormatStrFormatter  # pylint: disable=g-import-not-at-top
  from matplotlib.ticker import MaxNLocator  # pylint: disable=g-import-not-at-top

  acc = _curves(results, methods, "test_accuracy")
  loss = _curves(results, methods, "train_loss")
  points = [r for r in rows
            if not r["failed"] and np.isfinite(r["cost_ratio"])]

  def curves(ax, data, ylabel, scale=1.0, log=False):
    for m, (x, mu, sd) in data.items():
      ax.plot(x, scale * mu, label=m, color=color_of(m),
              lw=2.0 if m == BASELINE else 1.4)
      ax.fill_between(x, scale * (mu - sd), scale * (mu + sd),
                      color=color_of(m), alpha=0.12, lw=0)
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(ylabel)
    if log:
      ax.set_yscale("log")
      plain = FormatStrFormatter("%.2g")  # 0.6, 1, 2: not 6x10^-1
      ax.yaxis.set_major_formatter(plain)
      ax.yaxis.set_minor_formatter(plain)
    ax.grid(alpha=0.3)

  def tradeoff(ax):
    for r in points:
      ax.errorbar(r["cost_ratio"], 100 * r["test_accuracy_mean"],
                  yerr=100 * r["test_accuracy_std"], fmt="o", ms=6,
                  color=color_of(r["method"]), capsize=3)
    ax.margins(x=0.25, y=0.15)
    ax.set_xlabel("time per step / SGD's (same run)")
    ax.set_ylabel("test accuracy % (mean ± std)")
    ax.grid(alpha=0.3)

  def label_tradeoff(ax):
    label_points(ax, [r["cost_ratio"] for r in points],
                 [100 * r["test_accuracy_mean"] for r in points],
                 [r["method"] for r in points],
                 [color_of(r["method"]) for r in points],
                 [100 * r["test_accuracy_std"] for r in points])

  written = []

  def save(fig, name, dpi=90):
    path = os.path.join(out_dir, name)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    written.append(path)

  legend_cols = 2 if len(methods) > 6 else 1
  short_title = textwrap.fill(title, 80)  # the single plots are narrower
  for name, data, ylabel, scale, log in (
      ("accuracy.png", acc, "test accuracy (%)", 100.0, False),
      ("train_loss.png", loss, "train loss (mean over the epoch)", 1.0, True)):
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    curves(ax, data, ylabel, scale, log)
    ax.legend(fontsize=7, ncol=legend_cols)
    ax.set_title(short_title, fontsize=9)
    fig.tight_layout()
    save(fig, name)

  fig, ax = plt.subplots(figsize=(6.4, 4.2))
  tradeoff(ax)
  ax.set_title(short_title, fontsize=9)
  fig.tight_layout()
  label_tradeoff(ax)
  save(fig, "tradeoff.png")

  fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
  curves(axes[0], acc, "test accuracy (%)", 100.0)
  curves(axes[1], loss, "train loss (mean over the epoch)", log=True)
  tradeoff(axes[2])
  axes[0].set_title("test accuracy per epoch", fontsize=10)
  axes[1].set_title("train loss per epoch", fontsize=10)
  axes[2].set_title("final test accuracy vs cost", fontsize=10)
  handles, labels = axes[0].get_legend_handles_labels()
  fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 13),
             fontsize=9, frameon=False)
  if title:
    fig.suptitle(title, fontsize=11)
  fig.tight_layout(rect=(0, 0.06, 1, 1))
  label_tradeoff(axes[2])
  save(fig, "compare.png", dpi=80)
  return written
