"""Accelerator installs and the CPU refusal (common/backend.py).

- setup.cfg's `cuda12`, `cuda13` and `tpu` extras are JAX's own extras at the jax version
  requirements.lock pins (read with setuptools' config reader; nothing is installed).
- The backend line and result.json's "environment" name what JAX found (here: 8 forced CPU
  devices, one process), checked against JAX's own calls.
- A config or launcher that asked for accelerators on this CPU-only machine is refused with one
  line naming what asked, what was found and the fix: `parallel.backend='gpu'`, a mesh larger
  than the host, a Slurm batch script of `--gpus_per_task=1` (run with bash, no Slurm needed);
  `allow_cpu=True` trains anyway. (The CLI's one-line `Error:` for the first two is in
  tests/test_cli.py's table.)
"""

import json
import logging
import os
import re
import subprocess
from argparse import ArgumentParser
from importlib import metadata

import jax
import pytest
from conftest import DIGITS, ROOT, tiny
from packaging.requirements import Requirement
from setuptools.config.setupcfg import read_configuration

from distill_jax.common import backend
from distill_jax.common.rules import ConfigError

GPU_ENV = {"jax": "0.10.2", "jaxlib": "0.10.2", "backend": "gpu", "devices": 8,
           "local_devices": 4, "device_kind": "NVIDIA H100 80GB HBM3", "processes": 2}


def _locked(name):
  """The version requirements.lock pins for `name`."""
  text = open(os.path.join(ROOT, "requirements.lock")).read()
  return re.search(rf"^{re.escape(name)}==(\S+) ", text, re.M).group(1)


def test_accelerator_extras_are_jaxs_own_at_the_locked_version():
  extras = read_configuration(os.path.join(ROOT, "setup.cfg"))["options"]["extras_require"]
  jax_extras = set(metadata.metadata("jax").get_all("Provides-Extra"))
  version = _locked("jax")
  assert _locked("jaxlib") == version == jax.__version__
  for extra in ("cuda12", "cuda13", "tpu"):
    (requirement,) = map(Requirement, extras[extra])
    assert (requirement.name, requirement.extras) == ("jax", {extra})
    assert str(requirement.specifier) == f"=={version}"
    assert extra in jax_extras  # The installed jax (the lock's) offers that extra.


def test_the_backend_line_names_backend_devices_and_processes():
  env = backend.environment()
  assert env == {"jax": jax.__version__, "jaxlib": metadata.version("jaxlib"),
                 "backend": "cpu", "devices": 8, "local_devices": 8, "device_kind": "cpu",
                 "processes": 1}
  assert backend.describe(env) == f"jax {jax.__version__} on cpu: 8 devices (1 process)"
  assert backend.describe({**env, "devices": 1}).endswith("on cpu: 1 device (1 process)")
  assert (backend.describe(GPU_ENV)
          == "jax 0.10.2 on gpu: 8 x NVIDIA H100 80GB HBM3 (2 processes)")


FIX_GPU = "install JAX's GPU build (pip install -e '.[cuda12]'; README's 'GPU and TPU machines')"
ANYWAY = "or pass --config.allow_cpu=True to run on the CPU anyway."
FOUND = f"JAX found only the CPU (jax {jax.__version__} on cpu: 8 devices (1 process)"


@pytest.mark.parametrize("parallel, environ, want", [
    ({"backend": "gpu"}, {}, f"config.parallel.backend='gpu' asks for a GPU, but {FOUND}): "
                             f"{FIX_GPU}, {ANYWAY}"),
    ({"backend": "tpu"}, {}, f"config.parallel.backend='tpu' asks for a TPU, but {FOUND}): "
                             "install JAX's TPU build (pip install -e '.[tpu]'; README's "
                             f"'GPU and TPU machines'), {ANYWAY}"),
    ({}, {backend.GPUS_ENV: "2"},
     f"The launcher reserved 2 GPUs for this process ({backend.GPUS_ENV}=2, e.g. the slurm "
     f"launcher's --gpus_per_task), but {FOUND}; a CPU-only jaxlib?): install JAX's CUDA build "
     "(pip install -e '.[cuda12]'; README's 'GPU and TPU machines') in the environment the "
     f"jobs run, {ANYWAY}"),
    # Slurm's own variables (a user's sbatch): a typed count, several types summed, the node's.
    ({}, {"SLURM_GPUS_PER_TASK": "a100:2"},
     "The launcher reserved 2 GPUs for this process (SLURM_GPUS_PER_TASK=a100:2, sbatch/srun "
     f"--gpus-per-task), but {FOUND}; a CPU-only jaxlib?)"),
    ({}, {"SLURM_GPUS_PER_TASK": "a100:1,v100:2"}, "The launcher reserved 3 GPUs for this "
                                                   "process (SLURM_GPUS_PER_TASK=a100:1,v100:2"),
    ({}, {"SLURM_GPUS_ON_NODE": "1"},
     "The launcher reserved 1 GPU for this process (SLURM_GPUS_ON_NODE=1, Slurm allocated GPUs "
     "on this node)"),
    # Ours first; a 0 there does not hide Slurm's.
    ({}, {backend.GPUS_ENV: "4", "SLURM_GPUS_ON_NODE": "8"},
     f"The launcher reserved 4 GPUs for this process ({backend.GPUS_ENV}=4"),
    ({}, {backend.GPUS_ENV: "0", "SLURM_GPUS_PER_TASK": "2"},
     "The launcher reserved 2 GPUs for this process (SLURM_GPUS_PER_TASK=2"),
    ({"mesh": {"data": 4, "fsdp": 4}}, {},
     f"config.parallel.mesh {{'data': 4, 'fsdp': 4}} asks for 16 devices, but {FOUND}): install "
     "JAX's CUDA or TPU build (pip install -e '.[cuda12]' or '.[tpu]'; README's 'GPU and TPU "
     "machines'), or split this CPU into 16 devices with --config.parallel.cpu_devices=16."),
    ({"mesh": {"data": -1, "fsdp": 16}}, {}, "config.parallel.mesh {'data': -1, 'fsdp': 16} "
                                             "asks for 16 devices"),
    ({"num_devices": 12, "mesh": {"data": -1}}, {}, "config.parallel.num_devices=12 asks for 12"),
    # Nothing asked for more than the CPU has, or the CPU split was asked for: no refusal.
    ({}, {}, None),
    ({"mesh": {"data": -1, "fsdp": 2}, "num_devices": 8}, {backend.GPUS_ENV: "0"}, None),
    ({"mesh": {"data": 4, "fsdp": 4}, "cpu_devices": 16}, {backend.GPUS_ENV: ""}, None),
    ({}, {"SLURM_GPUS_PER_TASK": "0", "SLURM_GPUS_ON_NODE": "0", "SLURM_JOB_ID": "7"}, None),
])
def test_what_asked_for_accelerators_on_a_cpu_is_refused(parallel, environ, want):
  got = backend.cpu_refusal(backend.environment(), parallel, environ)
  if want is None:
    assert got is None
  else:
    assert got is not None and "\n" not in got
    assert got.startswith(want), got


def test_on_an_accelerator_only_a_different_backend_is_refused():
  assert backend.cpu_refusal(GPU_ENV, {"backend": "gpu", "mesh": {"data": 8}},
                             {backend.GPUS_ENV: "1"}) is None
  assert backend.cpu_refusal(GPU_ENV, {"mesh": {"data": 16}}, {}) is None  # Parallel's to say.
  assert backend.cpu_refusal(GPU_ENV, {"backend": "tpu"}, {}) == (
      "config.parallel.backend='tpu' asks for a TPU, but JAX found gpu (jax 0.10.2 on gpu: 8 x "
      "NVIDIA H100 80GB HBM3 (2 processes)): install JAX's TPU build (pip install -e '.[tpu]'; "
      "README's 'GPU and TPU machines').")


@pytest.mark.parametrize("parallel, environ, message", [
    ({"backend": "cuda"}, {}, r"config.parallel.backend is 'cuda'; choose one of \['', 'gpu', "),
    ({}, {backend.GPUS_ENV: "two"}, "DISTILL_JAX_GPUS_PER_TASK='two' in the environment"),
    ({}, {"SLURM_GPUS_PER_TASK": "a100:"}, "SLURM_GPUS_PER_TASK='a100:' in the environment; "
                                           "give a number of GPUs"),
])
def test_bad_backend_settings_are_named(parallel, environ, message):
  with pytest.raises(ConfigError, match=message):
    backend.cpu_refusal(backend.environment(), parallel, environ)


def test_validate_names_a_bad_backend(data_dir):
  from distill_jax import config as config_lib

  with pytest.raises(ConfigError, match="config.parallel.backend is 'GPU'"):
    config_lib.validate(tiny("teacher", data_dir, **{"parallel.backend": "GPU"}))


def test_gpu_config_on_the_cpu_stops_and_allow_cpu_trains(tmp_path, data_dir, caplog):
  """`api.train` refuses before the workdir exists; with allow_cpu it trains, logs the backend
  line first and records the environment in result.json."""
  from distill_jax import api
  from distill_jax.data import embedded

  embedded.ensure_embedded("digits", data_dir)  # Built here, so the run logs no build first.
  config = tiny("teacher", data_dir, num_steps=2, **{"parallel.backend": "gpu"})
  workdir = str(tmp_path / "run")
  with pytest.raises(ConfigError, match=re.escape(f"asks for a GPU, but {FOUND}")):
    api.train(config, workdir)
  assert not os.path.exists(workdir)
  config.allow_cpu = True
  with caplog.at_level(logging.INFO):
    result = api.train(config, workdir)
  ours = [r.getMessage() for r in caplog.records if "distill_jax" in r.pathname]
  assert ours[0] == f"jax {jax.__version__} on cpu: 8 devices (1 process)", ours[:3]
  assert result["steps"] == 2
  assert result["environment"] == backend.environment()
  assert json.load(open(os.path.join(workdir, "result.json")))["environment"] == (
      backend.environment())


def test_users_own_sbatch_gpus_stop_the_run(tmp_path, data_dir, monkeypatch):
  """A user's sbatch with `--gpus-per-task` (no launcher of ours): Slurm's own variable in the
  process's environment stops `api.train` before the workdir exists."""
  from distill_jax import api

  monkeypatch.delenv(backend.GPUS_ENV, raising=False)
  monkeypatch.setenv("SLURM_GPUS_PER_TASK", "2")
  workdir = str(tmp_path / "run")
  with pytest.raises(ConfigError, match=re.escape(
      "The launcher reserved 2 GPUs for this process (SLURM_GPUS_PER_TASK=2, sbatch/srun "
      f"--gpus-per-task), but {FOUND}")):
    api.train(tiny("teacher", data_dir, num_steps=2), workdir)
  assert not os.path.exists(workdir)


def test_slurm_trial_that_asked_for_gpus_stops_on_the_cpu(tmp_path, data_dir):
  """The batch script of `--gpus_per_task=1` exports the request; run with bash as Slurm would
  (array task 0), the trial's CLI run finds the CPU and fails with one line, recorded."""
  from distill_jax.sweep import state
  from distill_jax.sweep.slurm import SlurmLauncher, batch_script
  from distill_jax.sweep.spec import Trial

  root = str(tmp_path / "sweep")
  trial = Trial("teacher", "teachers", f"{DIGITS}:teacher,tiny", {}, {},
                (f"--config.data.data_dir={data_dir}",), ())
  state.write_trials(root, "spec.py", [trial])
  parser = ArgumentParser()
  SlurmLauncher.add_flags(parser)
  script = batch_script(root, "teachers", 1, parser.parse_args(["--gpus_per_task=1"]))
  assert "#SBATCH --gpus-per-task=1\n" in script
  assert f"\nexport {backend.GPUS_ENV}=1\n" in script
  assert backend.GPUS_ENV not in batch_script(root, "teachers", 1, parser.parse_args([]))
  path = tmp_path / "teachers.sbatch"
  path.write_text(script)
  env = {**os.environ, "SLURM_ARRAY_TASK_ID": "0", "XLA_FLAGS": "", "DISTILL_JAX_CPU_FLAGS": "0"}
  proc = subprocess.run(["bash", str(path)], capture_output=True, text=True, env=env, cwd=ROOT,
                        timeout=300)
  assert proc.returncode == 2, proc.stdout + proc.stderr
  record = state.read_record(root, "teacher")
  assert (record["state"], record["exit_code"]) == ("failed", 2)
  last = open(state.log_path(root, "teacher")).read().strip().splitlines()[-1]
  assert last.startswith(
      f"Error: The launcher reserved 1 GPU for this process ({backend.GPUS_ENV}=1, e.g. the "
      f"slurm launcher's --gpus_per_task), but JAX found only the CPU (jax {jax.__version__} on "
      "cpu: 1 device (1 process); a CPU-only jaxlib?)"), last
  assert not os.path.exists(os.path.join(root, "teacher", "checkpoints"))


def test_resuming_with_allow_cpu_or_a_backend_is_no_config_change(data_dir):
  """Where a run runs is not what it trains: a checkpoint saved before these settings existed
  (or with other values) resumes without `allow_config_change`."""
  from distill_jax.config import to_json
  from distill_jax.train.loop import config_changes

  config = tiny("teacher", data_dir)
  old = json.loads(to_json(config))
  del old["allow_cpu"], old["parallel"]["backend"]  # An older checkpoint's config.
  config.allow_cpu, config.parallel.backend = True, "gpu"
  assert config_changes(json.dumps(old), to_json(config)) == []
  config.optim.lr = 0.5  # A real change is still named beside them.
  assert config_changes(json.dumps(old), to_json(config)) == [
      f"optim.lr: {old['optim']['lr']!r} -> 0.5"]
