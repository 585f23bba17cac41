"""Fault injection through the CLI, in real processes: nothing lost, nothing corrupt.

One uninterrupted run is the reference. A second run of the same config is interrupted again
and again (a full disk, SIGKILLs at random moments, during compilation and mid-checkpoint, a
SIGTERM while a second run tries the same workdir) and must end bit-identical to it, with the
same metrics.jsonl lines and TensorBoard scalars, each once. Damaged checkpoints fall back to
the previous step; a diverging run never saves a non-finite value.
"""

import errno
import glob
import json
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import ROOT

from distill_jax.config import ConfigError, load_config_file
from distill_jax.train import loop
from distill_jax.train.build import build_run, init_state
from distill_jax.train.guard import NonFiniteLossError
from distill_jax.train.signals import Interrupted
from distill_jax.train.workdir import WorkdirLock, WorkdirLockedError

STEPS = 40
CONFIG = """
import ml_collections
from distill_jax.config import base_config

def get_config(arg=None):
  c = base_config()
  c.student = ml_collections.ConfigDict({"name": "mlp", "kwargs": {"hidden": (16,)}})
  c.batch_size, c.eval_batch_size = 32, 512
  c.num_steps = STEPS
  c.optim.schedule = "cosine"
  c.eval_every_epochs = 0.25  # 44 steps per epoch: evaluations at 11, 22, 33 and the end.
  c.log_every_steps = 1
  c.checkpoint_every_steps = 1  # Every step writes one: most kills land mid-checkpoint.
  c.progress_bar = False
  return c
""".replace("STEPS", str(STEPS))
# Runs the CLI with orbax's save failing as on a full disk at step 5 (when no tmpfs can be
# mounted to fill for real): a half-written step directory and ENOSPC.
FULL_DISK_AT_5 = textwrap.dedent("""
  import errno, os, sys
  import orbax.checkpoint as ocp
  save = ocp.CheckpointManager.save
  def full(self, step, *args, **kwargs):
    if step == 5:
      os.makedirs(os.path.join(str(self.directory), "5.orbax-checkpoint-tmp-1", "state"))
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return save(self, step, *args, **kwargs)
  ocp.CheckpointManager.save = full
  from distill_jax import main
  sys.argv[0] = "distill-jax"
  main.run()
""")


@pytest.fixture(scope="module")
def env(tmp_path_factory, data_dir):
  base = tmp_path_factory.mktemp("faults")
  config = base / "config.py"
  config.write_text(CONFIG)
  return {"base": base, "config": str(config), "data_dir": data_dir, "env": {
      **os.environ, "XLA_FLAGS": "", "DISTILL_JAX_CPU_FLAGS": "0",
      "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]),
      # Every launch after the first loads its compiled steps from here.
      "JAX_COMPILATION_CACHE_DIR": str(base / "jax_cache"),
      "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}}


def launch(env, workdir, *flags, script=None):
  args = ["-c", script] if script else ["-m", "distill_jax.main"]
  return subprocess.Popen(
      [sys.executable, *args, f"--config={env['config']}", f"--workdir={workdir}",
       f"--config.data.data_dir={env['data_dir']}", *flags],
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env["env"])


def finish(proc, timeout=300):
  out, err = proc.communicate(timeout=timeout)
  return proc.returncode, err


def metrics_rows(workdir):
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.endswith("\n")]


def exported(workdir):
  with ocp.StandardCheckpointer() as ckptr:
    return jax.tree.map(np.asarray, ckptr.restore(os.path.join(workdir, "model", "variables")))


def assert_identical(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    assert x.dtype == y.dtype and np.array_equal(x, y)


def tensorboard_scalars(workdir):
  """{(tag, step): value} as TensorBoard shows the run: every events file in order, a
  restart's SessionLog START at step s (its `purge_step`) dropping what was logged
  from step s on."""
  from tensorboardX.proto import event_pb2

  START = event_pb2.SessionLog.START
  scalars = {}
  for path in sorted(glob.glob(os.path.join(workdir, "tb", "events.out.tfevents.*"))):
    with open(path, "rb") as f:
      data = f.read()
    pos = 0
    while pos + 12 <= len(data):
      (length,) = struct.unpack("<Q", data[pos:pos + 8])
      if pos + 16 + length > len(data):
        break  # A record torn by a kill.
      event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
      pos += 16 + length
      if event.HasField("session_log") and event.session_log.status == START:
        scalars = {k: v for k, v in scalars.items() if k[1] < event.step}
      for value in event.summary.value:
        scalars[(value.tag, event.step)] = value.simple_value
  return scalars


def masked_crc32c(data):
  """TFRecord's checksum: CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), masked."""
  crc = 0xFFFFFFFF
  for byte in data:
    crc ^= byte
    for _ in range(8):
      crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
  crc ^= 0xFFFFFFFF
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def test_event_files_resume_as_one_run_with_valid_records(tmp_path):
  """Two writers in the same second (a restart from step 2): two files, sorting in the order
  written; every record's checksums are what TensorBoard verifies; the second file's purge
  hides what the first logged after step 2."""
  from distill_jax.train.metrics import EventFile

  first = EventFile(str(tmp_path / "tb"), purge_step=1)
  for step in range(1, 6):
    first.write(step, {"loss": 1.0 / step})
  first.close()
  second = EventFile(str(tmp_path / "tb"), purge_step=3)
  second.write(3, {"loss": 7.0})
  second.close()
  paths = sorted(glob.glob(str(tmp_path / "tb" / "events.out.tfevents.*")))
  assert len(paths) == 2 and os.path.getmtime(paths[0]) <= os.path.getmtime(paths[1])
  for path in paths:
    data = open(path, "rb").read()
    pos = 0
    while pos < len(data):
      (length,) = struct.unpack("<Q", data[pos:pos + 8])
      assert struct.unpack("<I", data[pos + 8:pos + 12])[0] == masked_crc32c(data[pos:pos + 8])
      body = data[pos + 12:pos + 12 + length]
      assert struct.unpack("<I", data[pos + 12 + length:pos + 16 + length])[0] == (
          masked_crc32c(body))
      pos += 16 + length
  assert tensorboard_scalars(str(tmp_path)) == {("loss", 1): 1.0, ("loss", 2): 0.5,
                                               ("loss", 3): 7.0}


def checkpoint_steps(workdir):
  """The complete checkpoint steps in `workdir` ([] if there are none, or no workdir)."""
  path = os.path.join(workdir, "checkpoints")
  names = os.listdir(path) if os.path.isdir(path) else []
  return sorted(int(n) for n in names if n.isdigit())


def saved_states(workdir):
  for step in checkpoint_steps(workdir):
    with ocp.StandardCheckpointer() as ckptr:
      yield step, ckptr.restore(os.path.join(workdir, "checkpoints", str(step), "state"))


@pytest.fixture(scope="module")
def straight(env):
  workdir = str(env["base"] / "straight")
  rc, err = finish(launch(env, workdir))
  assert rc == 0, err[-3000:]
  return workdir


def progressed(workdir, done):
  return lambda: len(metrics_rows(workdir)) > done


def wait_for(condition, proc, timeout=120):
  end = time.time() + timeout
  while not condition():
    if proc.poll() is not None:
      return False
    assert time.time() < end, "the run made no progress"
    time.sleep(0.002)
  return True


def mount_tmpfs(path):
  os.makedirs(path)
  if os.geteuid() != 0 or shutil.which("mount") is None:
    return False
  return subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", path],
                        capture_output=True).returncode == 0


def fill(path):
  """Writes `path/filler` until the file system is full."""
  with open(os.path.join(path, "filler"), "wb") as f:
    try:
      while True:
        f.write(b"\0" * (1 << 20))
        f.flush()
    except OSError as e:
      assert e.errno == errno.ENOSPC


def test_interrupted_run_ends_bit_identical(env, straight):
  rng = random.Random(15)
  mount = str(env["base"] / "disk")
  tmpfs = mount_tmpfs(mount)
  workdir = os.path.join(mount, "run")
  try:
    # 1. The disk fills up mid-run: one line, and the workdir resumes.
    if tmpfs:
      proc = launch(env, workdir)
      assert wait_for(lambda: len(metrics_rows(workdir)) >= 4, proc)
      fill(mount)
      rc, err = finish(proc)
      os.remove(os.path.join(mount, "filler"))
    else:
      rc, err = finish(launch(env, workdir, script=FULL_DISK_AT_5))
    assert rc not in (0, -signal.SIGKILL), err[-3000:]
    assert "No space left on device" in err.strip().splitlines()[-1], err[-3000:]
    # The last line (what the user reads) is the one-line error, and no thread or native
    # callback (TensorStore waking orbax's closed event loop) printed a traceback before it.
    assert "rerun" in err.strip().splitlines()[-1] and "Traceback" not in err, err[-3000:]

    # 2. SIGKILL at random moments: during start-up/compilation, mid-checkpoint, anywhere.
    # Each kill waits for a bounded number of new steps (never a bounded time), so however fast
    # the machine, ten launches leave the run unfinished.
    kills, mid_write, ended = 0, 0, []
    for i in range(10):
      proc = launch(env, workdir)
      done = len(metrics_rows(workdir))
      if i == 0:  # Importing, building, compiling: before the launch's first step.
        deadline = time.time() + rng.uniform(1, 4)
        while time.time() < deadline and not progressed(workdir, done)() and proc.poll() is None:
          time.sleep(0.002)
      elif i % 3 == 1:  # The moment a checkpoint is being written.
        def writing():
          try:
            names = os.listdir(os.path.join(workdir, "checkpoints"))
          except FileNotFoundError:
            return False
          return any("tmp" in n or n.isdigit() and not os.path.exists(
              os.path.join(workdir, "checkpoints", n, "checksums.json")) for n in names)
        if wait_for(progressed(workdir, done), proc):
          mid_write += wait_for(writing, proc)
      else:  # Anywhere within the launch's first few steps.
        wait_for(progressed(workdir, done + rng.randrange(2)), proc)
        time.sleep(rng.uniform(0, 0.05))
      if proc.poll() is None:
        proc.kill()
        kills += 1
        proc.communicate()
      else:
        ended.append((i, proc.returncode, proc.communicate()[1][-2000:]))
    assert not ended, f"launches that ended before their kill (i, rc, stderr): {ended}"
    assert kills == 10 and mid_write >= 2
    assert len(metrics_rows(workdir)) < len(metrics_rows(straight)), "finished too early"

    # 3. SIGTERM, while a second run tries the same workdir: it refuses, naming the holder.
    proc = launch(env, workdir)
    done = len(metrics_rows(workdir))
    assert wait_for(progressed(workdir, done), proc)
    proc.send_signal(signal.SIGSTOP)  # Holds the lock while the second run starts.
    rc, err = finish(launch(env, workdir))
    assert rc != 0 and f"in use by another run (PID {proc.pid} on this host)" in err, err[-2000:]
    proc.send_signal(signal.SIGTERM)
    proc.send_signal(signal.SIGCONT)
    rc, err = finish(proc)
    assert rc == 143, err[-3000:]
    stopped_at = metrics_rows(workdir)[-1]["step"]
    assert stopped_at < STEPS and checkpoint_steps(workdir)[-1] == stopped_at
    assert f"Stopped by SIGTERM at step {stopped_at}" in err

    # 4. The last launch completes.
    rc, err = finish(launch(env, workdir))
    assert rc == 0, err[-3000:]
    assert_identical(exported(workdir), exported(straight))
    assert metrics_rows(workdir) == metrics_rows(straight)
    assert tensorboard_scalars(workdir) == tensorboard_scalars(straight)
    result, reference = (json.load(open(os.path.join(w, "result.json")))
                         for w in (workdir, straight))
    for key in ("final", "best_top1", "best_step", "steps"):
      assert result[key] == reference[key], key
    assert result["final"]["step"] == STEPS and result["train_seconds"] > 0
    assert not os.path.exists(os.path.join(workdir, ".lock"))
  finally:
    if tmpfs:
      subprocess.run(["umount", "-l", mount])


def test_damaged_checkpoints_fall_back_to_the_previous_step(env, straight, tmp_path):
  workdir = str(tmp_path / "run")
  shutil.copytree(straight, workdir)
  steps = checkpoint_steps(workdir)
  assert steps == [STEPS - 2, STEPS - 1, STEPS]
  # The latest: one flipped bit in its largest state file; the one before: a truncated file.
  def largest(step):
    files = glob.glob(os.path.join(workdir, "checkpoints", str(step), "state", "**", "*"),
                      recursive=True)
    return max((f for f in files if os.path.isfile(f)), key=os.path.getsize)
  path = largest(STEPS)
  data = bytearray(open(path, "rb").read())
  data[len(data) // 2] ^= 0x10
  open(path, "wb").write(bytes(data))
  path = largest(STEPS - 1)
  os.truncate(path, os.path.getsize(path) // 2)
  os.remove(os.path.join(workdir, "result.json"))

  rc, err = finish(launch(env, workdir))
  assert rc == 0, err[-3000:]
  for step in (STEPS, STEPS - 1):
    assert f"Checkpoint {workdir}/checkpoints/{step} is unusable" in err, err[-3000:]
    assert os.path.isdir(os.path.join(workdir, "checkpoints", f"{step}.corrupt"))
  assert "does not match its checksum" in err
  assert f"Resumed from {workdir}/checkpoints/{STEPS - 2}" in err
  assert_identical(exported(workdir), exported(straight))
  assert metrics_rows(workdir) == metrics_rows(straight)
  assert json.load(open(os.path.join(workdir, "result.json")))["final"] == json.load(
      open(os.path.join(straight, "result.json")))["final"]


def test_diverging_run_never_saves_a_non_finite_value(env, tmp_path):
  workdir = str(tmp_path / "run")
  rc, err = finish(launch(env, workdir, "--config.optim.lr=1e39"))
  assert rc not in (0, -signal.SIGKILL)
  assert "Non-finite values at step 1: new params" in err.strip().splitlines()[-1], err[-2000:]
  assert checkpoint_steps(workdir) == []


def test_skipped_updates_keep_the_state_finite_and_stop_after_n(env, tmp_path):
  config = load_config_file(env["config"], {
      "data.data_dir": env["data_dir"], "optim.lr": 1e39, "train.on_nonfinite": "skip",
      "train.max_consecutive_skips": 3, "optim.schedule": "constant",
      "parallel.num_devices": 1})
  flags = []
  with pytest.raises(NonFiniteLossError, match=r"step 3: .*\(3 skipped steps in a row\)"):
    loop.train_and_evaluate(config, str(tmp_path), step_callback=lambda s, m: flags.append(
        int(jax.device_get(m["nonfinite"]))))
  assert flags and all(flags)  # Every step's update was non-finite...
  run = build_run(config)
  init = jax.device_get(init_state(config, run))
  assert checkpoint_steps(str(tmp_path)) == [1, 2]
  for step, state in saved_states(str(tmp_path)):  # ...and none reached a checkpoint.
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(state["params"]))
    assert_identical(jax.tree.map(np.asarray, state["params"]), init.params)
    assert int(state["step"]) == step


def test_resume_with_a_changed_config_is_refused_before_anything_is_written(env, tmp_path):
  def config(**overrides):
    return load_config_file(env["config"], {"data.data_dir": env["data_dir"], "num_steps": 4,
                                            "parallel.num_devices": 1, **overrides})

  workdir = str(tmp_path / "run")
  loop.train_and_evaluate(config(), workdir)
  saved = open(os.path.join(workdir, "config.json")).read()
  with pytest.raises(ConfigError, match=r"differs from the one .*checkpoints/4 was written with: "
                     r"optim.lr: 0.05 -> 0.1\. .*allow_config_change=True"):
    loop.train_and_evaluate(config(**{"optim.lr": 0.1}), workdir)
  # Another student: its state does not fit, whatever allow_config_change says. One line
  # naming the models (or the changed shapes), not the checkpoint library's tree dump.
  with pytest.raises(ConfigError, match=r"^The checkpoint in .*checkpoints/4 was saved with "
                     r"other parameter shapes than this config builds \(changed: "
                     r"student.kwargs.hidden: \[16\] -> \[24\]\): use another --workdir"):
    loop.train_and_evaluate(config(**{"student.kwargs.hidden": (24,),
                                      "allow_config_change": True}), workdir)
  with pytest.raises(ConfigError) as info:
    loop.train_and_evaluate(config(**{"student.name": "cnn", "allow_config_change": True}),
                            workdir)
  message = str(info.value)
  assert message.startswith(f"The checkpoint in {workdir}/checkpoints/4 was saved from model "
                            "'mlp' and the config asks for 'cnn' (changed: ")
  assert message.endswith(": use another --workdir for 'cnn', or the same model "
                          "(--config.student.name=mlp).")
  assert "\n" not in message and len(message) < 600 and "Metadata" not in message
  assert open(os.path.join(workdir, "config.json")).read() == saved
  assert checkpoint_steps(workdir) == [2, 3, 4]
  # Opted in: a longer run continues from step 4, and the new config is recorded.
  steps = []
  result = loop.train_and_evaluate(config(num_steps=6, allow_config_change=True), workdir,
                                   step_callback=lambda s, m: steps.append(s))
  assert steps == [5, 6] and result["final"]["step"] == 6
  assert json.load(open(os.path.join(workdir, "config.json")))["num_steps"] == 6
  # Rerun once finished: nothing to train, the export is current (not rewritten), and the
  # result is the same (final and best metrics, train time) from the checkpoint's record.
  variables = os.path.join(workdir, "model", "variables")
  mtime = os.stat(variables).st_mtime_ns
  again = loop.train_and_evaluate(config(num_steps=6, allow_config_change=True), workdir,
                                  step_callback=lambda s, m: steps.append(s))
  assert steps == [5, 6] and again == result and os.stat(variables).st_mtime_ns == mtime


def test_a_signal_during_an_evaluation_stops_at_the_next_step_with_its_checkpoint(
    env, tmp_path, monkeypatch):
  """SIGTERM while the first evaluation runs, no periodic checkpoints: the run stops at the
  next step after saving it (not at the evaluation's step, unsaved), and that checkpoint
  resumes the run."""
  config = load_config_file(env["config"], {
      "data.data_dir": env["data_dir"], "checkpoint_every_steps": 1000, "log_every_steps": 1000,
      "parallel.num_devices": 1})
  evaluate = loop.evaluate

  def evaluate_then_signal(*args, **kwargs):
    monkeypatch.setattr(loop, "evaluate", evaluate)  # Once.
    os.kill(os.getpid(), signal.SIGTERM)
    return evaluate(*args, **kwargs)

  monkeypatch.setattr(loop, "evaluate", evaluate_then_signal)
  workdir, steps = str(tmp_path / "run"), []
  with pytest.raises(Interrupted, match="Stopped by SIGTERM at step .*, after saving"):
    loop.train_and_evaluate(config, workdir, step_callback=lambda s, m: steps.append(s))
  evaluated = json.loads(open(os.path.join(workdir, "metrics.jsonl")).readlines()[-1])["step"]
  assert steps[-1] == evaluated + 1 and checkpoint_steps(workdir) == [steps[-1]]
  resumed = []
  loop.train_and_evaluate(config, workdir, step_callback=lambda s, m: resumed.append(s))
  assert resumed == list(range(steps[-1] + 1, STEPS + 1))


def test_stale_lock_is_taken_over_and_a_live_one_refuses(tmp_path):
  dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                        capture_output=True, text=True).stdout.strip()
  lock = WorkdirLock(str(tmp_path))
  with open(lock.path, "w") as f:
    json.dump({"host": lock.owner["host"], "pid": int(dead), "start": None}, f)
  with lock:
    assert json.load(open(lock.path))["pid"] == os.getpid()
    with pytest.raises(WorkdirLockedError, match=f"PID {os.getpid()} on this host"):
      WorkdirLock(str(tmp_path)).acquire()
  assert not os.path.exists(lock.path)


def test_extending_num_steps_follows_the_longer_schedule_and_says_so(env, tmp_path, caplog):
  """A cosine run of 4 steps resumed with num_steps=8: its 5th step uses the 8-step cosine's
  LR at step 4, lr/2 (not the ~0 the 4-step schedule ends at), and the log says so. The LR
  the optimizer really applies is measured: plain SGD (no momentum, no weight decay) moves
  the params by -lr * grad, so the first resumed update, divided by that of a copy resumed
  with a constant LR of 1 (same state, same batch, same grad), is the LR itself."""
  def config(**overrides):
    return load_config_file(env["config"], {
        "data.data_dir": env["data_dir"], "num_steps": 4, "parallel.num_devices": 1,
        "optim.momentum": 0.0, "optim.weight_decay": 0.0, "keep_checkpoints": 10,
        **overrides})

  base = str(tmp_path / "base")
  loop.train_and_evaluate(config(), base)
  longer, unit = str(tmp_path / "longer"), str(tmp_path / "unit")
  shutil.copytree(base, longer)
  shutil.copytree(base, unit)
  with caplog.at_level("WARNING"):
    loop.train_and_evaluate(config(num_steps=8, allow_config_change=True), longer)
  loop.train_and_evaluate(config(num_steps=5, allow_config_change=True, **{
      "optim.schedule": "constant", "optim.lr": 1.0}), unit)

  def update(workdir):
    states = dict(saved_states(workdir))
    return [np.asarray(b, np.float64) - np.asarray(a, np.float64) for a, b in zip(
        jax.tree.leaves(states[4]["params"]), jax.tree.leaves(states[5]["params"]), strict=True)]

  lr, total = 0.05, 8
  expected = lr * 0.5 * (1 + np.cos(np.pi * 4 / total))  # optax's cosine at count 4 of 8.
  old = lr * 0.5 * (1 + np.cos(np.pi * min(4, 4) / 4))  # The 4-step cosine: 0 from step 4.
  x, y = (np.concatenate([u.ravel() for u in update(w)]) for w in (longer, unit))
  assert np.abs(y).max() > 0
  # Least squares of x = lr * y: float32 params leave each element's ratio off by ~1e-3.
  np.testing.assert_allclose(x @ y / (y @ y), expected, rtol=1e-4)
  logged = [json.loads(line) for line in open(os.path.join(longer, "metrics.jsonl"))]
  assert [r["train/lr"] for r in logged if r["step"] == 5] == [pytest.approx(expected)]
  assert (f"The learning rate jumps at step 5: {old:.6g} under the checkpoint's schedule "
          f"(over 4 steps), {expected:.6g} under this config's (over 8 steps)") in caplog.text
