"""Every device and every process: the data mesh of ``train`` and ``compare``.

By default a command shards each batch over all devices of all processes
(``jax.devices()``: one 1-D ``"data"`` mesh), replicates the train state
(``make_trainer(mesh=...)``; with ``--shard-example-tables`` SAF's logit bank
and AUSAM's score table are split by example instead) and evaluates the test
set sharded the same way; the results equal a one-device run's up to float
reassociation. Under ``jax.distributed`` (``python -m sharpjax.launch``, a
SLURM job, a TPU pod slice) every process runs the same command, loads only
its rows of every global batch (``num_shards=jax.process_count()``), and only
process 0 writes the reports.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

P = jax.sharding.PartitionSpec
DATA_AXIS = "data"
_EVAL_CHUNK = 2000

# Environment variables that say the process is one of several: the local
# launcher's, SLURM's, Open MPI's, and a TPU pod slice's.
_CLUSTER_MARKERS = ("SHARPJAX_COORDINATOR_ADDRESS", "OMPI_COMM_WORLD_SIZE",
                    "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS")


def add_arguments(parser: argparse.ArgumentParser) -> None:
  """The flags of devices, precision, input pipeline and TensorBoard."""
  g = parser.add_argument_group("devices, precision, input and logs")
  g.add_argument("--devices", type=int, default=None, metavar="N",
                 help="shard every batch over the first N devices (default: "
                 "all devices of all processes; 1: one device, no mesh); "
                 "the batch size must be a multiple of N")
  g.add_argument("--shard-example-tables", action="store_true",
                 help="split SAF's logit bank and AUSAM's score table by "
                 "example over the devices instead of replicating them "
                 "(their rows are rounded up to a multiple of the devices)")
  g.add_argument("--dtype", choices=("float32", "bfloat16"),
                 default="float32",
                 help="computation dtype of the model (parameters, optimizer "
                 "state and loss stay float32; default float32)")
  g.add_argument("--loader", choices=("numpy", "grain"), default=None,
                 help="input pipeline: numpy (sharpjax.data.DataLoader, a "
                 "host thread) or grain (sharpjax.data.GrainLoader, worker "
                 "processes, iterator state in the checkpoints; pip install "
                 "'sharpjax[grain]'); the same batches either way "
                 "(default numpy; grain for --data arrayrecord)")
  g.add_argument("--loader-workers", type=int, default=0, metavar="N",
                 help="grain worker processes making batches (default 0: in "
                 "the training process)")
  g.add_argument("--tensorboard", default=None, metavar="DIR",
                 help="also write TensorBoard event files there: training "
                 "scalars per log interval (loss, accuracy, learning rate, "
                 "the method's diagnostics, the SAF/MESA penalty), test "
                 "metrics per epoch (pip install 'sharpjax[tensorboard]')")
  g.add_argument("--distributed", choices=("auto", "on", "off"),
                 default="auto",
                 help="connect to the other processes with jax.distributed "
                 "(auto: when started by python -m sharpjax.launch, SLURM "
                 "with several tasks, Open MPI or on a TPU pod slice; on: "
                 "always, letting JAX detect the cluster; default auto)")


def connect(mode: str) -> bool:
  """Joins a multi-process run (``jax.distributed``) when ``mode`` says so.

  Must run before anything touches a JAX backend. Returns whether this
  process is part of one.
  """
  from sharpjax import launch  # pylint: disable=g-import-not-at-top
  if mode == "off":
    return False
  if jax.distributed.is_initialized():
    return True
  markers = any(os.environ.get(k) for k in _CLUSTER_MARKERS)
  slurm = int(os.environ.get("SLURM_NTASKS", "1") or 1) > 1
  if mode == "auto" and not (markers or slurm):
    return False
  if not launch.initialize() and mode == "on":
    raise ValueError("--distributed on: jax.distributed found no cluster to "
                     "join (no coordinator address, SLURM, Open MPI or TPU "
                     "pod environment).")
  return jax.process_count() > 1


@dataclasses.dataclass(frozen=True)
class Devices:
  """The devices a command's runs use.

  Attributes:
    devices: the devices, in mesh order.
    mesh: the 1-D data mesh over them (None: one device, no mesh).
    shard_tables: per-example optimizer tables split by example.
  """

  devices: tuple
  mesh: Optional[jax.sharding.Mesh]
  shard_tables: bool = False

  @classmethod
  def from_args(cls, args, batch_size: int) -> "Devices":
    """The devices of ``--devices`` / ``--shard-example-tables``; checks the
    batch size against them (one clear error naming both)."""
    available = jax.devices()
    n = len(available) if args.devices is None else args.devices
    if n < 1 or n > len(available):
      raise ValueError(f"--devices must be in [1, {len(available)}] (the "
                       f"devices of this run), got {args.devices}.")
    procs = jax.process_count()
    if procs > 1 and n != len(available):
      raise ValueError(
          f"--devices {n}: a run of {procs} processes uses all "
          f"{len(available)} devices (leave --devices out).")
    if batch_size % n:
      raise ValueError(
          f"--batch-size {batch_size} is not a multiple of the {n} devices "
          f"the batch is sharded over: pass a multiple of {n}, or --devices "
          "with a divisor of the batch size.")
    shard = bool(getattr(args, "shard_example_tables", False))
    if shard and n == 1:
      raise ValueError("--shard-example-tables needs more than one device "
                       "(--devices).")
    chosen = tuple(available[:n])
    mesh = (None if n == 1
            else jax.sharding.Mesh(np.array(chosen), (DATA_AXIS,)))
    return cls(chosen, mesh, shard)

  @property
  def num_devices(self) -> int:
    return len(self.devices)

  @property
  def process_count(self) -> int:
    return jax.process_count()

  @property
  def process_index(self) -> int:
    return jax.process_index()

  @property
  def is_main(self) -> bool:
    """Whether this process writes the reports (process 0)."""
    return jax.process_index() == 0

  def describe(self) -> str:
    """``4 cpu devices in 2 processes, batch sharded, state replicated``."""
    d = self.devices[0]
    what = (f"{self.num_devices} {d.platform} device"
            + ("s" if self.num_devices > 1 else "") + f" ({d.device_kind})")
    procs = self.process_count
    where = f" in {procs} processes" if procs > 1 else ""
    if self.mesh is None:
      return what + where
    tables = ("per-example tables sharded by example" if self.shard_tables
              else "state replicated")
    return f"{what}{where}, batch sharded, {tables}"

  def to_dict(self) -> dict:
    d = self.devices[0]
    return {"devices": self.num_devices, "processes": self.process_count,
            "platform": d.platform, "device_kind": d.device_kind,
            "mesh": None if self.mesh is None else {DATA_AXIS:
                                                    self.num_devices},
            "shard_example_tables": self.shard_tables}

  def table_rows(self, num_examples: int) -> int:
    """Rows of a per-example table: a multiple of the devices when sharded."""
    if not self.shard_tables:
      return num_examples
    n = self.num_devices
    return -(-num_examples // n) * n

  def trainer(self, model, tx):
    """``make_trainer`` over the mesh (batches come checked from a loader)."""
    from sharpjax import training  # pylint: disable=g-import-not-at-top
    if self.mesh is None:
      return training.make_trainer(model, tx, validate=False)
    return training.make_trainer(model, tx, mesh=self.mesh,
                                 data_axis=DATA_AXIS,
                                 shard_example_tables=self.shard_tables,
                                 validate=False)

  def place_state(self, state):
    """``state`` (host or one-device arrays) on the mesh: replicated, the
    per-example tables by example with ``shard_tables``. Every process
    passes the same values and keeps its devices' parts."""
    if self.mesh is None:
      return state
    from sharpjax._src import protocol  # pylint: disable=g-import-not-at-top
    replicated = jax.sharding.NamedSharding(self.mesh, P())

    def by_example(field, axis):
      del field
      return jax.sharding.NamedSharding(self.mesh,
                                        P(*([None] * axis), DATA_AXIS))

    shardings = jax.tree.map(lambda _: replicated, state)
    if self.shard_tables:
      shardings = shardings._replace(opt_state=protocol.map_example_tables(
          by_example, state.opt_state, lambda _: replicated))
    host = jax.device_get(state)
    return jax.tree.map(
        lambda x, s: jax.make_array_from_callback(
            np.shape(x), s, lambda idx: np.asarray(x)[idx]), host, shardings)

  def local(self, tree):
    """Host copies of replicated arrays (what every process holds whole)."""
    return jax.tree.map(lambda x: np.asarray(x.addressable_data(0))
                        if isinstance(x, jax.Array) else x, tree)

  def evaluate(self, model, params, model_state, x: np.ndarray,
               y: np.ndarray) -> dict:
    """Test loss and accuracy, model in eval mode, the set sharded over the
    mesh in chunks (the last one padded and masked)."""
    n = len(y)
    if self.mesh is None:
      chunk, put = _EVAL_CHUNK, jnp.asarray
    else:
      chunk = -(-_EVAL_CHUNK // self.num_devices) * self.num_devices
      sharding = jax.sharding.NamedSharding(self.mesh, P(DATA_AXIS))

      def put(a):
        return jax.make_array_from_callback(a.shape, sharding,
                                            lambda idx: a[idx])
    chunk = min(chunk, -(-n // self.num_devices) * self.num_devices)
    fn = _masked_sums(model)
    sums = []
    for i in range(0, n, chunk):
      xs, ys = x[i:i + chunk], y[i:i + chunk]
      mask = np.ones(len(ys), np.float32)
      pad = chunk - len(ys)
      if pad:
        xs = np.concatenate([xs, np.zeros((pad,) + xs.shape[1:], xs.dtype)])
        ys = np.concatenate([ys, np.zeros(pad, ys.dtype)])
        mask = np.concatenate([mask, np.zeros(pad, np.float32)])
      sums.append(fn(params, model_state, put(xs), put(ys), put(mask)))
    loss, acc = np.sum(np.asarray(self.local(sums), np.float64), axis=0)
    return {"test_loss": float(loss) / n, "test_accuracy": float(acc) / n}


@functools.lru_cache(maxsize=16)
def _masked_sums(model):
  from sharpjax import training  # pylint: disable=g-import-not-at-top

  def sums(params, model_state, x, y, mask):
    logits = model.apply({"params": params, **model_state}, x, train=False)
    losses = training.softmax_cross_entropy(logits, y)
    correct = (jnp.argmax(logits, -1) == y).astype(jnp.float32)
    return jnp.stack([jnp.sum(losses * mask), jnp.sum(correct * mask)])

  return jax.jit(sums)


def log_process(devices, batch_size: int) -> None:
  """One line from every process of a multi-process run, with its index.

  Process 0 alone writes the reports, checkpoints' metadata and TensorBoard
  events and logs the run; this line says each process is there and what it
  reads (its block of rows of every global batch).
  """
  count, index = jax.process_count(), jax.process_index()
  if count == 1:
    return
  rows = batch_size // count
  local = len([d for d in devices.devices
               if d.process_index == index]) if devices else 1
  print(f"process {index} of {count}: rows {index * rows} to "
        f"{(index + 1) * rows - 1} of every global batch of {batch_size}, on "
        f"{local} local devices", flush=True)
