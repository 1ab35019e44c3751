"""``make_trainer``: a Flax model and an optax chain in, ``init``/``step`` out."""

from __future__ import annotations

import contextlib
from typing import Any, Optional, Sequence
import warnings

import jax
import numpy as np
import optax

from sharpjax._src import chain
from sharpjax._src import protocol
from sharpjax.training import _adapters
from sharpjax.training import _checks
from sharpjax.training import _placement
from sharpjax.training import _step


class _StateInfo:
  """What the trainer reads from an optimizer state, once per foreign state.

  A state the trainer returned itself is known: its host-scheduled count is
  the previous one plus one. A state from elsewhere (``init``, a checkpoint)
  is inspected, and a host-scheduled count is read from the device once.
  """

  def __init__(self, state: _step.TrainState):
    self.needs_ids = protocol.needs_example_ids(state.opt_state)
    scheduled = protocol.host_scheduled(state.opt_state)
    self.count = self.period = None
    self._scheduled = scheduled[0] if len(scheduled) == 1 else None
    if len(scheduled) == 1:
      count, period = jax.device_get((scheduled[0].count,
                                      scheduled[0].period))
      self.count = int(np.ravel(count)[0])
      self.period = int(np.ravel(period)[0])

  def full_step(self) -> Optional[bool]:
    if self.count is None:
      return None
    return protocol.full_step_at(self._scheduled, self.count, self.period)

  def advance(self) -> None:
    if self.count is not None:
      self.count += 1


class Trainer:
  """What :func:`make_trainer` returns.

  Attributes:
    num_devices: devices the batch is split over (1 without parallelism).
  """

  def __init__(self, spec: _step.StepSpec, placement, *, donate: bool,
               validate: bool, infer_classes: bool):
    self._spec = spec
    self._placement = placement
    self._validate = validate
    self._infer_classes = infer_classes
    self._step, self._eval, self._init = placement.compile(spec, donate)
    self._pending = _checks.PendingLabelChecks()
    self._x_ndim = None
    self._checked = set()
    self._last_state = None
    self._info = None
    self._calls = 0
    self.num_devices = placement.num_devices

  def init(self, rng: jax.Array, sample_batch: _step.Batch) -> _step.TrainState:
    """A fresh state (replicated / placed for the chosen parallelism).

    ``rng`` is split in two: one half initialises the model, the other
    becomes ``state.rng`` (the per-step dropout keys), so the parameters
    differ from ``model.init(rng, x)`` with the same key. ``sample_batch``
    gives the input shape (a slice of its ``x`` is used).
    """
    _checks.check_keys(sample_batch, needs_ids=False)
    self._x_ndim = int(np.ndim(sample_batch["x"]))
    x = self._placement.init_input(sample_batch)
    if self._infer_classes:
      logits = jax.eval_shape(
          lambda r, xx: self._spec.adapter.apply(
              *self._spec.adapter.init(r, xx), xx, train=False, key=None)[0],
          rng, x)
      self._spec.num_classes = int(logits.shape[-1])
    state = self._init(rng, x)
    chain.check_chain(state.opt_state)
    if self._placement.axis_name is not None:
      self._trace_once(state, sample_batch)
    return state

  def _trace_once(self, state, sample_batch) -> None:
    """Traces one step on ``sample_batch`` (nothing runs).

    Under a named axis this is where a SAM-family transformation built
    without that ``axis_name`` is refused (it would average nothing and let
    the devices drift), before any training.
    """
    batch = dict(sample_batch)
    if "ids" not in batch and protocol.needs_example_ids(state.opt_state):
      batch["ids"] = np.zeros(np.shape(batch["y"])[:1], np.int32)
    placed = dict(self.shard_batch(batch))
    jax.eval_shape(lambda s, b: self._step(s, b, None), state, placed)

  def shard_batch(self, batch: _step.Batch) -> Any:
    """Puts a host batch where ``step`` wants it (sharded over the mesh,
    split over pmap devices, or unchanged). ``step`` calls it itself; a
    loader can call it ahead (``DataLoader(..., transform=trainer.shard_batch)``)
    so the transfer overlaps the previous step."""
    return self._placement.shard_batch(batch)

  def _prepare(self, batch, needs_ids):
    self._pending.poll(self._spec.num_classes)
    if self._validate:
      per_device = isinstance(batch, _placement.PerDeviceBatch)
      # Shape checks depend only on the keys and shapes: done once per kind.
      signature = (needs_ids, per_device, self._x_ndim, tuple(
          (k, v.shape if hasattr(v, "shape") else np.shape(v))
          for k, v in batch.items())
                   if isinstance(batch, dict) else None)
      if signature not in self._checked:
        _checks.check_keys(batch, needs_ids)
        _checks.check_shapes(batch, per_device=per_device,
                             num_devices=self.num_devices,
                             process_count=self._placement.process_count,
                             x_ndim=self._x_ndim)
        self._checked.add(signature)
      _checks.check_host_labels(batch["y"], self._spec.num_classes,
                                2 if per_device else 1)
    return dict(self.shard_batch(batch))

  def _track(self, label_range, batch, what):
    if self._validate and isinstance(batch.get("y"), jax.Array):
      self._pending.add(label_range, f" (in the batch of {what}; a device "
                        "batch is checked once the step has run)")

  def step(self, state: _step.TrainState, batch: _step.Batch):
    """``step(state, batch) -> (state, metrics)``, jit-compiled (or pmapped).

    Never waits for the device. The state passed in is donated: use the
    returned one. ``metrics`` holds ``loss`` (the task loss, without the
    SAF/MESA penalty), ``accuracy``, ``penalty`` (with SAF/MESA) and the
    transformation's diagnostics (:func:`sharpjax.diagnostics`).
    """
    if state is not self._last_state:
      self._info = _StateInfo(state)
    self._calls += 1
    placed = self._prepare(batch, self._info.needs_ids)
    new_state, metrics, label_range = self._step(state, placed,
                                                 self._info.full_step())
    self._info.advance()
    self._last_state = new_state
    self._track(label_range, placed, f"step call {self._calls}")
    return new_state, self._placement.local(metrics)

  def step_cost(self, state: _step.TrainState, batch: _step.Batch) -> dict:
    r"""XLA's cost analysis of the compiled ``step`` on this state and batch.

    Compiles the step for ``batch``'s shapes (nothing runs, the state is not
    donated) with XLA's optimizations on, whatever
    ``JAX_DISABLE_MOST_OPTIMIZATIONS`` says (without them dead code such as
    an unused backward pass stays in the program and is counted), and
    returns the cost analysis of the optimized program:

    - ``flops``: floating-point operations of one step;
    - ``bytes_accessed``: bytes the step's operations read and write;
    - ``transcendentals``: exp/log/tanh/... evaluations.

    These are per device: on a mesh, with ``per_device_perturbation`` or
    under ``pmap`` each device's partitioned program is counted. For a
    method whose full steps follow a host-known schedule
    (``HOST_SCHEDULED``), both programs are compiled and weighted by their
    share of the run: LookSAM's ``1/k`` full and ``(k-1)/k`` skip steps,
    late-phase SAM's ``1 - start`` SAM steps (which needs its
    ``total_steps``).

    A ratio to SGD's figure predicts the time ratio where a step is
    compute-bound (an accelerator on a large model); it does not count
    host-side dispatch, nor how fast memory-bound work (a gather from SAF's
    bank) runs.

    Example:
      >>> import jax, optax, sharpjax as sj
      >>> from sharpjax import data, models, training
      >>> train = data.make_synthetic(32, input_shape=(40,), num_classes=10)
      >>> batch = next(iter(data.DataLoader(train, batch_size=16).epoch(0)))
      >>> def flops(tx):
      ...   trainer = training.make_trainer(models.CNN1D(), tx)
      ...   state = trainer.init(jax.random.key(0), batch)
      ...   return trainer.step_cost(state, batch)["flops"]
      >>> ratio = flops(optax.chain(sj.sam(), optax.sgd(0.1))) / flops(
      ...     optax.sgd(0.1))
      >>> 1.9 < ratio < 2.1
      True
    """
    _checks.check_keys(batch, protocol.needs_example_ids(state.opt_state))
    placed = dict(self.shard_batch(batch))
    scheduled = protocol.host_scheduled(state.opt_state)
    if len(scheduled) == 1:
      share = protocol.full_step_share(scheduled[0])
      programs = [(True, share), (False, 1.0 - share)]
    else:
      programs = [(None, 1.0)]
    total = {}
    for full_step, weight in programs:
      if weight == 0.0:
        continue
      with _optimized():
        compiled = self._step.lower(state, placed, full_step).compile()
      for key, value in _cost_of(compiled).items():
        total[key] = total.get(key, 0.0) + weight * value
    return total

  def eval_step(self, state: _step.TrainState, batch: _step.Batch) -> dict:
    """``loss`` and ``accuracy`` (means over the batch), model in eval mode."""
    placed = self._prepare(batch, needs_ids=False)
    metrics, label_range = self._eval(state, placed)
    self._track(label_range, placed, "an eval_step call")
    return self._placement.local(metrics)

  def check(self) -> None:
    """Waits for the label checks of past device batches; raises on a bad one.

    ``step`` raises for a bad device batch as soon as its check is ready, at
    a later call; call ``check()`` at the end of a run (or at log intervals,
    where the loop reads metrics anyway) to be sure none is left unchecked.
    """
    self._pending.drain(self._spec.num_classes)


@contextlib.contextmanager
def _optimized():
  """XLA's optimizations on for the compilations inside (the test suite turns
  most of them off, which keeps dead code in the program)."""
  previous = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", False)
  try:
    yield
  finally:
    jax.config.update("jax_disable_most_optimizations", previous)


_COST_KEYS = {"flops": "flops", "bytes accessed": "bytes_accessed",
              "transcendentals": "transcendentals"}


def _cost_of(compiled) -> dict:
  """``flops``, ``bytes_accessed``, ``transcendentals`` of a compiled program."""
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):  # older jax: one dict per program
    analysis = analysis[0] if analysis else {}
  analysis = analysis or {}
  return {ours: float(analysis.get(theirs, 0.0))
          for theirs, ours in _COST_KEYS.items()}


def make_trainer(
    model: Any,
    tx: optax.GradientTransformation,
    loss: Optional[_step.LossFn] = None,
    *,
    mesh: Optional[jax.sharding.Mesh] = None,
    data_axis: str = "data",
    point_axis: str = "pair",
    axis_name: Optional[str] = None,
    devices: Optional[Sequence[jax.Device]] = None,
    per_device_perturbation: bool = False,
    num_classes: Optional[int] = None,
    train_kwarg: Optional[str] = "train",
    rng_names: Sequence[str] = ("dropout",),
    shard_example_tables: bool = False,
    shard_saf_bank: Optional[bool] = None,
    donate: bool = True,
    validate: bool = True,
) -> Trainer:
  r"""Builds ``init``, a jitted ``step`` and ``eval_step`` for a Flax model.

  One ``step`` runs the passes the chain's state asks for
  (:func:`sharpjax.passes`). By default that is the clean forward-backward
  pass (train mode, new BatchNorm statistics kept) with the SAF/MESA penalty
  added, then ``tx.update(grads, opt_state, params, loss_fn=, batch=,
  has_aux=True, value=, logits=, ids=, model_state=, clean_losses=)``, where
  ``loss_fn(params, batch)`` returns the per-example losses and, as ``aux``,
  the pass's new model state. A method may instead take its gradients at
  points it chooses (``point_passes=``, no clean pass) or run its own passes
  (AUSAM, mSAM: ``report_passes=True``; the step's metrics and model state
  come from them). The step never waits for the device (see ``validate``).

  Parallelism (the module docstring explains each): ``mesh`` (``jit``, batch
  sharded over ``data_axis``, state replicated, the result equal to one
  device's up to float reassociation); ``mesh`` with
  ``per_device_perturbation=True`` (``shard_map``: each device perturbs with
  its own shard's gradient, m-sharpness at no extra cost; build SAM-family
  transformations with ``axis_name=data_axis``); or ``axis_name``
  (``jax.pmap`` over ``devices``; build SAM-family transformations and
  BatchNorm layers with the same ``axis_name``). Under a named axis a
  SAM-family transformation built without that ``axis_name`` is refused
  when the step is traced.

  Args:
    model: a ``flax.linen.Module`` called as ``model.apply(variables, x,
      train=...)`` (see ``train_kwarg``), or a ``flax.nnx.Module`` (split
      into ``nnx.Param``, ``nnx.BatchStat`` and the rest; its current values
      are the initial state and its own ``nnx.Rngs`` drive dropout).
    tx: the optax chain.
    loss: ``loss(logits, labels) -> [B]`` per-example losses; default
      :func:`softmax_cross_entropy` (integer labels, float32).
    mesh: a ``jax.sharding.Mesh`` for data parallelism with ``jit``.
    data_axis: the mesh axis the batch is sharded over.
    point_axis: with ``mesh`` (under ``jit``), when the mesh has an axis of
      this name, a method that takes its gradients at several points
      (:func:`sharpjax.gradient_points`) spreads them over it: each group of
      devices along it computes one point's gradient, on the batch sharded
      over ``data_axis`` (SAMPa's two gradients on a ``{"pair": 2, "data":
      n}`` mesh). The batch is not sharded over this axis.
    axis_name: run under ``jax.pmap`` with this axis name.
    devices: devices for ``pmap`` (default ``jax.local_devices()``).
    per_device_perturbation: with ``mesh`` or ``axis_name``, do not average
      the clean gradients before ``tx.update``: each device perturbs with its
      own (SAM's m-sharpness, m = per-device batch).
    num_classes: labels must be in ``[0, num_classes)``; default the width
      of the logits when ``loss`` is the default cross-entropy, else no check.
    train_kwarg: the keyword of the linen model's train/eval switch (None if
      it has none).
    rng_names: linen rng collections to feed per step (default dropout).
    shard_example_tables: with ``mesh``, shard the optimizer state's
      per-example tables (SAF's logit bank, AUSAM's scores: whatever a state
      declares in ``EXAMPLE_AXES``) over the data axis by example: each device
      holds ``1/num_devices`` of the rows and only batch-sized rows cross
      devices. Their ``num_examples`` must be a multiple of the data axis
      size (round it up; ids stay below the true data set size), else
      ``init`` raises.
    shard_saf_bank: the former name of ``shard_example_tables`` (deprecated).
    donate: donate the state buffers to ``step``.
    validate: check each batch without waiting for the device: keys, shapes,
      host labels' range on the host; device labels' range inside the step,
      raised by a later ``step`` or by :meth:`Trainer.check`.

  Returns:
    A :class:`Trainer` (``init``, ``step``, ``eval_step``, ``step_cost``, ...).

  Example:
    >>> import jax, optax, sharpjax as sj
    >>> from sharpjax import data, models, training
    >>> train = data.make_synthetic(64, input_shape=(40,), num_classes=10)
    >>> loader = data.DataLoader(train, batch_size=16, seed=0)
    >>> tx = optax.chain(
    ...     sj.saf(num_examples=len(train), num_classes=10,
    ...            steps_per_epoch=len(loader), start_epoch=1, delay_epochs=1),
    ...     optax.sgd(0.1, momentum=0.9))
    >>> trainer = training.make_trainer(models.CNN1D(), tx)
    >>> state = trainer.init(jax.random.key(0), next(iter(loader.epoch(0))))
    >>> for epoch in range(2):
    ...   for batch in loader.epoch(epoch):
    ...     state, metrics = trainer.step(state, batch)
    >>> sorted(metrics)[:3]
    ['accuracy', 'dropped_ids', 'epoch']
  """
  if shard_saf_bank is not None:
    warnings.warn("make_trainer(shard_saf_bank=...) is deprecated: it shards "
                  "every per-example table; use shard_example_tables=.",
                  DeprecationWarning, stacklevel=2)
    shard_example_tables = shard_example_tables or shard_saf_bank
  chain.check_chain_if_possible(tx)
  placement = _placement_for(mesh, data_axis, axis_name, devices,
                             per_device_perturbation, shard_example_tables,
                             point_axis)
  spec = _step.StepSpec(
      adapter=_adapters.adapter(model, train_kwarg, rng_names), tx=tx,
      loss=_step.softmax_cross_entropy if loss is None else loss,
      axis_name=placement.axis_name,
      average_grads=not per_device_perturbation,
      num_classes=num_classes if validate else None)
  return Trainer(spec, placement, donate=donate, validate=validate,
                 infer_classes=validate and loss is None and num_classes is None)


def _placement_for(mesh, data_axis, axis_name, devices,
                   per_device_perturbation, shard_example_tables,
                   point_axis=None):
  """The placement object for make_trainer's parallelism arguments."""
  if mesh is not None and axis_name is not None:
    raise ValueError("make_trainer: pass either mesh= (jit) or axis_name= "
                     "(pmap), not both.")
  if shard_example_tables and (mesh is None or per_device_perturbation):
    raise ValueError("make_trainer: shard_example_tables needs mesh= without "
                     "per_device_perturbation.")
  if mesh is not None:
    if per_device_perturbation:
      return _placement.PerDeviceMesh(mesh, data_axis)
    return _placement.DataMesh(mesh, data_axis, shard_example_tables,
                               point_axis)
  if axis_name is not None:
    return _placement.Pmap(axis_name, devices)
  if per_device_perturbation:
    raise ValueError("make_trainer: per_device_perturbation needs mesh= or "
                     "axis_name= (it splits the batch over devices).")
  return _placement.OneDevice()
