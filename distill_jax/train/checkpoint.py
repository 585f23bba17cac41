"""Checkpoints with orbax: the train state and the data position together, and model exports.

A run's `workdir/checkpoints/<step>/` holds three items: `state` (the TrainState), `data` (the
train iterator's position, JSON) and `meta` (JSON: model name, config fingerprint). A
restarted run restores the latest one and sees exactly the batches it would have seen.

`workdir/model/` is the exported student (`distill_jax.common.model_io`). Nothing is ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging

from distill_jax.common.model_io import CheckpointError, abstract, leaves_with_paths, path_str

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
          state=ocp.args.StandardRestore(abstract(target_state)),
          data=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()))
    except Exception as e:  # orbax raises many types; all mean this file is unusable.
      raise CheckpointError(
          f"Could not restore checkpoint {path}: {type(e).__name__}: {e}. The checkpoint is "
          "corrupt or was written by a different model/config; delete that step directory to "
          "resume from an earlier one, or use a fresh --workdir.") from e
    for (p, x), t in zip(leaves_with_paths(restored["state"]), jax.tree.leaves(target_state),
                         strict=True):
      if tuple(x.shape) != tuple(t.shape):
        raise CheckpointError(f"Checkpoint {path} does not fit this run: {path_str(p)} has "
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
