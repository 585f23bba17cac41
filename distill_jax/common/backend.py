"""Which backend and devices a run found, and the refusal when it asked for accelerators.

A run's first log line and `result.json`'s "environment" say what JAX runs on
(`environment`, `describe`). Three things ask for accelerators, and a run that finds only the
CPU stops on them with one line naming what asked, what was found and the fix
(`cpu_refusal`), unless `config.allow_cpu` is True:

- `config.parallel.backend='gpu'` or `'tpu'` (a config written for that hardware);
- a launcher that reserved GPUs for the process: `GPUS_ENV` in its environment (the Slurm
  launcher's `--gpus_per_task` exports it in the batch script), or Slurm's own
  `SLURM_GPUS_PER_TASK` (a user's sbatch with `--gpus-per-task`) or `SLURM_GPUS_ON_NODE` (any
  GPU allocation: `--gres=gpu:N`, `--gpus`), since a CPU-only jaxlib on a GPU node would
  otherwise train on the node's CPU without a word;
- `config.parallel.mesh` (its fixed axes) or `parallel.num_devices` larger than the devices
  found, on a CPU with no `parallel.cpu_devices` split asked for.

A leaf: it imports JAX and nothing of distill_jax but the other leaves. It is called after
`parallel.initialize_distributed` (the device count is then the whole run's), by `api.train`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from distill_jax.common.layout import mesh_sizes
from distill_jax.common.rules import ConfigError

BACKENDS = ("", "gpu", "tpu")  # config.parallel.backend: '' takes whatever JAX finds.
GPUS_ENV = "DISTILL_JAX_GPUS_PER_TASK"  # GPUs a launcher reserved per process (> 0: asked).
# Where a launcher says it reserved GPUs, in the order read: ours, then Slurm's own (a count
# per task, '2' or typed 'a100:2', several types comma-separated; the GPUs of the node's step).
GPU_ENVS = (GPUS_ENV, "SLURM_GPUS_PER_TASK", "SLURM_GPUS_ON_NODE")
INSTALL = {"gpu": "pip install -e '.[cuda12]'", "tpu": "pip install -e '.[tpu]'"}
README = "README's 'GPU and TPU machines'"


def environment() -> dict[str, Any]:
  """What this process runs on: {'jax', 'jaxlib' (versions), 'backend' ('cpu', 'gpu', 'tpu'),
  'devices' (all processes'), 'local_devices', 'device_kind' (e.g. 'cpu', 'NVIDIA H100 80GB
  HBM3'), 'processes'}. Starts JAX's backend if nothing has yet."""
  import jax
  import jaxlib

  devices = jax.devices()
  return {"jax": jax.__version__, "jaxlib": jaxlib.__version__,
          "backend": jax.default_backend(), "devices": len(devices),
          "local_devices": jax.local_device_count(), "device_kind": devices[0].device_kind,
          "processes": jax.process_count()}


def describe(env: Mapping[str, Any]) -> str:
  """One line: 'jax 0.10.2 on cpu: 8 devices (1 process)', 'jax 0.10.2 on gpu: 8 x NVIDIA
  H100 80GB HBM3 (2 processes)'."""
  n, processes = env["devices"], env["processes"]
  devices = (f"{n} device{'s' * (n != 1)}" if env["backend"] == "cpu"
             else f"{n} x {env['device_kind']}")
  return (f"jax {env['jax']} on {env['backend']}: {devices} "
          f"({processes} process{'es' * (processes != 1)})")


def check_backend_setting(backend: object) -> None:
  """Raises ConfigError unless `config.parallel.backend` is one of `BACKENDS`."""
  if backend not in BACKENDS:
    raise ConfigError(f"config.parallel.backend is {backend!r}; choose one of "
                      f"{list(BACKENDS)} ('': whatever JAX finds).")


def _gpu_count(name: str, value: str) -> int:
  """The GPUs `value` of variable `name` counts: 'N', 'TYPE:N' or a comma-separated list of
  them (summed); '' is 0. Raises ConfigError naming the variable otherwise."""
  try:
    count = sum(int(item.rsplit(":", 1)[-1]) for item in value.split(",")) if value else 0
  except ValueError:
    count = -1
  if count < 0:
    raise ConfigError(f"{name}={value!r} in the environment; give a number of GPUs "
                      "(0 or more; Slurm's may be typed, 'a100:2') or leave it unset.")
  return count


def gpus_requested(environ: Mapping[str, str]) -> tuple[int, str]:
  """The GPUs per process a launcher reserved and the variable that says so: the first of
  `GPU_ENVS` set to more than 0, else (0, '')."""
  for name in GPU_ENVS:
    count = _gpu_count(name, environ.get(name, "").strip())
    if count:
      return count, name
  return 0, ""


def devices_requested(parallel: Mapping[str, Any]) -> tuple[int, str]:
  """The devices `config.parallel` needs at least, and the setting that says so: the product of
  the mesh's fixed axes (a -1 axis takes any count) or `num_devices`, the larger."""
  mesh = dict(parallel.get("mesh", None) or {})
  fixed = math.prod(size for size in mesh_sizes(mesh).values() if size != -1)
  num_devices = int(parallel.get("num_devices", 0) or 0)
  if num_devices > fixed:
    return num_devices, f"config.parallel.num_devices={num_devices}"
  return fixed, f"config.parallel.mesh {mesh}"


def cpu_refusal(env: Mapping[str, Any], parallel: Mapping[str, Any],
                environ: Mapping[str, str]) -> str | None:
  """Why a run on `env` (`environment()`) must not start, in one line, or None.

  `parallel`: `config.parallel` (backend, mesh, num_devices, cpu_devices); `environ`: the
  process's environment (`GPU_ENVS`). The caller skips this with `config.allow_cpu`.
  Raises ConfigError for a `parallel.backend` or a `GPU_ENVS` value that names no choice.
  """
  backend = parallel.get("backend", "") or ""
  check_backend_setting(backend)
  gpus, variable = gpus_requested(environ)
  found = env["backend"]
  anyway = "or pass --config.allow_cpu=True to run on the CPU anyway"
  if backend and found != backend:
    where = "only the CPU" if found == "cpu" else found
    return (f"config.parallel.backend={backend!r} asks for a {backend.upper()}, but JAX found "
            f"{where} ({describe(env)}): install JAX's {backend.upper()} build "
            f"({INSTALL[backend]}; {README})"
            + (f", {anyway}." if found == "cpu" else "."))
  if found != "cpu":
    return None
  if gpus:
    how = {GPUS_ENV: "e.g. the slurm launcher's --gpus_per_task",
           "SLURM_GPUS_PER_TASK": "sbatch/srun --gpus-per-task",
           "SLURM_GPUS_ON_NODE": "Slurm allocated GPUs on this node"}[variable]
    return (f"The launcher reserved {gpus} GPU{'s' * (gpus != 1)} for this process ({variable}="
            f"{environ[variable].strip()}, {how}), but JAX found only the CPU "
            f"({describe(env)}; a CPU-only jaxlib?): install JAX's CUDA build "
            f"({INSTALL['gpu']}; {README}) in the environment the jobs run, {anyway}.")
  wanted, setting = devices_requested(parallel)
  if wanted > env["devices"] and not int(parallel.get("cpu_devices", 0) or 0):
    return (f"{setting} asks for {wanted} devices, but JAX found only the CPU ({describe(env)}): "
            f"install JAX's CUDA or TPU build ({INSTALL['gpu']} or '.[tpu]'; {README}), or "
            f"split this CPU into {wanted} devices with --config.parallel.cpu_devices={wanted}.")
  return None
