"""sharpjax's checkpoints (launch.save_state / restore_state): verified
restores, the fallback past a corrupt latest step, unfinished saves removed,
failed writes reported, typed PRNG keys."""

import errno
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from sharpjax import launch
from sharpjax._src import checkpoint as ckpt


def _state(value):
  # Random weights do not compress: the largest data file holds their bytes.
  return {"w": jax.random.normal(jax.random.key(100 + int(value)), (4096,)),
          "opt": (jnp.arange(3, dtype=jnp.int32) * int(value),
                  {"bank": jnp.full((4, 5), -value, jnp.float32)}),
          "key": jax.random.key(int(value))}


def _template():
  return jax.tree.map(jnp.zeros_like, _state(0))


def _data_file(directory, step):
  """The largest array file of a step (where the parameters' bytes are)."""
  files = [os.path.join(d, f)
           for d, _, fs in os.walk(os.path.join(directory, str(step), "state"))
           for f in fs if "ocdbt" in d]
  return max(files, key=os.path.getsize)


def _flip_bytes(path):
  raw = bytearray(open(path, "rb").read())
  for i in range(len(raw) // 3, len(raw) // 3 + 16):
    raw[i] ^= 0xFF
  with open(path, "wb") as f:
    f.write(bytes(raw))


def _assert_state(got, value):
  assert jax.tree.structure(got) == jax.tree.structure(_state(value))
  for a, b in zip(jax.tree.leaves(ckpt._keys_as_data(got)),
                  jax.tree.leaves(ckpt._keys_as_data(_state(value)))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _save_steps(directory, steps, keep=None):
  for s in steps:
    launch.save_state(str(directory), s, _state(s), {"step": s}, keep=keep)


def test_round_trip_with_typed_keys_and_integrity_record(tmp_path):
  _save_steps(tmp_path, [1, 2])
  state, meta = launch.restore_state(str(tmp_path), _template())
  assert meta == {"step": 2}
  _assert_state(state, 2)
  assert jax.dtypes.issubdtype(state["key"].dtype, jax.dtypes.prng_key)
  mngr = ckpt._manager(str(tmp_path), None, False)
  leaves = mngr.restore(2, args=ocp.args.Composite(
      integrity=ocp.args.JsonRestore()))["integrity"]["leaves"]
  mngr.close()
  assert [d["path"] for d in leaves] == [
      "['key']", "['opt'][0]", "['opt'][1]['bank']", "['w']"]
  assert all(len(d["sha256"]) == 64 for d in leaves)
  state, meta = launch.restore_state(str(tmp_path), _template(), step=1)
  _assert_state(state, 1)


def test_corrupt_latest_falls_back_with_a_warning_and_is_saved_again(tmp_path):
  _save_steps(tmp_path, [1, 2, 3])
  _flip_bytes(_data_file(tmp_path, 3))
  with pytest.warns(launch.CheckpointWarning,
                    match=r"step 3 .* is corrupt \(leaf \['w'\] does not match "
                          r"its recorded SHA-256.*moved to .*3\.corrupt; "
                          r"restored step 2"):
    state, meta = launch.restore_state(str(tmp_path), _template())
  assert meta == {"step": 2}
  _assert_state(state, 2)
  # Kept aside, not deleted; orbax no longer lists it, so step 3 is saved
  # again by the resumed run.
  assert os.path.isdir(tmp_path / "3.corrupt")
  assert launch.latest_step(str(tmp_path)) == 2
  launch.save_state(str(tmp_path), 3, _state(3), {"step": 3}, keep=None)
  state, _ = launch.restore_state(str(tmp_path), _template())
  _assert_state(state, 3)


def test_an_explicit_corrupt_step_and_all_corrupt_raise(tmp_path):
  _save_steps(tmp_path, [1, 2])
  _flip_bytes(_data_file(tmp_path, 2))
  with pytest.raises(launch.CheckpointError,
                     match=r"step 2 is corrupt: leaf \['w'\].*available steps"):
    launch.restore_state(str(tmp_path), _template(), step=2)
  assert os.path.isdir(tmp_path / "2")  # an explicit step is never renamed
  _flip_bytes(_data_file(tmp_path, 1))
  # Readers (rename=False) leave the directory as it is.
  with pytest.raises(launch.CheckpointError,
                     match=r"no intact checkpoint in .*: step 2: leaf .*; "
                           r"step 1: leaf"):
    ckpt.restore(str(tmp_path), _template(), rename=False)
  assert sorted(os.listdir(tmp_path)) == ["1", "2"]
  with pytest.raises(launch.CheckpointError, match="no checkpoint for step 9"):
    launch.restore_state(str(tmp_path), _template(), step=9)
  with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
    launch.restore_state(str(tmp_path / "none"), _template())


def test_unreadable_metadata_is_corrupt_too(tmp_path):
  _save_steps(tmp_path, [1, 2])
  for d, _, fs in os.walk(tmp_path / "2" / "meta"):
    for f in fs:
      with open(os.path.join(d, f), "w") as fh:
        fh.write("{not json")
  with pytest.warns(launch.CheckpointWarning,
                    match=r"step 2 in .* is corrupt \(its metadata cannot "
                          r"be read"):
    _, meta = launch.restore_state(str(tmp_path), _template())
  assert meta == {"step": 1}


def test_a_template_that_does_not_fit_is_named_not_skipped(tmp_path):
  _save_steps(tmp_path, [1, 2])
  bad = _template()
  bad["w"] = jnp.zeros((65,))
  with pytest.raises(launch.CheckpointError,
                     match=r"step 2 does not fit the template: \['w'\]: "
                           r"checkpoint float32\[4096\], template "
                           r"float32\[65\]"):
    launch.restore_state(str(tmp_path), bad)
  assert launch.latest_step(str(tmp_path)) == 2  # not taken for corruption


def test_checkpoints_without_an_integrity_record_still_restore(tmp_path):
  # What save_state wrote before the record existed: state and meta only.
  import shutil
  _save_steps(tmp_path, [4])
  shutil.rmtree(tmp_path / "4" / "integrity")
  state, meta = launch.restore_state(str(tmp_path), _template())
  assert meta == {"step": 4}
  _assert_state(state, 4)


def test_unfinished_saves_are_removed_by_the_next_save(tmp_path):
  _save_steps(tmp_path, [1])
  tmp = tmp_path / "2.orbax-checkpoint-tmp-1234"
  (tmp / "state").mkdir(parents=True)
  (tmp / "state" / "half").write_bytes(b"x" * 10)
  assert launch.latest_step(str(tmp_path)) == 1  # never listed
  with pytest.warns(launch.CheckpointWarning,
                    match=r"removed 1 unfinished checkpoint save .*"
                          r"2\.orbax-checkpoint-tmp-1234"):
    launch.save_state(str(tmp_path), 2, _state(2))
  assert sorted(os.listdir(tmp_path)) == ["1", "2"]


def test_a_failed_write_is_one_error_and_keeps_the_last_checkpoint(
    tmp_path, monkeypatch):
  _save_steps(tmp_path, [1])
  def full_disk(self, step, *args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device",
                  os.path.join(str(tmp_path), f"{step}.orbax-checkpoint-tmp"))

  monkeypatch.setattr(ocp.CheckpointManager, "save", full_disk)
  with pytest.raises(launch.CheckpointError,
                     match=r"cannot write checkpoint step 2 in .* \(the "
                           r"previous complete checkpoint is kept\): OSError: "
                           r".*No space left on device"):
    launch.save_state(str(tmp_path), 2, _state(2))
  monkeypatch.undo()
  state, _ = launch.restore_state(str(tmp_path), _template())
  _assert_state(state, 1)
  with pytest.raises(launch.CheckpointError, match="cannot create the "
                     "checkpoint directory"):
    (tmp_path / "afile").write_text("")
    launch.save_state(str(tmp_path / "afile" / "ckpt"), 1, _state(1))


_TWO_PROCESS_PROGRAM = '''
import sys
import jax, numpy as np
from sharpjax import launch
launch.initialize()
ckpt, mode = sys.argv[1], sys.argv[2]
mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
def state(v):
  # Random rows (not inlined in orbax's index): each process's files hold
  # the rows of its devices.
  full = np.random.default_rng(0).normal(size=(8, 4096)).astype(np.float32)
  full[:, 0] = v
  return {"w": jax.make_array_from_callback(full.shape, rows,
                                            lambda i: full[i])}
if mode == "save":
  for s in (1, 2):
    launch.save_state(ckpt, s, state(float(s)), {"step": s})
else:
  step = None if mode == "latest" else int(mode)
  got, meta = launch.restore_state(ckpt, state(0.0), step=step)
  values = sorted({float(np.asarray(s.data)[0, 0])
                   for s in got["w"].addressable_shards})
  print(f"restored {meta['step']} values {values}", flush=True)
'''


def test_a_corrupt_checkpoint_in_a_multi_process_run_is_an_error(tmp_path):
  """2 processes x 2 devices; step 2 loses the files process 1 wrote. No
  fallback (the processes' restore calls pair up in orbax's barriers): the
  run stops with the error naming the step, and step=1 restores."""
  import shutil
  import subprocess
  import sys
  script = tmp_path / "program.py"
  script.write_text(_TWO_PROCESS_PROGRAM)
  ckpt = str(tmp_path / "ckpt")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))

  def run(mode):
    proc = subprocess.run(
        [sys.executable, "-m", "sharpjax.launch", "-n", "2", "-d", "2",
         "--timeout", "240", "--", str(script), ckpt, mode], env=env,
        capture_output=True, text=True, timeout=300)
    return proc.returncode, proc.stdout + proc.stderr

  rc, log = run("save")
  assert rc == 0, log
  shutil.rmtree(os.path.join(ckpt, "2", "state", "ocdbt.process_1"))
  rc, log = run("latest")
  assert rc != 0, log
  assert re.search(r"^\[1\] .*CheckpointError: checkpoint .*ckpt step 2 is "
                   r"corrupt: its arrays cannot be read", log, re.M), log
  assert sorted(os.listdir(ckpt)) == ["1", "2"]  # nothing renamed
  rc, log = run("1")
  assert rc == 0, log
  for i in (0, 1):
    assert f"[{i}] restored 1 values [1.0]" in log, log
