"""End-to-end training: crashes resume exactly, the CLI works, bad input is clear (the
parallel modes against one device: tests/test_parallel.py)."""

import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import scipy.special
from conftest import run_digits_cli, tiny

from distill_jax import data as data_lib
from distill_jax.common.model_io import CheckpointError
from distill_jax.config import ConfigError
from distill_jax.teachers import load_teacher
from distill_jax.train import loop
from distill_jax.train.build import build_run, init_state
from distill_jax.train.guard import NonFiniteLossError


def exported(workdir):
  with ocp.StandardCheckpointer() as ckptr:
    return jax.tree.map(np.asarray, ckptr.restore(os.path.join(workdir, "model", "variables")))


def assert_trees_close(a, b, atol):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(x, y, atol=atol, rtol=0)


def kd_config(data_dir, teacher_dir, **overrides):
  return tiny("kd", data_dir, **{"teachers.teacher.checkpoint": teacher_dir, **overrides})


def test_teacher_run_writes_outputs_and_learns(teacher_dir):
  for name in ("config.json", "metrics.jsonl", "result.json", "model/model.json"):
    assert os.path.exists(os.path.join(teacher_dir, name)), name
  assert any(f.startswith("events") for f in os.listdir(os.path.join(teacher_dir, "tb")))
  with open(os.path.join(teacher_dir, "result.json")) as f:
    result = json.load(f)
  # 40 steps of a small CNN on 10 classes: well above the 10% of chance.
  assert result["final"]["eval/top1"] > 0.5
  losses = [json.loads(line)["train/loss"] for line in open(
      os.path.join(teacher_dir, "metrics.jsonl")) if "train/loss" in line]
  assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5])


def test_crashed_run_resumes_to_the_uninterrupted_result(data_dir, teacher_dir, tmp_path):
  config = kd_config(data_dir, teacher_dir)  # 6 steps, a checkpoint every 3.
  loop.train_and_evaluate(config, str(tmp_path / "straight"))

  def crash(step, metrics):
    if step == 5:
      raise KeyboardInterrupt("killed")

  with pytest.raises(KeyboardInterrupt):
    loop.train_and_evaluate(config, str(tmp_path / "crashed"), step_callback=crash)
  assert sorted(os.listdir(tmp_path / "crashed" / "checkpoints")) == ["3"]
  resumed_steps = []
  loop.train_and_evaluate(config, str(tmp_path / "crashed"),
                          step_callback=lambda step, m: resumed_steps.append(step))
  assert resumed_steps == [4, 5, 6]
  assert_trees_close(exported(tmp_path / "crashed"), exported(tmp_path / "straight"), atol=1e-6)


def test_cli_distills_without_touching_the_teacher(data_dir, teacher_dir, tmp_path):
  teacher_before = exported(teacher_dir)
  workdir = tmp_path / "kd"
  run_digits_cli("kd,tiny", workdir, data_dir, teacher_dir, "--config.num_steps=12",
                 timeout=300)
  with open(workdir / "result.json") as f:
    result = json.load(f)
  assert result["steps"] == 12 and result["teachers"] == {"teacher": "cnn"}
  assert 0.0 <= result["final"]["eval/agreement/teacher"] <= 1.0
  rows = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
  train = [r for r in rows if "train/loss" in r]
  assert all(np.isfinite(r["train/loss"]) for r in train)
  assert np.mean([r["train/loss"] for r in train[-3:]]) < np.mean(
      [r["train/loss"] for r in train[:3]])
  assert {"train/loss/ce", "train/loss/kd", "train/agreement"} <= set(train[0])
  assert_trees_close(exported(teacher_dir), teacher_before, atol=0)
  student = exported(workdir)
  assert "batch_stats" not in student  # The MLP student has no BatchNorm.
  # The reported eval numbers, recomputed in NumPy from the exported models' logits on the
  # 297 eval images.
  config = kd_config(data_dir, teacher_dir)
  batch = next(data_lib.eval_batches(config.data, global_batch_size=297))
  assert batch["mask"].all()
  logits = {}
  for name, model, kwargs, path in [("student", "mlp", {"hidden": (32,)}, workdir),
                                    ("teacher", "cnn", {"widths": (32, 64)}, teacher_dir)]:
    model = load_teacher(name, {"model": model, "kwargs": kwargs, "checkpoint": str(path)}, 10,
                         (8, 8, 1))
    logits[name] = np.float64(model.module.apply(model.variables, batch["image"], train=False))
  logp = {n: scipy.special.log_softmax(v, -1) for n, v in logits.items()}
  pred = {n: v.argmax(-1) for n, v in logits.items()}
  want = {"top1": np.mean(pred["student"] == batch["label"]),
          "ce": -np.mean(logp["student"][np.arange(297), batch["label"]]),
          "teacher_top1/teacher": np.mean(pred["teacher"] == batch["label"]),
          "agreement/teacher": np.mean(pred["teacher"] == pred["student"]),
          "kl/teacher": np.mean(np.sum(np.exp(logp["teacher"]) *
                                       (logp["teacher"] - logp["student"]), -1))}
  for key, value in want.items():
    np.testing.assert_allclose(result["final"][f"eval/{key}"], value, rtol=1e-5, err_msg=key)


def test_train_step_does_no_host_transfers(data_dir, teacher_dir):
  config = kd_config(data_dir, teacher_dir)
  run = build_run(config)
  parallel = run.parallel
  state = parallel.put_replicated(init_state(config, run))
  teacher_vars = parallel.put_replicated(run.teacher_vars)
  batch = parallel.put_batch(next(data_lib.train_iterator(
      config.data, global_batch_size=config.batch_size, seed=0)))
  state, _ = run.train_step(state, teacher_vars, batch)  # Compile outside the guard.
  with jax.transfer_guard("disallow"):
    state, metrics = run.train_step(state, teacher_vars, batch)
  assert int(jax.device_get(state.step)) == 2


@pytest.mark.parametrize("overrides, message", [
    ({"student.name": "resnet_20"}, "Did you mean 'resnet20'"),
    ({"losses.kd.temprature": 1.0}, None),  # Locked config: unknown key.
    ({"parallel.mode": "pmapp"}, "choose one of"),
    ({"optim.name": "sgdd"}, "choose one of"),
    ({"teachers.teacher.model": "resnet99"}, "Known models"),
])
def test_bad_configs_fail_before_training_with_clear_errors(data_dir, teacher_dir, tmp_path,
                                                             overrides, message):
  with pytest.raises((ConfigError, AttributeError, KeyError)) as info:
    config = kd_config(data_dir, teacher_dir, **overrides)
    loop.train_and_evaluate(config, str(tmp_path))
  if message:
    assert message in str(info.value)
  assert not os.path.exists(tmp_path / "checkpoints")


def test_unknown_loss_hparam_lists_the_known_ones(data_dir, teacher_dir, tmp_path):
  config = kd_config(data_dir, teacher_dir)
  with config.unlocked():
    config.losses.kd.temprature = 2.0
  with pytest.raises(ConfigError, match=r"temprature.*temperature"):
    loop.train_and_evaluate(config, str(tmp_path))


def test_teacher_checkpoint_problems_name_the_file(data_dir, teacher_dir, tmp_path):
  missing = kd_config(data_dir, str(tmp_path / "nowhere"))
  with pytest.raises(CheckpointError, match="nowhere.*model.json"):
    build_run(missing)
  # A teacher saved from a different architecture: the checkpoint says what it holds.
  wrong_model = kd_config(data_dir, teacher_dir, **{"teachers.teacher.model": "mlp",
                                                     "teachers.teacher.kwargs": {}})
  with pytest.raises(CheckpointError, match="saved from cnn"):
    build_run(wrong_model)
  # Same model name, different widths: the first mismatching parameter is named.
  wrong_shape = kd_config(data_dir, teacher_dir,
                          **{"teachers.teacher.kwargs": {"widths": (32, 48)}})
  mismatch = r"parameter \S*stage2\S* has shape \(.*64,?\) in the file but the model expects"
  with pytest.raises(CheckpointError, match=mismatch + r" \(.*48,?\)"):
    build_run(wrong_shape)


def test_corrupt_resume_checkpoint_names_the_file(data_dir, teacher_dir, tmp_path):
  config = kd_config(data_dir, teacher_dir)
  loop.train_and_evaluate(config, str(tmp_path))
  for step in ("3", "6"):  # Every step corrupt: no fallback left, and no silent fresh start.
    for root, _, files in os.walk(tmp_path / "checkpoints" / step / "state"):
      for name in files:
        with open(os.path.join(root, name), "wb") as f:
          f.write(b"garbage")
  with pytest.raises(CheckpointError, match="No usable checkpoint left in " +
                     str(tmp_path / "checkpoints") + ".*6.corrupt.*3.corrupt"):
    loop.train_and_evaluate(config, str(tmp_path))


def test_non_finite_loss_stops_the_run_naming_the_step(data_dir, teacher_dir, tmp_path):
  config = kd_config(data_dir, teacher_dir, **{"optim.lr": 1e30, "optim.schedule": "constant"})
  with pytest.raises(NonFiniteLossError, match=r"step \d"):
    loop.train_and_evaluate(config, str(tmp_path))
  assert not os.path.exists(tmp_path / "checkpoints" / "3")


def test_born_again_generations_chain_teachers(data_dir, teacher_dir, tmp_path):
  """generations=2: gen0 distills from the configured teacher, gen1 from gen0's student."""
  config = kd_config(data_dir, teacher_dir, generations=2)
  result = loop.train_generations(config, str(tmp_path))
  gen1 = json.load(open(tmp_path / "gen1" / "config.json"))
  assert gen1["teachers"] == {"teacher": {"model": "mlp", "kwargs": {"hidden": [32]},
                                          "checkpoint": str(tmp_path / "gen0"), "cache": None,
                                          "input_size": None, "dtype": "float32"}}
  assert json.load(open(tmp_path / "gen0" / "config.json"))["teachers"]["teacher"][
      "checkpoint"] == teacher_dir
  assert result["teachers"] == {"teacher": "mlp"}
  assert len(json.load(open(tmp_path / "generations.json"))) == 2
  # The chain's result.json (what sweeps read) is the last generation's, with the list.
  assert json.load(open(tmp_path / "result.json")) == json.loads(json.dumps(result))
  assert result["generations"][1] == json.load(open(tmp_path / "gen1" / "result.json"))["final"]
  # gen1's teacher is gen0's exported student: their eval agreement is what gen1 reports.
  assert result["final"]["eval/teacher_top1/teacher"] == pytest.approx(
      json.load(open(tmp_path / "gen0" / "result.json"))["final"]["eval/top1"])


def test_the_session_reads_no_config():
  """train/loop.py (the session, the resume checks, born-again chains) reads no config key:
  `build_run` (train/build.py) takes what the session needs onto the `Run` once. The config
  only passes through to `build_run` and `generation_configs`, never read here."""
  import ast

  path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                      "distill_jax", "train", "loop.py")
  tree = ast.parse(open(path).read())
  reads = [f"line {node.lineno}: {ast.unparse(node)}" for node in ast.walk(tree)
           if isinstance(node, ast.Attribute | ast.Subscript)
           and isinstance(node.value, ast.Name) and "config" in node.value.id
           and node.value.id != "config_lib"]
  reads += [f"line {node.lineno}: {ast.unparse(node)}" for node in ast.walk(tree)
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
            and node.value.id == "config_lib" and node.attr != "ConfigError"]
  assert reads == []
