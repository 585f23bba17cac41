"""The `slurm` launcher: one `sbatch` job array per stage, each array task one trial.

`launch` writes `ROOT/slurm/<stage>.sbatch` (resources from the flags) and submits the stages in
order, each later stage with `--dependency=afterany:<previous stage's job>`, so the students
start when the teachers have ended (a student whose teacher failed is recorded as `blocked`).
Array task i of a stage runs the stage's i-th trial of `ROOT/trials.json` through
`python -m distill_jax.sweep.trial`, which records its exit code and appends the trial's output
to `ROOT/<trial>/trial.log`; Slurm's own output per task is `ROOT/slurm/<stage>-<i>.out`.
With `--wait` the command waits for the jobs and prints the summary; otherwise it returns at
once and `distill-jax sweep status ROOT` tells pending/running/done/failed from `squeue` and
the trials' records (no `sacct`, which needs Slurm's accounting database).

A trial with `--nodes`/`--tasks_per_node` > 1 is one multi-process run: the task starts it with
`srun`, and each process reads its place in the layout from Slurm's variables.

With `--gpus_per_task` > 0 the batch script exports `DISTILL_JAX_GPUS_PER_TASK`
(`common.backend.GPUS_ENV`), which the trial's run inherits: a run that then finds JAX on the
CPU (a CPU-only jaxlib in the jobs' environment) fails at once, naming the fix, instead of
training on the node's CPU (`--config.allow_cpu=True` in the trial's flags runs it anyway).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence

from distill_jax.common.backend import GPUS_ENV
from distill_jax.sweep import state
from distill_jax.sweep.launch import LAUNCHERS
from distill_jax.sweep.spec import Trial

ACTIVE = {"PENDING": "pending", "CONFIGURING": "running", "RUNNING": "running",
          "COMPLETING": "running", "SUSPENDED": "running", "REQUEUED": "pending",
          "RESIZING": "running"}


@LAUNCHERS.register("slurm")
class SlurmLauncher:
  """Submits the sweep to Slurm as job arrays."""

  @staticmethod
  def add_flags(parser) -> None:
    group = parser.add_argument_group("slurm launcher")
    group.add_argument("--partition", default="", help="Slurm partition (default: Slurm's).")
    group.add_argument("--gpus_per_task", type=int, default=0, help="GPUs per trial process.")
    group.add_argument("--cpus_per_task", type=int, default=1, help="CPUs per trial process.")
    group.add_argument("--nodes", type=int, default=1, help="Nodes per trial (multi-host).")
    group.add_argument("--tasks_per_node", type=int, default=1,
                       help="Processes per node per trial (e.g. one per GPU).")
    group.add_argument("--time", default="", help="Time limit per trial, e.g. 12:00:00.")
    group.add_argument("--mem", default="", help="Memory per node, e.g. 32G.")
    group.add_argument("--parallel", type=int, default=0,
                       help="At most this many trials of a stage at once (the array's %%N).")
    group.add_argument("--sbatch_args", default="",
                       help="More sbatch options, e.g. '--account=x --qos=y'.")
    group.add_argument("--wait", action="store_true",
                       help="Wait for every job to end, then print the summary.")
    group.add_argument("--poll", type=float, default=10.0, help="Seconds between polls (--wait).")

  @staticmethod
  def unavailable(args) -> str | None:
    """Why the sweep cannot be submitted from here: Slurm's `sbatch` is not on PATH."""
    del args
    if shutil.which("sbatch") is None:
      return ("--launcher=slurm needs Slurm's `sbatch`, which was not found on PATH: submit "
              "from a Slurm login node, or use --launcher=local to run the trials on this "
              "machine.")
    return None

  @staticmethod
  def launch(root: str, trials: Sequence[Trial], args) -> int:
    root = os.path.abspath(root)
    os.makedirs(os.path.join(root, "slurm"), exist_ok=True)
    jobs, previous = {}, None
    for stage in dict.fromkeys(t.stage for t in trials):
      stage_trials = [t for t in trials if t.stage == stage]
      script = os.path.join(root, "slurm", f"{stage}.sbatch")
      with open(script, "w") as f:
        f.write(batch_script(root, stage, len(stage_trials), args))
      cmd = ["sbatch", "--parsable"]
      if previous:
        cmd.append(f"--dependency=afterany:{previous}")
      job = _run([*cmd, script]).split(";")[0]
      jobs[stage] = previous = job
      print(f"[sweep] stage {stage}: {len(stage_trials)} trials, job array {job}", flush=True)
    with open(os.path.join(root, "slurm", "jobs.json"), "w") as f:
      json.dump(jobs, f, indent=2)
    if not args.wait:
      print(f"[sweep] submitted; `distill-jax sweep status {root}` shows progress.", flush=True)
      return 0
    while _queue(set(jobs.values())):  # Until every task of every stage has left the queue.
      time.sleep(args.poll)
    states = SlurmLauncher.states(root, trials)
    print(state.summary(root, states), flush=True)
    return 0 if all(s == "done" for s in states.values()) else 1

  @staticmethod
  def states(root: str, trials: Sequence[Trial]) -> dict[str, str]:
    path = os.path.join(root, "slurm", "jobs.json")
    jobs = json.load(open(path)) if os.path.exists(path) else {}
    queue = _queue(set(jobs.values()))
    states = {}
    for stage in dict.fromkeys(t.stage for t in trials):
      for i, t in enumerate(t for t in trials if t.stage == stage):
        queued = queue.get(f"{jobs.get(stage)}_{i}")
        recorded = state.trial_state(root, t.name)
        if recorded == "done" or queued is None:
          # Ended (or never submitted): a 'running' record that outlived its job was killed.
          states[t.name] = "failed" if recorded == "running" else recorded
        else:
          states[t.name] = queued
    return states


def batch_script(root: str, stage: str, num_trials: int, args) -> str:
  """The sbatch script of one stage: array index -> the stage's trial."""
  array = f"0-{num_trials - 1}" + (f"%{args.parallel}" if args.parallel > 0 else "")
  options = [f"--job-name=sweep-{stage}", f"--array={array}",
             f"--output={root}/slurm/{stage}-%a.out", f"--nodes={args.nodes}",
             f"--ntasks-per-node={args.tasks_per_node}", f"--cpus-per-task={args.cpus_per_task}"]
  if args.partition:
    options.append(f"--partition={args.partition}")
  if args.gpus_per_task:
    options.append(f"--gpus-per-task={args.gpus_per_task}")
  if args.time:
    options.append(f"--time={args.time}")
  if args.mem:
    options.append(f"--mem={args.mem}")
  options += shlex.split(args.sbatch_args)
  env = state.environment()
  # The GPUs asked for reach the run: one that finds only a CPU (a CPU-only jaxlib in the
  # jobs' environment) stops with the fix instead of training on the node's CPU.
  gpus = [f"export {GPUS_ENV}={args.gpus_per_task}"] if args.gpus_per_task else []
  lines = ["#!/bin/bash", *(f"#SBATCH {o}" for o in options),
           f"export PYTHONPATH={shlex.quote(env['PYTHONPATH'])}", *gpus,
           f"exec {shlex.quote(sys.executable)} -m distill_jax.sweep.trial "
           f"{shlex.quote(root)} {shlex.quote(stage)} \"$SLURM_ARRAY_TASK_ID\""]
  return "\n".join(lines) + "\n"


def _queue(job_ids: set[str]) -> dict[str, str]:
  """'JOB_INDEX' -> pending/running for our array tasks still in Slurm's queue."""
  if not job_ids:
    return {}
  out = _run(["squeue", "-h", "-r", "-o", "%i %T"])
  queue = {}
  for line in out.splitlines():
    task, _, slurm_state = line.strip().partition(" ")
    if task.split("_")[0] in job_ids:
      queue[task] = ACTIVE.get(slurm_state, "running")
  return queue


def _run(cmd: list[str]) -> str:
  try:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
  except FileNotFoundError:
    raise RuntimeError(f"{cmd[0]} not found: the slurm launcher needs Slurm's client commands "
                       "on PATH (e.g. Debian's slurm-client).") from None
  if proc.returncode != 0:
    raise RuntimeError(f"{' '.join(cmd)} failed (exit code {proc.returncode}): "
                       f"{proc.stderr.strip()}")
  return proc.stdout.strip()
