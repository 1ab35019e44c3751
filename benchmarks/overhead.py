"""Per-step cost of every sharpjax method as a ratio to plain SGD.

All methods train the same small 1D CNN on one batch of MNIST-1D shape
(40 x 1 inputs, batch 128), each step jit-compiled with donated buffers. After
compilation and warm-up, every method is timed in ``--repeats`` windows of
``--steps`` steps, each window right after a window of SGD with the same number
of classes (the methods interleaved within each repeat). The time per step
kept is the minimum over the windows; the ratio to SGD is the median over the
windows of the method's time over its SGD window's, with the interquartile
range beside it. Pairing adjacent windows cancels the machine's drift, which
a ratio of two minima does not: on a shared 2-core virtual machine the
minimum of 40 windows picked single lucky windows, so that SAM, GSAM and
F-SAM, which run the same two passes, came out at 1.73x, 1.95x and 2.14x in
one run, against 1.91x, 1.96x and 1.97x as paired medians.

Beside the time, every row carries XLA's FLOP count of one compiled step
(``flops_per_step``; through the trainer, ``Trainer.step_cost``, a
host-scheduled method's programs averaged over its period) and its ratio to
SGD's (``flops_ratio``, the "compute x SGD" column). The FLOP ratio is what
the time ratio approaches where the step is compute-bound (an accelerator on
a large model); it does not see per-step dispatch, which dominates a 1 ms CPU
step, nor memory-bound work such as SAF's bank reads and writes.

With ``--trainer`` every method runs through
:func:`sharpjax.training.make_trainer` (what the command line and most users
run), batches already on the device, and a hand-written SGD step is timed
beside the trainer's SGD step so the trainer's own cost shows.

Writes one results file per device kind / model / dtype / step kind under
``benchmarks/results/``: ``overhead.{json,md}`` for the CNN1D on the CPU in
float32 (hand-written steps), ``overhead-resnet18.*`` for ResNet-18 with
BatchNorm on 32x32x3 batches of 128, and e.g.
``overhead-wrn28-10-bfloat16-trainer-nvidia-h200.*`` otherwise; prints the
markdown table.

    python benchmarks/overhead.py                 # every method
    python benchmarks/overhead.py --methods sgd sam --steps 50
    python benchmarks/overhead.py --model wrn28-10 --dtype bfloat16 --trainer
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import pathlib
import platform
import sys
import time
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import sharpjax as sj
from sharpjax import models

from _common import git_commit  # benchmarks/ is the script's sys.path[0]

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
BATCH, LENGTH = 128, 40
LR = 0.05


def _cnn1d(num_classes, dtype):
  # The MNIST-1D convolutional baseline (5,210 parameters), [B, 40, 1] signals.
  return models.CNN1D(num_classes=num_classes, dtype=dtype), (LENGTH, 1)


def _resnet18(num_classes, dtype):
  # CIFAR ResNet-18 (11.2M parameters), on 32x32x3 images.
  return models.ResNet18(num_classes=num_classes, dtype=dtype), (32, 32, 3)


def _wrn28_10(num_classes, dtype):
  # WideResNet-28-10 (36.5M parameters), on 32x32x3 images.
  return models.WideResNet(num_classes=num_classes, dtype=dtype), (32, 32, 3)


# name -> (builder: (num_classes, dtype) -> (model, input shape), description)
MODELS = {
    "cnn1d": (_cnn1d, "CNN1D (3x conv 25, MNIST-1D 40x1)"),
    "resnet18": (_resnet18, "ResNet-18 (BatchNorm, 32x32x3)"),
    "wrn28-10": (_wrn28_10, "WideResNet-28-10 (BatchNorm, 32x32x3)"),
}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class Method:
  """One row of the table.

  Attributes:
    name: the row label.
    make_tx: builds the optax transformation.
    kind: how a step calls it: "plain" (no extra arguments), "sharpjax" (every
      extra argument a sharpjax transformation may use), "contrib_opaque" and
      "contrib_transparent" (optax.contrib.sam's two modes), "points" (the
      gradients at ``sj.gradient_points``, passed as ``point_passes=``).
    num_classes: the classifier width; the ratio is to SGD of the same width.
    num_examples: dataset size (SAF's bank rows; the ids of the batch are drawn
      from it).
  """

  name: str
  make_tx: Callable[[], Any]
  kind: str = "sharpjax"
  num_classes: int = 10
  num_examples: int = 4000
  note: str = ""
  # Why the row is not timed on a ResNet on XLA:CPU ("" = it is).
  resnet_cpu_skip: str = ""
  # Why the row cannot run through make_trainer ("" = it can).
  trainer_skip: str = ""
  # The note through make_trainer, where it differs from ``note``.
  trainer_note: str = ""


def _sgd():
  return optax.sgd(LR, momentum=0.9)


def _contrib_sam():
  return optax.contrib.sam(
      _sgd(), optax.chain(optax.contrib.normalize(), optax.sgd(0.05)),
      sync_period=2, opaque_mode=True)


def _contrib_sam_transparent():
  return optax.contrib.sam(
      _sgd(), optax.chain(optax.contrib.normalize(), optax.sgd(0.05)),
      sync_period=2, opaque_mode=False)


def _saf(num_examples, num_classes):
  # start_epoch=0: the penalty is on from the first timed step.
  return sj.saf(num_examples=num_examples, num_classes=num_classes,
                steps_per_epoch=num_examples // BATCH, start_epoch=0)


# Every method of the library has a row here; a new variant adds one line.
METHODS = [
    Method("sgd", _sgd, kind="plain"),
    Method("sam", lambda: optax.chain(sj.sam(rho=0.05), _sgd())),
    Method("asam", lambda: optax.chain(sj.asam(rho=0.5, eta=0.01), _sgd())),
    Method("gsam", lambda: optax.chain(sj.gsam(rho=0.05, alpha=0.1), _sgd())),
    Method("looksam", lambda: optax.chain(
        sj.looksam(rho=0.05, k=5, alpha=0.7), _sgd()),
           note="k=5: second pass on 1 step in 5 (lax.cond)",
           trainer_note="k=5: make_trainer picks the step on the host (two "
           "compiled steps, no conditional)",
           resnet_cpu_skip=(
               "not timed: XLA:CPU runs a convolution's backward inside "
               "lax.cond on a slow single-threaded path (jax-ml/jax#12868); "
               "compiling and running its first step took over 7 minutes")),
    Method("looksam (select)", lambda: optax.chain(
        sj.looksam(rho=0.05, k=5, alpha=0.7, branch="select"), _sgd()),
           note="k=5, branch='select': second pass on every step, kept on "
           "1 in 5 (for conv nets on XLA:CPU)",
           trainer_note="k=5: make_trainer picks the step on the host (two "
           "compiled steps, no conditional)"),
    Method("fsam", lambda: optax.chain(
        sj.fsam(rho=0.05, sigma=1.0, lam=0.95), _sgd())),
    Method("msam", lambda: optax.chain(sj.msam(rho=0.05, num_chunks=8), _sgd()),
           note="8 chunks of 16 (unrolled loop)"),
    Method("saf", lambda: optax.chain(_saf(4000, 10), _sgd()),
           note="bank 4,000 x 3 x 10"),
    Method("saf (50k x 100)", lambda: optax.chain(_saf(50_000, 100), _sgd()),
           num_classes=100, num_examples=50_000,
           note="bank 50,000 x 3 x 100 (CIFAR-100 size, 58 MiB)"),
    Method("mesa", lambda: optax.chain(sj.mesa(start_epoch=0), _sgd()),
           note="teacher forward every step (after start_epoch)"),
    Method("sagm", lambda: optax.chain(sj.sagm(rho=0.05, alpha=0.001), _sgd())),
    Method("esam", lambda: optax.chain(
        sj.esam(rho=0.05, beta=0.6, gamma=0.5), _sgd()),
           note="beta 0.6, gamma 0.5"),
    Method("ssam", lambda: optax.chain(
        sj.ssam(rho=0.05, sparsity=0.5, update_every=100), _sgd()),
           note="Fisher mask, sparsity 0.5, refreshed every 100 steps"),
    Method("ausam", lambda: optax.chain(
        sj.ausam(rho=0.05, keep=0.5, num_examples=4000), _sgd()),
           num_examples=4000, note="keep 0.5"),
    Method("momentum_sam", lambda: optax.chain(
        sj.momentum_sam(rho=0.3, momentum=0.9), _sgd()), kind="points",
           note="its one pass at the state's point, none at the parameters"),
    Method("sampa", lambda: optax.chain(
        sj.sampa(rho=0.1, lam=0.2, learning_rate=LR, momentum=0.9), _sgd()),
           kind="points",
           note="two independent passes, one after the other on one device"),
    Method("optax.contrib.sam (opaque)", _contrib_sam, kind="contrib_opaque",
           trainer_skip="needs grad_fn=, which make_trainer does not pass"),
    Method("optax.contrib.sam (transparent)", _contrib_sam_transparent,
           kind="contrib_transparent", note="two update calls in one jit",
           trainer_skip="two update calls per step"),
]
# Trainer mode times the hand-written SGD step beside the trainer's.
HAND_WRITTEN_SGD = Method("sgd (hand-written step)", _sgd, kind="plain",
                          note="jit of grad + update, no trainer")


def per_example_ce(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), labels)


def make_step(model: nn.Module, tx, kind: str):
  """A jitted ``step(carry, opt_state, batch) -> (carry, opt_state)``.

  ``carry`` is ``(params, model_state)``; ``model_state`` holds BatchNorm
  statistics (``{}`` for a model without any). The clean pass's statistics
  are kept, the perturbed pass's discarded, as ``sharpjax.training`` does.
  """

  def forward(params, model_state, x):
    if not model_state:
      return model.apply({"params": params}, x, train=True), model_state
    logits, new = model.apply({"params": params, **model_state}, x,
                              train=True, mutable=list(model_state))
    return logits, new

  def step_fn(body):
    def step(carry, opt_state, batch):
      params, model_state = carry

      def loss_fn(p, b):  # per-example losses, new model state as aux
        logits, new_state = forward(p, model_state, b["x"])
        return per_example_ce(logits, b["y"]), new_state

      def mean_grad(p):
        return jax.grad(lambda q: loss_fn(q, batch)[0].mean())(p)

      params, new_state, opt_state = body(params, model_state, opt_state,
                                          batch, loss_fn, mean_grad)
      return (params, new_state), opt_state
    return jax.jit(step, donate_argnums=(0, 1))

  def clean(params, model_state, batch):
    logits, new_state = forward(params, model_state, batch["x"])
    return per_example_ce(logits, batch["y"]).mean(), (logits, new_state)

  def clean_grads(params, model_state, batch):
    (_, (_, new_state)), grads = jax.value_and_grad(clean, has_aux=True)(
        params, model_state, batch)
    return grads, new_state

  if kind == "plain":
    def body(params, model_state, opt_state, batch, loss_fn, mean_grad):
      grads, new_state = clean_grads(params, model_state, batch)
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), new_state, opt_state

  elif kind == "contrib_opaque":
    def body(params, model_state, opt_state, batch, loss_fn, mean_grad):
      grads, new_state = clean_grads(params, model_state, batch)
      updates, opt_state = tx.update(grads, opt_state, params,
                                     grad_fn=lambda p, _: mean_grad(p))
      return optax.apply_updates(params, updates), new_state, opt_state

  elif kind == "contrib_transparent":
    def body(params, model_state, opt_state, batch, loss_fn, mean_grad):
      grads, new_state = clean_grads(params, model_state, batch)
      for call in range(2):  # adversarial call, then the real update
        if call:
          grads = mean_grad(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
      return params, new_state, opt_state

  elif kind == "sharpjax":
    def body(params, model_state, opt_state, batch, loss_fn, mean_grad):
      trajectory = sj.find_trajectory_state(opt_state)

      def total_loss(p):
        loss, (logits, new_state) = clean(p, model_state, batch)
        if trajectory is not None:
          loss = loss + sj.trajectory_penalty(
              opt_state, logits, batch["ids"],
              teacher_fn=lambda tp, _: model.apply(
                  {"params": tp, **model_state}, batch["x"], train=False))
        return loss, (logits, new_state)

      (loss, (logits, new_state)), grads = jax.value_and_grad(
          total_loss, has_aux=True)(params)
      updates, opt_state = tx.update(
          grads, opt_state, params, loss_fn=loss_fn, batch=batch,
          has_aux=True, logits=logits, ids=batch["ids"], value=loss)
      return optax.apply_updates(params, updates), new_state, opt_state

  elif kind == "points":
    # The gradients at the points the state gives (sj.gradient_points), none
    # at the parameters; BatchNorm statistics from the first point's pass.
    def body(params, model_state, opt_state, batch, loss_fn, mean_grad):
      taken = []
      for point in sj.gradient_points(opt_state, params):
        (loss, (_, new_state)), grads = jax.value_and_grad(
            clean, has_aux=True)(point, model_state, batch)
        taken.append(sj.PerturbedPass(loss, grads, None, new_state))
      updates, opt_state = tx.update(taken[0].grads, opt_state, params,
                                     point_passes=tuple(taken))
      return (optax.apply_updates(params, updates), taken[0].aux,
              opt_state)

  else:
    raise ValueError(f"unknown step kind {kind!r}")
  return step_fn(body)


def make_batch(num_classes: int, num_examples: int, input_shape=(40, 1),
               seed: int = 0, batch_size: int = BATCH):
  """One synthetic batch on the device (timing does not depend on values)."""
  rng = np.random.default_rng(seed)
  return {
      "x": jnp.asarray(rng.normal(size=(batch_size, *input_shape)),
                       jnp.float32),
      "y": jnp.asarray(rng.integers(0, num_classes, batch_size), jnp.int32),
      "ids": jnp.asarray(rng.choice(num_examples, batch_size, replace=False),
                         jnp.int32),
  }


@dataclasses.dataclass
class Runner:
  """A method's step and its state: ``step(state, batch) -> state``."""

  method: Method
  step: Callable
  state: Any
  batch: dict
  times: list[float] = dataclasses.field(default_factory=list)
  # Per window, the time over that of the baseline window run just before.
  ratios: list[float] = dataclasses.field(default_factory=list)
  temp_bytes: int | None = None
  # XLA's cost analysis of one compiled step: {"flops", "bytes_accessed"}
  # (through make_trainer, Trainer.step_cost: a host-scheduled method's
  # programs averaged over its period).
  cost: dict | None = None

  def run(self, num_steps: int) -> float:
    state = self.state
    start = time.perf_counter()
    for _ in range(num_steps):
      state = self.step(state, self.batch)
    jax.block_until_ready(state)
    elapsed = (time.perf_counter() - start) / num_steps
    self.state = state
    return elapsed


def compiled_cost(compiled) -> dict:
  """``{"flops", "bytes_accessed"}`` of a compiled step (XLA's count)."""
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):  # one per device program
    analysis = analysis[0] if analysis else {}
  analysis = analysis or {}
  return {"flops": float(analysis.get("flops", float("nan"))),
          "bytes_accessed": float(analysis.get("bytes accessed",
                                               float("nan")))}


def _temp_bytes(compiled) -> int | None:
  try:
    return int(compiled.memory_analysis().temp_size_in_bytes)
  except Exception:  # memory analysis is not available on every backend
    return None


def build(method: Method, warmup: int, model_name: str = "cnn1d",
          dtype: str = "float32", trainer: bool = False,
          batch_size: int = BATCH, models_table: dict | None = None
          ) -> Runner:
  """A method's compiled, warmed-up step on ``model_name``.

  ``models_table`` maps model names to ``(builder, description)`` as
  ``MODELS`` does (default ``MODELS``; accelerator.py's smoke mode passes
  tiny stand-ins).
  """
  model, input_shape = (models_table or MODELS)[model_name][0](
      method.num_classes, DTYPES[dtype])
  batch = make_batch(method.num_classes, method.num_examples, input_shape,
                     batch_size=batch_size)
  tx = method.make_tx()
  if trainer and method is not HAND_WRITTEN_SGD:
    from sharpjax import training  # pylint: disable=g-import-not-at-top
    t = training.make_trainer(model, tx)
    state = t.init(jax.random.PRNGKey(0), batch)
    step = lambda s, b: t.step(s, b)[0]
    temp = None
    cost = {k: float(v) for k, v in t.step_cost(state, batch).items()
            if k in ("flops", "bytes_accessed")}
  else:
    variables = dict(model.init(jax.random.PRNGKey(0), batch["x"],
                                train=False))
    params = variables.pop("params")
    # Copy: some states alias the parameters (contrib.sam's cache), and both
    # are donated.
    opt_state = jax.tree.map(jnp.copy, tx.init(params))
    jitted = make_step(model, tx, method.kind)
    state = ((params, variables), opt_state)
    compiled = jitted.lower(*state, batch).compile()
    temp, cost = _temp_bytes(compiled), compiled_cost(compiled)
    step = lambda s, b: jitted(*s, b)
  runner = Runner(method, step, state, batch, temp_bytes=temp, cost=cost)
  if warmup:
    runner.run(warmup)
  return runner


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--methods", nargs="*", default=None,
                      help="row names to run (default: all); SGD is always run")
  # Many short windows, each paired with an SGD window just before it: the
  # machine's speed drifts over seconds, and short pairs see the same speed.
  parser.add_argument("--steps", type=int, default=30,
                      help="steps per timed window (default 30)")
  parser.add_argument("--batch", type=int, default=BATCH,
                      help=f"batch size (default {BATCH}; smaller only for "
                      "smoke runs)")
  parser.add_argument("--repeats", type=int, default=40,
                      help="timed windows per method, each after an SGD "
                      "window, the methods interleaved (default 40)")
  parser.add_argument("--warmup", type=int, default=10)
  parser.add_argument("--model", choices=sorted(MODELS), default="cnn1d",
                      help="cnn1d (default), resnet18 or wrn28-10 (32x32x3)")
  parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                      help="computation dtype of the model (parameters stay "
                      "float32)")
  parser.add_argument("--trainer", action="store_true",
                      help="every method through sharpjax.training."
                      "make_trainer, beside a hand-written SGD step")
  parser.add_argument("--out", type=pathlib.Path, default=RESULTS)
  args = parser.parse_args(argv)
  if args.steps < 1 or args.repeats < 1 or args.batch < 1:
    parser.error("--steps, --repeats and --batch must be >= 1")
  if args.warmup < 0:
    parser.error("--warmup must be >= 0")

  methods = METHODS
  if args.methods:
    known = {m.name for m in METHODS}
    unknown = sorted(set(args.methods) - known)
    if unknown:
      parser.error(f"unknown methods {unknown}; known: {sorted(known)}")
    methods = [m for m in METHODS if m.name in args.methods]
  baselines = sgd_baselines(methods)
  rows = list(baselines.values()) + [m for m in methods if m.name != "sgd"]
  if args.trainer:
    rows.insert(1, HAND_WRITTEN_SGD)
  skipped = []
  if args.model != "cnn1d" and jax.default_backend() == "cpu":
    skipped = [(m, m.resnet_cpu_skip) for m in rows if m.resnet_cpu_skip]
  if args.trainer:
    skipped += [(m, m.trainer_skip) for m in rows if m.trainer_skip]
  rows = [m for m in rows if m not in {s for s, _ in skipped}]

  print(f"compiling {len(rows)} steps...", file=sys.stderr)
  runners = []
  for m in rows:
    start = time.perf_counter()
    runners.append(build(m, args.warmup, args.model, args.dtype, args.trainer,
                         args.batch))
    print(f"  {m.name}: compiled and warmed up in "
          f"{time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
  baseline_of = pair_with_baselines(runners, baselines)
  for r in range(args.repeats):
    time_windows(runners, baseline_of, args.steps)
    print(f"repeat {r + 1}/{args.repeats} done", file=sys.stderr)

  results = []
  for runner in runners:
    m = runner.method
    quartiles = np.percentile(runner.ratios, [25, 50, 75])
    results.append(dict(
        **flops_columns(runner.cost, baseline_of[m.name].cost),
        method=m.name, num_classes=m.num_classes,
        ms_per_step=1e3 * min(runner.times),
        ratio_to_sgd=float(quartiles[1]),
        ratio_iqr=[float(quartiles[0]), float(quartiles[2])],
        ratio_of_minima=min(runner.times) / min(
            baseline_of[m.name].times),
        all_ms=[1e3 * t for t in runner.times],
        temp_bytes=runner.temp_bytes,
        note=m.trainer_note if args.trainer and m.trainer_note else m.note))
  for m, why in skipped:
    results.append(dict(
        flops_per_step=None, flops_ratio=None, bytes_accessed=None,
        method=m.name, num_classes=m.num_classes, ms_per_step=None,
        ratio_to_sgd=None, ratio_iqr=None, ratio_of_minima=None, all_ms=[],
        temp_bytes=None, note=why))

  meta = dict(
      date=datetime.datetime.now(datetime.timezone.utc).isoformat(
          timespec="seconds"),
      commit=git_commit(), jax=jax.__version__, optax=optax.__version__,
      device=str(jax.devices()[0].device_kind), platform=platform.platform(),
      cpu_count=os.cpu_count(), batch=args.batch, steps=args.steps,
      repeats=args.repeats, model=MODELS[args.model][1], dtype=args.dtype,
      step_kind="make_trainer" if args.trainer else "hand-written",
      backend=jax.default_backend())
  table = markdown(results, meta)
  print(table)
  args.out.mkdir(parents=True, exist_ok=True)
  stem = results_stem(args.model, args.dtype, args.trainer,
                      meta["backend"], meta["device"])
  (args.out / f"{stem}.json").write_text(
      json.dumps(dict(meta=meta, results=results), indent=2) + "\n")
  (args.out / f"{stem}.md").write_text(table + "\n")


def flops_columns(cost: dict | None, baseline: dict | None) -> dict:
  """A row's compute figures: FLOPs per step and their ratio to SGD's."""
  flops = None if cost is None else cost.get("flops")
  base = None if baseline is None else baseline.get("flops")
  ratio = (flops / base if flops is not None and base and np.isfinite(flops)
           and np.isfinite(base) else None)
  return dict(flops_per_step=flops, flops_ratio=ratio,
              bytes_accessed=None if cost is None else cost.get(
                  "bytes_accessed"))


def sgd_baselines(methods) -> dict[int, Method]:
  """One SGD baseline per classifier width of ``methods`` (and of 10)."""
  # Each classifier width needs its own SGD baseline.
  widths = sorted({m.num_classes for m in methods} | {10})
  return {
      w: Method("sgd" if w == 10 else f"sgd ({w} classes)", _sgd, kind="plain",
                num_classes=w) for w in widths}


def pair_with_baselines(runners: list[Runner],
                        baselines: dict[int, Method]) -> dict[str, Runner]:
  """``{method name: the runner of the SGD baseline of its width}``."""
  return {runner.method.name: next(
      b for b in runners if b.method is baselines[runner.method.num_classes])
          for runner in runners}


def time_windows(runners: list[Runner], baseline_of: dict[str, Runner],
                 steps: int) -> None:
  """One repeat: a window of every method, each after its baseline's window.

  A baseline's own windows are the ones run before the methods it pairs
  with (or one window, when it pairs with none); its ratios are 1.
  """
  paired = {baseline_of[r.method.name].method.name for r in runners
            if baseline_of[r.method.name] is not r}
  for runner in runners:
    baseline = baseline_of[runner.method.name]
    if baseline is runner:
      if runner.method.name not in paired:
        runner.times.append(runner.run(steps))
        runner.ratios.append(1.0)
      continue
    before = baseline.run(steps)
    baseline.times.append(before)
    baseline.ratios.append(1.0)
    runner.times.append(runner.run(steps))
    runner.ratios.append(runner.times[-1] / before)


def results_stem(model: str, dtype: str, trainer: bool, backend: str,
                 device: str) -> str:
  """The results file name: one per model / dtype / step kind / device kind.

  The float32 hand-written CPU tables keep their names (``overhead``,
  ``overhead-resnet18``).
  """
  parts = ["overhead"]
  if model != "cnn1d":
    parts.append(model)
  if dtype != "float32":
    parts.append(dtype)
  if trainer:
    parts.append("trainer")
  if backend != "cpu":
    parts.append(device_slug(device))
  return "-".join(parts)


def device_slug(device_kind: str) -> str:
  """``NVIDIA H200`` -> ``nvidia-h200``: the device part of a file name."""
  return "".join(c if c.isalnum() else "-"
                 for c in device_kind.lower()).strip("-") or "unknown"


def markdown(results, meta) -> str:
  where = (f"{meta['device']} ({meta['cpu_count']} cores)"
           if meta.get("backend", "cpu") == "cpu" else meta["device"])
  lines = [
      f"Per-step time: min over {meta['repeats']} windows of {meta['steps']} "
      "steps after compilation; ratio to SGD: median over the windows of the "
      "method's time over the SGD window run just before it (interquartile "
      f"range beside it); {meta['model']}, batch {meta['batch']}, "
      f"{meta.get('dtype', 'float32')} compute, "
      f"{meta.get('step_kind', 'hand-written')} steps; {where}, "
      f"jax {meta['jax']}, commit {meta['commit']}, {meta['date']}. "
      "Compute x SGD: XLA's FLOP count of one compiled step over SGD's (what "
      "a compute-bound accelerator's time ratio approaches; it does not see "
      "dispatch or memory-bound work).",
      "",
      "| method | classes | ms / step | ratio to SGD | IQR | compute x SGD "
      "| GFLOP / step | XLA temp MiB | note |",
      "|---|---:|---:|---:|---:|---:|---:|---:|---|",
  ]
  for r in results:
    temp = "" if r["temp_bytes"] is None else f"{r['temp_bytes'] / 2**20:.2f}"
    compute, gflops = flops_cells(r)
    if r["ms_per_step"] is None:
      lines.append(f"| {r['method']} | {r['num_classes']} | | | | {compute} "
                   f"| {gflops} | | {r['note']} |")
      continue
    iqr = r.get("ratio_iqr")
    spread = "" if iqr is None else f"{iqr[0]:.2f}-{iqr[1]:.2f}"
    lines.append(
        f"| {r['method']} | {r['num_classes']} | {r['ms_per_step']:.3f} | "
        f"{r['ratio_to_sgd']:.2f}x | {spread} | {compute} | {gflops} | "
        f"{temp} | {r['note']} |")
  return "\n".join(lines)


def flops_cells(row: dict) -> tuple[str, str]:
  """The "compute x SGD" and "GFLOP / step" cells of a row ("" if none)."""
  ratio, flops = row.get("flops_ratio"), row.get("flops_per_step")
  return ("" if ratio is None else f"{ratio:.2f}x",
          "" if flops is None else f"{flops / 1e9:.3g}")


if __name__ == "__main__":
  main()
