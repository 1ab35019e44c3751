"""Data pipeline: ids, determinism, drop_last, prefetch, noise, augmentation."""

import os
import pickle
import re
import warnings

import numpy as np
import pytest

from sharpjax import data


def _dataset(n=103, num_classes=5):
  return data.make_synthetic(n, input_shape=(3,), num_classes=num_classes,
                             seed=1)


def _collect(loader, epoch):
  return list(loader.epoch(epoch))


def test_batches_are_dicts_with_ids_matching_the_examples():
  ds = _dataset()
  loader = data.DataLoader(ds, 10, seed=3)
  for batch in loader.epoch(0):
    assert sorted(batch) == ["ids", "x", "y"]
    assert batch["ids"].dtype == np.int32
    np.testing.assert_array_equal(batch["x"], ds.x[batch["ids"]])
    np.testing.assert_array_equal(batch["y"], ds.y[batch["ids"]])


def test_ids_cover_the_data_set_exactly_once_per_epoch():
  ds = _dataset(103)
  keep_all = data.DataLoader(ds, 10, seed=0, drop_last=False)
  assert len(keep_all) == 11
  for epoch in range(3):
    ids = np.concatenate([b["ids"] for b in keep_all.epoch(epoch)])
    np.testing.assert_array_equal(np.sort(ids), np.arange(103))
  dropping = data.DataLoader(ds, 10, seed=0, drop_last=True)
  assert len(dropping) == 10
  batches = _collect(dropping, 0)
  assert all(b["x"].shape[0] == 10 for b in batches)
  ids = np.concatenate([b["ids"] for b in batches])
  assert len(np.unique(ids)) == 100  # distinct, only the tail of 3 dropped
  # With a batch size that divides N, drop_last also covers everything.
  exact = data.DataLoader(_dataset(100), 20, seed=0)
  ids = np.concatenate([b["ids"] for b in exact.epoch(4)])
  np.testing.assert_array_equal(np.sort(ids), np.arange(100))


@pytest.mark.parametrize("shuffle", [True, False])
@pytest.mark.parametrize("drop_last", [True, False])
@pytest.mark.parametrize("num_shards", [1, 2])
def test_no_id_repeats_within_an_epoch(shuffle, drop_last, num_shards):
  """SAF keeps one record per example and epoch: a repeated id would lose its
  target. Every configuration yields each id at most once per epoch, over
  all shards together."""
  if num_shards > 1 and not drop_last:
    pytest.skip("num_shards > 1 needs drop_last=True")
  ds = _dataset(103)
  loaders = [data.DataLoader(ds, 10, seed=7, shuffle=shuffle,
                             drop_last=drop_last, num_shards=num_shards,
                             shard_index=i, prefetch=0)
             for i in range(num_shards)]
  for epoch in range(3):
    ids = np.concatenate([b["ids"] for loader in loaders
                          for b in loader.epoch(epoch)])
    assert len(ids) == len(np.unique(ids))
    assert len(ids) == (100 if drop_last else 103)


def test_shuffling_is_deterministic_per_seed_and_epoch():
  ds = _dataset()
  a = data.DataLoader(ds, 16, seed=7, prefetch=0)
  b = data.DataLoader(ds, 16, seed=7, prefetch=3)
  c = data.DataLoader(ds, 16, seed=8, prefetch=0)
  ids = lambda loader, e: np.concatenate([x["ids"] for x in loader.epoch(e)])
  np.testing.assert_array_equal(ids(a, 0), ids(b, 0))  # prefetch: same data
  np.testing.assert_array_equal(ids(a, 2), ids(a, 2))  # re-run an epoch
  assert not np.array_equal(ids(a, 0), ids(a, 1))  # a new order every epoch
  assert not np.array_equal(ids(a, 0), ids(c, 0))  # and per seed
  np.testing.assert_array_equal(a.batch(2, 1)["ids"], ids(a, 2)[16:32])
  # iter() walks the epochs in order.
  np.testing.assert_array_equal(
      np.concatenate([x["ids"] for x in iter(a)]), ids(a, 0))
  np.testing.assert_array_equal(
      np.concatenate([x["ids"] for x in iter(a)]), ids(a, 1))
  unshuffled = data.DataLoader(ds, 16, shuffle=False, drop_last=False)
  np.testing.assert_array_equal(ids(unshuffled, 5), np.arange(103))


def test_prefetch_runs_transform_and_propagates_errors():
  ds = _dataset()
  seen = []
  loader = data.DataLoader(ds, 8, seed=0, prefetch=2,
                           transform=lambda b: seen.append(1) or b["ids"])
  out = _collect(loader, 0)
  assert len(out) == len(seen) == len(loader)

  def boom(batch):
    raise RuntimeError("bad transform")

  failing = data.DataLoader(ds, 8, seed=0, prefetch=2, transform=boom)
  with pytest.raises(RuntimeError, match="bad transform"):
    _collect(failing, 0)
  # Stopping early does not hang the background thread.
  it = loader.epoch(1)
  next(it)
  it.close()


def test_loader_argument_errors():
  with pytest.raises(ValueError, match="batch_size"):
    data.DataLoader(_dataset(10), 0)
  with pytest.raises(ValueError, match="larger than the data set"):
    data.DataLoader(_dataset(10), 11)


def test_label_noise_fraction_is_exact_and_clean_labels_are_kept():
  ds = _dataset(1000, num_classes=10)
  noisy = data.add_label_noise(ds, 0.3, seed=0)
  assert int(noisy.noisy.sum()) == 300
  assert np.mean(noisy.y != ds.y) == pytest.approx(0.3)
  np.testing.assert_array_equal(noisy.clean_y, ds.y)
  np.testing.assert_array_equal(noisy.with_clean_labels().y, ds.y)
  np.testing.assert_array_equal(noisy.x, ds.x)  # ids are unchanged
  assert noisy.y.min() >= 0 and noisy.y.max() < 10
  again = data.add_label_noise(ds, 0.3, seed=0)
  np.testing.assert_array_equal(again.y, noisy.y)
  other = data.add_label_noise(ds, 0.3, seed=1)
  assert not np.array_equal(other.y, noisy.y)
  # Noise is applied to the clean labels: no compounding.
  twice = data.add_label_noise(noisy, 0.1, seed=0)
  assert int(twice.noisy.sum()) == 100
  np.testing.assert_array_equal(twice.clean_y, ds.y)
  # The wrong labels are spread over the other classes.
  wrong = noisy.y[noisy.noisy]
  assert len(np.unique(wrong)) == 10
  with pytest.raises(ValueError, match="fraction"):
    data.add_label_noise(ds, 1.5)
  # The loader yields the noisy labels with their ids.
  batch = data.DataLoader(noisy, 50, seed=0).batch(0, 0)
  np.testing.assert_array_equal(batch["y"], noisy.y[batch["ids"]])


def test_random_crop_flip_matches_an_explicit_loop():
  rng = np.random.default_rng(0)
  x = rng.standard_normal((6, 5, 7, 2)).astype(np.float32)
  out = data.random_crop_flip(x, np.random.default_rng(1), padding=2)
  # Replay the same draws by hand.
  ref_rng = np.random.default_rng(1)
  oy = ref_rng.integers(0, 5, size=6)
  ox = ref_rng.integers(0, 5, size=6)
  mirror = ref_rng.random(6) < 0.5
  padded = np.pad(x, ((0, 0), (2, 2), (2, 2), (0, 0)))
  for i in range(6):
    crop = padded[i, oy[i]:oy[i] + 5, ox[i]:ox[i] + 7]
    if mirror[i]:
      crop = crop[:, ::-1]
    np.testing.assert_array_equal(out[i], crop)
  assert out.dtype == np.float32 and out.shape == x.shape
  np.testing.assert_array_equal(
      data.random_crop_flip(x, rng, padding=0, flip=False), x)
  with pytest.raises(ValueError, match="B, H, W, C"):
    data.random_crop_flip(x[0], rng)


def test_augmentation_is_deterministic_per_seed_epoch_step():
  ds = data.make_synthetic(40, input_shape=(8, 8, 3), num_classes=2)
  make = lambda p: data.DataLoader(ds, 8, seed=0, prefetch=p,
                                   augment=data.RandomCropFlip(padding=2))
  a, b = _collect(make(0), 0), _collect(make(2), 0)
  for u, v in zip(a, b):
    np.testing.assert_array_equal(u["x"], v["x"])
  assert not np.array_equal(a[0]["x"], ds.x[a[0]["ids"]])


def test_synthetic_and_dataset_validation():
  ds = data.make_synthetic(10, input_shape=(2, 3), num_classes=3, seed=0)
  assert ds.x.shape == (10, 2, 3) and ds.x.dtype == np.float32
  assert sorted(np.bincount(ds.y).tolist()) == [3, 3, 4]
  with pytest.raises(ValueError, match="labels must be in"):
    data.ArrayDataset(np.zeros((2, 1)), np.array([0, 3]), num_classes=3)
  with pytest.raises(ValueError, match="same N"):
    data.ArrayDataset(np.zeros((2, 1)), np.array([0]), num_classes=3)


def test_digits():
  train, test = data.load_digits(seed=0)
  assert train.x.shape == (1438, 64) and test.x.shape == (359, 64)
  assert train.num_classes == 10 and 0 <= train.x.min() and train.x.max() <= 1
  images, _ = data.load_digits(as_images=True)
  assert images.x.shape == (1438, 8, 8, 1)


def test_mnist1d_generated_offline_and_cached(tmp_path):
  state = np.random.get_state()
  train, test = data.load_mnist1d(200, cache_dir=str(tmp_path), seed=3)
  # The generator seeds numpy's global RNG; the loader restores it.
  np.testing.assert_array_equal(np.random.get_state()[1], state[1])
  assert train.x.shape == (160, 40) and test.x.shape == (40, 40)
  assert train.x.dtype == np.float32 and train.num_classes == 10
  np.testing.assert_array_equal(np.bincount(
      np.concatenate([train.y, test.y])), np.full(10, 20))
  files = os.listdir(tmp_path)
  assert len(files) == 1 and files[0].endswith(".npz")
  cached, _ = data.load_mnist1d(200, cache_dir=str(tmp_path), seed=3)
  np.testing.assert_array_equal(cached.x, train.x)
  fresh, _ = data.load_mnist1d(200, seed=3, use_cache=False)
  np.testing.assert_array_equal(fresh.x, train.x)


def _write_cifar10_pickles(folder, n_per_batch=4):
  os.makedirs(folder)
  rng = np.random.default_rng(0)
  expected = []
  for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
    images = rng.integers(0, 256, size=(n_per_batch, 3, 32, 32), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n_per_batch).tolist()
    with open(os.path.join(folder, name), "wb") as f:
      pickle.dump({b"data": images.reshape(n_per_batch, -1),
                   b"labels": labels}, f)
    expected.append((images, labels))
  return expected


def test_cifar_from_local_pickles_and_npz(tmp_path):
  expected = _write_cifar10_pickles(tmp_path / "cifar-10-batches-py")
  train, test = data.load_cifar(str(tmp_path), 10, normalize=False)
  assert train.x.shape == (20, 32, 32, 3) and test.x.shape == (4, 32, 32, 3)
  first_images, first_labels = expected[0]
  np.testing.assert_allclose(train.x[0],
                             first_images[0].transpose(1, 2, 0) / 255.0)
  np.testing.assert_array_equal(train.y[:4], first_labels)
  np.testing.assert_array_equal(test.y, expected[-1][1])
  normed, _ = data.load_cifar(str(tmp_path), 10)
  np.testing.assert_allclose(
      normed.x[0, 0, 0],
      (train.x[0, 0, 0] - data._sources.CIFAR_MEAN[10])
      / data._sources.CIFAR_STD[10], rtol=1e-5)

  npz_root = tmp_path / "npz"
  os.makedirs(npz_root)
  x = np.zeros((3, 32, 32, 3), np.uint8)
  np.savez(npz_root / "cifar100.npz", x_train=x, y_train=np.array([0, 99, 5]),
           x_test=x[:1], y_test=np.array([7]))
  tr100, te100 = data.load_cifar(str(npz_root), 100)
  assert tr100.num_classes == 100 and te100.y.tolist() == [7]


def test_cifar_missing_is_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError,
                     match="data_batch_1.*test_batch.*cifar10.npz"):
    data.load_cifar(str(tmp_path), 10)
  with pytest.raises(FileNotFoundError, match="cifar-100-python"):
    data.load_cifar(str(tmp_path), 100)
  with pytest.raises(ValueError, match="10 or 100"):
    data.load_cifar(str(tmp_path), 20)


@pytest.mark.parametrize("damage", ["truncate", "flip", "foreign"])
def test_a_bad_mnist1d_cache_is_named_and_generated_again(tmp_path, damage):
  train, test = data.load_mnist1d(200, cache_dir=str(tmp_path), seed=3)
  (path,) = [tmp_path / f for f in os.listdir(tmp_path)]
  raw = path.read_bytes()
  if damage == "truncate":  # an interrupted copy
    path.write_bytes(raw[:len(raw) // 2])
    why = "BadZipFile"
  elif damage == "flip":  # one changed byte: the zip's CRC-32 finds it
    flipped = bytearray(raw)
    flipped[len(raw) // 2] ^= 0x01
    path.write_bytes(bytes(flipped))
    why = "CRC-32"
  else:  # a well-formed file with the wrong content (another size)
    np.savez(path, x=train.x[:10], y=train.y[:10], x_test=test.x,
             y_test=test.y)
    why = "it holds 10 \\+ 40 examples, expected 200"
  with pytest.warns(UserWarning, match=f"the MNIST-1D cache {path} is "
                    f"unusable \\(.*{why}.*\\); it is generated again"):
    healed, _ = data.load_mnist1d(200, cache_dir=str(tmp_path), seed=3)
  np.testing.assert_array_equal(healed.x, train.x)
  np.testing.assert_array_equal(healed.y, train.y)
  # Healed on disk: the next load reads it without a warning.
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    again, _ = data.load_mnist1d(200, cache_dir=str(tmp_path), seed=3)
  np.testing.assert_array_equal(again.x, train.x)


def test_an_unwritable_mnist1d_cache_only_warns(tmp_path):
  (tmp_path / "afile").write_text("")
  folder = tmp_path / "afile" / "cache"  # under a file: cannot be created
  with pytest.warns(UserWarning, match=f"cannot write the MNIST-1D cache "
                    f"{folder}/mnist1d_n100"):
    train, _ = data.load_mnist1d(100, cache_dir=str(folder))
  assert train.x.shape == (80, 40)


def _cifar_case(tmp_path, case):
  """A CIFAR-10 directory with one bad file; (its path, the message)."""
  folder = tmp_path / "cifar-10-batches-py"
  _write_cifar10_pickles(folder)
  bad = folder / "data_batch_2"
  raw = bad.read_bytes()
  if case == "truncated":
    bad.write_bytes(raw[:len(raw) // 2])
    return bad, "UnpicklingError: pickle data was truncated"
  if case == "int literal":  # what a damaged protocol-0 pickle gives
    bad.write_bytes(b"I12x4\n.")
    return bad, ("ValueError: (invalid literal for int|could not convert "
                 "string to int)")
  if case == "no labels":
    bad.write_bytes(pickle.dumps({b"data": np.zeros((2, 3072), np.uint8)}))
    return bad, "KeyError: b'labels'"
  if case == "wrong shape":
    bad.write_bytes(pickle.dumps({b"data": np.zeros((2, 100), np.uint8),
                                  b"labels": [0, 1]}))
    return bad, r"data is uint8\[2, 100\]"
  raise AssertionError(case)


@pytest.mark.parametrize("case", ["truncated", "int literal", "no labels",
                                  "wrong shape"])
def test_a_corrupt_cifar_pickle_is_named_with_what_was_expected(tmp_path,
                                                                 case):
  path, why = _cifar_case(tmp_path, case)
  with pytest.raises(ValueError) as e:
    data.load_cifar(str(tmp_path), 10)
  msg = str(e.value)
  assert msg.startswith(f"{path} is not a CIFAR python-pickle batch (a dict "
                        "with b'data': uint8 [N, 3072] and b'labels': N "
                        "integer labels): "), msg
  assert len(msg.splitlines()) == 1
  assert re.search(why, msg), msg


def test_a_bad_cifar_npz_is_named(tmp_path):
  path = tmp_path / "cifar10.npz"
  ragged = np.empty(2, object)
  ragged[0], ragged[1] = np.zeros(3), np.zeros(5)
  np.savez(path, x_train=ragged, y_train=np.zeros(2), x_test=ragged,
           y_test=np.zeros(2))
  with pytest.raises(ValueError, match=f"{path} is not a CIFAR .npz of "
                     "numeric arrays .*allow_pickle"):
    data.load_cifar(str(tmp_path), 10)
  x = np.zeros((3, 32, 32, 3), np.uint8)
  np.savez(path, x_train=x, y_train=np.array([0, 10, 5]), x_test=x[:1],
           y_test=np.array([7]))
  with pytest.raises(ValueError, match=re.escape(f"{path}: train labels in "
                                                 "[0, 10], expected classes "
                                                 "0..9")):
    data.load_cifar(str(tmp_path), 10)
  np.savez(path, x_train=x, y_train=np.array([0, 1]), x_test=x[:1],
           y_test=np.array([7]))
  with pytest.raises(ValueError, match=re.escape(
      f"{path}: 3 train images but labels int64[2]")):
    data.load_cifar(str(tmp_path), 10)
  np.savez(path, x_train=np.zeros((3, 32, 32)), y_train=np.array([0, 1, 2]),
           x_test=x[:1], y_test=np.array([7]))
  with pytest.raises(ValueError, match=re.escape(
      f"{path}: train CIFAR images must be [N, 32, 32, 3]")):
    data.load_cifar(str(tmp_path), 10)

