"""Two real processes on 127.0.0.1 (CPU, gloo collectives, 4 devices each) running the CLI on
the digits: the same parameters as one process with 8 devices, with a BatchNorm student,
under jit, and resumed from 2 processes into 1 under pmap; a dead peer ends the run."""

import os
import shutil
import socket
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import DIGITS, ROOT, tiny

from distill_jax.train import loop

STEPS = 6  # A checkpoint every 3 (the tiny variant).
# configs/digits.py:at: a CNN student with BatchNorm, AT on two feature maps plus CE.
FLAGS = ("--config.optim.schedule=constant",)


def free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def launch(workdir, data_dir, teacher_dir, processes, devices, *flags, timeout=240):
  """The CLI in `processes` processes of `devices` CPU devices each; fails the test with a
  process's output if one fails or outlives `timeout` (all are then ended, by pid)."""
  env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
         "DISTILL_JAX_CPU_FLAGS": "0",
         "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]),
         # Repeated layouts (the resumed runs) compile from the cache.
         "JAX_COMPILATION_CACHE_DIR": os.path.join(os.path.dirname(workdir), "jax_cache"),
         "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
  port = free_port()
  procs = []
  for i in range(processes):
    cluster = ([f"--config.parallel.coordinator=127.0.0.1:{port}",
                f"--config.parallel.num_processes={processes}",
                f"--config.parallel.process_id={i}",
                "--config.parallel.heartbeat_timeout_seconds=20"] if processes > 1 else [])
    log = open(f"{workdir}.{processes}x{devices}.{i}.log", "w")
    procs.append((subprocess.Popen(
        [sys.executable, "-m", "distill_jax.main", f"--config={DIGITS}:at,tiny",
         f"--workdir={workdir}", f"--config.data.data_dir={data_dir}",
         f"--config.teachers.teacher.checkpoint={teacher_dir}", f"--config.num_steps={STEPS}",
         *FLAGS, *cluster, *flags], env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT),
        log))
  try:
    for proc, log in procs:
      code = proc.wait(timeout=timeout)
      log.close()
      assert code == 0, open(log.name).read()[-3000:]
  finally:
    for proc, _ in procs:
      if proc.poll() is None:
        proc.kill()
        proc.wait()


def final_params(workdir, step=STEPS):
  """The checkpointed params and batch stats, read onto this process's first device (a
  checkpoint of several processes names their devices, so it needs a target layout)."""
  path = os.path.join(workdir, "checkpoints", str(step), "state")
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  with ocp.StandardCheckpointer() as ckptr:
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding),
                          ckptr.metadata(path).item_metadata.tree)
    state = ckptr.restore(path, target)
  return jax.tree.map(np.asarray, {"params": state["params"],
                                   "model_state": state["model_state"]})


def assert_same(got, want, atol=1e-5, rtol=1e-5):
  flat = dict(jax.tree_util.tree_flatten_with_path(want)[0])
  got = jax.tree_util.tree_flatten_with_path(got)[0]
  assert len(got) == len(flat)
  for path, value in got:
    np.testing.assert_allclose(value, flat[path], atol=atol, rtol=rtol,
                               err_msg=jax.tree_util.keystr(path))


def stop_after_first_checkpoint(workdir):
  """The state of a run killed after its step-3 checkpoint: later files removed."""
  shutil.rmtree(os.path.join(workdir, "checkpoints", str(STEPS)))
  shutil.rmtree(os.path.join(workdir, "model"))
  os.remove(os.path.join(workdir, "result.json"))


@pytest.fixture(scope="module")
def single(data_dir, teacher_dir, tmp_path_factory):
  """The reference: this (test) process with its 8 devices, through the same loop."""
  workdir = str(tmp_path_factory.mktemp("mh") / "one")
  loop.train_and_evaluate(tiny("at", data_dir, **{
      "teachers.teacher.checkpoint": teacher_dir, "num_steps": STEPS,
      "optim.schedule": "constant", "progress_bar": False}), workdir)
  return final_params(workdir)


def test_two_processes_match_one_and_resume(data_dir, teacher_dir, tmp_path_factory, single):
  """Two launches: 2 processes under jit from scratch (a collective save at steps 3 and 6);
  then, from its step-3 checkpoint, 1 process of 8 devices under pmap (resume 2 -> 1, and
  across modes). Each ends with the single-process parameters."""
  workdir = str(tmp_path_factory.mktemp("mh_two") / "two")
  launch(workdir, data_dir, teacher_dir, 2, 4)
  assert_same(final_params(workdir), single)
  # Process 0 alone writes the logs and results; the export is whole.
  assert os.path.exists(os.path.join(workdir, "result.json"))
  assert os.path.exists(os.path.join(workdir, "model", "model.json"))
  stop_after_first_checkpoint(workdir)
  launch(workdir, data_dir, teacher_dir, 1, 8, "--config.parallel.mode=pmap")
  assert_same(final_params(workdir), single)


def test_a_dead_peer_ends_the_run_with_a_message(data_dir, teacher_dir, tmp_path):
  """Process 1 is killed mid-run: process 0 stops with an error within the heartbeat timeout
  (20 s here) instead of waiting forever in a collective."""
  import time

  workdir = str(tmp_path / "run")
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
         "DISTILL_JAX_CPU_FLAGS": "0",
         "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
  port = free_port()
  procs = [subprocess.Popen(
      [sys.executable, "-m", "distill_jax.main", f"--config={DIGITS}:kd,tiny",
       f"--workdir={workdir}", f"--config.data.data_dir={data_dir}",
       f"--config.teachers.teacher.checkpoint={teacher_dir}", "--config.num_steps=100000",
       f"--config.parallel.coordinator=127.0.0.1:{port}", "--config.parallel.num_processes=2",
       f"--config.parallel.process_id={i}", "--config.parallel.heartbeat_timeout_seconds=20"],
      env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
      stderr=open(os.path.join(str(tmp_path), f"{i}.log"), "w")) for i in range(2)]
  try:
    deadline = time.time() + 240
    while not os.path.exists(os.path.join(workdir, "checkpoints", "3")):
      assert time.time() < deadline and all(p.poll() is None for p in procs)
      time.sleep(1)
    procs[1].kill()
    start = time.time()
    code = procs[0].wait(timeout=120)
    assert code != 0
    assert time.time() - start < 120
    err = open(os.path.join(str(tmp_path), "0.log")).read()
    assert any(word in err.lower() for word in ("heartbeat", "task", "unavailable", "peer")), \
        err[-2000:]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
