"""Running the papers' experiments: configs and recipes, ArrayRecord input,
the restricted CIFAR unpickler, profiler traces.

The data sets are made here: a tiny CIFAR-10 python-pickle release (5 train
batches of 16 images, a test batch of 16) and a tiny image folder of PNG and
JPEG files of different sizes. One end-to-end run (the acceptance command:
a recipe at runlocal on converted records, with a profile of steps 2 to 3).
"""

import gzip
import json
import os
import pickle
import struct

import numpy as np
import pytest

from sharpjax import configs
from sharpjax import data
from sharpjax.cli import _config
from sharpjax.cli import _main
from sharpjax.cli import _profile
from sharpjax.cli import _validate
from sharpjax.cli import main
from sharpjax.data import _arrayrecord

N_BATCH = 16  # images per training pickle; 5 of them: 80 train, 16 test


def _release(root, seed=0):
  """A CIFAR-10 python-pickle release with N_BATCH images per batch."""
  folder = os.path.join(root, "cifar-10-batches-py")
  os.makedirs(folder)
  rng = np.random.default_rng(seed)
  images, labels = [], []
  for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
    x = rng.integers(0, 256, (N_BATCH, 3072), dtype=np.uint8)
    y = [int(v) for v in rng.integers(0, 10, N_BATCH)]
    with open(os.path.join(folder, name), "wb") as f:
      pickle.dump({b"batch_label": name.encode(), b"labels": y, b"data": x,
                   b"filenames": [b"%d.png" % i for i in range(N_BATCH)]},
                  f, protocol=2)
    images.append(x)
    labels.append(y)
  return np.concatenate(images), np.concatenate(labels)


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
  root = tmp_path_factory.mktemp("cifar")
  x, y = _release(str(root / "src"))
  dst = str(root / "records")
  meta = data.convert_cifar(str(root / "src"), dst, 10, records_per_shard=32)
  return {"src": str(root / "src"), "dst": dst, "meta": meta, "x": x, "y": y}


class _Exploit:

  def __reduce__(self):
    return (os.system, (f"touch {self.marker}",))


def test_a_pickle_that_would_run_code_is_refused_in_one_line(tmp_path,
                                                             capsys):
  src = tmp_path / "src"
  _release(str(src))
  marker = tmp_path / "pwned"
  _Exploit.marker = str(marker)
  bad = src / "cifar-10-batches-py" / "data_batch_3"
  with open(bad, "wb") as f:
    pickle.dump({b"data": _Exploit(), b"labels": [1]}, f, protocol=2)
  with pytest.raises(ValueError, match=r"data_batch_3 is refused: it names "
                     r"(posix|os)\.system") as e:
    data.load_cifar(str(src), 10)
  assert "\n" not in str(e.value)
  # The command line: one line on stderr, status 2, nothing ran.
  status = main(["data", "convert", "cifar10", str(src), str(tmp_path / "d")])
  err = capsys.readouterr().err.strip()
  assert status == 2 and len(err.splitlines()) == 1, err
  assert "refused" in err and "Traceback" not in err
  assert not marker.exists()
  # Arrays of another dtype (an object array would run reducers) too.
  with open(bad, "wb") as f:
    pickle.dump({b"data": np.array([None, 1]), b"labels": [1]}, f, protocol=2)
  with pytest.raises(ValueError, match="object array"):
    data.load_cifar(str(src), 10)


def test_release_pickles_of_every_protocol_load(tmp_path):
  x = np.arange(2 * 3072, dtype=np.uint8).reshape(2, 3072)
  for protocol in (2, 4, 5):
    path = tmp_path / f"p{protocol}"
    with open(path, "wb") as f:
      pickle.dump({b"data": x, b"labels": [3, 4], b"batch_label": b"b"}, f,
                  protocol=protocol)
    got = data._sources.load_release_pickle(str(path))  # pylint: disable=protected-access
    np.testing.assert_array_equal(got[b"data"], x)
    assert got[b"labels"] == [3, 4]
  # The release itself was written by Python 2 (cPickle, protocol 2): str
  # opcodes and numpy.core's names. These bytes are such a file, by hand.
  def text(b):
    return b"U" + bytes([len(b)]) + b
  minus_one = b"J" + struct.pack("<i", -1)
  py2 = (b"\x80\x02}(" + text(b"data")
         + b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n"
         + b"K\x00\x85" + text(b"b") + b"\x87R"  # an empty array...
         + b"(K\x01K\x02K\x03\x86cnumpy\ndtype\n" + text(b"u1")
         + b"K\x00K\x01\x87R(K\x03" + text(b"|") + b"NNN" + minus_one
         + minus_one + b"K\x00tb\x89" + text(bytes(range(6)))
         + b"tb"  # ...set to uint8 [2, 3]
         + text(b"labels") + b"](K\x01K\x02eu.")
  (tmp_path / "py2").write_bytes(py2)
  got = data._sources.load_release_pickle(str(tmp_path / "py2"))  # pylint: disable=protected-access
  np.testing.assert_array_equal(got[b"data"], np.arange(6).reshape(2, 3))
  assert got[b"data"].dtype == np.uint8 and got[b"labels"] == [1, 2]


def test_cifar_records_ids_labels_shapes_and_one_pass_per_epoch(cifar):
  meta = cifar["meta"]
  assert meta["splits"]["train"]["num_examples"] == 5 * N_BATCH
  assert len(meta["splits"]["train"]["files"]) == 3  # 80 records, 32 a shard
  train, test = data.load_arrayrecord(cifar["dst"])
  assert (len(train), len(test), train.num_classes) == (80, 16, 10)
  np.testing.assert_array_equal(train.y, cifar["y"][:80])
  np.testing.assert_array_equal(test.y, cifar["y"][80:])
  # Record i is the release's image i (HWC), normalised like load_cifar.
  want = data.load_cifar(cifar["src"], 10)
  np.testing.assert_allclose(train.x[5:9], want.train.x[5:9], atol=1e-6)
  np.testing.assert_allclose(test.x[np.array([0, 15])],
                             want.test.x[[0, 15]], atol=1e-6)
  loader = data.GrainLoader(train.grain_source(), 16, seed=3,
                            augment=train.augment)
  for epoch in (0, 1):
    seen = []
    for batch in loader.epoch(epoch):
      assert batch["x"].shape == (16, 32, 32, 3)
      assert batch["x"].dtype == np.float32
      np.testing.assert_array_equal(batch["y"], cifar["y"][batch["ids"]])
      seen += list(batch["ids"])
    assert sorted(seen) == list(range(80))  # each example once


def test_each_process_reads_only_its_rows(cifar):
  train, _ = data.load_arrayrecord(cifar["dst"])

  class Counting:
    """The source, recording which records a loader reads."""

    def __init__(self, source):
      self.source, self.read = source, []

    def __len__(self):
      return len(self.source)

    def gather(self, ids):
      self.read += list(ids)
      return self.source.gather(ids)

  full = data.GrainLoader(train.grain_source(), 16, seed=1)
  parts = []
  for index in (0, 1):
    spy = Counting(train.grain_source())
    shard = data.GrainLoader(spy, 16, seed=1, num_shards=2,
                             shard_index=index)
    parts.append([b["ids"] for b in shard.epoch(0)])
    assert sorted(spy.read) == sorted(np.concatenate(parts[-1]).tolist())
  for k, batch in enumerate(full.epoch(0)):
    np.testing.assert_array_equal(
        np.concatenate([parts[0][k], parts[1][k]]), batch["ids"])


def test_mid_epoch_resume_continues_with_the_same_batches(cifar):
  train, _ = data.load_arrayrecord(cifar["dst"])
  loader = data.GrainLoader(train.grain_source(), 16, seed=0,
                            augment=train.augment)
  total = 3 * loader.steps_per_epoch  # 15 steps, 5 per epoch
  straight = [b for b in loader.batches(0, total)]
  it = loader.batches(0, total)
  for _ in range(7):  # into the second epoch
    next(it)
  state = it.get_state()
  resumed = loader.batches(0, total)
  resumed.set_state(state)
  for want, got in zip(straight[7:], resumed):
    np.testing.assert_array_equal(got["ids"], want["ids"])
    np.testing.assert_array_equal(got["x"], want["x"])


def test_imagefolder_records_decode_at_the_recipe_resolution(tmp_path):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  for split, n in (("train", 4), ("val", 2)):
    for c in ("b_dog", "a_cat"):
      os.makedirs(tmp_path / "src" / split / c)
      for i in range(n):
        h, w = rng.integers(20, 50, 2)
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        ext = "png" if i % 2 else "jpg"
        Image.fromarray(pixels).save(tmp_path / "src" / split / c /
                                     f"{i}.{ext}")
  (tmp_path / "src" / "train" / "a_cat" / "notes.txt").write_text("skip")
  meta = data.convert_imagefolder(str(tmp_path / "src"), str(tmp_path / "d"))
  assert meta["class_names"] == ["a_cat", "b_dog"]
  train, test = data.load_arrayrecord(str(tmp_path / "d"), image_size=24)
  np.testing.assert_array_equal(train.y, [0, 0, 0, 0, 1, 1, 1, 1])
  np.testing.assert_array_equal(test.y, [0, 0, 1, 1])
  assert test.x[0:3].shape == (3, 24, 24, 3)
  loader = data.GrainLoader(train.grain_source(), 4, seed=0,
                            augment=train.augment)
  a, b = loader.batch(0, 1), loader.batch(0, 1)
  assert a["x"].shape == (4, 24, 24, 3) and a["x"].dtype == np.float32
  np.testing.assert_array_equal(a["x"], b["x"])  # a function of (seed, step)
  np.testing.assert_array_equal(a["y"], train.y[a["ids"]])
  # Decoded and augmented in a grain worker process: the same batches.
  workers = data.GrainLoader(train.grain_source(), 4, seed=0,
                             augment=train.augment, worker_count=1)
  it = workers.batches(0, 2)
  try:
    for k, batch in enumerate(it):
      np.testing.assert_array_equal(batch["x"], loader.batch(0, k)["x"])
  finally:
    it.close()
  with pytest.raises(ValueError, match="already holds"):
    data.convert_imagefolder(str(tmp_path / "src"), str(tmp_path / "d"))
  (tmp_path / "src" / "train" / "a_cat" / "9.png").write_bytes(b"not a png")
  with pytest.raises(ValueError, match="9.png is not a readable image"):
    data.convert_imagefolder(str(tmp_path / "src"), str(tmp_path / "e"))


def _parse(argv):
  parser = _main.build_parser()
  expanded, info = _config.expand(argv, parser)
  args = parser.parse_args(expanded)
  args.config_info = info
  _validate.check(args)
  return args


def test_recipes_are_the_grid_and_every_one_parses():
  names = set(configs.RECIPES)
  assert len(names) == 26
  for data_name in ("cifar10", "cifar100"):
    for model in ("wrn28_10", "resnet18"):
      for method in ("sgd", "sam", "saf", "mesa", "esam"):
        assert f"{data_name}_{model}_{method}" in names
  assert {"imagenet_resnet50_saf", "imagenet_vit_s16_gsam"} <= names
  for name in names:
    doc = getattr(configs, name).__doc__
    assert "reach " in doc and "Hardware:" in doc, name
    for arg in (None, "runlocal"):
      spec = name + (":" + arg if arg else "")
      args = _parse(["train", "--config", spec, "--data", "arrayrecord",
                     "--data-dir", "/tmp"])
      assert args.method == name.rsplit("_", 1)[1]
  saf = _parse(["train", "--config", "cifar10_wrn28_10_saf", "--data-dir",
                "/tmp"])
  assert (saf.epochs, saf.batch_size, saf.lr, saf.weight_decay, saf.model,
          saf.width) == (200, 128, 0.1, 5e-4, "wrn28", 10)
  assert (saf.hp_strength, saf.hp_temperature, saf.hp_start_epoch) == (
      0.3, 5.0, 5)
  r50 = _parse(["train", "--config", "imagenet_resnet50_sgd", "--data-dir",
                "/tmp"])
  assert (r50.batch_size, r50.lr, r50.epochs, r50.image_size) == (
      4096, 1.4, 90, 224)


def test_config_overrides_flags_and_files(tmp_path, capsys):
  args = _parse(["train", "--config", "cifar100_resnet18_sam:runlocal",
                 "--config.hyper.rho=0.2", "--config.epochs", "3",
                 "--batch-size", "16"])
  assert (args.hp_rho, args.epochs, args.batch_size) == (0.2, 3, 16)
  assert (args.data, args.model, args.width) == ("synthetic_images",
                                                 "resnet18", 4)
  vit = _parse(["train", "--config", "imagenet_vit_s16_gsam:runlocal"])
  assert (vit.data, vit.model, vit.width, vit.image_size) == (
      "synthetic_images", "vit_s16", 64, None)
  with pytest.raises(ValueError, match="--image-size sets the resolution"):
    _parse(["train", "--image-size", "64"])
  with pytest.raises(ValueError, match="read through grain.*--loader numpy"):
    _parse(["train", "--data", "arrayrecord", "--data-dir", "/tmp",
            "--loader", "numpy"])
  with pytest.raises(ValueError, match="pass --data-dir DIR"):
    _parse(["train", "--config", "cifar10_resnet18_saf"])
  with pytest.raises(ValueError, match="an option of `sharpjax train`"):
    _parse(["compare", "--config", "cifar10_resnet18_saf"])
  assert args.config_info["overrides"] == {"hyper.rho": 0.2, "epochs": 3}
  # A Python file with get_config(arg), as big_vision's and flax's.
  path = tmp_path / "my.py"
  path.write_text("import ml_collections\n"
                  "def get_config(arg=None):\n"
                  "  c = ml_collections.ConfigDict()\n"
                  "  c.method = 'saf'\n"
                  "  c.epochs = int(arg or 4)\n"
                  "  c.hyper = {'strength': 0.5}\n"
                  "  return c\n")
  args = _parse(["train", "--config", f"{path}:6"])
  assert (args.method, args.epochs, args.hp_strength) == ("saf", 6, 0.5)
  # The resolved config a run writes is itself a config.
  resolved = _config.resolved(args, _config.train_subparser(
      _main.build_parser()))
  (tmp_path / "config.json").write_text(json.dumps(resolved))
  again = _parse(["train", "--config", str(tmp_path / "config.json")])
  assert _config.resolved(again, _config.train_subparser(
      _main.build_parser())) == resolved
  # Mistakes: one line, status 2.
  for argv, what in (
      (["--config", "cifar10_resnet18_sam", "--config.batch=3"],
       "'batch' is not a setting"),
      (["--config", "cifar10_resnet18_sam", "--config.epochs=x"],
       "expected int"),
      (["--config", "no_such_recipe"], "no recipe 'no_such_recipe'"),
      (["--config.epochs=3"], "give --config NAME_OR_PATH too"),
      (["--config", "cifar10_resnet18_sam:big"], "unknown argument 'big'")):
    with pytest.raises(SystemExit) as e:
      main(["train", *argv])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1, err
    assert what in err, err
  assert main(["recipes"]) == 0
  out = capsys.readouterr().out
  assert "cifar10_wrn28_10_saf" in out and "97.08" in out


def test_profile_steps_are_checked():
  assert _profile.parse("2:4") == (2, 4)
  for bad in ("2", "4:2", "a:b", "-1:3"):
    with pytest.raises(ValueError, match="--profile-steps"):
      _profile.parse(bad)
  with pytest.raises(ValueError, match="the run has 4 steps"):
    _profile.parse("4:6", total=4)


def test_acceptance_runlocal_recipe_on_records_writes_a_trace(cifar,
                                                              tmp_path,
                                                              capsys):
  out = tmp_path / "run"
  status = main(["train", "--config", "cifar10_wrn28_10_saf:runlocal",
                 "--data", "arrayrecord", "--data-dir", cifar["dst"],
                 "--profile-steps", "2:4", "--out", str(out),
                 "--progress", "off"])
  log = capsys.readouterr().out
  assert status == 0, log
  traces = [os.path.join(d, f) for d, _, files in os.walk(out / "profile")
            for f in files if f.endswith(".xplane.pb")]
  assert traces and os.path.getsize(traces[0]) > 0
  assert "profile of steps 2 to 3" in log
  # Each traced step is one StepTraceAnnotation "train" with its number.
  with gzip.open(traces[0].replace(".xplane.pb", ".trace.json.gz")) as f:
    events = json.load(f)["traceEvents"]
  steps = sorted(e["args"]["step_num"] for e in events
                 if e.get("name") == "train" and "step_num" in e.get("args",
                                                                     {}))
  assert steps == ["2", "3"], steps
  with open(out / "train.json") as f:
    payload = json.load(f)
  settings = payload["settings"]
  assert settings["from"]["config"] == "cifar10_wrn28_10_saf:runlocal"
  assert settings["resolved"]["data"] == "arrayrecord"
  assert settings["resolved"]["hyper"]["strength"] == 0.3
  with open(out / "config.json") as f:
    assert json.load(f) == settings["resolved"]
  # runlocal keeps 80 of the 80 records here (it cuts to 160): 2 epochs x 2.
  history = payload["result"]["history"]
  assert [r["epoch"] for r in history] == [1, 2]
  assert payload["run"]["config"]["data"] == "arrayrecord"
  # Stopped mid-epoch (step 3 of 4) and resumed: grain's position is in the
  # checkpoint, so the resumed run reads the same batches and ends the same.
  cut = ["train", "--config", "cifar10_wrn28_10_saf:runlocal", "--data",
         "arrayrecord", "--data-dir", cifar["dst"], "--out",
         str(tmp_path / "cut"), "--progress", "off"]
  assert main(cut + ["--max-steps", "3"]) == 0
  assert main(cut + ["--resume"]) == 0
  assert "resuming saf seed 0 from step 3" in capsys.readouterr().out
  with open(tmp_path / "cut" / "train.json") as f:
    resumed = json.load(f)["result"]["history"]
  for a, b in zip(resumed, history):
    for k in ("train_loss", "test_loss", "test_accuracy"):
      np.testing.assert_allclose(a[k], b[k], rtol=1e-5, err_msg=k)
