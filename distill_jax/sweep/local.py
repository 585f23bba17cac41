"""The `local` launcher: the trials as subprocesses of this machine, `--workers` at a time.

Stages run in order; within a stage a trial starts as soon as a worker is free. A trial that
fails is recorded (exit code, log tail in `sweep status`) and the others go on; a trial whose
teacher (any trial it reads) did not finish is recorded as `blocked` instead of started.
Running the same command again skips finished trials and restarts the others, which resume
from their checkpoints (the CLI does that by itself). Ctrl-C (or SIGTERM) stops every running
trial (SIGTERM, then SIGKILL after `--grace` seconds), records them as `interrupted`, and exits.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Sequence

from distill_jax.sweep import state
from distill_jax.sweep.launch import LAUNCHERS
from distill_jax.sweep.spec import Trial
from distill_jax.train.workdir import process_alive


@LAUNCHERS.register("local")
class LocalLauncher:
  """Runs the sweep here, one subprocess per trial."""

  @staticmethod
  def add_flags(parser) -> None:
    group = parser.add_argument_group("local launcher")
    group.add_argument("--workers", type=int, default=1,
                       help="Trials run at once (one process each). Default 1.")
    group.add_argument("--grace", type=float, default=10.0,
                       help="Seconds a stopped trial gets between SIGTERM and SIGKILL.")

  @staticmethod
  def states(root: str, trials: Sequence[Trial]) -> dict[str, str]:
    states = {t.name: state.trial_state(root, t.name) for t in trials}
    for name, s in states.items():  # A 'running' record whose process is gone was killed.
      record = state.read_record(root, name)
      if s == "running" and not process_alive(record.get("pid")):
        states[name] = "interrupted"
    return states

  @staticmethod
  def launch(root: str, trials: Sequence[Trial], args) -> int:
    if args.workers < 1:
      raise ValueError(f"--workers must be >= 1, got {args.workers}.")
    running: dict[str, tuple[Trial, subprocess.Popen, object]] = {}
    interrupted = []

    def stop(signum, frame):
      raise KeyboardInterrupt

    # Both set explicitly: a shell starts background commands with SIGINT ignored, and Python
    # then raises no KeyboardInterrupt; `kill -INT` or Ctrl-C must stop the sweep regardless.
    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
      for stage in dict.fromkeys(t.stage for t in trials):
        queue = [t for t in trials if t.stage == stage]
        print(f"[sweep] stage {stage}: {len(queue)} trials", flush=True)
        while queue or running:
          while queue and len(running) < args.workers:
            trial = queue.pop(0)
            if state.is_done(root, trial.name):
              print(f"[sweep] {trial.name}: done already, skipped", flush=True)
              continue
            missing = state.blocking(root, trial)
            if missing:
              state.write_record(root, trial, "blocked", blocked_by=missing)
              print(f"[sweep] {trial.name}: blocked (needs {missing})", flush=True)
              continue
            running[trial.name] = (trial, *_start(root, trial))
          time.sleep(0.2)
          for name, (trial, proc, log) in list(running.items()):
            if proc.poll() is not None:
              log.close()
              del running[name]
              _finish(root, trial, proc.returncode)
    except KeyboardInterrupt:
      print(f"\n[sweep] stopping {len(running)} running trial(s)...", flush=True)
      _stop([proc for _, proc, _ in running.values()], args.grace)
      for name, (trial, proc, log) in running.items():
        log.close()
        state.write_record(root, trial, "interrupted", exit_code=proc.returncode,
                           pid=proc.pid)
        interrupted.append(name)
      print(f"[sweep] interrupted: {interrupted}; run the same command again to resume.",
            flush=True)
      return 130
    finally:
      for sig, handler in previous.items():
        signal.signal(sig, handler)
    states = LocalLauncher.states(root, trials)
    print(state.summary(root, states), flush=True)
    return 0 if all(s == "done" for s in states.values()) else 1


def _start(root: str, trial: Trial) -> tuple[subprocess.Popen, object]:
  os.makedirs(state.trial_dir(root, trial.name), exist_ok=True)
  cmd = state.command(root, trial)
  log = open(state.log_path(root, trial.name), "a")
  log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}\n")
  log.flush()
  # A session of its own: Ctrl-C reaches the launcher only, which then stops the trial.
  proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=state.environment(),
                          start_new_session=True)
  state.write_record(root, trial, "running", pid=proc.pid)
  print(f"[sweep] {trial.name}: started (pid {proc.pid})", flush=True)
  return proc, log


def _finish(root: str, trial: Trial, code: int) -> None:
  if state.finish(root, trial, code) == "done":
    print(f"[sweep] {trial.name}: done", flush=True)
    return
  print(f"[sweep] {trial.name}: FAILED (exit code {code}); log tail:\n"
        f"{state.log_tail(root, trial.name, 10)}", flush=True)


def _stop(procs: Sequence[subprocess.Popen], grace: float) -> None:
  for proc in procs:
    _signal_group(proc, signal.SIGTERM)
  deadline = time.time() + grace
  for proc in procs:
    try:
      proc.wait(timeout=max(0.0, deadline - time.time()))
    except subprocess.TimeoutExpired:
      _signal_group(proc, signal.SIGKILL)
      proc.wait()


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
  try:
    os.killpg(proc.pid, sig)  # The trial's own session: its process and any it started.
  except ProcessLookupError:
    pass
