r"""SAF: sharpness-aware training for free, with the logit bank in the state.

SAF replaces SAM's second pass by a loss term: the KL divergence between the
network's tempered outputs now and its outputs for the same examples
``delay_epochs`` epochs ago. The past outputs live in a logit bank in the
optimizer state, indexed by dataset example id.
"""

from __future__ import annotations

import os
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sharpjax._src import base
from sharpjax._src import example_ids
from sharpjax._src import trajectory_loss


@trajectory_loss.register_trajectory_state
class SAFState(NamedTuple):
  """State of :func:`saf`.

  Attributes:
    count: number of updates taken (int32); the epoch is
      ``count // steps_per_epoch``.
    logit_bank: ``[delay_epochs, num_examples, num_classes]`` past logits in
      the bank dtype; epoch ``e`` reads and then writes slot
      ``e % delay_epochs``.
    recorded_epoch: ``[delay_epochs, num_examples]`` int32, the epoch each row
      of the bank was written in (-1: never). A row is a valid target at epoch
      ``e`` only if it was written in epoch ``e - delay_epochs``.
    temperature: the softmax temperature (float32 scalar).
    strength: the penalty weight (float32 scalar).
    start_epoch: first epoch with the penalty on (int32 scalar).
    steps_per_epoch: steps in one epoch (int32 scalar).
    diagnostics: epoch, whether the penalty is on, ids ignored so far.

  Class attributes (not fields), read by trainers instead of testing the type:

  - ``EXAMPLE_AXES``: the per-example tables, field name -> the axis indexed
    by example id (``logit_bank`` and ``recorded_epoch``, axis 1). A trainer
    may shard these fields by example along that axis.
  - ``PASSES_GRADIENT = True``: ``update`` hands the gradient on unchanged,
    so SAF may precede a SAM-family transformation in a chain
    (:func:`sharpjax.check_chain`); it must see every batch, so not inside
    ``optax.MultiSteps``.
  """

  count: jax.Array
  logit_bank: jax.Array
  recorded_epoch: jax.Array
  temperature: jax.Array
  strength: jax.Array
  start_epoch: jax.Array
  steps_per_epoch: jax.Array
  diagnostics: trajectory_loss.TrajectoryDiagnostics

  EXAMPLE_AXES = {"logit_bank": 1, "recorded_epoch": 1}
  PASSES_GRADIENT = True

  def trajectory_penalty(
      self, logits: jax.Array, *, ids: jax.Array | None = None,
      teacher_fn=None, teacher_logits=None, per_example: bool = False,
  ) -> jax.Array:
    """The SAF penalty of :func:`sharpjax.trajectory_penalty`.

    Needs ``ids``; ``teacher_fn`` and ``teacher_logits`` (MESA's) are ignored.
    """
    del teacher_fn, teacher_logits
    if ids is None:
      raise TypeError(
          "sharpjax.trajectory_penalty: SAF needs the ids of the examples "
          "(their dataset indices): trajectory_penalty(opt_state, logits, ids)."
      )
    return _penalty(self, logits, ids, per_example)


def saf_bank_bytes(
    num_examples: int,
    num_classes: int,
    delay_epochs: int = 3,
    bank_dtype: Any = jnp.float32,
) -> int:
  """Bytes the SAF state allocates: the logit bank and its epoch stamps.

  Example:
    >>> import sharpjax as sj
    >>> sj.saf_bank_bytes(50_000, 100) / 2**20  # CIFAR-100, 3 fp32 slots
    57.79...
  """
  itemsize = np.dtype(bank_dtype).itemsize
  bank = num_examples * delay_epochs * num_classes * itemsize
  stamps = num_examples * delay_epochs * 4
  return int(bank + stamps)


def _available_bytes() -> int | None:
  """Free memory of the default device (host RAM for the CPU backend)."""
  try:
    stats = jax.local_devices()[0].memory_stats()
  except Exception:  # some backends do not report memory
    stats = None
  if stats and "bytes_limit" in stats:
    return int(stats["bytes_limit"] - stats.get("bytes_in_use", 0))
  try:
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
  except (ValueError, OSError, AttributeError):
    return None


def saf(
    num_examples: int,
    num_classes: int,
    steps_per_epoch: int,
    delay_epochs: int = 3,
    temperature: float = 5.0,
    strength: float = 0.3,
    start_epoch: int = 5,
    bank_dtype: Any = jnp.float32,
    *,
    check_memory: bool = True,
) -> optax.GradientTransformationExtraArgs:
  r"""Sharpness-Aware training for Free: a trajectory loss with a logit bank.

  At epoch :math:`e` (``step // steps_per_epoch``, 0-indexed), for
  :math:`e \ge` ``start_epoch``, the loss gains

  .. math::
    \lambda\,\tau^2\,\frac{1}{|V|}\sum_{i\in V}
    \mathrm{KL}\big(\mathrm{softmax}(\hat y_i^{(e-\tilde E)}/\tau)\,\|\,
    \mathrm{softmax}(f_\theta(x_i)/\tau)\big),

  where :math:`\hat y_i^{(e-\tilde E)}` are the logits recorded for example
  :math:`i` during epoch :math:`e - \tilde E` (:math:`\tilde E` =
  ``delay_epochs``) and :math:`V` the examples of the batch that have such a
  record. Read the penalty with :func:`sharpjax.trajectory_penalty` inside the
  loss; this transformation passes the gradient through unchanged and, in
  ``update``, writes this step's logits into the bank (after the read), so SAF
  costs one forward-backward plus a gather, a scatter and a KL.

  The bank is a ring of ``delay_epochs`` slots of ``num_examples x
  num_classes`` logits (:func:`saf_bank_bytes`); epoch ``e`` reads and
  overwrites slot ``e % delay_epochs``. It is part of the optimizer state, so
  it is checkpointed, sharded and restored with it. Under ``jax.jit`` with the
  batch sharded over a mesh it is always one global bank: replicate it (every
  device holds it whole and applies the same global writes), or shard it by
  example with ``NamedSharding(mesh, PartitionSpec(None, "data"))`` on
  ``logit_bank`` and ``recorded_epoch`` so each device holds
  ``1/num_devices`` of it; the step then moves only batch-sized rows between
  devices, never the bank.

  Ids: ``ids`` are dataset indices in ``[0, num_examples)`` that travel with
  their examples. An out-of-range id (negative, too large, or beyond int32:
  checked in its own dtype before any narrowing) neither reads nor writes any
  row; it is ignored and counted in the diagnostics (``dropped_ids``, a
  running total). SAF expects each example once per epoch, as
  :class:`sharpjax.data.DataLoader` yields them. If a sampler repeats an id
  within an epoch, its first appearance reads the target and writes the
  record; a later one has no target (the slot it would read now holds this
  epoch's record) and writes nothing, so the bank keeps the older row. Two
  copies of an id in one batch both read the same target and one of their
  logits (unspecified which) is stored.

  With ``optax.MultiSteps``, the bank is written once per optimizer step with
  the logits of the micro-batch that completes it.

  The penalty is not part of :func:`sharpjax.training.make_trainer`'s
  ``metrics["loss"]``, which is the task loss alone; it is reported as
  ``metrics["penalty"]`` (the gradient includes both).

  Args:
    num_examples: size of the training set (> 0).
    num_classes: number of classes, the logits' last axis (> 0).
    steps_per_epoch: optimizer steps per epoch (> 0).
    delay_epochs: :math:`\tilde E`, how many epochs back the targets are (>= 1;
      the paper uses 3).
    temperature: :math:`\tau` (> 0; paper: 5).
    strength: :math:`\lambda` (>= 0; paper: 0.3).
    start_epoch: :math:`E_{start}`, the first epoch with the penalty (>= 0;
      paper: 5). The official code's ``--kl_start_epoch K`` turns the
      penalty on for epochs ``> K``: pass ``start_epoch=K + 1``.
    bank_dtype: float32 (default) or bfloat16 (half the memory).
    check_memory: refuse, at construction, a bank larger than the free memory
      of the default device (host RAM on CPU) instead of failing later with an
      out-of-memory crash. Turn it off when the bank is sharded over devices.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; its ``update`` needs the
    extra arguments ``logits`` ([B, num_classes], this step's clean logits) and
    ``ids`` ([B] integers).

  Example:
    >>> import jax, jax.numpy as jnp, optax, sharpjax as sj
    >>> tx = optax.chain(
    ...     sj.saf(num_examples=1000, num_classes=10, steps_per_epoch=8),
    ...     optax.sgd(0.1, momentum=0.9))
    >>> params = {"w": jnp.zeros((5, 10))}
    >>> opt_state = tx.init(params)
    >>> batch = {"x": jnp.ones((4, 5)), "y": jnp.arange(4), "ids": jnp.arange(4)}
    >>> def loss_fn(params, batch, opt_state):
    ...   logits = batch["x"] @ params["w"]
    ...   ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])
    ...   return ce.mean() + sj.trajectory_penalty(opt_state, logits,
    ...                                            batch["ids"]), logits
    >>> (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(
    ...     params, batch, opt_state)
    >>> updates, opt_state = tx.update(grads, opt_state, params,
    ...                                logits=logits, ids=batch["ids"])

  References:
    Du et al., Sharpness-Aware Training for Free, NeurIPS 2022.
    https://arxiv.org/abs/2205.14083
  """
  num_examples = base.check_int("num_examples", num_examples, low=1)
  num_classes = base.check_int("num_classes", num_classes, low=1)
  steps_per_epoch = base.check_int("steps_per_epoch", steps_per_epoch, low=1)
  delay_epochs = base.check_int("delay_epochs", delay_epochs, low=1)
  start_epoch = base.check_int("start_epoch", start_epoch, low=0)
  base.check_range("temperature", temperature, low=0.0, low_inclusive=False)
  base.check_range("strength", strength, low=0.0)
  if jnp.dtype(bank_dtype) not in (jnp.dtype(jnp.float32),
                                   jnp.dtype(jnp.bfloat16),
                                   jnp.dtype(jnp.float16)):
    raise ValueError(
        f"bank_dtype must be float32, bfloat16 or float16, got {bank_dtype}."
    )
  bank_bytes = saf_bank_bytes(num_examples, num_classes, delay_epochs,
                              bank_dtype)
  if check_memory:
    available = _available_bytes()
    if available is not None and bank_bytes > available:
      raise ValueError(
          f"sharpjax.saf: the logit bank needs {bank_bytes / 2**30:.2f} GiB "
          f"({delay_epochs} slots x {num_examples} examples x {num_classes} "
          f"classes in {jnp.dtype(bank_dtype).name}) but only "
          f"{available / 2**30:.2f} GiB is free. Use bank_dtype=jnp.bfloat16 "
          "or fewer delay_epochs, shard the bank over a mesh (and pass "
          "check_memory=False), or use sj.mesa, whose teacher costs one copy "
          "of the parameters."
      )

  def init_fn(params):
    del params
    return SAFState(
        count=jnp.zeros([], jnp.int32),
        logit_bank=jnp.zeros((delay_epochs, num_examples, num_classes),
                             bank_dtype),
        recorded_epoch=jnp.full((delay_epochs, num_examples), -1, jnp.int32),
        temperature=jnp.asarray(temperature, jnp.float32),
        strength=jnp.asarray(strength, jnp.float32),
        start_epoch=jnp.asarray(start_epoch, jnp.int32),
        steps_per_epoch=jnp.asarray(steps_per_epoch, jnp.int32),
        diagnostics=trajectory_loss.init_diagnostics(),
    )

  def update_fn(updates, state, params=None, *, logits=None, ids=None,
                **extra_args):
    del params, extra_args
    if logits is None or ids is None:
      raise TypeError(
          "sharpjax.saf: update() needs this step's logits and the examples' "
          "ids: tx.update(grads, opt_state, params, logits=logits, ids=ids)."
      )
    # The written rows depend on the rows read here (the same rows the penalty
    # read): without that data dependency XLA copies the whole donated bank on
    # every step to order the scatter after the gather.
    epoch, slot, rows, in_range, old_logits, old_epochs = _this_epochs_rows(
        state, logits, ids, "saf")
    # An id already written this epoch (a sampler that repeats it) keeps its
    # first row: the record of its first appearance.
    write = in_range & (old_epochs != epoch)
    new_logits = jnp.where(write[:, None],
                           logits.astype(state.logit_bank.dtype), old_logits)
    new_epochs = jnp.where(write, epoch, old_epochs)
    dropped = jnp.sum(~in_range).astype(jnp.int32)
    new_state = state._replace(
        count=optax.safe_increment(state.count),
        logit_bank=state.logit_bank.at[slot, rows].set(new_logits,
                                                       mode="drop"),
        recorded_epoch=state.recorded_epoch.at[slot, rows].set(new_epochs,
                                                               mode="drop"),
        # inject_hyperparams rebuilds this transformation with new values.
        temperature=jnp.asarray(temperature, jnp.float32),
        strength=jnp.asarray(strength, jnp.float32),
        diagnostics=trajectory_loss.TrajectoryDiagnostics(
            epoch=epoch,
            penalty_active=epoch >= state.start_epoch,
            dropped_ids=state.diagnostics.dropped_ids + dropped,
        ),
    )
    return updates, new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _check_ids(ids: Any, size: int) -> None:
  if jnp.shape(ids) != (size,):
    raise ValueError(
        f"sharpjax.saf: ids must have shape [B] = ({size},) like the logits' "
        f"first axis, got {jnp.shape(ids)}."
    )
  dtype = example_ids.as_ids(ids).dtype
  if not jnp.issubdtype(dtype, jnp.integer):
    raise ValueError(f"sharpjax.saf: ids must be integers, got {dtype}.")


def _this_epochs_rows(state: SAFState, logits: jax.Array, ids: jax.Array,
                      name: str):
  """The bank rows of ``ids`` in this epoch's slot, after checking the inputs.

  Returns ``(epoch, slot, rows, in_range, logits, recorded_epochs)``: what
  the penalty reads as targets and the update overwrites. An out-of-range id
  maps past the end (``example_ids.table_rows``): it reads zeros and epoch
  -1, and a write to it is dropped.
  """
  delay_epochs, num_examples, num_classes = state.logit_bank.shape
  size = trajectory_loss.check_logits(logits, num_classes, name)
  _check_ids(ids, size)
  epoch = trajectory_loss.epoch_of(state.count, state.steps_per_epoch)
  slot = epoch % delay_epochs
  rows, in_range = example_ids.table_rows(ids, num_examples)
  past = state.logit_bank.at[slot, rows].get(mode="fill", fill_value=0)
  recorded = state.recorded_epoch.at[slot, rows].get(mode="fill",
                                                     fill_value=-1)
  return epoch, slot, rows, in_range, past, recorded


def _penalty(
    state: SAFState, logits: jax.Array, ids: jax.Array, per_example: bool
) -> jax.Array:
  delay_epochs = state.logit_bank.shape[0]
  epoch, _, _, in_range, past, recorded = _this_epochs_rows(
      state, logits, ids, "trajectory_penalty")
  # recorded >= 0: a never-written row (-1) is no target, even at epoch
  # delay_epochs - 1.
  valid = (in_range & (recorded >= 0) & (recorded == epoch - delay_epochs)
           & (epoch >= state.start_epoch))
  kl = trajectory_loss.tempered_kl(past, logits, state.temperature)
  return trajectory_loss.masked_penalty(kl, valid, state.temperature,
                                        state.strength, per_example)
