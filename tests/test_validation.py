"""Every numeric setting has a range, declared once beside what it governs (a run setting in
config.py, a loss's hyper-parameter beside the loss, a term's weight in losses/objective.py); a
value outside it fails before anything is built or written, with one message naming the setting
and the range."""

import os
import subprocess
import sys

import pytest
from conftest import DIGITS, ROOT, tiny

from distill_jax import config as config_lib
from distill_jax.common import rules
from distill_jax.config import ConfigError
from distill_jax.train import loop

# (setting, bad value, the allowed range the message must state).
BAD = [
    ("optim.lr", 0.0, "a number > 0"),
    ("optim.lr", -0.1, "a number > 0"),
    ("losses.kd.temperature", 0.0, "a number > 0"),
    ("losses.kd.temperature", -4.0, "a number > 0"),
    ("losses.kd.weight", -0.5, "a number >= 0"),
    ("losses.ce.weight", float("nan"), "a number >= 0"),
    ("checkpoint_every_steps", -1, "an integer >= 1"),
    ("checkpoint_every_steps", 0, "an integer >= 1"),
    ("keep_checkpoints", 0, "an integer >= 1"),
    ("log_every_steps", 0, "an integer >= 1"),
    ("eval_every_epochs", -1.0, "a number >= 0"),
    ("num_steps", -5, "an integer >= 0"),
    ("batch_size", 0, "an integer >= 1"),
    ("optim.momentum", 1.5, "a number in [0, 1)"),
    ("optim.weight_decay", -1e-4, "a number >= 0"),
    ("train.max_consecutive_skips", 0, "an integer >= 1"),
]


@pytest.mark.parametrize("key, value, allowed", BAD, ids=[f"{k}={v}" for k, v, _ in BAD])
def test_bad_value_fails_naming_setting_and_range_writing_nothing(tmp_path, key, value, allowed):
  config = tiny("kd", str(tmp_path / "tfds"), **{key: value})
  workdir = tmp_path / "run"
  with pytest.raises(ConfigError) as info:
    loop.train_and_evaluate(config, str(workdir))
  assert f"config.{key} is {value!r}; it must be {allowed} (" in str(info.value)
  assert "\n" not in str(info.value)
  assert not workdir.exists() and not (tmp_path / "tfds").exists()


def test_unknown_choice_lists_the_choices(tmp_path):
  config = tiny("kd", str(tmp_path / "tfds"), **{"train.on_nonfinite": "ignore"})
  with pytest.raises(ConfigError, match=r"train.on_nonfinite is 'ignore'; choose one of "
                     r"\['stop', 'skip'\]"):
    loop.train_and_evaluate(config, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()


def test_every_range_is_checked_and_the_defaults_pass():
  config = config_lib.base_config()
  config_lib.check_ranges(config)
  for key, (allowed, _) in config_lib.SETTING_RANGES.items():
    node = config
    for part in key.split(".")[:-1]:
      node = node[part]
    leaf = key.split(".")[-1]
    assert allowed.allows(node[leaf]), key
    bad = -1 if allowed.low is None or allowed.low > -1 else (allowed.low - 1)
    with config.unlocked():
      old, node[leaf] = node[leaf], bad
    with pytest.raises(ConfigError, match=f"config.{key} is "):
      config_lib.check_ranges(config)
    with config.unlocked():
      node[leaf] = old


def _kd_config(**overrides):
  """A KD config (digits:kd,tiny) with `overrides`, for validate() only (nothing is built)."""
  from distill_jax.config import load_config_file

  return load_config_file(f"{DIGITS}:kd,tiny", overrides)


@pytest.mark.parametrize("beta", [-0.1, 1.5])
def test_a_losses_own_range_is_checked_for_that_loss_only(beta):
  """gjsd's beta is a mixture weight in [0, 1]; dkd's beta (a weight of any size) is not bound
  by it: each loss declares its ranges beside itself, keyed by its own settings."""
  config = _kd_config(losses={"ce": {"weight": 1.0}, "mix": {"loss": "gjsd", "beta": beta}})
  with pytest.raises(ConfigError) as info:
    config_lib.validate(config)
  assert str(info.value) == (f"config.losses.mix.beta is {beta!r}; it must be a number in "
                             "[0, 1] (the mixture weight: 0 is forward KL, 1 reverse KL).")
  config_lib.validate(_kd_config(losses={"ce": {"weight": 1.0}, "dkd": {"beta": 8.0}}))
  with pytest.raises(ConfigError, match=r"^config.losses.dkd.beta is -1.0; it must be a "
                     r"number >= 0 \(the weight of the non-target part\)\.$"):
    config_lib.validate(_kd_config(losses={"ce": {"weight": 1.0}, "dkd": {"beta": -1.0}}))


def test_a_stage_terms_ranges_are_checked():
  config = _kd_config(stages={"warm": {"num_steps": 2, "losses": {
      "jsd": {"loss": "gjsd", "beta": 2.0}}}})
  with pytest.raises(ConfigError, match=r"^config.stages.warm.losses.jsd.beta is 2.0; it must "
                     r"be a number in \[0, 1\]"):
    config_lib.validate(config)


def test_every_builtin_losss_defaults_lie_in_its_declared_ranges():
  """A declared range names a setting the loss takes and allows the loss's default."""
  from distill_jax.losses import LOSSES, loss_hparams
  from distill_jax.losses.base import REQUIRED, loss_ranges

  declared = 0
  for name in LOSSES.names():
    fn, hparams = LOSSES.get(name), loss_hparams(LOSSES.get(name))
    for key, (allowed, meaning) in loss_ranges(fn).items():
      declared += 1
      assert key in hparams and meaning, (name, key)
      default = hparams[key]
      for v in (default if isinstance(default, tuple) else (default,)):
        assert default is REQUIRED or allowed.allows(v), (name, key, default)
  assert declared >= 35  # Every loss that takes temperature, eps, teacher_weights, ...


def test_a_range_for_a_setting_the_loss_lacks_is_refused_at_registration():
  from distill_jax.losses import register_loss

  with pytest.raises(ValueError, match=r"register_loss\('typo_loss'\) declares ranges for "
                     r"\['temprature'\], which the loss does not take; its hyper-parameters "
                     r"are \['temperature'\]"):
    @register_loss("typo_loss", ranges={"temprature": (rules.POSITIVE, "the temperature")})
    def typo_loss(student, teachers, batch, *, temperature: float = 1.0):
      return 0.0


def test_range_text_and_membership():
  r = rules.Range(0, 1, high_open=True)
  assert str(r) == "a number in [0, 1)" and r.allows(0) and not r.allows(1)
  assert not rules.POSITIVE.allows(0) and rules.POSITIVE.allows(1e-9)
  assert not rules.POSITIVE_INT.allows(1.5) and not rules.POSITIVE_INT.allows(True)
  assert not rules.NON_NEGATIVE.allows("1")


def test_cli_exits_non_zero_with_one_line_and_no_workdir(tmp_path):
  workdir = tmp_path / "run"
  proc = subprocess.run(
      [sys.executable, "-m", "distill_jax.main", f"--config={DIGITS}:kd,tiny",
       f"--workdir={workdir}", f"--config.data.data_dir={tmp_path / 'tfds'}",
       "--config.optim.lr=0"],
      capture_output=True, text=True, cwd=ROOT, timeout=120,
      env={**os.environ, "XLA_FLAGS": "", "DISTILL_JAX_CPU_FLAGS": "0",
           "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])})
  assert proc.returncode != 0
  assert "config.optim.lr is 0.0; it must be a number > 0" in proc.stderr.splitlines()[-1]
  assert "Traceback" not in proc.stderr
  assert not workdir.exists() and not (tmp_path / "tfds").exists()  # Nothing built or trained.


def test_a_models_kwargs_are_its_own():
  """`model_kwargs`: the fields a model's factory lets a config set, with their defaults (not
  the framework's, not those the factory fixes); validate() refuses kwargs of another model,
  naming them and what the model takes; naming a model anew (as on the command line) brings
  its own kwargs, which the overrides then set."""
  from distill_jax.config import load_config_file
  from distill_jax.models import model_kwargs

  assert model_kwargs("cnn") == {"widths": (32, 64)}
  assert model_kwargs("resnet20") == {}  # depth and widths are resnet20's own.
  assert model_kwargs("wrn_16_1") == {"dropout_rate": 0.0}
  assert model_kwargs("transformer_lm")["bos_id"] is None
  config = load_config_file(f"{DIGITS}:kd,tiny")
  with config.unlocked():
    config.student.name = "cnn"  # Still the mlp's kwargs {'hidden': (32,)}.
  with pytest.raises(ConfigError, match=r"^config.student.kwargs has 'hidden', which model 'cnn' "
                     r"does not take; it takes: widths=\(32, 64\). Drop hidden "):
    config_lib.validate(config)
  config = load_config_file(f"{DIGITS}:kd,tiny", {"student.name": "cnn",
                                                  "student.kwargs.widths": (8, 16),
                                                  "teachers.teacher.model": "mlp"})
  assert config.student.kwargs.to_dict() == {"widths": (8, 16)}
  assert config.teachers.teacher.kwargs.to_dict() == {"hidden": (64,)}
  config_lib.validate(config)


def test_the_task_checks_its_own_settings():
  """`data.augment` is the classification task's setting (`Task.validate`): a classification
  config with an unknown augmentation is refused naming it; a language-model config has none
  and passes."""
  config = tiny("kd", "/nonexistent", **{"data.augment": "rotate"})
  with pytest.raises(ConfigError, match=r"config.data.augment is 'rotate'; choose one of \["):
    config_lib.validate(config)
  lm = config_lib.load_config_file(os.path.join(ROOT, "configs", "lm.py:teacher,tiny"))
  assert "augment" not in lm.data
  config_lib.validate(lm)
