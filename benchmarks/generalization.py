"""Does sharpness-aware training generalize better, and at what cost? MNIST-1D.

Trains every method of the library on MNIST-1D with the 1D CNN, with clean
labels and with 20% of the training labels flipped (symmetric noise; the test
labels stay clean), several seeds each, the same budget and base optimizer for
all (SGD with momentum, cosine schedule), through ``sharpjax compare``. For each
noise level it reports the mean and std of test accuracy, the top Hessian
eigenvalue of the training loss at the end, the cost per step as a ratio to SGD
measured in the same run, and the Hessian trace (Hutchinson) at the end.

Writes ``benchmarks/results/generalization.{json,md,png}`` (and each noise
level's full ``sharpjax compare`` output under
``benchmarks/results/generalization/``).

    python benchmarks/generalization.py                 # the defaults below
    python benchmarks/generalization.py --seeds 5 --epochs 40
    python benchmarks/generalization.py --scale cifar10 --data-dir ~/data/cifar-10-batches-py

``--scale cifar10|cifar100`` runs the SAF paper's CIFAR setting (``--arch
resnet18`` or ``wrn28-10``, batch 128, lr 0.1 cosine, wd 5e-4, 200 epochs) when
the data is on disk and an accelerator is present, and prints the paper's
numbers (its Table 3) beside the measured ones.
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import sys

from _common import git_commit  # benchmarks/ is the script's sys.path[0]

RESULTS = pathlib.Path(__file__).resolve().parent / "results"

DEFAULT_METHODS = ["sgd", "sam", "asam", "gsam", "looksam", "fsam", "msam",
                   "esam", "ssam", "ausam", "sagm", "saf", "mesa"]

# SAF paper, Table 3 (CIFAR, 3 seeds): test accuracy %, speed relative to SGD.
PAPER_CIFAR = {
    ("cifar10", "resnet18"): {"sgd": (95.61, 1.0), "sam": (96.50, 0.504),
                              "saf": (96.37, 0.976), "mesa": (96.24, 0.845)},
    ("cifar100", "resnet18"): {"sgd": (78.32, 1.0), "sam": (80.18, 0.510),
                               "saf": (80.06, 0.980), "mesa": (79.79, 0.843)},
    ("cifar10", "wrn28-10"): {"sgd": (96.50, 1.0), "sam": (97.07, 0.501),
                              "saf": (97.08, 0.993), "mesa": (97.16, 0.843)},
    ("cifar100", "wrn28-10"): {"sgd": (81.67, 1.0), "sam": (83.51, 0.500),
                               "saf": (83.81, 0.986), "mesa": (83.59, 0.846)},
}
# The CLI's --model/--width for each --arch.
ARCHS = {"resnet18": ["--model", "resnet18"],
         "wrn28-10": ["--model", "wrn28", "--width", "10"]}


def _device_name(device) -> str:
  if isinstance(device, dict):
    return (f"{device.get('platform', '?')} ({device.get('device_kind', '?')}, "
            f"{device.get('cpu_cores', '?')} cores)")
  return str(device)


def run_compare(argv: list[str]) -> dict:
  from sharpjax.cli import _main
  code = _main.main(argv)
  if code not in (0, None):
    raise SystemExit(f"sharpjax compare failed with exit code {code}")
  out = pathlib.Path(argv[argv.index("--out") + 1])
  return json.loads((out / "results.json").read_text())


def markdown(levels: dict, meta: dict, paper: dict | None = None) -> str:
  """One row a method: accuracy per noise level, sharpness at the highest."""
  top = max(levels)
  header = (f"| method | " + " | ".join(
      f"test acc % ({int(100 * n)}% noise)" for n in levels) +
            f" | λ_max ({int(100 * top)}% noise) | tr H ({int(100 * top)}% "
            "noise) | cost × SGD |")
  if paper:
    header += " paper: acc % (time × SGD) |"
  lines = [
      f"{meta['data_note']}, {meta['model_note']}, {meta['epochs']} epochs, "
      f"{meta['seeds']} seeds per method, same budget for all; commit "
      f"{meta['commit']}, {meta['date']}, {meta['device']}.",
      "",
      header,
      "|---|" + "---:|" * (len(levels) + 3 + bool(paper)),
  ]
  methods = [row["method"] for row in levels[top]["table"]]
  for method in methods:
    cells = []
    for level in levels.values():
      row = next(r for r in level["table"] if r["method"] == method)
      cells.append(f"{100 * row['test_accuracy_mean']:.2f} ± "
                   f"{100 * row['test_accuracy_std']:.2f}")
    row = next(r for r in levels[top]["table"] if r["method"] == method)
    lam = row.get("top_eigenvalue_mean")
    tr = row.get("hessian_trace_mean")
    cells.append("" if lam is None else f"{lam:.1f}")
    cells.append("" if tr is None else f"{tr:.0f}")
    cells.append(f"{row['cost_ratio']:.2f}x")
    if paper:
      acc, speed = paper.get(method, (None, None))
      cells.append("" if acc is None else f"{acc:.2f} ({1 / speed:.2f}x)")
    lines.append(f"| {method} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def plot(levels: dict, path: pathlib.Path, data_name: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, len(levels), figsize=(5 * len(levels), 4),
                           squeeze=False)
  for ax, (noise, level) in zip(axes[0], levels.items()):
    for row in level["table"]:
      ax.errorbar(row["cost_ratio"], 100 * row["test_accuracy_mean"],
                  yerr=100 * row["test_accuracy_std"], fmt="o", capsize=3)
      ax.annotate(row["method"], (row["cost_ratio"],
                                  100 * row["test_accuracy_mean"]),
                  textcoords="offset points", xytext=(5, 3), fontsize=8)
    ax.set_xlabel("time per step / SGD's (same run)")
    ax.set_ylabel("test accuracy % (mean ± std over seeds)")
    ax.set_title(f"{data_name}, {int(100 * noise)}% label noise")
    ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--methods", nargs="+", default=DEFAULT_METHODS)
  parser.add_argument("--seeds", type=int, default=3)
  parser.add_argument("--epochs", type=int, default=60)
  parser.add_argument("--width", type=int, default=100,
                      help="channels of the 1D CNN (the MNIST-1D paper's is "
                      "25; at 100 the network memorises the noisy labels, "
                      "the regime where flat minima are claimed to help)")
  parser.add_argument("--noise", type=float, nargs="+", default=None,
                      help="label-noise levels (default: 0 and 0.2 on "
                      "MNIST-1D, 0 on CIFAR)")
  parser.add_argument("--scale", choices=("mnist1d", "cifar10", "cifar100"),
                      default="mnist1d")
  parser.add_argument("--arch", choices=sorted(ARCHS), default="resnet18",
                      help="the network for --scale cifar10|cifar100")
  parser.add_argument("--data-dir", default=None,
                      help="CIFAR directory (python-pickle release or .npz)")
  parser.add_argument("--out", type=pathlib.Path, default=RESULTS)
  args = parser.parse_args(argv)
  if args.scale == "mnist1d":
    args.noise = [0.0, 0.2] if args.noise is None else args.noise
    common = ["--methods", *args.methods, "--seeds", str(args.seeds),
              "--epochs", str(args.epochs), "--width", str(args.width),
              "--progress", "off", "--trace-probes", "20"]
    stem, data_name = "generalization", "MNIST-1D"
  else:
    import jax
    if jax.default_backend() == "cpu":
      raise SystemExit(
          f"--scale {args.scale} trains {args.arch} for 200 epochs: it needs an "
          "accelerator (jax.default_backend() is 'cpu').")
    if args.data_dir is None:
      raise SystemExit(f"--scale {args.scale} needs --data-dir")
    args.noise = [0.0] if args.noise is None else args.noise
    args.epochs = 200  # the paper's budget
    common = ["--methods", *args.methods, "--seeds", str(args.seeds),
              "--data", args.scale, "--data-dir", args.data_dir,
              *ARCHS[args.arch], "--epochs", str(args.epochs),
              "--batch-size", "128",
              "--lr", "0.1", "--weight-decay", "5e-4", "--progress", "off"]
    stem = f"generalization-{args.scale}-{args.arch}"
    data_name = args.scale.upper()

  detail = args.out / stem
  levels = {}
  for noise in args.noise:
    print(f"== label noise {noise:.0%} ==", file=sys.stderr)
    levels[noise] = run_compare(
        ["compare", *common, "--label-noise", str(noise),
         "--out", str(detail / f"noise{int(round(100 * noise))}")])

  first = next(iter(levels.values()))
  meta = dict(
      date=datetime.datetime.now(datetime.timezone.utc).isoformat(
          timespec="seconds"),
      commit=git_commit(), seeds=args.seeds, epochs=args.epochs,
      methods=args.methods, noise=args.noise, scale=args.scale,
      width=args.width, arch=args.arch,
      device=_device_name(first["device"]),
      data_note=(f"{data_name} (4,000 train / 1,000 test)"
                 if args.scale == "mnist1d" else data_name),
      model_note=(f"1D CNN of width {args.width}" if args.scale == "mnist1d"
                  else args.arch),
      command="python benchmarks/generalization.py " + " ".join(
          argv if argv is not None else sys.argv[1:]))
  # The SAF paper's Table 3 beside the measured numbers (CIFAR only).
  paper = PAPER_CIFAR.get((args.scale, args.arch))
  table = markdown(levels, meta, paper)
  print(table)
  args.out.mkdir(parents=True, exist_ok=True)
  results = [
      dict(noise=noise, **row) for noise, level in levels.items()
      for row in level["table"]]
  (args.out / f"{stem}.json").write_text(json.dumps(
      dict(meta=meta, results=results, paper=paper and {
          m: dict(test_accuracy=acc, speed_vs_sgd=speed)
          for m, (acc, speed) in paper.items()},
           config={str(n): lvl["config"] for n, lvl in levels.items()},
           hyper=first["hyper"]), indent=2) + "\n")
  (args.out / f"{stem}.md").write_text(table + "\n")
  plot(levels, args.out / f"{stem}.png", data_name)


if __name__ == "__main__":
  main()
