"""mSAM against references derived by hand on the quadratic of helpers."""

from __future__ import annotations

import re

from absl.testing import absltest
from absl.testing import parameterized
import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import sharpjax as sj

from tests import helpers

Q = helpers.QUADRATIC_4
A, CENTRES, W0 = Q.a, Q.centres, Q.w0
chain, unit = helpers.with_sgd, helpers.unit
LOOPS = ("unrolled", "vmap")


def msam_direction(w, rho, num_chunks):
  chunks = np.split(CENTRES, num_chunks)
  return np.mean([Q.sam_grad(w, rho, c) for c in chunks], axis=0)


def clean_grads():
  return jax.grad(lambda p: Q.loss(p, Q.batch).mean())(Q.params())


def one_update(num_chunks, chunk_loop):
  """One jitted mSAM update at Q's initial parameters: (updates, state)."""
  params = Q.params()
  tx = sj.msam(rho=0.3, num_chunks=num_chunks, chunk_loop=chunk_loop)
  return helpers.jit_update(tx, clean_grads(), tx.init(params), params,
                            loss_fn=Q.loss, batch=Q.batch)


class MSAMTest(parameterized.TestCase):

  def test_one_chunk_is_sam(self):
    got, state = Q.run(chain(sj.msam(rho=0.3, num_chunks=1)), 5)
    want, want_state = Q.run(chain(sj.sam(rho=0.3)), 5)
    chex.assert_trees_all_equal(got, want)
    chex.assert_trees_all_equal(state, want_state)

  @parameterized.parameters(*LOOPS)
  def test_one_chunk_per_example_is_the_per_example_formula(self, chunk_loop):
    # 1-SAM: d = mean_i grad l_i(w + rho grad l_i(w) / |grad l_i(w)|).
    d, _ = one_update(4, chunk_loop)
    want = np.mean([A @ (W0 + 0.3 * unit(A @ (W0 - c)) - c) for c in CENTRES],
                   axis=0)
    np.testing.assert_allclose(Q.flat(d), want, rtol=1e-5, atol=1e-6)
    # It differs from SAM's direction: the per-example perturbations matter.
    self.assertGreater(np.abs(want - Q.sam_grad(W0, 0.3)).max(), 1e-3)

  @parameterized.product(num_chunks=[2, 4], chunk_loop=LOOPS)
  def test_matches_hand_derived_recursion(self, num_chunks, chunk_loop):
    got, _ = Q.run(chain(sj.msam(rho=0.3, num_chunks=num_chunks,
                                 chunk_loop=chunk_loop)), 5)
    want = Q.descend(lambda t, w: msam_direction(w, 0.3, num_chunks), 5)
    np.testing.assert_allclose(Q.flat(got), want, rtol=1e-5, atol=1e-6)

  @parameterized.parameters(*LOOPS)
  def test_diagnostics(self, chunk_loop):
    _, state = one_update(2, chunk_loop)
    d = sj.diagnostics(state)
    chunks = np.split(CENTRES, 2)

    def loss(w, cs):
      return np.mean([0.5 * (w - c) @ A @ (w - c) for c in cs])

    np.testing.assert_allclose(d["grad_norm"], np.linalg.norm(Q.grad(W0)),
                               rtol=1e-5)
    np.testing.assert_allclose(d["perturbation_norm"], 0.3, rtol=1e-6)
    np.testing.assert_allclose(d["applied_perturbation_norm"], 0.3, rtol=1e-6)
    np.testing.assert_allclose(d["clean_loss"], loss(W0, CENTRES), rtol=1e-5)
    np.testing.assert_allclose(
        d["perturbed_loss"],
        np.mean([loss(W0 + 0.3 * unit(Q.grad(W0, c)), c) for c in chunks]),
        rtol=1e-5)
    h = msam_direction(W0, 0.3, 2)
    np.testing.assert_allclose(
        d["cosine"], unit(Q.grad(W0)) @ unit(h), rtol=1e-5)

  def test_unrolled_chunks_keep_plain_convolutions(self):
    # vmap over per-chunk weights turns a convolution into a grouped one
    # (feature_group_count > 1), which XLA runs far slower; the unrolled loop
    # keeps every convolution plain, on the chunk's examples.
    def conv_loss(params, batch):
      y = jax.lax.conv_general_dilated(
          batch["x"], params["kernel"], (1,), "SAME",
          dimension_numbers=("NWC", "WIO", "NWC"))
      return jnp.mean((y + params["bias"]) ** 2, axis=(1, 2))

    params = {"kernel": jnp.ones((3, 2, 4)), "bias": jnp.zeros(4)}
    batch = {"x": jnp.ones((8, 10, 2))}
    grads = jax.grad(lambda p: conv_loss(p, batch).mean())(params)

    def hlo(chunk_loop):
      tx = sj.msam(rho=0.1, num_chunks=4, chunk_loop=chunk_loop)
      return jax.jit(lambda g, s, p: tx.update(
          g, s, p, loss_fn=conv_loss, batch=batch)).lower(
              grads, tx.init(params), params).as_text()

    grouped = lambda text: re.findall(r"feature_group_count\s*=\s*([2-9]|\d\d)",
                                      text)
    self.assertEqual(grouped(hlo("unrolled")), [])
    self.assertNotEqual(grouped(hlo("vmap")), [])

  def test_the_step_holds_the_chunks_passes_only(self):
    # Per chunk of 4 examples, a clean and a perturbed forward-backward (2
    # convolutions each on this one-layer model); the caller's clean pass on
    # the whole batch is dead code (mSAM uses neither its gradient nor value).
    params, batch = helpers.conv_problem(16)
    tx = chain(sj.msam(rho=0.1, num_chunks=4))
    shapes = helpers.compiled_convolutions(tx, params, batch)
    self.assertEqual(sorted(shapes),
                     ["f32[2,3,4]"] * 8 + ["f32[4,10,4]"] * 8)

  def test_sharded_batch_one_chunk_per_device(self):
    devices = jax.devices()[:8]
    mesh = jax.sharding.Mesh(np.array(devices), ("data",))
    data = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    tx = chain(sj.msam(rho=0.1, num_chunks=8))
    params, batch = helpers.tiny_params(), helpers.tiny_batch(size=32)
    step = jax.jit(helpers.train_step, static_argnums=0)
    p, s = params, tx.init(params)
    for _ in range(2):
      p, s = step(tx, p, s, batch)
    sp = jax.device_put(params, replicated)
    ss = jax.device_put(tx.init(params), replicated)
    sb = jax.device_put(batch, data)
    for _ in range(2):
      sp, ss = step(tx, sp, ss, sb)
    chex.assert_trees_all_close(sp, p, atol=1e-5, rtol=1e-5)
    chex.assert_trees_all_close(ss, s, atol=1e-5, rtol=1e-5)

  def test_has_aux_and_clear_errors(self):
    params = Q.params()
    grads = clean_grads()
    tx = sj.msam(rho=0.3, num_chunks=2)
    with_aux = lambda p, b: (Q.loss(p, b), {"n": jnp.ones(())})
    d, _ = helpers.jit_update(tx, grads, tx.init(params), params,
                              loss_fn=with_aux, batch=Q.batch, has_aux=True)
    np.testing.assert_allclose(Q.flat(d), msam_direction(W0, 0.3, 2),
                               rtol=1e-5)
    with self.assertRaisesRegex(ValueError, "not divisible by num_chunks=3"):
      sj.msam(num_chunks=3).update(grads, tx.init(params), params,
                                   loss_fn=Q.loss, batch=Q.batch)
    with self.assertRaisesRegex(ValueError, "static_args"):
      optax.inject_hyperparams(sj.msam)(rho=0.1, num_chunks=2).init(params)
    with self.assertRaisesRegex(ValueError, "num_chunks"):
      sj.msam(num_chunks=0)
    with self.assertRaisesRegex(ValueError, "chunk_loop must be one of"):
      sj.msam(chunk_loop="scan")


if __name__ == "__main__":
  absltest.main()
