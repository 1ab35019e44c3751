"""Is host loading in the step time? Training steps fed four ways.

One model, one optimizer, one jitted step (``make_trainer``, SGD, donated
state); only where the batches come from changes:

- ``on device``: the batches are made and transferred before the clock
  starts (the floor: the step alone);
- ``host, in the loop``: each batch is gathered and augmented (random crop
  and flip) on the host right before its step, then transferred: what a loop
  over ``loader.batch(epoch, step)`` does;
- ``DataLoader + prefetch``: the same batches made in the loader's thread
  (``prefetch=2``) and put on the devices two ahead
  (``data.prefetch_to_device(..., trainer.shard_batch)``);
- ``GrainLoader + prefetch``: made in grain worker processes
  (``--grain-workers``), put on the devices two ahead.

``--read-ms`` adds that many milliseconds of waiting to the making of each
batch (a sleep: storage or network latency, which costs no CPU). On a
machine whose CPU also runs the step (XLA:CPU), prefetching can hide such
waiting but not host computation, which competes with the step for the same
cores; on an accelerator it hides both.

The step never waits for the device (JAX dispatches it asynchronously), so a
loop that loads its next batch while the previous steps run already overlaps
loading and computing, as long as loading is the faster of the two; what is
left in the step time is the loading done while the devices have nothing
queued: after each metric read-back (``--sync-every``, as the command line
reads its metrics), and all of it once loading is slower than the step.
Prefetching covers the first; only more loaders (grain's workers) cover the
second. The last column, the time the loop spent blocked in
``next(batches)``, is not device idle time (the devices may still be busy
with queued steps); the time per step is the measure.

Each mode runs ``--steps`` steps ``--repeats`` times, the modes interleaved
within each repeat; the figures are the minimum time per step (the clock
stops after the last step's result is ready), its share above the floor, and
the minimum time per step the loop spent waiting for ``next(batches)``: the
host loading that stayed in the step time (robust to a busy machine, where the
step times themselves drift). Writes ``results/input_pipeline.json`` and ``.md``.

    python benchmarks/input_pipeline.py --steps 30 --repeats 3
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import time

import jax
import numpy as np
import optax
from sharpjax import data, models, training

from _common import git_commit  # benchmarks/ is the script's sys.path[0]

RESULTS = pathlib.Path(__file__).resolve().parent / "results"


def _parse(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--steps", type=int, default=30)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--batch", type=int, default=256)
  p.add_argument("--model", choices=("resnet18", "mlp"), default="resnet18",
                 help="ResNet-18 (default) or an MLP of one hidden layer")
  p.add_argument("--width", type=int, default=16,
                 help="ResNet-18 first-stage channels, MLP hidden units "
                 "(default 16)")
  p.add_argument("--grain-workers", type=int, default=2,
                 help="grain worker processes (0: skip the grain mode)")
  p.add_argument("--read-ms", type=float, default=0.0,
                 help="simulated read latency per batch, in ms (default 0)")
  p.add_argument("--sync-every", type=int, default=10,
                 help="read the loss back every this many steps, as the "
                 "command line's loop does (default 10)")
  p.add_argument("--out", default=str(RESULTS))
  return p.parse_args(argv)


class _SlowAugment:
  """The augmentation after ``seconds`` of waiting (simulated reads)."""

  def __init__(self, augment, seconds):
    self.augment, self.seconds = augment, seconds

  def __call__(self, x, rng):
    if self.seconds:
      time.sleep(self.seconds)
    return self.augment(x, rng)


def main(argv=None):
  args = _parse(argv)
  n = args.batch * (args.steps + 2)
  rng = np.random.default_rng(0)
  train = data.ArrayDataset(
      rng.standard_normal((n, 32, 32, 3)).astype(np.float32),
      rng.integers(0, 10, n), 10, name="images")
  augment = _SlowAugment(data.RandomCropFlip(), args.read_ms / 1e3)
  if args.model == "resnet18":
    model = models.ResNet18(num_classes=10, width=args.width)
  else:
    model = models.MLP(features=(args.width,), num_classes=10)
  trainer = training.make_trainer(model, optax.sgd(0.01, momentum=0.9),
                                  validate=False)
  host = data.DataLoader(train, args.batch, seed=0, prefetch=0,
                         augment=augment)
  state = trainer.init(jax.random.PRNGKey(0), host.batch(0, 0))
  steps = args.steps
  held = {"state": state}

  def run(batches):
    """``(seconds per step, seconds per step spent waiting for a batch)``."""
    t0 = time.perf_counter()
    st, waited, it, k = held["state"], 0.0, iter(batches), 0
    while True:
      tw = time.perf_counter()
      batch = next(it, None)
      waited += time.perf_counter() - tw
      if batch is None:
        break
      st, metrics = trainer.step(st, batch)
      k += 1
      if k % args.sync_every == 0:  # the metrics read-back of a real loop
        jax.device_get(metrics["loss"])
    jax.block_until_ready((st, metrics))
    held["state"] = st
    return (time.perf_counter() - t0) / steps, waited / steps

  def on_device():
    placed = [trainer.shard_batch(host.batch(0, i)) for i in range(steps)]
    jax.block_until_ready(placed)
    return run(placed)

  def in_loop():
    return run(host.batch(0, i) for i in range(steps))

  def prefetched():
    loader = data.DataLoader(train, args.batch, seed=0, prefetch=2,
                             augment=augment)
    return run(data.prefetch_to_device(loader.batches(0, steps),
                                       trainer.shard_batch))

  grain_loader = (data.GrainLoader(train, args.batch, seed=0, augment=augment,
                                   worker_count=args.grain_workers)
                  if args.grain_workers else None)

  def grain_fed():
    it = grain_loader.batches(0, steps)
    first = next(it)  # workers started and warm before the clock

    def batches():
      yield first
      yield from it

    try:
      return run(data.prefetch_to_device(batches(), trainer.shard_batch))
    finally:
      it.close()

  modes = {"on device": on_device, "host, in the loop": in_loop,
           "DataLoader + prefetch": prefetched}
  if grain_loader is not None:
    modes["GrainLoader + prefetch"] = grain_fed
  for fn in modes.values():  # compile, warm every path
    fn()
  times = {k: [] for k in modes}
  for _ in range(args.repeats):
    for name, fn in modes.items():
      times[name].append(fn())
  floor = min(t for t, _ in times["on device"])
  rows = []
  for k, v in times.items():
    best = min(t for t, _ in v)
    rows.append({"mode": k, "ms_per_step": 1e3 * best,
                 "above_floor": best / floor - 1.0,
                 "wait_ms_per_step": 1e3 * min(w for _, w in v),
                 "all_ms": [1e3 * t for t, _ in v],
                 "all_wait_ms": [1e3 * w for _, w in v]})
  dev = jax.devices()[0]
  meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(
      timespec="seconds"), "commit": git_commit(),
          "jax": jax.__version__, "platform": dev.platform,
          "device_kind": dev.device_kind, "machine": platform.machine(),
          "cpu_cores": len(os.sched_getaffinity(0)),
          "model": (f"ResNet-18 width {args.width}" if args.model == "resnet18"
                    else f"MLP width {args.width}"), "batch": args.batch,
          "steps": steps, "repeats": args.repeats,
          "grain_workers": args.grain_workers, "read_ms": args.read_ms,
          "sync_every": args.sync_every,
          "load_average": os.getloadavg()[0]}
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  (out / "input_pipeline.json").write_text(
      json.dumps({"meta": meta, "results": rows}, indent=1))
  lines = [f"{meta['model']}, batch {args.batch}, 32x32x3 with random crop + "
           f"flip, {args.read_ms:g} ms of simulated read latency per batch, "
           f"the loss read back every {args.sync_every} steps, "
           f"{dev.platform} ({meta['cpu_cores']} cores, load average "
           f"{meta['load_average']:.1f}); min over {args.repeats} repeats of "
           f"{steps} steps.", "",
           "| batches | ms / step | above the floor | loop waiting for its "
           "batch, ms / step |", "|---|---:|---:|---:|"]
  lines += [f"| {r['mode']} | {r['ms_per_step']:.1f} | "
            f"{100 * r['above_floor']:+.0f}% | {r['wait_ms_per_step']:.1f} |"
            for r in rows]
  (out / "input_pipeline.md").write_text("\n".join(lines) + "\n")
  print("\n".join(lines))


if __name__ == "__main__":
  main()
