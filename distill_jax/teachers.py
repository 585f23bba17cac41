"""Frozen teachers: built from the config and loaded from exported model directories.

    config.teachers = {'resnet56': {'model': 'resnet56', 'kwargs': {}, 'checkpoint': 'runs/t56'}}

`checkpoint` is a finished run's workdir (its `model/` export is used) or an export directory
itself. Loading checks that the file was saved from the same model and that every parameter's
path and shape match, and says which file and which parameter when they do not.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

import jax

from distill_jax import models
from distill_jax.model_io import CheckpointError, load_model_variables, read_model_meta


@dataclasses.dataclass(frozen=True)
class Teacher:
  """A frozen teacher: its Flax module and loaded variables (the forward is built per run, so
  it taps exactly the features the objective compares)."""

  name: str
  model: str
  module: Any
  variables: Any
  kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  checkpoint: str = ""  # The export directory it was loaded from.
  input_size: tuple[int, int] | None = None  # (H, W) it sees; None: the data's own size.
  dtype: str | None = None  # Its forward's compute dtype (None: float32).

  def input_shape(self, data_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The (H, W, C) this teacher runs at, given the data's (H, W, C)."""
    return (*self.input_size, *data_shape[2:]) if self.input_size else tuple(data_shape)


def resolve_export_dir(checkpoint: str) -> str:
  """A run's workdir -> its `model/` export; an export directory stays as it is."""
  nested = os.path.join(checkpoint, "model")
  return nested if os.path.exists(os.path.join(nested, "model.json")) else checkpoint


def init_shapes(module: Any, input_shape: tuple[int, ...]) -> Any:
  """The variables pytree of `module` as ShapeDtypeStructs (no compute, no compile)."""
  dummy = jax.ShapeDtypeStruct((1, *input_shape), jax.numpy.float32)
  return jax.eval_shape(lambda x: module.init(jax.random.PRNGKey(0), x, train=False), dummy)


def load_teacher(name: str, settings: Mapping[str, Any], num_classes: int,
                 input_shape: tuple[int, ...]) -> Teacher:
  """Builds teacher `name` from its config entry and loads its exported variables.

  `input_shape` is the data's (H, W, C); a teacher with `input_size=(H', W')` is built (and its
  parameter shapes checked) at (H', W', C), and the step resizes the images for it.
  """
  model_name = settings["model"]
  kwargs = dict(settings.get("kwargs") or {})
  module = models.build_model(model_name, num_classes, **kwargs)
  checkpoint = settings.get("checkpoint")
  if not checkpoint:
    raise CheckpointError(f"Teacher {name!r} has no checkpoint: set "
                          f"--config.teachers.{name}.checkpoint=<a teacher run's workdir>.")
  directory = resolve_export_dir(checkpoint)
  meta = read_model_meta(directory)
  if meta.get("model") != model_name or meta.get("num_classes") != num_classes:
    raise CheckpointError(
        f"Teacher {name!r} is configured as {model_name} with {num_classes} classes, but "
        f"{os.path.join(directory, 'model.json')} was saved from {meta.get('model')} with "
        f"{meta.get('num_classes')} classes.")
  input_size = settings.get("input_size")
  if input_size is not None:
    input_size = tuple(int(d) for d in input_size)
    if len(input_size) != 2 or min(input_size) < 1:
      raise CheckpointError(f"config.teachers.{name}.input_size must be (height, width), got "
                            f"{settings.get('input_size')!r}.")
  teacher = Teacher(name, model_name, module, None, kwargs, directory, input_size,
                    settings.get("dtype") or None)
  try:
    variables = load_model_variables(directory,
                                     init_shapes(module, teacher.input_shape(input_shape)))
  except CheckpointError as e:
    if input_size is not None:
      raise
    raise CheckpointError(f"{e}\nIf teacher {name!r} was trained on images of another size "
                          f"than the data's {tuple(input_shape[:2])}, set "
                          f"config.teachers.{name}.input_size=(H, W).") from None
  return dataclasses.replace(teacher, variables=variables)


def load_teachers(teachers_config: Mapping[str, Any], num_classes: int,
                  input_shape: tuple[int, ...]) -> dict[str, Teacher]:
  return {name: load_teacher(name, settings, num_classes, input_shape)
          for name, settings in teachers_config.items()}
