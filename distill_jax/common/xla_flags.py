"""XLA:CPU defaults, applied when distill_jax is imported (before JAX picks its backend).

XLA reads `XLA_FLAGS` once, when JAX initialises its first backend, so the flags can only be
set before that: at the import of `distill_jax` (this module) or, for the per-run
`parallel.cpu_devices`, by the CLI right after it parses the config (`set_cpu_devices`).
When the backend is already initialised (e.g. the user ran JAX before importing distill_jax)
nothing is changed, and a flag that could not be applied is reported by `set_cpu_devices`.

- `CPU_CONV_FLAGS` put XLA:CPU's convolutions on Eigen instead of YNNPACK/XNNPACK, measured
  ~1.2-1.3x faster for the forward and ~1.1x for a train step of the CIFAR ResNets on a 2-core
  CPU (scripts/benchmark.py). They are added only when `XLA_FLAGS` is unset or empty (a user's
  own flags always win) and `DISTILL_JAX_CPU_FLAGS` is not '0'. They name XLA:CPU options only,
  so on a GPU or TPU host they change nothing but host-side computations.
"""

from __future__ import annotations

import os

CPU_CONV_FLAGS = ("--xla_cpu_experimental_ynn_fusion_type=-individual_convolution "
                  "--xla_cpu_use_xnnpack=false")
OPT_OUT = "DISTILL_JAX_CPU_FLAGS"
_DEVICE_COUNT = "--xla_force_host_platform_device_count"


def backend_initialised() -> bool:
  """True once JAX has created a backend (XLA_FLAGS are then fixed for this process)."""
  import sys

  if "jax" not in sys.modules:
    return False
  try:
    from jax._src import xla_bridge
    return bool(xla_bridge.backends_are_initialized())
  except (ImportError, AttributeError):  # A JAX without it: assume the worst.
    return True


def apply_cpu_defaults() -> bool:
  """Adds `CPU_CONV_FLAGS` to an unset or empty `XLA_FLAGS` (see the module docstring).
  Returns True when it did."""
  if os.environ.get(OPT_OUT, "1") == "0" or os.environ.get("XLA_FLAGS", "").strip():
    return False
  if backend_initialised():
    return False
  os.environ["XLA_FLAGS"] = CPU_CONV_FLAGS
  return True


def set_cpu_devices(count: int) -> None:
  """Splits the host CPU into `count` XLA devices (`parallel.cpu_devices`; 0: leave as is).

  Raises RuntimeError when JAX's backend is already initialised with another number of CPU
  devices: the split must be set before (the same number again, e.g. a second run in one
  Python session, is fine).
  """
  if not count:
    return
  if backend_initialised():
    import jax

    if len(jax.devices("cpu")) == count:
      return
    raise RuntimeError(f"config.parallel.cpu_devices={count} must be applied before JAX starts "
                       "its backend; run through the CLI, or set XLA_FLAGS="
                       f"{_DEVICE_COUNT}={count} before starting Python.")
  flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith(_DEVICE_COUNT)]
  os.environ["XLA_FLAGS"] = " ".join([*flags, f"{_DEVICE_COUNT}={count}"])
