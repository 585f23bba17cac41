"""The CRD paper's cross-architecture recipes (configs/cifar_kd.py) and CRD's class-aware
negatives: the data-side sampler, the loss with them against the NumPy reference of
test_crd.py, and the pipeline that feeds them to the run."""

from __future__ import annotations

import importlib.util
import os
import pickle

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from test_crd import np_crd

from distill_jax import data as data_lib
from distill_jax import losses, models
from distill_jax.common.outputs import Outputs
from distill_jax.config import ConfigError, load_config_file, validate
from distill_jax.data import contrast
from distill_jax.losses.objective import ObjectiveError, build_objective
from distill_jax.teachers import Teacher, init_shapes
from distill_jax.train import build

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CIFAR_KD = os.path.join(ROOT, "configs", "cifar_kd.py")
PAIRS = [("vgg13", "mobilenetv2"), ("resnet50", "mobilenetv2"), ("resnet50", "vgg8"),
         ("resnet32x4", "shufflev1"), ("resnet32x4", "shufflev2"), ("wrn_40_2", "shufflev1")]


def _load(arg, overrides=None):
  return load_config_file(f"{CIFAR_KD}:{arg}", overrides)


def _cifar_kd_methods():
  spec = importlib.util.spec_from_file_location("cifar_kd", CIFAR_KD)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return list(module.METHODS)


# Every method but FSP, which is not defined across these architectures.
METHODS = [m for m in _cifar_kd_methods() if m != "fsp"]


# -------------------------------------------------------------------------------- the recipes


def test_every_cross_pair_and_method_validates_with_the_reference_settings():
  for teacher, student in PAIRS:
    validate(_load(f"ce,{student}"))
    for method in METHODS:
      c = _load(f"{method},{teacher},{student}")
      validate(c)
      assert c.optim.lr == (0.05 if student == "vgg8" else 0.01), (teacher, student)
    with pytest.raises(ValueError, match="FSP"):
      _load(f"fsp,{teacher},{student}")
  validate(_load("ce,resnet50"))
  at = _load("at,resnet50,mobilenetv2").losses.at
  assert at.pool_to_smaller and tuple(at.student_layers) == (
      "stage1", "stage2", "stage3", "stage4") == tuple(at.teacher_layers)
  at = _load("at,resnet32x4,shufflev1").losses.at
  assert tuple(at.student_layers) == ("stage1", "stage2", "stage3")
  # FitNet: the student's stage2 (8x8) against the teacher's stage of that resolution.
  assert _load("fitnet,resnet50,mobilenetv2").losses.fitnet.teacher_layer == "stage3"
  assert _load("fitnet,vgg13,mobilenetv2").losses.fitnet.teacher_layer == "stage2"
  ab = _load("ab,resnet32x4,shufflev2").stages.pretrain.losses.ab
  assert tuple(ab.student_layers) == ("stage1", "stage2")
  assert tuple(ab.teacher_layers) == ("stage2", "stage3")
  assert tuple(ab.layer_weights) == (0.5, 1.0)
  sp = _load("sp,wrn_40_2,shufflev1").losses.sp
  assert tuple(sp.student_layers) == ("stage3",) == tuple(sp.teacher_layers)
  ft = _load("ft,resnet50,vgg8")
  assert (ft.losses.ft.teacher_layer, ft.losses.ft.student_layer) == ("stage4", "stage4")
  assert ft.stages.pretrain.losses.ft.teacher_layer == "stage4"
  for arg in ("crd,resnet50,vgg8", "crd_kd,resnet56,resnet20"):
    assert _load(arg).losses.crd.negatives == "other_class"
  # Same-architecture recipes keep the terms' default layers.
  assert "pool_to_smaller" not in _load("at,resnet56,resnet20").losses.at


INFO = data_lib.DatasetInfo("cifar100", 100, (32, 32, 3), {"train": 50000, "test": 10000},
                            (0.5,) * 3, (0.25,) * 3)


def _abstract_teachers(teachers_config, num_classes, input_shape, **loading):
  """Teachers with abstract variables (no checkpoints needed to trace); `loading` (document
  masking, shardings) concerns open weights only."""
  out = {}
  for name, settings in teachers_config.items():
    module = models.build_model(settings.model, num_classes)
    out[name] = Teacher(name, settings.model, module, init_shapes(module, input_shape))
  return out


@pytest.mark.parametrize("teacher, student", PAIRS)
def test_every_method_of_a_cross_pair_traces(teacher, student, monkeypatch):
  """One abstract trace per pair (build_run's eval_shape of the objective, CIFAR-100 shapes) of
  the union of every method's terms (main stage and pre-training stages), each term with the
  settings its own recipe gives it for this pair: what each recipe's run traces first."""
  monkeypatch.setattr(data_lib, "get_info", lambda _: INFO)
  monkeypatch.setattr(contrast, "train_labels", lambda _, n: np.arange(n) % 100)
  monkeypatch.setattr(build, "load_teachers", _abstract_teachers)
  union = {"ce": {"weight": 1.0}}
  for method in METHODS:
    c = _load(f"{method},{teacher},{student}")
    stage_terms = {f"pre_{k}": v for s in c.stages.values() for k, v in s.losses.items()}
    for name, settings in {**c.losses, **stage_terms}.items():
      if name != "ce":
        union[f"{method}_{name}"] = {"loss": name.removeprefix("pre_"), **settings.to_dict()}
  config = _load(f"kd,{teacher},{student}", {"batch_size": 4, "eval_batch_size": 4,
                                             "parallel.num_devices": 1})
  with config.unlocked():
    config.losses = ml_collections.ConfigDict(union)
  run = build.build_run(config)
  names = {t.name for t in run.objective.terms}
  assert {"at_at", "fitnet_fitnet", "ab_pre_ab", "ft_pre_ft", "crd_crd", "vid_vid"} <= names
  assert run.example["contrast_idx"].shape == (4, 16385)


# ------------------------------------------------------------------- class-aware negatives


LABELS = np.repeat(np.arange(4), [3, 20, 7, 10])[np.random.default_rng(0).permutation(40)]


def test_negatives_come_from_other_classes_uniformly_and_deterministically():
  draw = contrast.class_contrast_indices(LABELS, 3000, seed=7)
  ids = np.array([5, 0, 17, 39, 22])
  idx = draw(3, ids)
  assert idx.shape == (5, 3001) and idx.dtype == np.int32
  np.testing.assert_array_equal(idx[:, 0], ids)  # 'self': the positive is the example.
  for row, i in zip(idx, ids, strict=True):
    negatives = row[1:]
    assert np.all(LABELS[negatives] != LABELS[i])
    others = np.flatnonzero(LABELS != LABELS[i])
    counts = np.bincount(negatives, minlength=40)[others]  # Every other-class example, evenly.
    expected = 3000 / len(others)
    assert np.all(np.abs(counts - expected) < 6 * np.sqrt(expected))
  np.testing.assert_array_equal(draw(3, ids), idx)  # Deterministic...
  np.testing.assert_array_equal(pickle.loads(pickle.dumps(draw))(3, ids), idx)  # (workers)
  np.testing.assert_array_equal(draw(3, ids[::-1]), idx[::-1])  # ...per example, not position,
  np.testing.assert_array_equal(
      contrast.class_contrast_indices(LABELS, 3000, seed=7)(3, ids), idx)
  assert np.mean(draw(4, ids)[:, 1:] == idx[:, 1:]) < 0.2  # new every epoch,
  other_seed = contrast.class_contrast_indices(LABELS, 3000, seed=8)(3, ids)
  assert np.mean(other_seed[:, 1:] == idx[:, 1:]) < 0.2  # and per seed.


def test_same_class_positive_and_bad_settings():
  draw = contrast.class_contrast_indices(LABELS, 16, seed=1, positive="same_class")
  ids = np.arange(40)
  idx = np.concatenate([draw(e, ids) for e in range(30)])
  np.testing.assert_array_equal(LABELS[idx[:, 0]], np.tile(LABELS, 30))
  assert np.mean(idx[:, 0] != np.tile(ids, 30)) > 0.5  # Mostly another example of the class.
  assert np.all(LABELS[idx[:, 1:]] != LABELS[np.tile(ids, 30)][:, None])
  with pytest.raises(ValueError, match="positive"):
    contrast.class_contrast_indices(LABELS, 4, seed=0, positive="other")
  with pytest.raises(ValueError, match="two classes"):
    contrast.class_contrast_indices(np.zeros(5, int), 4, seed=0)


def _outputs(x):
  x = jnp.asarray(x, jnp.float32)
  return Outputs(jnp.zeros((x.shape[0], 3)), {"pool": x}, {})


def test_crd_with_class_negatives_matches_numpy_and_needs_the_indices():
  n, b, k = 40, 8, 6
  module = losses.LOSSES.get("crd")(feat_dim=4, num_negatives=k, nce_temperature=0.2,
                                    num_examples=n, negatives="other_class")
  rng = np.random.default_rng(3)
  f_s, f_t, ids = rng.normal(size=(b, 5)), rng.normal(size=(b, 7)), rng.permutation(n)[:b]
  idx = contrast.class_contrast_indices(LABELS, k, seed=0)(0, ids)
  batch = {"id": jnp.asarray(ids), "contrast_idx": jnp.asarray(idx)}
  rngs = {"params": jax.random.PRNGKey(0), "loss": jax.random.PRNGKey(1)}
  apply = jax.jit(lambda v, s, t, batch: module.apply(
      v, _outputs(s), {"t": _outputs(t)}, batch, rngs=rngs, mutable=["memory"]))
  variables = jax.jit(lambda s, t, batch: module.init(rngs, _outputs(s), {"t": _outputs(t)},
                                                       batch))(f_s, f_t, batch)
  loss, state = apply(variables, f_s, f_t, batch)
  memory = jax.tree.map(np.asarray, dict(variables["memory"]))
  want, want_memory, _ = np_crd(jax.tree.map(np.asarray, variables["params"]), memory, f_s, f_t,
                                idx, ids, temperature=0.2, momentum=0.5, num_examples=n)
  np.testing.assert_allclose(loss, want, rtol=1e-5)
  for bank in ("memory_s", "memory_t"):
    np.testing.assert_allclose(state["memory"][bank], want_memory[bank], atol=1e-6)
  with pytest.raises(ValueError, match=r"contrast_idx"):
    module.apply(variables, _outputs(f_s), {"t": _outputs(f_t)}, {"id": jnp.asarray(ids)},
                 rngs=rngs)
  objective = build_objective({"crd": {"negatives": "random"}}, ["t"], {"num_examples": n})
  with pytest.raises(ObjectiveError, match="negatives='random' is not one of"):
    objective.init(jax.random.PRNGKey(0), _outputs(f_s), {"t": _outputs(f_t)}, batch)


def test_side_data_is_declared_by_the_loss_and_built_once_per_key():
  """CRD declares `contrast_idx` only with negatives='other_class' (`side_data`); two terms
  that declare one key differently, or a sampling setting that is not allowed, are refused
  naming the terms before any data is read."""
  crd = lambda **kw: {"loss": "crd", "negatives": "other_class", **kw}
  uniform = build_objective({"crd": {}}, ["t"], {"num_examples": 10})
  [need] = build_objective({"crd": crd(num_negatives=5)}, ["t"],
                           {"num_examples": 10}).terms[0].fn.side_data()
  assert (need.key, need.shape, need.dtype) == ("contrast_idx", (6,), "int32")
  assert uniform.terms[0].fn.side_data() == ()
  side, example = {}, {}
  build.add_side_data(uniform, None, 10, side, example)  # Nothing declared: nothing read.
  assert side == {} and example == {}
  two = build_objective({"a": crd(num_negatives=5), "b": crd(num_negatives=7)}, ["t"],
                        {"num_examples": 10})
  with pytest.raises(ConfigError, match=r"Loss terms \['a', 'b'\] read batch key "
                     r"'contrast_idx' with different settings"):
    build.add_side_data(two, None, 10, {}, {})
  bad = build_objective({"c": crd(positive="nearest")}, ["t"], {"num_examples": 10})
  with pytest.raises(ConfigError, match=r"Loss term 'c': crd positive='nearest' is not one"):
    build.add_side_data(bad, None, 10, {}, {})


def test_the_run_feeds_class_negatives_through_the_batches(data_dir):
  """build_run's wiring on the embedded digits: the train batches carry contrast_idx whose
  negatives all have another label than their anchor, and column 0 is the example's id."""
  config = load_config_file(os.path.join(ROOT, "configs", "digits.py:kd,tiny"),
                            {"data.data_dir": data_dir})
  objective = build_objective({"crd": {"num_negatives": 50, "negatives": "other_class"}},
                              ["teacher"], {"num_examples": 1500})
  side, example = {}, {}
  build.add_side_data(objective, config, 1500, side, example)
  assert example["contrast_idx"].shape == (config.batch_size, 51)
  labels = data_lib.train_labels(config.data, 1500)
  batches = data_lib.train_iterator(config.data, global_batch_size=config.batch_size,
                                    seed=config.seed, side_data=side)
  for _ in range(2):
    batch = next(batches)
    idx = batch["contrast_idx"]
    np.testing.assert_array_equal(idx[:, 0], batch["id"])
    np.testing.assert_array_equal(labels[batch["id"]], batch["label"])
    assert np.all(labels[idx[:, 1:]] != batch["label"][:, None])
