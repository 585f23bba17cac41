"""A task added from outside the package, in this one file: regression of each digit image's
mean pixel intensity (a float target, one model output, mean squared error as the headline,
lower is better; no labels anywhere). `register()` adds the task and its two losses to the
registries; a config file written to the test's folder calls it, so the CLI subprocesses that
train a teacher and distill a student know them, and nothing outside this file is edited.

The numbers: both runs' held-out MSE is under a fifth of the variance of the held-out targets
(what the best constant prediction scores), computed here with NumPy from the data itself;
`result.json` tracks the task's own headline (`best_mse`, `eval/mse`), not top-1."""

import dataclasses
import json
import os
import subprocess
import sys
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from conftest import ROOT, cli_env, run_cli

from distill_jax import data as data_lib
from distill_jax.common.outputs import Outputs
from distill_jax.common.rules import ConfigError
from distill_jax.losses import register_loss
from distill_jax.losses.base import LOSSES, masked_sum, teacher_outputs
from distill_jax.tasks import TASKS, Task, TaskInfo

TASK = "toy_mean_intensity"
TESTS = os.path.dirname(os.path.abspath(__file__))


def _with_target(batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """The digits' batch as the task's: 'pixels' [B, H, W, C] (the image), 'target' [B] (its
  mean), 'id' and, in eval batches, 'mask'; the labels are dropped."""
  out = {k: v for k, v in batch.items() if k not in ("image", "label")}
  out["pixels"] = batch["image"]
  out["target"] = batch["image"].mean(axis=(1, 2, 3)).astype(np.float32)
  return out


class _Targets:
  """The digits' train iterator with `_with_target` batches (its state still checkpoints)."""

  def __init__(self, inner: Any):
    self.inner = inner

  def __iter__(self) -> "_Targets":
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    return _with_target(next(self.inner))

  def __getattr__(self, name: str) -> Any:  # get_state, set_state, close, ...
    return getattr(self.inner, name)


def _squared_error(student: Outputs, batch: Mapping[str, jax.Array]) -> jax.Array:
  return (student.logits[:, 0] - batch["target"]) ** 2


@dataclasses.dataclass(frozen=True)
class MeanIntensity(Task):
  """Predict an image's mean (normalised) pixel value; the headline is the eval MSE."""

  input_key: str = "pixels"
  headline: str = "mse"
  higher_is_better: bool = False

  def validate(self, config: Any) -> None:
    if config.data.name != "digits":
      raise ConfigError(f"config.data.name is {config.data.name!r}; task {TASK!r} reads "
                        "'digits'.")

  def info(self, data_config: Any) -> TaskInfo:
    info = data_lib.get_info(data_config)
    return TaskInfo(1, tuple(info.image_shape), dict(info.num_examples), info)

  def train_iterator(self, data_config: Any, **kwargs: Any) -> Iterator[dict[str, Any]]:
    return _Targets(data_lib.train_iterator(data_config, **kwargs))

  def eval_batches(self, data_config: Any, **kwargs: Any) -> Iterator[dict[str, Any]]:
    return map(_with_target, data_lib.eval_batches(data_config, **kwargs))

  def example_batch(self, input_shape: tuple[int, ...], batch_size: int,
                    cached_logits: Mapping[str, tuple[int, ...]] | None = None
                    ) -> dict[str, jax.Array]:
    return {"pixels": jnp.zeros((batch_size, *input_shape), jnp.float32),
            "target": jnp.zeros((batch_size,), jnp.float32),
            "id": jnp.zeros((batch_size,), jnp.int32)}

  def train_metrics(self, student: Outputs, teachers: Mapping[str, Outputs],
                    batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    return {"mse": jnp.mean(_squared_error(student, batch))}

  def eval_sums(self, student: Outputs, teachers: Mapping[str, Outputs],
                batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    mask = batch["mask"].astype(jnp.float32)
    return {"count": jnp.sum(mask), "mse": masked_sum(_squared_error(student, batch), mask)}


def toy_mse(student, teachers, batch):
  """The student's squared error on the target, batch mean."""
  del teachers
  return jnp.mean(_squared_error(student, batch))


def toy_match(student, teachers, batch, *, teacher=None):
  """Squared distance of the student's output to the teacher's, batch mean (no target)."""
  del batch
  target = jax.lax.stop_gradient(teacher_outputs(teachers, teacher).logits)
  return jnp.mean((student.logits - target) ** 2)


def register() -> None:
  """Adds the task and its losses to the registries (once per process)."""
  if TASK not in TASKS:
    TASKS.register(TASK)(MeanIntensity())
    register_loss("toy_mse", uses_teachers=False)(toy_mse)
    register_loss("toy_match")(toy_match)


CONFIG = '''
import sys
import ml_collections
from distill_jax.config import base_config, teacher_config

sys.path.insert(0, {tests!r})
import test_toy_task

test_toy_task.register()


def get_config(role):
  c = base_config()
  c.task = {task!r}
  c.student = ml_collections.ConfigDict({{"name": "mlp", "kwargs": {{"hidden": (32,)}}}})
  c.losses = ml_collections.ConfigDict({{"toy_mse": {{"weight": 1.0}}}})
  if role == "student":
    c.student.kwargs.hidden = (16,)
    c.teachers = ml_collections.ConfigDict(
        {{"teacher": teacher_config("mlp", {{"hidden": (32,)}})}})
    c.losses = ml_collections.ConfigDict({{"toy_match": {{"weight": 1.0}}}})
  c.optim.name = "adamw"
  c.optim.lr = 1e-2
  c.optim.weight_decay = 0.0
  c.optim.schedule = "cosine"
  c.batch_size = 64
  c.eval_batch_size = 256
  c.num_steps = 200
  c.eval_every_epochs = 0.0
  c.log_every_steps = 50
  c.progress_bar = False
  c.log.writers = ("jsonl",)
  return c
'''


def eval_targets(data_dir: str) -> np.ndarray:
  """The held-out images' mean pixel values, straight from the data."""
  config = data_lib.default_data_config("digits")
  config.data_dir = data_dir
  batches = data_lib.eval_batches(config, global_batch_size=256)
  return np.concatenate([b["image"][b["mask"] > 0].mean(axis=(1, 2, 3)) for b in batches])


def test_a_task_from_one_file_trains_and_distills_through_the_cli(tmp_path, data_dir):
  config = tmp_path / "toy_config.py"
  config.write_text(CONFIG.format(tests=TESTS, task=TASK))
  common = [f"--config.data.data_dir={data_dir}"]
  # The task's own check (Task.validate) refuses the config before anything is built.
  refused = subprocess.run(
      [sys.executable, "-m", "distill_jax.main", f"--config={config}:teacher",
       f"--workdir={tmp_path / 'refused'}", *common, "--config.data.name=cifar10"],
      capture_output=True, text=True, env=cli_env(), cwd=ROOT, timeout=300)
  assert refused.returncode != 0
  assert f"config.data.name is 'cifar10'; task {TASK!r} reads 'digits'." in refused.stderr

  teacher, student = tmp_path / "teacher", tmp_path / "student"
  run_cli([f"--config={config}:teacher", f"--workdir={teacher}", *common])
  run_cli([f"--config={config}:student", f"--workdir={student}", *common,
           f"--config.teachers.teacher.checkpoint={teacher}"])

  targets = eval_targets(data_dir)
  constant = float(np.mean((targets - targets.mean()) ** 2))  # The best constant's MSE.
  assert constant > 1e-3  # The targets vary: a constant is no answer.
  for workdir in (teacher, student):
    result = json.load(open(workdir / "result.json"))
    assert "best_top1" not in result and "eval/top1" not in result["final"]
    assert result["best_mse"] == min(result["best_mse"], result["final"]["eval/mse"])
    assert result["best_mse"] < 0.2 * constant, (workdir.name, result["best_mse"], constant)
  assert TASK not in TASKS and "toy_mse" not in LOSSES  # Registered in the runs alone.
