"""Training runs over :func:`sharpjax.training.make_trainer`.

One :class:`MethodRunner` per method builds the optax chain and the jitted
step once; every seed reuses them, so a method compiles once per command. A
run is a loop over the loader's batches from any step (the data order of
epoch ``e`` depends on ``(seed, e)`` only, so a resumed run sees the batches
the uninterrupted one would; a grain loader's position is also restored from
its saved state), made ahead on the host and put on the devices two steps
ahead (:func:`sharpjax.data.prefetch_to_device`), with

- metrics fetched every few steps and checked: a NaN or infinite loss raises
  :class:`NonFiniteLoss` naming the step;
- the test set evaluated at the end of every epoch;
- the time per step measured after compilation: the first step of a runner
  (which compiles) is timed apart, the others per epoch; the figure kept is
  the fastest epoch's (epoch time / steps), host data assembly included (the
  minimum, as in ``benchmarks/overhead.py``: on a shared machine the other
  epochs measure the neighbours' load);
- an optional ``on_step(state, step, progress)`` hook (checkpoints) and an
  ``on_log(step, scalars)`` hook (TensorBoard).
"""

from __future__ import annotations

import dataclasses
import math
import resource
import sys
import time
from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

import sharpjax as sj
from sharpjax import training
from sharpjax.training import _host
from sharpjax._src import base
from sharpjax.cli import _methods
from sharpjax.cli import _setup

_SYNC_EVERY = 10


class NonFiniteLoss(RuntimeError):
  """The training loss became NaN or infinite."""


@dataclasses.dataclass
class Progress:
  """Where a run is: what a checkpoint stores besides the train state.

  Attributes:
    step: steps taken.
    history: one dict per finished epoch (``epoch``, ``train_loss``,
      ``train_accuracy``, ``test_loss``, ``test_accuracy``).
    loss_sum, acc_sum, count: running sums over the current epoch's steps.
    log_sums, log_count: sums of the scalar metrics over the steps of the
      current log interval read back but not yet logged (a run stopped
      between two log points, e.g. by ``--max-steps``, carries them into its
      checkpoint, so that the resumed run logs the interval's true means at
      the step the uninterrupted run does).
  """

  step: int = 0
  history: list = dataclasses.field(default_factory=list)
  loss_sum: float = 0.0
  acc_sum: float = 0.0
  count: int = 0
  log_sums: dict = dataclasses.field(default_factory=dict)
  log_count: int = 0

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "Progress":
    return cls(step=int(d["step"]), history=list(d["history"]),
               loss_sum=float(d["loss_sum"]), acc_sum=float(d["acc_sum"]),
               count=int(d["count"]),
               log_sums={k: float(v) for k, v in
                         dict(d.get("log_sums") or {}).items()},
               log_count=int(d.get("log_count", 0)))


@dataclasses.dataclass
class RunResult:
  """One (method, seed) run: what ``results.json`` keeps of it.

  Attributes:
    method, seed, hyper: what ran (hyper-parameters resolved).
    history: one dict per finished epoch (see :class:`Progress`).
    steps: steps taken.
    ms_per_step: the fastest epoch's time per step after compilation (None
      when no epoch was timed).
    compile_s, wall_s: the first step's time (compilation) and the run's.
    peak_rss_mib: the process's peak resident memory when the run ended.
    state_bytes: parameters + model state + optimizer state (None: failed).
    sharpness, hessian_trace: top Hessian eigenvalue and trace at the end.
    failed: why the run stopped early (a non-finite loss), else None.
    flops_per_step, bytes_accessed: XLA's cost analysis of one compiled step
      (:meth:`sharpjax.training.Trainer.step_cost`; None when not measured).
  """

  method: str
  seed: int
  hyper: dict
  history: list
  steps: int
  ms_per_step: Optional[float]
  compile_s: float
  wall_s: float
  peak_rss_mib: float
  state_bytes: Optional[int]
  sharpness: Optional[float] = None
  hessian_trace: Optional[float] = None
  failed: Optional[str] = None
  flops_per_step: Optional[float] = None
  bytes_accessed: Optional[float] = None

  @property
  def final(self) -> dict:
    return self.history[-1] if self.history else {}

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "RunResult":
    fields = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in fields})


def peak_rss_mib() -> float:
  """Peak resident memory of this process so far (MiB)."""
  kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  if sys.platform == "darwin":  # bytes there
    kib /= 1024
  return kib / 1024.0


def tree_bytes(tree: Any) -> int:
  return int(sum(np.dtype(x.dtype).itemsize * math.prod(np.shape(x))
                 for x in jax.tree.leaves(tree)))


def learning_rate(config: _setup.Config, total_steps: int) -> optax.Schedule:
  """The cosine schedule (with the optional linear warm-up) of a run."""
  warmup = config.warmup_epochs * max(1, total_steps // config.epochs)
  if warmup:
    return optax.warmup_cosine_decay_schedule(0.0, config.lr, warmup,
                                              max(total_steps, warmup + 1))
  return optax.cosine_decay_schedule(config.lr, max(total_steps, 1))


def base_optimizer(config: _setup.Config,
                   total_steps: int) -> optax.GradientTransformation:
  """SGD with momentum (or AdamW), a cosine learning rate and weight decay."""
  lr = learning_rate(config, total_steps)
  if config.optimizer == "adamw":
    return optax.adamw(lr, b1=0.9, b2=0.999,
                       weight_decay=config.weight_decay)
  parts = []
  if config.weight_decay:
    parts.append(optax.add_decayed_weights(config.weight_decay))
  parts.append(optax.sgd(lr, momentum=config.momentum or None))
  return optax.chain(*parts)


def _reseed(tree: Any, seed: int) -> Any:
  """Sets every ``key`` field of the states in ``tree`` to ``seed``'s key.

  The methods that keep a PRNG key (ESAM, SSAM, AUSAM) store
  ``base.init_key_data(seed)`` in a ``key`` field at ``init``; the runner
  builds them once with seed 0 and gives each run its own key here, which is
  what building them with ``seed=`` that seed gives.
  """
  if hasattr(tree, "_fields") and hasattr(tree, "_replace"):
    kids = {f: _reseed(getattr(tree, f), seed) for f in tree._fields}
    if "key" in tree._fields:
      kids["key"] = base.init_key_data(seed)
    return tree._replace(**kids)
  if isinstance(tree, tuple):
    return tuple(_reseed(t, seed) for t in tree)
  if isinstance(tree, list):
    return [_reseed(t, seed) for t in tree]
  if isinstance(tree, dict):
    return {k: _reseed(v, seed) for k, v in tree.items()}
  return tree


class MethodRunner:
  """One method's optax chain and jitted step, shared by all its seeds.

  Args:
    env: data, model and budget.
    method: registry name.
    flags: global hyper-parameter flags (None: the method's default).
    overrides: ``PARAM -> value`` for this method (``--set``).
  """

  def __init__(self, env: _setup.Env, method: str,
               flags: Mapping[str, Any] = (), overrides: Mapping[str, Any] = ()):
    self.env = env
    self.method = _methods.get(method)
    budget = env.budget(seed=0)
    budget = dataclasses.replace(
        budget, learning_rate=learning_rate(env.config, budget.total_steps),
        momentum=env.config.momentum or 0.0,
        weight_decay=env.config.weight_decay or 0.0)
    self.hyper = _methods.resolve(self.method, budget, dict(flags),
                                  dict(overrides))
    pre = _methods.build(self.method, self.hyper, budget)
    base_tx = base_optimizer(env.config, budget.total_steps)
    self.tx = base_tx if pre is None else optax.chain(pre, base_tx)
    self.learning_rate = learning_rate(env.config, budget.total_steps)
    # The batches come from DataLoader over a checked ArrayDataset, so the
    # per-step host validation is skipped.
    if env.devices is not None:  # over the data mesh (cli/_devices.py)
      self.trainer = env.devices.trainer(env.model, self.tx)
    else:
      self.trainer = training.make_trainer(env.model, self.tx, validate=False)
    self.feed = None  # the run's batch iterator, while it runs
    self._on_log = None
    self._compiled = False
    self.compile_s = 0.0
    self.cost = None  # Trainer.step_cost of the step, from the first run

  @property
  def total_steps(self) -> int:
    return self.env.steps_per_epoch * self.env.config.epochs

  def init_state(self, seed: int) -> training.TrainState:
    """A fresh state for ``seed``.

    The parameters come from :meth:`Env.initial_params` (one compiled model
    init for every method, so methods with the same seed start from the same
    weights); the optimizer state is ``tx.init`` of them, MESA's teacher
    also tracks the model state, and the methods' own PRNG keys are seeded
    with ``seed`` (:func:`_reseed`). This is the state
    ``make_trainer(...).init`` builds, without compiling a model init per
    method.
    """
    params, model_state, rng = self.env.initial_params(seed)
    state = training.state_from_params(self.tx, params, model_state, rng)
    # Eager tx.init may alias the parameters; the step donates its state, so
    # every leaf is copied.
    opt_state = jax.tree.map(lambda x: jnp.array(x, copy=True),
                             _reseed(state.opt_state, seed))
    state = state._replace(opt_state=opt_state)
    if self.env.devices is not None:
      state = self.env.devices.place_state(state)
    return state

  def evaluate(self, state) -> dict:
    return self.env.evaluate(state.params, state.model_state)

  def run(
      self,
      seed: int,
      state: Optional[training.TrainState] = None,
      progress: Optional[Progress] = None,
      *,
      stop_at: Optional[int] = None,
      on_step: Optional[Callable[[Any, Progress], None]] = None,
      sync_every: Optional[int] = None,
      show_progress: bool = False,
      label: str = "",
      on_log: Optional[Callable[[int, dict], None]] = None,
      data_iterator: Any = None,
      profiler: Any = None,
  ) -> tuple[training.TrainState, Progress, dict]:
    """Trains from ``progress.step`` to ``stop_at`` (default: the end).

    Args:
      seed: the run's seed (model init, data order, the method's own key).
      state: the state to continue from (None: a fresh ``init_state``).
      progress: where ``state`` is (None: step 0).
      stop_at: stop after this many steps in total (for interrupted runs).
      on_step: ``on_step(state, progress)`` after every step whose metrics
        have been checked (every few steps, every multiple of ``sync_every``,
        and at epoch ends after the evaluation); it may save.
      sync_every: also check the metrics (and call ``on_step``) at every
        multiple of this many steps.
      show_progress: draw a tqdm bar.
      label: the bar's description.
      on_log: ``on_log(step, scalars)`` with each log interval's means
        (``train/loss``, ``train/accuracy``, ``train/learning_rate``, the
        penalty and diagnostics as ``train/NAME``) and, at epoch ends, the
        test metrics (``test/...``, ``epoch/...``).
      data_iterator: the batches from global step 0 (a restored
        ``GrainLoader.batches`` iterator); default: the loader's from
        ``progress.step``. Either way they are put on the devices two ahead
        (:func:`sharpjax.data.prefetch_to_device`), and ``self.feed`` is
        that iterator while the run lasts (a checkpoint saves its state).
      profiler: a :class:`sharpjax.cli._profile.StepProfiler` told before
        and after each step (every step runs in a
        ``jax.profiler.StepTraceAnnotation("train", step_num=k)`` anyway).

    Returns:
      ``(state, progress, timing)`` with ``timing`` holding ``epoch_ms``
      (per-step milliseconds of each timed epoch), ``compile_s``, ``wall_s``.

    Raises:
      NonFiniteLoss: the loss became NaN or infinite; the message names the
        step (1-based count of steps taken) and the epoch.
    """
    if state is None:
      state = self.init_state(seed)
    progress = progress or Progress()
    spe = self.env.steps_per_epoch
    total = self.total_steps
    end = total if stop_at is None else min(stop_at, total)
    from sharpjax import data  # pylint: disable=g-import-not-at-top
    if data_iterator is None:
      data_iterator = self.env.loader(seed).batches(progress.step, total)
    self.feed = data.prefetch_to_device(data_iterator,
                                        self.trainer.shard_batch)
    self._on_log = on_log
    bar = _bar(show_progress, label, total, progress.step)
    epoch_ms = []
    t_start = time.perf_counter()
    pending: list = []
    try:
      while progress.step < end:
        epoch, pos = divmod(progress.step, spe)
        last = min(spe, pos + end - progress.step)
        t0, timed = time.perf_counter(), 0
        for i in range(pos, last):
          batch = next(self.feed)
          k = progress.step + len(pending)  # this step's 0-based number
          if profiler is not None:
            profiler.before(k)
          compiling = not self._compiled
          tc = time.perf_counter() if compiling else 0.0
          with jax.profiler.StepTraceAnnotation("train", step_num=k):
            state, metrics = self.trainer.step(state, batch)
          if compiling:
            jax.block_until_ready(metrics)
            self.compile_s = time.perf_counter() - tc
            if self.cost is None:  # the step just compiled: nothing runs
              self.cost = self.trainer.step_cost(state, batch)
            self._compiled = True
            t0 = time.perf_counter()
          else:
            timed += 1
          if profiler is not None:
            profiler.after(k, state)
          pending.append(metrics)
          n = progress.step + len(pending)
          # The log points depend on the position alone (the epoch's end,
          # multiples of sync_every, _SYNC_EVERY steps since the last one),
          # so a resumed run logs where the uninterrupted one does.
          log_point = (progress.log_count + len(pending) >= _SYNC_EVERY
                       or i == spe - 1
                       or bool(sync_every and n % sync_every == 0))
          if log_point or i == last - 1:
            self._flush(pending, progress, epoch, bar, log=log_point)
            pending = []
            if on_step is not None and i != spe - 1:
              on_step(state, progress)
        jax.block_until_ready(state.params)
        if timed:
          epoch_ms.append(1e3 * (time.perf_counter() - t0) / timed)
        if last == spe:
          row = {"epoch": epoch + 1,
                 "train_loss": progress.loss_sum / max(progress.count, 1),
                 "train_accuracy": progress.acc_sum / max(progress.count, 1)}
          row.update(self.evaluate(state))
          progress.history.append(row)
          progress.loss_sum = progress.acc_sum = 0.0
          progress.count = 0
          if bar is not None:
            bar.set_postfix(loss=f"{row['train_loss']:.3f}",
                            test_acc=f"{row['test_accuracy']:.3f}")
          if on_log is not None:
            on_log(progress.step, {
                "test/loss": row["test_loss"],
                "test/accuracy": row["test_accuracy"],
                "epoch/train_loss": row["train_loss"],
                "epoch/train_accuracy": row["train_accuracy"]})
          if on_step is not None:
            on_step(state, progress)
    finally:
      if bar is not None:
        bar.close()
      if profiler is not None:
        profiler.close()
      self.feed.close()
    timing = {"epoch_ms": epoch_ms, "compile_s": self.compile_s,
              "wall_s": time.perf_counter() - t_start, "cost": self.cost}
    return state, progress, timing

  def _flush(self, pending, progress: Progress, epoch: int, bar,
             log: bool = True) -> None:
    """Reads back and checks ``pending`` metrics; logs at a log point.

    Every step's loss and SAF/MESA penalty must be finite. The scalars are
    added to the log interval's sums (``progress.log_sums``); at a log point
    (``log``) their means over the interval go to ``on_log``.
    """
    on_log = self._on_log
    fetched = _host.to_host([{k: v for k, v in m.items() if np.ndim(v) == 0}
                             for m in pending])
    values = [(m["loss"], m["accuracy"], m.get("penalty", 0.0))
              for m in fetched]
    for loss, acc, pen in values:
      step = progress.step + 1
      if not (np.isfinite(loss) and np.isfinite(pen)):
        what = "loss" if not np.isfinite(loss) else "SAF/MESA penalty"
        raise NonFiniteLoss(
            f"{self.method.name}: the training {what} became "
            f"{float(loss if what == 'loss' else pen)} at step {step} "
            f"(epoch {epoch + 1}); the run is stopped. Lower --lr (now "
            f"{self.env.config.lr}) or the method's radius/strength.")
      progress.step = step
      progress.loss_sum += float(loss)
      progress.acc_sum += float(acc)
      progress.count += 1
    sums = progress.log_sums
    for m in fetched:  # in step order: a carried interval sums the same
      for k, v in m.items():
        sums[k] = sums.get(k, 0.0) + float(v)
    progress.log_count += len(fetched)
    if log:
      if on_log is not None:
        scalars = {f"train/{k}": v / progress.log_count
                   for k, v in sums.items()}
        scalars["train/learning_rate"] = float(
            self.learning_rate(progress.step - 1))
        on_log(progress.step, scalars)
      progress.log_sums, progress.log_count = {}, 0
    if bar is not None:
      bar.update(len(values))
      bar.set_postfix(loss=f"{float(values[-1][0]):.3f}",
                      acc=f"{float(values[-1][1]):.3f}", refresh=False)


def _bar(show: bool, label: str, total: int, initial: int):
  if not show:
    return None
  from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
  return tqdm(total=total, initial=initial, desc=label, unit="step",
              leave=False, dynamic_ncols=True, file=sys.stderr)


# ---------------------------------------------------------------------------
# Sharpness at the end of a run.
# ---------------------------------------------------------------------------


def _measure_loop() -> str:
  # XLA:CPU runs convolutions inside device loops on a slow path
  # (jax-ml/jax#12868): on CPU the Hessian measures loop from the host.
  return "host" if jax.default_backend() == "cpu" else "lax"


class SharpnessProbe:
  """Top Hessian eigenvalue of the training loss (model in eval mode).

  One probe per command: its ``loss_fn`` is one function object, so the
  measure compiles once for all methods with the same parameter shapes.
  """

  def __init__(self, env: _setup.Env, num_examples: int):
    n = min(num_examples, len(env.train))
    self.batch = {"x": jnp.asarray(env.train.x[:n]),
                  "y": jnp.asarray(env.train.y[:n])}
    model = env.model

    def loss_fn(params_and_state, batch):
      params, model_state = params_and_state
      logits = model.apply({"params": params, **model_state}, batch["x"],
                           train=False)
      return training.softmax_cross_entropy(logits, batch["y"])

    self.loss_fn = loss_fn

  def _loss_of(self, state):
    """The per-example loss over the parameters, model state held fixed."""
    fixed = state.model_state
    if not jax.tree.leaves(fixed):
      return self._stateless  # one function object: compiles once
    return lambda p, b: self.loss_fn((p, fixed), b)

  def top_eigenvalue(self, state, seed: int = 0, max_iters: int = 20) -> float:
    from sharpjax import measures  # pylint: disable=g-import-not-at-top
    r = measures.hessian_eigenpairs(self._loss_of(state), state.params,
                                    self.batch, jax.random.PRNGKey(seed), k=1,
                                    max_iters=max_iters, tol=1e-3,
                                    loop=_measure_loop())
    return float(r.eigenvalues[0])

  def trace(self, state, seed: int = 0, num_probes: int = 20) -> float:
    """Hutchinson estimate of the Hessian trace (Rademacher probes)."""
    from sharpjax import measures  # pylint: disable=g-import-not-at-top
    r = measures.hessian_trace(self._loss_of(state), state.params, self.batch,
                               jax.random.PRNGKey(seed),
                               num_probes=num_probes, loop=_measure_loop())
    return float(r.trace)

  def _stateless(self, params, batch):
    return self.loss_fn((params, {}), batch)


def summarize_run(method: str, seed: int, hyper: dict, progress: Progress,
                  timing: dict, state, sharpness: Optional[float],
                  hessian_trace: Optional[float] = None) -> RunResult:
  ms = timing["epoch_ms"]
  cost = timing.get("cost") or {}
  return RunResult(
      method=method, seed=seed, hyper=dict(hyper), history=progress.history,
      steps=progress.step,
      ms_per_step=float(np.min(ms)) if ms else None,
      compile_s=float(timing["compile_s"]), wall_s=float(timing["wall_s"]),
      peak_rss_mib=peak_rss_mib(),
      state_bytes=tree_bytes((state.params, state.model_state,
                              state.opt_state)),
      sharpness=sharpness, hessian_trace=hessian_trace,
      flops_per_step=cost.get("flops"),
      bytes_accessed=cost.get("bytes_accessed"))


def failed_run(method: str, seed: int, hyper: dict, progress: Progress,
               compile_s: float, wall_s: float, error: Exception) -> RunResult:
  """The record of a run stopped by ``error``: its epochs so far and why."""
  why = str(error)
  if why.startswith(f"{method}: "):  # NonFiniteLoss names the method
    why = why[len(method) + 2:]
  return RunResult(
      method=method, seed=seed, hyper=dict(hyper), history=progress.history,
      steps=progress.step, ms_per_step=None, compile_s=float(compile_s),
      wall_s=float(wall_s), peak_rss_mib=peak_rss_mib(), state_bytes=None,
      failed=why)
