"""Beyond training on MNIST-1D: SAR test-time adaptation and SAT weight robustness.

Two small CPU experiments (a few minutes on 2 cores):

1. **Test-time adaptation.** A BatchNorm 1D CNN (``sharpjax.tta.NormCNN1D``)
   is trained on clean MNIST-1D. At test time the signals are shifted
   (Gaussian noise plus a random circular time shift, the same for every
   method) and streamed online in batches of 64; we report the accuracy of
   the online predictions without adaptation (running statistics), with
   test-batch normalization statistics only (Tent/SAR at learning rate 0),
   with Tent and with SAR, for (a) i.i.d. batches and (b) a label-sorted
   stream (online imbalanced label shift, SAR's "wild" setting). Tent and SAR
   share each learning rate, the optimizer (SGD, momentum 0.9) and the
   adapted parameters (BatchNorm scale/bias); SAR adds the 0.4 ln C entropy
   filter, the SAM step (rho 0.05) and the EMA reset (0.2). The same is run
   for a LayerNorm variant of the network (no batch statistics: whatever
   adaptation does, it does through the entropy steps). In trial runs a
   GroupNorm variant gained nothing from either method under this shift.
2. **Robustness to weight perturbations.** MNIST-1D's CNN1D is trained with
   SGD (momentum 0.9), Adam, and SAT (``sharpjax.robustness.sat()``: ASAM
   rho 0.5 without eta on every parameter, Adam 0.01: the SAT reference's
   in-silico recipe), then evaluated under multiplicative and additive
   Gaussian weight noise and k-bit quantisation
   (``sharpjax.robustness.accuracy_under_perturbation``).

Writes ``benchmarks/results/beyond_training.{json,md}`` and two PNG figures.

    python benchmarks/beyond_training.py             # the committed run
    python benchmarks/beyond_training.py --quick     # a smoke run (seconds)
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import pathlib
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sharpjax import data
from sharpjax import models
from sharpjax import robustness
from sharpjax import training
from sharpjax import tta

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
NUM_CLASSES = 10


# ---------------------------------------------------------------------------
# Training.
# ---------------------------------------------------------------------------


def train(model, tx, train_set, *, epochs, batch_size, seed):
  """Trains with sharpjax.training.make_trainer; returns (params, state)."""
  trainer = training.make_trainer(model, tx, validate=False)
  loader = data.DataLoader(train_set, batch_size=batch_size, seed=seed,
                           prefetch=0)
  state = trainer.init(jax.random.key(seed), next(iter(loader.epoch(0))))
  for epoch in range(epochs):
    for batch in loader.epoch(epoch):
      state, _ = trainer.step(state, batch)
  return state.params, state.model_state


def accuracy(model, params, model_state, x, y):
  logits = model.apply({"params": params, **model_state}, x)
  return float(jnp.mean(jnp.argmax(logits, -1) == y))


# ---------------------------------------------------------------------------
# 1. Test-time adaptation.
# ---------------------------------------------------------------------------


def shift(x, *, noise, max_shift, seed):
  """Gaussian noise plus a random circular time shift per signal."""
  rng = np.random.default_rng(seed)
  shifts = rng.integers(-max_shift, max_shift + 1, size=len(x))
  idx = (np.arange(x.shape[1])[None, :] - shifts[:, None]) % x.shape[1]
  shifted = np.take_along_axis(x, idx, axis=1)
  return (shifted + noise * rng.normal(size=x.shape)).astype(np.float32)


def online_accuracy(adapter, params, x, y, batch_size):
  state = adapter.init(params)
  correct, resets, reliable = 0, 0, 0
  for start in range(0, len(x) - batch_size + 1, batch_size):
    xb = jnp.asarray(x[start:start + batch_size])
    state, info = adapter.step(state, xb)
    pred = np.asarray(jnp.argmax(info.logits, -1))
    correct += int((pred == y[start:start + batch_size]).sum())
    reliable += int(info.num_reliable)
  n = (len(x) // batch_size) * batch_size
  resets = int(state.num_resets)
  return correct / n, resets, reliable / n


NORM_NAMES = {"batch": "BatchNorm", "layer": "LayerNorm", "group": "GroupNorm"}


def tta_experiment(args, log, norm, lrs):
  train_set, test_set = data.load_mnist1d(num_examples=args.tta_examples,
                                          train_split=0.4)
  model = tta.NormCNN1D(norm=norm)
  tx = optax.adam(args.tta_lr_train)
  t0 = time.time()
  params, model_state = train(model, tx, train_set, epochs=args.tta_epochs,
                              batch_size=128, seed=0)
  log(f"  {norm}-norm source model trained in {time.time() - t0:.1f}s")
  x_test, y_test = np.asarray(test_set.x), np.asarray(test_set.y)
  clean_acc = accuracy(model, params, model_state, x_test, y_test)
  x_shift = shift(x_test, noise=args.noise, max_shift=args.max_shift, seed=1)
  mask = tta.norm_param_mask(params, model=model, inputs=x_shift[:2],
                             model_state=model_state)
  apply_fn = tta.flax_apply_fn(model, model_state)
  adapters = {}
  if norm == "batch":
    adapters["norm_stats"] = tta.tent(apply_fn, learning_rate=0.0, mask=mask)
  for lr in lrs:
    adapters[f"tent@{lr:g}"] = tta.tent(apply_fn, learning_rate=lr, mask=mask)
    adapters[f"sar@{lr:g}"] = tta.sar(apply_fn, learning_rate=lr,
                                      num_classes=NUM_CLASSES, mask=mask)
  order_iid = np.random.default_rng(2).permutation(len(y_test))
  order_sorted = np.argsort(y_test, kind="stable")
  rows = []
  for stream, order in (("iid", order_iid), ("label-sorted", order_sorted)):
    xs, ys = x_shift[order], y_test[order]
    row = {"stream": stream, "batch_size": args.tta_batch,
           "no_adapt": accuracy(model, params, model_state, xs, ys)}
    for name, adapter in adapters.items():
      t0 = time.time()
      acc, resets, reliable = online_accuracy(adapter, params, xs, ys,
                                              args.tta_batch)
      row[name] = acc
      if name.startswith("sar"):
        row[f"{name}_resets"] = resets
        row[f"{name}_reliable_fraction"] = reliable
      log(f"  {stream:13s} {name:10s} acc {acc:.4f} resets {resets} "
          f"reliable {reliable:.2f} ({time.time() - t0:.1f}s)")
    log(f"  {stream:13s} no-adapt acc {row['no_adapt']:.4f}")
    rows.append(row)
  return {
      "model": f"NormCNN1D ({NORM_NAMES[norm]}, 32 channels)",
      "norm": norm,
      "train_examples": len(train_set),
      "test_examples": len(test_set),
      "source_epochs": args.tta_epochs,
      "clean_test_accuracy": clean_acc,
      "shift": {"noise_std": args.noise, "max_time_shift": args.max_shift},
      "adapted_parameters": tta.mask_paths(mask),
      "learning_rates": list(lrs),
      "sar": {"rho": 0.05, "margin": 0.4 * math.log(NUM_CLASSES),
              "reset_threshold": 0.2, "ema_decay": 0.9},
      "rows": rows,
  }


# ---------------------------------------------------------------------------
# 2. Robustness to weight perturbations.
# ---------------------------------------------------------------------------

SWEEPS = {
    "multiplicative": [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6],
    "additive": [0.0, 0.02, 0.04, 0.06, 0.08, 0.1],
    "quantize": [8, 6, 5, 4, 3, 2],
}


def robustness_experiment(args, log):
  train_set, test_set = data.load_mnist1d()
  model = models.CNN1D()
  recipes = {
      "SGD": optax.sgd(args.sgd_lr, momentum=0.9),
      "Adam": optax.adam(0.01),
      "SAT": robustness.sat(),  # ASAM(rho=0.5, eta=0, all params) + Adam(0.01)
  }
  x_test = jnp.asarray(test_set.x)
  y_test = jnp.asarray(test_set.y)

  def accuracy_fn(params):
    logits = model.apply({"params": params}, x_test)
    return jnp.mean(jnp.argmax(logits, -1) == y_test)

  results, sweeps = {}, {k: {} for k in SWEEPS}
  for name, tx in recipes.items():
    t0 = time.time()
    params, _ = train(model, tx, train_set, epochs=args.epochs,
                      batch_size=100, seed=0)
    log(f"  {name}: trained in {time.time() - t0:.1f}s, clean test acc "
        f"{float(accuracy_fn(params)):.4f}")
    results[name] = {}
    for kind, strengths in SWEEPS.items():
      sweep = robustness.accuracy_under_perturbation(
          accuracy_fn, params, jax.random.key(42), kind=kind,
          strengths=strengths, num_samples=args.draws)
      sweeps[kind][name] = sweep
      results[name][kind] = {
          "strengths": sweep.strengths.tolist(),
          "mean": sweep.mean.round(4).tolist(),
          "std": sweep.std.round(4).tolist(),
      }
      results[name]["clean"] = sweep.clean
  return {
      "model": "CNN1D (5,210 params)",
      "epochs": args.epochs,
      "batch_size": 100,
      "draws_per_strength": args.draws,
      "recipes": {
          "SGD": f"optax.sgd({args.sgd_lr}, momentum=0.9)",
          "Adam": "optax.adam(0.01)",
          "SAT": "sharpjax.robustness.sat(): asam(rho=0.5, eta=0, all "
                 "params) + adam(0.01)",
      },
      "results": results,
  }, sweeps


# ---------------------------------------------------------------------------
# Output.
# ---------------------------------------------------------------------------


def figures(tta_result, sweeps, stem):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  fig, axes = plt.subplots(1, len(tta_result), figsize=(11, 3.6))
  for ax, t in zip(np.atleast_1d(axes), tta_result):
    names, labels = ["no_adapt"], ["no adaptation"]
    colors = ["0.6"]
    if "norm_stats" in t["rows"][0]:
      names.append("norm_stats")
      labels.append("batch stats only")
      colors.append("tab:orange")
    for j, lr in enumerate(t["learning_rates"]):
      names += [f"tent@{lr:g}", f"sar@{lr:g}"]
      labels += [f"Tent lr {lr:g}", f"SAR lr {lr:g}"]
      colors += [("tab:blue", "lightsteelblue")[j % 2],
                 ("tab:red", "lightsalmon")[j % 2]]
    width = 0.8 / len(names)
    for i, (name, label) in enumerate(zip(names, labels)):
      vals = [row[name] for row in t["rows"]]
      ax.bar(np.arange(len(vals)) + (i - (len(names) - 1) / 2) * width, vals,
             width, label=label, color=colors[i])
    ax.set_xticks(range(len(t["rows"])))
    ax.set_xticklabels([r["stream"] for r in t["rows"]])
    ax.set_ylabel("online accuracy (shifted test)")
    ax.set_ylim(0, 0.8)
    ax.legend(fontsize=7)
    ax.set_title(f"MNIST-1D TTA, {NORM_NAMES[t['norm']]} model")
  fig.tight_layout()
  fig.savefig(f"{stem}_tta.png", dpi=120)
  plt.close(fig)

  fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
  for ax, (kind, by_name) in zip(axes, sweeps.items()):
    robustness.plot_perturbation_sweeps(by_name, ax=ax, title=kind)
  fig.tight_layout()
  fig.savefig(f"{stem}_robustness.png", dpi=120)
  plt.close(fig)


def markdown(result):
  lines = [
      "# Beyond training on MNIST-1D",
      "",
      f"Generated by `benchmarks/beyond_training.py` on {result['date']} "
      f"({result['platform']}, jax {result['jax']}), "
      f"{result['seconds']:.0f} s. One seed; small budgets.",
      "",
      "## Test-time adaptation (online accuracy on shifted MNIST-1D)",
  ]
  for t in result["tta"]:
    lines += [
        "",
        f"**{t['model']}**, trained {t['source_epochs']} epochs on "
        f"{t['train_examples']} clean examples (clean test accuracy "
        f"{t['clean_test_accuracy']:.3f}). Test shift: Gaussian noise "
        f"std {t['shift']['noise_std']} and a random circular time shift of "
        f"up to {t['shift']['max_time_shift']} steps; {t['test_examples']} "
        f"test signals streamed once in batches of "
        f"{t['rows'][0]['batch_size']}, i.i.d. or sorted by label. Tent and "
        "SAR: SGD with momentum 0.9 at each learning rate, "
        f"{NORM_NAMES[t['norm']]} scale/bias only "
        f"({len(t['adapted_parameters'])} leaves). SAR cells: accuracy "
        "(resets, fraction of samples passing the entropy filter).",
        "",
    ]
    if t["norm"] == "batch":
      lines += [
          "BatchNorm runs on test-batch statistics during adaptation; "
          "\"batch stats only\" is that normalization without any "
          "parameter update (learning rate 0).", ""]
    head = ["stream", "no adaptation"]
    if "norm_stats" in t["rows"][0]:
      head.append("batch stats only")
    for lr in t["learning_rates"]:
      head += [f"Tent lr {lr:g}", f"SAR lr {lr:g}"]
    lines += ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for r in t["rows"]:
      cells = [r["stream"], f"{r['no_adapt']:.4f}"]
      if "norm_stats" in r:
        cells.append(f"{r['norm_stats']:.4f}")
      for lr in t["learning_rates"]:
        sar = f"sar@{lr:g}"
        cells += [f"{r[f'tent@{lr:g}']:.4f}",
                  f"{r[sar]:.4f} ({r[sar + '_resets']}, "
                  f"{r[sar + '_reliable_fraction']:.2f})"]
      lines.append("| " + " | ".join(cells) + " |")
  rb = result["robustness"]
  lines += [
      "",
      "## Accuracy under weight perturbations (SGD vs SAT)",
      "",
      f"{rb['model']}, {rb['epochs']} epochs, batch {rb['batch_size']}, "
      f"on the standard 4,000/1,000 split; mean over "
      f"{rb['draws_per_strength']} noise draws (same draws for every model). "
      + "; ".join(f"{k}: `{v}`" for k, v in rb["recipes"].items()) + ".",
  ]
  for kind in SWEEPS:
    names = list(rb["results"])
    strengths = rb["results"][names[0]][kind]["strengths"]
    label = "bits" if kind == "quantize" else "sigma"
    lines += ["", f"**{kind}** ({label})", "",
              "| model | " + " | ".join(f"{s:g}" for s in strengths) + " |",
              "|---|" + "---|" * len(strengths)]
    for name in names:
      r = rb["results"][name][kind]
      lines.append(f"| {name} | " + " | ".join(
          f"{m:.3f}" + (f" ± {s:.3f}" if s > 0 else "")
          for m, s in zip(r["mean"], r["std"])) + " |")
  lines += ["", "Figures: `beyond_training_tta.png`, "
            "`beyond_training_robustness.png`.", ""]
  return "\n".join(lines)


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--quick", action="store_true", help="smoke run")
  p.add_argument("--tta-examples", type=int, default=10000)
  p.add_argument("--tta-epochs", type=int, default=15)
  p.add_argument("--tta-lr-train", type=float, default=0.005)
  p.add_argument("--tta-lrs", type=float, nargs="+", default=[0.005, 0.05])
  p.add_argument("--tta-lrs-ln", type=float, nargs="+",
                 default=[0.001, 0.005])
  p.add_argument("--tta-batch", type=int, default=64)
  p.add_argument("--noise", type=float, default=0.6)
  p.add_argument("--max-shift", type=int, default=4)
  p.add_argument("--epochs", type=int, default=30)
  p.add_argument("--sgd-lr", type=float, default=0.05)
  p.add_argument("--draws", type=int, default=10)
  p.add_argument("--out", default=str(RESULTS / "beyond_training"))
  p.add_argument("--skip-tta", action="store_true")
  p.add_argument("--skip-robustness", action="store_true")
  args = p.parse_args()
  if args.quick:
    args.tta_examples, args.tta_epochs, args.epochs, args.draws = 2000, 2, 2, 2
  start = time.time()
  log = lambda s: print(s, flush=True)
  result = {
      "date": datetime.datetime.now(datetime.timezone.utc).strftime(
          "%Y-%m-%d %H:%M UTC"),
      "platform": f"{platform.machine()} {jax.default_backend()}",
      "jax": jax.__version__,
  }
  tta_result, sweeps = None, None
  if not args.skip_tta:
    log("test-time adaptation")
    tta_result = [tta_experiment(args, log, "batch", args.tta_lrs),
                  tta_experiment(args, log, "layer", args.tta_lrs_ln)]
    result["tta"] = tta_result
  if not args.skip_robustness:
    log("robustness to weight perturbations")
    result["robustness"], sweeps = robustness_experiment(args, log)
  result["seconds"] = time.time() - start
  if args.quick or args.skip_tta or args.skip_robustness:
    if "robustness" in result:
      for name, r in result["robustness"]["results"].items():
        log(f"  {name}: " + "; ".join(
            f"{kind} {r[kind]['mean']}" for kind in SWEEPS))
    log(f"done in {result['seconds']:.0f}s (not written: partial run)")
    return
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.with_suffix(".json").write_text(json.dumps(result, indent=1))
  md = markdown(result)
  out.with_suffix(".md").write_text(md)
  figures(tta_result, sweeps, str(out))
  print(md)


if __name__ == "__main__":
  main()
