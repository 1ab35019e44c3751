r"""One training step for every method: the Flax step builder.

:func:`make_trainer` takes a Flax module, an optax chain (plain, SAM family,
SAF, MESA, SAF + SAM) and a per-example loss, and returns ``init``, a jitted
``step`` and ``eval_step``. It does the plumbing that sharpness-aware training
needs and that is easy to get wrong:

- **BatchNorm.** The clean pass runs in train mode and its new statistics are
  kept. The SAM family's perturbed pass (run inside ``tx.update`` through the
  ``loss_fn`` extra argument) also runs in train mode, normalising with the
  perturbed batch's own statistics and starting from the same incoming running
  averages, but its statistics are returned as ``aux`` and discarded. After a
  step the running averages are exactly those of one clean pass.
- **Dropout.** One key per step, ``fold_in(state.rng, state.step)``, used by
  both passes, so the perturbed gradient is taken on the same sub-network.
- **SAF/MESA.** The penalty is added to the per-example losses (so a SAM
  family member in the same chain sees it too); SAF reads the batch's
  ``ids``; MESA's teacher runs in eval mode with the teacher's parameters and
  model state (no teacher forward before ``start_epoch``); the clean logits,
  ids and new model state are handed to ``tx.update``.
- **Data parallelism.** With a ``jax.sharding.Mesh`` the batch is sharded over
  its data axis, the state (parameters, optimizer state, SAF bank) replicated,
  and the state buffers donated. With ``axis_name`` the step runs under
  ``jax.pmap`` instead, gradients averaged over that axis.

Mapping to TPU pods (the same program on every host; tested with real CPU
processes through :mod:`sharpjax.launch`, see the multi-process guide):
start one Python process per host, call ``jax.distributed.initialize()``
(or :func:`sharpjax.launch.initialize`) before anything else, and build the
mesh over all hosts' devices, e.g. ``Mesh(np.array(jax.devices()), ("data",))``
or ``jax.make_mesh((jax.device_count(),), ("data",))``. Every process builds
the same ``DataLoader`` (same seed, so the same global order and ids) and
keeps its rows of each global batch of size B,
``jax.tree.map(lambda v: v[i * b:(i + 1) * b], batch)`` with
``i = jax.process_index()`` and ``b = B // jax.process_count()``
(``DataLoader(..., num_shards=jax.process_count(),
shard_index=jax.process_index())`` loads only those rows);
:meth:`Trainer.shard_batch` (called by ``step``) assembles those
process-local rows into one global array with
``jax.make_array_from_process_local_data``. Every process then runs the same
``step`` on the same replicated state and XLA inserts the cross-host
all-reduce of the gradients, so SAF ids stay global dataset indices and the
bank (replicated, or sharded by example with ``shard_saf_bank``) stays one
global bank. Checkpoint the state with orbax, which writes sharded arrays
from all processes (:func:`sharpjax.launch.save_state` /
:func:`sharpjax.launch.restore_state`).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from sharpjax._src import ausam as ausam_lib
from sharpjax._src import diagnostics as diagnostics_lib
from sharpjax._src import mesa as mesa_lib
from sharpjax._src import saf as saf_lib
from sharpjax._src import trajectory

# (logits [B, C], labels [B] or [B, C]) -> per-example losses [B].
LossFn = Callable[[jax.Array, jax.Array], jax.Array]
Batch = Mapping[str, Any]


def softmax_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Per-example softmax cross-entropy with integer (or one-hot/soft) labels."""
  logits = logits.astype(jnp.float32)
  if jnp.ndim(labels) == jnp.ndim(logits):
    return optax.softmax_cross_entropy(logits, labels)
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


class TrainState(NamedTuple):
  """Everything a training step reads and writes (a pytree).

  Attributes:
    step: number of steps taken (int32 scalar).
    params: the model's ``params`` collection (an ``nnx.State`` for nnx).
    model_state: the other variable collections, e.g.
      ``{"batch_stats": ...}``; ``{}`` for a model without any.
    opt_state: the optax state (SAM diagnostics, SAF bank, MESA teacher).
    rng: base PRNG key. Step ``t`` uses ``k = fold_in(rng, t)`` in both of
      its passes, and the ``i``-th linen rng collection (``rng_names``,
      default dropout only) gets ``fold_in(k, i)``; under pmap ``k`` is
      further folded with the device index.
  """

  step: jax.Array
  params: Any
  model_state: Any
  opt_state: Any
  rng: jax.Array


class PerDeviceBatch(dict):
  """A batch split ``[num_devices, B / num_devices, ...]`` and placed for pmap.

  What :meth:`Trainer.shard_batch` returns under ``axis_name=``; ``step``
  passes it through without splitting it again.
  """


class Trainer(NamedTuple):
  """What :func:`make_trainer` returns.

  Attributes:
    init: ``init(rng, sample_batch) -> TrainState`` (replicated / placed for
      the chosen parallelism).
    step: ``step(state, batch) -> (state, metrics)``, jit-compiled (or
      pmapped); validates the batch on the host first. The state passed in is
      donated: use the returned one.
    eval_step: ``eval_step(state, batch) -> metrics`` with ``loss`` and
      ``accuracy`` (means over the batch), model in eval mode.
    shard_batch: puts a host batch where ``step`` wants it (sharded over the
      mesh, split over pmap devices, or unchanged); ``step`` calls it itself
      for host batches, a loader can call it ahead (``transform=``).
    num_devices: devices the batch is split over (1 without parallelism).
  """

  init: Callable[[jax.Array, Batch], TrainState]
  step: Callable[[TrainState, Batch], tuple[TrainState, dict]]
  eval_step: Callable[[TrainState, Batch], dict]
  shard_batch: Callable[[Batch], Any]
  num_devices: int


# ---------------------------------------------------------------------------
# Model adapters: linen and nnx behind one functional interface.
# ---------------------------------------------------------------------------


class _Linen:
  """``apply(params, model_state, x, train, key) -> (logits, model_state)``."""

  def __init__(self, model: nn.Module, train_kwarg: Optional[str],
               rng_names: Sequence[str]):
    self.model = model
    self.train_kwarg = train_kwarg
    self.rng_names = tuple(rng_names)

  def _rngs(self, key):
    if key is None:
      return {}
    return {n: jax.random.fold_in(key, i) for i, n in enumerate(self.rng_names)}

  def _kwargs(self, train):
    return {self.train_kwarg: train} if self.train_kwarg else {}

  def init(self, key, x):
    k_params, k_rest = jax.random.split(key)
    rngs = {"params": k_params, **self._rngs(k_rest)}
    variables = dict(self.model.init(rngs, x, **self._kwargs(False)))
    params = variables.pop("params", {})
    return params, variables

  def apply(self, params, model_state, x, *, train, key):
    variables = {"params": params, **model_state}
    kwargs = self._kwargs(train)
    if train and model_state:
      logits, new_state = self.model.apply(
          variables, x, rngs=self._rngs(key), mutable=list(model_state),
          **kwargs,
      )
      return logits, {k: new_state.get(k, v) for k, v in model_state.items()}
    logits = self.model.apply(variables, x, rngs=self._rngs(key), **kwargs)
    return logits, model_state


class _Nnx:
  """nnx modules through split/merge inside the traced step.

  The module's own ``nnx.Rngs`` streams (e.g. for ``nnx.Dropout``) live in the
  model state: both passes of a step start from the same stream state, and
  the clean pass's advanced stream is kept, so the key is the same in both
  passes and fresh every step. ``state.rng`` is not used.
  """

  def __init__(self, model):
    from flax import nnx  # pylint: disable=g-import-not-at-top

    self.nnx = nnx
    self.graphdef, params, stats, rest = nnx.split(
        model, nnx.Param, nnx.BatchStat, ...
    )
    self.initial = (params, {"batch_stats": stats, "rest": rest})

  def init(self, key, x):
    del key, x  # nnx modules are initialised when constructed
    params, model_state = self.initial
    return jax.tree.map(jnp.array, params), jax.tree.map(jnp.array, model_state)

  def apply(self, params, model_state, x, *, train, key):
    del key
    nnx = self.nnx
    # Fresh Variable objects owned by the current trace: the states may have
    # been made at an outer trace level (the perturbed pass runs inside
    # tx.update's own value_and_grad), where nnx refuses mutation.
    fresh = lambda tree: jax.tree.map(lambda v: v, tree)
    module = nnx.merge(self.graphdef, fresh(params),
                       fresh(model_state["batch_stats"]),
                       fresh(model_state["rest"]))
    if train:
      module.train()
    else:
      module.eval()
    logits = module(x)
    if not train:
      return logits, model_state
    _, _, stats, rest = nnx.split(module, nnx.Param, nnx.BatchStat, ...)
    return logits, {"batch_stats": stats, "rest": rest}


def _adapter(model, train_kwarg, rng_names):
  if isinstance(model, nn.Module):
    return _Linen(model, train_kwarg, rng_names)
  try:
    from flax import nnx  # pylint: disable=g-import-not-at-top
  except ImportError:  # pragma: no cover
    nnx = None
  if nnx is not None and isinstance(model, nnx.Module):
    return _Nnx(model)
  raise TypeError(
      "make_trainer: model must be a flax.linen.Module or a flax.nnx.Module, "
      f"got {type(model).__name__}."
  )


def _teacher_part(model_state):
  """The floating-point collections of the model state (what MESA averages)."""
  out = {}
  for k, v in model_state.items():
    leaves = jax.tree.leaves(v)
    if leaves and all(jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating)
                      for x in leaves):
      out[k] = v
  return out


# ---------------------------------------------------------------------------
# The step builder.
# ---------------------------------------------------------------------------


def make_trainer(
    model: Any,
    tx: optax.GradientTransformation,
    loss: Optional[LossFn] = None,
    *,
    mesh: Optional[jax.sharding.Mesh] = None,
    data_axis: str = "data",
    axis_name: Optional[str] = None,
    devices: Optional[Sequence[jax.Device]] = None,
    per_device_perturbation: bool = False,
    num_classes: Optional[int] = None,
    train_kwarg: Optional[str] = "train",
    rng_names: Sequence[str] = ("dropout",),
    shard_saf_bank: bool = False,
    donate: bool = True,
    validate: bool = True,
) -> Trainer:
  r"""Builds ``init``, a jitted ``step`` and ``eval_step`` for a Flax model.

  One ``step`` computes the clean forward-backward pass (train mode, new
  BatchNorm statistics kept), adds the SAF/MESA penalty when the chain holds
  one, and calls ``tx.update`` with every extra argument a sharpjax
  transformation may want:

  .. code-block:: python

    tx.update(grads, opt_state, params, loss_fn=loss_fn, batch=batch,
              has_aux=True, value=mean_loss, logits=logits, ids=batch["ids"],
              model_state=new_batch_stats)

  where ``loss_fn(params, batch)`` returns the per-example losses (task loss
  plus penalty) and, as ``aux``, that pass's new model state, which a SAM-family
  transformation discards. Any optax chain works: plain optimizers ignore the
  extra arguments (they go through ``optax.chain``'s extra-args handling).

  Parallelism (pick at most one):

  - ``mesh``: ``jit`` with the batch sharded over ``mesh``'s ``data_axis`` and
    the whole state replicated (so the SAF bank is one global bank; see
    ``shard_saf_bank`` to shard it by example), state buffers donated.
    Gradients and BatchNorm statistics are global, so the result equals the
    single-device run up to float reassociation.
  - ``axis_name``: ``jax.pmap`` over ``devices`` (default: all local devices)
    with that axis name; the state is replicated, each batch split into
    per-device shards, gradients, loss and model state averaged with
    ``pmean``, and SAF's bank written with the all-gathered logits and ids.
    Build SAM-family transformations with the same ``axis_name``
    (``sj.sam(rho, axis_name="batch")``) so their perturbed gradients are
    averaged too, and BatchNorm layers with ``axis_name`` for global
    statistics (the zoo's ResNet/WideResNet take it). With
    ``per_device_perturbation=True`` the clean gradients are *not* averaged
    before ``tx.update``: each device perturbs with its own gradient, the
    original SAM's m-sharpness with m = per-device batch (only meaningful with
    a SAM-family transformation, which averages the perturbed gradients).

  Args:
    model: a ``flax.linen.Module`` called as ``model.apply(variables, x,
      train=...)`` (see ``train_kwarg``), or a ``flax.nnx.Module`` (called as
      ``module(x)`` after ``.train()``/``.eval()``). An nnx module is split
      into ``nnx.Param`` (the params), ``nnx.BatchStat`` and the rest, and
      merged again inside the traced step; its current values are the
      initial state (``init``'s rng is not used for it), and its own
      ``nnx.Rngs`` streams, kept in the state, drive dropout (same key in
      both passes, advanced once per step; under pmap every device draws the
      same mask, since the streams are replicated).
    tx: the optax chain.
    loss: ``loss(logits, labels) -> [B]`` per-example losses; default
      :func:`softmax_cross_entropy` (integer labels).
    mesh: a ``jax.sharding.Mesh`` for data parallelism with ``jit``.
    data_axis: the mesh axis the batch is sharded over.
    axis_name: run under ``jax.pmap`` with this axis name.
    devices: devices for ``pmap`` (default ``jax.local_devices()``).
    per_device_perturbation: under ``pmap``, do not average the clean
      gradients before ``tx.update`` (m-sharpness).
    num_classes: number of classes, for the label check; default the width of
      the logits when ``loss`` is the default cross-entropy, else no check.
    train_kwarg: the keyword of the linen model's train/eval switch (None if
      it has none).
    rng_names: linen rng collections to feed per step (default dropout).
    shard_saf_bank: with ``mesh``, shard SAF's logit bank (and its epoch
      stamps) over the data axis by example (``PartitionSpec(None,
      data_axis)``) instead of replicating it: each device holds
      ``1/num_devices`` of the bank and only batch-sized rows cross devices.
      The bank's ``num_examples`` must then be a multiple of the data axis
      size (round it up; ids stay below the true data set size), else
      ``init`` raises.
      AUSAM's per-example score table (``scores``, ``visits``) is sharded
      the same way (``PartitionSpec(data_axis)``), with the same rule for its
      ``num_examples``. Over a mesh spanning several processes each host
      then holds only its devices' rows.
    donate: donate the state buffers to ``step``.
    validate: check each batch on the host before the step (keys, batch size,
      input rank, label range); the label check reads the labels, so on
      device-resident labels it waits for them.

  Returns:
    A :class:`Trainer`.

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
  if mesh is not None and axis_name is not None:
    raise ValueError("make_trainer: pass either mesh= (jit) or axis_name= "
                     "(pmap), not both.")
  if per_device_perturbation and axis_name is None:
    raise ValueError("make_trainer: per_device_perturbation needs axis_name= "
                     "(it is a pmap behaviour).")
  if shard_saf_bank and mesh is None:
    raise ValueError("make_trainer: shard_saf_bank needs mesh=.")
  if mesh is not None and data_axis not in mesh.axis_names:
    raise ValueError(
        f"make_trainer: data_axis {data_axis!r} is not an axis of the mesh "
        f"{tuple(mesh.axis_names)}."
    )
  adapter = _adapter(model, train_kwarg, rng_names)
  loss_fn_user = softmax_cross_entropy if loss is None else loss
  infer_classes = loss is None and num_classes is None
  spec: dict[str, Any] = {"num_classes": num_classes, "x_ndim": None}

  if mesh is not None:
    # Flax linen layers are not written for explicit sharding types (since JAX
    # 0.9 ``jax.make_mesh`` makes Explicit axes), so the step runs on the same
    # devices and axis names with Auto axes; the compiler propagates the
    # batch sharding.
    mesh = jax.sharding.Mesh(
        mesh.devices, mesh.axis_names,
        axis_types=(jax.sharding.AxisType.Auto,) * len(mesh.axis_names))
    num_devices = int(mesh.shape[data_axis])
  elif axis_name is not None:
    devices = list(devices) if devices is not None else jax.local_devices()
    num_devices = len(devices)
  else:
    num_devices = 1

  # -- the per-device computation -------------------------------------------

  def _features(model_state, key, opt_state):
    """Builds the per-example loss_fn handed to the clean and perturbed pass."""
    traj = trajectory.find_trajectory_state(opt_state)

    def per_example_loss(p, batch):
      logits, new_state = adapter.apply(p, model_state, batch["x"], train=True,
                                        key=key)
      task = loss_fn_user(logits, batch["y"]).astype(jnp.float32)
      if jnp.shape(task) != jnp.shape(logits)[:1]:
        raise ValueError(
            "make_trainer: loss(logits, labels) must return per-example "
            f"losses of shape [B] = {jnp.shape(logits)[:1]}, got "
            f"{jnp.shape(task)}."
        )
      if traj is None:
        penalty = jnp.zeros_like(task)
      elif isinstance(traj, saf_lib.SAFState):
        penalty = trajectory.trajectory_penalty(
            opt_state, logits, batch["ids"], per_example=True)
      else:
        x_in = batch["x"]
        teacher_fn = lambda tp, tms: adapter.apply(
            tp, {**model_state, **tms} if tms else model_state, x_in,
            train=False, key=None)[0]
        penalty = trajectory.trajectory_penalty(
            opt_state, logits, teacher_fn=teacher_fn, per_example=True)
      return task + penalty, (new_state, logits, task, penalty)

    return traj, per_example_loss

  def _step(state: TrainState, batch):
    key = jax.random.fold_in(state.rng, state.step)
    if axis_name is not None:
      key = jax.random.fold_in(key, jax.lax.axis_index(axis_name))
    traj, per_example_loss = _features(state.model_state, key,
                                       state.opt_state)

    def mean_loss(p):
      losses, aux = per_example_loss(p, batch)
      return jnp.mean(losses), aux

    (value, (new_state, logits, task, penalty)), grads = jax.value_and_grad(
        mean_loss, has_aux=True)(state.params)
    ids = batch.get("ids")
    update_logits, update_ids = logits, ids
    if axis_name is not None:
      value = jax.lax.pmean(value, axis_name)
      if not per_device_perturbation:
        grads = jax.lax.pmean(grads, axis_name)
      new_state = jax.tree.map(
          lambda v: (jax.lax.pmean(v, axis_name)
                     if jnp.issubdtype(v.dtype, jnp.inexact) else v),
          new_state)
      update_logits = jax.lax.all_gather(logits, axis_name, tiled=True)
      if ids is not None:
        update_ids = jax.lax.all_gather(ids, axis_name, tiled=True)
    extra = dict(loss_fn=per_example_loss, batch=batch, has_aux=True,
                 value=value, logits=update_logits)
    if update_ids is not None:
      extra["ids"] = update_ids
    if isinstance(traj, mesa_lib.MESAState) and jax.tree.leaves(
        traj.teacher_model_state):
      extra["model_state"] = _teacher_part(new_state)
    updates, opt_state = tx.update(grads, state.opt_state, state.params,
                                   **extra)
    params = optax.apply_updates(state.params, updates)
    metrics = {
        "loss": jnp.mean(task),
        "accuracy": _accuracy(logits, batch["y"]),
    }
    if traj is not None:
      metrics["penalty"] = jnp.mean(penalty)
    try:
      diag = diagnostics_lib.diagnostics(opt_state)
    except ValueError:
      diag = {}
    for k, v in diag.items():
      metrics.setdefault(k, jnp.asarray(v))
    if axis_name is not None:
      metrics = {k: (jax.lax.pmean(v, axis_name)
                     if jnp.issubdtype(v.dtype, jnp.inexact) else v)
                 for k, v in metrics.items()}
    new = TrainState(state.step + 1, params, new_state, opt_state, state.rng)
    return new, metrics

  def _eval(state: TrainState, batch):
    logits, _ = adapter.apply(state.params, state.model_state, batch["x"],
                              train=False, key=None)
    metrics = {
        "loss": jnp.mean(loss_fn_user(logits, batch["y"]).astype(jnp.float32)),
        "accuracy": _accuracy(logits, batch["y"]),
    }
    if axis_name is not None:
      metrics = jax.lax.pmean(metrics, axis_name)
    return metrics

  def _init(rng, x):
    k_model, k_rng = jax.random.split(rng)
    params, model_state = adapter.init(k_model, x)
    opt_state = tx.init(params)
    traj = trajectory.find_trajectory_state(opt_state)
    if isinstance(traj, mesa_lib.MESAState) and _teacher_part(model_state):
      opt_state = mesa_lib.init_teacher_model_state(
          opt_state, _teacher_part(model_state))
    return TrainState(jnp.zeros([], jnp.int32), params, model_state,
                      opt_state, k_rng)

  # -- placement ------------------------------------------------------------

  donate_argnums = (0,) if donate else ()
  if mesh is not None:
    P = jax.sharding.PartitionSpec
    replicated = jax.sharding.NamedSharding(mesh, P())
    data_sharding = jax.sharding.NamedSharding(mesh, P(data_axis))
    bank_sharding = jax.sharding.NamedSharding(mesh, P(None, data_axis))
    table_sharding = jax.sharding.NamedSharding(mesh, P(data_axis))

    def state_shardings(state):
      """Replicated, except (with shard_saf_bank) SAF's bank by example."""

      def node(x):
        if shard_saf_bank and isinstance(x, saf_lib.SAFState):
          rows = x.logit_bank.shape[1]
          if rows % num_devices:
            raise ValueError(
                f"make_trainer(shard_saf_bank=True): the SAF bank has "
                f"num_examples={rows} rows, not a multiple of the "
                f"{num_devices} devices of the data axis; build sj.saf with "
                f"num_examples={-(-rows // num_devices) * num_devices} (ids "
                "stay below the real data set size).")
          return jax.tree.map(lambda _: replicated, x)._replace(
              logit_bank=bank_sharding, recorded_epoch=bank_sharding)
        if shard_saf_bank and isinstance(x, ausam_lib.AUSAMState):
          rows = x.scores.shape[0]
          if rows % num_devices:
            raise ValueError(
                f"make_trainer(shard_saf_bank=True): AUSAM's score table has "
                f"num_examples={rows} rows, not a multiple of the "
                f"{num_devices} devices of the data axis; build sj.ausam with "
                f"num_examples={-(-rows // num_devices) * num_devices}.")
          return jax.tree.map(lambda _: replicated, x)._replace(
              scores=table_sharding, visits=table_sharding)
        return replicated

      is_table = lambda x: isinstance(x, (saf_lib.SAFState,
                                          ausam_lib.AUSAMState))
      return jax.tree.map(node, state, is_leaf=is_table)

    def constrained(fn):
      def wrapped(*args):
        out = fn(*args)
        single = isinstance(out, TrainState)
        state = out if single else out[0]
        state = jax.lax.with_sharding_constraint(state, state_shardings(state))
        return state if single else (state,) + tuple(out[1:])
      return wrapped

    # The state keeps the shardings its arrays carry (set by init through the
    # constraint); the batch is sharded over the data axis.
    jit_step = jax.jit(constrained(_step), in_shardings=(None, data_sharding),
                       out_shardings=(None, replicated),
                       donate_argnums=donate_argnums)
    jit_eval = jax.jit(_eval, in_shardings=(None, data_sharding),
                       out_shardings=replicated)
    jit_init = jax.jit(constrained(_init))

    def shard_batch(batch):
      if _already_placed(batch, data_sharding):
        return batch
      if jax.process_count() > 1:
        return jax.tree.map(
            lambda x: jax.make_array_from_process_local_data(data_sharding, x),
            dict(batch))
      return jax.device_put(dict(batch), data_sharding)

    def init(rng, sample_batch):
      _record_spec(sample_batch)
      return jit_init(rng, _init_input(sample_batch, num_devices))

  elif axis_name is not None:
    jit_step = jax.pmap(_step, axis_name=axis_name, devices=devices,
                        donate_argnums=donate_argnums)
    jit_eval = jax.pmap(_eval, axis_name=axis_name, devices=devices)
    jit_init = jax.pmap(lambda _, rng, x: _init(rng, x), in_axes=(0, None, None),
                        devices=devices)

    per_device = jax.sharding.NamedSharding(
        jax.sharding.Mesh(np.array(devices), ("devices",)),
        jax.sharding.PartitionSpec("devices"))

    def shard_batch(batch):
      if isinstance(batch, PerDeviceBatch):
        return batch
      split = jax.tree.map(
          lambda x: np.reshape(np.asarray(x), (num_devices, -1)
                               + np.shape(x)[1:]), dict(batch))
      return PerDeviceBatch(jax.device_put(split, per_device))

    def init(rng, sample_batch):
      _record_spec(sample_batch)
      return jit_init(jnp.arange(num_devices), rng,
                      _init_input(sample_batch, num_devices))

  else:
    jit_step = jax.jit(_step, donate_argnums=donate_argnums)
    jit_eval = jax.jit(_eval)
    jit_init = jax.jit(_init)

    def shard_batch(batch):
      return dict(batch)

    def init(rng, sample_batch):
      _record_spec(sample_batch)
      return jit_init(rng, _init_input(sample_batch, 1))

  # -- host-side validation -------------------------------------------------

  def _record_spec(sample_batch):
    _check_keys(sample_batch, needs_ids=False)
    spec["x_ndim"] = int(np.ndim(sample_batch["x"]))
    if infer_classes:
      x = _init_input(sample_batch, num_devices)
      shapes = jax.eval_shape(_init, jax.random.key(0), x)
      logits = jax.eval_shape(
          lambda s, xx: adapter.apply(s.params, s.model_state, xx, train=False,
                                      key=None)[0], shapes, x)
      spec["num_classes"] = int(logits.shape[-1])

  def _check_keys(batch, needs_ids):
    if not isinstance(batch, Mapping):
      raise TypeError(
          "sharpjax.training: a batch must be a dict with 'x', 'y' (and 'ids' "
          f"for SAF), got {type(batch).__name__}.")
    missing = [k for k in ("x", "y") if k not in batch]
    if needs_ids and "ids" not in batch:
      missing.append("ids")
    if missing:
      why = (" (SAF keys its logit bank by the examples' dataset ids: use "
             "sharpjax.data.DataLoader, which yields them)"
             if "ids" in missing else "")
      raise KeyError(
          f"sharpjax.training: the batch lacks {missing}{why}; it has "
          f"{sorted(batch)}.")

  def _validate(state, batch, pmapped_batch, training_step=True):
    if not validate:
      return
    traj = trajectory.find_trajectory_state(state.opt_state)
    _check_keys(batch, needs_ids=training_step
                and isinstance(traj, saf_lib.SAFState))
    lead = {k: (np.shape(v)[:2] if pmapped_batch else np.shape(v)[:1])
            for k, v in batch.items()}
    if len(set(lead.values())) != 1 or () in lead.values():
      raise ValueError(
          "sharpjax.training: every batch entry needs the same leading batch "
          f"axis; got leading shapes {lead}.")
    size = next(iter(lead.values()))
    size = size[0] * size[1] if pmapped_batch else size[0]
    if mesh is not None and jax.process_count() > 1:
      size *= jax.process_count()
    if size % num_devices:
      raise ValueError(
          f"sharpjax.training: batch size {size} is not divisible by the "
          f"{num_devices} devices it is split over; use a batch size that is "
          f"a multiple of {num_devices} (DataLoader(drop_last=True) keeps "
          "every batch full).")
    x_ndim = np.ndim(batch["x"]) - (1 if pmapped_batch else 0)
    if spec["x_ndim"] is not None and x_ndim != spec["x_ndim"]:
      raise ValueError(
          f"sharpjax.training: batch['x'] has rank {x_ndim} (shape "
          f"{np.shape(batch['x'])}), but the state was initialised with "
          f"rank-{spec['x_ndim']} inputs.")
    n = spec["num_classes"]
    y = batch["y"]
    if n is not None and np.ndim(y) == (2 if pmapped_batch else 1):
      dtype = y.dtype if hasattr(y, "dtype") else np.asarray(y).dtype
      if np.issubdtype(dtype, np.integer):
        if isinstance(y, jax.Array):
          lo, hi = (int(v) for v in jax.device_get(_min_max(y)))
        else:
          y = np.asarray(y)
          lo, hi = int(y.min()), int(y.max())
        if lo < 0 or hi >= n:
          raise ValueError(
              f"sharpjax.training: labels must be in [0, {n}), got values in "
              f"[{lo}, {hi}].")

  def step(state, batch):
    pmapped = isinstance(batch, PerDeviceBatch)
    _validate(state, batch, pmapped)
    new_state, metrics = jit_step(state, dict(shard_batch(batch)))
    if axis_name is not None:
      metrics = jax.tree.map(lambda m: m[0], metrics)
    return new_state, metrics

  def eval_step(state, batch):
    pmapped = isinstance(batch, PerDeviceBatch)
    _validate(state, batch, pmapped, training_step=False)
    metrics = jit_eval(state, dict(shard_batch(batch)))
    if axis_name is not None:
      metrics = jax.tree.map(lambda m: m[0], metrics)
    return metrics

  return Trainer(init=init, step=step, eval_step=eval_step,
                 shard_batch=shard_batch, num_devices=num_devices)


# ---------------------------------------------------------------------------
# Helpers.
# ---------------------------------------------------------------------------


def _accuracy(logits, labels):
  if jnp.ndim(labels) == jnp.ndim(logits):
    labels = jnp.argmax(labels, axis=-1)
  return jnp.mean((jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32))


@jax.jit
def _min_max(y):
  return jnp.min(y), jnp.max(y)


def _init_input(sample_batch, num_devices):
  """A small slice of the sample batch's inputs for ``init``."""
  x = sample_batch["x"]
  n = max(1, min(np.shape(x)[0], num_devices))
  return jnp.asarray(np.asarray(x[:n]))


def _already_placed(batch, sharding) -> bool:
  leaves = jax.tree.leaves(batch)
  return all(isinstance(x, jax.Array) and x.sharding == sharding
             for x in leaves)


def unreplicate(tree: Any) -> Any:
  """The first replica of a pmapped (replicated) pytree."""
  return jax.tree.map(lambda x: x[0], tree)
