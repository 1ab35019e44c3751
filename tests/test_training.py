"""The step builder: each method's plumbing against a hand-written step.

Small models and few steps. Parameter initialisation uses "unsafe_rbg" keys
where the test does not need threefry: XLA:CPU compiles threefry random
numbers slowly.
"""

import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sharpjax as sj
from sharpjax import data
from sharpjax import models
from sharpjax import training
from tests import helpers

NUM_CLASSES = 5


class TinyBN(nn.Module):
  """Dense - BatchNorm - ReLU - Dropout - Dense."""

  dropout_rate: float = 0.0
  axis_name: str | None = None

  @nn.compact
  def __call__(self, x, train=False):
    x = nn.Dense(8)(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.8,
                     axis_name=self.axis_name)(x)
    x = nn.relu(x)
    if self.dropout_rate:
      x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    return nn.Dense(NUM_CLASSES)(x)


def _key(seed=0):
  return jax.random.key(seed, impl="unsafe_rbg")


def _data(n=64, seed=0):
  return data.make_synthetic(n, input_shape=(6,), num_classes=NUM_CLASSES,
                             seed=seed)


def _batch(n=16, seed=0):
  ds = _data(n, seed)
  return {"x": ds.x, "y": ds.y, "ids": np.arange(n, dtype=np.int32)}


def _ce(logits, y):
  return optax.softmax_cross_entropy_with_integer_labels(logits, y)


def _train_apply(model, params, stats, x, key):
  """A train-mode forward pass: (logits, new batch_stats)."""
  rngs = {"dropout": jax.random.fold_in(key, 0)} if key is not None else {}
  logits, new = model.apply({"params": params, "batch_stats": stats}, x,
                            train=True, rngs=rngs, mutable=["batch_stats"])
  return logits, new["batch_stats"]


def _close(a, b, tol=1e-5):
  jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=tol,
                                                       atol=tol), a, b)


def _copy(tree):
  return jax.tree.map(np.array, tree)


def test_plain_optax_step_matches_manual_step():
  model = TinyBN()
  trainer = training.make_trainer(model, optax.sgd(0.1))
  batch = _batch()
  state = trainer.init(_key(), batch)
  p0, s0 = _copy(state.params), _copy(state.model_state["batch_stats"])
  state, metrics = trainer.step(state, batch)

  def loss(p):
    logits, stats = _train_apply(model, p, s0, batch["x"], None)
    return _ce(logits, batch["y"]).mean(), (stats, logits)

  (value, (stats, logits)), g = jax.jit(
      jax.value_and_grad(loss, has_aux=True))(p0)
  _close(state.params, jax.tree.map(lambda w, d: w - 0.1 * d, p0, g))
  _close(state.model_state["batch_stats"], stats)
  np.testing.assert_allclose(metrics["loss"], value, rtol=1e-6)
  np.testing.assert_allclose(
      metrics["accuracy"], np.mean(np.argmax(logits, -1) == batch["y"]))
  assert int(state.step) == 1


def test_sam_step_keeps_clean_batch_stats_and_one_dropout_key():
  model = TinyBN(dropout_rate=0.5)
  rho, lr = 0.3, 0.1
  tx = optax.chain(sj.sam(rho), optax.sgd(lr))
  trainer = training.make_trainer(model, tx, donate=False)
  batch = _batch()
  state = trainer.init(_key(), batch)
  new_state, metrics = trainer.step(state, batch)

  # The documented key rule: step t uses fold_in(rng, t), and rng collection
  # number i (here dropout, i = 0) fold_in(that, i).
  key = jax.random.fold_in(state.rng, 0)
  p0, s0 = state.params, state.model_state["batch_stats"]

  def loss(p, k):
    logits, stats = _train_apply(model, p, s0, batch["x"], k)
    return _ce(logits, batch["y"]).mean(), stats

  @jax.jit
  def reference(p0, key, perturbed_key):
    (_, clean_stats), g = jax.value_and_grad(loss, has_aux=True)(p0, key)
    norm = jnp.sqrt(sum(jnp.sum(x**2) for x in jax.tree.leaves(g)))
    perturbed = jax.tree.map(lambda w, d: w + rho * d / norm, p0, g)
    (_, perturbed_stats), g2 = jax.value_and_grad(loss, has_aux=True)(
        perturbed, perturbed_key)
    expected = jax.tree.map(lambda w, d: w - lr * d, p0, g2)
    return expected, clean_stats, perturbed_stats, norm

  expected, clean_stats, perturbed_stats, norm = reference(p0, key, key)
  _close(new_state.params, expected)
  # BatchNorm: the running averages are those of the clean pass only ...
  _close(new_state.model_state["batch_stats"], clean_stats, tol=1e-6)
  # ... which differ from what the perturbed pass computed (so this test
  # would catch a step that kept the perturbed pass's statistics).
  diff = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))),
                      clean_stats, perturbed_stats)
  assert max(jax.tree.leaves(diff)) > 1e-4
  # A perturbed pass with another dropout mask gives another step.
  other = reference(p0, key, jax.random.fold_in(key, 99))[0]
  gap = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))),
                     other, expected)
  assert max(jax.tree.leaves(gap)) > 1e-4
  # Diagnostics come back as metrics.
  np.testing.assert_allclose(metrics["grad_norm"], norm, rtol=1e-5)
  np.testing.assert_allclose(metrics["perturbation_norm"], rho, rtol=1e-5)
  assert {"cosine", "perturbed_loss", "clean_loss"} <= set(metrics)


def test_dropout_key_is_fresh_each_step_and_compiles_once():
  traces = []

  def counting_ce(logits, y):
    traces.append(1)
    return _ce(logits, y)

  model = TinyBN(dropout_rate=0.5)
  trainer = training.make_trainer(model, optax.sgd(0.0), loss=counting_ce,
                                  num_classes=NUM_CLASSES)
  batch = _batch()
  state = trainer.init(_key(), batch)
  losses = []
  for _ in range(3):
    state, metrics = trainer.step(state, batch)
    losses.append(float(metrics["loss"]))
  # lr = 0: same parameters and batch, so only the dropout mask differs.
  assert len(set(losses)) == 3
  assert len(traces) == 1  # one trace of the step (three calls)


def test_saf_ids_write_the_bank_and_the_penalty_reads_it():
  model = TinyBN()
  ds = _data(32)
  loader = data.DataLoader(ds, 16, seed=0, prefetch=0)
  temperature, strength = 2.0, 0.5
  tx = optax.chain(
      sj.saf(len(ds), NUM_CLASSES, len(loader), delay_epochs=1,
             start_epoch=1, temperature=temperature, strength=strength),
      optax.sgd(0.1))
  trainer = training.make_trainer(model, tx, donate=False)
  first = loader.batch(0, 0)
  state = trainer.init(_key(), first)
  logits0, _ = _train_apply(model, state.params,
                            state.model_state["batch_stats"], first["x"], None)
  state, metrics = trainer.step(state, first)
  assert float(metrics["penalty"]) == 0.0  # before start_epoch
  bank = sj.find_trajectory_state(state.opt_state).logit_bank
  _close(bank[0, first["ids"]], logits0)
  state, _ = trainer.step(state, loader.batch(0, 1))
  # Epoch 1: the target of each example is its row from epoch 0.
  batch = loader.batch(1, 0)
  bank = np.array(sj.find_trajectory_state(state.opt_state).logit_bank[0])
  logits, _ = _train_apply(model, state.params,
                           state.model_state["batch_stats"], batch["x"], None)
  log_p = jax.nn.log_softmax(bank[batch["ids"]] / temperature)
  log_q = jax.nn.log_softmax(logits / temperature)
  kl = jnp.sum(jnp.exp(log_p) * (log_p - log_q), -1)
  state, metrics = trainer.step(state, batch)
  np.testing.assert_allclose(metrics["penalty"],
                             strength * temperature**2 * kl.mean(), rtol=1e-5)
  assert float(metrics["penalty"]) > 0
  assert int(metrics["epoch"]) == 1


def test_mesa_teacher_runs_in_eval_mode_and_tracks_batch_stats():
  model = TinyBN()
  temperature, strength, decay = 3.0, 0.7, 0.5
  tx = optax.chain(sj.mesa(decay, temperature, strength, start_epoch=0),
                   optax.sgd(0.1))
  trainer = training.make_trainer(model, tx, donate=False)
  batch = _batch()
  state = trainer.init(_key(), batch)
  p0, s0 = state.params, state.model_state["batch_stats"]
  teacher_params, teacher_stats = sj.teacher(state.opt_state)
  _close(teacher_stats, {"batch_stats": s0})
  new_state, metrics = trainer.step(state, batch)

  student, clean_stats = _train_apply(model, p0, s0, batch["x"], None)
  teacher_logits = model.apply({"params": p0, "batch_stats": s0}, batch["x"],
                               train=False)  # eval mode: running averages
  log_p = jax.nn.log_softmax(teacher_logits / temperature)
  log_q = jax.nn.log_softmax(student / temperature)
  kl = jnp.sum(jnp.exp(log_p) * (log_p - log_q), -1)
  # float32 throughout: the step's fused KL and this one differ by ~1e-5
  # relative (a train-mode teacher would differ by far more).
  np.testing.assert_allclose(metrics["penalty"],
                             strength * temperature**2 * kl.mean(), rtol=1e-4)
  assert float(metrics["penalty"]) > 1e-4
  _, new_teacher_stats = sj.teacher(new_state.opt_state)
  _close(new_teacher_stats["batch_stats"],
         jax.tree.map(lambda a, b: decay * a + (1 - decay) * b, s0,
                      clean_stats))


def _assert_untouched(state, trainer, batch):
  assert not any(x.is_deleted() for x in jax.tree.leaves(state)
                 if isinstance(x, jax.Array))
  state, _ = trainer.step(state, batch)  # the state is still usable
  return state


def test_bad_batches_raise_before_the_state_changes():
  model = TinyBN()
  ds = _data(32)
  tx = optax.chain(sj.saf(len(ds), NUM_CLASSES, 2), optax.sgd(0.1))
  trainer = training.make_trainer(model, tx)
  batch = _batch()
  state = trainer.init(_key(), batch)
  step0 = int(state.step)
  with pytest.raises(KeyError, match="ids"):
    trainer.step(state, {"x": batch["x"], "y": batch["y"]})
  with pytest.raises(ValueError, match="rank 3"):
    trainer.step(state, {**batch, "x": batch["x"][:, :, None]})
  bad = batch["y"].copy()
  bad[3] = NUM_CLASSES
  with pytest.raises(ValueError, match=r"labels must be in \[0, 5\)"):
    trainer.step(state, {**batch, "y": bad})
  with pytest.raises(ValueError, match="leading batch axis"):
    trainer.step(state, {**batch, "ids": batch["ids"][:4]})
  assert int(state.step) == step0
  _assert_untouched(state, trainer, batch)


def test_bad_labels_on_the_device_end_the_run_with_a_clear_error():
  """A device batch is not read back before its step: its label range is
  checked inside the step and raised by a later call or by check()."""
  trainer = training.make_trainer(TinyBN(), optax.sgd(0.1))
  batch = _batch()
  bad = batch["y"].copy()
  bad[3] = -2
  device_bad = jax.device_put({**batch, "y": bad})
  state = trainer.init(_key(), batch)
  state, _ = trainer.step(state, device_bad)  # dispatched, not checked yet
  jax.block_until_ready(state)
  message = r"labels must be in \[0, 5\), got values in \[-2, 4\].*step call 1\b"
  with pytest.raises(ValueError, match=message):
    # Ready checks are read every 16 calls, never waiting for the device.
    for _ in range(16):
      state, _ = trainer.step(state, batch)
  state, _ = trainer.step(state, device_bad)
  with pytest.raises(ValueError, match=message.replace("1\\b", r"\d+")):
    trainer.check()  # waits for the pending check
  trainer.check()  # nothing left
  # Good device labels pass; eval_step checks them the same way.
  state, _ = trainer.step(state, jax.device_put(batch))
  trainer.eval_step(state, device_bad)
  with pytest.raises(ValueError, match="eval_step"):
    trainer.check()


class _Wide(nn.Module):
  """Dense layers big enough that one step takes many milliseconds."""

  @nn.compact
  def __call__(self, x, train=False):
    for _ in range(3):
      x = nn.relu(nn.Dense(1024)(x))
    return nn.Dense(NUM_CLASSES)(x)


@pytest.mark.parametrize("on_device", [False, True])
def test_step_keeps_asynchronous_dispatch(on_device):
  """Issuing steps takes a small part of running them: no step waits for
  the device (a per-step read-back made issuing take ~90% of the run)."""
  trainer = training.make_trainer(_Wide(), optax.sgd(1e-3))
  rng = np.random.default_rng(0)
  batch = {"x": rng.normal(size=(256, 1024)).astype(np.float32),
           "y": rng.integers(0, NUM_CLASSES, 256).astype(np.int32)}
  if on_device:
    batch = jax.device_put(batch)
  state = trainer.init(_key(), batch)
  state, _ = trainer.step(state, batch)  # compile
  jax.block_until_ready(state)
  ratios = []
  for _ in range(2):
    start = time.perf_counter()
    for _ in range(6):
      state, metrics = trainer.step(state, batch)
    issued = time.perf_counter() - start
    jax.block_until_ready((state, metrics))
    ratios.append(issued / (time.perf_counter() - start))
  trainer.check()
  assert min(ratios) < 0.5, ratios


def test_batch_not_divisible_by_the_devices():
  mesh = jax.make_mesh((8,), ("data",))
  trainer = training.make_trainer(TinyBN(), optax.sgd(0.1), mesh=mesh)
  batch = _batch(16)
  state = trainer.init(_key(), batch)
  odd = jax.tree.map(lambda v: v[:12], batch)
  with pytest.raises(ValueError, match="not divisible by the 8 devices"):
    trainer.step(state, odd)
  _assert_untouched(state, trainer, batch)
  with pytest.raises(ValueError, match="not an axis of the mesh"):
    training.make_trainer(TinyBN(), optax.sgd(0.1), mesh=mesh,
                          data_axis="batch")


def _run(trainer, loader, epochs, key, place_ahead=False):
  state = trainer.init(key, loader.batch(0, 0))
  if place_ahead:  # the prefetch thread shards (or splits) each batch
    loader = data.DataLoader(loader.dataset, loader.batch_size,
                             seed=loader.seed, prefetch=2,
                             transform=trainer.shard_batch)
  for epoch in range(epochs):
    for batch in loader.epoch(epoch):
      state, metrics = trainer.step(state, batch)
  return state, metrics


def _saf_sam_chain(n, steps, axis_name=None):
  return optax.chain(
      sj.saf(n, NUM_CLASSES, steps, delay_epochs=1, start_epoch=1),
      sj.sam(0.05, axis_name=axis_name),
      optax.sgd(0.1, momentum=0.9))


def test_mesh_of_8_devices_matches_one_device():
  """SAF + SAM + BatchNorm + dropout, 2 epochs: same result sharded or not."""
  ds = _data(64)
  loader = data.DataLoader(ds, 16, seed=0)
  model = TinyBN(dropout_rate=0.2)
  key = jax.random.key(0)  # threefry: dropout masks independent of sharding
  single, m1 = _run(training.make_trainer(
      model, _saf_sam_chain(len(ds), len(loader))), loader, 2, key)
  mesh = jax.make_mesh((8,), ("data",))
  trainer = training.make_trainer(model, _saf_sam_chain(len(ds), len(loader)),
                                  mesh=mesh)
  sharded, m8 = _run(trainer, loader, 2, key, place_ahead=True)
  assert trainer.num_devices == 8
  leaf = jax.tree.leaves(sharded.params)[0]
  assert len(leaf.sharding.device_set) == 8 and leaf.is_fully_replicated
  _close(sharded.params, single.params)
  _close(sharded.model_state, single.model_state)
  _close(sj.find_trajectory_state(sharded.opt_state).logit_bank,
         sj.find_trajectory_state(single.opt_state).logit_bank)
  assert float(m1["penalty"]) > 0
  np.testing.assert_allclose(m8["penalty"], m1["penalty"], rtol=1e-5)
  # The bank sharded by example over the devices: same result.
  by_example, _ = _run(training.make_trainer(
      model, _saf_sam_chain(len(ds), len(loader)), mesh=mesh,
      shard_example_tables=True), loader, 2, key)
  bank = sj.find_trajectory_state(by_example.opt_state).logit_bank
  assert bank.sharding.spec == jax.sharding.PartitionSpec(None, "data")
  _close(bank, sj.find_trajectory_state(single.opt_state).logit_bank)
  _close(by_example.params, single.params)
  with pytest.raises(ValueError, match="num_examples=64"):
    training.make_trainer(model, _saf_sam_chain(60, len(loader)), mesh=mesh,
                          shard_example_tables=True).init(key,
                                                          loader.batch(0, 0))
  with pytest.warns(DeprecationWarning, match="shard_example_tables"):
    training.make_trainer(model, _saf_sam_chain(64, len(loader)), mesh=mesh,
                          shard_saf_bank=True)


def test_pmap_matches_the_mesh():
  """The same steps under pmap (gradients, BN stats, SAF bank in sync)."""
  ds = _data(64)
  loader = data.DataLoader(ds, 16, seed=1)
  key = _key(3)
  mesh = jax.make_mesh((8,), ("data",))
  ref, m_ref = _run(training.make_trainer(
      TinyBN(), _saf_sam_chain(len(ds), len(loader)), mesh=mesh),
      loader, 2, key)
  trainer = training.make_trainer(
      TinyBN(axis_name="batch"),
      _saf_sam_chain(len(ds), len(loader), axis_name="batch"),
      axis_name="batch")
  out, m_out = _run(trainer, loader, 2, key, place_ahead=True)
  assert jax.tree.leaves(out.params)[0].shape[0] == 8
  _close(training.unreplicate(out.params), ref.params)
  _close(training.unreplicate(out.model_state), ref.model_state)
  _close(sj.find_trajectory_state(
      training.unreplicate(out.opt_state)).logit_bank,
         sj.find_trajectory_state(ref.opt_state).logit_bank)
  # Every replica holds the same state.
  jax.tree.map(lambda x: np.testing.assert_array_equal(x[0], x[-1]),
               out.params)
  np.testing.assert_allclose(m_out["loss"], m_ref["loss"], rtol=1e-5)
  metrics = trainer.eval_step(out, loader.batch(0, 0))
  ref_metrics = training.make_trainer(TinyBN(), optax.sgd(0.1)).eval_step(
      ref, loader.batch(0, 0))
  np.testing.assert_allclose(metrics["loss"], ref_metrics["loss"], rtol=1e-5)


@pytest.mark.parametrize("placement", ["pmap", "mesh"])
def test_per_device_perturbation_is_m_sharpness(placement):
  """Each device perturbs with its own shard's gradient: under pmap, and
  under a mesh through shard_map (m-sharpness at no extra cost)."""
  model = models.MLP(features=(8,), num_classes=NUM_CLASSES)
  rho, lr, n = 0.2, 0.1, 4
  tx = optax.chain(sj.sam(rho, axis_name="i"), optax.sgd(lr))
  if placement == "pmap":
    trainer = training.make_trainer(model, tx, axis_name="i",
                                    devices=jax.devices()[:n],
                                    per_device_perturbation=True)
    local = training.unreplicate
  else:
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:n]), ("i",))
    trainer = training.make_trainer(model, tx, mesh=mesh, data_axis="i",
                                    per_device_perturbation=True)
    local = _copy
  batch = _batch(16)
  state = trainer.init(_key(), batch)
  p0 = local(state.params)
  state, _ = trainer.step(state, batch)

  def loss(p, x, y):
    return _ce(model.apply({"params": p}, x), y).mean()

  @jax.jit
  def perturbed_grad(p0, x, y):
    g = jax.grad(loss)(p0, x, y)
    norm = jnp.sqrt(sum(jnp.sum(v**2) for v in jax.tree.leaves(g)))
    return jax.grad(loss)(
        jax.tree.map(lambda w, d: w + rho * d / norm, p0, g), x, y)

  grads = [perturbed_grad(p0, batch["x"][4 * k:4 * k + 4],
                          batch["y"][4 * k:4 * k + 4]) for k in range(n)]
  g2 = jax.tree.map(lambda *gs: sum(gs) / n, *grads)
  _close(local(state.params), jax.tree.map(lambda w, d: w - lr * d, p0, g2))


def test_eval_step_uses_running_averages():
  model = TinyBN()
  trainer = training.make_trainer(model, optax.sgd(0.1))
  batch = _batch()
  state = trainer.init(_key(), batch)
  state, _ = trainer.step(state, batch)
  metrics = trainer.eval_step(state, batch)
  logits = model.apply({"params": state.params, **state.model_state},
                       batch["x"], train=False)
  np.testing.assert_allclose(metrics["loss"],
                             _ce(logits, batch["y"]).mean(), rtol=1e-5)
  np.testing.assert_allclose(
      metrics["accuracy"], np.mean(np.argmax(logits, -1) == batch["y"]))


def test_nnx_module_with_batchnorm_and_sam():
  from flax import nnx

  class Net(nnx.Module):

    def __init__(self, rngs):
      self.dense = nnx.Linear(6, 8, rngs=rngs)
      self.norm = nnx.BatchNorm(8, momentum=0.8, rngs=rngs)
      self.out = nnx.Linear(8, NUM_CLASSES, rngs=rngs)

    def __call__(self, x):
      return self.out(nnx.relu(self.norm(self.dense(x))))

  net = Net(nnx.Rngs(0))
  trainer = training.make_trainer(
      net, optax.chain(sj.sam(0.3), optax.sgd(0.1)), donate=False)
  batch = _batch()
  state = trainer.init(_key(), batch)
  new_state, metrics = trainer.step(state, batch)
  assert np.isfinite(float(metrics["loss"]))
  # The running averages are those of one clean pass at the old parameters.
  clean = nnx.merge(trainer_graphdef(net), state.params,
                    state.model_state["batch_stats"],
                    state.model_state["rest"])
  clean.train()
  clean(jnp.asarray(batch["x"]))
  np.testing.assert_allclose(new_state.model_state["batch_stats"]["norm"]
                             ["mean"][...], clean.norm.mean[...], rtol=1e-6)
  moved = (new_state.params["dense"]["kernel"][...]
           - state.params["dense"]["kernel"][...])
  assert float(jnp.max(jnp.abs(moved))) > 0


def trainer_graphdef(module):
  from flax import nnx
  return nnx.split(module, nnx.Param, nnx.BatchStat, ...)[0]


def _sam_family(name, n):
  kwargs = {"num_examples": n} if name == "ausam" else {}
  if name == "msam":
    kwargs["num_chunks"] = 4
  return getattr(sj, name)(**kwargs)


def test_sam_variants_that_slice_the_batch_keep_the_clean_batch_stats():
  """ESAM (top-k subset) calls loss_fn on part of the batch; BatchNorm's
  running averages after a step are still the clean pass's. (mSAM and AUSAM
  run no clean pass: their statistics come from their own passes, checked by
  hand in test_passes.py.)"""
  model = TinyBN()
  batch = _batch(16)
  tx = optax.chain(_sam_family("esam", 16), optax.sgd(0.1))
  trainer = training.make_trainer(model, tx, donate=False)
  state = trainer.init(_key(), batch)
  _, reference = jax.jit(_train_apply, static_argnums=0)(
      model, state.params, state.model_state["batch_stats"], batch["x"], None)
  new_state, metrics = trainer.step(state, batch)
  _close(new_state.model_state["batch_stats"], reference, tol=1e-6)
  assert np.isfinite(float(metrics["perturbed_loss"]))


@pytest.mark.parametrize("method", ["sam", "saf", "mesa"])
def test_bfloat16_compute_keeps_float32_parameters_and_state(method):
  """Mixed precision as accelerator users run it: the zoo's dtype=bfloat16
  computes in bfloat16 while parameters, optimizer state, the SAF bank and the
  loss stay float32, and the result tracks the float32 run."""
  ds = data.make_synthetic(64, input_shape=(40, 1), num_classes=10, seed=0)
  loader = data.DataLoader(ds, 16, seed=0)
  chains = {
      "sam": lambda: sj.sam(0.05),
      "saf": lambda: sj.saf(len(ds), 10, len(loader), start_epoch=1,
                            delay_epochs=1),
      "mesa": lambda: sj.mesa(0.9, start_epoch=1,
                              steps_per_epoch=len(loader)),
  }
  results = {}
  for dtype in (jnp.float32, jnp.bfloat16):
    model = models.CNN1D(channels=8, dtype=dtype)
    trainer = training.make_trainer(
        model, optax.chain(chains[method](), optax.sgd(0.1, momentum=0.9)))
    state = trainer.init(_key(), loader.batch(0, 0))
    for epoch in range(3):
      for batch in loader.epoch(epoch):
        state, metrics = trainer.step(state, batch)
    trainer.check()
    results[dtype] = (state, metrics)
  state, metrics = results[jnp.bfloat16]
  floats = [x for x in jax.tree.leaves((state.params, state.opt_state))
            if jnp.issubdtype(x.dtype, jnp.floating)]
  assert floats and all(x.dtype == jnp.float32 for x in floats)
  assert metrics["loss"].dtype == jnp.float32
  ref_state, ref_metrics = results[jnp.float32]
  assert np.isfinite(float(metrics["loss"]))
  np.testing.assert_allclose(metrics["loss"], ref_metrics["loss"], rtol=0.1)
  if method != "sam":
    assert float(metrics["penalty"]) > 0
    np.testing.assert_allclose(metrics["penalty"], ref_metrics["penalty"],
                               rtol=0.25)


def _conditionals(trainer, state, batch, full_step):
  """The number of conditionals in one compiled variant of the step."""
  placed = trainer.shard_batch(batch)
  text = trainer._step.lower(state, placed, full_step).compile().as_text()  # pylint: disable=protected-access
  return text.count("conditional(")


def test_looksam_branch_is_chosen_on_the_host():
  """LookSAM's state declares a host schedule: the trainer keeps the count
  on the host and runs one of two compiled steps, with no device
  conditional, giving the same parameters as lax.cond step for step; a
  state it did not produce (a restored one) is read once."""
  model = models.MLP(features=(8,), num_classes=NUM_CLASSES)
  ds = _data(64)
  loader = data.DataLoader(ds, 16, seed=0)
  host = training.make_trainer(model, optax.chain(
      sj.looksam(0.05, k=3), optax.sgd(0.1)))
  state = host.init(_key(), loader.batch(0, 0))
  assert _conditionals(host, state, loader.batch(0, 0), True) == 0
  assert _conditionals(host, state, loader.batch(0, 0), False) == 0

  # The reference: the same transformation stepped by hand with lax.cond.
  tx = optax.chain(sj.looksam(0.05, k=3), optax.sgd(0.1))
  params, opt_state = _copy(state.params), tx.init(state.params)

  cond_step = helpers.own_loop_step(
      tx, lambda p, b: _ce(model.apply({"params": p}, b["x"]), b["y"]))

  measured = []
  for k in range(4):
    batch = loader.batch(0, k)
    state, metrics = host.step(state, batch)
    params, opt_state = cond_step(params, opt_state,
                                  {"x": batch["x"], "y": batch["y"]})
    measured.append(float(metrics["measured"]))
    _close(state.params, params)
  assert measured == [1.0, 0.0, 0.0, 1.0]
  # A state from elsewhere (here a copy, as a checkpoint restore gives):
  # its count is read once and the schedule goes on from there.
  state, metrics = host.step(jax.tree.map(jnp.array, state),
                             loader.batch(1, 0))
  assert float(metrics["measured"]) == 0.0  # count 4: not a multiple of 3


def test_a_transformation_without_the_trainers_axis_name_is_refused():
  """Under pmap (and shard_map) a SAM-family transformation built without
  the trainer's axis_name would average nothing and let the devices drift:
  init refuses it, naming the fix."""
  batch = _batch(16)
  with pytest.raises(ValueError, match="axis_name='batch'"):
    training.make_trainer(
        models.MLP(features=(8,), num_classes=NUM_CLASSES),
        optax.chain(sj.sam(0.05), optax.sgd(0.1)), axis_name="batch",
        devices=jax.devices()[:2]).init(_key(), batch)
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("data",))
  with pytest.raises(ValueError, match="axis_name='data'"):
    training.make_trainer(
        models.MLP(features=(8,), num_classes=NUM_CLASSES),
        optax.chain(sj.ausam(0.05, num_examples=16), optax.sgd(0.1)),
        mesh=mesh, per_device_perturbation=True).init(_key(), batch)
