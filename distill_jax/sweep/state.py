"""A sweep's records on disk, shared by every launcher and by `sweep status` and `report`.

    ROOT/trials.json        the expanded sweep: its spec, stages and trials (see spec.Trial)
    ROOT/<trial>/           the trial's workdir (checkpoints, metrics.jsonl, result.json, ...)
    ROOT/<trial>/trial.log  the trial's stdout and stderr, appended on every attempt
    ROOT/<trial>/trial.json its last attempt: state, exit code, command, host, times

A trial is `done` when its `result.json` exists (the run writes it last), whatever else says;
otherwise its `trial.json` says `running`, `failed` (exit code != 0), `interrupted` (stopped by
the launcher) or `blocked` (a trial it reads did not finish), and without one it is `pending`.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from collections.abc import Sequence
from typing import Any

from distill_jax.sweep.spec import Trial, fill_root

STATES = ("pending", "running", "done", "failed", "interrupted", "blocked")
_PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def write_trials(root: str, spec: str, trials: Sequence[Trial], **info: Any) -> None:
  os.makedirs(root, exist_ok=True)
  stages = list(dict.fromkeys(t.stage for t in trials))
  _write_json(os.path.join(root, "trials.json"), {
      "spec": spec, "stages": stages, "trials": [t.to_json() for t in trials], **info})


def read_trials(root: str) -> dict[str, Any]:
  path = os.path.join(root, "trials.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: is {root!r} a sweep's --workdir?")
  with open(path) as f:
    return json.load(f)


def trial_from_json(d: dict[str, Any]) -> Trial:
  return Trial(d["name"], d["stage"], d["config"], d["overrides"], d["labels"],
               tuple(d["flags"]), tuple(d["depends_on"]), d.get("script", ""))


def command(root: str, trial: Trial) -> list[str]:
  """The trial's command line: the normal CLI in `ROOT/<trial>`, or its script."""
  flags = [fill_root(f, root, trial.name) for f in trial.flags]
  if trial.script:
    return [sys.executable, trial.script, *flags]
  return [sys.executable, "-m", "distill_jax.main", f"--config={trial.config}",
          f"--workdir={os.path.join(os.path.abspath(root), trial.name)}", *flags]


def finish(root: str, trial: Trial, code: int) -> str:
  """Records how the trial's attempt ended, 'done' or 'failed', and returns it. A script trial
  that exits with 0 is done: its `result.json` (the command and the time) is written here; a
  training run writes its own."""
  if code == 0 and trial.script:
    _write_json(os.path.join(root, trial.name, "result.json"),
                {"script": trial.script, "command": command(root, trial), "ended": time.time()})
  final = "done" if code == 0 and is_done(root, trial.name) else "failed"
  write_record(root, trial, final, exit_code=code)
  return final


def environment() -> dict[str, str]:
  """The trial's environment: this one, with this distill_jax first on PYTHONPATH."""
  path = os.environ.get("PYTHONPATH", "")
  return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (_PACKAGE_PARENT, path) if p)}


def trial_dir(root: str, name: str) -> str:
  return os.path.join(root, name)


def log_path(root: str, name: str) -> str:
  return os.path.join(root, name, "trial.log")


def is_done(root: str, name: str) -> bool:
  return os.path.exists(os.path.join(root, name, "result.json"))


def read_record(root: str, name: str) -> dict[str, Any] | None:
  path = os.path.join(root, name, "trial.json")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def write_record(root: str, trial: Trial, state: str, **info: Any) -> None:
  """Records the trial's state; `running` starts a new attempt, a final state keeps the
  attempt's start time, pid and job."""
  assert state in STATES, state
  old = read_record(root, trial.name) or {}
  record = {"name": trial.name, "state": state, "host": socket.gethostname(),
            "command": command(root, trial), "attempts": old.get("attempts", 0)}
  if state == "running":
    record.update(attempts=record["attempts"] + 1, started=time.time())
  else:
    record.update({k: old[k] for k in ("started", "pid", "job") if k in old}, ended=time.time())
  record.update(info)
  _write_json(os.path.join(root, trial.name, "trial.json"), record)


def trial_state(root: str, name: str) -> str:
  if is_done(root, name):
    return "done"
  record = read_record(root, name)
  return record["state"] if record else "pending"


def blocking(root: str, trial: Trial) -> list[str]:
  """The trials that `trial` reads and that are not done."""
  return [d for d in trial.depends_on if not is_done(root, d)]


def log_tail(root: str, name: str, lines: int = 20) -> str:
  path = log_path(root, name)
  if not os.path.exists(path):
    return "(no log)"
  with open(path, "rb") as f:
    f.seek(max(0, os.path.getsize(path) - 64 * 1024))
    text = f.read().decode("utf-8", "replace")
  return "\n".join(text.rstrip().splitlines()[-lines:])


def summary(root: str, states: dict[str, str], tail_lines: int = 15) -> str:
  """Counts per state, then every failed/blocked/interrupted trial with its log tail."""
  counts = {s: sum(v == s for v in states.values()) for s in STATES}
  lines = [f"{len(states)} trials: " + ", ".join(f"{n} {s}" for s, n in counts.items() if n)]
  for name, s in states.items():
    if s in ("failed", "blocked", "interrupted"):
      record = read_record(root, name) or {}
      detail = {"failed": f"exit code {record.get('exit_code')}",
                "blocked": f"waits for {record.get('blocked_by')}",
                "interrupted": "stopped by the launcher"}[s]
      lines.append(f"\n== {name}: {s} ({detail}); log {log_path(root, name)}")
      if s == "failed":
        lines.append(log_tail(root, name, tail_lines))
  return "\n".join(lines)


def _write_json(path: str, obj: Any) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True, default=str)
  os.replace(tmp, path)
