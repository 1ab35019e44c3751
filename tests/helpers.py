"""The test problems shared by the tests of every transformation: a tiny
classification MLP and the quadratic of the SAM-family references."""

from __future__ import annotations

import dataclasses
import re
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


# ---------------------------------------------------------------------------
# The quadratic test problem of the SAM-family references.
# ---------------------------------------------------------------------------


def taken(g):
  """A gradient as the pass record update's point_passes= holds."""
  return sj.PerturbedPass(None, g, None, None)


def unit(v):
  """``v / |v|``, and 0 for a zero vector (numpy)."""
  n = np.linalg.norm(v)
  return v / n if n > 0 else np.zeros_like(v)


def reject(a, b):
  """The component of ``a`` orthogonal to ``b`` (numpy)."""
  return a - (a @ unit(b)) * unit(b)


@dataclasses.dataclass(frozen=True, eq=False)
class Quadratic:
  r"""Per-example loss :math:`\ell_i(w) = \frac12 (w - c_i)^T A (w - c_i)`.

  Every gradient has a closed form: the gradient of the mean loss over a set
  S of examples is :math:`A (w - \bar c_S)`, so the numpy recursions of the
  tests are written from the papers' update rules, not from the library's
  code. The flat vector ``w`` is held as the pytree ``{"kernel", "bias"}``:
  the first ``prod(kernel_shape)`` coordinates, reshaped, then the rest.

  Attributes:
    a: the symmetric positive definite matrix ``A``, [d, d].
    centres: the examples ``c_i``, [n, d]; ``batch`` holds them as ``"c"``.
    w0: the starting point, [d].
    kernel_shape: the shape of the ``kernel`` leaf.
  """

  a: np.ndarray
  centres: np.ndarray
  w0: np.ndarray
  kernel_shape: tuple[int, ...] = (2,)

  @property
  def batch(self) -> dict[str, jax.Array]:
    return {"c": jnp.asarray(self.centres, jnp.float32)}

  def loss(self, params, batch):
    """Per-example losses [B] of ``batch["c"]`` at ``params``."""
    w = jnp.concatenate([jnp.ravel(params["kernel"]),
                         params["bias"]]).astype(jnp.float32)
    d = w[None, :] - batch["c"]
    return 0.5 * jnp.einsum("bi,ij,bj->b", d, jnp.asarray(self.a, jnp.float32),
                            d)

  def params(self, w=None, dtype=jnp.float32):
    w = self.w0 if w is None else np.asarray(w)
    n = int(np.prod(self.kernel_shape))
    return {"kernel": jnp.asarray(w[:n].reshape(self.kernel_shape), dtype),
            "bias": jnp.asarray(w[n:], dtype)}

  @staticmethod
  def flat(tree) -> np.ndarray:
    """A ``{"kernel", "bias"}`` pytree as one float64 vector."""
    return np.concatenate([np.asarray(tree["kernel"], np.float64).ravel(),
                           np.asarray(tree["bias"], np.float64)])

  def run(self, tx, steps, *, params=None, batch=None, loss_fn=None,
          jit=True, value=False):
    """``steps`` steps of ``tx`` (a chain ending in a base optimizer) from
    ``w0``; returns ``(params, state)``. ``value=True`` passes the clean mean
    loss as ``value=``."""
    params = self.params() if params is None else params
    batch = self.batch if batch is None else batch
    loss_fn = self.loss if loss_fn is None else loss_fn
    state = tx.init(params)

    def step(params, state):
      grads = jax.grad(lambda p: loss_fn(p, batch).mean())(params)
      kwargs = dict(loss_fn=loss_fn, batch=batch)
      if value:
        kwargs["value"] = loss_fn(params, batch).mean()
      updates, state = tx.update(grads, state, params, **kwargs)
      return optax.apply_updates(params, updates), state

    step = jax.jit(step) if jit else step
    for _ in range(steps):
      params, state = step(params, state)
    return params, state

  # numpy references.

  def grad(self, w, centres=None):
    """The gradient of the mean loss over ``centres`` (default: all)."""
    centres = self.centres if centres is None else centres
    return self.a @ (w - centres.mean(0))

  def sam_grad(self, w, rho, centres=None):
    """SAM's perturbed gradient over ``centres``."""
    return self.grad(w + rho * unit(self.grad(w, centres)), centres)

  def losses(self, w, centres=None):
    """The per-example losses over ``centres`` (default: all)."""
    centres = self.centres if centres is None else centres
    d = w[None, :] - centres
    return 0.5 * np.einsum("bi,ij,bj->b", d, self.a, d)

  def descend(self, direction_fn, steps, *, lr=0.1, momentum=0.9):
    """Heavy-ball SGD (optax.sgd's form) from ``w0`` on the directions
    ``direction_fn(t, w)``; returns the last ``w``."""
    w, m = self.w0.copy(), np.zeros_like(self.w0)
    for t in range(steps):
      m = momentum * m + direction_fn(t, w)
      w = w - lr * m
    return w


def with_sgd(tx, lr=0.1, momentum=0.9):
  """``tx`` followed by ``optax.sgd`` (heavy ball unless momentum is 0)."""
  return optax.chain(tx, optax.sgd(lr, momentum=momentum or None))


def jit_update(tx, grads, state, params, **kwargs):
  """One jit-compiled ``tx.update`` (eager dispatch is slower to test)."""
  return jax.jit(lambda g, s, p: tx.update(g, s, p, **kwargs))(
      grads, state, params)


# The 3-parameter problem of the SAM, ASAM and SAGM references.
QUADRATIC_3 = Quadratic(
    a=np.array([[3.0, 0.5, 0.0], [0.5, 1.0, 0.2], [0.0, 0.2, 0.5]]),
    centres=np.array([[1.0, -2.0, 0.5], [0.0, 1.0, 1.5], [2.0, 0.5, -1.0],
                      [-1.0, 0.0, 0.0]]),
    w0=np.array([0.3, 0.8, -0.6]),
)

# The 4-parameter problem of the GSAM, LookSAM, F-SAM and mSAM references.
QUADRATIC_4 = Quadratic(
    a=np.array([[3.0, 0.5, 0.0, 0.2],
                [0.5, 1.0, 0.2, 0.0],
                [0.0, 0.2, 0.5, 0.1],
                [0.2, 0.0, 0.1, 2.0]]),
    centres=np.array([[1.0, -2.0, 0.5, 0.3],
                      [0.0, 1.0, 1.5, -1.0],
                      [2.0, 0.5, -1.0, 0.7],
                      [-1.0, 0.0, 0.0, 2.0]]),
    w0=np.array([0.3, 0.8, -0.6, 0.1]),
)


# ---------------------------------------------------------------------------
# A one-layer convolutional model, to count the passes a compiled step holds.
# ---------------------------------------------------------------------------


def conv_loss(params, batch):
  """Per-example squared error of one 1D convolution, shape [B].

  The input needs no gradient, so a forward pass is one convolution and a
  backward pass one more (the kernel's gradient).
  """
  y = jax.lax.conv_general_dilated(batch["x"], params["kernel"], (1,), "SAME",
                                   dimension_numbers=("NWC", "WIO", "NWC"))
  target = batch["y"][:, None, None].astype(jnp.float32)
  return jnp.mean((y + params["bias"] - target) ** 2, axis=(1, 2))


def conv_problem(size: int = 16):
  params = {"kernel": jnp.full((3, 2, 4), 0.1), "bias": jnp.zeros(4)}
  batch = {"x": jax.random.normal(jax.random.key(0), (size, 10, 2)),
           "y": jnp.arange(size, dtype=jnp.float32),
           "ids": jnp.arange(size)}
  return params, batch


def compiled_convolutions(tx, params, batch, loss_fn=conv_loss):
  """The output shapes of the convolutions in a compiled training step.

  The step computes the clean loss and gradient, as a caller does, and calls
  ``tx.update`` with them; what XLA keeps after merging and removing dead code
  is what the step costs.
  """
  def step(params, state, batch):
    loss, grads = jax.value_and_grad(lambda p: loss_fn(p, batch).mean())(
        params)
    updates, state = tx.update(grads, state, params, loss_fn=loss_fn,
                               batch=batch, value=loss)
    return optax.apply_updates(params, updates), state

  text = jax.jit(step).lower(params, tx.init(params), batch).compile(
      ).as_text()
  return re.findall(r"(\w+\[[\d,]*\])\{[^}]*\} convolution\(", text)


def program_flops(trainer, state, placed, full_step: bool) -> float:
  """XLA's FLOP count of one of a host-scheduled trainer's two programs,
  compiled optimized as ``Trainer.step_cost`` compiles them."""
  from sharpjax import training  # pylint: disable=g-import-not-at-top
  with training._trainer._optimized():  # pylint: disable=protected-access
    compiled = trainer._step.lower(state, placed, full_step).compile()  # pylint: disable=protected-access
  return training._trainer._cost_of(compiled)["flops"]  # pylint: disable=protected-access


def own_loop_step(tx, loss_fn):
  """A jitted step of ``tx`` in one's own loop, as the docs write it: the mean
  gradient of ``loss_fn(params, batch)`` (per-example losses), then
  ``tx.update`` with ``loss_fn=`` and ``batch=``.

  Returns ``step(params, opt_state, batch) -> (params, opt_state)``.
  """
  @jax.jit
  def step(params, opt_state, batch):
    grads = jax.grad(lambda p: loss_fn(p, batch).mean())(params)
    updates, opt_state = tx.update(grads, opt_state, params, loss_fn=loss_fn,
                                   batch=batch)
    return optax.apply_updates(params, updates), opt_state

  return step
