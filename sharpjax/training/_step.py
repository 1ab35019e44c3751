r"""The training and evaluation step, as plain functions of a :class:`StepSpec`.

One step: the passes the optimizer state asks for (:func:`sharpjax.passes`:
the clean forward-backward pass in train mode, one per point a method
chooses, or none when the method runs its own), the SAF/MESA penalty added
to the per-example losses when the chain holds a trajectory regularizer, and
``tx.update`` called with every extra argument a sharpjax transformation may
want; the new model state and the metrics come from the clean pass, the
first point, or the method's own passes. What the optimizer state needs
(example ids, the model state, a host-chosen branch) is read from the state
itself (:mod:`sharpjax._src.protocol`), never from the method's type.

These functions are placement-agnostic: :mod:`._placement` compiles them with
``jit`` (one device or a mesh), ``pmap`` or ``shard_map``; under the last two
``spec.axis_name`` names the mapped axis.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec as P

from sharpjax._src import diagnostics as diagnostics_lib
from sharpjax._src import perturbed as perturbed_lib
from sharpjax._src import protocol
from sharpjax._src import trajectory

# (logits [B, C], labels [B] or [B, C]) -> per-example losses [B].
LossFn = Callable[[jax.Array, jax.Array], jax.Array]
Batch = Mapping[str, Any]


def softmax_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Per-example softmax cross-entropy with integer (or one-hot/soft) labels.

  The logits are cast to float32 first, so a bfloat16 model's loss is computed
  in float32.

  Example:
    >>> import jax.numpy as jnp
    >>> from sharpjax import training
    >>> training.softmax_cross_entropy(jnp.zeros((2, 4)), jnp.array([0, 3]))
    Array([1.386..., 1.386...], dtype=float32)
  """
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
      default dropout only) gets ``fold_in(k, i)``; under pmap or
      ``shard_map`` ``k`` is further folded with the device index.
  """

  step: jax.Array
  params: Any
  model_state: Any
  opt_state: Any
  rng: jax.Array


@dataclasses.dataclass(eq=False)
class StepSpec:
  """What a step needs besides the state and the batch.

  Attributes:
    adapter: the model adapter (:mod:`._adapters`).
    tx: the optax chain.
    loss: per-example loss ``loss(logits, labels) -> [B]``.
    axis_name: the mapped axis the step runs under (``pmap`` or
      ``shard_map``), None under ``jit``.
    average_grads: with ``axis_name``, average the clean gradients over it
      before ``tx.update`` (False: each device perturbs with its own).
    num_classes: labels must lie in ``[0, num_classes)``; None: no check.
      Filled in by the trainer's ``init`` when inferred from the logits; read
      when the step is traced.
    point_sharding: the sharding of a method's several gradient points
      stacked along a leading axis (a mesh axis of as many devices groups as
      points: each group computes one gradient); None: no constraint.
  """

  adapter: Any
  tx: optax.GradientTransformation
  loss: LossFn
  axis_name: Optional[str] = None
  average_grads: bool = True
  num_classes: Optional[int] = None
  point_sharding: Optional[Any] = None


def init_state(spec: StepSpec, rng: jax.Array, x: jax.Array) -> TrainState:
  """A fresh state: model init with one half of ``rng``, ``state.rng`` the other.

  A state that tracks the model state (MESA's teacher) is given the model's
  floating-point collections.
  """
  k_model, k_rng = jax.random.split(rng)
  params, model_state = spec.adapter.init(k_model, x)
  return state_from_params(spec.tx, params, model_state, k_rng)


def state_from_params(tx: optax.GradientTransformation, params: Any,
                      model_state: Any, rng: jax.Array) -> TrainState:
  """The step-0 :class:`TrainState` of given parameters and model state.

  What ``Trainer.init`` builds after initialising the model, for parameters
  that come from elsewhere (a checkpoint, another framework, one shared
  initialisation for several methods): ``tx.init(params)``, and a state that
  tracks the model state (MESA's teacher) is handed the model's
  floating-point collections.

  Example:
    >>> import jax, jax.numpy as jnp, optax, sharpjax as sj
    >>> from sharpjax import training
    >>> tx = optax.chain(sj.mesa(start_epoch=0, steps_per_epoch=10),
    ...                  optax.sgd(0.1))
    >>> state = training.state_from_params(
    ...     tx, {"w": jnp.ones(3)}, {"batch_stats": {"mean": jnp.zeros(3)}},
    ...     jax.random.key(0))
    >>> sj.teacher(state.opt_state)[1]
    {'batch_stats': {'mean': Array([0., 0., 0.], dtype=float32)}}
  """
  opt_state = tx.init(params)
  tracked = protocol.float_collections(model_state)
  if tracked and protocol.tracks_model_state(opt_state):
    opt_state = protocol.attach_model_state(opt_state, tracked)
  return TrainState(jnp.zeros([], jnp.int32), params, model_state, opt_state,
                    rng)


def _per_example_loss(spec: StepSpec, state: TrainState, key: jax.Array):
  """The per-example ``loss_fn`` handed to the clean and the perturbed pass.

  It returns the task loss plus the trajectory penalty (so a SAM-family member
  of the same chain sees the penalty too) and, as aux, the pass's new model
  state, logits, task losses and penalties.
  """
  has_penalty = trajectory.find_trajectory_state(state.opt_state) is not None

  def loss_fn(params, batch):
    logits, new_model_state = spec.adapter.apply(
        params, state.model_state, batch["x"], train=True, key=key)
    task = spec.loss(logits, batch["y"]).astype(jnp.float32)
    if jnp.shape(task) != jnp.shape(logits)[:1]:
      raise ValueError(
          "make_trainer: loss(logits, labels) must return per-example losses "
          f"of shape [B] = {jnp.shape(logits)[:1]}, got {jnp.shape(task)}.")
    if not has_penalty:
      penalty = jnp.zeros_like(task)
    else:
      def teacher_fn(teacher_params, teacher_model_state):
        merged = ({**state.model_state, **teacher_model_state}
                  if teacher_model_state else state.model_state)
        return spec.adapter.apply(teacher_params, merged, batch["x"],
                                  train=False, key=None)[0]

      penalty = trajectory.trajectory_penalty(
          state.opt_state, logits, batch.get("ids"), teacher_fn=teacher_fn,
          per_example=True)
    return task + penalty, (new_model_state, logits, task, penalty)

  return loss_fn, has_penalty


def _pmean_inexact(tree: Any, axis_name: str) -> Any:
  return jax.tree.map(
      lambda v: (jax.lax.pmean(v, axis_name)
                 if jnp.issubdtype(v.dtype, jnp.inexact) else v), tree)


def train_step(spec: StepSpec, state: TrainState, batch: Batch,
               full_step: Optional[bool] = None):
  """One training step: ``(new_state, metrics, label_range)``.

  ``full_step`` (a static Python bool, or None) is handed to ``tx.update`` for
  a state that takes its expensive branch on a host-known schedule.
  ``label_range`` is ``[min, max]`` of the integer labels (None without a
  label check), read back later by the trainer without waiting.
  """
  axis = spec.axis_name
  key = jax.random.fold_in(state.rng, state.step)
  if axis is not None:
    key = jax.random.fold_in(key, jax.lax.axis_index(axis))
  loss_fn, has_penalty = _per_example_loss(spec, state, key)

  def mean_loss(params):
    losses, aux = loss_fn(params, batch)
    return jnp.mean(losses), aux

  kind = protocol.passes(state.opt_state)
  extra = dict(loss_fn=loss_fn, batch=batch, has_aux=True)
  ids = batch.get("ids")
  labels = batch["y"]
  if kind == protocol.OWN:
    # The method runs its own passes inside update: no pass here.
    grads = jax.tree.map(jnp.zeros_like, state.params)
    value = None
    extra["report_passes"] = True
  else:
    points = protocol.gradient_points(state.opt_state, state.params)
    (value, (model_state, logits, task, penalty)), grads, point_passes = (
        _gradients_at(spec, points, mean_loss))
    if kind == protocol.POINTS:
      extra["point_passes"] = point_passes
    else:
      # The clean per-example losses (task + penalty), this device's batch:
      # a method that ranks examples by them need not run that forward again.
      extra["clean_losses"] = point_passes[0].losses
  if axis is not None:
    if value is not None:
      value = jax.lax.pmean(value, axis)
    if spec.average_grads and "point_passes" in extra:
      extra["point_passes"] = tuple(
          p._replace(grads=jax.lax.pmean(p.grads, axis),
                     loss=jax.lax.pmean(p.loss, axis))
          for p in extra["point_passes"])
      grads = extra["point_passes"][0].grads
    elif spec.average_grads:
      grads = jax.lax.pmean(grads, axis)
    extra["data_axis_name"] = axis
    # Per-example tables are replicated: every device writes every row.
    ids = None if ids is None else jax.lax.all_gather(ids, axis, tiled=True)
  if kind != protocol.OWN:
    if axis is not None:
      model_state = _pmean_inexact(model_state, axis)
      logits_all = jax.lax.all_gather(logits, axis, tiled=True)
    else:
      logits_all = logits
    extra.update(value=value, logits=logits_all)
    tracked = protocol.float_collections(model_state)
    if tracked and protocol.tracks_model_state(state.opt_state):
      extra["model_state"] = tracked
  if ids is not None:
    extra["ids"] = ids
  if full_step is not None:
    extra["full_step"] = full_step
  updates, opt_state = spec.tx.update(grads, state.opt_state, state.params,
                                      **extra)
  if kind == protocol.OWN:
    record, opt_state = protocol.pop_step_passes(opt_state)
    model_state, logits, task, penalty = _merge_passes(record.aux)
    if record.examples is not None:
      labels = jnp.take(labels, record.examples, axis=0)
    if axis is not None:
      model_state = _pmean_inexact(model_state, axis)
  params = optax.apply_updates(state.params, updates)
  metrics = {"loss": jnp.mean(task), "accuracy": accuracy(logits, labels)}
  if has_penalty:
    metrics["penalty"] = jnp.mean(penalty)
  for name, value in _diagnostics(opt_state).items():
    metrics.setdefault(name, jnp.asarray(value))
  if axis is not None:
    metrics = _pmean_inexact(metrics, axis)
  new_state = TrainState(state.step + 1, params, model_state, opt_state,
                         state.rng)
  return new_state, metrics, label_range(spec, batch["y"])


def _merge_passes(aux):
  """The aux of a method's own passes (stacked, one entry per pass) as one.

  The per-example entries (logits, task losses, penalties) are concatenated
  in the passes' order; the model state is averaged over the passes (for
  BatchNorm the mean of each pass's running-average update), a non-float
  collection taken from the first pass.
  """
  model_state, logits, task, penalty = aux
  flat = lambda x: x.reshape((-1,) + x.shape[2:])
  model_state = jax.tree.map(
      lambda v: (jnp.mean(v, axis=0).astype(v.dtype)
                 if jnp.issubdtype(v.dtype, jnp.inexact) else v[0]),
      model_state)
  return model_state, flat(logits), flat(task), flat(penalty)


def _gradients_at(spec: StepSpec, points: tuple, mean_loss):
  """The gradients at ``points``: ``(value_and_aux, grads, point_passes)``.

  ``value_and_aux`` and ``grads`` are the first point's; ``point_passes``
  holds a :class:`sharpjax.PerturbedPass` per point. One
  point is one forward-backward pass. Several points are independent passes
  in one program: with ``spec.point_sharding`` (a mesh axis with one group
  of devices per point) each group computes one point's gradient (a
  ``shard_map`` over that axis, the batch sharded within the group as
  before), and the gradients are then gathered once; otherwise the passes
  are written one after the other, which XLA may overlap. (A ``vmap`` over
  the stacked points turns every convolution into a grouped one with
  per-point kernels: twice the time of two plain passes on the CPU CNN.)
  """
  value_and_grad = jax.value_and_grad(mean_loss, has_aux=True)

  def record(value, aux, grads):
    return perturbed_lib.PerturbedPass(value, grads, aux[2] + aux[3], aux)

  sharding = spec.point_sharding
  axis = None if sharding is None else sharding.spec[0]
  if (len(points) > 1 and axis is not None
      and sharding.mesh.shape[axis] == len(points)):
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *points)

    def one_group(point):
      (value, aux), grads = value_and_grad(
          jax.tree.map(lambda x: x[0], point))
      return jax.tree.map(lambda x: jnp.asarray(x)[None], (value, aux, grads))

    values, auxes, grads = jax.shard_map(
        one_group, mesh=sharding.mesh, in_specs=P(axis), out_specs=P(axis),
        axis_names={axis}, check_vma=False)(stacked)
    passes = tuple(
        record(values[i], jax.tree.map(lambda a, i=i: a[i], auxes),
               jax.tree.map(lambda g, i=i: g[i], grads))
        for i in range(len(points)))
  else:
    passes = []
    for point in points:
      (value, aux), grads = value_and_grad(point)
      passes.append(record(value, aux, grads))
    passes = tuple(passes)
  first = passes[0]
  return (first.loss, first.aux), first.grads, passes


def eval_step(spec: StepSpec, state: TrainState, batch: Batch):
  """``(metrics, label_range)``: mean loss and accuracy, model in eval mode."""
  logits, _ = spec.adapter.apply(state.params, state.model_state, batch["x"],
                                 train=False, key=None)
  metrics = {
      "loss": jnp.mean(spec.loss(logits, batch["y"]).astype(jnp.float32)),
      "accuracy": accuracy(logits, batch["y"]),
  }
  if spec.axis_name is not None:
    metrics = jax.lax.pmean(metrics, spec.axis_name)
  return metrics, label_range(spec, batch["y"])


def _diagnostics(opt_state: Any) -> dict:
  try:
    return diagnostics_lib.diagnostics(opt_state)
  except ValueError:  # no sharpjax state in the chain
    return {}


def accuracy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Fraction of argmax predictions equal to the (integer or one-hot) labels."""
  if jnp.ndim(labels) == jnp.ndim(logits):
    labels = jnp.argmax(labels, axis=-1)
  return jnp.mean((jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32))


def label_range(spec: StepSpec, labels: jax.Array) -> Optional[jax.Array]:
  """``[min, max]`` of integer labels (over every device), or None."""
  if (spec.num_classes is None or jnp.ndim(labels) != 1
      or not jnp.issubdtype(labels.dtype, jnp.integer)):
    return None
  lo, hi = jnp.min(labels), jnp.max(labels)
  if spec.axis_name is not None:
    lo = jax.lax.pmin(lo, spec.axis_name)
    hi = jax.lax.pmax(hi, spec.axis_name)
  return jnp.stack([lo, hi]).astype(jnp.int32)
