"""Resume anywhere: other devices, the TensorBoard events, train.json, and
the command line's checks that a seeded bug once slipped past.

The 2 processes -> 1 process resumes (grain and numpy loaders) extend the
launched runs of tests/test_scale_cli.py; the grain workers' end with a
killed parent is in tests/test_input_pipeline.py.
"""

import json
import os

import numpy as np
import pytest

from sharpjax.cli import _checkpoint
from sharpjax.cli import _report
from sharpjax.cli import _runner
from sharpjax.cli import main

# SAF on 322 synthetic training examples: with --shard-example-tables on 4
# devices the bank has 324 rows (rounded up), on one device 322.
RUN = ["train", "--method", "saf", "--data", "synthetic", "--num-examples",
       "403", "--batch-size", "32", "--epochs", "2", "--model", "mlp",
       "--width", "16", "--save-every", "5", "--progress", "off"]


def _events(logdir):
  """``tag -> [(step, value)]`` read back by TensorBoard's own reader."""
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=g-import-not-at-top
  acc = event_accumulator.EventAccumulator(str(logdir))
  acc.Reload()
  return {tag: [(e.step, e.value) for e in acc.Scalars(tag)]
          for tag in acc.Tags()["scalars"]}


def _record(out):
  with open(os.path.join(out, "train.json")) as f:
    return json.load(f)


def test_four_device_run_resumes_on_one_device_with_the_same_events(
    tmp_path, monkeypatch):
  """A run on 4 devices with SAF's bank sharded by example (324 rows)
  stopped at step 13, between two log points (10 and 15), resumes on one
  device (322 rows): the same epochs as the uninterrupted 4-device run, and
  its TensorBoard events are the uninterrupted run's, point for point (the
  interval 11..15 averaged over all five steps, the epoch points at the
  checkpoint kept). At every checkpoint train.json records the step and
  the loader, and the events up to the step are on disk."""
  pytest.importorskip("tensorboard")
  full, cut = str(tmp_path / "full"), str(tmp_path / "cut")
  four = ["--devices", "4", "--shard-example-tables"]
  assert main([*RUN, *four, "--out", full,
               "--tensorboard", str(tmp_path / "tb_full")]) == 0

  seen = []  # at each save: the step, train.json's step, events on disk
  save = _checkpoint.Checkpointer.save

  def spy(self, state, run, progress, extra=None, data_iterator=None):
    on_disk = _events(tmp_path / "tb_cut")
    step = save(self, state, run, progress, extra, data_iterator)
    seen.append((step, _record(cut)["step"] if os.path.exists(
        os.path.join(cut, "train.json")) else None,
                 sorted({s for v in on_disk.values() for s, _ in v}),
                 extra["loader"]))
    return step

  monkeypatch.setattr(_checkpoint.Checkpointer, "save", spy)
  assert main([*RUN, *four, "--out", cut, "--max-steps", "13",
               "--tensorboard", str(tmp_path / "tb_cut")]) == 0
  monkeypatch.undo()
  # Before the save of step k every event up to k is on disk; train.json is
  # rewritten right after each save.
  assert [(s, e) for s, _, e, _ in seen] == [(5, [5]), (10, [5, 10]),
                                             (13, [5, 10])]
  assert [r for _, r, _, _ in seen] == [None, 5, 10]
  loader = seen[0][3]
  assert loader == {"kind": "numpy", "batch_size": 32, "seed": 0,
                    "shuffle": True, "processes": 1, "augment": None,
                    "prefetch": 2}
  record = _record(cut)
  assert (record["step"], record["complete"], record["loader"]) == (
      13, False, loader)
  assert record["result"]["steps"] == 13

  assert main([*RUN, "--devices", "1", "--out", cut, "--resume",
               "--tensorboard", str(tmp_path / "tb_cut")]) == 0
  got, want = _record(cut), _record(full)
  assert got["complete"] and got["parallel"]["devices"] == 1
  assert [r["epoch"] for r in got["history"]] == [1, 2]
  for a, b in zip(got["history"], want["history"]):
    for k in ("train_loss", "train_accuracy", "test_loss", "test_accuracy"):
      np.testing.assert_allclose(a[k], b[k], rtol=2e-5, atol=2e-6,
                                 err_msg=k)
  ev_got, ev_want = _events(tmp_path / "tb_cut"), _events(tmp_path / "tb_full")
  assert sorted(ev_got) == sorted(ev_want)
  for tag, points in ev_want.items():
    assert [s for s, _ in ev_got[tag]] == [s for s, _ in points], tag
    np.testing.assert_allclose([v for _, v in ev_got[tag]],
                               [v for _, v in points], rtol=1e-4, atol=1e-6,
                               err_msg=tag)
  assert [s for s, _ in ev_want["train/loss"]] == [5, 10, 15, 20]
  assert [s for s, _ in ev_want["test/accuracy"]] == [10, 20]


def test_tensorboard_resumed_at_a_step_keeps_that_steps_points(tmp_path):
  """A log resumed at the checkpoint of step 10 drops what the interrupted
  run wrote after 10 and keeps step 10's points (the epoch's test metrics),
  which the resumed run does not write again."""
  pytest.importorskip("tensorboard")
  from sharpjax.cli import _tensorboard  # pylint: disable=g-import-not-at-top
  first = _tensorboard.TensorBoardLog(str(tmp_path))
  for step in (5, 10, 12):
    first.scalars(step, {"train/loss": float(step)})
  first.scalars(10, {"test/accuracy": 0.5})
  first.close()
  again = _tensorboard.TensorBoardLog(str(tmp_path), resumed_at=10)
  again.scalars(15, {"train/loss": 15.0})
  again.close()
  events = _events(tmp_path)
  assert events["train/loss"] == [(5, 5.0), (10, 10.0), (15, 15.0)]
  assert events["test/accuracy"] == [(10, 0.5)]


def test_result_files_are_replaced_never_rewritten_in_place(tmp_path):
  """results.json / train.json are written to a temporary file and renamed
  over the old one: a reader that opened the old file reads all of it,
  the path then holds all of the new one (a new file), and no temporary
  file is left."""
  path = tmp_path / "results.json"
  old = {"runs": list(range(1000))}
  _report.write_json(str(path), old)
  inode = os.stat(path).st_ino
  with open(path) as reader:  # opened before the write, read after it
    new = {"runs": list(range(5))}
    _report.write_json(str(path), new)
    assert json.loads(reader.read()) == old
  assert os.stat(path).st_ino != inode
  assert json.loads(path.read_text()) == new
  assert sorted(os.listdir(tmp_path)) == ["results.json"]


def test_augmentation_noise_differs_between_shards():
  """Each shard of a global batch draws its own augmentation from (seed,
  epoch, step, shard index): the generator of shard i is the SeedSequence
  of [seed, epoch, step, 1, i]; two shards never share their noise, and one
  shard's draw does not depend on how many shards there are beyond its
  index."""
  from sharpjax.data import _loader  # pylint: disable=g-import-not-at-top
  for shards in (2, 3):
    draws = [_loader.augment_rng(7, 2, 5, shards, i).standard_normal(4)
             for i in range(shards)]
    for i, d in enumerate(draws):
      want = np.random.default_rng(
          np.random.SeedSequence([7, 2, 5, 1, i])).standard_normal(4)
      np.testing.assert_array_equal(d, want)
    assert not np.allclose(draws[0], draws[1])
  np.testing.assert_array_equal(
      _loader.augment_rng(7, 2, 5).standard_normal(4),
      np.random.default_rng(np.random.SeedSequence([7, 2, 5, 1])
                            ).standard_normal(4))


def test_a_nan_penalty_with_a_finite_loss_stops_the_run():
  """The command line reads back every step's loss and SAF/MESA penalty: a
  NaN penalty stops the run naming the penalty and the step, even when the
  loss is finite; nothing of that step is recorded."""
  runner = _runner.MethodRunner.__new__(_runner.MethodRunner)
  runner.method = type("M", (), {"name": "saf"})()
  runner.env = type("E", (), {"config": type("C", (), {"lr": 0.05})()})()
  runner._on_log = None  # pylint: disable=protected-access
  progress = _runner.Progress(step=6)
  ok = {"loss": np.float32(0.5), "accuracy": np.float32(1.0),
        "penalty": np.float32(0.1)}
  bad = dict(ok, penalty=np.float32(np.nan))
  with pytest.raises(_runner.NonFiniteLoss,
                     match=r"SAF/MESA penalty became nan at step 8 "
                     r"\(epoch 2\)"):
    runner._flush([ok, bad], progress, 1, None)  # pylint: disable=protected-access
  assert progress.step == 7 and progress.count == 1
  assert progress.loss_sum == pytest.approx(0.5)


def test_the_tensorboard_extra_holds_the_viewer_the_guide_uses():
  """`pip install 'sharpjax[tensorboard]'` gives the writer and the
  `tensorboard` command (and event reader) of the scaling guide."""
  import pathlib  # pylint: disable=g-import-not-at-top
  import re  # pylint: disable=g-import-not-at-top
  tomllib = pytest.importorskip("tomllib")
  root = pathlib.Path(__file__).resolve().parents[1]
  extras = tomllib.loads((root / "pyproject.toml").read_text())["project"][
      "optional-dependencies"]
  names = {re.split(r"[<>=!~;\[ ]", d, maxsplit=1)[0].lower()
           for d in extras["tensorboard"]}
  assert {"tensorboardx", "tensorboard"} <= names
  guide = (root / "docs" / "guides" / "scaling.md").read_text()
  assert "tensorboard --logdir" in guide


def test_example_tables_fit_another_row_count_or_are_refused(tmp_path):
  """SAF's bank saved with 8 rows (rows 6 and 7 padding, never written)
  restores into 6 rows (padding dropped) and into 10 (rows 8 and 9 fresh:
  zeros, epoch -1), the written rows intact; a bank whose row 7 holds data
  is refused instead of cut; 6 rows grow into 8 sharded over 4 devices;
  without fitting, any other row count is refused as before."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  import sharpjax as sj  # pylint: disable=g-import-not-at-top
  from sharpjax._src import checkpoint  # pylint: disable=g-import-not-at-top

  def init(rows):
    return optax.chain(sj.saf(rows, 3, 2), optax.sgd(0.1)).init(
        {"w": jnp.zeros(2)})

  def written(rows, row):
    saf, rest = init(rows)[0], init(rows)[1:]
    return (saf._replace(
        logit_bank=saf.logit_bank.at[:, row].set(2.0),
        recorded_epoch=saf.recorded_epoch.at[:, row].set(1)),) + rest

  d = str(tmp_path)
  checkpoint.save(d, 1, written(8, 5))
  small = checkpoint.restore(d, init(6), fit_example_rows=True).state[0]
  big = checkpoint.restore(d, init(10), fit_example_rows=True).state[0]
  assert small.logit_bank.shape[1] == 6 and big.logit_bank.shape[1] == 10
  for table in (small, big):
    np.testing.assert_array_equal(table.logit_bank[:, 5], 2.0)
    np.testing.assert_array_equal(table.recorded_epoch[:, 5], 1)
    np.testing.assert_array_equal(np.delete(table.logit_bank, 5, axis=1), 0)
    np.testing.assert_array_equal(
        np.delete(table.recorded_epoch, 5, axis=1), -1)
  # 6 rows (one device) into 8 sharded by example over 4 devices: 6 rows do
  # not divide over them, so they are read replicated, then fitted.
  import jax  # pylint: disable=g-import-not-at-top
  from sharpjax._src import protocol  # pylint: disable=g-import-not-at-top
  checkpoint.save(d, 3, written(6, 5))
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:4]), ("data",))
  spec = jax.sharding.PartitionSpec
  shardings = protocol.map_example_tables(
      lambda leaf, axis: jax.sharding.NamedSharding(
          mesh, spec(*([None] * axis), "data")), init(8),
      lambda leaf: jax.sharding.NamedSharding(mesh, spec()))
  on_mesh = jax.device_put(init(8), shardings)
  grown = checkpoint.restore(d, on_mesh, 3, fit_example_rows=True).state[0]
  assert grown.logit_bank.sharding == on_mesh[0].logit_bank.sharding
  np.testing.assert_array_equal(grown.logit_bank[:, 5], 2.0)
  np.testing.assert_array_equal(np.delete(grown.recorded_epoch, 5, axis=1),
                                -1)
  checkpoint.save(d, 4, written(8, 7), keep=None)
  with pytest.raises(checkpoint.CheckpointError, match=r"rows 6\.\.7 hold"):
    checkpoint.restore(d, init(6), 4, fit_example_rows=True)
  with pytest.raises(checkpoint.CheckpointError, match="does not fit"):
    checkpoint.restore(d, init(10), 1)


def test_a_run_is_finished_only_by_its_final_record_of_that_step(tmp_path):
  """`train --resume` trains nothing only when train.json is the final
  record (with a result) of the checkpoint's step: not an intermediate
  record (a run killed after its last checkpoint) nor the result of an
  earlier, shorter run (killed between its checkpoint and train.json)."""
  path = str(tmp_path / "train.json")
  common = dict(command="sharpjax train", run={"seed": 0}, total_steps=20,
                checkpoint_dir="ckpt", loader={"kind": "numpy"},
                parallel={"devices": 1})
  assert not _checkpoint.train_json_done(path, 10)  # no record yet
  _checkpoint.write_train_json(path, progress={"step": 10, "history": []},
                               **common)
  assert not _checkpoint.train_json_done(path, 10)  # intermediate
  record = _checkpoint.write_train_json(
      path, progress={"step": 10, "history": [{"epoch": 1}]},
      result={"steps": 10}, **common)
  assert (record["step"], record["complete"], record["history"]) == (
      10, False, [{"epoch": 1}])
  assert _checkpoint.train_json_done(path, 10)
  assert not _checkpoint.train_json_done(path, 15)
