"""Every shipped config file loads and validates; bad config args fail clearly."""

import glob
import importlib.util
import os

import pytest

from distill_jax.config import ConfigError, load_config_file, validate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "configs")


def _config_module(name):
  spec = importlib.util.spec_from_file_location(name[:-3], os.path.join(CONFIGS, name))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


ARGS = {
    "digits.py": ["teacher", "student", "kd", "kd,tiny", "all", "all,tiny", "teacher,val",
                  "student,val,tiny",
                  *_config_module("digits.py").METHODS],
    "cifar_kd.py": ["ce,resnet56", "kd,resnet32x4,resnet8x4", "kd,wrn_40_2,wrn_16_2",
                    "kd,vgg13,vgg8,cifar10", "ce,resnet110,tiny",
                    "fitnet_hint,resnet56,resnet20,tiny",
                    *[f"{m},resnet56,resnet20" for m in _config_module("cifar_kd.py").METHODS]],
    "digits_ensemble.py": [*_config_module("digits_ensemble.py").ROLES, "kd_ensemble,tiny"],
    "lm.py": [*_config_module("lm.py").ROLES, "fkl,tiny", "hidden,tiny", "minillm,warm,tiny"],
}


def test_every_config_file_is_covered():
  assert sorted(os.path.basename(p) for p in glob.glob(os.path.join(CONFIGS, "*.py"))) == sorted(
      ARGS)


@pytest.mark.parametrize("spec", [f"{f}:{a}" for f, args in ARGS.items() for a in args])
def test_config_loads_and_validates(spec):
  config = load_config_file(os.path.join(CONFIGS, spec))
  validate(config)
  assert config.is_locked


def test_crd_recipe_is_exact():
  c = load_config_file(os.path.join(CONFIGS, "cifar_kd.py:kd,resnet56,resnet20"))
  assert (c.num_epochs, c.batch_size, c.optim.lr, c.optim.weight_decay) == (240, 64, 0.05, 5e-4)
  assert tuple(c.optim.decay_epochs) == (150, 180, 210) and c.optim.decay_factor == 0.1
  assert c.data.name == "cifar100" and c.data.augment == "crop_flip" and c.data.crop_padding == 4
  assert c.losses.ce.weight == 0.1 and c.losses.kd.weight == 0.9
  assert c.losses.kd.temperature == 4.0
  assert c.teachers.teacher.model == "resnet56" and c.student.name == "resnet20"


def test_overrides_and_bad_args():
  c = load_config_file(os.path.join(CONFIGS, "digits.py:kd"), {"optim.lr": 0.2})
  assert c.optim.lr == 0.2
  with pytest.raises(ConfigError, match="config.optim has no key 'lrr' \\(did you mean 'lr'"):
    load_config_file(os.path.join(CONFIGS, "digits.py:kd"), {"optim.lrr": 0.2})
  with pytest.raises(ValueError, match="expected"):
    load_config_file(os.path.join(CONFIGS, "cifar_kd.py:kd,resnet56"))
  with pytest.raises(ConfigError, match="No config file"):
    load_config_file(os.path.join(CONFIGS, "nope.py"))


def test_digits_recipe_is_the_tuned_one():
  """configs/digits.py's recipe as its tuning chose it: the MLP student (alone and with KD)
  without crop, the CNNs (teacher, the methods' students) with it; `val` trains on
  train[:1200] and evaluates on train[1200:] without the teacher; its sweep is the grid."""
  load = lambda arg: load_config_file(os.path.join(CONFIGS, f"digits.py:{arg}"))
  augment = {arg: (load(arg).student.name, load(arg).data.augment)
             for arg in ("teacher", "student", "kd", "crd", "fsp", "all")}
  assert augment == {"teacher": ("cnn", "crop"), "student": ("mlp", "none"),
                     "kd": ("mlp", "none"), "crd": ("cnn", "crop"), "fsp": ("cnn", "crop"),
                     "all": ("cnn", "crop")}
  for role in ("teacher", "student"):
    c = load(f"{role},val")
    assert (c.data.train_split, c.data.eval_split) == ("train[:1200]", "train[1200:]")
    assert not c.teachers and (c.optim.lr, c.num_epochs) == (0.05, 30.0)
  with pytest.raises(ValueError, match="'val' tunes a model alone"):
    load("kd,val")
  points = _config_module("digits.py").get_sweep().stages["tune"]
  assert len(points) == 2 * 3 * 2 + 2 * 2 * 3 * 2  # teacher + student x 2 regimes.
  assert {(p.arg, p.overrides["data.augment"], p.overrides["optim.lr"]) for p in points} == {
      (f"{role},val", a, lr) for role in ("teacher", "student") for a in ("none", "crop")
      for lr in (0.02, 0.05, 0.1)}


def test_method_recipes_match_the_crd_and_dkd_papers():
  load = lambda arg: load_config_file(os.path.join(CONFIGS, f"cifar_kd.py:{arg}"))
  beta = {"fitnet": 100, "at": 1000, "sp": 3000, "cc": 0.02, "vid": 1, "rkd": 1, "pkt": 30000,
          "ft": 200, "nst": 50, "crd": 0.8}
  for method, weight in beta.items():
    c = load(f"{method},resnet56,resnet20")
    assert c.losses.ce.weight == 1.0 and c.losses[method].weight == weight, method
    assert "kd" not in c.losses, method
  for method in ("ab", "fsp"):  # Pre-train 30 epochs, then cross-entropy alone.
    c = load(f"{method},resnet56,resnet20")
    assert sorted(c.losses) == ["ce"] and c.stages.pretrain.num_epochs == 30
    assert method in c.stages.pretrain.losses
  c = load("ft,resnet56,resnet20")
  assert c.stages.pretrain.train == "objective"
  assert c.stages.pretrain.losses.ft.mode == "reconstruct"
  assert load("dkd,resnet56,resnet20").losses.dkd.beta == 2.0
  assert load("dkd,wrn_40_2,wrn_16_2").losses.dkd.beta == 6.0
  dkd = load("dkd,resnet32x4,resnet8x4").losses.dkd
  assert (dkd.beta, dkd.alpha, dkd.temperature, dkd.warmup_epochs) == (8.0, 1.0, 4.0, 20.0)
