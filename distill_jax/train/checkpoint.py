"""Checkpoints with orbax: the train state and the data position together, and model exports.

A run's `workdir/checkpoints/<step>/` holds three items: `state` (the TrainState), `data` (the
train iterator's position, JSON) and `meta` (JSON: model name, config fingerprint). A
restarted run restores the latest one and sees exactly the batches it would have seen.

`workdir/model/` is the exported student: `variables/` (params and batch stats only; the
objective's connectors and the optimizer state stay behind) and `model.json` (model name,
kwargs, number of classes). Teachers load from such a directory. Nothing is ever unpickled.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp


class CheckpointError(RuntimeError):
  """A checkpoint is missing, corrupt, or does not match the model; names the file."""


def _abstract(tree: Any) -> Any:
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


class Checkpointer:
  """Saves and restores (state, data position, meta) in `directory` with a CheckpointManager."""

  def __init__(self, directory: str, *, keep: int = 3, every_steps: int = 0):
    self.directory = os.path.abspath(directory)
    self.every_steps = every_steps
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=False)
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def should_save(self, step: int) -> bool:
    return bool(self.every_steps) and step % self.every_steps == 0

  def save(self, step: int, state: Any, data_state: dict, meta: dict) -> None:
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
        meta=ocp.args.JsonSave(meta)), force=True)
    self._manager.wait_until_finished()

  def restore(self, step: int, target_state: Any) -> tuple[Any, dict, dict]:
    """Restores checkpoint `step` into the structure (and shardings) of `target_state`."""
    path = os.path.join(self.directory, str(step))
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(_abstract(target_state)),
          data=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()))
    except Exception as e:  # orbax raises many types; all mean this file is unusable.
      raise CheckpointError(
          f"Could not restore checkpoint {path}: {type(e).__name__}: {e}. The checkpoint is "
          "corrupt or was written by a different model/config; delete that step directory to "
          "resume from an earlier one, or use a fresh --workdir.") from e
    return restored["state"], restored["data"], restored["meta"]

  def close(self) -> None:
    self._manager.close()


def export_model(directory: str, variables: Any, meta: dict) -> None:
  """Writes the model's variables and a `model.json` describing how to rebuild it.

  Collective: with several processes every one calls it (orbax's save synchronises them);
  process 0 writes the files.
  """
  directory = os.path.abspath(directory)
  os.makedirs(directory, exist_ok=True)
  variables = jax.tree.map(np.asarray, variables)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(os.path.join(directory, "variables"), variables, force=True)
  if jax.process_index() == 0:
    with open(os.path.join(directory, "model.json"), "w") as f:
      json.dump(meta, f, indent=2, sort_keys=True)


def read_model_meta(directory: str) -> dict:
  """The `model.json` of an exported model; raises CheckpointError naming the file."""
  path = os.path.join(os.path.abspath(directory), "model.json")
  if not os.path.exists(path):
    raise CheckpointError(
        f"No exported model at {directory}: {path} does not exist. Point the teacher's "
        "checkpoint at a finished run's workdir (or its model/ directory).")
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise CheckpointError(f"Corrupt model description {path}: {e}") from e


def load_model_variables(directory: str, expected: Any) -> Any:
  """Loads exported variables, checking every parameter's path and shape against `expected`.

  Args:
    directory: an exported model directory (holding `variables/` and `model.json`).
    expected: the variables pytree the model expects (arrays or ShapeDtypeStructs).
  Raises:
    CheckpointError naming the file and the first parameter that is missing, extra, or
    of the wrong shape.
  """
  path = os.path.join(os.path.abspath(directory), "variables")
  if not os.path.isdir(path):
    raise CheckpointError(f"No saved variables at {path}.")
  with ocp.StandardCheckpointer() as ckptr:
    try:
      saved = ckptr.metadata(path).item_metadata.tree
    except Exception as e:
      raise CheckpointError(f"Corrupt checkpoint {path}: {type(e).__name__}: {e}") from e
    saved_shapes = {_path_str(p): tuple(m.shape) for p, m in _flatten(saved)}
    expected_shapes = {_path_str(p): tuple(x.shape) for p, x in _flatten(expected)}
    missing = sorted(set(expected_shapes) - set(saved_shapes))
    extra = sorted(set(saved_shapes) - set(expected_shapes))
    if missing or extra:
      raise CheckpointError(
          f"Checkpoint {path} does not match the model: parameters the model needs but the "
          f"file lacks: {missing[:5]}{' ...' if len(missing) > 5 else ''}; parameters in the "
          f"file the model lacks: {extra[:5]}{' ...' if len(extra) > 5 else ''}.")
    for name, shape in expected_shapes.items():
      if saved_shapes[name] != shape:
        raise CheckpointError(f"Checkpoint {path} does not match the model: parameter {name} "
                              f"has shape {saved_shapes[name]} in the file but the model "
                              f"expects {shape}.")
    try:
      return ckptr.restore(path, _abstract(expected))
    except Exception as e:
      raise CheckpointError(f"Corrupt checkpoint {path}: {type(e).__name__}: {e}") from e


def _flatten(tree: Any) -> list:
  return jax.tree_util.tree_flatten_with_path(
      tree, is_leaf=lambda x: hasattr(x, "shape") and not isinstance(x, dict))[0]


def _path_str(path: tuple) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
