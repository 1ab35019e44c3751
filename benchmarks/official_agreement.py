"""sharpjax against the official PyTorch code, step by step.

For each method, the official optimizer (or, for SAF and MESA, whose official
code is a training loop, that loop's rule written again here in PyTorch) and
sharpjax's transformation train the same tiny MLP (8 inputs, 16 tanh units, 3
classes: 195 parameters) from the same weights, on the same batches, with the
same base optimizer (SGD, learning rate 0.1, momentum 0.9), in float32. After
every step the script prints the largest absolute difference between the two
sets of parameters.

Nothing is shipped or downloaded: the official repositories are read from a
folder the user fills, one sub-folder per repository named as on GitHub, for
example::

    official/sam                       github.com/davda54/sam
    official/ASAM                      github.com/SamsungLabs/ASAM
    official/GSAM                      github.com/juntang-zhuang/GSAM
    official/SAGM                      github.com/Wang-pengfei/SAGM
    official/F-SAM                     github.com/nblt/F-SAM
    official/Efficient_SAM             github.com/dydjw9/Efficient_SAM
    official/AUSAM                     github.com/ajiaaa/AUSAM
    official/LookSAM                   github.com/Leminhbinh0209/LookSAM
    official/LookSAM-rollovd           github.com/rollovd/LookSAM
    official/Sparse-Sharpness-Aware-Minimization
                                       github.com/Mi-Peng/Sparse-Sharpness-Aware-Minimization
    official/SAF                       github.com/AngusDujw/SAF (SAF and MESA)

(``git clone https://github.com/davda54/sam official/sam``, and so on). The
official classes are imported from those files as they are (F-SAM's class is
read out of its ``utils.py``, whose other imports need torchvision and timm);
a method whose folder is missing is reported as skipped. PyTorch is needed
(``pip install torch``); it is not a dependency of sharpjax.

    python benchmarks/official_agreement.py --official official
    python benchmarks/official_agreement.py --official official --methods sam gsam --steps 20

Settings where the two sides cannot draw the same random numbers are chosen
so that no draw matters: ESAM with ``beta=1`` (every tensor perturbed) and
AUSAM with ``keep=1`` (the whole batch, in an order that does not change the
mean). Each row names them.

Besides one row per method, a few rows isolate a documented difference by
changing one thing and showing that the rest agrees: ``ssam-default-timing``
(sharpjax's default mask timing instead of the official one),
``ssam-clean-fisher`` (``.grad`` cleared before the official mask refresh),
``looksam-created-state`` (the port's state entry created before its first
step), ``saf-one-for-one`` (``start_epoch = kl_start_epoch``, the mapping
that starts the penalty an epoch early) and ``mesa-ema-order`` (the official
EMA update moved before the optimizer step, sharpjax's order). The results
are described in the documentation page "Agreement with the official code".
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import datetime
import io
import json
import pathlib
import subprocess
import sys
import types
import warnings
from typing import Any, Callable

import numpy as np

import _common

D_IN, D_HIDDEN, D_OUT = 8, 16, 3
LR, MOMENTUM = 0.1, 0.9
N_EXAMPLES, BATCH = 32, 16


@dataclasses.dataclass
class Method:
  name: str
  folder: str
  repository: str
  settings: str
  run: Callable[..., tuple[list[float], str]]  # (differences per step, note)


# ---------------------------------------------------------------------------
# The problem: weights, data, batches (numpy; both sides read the same arrays).
# ---------------------------------------------------------------------------


def init_weights(seed: int) -> dict[str, dict[str, np.ndarray]]:
  """PyTorch layout: weight [out, in]."""
  rng = np.random.default_rng(seed)

  def layer(n_in, n_out):
    bound = 1.0 / np.sqrt(n_in)
    return {"weight": rng.uniform(-bound, bound, (n_out, n_in)).astype(
                np.float32),
            "bias": rng.uniform(-bound, bound, (n_out,)).astype(np.float32)}

  return {"fc1": layer(D_IN, D_HIDDEN), "fc2": layer(D_HIDDEN, D_OUT)}


def make_data(seed: int, num_examples: int = N_EXAMPLES):
  rng = np.random.default_rng(seed + 1)
  x = rng.normal(size=(num_examples, D_IN)).astype(np.float32)
  teacher = rng.normal(size=(D_IN, D_OUT))
  y = np.argmax(x @ teacher + 0.5 * rng.normal(size=(num_examples, D_OUT)),
                axis=1).astype(np.int64)
  return x, y


def make_batches(seed: int, steps: int, batch: int = BATCH,
                 num_examples: int = N_EXAMPLES):
  """Each epoch a new permutation, cut into batches (dataset ids kept)."""
  rng = np.random.default_rng(seed + 2)
  per_epoch = num_examples // batch
  out = []
  while len(out) < steps:
    order = rng.permutation(num_examples)
    out.extend(order[i * batch:(i + 1) * batch] for i in range(per_epoch))
  return out[:steps], per_epoch


# ---------------------------------------------------------------------------
# The PyTorch side.
# ---------------------------------------------------------------------------


def torch_model(weights):
  import torch  # pylint: disable=g-import-not-at-top

  class MLP(torch.nn.Module):

    def __init__(self):
      super().__init__()
      self.fc1 = torch.nn.Linear(D_IN, D_HIDDEN)
      self.fc2 = torch.nn.Linear(D_HIDDEN, D_OUT)

    def forward(self, x):
      return self.fc2(torch.tanh(self.fc1(x)))

  model = MLP()
  with torch.no_grad():
    for name, layer in weights.items():
      for field, value in layer.items():
        getattr(getattr(model, name), field).copy_(torch.from_numpy(value))
  return model


def torch_weights(model) -> np.ndarray:
  return np.concatenate([p.detach().numpy().ravel()
                         for _, p in sorted(model.named_parameters())])


def torch_sgd(params):
  import torch  # pylint: disable=g-import-not-at-top
  return torch.optim.SGD(params, lr=LR, momentum=MOMENTUM)


@contextlib.contextmanager
def isolated_imports(*paths: pathlib.Path):
  """``paths`` first on sys.path; the modules imported meanwhile forgotten
  afterwards (the repositories reuse names such as ``utils`` and ``sam``)."""
  saved_path, saved_modules = list(sys.path), dict(sys.modules)
  sys.path[:0] = [str(p) for p in paths]
  try:
    yield
  finally:
    sys.path[:] = saved_path
    for name in list(sys.modules):
      if name not in saved_modules:
        del sys.modules[name]


def class_from_source(path: pathlib.Path, name: str, namespace: dict) -> Any:
  """The class ``name`` of the file ``path``, executed alone in
  ``namespace`` (for a file whose module-level imports cannot be met)."""
  tree = ast.parse(path.read_text())
  node = next(n for n in tree.body
              if isinstance(n, ast.ClassDef) and n.name == name)
  scope = dict(namespace)
  exec(compile(ast.Module([node], []), str(path), "exec"), scope)  # pylint: disable=exec-used
  return scope[name]


# ---------------------------------------------------------------------------
# The sharpjax side.
# ---------------------------------------------------------------------------


def jax_apply(params, x):
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  h = jnp.tanh(x @ params["fc1"]["weight"].T + params["fc1"]["bias"])
  return h @ params["fc2"]["weight"].T + params["fc2"]["bias"]


def jax_losses(params, batch):
  import optax  # pylint: disable=g-import-not-at-top
  return optax.softmax_cross_entropy_with_integer_labels(
      jax_apply(params, batch["x"]), batch["y"])


def jax_weights(params) -> np.ndarray:
  return np.concatenate([np.asarray(params[layer][field]).ravel()
                         for layer, field in sorted(
                             (l, f) for l in params for f in params[l])])


def jax_run(tx, weights, batches_of_arrays):
  """``tx`` (a SAM-family transformation, then SGD) over the batches;
  yields the flat parameters after every step."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  params = jax.tree.map(jnp.asarray, weights)
  state = tx.init(params)

  @jax.jit
  def step(params, state, batch):
    grads = jax.grad(lambda p: jax_losses(p, batch).mean())(params)
    updates, state = tx.update(grads, state, params, loss_fn=jax_losses,
                               batch=batch)
    return optax.apply_updates(params, updates), state

  for batch in batches_of_arrays:
    params, state = step(params, state, batch)
    yield jax_weights(params), state


def chain_sgd(tx):
  import optax  # pylint: disable=g-import-not-at-top
  return optax.chain(tx, optax.sgd(LR, momentum=MOMENTUM))


# ---------------------------------------------------------------------------
# One runner per method: (official folder, seed, steps) -> differences.
# ---------------------------------------------------------------------------


def _setup(seed, steps, batch=BATCH, num_examples=N_EXAMPLES):
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  torch.manual_seed(seed)
  weights = init_weights(seed)
  x, y = make_data(seed, num_examples)
  index, per_epoch = make_batches(seed, steps, batch, num_examples)
  torch_batches = [(torch.from_numpy(x[i]), torch.from_numpy(y[i]),
                    torch.from_numpy(i)) for i in index]
  jax_batches = [{"x": jnp.asarray(x[i]), "y": jnp.asarray(y[i], jnp.int32),
                  "ids": jnp.asarray(i, jnp.int32)} for i in index]
  return weights, torch_batches, jax_batches, per_epoch, (x, y)


def _two_pass(model, first, second, xb, yb, loss):
  """davda54's protocol: backward, first_step, backward, second_step."""
  loss(model(xb), yb).backward()
  first(zero_grad=True)
  loss(model(xb), yb).backward()
  second(zero_grad=True)


def _compare(torch_after_step, jax_iter, steps):
  diffs = []
  for t in range(steps):
    ours, _ = next(jax_iter)
    diffs.append(float(np.abs(torch_after_step(t) - ours).max()))
  return diffs


def run_sam(root, seed, steps):
  import torch  # pylint: disable=g-import-not-at-top
  import sharpjax as sj  # pylint: disable=g-import-not-at-top
  with isolated_imports(root):
    official = __import__("sam").SAM
  weights, tb, jb, _, _ = _setup(seed, steps)
  model = torch_model(weights)
  opt = official(model.parameters(), torch.optim.SGD, rho=0.05, lr=LR,
                 momentum=MOMENTUM)
  ce = torch.nn.CrossEntropyLoss()

  def step(t):
    xb, yb, _ = tb[t]
    _two_pass(model, opt.first_step, opt.second_step, xb, yb, ce)
    return torch_weights(model)

  return _compare(step, jax_run(chain_sgd(sj.sam(0.05)), weights, jb),
                  steps), ""


def run_asam(root, seed, steps):
  import torch  # pylint: disable=g-import-not-at-top
  import sharpjax as sj  # pylint: disable=g-import-not-at-top
  with isolated_imports(root):
    official = __import__("asam").ASAM
  weights, tb, jb, _, _ = _setup(seed, steps)
  model = torch_model(weights)
  base = torch_sgd(model.parameters())
  opt = official(base, model, rho=0.5, eta=0.01)
  ce = torch.nn.CrossEntropyLoss()

  def step(t):
    xb, yb, _ = tb[t]
    ce(model(xb), yb).backward()
    opt.ascent_step()
    ce(model(xb), yb).backward()
    opt.descent_step()
    return torch_weights(model)

  # The official code rescales the parameters whose name holds "weight".
  mask = {layer: {"weight": True, "bias": False} for layer in weights}
  tx = chain_sgd(sj.asam(0.5, eta=0.01, adaptive_mask=mask))
  return _compare(step, jax_run(tx, weights, jb), steps), ""


class _Constant:
  """A rho scheduler that always gives ``value`` (``step()`` as theirs)."""

  def __init__(self, value):
    self.value = value

  def step(self):
    return self.value


def _closure_optimizer_run(official_cls, tx, seed, steps, **kwargs):
  """GSAM and SAGM: ``set_closure`` then ``step()``."""
  import torch  # pylint: disable=g-import-not-at-top
  weights, tb, jb, _, _ = _setup(seed, steps)
  model = torch_model(weights)
  base = torch_sgd(model.parameters())
  opt = official_cls(model.parameters(), base, model,
                     rho_scheduler=_Constant(0.05), **kwargs)
  ce = torch.nn.CrossEntropyLoss()

  def step(t):
    xb, yb, _ = tb[t]
    opt.set_closure(ce, xb, yb)
    opt.step()
    opt.zero_grad()
    return torch_weights(model)

  return _compare(step, jax_run(tx, weights, jb), steps)


def run_gsam(root, seed, steps):
  import sharpjax as sj  # pylint: disable=g-import-not-at-top
  with isolated_imports(root):
    official = __import__("gsam").GSAM
  diffs = _closure_optimizer_run(official, chain_sgd(sj.gsam(0.05, 0.1)),
                                 seed, steps, gsam_alpha=0.1)
  return diffs, ""


def run_sagm(root, seed, steps):
  import sharpjax as sj  # pylint: disable=g-import-not-at-top
  with isolated_imports(root / "domainbed"):
    official = __import__("sagm").SAGM
  diffs = _closure_optimizer_run(official, chain_sgd(sj.sagm(0.05, 0.01)),
                                 seed, steps, alpha=0.01)
  return diffs, ""


def run_fsam(root, seed, steps):
  import torch  # pylint: disable=g-import-not-at-top
  import sharpjax as sj  # pylint: disable=g-import-not-at-top
  official = class_from_source(root / "utils.py", "FriendlySAM",
                               {"torch": torch})
  weights, tb, jb, _, _ = _setup(seed, steps)
  model = torch_model(weights)
  opt = official(model.parameters(), torch.optim.SGD, rho=0.05, sigma=1.0,
                 lmbda=0.6, lr=LR, momentum=MOMENTUM)
  ce = torch.nn.CrossEntropyLoss()

  def step(t):
    xb, yb, _ = tb[t]
    _two_pass(model, opt.first_step, opt.second_step, xb, yb, ce)
    return torch_weights(model)

  tx = chain_sgd(sj.fsam(0.05, sigma=1.0, lam=0.6))
  return _compare(step, jax_run(tx, weights, jb), steps), ""


def run_esam(root, seed, steps):
  import torch  # pylint: disable=g-import-not-at-top
  import sharpjax as sj  # pylint: disable=g-import-not-at-top
  with isolated_imports(root / "utils"):
    official = __import__("Esam").ESAM
  weights, tb, jb, _, _ = _setup(seed, steps)
  model = torch_model(weights)
  base = torch_sgd(model.parameters())
  gamma = 0.5
  opt = official(model.parameters(), base, rho=0.05, beta=1.0, gamma=gamma)
  per_example = torch.nn.CrossEntropyLoss(reduction="none")

  def step(t):
    xb, yb, _ = tb[t]
    opt.paras = (xb, yb, per_example, model, lambda loss: loss.backward())
    opt.step()
    return torch_weights(model)

  # The official selection keeps the examples whose loss rose strictly more
  # than the int(gamma B)-th largest rise: int(gamma B) - 1 of them.
  kept = int(gamma * BATCH) - 1
  tx = chain_sgd(sj.esam(0.05, beta=1.0, gamma=kept / BATCH))
  note = f"sharpjax gamma={kept}/{BATCH} keeps the official count"
  return _compare(step, jax_run(tx, weights, jb), steps), note


def _looksam_tx(k, granularity):
  import sharpjax as sj  # pylint: disable=g-import-not-at-top
  return chain_sgd(sj.looksam(0.05, k=k, alpha=0.7, granularity=granularity))


def run_looksam(root, seed, steps, k=2, create_state=False):
  import torch  # pylint: disable=g-import-not-at-top
  with isolated_imports(root):
    official = __import__("looksam").LookSAM
  weights, tb, jb, _, _ = _setup(seed, steps)
  model = torch_model(weights)
  base = torch_sgd(model.parameters())
  opt = official(base, model=model, rho=0.05, alpha=0.7)
  if create_state:
    # When ascent_step creates state["old_grad"] it stores a copy of the
    # weights, and fills a different tensor with the gradient: the first
    # decomposition projects on the weights. Creating the entry beforehand
    # makes the first one use the gradient too.
    for name, p in model.named_parameters():
      opt.state[name]["old_grad"] = torch.zeros_like(p)
  ce = torch.nn.CrossEntropyLoss()

  def step(t):  # the repository's README loop
    xb, yb, _ = tb[t]
    ce(model(xb), yb).backward()
    if t % k == 0:
      opt.ascent_step()
      ce(model(xb), yb).backward()
    opt.decompose_grad(t % k == 0)
    if t % k == 0:
      opt.descent_step()
    base.step()
    base.zero_grad()
    return torch_weights(model)

  note = f"k={k}" + (", state['old_grad'] created before the first step"
                     if create_state else "")
  return _compare(step, jax_run(_looksam_tx(k, "global"), weights, jb),
                  steps), note


def run_looksam_created_state(root, seed, steps):
  return run_looksam(root, seed, steps, create_state=True)


def run_looksam_rollovd(root, seed, steps, k=2):
  import torch  # pylint: disable=g-import-not-at-top
  with isolated_imports(root):
    official = __import__("looksam").LookSAM
  weights, tb, jb, _, _ = _setup(seed, steps)
  model = torch_model(weights)
  ce = torch.nn.CrossEntropyLoss()
  opt = official(k=k, alpha=0.7, model=model, base_optimizer=torch.optim.SGD,
                 criterion=ce, rho=0.05, lr=LR, momentum=MOMENTUM)

  def step(t):  # the class docstring's loop
    xb, yb, _ = tb[t]
    ce(model(xb), yb).backward()
    opt.step(t=t, samples=xb, targets=yb, zero_sam_grad=True, zero_grad=True)
    return torch_weights(model)

  return _compare(step, jax_run(_looksam_tx(k, "per_tensor"), weights, jb),
                  steps), f"k={k}, per-tensor"


def run_ausam(root, seed, steps):
  import torch  # pylint: disable=g-import-not-at-top
  import sharpjax as sj  # pylint: disable=g-import-not-at-top
  with isolated_imports(root / "AUSAM"):
    official = __import__("sam.ausam", fromlist=["AUSAM"]).AUSAM
  weights, tb, jb, per_epoch, _ = _setup(seed, steps)
  model = torch_model(weights)
  base = torch_sgd(model.parameters())
  opt = official(model.parameters(), base, rho=0.05, rho_scheduler=None,
                 adaptive=False, storage_size=N_EXAMPLES, alpha=1.0, beta=0.0)
  per_example = torch.nn.CrossEntropyLoss(reduction="none")
  args = types.SimpleNamespace(fmin=0.1)

  def step(t):  # the loop of AUSAM/train.py
    xb, yb, index = tb[t]
    epoch = t // per_epoch
    tf = opt.sampledata_index(args, epoch, index, 0.5)
    before = per_example(model(xb[tf]), yb[tf])
    before.mean().backward()
    opt.first_step(zero_grad=True)
    after = per_example(model(xb[tf]), yb[tf])
    after.mean().backward()
    opt.second_step_without_norm(zero_grad=True)
    opt.impt_roc(epoch, index, tf, torch.abs(after - before).detach())
    return torch_weights(model)

  tx = chain_sgd(sj.ausam(0.05, keep=1.0, num_examples=N_EXAMPLES))
  diffs, ours = [], jax_run(tx, weights, jb)
  for t in range(steps):
    got, state = next(ours)
    diffs.append(float(np.abs(step(t) - got).max()))
  scores = np.asarray(state[0].scores)
  score_diff = float(np.abs(opt.impt[:, 2].numpy() - scores).max())
  return diffs, f"keep=1; score table differs by {score_diff:.1e}"


def run_ssam(root, seed, steps, refresh_at="next_step", clear_grads=False):
  import torch  # pylint: disable=g-import-not-at-top
  import sharpjax as sj  # pylint: disable=g-import-not-at-top
  with isolated_imports(root):
    official = __import__("solver.sam", fromlist=["SSAMF"]).SSAMF
  # Full-batch steps, Fisher samples = the whole training set: the official
  # samples (the data set, shuffled) and sharpjax's (the batch) are the same
  # examples.
  n = N_EXAMPLES
  weights, tb, jb, _, (x, y) = _setup(seed, steps, batch=n, num_examples=n)
  model = torch_model(weights)
  base = torch_sgd(model.parameters())
  update_freq = 2
  opt = official(model.parameters(), base, rho=0.05, sparsity=0.5,
                 num_samples=n, update_freq=update_freq)
  ce = torch.nn.CrossEntropyLoss()
  train_data = torch.utils.data.TensorDataset(torch.from_numpy(x),
                                              torch.from_numpy(y))
  logger = types.SimpleNamespace(log=lambda *a, **k: None)
  if clear_grads:
    # The official loop calls zero_grad() before the clean backward, so at
    # the refresh .grad still holds the step's perturbed gradient, which the
    # first Fisher sample adds to its own. Clearing it first isolates that.
    refresh = opt.update_mask

    def update_mask(*a, **k):
      opt.zero_grad()
      return refresh(*a, **k)

    opt.update_mask = update_mask

  def step(t):
    xb, yb, _ = tb[t]

    def closure():
      loss = ce(model(xb), yb)
      loss.backward()
      return loss

    ce(model(xb), yb).backward()
    with _cpu_only_fisher(torch):
      opt.step(closure, model=model, epoch=t, batch_idx=0,
               train_data=train_data, logger=logger)
    opt.zero_grad()
    return torch_weights(model)

  tx = chain_sgd(sj.ssam(0.05, sparsity=0.5, num_fisher_samples=n,
                         update_every=update_freq, refresh_at=refresh_at))
  note = f"update every {update_freq} steps, refresh_at={refresh_at!r}"
  if clear_grads:
    note += ", .grad cleared before the official refresh"
  return _compare(step, jax_run(tx, weights, jb), steps), note


def run_ssam_default_timing(root, seed, steps):
  return run_ssam(root, seed, steps, refresh_at="this_step")


def run_ssam_clean_fisher(root, seed, steps):
  return run_ssam(root, seed, steps, clear_grads=True)


@contextlib.contextmanager
def _cpu_only_fisher(torch):
  """The official mask refresh calls ``.cuda()`` and a 4-worker loader: on a
  CPU ``.cuda()`` is the identity and the loader runs in-process."""
  cuda, loader = torch.Tensor.cuda, torch.utils.data.DataLoader

  def in_process(*args, **kwargs):
    kwargs["num_workers"] = 0
    return loader(*args, **kwargs)

  torch.Tensor.cuda = lambda self, *a, **k: self
  torch.utils.data.DataLoader = in_process
  try:
    yield
  finally:
    torch.Tensor.cuda, torch.utils.data.DataLoader = cuda, loader


# SAF and MESA: the official code (SAF_train.py / MESA_train.py, train_one_epoch)
# is a training loop, not an optimizer class. Its rule, written again here:
# the cross-entropy plus, for kl_start_epoch < epoch < kl_end_epoch,
#   reinforce * T^2 * mean_i sum_c KL(softmax(target_i / T) || softmax(z_i / T))
# with F.kl_div on softmax(z / T).log(); SAF's targets are the logits stored
# minus_epoch epochs before (a host array of minus_epoch + 1 slots, written
# before it is read), MESA's the outputs of a timm ModelEmaV2 copy of the model
# (updated after each optimizer step).
TEMPERATURE, STRENGTH, KL_START_EPOCH = 2.0, 0.5, 1


def _kl_term(torch, output, target):
  f = torch.nn.functional
  kl = f.kl_div(f.softmax(output / TEMPERATURE, dim=1).log(),
                f.softmax(target / TEMPERATURE, dim=1),
                reduction="none").sum(-1).mean() * TEMPERATURE**2
  return kl * STRENGTH


def _check_official_loop(root: pathlib.Path, script: str, needle: str):
  """The rule above is read from the official script: refuse to compare with
  a script that no longer holds it."""
  text = (root / script).read_text()
  if needle not in text:
    raise RuntimeError(f"{script} no longer contains {needle!r}; the loop "
                       "written here may be out of date")


def _trajectory_jax_run(tx, weights, jax_batches, penalty_fn):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  params = jax.tree.map(jnp.asarray, weights)
  state = tx.init(params)

  @jax.jit
  def step(params, state, batch):
    def loss(p):
      logits = jax_apply(p, batch["x"])
      ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])
      return ce.mean() + penalty_fn(state, logits, batch), logits

    (_, logits), grads = jax.value_and_grad(loss, has_aux=True)(params)
    updates, state = tx.update(grads, state, params, logits=logits,
                               ids=batch["ids"])
    return optax.apply_updates(params, updates), state

  for batch in jax_batches:
    params, state = step(params, state, batch)
    yield jax_weights(params), state


def run_saf(root, seed, steps, start_epoch=KL_START_EPOCH + 1):
  import torch  # pylint: disable=g-import-not-at-top
  import sharpjax as sj  # pylint: disable=g-import-not-at-top
  _check_official_loop(root, "SAF_train.py",
                       "if epoch > args.kl_start_epoch and epoch < args.kl_end_epoch:")
  minus_epoch = 1
  weights, tb, jb, per_epoch, _ = _setup(seed, steps)
  model = torch_model(weights)
  opt = torch_sgd(model.parameters())
  ce = torch.nn.CrossEntropyLoss()
  train_logits = np.zeros((N_EXAMPLES, minus_epoch + 1, D_OUT), np.float32)

  def step(t):
    xb, yb, index = tb[t]
    epoch, index = t // per_epoch, index.numpy()
    output = model(xb)
    train_logits[index, epoch % (minus_epoch + 1)] = output.detach().numpy()
    loss = ce(output, yb)
    if epoch > KL_START_EPOCH:
      past = torch.tensor(
          train_logits[index, (epoch - minus_epoch) % (minus_epoch + 1)])
      loss = loss + _kl_term(torch, output, past)
    opt.zero_grad()
    loss.backward()
    opt.step()
    return torch_weights(model)

  tx = chain_sgd(sj.saf(num_examples=N_EXAMPLES, num_classes=D_OUT,
                        steps_per_epoch=per_epoch, delay_epochs=minus_epoch,
                        temperature=TEMPERATURE, strength=STRENGTH,
                        start_epoch=start_epoch))
  ours = _trajectory_jax_run(
      tx, weights, jb,
      lambda state, logits, batch: sj.trajectory_penalty(state, logits,
                                                         batch["ids"]))
  note = (f"kl_start_epoch={KL_START_EPOCH}, start_epoch={start_epoch}, "
          f"minus_epoch=delay_epochs={minus_epoch}")
  return _compare(step, ours, steps), note


def run_saf_one_for_one(root, seed, steps):
  return run_saf(root, seed, steps, start_epoch=KL_START_EPOCH)


def run_mesa(root, seed, steps, start_epoch=KL_START_EPOCH + 1,
             decay=0.9998, ema_before_step=False):
  import copy  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import sharpjax as sj  # pylint: disable=g-import-not-at-top
  _check_official_loop(root, "MESA_train.py",
                       "if epoch > args.kl_start_epoch and epoch < args.kl_end_epoch :")
  weights, tb, jb, per_epoch, _ = _setup(seed, steps)
  model = torch_model(weights)
  teacher = copy.deepcopy(model)  # ModelEmaV2: a copy at creation
  opt = torch_sgd(model.parameters())
  ce = torch.nn.CrossEntropyLoss()

  def step(t):
    xb, yb, _ = tb[t]
    epoch = t // per_epoch
    with torch.no_grad():
      teacher_output = teacher(xb)
    output = model(xb)
    loss = ce(output, yb)
    if epoch > KL_START_EPOCH:
      loss = loss + _kl_term(torch, output, teacher_output)
    opt.zero_grad()
    loss.backward()
    if ema_before_step:  # sharpjax's order: fold in this step's weights
      update_teacher()
    opt.step()
    if not ema_before_step:  # ModelEmaV2.update, after the optimizer step
      update_teacher()
    return torch_weights(model)

  @torch.no_grad()
  def update_teacher():
    for e, p in zip(teacher.parameters(), model.parameters()):
      e.copy_(decay * e + (1.0 - decay) * p)

  tx = chain_sgd(sj.mesa(decay=decay, temperature=TEMPERATURE,
                         strength=STRENGTH, start_epoch=start_epoch,
                         steps_per_epoch=per_epoch))
  ours = _trajectory_jax_run(
      tx, weights, jb,
      lambda state, logits, batch: sj.trajectory_penalty(
          state, logits, teacher_fn=lambda p, _: jax_apply(p, batch["x"])))
  note = (f"kl_start_epoch={KL_START_EPOCH}, start_epoch={start_epoch}, "
          f"decay={decay}")
  if ema_before_step:
    note += ", the official EMA update moved before the optimizer step"
  return _compare(step, ours, steps), note


def run_mesa_ema_order(root, seed, steps):
  return run_mesa(root, seed, steps, ema_before_step=True)


METHODS = [
    Method("sam", "sam", "davda54/sam", "rho=0.05", run_sam),
    Method("asam", "ASAM", "SamsungLabs/ASAM", "rho=0.5, eta=0.01", run_asam),
    Method("gsam", "GSAM", "juntang-zhuang/GSAM", "rho=0.05, alpha=0.1",
           run_gsam),
    Method("sagm", "SAGM", "Wang-pengfei/SAGM", "rho=0.05, alpha=0.01",
           run_sagm),
    Method("fsam", "F-SAM", "nblt/F-SAM", "rho=0.05, sigma=1, lambda=0.6",
           run_fsam),
    Method("esam", "Efficient_SAM", "dydjw9/Efficient_SAM",
           "rho=0.05, beta=1, gamma=0.5", run_esam),
    Method("ausam", "AUSAM", "ajiaaa/AUSAM", "rho=0.05, keep=1", run_ausam),
    Method("looksam", "LookSAM", "Leminhbinh0209/LookSAM",
           "rho=0.05, alpha=0.7", run_looksam),
    Method("looksam-created-state", "LookSAM", "Leminhbinh0209/LookSAM",
           "rho=0.05, alpha=0.7", run_looksam_created_state),
    Method("looksam-rollovd", "LookSAM-rollovd", "rollovd/LookSAM",
           "rho=0.05, alpha=0.7", run_looksam_rollovd),
    Method("ssam", "Sparse-Sharpness-Aware-Minimization",
           "Mi-Peng/Sparse-Sharpness-Aware-Minimization",
           "SSAM-F, rho=0.05, sparsity=0.5", run_ssam),
    Method("ssam-clean-fisher", "Sparse-Sharpness-Aware-Minimization",
           "Mi-Peng/Sparse-Sharpness-Aware-Minimization",
           "SSAM-F, rho=0.05, sparsity=0.5", run_ssam_clean_fisher),
    Method("ssam-default-timing", "Sparse-Sharpness-Aware-Minimization",
           "Mi-Peng/Sparse-Sharpness-Aware-Minimization",
           "SSAM-F, rho=0.05, sparsity=0.5", run_ssam_default_timing),
    Method("saf", "SAF", "AngusDujw/SAF", "T=2, lambda=0.5", run_saf),
    Method("saf-one-for-one", "SAF", "AngusDujw/SAF", "T=2, lambda=0.5",
           run_saf_one_for_one),
    Method("mesa", "SAF", "AngusDujw/SAF", "T=2, lambda=0.5", run_mesa),
    Method("mesa-ema-order", "SAF", "AngusDujw/SAF", "T=2, lambda=0.5",
           run_mesa_ema_order),
]
BY_NAME = {m.name: m for m in METHODS}


def commit_of(folder: pathlib.Path) -> str:
  try:
    return subprocess.check_output(
        ["git", "-C", str(folder), "rev-parse", "HEAD"], text=True,
        stderr=subprocess.DEVNULL).strip()
  except Exception:  # pylint: disable=broad-except
    marker = folder / "COMMIT"
    return marker.read_text().strip() if marker.exists() else "unknown"


def parse_args(argv=None):
  parser = argparse.ArgumentParser(
      description="Run each official optimizer and sharpjax's on the same "
      "tiny model and batches; print the largest parameter difference per "
      "method and step.")
  parser.add_argument("--official", required=True, type=pathlib.Path,
                      help="folder holding the official repositories, one "
                      "sub-folder per repository named as on GitHub")
  parser.add_argument("--methods", nargs="+", default=[m.name for m in METHODS],
                      metavar="NAME",
                      help="methods to run (default: all): "
                      + ", ".join(BY_NAME))
  parser.add_argument("--steps", type=int, default=10,
                      help="optimizer steps per method (default 10)")
  parser.add_argument("--seed", type=int, default=0,
                      help="seed of the weights and data (default 0)")
  parser.add_argument("--json", type=pathlib.Path, default=None,
                      help="also write the results to this JSON file")
  args = parser.parse_args(argv)
  unknown = [m for m in args.methods if m not in BY_NAME]
  if unknown:
    parser.error(f"--methods: unknown {', '.join(unknown)}; choose from "
                 + ", ".join(BY_NAME))
  if args.steps < 1:
    parser.error(f"--steps must be >= 1, got {args.steps}")
  if not args.official.is_dir():
    parser.error(f"--official: {args.official} is not a folder")
  return args


def main(argv=None) -> int:
  args = parse_args(argv)
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    print("official_agreement.py: PyTorch is needed to run the official code "
          "(pip install torch)", file=sys.stderr)
    return 2
  import jax  # pylint: disable=g-import-not-at-top
  import sharpjax  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(1)
  print(f"sharpjax {sharpjax.__version__}, jax {jax.__version__}, "
        f"torch {torch.__version__}; {args.steps} steps, seed {args.seed}")
  results = []
  for name in args.methods:
    method = BY_NAME[name]
    folder = args.official / method.folder
    row = {"method": name, "repository": method.repository,
           "settings": method.settings, "steps": args.steps}
    if not folder.is_dir():
      row.update(status=f"skipped: {folder} not found")
      print(f"{name:20s} skipped: no folder {folder}")
      results.append(row)
      continue
    row["commit"] = commit_of(folder)
    try:
      with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the official code's deprecations
        diffs, note = method.run(folder, args.seed, args.steps)
    except Exception as e:  # pylint: disable=broad-except
      row.update(status=f"failed: {type(e).__name__}: {e}")
      print(f"{name:20s} failed: {type(e).__name__}: {e}")
      results.append(row)
      continue
    row.update(status="ok", per_step=diffs, largest=max(diffs), note=note)
    results.append(row)
    steps = " ".join(f"{d:.1e}" for d in diffs)
    print(f"{name:20s} largest {max(diffs):.2e}  ({method.repository} "
          f"@ {row['commit'][:7]}; {method.settings}"
          + (f"; {note}" if note else "") + ")")
    print(f"{'':20s} per step: {steps}")
  if args.json:
    meta = {"sharpjax": sharpjax.__version__, "jax": jax.__version__,
            "torch": torch.__version__, "steps": args.steps,
            "seed": args.seed, "commit": _common.git_commit(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
                timespec="seconds")}
    args.json.write_text(json.dumps({"meta": meta, "results": results},
                                    indent=1) + "\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())
