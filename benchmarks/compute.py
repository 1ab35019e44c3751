"""Compute per step of every method through make_trainer, as a multiple of SGD's.

XLA's cost analysis of one compiled training step (``Trainer.step_cost``:
optimized program, host-scheduled programs weighted over their period), for
every method of the command line, on the command line's CNN (MNIST-1D shapes)
or ResNet-18 (CIFAR shapes), batch 128. Nothing is run, only compiled, so the
figures do not depend on the machine's load; they are the passes a method
pays for, which is what a compute-bound accelerator's step time follows.

  python benchmarks/compute.py --model cnn
  python benchmarks/compute.py --model resnet18

Writes ``benchmarks/results/compute-MODEL.{json,md}``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import platform

import jax
import numpy as np
import optax

import sharpjax as sj
from sharpjax import models, training
from sharpjax.cli import _methods

import _common  # pylint: disable=g-bad-import-order

RESULTS = pathlib.Path(__file__).parent / "results"
BATCH = 128
MODELS = {
    # name: (model, input shape, training examples, classes)
    "cnn": (lambda: models.CNN1D(num_classes=10, channels=25), (40, 1), 4000),
    "resnet18": (lambda: models.ResNet18(num_classes=10, width=64),
                 (32, 32, 3), 50000),
}


def measure(model_name: str, methods=None) -> dict:
  """``{method: {"flops", "bytes_accessed", "flops_ratio", "passes"}}``."""
  make_model, shape, num_examples = MODELS[model_name]
  rng = np.random.default_rng(0)
  batch = {"x": rng.normal(size=(BATCH,) + shape).astype(np.float32),
           "y": rng.integers(0, 10, size=BATCH).astype(np.int32),
           "ids": rng.choice(num_examples, BATCH, replace=False).astype(
               np.int32)}
  budget = _methods.Budget(num_examples=num_examples, num_classes=10,
                           steps_per_epoch=num_examples // BATCH, epochs=30,
                           learning_rate=0.05, momentum=0.9)
  rows, sgd_flops = {}, None
  for name in ["sgd"] + [n for n in _methods.names() if n != "sgd"]:
    if methods and name not in methods and name != "sgd":
      continue
    method = _methods.get(name)
    hyper = _methods.resolve(method, budget, {}, {})
    front = _methods.build(method, hyper, budget)
    base = optax.sgd(0.05, momentum=0.9)
    tx = base if front is None else optax.chain(front, base)
    trainer = training.make_trainer(make_model(), tx)
    state = trainer.init(jax.random.key(0), batch)
    cost = trainer.step_cost(state, batch)
    if name == "sgd":
      sgd_flops = cost["flops"]
    rows[name] = {"flops": float(cost["flops"]),
                  "bytes_accessed": float(cost["bytes_accessed"]),
                  "flops_ratio": float(cost["flops"]) / sgd_flops,
                  "passes": sj.passes(state.opt_state)}
    print(f"{name:14s} {rows[name]['flops_ratio']:.4f}x  "
          f"passes={rows[name]['passes']}", flush=True)
  return rows


def markdown(model_name: str, rows: dict, meta: dict) -> str:
  lines = [
      f"XLA's FLOP count of one compiled `make_trainer` step, {model_name}, "
      f"batch {BATCH}; jax {meta['jax']}, commit {meta['commit']}, "
      f"{meta['date']}.", "",
      "| method | passes | GFLOP / step | compute x SGD | bytes x SGD |",
      "|---|---|---:|---:|---:|"]
  sgd = rows["sgd"]
  for name, row in rows.items():
    lines.append(
        f"| {name} | {row['passes']} | {row['flops'] / 1e9:.3f} | "
        f"{row['flops_ratio']:.3f}x | "
        f"{row['bytes_accessed'] / sgd['bytes_accessed']:.2f}x |")
  return "\n".join(lines) + "\n"


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", choices=sorted(MODELS), default="cnn")
  parser.add_argument("--methods", nargs="*", default=None,
                      help="methods to count (default: every one); SGD always")
  parser.add_argument("--out", default=str(RESULTS),
                      help="directory for compute-MODEL.{json,md}")
  args = parser.parse_args(argv)
  unknown = sorted(set(args.methods or ()) - set(_methods.names()))
  if unknown:
    parser.error(f"--methods: unknown {unknown}; known: {_methods.names()}")
  rows = measure(args.model, args.methods)
  meta = {"jax": jax.__version__, "commit": _common.git_commit(),
          "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
              timespec="seconds"),
          "machine": platform.machine(), "batch": BATCH}
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  (out / f"compute-{args.model}.json").write_text(
      json.dumps({"meta": meta, "rows": rows}, indent=1))
  (out / f"compute-{args.model}.md").write_text(
      markdown(args.model, rows, meta))
  print(markdown(args.model, rows, meta))


if __name__ == "__main__":
  main()
