"""The device layout's vocabulary and its rules: what `config.parallel` may say.

A leaf module, shared by the config's validation (`config.py`) and the layer that builds the
layout (`train/parallel.py`), so the config never imports training code. The mesh's rules live
here once: `check_layout` (what can be checked without devices, called by `validate`) and
`resolve_mesh` (the sizes against the devices in use, called by `Parallel`).

Three mesh axes, in mesh order: `data` and `fsdp` split the batch; `fsdp` also splits the state
arrays (the FSDP rule); `tensor` splits the arrays a model's tensor-parallel rules name (Megatron
style, declared beside the model: `models.transformer.TENSOR_RULES`) and holds whole batch rows.
`tensor` is last, so a tensor group is neighbouring devices (one host's, on GPUs its NVLink).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping

from distill_jax.common.rules import ConfigError

MODES = ("jit", "pmap")  # parallel.mode
MESH_AXES = ("data", "fsdp", "tensor")  # parallel.mesh's axes, in mesh order
BATCH_AXES = ("data", "fsdp")  # The batch is split over both (every tensor group sees whole rows).
MODEL_AXES = ("fsdp", "tensor")  # What pmap cannot split: it is data parallel only.
TEACHER_SHARDINGS = ("fsdp", "replicated")  # parallel.teacher_sharding
DEFAULT_MIN_SHARD_SIZE = 4096  # Elements: a 3x3x32x16 conv kernel and up are split over fsdp.


def mesh_sizes(mesh: Mapping[str, int] | None) -> dict[str, int]:
  """`parallel.mesh` with every axis present ('data' -1, the others 1 by default), -1 kept.

  Raises ConfigError naming the setting when an axis is unknown, a size is not a positive
  integer or -1, or more than one axis is -1.
  """
  given = dict(mesh or {})
  unknown = sorted(set(given) - set(MESH_AXES))
  if unknown:
    raise ConfigError(f"config.parallel.mesh has unknown axes {unknown}; the axes are "
                      f"{list(MESH_AXES)}, e.g. {{'data': -1, 'fsdp': 2}}.")
  sizes = {axis: given.get(axis, -1 if axis == "data" else 1) for axis in MESH_AXES}
  for axis, size in sizes.items():
    if not _is_int(size) or (size < 1 and size != -1):
      raise ConfigError(f"config.parallel.mesh.{axis} is {size!r}; give a positive integer "
                        "or -1 (the devices the other axes leave).")
  free = [axis for axis, size in sizes.items() if size == -1]
  if len(free) > 1:
    raise ConfigError(f"config.parallel.mesh: only one axis may be -1, got {free}.")
  return sizes


def check_layout(mode: str, mesh: Mapping[str, int] | None,
                 teacher_sharding: str = "replicated") -> dict[str, int]:
  """Checks the layout settings that need no devices; returns `mesh_sizes(mesh)`.

  Raises ConfigError for an unknown mode or teacher sharding, a bad mesh (`mesh_sizes`), or a
  pmap layout whose mesh gives 'fsdp' or 'tensor' anything but 1 (pmap is data parallel only).
  """
  if mode not in MODES:
    raise ConfigError(f"config.parallel.mode is {mode!r}; choose one of {list(MODES)}.")
  sizes = mesh_sizes(mesh)
  if teacher_sharding not in TEACHER_SHARDINGS:
    raise ConfigError(f"config.parallel.teacher_sharding is {teacher_sharding!r}; choose "
                      f"one of {list(TEACHER_SHARDINGS)}.")
  split = [axis for axis in MODEL_AXES if sizes[axis] != 1]
  if mode == "pmap" and split:
    raise ConfigError(f"config.parallel.mesh {dict(mesh or {})}: pmap is data parallel only; "
                      f"use parallel.mode='jit' to shard over {split} (or set "
                      f"{' and '.join(split)} to 1).")
  return sizes


def resolve_mesh(mesh: Mapping[str, int] | None, num_devices: int) -> dict[str, int]:
  """`parallel.mesh` with its -1 resolved: {'data': n, 'fsdp': m, 'tensor': t},
  n * m * t == num_devices.

  Raises ConfigError naming the setting for a bad mesh (`mesh_sizes`) or sizes that do not
  multiply to the device count.
  """
  sizes = mesh_sizes(mesh)
  given = dict(mesh or {})
  free = [axis for axis, size in sizes.items() if size == -1]
  fixed = math.prod(size for size in sizes.values() if size != -1)
  if free:
    if num_devices % fixed:
      raise ConfigError(
          f"config.parallel.mesh {given}: the fixed axes take {fixed} devices, which does "
          f"not divide the {num_devices} devices in use; choose sizes that divide it.")
    sizes[free[0]] = num_devices // fixed
  elif fixed != num_devices:
    raise ConfigError(
        f"config.parallel.mesh {given} has {fixed} devices but {num_devices} are in use; "
        "make the sizes multiply to the device count (or set one axis to -1).")
  return {axis: int(size) for axis, size in sizes.items()}


def _is_int(size: object) -> bool:
  """An integer size (Python's or NumPy's: both are `numbers.Integral`), not a bool."""
  return isinstance(size, numbers.Integral) and not isinstance(size, bool)
