"""Exported models: a model's variables and how to rebuild it, written and read with orbax.

An export directory (a run's `workdir/model/`) holds `variables/` (params and batch stats only;
the objective's connectors and the optimizer state stay behind) and `model.json` (model name,
kwargs, number of classes, the step and, in exports written since it was added, one example's
input shape). Teachers, the audit and other runs load from such a directory. A
leaf module (orbax, no training code), so anything that reads models can import it. Nothing is
ever unpickled.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp


class CheckpointError(RuntimeError):
  """A checkpoint is missing, corrupt, or does not match the model; names the file."""


def abstract(tree: Any) -> Any:
  """`tree` as ShapeDtypeStructs: what orbax restores into."""
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


def export_model(directory: str, variables: Any, meta: dict) -> bool:
  """Writes the model's variables and a `model.json` describing how to rebuild it.

  The export is written to a temporary folder and renamed into place, so `directory` is
  always either the old export or the new one, whole. Skipped (returns False) when
  `directory` already holds an export with the same `meta`.

  Collective: with several processes every one calls it (orbax's save synchronises them);
  process 0 alone touches the folders and writes `model.json`.
  """
  directory = os.path.abspath(directory)
  try:
    if read_model_meta(directory) == json.loads(json.dumps(meta)) and os.path.isdir(
        os.path.join(directory, "variables")):
      return False
  except CheckpointError:
    pass
  tmp, old = f"{directory}.tmp", f"{directory}.old"
  if jax.process_index() == 0:
    if os.path.isdir(old) and not os.path.exists(directory):  # Stopped between the renames.
      os.rename(old, directory)
    for path in (tmp, old):
      if os.path.exists(path):
        shutil.rmtree(path)
    os.makedirs(tmp)
  variables = jax.tree.map(np.asarray, variables)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(os.path.join(tmp, "variables"), variables, force=True)
  if jax.process_index() != 0:
    return True
  with open(os.path.join(tmp, "model.json"), "w") as f:
    json.dump(meta, f, indent=2, sort_keys=True)
  if os.path.exists(directory):
    os.rename(directory, old)
  os.rename(tmp, directory)
  if os.path.exists(old):
    shutil.rmtree(old)
  return True


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
    saved_shapes = {path_str(p): tuple(m.shape) for p, m in leaves_with_paths(saved)}
    expected_shapes = {path_str(p): tuple(x.shape) for p, x in leaves_with_paths(expected)}
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
      return ckptr.restore(path, abstract(expected))
    except Exception as e:
      raise CheckpointError(f"Corrupt checkpoint {path}: {type(e).__name__}: {e}") from e


def leaves_with_paths(tree: Any) -> list:
  """[(key path, array)] of `tree`'s arrays (orbax metadata counts as an array)."""
  return jax.tree_util.tree_flatten_with_path(
      tree, is_leaf=lambda x: hasattr(x, "shape") and not isinstance(x, dict))[0]


def path_str(path: tuple) -> str:
  """A key path as `params/block0/kernel`."""
  return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
