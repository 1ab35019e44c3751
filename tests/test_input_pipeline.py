"""The grain backend, its sources and checkpointed iterator; device prefetch.

GrainLoader is built to yield exactly DataLoader's batches (same ids, same
augmentation, same shard blocks), so most checks compare the two; the
iterator's state is checked by resuming from it, alone and inside an orbax
checkpoint of a train state (the multi-process resume is in
tests/test_scale_cli.py).
"""

import os
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sharpjax import data

pytest.importorskip("grain")


def _images(n=40, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((n, 8, 8, 3)).astype(np.float32)
  return data.ArrayDataset(x, np.arange(n) % 5, 5, name="images")


def _assert_same(a, b):
  assert sorted(a) == sorted(b) == ["ids", "x", "y"]
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert np.asarray(a[k]).dtype == np.asarray(b[k]).dtype, k


@pytest.mark.parametrize("num_shards", [1, 2])
def test_grain_batches_are_the_data_loaders(num_shards):
  """Same ids, labels and augmented images as DataLoader, epoch after epoch,
  for every shard; each epoch's ids are distinct."""
  ds = _images()
  for index in range(num_shards):
    kw = dict(seed=3, augment=data.RandomCropFlip(padding=2),
              num_shards=num_shards, shard_index=index)
    ref = data.DataLoader(ds, 8, prefetch=0, **kw)
    grain_loader = data.GrainLoader(ds, 8, **kw)
    assert len(grain_loader) == len(ref) == 5
    got = list(grain_loader.batches(0, 12))  # 2 epochs and 2 batches
    want = list(ref.batches(0, 12))
    assert len(got) == 12
    for g, w in zip(got, want):
      _assert_same(g, w)
    for e in (0, 1):
      ids = np.concatenate([b["ids"] for b in grain_loader.epoch(e)])
      assert len(np.unique(ids)) == len(ids) == 40 // num_shards
      _assert_same(grain_loader.batch(e, 2), ref.batch(e, 2))
  # The shards of one global batch are the rows of the unsharded one.
  full = data.GrainLoader(ds, 8, seed=3).batch(1, 3)
  halves = [data.GrainLoader(ds, 8, seed=3, num_shards=2,
                             shard_index=i).batch(1, 3) for i in (0, 1)]
  np.testing.assert_array_equal(
      np.concatenate([h["ids"] for h in halves]), full["ids"])


def test_sources_npz_array_record_and_cifar_folder(tmp_path):
  """An .npz (x/y or x_train/y_train), ArrayRecord files and a CIFAR
  folder give the in-memory source's batches; records round-trip exactly."""
  ds = _images(24)
  ref = [b["ids"] for b in data.GrainLoader(ds, 6, seed=1).epoch(0)]
  ref_x = [b["x"] for b in data.GrainLoader(ds, 6, seed=1).epoch(0)]
  np.savez(tmp_path / "plain.npz", x=ds.x, y=ds.y)
  np.savez(tmp_path / "split.npz", x_train=ds.x, y_train=ds.y,
           x_test=ds.x[:6], y_test=ds.y[:6])
  path = data.write_array_record(str(tmp_path / "train.array_record"), ds)
  sources = [str(tmp_path / "plain.npz"), str(tmp_path / "split.npz"), path,
             str(tmp_path / "*.array_record"), [path], (ds.x, ds.y)]
  for spec in sources:
    loader = data.GrainLoader(spec, 6, seed=1)
    batches = list(loader.epoch(0))
    for b, ids, x in zip(batches, ref, ref_x):
      np.testing.assert_array_equal(b["ids"], ids)
      np.testing.assert_array_equal(b["x"], x)
      np.testing.assert_array_equal(b["y"], ds.y[ids])
  assert len(data.grain_source(str(tmp_path / "split.npz"), split="test")) == 6
  record = data.grain_source(path)[5]
  np.testing.assert_array_equal(record["x"], ds.x[5])
  assert (record["y"], record["ids"]) == (ds.y[5], 5)
  for x in (np.arange(6, dtype=np.uint8).reshape(2, 3),
            np.float64(2.5), np.zeros((0, 4), np.int16)):
    got, y = data.decode_example(data.encode_example(x, 7))
    np.testing.assert_array_equal(got, x)
    assert got.dtype == np.asarray(x).dtype and y == 7

  # A CIFAR-10 folder in the python-pickle layout (4 images per file).
  folder = tmp_path / "cifar" / "cifar-10-batches-py"
  folder.mkdir(parents=True)
  rng = np.random.default_rng(0)
  for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
    entry = {b"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8),
             b"labels": rng.integers(0, 10, 4).tolist()}  # ints, as the release
    with open(folder / name, "wb") as f:
      pickle.dump(entry, f)
  train, test = data.load_cifar(str(tmp_path / "cifar"))
  cifar = data.grain_source(str(tmp_path / "cifar"))
  np.testing.assert_array_equal(cifar.x, train.x)
  np.testing.assert_array_equal(cifar.y, train.y)
  assert len(data.grain_source(str(tmp_path / "cifar"), split="test")) == 4
  assert len(test) == 4


def test_grain_errors(tmp_path):
  ds = _images(24)
  with pytest.raises(ValueError, match="multiple of num_shards"):
    data.GrainLoader(ds, 6, num_shards=4)
  with pytest.raises(ValueError, match="shard_index"):
    data.GrainLoader(ds, 6, num_shards=2, shard_index=2)
  with pytest.raises(ValueError, match="larger than the source"):
    data.GrainLoader(ds, 48)
  with pytest.raises(ValueError, match="worker_count"):
    data.GrainLoader(ds, 6, worker_count=-1)
  with pytest.raises(FileNotFoundError, match="no file"):
    data.grain_source(str(tmp_path / "missing.array_record"))
  with pytest.raises(ValueError, match="split"):
    data.grain_source(ds, split="valid")
  np.savez(tmp_path / "odd.npz", a=ds.x)
  with pytest.raises(ValueError, match="neither x / y"):
    data.grain_source(str(tmp_path / "odd.npz"))
  with pytest.raises(ValueError, match="not a sharpjax example record"):
    data.decode_example(b"garbage")
  with pytest.raises(TypeError, match="cannot read"):
    data.grain_source(3.0)


def test_iterator_state_resumes_with_worker_processes():
  """Two worker processes augment the batches: the same batches as made
  inline; an iterator restored from a state taken mid-epoch (with prefetched
  batches in the workers' buffers) continues with exactly the next ones."""
  ds = _images(32)
  kw = dict(seed=5, augment=data.RandomCropFlip(padding=2))
  inline = list(data.DataLoader(ds, 8, prefetch=0, **kw).batches(0, 10))
  loader = data.GrainLoader(ds, 8, worker_count=2, **kw)
  it = loader.batches(0, 10)
  try:
    first = [next(it) for _ in range(3)]
    state = it.get_state()
    rest = list(it)
  finally:
    it.close()
  for got, want in zip(first + rest, inline):
    _assert_same(got, want)
  assert len(first + rest) == 10
  again = loader.batches(0, 10)
  try:
    again.set_state(state)
    resumed = list(again)
  finally:
    again.close()
  assert len(resumed) == 7
  for got, want in zip(resumed, inline[3:]):
    _assert_same(got, want)


def test_iterator_state_in_the_train_state_checkpoint(tmp_path):
  """launch.save_state(data_iterator=...) keeps the grain position in the
  same orbax step as the state; restore_state puts it back; a checkpoint
  without one says so."""
  from sharpjax import launch  # pylint: disable=g-import-not-at-top
  loader = data.GrainLoader(_images(32), 8, seed=2)
  it = loader.batches(0, 12)
  for _ in range(5):
    next(it)
  ckpt = str(tmp_path / "ckpt")
  launch.save_state(ckpt, 5, {"w": jnp.arange(3.0)}, {"step": 5},
                    data_iterator=it)
  launch.save_state(ckpt, 6, {"w": jnp.arange(3.0)}, {"step": 6})
  assert sorted(os.listdir(os.path.join(ckpt, "5", "data")))[-1] == (
      "process_0-of-1.json")
  want = [b["ids"] for b in it]
  fresh = loader.batches(0, 12)
  state, meta = launch.restore_state(ckpt, {"w": jnp.zeros(3)}, step=5,
                                     data_iterator=fresh)
  assert meta == {"step": 5}
  np.testing.assert_array_equal(state["w"], [0.0, 1.0, 2.0])
  got = [b["ids"] for b in fresh]
  assert len(got) == len(want) == 7
  for a, b in zip(got, want):
    np.testing.assert_array_equal(a, b)
  # Prefetched to the devices, the grain iterator runs ahead of the loop;
  # the prefetcher's state is that of the batches it has yielded.
  ahead = data.prefetch_to_device(loader.batches(0, 12), jax.device_put,
                                  size=3)
  taken = [np.asarray(next(ahead)["ids"]) for _ in range(4)]
  other = str(tmp_path / "other")
  launch.save_state(other, 4, {"w": jnp.arange(3.0)}, {"step": 4},
                    data_iterator=ahead)
  fresh = loader.batches(0, 12)
  launch.restore_state(other, {"w": jnp.zeros(3)}, data_iterator=fresh)
  everything = [b["ids"] for b in loader.batches(0, 12)]
  for a, b in zip(taken + [b["ids"] for b in fresh], everything):
    np.testing.assert_array_equal(a, b)
  with pytest.raises(FileNotFoundError, match="no data iterator state"):
    launch.restore_state(ckpt, {"w": jnp.zeros(3)}, step=6,
                         data_iterator=loader.batches(0, 12))
  # A checkpoint of 2 processes' iterators (as 2 processes write it) read by
  # this 1 process: an error naming the counts and what to do, not orbax's
  # "process_0-of-1.json does not exist".
  folder = os.path.join(ckpt, "5", "data")
  os.rename(os.path.join(folder, "process_0-of-1.json"),
            os.path.join(folder, "process_0-of-2.json"))
  with pytest.raises(launch.CheckpointError,
                     match=r"another number of processes \(process_0-of-2"
                     r"\.json\); this run has 1: restore without "
                     "data_iterator="):
    launch.restore_state(ckpt, {"w": jnp.zeros(3)}, step=5,
                         data_iterator=loader.batches(0, 12))


def test_prefetch_to_device_keeps_batches_in_flight_in_order():
  """``size`` batches are put before the first is yielded, one more per
  batch taken; the order and values are the source's; the puts land on the
  trainer's mesh sharding when ``put`` is Trainer.shard_batch."""
  loader = data.DataLoader(data.make_synthetic(96, input_shape=(4,)), 16,
                           seed=0, prefetch=0)
  puts = []

  def put(batch):
    puts.append(int(batch["ids"][0]))
    return jax.device_put(batch)

  stream = data.prefetch_to_device(loader.epoch(0), put, size=3)
  first = next(stream)
  assert len(puts) == 4  # 3 in flight behind the one yielded
  rest = list(stream)
  assert len(puts) == 6 and len(rest) == 5
  for got, want in zip([first] + rest, loader.epoch(0)):
    assert isinstance(got["x"], jax.Array)
    np.testing.assert_array_equal(got["ids"], want["ids"])
  assert list(data.prefetch_to_device(iter([]), put)) == []
  with pytest.raises(ValueError, match="size"):
    next(data.prefetch_to_device(loader.epoch(0), put, size=0))

  import optax  # pylint: disable=g-import-not-at-top
  from sharpjax import models, training  # pylint: disable=g-import-not-at-top
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:4]), ("data",))
  trainer = training.make_trainer(models.MLP(features=(8,), num_classes=4),
                                  optax.sgd(0.1), mesh=mesh, train_kwarg=None)
  batch = next(data.prefetch_to_device(loader.epoch(1), trainer.shard_batch))
  assert batch["x"].sharding.spec == jax.sharding.PartitionSpec("data")
  assert len(batch["x"].sharding.device_set) == 4


def test_data_loader_batches_cross_epochs_and_resume():
  """DataLoader.batches(start, stop) is the epochs' batches, concatenated,
  from any global step, with or without the prefetch thread."""
  ds = data.make_synthetic(50, input_shape=(2,))
  loader = data.DataLoader(ds, 8, seed=4, prefetch=2)
  spe = len(loader)
  flat = [b for e in range(3) for b in loader.epoch(e)]
  for start, stop in ((0, 3 * spe), (spe - 2, spe + 3), (7, 7)):
    got = list(loader.batches(start, stop))
    assert len(got) == stop - start
    for g, w in zip(got, flat[start:stop]):
      np.testing.assert_array_equal(g["ids"], w["ids"])
  endless = data.DataLoader(ds, 8, seed=4, prefetch=0).batches(2 * spe)
  np.testing.assert_array_equal(next(endless)["ids"], flat[2 * spe]["ids"])


_KILLED_PROGRAM = """
import time
import numpy as np
from sharpjax import data
if __name__ == "__main__":  # the worker is spawned: it imports this file
  ds = data.ArrayDataset(np.zeros((64, 4), np.float32), np.arange(64) % 2, 2)
  it = data.GrainLoader(ds, 8, worker_count=1).batches(0, None)
  next(it)
  print("ready", flush=True)
  time.sleep(600)
"""


def _children(pid):
  """``{pid: command line}`` of the live processes whose parent is ``pid``."""
  out = {}
  for entry in os.listdir("/proc"):
    if not entry.isdigit():
      continue
    try:
      with open(f"/proc/{entry}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
      with open(f"/proc/{entry}/cmdline", "rb") as f:
        cmd = f.read().replace(b"\0", b" ").decode()
    except OSError:
      continue
    if int(fields[1]) == pid and fields[0] != "Z":
      out[int(entry)] = cmd
  return out


def _alive(pid):
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[0] != "Z"
  except OSError:
    return False


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads /proc")
def test_workers_die_with_a_killed_parent(tmp_path):
  """kill -9 of a process reading from a GrainLoader with a worker process:
  the worker (and multiprocessing's resource tracker, which lives as long as
  a worker holds its pipe) end by themselves instead of living on."""
  import signal  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  import time  # pylint: disable=g-import-not-at-top
  script = tmp_path / "reader.py"
  script.write_text(_KILLED_PROGRAM)
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
  proc = subprocess.Popen([sys.executable, str(script)], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)
  kids = {}
  try:
    line = proc.stdout.readline()
    assert line.strip() == "ready", line + proc.stdout.read()
    kids = _children(proc.pid)
    assert any("multiprocessing" in c and "spawn" in c
               for c in kids.values()), kids  # the grain worker
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    deadline = time.monotonic() + 60  # a liveness bound, not a timing
    while any(_alive(p) for p in kids) and time.monotonic() < deadline:
      time.sleep(0.2)
    assert not [p for p in kids if _alive(p)], {
        p: c for p, c in kids.items() if _alive(p)}
  finally:
    if proc.poll() is None:
      proc.kill()
    for p in kids:  # what a failing run left: ours, by id
      if _alive(p):
        os.kill(p, signal.SIGKILL)
