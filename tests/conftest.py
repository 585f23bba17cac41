"""Test set-up: 8 fake CPU devices, so pmap and meshes have something to split over.

XLA reads the flag when jax initialises its backend, so it is set here, before any
test module imports jax.
"""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
  """A TFDS data_dir shared by the whole session (the embedded sets build there once)."""
  return str(tmp_path_factory.mktemp("tfds"))


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIGITS = os.path.join(ROOT, "configs", "digits.py")


def tiny(role, data_dir, **overrides):
  """configs/digits.py:ROLE,tiny on the session's data_dir, with dotted-key overrides."""
  from distill_jax.config import load_config_file

  return load_config_file(f"{DIGITS}:{role},tiny", {"data.data_dir": data_dir, **overrides})


@pytest.fixture(scope="session")
def teacher_dir(data_dir, tmp_path_factory):
  """A small CNN teacher (configs/digits.py:teacher) trained briefly through the same entry
  point as any run; shared by every test that distills."""
  from distill_jax.train import loop

  workdir = str(tmp_path_factory.mktemp("teacher"))
  loop.train_and_evaluate(tiny("teacher", data_dir, num_steps=40), workdir)
  return workdir


@pytest.fixture(scope="session")
def lm_teacher(data_dir, tmp_path_factory):
  """configs/lm.py:teacher,tiny for 40 steps through the CLI, evaluated every 10 steps: the
  language-model teacher shared by every test that needs a trained one."""
  workdir = tmp_path_factory.mktemp("lm") / "teacher"
  steps_per_epoch = 13559 // 16  # Packed train rows at seq_len 32 // batch size.
  run_cli([f"--config={os.path.join(ROOT, 'configs', 'lm.py')}:teacher,tiny",
           f"--workdir={workdir}", f"--config.data.data_dir={data_dir}", "--config.num_steps=40",
           f"--config.eval_every_epochs={10.4 / steps_per_epoch}"])
  return str(workdir)


def untrained_teacher(directory, hidden=(16,), seed=3):
  """Exports an untrained MLP as a teacher checkpoint in `directory` (a second teacher whose
  predictions differ from the trained CNN's, at no training cost); returns its teachers entry."""
  import jax
  import numpy as np

  from distill_jax.common.model_io import export_model
  from distill_jax.models import build_model

  module = build_model("mlp", 10, hidden=hidden)
  variables = module.init(jax.random.PRNGKey(seed), np.zeros((1, 8, 8, 1)), train=False)
  export_model(str(directory), variables, {"model": "mlp", "kwargs": {"hidden": hidden},
                                           "num_classes": 10, "step": 0})
  return {"model": "mlp", "kwargs": {"hidden": hidden}, "checkpoint": str(directory),
          "cache": None, "input_size": None}


def run_steps(config, num_steps):
  """`num_steps` train steps through the compiled step of `config`'s parallel mode; returns the
  host state and the last step's metrics."""
  import jax

  from distill_jax import data as data_lib
  from distill_jax.train.build import build_run, init_state

  run = build_run(config)
  parallel = run.parallel
  state = parallel.put_replicated(init_state(config, run))
  teacher_vars = parallel.put_replicated(run.teacher_vars)
  batches = data_lib.train_iterator(config.data, global_batch_size=config.batch_size,
                                    seed=config.seed, side_data=run.side_data["train"])
  for _ in range(num_steps):
    state, metrics = run.train_step(state, teacher_vars, parallel.put_batch(next(batches)))
  return jax.device_get(parallel.get(state)), jax.device_get(parallel.get(metrics))


def cli_env(*paths):
  """The environment of a CLI subprocess that must run this checkout: the repository root
  first on PYTHONPATH (then `paths`, e.g. a folder with the user's modules, then what was
  there; all before anything installed), one CPU device, and the default XLA:CPU flags off
  (`DISTILL_JAX_CPU_FLAGS=0`) so numbers match in-process runs."""
  path = [ROOT, *map(str, paths), *filter(None, os.environ.get("PYTHONPATH", "").split(
      os.pathsep))]
  return {**os.environ, "XLA_FLAGS": "", "DISTILL_JAX_CPU_FLAGS": "0",
          "PYTHONPATH": os.pathsep.join(path)}


def assert_runs_checkout(proc_output):
  """Fails unless the CLI's first log line (`distill_jax VERSION from DIR`, written by
  `distill_jax.main`) names this checkout's package directory: the subprocess imported the
  tree under test, not another installed copy."""
  import re

  found = re.findall(r"distill_jax \S+ from (\S+)", proc_output)
  want = os.path.join(ROOT, "distill_jax")
  assert found, f"The CLI did not log where distill_jax came from:\n{proc_output[-2000:]}"
  assert all(os.path.realpath(d) == os.path.realpath(want) for d in found), (
      f"The CLI ran distill_jax from {found}, not from the checkout under test ({want}).")


def run_cli(args, *, cwd=ROOT, env=None, timeout=600, check=True, program=None):
  """`python -m distill_jax.main ARGS` (or `program ARGS`, e.g. the `distill-jax` console
  script) in a subprocess that runs this checkout (`cli_env`), asserting so from its log
  (`assert_runs_checkout`); with `check`, fails the test with the run's stderr if it does not
  exit 0. The absl sub-commands (`models`, `losses`, `plot`) log where distill_jax came from
  only at --verbosity=1 (their output is theirs alone), so that flag is added for them; `audit`
  and the other argparse commands print it themselves."""
  import subprocess
  import sys

  program = program or [sys.executable, "-m", "distill_jax.main"]
  args = [*map(str, args)]
  if args[:1] in (["models"], ["losses"], ["plot"]):
    args.append("--verbosity=1")
  proc = subprocess.run([*program, *args],
                        capture_output=True, text=True, env=env or cli_env(), cwd=cwd,
                        timeout=timeout)
  if check:
    assert proc.returncode == 0, proc.stderr[-3000:]
  assert_runs_checkout(proc.stderr)
  return proc


def run_digits_cli(arg, workdir, data_dir, teacher_dir, *flags, timeout=600):
  """`distill-jax --config=configs/digits.py:ARG` in a subprocess on one CPU device, distilling
  from `teacher_dir` (`run_cli`: this checkout, asserted; exit 0)."""
  return run_cli([f"--config={DIGITS}:{arg}", f"--workdir={workdir}",
                  f"--config.data.data_dir={data_dir}",
                  f"--config.teachers.teacher.checkpoint={teacher_dir}", *flags], timeout=timeout)
