"""The benchmark scripts run end to end (tiny budgets; the numbers are not checked).

A broken benchmark would otherwise go unnoticed until someone regenerates the
README's tables. Each script runs as a user runs it (``python benchmarks/...``)
with a budget of seconds, writing into a temporary directory.
"""

import importlib
import json
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def import_script(name):
  """Imports benchmarks/<name>.py as its own run would (benchmarks/ first)."""
  sys.path.insert(0, str(ROOT / "benchmarks"))
  try:
    return importlib.import_module(name)
  finally:
    sys.path.remove(str(ROOT / "benchmarks"))


def run_script(name, *args):
  proc = subprocess.run(
      [sys.executable, str(ROOT / "benchmarks" / name), *args],
      capture_output=True, text=True, cwd=ROOT, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


def test_overhead_writes_a_ratio_for_every_method_asked(tmp_path):
  run_script("overhead.py", "--methods", "sam", "saf", "--steps", "1",
             "--repeats", "1", "--warmup", "1", "--out", str(tmp_path))
  result = json.loads((tmp_path / "overhead.json").read_text())
  rows = {r["method"]: r for r in result["results"]}
  assert set(rows) == {"sgd", "sam", "saf"}
  assert rows["sgd"]["ratio_to_sgd"] == 1.0
  assert all(r["ms_per_step"] > 0 for r in rows.values())
  # Compute beside time: XLA's FLOP count, SAM's two passes against SGD's one.
  assert rows["sgd"]["flops_ratio"] == 1.0
  assert 1.9 < rows["sam"]["flops_ratio"] < 2.1
  assert 0.99 < rows["saf"]["flops_ratio"] < 1.05
  assert rows["sam"]["flops_per_step"] == pytest.approx(
      rows["sam"]["flops_ratio"] * rows["sgd"]["flops_per_step"])
  assert result["meta"]["commit"]
  md = (tmp_path / "overhead.md").read_text()
  assert "| sam | 10 |" in md and "compute x SGD" in md
  assert f"| {rows['sam']['flops_ratio']:.2f}x |" in md


def test_overhead_through_the_trainer_times_a_hand_written_sgd_beside_it(
    tmp_path):
  run_script("overhead.py", "--trainer", "--methods", "sam", "saf",
             "optax.contrib.sam (opaque)", "--steps", "1", "--repeats", "1",
             "--warmup", "0", "--batch", "16", "--out", str(tmp_path))
  result = json.loads((tmp_path / "overhead-trainer.json").read_text())
  rows = {r["method"]: r for r in result["results"]}
  assert set(rows) == {"sgd", "sgd (hand-written step)", "sam", "saf",
                       "optax.contrib.sam (opaque)"}
  assert rows["sam"]["ms_per_step"] > 0
  assert rows["optax.contrib.sam (opaque)"]["ms_per_step"] is None
  assert "grad_fn" in rows["optax.contrib.sam (opaque)"]["note"]
  assert result["meta"]["step_kind"] == "make_trainer"
  assert result["meta"]["batch"] == 16


def test_overhead_runs_a_wide_resnet_in_bfloat16(tmp_path):
  run_script("overhead.py", "--model", "wrn28-10", "--dtype", "bfloat16",
             "--methods", "sgd", "--steps", "1", "--repeats", "1",
             "--warmup", "0", "--batch", "2", "--out", str(tmp_path))
  result = json.loads((tmp_path / "overhead-wrn28-10-bfloat16.json")
                      .read_text())
  assert result["meta"]["dtype"] == "bfloat16"
  assert "WideResNet-28-10" in result["meta"]["model"]
  assert result["results"][0]["ms_per_step"] > 0


def test_overhead_writes_one_file_per_device_kind_model_and_dtype():
  stem = import_script("overhead").results_stem
  assert stem("cnn1d", "float32", False, "cpu", "cpu") == "overhead"
  assert stem("resnet18", "float32", False, "cpu", "cpu") == "overhead-resnet18"
  assert (stem("wrn28-10", "bfloat16", True, "gpu", "NVIDIA H200")
          == "overhead-wrn28-10-bfloat16-trainer-nvidia-h200")


def test_overhead_rejects_an_unknown_method(tmp_path):
  proc = subprocess.run(
      [sys.executable, str(ROOT / "benchmarks" / "overhead.py"), "--methods",
       "sharp", "--out", str(tmp_path)], capture_output=True, text=True,
      cwd=ROOT, timeout=300)
  assert proc.returncode == 2
  assert "unknown methods ['sharp']" in proc.stderr


def test_generalization_writes_table_json_and_plot(tmp_path):
  run_script("generalization.py", "--methods", "sgd", "saf", "--seeds", "1",
             "--epochs", "1", "--width", "4", "--noise", "0.0", "0.2",
             "--out", str(tmp_path))
  result = json.loads((tmp_path / "generalization.json").read_text())
  cells = {(r["noise"], r["method"]) for r in result["results"]}
  assert cells == {(n, m) for n in (0.0, 0.2) for m in ("sgd", "saf")}
  table = (tmp_path / "generalization.md").read_text()
  assert "| saf |" in table and "20% noise" in table
  assert (tmp_path / "generalization.png").stat().st_size > 0


def test_cifar_scale_needs_an_accelerator(tmp_path):
  proc = subprocess.run(
      [sys.executable, str(ROOT / "benchmarks" / "generalization.py"),
       "--scale", "cifar10", "--arch", "wrn28-10", "--data-dir", str(tmp_path),
       "--out", str(tmp_path)],
      capture_output=True, text=True, cwd=ROOT, timeout=300)
  assert proc.returncode != 0
  assert "wrn28-10 for 200 epochs: it needs an accelerator" in proc.stderr


def test_cifar_table_prints_the_papers_numbers_beside_the_measured():
  generalization = import_script("generalization")
  row = lambda m, acc, cost: dict(
      method=m, test_accuracy_mean=acc, test_accuracy_std=0.001,
      cost_ratio=cost)
  levels = {0.0: {"table": [row("sgd", 0.95, 1.0), row("saf", 0.96, 1.02),
                            row("asam", 0.955, 2.0)]}}
  meta = dict(data_note="CIFAR10", model_note="wrn28-10", epochs=200, seeds=3,
              commit="abc", date="today", device="gpu")
  table = generalization.markdown(
      levels, meta, generalization.PAPER_CIFAR[("cifar10", "wrn28-10")])
  lines = table.splitlines()
  assert lines[2].endswith("paper: acc % (time × SGD) |")
  assert lines[4] == "| sgd | 95.00 ± 0.10 |  |  | 1.00x | 96.50 (1.00x) |"
  assert lines[5] == "| saf | 96.00 ± 0.10 |  |  | 1.02x | 97.08 (1.01x) |"
  assert lines[6].endswith("| 2.00x |  |")  # no paper row for ASAM


def test_overhead_table_shows_an_untimed_row_with_its_reason():
  overhead = import_script("overhead")
  meta = dict(repeats=3, steps=5, model="ResNet-18", batch=128, device="cpu",
              cpu_count=2, jax="x", commit="abc", date="today")
  rows = [dict(method="sgd", num_classes=10, ms_per_step=4000.0,
               ratio_to_sgd=1.0, ratio_iqr=[1.0, 1.0], temp_bytes=2**20,
               flops_per_step=1.1e9, flops_ratio=1.0, note=""),
          dict(method="sam", num_classes=10, ms_per_step=8000.0,
               ratio_to_sgd=1.95, ratio_iqr=[1.9, 2.05], temp_bytes=None,
               flops_per_step=2.2e9, flops_ratio=2.0, note=""),
          dict(method="looksam", num_classes=10, ms_per_step=None,
               ratio_to_sgd=None, temp_bytes=None, flops_per_step=None,
               flops_ratio=None, note="not timed: slow")]
  lines = overhead.markdown(rows, meta).splitlines()
  assert lines[-3] == ("| sgd | 10 | 4000.000 | 1.00x | 1.00-1.00 | 1.00x | "
                       "1.1 | 1.00 |  |")
  assert lines[-2] == ("| sam | 10 | 8000.000 | 1.95x | 1.90-2.05 | 2.00x | "
                       "2.2 |  |  |")
  assert lines[-1] == "| looksam | 10 | | | |  |  | | not timed: slow |"


class _FakeRunner:
  """A runner whose windows take the times it is given, in order."""

  def __init__(self, name, window_times, log):
    self.method = type("M", (), {"name": name})()
    self.window_times, self.log = list(window_times), log
    self.times, self.ratios = [], []

  def run(self, steps):
    self.log.append(self.method.name)
    return self.window_times.pop(0)


def test_overhead_pairs_every_window_with_the_sgd_window_just_before_it():
  # The machine slows down 3x between the two methods' windows: a ratio of
  # minima would mix the two speeds, the paired ratios do not.
  time_windows = import_script("overhead").time_windows
  log = []
  sgd = _FakeRunner("sgd", [1.0, 3.0], log)
  sam = _FakeRunner("sam", [2.0], log)
  msam = _FakeRunner("msam", [7.5], log)
  baseline_of = {"sgd": sgd, "sam": sgd, "msam": sgd}
  time_windows([sgd, sam, msam], baseline_of, steps=30)
  assert log == ["sgd", "sam", "sgd", "msam"]
  assert sam.ratios == [2.0] and msam.ratios == [2.5]
  assert sgd.times == [1.0, 3.0] and sgd.ratios == [1.0, 1.0]


def test_overhead_times_an_unpaired_baseline_on_its_own():
  time_windows = import_script("overhead").time_windows
  log = []
  sgd = _FakeRunner("sgd", [1.0], log)
  time_windows([sgd], {"sgd": sgd}, steps=30)
  assert log == ["sgd"] and sgd.times == [1.0] and sgd.ratios == [1.0]


def test_input_pipeline_times_every_feeding_mode(tmp_path):
  run_script("input_pipeline.py", "--steps", "2", "--repeats", "1",
             "--batch", "8", "--model", "mlp", "--width", "4",
             "--grain-workers", "0",
             "--read-ms", "5", "--out", str(tmp_path))
  result = json.loads((tmp_path / "input_pipeline.json").read_text())
  rows = {r["mode"]: r for r in result["results"]}
  assert list(rows) == ["on device", "host, in the loop",
                        "DataLoader + prefetch"]
  assert rows["on device"]["above_floor"] == 0.0
  # The loop waited for the simulated 5 ms reads only when loading in it.
  assert rows["host, in the loop"]["wait_ms_per_step"] >= 5.0
  assert result["meta"]["read_ms"] == 5.0
  assert "| DataLoader + prefetch |" in (
      tmp_path / "input_pipeline.md").read_text()


def test_accelerator_smoke_writes_time_and_compute_for_both_models(tmp_path):
  # One method beside SGD keeps it short (smoke mode's default adds LookSAM).
  run_script("accelerator.py", "--smoke", "--methods", "saf", "--steps", "1",
             "--warmup", "0", "--out", str(tmp_path))
  result = json.loads((tmp_path / "accelerator-smoke-cpu.json").read_text())
  meta = result["meta"]
  assert meta["smoke"] and meta["commit"] and meta["device"] == "cpu"
  tables = result["tables"]
  assert [(t["model_key"], t["dtype"]) for t in tables] == [
      ("resnet18", "float32"), ("wrn28-10", "bfloat16")]
  for table in tables:
    rows = {r["method"]: r for r in table["results"]}
    assert set(rows) == {"sgd", "saf"}
    assert all(r["ms_per_step"] > 0 for r in rows.values())
    # XLA's counts, not timings: SAF adds a KL and the bank's update to SGD.
    assert rows["sgd"]["flops_ratio"] == 1.0
    assert 0.99 < rows["saf"]["flops_ratio"] < 1.05
    assert rows["saf"]["flops_per_step"] == pytest.approx(
        rows["saf"]["flops_ratio"] * rows["sgd"]["flops_per_step"])
  md = (tmp_path / "accelerator-smoke-cpu.md").read_text()
  assert md.count("| compute x SGD |") == 2 and "| saf |" in md


def test_accelerator_keeps_to_its_budget_by_listing_what_it_skipped(
    tmp_path):
  accelerator = import_script("accelerator")

  class Args:
    warmup, batch, steps, repeats = 0, 4, 1, 5

  # No time for anything but the baselines: every method is listed as not
  # run, with the reason, and the table still has SGD's row.
  table = accelerator.run_config("resnet18", "float32", ["sgd", "sam"],
                                 Args, 0.0, accelerator.SMOKE_MODELS)
  rows = {r["method"]: r for r in table["results"]}
  assert rows["sgd"]["ms_per_step"] > 0 and table["repeats"] == 1
  assert rows["sam"]["ms_per_step"] is None
  assert "time budget" in rows["sam"]["note"]


def test_compute_counts_the_passes_each_method_asks_for(tmp_path):
  run_script("compute.py", "--model", "cnn", "--methods", "sam", "ausam",
             "momentum_sam", "--out", str(tmp_path))
  rows = json.loads((tmp_path / "compute-cnn.json").read_text())["rows"]
  assert set(rows) == {"sgd", "sam", "ausam", "momentum_sam"}
  assert rows["sgd"]["flops_ratio"] == 1.0
  assert 1.99 < rows["sam"]["flops_ratio"] < 2.02
  # AUSAM's own passes on half the batch, no clean pass; Momentum-SAM's one point.
  assert (rows["ausam"]["passes"], rows["momentum_sam"]["passes"]) == (
      "own", "points")
  assert rows["ausam"]["flops_ratio"] < 1.05
  assert rows["momentum_sam"]["flops_ratio"] < 1.02
  md = (tmp_path / "compute-cnn.md").read_text()
  assert f"| sam | clean | " in md and "compute x SGD" in md


def test_compute_refuses_an_unknown_method_in_one_line(tmp_path):
  proc = subprocess.run(
      [sys.executable, str(ROOT / "benchmarks" / "compute.py"), "--methods",
       "sgdd", "--out", str(tmp_path)],
      capture_output=True, text=True, cwd=ROOT, timeout=300)
  assert proc.returncode == 2
  assert "--methods: unknown ['sgdd']" in proc.stderr
  assert "Traceback" not in proc.stderr
