"""Outputs of ``sharpjax compare``: results.json, a markdown table, PNG plots."""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
from typing import Any, Sequence

import numpy as np


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


def _mean_std(xs: Sequence[float]) -> tuple[float, float]:
  a = np.asarray([x for x in xs if x is not None], float)
  if a.size == 0:
    return float("nan"), float("nan")
  return float(a.mean()), float(a.std(ddof=1)) if a.size > 1 else 0.0


def summarize(results: Sequence[Any], methods: Sequence[str]) -> list[dict]:
  """One row per method: every figure of the table (means over seeds)."""
  by = {m: [r for r in results if r.method == m] for m in methods}
  sgd_ms = (np.median([r.ms_per_step for r in by["sgd"]])
            if by.get("sgd") else float("nan"))
  rows = []
  for m in methods:
    rs = by[m]
    if not rs:
      continue
    acc = _mean_std([r.final.get("test_accuracy") for r in rs])
    loss = _mean_std([r.final.get("train_loss") for r in rs])
    sharp = _mean_std([r.sharpness for r in rs])
    trace = _mean_std([r.hessian_trace for r in rs])
    ms = float(np.median([r.ms_per_step for r in rs]))
    rows.append({
        "method": m, "seeds": len(rs),
        "test_accuracy_mean": acc[0], "test_accuracy_std": acc[1],
        "train_loss_mean": loss[0], "train_loss_std": loss[1],
        "ms_per_step": ms, "cost_ratio": ms / sgd_ms,
        "compile_s": float(np.mean([r.compile_s for r in rs])),
        "peak_rss_mib": float(max(r.peak_rss_mib for r in rs)),
        "state_kib": float(rs[0].state_bytes / 1024.0),
        "top_eigenvalue_mean": sharp[0], "top_eigenvalue_std": sharp[1],
        "hessian_trace_mean": trace[0], "hessian_trace_std": trace[1],
        "hyper": rs[0].hyper,
    })
  return rows


def _fmt(x, spec):
  return "n/a" if x is None or not np.isfinite(x) else format(x, spec)


def markdown(rows: Sequence[dict], header: str = "") -> str:
  """The table: accuracy, loss, cost, memory and sharpness per method."""
  sharp = any(np.isfinite(r["top_eigenvalue_mean"]) for r in rows)
  cols = ["method", "test acc % (mean ± std)", "final train loss",
          "ms / step", "× SGD", "peak RSS MiB", "state KiB"]
  traced = any(np.isfinite(r.get("hessian_trace_mean", np.nan)) for r in rows)
  if sharp:
    cols.append("λ_max (Hessian)")
  if traced:
    cols.append("tr H (Hutchinson)")
  lines = [f"| {' | '.join(cols)} |",
           "|" + "|".join(["---"] + ["---:"] * (len(cols) - 1)) + "|"]
  for r in rows:
    cells = [
        r["method"],
        f"{_fmt(100 * r['test_accuracy_mean'], '.2f')} ± "
        f"{_fmt(100 * r['test_accuracy_std'], '.2f')}",
        _fmt(r["train_loss_mean"], ".4f"),
        _fmt(r["ms_per_step"], ".2f"),
        _fmt(r["cost_ratio"], ".2f") + "x",
        _fmt(r["peak_rss_mib"], ".0f"),
        _fmt(r["state_kib"], ".1f"),
    ]
    if sharp:
      cells.append(_fmt(r["top_eigenvalue_mean"], ".2f"))
    if traced:
      cells.append(_fmt(r["hessian_trace_mean"], ".1f"))
    lines.append(f"| {' | '.join(cells)} |")
  text = "\n".join(lines) + "\n"
  return (header.rstrip() + "\n\n" + text) if header else text


def write_json(path: str, payload: dict) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(payload, f, indent=1, default=_json_default, allow_nan=True)
  os.replace(tmp, path)


def _json_default(x):
  if isinstance(x, (np.floating, np.integer)):
    return x.item()
  if isinstance(x, np.ndarray):
    return x.tolist()
  return str(x)


def utc_now() -> str:
  return datetime.datetime.now(datetime.timezone.utc).isoformat(
      timespec="seconds")


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


def plot(results: Sequence[Any], rows: Sequence[dict], methods: Sequence[str],
         out_dir: str, title: str = "") -> list[str]:
  """Writes accuracy.png, train_loss.png, tradeoff.png and compare.png."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  cmap = plt.get_cmap("tab20" if len(methods) > 10 else "tab10")
  colors = {m: cmap(i % cmap.N) for i, m in enumerate(methods)}
  acc = _curves(results, methods, "test_accuracy")
  loss = _curves(results, methods, "train_loss")

  def curves(ax, data, ylabel, scale=1.0, log=False):
    for m, (x, mu, sd) in data.items():
      ax.plot(x, scale * mu, label=m, color=colors[m], lw=1.4)
      ax.fill_between(x, scale * (mu - sd), scale * (mu + sd),
                      color=colors[m], alpha=0.15, lw=0)
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    if log:
      ax.set_yscale("log")
    ax.grid(alpha=0.3)

  def tradeoff(ax):
    for r in rows:
      m = r["method"]
      ax.errorbar(r["cost_ratio"], 100 * r["test_accuracy_mean"],
                  yerr=100 * r["test_accuracy_std"], fmt="o",
                  color=colors[m], capsize=3)
      ax.annotate(m, (r["cost_ratio"], 100 * r["test_accuracy_mean"]),
                  textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("time per step / SGD's")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(alpha=0.3)

  written = []

  def save(fig, name):
    path = os.path.join(out_dir, name)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    written.append(path)

  fig, ax = plt.subplots(figsize=(6, 4))
  curves(ax, acc, "test accuracy (%)", 100.0)
  ax.legend(fontsize=7, ncol=2)
  ax.set_title(title, fontsize=9)
  save(fig, "accuracy.png")

  fig, ax = plt.subplots(figsize=(6, 4))
  curves(ax, loss, "train loss (mean over the epoch)", log=True)
  ax.legend(fontsize=7, ncol=2)
  ax.set_title(title, fontsize=9)
  save(fig, "train_loss.png")

  fig, ax = plt.subplots(figsize=(6, 4))
  tradeoff(ax)
  ax.set_title(title, fontsize=9)
  save(fig, "tradeoff.png")

  fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
  curves(axes[0], acc, "test accuracy (%)", 100.0)
  curves(axes[1], loss, "train loss (mean over the epoch)", log=True)
  tradeoff(axes[2])
  handles, labels = axes[0].get_legend_handles_labels()
  fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 12),
             fontsize=8, frameon=False)
  if title:
    fig.suptitle(title, fontsize=10)
  fig.tight_layout(rect=(0, 0.07, 1, 1))
  path = os.path.join(out_dir, "compare.png")
  fig.savefig(path, dpi=80)
  plt.close(fig)
  written.append(path)
  return written
