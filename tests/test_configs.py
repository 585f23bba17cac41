"""Every shipped config file loads and validates; bad config args fail clearly."""

import glob
import os

import pytest

from distill_jax.config import ConfigError, load_config_file, validate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "configs")

ARGS = {
    "digits.py": ["teacher", "student", "kd", "kd,tiny"],
    "cifar_kd.py": ["ce,resnet56", "kd,resnet56,resnet20", "kd,resnet32x4,resnet8x4",
                    "kd,wrn_40_2,wrn_16_2", "kd,vgg13,vgg8,cifar10", "ce,resnet110,tiny"],
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
  with pytest.raises(ConfigError, match="'lrr' is not one of"):
    load_config_file(os.path.join(CONFIGS, "digits.py:kd"), {"optim.lrr": 0.2})
  with pytest.raises(ValueError, match="expected"):
    load_config_file(os.path.join(CONFIGS, "cifar_kd.py:kd,resnet56"))
  with pytest.raises(ConfigError, match="No config file"):
    load_config_file(os.path.join(CONFIGS, "nope.py"))
