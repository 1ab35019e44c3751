"""Where a step runs: one small object per kind of parallelism.

Each placement compiles the functions of :mod:`._step` for its devices and
puts a host batch where the compiled step wants it:

- :class:`OneDevice`: ``jit`` on the default device.
- :class:`DataMesh`: ``jit`` over a ``Mesh``, the batch sharded over the data
  axis, the state replicated (per-example tables optionally sharded by
  example); XLA inserts the gradient all-reduce.
- :class:`PerDeviceMesh`: ``shard_map`` over the mesh's data axis: each device
  runs the step on its shard under a named axis (each device perturbs with
  its own shard's gradient: m-sharpness with m = the per-device batch).
- :class:`Pmap`: ``jax.pmap`` over local devices with an axis name.
"""

from __future__ import annotations

import functools
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sharpjax._src import protocol
from sharpjax.training import _step

P = jax.sharding.PartitionSpec


class PerDeviceBatch(dict):
  """A batch split ``[num_devices, B / num_devices, ...]`` and placed for pmap.

  What :meth:`Trainer.shard_batch` returns under ``axis_name=``; ``step``
  passes it through without splitting it again.
  """


def _init_input(sample_batch, num_devices: int) -> jax.Array:
  """A small slice of the sample batch's inputs for ``init``."""
  x = sample_batch["x"]
  n = max(1, min(np.shape(x)[0], num_devices))
  return jnp.asarray(np.asarray(x[:n]))


class OneDevice:
  """``jit`` on one device; batches are used as given."""

  num_devices = 1
  axis_name: Optional[str] = None
  per_device_batches = False
  process_count = 1

  def compile(self, spec: _step.StepSpec, donate: bool):
    """``(step, eval_step, init)`` compiled for this placement."""
    step = jax.jit(functools.partial(_step.train_step, spec),
                   static_argnums=2, donate_argnums=(0,) if donate else ())
    return (step, jax.jit(functools.partial(_step.eval_step, spec)),
            jax.jit(functools.partial(_step.init_state, spec)))

  def shard_batch(self, batch):
    return dict(batch)

  def init_input(self, sample_batch):
    return _init_input(sample_batch, 1)

  def local(self, tree):
    """Metrics as one value each (pmap returns one per device)."""
    return tree


class DataMesh(OneDevice):
  """``jit`` over ``mesh``: batch sharded over ``data_axis``, state replicated.

  With ``shard_tables`` the per-example fields of the optimizer state (those
  its state classes declare in ``EXAMPLE_AXES``: SAF's bank, AUSAM's scores)
  are sharded by example over the data axis instead.
  """

  def __init__(self, mesh: jax.sharding.Mesh, data_axis: str,
               shard_tables: bool, point_axis: Optional[str] = None):
    if data_axis not in mesh.axis_names:
      raise ValueError(
          f"make_trainer: data_axis {data_axis!r} is not an axis of the mesh "
          f"{tuple(mesh.axis_names)}.")
    # Flax linen layers are not written for explicit sharding types (since
    # JAX 0.9 ``jax.make_mesh`` makes Explicit axes), so the step runs on the
    # same devices and axis names with Auto axes.
    self.mesh = jax.sharding.Mesh(
        mesh.devices, mesh.axis_names,
        axis_types=(jax.sharding.AxisType.Auto,) * len(mesh.axis_names))
    self.data_axis = data_axis
    self.shard_tables = shard_tables
    self.num_devices = int(self.mesh.shape[data_axis])
    self.process_count = jax.process_count()
    self.replicated = jax.sharding.NamedSharding(self.mesh, P())
    self.data_sharding = jax.sharding.NamedSharding(self.mesh, P(data_axis))
    # A method's several gradient points, stacked, spread over this axis.
    self.point_sharding = (
        jax.sharding.NamedSharding(self.mesh, P(point_axis))
        if point_axis is not None and point_axis in self.mesh.axis_names
        and point_axis != data_axis else None)

  def state_shardings(self, state: Any) -> Any:
    """Replicated, except per-example fields by example with ``shard_tables``."""
    if not self.shard_tables:
      return jax.tree.map(lambda _: self.replicated, state)

    def by_example(field, axis):
      rows = field.shape[axis]
      if rows % self.num_devices:
        raise ValueError(
            f"make_trainer(shard_example_tables=True): a per-example table of "
            f"the optimizer state has num_examples={rows} rows, not a "
            f"multiple of the {self.num_devices} devices of the data axis; "
            f"build the method with num_examples="
            f"{-(-rows // self.num_devices) * self.num_devices} (ids stay "
            "below the real data set size).")
      return jax.sharding.NamedSharding(
          self.mesh, P(*([None] * axis), self.data_axis))

    return protocol.map_example_tables(by_example, state,
                                       lambda _: self.replicated)

  def _constrained(self, fn):
    """``fn`` with its output state pinned to :meth:`state_shardings`."""

    def wrapped(*args):
      out = fn(*args)
      single = isinstance(out, _step.TrainState)
      state = out if single else out[0]
      state = jax.lax.with_sharding_constraint(state,
                                               self.state_shardings(state))
      return state if single else (state,) + tuple(out[1:])

    return wrapped

  def compile(self, spec, donate):
    spec.point_sharding = self.point_sharding
    step = jax.jit(
        self._constrained(functools.partial(_step.train_step, spec)),
        in_shardings=(None, self.data_sharding),
        out_shardings=(None, self.replicated, self.replicated),
        static_argnums=2, donate_argnums=(0,) if donate else ())
    eval_step = jax.jit(functools.partial(_step.eval_step, spec),
                        in_shardings=(None, self.data_sharding),
                        out_shardings=self.replicated)
    init = jax.jit(self._constrained(functools.partial(_step.init_state,
                                                       spec)))
    return step, eval_step, init

  def shard_batch(self, batch):
    leaves = jax.tree.leaves(batch)
    if all(isinstance(x, jax.Array) and x.sharding == self.data_sharding
           for x in leaves):
      return dict(batch)
    if self.process_count > 1:
      return jax.tree.map(
          lambda x: jax.make_array_from_process_local_data(
              self.data_sharding, x), dict(batch))
    return jax.device_put(dict(batch), self.data_sharding)

  def init_input(self, sample_batch):
    return _init_input(sample_batch, self.num_devices)


class PerDeviceMesh(DataMesh):
  """``shard_map`` over the data axis: a per-device step under a named axis.

  The state is replicated; the clean gradients are averaged over the axis
  unless ``average_grads`` is False in the step's spec (per-device
  perturbations), and a SAM-family transformation built with
  ``axis_name=data_axis`` averages the perturbed ones.
  """

  def __init__(self, mesh, data_axis):
    super().__init__(mesh, data_axis, shard_tables=False)
    self.point_sharding = None
    self.axis_name = data_axis

  def compile(self, spec, donate):
    def mapped(fn, out_specs):
      return jax.shard_map(fn, mesh=self.mesh,
                           in_specs=(P(), P(self.data_axis)),
                           out_specs=out_specs, check_vma=False)

    def train(state, batch, full_step):
      fn = functools.partial(_step.train_step, spec, full_step=full_step)
      return mapped(fn, (P(), P(), P()))(state, batch)

    step = jax.jit(train, static_argnums=2,
                   donate_argnums=(0,) if donate else ())
    eval_step = jax.jit(mapped(functools.partial(_step.eval_step, spec),
                               (P(), P())))
    init = jax.jit(functools.partial(_step.init_state, spec),
                   out_shardings=self.replicated)
    return step, eval_step, init


class Pmap(OneDevice):
  """``jax.pmap`` over ``devices`` with ``axis_name``; the state replicated."""

  per_device_batches = True

  def __init__(self, axis_name: str, devices: Optional[Sequence[Any]]):
    self.axis_name = axis_name
    self.devices = list(devices) if devices is not None else jax.local_devices()
    self.num_devices = len(self.devices)
    self.per_device = jax.sharding.NamedSharding(
        jax.sharding.Mesh(np.array(self.devices), ("devices",)), P("devices"))

  def compile(self, spec, donate):
    step = jax.pmap(functools.partial(_step.train_step, spec),
                    axis_name=self.axis_name, devices=self.devices,
                    static_broadcasted_argnums=(2,),
                    donate_argnums=(0,) if donate else ())
    eval_step = jax.pmap(functools.partial(_step.eval_step, spec),
                         axis_name=self.axis_name, devices=self.devices)
    replicas = jnp.arange(self.num_devices)
    init_mapped = jax.pmap(
        lambda _, rng, x: _step.init_state(spec, rng, x),
        in_axes=(0, None, None), devices=self.devices)
    return step, eval_step, lambda rng, x: init_mapped(replicas, rng, x)

  def shard_batch(self, batch):
    if isinstance(batch, PerDeviceBatch):
      return batch
    def split(x):
      # Device arrays are split on the device: reading them back would make
      # the host wait.
      lib = jnp if isinstance(x, jax.Array) else np
      return lib.reshape(lib.asarray(x),
                         (self.num_devices, -1) + np.shape(x)[1:])

    return PerDeviceBatch(
        jax.device_put(jax.tree.map(split, dict(batch)), self.per_device))

  def init_input(self, sample_batch):
    return _init_input(sample_batch, self.num_devices)

  def local(self, tree):
    return jax.tree.map(lambda m: m[0], tree)
