"""Several teachers: different architectures and input sizes in one run, and the teacher output
cache (cached and live teachers train the same, top-k against NumPy, every kind of stale or
broken cache refused with its reason). Aggregations are checked in test_losses and
test_logit_losses."""

import json
import os

import jax
import numpy as np
import pytest
import scipy.special
from conftest import run_steps, tiny

from distill_jax import data as data_lib
from distill_jax.common.model_io import CheckpointError, export_model, read_model_meta
from distill_jax.config import ConfigError
from distill_jax.data import teacher_cache
from distill_jax.data.teacher_cache import CacheError
from distill_jax.models import build_model
from distill_jax.tasks import get_task
from distill_jax.teachers import cache_teachers, load_teacher
from distill_jax.train import loop
from distill_jax.train.build import build_run

CLASSIFICATION = get_task("classification")

MLP_TEACHER = {"model": "mlp", "kwargs": {"hidden": (64,)}}


@pytest.fixture(scope="module")
def mlp_teacher_dir(data_dir, tmp_path_factory):
  """A second teacher of another architecture (an MLP) beside the session's CNN teacher."""
  workdir = str(tmp_path_factory.mktemp("mlp_teacher"))
  config = tiny("teacher", data_dir, num_steps=30, **{
      "student.name": MLP_TEACHER["model"], "student.kwargs": MLP_TEACHER["kwargs"]})
  loop.train_and_evaluate(config, workdir)
  return workdir


def two_teacher_config(data_dir, teacher_dir, mlp_teacher_dir, cache_dir=None, **overrides):
  """KD (entropy-weighted) from a CNN and an MLP teacher, on unaugmented digits."""
  config = tiny("kd", data_dir, **{"teachers.teacher.checkpoint": teacher_dir,
                                   "data.augment": "none", **overrides})
  with config.unlocked():
    config.teachers.mlp = {**MLP_TEACHER, "checkpoint": mlp_teacher_dir, "cache": None}
    config.losses.kd.aggregation = "entropy"
    if cache_dir:
      for name in config.teachers:
        config.teachers[name].cache = os.path.join(cache_dir, name)
  return config


@pytest.fixture(scope="module")
def cache_dir(data_dir, teacher_dir, mlp_teacher_dir, tmp_path_factory):
  directory = str(tmp_path_factory.mktemp("cache"))
  config = two_teacher_config(data_dir, teacher_dir, mlp_teacher_dir)
  written = cache_teachers(config, directory, batch_size=100)
  assert sorted(written) == ["mlp", "teacher"]
  return directory


def test_cached_teachers_train_exactly_like_live_ones(data_dir, teacher_dir, mlp_teacher_dir,
                                                      cache_dir):
  """Two teachers of different architectures: 3 steps from the cache give the live loss and
  params, on one device and on 8 (pmap, the cached logits sharded with the batch)."""
  live_config = two_teacher_config(data_dir, teacher_dir, mlp_teacher_dir)
  live_run = build_run(live_config)
  assert {n: t.model for n, t in live_run.teachers.items()} == {"teacher": "cnn",
                                                                     "mlp": "mlp"}
  live_state, live_metrics = run_steps(live_config, 3)
  for mode, devices in [("jit", 1), ("pmap", 8)]:
    config = two_teacher_config(data_dir, teacher_dir, mlp_teacher_dir, cache_dir, **{
        "parallel.mode": mode, "parallel.num_devices": devices})
    run = build_run(config)
    assert all(v == {} for v in run.teacher_vars.values())  # No teacher on the device.
    state, metrics = run_steps(config, 3)
    np.testing.assert_allclose(metrics["loss"], live_metrics["loss"], rtol=1e-5)
    np.testing.assert_allclose(metrics["loss/kd"], live_metrics["loss/kd"], rtol=1e-5)
    for x, y in zip(jax.tree.leaves(state.params), jax.tree.leaves(live_state.params),
                    strict=True):
      np.testing.assert_allclose(x, y, atol=1e-5, rtol=0)


def test_cached_run_evaluates_fidelity_from_the_cache(data_dir, teacher_dir, mlp_teacher_dir,
                                                      cache_dir, tmp_path):
  live = loop.train_and_evaluate(
      two_teacher_config(data_dir, teacher_dir, mlp_teacher_dir), str(tmp_path / "live"))
  cached = loop.train_and_evaluate(
      two_teacher_config(data_dir, teacher_dir, mlp_teacher_dir, cache_dir),
      str(tmp_path / "cached"))
  for key in ("eval/top1", "eval/teacher_top1/teacher", "eval/teacher_top1/mlp",
              "eval/teacher_top1/ensemble", "eval/agreement/ensemble", "eval/kl/mlp"):
    np.testing.assert_allclose(cached["final"][key], live["final"][key], rtol=1e-4,
                               atol=1e-6, err_msg=key)


def test_cache_holds_the_teachers_forward_per_augmented_slot(data_dir, teacher_dir, tmp_path):
  """With augment_period=2, slot e % 2 holds the teacher's logits on epoch e's crops."""
  config = tiny("kd", data_dir, **{"teachers.teacher.checkpoint": teacher_dir,
                                   "data.augment": "crop", "data.augment_period": 2,
                                   "data.augment_seed": 11})
  directory = cache_teachers(config, str(tmp_path), batch_size=128)["teacher"]
  info = data_lib.get_info(config.data)
  teacher = load_teacher("teacher", config.teachers.teacher, info.num_classes, info.image_shape)
  readers = teacher_cache.open_cache(directory, teacher, CLASSIFICATION, config.data,
                                     seed=config.seed,
                                     splits=("train", "test"))
  train = data_lib.train_iterator(config.data, global_batch_size=1, seed=config.seed)
  ids = np.array([0, 5, 1499, 7])
  forward = lambda images: np.asarray(teacher.module.apply(teacher.variables, images,
                                                           train=False))
  for epoch in (0, 1, 2, 5):
    np.testing.assert_allclose(readers["train"](epoch, ids),
                               forward(train.examples(epoch, ids)["image"]), atol=1e-5)
  # Period 2: epoch 2 shows epoch 0's crops, epoch 1 others.
  np.testing.assert_array_equal(train.examples(2, ids)["image"], train.examples(0, ids)["image"])
  assert not np.array_equal(train.examples(1, ids)["image"], train.examples(0, ids)["image"])
  # The eval split is cached unaugmented, and padded rows of an eval batch get zeros.
  batch = next(data_lib.eval_batches(config.data, global_batch_size=300,
                                     side_data={"t": readers["test"]}))
  np.testing.assert_allclose(batch["t"][:297], forward(batch["image"][:297]), atol=1e-5)
  assert not batch["t"][297:].any()
  # The augmentation seed, not the run's seed, decides the crops: another seed, same cache.
  other_seed = tiny("kd", data_dir, seed=3, **{
      "teachers.teacher.checkpoint": teacher_dir, "data.augment": "crop",
      "data.augment_period": 2, "data.augment_seed": 11})
  teacher_cache.open_cache(directory, teacher, CLASSIFICATION, other_seed.data, seed=3,
                           splits=("train",))


@pytest.mark.parametrize("top_k", [0, 1, 3])
def test_top_k_records_against_numpy(top_k):
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(6, 10)) * 3
  records = teacher_cache.encode(logits, top_k)
  decoded = teacher_cache.decode(records, 10)
  if top_k:  # Packed for the device (1 + 2k numbers), decoded there: the host's numbers.
    packed = teacher_cache.pack(records, 10)
    assert packed.shape == (6, 1 + 2 * top_k) and packed.dtype == np.float32
    np.testing.assert_array_equal(teacher_cache.unpack(packed, 10), decoded)
  if top_k == 0:
    np.testing.assert_array_equal(decoded, logits.astype(np.float32))
    return
  p = scipy.special.softmax(logits, -1)
  top = np.argsort(-p, -1)[:, :top_k]
  want = np.repeat(((1 - np.take_along_axis(p, top, -1).sum(-1)) / (10 - top_k))[:, None], 10,
                   axis=1)
  np.put_along_axis(want, top, np.take_along_axis(p, top, -1), -1)
  got = scipy.special.softmax(np.float64(decoded), -1)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(got.sum(-1), 1.0, rtol=1e-6)
  np.testing.assert_array_equal(np.argmax(decoded, -1), np.argmax(logits, -1))
  # float16 storage of full logits: within half precision.
  half = teacher_cache.decode(teacher_cache.encode(logits, 0, "float16"), 10)
  np.testing.assert_allclose(half, logits, rtol=1e-3, atol=1e-3)


def test_stale_or_broken_caches_are_refused_with_the_reason(data_dir, teacher_dir,
                                                             mlp_teacher_dir, cache_dir,
                                                             tmp_path):
  def build(**overrides):
    return build_run(two_teacher_config(data_dir, teacher_dir, mlp_teacher_dir, cache_dir,
                                        **overrides))

  # Another teacher checkpoint: same architecture, other weights.
  info = data_lib.get_info(two_teacher_config(data_dir, teacher_dir, mlp_teacher_dir).data)
  teacher = load_teacher("teacher", {"model": "cnn", "kwargs": {"widths": (32, 64)},
                                     "checkpoint": teacher_dir}, info.num_classes,
                         info.image_shape)
  other = str(tmp_path / "other_teacher")
  export_model(other, jax.tree.map(lambda x: x * 1.01, teacher.variables),
               read_model_meta(os.path.join(teacher_dir, "model")))
  with pytest.raises(CacheError, match="another teacher checkpoint.*sha256"):
    build(**{"teachers.teacher.checkpoint": other})
  # Other inputs: augmented data, with or without a period.
  with pytest.raises(CacheError, match="augment: cache has 'none', this run has 'crop'"):
    build(**{"data.augment": "crop", "data.augment_period": 3})
  with pytest.raises(CacheError, match="every epoch draws new crops"):
    build(**{"data.augment": "crop"})
  # A cache of the wrong teacher (the MLP's cache given to the CNN): refused, not misread.
  config = two_teacher_config(data_dir, teacher_dir, mlp_teacher_dir, cache_dir)
  with config.unlocked():
    config.teachers.teacher.cache = os.path.join(cache_dir, "mlp")
  with pytest.raises(CacheError, match="teacher 'teacher' is cnn"):
    build_run(config)
  # Missing, and corrupt.
  with config.unlocked():
    config.teachers.teacher.cache = str(tmp_path / "nowhere")
  with pytest.raises(CacheError, match="no teacher cache at .*nowhere"):
    build_run(config)
  broken = tmp_path / "broken"
  os.makedirs(broken)
  for name in os.listdir(os.path.join(cache_dir, "teacher")):
    data = open(os.path.join(cache_dir, "teacher", name), "rb").read()
    open(broken / name, "wb").write(data[:len(data) // 2] if name == "train.array_record"
                                    else data)
  with config.unlocked():
    config.teachers.teacher.cache = str(broken)
  with pytest.raises(CacheError, match="train.array_record"):
    build_run(config)
  # Caching needs repeated inputs; a feature term cannot use a logits-only cache.
  with pytest.raises(CacheError, match="augment_period=0"):
    cache_teachers(tiny("kd", data_dir, **{
        "teachers.teacher.checkpoint": teacher_dir, "data.augment": "crop"}), str(tmp_path))
  at = tiny("at", data_dir, **{"teachers.teacher.checkpoint": teacher_dir,
                               "data.augment": "none",
                               "teachers.teacher.cache": os.path.join(cache_dir, "teacher")})
  with pytest.raises(ConfigError, match=r"holds logits only.*\['at'\]"):
    build_run(at)


def test_teacher_at_another_input_size(data_dir, teacher_dir, tmp_path):
  """An MLP teacher made for 16x16 images beside the 8x8 CNN teacher: it loads only with
  `input_size`, sees the resized batch, and its cache holds that same forward."""
  module = build_model("mlp", 10, hidden=(32,))
  variables = module.init(jax.random.PRNGKey(5), np.zeros((1, 16, 16, 1)), train=False)
  big_dir = str(tmp_path / "big")
  export_model(big_dir, variables, {"model": "mlp", "kwargs": {"hidden": (32,)},
                                    "num_classes": 10, "step": 0})
  config = tiny("kd", data_dir, **{"teachers.teacher.checkpoint": teacher_dir,
                                   "data.augment": "none"})
  with config.unlocked():
    config.teachers.big = {"model": "mlp", "kwargs": {"hidden": (32,)}, "checkpoint": big_dir,
                           "cache": None, "input_size": None}
  with pytest.raises(CheckpointError, match=r"teachers.big.input_size=\(H, W\)"):
    build_run(config)
  with config.unlocked():
    config.teachers.big.input_size = (16, 16)
  run = build_run(config)
  batch = next(data_lib.eval_batches(config.data, global_batch_size=32))
  got = run.teacher_applies["big"](run.teacher_vars["big"], batch, False).logits
  resized = jax.image.resize(batch["image"], (32, 16, 16, 1), "bilinear")
  np.testing.assert_allclose(got, module.apply(variables, resized, train=False), atol=1e-6)
  _, metrics = run_steps(config, 2)
  assert np.isfinite(metrics["loss/kd"])
  directory = cache_teachers(config, str(tmp_path / "cache"), names=["big"],
                                           batch_size=64)["big"]
  reader = teacher_cache.open_cache(directory, run.teachers["big"], CLASSIFICATION,
                                    config.data, seed=config.seed,
                                    splits=("train", "test"))["test"]
  np.testing.assert_allclose(reader(0, batch["id"]), got, atol=1e-5)


def test_cache_teacher_script_then_cli_run(data_dir, teacher_dir, tmp_path):
  """scripts/cache_teacher.py writes the cache and prints the override; the CLI trains from it."""
  import subprocess
  import sys

  from conftest import DIGITS, ROOT, cli_env, run_digits_cli

  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, "scripts", "cache_teacher.py"),
       f"--config={DIGITS}:kd,tiny", f"--cache_dir={tmp_path / 'cache'}", "--top_k=4",
       f"--config.data.data_dir={data_dir}", "--config.data.augment=none",
       f"--config.teachers.teacher.checkpoint={teacher_dir}"],
      capture_output=True, text=True, env=cli_env(), cwd=ROOT, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  override = f"--config.teachers.teacher.cache={tmp_path / 'cache' / 'teacher'}"
  assert override in proc.stdout
  run_digits_cli("kd,tiny", str(tmp_path / "run"), data_dir, teacher_dir,
                 "--config.data.augment=none", override)
  result = json.load(open(tmp_path / "run" / "result.json"))
  final = result["final"]
  assert result["steps"] == 6 and result["teachers"] == {"teacher": "cnn"}
  assert set(final) == {"step", *(f"eval/{k}" for k in (
      "top1", "top5", "ce", "teacher_top1/teacher", "agreement/teacher", "kl/teacher"))}
  # The cache keeps each teacher's top 4 exactly, so its top-1 on the eval split from the cache
  # is the teacher's own eval top-1 (its run's last evaluation, of the exported weights).
  teacher = json.load(open(os.path.join(teacher_dir, "result.json")))["final"]
  assert final["eval/teacher_top1/teacher"] == pytest.approx(teacher["eval/top1"], abs=1e-9)
  assert 0 < final["eval/top1"] <= final["eval/top5"] <= 1
  assert 0 <= final["eval/agreement/teacher"] <= 1 and final["eval/kl/teacher"] > 0
  assert final["eval/ce"] > 0
