"""docs/python_api.md, executed: every ```python block, in order, in one namespace (a notebook's
`__main__`), in a temporary working directory holding a link to configs/; the blocks' own
asserts check the numbers they show. Plus the API's errors, which a notebook user meets as
exceptions with the CLI's one-line messages."""

import os
import re

import numpy as np
import pytest
import scipy.special
from conftest import DIGITS, ROOT

from distill_jax import api

DOC = os.path.join(ROOT, "docs", "python_api.md")


def doc_blocks():
  return re.findall(r"```python\n(.*?)```", open(DOC).read(), re.S)


def test_the_walkthrough_runs_as_written(tmp_path, data_dir, monkeypatch):
  (tmp_path / "configs").symlink_to(os.path.join(ROOT, "configs"))
  monkeypatch.chdir(tmp_path)
  monkeypatch.setenv("DISTILL_JAX_DATA_DIR", data_dir)
  blocks = doc_blocks()
  assert len(blocks) >= 8
  namespace = {"__name__": "__main__"}
  for i, block in enumerate(blocks):
    exec(compile(block, f"{DOC} block {i + 1}", "exec"), namespace)  # noqa: S102
  # What the walk-through left behind: the CLI's runs, each with its exported model.
  for run in ("teacher", "kd", "alone1", "alone2"):
    assert (tmp_path / "runs" / run / "result.json").exists(), run
    assert (tmp_path / "runs" / run / "model" / "model.json").exists(), run


# --- The API's answers to mistakes, and its numbers against independent computations ---------

@pytest.mark.parametrize("spec, overrides, message", [
    (f"{DIGITS}:kd", {"optim.lrr": 0.1},
     "overrides['optim.lrr']: config.optim has no key 'lrr' (did you mean 'lr'?); it has: "
     "accumulate_steps, decay_epochs,"),
    (f"{DIGITS}:kd", {"losses.kd.temprature": 2.0},
     "overrides['losses.kd.temprature']: config.losses.kd has no key 'temprature' (did you mean "
     "'temperature'?); it has: temperature, weight."),
    (f"{DIGITS}:kd", {"optim.lr": "fast"}, "overrides['optim.lr'] = 'fast': "),
    (f"{DIGITS}:kd", {"student.name": "mlpp"},
     "config.student.name: Unknown model 'mlpp'. Did you mean 'mlp'?"),
    (f"{DIGITS}:kd", {"optim.lr": -1.0}, "config.optim.lr is -1.0; it must be a number > 0"),
    (f"{DIGITS}:nope", {}, "configs/digits.py arg 'nope': expected ROLE[,tiny]"),
    ("configs/no_such.py", {}, "No config file at 'configs/no_such.py'"),
])
def test_get_config_raises_config_errors_with_the_clis_messages(spec, overrides, message):
  with pytest.raises(api.ConfigError) as error:
    api.get_config(spec, overrides)
  assert message in str(error.value)
  assert "\n" not in str(error.value)


def test_get_config_applies_overrides_and_whole_sections():
  config = api.get_config(f"{DIGITS}:kd", {"optim.lr": 0.2, "num_steps": 7,
                                           "losses": {"ce": {"weight": 1.0}}})
  assert (config.optim.lr, config.num_steps) == (0.2, 7)
  assert config.losses.to_dict() == {"ce": {"weight": 1.0}}


@pytest.fixture(scope="module")
def untrained_export(tmp_path_factory):
  """An export with no run around it and a model.json of before `input_shape` was written."""
  from conftest import untrained_teacher

  directory = tmp_path_factory.mktemp("untrained") / "mlp"
  untrained_teacher(directory)
  return str(directory)


def reference_logits(export, images):
  """The export's logits, computed here from its files (Flax apply, no API)."""
  import json

  import jax
  import orbax.checkpoint as ocp

  from distill_jax.models import build_model

  meta = json.load(open(os.path.join(export, "model.json")))
  module = build_model(meta["model"], meta["num_classes"],
                       **{k: tuple(v) for k, v in meta["kwargs"].items()})
  with ocp.StandardCheckpointer() as ckptr:
    variables = ckptr.restore(os.path.join(export, "variables"))
  return np.asarray(jax.jit(lambda v, x: module.apply(v, x, train=False))(variables, images))


def test_load_model_and_evaluate_an_export_without_its_run(untrained_export, data_dir):
  config = api.get_config(f"{DIGITS}:student", {
      "data.data_dir": data_dir, "eval_batch_size": 64, "teachers.teacher.model": "mlp",
      "teachers.teacher.kwargs": {"hidden": (16,)},
      "teachers.teacher.checkpoint": untrained_export})
  test = api.eval_examples(config)
  assert test["image"].shape == (297, 8, 8, 1) and test["mask"].all()
  want = reference_logits(untrained_export, test["image"])
  # No run's config.json and no input shape in its model.json: the shape must be given.
  with pytest.raises(api.ConfigError, match="pass input_shape"):
    api.load_model(untrained_export)
  model = api.load_model(untrained_export, input_shape=(8, 8, 1))
  np.testing.assert_allclose(model(test["image"]), want, rtol=1e-5, atol=1e-5)
  # evaluate needs a config to know the data, then reports what NumPy computes from the logits.
  with pytest.raises(api.ConfigError, match="not a run's model/ export"):
    api.evaluate(untrained_export)
  metrics = api.evaluate(untrained_export, config)
  labels = test["label"]
  log_p = want - scipy.special.logsumexp(want, -1, keepdims=True)
  assert metrics["step"] == 0
  np.testing.assert_allclose(metrics["eval/top1"], np.mean(want.argmax(-1) == labels), atol=1e-9)
  np.testing.assert_allclose(metrics["eval/ce"], -np.mean(log_p[np.arange(297), labels]),
                             rtol=1e-5)
  # The teacher of this config is the same export: it agrees with itself everywhere.
  assert metrics["eval/agreement/teacher"] == 1.0


def test_a_runs_export_carries_its_input_shape(teacher_dir, tmp_path):
  """A run's export loads without its run: model.json now says the input shape."""
  import shutil

  copy = tmp_path / "exported"
  shutil.copytree(os.path.join(teacher_dir, "model"), copy)
  model = api.load_model(str(copy))
  assert model.meta["input_shape"] == [8, 8, 1]
  images = np.random.default_rng(0).normal(size=(5, 8, 8, 1)).astype(np.float32)
  np.testing.assert_allclose(model(images), reference_logits(str(copy), images), rtol=1e-5,
                             atol=1e-5)


def test_missing_exports_raise_checkpoint_errors(tmp_path):
  for call in (api.load_model, api.evaluate):
    with pytest.raises(api.CheckpointError, match=f"No exported model at {tmp_path}/nowhere"):
      call(str(tmp_path / "nowhere"))
  (tmp_path / "empty").mkdir()
  with pytest.raises(api.CheckpointError, match="model.json does not exist"):
    api.load_model(str(tmp_path / "empty"))


def test_a_failed_start_removes_the_workdir_it_created_and_keeps_one_that_existed(tmp_path,
                                                                                 data_dir):
  config = api.get_config(f"{DIGITS}:kd,tiny", {
      "data.data_dir": data_dir, "teachers.teacher.checkpoint": str(tmp_path / "no_teacher")})
  with pytest.raises(api.CheckpointError, match="no_teacher"):
    api.train(config, str(tmp_path / "new"))
  assert not (tmp_path / "new").exists()
  (tmp_path / "mine").mkdir()
  (tmp_path / "mine" / "notes.txt").write_text("kept")
  with pytest.raises(api.CheckpointError):
    api.train(config, str(tmp_path / "mine"))
  assert os.listdir(tmp_path / "mine") == ["notes.txt"]


def test_audit_refuses_bad_input_with_the_clis_messages(teacher_dir, tmp_path):
  with pytest.raises(api.AuditError, match="--controls: the calibrated decision needs at least "
                     "2 control students"):
    api.audit(teacher_dir, candidates=[teacher_dir], controls=[teacher_dir])
  with pytest.raises(api.AuditError, match=f"--candidates: {tmp_path}/gone does not exist"):
    api.audit(teacher_dir, candidates={"t": str(tmp_path / "gone")},
              controls=["a=" + teacher_dir, "b=" + teacher_dir])
  with pytest.raises(api.UnknownNameError, match="Unknown probe 'rael'"):
    api.audit(teacher_dir, candidates={"t": teacher_dir},
              controls={"a": teacher_dir, "b": teacher_dir}, probes=["rael"])


def test_cpu_devices_in_a_session_whose_backend_has_started(tmp_path, data_dir):
  """The same split again (a re-run cell) goes on; another one is a ConfigError naming the
  way out, before anything is written."""
  import jax

  from distill_jax.common.xla_flags import set_cpu_devices

  assert len(jax.devices("cpu")) == 8  # conftest's split; the backend has started.
  set_cpu_devices(8)

  def config(count):
    return api.get_config(f"{DIGITS}:kd,tiny", {
        "data.data_dir": data_dir, "parallel.cpu_devices": count,
        "teachers.teacher.checkpoint": str(tmp_path / "no_teacher")})

  with pytest.raises(api.CheckpointError, match="no_teacher"):  # Past the split: it fits.
    api.train(config(8), str(tmp_path / "run"))
  with pytest.raises(api.ConfigError, match="cpu_devices=3 must be applied before JAX starts.*"
                     "XLA_FLAGS=--xla_force_host_platform_device_count=3"):
    api.train(config(3), str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()
