"""The ``sharpjax`` command: ``compare``, ``train`` and ``measure``."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
import textwrap
import threading
import time
import warnings
from typing import Optional, Sequence

from sharpjax.cli import _config as _config_cli
from sharpjax.cli import _convert
from sharpjax.cli import _devices
from sharpjax.cli import _methods
from sharpjax.cli import _profile
from sharpjax.cli import _setup
from sharpjax.cli import _validate

_INT_HYPER = {"start_epoch", "delay_epochs", "update_every",
              "transition_steps", "k", "num_chunks", "num_fisher_samples"}
_STR_HYPER = {"mask"}
_TRAIN_EPOCHS = 20

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


def _paragraphs(*texts: str) -> str:
  return "\n\n".join(textwrap.fill(t, 79) for t in texts)


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


def _preset_values(name: str) -> str:
  """``noisy: 60, clean12: 20``: each preset's value of a flag."""
  show = lambda v: " ".join(v) if isinstance(v, list) else str(v)
  return ", ".join(f"{k}: {show(v.flags[name])}"
                   for k, v in _setup.PRESETS.items())


def _add_common(p: argparse.ArgumentParser, presets: bool = False) -> None:
  """The data, model, budget and hyper-parameter flags of compare and train.

  With ``presets`` the flags named in :data:`_setup.PRESET_FLAGS` default to
  None and take ``--preset``'s value after parsing (:func:`_apply_preset`).
  """
  d = _setup.Config()

  def default(name, value):
    """``(default, help text)`` of a flag a preset sets."""
    if presets:
      return None, f"default: the preset's ({_preset_values(name)})"
    return value, "default " + ("the model's" if value is None else str(value))

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
  value, text = default("label_noise", d.label_noise)
  g.add_argument("--label-noise", type=float, default=value,
                 help="fraction of training labels replaced by another class "
                 f"({text})")
  g.add_argument("--model", default=d.model,
                 help="model: " + ", ".join(
                     f"{k} ({v[1]})" for k, v in _setup.MODELS.items())
                 + f" (default {d.model})")
  value, text = default("width", None)
  g.add_argument("--width", type=int, default=value,
                 help=f"model width (cnn1d channels, mlp hidden units; {text})")
  g.add_argument("--batch-size", type=int, default=d.batch_size,
                 help=f"batch size (default {d.batch_size})")
  value, text = default("epochs", _TRAIN_EPOCHS)
  g.add_argument("--epochs", type=int, default=value, help=f"epochs ({text})")
  g.add_argument("--lr", type=float, default=d.lr,
                 help=f"peak learning rate, cosine decay to 0 (default {d.lr})")
  g.add_argument("--momentum", type=float, default=d.momentum,
                 help=f"SGD momentum (default {d.momentum})")
  g.add_argument("--weight-decay", type=float, default=d.weight_decay,
                 help=f"weight decay (default {d.weight_decay})")
  g.add_argument("--warmup-epochs", type=int, default=d.warmup_epochs,
                 help="linear learning-rate warm-up (default 0)")
  g.add_argument("--optimizer", choices=_setup.OPTIMIZERS, default=d.optimizer,
                 help="base optimizer: sgd (with --momentum) or adamw (b2 "
                 f"0.999, decoupled --weight-decay; default {d.optimizer})")
  g.add_argument("--image-size", type=int, default=None,
                 help="side of the inputs decoded from image-folder records "
                 "(--data arrayrecord; default 224)")
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
  _devices.add_arguments(p)
  o = p.add_argument_group("output")
  o.add_argument("--progress", choices=("auto", "on", "off"), default="auto",
                 help="progress bars (auto: only when stdout is a terminal)")


class _Parser(argparse.ArgumentParser):
  """argparse with a usage error on one line (no usage block)."""

  def error(self, message: str):
    self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
  fmt = argparse.RawDescriptionHelpFormatter
  epilog = EPILOG_METHODS.format(table=_methods_table())
  parser = _Parser(
      prog="sharpjax", formatter_class=fmt,
      description="Train, compare and measure sharpness-aware methods.",
      epilog="Run `sharpjax COMMAND --help` for each command's options.")
  sub = parser.add_subparsers(dest="command", metavar="COMMAND")
  sub.required = True

  presets = "\n".join(
      textwrap.fill(v.summary, 79, initial_indent=f"  {k:9s}",
                    subsequent_indent=" " * 11)
      for k, v in _setup.PRESETS.items())
  c = sub.add_parser(
      "compare", formatter_class=fmt, epilog=epilog,
      help="train several methods on the same data, model, seeds and budget",
      description=_paragraphs(
          "Trains the selected methods with the same data, model, seeds and "
          "budget "
          "(with one seed, every method starts from the same weights and sees "
          "the same batches in the same order) and prints a table: test "
          "accuracy (mean ± std over seeds), its difference to SGD's (the "
          "mean of the per-seed differences with a 95% Student-t interval), "
          "time per step as a multiple of SGD's in the same run (after "
          "compilation, the fastest epoch's, median over seeds), the FLOPs of "
          "one compiled step as a multiple of SGD's (XLA's count: what the "
          "time ratio approaches on a compute-bound accelerator), the top "
          "Hessian eigenvalue at the end, the final train loss and the state "
          "size; then one line per method.",
          "results.json and results.md in --out are rewritten after every "
          "finished (method, seed) run, so Ctrl-C keeps what is done and "
          "--resume runs only what is missing; a run whose loss becomes NaN "
          "is marked failed and the others go on; the PNG plots are written "
          "at the end.",
          "The default preset (noisy) is the regime where flat minima matter: "
          "a network that can memorise noisy training labels; it takes about "
          "200 s of CPU time, sized to finish within 5 minutes on 2 CPU "
          "cores. Presets (--preset; a flag given explicitly wins):")
      + "\n" + presets)
  _add_common(c, presets=True)
  c.add_argument("--preset", choices=sorted(_setup.PRESETS),
                 default=_setup.DEFAULT_PRESET,
                 help="defaults of the label noise, width, epochs, methods "
                 f"and seeds (default {_setup.DEFAULT_PRESET}; see above)")
  c.add_argument("--methods", nargs="+", default=None, metavar="METHOD",
                 help="methods, space or comma separated, or all (every "
                 f"registered method); default: the preset's "
                 f"({_preset_values('methods')}); sgd, the baseline, is added "
                 "when missing")
  c.add_argument("--seeds", type=int, default=None,
                 help="number of seeds, 0..N-1 (default: the preset's ("
                 f"{_preset_values('seeds')}))")
  c.add_argument("--out", default="sharpjax-compare",
                 help="output directory (default ./sharpjax-compare)")
  c.add_argument("--resume", action="store_true",
                 help="keep the finished runs of --out/results.json and run "
                 "only the missing ones (the configuration must be the same)")
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
          "checkpoint usable. --config NAME_OR_PATH[:ARG] takes the settings "
          "from a recipe (`sharpjax recipes`), a Python file's get_config(arg) "
          "or a config.json; --config.KEY=VALUE changes one (KEY: a flag's "
          "name with _ for -, hyper.NAME for a method's hyper-parameter); "
          "flags given explicitly win."))
  _add_common(t)
  t.add_argument("--config", default=None, metavar="NAME_OR_PATH[:ARG]",
                 help="settings from a recipe, a Python config file or a "
                 "config.json (see above; ARG runlocal: a tiny smoke test)")
  t.add_argument("--profile-steps", default=None, metavar="A:B",
                 help="write a jax.profiler trace of steps A to B-1 "
                 "(0-based) into OUT/profile (TensorBoard's profile plugin)")
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
                 help="continue from the latest intact checkpoint in "
                 "--ckpt-dir (a corrupt latest one is skipped with a warning)")
  t.add_argument("--step", type=int, default=None,
                 help="with --resume: continue from this checkpoint step "
                 "instead")
  t.add_argument("--max-steps", type=int, default=None,
                 help="stop after this many steps in total (checkpointed; "
                 "continue later with --resume)")

  _config_cli.add_recipes_command(sub, fmt)
  _convert.add_data_command(sub, fmt)

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
  """``["sgd,sam", "saf"]`` -> ``["sgd", "sam", "saf"]``; ``all``: every one."""
  out = []
  for v in values:
    out += [x.strip() for x in v.split(",") if x.strip()]
  return _methods.names() if "all" in out else out


def _apply_preset(args) -> None:
  """Sets the flags of ``--preset`` the command line left unset (None)."""
  for name, value in _setup.PRESETS[args.preset].flags.items():
    if getattr(args, name) is None:
      setattr(args, name, list(value) if isinstance(value, list) else value)


def _config(args) -> _setup.Config:
  config = _setup.Config(
      data=args.data, num_examples=args.num_examples,
      label_noise=args.label_noise, model=args.model, width=args.width,
      batch_size=args.batch_size, epochs=args.epochs, lr=args.lr,
      momentum=args.momentum, weight_decay=args.weight_decay,
      warmup_epochs=args.warmup_epochs,
      sharpness_examples=getattr(args, "sharpness_examples", 500),
      data_dir=getattr(args, "data_dir", None), dtype=args.dtype,
      image_size=args.image_size, optimizer=args.optimizer)
  _setup.check_names(config)
  return config


def _make_env(args, config: _setup.Config) -> _setup.Env:
  """The data and model of ``config`` on the devices of ``--devices``."""
  devices = _devices.Devices.from_args(args, config.batch_size)
  return _setup.make_env(config, devices, args.loader, args.loader_workers)


def _tensorboard(args, subdir: str = "", resumed_at=None):
  """The TensorBoard log of a run (None without ``--tensorboard``)."""
  if args.tensorboard is None:
    return None
  from sharpjax.cli import _tensorboard as tb  # pylint: disable=g-import-not-at-top
  return tb.TensorBoardLog(os.path.join(args.tensorboard, subdir),
                           resumed_at=resumed_at)


def _flags(args) -> dict:
  return {k[3:]: v for k, v in vars(args).items() if k.startswith("hp_")}


def _show_progress(args) -> bool:
  if args.progress == "on":
    return True
  if args.progress == "off":
    return False
  return sys.stdout.isatty() and sys.stderr.isatty()


def _log(msg: str) -> None:
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_index() == 0:  # one copy of every line in a multi-process run
    print(msg, flush=True)


# ---------------------------------------------------------------------------
# compare
# ---------------------------------------------------------------------------


def _describe(config: _setup.Config, env: _setup.Env) -> tuple[str, str]:
  """What is trained and with what budget, for logs, tables and plots:
  ``("mnist1d (4000 train / 1000 test, 20% label noise), cnn1d width 32",
  "60 epochs x 31 steps of 128, lr 0.05 cosine")``."""
  noise = (f", {config.label_noise:.0%} label noise" if config.label_noise
           else ", clean labels")
  width = f" width {config.width}" if config.width else ""
  return (f"{config.data} ({len(env.train)} train / {len(env.test)} test"
          f"{noise}), {config.model}{width}",
          f"{config.epochs} epochs x {env.steps_per_epoch} steps of "
          f"{config.batch_size}, lr {config.lr} cosine")


# What a saved results.json must share with this command for --resume.
_DEFINITION = ("config", "methods", "seeds", "hyper", "sharpness")


def _previous_runs(path: str, payload: dict, resume: bool) -> list:
  """The finished runs of ``path`` to keep (``--resume``).

  Also sets ``payload``'s ``started`` and ``wall_s`` to the saved ones, so
  they count from the first invocation.
  """
  from sharpjax.cli import _checkpoint  # pylint: disable=g-import-not-at-top
  from sharpjax.cli import _runner  # pylint: disable=g-import-not-at-top
  if not os.path.exists(path):
    if resume:
      _log(f"note: --resume: no {path} yet, every run is to do.")
    return []
  if not resume:
    _log(f"note: {path} is replaced (--resume keeps its finished runs).")
    return []
  try:
    with open(path) as f:
      saved = json.load(f)
    runs = [_runner.RunResult.from_dict(r) for r in saved["runs"]]
    started, wall = saved["started"], float(saved["wall_s"] or 0.0)
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise ValueError(f"--resume: {path} cannot be read ({e}); remove it or "
                     "choose another --out.") from None
  diff = _checkpoint.run_mismatches(
      {k: saved.get(k) for k in _DEFINITION},
      {k: payload[k] for k in _DEFINITION}, saved_name="saved")
  if diff:
    raise ValueError(
        f"--resume: {path} was written by a different comparison: "
        + "; ".join(diff[:4]) + ". Give the same flags, or another --out.")
  payload.update(started=started, wall_s=wall)
  return runs


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
  if _report.BASELINE not in methods:
    methods.insert(0, _report.BASELINE)
    _log(f"note: {_report.BASELINE} added, the baseline of the comparison.")
  config = _config(args)
  overrides = _validate.overrides(args, methods)
  _report.check_out_dir(args.out)
  json_path = os.path.join(args.out, "results.json")
  env = _make_env(args, config)
  seeds = list(range(args.seeds))
  n_runs = len(methods) * len(seeds)
  what, budget = _describe(config, env)
  described = f"{what}, {budget}, {_report.seeds_phrase(len(seeds))}"
  _log(f"sharpjax compare: {described}; {len(methods)} methods, {n_runs} "
       f"runs; on {env.devices.describe()}")
  runners = {m: _runner.MethodRunner(env, m, _flags(args), overrides.get(m, {}))
             for m in methods}
  payload = {
      "command": "sharpjax " + " ".join(args.argv), "started": started,
      "finished": None, "complete": False, "wall_s": 0.0,
      "config": config.to_dict(), "methods": methods, "seeds": seeds,
      "hyper": {m: runners[m].hyper for m in methods},
      "sharpness": {"top_eigenvalue": not args.no_sharpness,
                    "trace_probes": args.trace_probes},
      "data": {"train": len(env.train), "test": len(env.test),
               "num_classes": env.num_classes,
               "steps_per_epoch": env.steps_per_epoch},
      "versions": _report.versions(), "device": _report.device_info(),
      "parallel": env.devices.to_dict(),
  }
  # Seed-major order: every method's timing sees the machine's drift alike.
  order = [(m, seed) for seed in seeds for m in methods]
  results = {(r.method, r.seed): r
             for r in _previous_runs(json_path, payload, args.resume)}
  wall_before = payload["wall_s"]
  if results:
    _log(f"--resume: {len(results)} finished runs kept from {json_path}; "
         f"{n_runs - len(results)} to do.")
  probe = (None if args.no_sharpness
           else _runner.SharpnessProbe(env, config.sharpness_examples))
  show = _show_progress(args)

  def save() -> list:
    """Rewrites results.json and results.md with the runs so far."""
    runs = [results[k] for k in order if k in results]
    rows = _report.summarize(runs, methods)
    wall = wall_before + time.perf_counter() - t_start
    complete = len(runs) == n_runs
    payload.update(finished=_report.utc_now() if complete else None,
                   complete=complete, wall_s=wall, table=rows,
                   runs=[r.to_dict() for r in runs])
    if not env.devices.is_main:  # process 0 writes the reports
      return rows
    _report.write_json(json_path, payload)
    dev = payload["device"]
    header = (
        f"{described}; {dev['platform']} ({dev['device_kind']}, "
        f"{dev['cpu_cores']} cores), jax {payload['versions']['jax']}; "
        f"{len(runs)} of {n_runs} runs, {wall:.0f} s in all. "
        "Δ vs SGD: the mean over seeds of (method - SGD) test accuracy with "
        "the same seed (same initial weights, same batches in the same "
        "order), with a 95% Student-t interval of that mean (n - 1 degrees "
        "of freedom). Step time: the fastest epoch's after compilation, "
        "median over seeds, divided by SGD's. λ_max: top Hessian eigenvalue "
        f"of the training loss on {config.sharpness_examples} training "
        "examples at the end. State: parameters + optimizer state (SAF's "
        "bank, MESA's teacher).")
    _report.write_text(os.path.join(args.out, "results.md"),
                       _report.markdown(rows, header))
    return rows

  try:
    for m, seed in order:
      if (m, seed) in results:
        continue
      r = results[m, seed] = _compare_run(runners[m], seed, probe, args, show)
      save()
      head = (f"[{len(results):>{len(str(n_runs))}}/{n_runs}] {m:8s} seed "
              f"{seed}: ")
      if r.failed:
        _log(head + f"failed: {r.failed}")
      else:
        _log(head + f"test acc {100 * r.final['test_accuracy']:.2f}%  "
             f"train loss {r.final['train_loss']:.4f}  "
             f"{r.ms_per_step:.2f} ms/step"
             + ("" if r.sharpness is None else f"  lambda_max {r.sharpness:.2f}")
             + f"  ({r.wall_s:.1f} s)")
  except KeyboardInterrupt:
    print(f"\ninterrupted: {len(results)} of {n_runs} runs are saved in "
          f"{json_path}; run the same command with --resume to do the other "
          f"{n_runs - len(results)}.", file=sys.stderr, flush=True)
    return 130
  rows = save()
  title = (f"{what}, {config.epochs} epochs, "
           f"{_report.seeds_phrase(len(seeds))} (mean ± std)")
  if not env.devices.is_main:
    return 0
  pngs = _report.plot([results[k] for k in order], rows, methods, args.out,
                      title)
  print()
  print(_report.markdown(rows))
  _log(f"wrote {json_path}, results.md, "
       + ", ".join(os.path.basename(p) for p in pngs)
       + f" ({payload['wall_s']:.0f} s)")
  return 0


def _compare_run(runner, seed: int, probe, args, show: bool):
  """One (method, seed) run of compare; a non-finite loss is a failed run."""
  from sharpjax.cli import _runner  # pylint: disable=g-import-not-at-top
  name = runner.method.name
  progress = _runner.Progress()
  t0 = time.perf_counter()
  board = _tensorboard(args, os.path.join(name, f"seed{seed}"))
  try:
    state, progress, timing = runner.run(
        seed, progress=progress, show_progress=show,
        label=f"{name} seed {seed}", on_log=board and board.scalars)
  except _runner.NonFiniteLoss as e:
    return _runner.failed_run(name, seed, runner.hyper, progress,
                              runner.compile_s, time.perf_counter() - t0, e)
  finally:
    if board is not None:
      board.close()
  # Every process measures its own host copy of the (replicated) model.
  devices = runner.env.devices
  local = (state if probe is None or devices is None
           else devices.local(state._replace(opt_state=())))
  sharp = None if probe is None else probe.top_eigenvalue(local, seed)
  trace = (probe.trace(local, seed, args.trace_probes)
           if probe is not None and args.trace_probes else None)
  return _runner.summarize_run(name, seed, runner.hyper, progress, timing,
                               state, sharp, trace)


# ---------------------------------------------------------------------------
# train
# ---------------------------------------------------------------------------


def cmd_train(args) -> int:
  from sharpjax.cli import _checkpoint  # pylint: disable=g-import-not-at-top
  from sharpjax.cli import _report  # pylint: disable=g-import-not-at-top
  from sharpjax.cli import _runner  # pylint: disable=g-import-not-at-top

  _methods.get(args.method)
  config = _config(args)
  overrides = _validate.overrides(args, [args.method]).get(args.method, {})
  _report.check_out_dir(args.out)
  settings = _config_cli.write(args, build_parser(), args.out)
  ckpt_dir = args.ckpt_dir or os.path.join(args.out, "checkpoints")
  _report.check_out_dir(ckpt_dir, "--ckpt-dir")
  env = _make_env(args, config)
  runner = _runner.MethodRunner(env, args.method, _flags(args), overrides)
  save_every = args.save_every or env.steps_per_epoch
  ckpt = _checkpoint.Checkpointer(ckpt_dir, keep=args.keep_checkpoints)
  ckpt.clean()  # the folders of a save interrupted last time
  run_def = {"config": config.to_dict(), "method": args.method,
             "hyper": runner.hyper, "seed": args.seed,
             "steps_per_epoch": env.steps_per_epoch}
  total = runner.total_steps
  profiler = _profile.StepProfiler(os.path.join(args.out, "profile"),
                                   _profile.parse(args.profile_steps, total))
  train_json = os.path.join(args.out, "train.json")
  loader = env.loader(args.seed)
  # With grain the batches come from one iterator (feed) whose state the
  # checkpoints keep; the numpy loader restarts from the step.
  data_start = 0
  if args.resume:
    state, meta, step, feed, data_start = ckpt.resume(
        runner.init_state(args.seed), run_def, args.step, args.loader, loader,
        total, _log)
    progress = _runner.Progress.from_dict(meta["progress"])
    if int(state.step) != progress.step:
      raise _checkpoint.CheckpointError(
          f"checkpoint {ckpt_dir} step {step}: the state is at step "
          f"{int(state.step)} but its metadata says {progress.step} (corrupt).")
    if args.step is not None:
      moved = ckpt.set_aside_after(step)
      if moved:
        _log(f"note: --step {step}: the newer checkpoints are set aside "
             f"(kept, no longer resumed from): {', '.join(moved)}")
    end = total if args.max_steps is None else min(args.max_steps, total)
    if progress.step >= end and _checkpoint.train_json_done(train_json,
                                                            progress.step):
      why = ("finished" if progress.step >= total
             else f"already at --max-steps {args.max_steps}")
      _log(f"the run in {ckpt_dir} is {why} (step {progress.step} of "
           f"{total}): nothing to train; {train_json} is left as it is.")
      if feed is not None:
        feed.close()
      return 0
    _log(f"resuming {args.method} seed {args.seed} from step {progress.step} "
         f"(epoch {progress.step // env.steps_per_epoch + 1}, batch "
         f"{progress.step % env.steps_per_epoch}) in {ckpt_dir}")
  else:
    if ckpt.steps():
      raise _checkpoint.CheckpointError(
          f"{ckpt_dir} already holds checkpoints (steps {ckpt.steps()}): pass "
          "--resume to continue that run, or choose another --ckpt-dir.")
    state, progress = None, None
    feed = loader.batches(0, total) if args.loader == "grain" else None
  loader_meta = _checkpoint.loader_settings(args.loader, loader, data_start)
  board = None

  def save(st, prog, result=None):
    """A checkpoint (its data position, the loader) and train.json."""
    if board is not None:
      board.flush()  # every event up to the checkpoint is on disk
    position = {"epoch": prog.step // env.steps_per_epoch,
                "batch": prog.step % env.steps_per_epoch,
                "steps_per_epoch": env.steps_per_epoch,
                "loader_seed": args.seed}
    ckpt.save(st, run_def, prog.to_dict(),
              {"data_position": position, "loader": loader_meta},
              data_iterator=runner.feed if feed is not None else None)
    _checkpoint.write_train_json(
        train_json, command="sharpjax " + " ".join(args.argv), run=run_def,
        progress=prog.to_dict(), total_steps=total, checkpoint_dir=ckpt_dir,
        loader=loader_meta, parallel=env.devices.to_dict(), result=result,
        extra={"settings": settings})

  def on_step(st, prog):
    stop = bool(_TERM_RECEIVED)  # SIGTERM: save here, then stop
    if prog.step % save_every == 0 or prog.step == total or stop:
      save(st, prog)
    if stop:
      raise KeyboardInterrupt

  _log(f"sharpjax train: {args.method} seed {args.seed} on {config.data} "
       f"({len(env.train)} train), {config.model}, {config.epochs} epochs x "
       f"{env.steps_per_epoch} steps; checkpoints every {save_every} steps "
       f"in {ckpt_dir}; on {env.devices.describe()}")
  _devices.log_process(env.devices, config.batch_size)  # one line each
  t0 = time.perf_counter()
  board = _tensorboard(args, resumed_at=progress.step if progress else None)
  try:
    state, progress, timing = runner.run(
        args.seed, state, progress, stop_at=args.max_steps, on_step=on_step,
        sync_every=save_every, show_progress=_show_progress(args),
        label=f"{args.method} seed {args.seed}",
        on_log=board and board.scalars, data_iterator=feed,
        profiler=profiler)
  except KeyboardInterrupt:
    steps = ckpt.steps()
    how = "terminated (SIGTERM)" if _TERM_RECEIVED else "interrupted"
    if steps:
      print(f"\n{how}. The last checkpoint is step {steps[-1]} in "
            f"{ckpt_dir}; run the same command with --resume to continue.",
            file=sys.stderr, flush=True)
    else:
      print(f"\n{how} before the first checkpoint: nothing was saved in "
            f"{ckpt_dir}.", file=sys.stderr, flush=True)
    return 130
  finally:
    if board is not None:
      board.close()
      board = None
  result = _runner.summarize_run(args.method, args.seed, runner.hyper,
                                 progress, timing, state, None)
  save(state, progress, result.to_dict())
  f = result.final
  done = "done" if progress.step >= total else "stopped (--max-steps)"
  _log(f"{done} at step {progress.step}/{total} in "
       f"{time.perf_counter() - t0:.1f} s"
       + (f": test acc {100 * f['test_accuracy']:.2f}%, train loss "
          f"{f['train_loss']:.4f}" if f else "")
       + f"; checkpoint {ckpt.steps()[-1]} in {ckpt_dir}")
  if profiler.traced:
    _log(f"profile of steps {profiler.traced[0]} to {profiler.traced[-1]} "
         f"written to {profiler.logdir}")
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
  out_dir = _report.check_out_dir(
      args.out or os.path.join(os.path.dirname(path), "measure"))
  runner, state, meta, step = _checkpoint.load_run(path, step)
  run = meta["run"]
  probe = _runner.SharpnessProbe(runner.env, args.num_examples)
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
  pngs = []
  what = (f"{run['method']} (seed {run['seed']}), checkpoint step {step}, "
          f"{out['examples']} training examples")

  def save_plot(name: str, title: str, draw) -> None:
    import matplotlib  # pylint: disable=g-import-not-at-top
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    draw(ax)
    for line in ax.get_lines():
      line.set_color(_report.color_of(run["method"]))
    if ax.get_legend() is not None:
      ax.legend()  # redrawn with the line's colour
    ax.set_title(f"{title}\n{what}", fontsize=9)
    fig.tight_layout()
    pngs.append(os.path.join(out_dir, name))
    fig.savefig(pngs[-1], dpi=90)
    plt.close(fig)

  if args.density:
    dens = measures.spectral_density(loss, state.params, probe.batch, k3)
    save_plot("density.png", "Hessian eigenvalue density of the training "
              "loss (stochastic Lanczos quadrature)",
              lambda ax: measures.plot_spectral_density(
                  dens, ax=ax, label=run["method"]))
    out["density"] = {"grid": dens.grid, "density": dens.density}
  if args.landscape:
    sl = measures.landscape_1d(loss, state.params, probe.batch, k4,
                               num_points=41)
    save_plot("landscape.png", "training loss along a random "
              "filter-normalised direction",
              lambda ax: measures.plot_slice_1d(sl, ax=ax,
                                                label=run["method"]))
    out["landscape"] = dict(sl._asdict())
  out["measure_s"] = time.perf_counter() - t0
  out["versions"] = _report.versions()
  out["device"] = _report.device_info()
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


def _one_line(text: str) -> str:
  return " ".join(line.strip() for line in str(text).splitlines()
                  if line.strip())


def _os_error(e: OSError) -> str:
  """``"cannot write /x/y: No space left on device"``, naming the file."""
  if e.filename is None:
    return _one_line(e)
  files = str(e.filename) + (f" -> {e.filename2}" if e.filename2 else "")
  return f"{files}: {e.strerror or e}"


def _closed_loop_noise(unraisable) -> bool:
  exc = unraisable.exc_value
  return isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed"


@contextlib.contextmanager
def _one_line_reports(prefix: str, process_wide: bool):
  """sharpjax's warnings as ``sharpjax CMD: warning: ...`` lines; the noise
  of orbax's threads after a failed read or write dropped.

  With ``process_wide`` (the console script, whose process ends with the
  command) the filters stay for the interpreter's shutdown.
  """
  package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  shown, unraisable_hook = warnings.showwarning, sys.unraisablehook

  def show(message, category, filename, lineno, file=None, line=None):
    if os.path.abspath(filename).startswith(package + os.sep):
      print(f"{prefix}: warning: {_one_line(message)}", file=sys.stderr,
            flush=True)
    else:
      shown(message, category, filename, lineno, file, line)

  def unraisable(info):
    # When a checkpoint read or write fails, tensorstore's callbacks still
    # in flight post to orbax's closed event loop; the error itself is
    # reported by the command.
    if not _closed_loop_noise(info):
      unraisable_hook(info)

  # Orbax logs the error of a failed save from each of its writer threads,
  # with their tracebacks, through absl; the command reports it in one line.
  absl = logging.getLogger("absl")
  level = absl.level
  warnings.showwarning = show
  sys.unraisablehook = unraisable
  absl.setLevel(logging.CRITICAL)
  try:
    yield
  finally:
    if not process_wide:
      warnings.showwarning = shown
      sys.unraisablehook = unraisable_hook
      absl.setLevel(level)


# The SIGTERMs received by the command running (see _sigterm_handled).
_TERM_RECEIVED: list = []


@contextlib.contextmanager
def _sigterm_handled(graceful: bool):
  """SIGTERM ends a command like Ctrl-C, its checkpoints and results kept.

  With ``graceful`` (train) the first SIGTERM only asks: the run saves a
  checkpoint at its next step boundary (a few steps) and stops; a second one
  interrupts at once. Otherwise SIGTERM interrupts at once, as Ctrl-C does.
  """
  del _TERM_RECEIVED[:]
  if threading.current_thread() is not threading.main_thread():
    yield _TERM_RECEIVED
    return

  def on_sigterm(signum, frame):
    del frame
    _TERM_RECEIVED.append(signum)
    if not graceful or len(_TERM_RECEIVED) > 1:
      raise KeyboardInterrupt

  previous = signal.signal(signal.SIGTERM, on_sigterm)
  try:
    yield _TERM_RECEIVED
  finally:
    signal.signal(signal.SIGTERM, previous)


def _run(args, prefix: str) -> int:
  if args.command == "compare":
    _apply_preset(args)
  from sharpjax.cli import _checkpoint  # pylint: disable=g-import-not-at-top
  from sharpjax.cli import _runner  # pylint: disable=g-import-not-at-top
  commands = {"compare": cmd_compare, "train": cmd_train,
              "measure": cmd_measure, "recipes": _config_cli.cmd_recipes,
              "data": _convert.cmd_data}
  try:
    _validate.check(args)
    if args.command in ("compare", "train"):
      _devices.connect(args.distributed)  # before any JAX computation
    return commands[args.command](args)
  except _runner.NonFiniteLoss as e:
    print(f"{prefix}: error: {_one_line(e)}", file=sys.stderr)
    return 1
  except _checkpoint.CheckpointError as e:
    print(f"{prefix}: checkpoint error: {_one_line(e)}", file=sys.stderr)
    return 1
  except ValueError as e:
    print(f"{prefix}: error: {_one_line(e)}", file=sys.stderr)
    return 2
  except OSError as e:
    print(f"{prefix}: error: {_os_error(e)}", file=sys.stderr)
    return 1
  except ImportError as e:
    print(f"{prefix}: error: {_one_line(e)}", file=sys.stderr)
    return 1
  except KeyboardInterrupt:
    print(f"\n{prefix}: interrupted.", file=sys.stderr)
    return 130


def main(argv: Optional[Sequence[str]] = None) -> int:
  """Runs the ``sharpjax`` command line; returns the exit status.

  A mistake in the arguments, a bad file or a failed write ends it with one
  line on stderr and a non-zero status (2: the arguments; 1: the data, a
  checkpoint, the disk; 130 / 143: Ctrl-C / SIGTERM, after what was saved).
  Called without ``argv`` (the console script, ``python -m sharpjax.cli``), a
  command that fails or is interrupted ends the process with ``os._exit``
  after its message, skipping the interpreter's cleanup (see below).
  """
  parser = build_parser()
  from_console = argv is None
  argv = list(sys.argv[1:] if argv is None else argv)
  try:  # --config: the config's settings become flags before the others
    expanded, config_info = _config_cli.expand(argv, parser)
  except _config_cli.ConfigError as e:  # a usage error, as argparse's
    parser.exit(2, f"sharpjax train: error: {_one_line(e)}\n")
  args = parser.parse_args(expanded)
  args.argv = argv
  args.config_info = config_info
  prefix = f"sharpjax {args.command}"
  with _one_line_reports(prefix, from_console), _sigterm_handled(
      graceful=args.command == "train") as received:
    status = _run(args, prefix)
  if status == 130 and received:
    status = 128 + signal.SIGTERM
  if status and from_console:
    # Nothing is left to save or close. An interrupt that landed inside a
    # compilation can leave XLA in a state that crashes the interpreter's
    # final cleanup (status 139 instead of this one), and the writer threads
    # of a failed orbax save print tracebacks at shutdown: skip that cleanup.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
  return status
