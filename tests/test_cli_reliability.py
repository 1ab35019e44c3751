"""Every command-line misuse ends in one line; checkpoints are never a trap.

Each misuse must exit non-zero with one line on stderr that names the flag
or the file, and no traceback; a few of them run through the ``sharpjax``
console script, as a user runs it, the others in process. The checkpoint
scenarios (a corrupt latest checkpoint, ``--resume --step``, a finished run,
unfinished saves, SIGTERM) check what is kept, bit for bit.
"""

import concurrent.futures
import os
import pickle
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from sharpjax import data
from sharpjax.cli import _checkpoint
from sharpjax.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# 240 train / 60 test examples; batch 32 -> 7 steps per epoch.
TINY = ["--num-examples", "300", "--batch-size", "32", "--progress", "off",
        "--model", "mlp", "--width", "16"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
  """A MNIST-1D cache holding the tiny data set, shared by the subprocesses."""
  folder = str(tmp_path_factory.mktemp("cache"))
  data.load_mnist1d(300, cache_dir=folder)
  return folder


@pytest.fixture(autouse=True)
def _cache_env(cache, monkeypatch, tmp_path_factory):
  monkeypatch.setenv("SHARPJAX_CACHE", cache)
  # A command that fails after making its default --out leaves it in the
  # working directory: keep that out of the checkout.
  monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))


def _console(cache):
  """The ``sharpjax`` console script of this environment and its env."""
  script = os.path.join(os.path.dirname(sys.executable), "sharpjax")
  cmd = [script] if os.path.exists(script) else [sys.executable, "-m",
                                                 "sharpjax.cli"]
  env = dict(os.environ, SHARPJAX_CACHE=cache, JAX_PLATFORMS="cpu",
             PYTHONPATH=os.pathsep.join(
                 [ROOT] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
  env.pop("XLA_FLAGS", None)  # one device is enough; starts faster
  # No compilation cache: on the full disk its writes would warn on stderr.
  env.pop("JAX_COMPILATION_CACHE_DIR", None)
  return cmd, env


def _write_cifar_files(folder):
  """Three CIFAR-10 layouts under ``folder``: empty, bad pickle, object npz."""
  empty = folder / "empty"
  empty.mkdir()
  bad = folder / "badpickle" / "cifar-10-batches-py"
  bad.mkdir(parents=True)
  rng = np.random.default_rng(0)
  for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
    batch = {b"data": rng.integers(0, 255, (4, 3072), dtype=np.uint8),
             b"labels": [0, 1, 2, 3]}
    raw = pickle.dumps(batch)
    # data_batch_3 is cut short, as an interrupted download leaves it.
    (bad / name).write_bytes(raw[:len(raw) // 2] if name == "data_batch_3"
                             else raw)
  obj = folder / "objnpz"
  obj.mkdir()
  ragged = np.empty(2, object)
  ragged[0], ragged[1] = np.zeros(3), np.zeros(5)
  np.savez(obj / "cifar10.npz", x_train=ragged, y_train=np.zeros(2),
           x_test=ragged, y_test=np.zeros(2))
  return empty, bad.parent, obj


# Files cannot grow past 2 KiB: the first checkpoint cannot be written (EFBIG,
# what a full disk gives as ENOSPC; Python ignores SIGXFSZ). Through the shell,
# not preexec_fn: forking a multithreaded JAX process to run Python is unsafe.
FULL_DISK = ["/bin/sh", "-c", 'ulimit -f 2 && exec "$0" "$@"']


def _misuses(tmp):
  """``(argv, [what the one line must contain], exit status, prefix)``."""
  afile = tmp / "afile"
  afile.write_text("not a directory")
  ckpt_empty = tmp / "ckpt-empty"
  ckpt_empty.mkdir()
  empty, badpickle, objnpz = _write_cifar_files(tmp)
  # The misused flag comes last: argparse keeps the last value of a flag.
  def t(name, *a):
    return ["train", *TINY, "--out", str(tmp / "out" / name), *a]

  def c(*a):
    return ["compare", "--methods", "sam", *TINY, *a]

  def m(*a):
    return ["measure", str(ckpt_empty), *a]

  usage = [
      (t("w1", "--width", "-3"), ["--width must be an integer >= 1, got -3"]),
      (c("--width", "-3"), ["--width must be an integer >= 1"]),
      (t("w0", "--width", "0"), ["--width must be an integer >= 1, got 0"]),
      (m("--num-examples", "0"), ["--num-examples must be an integer >= 1"]),
      (t("s0", "--save-every", "0"), ["--save-every must be an integer >= 1"]),
      (t("m0", "--max-steps", "0"), ["--max-steps must be an integer >= 1"]),
      (t("m4", "--max-steps", "-4"), ["--max-steps", "got -4"]),
      (t("wu", "--warmup-epochs", "-1"),
       ["--warmup-epochs must be an integer in [0, 20), got -1"]),
      (t("wu5", "--warmup-epochs", "5", "--epochs", "5"),
       ["--warmup-epochs must be an integer in [0, 5), got 5"]),
      (t("mo", "--momentum", "2"),
       ["--momentum must be a finite number in [0, 1), got 2.0"]),
      (t("ln", "--label-noise", "1.5"),
       ["--label-noise must be a finite number in [0, 1], got 1.5"]),
      (t("lr0", "--lr", "0"), ["--lr must be a finite number > 0"]),
      (t("lrn", "--lr", "nan"), ["--lr must be a finite number > 0, got nan"]),
      (t("ne", "--num-examples", "5"),
       ["--num-examples must be an integer >= 10"]),
      (t("st", "--step", "3"), ["--step", "needs --resume"]),
      (c("--seeds", "0"), ["--seeds must be an integer >= 1"]),
      (m("--top-k", "0"), ["--top-k must be an integer >= 1"]),
      (t("rinf", "--rho", "inf"), ["--rho must be a finite number"]),
      (t("dd", "--data-dir", str(tmp)),
       ["--data-dir is read only by --data cifar10 or cifar100"]),
      (t("c0", "--data", "cifar10"), ["--data cifar10", "--data-dir DIR"]),
      (t("c1", "--data", "cifar10", "--data-dir", str(tmp / "missing")),
       ["--data-dir", "missing: no such directory"]),
      (t("sa", "--set", "sam.rho=abc"),
       ["--set sam.rho=abc: sam.rho takes a number, got 'abc'"]),
      (t("sb", "--set", "sam.radius=0.1"),
       ["--set sam.radius=0.1", "no hyper-parameter 'radius'"]),
      (c("--set", "saf.strength=1"), ["--set saf.strength=1", "not selected"]),
      (t("wx", "--width", "x"), ["argument --width: invalid int value: 'x'"]),
      (t("nf", "--no-such-flag"), ["unrecognized arguments: --no-such-flag"]),
      (["train", *TINY, "--out", str(afile)], ["--out", "is a file"]),
      (c("--out", str(afile)), ["--out", "is a file"]),
      (m("--out", str(afile)), ["--out", "is a file"]),
      (c("--out", str(afile / "sub")),
       ["--out", "afile/sub is not a writable directory"]),
      (t("ck", "--ckpt-dir", str(afile)), ["--ckpt-dir", "is a file"]),
      # The library's own checks, through --set.
      (t("lib1", "--set", "sam.rho=-1"), ["method 'sam': rho must be in"]),
      (t("lib2", "--method", "msam", "--set", "msam.num_chunks=7"),
       ["not divisible by num_chunks=7"]),
      (t("lib3", "--method", "ssam", "--set", "ssam.update_every=2.5"),
       ["ssam.update_every must be an integer, got 2.5"]),
      (t("bs2", "--batch-size", "100000"),
       ["--batch-size 100000 is larger than the training set"]),
      (t("cp", "--data", "cifar10", "--data-dir", str(badpickle)),
       ["data_batch_3 is not a CIFAR python-pickle batch"]),
  ]
  if os.path.isdir("/proc"):
    usage.append((t("pr", "--out", "/proc/sharpjax-test/out"),
                  ["--out /proc/sharpjax-test/out is not a writable"]))
  cases = [(argv, needles, 2, []) for argv, needles in usage]
  cases += [
      (c("--data", "cifar10", "--data-dir", str(empty)),
       ["CIFAR-10 not found under", "empty"], 1, []),
      (t("on", "--data", "cifar10", "--data-dir", str(objnpz)),
       ["cifar10.npz is not a CIFAR .npz of numeric arrays",
        "allow_pickle"], 2, []),
      (t("rs", "--resume"), ["checkpoint error: no checkpoint in"], 1, []),
      (["measure", str(tmp / "missing")], ["no checkpoint directory"], 1,
       []),
      (m(), ["no checkpoint in", "ckpt-empty"], 1, []),
      (t("full", "--method", "saf", "--epochs", "2", "--save-every", "5"),
       ["checkpoint error: cannot write checkpoint step 5 in",
        "the previous complete checkpoint is kept", "File too large"], 1,
       FULL_DISK),
  ]
  return cases


# The misuses that also run through the console script, as a user runs them
# (a process start and a jax import each): a range check, an argparse error,
# a data error, a checkpoint error and the full disk. The rest run in process,
# where an uncaught exception fails the test as a traceback would.
THROUGH_THE_CONSOLE = ("w1", "nf", "cp", "rs", "full")


def _in_process(argv, capsys):
  """``main(argv)``'s exit status and stderr, argparse's exits included."""
  try:
    status = main(argv)
  except SystemExit as e:  # argparse's usage errors
    status = e.code
  return status, capsys.readouterr().err


def test_every_misuse_is_one_line(tmp_path, cache, capsys):
  cmd, env = _console(cache)
  cases = _misuses(tmp_path)
  assert len(cases) >= 40

  def console(case):
    argv, _, _, prefix = case
    proc = subprocess.run(prefix + cmd + argv, env=env, capture_output=True,
                          text=True, timeout=600, cwd=tmp_path)
    return proc.returncode, proc.stderr

  def tag(argv):
    out = [a for a in argv if str(tmp_path / "out") in a]
    return os.path.basename(out[0]) if out else None

  console_cases = [c for c in cases if tag(c[0]) in THROUGH_THE_CONSOLE]
  assert len(console_cases) == len(THROUGH_THE_CONSOLE)
  with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
    # The subprocesses run while the in-process cases do.
    running = {id(c): pool.submit(console, c) for c in console_cases}
    results = {id(c): _in_process(c[0], capsys) for c in cases
               if id(c) not in running}
    results.update({key: run.result() for key, run in running.items()})
  bad = []
  for case in cases:
    argv, needles, status, _ = case
    returncode, stderr = results[id(case)]
    lines = [l for l in stderr.splitlines() if l.strip()]
    ok = (returncode == status and len(lines) == 1
          and "Traceback" not in stderr
          and all(n in lines[0] for n in needles))
    if not ok:
      bad.append(f"{' '.join(argv)}\n  -> status {returncode} (want "
                 f"{status}), stderr:\n{stderr[-1500:]}")
  assert not bad, "\n".join(bad)


def _bad_values(rng):
  """Values just outside ``rng`` (a ``_validate.Range``), and non-finite."""
  step = 1 if rng.integer else 0.5
  out = []
  if rng.low is not None and not callable(rng.low):
    out.append(rng.low if rng.low_open else rng.low - step)
  if rng.high is not None and not callable(rng.high):
    out.append(rng.high if rng.high_open else rng.high + step)
  if not rng.integer:
    out += [float("nan"), float("inf")]
  return out


def test_every_range_of_every_command_is_checked(capsys):
  """In process, every entry of the range table: one line naming the flag
  and its range, status 2, before anything is loaded."""
  from sharpjax.cli import _validate  # pylint: disable=g-import-not-at-top
  head = {"compare": ["compare", "--methods", "sam"],
          "train": ["train", "--resume"],  # --step needs it
          "measure": ["measure", "/nonexistent"]}
  tried = 0
  for command, ranges in _validate.RANGES.items():
    for dest, rng in ranges.items():
      for value in _bad_values(rng):
        flag = _validate.flag(dest)
        text = str(int(value)) if rng.integer else str(value)
        assert main(head[command] + [flag, text]) == 2, (command, flag, text)
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(
            f"sharpjax {command}: error: {flag} must be "
            + ("an integer" if rng.integer else "a finite number")), err
        tried += 1
  assert tried >= 40


def test_a_flag_no_selected_method_has_is_said_once(tmp_path, capsys):
  assert main(["train", "--method", "sgd", "--rho", "0.1", "--epochs", "1",
               "--max-steps", "2", *TINY, "--out", str(tmp_path / "r")]) == 0
  err = [l for l in capsys.readouterr().err.splitlines() if l.strip()]
  assert err == ["sharpjax train: warning: --rho is ignored: sgd has no rho "
                 "(it is a hyper-parameter of sam, asam, gsam, looksam, fsam, "
                 "msam, esam, ssam, ausam, sagm, momentum_sam, sampa, "
                 "late_sam)."]


# ---------------------------------------------------------------------------
# Checkpoints through the command line.
# ---------------------------------------------------------------------------


def _leaves(directory, step=None):
  """The leaves (by tree path) and metadata of a train checkpoint."""
  _, state, meta, _ = _checkpoint.load_run(str(directory), step)
  flat, _ = jax.tree_util.tree_flatten_with_path(state)
  return {jax.tree_util.keystr(p): np.asarray(x) for p, x in flat}, meta


def _assert_same(a, b):
  assert sorted(a) == sorted(b)
  for path in a:
    np.testing.assert_array_equal(a[path], b[path], err_msg=path)


def _corrupt(step_dir):
  """Flips bytes in the middle of every array file of a step."""
  for d, _, files in os.walk(os.path.join(step_dir, "state")):
    for name in files:
      path = os.path.join(d, name)
      if "/d" not in d[len(step_dir):] or os.path.getsize(path) < 64:
        continue
      raw = bytearray(open(path, "rb").read())
      for i in range(len(raw) // 2, len(raw) // 2 + 8):
        raw[i] ^= 0xFF
      with open(path, "wb") as f:
        f.write(bytes(raw))


def _train(out, *extra):
  return main(["train", "--method", "saf", "--epochs", "3", "--save-every",
               "5", "--keep-checkpoints", "10", "--seed", "1", *TINY,
               "--out", str(out), *extra])


def test_corrupt_latest_step_resume_step_finished_run_and_tmp_folders(
    tmp_path, capsys):
  # Reference: uninterrupted, every checkpoint kept (5, 10, 15, 20, 21).
  assert _train(tmp_path / "ref") == 0
  ref = tmp_path / "ref" / "checkpoints"
  run = tmp_path / "run"
  ckpt = run / "checkpoints"
  assert _train(run, "--max-steps", "15") == 0
  assert _checkpoint.Checkpointer(ckpt).steps() == [5, 10, 15]
  _corrupt(str(ckpt / "15"))
  (ckpt / "16.orbax-checkpoint-tmp-123" / "state").mkdir(parents=True)
  capsys.readouterr()

  # measure reads past the corrupt step, says which, renames nothing.
  assert main(["measure", str(ckpt), "--num-examples", "32", "--probes", "2",
               "--out", str(tmp_path / "m")]) == 0
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith(
      f"sharpjax measure: warning: checkpoint step 15 in {ckpt} is corrupt")
  assert "restored step 10" in err[0]
  assert '"step": 10' in (tmp_path / "m" / "measure.json").read_text()
  assert (ckpt / "15").is_dir()

  # train --resume: the unfinished save is removed, the corrupt step set
  # aside, the run continues from step 10 and reaches the reference's 15.
  assert _train(run, "--resume", "--max-steps", "15") == 0
  captured = capsys.readouterr()
  err = captured.err.strip().splitlines()
  assert len(err) == 2, err
  assert "removed 1 unfinished checkpoint save" in err[0]
  assert "16.orbax-checkpoint-tmp-123" in err[0]
  assert f"moved to {ckpt / '15.corrupt'}; restored step 10" in err[1]
  assert "resuming saf seed 1 from step 10" in captured.out
  assert sorted(os.listdir(ckpt)) == ["10", "15", "15.corrupt", "5"]
  _assert_same(_leaves(ckpt, 15)[0], _leaves(ref, 15)[0])

  # --resume --step 5: the newer checkpoints are set aside, the run goes on
  # from step 5 to the end, bit-exact with the reference.
  assert _train(run, "--resume", "--step", "5") == 0
  out = capsys.readouterr().out
  assert "resuming saf seed 1 from step 5" in out
  assert "--step 5: the newer checkpoints are set aside" in out
  assert (ckpt / "10.superseded").is_dir()
  # Step 5 itself stays: the run can still be resumed from where it was.
  assert not (ckpt / "5.superseded").exists()
  assert 5 in _checkpoint.Checkpointer(ckpt).steps()
  final, meta = _leaves(ckpt)
  want, want_meta = _leaves(ref)
  assert meta["progress"] == want_meta["progress"] and meta[
      "progress"]["step"] == 21
  _assert_same(final, want)

  # --resume on the finished run: nothing trained, train.json untouched.
  record = (run / "train.json").read_bytes()
  assert _train(run, "--resume") == 0
  out = capsys.readouterr().out
  assert "is finished (step 21 of 21): nothing to train" in out
  assert (run / "train.json").read_bytes() == record
  assert b"NaN" not in record


def test_sigterm_saves_a_checkpoint_and_resumes_bit_exact(tmp_path, cache):
  """SIGTERM to a running ``sharpjax train``: it saves where it is, exits
  143, and --resume continues to the same bits as an uninterrupted run."""
  cmd, env = _console(cache)
  args = ["train", "--method", "sam", "--epochs", "200", "--save-every", "5",
          *TINY]
  stop_at = ["--max-steps", "70"]
  ref = subprocess.run(cmd + args + stop_at + ["--out", str(tmp_path / "r")],
                       env=env, capture_output=True, text=True, timeout=600)
  assert ref.returncode == 0, ref.stderr
  ckpt = tmp_path / "t" / "checkpoints"
  proc = subprocess.Popen(cmd + args + ["--out", str(tmp_path / "t")], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)
  deadline = time.monotonic() + 300
  while not (ckpt / "5").is_dir() and proc.poll() is None:
    assert time.monotonic() < deadline, "no checkpoint within 300 s"
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == 128 + signal.SIGTERM, err
  assert "Traceback" not in err
  assert "terminated (SIGTERM). The last checkpoint is step" in err
  stopped = _checkpoint.Checkpointer(ckpt).steps()[-1]
  assert 5 <= stopped < 70, stopped
  resumed = subprocess.run(
      cmd + args + stop_at + ["--out", str(tmp_path / "t"), "--resume"],
      env=env, capture_output=True, text=True, timeout=600)
  assert resumed.returncode == 0, resumed.stderr
  assert f"from step {stopped}" in resumed.stdout
  got, got_meta = _leaves(ckpt)
  want, want_meta = _leaves(tmp_path / "r" / "checkpoints")
  assert got_meta["progress"] == want_meta["progress"]
  _assert_same(got, want)
