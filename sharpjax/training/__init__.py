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
  and the state buffers donated. With ``per_device_perturbation=True`` the
  step runs per device under ``shard_map`` over the mesh's data axis (each
  device perturbs with its own shard's gradient: m-sharpness at no extra
  cost, as the original SAM code did with pmap). With ``axis_name`` the step
  runs under ``jax.pmap`` instead, gradients averaged over that axis.
- **No waiting on the device.** ``step`` never reads a device value: host
  batches are checked on the host, a device batch's label range is checked
  inside the step and reported by a later call (or :meth:`Trainer.check`),
  so the host queues steps ahead of the device.
- **What the state needs.** Example ids, the model state for MESA's teacher,
  sharding of per-example tables and LookSAM's host-chosen branch are read
  from the optimizer state's declarations (:mod:`sharpjax._src.protocol`),
  never from a method's type: a new method with such state needs no change
  here.

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
bank (replicated, or sharded by example with ``shard_example_tables``) stays
one global bank. Checkpoint the state with orbax, which writes sharded arrays
from all processes (:func:`sharpjax.launch.save_state` /
:func:`sharpjax.launch.restore_state`).
"""

from sharpjax.training._placement import PerDeviceBatch
from sharpjax.training._step import Batch
from sharpjax.training._step import LossFn
from sharpjax.training._step import softmax_cross_entropy
from sharpjax.training._step import state_from_params
from sharpjax.training._step import TrainState
from sharpjax.training._trainer import make_trainer
from sharpjax.training._trainer import Trainer


def unreplicate(tree):
  """The first replica of a pmapped (replicated) pytree.

  Example:
    >>> import jax.numpy as jnp
    >>> from sharpjax import training
    >>> training.unreplicate({"w": jnp.ones((4, 3))})["w"].shape
    (3,)
  """
  import jax  # pylint: disable=g-import-not-at-top
  return jax.tree.map(lambda x: x[0], tree)


__all__ = [
    "Batch", "LossFn", "make_trainer", "PerDeviceBatch",
    "softmax_cross_entropy", "state_from_params", "Trainer", "TrainState",
    "unreplicate",
]
