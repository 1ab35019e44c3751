"""The sharpjax command line: compare, train/resume, measure, error cases.

Every run here is tiny (MNIST-1D cut to a few hundred examples, a few
epochs); the commands run in-process through ``sharpjax.cli.main``.
"""

import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

import sharpjax as sj
from sharpjax.cli import _checkpoint
from sharpjax.cli import _methods
from sharpjax.cli import _runner
from sharpjax.cli import main

# 240 train / 60 test examples; batch 32 -> 7 steps per epoch.
TINY = ["--num-examples", "300", "--batch-size", "32", "--progress", "off"]
TINY_MLP = TINY + ["--model", "mlp", "--width", "16"]


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
  # MNIST-1D is generated offline; keep its cache out of the home directory.
  monkeypatch.setenv("SHARPJAX_CACHE",
                     str(tmp_path_factory.getbasetemp() / "cache"))
  # A command that fails after making its default --out leaves it in the
  # working directory: keep that out of the checkout.
  monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))


def _leaves(directory, step=None):
  """The leaves (by tree path) and metadata of a train checkpoint."""
  _, state, meta, _ = _checkpoint.load_run(str(directory), step)
  flat, _ = jax.tree_util.tree_flatten_with_path(state)
  return {jax.tree_util.keystr(p): np.asarray(x) for p, x in flat}, meta


# ---------------------------------------------------------------------------
# compare
# ---------------------------------------------------------------------------


def _strict_json(path):
  """results.json read by a parser that refuses NaN and Infinity."""
  def refuse(name):
    raise ValueError(f"{path} holds {name}, which is not JSON")
  return json.loads(path.read_text(), parse_constant=refuse)


def test_compare_end_to_end(tmp_path, capsys):
  out = tmp_path / "cmp"
  rc = main(["compare", "--methods", "sgd,sam", "saf", "--seeds", "2",
             "--epochs", "2", "--sharpness-examples", "64", "--out", str(out),
             *TINY])
  assert rc == 0
  captured = capsys.readouterr()
  # Not a terminal: no progress bars, one line per run and the table.
  assert "step/s" not in captured.err and "it/s" not in captured.err
  assert len(re.findall(r"^\[\d+/6\] ", captured.out, re.M)) == 6
  assert "| method |" in captured.out
  assert re.search(r"^- saf: [+-]\d+\.\d points over sgd \(95% CI "
                   r"[+-]\d+\.\d to [+-]\d+\.\d over 2 paired seeds\) at "
                   r"\d+\.\d\dx its step time$", captured.out, re.M)

  res = _strict_json(out / "results.json")
  assert res["complete"] and res["finished"]
  assert res["methods"] == ["sgd", "sam", "saf"]
  assert res["seeds"] == [0, 1]
  assert res["config"]["epochs"] == 2 and res["config"]["batch_size"] == 32
  for pkg in ("jax", "optax", "flax"):
    assert res["versions"][pkg]
  assert res["device"]["device_kind"] and res["device"]["platform"] == "cpu"
  assert res["data"] == {"train": 240, "test": 60, "num_classes": 10,
                         "steps_per_epoch": 7}
  # SAF/MESA "auto" values scaled to a 2-epoch run (module docstring).
  assert res["hyper"]["saf"]["start_epoch"] == 1
  assert res["hyper"]["saf"]["delay_epochs"] == 1
  rows = {r["method"]: r for r in res["table"]}
  assert list(rows) == ["sgd", "sam", "saf"]
  assert rows["sgd"]["cost_ratio"] == 1.0
  # Compute beside time: XLA's FLOP count of each method's compiled step.
  assert rows["sgd"]["flops_ratio"] == 1.0
  assert 1.9 < rows["sam"]["flops_ratio"] < 2.1  # two passes
  assert 0.99 < rows["saf"]["flops_ratio"] < 1.05  # one pass and a KL
  for r in rows.values():
    assert r["flops_per_step"] == pytest.approx(
        r["flops_ratio"] * rows["sgd"]["flops_per_step"])
  assert "| compute × SGD |" in captured.out
  for r in rows.values():
    assert r["seeds"] == 2
    assert 0.0 <= r["test_accuracy_mean"] <= 1.0
    assert np.isfinite(r["train_loss_mean"]) and r["ms_per_step"] > 0
    assert np.isfinite(r["top_eigenvalue_mean"])
    assert r["peak_rss_mib"] > 0 and r["state_kib"] > 0
  # SAF's bank (240 x 1 x 10 float32) is in its state, on top of SGD's.
  assert rows["saf"]["state_kib"] * 1024 >= (rows["sgd"]["state_kib"] * 1024
                                             + 240 * 10 * 4)
  runs = res["runs"]
  assert len(runs) == 6
  for run in runs:
    assert [h["epoch"] for h in run["history"]] == [1, 2]
    assert run["steps"] == 14
  # Table figures are the means over the runs; the difference to SGD is the
  # mean of the per-seed differences, with a t-interval of 1 degree of freedom.
  acc = {(r["method"], r["seed"]): r["history"][-1]["test_accuracy"]
         for r in runs}
  assert rows["sam"]["test_accuracy_mean"] == pytest.approx(
      np.mean([acc["sam", 0], acc["sam", 1]]))
  d = np.array([acc["saf", s] - acc["sgd", s] for s in (0, 1)])
  half = 12.706 * d.std(ddof=1) / np.sqrt(2)
  delta = rows["saf"]["delta_vs_sgd"]
  assert delta["n"] == 2 and delta["mean"] == pytest.approx(d.mean())
  assert (delta["low"], delta["high"]) == pytest.approx(
      (d.mean() - half, d.mean() + half))
  assert rows["sgd"]["delta_vs_sgd"] is None

  md = (out / "results.md").read_text()
  for m in ("sgd", "sam", "saf"):
    assert re.search(rf"^\| {m} \|", md, re.M)
  assert "λ_max" in md and "Δ vs SGD" in md and "| sgd | " in md
  assert "- sam: " in md
  for png in ("accuracy.png", "train_loss.png", "tradeoff.png",
              "compare.png"):
    data = (out / png).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_same_seed_same_start_across_methods(tmp_path):
  """Methods with one seed start from the same weights and data order."""
  from sharpjax.cli import _setup
  env = _setup.make_env(_setup.Config(num_examples=300, batch_size=32,
                                      epochs=1))
  a = _runner.MethodRunner(env, "sgd").init_state(1)
  b = _runner.MethodRunner(env, "saf").init_state(1)
  c = _runner.MethodRunner(env, "sgd").init_state(2)
  jax.tree.map(np.testing.assert_array_equal, a.params, b.params)
  flat = lambda s: np.concatenate(
      [np.ravel(x) for x in jax.tree.leaves(s.params)])
  assert not np.array_equal(flat(a), flat(c))
  # The data order depends on the seed alone.
  np.testing.assert_array_equal(env.loader(1).order(3),
                                env.loader(1).order(3))


# Two methods x two seeds of one epoch, no Hessian measure: 4 quick runs.
RESUMABLE = ["compare", "--methods", "sgd", "saf", "--seeds", "2", "--epochs",
             "1", "--no-sharpness", *TINY_MLP]


def _count_runs(monkeypatch, interrupt_at=None):
  """Counts MethodRunner.run calls; raises KeyboardInterrupt at call N."""
  calls = []
  real_run = _runner.MethodRunner.run

  def run(self, seed, *args, **kwargs):
    calls.append((self.method.name, seed))
    if len(calls) == interrupt_at:
      raise KeyboardInterrupt  # as Ctrl-C in the middle of that run
    return real_run(self, seed, *args, **kwargs)

  monkeypatch.setattr(_runner.MethodRunner, "run", run)
  return calls


def test_compare_resume_runs_only_the_missing_runs(tmp_path, monkeypatch,
                                                   capsys):
  out = tmp_path / "cmp"
  calls = _count_runs(monkeypatch, interrupt_at=2)
  assert main([*RESUMABLE, "--out", str(out)]) == 130
  err = capsys.readouterr().err
  assert "1 of 4 runs are saved" in err and "--resume" in err
  saved = _strict_json(out / "results.json")
  assert not saved["complete"] and saved["finished"] is None
  assert [(r["method"], r["seed"]) for r in saved["runs"]] == [("sgd", 0)]
  assert "| sgd |" in (out / "results.md").read_text()
  assert not any(f.startswith(".") for f in os.listdir(out))  # no temp files

  calls = _count_runs(monkeypatch)
  assert main([*RESUMABLE, "--out", str(out), "--resume"]) == 0
  assert calls == [("saf", 0), ("sgd", 1), ("saf", 1)]
  assert "1 finished runs kept" in capsys.readouterr().out
  res = _strict_json(out / "results.json")
  assert res["complete"]
  assert [(r["method"], r["seed"]) for r in res["runs"]] == [
      ("sgd", 0), ("saf", 0), ("sgd", 1), ("saf", 1)]
  assert res["runs"][0] == saved["runs"][0]  # kept as it was
  assert res["started"] == saved["started"]
  assert res["wall_s"] > saved["wall_s"]  # both invocations
  assert [r["seeds"] for r in res["table"]] == [2, 2]
  assert (out / "compare.png").exists()

  # Everything done: --resume runs nothing; another budget is refused.
  calls = _count_runs(monkeypatch)
  assert main([*RESUMABLE, "--out", str(out), "--resume"]) == 0
  assert not calls
  assert main([*RESUMABLE, "--out", str(out), "--resume", "--epochs",
               "2"]) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and not calls
  assert "different comparison: config.epochs: saved 1, this run 2" in err


def test_a_nan_method_is_marked_failed_and_the_others_go_on(tmp_path,
                                                            capsys):
  out = tmp_path / "nan"
  assert main(["compare", "--methods", "sgd", "sam", "saf", "--set",
               "sam.rho=1e30", "--seeds", "2", "--epochs", "1",
               "--sharpness-examples", "32", "--out", str(out),
               *TINY_MLP]) == 0
  printed = capsys.readouterr().out
  assert re.search(r"sam +seed 0: failed: the training loss became nan", printed)
  res = _strict_json(out / "results.json")  # no NaN anywhere
  rows = {r["method"]: r for r in res["table"]}
  assert [f["seed"] for f in rows["sam"]["failed"]] == [0, 1]
  assert rows["sam"]["test_accuracy_mean"] is None
  for m in ("sgd", "saf"):
    assert not rows[m]["failed"] and rows[m]["seeds"] == 2
    assert 0 <= rows[m]["test_accuracy_mean"] <= 1
  assert [r["steps"] for r in res["runs"] if r["method"] == "saf"] == [7, 7]
  assert rows["saf"]["delta_vs_sgd"]["n"] == 2
  md = (out / "results.md").read_text()
  assert "| sam | failed (2 of 2 seeds) |" in md
  assert "- sam: failed on seed 0: the training loss became nan" in md


@pytest.mark.parametrize("command", [
    ["compare", "--methods", "sgd", "--seeds", "1"],
    ["train", "--method", "sgd"]])
def test_a_bad_out_is_refused_before_training(tmp_path, monkeypatch, capsys,
                                              command):
  def no_training(*args, **kwargs):
    raise AssertionError("training started")

  monkeypatch.setattr(_runner.MethodRunner, "__init__", no_training)
  a_file = tmp_path / "results.txt"
  a_file.write_text("not a directory")
  for out, needle in ((a_file, "is a file, not a directory"),
                      (a_file / "sub", "is not a writable directory")):
    assert main([*command, "--epochs", "1", "--out", str(out), *TINY]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"sharpjax {command[0]}: error: --out {out} {needle}")
    assert len(err.strip().splitlines()) == 1
  if os.geteuid() != 0:  # root writes anywhere
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    assert main([*command, "--epochs", "1", "--out", str(locked), *TINY]) == 2
    assert "is not a writable directory" in capsys.readouterr().err


def test_presets_and_all():
  from sharpjax.cli import _main
  from sharpjax.cli import _setup
  parse = lambda *a: _main.build_parser().parse_args(["compare", *a])
  args = parse()
  _main._apply_preset(args)
  assert args.preset == "noisy"
  assert (args.label_noise, args.width, args.epochs, args.seeds) == (0.2, 32,
                                                                    60, 5)
  assert args.methods == ["sgd", "sam", "saf", "mesa"]
  # The clean-label table of the README: 12 methods, width 25, 20 epochs; an
  # explicit flag wins over the preset.
  args = parse("--preset", "clean12", "--epochs", "3", "--label-noise", "0.1")
  _main._apply_preset(args)
  assert (args.label_noise, args.width, args.epochs, args.seeds) == (0.1, 25,
                                                                    3, 3)
  assert len(args.methods) == 12 and "sagm" not in args.methods
  for preset in _setup.PRESETS.values():
    assert sorted(preset.flags) == sorted(_setup.PRESET_FLAGS)
    for m in preset.flags["methods"]:
      _methods.get(m)
  assert _main._split_methods(["all"]) == _methods.names()
  assert _main._split_methods(["sgd,sam", "saf"]) == ["sgd", "sam", "saf"]


def test_t_quantiles_and_paired_difference_match_scipy():
  from sharpjax.cli import _report
  stats = pytest.importorskip("scipy.stats")
  for df in (1, 2, 4, 10, 30, 31, 45, 200):
    assert _report.t_quantile_975(df) == pytest.approx(
        stats.t.ppf(0.975, df), abs=1e-3)
  a = {0: 0.71, 1: 0.80, 2: 0.74, 3: 0.77, 7: 0.9}  # seed 7: no pair
  b = {0: 0.70, 1: 0.75, 2: 0.72, 3: 0.70}
  d = np.array([0.01, 0.05, 0.02, 0.07])
  lo, hi = stats.t.interval(0.95, 3, loc=d.mean(), scale=stats.sem(d))
  got = _report.paired_difference(a, b)
  assert got["n"] == 4 and got["mean"] == pytest.approx(d.mean())
  assert (got["low"], got["high"]) == pytest.approx((lo, hi), abs=1e-5)
  assert _report.paired_difference({0: 0.5}, {0: 0.4})["low"] is None


def test_every_method_has_its_own_colour_and_labels_do_not_overlap():
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from matplotlib.text import Text
  from sharpjax.cli import _report
  names = _methods.names()
  assert set(names) <= set(_report.COLORS)
  assert len({_report.color_of(m) for m in names}) == len(names)
  # Nine methods within 0.1x of cost and one point of accuracy (the cluster
  # of the 12-method table), and two points far away.
  rng = np.random.default_rng(0)
  xs = list(1.6 + 0.1 * rng.random(9)) + [1.0, 3.9]
  ys = list(84 + rng.random(9)) + [84.0, 56.0]
  fig, ax = plt.subplots(figsize=(6.4, 4.2))
  ax.plot(xs, ys, "o")
  ax.margins(0.25)
  fig.tight_layout()
  _report.label_points(ax, xs, ys, names[:11], ["k"] * 11)
  fig.canvas.draw()
  renderer = fig.canvas.get_renderer()
  boxes = [Text.get_window_extent(t, renderer) for t in ax.texts]
  assert len(boxes) == 11
  for i, box in enumerate(boxes):
    assert not any(box.overlaps(other) for other in boxes[i + 1:])
    assert ax.get_window_extent(renderer).contains(box.x0, box.y0)
  plt.close(fig)


# ---------------------------------------------------------------------------
# train, checkpoints, resume
# ---------------------------------------------------------------------------


def _train(tmp_path, name, *extra, method="saf"):
  return main(["train", "--method", method, "--epochs", "3", "--save-every",
               "5", "--seed", "1", "--out", str(tmp_path / name), *TINY_MLP,
               *extra])


@pytest.mark.parametrize("method", ["saf", "mesa"])
def test_resume_is_bit_exact(tmp_path, monkeypatch, method):
  # Uninterrupted: 3 epochs x 7 steps.
  assert _train(tmp_path, "full", method=method) == 0
  full, full_meta = _leaves(tmp_path / "full" / "checkpoints")
  assert full_meta["progress"]["step"] == 21

  if method == "saf":
    # Interrupted like Ctrl-C in the middle of epoch 2 (after step 12); the
    # last checkpoint (step 10, every 5 steps) must be usable.
    real_flush = _runner.MethodRunner._flush

    def flush(self, pending, progress, epoch, bar, log=True):
      real_flush(self, pending, progress, epoch, bar, log)
      if progress.step >= 12:
        raise KeyboardInterrupt

    monkeypatch.setattr(_runner.MethodRunner, "_flush", flush)
    assert _train(tmp_path, "cut", method=method) == 130
    monkeypatch.setattr(_runner.MethodRunner, "_flush", real_flush)
    assert _checkpoint.Checkpointer(
        tmp_path / "cut" / "checkpoints").steps()[-1] == 10
  else:
    assert _train(tmp_path, "cut", "--max-steps", "10", method=method) == 0
  assert _train(tmp_path, "cut", "--resume", method=method) == 0
  cut, cut_meta = _leaves(tmp_path / "cut" / "checkpoints")

  assert cut_meta["progress"] == full_meta["progress"]  # history included
  assert sorted(cut) == sorted(full)
  for path in full:
    np.testing.assert_array_equal(cut[path], full[path], err_msg=path)
  if method == "saf":
    bank = [p for p in full if p.endswith(".logit_bank")]
    assert bank and np.abs(full[bank[0]]).sum() > 0  # the bank is written
  else:
    teacher = [p for p in full if ".teacher_params" in p]
    assert teacher
  # Resuming a finished run trains nothing more and changes nothing.
  assert _train(tmp_path, "cut", "--resume", method=method) == 0
  again, _ = _leaves(tmp_path / "cut" / "checkpoints")
  for path in full:
    np.testing.assert_array_equal(again[path], full[path])


def test_train_refuses_to_mix_runs_and_measure(tmp_path, capsys):
  assert _train(tmp_path, "run", "--max-steps", "5") == 0
  assert _train(tmp_path, "run") == 1  # checkpoints exist, no --resume
  assert "--resume" in capsys.readouterr().err
  # Resuming with another budget or method names the mismatch.
  assert main(["train", "--method", "saf", "--epochs", "4", "--save-every",
               "5", "--seed", "1", "--out", str(tmp_path / "run"), *TINY_MLP,
               "--resume"]) == 1
  err = capsys.readouterr().err
  assert "different run" in err and "epochs: checkpoint 3, this run 4" in err
  assert _train(tmp_path, "run", "--resume", method="sam") == 1
  err = capsys.readouterr().err
  assert "method: checkpoint 'saf', this run 'sam'" in err
  assert _train(tmp_path, "run", "--resume", "--strength", "0.5") == 1
  assert "hyper.strength: checkpoint 0.3, this run 0.5" in (
      capsys.readouterr().err)

  # The checkpoint (a step subdirectory works too) can be measured.
  out = tmp_path / "m"
  assert main(["measure", str(tmp_path / "run" / "checkpoints" / "5"),
               "--num-examples", "64", "--probes", "8", "--top-k", "2",
               "--landscape", "--out", str(out)]) == 0
  res = json.loads((out / "measure.json").read_text())
  assert res["step"] == 5 and res["run"]["method"] == "saf"
  assert res["examples"] == 64
  top = res["top_eigenvalues"]
  assert len(top) == 2 and abs(top[0]) >= abs(top[1]) > 0
  assert np.isfinite(res["trace"]) and 0 <= res["test_accuracy"] <= 1
  assert (out / "landscape.png").read_bytes()[:4] == b"\x89PNG"
  assert "top Hessian eigenvalues" in capsys.readouterr().out


# When one of orbax's concurrent array reads fails, the restore's event loop
# closes while tensorstore still completes the other reads, whose callbacks
# then find it closed ("Event loop is closed", raised in tensorstore's threads
# and reported as unraisable). The error the user sees is the one asserted.
@pytest.mark.filterwarnings(
    "ignore:Exception ignored in:pytest.PytestUnraisableExceptionWarning")
def test_corrupt_checkpoint_is_named(tmp_path, capsys):
  assert _train(tmp_path, "run", "--max-steps", "5") == 0
  ckpt = tmp_path / "run" / "checkpoints"
  step_dir = ckpt / "5" / "state"
  # Every data file of the arrays (orbax may keep more than one copy of a
  # chunk, depending on the device count; which one it reads is its own).
  for d, _, fs in os.walk(step_dir):
    if os.path.basename(d) != "d":
      continue
    for f in fs:
      raw = bytearray(open(os.path.join(d, f), "rb").read())
      for i in range(len(raw) // 3, len(raw) // 3 + 64):
        raw[i % len(raw)] ^= 0xFF
      open(os.path.join(d, f), "wb").write(bytes(raw))
  assert _train(tmp_path, "run", "--resume") == 1
  err = capsys.readouterr().err
  assert "checkpoint error" in err and "corrupt" in err and str(ckpt) in err
  # The reason, without the kilobytes of tensorstore's store spec after it.
  line = next(l for l in err.splitlines() if "checkpoint error" in l)
  assert "tensorstore_spec" not in line and len(line) < 800, line

  # A checkpoint whose state does not fit this run's state.
  ck = _checkpoint.Checkpointer(tmp_path / "other")
  ck.save({"w": np.zeros((3,), np.float32)}, {"method": "x"}, {"step": 1})
  with pytest.raises(_checkpoint.CheckpointError,
                     match=r"does not fit the template: it has 1 arrays"):
    ck.restore({"w": np.zeros((3,), np.float32), "b": np.zeros(2)})
  with pytest.raises(_checkpoint.CheckpointError,
                     match=r"\['w'\]: checkpoint float32\[3\], template "
                           r"float32\[4\]"):
    ck.restore({"w": np.zeros((4,), np.float32)})
  # Metadata gone.
  meta_files = [os.path.join(d, f)
                for d, _, fs in os.walk(tmp_path / "other" / "1" / "meta")
                for f in fs]
  for f in meta_files:
    open(f, "w").write("{not json")
  with pytest.raises(_checkpoint.CheckpointError, match="metadata cannot be"):
    ck.read_meta()
  with pytest.raises(_checkpoint.CheckpointError, match="no checkpoint"):
    _checkpoint.Checkpointer(tmp_path / "empty").read_meta()


# ---------------------------------------------------------------------------
# Error cases
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("argv, needle", [
    (["compare", "--methods", "sgd", "sharp"],
     "unknown method 'sharp'; valid methods: sgd, sam, asam"),
    (["compare", "--model", "resnet9"],
     "unknown model 'resnet9'; valid models: cnn1d, mlp, resnet18, wrn28"),
    (["train", "--data", "mnist"],
     "unknown data set 'mnist'; valid data sets: mnist1d, digits, synthetic, "
     "cifar10, cifar100, arrayrecord, synthetic_images (did you mean "
     "'mnist1d'?)"),
    (["train", "--method", "sam", "--set", "sam.radius=0.1"],
     "method 'sam' has no hyper-parameter 'radius'; its hyper-parameters "
     "are: rho"),
    (["compare", "--methods", "sam", "--set", "saf.strength=1"],
     "method 'saf' is not selected"),
    (["train", "--method", "sam", "--rho", "-1"], "rho"),
])
def test_unknown_names_list_the_valid_ones(argv, needle, capsys):
  assert main(argv + TINY) == 2
  assert needle in capsys.readouterr().err


def test_nan_loss_stops_with_the_step(tmp_path, capsys):
  rc = main(["train", "--method", "sam", "--lr", "1e30", "--epochs", "2",
             "--out", str(tmp_path / "nan"), *TINY_MLP])
  assert rc == 1
  err = capsys.readouterr().err
  m = re.search(r"the training loss became (nan|inf|-inf) at step (\d+) "
                r"\(epoch 1\)", err)
  assert m, err
  step = int(m.group(2))
  assert 1 <= step <= 7
  # No checkpoint holds the diverged state.
  steps = _checkpoint.Checkpointer(tmp_path / "nan" / "checkpoints").steps()
  assert all(s < step for s in steps)


# ---------------------------------------------------------------------------
# The registry
# ---------------------------------------------------------------------------


def test_registry_has_every_method_of_the_library():
  for name in ("sam", "asam", "gsam", "looksam", "fsam", "msam", "esam",
               "ssam", "ausam", "saf", "mesa"):
    if hasattr(sj, name):
      assert name in _methods.names()
  assert _methods.names()[0] == "sgd"
  budget = _methods.Budget(num_examples=100, num_classes=10,
                           steps_per_epoch=4, epochs=3, learning_rate=0.05,
                           momentum=0.9)
  for name in _methods.names():
    m = _methods.get(name)
    tx = _methods.build(m, _methods.resolve(m, budget, {}, {}), budget)
    assert (tx is None) == (name == "sgd")


def test_auto_hyper_parameters():
  budget = _methods.Budget(num_examples=4000, num_classes=10,
                           steps_per_epoch=31, epochs=30)
  saf = _methods.resolve(_methods.get("saf"), budget, {}, {})
  assert (saf["start_epoch"], saf["delay_epochs"]) == (5, 3)  # the paper's
  mesa = _methods.resolve(_methods.get("mesa"), budget, {"rho": 1.0}, {})
  assert mesa["decay"] == pytest.approx(1 - 16 / 930)
  assert "rho" not in mesa
  assert _methods.resolve(_methods.get("ssam"), budget, {},
                          {})["update_every"] == 31
  assert _methods.resolve(_methods.get("ausam"), budget, {},
                          {})["transition_steps"] == 140
  short = _methods.Budget(num_examples=4000, num_classes=10,
                          steps_per_epoch=31, epochs=5)
  saf = _methods.resolve(_methods.get("saf"), short, {"strength": 0.5},
                         {"delay_epochs": 2})
  assert (saf["start_epoch"], saf["delay_epochs"], saf["strength"]) == (1, 2,
                                                                        0.5)


def test_reseed_matches_building_with_the_seed():
  params = {"w": np.ones((4, 3), np.float32), "b": np.zeros(3, np.float32)}
  for make in (lambda s: sj.esam(seed=s),
               lambda s: sj.ausam(num_examples=10, seed=s)):
    want = make(7).init(params)
    got = _runner._reseed(make(0).init(params), 7)
    jax.tree.map(np.testing.assert_array_equal, got, want)
    keys = lambda s: [np.asarray(x) for x in jax.tree.leaves(s)
                      if np.asarray(x).dtype == np.uint32]
    assert keys(want) and not all(
        np.array_equal(a, b) for a, b in zip(keys(make(0).init(params)),
                                             keys(want)))


def test_import_sharpjax_stays_light():
  code = ("import sys, sharpjax; bad = [m for m in ('sharpjax.cli', "
          "'matplotlib', 'orbax', 'tqdm') if m in sys.modules]; "
          "assert not bad, bad")
  subprocess.run([sys.executable, "-c", code], check=True)


def test_python_dash_m_and_console_script_entry():
  proc = subprocess.run([sys.executable, "-m", "sharpjax.cli", "compare",
                         "--help"], capture_output=True, text=True, check=True)
  for name in _methods.names():
    assert re.search(rf"^  {name} ", proc.stdout, re.M), name
  assert "start_epoch = max(1, epochs // 6)" in proc.stdout
  import pathlib
  pyproject = (pathlib.Path(__file__).resolve().parents[1]
               / "pyproject.toml").read_text()
  assert 'sharpjax = "sharpjax.cli:main"' in pyproject
  # No command: argparse's usage error.
  assert subprocess.run([sys.executable, "-m", "sharpjax.cli"],
                        capture_output=True).returncode == 2


def test_compare_on_cifar_format_images_with_resnet(tmp_path, capsys):
  """CIFAR read from a local .npz (never downloaded), ResNet-18 (narrow),
  the random crop + flip augmentation path; and a clear error without
  --data-dir."""
  rng = np.random.default_rng(0)
  np.savez(tmp_path / "cifar10.npz",
           x_train=rng.integers(0, 255, (128, 32, 32, 3), dtype=np.uint8),
           y_train=rng.integers(0, 10, 128),
           x_test=rng.integers(0, 255, (32, 32, 32, 3), dtype=np.uint8),
           y_test=rng.integers(0, 10, 32))
  out = tmp_path / "out"
  assert main(["compare", "--data", "cifar10", "--data-dir", str(tmp_path),
               "--model", "resnet18", "--width", "4", "--methods", "sgd",
               "--seeds", "1", "--epochs", "1", "--batch-size", "64",
               "--no-sharpness", "--progress", "off", "--out", str(out)]) == 0
  assert "1 seed;" in capsys.readouterr().out
  result = json.loads((out / "results.json").read_text())
  assert [r["method"] for r in result["table"]] == ["sgd"]
  assert result["runs"][0]["steps"] == 2  # 128 images, batches of 64
  assert result["config"]["data_dir"] == str(tmp_path)
  assert main(["compare", "--data", "cifar10", "--methods", "sgd",
               "--out", str(tmp_path / "x")]) == 2
  assert "--data-dir" in capsys.readouterr().err
