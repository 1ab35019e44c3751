"""Where a sharpness-aware transformation may sit: accumulation, chain order,
SAM on some parameters (``sj.check_chain``, ``mask=``, make_trainer).

The references are numpy recursions on the quadratic of the SAM family
(``helpers.QUADRATIC_4``, whose gradients have a closed form), written from
the rules, not from the library's code.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import sharpjax as sj
from sharpjax import training

from tests import helpers

Q = helpers.QUADRATIC_4
RHO, LR, K = 0.05, 0.1, 2


def _micro_batches():
  """K micro-batches of 2 examples each (the quadratic's 4 centres)."""
  return [Q.centres[2 * i:2 * i + 2] for i in range(K)]


def _accumulate(tx, extra=lambda i, mb: {}):
  """One accumulated step of ``tx`` over the micro-batches, jit-compiled."""
  params = Q.params()
  state = tx.init(params)

  @jax.jit
  def micro_step(params, state, centres, extra):
    batch = {"c": centres}
    grads = jax.grad(lambda p: Q.loss(p, batch).mean())(params)
    updates, state = tx.update(grads, state, params, loss_fn=Q.loss,
                               batch=batch, **extra)
    return optax.apply_updates(params, updates), state

  for i, mb in enumerate(_micro_batches()):
    params, state = micro_step(params, state, jnp.asarray(mb, jnp.float32),
                               extra(i, mb))
  return Q.flat(params), state


# ---------------------------------------------------------------------------
# Accumulation behind the SAM family: each micro-batch's own direction.
# ---------------------------------------------------------------------------


def test_sam_then_multisteps_averages_each_micro_batch_sam_gradient():
  tx = optax.chain(sj.sam(RHO), optax.MultiSteps(optax.sgd(LR), K))
  got, _ = _accumulate(tx)
  w = Q.w0
  want = w - LR * np.mean([Q.sam_grad(w, RHO, mb) for mb in _micro_batches()],
                          axis=0)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  # What MultiSteps around SAM gives instead: the accumulated perturbation,
  # and the last micro-batch's perturbed gradient only.
  g = np.mean([Q.grad(w, mb) for mb in _micro_batches()], axis=0)
  wrong = w - LR * Q.grad(w + RHO * helpers.unit(g), _micro_batches()[-1])
  assert np.abs(got - wrong).max() > 1e-3


def test_looksam_then_multisteps_takes_its_period_over_micro_batches():
  """k=2: a full step on micro-batch 0 (caching g_v), a reuse step on 1."""
  alpha = 0.7
  tx = optax.chain(sj.looksam(RHO, k=2, alpha=alpha),
                   optax.MultiSteps(optax.sgd(LR), K))
  got, _ = _accumulate(tx)
  w = Q.w0
  mb0, mb1 = _micro_batches()
  g0 = Q.grad(w, mb0)
  d0 = Q.sam_grad(w, RHO, mb0)
  g_v = helpers.reject(d0, g0)
  g1 = Q.grad(w, mb1)
  d1 = g1 + alpha * np.linalg.norm(g1) / np.linalg.norm(g_v) * g_v
  np.testing.assert_allclose(got, w - LR * (d0 + d1) / 2, rtol=1e-5,
                             atol=1e-6)


def test_saf_then_multisteps_records_every_micro_batch_and_its_penalty():
  """SAF before the accumulation sees every micro-batch: each example gets
  its bank row, and with the penalty on, each micro-batch's gradient
  includes its own KL term against its own past logits."""
  n, c, temperature, strength = 4, 3, 2.0, 0.5
  kernel = jnp.asarray(np.random.default_rng(0).normal(size=(2, c)),
                       jnp.float32)
  xs = np.random.default_rng(1).normal(size=(n, 2)).astype(np.float32)
  tx = optax.chain(
      sj.saf(num_examples=n, num_classes=c, steps_per_epoch=K,
             delay_epochs=1, start_epoch=1, temperature=temperature,
             strength=strength),
      optax.MultiSteps(optax.sgd(LR), K))
  params = {"k": kernel}
  state = tx.init(params)

  @jax.jit
  def micro_step(params, state, x, ids):
    def loss(p):
      logits = x @ p["k"]
      return (jnp.mean(logits ** 2)
              + sj.trajectory_penalty(state, logits, ids)), logits
    (_, logits), grads = jax.value_and_grad(loss, has_aux=True)(params)
    updates, state = tx.update(grads, state, params, logits=logits, ids=ids)
    return optax.apply_updates(params, updates), state

  micro = [np.arange(2 * i, 2 * i + 2) for i in range(K)]
  for ids in micro:  # epoch 0: records only
    params, state = micro_step(params, state, xs[ids], jnp.asarray(ids))
  bank = sj.find_trajectory_state(state)
  np.testing.assert_array_equal(np.asarray(bank.recorded_epoch)[0],
                                np.zeros(n))
  past = np.asarray(kernel)  # epoch 0's logits came from the first kernel
  w1 = np.asarray(params["k"], np.float64)

  def hand_grad(ids):
    """d/dW of mean(logits^2) + strength T^2 mean KL(p_past || q)."""
    x = xs[ids].astype(np.float64)
    logits = x @ w1
    q = np.exp(logits / temperature)
    q /= q.sum(-1, keepdims=True)
    p = np.exp(x @ past / temperature)
    p /= p.sum(-1, keepdims=True)
    d_logits = 2 * logits / logits.size + strength * temperature * (q - p) / len(ids)
    return x.T @ d_logits

  for ids in micro:  # epoch 1: the penalty is on
    params, state = micro_step(params, state, xs[ids], jnp.asarray(ids))
  want = w1 - LR * np.mean([hand_grad(ids) for ids in micro], axis=0)
  np.testing.assert_allclose(np.asarray(params["k"]), want, rtol=1e-5,
                             atol=1e-6)
  np.testing.assert_array_equal(
      np.asarray(sj.find_trajectory_state(state).recorded_epoch)[0],
      np.ones(n))


# ---------------------------------------------------------------------------
# The chain check.
# ---------------------------------------------------------------------------

SAF = lambda: sj.saf(num_examples=8, num_classes=3, steps_per_epoch=2)

ACCEPTED = {
    "sam_first": lambda: optax.chain(sj.sam(RHO), optax.sgd(LR)),
    "saf_before_sam": lambda: optax.chain(SAF(), sj.sam(RHO), optax.sgd(LR)),
    "clip_after_sam": lambda: optax.chain(
        sj.sam(RHO), optax.clip_by_global_norm(0.1), optax.sgd(LR)),
    "accumulate_behind": lambda: optax.chain(
        sj.looksam(RHO), optax.MultiSteps(optax.sgd(LR), K)),
    "saf_accumulate_behind": lambda: optax.chain(
        SAF(), optax.MultiSteps(optax.sgd(LR), K)),
    "injected": lambda: optax.chain(
        optax.inject_hyperparams(sj.gsam)(rho=RHO), optax.sgd(LR)),
    "plain_optax": lambda: optax.chain(optax.clip(1.0), optax.adam(LR)),
}

REFUSED = {
    "sgd_first": (lambda: optax.chain(optax.sgd(LR), sj.sam(RHO)),
                  "not first in the chain"),
    "clip_first": (lambda: optax.chain(optax.clip_by_global_norm(0.1),
                                       sj.esam(RHO), optax.sgd(1.0)),
                   r"clip_by_global_norm\(c\), optax.sgd"),
    "saf_chain_first": (lambda: optax.chain(
        optax.chain(SAF(), optax.sgd(LR)), sj.msam(RHO)), "not first"),
    "multisteps_around_sam": (lambda: optax.MultiSteps(
        optax.chain(sj.sam(RHO), optax.sgd(LR)), K),
        r"optax.chain\(sj.sam\(rho\), optax.MultiSteps"),
    "multisteps_around_saf": (lambda: optax.MultiSteps(
        optax.chain(SAF(), optax.sgd(LR)), K),
        r"optax.chain\(sj.saf\(...\), optax.MultiSteps"),
    "masked": (lambda: optax.masked(
        optax.chain(sj.sam(RHO), optax.sgd(LR)), {"w": True}),
        r"sj.sam\(rho, mask=mask\)"),
    "multi_transform": (lambda: optax.multi_transform(
        {"a": optax.chain(sj.asam(RHO), optax.sgd(LR)), "b": optax.sgd(LR)},
        {"w": "a"}), "mask="),
}


@pytest.mark.parametrize("name", sorted(ACCEPTED))
def test_check_chain_accepts(name):
  sj.check_chain(ACCEPTED[name]())
  sj.check_chain(ACCEPTED[name]().init({"w": jnp.ones(2)}))


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_check_chain_refuses_in_one_line(name):
  build, match = REFUSED[name]
  with pytest.raises(ValueError, match=match) as e:
    sj.check_chain(build().init({"w": jnp.ones(2)}))
  assert "\n" not in str(e.value)
  with pytest.raises(ValueError, match=match):
    sj.check_chain(build())  # the transformation itself (probe {"w": [2]})


def test_check_chain_covers_a_state_declaring_itself():
  """The check reads declarations, so a method added later is covered."""
  def step(inputs):
    return inputs.ascend(jax.tree.map(jnp.zeros_like, inputs.grads))
  new_method = sj.sharpness_aware(step, name="new_method")
  with pytest.raises(ValueError, match="not first"):
    sj.check_chain(optax.chain(optax.scale(2.0), new_method))


class _Tiny(nn.Module):
  @nn.compact
  def __call__(self, x, train=False):
    return nn.Dense(3)(x)


def test_make_trainer_refuses_a_wrong_chain():
  with pytest.raises(ValueError, match="not first"):
    training.make_trainer(_Tiny(), optax.chain(optax.sgd(LR), sj.sam(RHO)))
  with pytest.raises(ValueError, match="MultiSteps"):
    training.make_trainer(_Tiny(), optax.MultiSteps(
        optax.chain(sj.looksam(RHO), optax.sgd(LR)), K))
  # A mask shaped like the model's parameters: checked on the real state at
  # init (the probe parameters of the construction-time check do not fit).
  trainer = training.make_trainer(_Tiny(), optax.masked(
      optax.chain(sj.sam(RHO), optax.sgd(LR)),
      {"Dense_0": {"kernel": True, "bias": False}}))
  batch = {"x": np.zeros((4, 2), np.float32), "y": np.zeros(4, np.int32)}
  with pytest.raises(ValueError, match="mask="):
    trainer.init(jax.random.key(0), batch)


# ---------------------------------------------------------------------------
# SAM on some parameters.
# ---------------------------------------------------------------------------


def test_sam_mask_perturbs_only_the_selected_leaves():
  """eps = rho g_S / |g_S| on the bias only; every leaf descends along the
  gradient at w + eps (the loss sees all parameters)."""
  mask = {"kernel": False, "bias": True}
  for tx in (optax.chain(sj.sam(RHO, mask=mask), optax.sgd(LR)),
             optax.chain(sj.sam(RHO, mask=lambda p: mask), optax.sgd(LR))):
    got, state = Q.run(tx, 1)
    w = Q.w0
    g = Q.grad(w)
    selected = np.array([0.0, 0.0, 1.0, 1.0])  # kernel (2,), bias (2,)
    eps = RHO * helpers.unit(g * selected)
    np.testing.assert_allclose(Q.flat(got), w - LR * Q.grad(w + eps),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        float(sj.diagnostics(state)["perturbation_norm"]), RHO, rtol=1e-5)


def test_sam_inside_optax_masked_is_refused_in_one_line():
  tx = optax.masked(optax.chain(sj.sam(RHO), optax.sgd(LR)),
                    {"kernel": False, "bias": True})
  with pytest.raises(ValueError, match=r"sj.sam\(..., mask=mask\)") as e:
    Q.run(tx, 1)
  assert "\n" not in str(e.value)
