"""One run per workdir: `workdir/.lock` names the run that holds it (host and PID).

A second run on the same workdir would interleave metrics and race the first one's checkpoint
writes; it refuses instead, naming the holder. A lock left by a process that no longer exists
on this host (killed with SIGKILL, or the machine's OOM killer) is taken over, with a log line.
A lock held from another host cannot be checked from here: the message says how to clear it.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import socket

from absl import logging

LOCK = ".lock"


class WorkdirLockedError(RuntimeError):
  """Another run holds the workdir; the message names its host and PID."""


class WorkdirWriteError(RuntimeError):
  """Writing in the workdir failed (a full disk, ...); the workdir stays resumable."""


def _start_time(pid: int) -> str | None:
  """The process's start time in clock ticks since boot (Linux), to tell a reused PID apart."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[19]
  except (OSError, IndexError):
    return None


def process_alive(pid: int | None, start: str | None = None) -> bool:
  """Whether process `pid` exists on this host (and, given `start`, is the one that started
  then, not a later process that reuses the PID)."""
  if not pid:
    return False
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return start is None or _start_time(pid) in (None, start)


class WorkdirLock:
  """`with WorkdirLock(workdir):` holds `workdir/.lock` for the block (the workdir must exist).

  The lock file is created whole or not at all (written aside, then hard-linked into place,
  which fails if a lock exists), so a run killed while taking it leaves no half-written lock.
  """

  def __init__(self, workdir: str, enabled: bool = True):
    self.path = os.path.join(os.path.abspath(workdir), LOCK)
    self.enabled = enabled
    self.owner = {"host": socket.gethostname(), "pid": os.getpid(),
                  "start": _start_time(os.getpid())}

  def _try_create(self) -> bool:
    tmp = f"{self.path}.{self.owner['pid']}"
    with open(tmp, "w") as f:
      json.dump(self.owner, f)
    try:
      os.link(tmp, self.path)
      return True
    except FileExistsError:
      return False
    finally:
      os.remove(tmp)

  def _holder(self) -> dict:
    try:
      with open(self.path) as f:
        return json.load(f)
    except FileNotFoundError:
      return {}
    except (OSError, ValueError):
      return {"host": "?", "pid": "?"}

  def acquire(self) -> None:
    if not self.enabled:
      return
    for _ in range(3):  # A stale lock is removed and the create retried.
      if self._try_create():
        return
      holder = self._holder()
      if not holder:
        continue  # Released in the meantime.
      same_host = holder.get("host") == self.owner["host"]
      if same_host and isinstance(holder.get("pid"), int) and not process_alive(
          holder["pid"], holder.get("start")):
        logging.warning("Taking over %s: its run (PID %d on %s) no longer exists.", self.path,
                        holder["pid"], holder["host"])
        try:
          os.remove(self.path)
        except FileNotFoundError:
          pass
        continue
      where = "this host" if same_host else f"host {holder.get('host')}"
      raise WorkdirLockedError(
          f"Workdir {os.path.dirname(self.path)} is in use by another run (PID "
          f"{holder.get('pid')} on {where}); wait for it to end or use another --workdir. If "
          f"that run is gone, delete {self.path}.")
    raise WorkdirLockedError(f"Could not take {self.path}: other runs keep taking it.")

  def release(self) -> None:
    if self.enabled and self._holder() == self.owner:
      os.remove(self.path)

  def __enter__(self) -> WorkdirLock:
    self.acquire()
    return self

  def __exit__(self, *exc) -> None:
    self.release()


def latest_checkpoint(workdir: str) -> str | None:
  """The newest complete checkpoint directory under `workdir` (any generation), or None."""
  found = [p for p in glob.glob(os.path.join(workdir, "**", "checkpoints", "*"), recursive=True)
           if os.path.basename(p).isdigit()]
  return max(found, key=lambda p: (os.path.getmtime(p), int(os.path.basename(p))),
             default=None)


def remove_unless_checkpointed(workdir: str) -> None:
  """Removes `workdir` unless it holds a checkpoint: after a failed start of a run that created
  it, so a mistake leaves nothing behind (a run that got as far as a checkpoint stays
  resumable)."""
  if os.path.isdir(workdir) and latest_checkpoint(workdir) is None:
    shutil.rmtree(workdir, ignore_errors=True)
