"""Cost of the Hessian measures: top eigenvalue, trace, SLQ density.

For each model, on one batch of random inputs at initialisation (the cost does
not depend on the values):

- a jit-compiled gradient of the mean loss and a jit-compiled Hessian-vector
  product (forward-over-reverse) are timed alone: gradients/s, HVPs/s and their
  ratio (the HVP costs about two gradients at best);
- ``hessian_eigenpairs`` (top eigenvalue, power iteration, PyHessian's
  ``max_iters=100``, ``tol=1e-3``), ``hessian_trace`` (100 Rademacher probes)
  and ``spectral_density`` (SLQ, m = 90 Lanczos steps, one run) are timed end to
  end, with device loops (``loop="lax"``) and host loops (``loop="host"``):
  the first call (with compilation) and run time (best of ``--repeats`` later
  calls), the HVPs each used, and the HVP rate they achieve relative to the
  gradient rate (their overhead over the bare HVP shows up there).

Models: the MNIST-1D CNN (``sharpjax.models.CNN1D``, 40 x 1 inputs, batch 128)
and a WideResNet on CIFAR-10 shapes (32 x 32 x 3) measured in eval mode
(BatchNorm running statistics); the WRN's depth, width and batch are reduced by
default (WRN-10-1, batch 32) and timed with host loops only by default, so the
run fits a 2-core CPU in a few minutes.

Writes ``benchmarks/results/measures.json`` and ``measures.md``.

    python benchmarks/measures.py
    python benchmarks/measures.py --models cnn --repeats 5
    python benchmarks/measures.py --wrn-depth 16 --wrn-width 4 --wrn-batch 64
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

import sharpjax.measures as sm
from sharpjax import models

RESULTS = pathlib.Path(__file__).resolve().parent / "results"


def _block(tree: Any) -> Any:
  return jax.tree.map(lambda x: x.block_until_ready(), tree)


def _best_time(fn: Callable[[], Any], repeats: int) -> float:
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    _block(fn())
    best = min(best, time.perf_counter() - t0)
  return best


def _timed_first(fn: Callable[[], Any]) -> tuple[float, Any]:
  t0 = time.perf_counter()
  out = _block(fn())
  return time.perf_counter() - t0, out


def build(name: str, args) -> dict:
  """Model, parameters, a loss_fn over parameters and one batch."""
  key = jax.random.PRNGKey(0)
  if name == "cnn":
    model = models.CNN1D()
    batch = {"x": jax.random.normal(key, (args.cnn_batch, 40, 1)),
             "y": jax.random.randint(key, (args.cnn_batch,), 0, 10)}
    variables = model.init(key, batch["x"][:2])
    label = f"CNN1D (MNIST-1D, 40x1, batch {args.cnn_batch})"
  else:
    model = models.WideResNet(depth=args.wrn_depth, widen_factor=args.wrn_width)
    batch = {"x": jax.random.normal(key, (args.wrn_batch, 32, 32, 3)),
             "y": jax.random.randint(key, (args.wrn_batch,), 0, 10)}
    variables = model.init(key, batch["x"][:2])
    label = (f"WRN-{args.wrn_depth}-{args.wrn_width} (32x32x3, batch "
             f"{args.wrn_batch}, eval-mode BN)")
  params = variables["params"]
  rest = {k: v for k, v in variables.items() if k != "params"}

  def loss_fn(p, b):
    logits = model.apply({"params": p, **rest}, b["x"], train=False)
    return optax.softmax_cross_entropy_with_integer_labels(logits, b["y"])

  dim = sum(x.size for x in jax.tree.leaves(params))
  return dict(label=label, params=params, loss_fn=loss_fn, batch=batch, dim=dim)


def run_model(name: str, args) -> dict:
  m = build(name, args)
  params, loss_fn, batch = m["params"], m["loss_fn"], m["batch"]
  key = jax.random.PRNGKey(1)
  row: dict[str, Any] = dict(model=m["label"], parameters=int(m["dim"]))
  print(f"== {m['label']}: {m['dim']:,} parameters", flush=True)

  grad = jax.jit(jax.grad(lambda p: jnp.mean(loss_fn(p, batch))))
  v = jax.tree.map(jnp.ones_like, params)
  hvp = lambda: sm.hvp(loss_fn, params, batch, v)
  _block(grad(params))
  _block(hvp())
  n = args.inner
  n = n if name == "cnn" else max(1, n // 5)
  t_grad = _best_time(lambda: [grad(params) for _ in range(n)][-1], 3) / n
  t_hvp = _best_time(lambda: [hvp() for _ in range(n)][-1], 3) / n
  row.update(grad_per_s=1 / t_grad, hvp_per_s=1 / t_hvp, hvp_over_grad_cost=t_hvp / t_grad)
  print(f"  grad {1e3 * t_grad:.2f} ms, hvp {1e3 * t_hvp:.2f} ms "
        f"(hvp = {t_hvp / t_grad:.2f} grads)", flush=True)

  tasks = {
      "top_eigenvalue": lambda loop: sm.hessian_eigenpairs(
          loss_fn, params, batch, key, k=1, loop=loop),
      "trace_100": lambda loop: sm.hessian_trace(
          loss_fn, params, batch, key, num_probes=100, loop=loop),
      "slq_90": lambda loop: sm.spectral_density(
          loss_fn, params, batch, key, num_steps=90, loop=loop),
  }
  loops = args.wrn_loops if name == "wrn" else args.loops
  repeats = args.wrn_repeats if name == "wrn" else args.repeats
  for task, fn in tasks.items():
    for loop in loops:
      t_first, out = _timed_first(lambda: fn(loop))
      t_run = _best_time(lambda: fn(loop), repeats)
      if task == "top_eigenvalue":
        hvps = int(out.num_iterations[0])
        value = float(out.eigenvalues[0])
      elif task == "trace_100":
        hvps, value = 100, float(out.trace)
      else:
        hvps = 90
        value = float(jnp.max(out.nodes))
      rate = hvps / t_run
      row[f"{task}/{loop}"] = dict(
          first_call_s=t_first, run_s=t_run, hvps=hvps,
          hvp_per_s=rate, hvp_rate_over_grad_rate=rate * t_grad, value=value,
      )
      print(f"  {task} [{loop}]: {t_run:.3f} s for {hvps} HVPs ({rate:.1f} "
            f"HVP/s, {rate * t_grad:.2f} of grad/s), first call "
            f"{t_first:.1f} s, value {value:.4g}", flush=True)
  return row


def markdown(rows: list[dict], meta: dict) -> str:
  lines = [
      "# Hessian measures: cost on CPU",
      "",
      f"{meta['date']}, jax {meta['jax']}, {meta['device']}, "
      f"{meta['cpu_count']} CPU cores visible, load average "
      f"{meta['load_average']:.1f} at the end (a shared machine: absolute "
      "times are indicative, ratios within a model are the figure to read). "
      "Random inputs, parameters at initialisation, one batch. `run` is the "
      f"best of {meta['repeats']} calls after the first (WRN: "
      f"{meta['wrn_repeats']}); `first call` includes compilation. The "
      "HVP/grad column is the HVP rate the measure reaches "
      "divided by the gradient rate (0.5 would be an HVP at exactly 2 "
      "gradients).",
      "",
      "| model | params | grad/s | HVP/s (bare) | HVP cost in grads |",
      "|---|---:|---:|---:|---:|",
  ]
  for r in rows:
    lines.append(
        f"| {r['model']} | {r['parameters']:,} | {r['grad_per_s']:.1f} | "
        f"{r['hvp_per_s']:.1f} | {r['hvp_over_grad_cost']:.2f} |"
    )
  lines += [
      "",
      "| model | measure | loop | HVPs | run (s) | first call (s) | HVP/s | HVP rate / grad rate | value |",
      "|---|---|---|---:|---:|---:|---:|---:|---:|",
  ]
  names = {"top_eigenvalue": "top eigenvalue (power, tol 1e-3)",
           "trace_100": "trace (Hutchinson, 100 probes)",
           "slq_90": "SLQ density (m = 90)"}
  for r in rows:
    for task, label in names.items():
      for loop in ("lax", "host"):
        if f"{task}/{loop}" not in r:
          continue
        t = r[f"{task}/{loop}"]
        lines.append(
            f"| {r['model']} | {label} | {loop} | {t['hvps']} | "
            f"{t['run_s']:.3f} | {t['first_call_s']:.1f} | {t['hvp_per_s']:.1f} | "
            f"{t['hvp_rate_over_grad_rate']:.2f} | {t['value']:.4g} |"
        )
  lines.append("")
  lines.append(
      "Values: top eigenvalue, trace estimate, largest SLQ node. `lax`: the "
      "whole measure is one jit with `lax` loops; `host`: a Python loop over "
      "one compiled step per HVP (`loop=\"host\"`). XLA:CPU runs convolutions "
      "inside device loops several times slower than outside "
      "(jax-ml/jax#12868), which is what the `lax` rows pay on these conv nets; "
      "MLPs do not pay it."
  )
  return "\n".join(lines) + "\n"


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--models", nargs="+", default=["cnn", "wrn"],
                      choices=["cnn", "wrn"])
  parser.add_argument("--cnn-batch", type=int, default=128)
  parser.add_argument("--wrn-depth", type=int, default=10)
  parser.add_argument("--wrn-width", type=int, default=1)
  parser.add_argument("--wrn-batch", type=int, default=32)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--wrn-repeats", type=int, default=1)
  parser.add_argument("--inner", type=int, default=10,
                      help="gradients / HVPs per timed call of the bare rates")
  parser.add_argument("--loops", nargs="+", default=["lax", "host"],
                      choices=["lax", "host"], help="loop modes for the CNN")
  parser.add_argument("--wrn-loops", nargs="+", default=["host"],
                      choices=["lax", "host"],
                      help="loop modes for the WRN (device loops cost ~10x "
                           "on XLA:CPU there: minutes per measure)")
  parser.add_argument("--out", type=pathlib.Path, default=RESULTS)
  args = parser.parse_args()

  rows = [run_model(name, args) for name in args.models]
  meta = dict(
      date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
      jax=jax.__version__,
      device=str(jax.devices()[0].device_kind),
      platform=platform.platform(),
      cpu_count=os.cpu_count(),
      repeats=args.repeats,
      wrn_repeats=args.wrn_repeats,
      loops=dict(cnn=args.loops, wrn=args.wrn_loops),
      load_average=os.getloadavg()[0],
  )
  args.out.mkdir(parents=True, exist_ok=True)
  (args.out / "measures.json").write_text(
      json.dumps(dict(meta=meta, rows=rows), indent=2) + "\n"
  )
  table = markdown(rows, meta)
  (args.out / "measures.md").write_text(table)
  print(table)


if __name__ == "__main__":
  main()
