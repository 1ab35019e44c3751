"""Multi-process data parallelism: 2 processes x 2 CPU devices vs 1 x 4.

The processes are real: ``python -m sharpjax.launch`` starts them, they
connect through ``jax.distributed`` on a loopback coordinator and all-reduce
over gloo. Every run is a subprocess with a timeout, so a hang fails the test
instead of blocking the suite. The training program is this file's
``__main__`` part: SAF + SAM + SGD on 256 MNIST-1D examples (the CNN1D),
batch 64, 4 steps per epoch, the SAF bank sharded by example over the mesh.
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import signal
import subprocess
import sys

import numpy as np
import pytest

HERE = os.path.abspath(__file__)
ROOT = os.path.dirname(os.path.dirname(HERE))
NUM_EXAMPLES, BATCH, STEPS = 256, 64, 6  # 4 steps per epoch: SAF on at step 4
SAVE_AT = 4
LIMIT = 240  # seconds for any one run (a busy 2-core machine compiles slowly)


# ---------------------------------------------------------------------------
# The training program (run as __main__ in each process).
# ---------------------------------------------------------------------------


def _program(argv):
  """Trains STEPS steps; optionally saves, restores, dies; dumps the state."""
  p = argparse.ArgumentParser()
  p.add_argument("--data", required=True)
  p.add_argument("--out", required=True)
  p.add_argument("--ckpt", default=None)
  p.add_argument("--save-at", type=int, default=0)
  p.add_argument("--restore", action="store_true")
  p.add_argument("--die-at", type=int, default=0)
  p.add_argument("--hang-at", type=int, default=0)
  p.add_argument("--steps", type=int, default=STEPS)
  args = p.parse_args(argv)

  import jax  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  import sharpjax as sj  # pylint: disable=g-import-not-at-top
  from sharpjax import data, launch, models, training  # pylint: disable=g-import-not-at-top

  launch.initialize()  # a no-op: the launcher's worker already connected
  index, count = jax.process_index(), jax.process_count()
  arrays = np.load(args.data)
  ds = data.ArrayDataset(arrays["x"], arrays["y"], 10)
  loader = data.DataLoader(ds, BATCH, seed=0, prefetch=0, num_shards=count,
                           shard_index=index)
  spe = loader.steps_per_epoch
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
  tx = optax.chain(
      sj.saf(len(ds), 10, spe, delay_epochs=1, start_epoch=1),
      sj.sam(0.05), optax.sgd(0.1, momentum=0.9))
  trainer = training.make_trainer(models.CNN1D(channels=8), tx, mesh=mesh,
                                  shard_example_tables=True)
  state = trainer.init(jax.random.PRNGKey(0), loader.batch(0, 0))
  start = 0
  if args.restore:
    state, meta = launch.restore_state(args.ckpt, state)
    start = meta["step"]
    assert (meta["epoch"], meta["batch"]) == divmod(start, spe), meta
    print(f"restored step {start}", flush=True)
  for k in range(start, args.steps):
    if args.die_at and k == args.die_at and index == count - 1:
      print(f"process {index} exits at step {k}", flush=True)
      os._exit(3)  # pylint: disable=protected-access
    if args.hang_at and k == args.hang_at and index == count - 1:
      print(f"process {index} stops at step {k}", flush=True)
      os.kill(os.getpid(), signal.SIGSTOP)  # alive, but no more heartbeats
    epoch, b = divmod(k, spe)
    state, metrics = trainer.step(state, loader.batch(epoch, b))
    print(f"step {k + 1} loss {float(metrics['loss']):.5f} "
          f"penalty {float(metrics['penalty']):.5f}", flush=True)
    if args.ckpt and k + 1 == args.save_at:
      e, b = divmod(k + 1, spe)
      launch.save_state(args.ckpt, k + 1, state,
                        {"step": k + 1, "epoch": e, "batch": b})
  # Replicated leaves from this process's first device; the bank's rows
  # from the shards this process holds.
  saf = sj.find_trajectory_state(state.opt_state)
  out = {f"param_{i}": np.asarray(x.addressable_data(0))
         for i, x in enumerate(jax.tree.leaves(state.params))}
  for name in ("logit_bank", "recorded_epoch"):
    full = getattr(saf, name)
    local = np.full(full.shape, np.nan)
    held = np.zeros(full.shape[1], bool)
    for shard in full.addressable_shards:
      local[shard.index] = np.asarray(shard.data)
      held[shard.index[1]] = True
    out[name] = local
    out[name + "_held"] = held
  out["num_devices"] = np.asarray(len(full.sharding.device_set))
  np.savez(os.path.join(args.out, f"proc{index}.npz"), **out)


# ---------------------------------------------------------------------------
# Helpers of the tests.
# ---------------------------------------------------------------------------


def _env(devices, cache):
  env = dict(os.environ)
  flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "",
                 env.get("XLA_FLAGS", ""))
  env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={devices}"
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
  # Runs with the same programs and devices (the 2-process runs) compile once.
  env["JAX_COMPILATION_CACHE_DIR"] = cache
  env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
  return env


def _launch(work, *program_args, launcher_args=()):
  """2 processes x 2 devices through the launcher: (returncode, output)."""
  cmd = [sys.executable, "-m", "sharpjax.launch", "-n", "2", "-d", "2",
         "--timeout", str(LIMIT), *launcher_args, "--", HERE,
         "--data", work["data"], *program_args]
  proc = subprocess.run(cmd, cwd=work["root"], env=_env(2, work["cache"]),
                        capture_output=True, text=True, timeout=LIMIT + 30)
  return proc.returncode, proc.stdout + proc.stderr


def _single(work, devices, *program_args):
  """One plain process (no jax.distributed) with ``devices`` CPU devices."""
  proc = subprocess.run([sys.executable, HERE, "--data", work["data"],
                         *program_args], cwd=work["root"],
                        env=_env(devices, work["cache"]), capture_output=True,
                        text=True, timeout=LIMIT)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  return proc.stdout


def _merged(out_dir):
  """Parameters and the bank assembled from the processes' dumps."""
  dumps = [dict(np.load(f)) for f in sorted(glob.glob(f"{out_dir}/proc*.npz"))]
  merged = {k: v for k, v in dumps[0].items() if k.startswith("param_")}
  for name in ("logit_bank", "recorded_epoch"):
    full = np.full(dumps[0][name].shape, np.nan)
    for d in dumps:
      full[:, d[name + "_held"]] = d[name][:, d[name + "_held"]]
    merged[name] = full
  return merged, dumps


def _close(got, want):
  assert sorted(got) == sorted(want)
  for k in want:
    np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-5,
                               err_msg=k)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
  """256 MNIST-1D training examples in an .npz and a compilation cache."""
  from sharpjax import data  # pylint: disable=g-import-not-at-top
  root = tmp_path_factory.mktemp("multiprocess")
  train, _ = data.load_mnist1d(num_examples=320, train_split=0.8,
                               cache_dir=str(root / "cache"))
  assert len(train) == NUM_EXAMPLES
  npz = str(root / "mnist1d.npz")
  np.savez(npz, x=train.x, y=train.y)
  return {"root": root, "data": npz, "cache": str(root / "jax_cache")}


def _dir(path):
  path.mkdir()
  return str(path)


def test_two_processes_match_one_process_and_restore_into_one(work, tmp_path):
  """2 processes x 2 devices vs 1 process x 4 devices, 6 steps of SAF + SAM
  (SAF's penalty on from step 4): the same parameters and SAF bank, each
  process holding only its half of the bank's rows. Then the checkpoint both
  processes wrote at step 4 restores into 1 process with 2 devices (another
  mesh), which continues to the same state."""
  multi, single, restored = (_dir(tmp_path / n)
                             for n in ("multi", "single", "restored"))
  ckpt = str(tmp_path / "ckpt")
  rc, log = _launch(work, "--out", multi, "--ckpt", ckpt,
                    "--save-at", str(SAVE_AT))
  assert rc == 0, log
  for i in (0, 1):
    assert re.search(rf"^\[{i}\] step 6 ", log, re.M), log
  penalty = re.search(r"^\[0\] step 6 loss \S+ penalty (\S+)", log, re.M)
  assert float(penalty.group(1)) > 0, log
  _single(work, 4, "--out", single)
  got, dumps = _merged(multi)
  want, _ = _merged(single)
  assert len(dumps) == 2
  for d in dumps:
    assert int(d["num_devices"]) == 4
    assert d["logit_bank_held"].sum() == NUM_EXAMPLES // 2
  assert not (dumps[0]["logit_bank_held"] & dumps[1]["logit_bank_held"]).any()
  assert not np.isnan(got["logit_bank"]).any()
  _close(got, want)
  # The bank was written in epoch 0 and read in epoch 1: real targets.
  assert (got["recorded_epoch"] == 1).sum() == 2 * BATCH

  out = _single(work, 2, "--out", restored, "--ckpt", ckpt, "--restore")
  assert f"restored step {SAVE_AT}" in out
  again, dumps = _merged(restored)
  assert int(dumps[0]["num_devices"]) == 2
  _close(again, got)


def test_a_dying_process_fails_the_other(work, tmp_path):
  """Process 1 exits at step 2 and the launcher leaves process 0 alone
  (--no-kill): process 0 fails with an error naming the lost peer (from its
  next collective or from the coordination service), it exits by itself (no
  launcher timeout), and the checkpoint of step 1 stays the latest complete
  one."""
  from sharpjax import launch  # pylint: disable=g-import-not-at-top
  ckpt = str(tmp_path / "ckpt")
  rc, log = _launch(work, "--out", str(tmp_path), "--ckpt", ckpt,
                    "--save-at", "1", "--die-at", "2",
                    launcher_args=["--no-kill"])
  # Both fail; which one the launcher sees first depends on its polling.
  assert rc in (1, 3), log
  assert "[1] process 1 exits at step 2" in log
  assert "[launch] process 1 exited with status 3" in log
  # Process 0 ends with the collective's Python error (status 1) or, when
  # the coordination service sees the missing heartbeats first (the step
  # is queued without waiting, so it can), terminated by it (SIGABRT).
  assert re.search(r"\[launch\] process 0 exited with status (1|-6)\.", log), log
  assert re.search(r"^\[0\] .*Error.*(Gloo|peer|connection|unhealthy)", log,
                   re.M | re.I), log
  assert "[launch] timeout" not in log
  assert not re.search(r"^\[0\] step 3 ", log, re.M), log
  assert launch.latest_step(ckpt) == 1


def test_a_hung_process_is_caught_by_the_heartbeat(work, tmp_path):
  """Process 1 stops (SIGSTOP: its sockets stay open, so no collective
  fails): the coordination service misses its heartbeats (3 s timeout) and
  terminates process 0 with an error naming task 1; the launcher then kills
  the stopped process and returns process 0's status (SIGABRT)."""
  rc, log = _launch(work, "--out", str(tmp_path), "--hang-at", "2",
                    launcher_args=["--heartbeat-timeout", "3"])
  assert "[1] process 1 stops at step 2" in log
  assert "stopped sending heartbeats" in log, log
  assert re.search(r"\[launch\] process 0 exited with status -?\d+; "
                   "stopping the others.", log), log
  assert rc == 128 + signal.SIGABRT, log
  assert "[launch] timeout" not in log


# ---------------------------------------------------------------------------
# In-process pieces (no subprocess).
# ---------------------------------------------------------------------------


def test_loader_shards_are_the_global_batch_in_process_order():
  """num_shards loaders, concatenated in shard order, give the global batch
  (x, y and ids together); process_rows cuts the same blocks."""
  from sharpjax import data, launch  # pylint: disable=g-import-not-at-top
  ds = data.make_synthetic(48, input_shape=(3,), num_classes=4, seed=1)
  full = data.DataLoader(ds, 12, seed=2, prefetch=0)
  shards = [data.DataLoader(ds, 12, seed=2, num_shards=3, shard_index=i)
            for i in range(3)]
  for epoch in (0, 1):
    for want, *parts in zip(full.epoch(epoch),
                            *(d.epoch(epoch) for d in shards)):
      for k in ("x", "y", "ids"):
        np.testing.assert_array_equal(
            np.concatenate([p[k] for p in parts]), want[k])
      for i, part in enumerate(parts):
        rows = launch.process_rows(want, i, 3)
        for k in ("x", "y", "ids"):
          np.testing.assert_array_equal(rows[k], part[k])
  assert len(shards[0]) == len(full) == 4
  with pytest.raises(ValueError, match="multiple of num_shards"):
    data.DataLoader(ds, 10, num_shards=3, shard_index=0)
  with pytest.raises(ValueError, match="shard_index"):
    data.DataLoader(ds, 12, num_shards=3, shard_index=3)
  with pytest.raises(ValueError, match="drop_last"):
    data.DataLoader(ds, 12, num_shards=3, drop_last=False)
  with pytest.raises(ValueError, match="not divisible by the 5"):
    launch.process_rows(full.batch(0, 0), 0, 5)


def test_ausam_table_sharded_by_example_over_the_mesh():
  """make_trainer(shard_example_tables=True) shards AUSAM's scores and visits by
  example over the data axis: same scores, visits and parameters as the
  replicated table; a table not a multiple of the devices is refused."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  import sharpjax as sj  # pylint: disable=g-import-not-at-top
  from sharpjax import data, training  # pylint: disable=g-import-not-at-top

  ds = data.make_synthetic(64, input_shape=(5,), num_classes=3, seed=0)
  loader = data.DataLoader(ds, 16, seed=0, prefetch=0)
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:4]), ("data",))
  model = nn.Dense(3)

  def run(shard, n=64):
    tx = optax.chain(sj.ausam(0.05, keep=0.5, num_examples=n),
                     optax.sgd(0.1))
    trainer = training.make_trainer(model, tx, mesh=mesh, train_kwarg=None,
                                    shard_example_tables=shard)
    state = trainer.init(jax.random.PRNGKey(0), loader.batch(0, 0))
    for k in range(6):
      state, _ = trainer.step(state, loader.batch(*divmod(k, 4)))
    return state

  rep, by_example = run(False), run(True)
  table = by_example.opt_state[0]
  assert table.scores.sharding.spec == jax.sharding.PartitionSpec("data")
  assert table.visits.sharding.spec == jax.sharding.PartitionSpec("data")
  assert rep.opt_state[0].scores.sharding.is_fully_replicated
  assert int(np.sum(np.asarray(table.visits))) == 6 * 8
  np.testing.assert_array_equal(table.visits, rep.opt_state[0].visits)
  np.testing.assert_allclose(table.scores, rep.opt_state[0].scores,
                             rtol=1e-5, atol=1e-7)
  for a, b in zip(jax.tree.leaves(by_example.params),
                  jax.tree.leaves(rep.params)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="num_examples=68"):
    run(True, n=66)


def test_checkpoint_reshards_a_mesa_state_and_continues(tmp_path):
  """MESA (teacher in the optimizer state) + SAF-free chain on a 4-device
  mesh, checkpointed after 3 steps, restored onto a 2-device mesh: the same
  leaves (teacher included), placed on the new mesh, and the next step's
  parameters equal those of the uninterrupted run."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import sharpjax as sj  # pylint: disable=g-import-not-at-top
  from sharpjax import data, launch, training  # pylint: disable=g-import-not-at-top

  ds = data.make_synthetic(32, input_shape=(5,), num_classes=3, seed=0)
  loader = data.DataLoader(ds, 8, seed=0, prefetch=0)

  def trainer(devices):
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:devices]), ("data",))
    tx = optax.chain(sj.mesa(0.5, start_epoch=0, steps_per_epoch=4),
                     optax.sgd(0.1, momentum=0.9))
    return training.make_trainer(nn.Dense(3), tx, mesh=mesh,
                                 train_kwarg=None)

  four, two = trainer(4), trainer(2)
  state = four.init(jax.random.PRNGKey(0), loader.batch(0, 0))
  for k in range(3):
    state, _ = four.step(state, loader.batch(0, k))
  launch.save_state(str(tmp_path), 3, state, {"step": 3, "epoch": 0,
                                              "batch": 3})
  assert launch.latest_step(str(tmp_path)) == 3
  template = two.init(jax.random.PRNGKey(1), loader.batch(0, 0))
  restored, meta = launch.restore_state(str(tmp_path), template)
  assert meta == {"step": 3, "epoch": 0, "batch": 3}
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
    np.testing.assert_array_equal(a, b)
    assert len(a.sharding.device_set) == 2
  teacher = sj.find_trajectory_state(restored.opt_state).teacher_params
  assert not np.allclose(jax.tree.leaves(teacher)[0],
                         jax.tree.leaves(restored.params)[0])
  want, _ = four.step(state, loader.batch(0, 3))
  got, _ = two.step(restored, loader.batch(0, 3))
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
  # A typed PRNG key (the README's state holds one) round-trips as a key.
  keyed = {"rng": jax.random.key(5), "w": jnp.ones(2)}
  launch.save_state(str(tmp_path), 4, keyed)
  back, _ = launch.restore_state(
      str(tmp_path), {"rng": jax.random.key(0), "w": jnp.zeros(2)}, step=4)
  assert jax.dtypes.issubdtype(back["rng"].dtype, jax.dtypes.prng_key)
  np.testing.assert_array_equal(jax.random.key_data(back["rng"]),
                                jax.random.key_data(keyed["rng"]))
  np.testing.assert_array_equal(jax.random.uniform(back["rng"]),
                                jax.random.uniform(keyed["rng"]))


def _launch_script(tmp_path, name, source, timeout_s):
  """``source``, written to ``tmp_path / name``, run by the launcher as 2
  processes of 1 device each with ``--timeout timeout_s``."""
  script = tmp_path / name
  script.write_text(source)
  cmd = [sys.executable, "-m", "sharpjax.launch", "-n", "2", "-d", "1",
         "--timeout", str(timeout_s), "--", str(script)]
  return subprocess.run(cmd, cwd=tmp_path, env=_env(1, str(tmp_path / "c")),
                        capture_output=True, text=True, timeout=LIMIT)


def test_launcher_timeout_stops_a_hanging_run(tmp_path):
  """A process that never finishes: the launcher's --timeout kills every
  process still running and returns 124."""
  proc = _launch_script(
      tmp_path, "sleepy.py",
      "import time, jax\n"
      "print('up', jax.process_index(), jax.process_count(), flush=True)\n"
      "if jax.process_index() == 1:\n"
      "  time.sleep(600)\n", timeout_s=15)
  log = proc.stdout + proc.stderr
  assert proc.returncode == 124, log
  assert "[0] up 0 2" in log and "[1] up 1 2" in log, log
  assert re.search(r"\[launch\] timeout after 15 s; killing processes "
                   r"\[(0, )?1\]", log), log


def test_launcher_output_is_one_line_per_message(tmp_path):
  """A worker's output arrives whole lines at a time: a line written in
  pieces on stdout is not split by a line on stderr written in between (as
  the runtime's gloo lines were, into print()'s text and its newline), and
  every line carries its process's prefix."""
  proc = _launch_script(
      tmp_path, "pieces.py",
      "import os, sys\n"
      "sys.stdout.write('first half, '); sys.stdout.flush()\n"
      "os.write(2, b'[Gloo] a line of the runtime\\n')\n"
      "print('second half')\n"
      "print('x' * 5000)\n", timeout_s=120)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  lines = proc.stdout.splitlines()
  for i in (0, 1):
    assert f"[{i}] first half, second half" in lines, lines
    assert f"[{i}] [Gloo] a line of the runtime" in lines, lines
    assert f"[{i}] " + "x" * 5000 in lines
  assert all(re.match(r"\[(0|1|launch)\] ", line) for line in lines), lines


def test_launcher_rejects_bad_arguments(capsys):
  from sharpjax import launch  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError, match="num_processes"):
    launch.launch(["x.py"], num_processes=0)
  with pytest.raises(ValueError, match="devices_per_process"):
    launch.launch(["x.py"], devices_per_process=0)
  with pytest.raises(SystemExit):
    launch.main(["-n", "2"])
  assert "no command" in capsys.readouterr().err


if __name__ == "__main__":
  _program(sys.argv[1:])
