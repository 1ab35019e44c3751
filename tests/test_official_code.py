"""Where sharpjax and the official code differ, each option and mapping
checked against a hand computation: weight decay around a SAM-family
transformation, SSAM-F's official mask timing, SAF/MESA's start epoch."""

from __future__ import annotations

import json
import math
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import sharpjax as sj

from tests import helpers

Q = helpers.QUADRATIC_3
RHO, LR, WD, STEPS = 0.3, 0.1, 0.2, 4


def decay_reference(placement):
  """Plain SGD on the SAM directions of each weight-decay placement."""
  w = Q.w0.copy()
  cbar = Q.centres.mean(0)
  for _ in range(STEPS):
    g = Q.a @ (w - cbar)
    if placement == "loss":  # L + WD/2 |w|^2: both passes see the decay.
      eps = RHO * helpers.unit(g + WD * w)
      d = Q.a @ (w + eps - cbar) + WD * (w + eps)
    elif placement == "before":  # only the perturbation sees it.
      eps = RHO * helpers.unit(g + WD * w)
      d = Q.a @ (w + eps - cbar)
    else:  # "after": the update sees it, at the clean weights.
      eps = RHO * helpers.unit(g)
      d = Q.a @ (w + eps - cbar) + WD * w
    w = w - LR * d
  return w


def decayed_loss(params, batch):
  sq = sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(params))
  return Q.loss(params, batch) + 0.5 * WD * sq


@pytest.mark.parametrize("placement", ["loss", "before", "after"])
def test_weight_decay_placements_match_the_hand_computation(placement):
  if placement == "loss":
    tx = optax.chain(sj.sam(RHO), optax.sgd(LR))
    got, _ = Q.run(tx, STEPS, loss_fn=decayed_loss)
  elif placement == "before":
    tx = optax.chain(optax.add_decayed_weights(WD), sj.sam(RHO),
                     optax.sgd(LR))
    got, _ = Q.run(tx, STEPS)
  else:
    tx = optax.chain(sj.sam(RHO), optax.add_decayed_weights(WD),
                     optax.sgd(LR))
    got, _ = Q.run(tx, STEPS)
  np.testing.assert_allclose(Q.flat(got), decay_reference(placement),
                             rtol=1e-5, atol=1e-6)
  # The three placements are three different trajectories.
  others = [decay_reference(p) for p in ("loss", "before", "after")
            if p != placement]
  for other in others:
    assert np.abs(Q.flat(got) - other).max() > 1e-3


# SSAM-F with the official timing: the mask of the weights after the update of
# steps 0, k, 2k, ... serves from the next step on.
_RNG = np.random.default_rng(3)
_M = _RNG.normal(size=(10, 10))
SA = _M @ _M.T / 10 + 0.5 * np.eye(10)
SC = _RNG.normal(size=(8, 10))
SQ = helpers.Quadratic(SA, SC, 0.1 * np.arange(10.0) - 0.4,
                       kernel_shape=(2, 3))


def ssam_reference(rho, sparsity, lr, steps, update_every, num_fisher,
                   next_step):
  """SSAM-F in numpy, the refresh after the update (official) or before."""
  w = SQ.w0.copy()
  cbar = SC.mean(0)
  mask = np.zeros(10, bool)
  kept = math.floor(10 * (1 - sparsity))

  def fisher_mask(w):
    per_example = (w[None, :] - SC[:num_fisher]) @ SA
    m = np.zeros(10, bool)
    m[np.argsort(-np.sum(per_example**2, 0), kind="stable")[:kept]] = True
    return m

  for t in range(steps):
    g = SA @ (w - cbar)
    eps = mask * rho * g / np.linalg.norm(g)
    if not next_step and t % update_every == 0:
      mask = fisher_mask(w)
    w = w - lr * SA @ (w + eps - cbar)
    if next_step and t % update_every == 0:
      mask = fisher_mask(w)
  return w, mask


@pytest.mark.parametrize("update_every", [1, 3])
def test_ssam_official_refresh_timing(update_every):
  rho, sparsity, lr, steps, num_fisher = 0.5, 0.5, 0.5, 7, 5
  results = {}
  for refresh_at in ("this_step", "next_step"):
    tx = optax.chain(
        sj.ssam(rho=rho, sparsity=sparsity, num_fisher_samples=num_fisher,
                update_every=update_every, refresh_at=refresh_at),
        optax.sgd(lr))
    got, state = SQ.run(tx, steps)
    want, mask = ssam_reference(rho, sparsity, lr, steps, update_every,
                                num_fisher, refresh_at == "next_step")
    np.testing.assert_allclose(SQ.flat(got), want, rtol=1e-5, atol=1e-6)
    if refresh_at == "next_step":
      # The mask in the state is the one the last step used.
      _, used = ssam_reference(rho, sparsity, lr, steps - 1, update_every,
                               num_fisher, True)
      np.testing.assert_array_equal(SQ.flat(state[0].mask).astype(bool), used)
    results[refresh_at] = SQ.flat(got)
  assert np.abs(results["this_step"] - results["next_step"]).max() > 1e-4


def test_ssam_refresh_at_is_checked():
  with pytest.raises(ValueError, match="refresh_at"):
    sj.ssam(refresh_at="after")


# SAF / MESA: the official code turns the KL term on for epoch >
# kl_start_epoch (0-indexed epochs); sharpjax for epoch >= start_epoch, so
# start_epoch = kl_start_epoch + 1.
N, C, B, SPE = 8, 3, 4, 2  # each example once per epoch


def official_active(step, kl_start_epoch):
  epoch = step // SPE  # the official loop's epoch index
  return epoch > kl_start_epoch


@pytest.mark.parametrize("kl_start_epoch", [0, 2])
def test_saf_start_epoch_maps_to_kl_start_epoch_plus_one(kl_start_epoch):
  tx = sj.saf(num_examples=N, num_classes=C, steps_per_epoch=SPE,
              delay_epochs=1, start_epoch=kl_start_epoch + 1)
  state = tx.init(None)
  got, want = [], []
  for step in range(2 * SPE * (kl_start_epoch + 2)):
    ids = (step % SPE) * B + jnp.arange(B)
    logits = jnp.full((B, C), 0.3 * step) * jnp.arange(C)
    got.append(float(sj.trajectory_penalty(state, -logits, ids)) > 0)
    want.append(official_active(step, kl_start_epoch))
    _, state = tx.update(None, state, logits=logits, ids=ids)
  assert got == want


@pytest.mark.parametrize("kl_start_epoch", [0, 2])
def test_mesa_start_epoch_maps_to_kl_start_epoch_plus_one(kl_start_epoch):
  params = {"w": jnp.asarray(np.arange(2.0 * C).reshape(2, C) / 4)}
  tx = sj.mesa(decay=0.5, steps_per_epoch=SPE,
               start_epoch=kl_start_epoch + 1)
  state = tx.init(params)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(B, 2)), jnp.float32)

  def teacher_fn(p, model_state):
    del model_state
    return x @ p["w"]

  got, want = [], []
  for step in range(2 * SPE * (kl_start_epoch + 2)):
    student = {"w": params["w"] * (1.0 + step)}
    penalty = sj.trajectory_penalty(state, teacher_fn(student, None),
                                    teacher_fn=teacher_fn)
    got.append(float(penalty) > 0)
    want.append(official_active(step, kl_start_epoch))
    params = jax.tree.map(lambda w: w + 0.5, params)
    _, state = tx.update(params, state, params)
  assert got == want


# benchmarks/official_agreement.py runs outside the suite (it needs PyTorch and
# the official repositories); its arguments are checked here.
ROOT = pathlib.Path(__file__).resolve().parents[1]


def run_agreement(*args):
  return subprocess.run(
      [sys.executable, str(ROOT / "benchmarks" / "official_agreement.py"),
       *args], capture_output=True, text=True, cwd=ROOT, timeout=120)


def test_agreement_script_help_and_argument_errors(tmp_path):
  proc = run_agreement("--help")
  assert proc.returncode == 0
  assert "--official" in proc.stdout and "--methods" in proc.stdout
  missing = run_agreement("--official", str(tmp_path / "nowhere"))
  assert missing.returncode == 2
  assert "--official" in missing.stderr and "not a folder" in missing.stderr
  unknown = run_agreement("--official", str(tmp_path), "--methods", "sgdx")
  assert unknown.returncode == 2
  assert "unknown sgdx" in unknown.stderr and "looksam" in unknown.stderr
  steps = run_agreement("--official", str(tmp_path), "--steps", "0")
  assert steps.returncode == 2 and "--steps" in steps.stderr


def _sci(x: float) -> str:
  """1.2e-7 as the page writes it (no exponent padding)."""
  mantissa, exponent = f"{x:.1e}".split("e")
  return f"{mantissa}e{int(exponent)}"


def test_agreement_page_quotes_the_measured_results():
  """Every largest difference in the stored results appears on the page, and
  every official commit measured is named there."""
  results = json.loads(
      (ROOT / "benchmarks" / "results" / "official_agreement.json").read_text())
  page = (ROOT / "docs" / "guides" / "agreement.md").read_text()
  rows = results["results"]
  assert {r["method"] for r in rows} >= {
      "sam", "asam", "gsam", "sagm", "fsam", "esam", "ausam", "saf", "mesa",
      "looksam", "looksam-rollovd", "ssam"}
  for row in rows:
    assert row["status"] == "ok", row
    assert _sci(row["largest"]) in page, (row["method"], _sci(row["largest"]))
    assert f"`{row['commit'][:7]}`" in page, row["method"]
    assert row["repository"] in page, row["method"]
