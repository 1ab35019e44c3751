"""A tiny classification problem shared by the tests of every transformation."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import sharpjax as sj

NUM_CLASSES = 3
NUM_FEATURES = 5


def tiny_params(dtype=jnp.float32, seed: int = 0) -> dict[str, Any]:
  """A two-layer MLP in Flax's naming (kernel/bias)."""
  k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
  return {
      "dense1": {
          "kernel": (0.5 * jax.random.normal(k1, (NUM_FEATURES, 8))).astype(dtype),
          "bias": jnp.full((8,), 0.1, dtype),
      },
      "dense2": {
          "kernel": (0.5 * jax.random.normal(k2, (8, NUM_CLASSES))).astype(dtype),
          "bias": jnp.zeros((NUM_CLASSES,), dtype),
      },
  }


def tiny_batch(size: int = 16, seed: int = 1, num_examples: int = 64):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(size, NUM_FEATURES)).astype(np.float32)
  y = (x[:, 0] > 0).astype(np.int32) + (x[:, 1] > 0.5).astype(np.int32)
  ids = rng.choice(num_examples, size=size, replace=False).astype(np.int32)
  return {"x": jnp.asarray(x), "y": jnp.asarray(y), "ids": jnp.asarray(ids)}


def apply(params, x):
  h = jnp.tanh(x.astype(params["dense1"]["kernel"].dtype) @ params["dense1"]["kernel"]
               + params["dense1"]["bias"])
  return h @ params["dense2"]["kernel"] + params["dense2"]["bias"]


def loss_fn(params, batch):
  """Per-example cross-entropy, shape [B]."""
  logits = apply(params, batch["x"]).astype(jnp.float32)
  return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])


def update_kwargs(params, batch) -> dict[str, Any]:
  """Every extra argument any sharpjax transformation may need.

  Transformations ignore what they do not use, so one call serves them all.
  """
  return dict(
      loss_fn=loss_fn,
      batch=batch,
      logits=apply(params, batch["x"]).astype(jnp.float32),
      ids=batch["ids"],
      value=jnp.mean(loss_fn(params, batch)),
      # The clean gradient, for the scale-gradient filters of sharpjax.quant.
      task_grads=jax.grad(lambda p: jnp.mean(loss_fn(p, batch)))(params),
  )


def clean_grads(params, batch, opt_state=None):
  """Gradient of the mean loss, plus the SAF/MESA penalty if ``opt_state`` has
  a trajectory regularizer."""

  def mean_loss(p):
    loss = jnp.mean(loss_fn(p, batch))
    if opt_state is not None and sj.find_trajectory_state(opt_state):
      loss += sj.trajectory_penalty(
          opt_state, apply(p, batch["x"]).astype(jnp.float32), batch["ids"],
          teacher_fn=lambda teacher_params, _: apply(teacher_params,
                                                     batch["x"]))
    return loss

  return jax.grad(mean_loss)(params)


def train_step(tx, params, opt_state, batch):
  """One full step of ``tx`` (a chain ending in a base optimizer)."""
  grads = clean_grads(params, batch, opt_state)
  updates, opt_state = tx.update(
      grads, opt_state, params, **update_kwargs(params, batch)
  )
  return optax.apply_updates(params, updates), opt_state
