"""The transformations inside a data-parallel step of the user's own.

``jax.shard_map`` with its default ``check_vma=True`` differentiates a
replicated parameter of a per-device loss through an implicit ``pvary``,
whose transpose is a ``psum``: a gradient taken there is already the sum of
the devices' gradients, and ``pmean`` of such an invariant value changes
nothing. The SAM family's own passes must therefore take per-device
gradients (at a point marked as varying) before averaging; before that fix a
4-device step gave 4 times the SAM gradient. Each step here is compared with
the same step under ``jax.pmap``, on 4 host devices.
"""

from __future__ import annotations

import pathlib
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import sharpjax as sj
from jax.sharding import PartitionSpec as P

from tests import helpers

N = 4
AXIS = "data"


def _per_device(params):
  """The documented way to get per-device gradients under shard_map."""
  return jax.lax.pcast(params, AXIS, to="varying")


def _make_step(tx, local, global_grads):
  """One training step as a user writes it (runs on each device)."""

  def step(params, opt_state, batch):
    def mean_loss(p):
      loss = jnp.mean(helpers.loss_fn(p, batch))
      if sj.find_trajectory_state(opt_state):
        loss += sj.trajectory_penalty(
            opt_state, helpers.apply(p, batch["x"]), batch["ids"])
      return loss

    grads = jax.grad(mean_loss)(local(params))
    if global_grads:
      grads = jax.lax.pmean(grads, AXIS)
    logits = helpers.apply(params, batch["x"])
    updates, opt_state = tx.update(
        grads, opt_state, params, loss_fn=helpers.loss_fn, batch=batch,
        value=jax.lax.pmean(jnp.mean(helpers.loss_fn(params, batch)), AXIS),
        # SAF records the logits of the whole global batch.
        logits=sj.gather_examples(logits, AXIS),
        ids=sj.gather_examples(batch["ids"], AXIS))
    return optax.apply_updates(params, updates), opt_state

  return step


def _run_both(tx, global_grads, num_steps):
  params, batch = helpers.tiny_params(), helpers.tiny_batch(size=16)
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:N]), (AXIS,))
  sharded = jax.jit(jax.shard_map(
      _make_step(tx, _per_device, global_grads), mesh=mesh,
      in_specs=(P(), P(), P(AXIS)), out_specs=(P(), P())))
  mapped = jax.pmap(
      _make_step(tx, lambda p: p, global_grads), axis_name=AXIS,
      in_axes=(None, None, 0), out_axes=None, devices=jax.devices()[:N])
  split = jax.tree.map(lambda x: x.reshape((N, -1) + x.shape[1:]), batch)
  got = want = (params, tx.init(params))
  for _ in range(num_steps):
    got = sharded(*got, batch)
    want = mapped(*want, split)
  return got, want


CASES = {
    "sam": lambda: sj.sam(0.05, axis_name=AXIS),
    "asam": lambda: sj.asam(0.5, axis_name=AXIS),
    "gsam": lambda: sj.gsam(0.05, alpha=0.1, axis_name=AXIS),
    "looksam": lambda: sj.looksam(0.05, k=2, alpha=0.7, axis_name=AXIS),
    "fsam": lambda: sj.fsam(0.05, axis_name=AXIS),
    "esam": lambda: sj.esam(0.05, beta=0.6, gamma=0.5, axis_name=AXIS),
    "ssam": lambda: sj.ssam(0.05, sparsity=0.5, num_fisher_samples=4,
                            update_every=2, axis_name=AXIS),
    "msam": lambda: sj.msam(0.05, num_chunks=2, axis_name=AXIS),
    "sagm": lambda: sj.sagm(0.05, alpha=0.1, axis_name=AXIS),
    "ausam": lambda: sj.ausam(0.05, keep=0.5, num_examples=64,
                              axis_name=AXIS),
}


# One case per distinct path through the library: the shared perturbed pass
# (SAM; ASAM, F-SAM, ESAM, mSAM and SAGM take the same pass and were checked
# equal to pmap too, left out to keep the suite's time), the clean gradient in
# the direction (GSAM), a device conditional (LookSAM), per-example gradients
# (SSAM), example tables written from every device (AUSAM).
PER_DEVICE = ["sam", "gsam", "looksam", "ssam", "ausam"]


@pytest.mark.parametrize("name", PER_DEVICE)
def test_shard_map_step_equals_pmap_step(name):
  """Per-device gradients (m-sharpness): shard_map equals pmap, 2 steps (a
  full and a reuse step for LookSAM), parameters and whole state."""
  tx = optax.chain(CASES[name](), optax.sgd(0.1, momentum=0.9))
  got, want = _run_both(tx, global_grads=False, num_steps=2)
  chex.assert_trees_all_close(got, want, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("name", ["sam", "gsam", "saf"])
def test_shard_map_step_with_global_gradients_equals_pmap(name):
  """pmean'd clean gradients (one global perturbation); SAF, which averages
  nothing itself, with its bank written from every device's rows."""
  if name == "saf":
    first = sj.saf(num_examples=64, num_classes=helpers.NUM_CLASSES,
                   steps_per_epoch=1, delay_epochs=1, start_epoch=1)
  else:
    first = CASES[name]()
  tx = optax.chain(first, optax.sgd(0.1, momentum=0.9))
  got, want = _run_both(tx, global_grads=True, num_steps=3)
  chex.assert_trees_all_close(got, want, atol=1e-6, rtol=1e-6)
  if name == "sam":
    # The single-device SAM step on the whole batch: the global gradient,
    # not N times it.
    params, batch = helpers.tiny_params(), helpers.tiny_batch(size=16)
    single = optax.chain(sj.sam(0.05), optax.sgd(0.1, momentum=0.9))
    one = (params, single.init(params))
    for _ in range(3):
      one = helpers.train_step(single, *one, batch)
    chex.assert_trees_all_close(got[0], one[0], atol=1e-6, rtol=1e-5)
  if name == "saf":
    bank = sj.find_trajectory_state(got[1]).recorded_epoch
    ids = np.asarray(helpers.tiny_batch(size=16)["ids"])
    assert (np.asarray(bank)[..., ids] >= 0).all()  # every example recorded


def test_scaling_guide_own_loop_blocks_run_and_agree():
  """The guide's shard_map block, then its pmap block, as a reader pastes
  them (on the suite's 8 host devices): both end at the one-device SAM
  parameters of the whole batch."""
  text = (pathlib.Path(__file__).parents[1] / "docs" / "guides" /
          "scaling.md").read_text()
  section = text.split("## Your own loop", 1)[1]
  blocks = re.findall(r"```python\n(.*?)```", section, re.S)
  assert len(blocks) == 2 and "jax.shard_map" in blocks[0]
  assert "jax.pmap" in blocks[1] and "device_put_replicated" not in section
  namespace = {}
  for block in blocks:
    exec(compile(block, "scaling.md", "exec"), namespace)  # pylint: disable=exec-used
  single = optax.chain(sj.sam(0.05), optax.sgd(0.1, momentum=0.9))
  batch = {"x": jnp.asarray(namespace["x"]), "y": jnp.asarray(namespace["y"])}
  loss_fn = namespace["loss_fn"]

  step = helpers.own_loop_step(single, loss_fn)

  params = {"w": jnp.zeros((10, 2)), "b": jnp.zeros(2)}
  state = single.init(params)
  for _ in range(20):
    params, state = step(params, state, batch)
  chex.assert_trees_all_close(namespace["params"], params, atol=1e-5)
  chex.assert_trees_all_close(namespace["pmap_params"], params, atol=1e-5)
