"""Checkpoints with orbax: the train state and the data position together, and model exports.

A run's `workdir/checkpoints/<step>/` holds three items: `state` (the TrainState), `data` (the
train iterator's position, JSON) and `meta` (JSON: model name, config fingerprint). A
restarted run restores the latest one and sees exactly the batches it would have seen.

`workdir/model/` is the exported student: `variables/` (params and batch stats only; the
objective's connectors and the optimizer state stay behind) and `model.json` (model name,
kwargs, number of classes). Teachers load from such a directory. Nothing is ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging


class CheckpointError(RuntimeError):
  """A checkpoint is missing, corrupt, or does not match the model; names the file."""


def _abstract(tree: Any) -> Any:
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


CHECKSUMS = "checksums.json"
ORBAX_COMMIT = "commit_success.txt"  # Orbax's marker of a finished save.
INCOMPLETE = f"it has neither {CHECKSUMS} nor {ORBAX_COMMIT} (the run stopped while writing it)"


def _file_digests(directory: str) -> dict[str, str]:
  """SHA-256 of every file under `directory` (but the checksum file), by relative path."""
  digests = {}
  for root, _, files in os.walk(directory):
    for name in files:
      path = os.path.join(root, name)
      rel = os.path.relpath(path, directory)
      if rel == CHECKSUMS:
        continue
      h = hashlib.sha256()
      with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
          h.update(chunk)
      digests[rel] = h.hexdigest()
  return digests


def write_atomic(path: str, text: str) -> None:
  """Writes `text` to `path` through a temporary file and a rename: old or new, never half."""
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w") as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


class Checkpointer:
  """Saves and restores (state, data position, meta) in `directory` with a CheckpointManager.

  Integrity: once orbax has written step N, the SHA-256 of each of its files goes to
  `N/checksums.json` (written last, atomically). Before a step is used it is verified; a step
  whose files do not match (bit flips, truncation, a lost file) or that has neither checksums
  nor orbax's commit marker (the run stopped while writing it) is renamed `N.corrupt` and the
  previous step is tried. A step with orbax's marker but no checksums (stopped between the
  two, or older than checksums) is adopted: its checksums are written then. Old steps are
  deleted only after a newer one is complete, so at least one good step survives any crash.
  """

  def __init__(self, directory: str, *, keep: int = 3, every_steps: int = 0):
    self.directory = os.path.abspath(directory)
    self.every_steps = every_steps
    self.keep = max(1, int(keep))
    # Retention is ours (after the checksum is written), not orbax's (right after its save).
    options = ocp.CheckpointManagerOptions(max_to_keep=None, create=True,
                                           enable_async_checkpointing=False,
                                           cleanup_tmp_directories=True)
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def should_save(self, step: int) -> bool:
    return bool(self.every_steps) and step % self.every_steps == 0

  def save(self, step: int, state: Any, data_state: dict, meta: dict) -> None:
    """Writes step `step`, its checksums, then deletes the steps beyond `keep`.

    Raises CheckpointError (one line: the step, the cause, what still resumes) when the
    write fails, e.g. on a full disk.
    """
    try:
      self._manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
          meta=ocp.args.JsonSave(meta)), force=True)
      self._manager.wait_until_finished()
      if jax.process_index() == 0:
        write_atomic(os.path.join(self.step_dir(step), CHECKSUMS),
                     json.dumps(_file_digests(self.step_dir(step)), indent=1, sort_keys=True))
    except Exception as e:  # OSError, or tensorstore's errors from the same causes.
      good = [s for s in self.steps() if s != step]
      cause = e.strerror if isinstance(e, OSError) and e.strerror else str(e).splitlines()[0]
      raise CheckpointError(
          f"Could not write checkpoint {self.step_dir(step)}: {cause}. The workdir "
          f"resumes from step {good[-1] if good else 0}: fix the cause (e.g. free disk space) "
          "and rerun the same command.") from e
    for old in self.steps()[:-self.keep]:
      self._manager.delete(old)

  def problem(self, step: int) -> str | None:
    """Why step `step` cannot be used (missing or mismatching files), or None if it is whole."""
    path = self.step_dir(step)
    try:
      with open(os.path.join(path, CHECKSUMS)) as f:
        expected = json.load(f)
    except FileNotFoundError:
      if not os.path.exists(os.path.join(path, ORBAX_COMMIT)):
        return INCOMPLETE
      # Committed by orbax but not checksummed: stopped right after orbax's save, or written
      # before checksums existed. Orbax's marker vouches for it; adopt it.
      logging.warning("Checkpoint %s has no %s but orbax's commit marker; adopting it.", path,
                      CHECKSUMS)
      if jax.process_index() == 0:
        write_atomic(os.path.join(path, CHECKSUMS),
                     json.dumps(_file_digests(path), indent=1, sort_keys=True))
      return None
    except (OSError, ValueError) as e:
      return f"its {CHECKSUMS} is unreadable ({e})"
    actual = _file_digests(path)
    for name in sorted(set(expected) | set(actual)):
      if name not in actual:
        return f"{name} is missing"
      if name not in expected:
        return f"{name} is not in its {CHECKSUMS}"
      if actual[name] != expected[name]:
        return f"{name} does not match its checksum"
    return None

  def latest_good_step(self) -> int | None:
    """The latest step that verifies; newer ones that do not are renamed `<step>.corrupt`,
    each reported in one log line.

    Returns None when there are no steps, or when every bad step was only incomplete (a
    first checkpoint interrupted mid-write: nothing committed is lost by starting afresh).
    Raises CheckpointError when steps existed but none verifies.
    """
    renamed, corrupt = [], False
    for step in reversed(self.steps()):
      problem = self.problem(step)
      if problem is None:
        return step
      corrupt |= problem != INCOMPLETE
      target = self.step_dir(step) + ".corrupt"
      if jax.process_index() == 0:
        if os.path.exists(target):
          shutil.rmtree(target)
        os.rename(self.step_dir(step), target)
      logging.warning("Checkpoint %s is unusable: %s; renamed to %s, trying the previous "
                      "step.", self.step_dir(step), problem, target)
      renamed.append(target)
      self._manager.reload()
    if corrupt:
      raise CheckpointError(
          f"No usable checkpoint left in {self.directory}: {', '.join(renamed)} failed their "
          "checksums. Restore them from a backup, or start afresh with another --workdir.")
    return None

  def restore(self, step: int, target_state: Any) -> tuple[Any, dict, dict]:
    """Restores checkpoint `step` into the structure (and shardings) of `target_state`."""
    path = self.step_dir(step)
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(_abstract(target_state)),
          data=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()))
    except Exception as e:  # orbax raises many types; all mean this file is unusable.
      raise CheckpointError(
          f"Could not restore checkpoint {path}: {type(e).__name__}: {e}. The checkpoint is "
          "corrupt or was written by a different model/config; delete that step directory to "
          "resume from an earlier one, or use a fresh --workdir.") from e
    for (p, x), t in zip(_flatten(restored["state"]), jax.tree.leaves(target_state),
                         strict=True):
      if tuple(x.shape) != tuple(t.shape):
        raise CheckpointError(f"Checkpoint {path} does not fit this run: {_path_str(p)} has "
                              f"shape {tuple(x.shape)}, the run expects {tuple(t.shape)}.")
    return restored["state"], restored["data"], restored["meta"]

  def read_meta(self, step: int) -> dict:
    """The `meta` item of step `step` (model name, config, the run's record)."""
    try:
      return self._manager.restore(step, args=ocp.args.Composite(
          meta=ocp.args.JsonRestore()))["meta"]
    except Exception as e:
      raise CheckpointError(f"Could not read {self.step_dir(step)}/meta: "
                            f"{type(e).__name__}: {e}") from e

  def close(self) -> None:
    self._manager.close()


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
