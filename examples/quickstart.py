"""SGD against SAM on a small synthetic problem, in plain JAX + optax.

The library's basic contract written out by hand: a per-example loss, the
clean gradient, and one ``tx.update`` call per step. It runs in well under a
minute on a laptop CPU.
"""

import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import sharpjax as sj


def make_data(n, seed, noise=0.2):
  """Two interleaved spirals in 2D with a fraction of flipped labels."""
  rng = np.random.default_rng(seed)
  t = rng.uniform(0.5, 3.0 * np.pi, n)
  y = rng.integers(0, 2, n)
  r = t / (3.0 * np.pi)
  x = np.stack([r * np.cos(t + np.pi * y), r * np.sin(t + np.pi * y)], 1)
  x += 0.03 * rng.normal(size=x.shape)
  flip = rng.random(n) < noise
  y_noisy = np.where(flip, 1 - y, y)
  return {"x": jnp.asarray(x, jnp.float32), "y": jnp.asarray(y_noisy)}, y


def init(key, sizes=(2, 64, 64, 2)):
  params = []
  for k, (m, n) in zip(jax.random.split(key, len(sizes) - 1),
                       zip(sizes[:-1], sizes[1:])):
    params.append({"kernel": jax.random.normal(k, (m, n)) * np.sqrt(2.0 / m),
                   "bias": jnp.zeros(n)})
  return params


def apply(params, x):
  for layer in params[:-1]:
    x = jax.nn.relu(x @ layer["kernel"] + layer["bias"])
  return x @ params[-1]["kernel"] + params[-1]["bias"]


def loss_fn(params, batch):  # per-example losses, shape [B]
  return optax.softmax_cross_entropy_with_integer_labels(
      apply(params, batch["x"]), batch["y"])


def train(tx, train_set, steps=600, batch_size=64, seed=0):
  params = init(jax.random.PRNGKey(seed))
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, batch):
    loss, grads = jax.value_and_grad(lambda p: loss_fn(p, batch).mean())(params)
    updates, opt_state = tx.update(grads, opt_state, params, loss_fn=loss_fn,
                                   batch=batch, value=loss)
    return optax.apply_updates(params, updates), opt_state, loss

  rng = np.random.default_rng(seed)
  n = train_set["x"].shape[0]
  start = time.perf_counter()
  for _ in range(steps):
    idx = rng.choice(n, batch_size, replace=False)
    params, opt_state, loss = step(params, opt_state,
                                   jax.tree.map(lambda a: a[idx], train_set))
  jax.block_until_ready(params)
  return params, opt_state, float(loss), time.perf_counter() - start


def accuracy(params, x, y):
  return float(jnp.mean(jnp.argmax(apply(params, x), -1) == y))


def main():
  train_set, _ = make_data(512, seed=0)
  test_set, test_clean = make_data(2000, seed=1, noise=0.0)
  base = lambda: optax.sgd(0.05, momentum=0.9)
  methods = {
      "sgd": base(),
      "sam": optax.chain(sj.sam(rho=0.05), base()),
  }
  print(f"{'method':<6} {'test acc':>9} {'train loss':>11} {'seconds':>8}")
  for name, tx in methods.items():
    accs, losses, secs = [], [], []
    for seed in range(3):
      params, opt_state, loss, seconds = train(tx, train_set, seed=seed)
      accs.append(accuracy(params, test_set["x"], test_clean))
      losses.append(loss)
      secs.append(seconds)
    print(f"{name:<6} {np.mean(accs):9.3f} {np.mean(losses):11.3f} "
          f"{np.mean(secs):8.2f}")
    if name != "sgd":
      d = sj.diagnostics(opt_state)
      print(f"       last step: |g|={float(d['grad_norm']):.3f} "
            f"perturbed loss={float(d['perturbed_loss']):.3f} "
            f"clean loss={float(d['clean_loss']):.3f} "
            f"cos={float(d['cosine']):.3f}")


if __name__ == "__main__":
  main()
