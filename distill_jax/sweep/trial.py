"""One trial of a sweep inside a scheduler's job: `python -m distill_jax.sweep.trial ROOT STAGE I`.

Runs the I-th trial of STAGE in `ROOT/trials.json` (skipped if done, `blocked` if a trial it
reads is not done), appends its output to `ROOT/<trial>/trial.log`, records its exit code in
`ROOT/<trial>/trial.json` and exits with it. Under Slurm with more than one task in the job the
run is started with `srun` (one process per task; each finds its place from Slurm's variables).
SIGTERM (Slurm's time limit or `scancel`) is passed on to the run and recorded as `interrupted`.
The run inherits the job's environment, `DISTILL_JAX_GPUS_PER_TASK` from the batch script too
(the slurm launcher's `--gpus_per_task`): a run that finds only a CPU then stops with the fix.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from distill_jax.sweep import state


def run_trial(root: str, stage: str, index: int) -> int:
  trials = [state.trial_from_json(t) for t in state.read_trials(root)["trials"]]
  trial = [t for t in trials if t.stage == stage][index]
  if state.is_done(root, trial.name):
    print(f"{trial.name}: done already", flush=True)
    return 0
  missing = state.blocking(root, trial)
  if missing:
    state.write_record(root, trial, "blocked", blocked_by=missing)
    print(f"{trial.name}: blocked, {missing} not done", flush=True)
    return 1
  cmd = state.command(root, trial)
  if int(os.environ.get("SLURM_NTASKS", "1")) > 1:
    cmd = ["srun", "--kill-on-bad-exit=1", *cmd]
  os.makedirs(state.trial_dir(root, trial.name), exist_ok=True)
  with open(state.log_path(root, trial.name), "a") as log:
    log.write(f"\n=== job {os.environ.get('SLURM_JOB_ID', '?')}: {' '.join(cmd)}\n")
    log.flush()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=state.environment())
    stopped = []

    def forward(signum, frame):
      stopped.append(signum)
      proc.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    job = os.environ.get("SLURM_ARRAY_JOB_ID", os.environ.get("SLURM_JOB_ID"))
    task = os.environ.get("SLURM_ARRAY_TASK_ID")
    state.write_record(root, trial, "running", pid=proc.pid,
                       job=f"{job}_{task}" if task is not None else job)
    code = proc.wait()
  if stopped:
    state.write_record(root, trial, "interrupted", exit_code=code)
  else:
    state.finish(root, trial, code)
  print(f"{trial.name}: exit code {code}", flush=True)
  return code


if __name__ == "__main__":
  if len(sys.argv) != 4:
    sys.exit("usage: python -m distill_jax.sweep.trial ROOT STAGE INDEX")
  sys.exit(run_trial(sys.argv[1], sys.argv[2], int(sys.argv[3])))
