"""SAMPa on two groups of devices against SAM and SGD, at the same global batch.

Every row trains the same model through :func:`sharpjax.training.make_trainer`
on one global batch, over a mesh of the same devices:

- ``sgd`` and ``sam``: a ``("data",)`` mesh of all the devices;
- ``sampa (one group)``: the same mesh, both gradients on every device (one
  ``vmap`` over the two points);
- ``sampa (two groups)``: a ``("pair", "data")`` mesh of 2 x n/2 devices; each
  half computes one of the two gradients on the whole batch (sharded over its
  n/2 devices), then the gradients are exchanged once.

SAMPa's two groups do the work of SAM's two passes on half the devices each:
what they save is time where the devices would otherwise wait (a batch too
small to fill them, a per-device batch that must stay fixed), and what they
add is one exchange of gradients. On a CPU the "devices" are
``--xla_force_host_platform_device_count`` slices of the same cores, so the
table shows the cost of the arrangement (the exchange, the resharding), not
the parallel speed-up a GPU pair or a pod gives: run it there for that.

Each method is timed in windows, each right after a window of SGD, the
methods interleaved; the ratio is the median over windows of the method's
time over its SGD window's. Also reported: the XLA FLOP count of one compiled
step (``Trainer.step_cost``), per device.

    python benchmarks/sampa_pair.py                  # 4 host devices
    python benchmarks/sampa_pair.py --devices 8 --batch 256
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import sys
import time

RESULTS = pathlib.Path(__file__).resolve().parent / "results"


def _parse(argv):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--devices", type=int, default=4,
                      help="devices (even; host devices on a CPU; default 4)")
  parser.add_argument("--batch", type=int, default=256,
                      help="global batch (default 256)")
  parser.add_argument("--steps", type=int, default=10,
                      help="steps per timed window (default 10)")
  parser.add_argument("--repeats", type=int, default=10,
                      help="timed windows per method (default 10)")
  parser.add_argument("--width", type=int, default=64,
                      help="CNN1D channels (default 64)")
  parser.add_argument("--out", type=pathlib.Path, default=RESULTS)
  args = parser.parse_args(argv)
  if args.devices < 2 or args.devices % 2:
    parser.error("--devices must be an even number >= 2")
  if args.batch % args.devices:
    parser.error("--batch must be a multiple of --devices")
  if min(args.steps, args.repeats) < 1:
    parser.error("--steps and --repeats must be >= 1")
  return args


def main(argv=None):
  args = _parse(argv)
  if "jax" not in sys.modules:
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "")
        + f" --xla_force_host_platform_device_count={args.devices}")
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  import sharpjax as sj  # pylint: disable=g-import-not-at-top
  from sharpjax import models  # pylint: disable=g-import-not-at-top
  from sharpjax import training  # pylint: disable=g-import-not-at-top
  from _common import git_commit  # pylint: disable=g-import-not-at-top

  devices = jax.devices()[:args.devices]
  if len(devices) < args.devices:
    raise SystemExit(f"sampa_pair.py: {args.devices} devices asked, "
                     f"{len(devices)} found.")
  n = args.devices
  data_mesh = jax.sharding.Mesh(np.array(devices), ("data",))
  pair_mesh = jax.sharding.Mesh(np.array(devices).reshape(2, n // 2),
                                ("pair", "data"))
  lr = 0.05
  sgd = lambda: optax.sgd(lr, momentum=0.9)
  rows = [
      ("sgd", sgd, data_mesh),
      ("sam", lambda: optax.chain(sj.sam(rho=0.05), sgd()), data_mesh),
      ("sampa (one group)", lambda: optax.chain(
          sj.sampa(rho=0.1, lam=0.2, learning_rate=lr, momentum=0.9), sgd()),
       data_mesh),
      ("sampa (two groups)", lambda: optax.chain(
          sj.sampa(rho=0.1, lam=0.2, learning_rate=lr, momentum=0.9), sgd()),
       pair_mesh),
  ]
  rng = np.random.default_rng(0)
  batch = {"x": rng.normal(size=(args.batch, 40, 1)).astype(np.float32),
           "y": rng.integers(0, 10, args.batch).astype(np.int32),
           "ids": np.arange(args.batch, dtype=np.int32)}
  model = models.CNN1D(num_classes=10, channels=args.width)

  runners = []
  for name, make_tx, mesh in rows:
    trainer = training.make_trainer(model, make_tx(), mesh=mesh,
                                    validate=False)
    state = trainer.init(jax.random.PRNGKey(0), batch)
    placed = trainer.shard_batch(batch)
    flops = float(trainer.step_cost(state, placed)["flops"])
    start = time.perf_counter()
    for _ in range(3):  # compile and warm up
      state, _ = trainer.step(state, placed)
    jax.block_until_ready(state)
    print(f"  {name}: compiled and warmed up in "
          f"{time.perf_counter() - start:.1f} s", flush=True)
    runners.append(dict(name=name, trainer=trainer, state=state,
                        batch=placed, flops=flops, times=[], ratios=[],
                        mesh=dict(mesh.shape)))

  def window(r):
    state = r["state"]
    start = time.perf_counter()
    for _ in range(args.steps):
      state, _ = r["trainer"].step(state, r["batch"])
    jax.block_until_ready(state)
    r["state"] = state
    return (time.perf_counter() - start) / args.steps

  base = runners[0]
  for rep in range(args.repeats):
    for r in runners:
      t_sgd = window(base)
      t = t_sgd if r is base else window(r)
      r["times"].append(t)
      r["ratios"].append(t / t_sgd)
    print(f"repeat {rep + 1}/{args.repeats} done", flush=True)

  out = []
  for r in runners:
    ratios = np.asarray(r["ratios"])
    out.append(dict(
        method=r["name"], mesh=r["mesh"],
        ms_per_step=1e3 * min(r["times"]),
        ratio_to_sgd=float(np.median(ratios)),
        ratio_iqr=[float(np.percentile(ratios, 25)),
                   float(np.percentile(ratios, 75))],
        flops_ratio=r["flops"] / base["flops"]))
  meta = dict(
      devices=n, device_kind=devices[0].device_kind,
      platform=devices[0].platform, global_batch=args.batch,
      steps=args.steps, repeats=args.repeats,
      model=f"CNN1D width {args.width} (MNIST-1D 40x1)",
      cores=os.cpu_count(), jax=jax.__version__, commit=git_commit(),
      date=datetime.datetime.now(datetime.timezone.utc).isoformat(
          timespec="seconds"),
      machine=platform.machine())
  lines = [
      f"SAMPa on two device groups, global batch {args.batch}, {n} "
      f"{meta['platform']} devices ({meta['device_kind']}), {meta['model']}; "
      f"median of {args.repeats} paired windows of {args.steps} steps; "
      f"jax {meta['jax']}, commit {meta['commit']}.", "",
      "| method | mesh | ms / step | × SGD | IQR | FLOPs × SGD |",
      "|---|---|---:|---:|---:|---:|"]
  for row in out:
    mesh = " x ".join(f"{k} {v}" for k, v in row["mesh"].items())
    lines.append(
        f"| {row['method']} | {mesh} | {row['ms_per_step']:.2f} | "
        f"{row['ratio_to_sgd']:.2f}x | {row['ratio_iqr'][0]:.2f}-"
        f"{row['ratio_iqr'][1]:.2f} | {row['flops_ratio']:.2f}x |")
  text = "\n".join(lines)
  print(text)
  args.out.mkdir(parents=True, exist_ok=True)
  stem = "sampa_pair" + ("" if meta["platform"] == "cpu"
                         else "-" + meta["device_kind"].lower().replace(" ",
                                                                        "-"))
  (args.out / f"{stem}.json").write_text(json.dumps(
      dict(meta=meta, rows=out), indent=1) + "\n")
  (args.out / f"{stem}.md").write_text(text + "\n")


if __name__ == "__main__":
  main()
