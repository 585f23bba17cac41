"""The sweep launchers end to end, with tiny digits runs through `distill-jax sweep`:

- local: a teacher, then a student that fails on purpose, then a long student (reading the
  teacher) interrupted (Ctrl-C) after its first checkpoint; the same command again skips the
  finished trials, retries the failed one and resumes the interrupted one from its checkpoint.
- slurm: a real Slurm (munged, slurmctld and slurmd started here on localhost, stopped by pid at
  the end) runs the first three trials as job arrays, one per stage.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest

from distill_jax.sweep import state

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPEC = '''
from distill_jax import sweep as sw

def get_sweep(arg=None):
  common = {{"data.data_dir": {data_dir!r}, "teachers.teacher.checkpoint": "{{ROOT}}/teacher"}}
  stages = {{
      "teachers": [sw.Point("teacher", "teacher,tiny", {{"data.data_dir": {data_dir!r}}})],
      "students": sw.with_overrides([sw.Point("kd", "kd,tiny")], common) + sw.with_overrides(
          # Fails on purpose at run time (a valid config whose teacher does not exist).
          [sw.Point("broken", "kd,tiny")],
          {{**common, "teachers.teacher.checkpoint": "/nonexistent/t"}})}}
  if arg == "long":  # Without 'kd' (the teacher is the finished trial to skip), plus a long run.
    stages["students"] = stages["students"][1:]
    stages["long"] = sw.with_overrides([sw.Point("long", "kd,tiny", {{
        "num_steps": 3000, "checkpoint_every_steps": 250, "log_every_steps": 250}})], common)
  return sw.Sweep(config={config!r}, stages=stages)
'''


def _write_spec(tmp_path, data_dir):
  path = tmp_path / "spec.py"
  path.write_text(SPEC.format(data_dir=data_dir,
                              config=os.path.join(ROOT, "configs", "digits.py")))
  return str(path)


def _env(**extra):
  return {**os.environ, "XLA_FLAGS": "", "DISTILL_JAX_CPU_FLAGS": "0",
          "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]), **extra}


def _sweep_cmd(*args):
  return [sys.executable, "-m", "distill_jax.main", "sweep", *args]


def _checkpoints(workdir):
  path = os.path.join(workdir, "checkpoints")
  return sorted(int(d) for d in os.listdir(path) if d.isdigit()) if os.path.isdir(path) else []


def test_local_launcher_failure_interrupt_and_resume(tmp_path, data_dir):
  spec, root = _write_spec(tmp_path, data_dir), str(tmp_path / "sweep")
  cmd = _sweep_cmd(f"--config={spec}:long", f"--workdir={root}", "--workers=2", "--grace=20")
  log = open(tmp_path / "run1.log", "w")
  proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=_env(), cwd=ROOT)
  long_dir = os.path.join(root, "long")
  deadline = time.time() + 300
  while not _checkpoints(long_dir) and proc.poll() is None and time.time() < deadline:
    time.sleep(0.2)
  assert _checkpoints(long_dir), f"no checkpoint of 'long':\n{open(tmp_path / 'run1.log').read()}"
  assert not state.is_done(root, "long"), "'long' finished before it could be interrupted"
  proc.send_signal(signal.SIGINT)  # What Ctrl-C sends to the launcher.
  assert proc.wait(timeout=60) == 130
  first = open(tmp_path / "run1.log").read()
  assert "interrupted: ['long']" in first, first
  assert [state.trial_state(root, n) for n in ("teacher", "broken", "long")] == [
      "done", "failed", "interrupted"]
  broken = state.read_record(root, "broken")
  assert broken["exit_code"] not in (0, None)
  assert "/nonexistent/t" in state.log_tail(root, "broken"), state.log_tail(root, "broken")
  stopped_at = _checkpoints(long_dir)[-1]
  assert 0 < stopped_at < 3000
  teacher_mtime = os.path.getmtime(os.path.join(root, "teacher", "result.json"))

  status = subprocess.run(_sweep_cmd("status", root), capture_output=True, text=True,
                          env=_env(), cwd=ROOT)
  assert status.returncode == 1
  assert "3 trials: 1 done, 1 failed, 1 interrupted" in status.stdout, status.stdout
  assert "== broken: failed (exit code" in status.stdout and "/nonexistent/t" in status.stdout

  again = subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=ROOT,
                         timeout=600)
  assert again.returncode == 1, again.stdout[-3000:]  # 'broken' fails again.
  assert "teacher: done already, skipped" in again.stdout
  assert "3 trials: 2 done, 1 failed" in again.stdout
  assert os.path.getmtime(os.path.join(root, "teacher", "result.json")) == teacher_mtime
  long_log = open(state.log_path(root, "long")).read()
  assert f"Resumed from {long_dir}/checkpoints/{stopped_at}" in long_log, long_log[-2000:]
  result = json.load(open(os.path.join(long_dir, "result.json")))
  assert result["steps"] == 3000
  assert state.read_record(root, "long")["attempts"] == 2
  assert state.read_record(root, "broken")["attempts"] == 2


# --- A real Slurm on localhost -------------------------------------------------------------

SLURM_BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "sinfo")


def _slurm_conf(tmp, host):
  conf = os.path.join(tmp, "slurm.conf")
  with open(conf, "w") as f:
    f.write("\n".join([
        "ClusterName=local", f"SlurmctldHost={host}", "SlurmUser=root",
        "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
        "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core",
        "AccountingStorageType=accounting_storage/none", "JobAcctGatherType=jobacct_gather/none",
        f"StateSaveLocation={tmp}/state", f"SlurmdSpoolDir={tmp}/spool",
        f"SlurmctldPidFile={tmp}/slurmctld.pid", f"SlurmdPidFile={tmp}/slurmd.pid",
        f"SlurmctldLogFile={tmp}/slurmctld.log", f"SlurmdLogFile={tmp}/slurmd.log",
        "SlurmctldPort=16817", "SlurmdPort=16818", "ReturnToService=2", "MpiDefault=none",
        f"NodeName={host} CPUs={os.cpu_count()} RealMemory=2000 State=UNKNOWN",
        "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP", ""]))
  os.makedirs(f"{tmp}/state")
  os.makedirs(f"{tmp}/spool")
  return conf


def _read_pid(pidfile, timeout=20):
  deadline = time.time() + timeout
  while time.time() < deadline:
    try:
      return int(open(pidfile).read().strip())
    except (OSError, ValueError):
      time.sleep(0.1)
  pytest.fail(f"{pidfile} was not written: the daemon did not start.")


@pytest.fixture(scope="module")
def slurm():
  """Starts munged (unless one runs), slurmctld and slurmd with a config in a temp dir; yields
  the environment that points Slurm's clients at it; at the end cancels what is still queued
  and stops the daemons it started, by pid."""
  missing = [b for b in SLURM_BINARIES if shutil.which(b) is None]
  if missing:
    pytest.fail(f"Slurm is not installed (missing {missing}): this test needs a real Slurm. "
                "Install it with `apt-get update && apt-get install -y slurm-wlm munge` "
                "(.ci/run does this in CI).")
  tmp = tempfile.mkdtemp(prefix="distill_jax_slurm_")
  host = socket.gethostname().split(".")[0]
  conf = _slurm_conf(tmp, host)
  env = {**os.environ, "SLURM_CONF": conf}
  pids = []
  try:
    if subprocess.run(["munge", "-n"], capture_output=True).returncode != 0:
      key = "/etc/munge/munge.key"
      if not os.path.exists(key):
        with open(key, "wb") as f:
          f.write(os.urandom(1024))
        shutil.chown(key, "munge", "munge")
        os.chmod(key, 0o400)
      os.makedirs("/run/munge", exist_ok=True)
      shutil.chown("/run/munge", "munge", "munge")
      pidfile = f"/run/munge/distill_jax_test_{os.getpid()}.pid"  # munged runs as 'munge'.
      subprocess.run(["runuser", "-u", "munge", "--", "munged", f"--pid-file={pidfile}"],
                     check=True)
      pids.append(_read_pid(pidfile))
    for daemon in ("slurmctld", "slurmd"):
      subprocess.run([daemon, "-f", conf], check=True, env=env)
      pids.append(_read_pid(f"{tmp}/{daemon}.pid"))
    deadline = time.time() + 60
    while time.time() < deadline:
      out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, env=env)
      if out.stdout.strip() == "idle":
        break
      time.sleep(0.5)
    else:
      pytest.fail(f"The Slurm node never became idle: {out.stdout} {out.stderr}\n"
                  + open(f"{tmp}/slurmctld.log").read()[-2000:])
    yield env
  finally:
    if len(pids) > 1:  # slurmctld runs: cancel our jobs, let their steps end before slurmd.
      jobs = subprocess.run(["squeue", "-h", "-o", "%A"], capture_output=True, text=True,
                            env=env).stdout.split()
      if jobs:
        subprocess.run(["scancel", *jobs], env=env)
      deadline = time.time() + 60
      while time.time() < deadline and subprocess.run(
          ["squeue", "-h"], capture_output=True, text=True, env=env).stdout.strip():
        time.sleep(0.5)
    for pid in reversed(pids):
      try:
        os.kill(pid, signal.SIGTERM)
      except OSError:
        pass
    time.sleep(1)
    shutil.rmtree(tmp, ignore_errors=True)


def test_slurm_launcher_job_arrays(tmp_path, data_dir, slurm):
  spec, root = _write_spec(tmp_path, data_dir), str(tmp_path / "sweep")
  proc = subprocess.run(
      _sweep_cmd(f"--config={spec}", f"--workdir={root}", "--launcher=slurm", "--wait",
                 "--poll=1", "--cpus_per_task=1", "--time=10:00"),
      capture_output=True, text=True, env=_env(SLURM_CONF=slurm["SLURM_CONF"]), cwd=ROOT,
      timeout=600)
  out = proc.stdout + proc.stderr
  assert proc.returncode == 1, out[-3000:]  # 'broken' failed; the others finished.
  assert "3 trials: 2 done, 1 failed" in out, out[-3000:]
  jobs = json.load(open(os.path.join(root, "slurm", "jobs.json")))
  assert list(jobs) == ["teachers", "students"]
  script = open(os.path.join(root, "slurm", "students.sbatch")).read()
  assert "#SBATCH --array=0-1" in script and "#SBATCH --cpus-per-task=1" in script
  for name in ("teacher", "kd"):
    result = json.load(open(os.path.join(root, name, "result.json")))
    assert result["steps"] == 6
    job = state.read_record(root, name)["job"]
    assert job == f"{jobs['teachers' if name == 'teacher' else 'students']}_0", job
  assert state.read_record(root, "broken")["exit_code"] not in (0, None)
  status = subprocess.run(_sweep_cmd("status", root), capture_output=True, text=True,
                          env=_env(SLURM_CONF=slurm["SLURM_CONF"]), cwd=ROOT)
  assert "== broken: failed (exit code" in status.stdout and "/nonexistent/t" in status.stdout
  assert os.path.exists(os.path.join(root, "slurm", "students-1.out"))


def test_slurm_batch_script_runs_the_trial_module(tmp_path):
  """The sbatch script's `python -m MODULE` is the module that runs one trial (no Slurm needed):
  it exists, and without arguments it prints its own usage line."""
  import argparse
  import re

  from distill_jax.sweep.slurm import SlurmLauncher, batch_script

  parser = argparse.ArgumentParser()
  SlurmLauncher.add_flags(parser)
  script = batch_script(str(tmp_path), "students", 2, parser.parse_args([]))
  module = re.search(r" -m (\S+) ", script).group(1)
  assert module == "distill_jax.sweep.trial"
  proc = subprocess.run([sys.executable, "-m", module], capture_output=True, text=True,
                        env=_env(), cwd=ROOT, timeout=120)
  assert proc.returncode == 1
  assert f"usage: python -m {module} ROOT STAGE INDEX" in proc.stderr
