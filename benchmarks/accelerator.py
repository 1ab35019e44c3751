"""One command for an accelerator: every method's trainer step, time and compute.

On whatever device JAX finds, every method of ``overhead.py`` that runs
through :func:`sharpjax.training.make_trainer` is compiled and timed on

- ResNet-18 (BatchNorm, 32x32x3, batch 128) in float32, and
- WideResNet-28-10 (BatchNorm, 32x32x3, batch 128) in bfloat16 compute
  (float32 parameters),

with batches already on the device. Each row gives the time per step, the
time ratio to SGD (``overhead.py``'s paired estimator: the median over
windows of the method's window over the SGD window run just before it, with
the interquartile range) and the compute ratio (XLA's FLOP count of the
compiled step, ``Trainer.step_cost``, over SGD's). On a compute-bound
accelerator the two ratios should agree; where the time ratio is well above
the compute ratio, the step pays for something other than arithmetic
(host-device synchronisation, memory-bound work, a conditional).

The whole command keeps to ``--budget-s`` seconds (default 480, 8 minutes):
each model gets half of what is left when it starts, first to compile (a
method whose compilation would start after 70% of that share is listed as
not run, with the reason), then to time as many windows as fit (at least
one, at most ``--repeats``); the methods compile in order of interest (SAM,
SAF, MESA, LookSAM, AUSAM, mSAM first). With ``--compile-cache DIR`` a second
run reuses the first one's compilations, leaving most of the budget for timing.
Writes one JSON and one markdown file per device
kind, ``results/accelerator-<device kind>.{json,md}``, with the device, the
date and the commit.

    python benchmarks/accelerator.py                # on the device present
    python benchmarks/accelerator.py --methods sgd sam saf
    python benchmarks/accelerator.py --smoke        # tiny models, seconds

``--smoke`` replaces both models by a tiny 1D CNN (batch 4), runs a few
methods for one window, and writes
``accelerator-smoke-<device kind>.*``: it checks that the command works on a
CPU, and its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import shutil
import sys
import tempfile
import time

import jax
import numpy as np
import optax
from sharpjax import models

import overhead  # benchmarks/ is the script's sys.path[0]
from _common import git_commit

RESULTS = overhead.RESULTS
# (model, dtype) of the two tables.
CONFIGS = (("resnet18", "float32"), ("wrn28-10", "bfloat16"))
SMOKE_METHODS = ("sgd", "looksam", "saf")
# The order methods are compiled in: when the budget runs out while
# compiling, the table still has the methods most asked about.
PRIORITY = ("sam", "saf", "mesa", "looksam", "ausam", "msam", "esam", "gsam",
            "asam", "fsam", "sagm", "ssam")


def _tiny(num_classes, dtype):
  # Stand-ins that compile in about a second on a CPU: the smoke test checks
  # the command, not the models (overhead.py's tests build the real ones).
  return models.CNN1D(num_classes=num_classes, channels=4, dtype=dtype), (
      overhead.LENGTH, 1)


SMOKE_MODELS = {
    "resnet18": (_tiny, "tiny CNN1D standing in for ResNet-18 (smoke test)"),
    "wrn28-10": (_tiny, "tiny CNN1D standing in for WideResNet-28-10 (smoke "
                 "test)"),
}


def rows_for(names) -> tuple[dict, list]:
  """The SGD baseline of each classifier width, then the methods asked for.

  Methods that cannot run through make_trainer are left out.
  """
  methods = [m for m in overhead.METHODS
             if not m.trainer_skip and (names is None or m.name in names)]
  rank = {name: i for i, name in enumerate(PRIORITY)}
  methods.sort(key=lambda m: rank.get(m.name, len(rank)))  # stable
  baselines = overhead.sgd_baselines(methods)
  return baselines, list(baselines.values()) + [
      m for m in methods if m.name != "sgd"]


def run_config(model: str, dtype: str, names, args, share_s: float,
               models_table: dict) -> dict:
  """One table: compile every method, then time windows until ``share_s``."""
  start = time.perf_counter()
  baselines, rows = rows_for(names)
  runners, skipped = [], []
  for m in rows:
    is_baseline = m in baselines.values()
    if not is_baseline and time.perf_counter() - start > 0.7 * share_s:
      skipped.append((m, "not run: the time budget ran out while compiling"))
      continue
    t0 = time.perf_counter()
    runners.append(overhead.build(m, args.warmup, model, dtype, trainer=True,
                                  batch_size=args.batch,
                                  models_table=models_table))
    print(f"  {model} {dtype} {m.name}: compiled and warmed up in "
          f"{time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
  baseline_of = overhead.pair_with_baselines(runners, baselines)
  repeats = 0
  while repeats < args.repeats:
    t0 = time.perf_counter()
    overhead.time_windows(runners, baseline_of, args.steps)
    repeats += 1
    left = share_s - (time.perf_counter() - start)
    if left < time.perf_counter() - t0:  # another repeat would not fit
      break
  results = []
  for r in runners:
    m = r.method
    q = np.percentile(r.ratios, [25, 50, 75])
    results.append(dict(
        method=m.name, num_classes=m.num_classes,
        ms_per_step=1e3 * min(r.times), ratio_to_sgd=float(q[1]),
        ratio_iqr=[float(q[0]), float(q[2])],
        **overhead.flops_columns(r.cost, baseline_of[m.name].cost),
        note=m.trainer_note or m.note))
  for m, why in skipped:
    results.append(dict(
        method=m.name, num_classes=m.num_classes, ms_per_step=None,
        ratio_to_sgd=None, ratio_iqr=None, flops_per_step=None,
        flops_ratio=None, bytes_accessed=None, note=why))
  return dict(model=models_table[model][1], model_key=model, dtype=dtype,
              repeats=repeats, seconds=time.perf_counter() - start,
              results=results)


def markdown(meta: dict, tables: list) -> str:
  lines = [
      f"Every method through make_trainer, batches on the device, batch "
      f"{meta['batch']}; {meta['device']} ({meta['backend']}), jax "
      f"{meta['jax']}, commit {meta['commit']}, {meta['date']}. Time: min "
      f"over windows of {meta['steps']} steps; time x SGD: median over the "
      "windows of the method's time over the SGD window run just before it "
      "(interquartile range beside it). Compute x SGD: XLA's FLOP count of "
      "the compiled step (Trainer.step_cost) over SGD's.",
  ]
  for t in tables:
    lines += [
        "", f"### {t['model']}, {t['dtype']} (windows per method: "
        f"{t['repeats']}; {t['seconds']:.0f} s)", "",
        "| method | ms / step | time x SGD | IQR | compute x SGD | "
        "GFLOP / step | note |",
        "|---|---:|---:|---:|---:|---:|---|"]
    for r in t["results"]:
      compute, gflops = overhead.flops_cells(r)
      if r["ms_per_step"] is None:
        lines.append(f"| {r['method']} | | | | | | {r['note']} |")
        continue
      iqr = r["ratio_iqr"]
      lines.append(
          f"| {r['method']} | {r['ms_per_step']:.2f} | "
          f"{r['ratio_to_sgd']:.2f}x | {iqr[0]:.2f}-{iqr[1]:.2f} | "
          f"{compute} | {gflops} | {r['note']} |")
  return "\n".join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--methods", nargs="*", default=None,
                      help="row names to run (default: every method that "
                      "runs through make_trainer); SGD is always run")
  parser.add_argument("--budget-s", type=float, default=480.0,
                      help="seconds for the whole command (default 480)")
  parser.add_argument("--steps", type=int, default=10,
                      help="steps per timed window (default 10)")
  parser.add_argument("--repeats", type=int, default=20,
                      help="most windows per method (default 20)")
  parser.add_argument("--warmup", type=int, default=3)
  parser.add_argument("--batch", type=int, default=None,
                      help=f"batch size (default {overhead.BATCH}; 4 with "
                      "--smoke)")
  parser.add_argument("--smoke", action="store_true",
                      help="tiny models, a few methods, one window: checks "
                      "the command on a CPU (the numbers mean nothing)")
  parser.add_argument("--compile-cache", type=pathlib.Path, default=None,
                      help="JAX's persistent compilation cache directory "
                      "(default: a temporary one). Trainer.step_cost compiles "
                      "the step again; with the cache that is a cache hit, "
                      "and a second run of the command compiles nothing")
  parser.add_argument("--out", type=pathlib.Path, default=RESULTS)
  args = parser.parse_args(argv)
  if args.steps < 1 or args.repeats < 1 or args.warmup < 0:
    parser.error("--steps and --repeats must be >= 1, --warmup >= 0")
  if args.budget_s <= 0:
    parser.error("--budget-s must be > 0")
  names = args.methods
  if names:
    known = {m.name for m in overhead.METHODS}
    unknown = sorted(set(names) - known)
    if unknown:
      parser.error(f"unknown methods {unknown}; known: {sorted(known)}")
  models_table = overhead.MODELS
  if args.smoke:
    models_table = SMOKE_MODELS
    names = names or list(SMOKE_METHODS)
    args.repeats = 1
    args.batch = args.batch or 4
  args.batch = args.batch or overhead.BATCH

  cache = args.compile_cache or pathlib.Path(
      tempfile.mkdtemp(prefix="sharpjax-accelerator-"))
  jax.config.update("jax_compilation_cache_dir", str(cache))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  device = str(jax.devices()[0].device_kind)
  start = time.perf_counter()
  tables = []
  for i, (model, dtype) in enumerate(CONFIGS):
    left = args.budget_s - (time.perf_counter() - start)
    share = left / (len(CONFIGS) - i)
    print(f"{model} {dtype}: {share:.0f} s", file=sys.stderr, flush=True)
    tables.append(run_config(model, dtype, names, args, share, models_table))

  meta = dict(
      date=datetime.datetime.now(datetime.timezone.utc).isoformat(
          timespec="seconds"),
      commit=git_commit(), jax=jax.__version__, optax=optax.__version__,
      device=device, backend=jax.default_backend(),
      device_count=jax.device_count(), platform=platform.platform(),
      cpu_count=os.cpu_count(), batch=args.batch, steps=args.steps,
      budget_s=args.budget_s, seconds=time.perf_counter() - start,
      smoke=args.smoke)
  text = markdown(meta, tables)
  print(text)
  args.out.mkdir(parents=True, exist_ok=True)
  stem = ("accelerator-smoke-" if args.smoke else "accelerator-") + \
      overhead.device_slug(device)
  (args.out / f"{stem}.json").write_text(
      json.dumps(dict(meta=meta, tables=tables), indent=2) + "\n")
  (args.out / f"{stem}.md").write_text(text + "\n")
  if args.compile_cache is None:
    shutil.rmtree(cache, ignore_errors=True)


if __name__ == "__main__":
  main()
