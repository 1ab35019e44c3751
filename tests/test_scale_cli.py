"""The command line on every device and every process, grain, TensorBoard.

In-process runs use the 8 host CPU devices of conftest.py; the 2 processes
x 2 devices runs go through ``python -m sharpjax.launch`` on loopback, as
tests/test_multiprocess.py's do (a shared JAX compilation cache keeps their
repeated compilations cheap). Every run is tiny: an MLP of width 16 on 320
MNIST-1D examples, batch 32, 10 steps per epoch, SAF (the penalty reads the
bank from the second epoch on).
"""

import json
import os
import pickle
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from sharpjax.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = ["train", "--method", "saf", "--num-examples", "400", "--batch-size",
       "32", "--epochs", "2", "--model", "mlp", "--width", "16",
       "--progress", "off"]
LIMIT = 400  # seconds for one launched run (a busy 2-core machine)


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
  monkeypatch.setenv("SHARPJAX_CACHE",
                     str(tmp_path_factory.getbasetemp() / "cache"))


def _history(out):
  with open(os.path.join(out, "train.json")) as f:
    payload = json.load(f)
  return payload, payload["result"]["history"]


def _same_history(got, want):
  assert [r["epoch"] for r in got] == [r["epoch"] for r in want]
  for a, b in zip(got, want):
    for k in ("train_loss", "train_accuracy", "test_loss", "test_accuracy"):
      np.testing.assert_allclose(a[k], b[k], rtol=2e-5, atol=2e-6, err_msg=k)


def _events(logdir):
  """``tag -> [(step, value)]`` read back by TensorBoard's own reader."""
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=g-import-not-at-top
  acc = event_accumulator.EventAccumulator(str(logdir))
  acc.Reload()
  return {tag: [(e.step, e.value) for e in acc.Scalars(tag)]
          for tag in acc.Tags()["scalars"]}


@pytest.fixture(scope="module")
def one_device(tmp_path_factory):
  """The reference: the run on one device (no mesh)."""
  out = str(tmp_path_factory.mktemp("one") / "run")
  assert main([*RUN, "--devices", "1", "--out", out]) == 0
  return _history(out)


def test_four_devices_equal_one_and_tensorboard_reads_back(
    one_device, tmp_path, capsys):
  """4 of the host devices, the SAF bank sharded by example: the same
  epochs as one device; the start line and train.json say 4 devices in 1
  process; the TensorBoard events hold the interval means and per-epoch
  test metrics of train.json, and the cosine learning rate."""
  out, tb = str(tmp_path / "run"), tmp_path / "tb"
  assert main([*RUN, "--devices", "4", "--shard-example-tables", "--out", out,
               "--tensorboard", str(tb)]) == 0
  log = capsys.readouterr().out
  assert ("on 4 cpu devices (cpu), batch sharded, per-example tables "
          "sharded by example") in log
  payload, history = _history(out)
  assert payload["parallel"] == {
      "devices": 4, "processes": 1, "platform": "cpu", "device_kind": "cpu",
      "mesh": {"data": 4}, "shard_example_tables": True}
  assert one_device[0]["parallel"]["devices"] == 1
  assert one_device[0]["parallel"]["mesh"] is None
  _same_history(history, one_device[1])

  events = _events(tb)
  for tag in ("train/loss", "train/accuracy", "train/learning_rate",
              "train/penalty", "train/dropped_ids", "test/loss",
              "test/accuracy", "epoch/train_loss"):
    assert tag in events, sorted(events)
  assert [s for s, _ in events["train/loss"]] == [10, 20]  # one per interval
  assert [s for s, _ in events["test/accuracy"]] == [10, 20]
  for (_, value), row in zip(events["test/accuracy"], history):
    assert value == pytest.approx(row["test_accuracy"], rel=1e-6)
  for (_, value), row in zip(events["train/loss"], history):
    assert value == pytest.approx(row["train_loss"], rel=1e-5)
  penalty = dict(events["train/penalty"])
  assert penalty[10] == 0.0 and penalty[20] > 0.0  # SAF on in epoch 2
  lr = dict(events["train/learning_rate"])
  assert lr[10] == pytest.approx(0.05 * 0.5 * (1 + np.cos(np.pi * 9 / 20)),
                                 rel=1e-5)


def test_default_is_every_device_and_a_bad_batch_is_one_line(tmp_path,
                                                              capsys):
  """compare without --devices uses all 8 devices (results.json says so;
  TensorBoard gets one directory per run); a batch size the devices do not
  divide, or too many devices, is one line on stderr and status 2."""
  out = tmp_path / "cmp"
  assert main(["compare", "--methods", "sgd", "--seeds", "1", "--epochs", "1",
               "--num-examples", "300", "--batch-size", "32", "--model",
               "mlp", "--width", "8", "--sharpness-examples", "64",
               "--progress", "off", "--out", str(out), "--tensorboard",
               str(tmp_path / "tb")]) == 0
  assert "on 8 cpu devices (cpu), batch sharded, state replicated" in (
      capsys.readouterr().out)
  with open(out / "results.json") as f:
    results = json.load(f)
  assert results["parallel"]["devices"] == 8
  assert results["runs"][0]["sharpness"] > 0
  assert "test/accuracy" in _events(tmp_path / "tb" / "sgd" / "seed0")

  for extra, message in (
      (["--batch-size", "36"], "--batch-size 36 is not a multiple of the 8 "
       "devices the batch is sharded over"),
      (["--devices", "9"], "--devices must be in [1, 8]"),
      (["--devices", "1", "--shard-example-tables"],
       "--shard-example-tables needs more than one device")):
    assert main([*RUN, "--out", str(tmp_path / "bad"), *extra]) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_cifar_resnet18_bfloat16_on_every_device(tmp_path, capsys):
  """The issue's command on a tiny CIFAR-10 folder made here: ResNet-18
  computing in bfloat16 (float32 parameters) on all 8 devices, TensorBoard
  events written, the devices and the dtype recorded. (SGD: ResNet-18's SAM
  step takes minutes to compile on this 2-core machine; the methods' paths
  over the mesh are the MLP tests'.)"""
  folder = tmp_path / "cifar" / "cifar-10-batches-py"
  folder.mkdir(parents=True)
  rng = np.random.default_rng(0)
  for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
    with open(folder / name, "wb") as f:
      pickle.dump({b"data": rng.integers(0, 256, (16, 3072), dtype=np.uint8),
                   b"labels": rng.integers(0, 10, 16).tolist()}, f)
  out, tb = tmp_path / "run", tmp_path / "runs" / "tb"
  assert main(["train", "--data", "cifar10", "--data-dir",
               str(tmp_path / "cifar"), "--model", "resnet18", "--width", "4",
               "--dtype", "bfloat16", "--tensorboard", str(tb), "--method",
               "sgd", "--batch-size", "32", "--epochs", "1", "--progress",
               "off", "--out", str(out)]) == 0
  assert "on 8 cpu devices" in capsys.readouterr().out
  payload, history = _history(str(out))
  assert payload["parallel"]["devices"] == 8
  assert payload["run"]["config"]["dtype"] == "bfloat16"
  assert np.isfinite(history[0]["train_loss"])
  events = _events(tb)
  assert [s for s, _ in events["test/accuracy"]] == [2]  # 80 / 32: 2 steps
  assert np.isfinite(events["train/loss"][0][1])

  from sharpjax.cli import _setup  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  env = _setup.make_env(_setup.Config(data="cifar10", model="resnet18",
                                      width=4, dtype="bfloat16",
                                      batch_size=32,
                                      data_dir=str(tmp_path / "cifar")))
  assert env.model.dtype == jnp.bfloat16
  params, _, _ = env.initial_params(0)
  import jax  # pylint: disable=g-import-not-at-top
  assert {x.dtype for x in jax.tree.leaves(params)} == {np.dtype("float32")}


# ---------------------------------------------------------------------------
# 2 processes x 2 devices, through the launcher.
# ---------------------------------------------------------------------------


def _launch(tmp_path, *args):
  env = dict(os.environ)
  flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "",
                 env.get("XLA_FLAGS", ""))
  env["XLA_FLAGS"] = flags
  env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
  env["JAX_COMPILATION_CACHE_DIR"] = str(tmp_path.parent / "jax_cache")
  env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
  cmd = [sys.executable, "-m", "sharpjax.launch", "-n", "2", "-d", "2",
         "--timeout", str(LIMIT), "--", "sharpjax", *args]
  sharpjax_bin = os.path.dirname(sys.executable)
  env["PATH"] = sharpjax_bin + os.pathsep + env.get("PATH", "")
  proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True,
                        text=True, timeout=LIMIT + 30)
  log = proc.stdout + proc.stderr
  assert proc.returncode == 0, log[-4000:]
  return log


def test_two_processes_grain_fed_resume_sees_the_same_batches(
    one_device, tmp_path, capsys):
  """2 processes x 2 devices, grain-fed, SAF's bank sharded over both
  processes: the uninterrupted run equals the one-device run; a run stopped
  at step 13 (mid-epoch, checkpoints at 10 and 13) and resumed from its
  checkpoint, grain position included, ends with the same epochs. The
  checkpoint holds each process's grain state at the step it was taken
  (not the prefetched batches ahead of it). Resumed by one process instead
  (grain or numpy loader, other devices), it ends with the same epochs
  too."""
  grain_run = [*RUN, "--loader", "grain", "--shard-example-tables"]
  full = str(tmp_path / "full")
  log = _launch(tmp_path, *grain_run, "--out", full)
  assert "[0] sharpjax train: saf seed 0" in log
  assert "on 4 cpu devices (cpu) in 2 processes" in log
  assert "[1] sharpjax train" not in log  # process 0 alone reports
  for i in (0, 1):  # and each process says it is there, once
    line = (f"[{i}] process {i} of 2: rows {16 * i} to {16 * i + 15} of "
            "every global batch of 32, on 2 local devices")
    assert log.count(line) == 1, log[-3000:]
  payload, history = _history(full)
  assert payload["parallel"]["processes"] == 2
  assert payload["parallel"]["devices"] == 4
  _same_history(history, one_device[1])

  cut = str(tmp_path / "cut")
  _launch(tmp_path, *grain_run, "--out", cut, "--save-every", "5",
          "--max-steps", "13")
  step_dir = os.path.join(cut, "checkpoints", "13", "data")
  for i in (0, 1):
    with open(os.path.join(step_dir, f"process_{i}-of-2.json")) as f:
      assert json.load(f)["next_index"] == 13
  # The same checkpoint resumed by ONE process (4 devices, grain; 1 device,
  # numpy): grain's per-process states do not fit, the loader starts at the
  # step instead, and the run ends with the same epochs.
  for name, flags in (("grain", ["--devices", "4"]),
                      ("numpy", ["--devices", "1", "--loader", "numpy"])):
    one = str(tmp_path / f"one_{name}")
    shutil.copytree(cut, one)
    run = [a for a in grain_run if a != "--shard-example-tables" or
           name == "grain"]
    assert main([*run, "--out", one, "--save-every", "5", "--resume",
                 *flags]) == 0
    log = capsys.readouterr().out
    assert "resuming saf seed 0 from step 13" in log
    if name == "grain":
      assert ("the grain iterator state of checkpoint 13 is not used (the "
              "checkpoint was written by 2 processes, this run has 1)") in log
    payload, history = _history(one)
    assert payload["complete"] and payload["parallel"]["processes"] == 1
    assert payload["loader"]["kind"] == name
    _same_history(history, _history(full)[1])
  log = _launch(tmp_path, *grain_run, "--out", cut, "--save-every", "5",
                "--resume")
  assert "[0] resuming saf seed 0 from step 13" in log
  assert "is not used" not in log  # the same pipeline: its state restored
  payload, history = _history(cut)
  assert payload["complete"]
  _same_history(history, _history(full)[1])
