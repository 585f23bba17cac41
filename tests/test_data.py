"""Data: the embedded digits set, and the train / eval pipelines' determinism and sharding."""

import concurrent.futures
import json
import os
import time

import numpy as np
import pytest
import tensorflow_datasets as tfds

from distill_jax import data
from distill_jax.common.registry import UnknownNameError
from distill_jax.data import digits

BATCH = 256  # 1500 // 256 = 5 steps per epoch, so a few steps cross an epoch boundary.


@pytest.fixture(scope="module")
def cfg(data_dir):
  config = data.default_data_config("digits")
  config.data_dir = data_dir
  return config


def _config(cfg, **overrides):
  config = cfg.copy_and_resolve_references()
  config.update(overrides)
  return config


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def _assert_batches_equal(a, b):
  assert a.keys() == b.keys()
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_digits_builds_with_real_data(cfg, data_dir):
  path = data.ensure_embedded("digits", data_dir)
  assert os.path.isfile(os.path.join(path, "dataset_info.json"))
  assert data.ensure_embedded("digits", data_dir) == path  # Second call: no rebuild.

  info = data.get_info(cfg)
  assert info.num_examples == {"train": 1500, "test": 297}
  assert info.num_classes == 10
  assert info.image_shape == (8, 8, 1)

  from sklearn.datasets import load_digits
  sklearn_digits = load_digits()
  seen = []
  for split in ("train", "test"):
    source = tfds.data_source("digits", split=split, data_dir=data_dir, download=False)
    examples = [source[i] for i in range(len(source))]
    images = np.stack([e["image"] for e in examples])
    ids = np.array([e["id"] for e in examples])
    assert images.dtype == np.uint8 and images.shape[1:] == (8, 8, 1)
    assert images.min() == 0 and images.max() == 16
    np.testing.assert_array_equal(images[..., 0], sklearn_digits.images[ids])
    np.testing.assert_array_equal([e["label"] for e in examples], sklearn_digits.target[ids])
    seen.append(ids)
  assert sorted(np.concatenate(seen)) == list(range(1797))
  # The split is the fixed permutation of seed 0, stored in that order.
  np.testing.assert_array_equal(np.concatenate(seen), np.random.default_rng(0).permutation(1797))


def test_unknown_embedded_name(data_dir):
  with pytest.raises(UnknownNameError, match="digits"):
    data.ensure_embedded("digitz", data_dir)


def test_embedded_sets_register_on_import_and_keep_their_directories(tmp_path):
  """Each embedded set lives in its own module; importing any module of the data package
  (as scripts/prepare_data.py imports `embedded` alone) registers all of them, and every
  builder keeps the name and version that make its directory, so data prepared before a
  module moved (and the teacher caches keyed to it) is still found."""
  import subprocess
  import sys

  listed = subprocess.run(
      [sys.executable, "-c", "from distill_jax.data import embedded; "
       "print(','.join(sorted(embedded.EMBEDDED.names())))"],
      capture_output=True, text=True, check=True)
  assert listed.stdout.strip() == "digits,pydoc_topics"
  for name in ("digits", "pydoc_topics"):
    builder = data.EMBEDDED.get(name)(data_dir=str(tmp_path), file_format="array_record")
    assert (builder.name, str(builder.version)) == (name, "1.0.0")
    assert os.fspath(builder.data_path) == os.path.join(tmp_path, name, "1.0.0")


def test_concurrent_builds_build_once(tmp_path, monkeypatch):
  builds = []
  build = digits.Digits.download_and_prepare

  def counting_build(self, *args, **kwargs):
    builds.append(1)
    time.sleep(0.2)  # Widen the window in which the other threads arrive.
    return build(self, *args, **kwargs)

  monkeypatch.setattr(digits.Digits, "download_and_prepare", counting_build)
  with concurrent.futures.ThreadPoolExecutor(4) as pool:
    paths = list(pool.map(lambda _: data.ensure_embedded("digits", tmp_path), range(4)))
  assert len(set(paths)) == 1 and len(builds) == 1
  config = data.default_data_config("digits")
  config.data_dir = str(tmp_path)
  assert data.get_info(config).num_examples == {"train": 1500, "test": 297}


def test_batches_shapes_and_normalisation(cfg):
  batch = next(data.train_iterator(_config(cfg, augment="none"), global_batch_size=BATCH, seed=0))
  assert batch["image"].dtype == np.float32 and batch["image"].shape == (BATCH, 8, 8, 1)
  assert batch["label"].dtype == np.int32 and batch["label"].shape == (BATCH,)
  assert batch["id"].dtype == np.int64 and batch["id"].shape == (BATCH,)
  assert abs(batch["image"].mean()) < 0.2 and 0.8 < batch["image"].std() < 1.2


def test_same_seed_same_batches_different_seed_different(cfg):
  a = _take(data.train_iterator(cfg, global_batch_size=BATCH, seed=7), 7)
  b = _take(data.train_iterator(cfg, global_batch_size=BATCH, seed=7), 7)
  for x, y in zip(a, b, strict=True):
    _assert_batches_equal(x, y)
  c = next(data.train_iterator(cfg, global_batch_size=BATCH, seed=8))
  assert not np.array_equal(a[0]["id"], c["id"])


def test_epochs_cover_examples_once_in_new_orders(cfg):
  iterator = data.train_iterator(cfg, global_batch_size=BATCH, seed=0)
  steps = iterator.steps_per_epoch
  assert steps == 1500 // BATCH
  epochs = [np.concatenate([b["id"] for b in _take(iterator, steps)]) for _ in range(2)]
  for ids in epochs:
    assert len(set(ids.tolist())) == steps * BATCH  # No repeats; the remainder is dropped.
    assert ids.min() >= 0 and ids.max() < 1500
  assert not np.array_equal(epochs[0], epochs[1])
  assert iterator.epoch == 2


def _shifts(image, padding):
  """Every crop of `image` zero-padded by `padding`."""
  h, w = image.shape[:2]
  padded = np.pad(image, ((padding, padding), (padding, padding), (0, 0)))
  return [padded[dy:dy + h, dx:dx + w] for dy in range(2 * padding + 1)
          for dx in range(2 * padding + 1)]


@pytest.mark.parametrize("augment", ["crop", "crop_flip"])
def test_augmentation_changes_images_and_keeps_labels(cfg, augment):
  plain = next(data.train_iterator(_config(cfg, augment="none"), global_batch_size=BATCH, seed=3))
  aug = next(data.train_iterator(_config(cfg, augment=augment, crop_padding=2),
                                 global_batch_size=BATCH, seed=3))
  np.testing.assert_array_equal(plain["id"], aug["id"])
  np.testing.assert_array_equal(plain["label"], aug["label"])
  changed = [not np.array_equal(p, a) for p, a in zip(plain["image"], aug["image"], strict=True)]
  assert sum(changed) > BATCH // 2
  # Normalised zero padding is the value of a raw 0 pixel.
  info = data.get_info(cfg)
  zero = np.float32(-info.mean[0] / info.std[0])
  flipped = 0
  for p, a in zip(plain["image"], aug["image"], strict=True):
    raw = p - zero  # Padding with 0 commutes with this shift of the normalised image.
    crops = _shifts(raw, 2)
    if any(np.allclose(a - zero, c, atol=1e-5) for c in crops):
      continue
    assert augment == "crop_flip", "a crop must be a shifted window of the padded image"
    assert any(np.allclose(a - zero, c[:, ::-1], atol=1e-5) for c in crops)
    flipped += 1
  if augment == "crop_flip":
    assert flipped > BATCH // 4


def test_state_round_trips_and_resumes_exactly(cfg):
  reference = _take(data.train_iterator(cfg, global_batch_size=BATCH, seed=5), 9)
  first = data.train_iterator(cfg, global_batch_size=BATCH, seed=5)
  _take(first, 6)
  state = json.loads(json.dumps(first.get_state()))
  assert state["step"] == 6
  resumed = data.train_iterator(cfg, global_batch_size=BATCH, seed=5)
  resumed.set_state(state)
  for want, got in zip(reference[6:], _take(resumed, 3), strict=True):
    _assert_batches_equal(want, got)
  with pytest.raises(ValueError, match="seed"):
    data.train_iterator(cfg, global_batch_size=BATCH, seed=6).set_state(state)


def test_process_shards_make_the_global_batch(cfg):
  whole = _take(data.train_iterator(cfg, global_batch_size=BATCH, seed=1), 6)
  shards = [_take(data.train_iterator(cfg, global_batch_size=BATCH, seed=1, process_index=i,
                                      process_count=2), 6) for i in range(2)]
  for step, want in enumerate(whole):
    assert shards[0][step]["image"].shape[0] == BATCH // 2
    got = {k: np.concatenate([shards[0][step][k], shards[1][step][k]]) for k in want}
    _assert_batches_equal(want, got)
  with pytest.raises(ValueError, match="multiple"):
    data.train_iterator(cfg, global_batch_size=BATCH + 1, seed=1, process_count=2)


def test_eval_batches_cover_the_split_once(cfg):
  batches = data.eval_batches(cfg, global_batch_size=128)
  assert len(batches) == 3
  batches = list(batches)
  assert all(b["image"].shape == (128, 8, 8, 1) for b in batches)
  mask = np.concatenate([b["mask"] for b in batches])
  ids = np.concatenate([b["id"] for b in batches])
  assert mask.dtype == np.float32 and mask.sum() == 297
  assert sorted(ids[mask == 1].tolist()) == list(range(297))
  assert (ids[mask == 0] == -1).all()
  assert batches[-1]["mask"][:41].all() and not batches[-1]["mask"][41:].any()
  # Two processes: same number of batches, shards concatenate to the global batch.
  shards = [list(data.eval_batches(cfg, global_batch_size=128, process_index=i, process_count=2))
            for i in range(2)]
  for g, want in enumerate(batches):
    for key in want:
      np.testing.assert_array_equal(
          want[key], np.concatenate([shards[0][g][key], shards[1][g][key]]), err_msg=key)


def test_eval_matches_unaugmented_train_images(cfg):
  train = next(data.train_iterator(_config(cfg, augment="none"), global_batch_size=BATCH, seed=0))
  evals = list(data.eval_batches(cfg, global_batch_size=BATCH, split="train"))
  by_id = {int(i): (image, label) for b in evals
           for i, image, label in zip(b["id"], b["image"], b["label"], strict=True)}
  for i, image, label in zip(train["id"], train["image"], train["label"], strict=True):
    np.testing.assert_array_equal(by_id[int(i)][0], image)
    assert by_id[int(i)][1] == label


def test_train_subset_limits_examples(cfg):
  iterator = data.train_iterator(_config(cfg, train_subset=300), global_batch_size=100, seed=0)
  assert iterator.num_examples == 300 and iterator.steps_per_epoch == 3
  ids = np.concatenate([b["id"] for b in _take(iterator, 9)])
  assert set(ids.tolist()) == set(range(300))
  # The subset does not depend on the seed.
  other = data.train_iterator(_config(cfg, train_subset=300), global_batch_size=100, seed=9)
  assert set(np.concatenate([b["id"] for b in _take(other, 3)]).tolist()) == set(range(300))


def test_train_can_be_sliced_into_train_and_held_out(cfg):
  """TFDS slices of the train split, `train[:1200]` to train and `train[1200:]` to evaluate
  (configs/digits.py's `val`): their sizes in get_info (a run's step count comes from there),
  disjoint examples in stored order, checked against scikit-learn's digits."""
  from sklearn.datasets import load_digits

  config = _config(cfg, train_split="train[:1200]", eval_split="train[1200:]", augment="none")
  assert data.get_info(config).num_examples == {
      "train": 1500, "test": 297, "train[:1200]": 1200, "train[1200:]": 300}
  digits = load_digits()
  stored = np.random.default_rng(0).permutation(1797)[:1500]  # The train split's order.
  held = list(data.eval_batches(config, global_batch_size=128))
  mask = np.concatenate([b["mask"] for b in held]) == 1
  np.testing.assert_array_equal(np.concatenate([b["label"] for b in held])[mask],
                                digits.target[stored[1200:]])
  images = np.concatenate([b["image"] for b in held])[mask]
  info = data.get_info(config)
  np.testing.assert_allclose((images * info.std[0] + info.mean[0]) * 16,
                             digits.images[stored[1200:], :, :, None], atol=1e-4)
  train = data.train_iterator(config, global_batch_size=100, seed=0)
  assert (train.num_examples, train.steps_per_epoch) == (1200, 12)
  batches = _take(train, 12)
  ids = np.concatenate([b["id"] for b in batches])
  assert sorted(ids.tolist()) == list(range(1200))
  np.testing.assert_array_equal(np.concatenate([b["label"] for b in batches]),
                                digits.target[stored[ids]])
  with pytest.raises(ValueError, match=r"data.eval_split='train\[1200:' is not a split of "
                     r"'digits' \(\['test', 'train'\]\) or a TFDS slice of one"):
    data.get_info(_config(cfg, eval_split="train[1200:"))


def test_missing_tfds_data_set_says_how_to_prepare(tmp_path):
  config = data.default_data_config("cifar10")
  config.data_dir = str(tmp_path)
  with pytest.raises(data.DataNotPreparedError, match="prepare_data.py cifar10"):
    data.train_iterator(config, global_batch_size=8, seed=0)
  with pytest.raises(data.DataNotPreparedError, match="prepare_data.py"):
    data.get_info(config)


def test_default_config_and_data_dir(monkeypatch, tmp_path):
  digits = data.default_data_config("digits")
  assert (digits.augment, digits.crop_padding, digits.train_subset) == ("crop", 1, 0)
  cifar = data.default_data_config("cifar100")
  assert (cifar.augment, cifar.crop_padding) == ("crop_flip", 4)
  monkeypatch.setenv(data.DATA_DIR_ENV, str(tmp_path))
  assert data.resolve_data_dir(cifar) == str(tmp_path)
  cifar.data_dir = "/elsewhere"
  assert data.resolve_data_dir(cifar) == "/elsewhere"


def test_worker_processes_give_the_same_batches(cfg):
  want = _take(data.train_iterator(cfg, global_batch_size=BATCH, seed=2), 4)
  iterator = data.train_iterator(_config(cfg, num_workers=2), global_batch_size=BATCH, seed=2)
  iterator.set_state(iterator.get_state() | {"step": 2})  # Workers start at the restored step.
  try:
    for w, g in zip(want[2:], _take(iterator, 2), strict=True):
      _assert_batches_equal(w, g)
  finally:
    iterator.close()


def test_prepare_data_without_network_ends_in_seconds_with_one_line(tmp_path):
  """The download host unreachable (here: the proxy, a closed port on 127.0.0.1, so the test
  is the same with or without internet): one line naming the host and the error, exit 1,
  within seconds rather than TFDS's minutes of retries, and nothing written."""
  import socket
  import subprocess
  import sys
  import time

  from conftest import ROOT, cli_env

  with socket.socket() as s:  # A port nothing listens on.
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  proxy = f"http://127.0.0.1:{port}"
  env = {**cli_env(), **{k: proxy for k in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY",
                                             "http_proxy")}, "NO_PROXY": "", "no_proxy": ""}
  start = time.time()
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "prepare_data.py"),
                         "cifar10", f"--data_dir={tmp_path / 'data'}", "--connect_timeout=2"],
                        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=100)
  assert time.time() - start < 60
  assert (proc.returncode, proc.stdout) == (1, ""), proc.stderr
  lines = proc.stderr.splitlines()
  assert len(lines) == 1, lines
  assert lines[0].startswith(
      f"Error: cifar10 downloads from www.cs.toronto.edu:443, which cannot be reached through "
      f"the proxy 127.0.0.1:{port} ($HTTPS_PROXY): ConnectionRefusedError: ")
  assert not (tmp_path / "data").exists()
