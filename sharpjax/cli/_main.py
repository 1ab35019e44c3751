"""The ``sharpjax`` command: ``compare``, ``train`` and ``measure``."""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any, Optional, Sequence

from sharpjax.cli import _methods
from sharpjax.cli import _setup

_INT_HYPER = {"start_epoch", "delay_epochs", "update_every",
              "transition_steps", "k", "num_chunks", "num_fisher_samples"}
_STR_HYPER = {"mask"}

EPILOG_METHODS = """\
methods (hyper-parameters and defaults; "auto" is set from the budget):
{table}

Hyper-parameter flags apply to every selected method that has that
parameter (e.g. --rho sets SAM's, GSAM's, ... radius); --set METHOD.PARAM=V
sets one method's (e.g. --set asam.rho=1.0 --set looksam.alpha=0.5).

"auto" values, scaled to the run so that short runs stay meaningful:
  saf/mesa start_epoch = max(1, epochs // 6); saf delay_epochs =
  clip(epochs // 10, 1, 3): the paper's 5 and 3 at 30 epochs (SAF's penalty
  starts at epoch max(start_epoch, delay_epochs), the first with a target).
  mesa decay = 1 - 16 / total_steps (EMA horizon 1/16 of the run, the
  paper's 5,000 of 78,000 steps). ssam update_every = one epoch of steps.
  ausam transition_steps = 15% of the run (the paper's 30 of 200 epochs).
"""


def _methods_table() -> str:
  lines = []
  for name in _methods.names():
    m = _methods.get(name)
    hp = ", ".join(f"{k}={v}" for k, v in m.defaults.items()) or "-"
    lines.append(f"  {name:8s} {m.summary}\n  {'':8s}   [{hp}]")
  return "\n".join(lines)


def _auto_or(kind):
  def parse(text: str):
    if text == _methods.AUTO:
      return text
    return kind(text)
  parse.__name__ = kind.__name__
  return parse


def _parse_value(text: str) -> Any:
  if text == _methods.AUTO:
    return text
  for kind in (int, float):
    try:
      return kind(text)
    except ValueError:
      pass
  return text


def _add_common(p: argparse.ArgumentParser, epochs_default: int) -> None:
  d = _setup.Config()
  g = p.add_argument_group("data, model and budget")
  g.add_argument("--data", default=d.data,
                 help="data set: " + ", ".join(
                     f"{k} ({v[1]})" for k, v in _setup.DATA.items())
                 + f" (default {d.data})")
  g.add_argument("--data-dir", default=None,
                 help="directory of data read from disk (cifar10/cifar100: "
                 "the python-pickle release or a .npz; never downloaded)")
  g.add_argument("--num-examples", type=int, default=None,
                 help="examples to generate/keep (mnist1d: train + test, "
                 "default 5000 = 4000 train / 1000 test)")
  g.add_argument("--label-noise", type=float, default=d.label_noise,
                 help="fraction of training labels replaced by another class "
                 "(default 0)")
  g.add_argument("--model", default=d.model,
                 help="model: " + ", ".join(
                     f"{k} ({v[1]})" for k, v in _setup.MODELS.items())
                 + f" (default {d.model})")
  g.add_argument("--width", type=int, default=None,
                 help="model width (cnn1d channels, mlp hidden units)")
  g.add_argument("--batch-size", type=int, default=d.batch_size,
                 help=f"batch size (default {d.batch_size})")
  g.add_argument("--epochs", type=int, default=epochs_default,
                 help=f"epochs (default {epochs_default})")
  g.add_argument("--lr", type=float, default=d.lr,
                 help=f"peak learning rate, cosine decay to 0 (default {d.lr})")
  g.add_argument("--momentum", type=float, default=d.momentum,
                 help=f"SGD momentum (default {d.momentum})")
  g.add_argument("--weight-decay", type=float, default=d.weight_decay,
                 help=f"weight decay (default {d.weight_decay})")
  g.add_argument("--warmup-epochs", type=int, default=d.warmup_epochs,
                 help="linear learning-rate warm-up (default 0)")
  h = p.add_argument_group(
      "method hyper-parameters (default: each method's own, see below)")
  for name in _methods.all_hyper_names():
    kind = int if name in _INT_HYPER else str if name in _STR_HYPER else float
    users = [f"{m} {_methods.get(m).defaults[name]}"
             for m in _methods.names() if name in _methods.get(m).defaults]
    h.add_argument("--" + name.replace("_", "-"), dest="hp_" + name,
                   type=_auto_or(kind), default=None, metavar=name.upper(),
                   help="defaults: " + ", ".join(users))
  h.add_argument("--set", action="append", default=[], metavar="METHOD.PARAM=V",
                 help="one method's hyper-parameter (repeatable)")
  o = p.add_argument_group("output")
  o.add_argument("--progress", choices=("auto", "on", "off"), default="auto",
                 help="progress bars (auto: only when stdout is a terminal)")


def build_parser() -> argparse.ArgumentParser:
  fmt = argparse.RawDescriptionHelpFormatter
  epilog = EPILOG_METHODS.format(table=_methods_table())
  parser = argparse.ArgumentParser(
      prog="sharpjax", formatter_class=fmt,
      description="Train, compare and measure sharpness-aware methods.",
      epilog="Run `sharpjax COMMAND --help` for each command's options.")
  sub = parser.add_subparsers(dest="command", metavar="COMMAND")
  sub.required = True

  c = sub.add_parser(
      "compare", formatter_class=fmt, epilog=epilog,
      help="train several methods on the same data, model, seeds and budget",
      description=(
          "Trains every method on the same data, model, seeds and budget and "
          "prints a table: test accuracy (mean ± std over seeds), final "
          "train loss, time per step (after compilation, the fastest "
          "epoch's, median over seeds) and its ratio to SGD's in the same run, peak host "
          "memory, optimizer-state size, and the top Hessian eigenvalue at "
          "the end. Writes results.json, results.md and PNG plots to --out."
          "\n\nThe defaults (MNIST-1D, the 1D CNN, every method, 3 seeds, "
          "20 epochs of 31 steps of 128) finish in about 2-4 minutes on 2 "
          "CPU cores."))
  _add_common(c, epochs_default=20)
  c.add_argument("--methods", nargs="+", default=list(_methods.DEFAULT_COMPARE),
                 metavar="METHOD",
                 help="methods (space or comma separated; default: all: "
                 + " ".join(_methods.DEFAULT_COMPARE) + "); sgd, the "
                 "baseline of the cost ratio, is added when missing")
  c.add_argument("--seeds", type=int, default=3,
                 help="number of seeds, 0..N-1 (default 3)")
  c.add_argument("--out", default="sharpjax-compare",
                 help="output directory (default ./sharpjax-compare)")
  c.add_argument("--no-sharpness", action="store_true",
                 help="skip the top Hessian eigenvalue at the end of each run")
  c.add_argument("--sharpness-examples", type=int, default=500,
                 help="training examples of the Hessian measure (default "
                 "500)")
  c.add_argument("--trace-probes", type=int, default=0,
                 help="also estimate the Hessian trace at the end of each run "
                 "with this many Hutchinson probes (default 0: off)")

  t = sub.add_parser(
      "train", formatter_class=fmt, epilog=epilog,
      help="one method, one run, with orbax checkpoints and --resume",
      description=(
          "Trains one method with one seed, saving an orbax checkpoint every "
          "--save-every steps and at the end. --resume continues from the "
          "latest checkpoint bit-exactly (parameters, optimizer state with "
          "SAF's logit bank or MESA's teacher, PRNG keys, data position and "
          "the epoch history). Ctrl-C or a crash leaves the last complete "
          "checkpoint usable."))
  _add_common(t, epochs_default=20)
  t.add_argument("--method", default="sam",
                 help="method (default sam): " + ", ".join(_methods.names()))
  t.add_argument("--seed", type=int, default=0, help="seed (default 0)")
  t.add_argument("--out", default="sharpjax-train",
                 help="output directory (default ./sharpjax-train)")
  t.add_argument("--ckpt-dir", default=None,
                 help="checkpoint directory (default OUT/checkpoints)")
  t.add_argument("--save-every", type=int, default=None,
                 help="steps between checkpoints (default: one epoch)")
  t.add_argument("--keep-checkpoints", type=int, default=2,
                 help="checkpoints kept (default 2)")
  t.add_argument("--resume", action="store_true",
                 help="continue from the latest checkpoint in --ckpt-dir")
  t.add_argument("--max-steps", type=int, default=None,
                 help="stop after this many steps in total (checkpointed; "
                 "continue later with --resume)")

  m = sub.add_parser(
      "measure", formatter_class=fmt,
      help="Hessian sharpness of a checkpoint's parameters",
      description=(
          "Top Hessian eigenvalues (power iteration) and trace (Hutchinson) "
          "of the training loss at a `sharpjax train` checkpoint, model in "
          "eval mode, on the run's training data; optionally the spectral "
          "density (stochastic Lanczos quadrature) and a 1D loss-landscape "
          "slice as PNGs."))
  m.add_argument("checkpoint",
                 help="a checkpoint directory of `sharpjax train` (or one of "
                 "its step subdirectories)")
  m.add_argument("--step", type=int, default=None,
                 help="which checkpoint (default: the latest)")
  m.add_argument("--num-examples", type=int, default=1000,
                 help="training examples used (default 1000)")
  m.add_argument("--top-k", type=int, default=1,
                 help="number of top eigenvalues (default 1)")
  m.add_argument("--probes", type=int, default=100,
                 help="Hutchinson probes for the trace (default 100)")
  m.add_argument("--density", action="store_true",
                 help="also the spectral density (density.png)")
  m.add_argument("--landscape", action="store_true",
                 help="also a filter-normalised 1D slice (landscape.png)")
  m.add_argument("--seed", type=int, default=0, help="seed of the probes")
  m.add_argument("--out", default=None,
                 help="output directory (default: CHECKPOINT/../measure)")
  return parser


def _split_methods(values: Sequence[str]) -> list[str]:
  out = []
  for v in values:
    out += [x.strip() for x in v.split(",") if x.strip()]
  return out


def _config(args) -> _setup.Config:
  config = _setup.Config(
      data=args.data, num_examples=args.num_examples,
      label_noise=args.label_noise, model=args.model, width=args.width,
      batch_size=args.batch_size, epochs=args.epochs, lr=args.lr,
      momentum=args.momentum, weight_decay=args.weight_decay,
      warmup_epochs=args.warmup_epochs,
      sharpness_examples=getattr(args, "sharpness_examples", 500),
      data_dir=getattr(args, "data_dir", None))
  _setup.check_names(config)
  _setup.check_finite_config(config)
  return config


def _flags(args) -> dict:
  return {k[3:]: v for k, v in vars(args).items() if k.startswith("hp_")}


def _overrides(args, methods) -> dict:
  """``{method: {param: value}}`` from ``--set METHOD.PARAM=VALUE``."""
  out: dict = {}
  for item in args.set:
    if "=" not in item or "." not in item.split("=", 1)[0]:
      raise ValueError(f"--set expects METHOD.PARAM=VALUE, got {item!r}.")
    key, value = item.split("=", 1)
    method, param = key.split(".", 1)
    _methods.get(method)
    if method not in methods:
      raise ValueError(f"--set {item}: method {method!r} is not selected "
                       f"({', '.join(methods)}).")
    out.setdefault(method, {})[param] = _parse_value(value)
  return out


def _show_progress(args) -> bool:
  if args.progress == "on":
    return True
  if args.progress == "off":
    return False
  return sys.stdout.isatty() and sys.stderr.isatty()


def _log(msg: str) -> None:
  print(msg, flush=True)


# ---------------------------------------------------------------------------
# compare
# ---------------------------------------------------------------------------


def cmd_compare(args) -> int:
  from sharpjax.cli import _report  # pylint: disable=g-import-not-at-top
  from sharpjax.cli import _runner  # pylint: disable=g-import-not-at-top

  t_start = time.perf_counter()
  started = _report.utc_now()
  methods = _split_methods(args.methods)
  for m in methods:
    _methods.get(m)
  if len(set(methods)) != len(methods):
    raise ValueError(f"--methods lists a method twice: {methods}.")
  if "sgd" not in methods:
    methods.insert(0, "sgd")
    _log("note: sgd added, the baseline of the cost ratio.")
  if args.seeds < 1:
    raise ValueError(f"--seeds must be >= 1, got {args.seeds}.")
  config = _config(args)
  overrides = _overrides(args, methods)
  flags = _flags(args)
  env = _setup.make_env(config)
  seeds = list(range(args.seeds))
  show = _show_progress(args)
  _log(f"sharpjax compare: {config.data} ({len(env.train)} train / "
       f"{len(env.test)} test), {config.model}, {len(methods)} methods x "
       f"{len(seeds)} seeds, {config.epochs} epochs x {env.steps_per_epoch} "
       f"steps of {config.batch_size}")
  runners = {m: _runner.MethodRunner(env, m, flags, overrides.get(m, {}))
             for m in methods}
  probe = (None if args.no_sharpness
           else _runner.SharpnessProbe(env, config.sharpness_examples))
  results = []
  n_runs, i = len(methods) * len(seeds), 0
  # Seed-major order: every method's timing sees the machine's drift alike.
  for seed in seeds:
    for m in methods:
      i += 1
      runner = runners[m]
      state, progress, timing = runner.run(
          seed, show_progress=show, label=f"{m} seed {seed}")
      sharp = None if probe is None else probe.top_eigenvalue(state, seed)
      trace = (probe.trace(state, seed, args.trace_probes)
               if probe is not None and args.trace_probes else None)
      r = _runner.summarize_run(m, seed, runner.hyper, progress, timing,
                                state, sharp, trace)
      del state
      results.append(r)
      f = r.final
      _log(f"[{i:>{len(str(n_runs))}}/{n_runs}] {m:8s} seed {seed}: test acc "
           f"{100 * f['test_accuracy']:.2f}%  train loss "
           f"{f['train_loss']:.4f}  {r.ms_per_step:.2f} ms/step"
           + ("" if sharp is None else f"  lambda_max {sharp:.2f}")
           + f"  ({r.wall_s:.1f} s)")

  rows = _report.summarize(results, methods)
  os.makedirs(args.out, exist_ok=True)
  device = _report.device_info()
  versions = _report.versions()
  wall = time.perf_counter() - t_start
  header = (
      f"{config.data} ({len(env.train)} train / {len(env.test)} test"
      + (f", {config.label_noise:.0%} label noise" if config.label_noise
         else "") + f"), {config.model}, {config.epochs} epochs x "
      f"{env.steps_per_epoch} steps of {config.batch_size}, lr {config.lr} "
      f"cosine, {len(seeds)} seeds; {device['platform']} "
      f"({device['device_kind']}, {device['cpu_cores']} cores), jax "
      f"{versions['jax']}; total {wall:.0f} s. Time per step: the fastest "
      "epoch's after compilation, median over seeds; λ_max: top Hessian eigenvalue of the "
      f"training loss on {config.sharpness_examples} training examples at "
      "the end; peak RSS: the process's peak resident memory (getrusage) "
      "when the method's last run ended; state: parameters + optimizer "
      "state (SAF's bank, MESA's teacher).")
  table = _report.markdown(rows, header)
  payload = {
      "command": "sharpjax " + " ".join(args.argv),
      "started": started, "finished": _report.utc_now(), "wall_s": wall,
      "config": config.to_dict(), "methods": methods, "seeds": seeds,
      "data": {"train": len(env.train), "test": len(env.test),
               "num_classes": env.num_classes,
               "steps_per_epoch": env.steps_per_epoch},
      "hyper": {m: runners[m].hyper for m in methods},
      "table": rows, "runs": [r.to_dict() for r in results],
      "versions": versions, "device": device,
  }
  _report.write_json(os.path.join(args.out, "results.json"), payload)
  with open(os.path.join(args.out, "results.md"), "w") as fh:
    fh.write(table)
  title = (f"{config.data}, {config.model}, {config.epochs} epochs, "
           f"{len(seeds)} seeds (mean ± std)")
  pngs = _report.plot(results, rows, methods, args.out, title)
  print()
  print(_report.markdown(rows))
  _log(f"wrote {os.path.join(args.out, 'results.json')}, results.md, "
       + ", ".join(os.path.basename(p) for p in pngs) + f" ({wall:.0f} s)")
  return 0


# ---------------------------------------------------------------------------
# train
# ---------------------------------------------------------------------------


def cmd_train(args) -> int:
  from sharpjax.cli import _checkpoint  # pylint: disable=g-import-not-at-top
  from sharpjax.cli import _report  # pylint: disable=g-import-not-at-top
  from sharpjax.cli import _runner  # pylint: disable=g-import-not-at-top

  _methods.get(args.method)
  config = _config(args)
  overrides = _overrides(args, [args.method]).get(args.method, {})
  env = _setup.make_env(config)
  runner = _runner.MethodRunner(env, args.method, _flags(args), overrides)
  save_every = args.save_every or env.steps_per_epoch
  if save_every < 1:
    raise ValueError(f"--save-every must be >= 1, got {save_every}.")
  ckpt_dir = args.ckpt_dir or os.path.join(args.out, "checkpoints")
  ckpt = _checkpoint.Checkpointer(ckpt_dir, keep=max(1, args.keep_checkpoints))
  run_def = {"config": config.to_dict(), "method": args.method,
             "hyper": runner.hyper, "seed": args.seed,
             "steps_per_epoch": env.steps_per_epoch}
  if args.resume:
    step, _ = ckpt.check_run(run_def)  # before building anything
    state, meta = ckpt.restore(runner.init_state(args.seed), run_def, step)
    progress = _runner.Progress.from_dict(meta["progress"])
    if int(state.step) != progress.step:
      raise _checkpoint.CheckpointError(
          f"checkpoint {ckpt_dir}: the state is at step {int(state.step)} but "
          f"its metadata says {progress.step} (corrupt).")
    _log(f"resuming {args.method} seed {args.seed} from step {progress.step} "
         f"(epoch {progress.step // env.steps_per_epoch + 1}, batch "
         f"{progress.step % env.steps_per_epoch}) in {ckpt_dir}")
  else:
    if ckpt.steps():
      raise _checkpoint.CheckpointError(
          f"{ckpt_dir} already holds checkpoints (steps {ckpt.steps()}): pass "
          "--resume to continue that run, or choose another --ckpt-dir.")
    state, progress = None, None
  total = runner.total_steps
  saved = {"step": None}

  def position(step):
    # Where the data iterator is: DataLoader(seed).batch(epoch, batch) is the
    # next batch (the order of an epoch depends on (seed, epoch) alone).
    return {"data_position": {"epoch": step // env.steps_per_epoch,
                              "batch": step % env.steps_per_epoch,
                              "steps_per_epoch": env.steps_per_epoch,
                              "loader_seed": args.seed}}

  def on_step(st, prog):
    if prog.step % save_every == 0 or prog.step == total:
      ckpt.save(st, run_def, prog.to_dict(), position(prog.step))
      saved["step"] = prog.step

  _log(f"sharpjax train: {args.method} seed {args.seed} on {config.data} "
       f"({len(env.train)} train), {config.model}, {config.epochs} epochs x "
       f"{env.steps_per_epoch} steps; checkpoints every {save_every} steps "
       f"in {ckpt_dir}")
  t0 = time.perf_counter()
  try:
    state, progress, timing = runner.run(
        args.seed, state, progress, stop_at=args.max_steps, on_step=on_step,
        sync_every=save_every, show_progress=_show_progress(args),
        label=f"{args.method} seed {args.seed}")
  except KeyboardInterrupt:
    steps = ckpt.steps()
    last = steps[-1] if steps else None
    print(f"\ninterrupted. The last checkpoint is step {last} in {ckpt_dir}; "
          "run the same command with --resume to continue.",
          file=sys.stderr, flush=True)
    return 130
  ckpt.save(state, run_def, progress.to_dict(), position(progress.step))
  result = _runner.summarize_run(args.method, args.seed, runner.hyper,
                                 progress, timing, state, None)
  os.makedirs(args.out, exist_ok=True)
  payload = {"command": "sharpjax " + " ".join(args.argv),
             "finished": _report.utc_now(), "run": run_def,
             "complete": progress.step >= total, "checkpoint_dir": ckpt_dir,
             "result": result.to_dict(), "versions": _report.versions(),
             "device": _report.device_info()}
  _report.write_json(os.path.join(args.out, "train.json"), payload)
  f = result.final
  done = "done" if progress.step >= total else "stopped (--max-steps)"
  _log(f"{done} at step {progress.step}/{total} in "
       f"{time.perf_counter() - t0:.1f} s"
       + (f": test acc {100 * f['test_accuracy']:.2f}%, train loss "
          f"{f['train_loss']:.4f}" if f else "")
       + f"; checkpoint {ckpt.steps()[-1]} in {ckpt_dir}")
  return 0


# ---------------------------------------------------------------------------
# measure
# ---------------------------------------------------------------------------


def cmd_measure(args) -> int:
  import jax  # pylint: disable=g-import-not-at-top
  from sharpjax import measures  # pylint: disable=g-import-not-at-top
  from sharpjax.cli import _checkpoint  # pylint: disable=g-import-not-at-top
  from sharpjax.cli import _report  # pylint: disable=g-import-not-at-top
  from sharpjax.cli import _runner  # pylint: disable=g-import-not-at-top

  path, step = os.path.abspath(args.checkpoint), args.step
  if not os.path.isdir(path):
    raise _checkpoint.CheckpointError(f"no checkpoint directory {path}.")
  base = os.path.basename(path.rstrip(os.sep))
  if base.isdigit() and os.path.isdir(os.path.join(path, "state")):
    path, step = os.path.dirname(path), int(base)
  ckpt = _checkpoint.Checkpointer(path)
  step, meta = ckpt.read_meta(step)
  run = meta["run"]
  config = _setup.Config.from_dict(run["config"])
  env = _setup.make_env(config)
  runner = _runner.MethodRunner(env, run["method"], {}, run["hyper"])
  state, meta = ckpt.restore(runner.init_state(run["seed"]), run, step)
  probe = _runner.SharpnessProbe(env, args.num_examples)
  fixed = state.model_state
  loss = lambda p, b: probe.loss_fn((p, fixed), b)
  key = jax.random.PRNGKey(args.seed)
  k1, k2, k3, k4 = jax.random.split(key, 4)
  t0 = time.perf_counter()
  eig = measures.hessian_eigenpairs(loss, state.params, probe.batch, k1,
                                    k=args.top_k, max_iters=100, tol=1e-4)
  tr = measures.hessian_trace(loss, state.params, probe.batch, k2,
                              num_probes=args.probes)
  out = {
      "checkpoint": path, "step": step, "run": run,
      "examples": int(len(probe.batch["y"])),
      "top_eigenvalues": [float(x) for x in eig.eigenvalues],
      "trace": float(tr.trace), "trace_stderr": float(tr.trace_stderr),
      "train_loss": float(loss(state.params, probe.batch).mean()),
      **runner.evaluate(state),
  }
  out_dir = args.out or os.path.join(os.path.dirname(path), "measure")
  os.makedirs(out_dir, exist_ok=True)
  pngs = []
  if args.density or args.landscape:
    import matplotlib  # pylint: disable=g-import-not-at-top
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  if args.density:
    dens = measures.spectral_density(loss, state.params, probe.batch, k3)
    fig = measures.plot_spectral_density(dens, label=run["method"])
    fig = getattr(fig, "figure", fig)
    pngs.append(os.path.join(out_dir, "density.png"))
    fig.savefig(pngs[-1], dpi=90)
    plt.close(fig)
    out["density"] = {"grid": dens.grid, "density": dens.density}
  if args.landscape:
    sl = measures.landscape_1d(loss, state.params, probe.batch, k4,
                               num_points=41)
    fig = measures.plot_slice_1d(sl, label=run["method"])
    fig = getattr(fig, "figure", fig)
    pngs.append(os.path.join(out_dir, "landscape.png"))
    fig.savefig(pngs[-1], dpi=90)
    plt.close(fig)
    out["landscape"] = {k: v for k, v in sl._asdict().items()}
  out["measure_s"] = time.perf_counter() - t0
  out["versions"] = _report.versions()
  out["device"] = _report.device_info()
  out = jax.tree.map(lambda x: x.tolist() if hasattr(x, "tolist") else x, out)
  _report.write_json(os.path.join(out_dir, "measure.json"), out)
  _log(f"{run['method']} seed {run['seed']}, step {step}: top Hessian "
       "eigenvalue" + ("s " if args.top_k > 1 else " ")
       + ", ".join(f"{x:.4g}" for x in out["top_eigenvalues"])
       + f"; trace {out['trace']:.4g} ± {out['trace_stderr']:.2g} "
       f"({args.probes} probes) on {out['examples']} training examples; "
       f"train loss {out['train_loss']:.4f}, test acc "
       f"{100 * out['test_accuracy']:.2f}%")
  _log(f"wrote {os.path.join(out_dir, 'measure.json')}"
       + "".join(f", {os.path.basename(p)}" for p in pngs))
  return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
  """Runs the ``sharpjax`` command line; returns the exit status."""
  parser = build_parser()
  argv = list(sys.argv[1:] if argv is None else argv)
  args = parser.parse_args(argv)
  args.argv = argv
  from sharpjax.cli import _checkpoint  # pylint: disable=g-import-not-at-top
  from sharpjax.cli import _runner  # pylint: disable=g-import-not-at-top
  commands = {"compare": cmd_compare, "train": cmd_train,
              "measure": cmd_measure}
  try:
    return commands[args.command](args)
  except _runner.NonFiniteLoss as e:
    print(f"sharpjax {args.command}: error: {e}", file=sys.stderr)
    return 1
  except _checkpoint.CheckpointError as e:
    print(f"sharpjax {args.command}: checkpoint error: {e}", file=sys.stderr)
    return 1
  except ValueError as e:
    print(f"sharpjax {args.command}: error: {e}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print(f"\nsharpjax {args.command}: interrupted.", file=sys.stderr)
    return 130
