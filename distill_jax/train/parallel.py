"""Compiles the one step function for the devices at hand: `jit` on a mesh, or `pmap`.

Both modes run the same `train_step` / `eval_step` body:
- 'jit': one `jax.jit` with shardings on a 3-D `Mesh(('data', 'fsdp', 'tensor'))` whose sizes
  come from `parallel.mesh` (`{'data': -1, 'fsdp': 1, 'tensor': 1}`: -1 takes the devices the
  other axes leave). The batch is split over data x fsdp (a tensor group sees whole rows).
  Every array of the train state (params, batch stats, optimizer state) is placed by two
  rules, composed in `fsdp_spec(..., tensor_dim)`:
  - tensor: the student's and teachers' models declare, beside the model, which axis of which
    parameter goes on 'tensor' (`tensor_rules(size)`, e.g. `models.transformer.TENSOR_RULES`,
    Megatron's split; `tensor_dim` matches a leaf's path against them); the optimizer's
    moments follow their parameter. `declare_models` reads
    them; a model without rules refuses a tensor axis > 1 (it would only repeat its compute).
  - FSDP (`fsdp_spec`): another dimension, the largest that the 'fsdp' size divides, is split
    over 'fsdp' when the array has at least `min_shard_size` elements; smaller arrays are not.
  The teachers' variables follow their tensor rules always, and the FSDP rule when
  `teacher_sharding='fsdp'` ('replicated': whole over 'fsdp'), so a big teacher can be split
  while a small student stays whole. XLA inserts the all-gathers and reductions; one device is
  simply a mesh of one.
- 'pmap': plain `jax.pmap` over the same devices (data parallel only) with `axis_name='batch'`;
  the step gathers the objective's inputs and averages gradients and metrics with `lax.pmean`,
  and BatchNorm reduces its statistics over the axis (models take `bn_axis_name`), so both
  modes compute the global-batch result.

The `Parallel` object owns the device layout: it puts states, teacher variables and host
batches on the devices, and gets states back for checkpoints and exports.
"""

from __future__ import annotations

import functools
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from distill_jax.common.layout import (
  BATCH_AXES,
  DEFAULT_MIN_SHARD_SIZE,
  MESH_AXES,
  check_layout,
  resolve_mesh,
)
from distill_jax.common.rules import ConfigError
from distill_jax.common.xla_flags import set_cpu_devices
from distill_jax.train import step as step_lib

PMAP_AXIS = "batch"
STUDENT = "student"  # The state's key of the student's parameters (and of their moments).

TensorRules = Sequence[tuple[str, int]]  # (path pattern, axis on 'tensor'): a model's rules.


def fsdp_spec(shape: tuple[int, ...], axis_size: int, min_size: int,
              tensor_dim: int | None = None) -> P:
  """The FSDP rule: split the largest dimension that `axis_size` divides over 'fsdp', when the
  array has at least `min_size` elements; otherwise (or when no dimension divides) replicate.

  `tensor_dim`: a dimension already split over 'tensor' (a model's tensor rule); it stays so,
  and FSDP takes another one, so an array can be split over both axes.
  """
  names: list[str | None] = [None] * len(shape)
  if tensor_dim is not None:
    names[tensor_dim] = "tensor"
  if axis_size > 1 and math.prod(shape) >= min_size:
    for dim in sorted(range(len(shape)), key=lambda d: (-shape[d], d)):
      if dim != tensor_dim and shape[dim] % axis_size == 0:
        names[dim] = "fsdp"
        break
  return P(*names) if any(names) else P()


def tensor_dim(path: str, shape: tuple[int, ...], rules: TensorRules, size: int
               ) -> int | None:
  """The dimension of the array at `path` (its '/'-joined path inside a model's variables)
  that a model's tensor rules split over 'tensor' (the first rule whose pattern matches the
  end of the path), or None (whole over 'tensor': no rule, or a tensor size of 1).

  Raises ConfigError when the rule's dimension does not split into `size`.
  """
  if size <= 1:
    return None
  for pattern, dim in rules:
    if re.fullmatch(rf"(.*/)?(?:{pattern})", path):
      if dim >= len(shape) or shape[dim] % size:
        raise ConfigError(
            f"config.parallel.mesh.tensor={size}: the tensor rule {pattern!r} splits "
            f"dimension {dim} of {path} {tuple(shape)}, which does not split into {size}; "
            "choose a tensor size that divides it.")
      return dim
  return None


def _rules_of(module: Any, size: int, what: str) -> TensorRules:
  """A model's tensor rules for a tensor axis of `size`; ConfigError when it has none or its
  sizes do not split (`what` names it: 'the student', "teacher 'NAME'")."""
  if not hasattr(module, "tensor_rules"):
    raise ConfigError(
        f"config.parallel.mesh.tensor={size}: {what} ({type(module).__name__}) declares no "
        "tensor-parallel rules (transformer_lm does), so every device of a tensor group would "
        "compute the same; set tensor to 1 and split over 'data' or 'fsdp'.")
  try:
    return tuple(module.tensor_rules(size))
  except ValueError as e:
    raise ConfigError(f"config.parallel.mesh.tensor={size} does not fit {what}: {e}") from e


def _names(path: tuple[Any, ...]) -> list[str]:
  """A pytree key path as its names (dict keys, attribute names, sequence indices)."""
  out = []
  for key in path:
    for attr in ("key", "name", "idx"):
      if hasattr(key, attr):
        out.append(str(getattr(key, attr)))
        break
  return out


def initialize_distributed(settings: Mapping[str, Any]) -> bool:
  """Joins a multi-process run (`jax.distributed.initialize`); call it before any other JAX use.

  First splits the host CPU into `cpu_devices` XLA devices when that is set (> 0; see
  `distill_jax.common.xla_flags.set_cpu_devices`), which also has to happen before JAX starts.

  From `config.parallel`: `coordinator` ('host:port' of process 0), `num_processes` and
  `process_id`; when `coordinator` is empty, from the launcher's environment (a Slurm step with
  several tasks, or whatever JAX detects itself). `init_timeout_seconds` bounds the wait for all
  processes to join; `heartbeat_timeout_seconds` how long a dead peer goes unnoticed before the
  others stop with an error (instead of waiting forever in a collective). Returns True when
  this run has several processes.
  """
  set_cpu_devices(int(settings.get("cpu_devices") or 0))
  coordinator = settings.get("coordinator") or ""
  num_processes = int(settings.get("num_processes") or 0)
  process_id = settings.get("process_id")
  process_id = -1 if process_id is None else int(process_id)
  timeouts = {"initialization_timeout": int(settings.get("init_timeout_seconds", 300)),
              "heartbeat_timeout_seconds": int(settings.get("heartbeat_timeout_seconds", 100))}
  if coordinator:
    if num_processes < 1 or not 0 <= process_id < num_processes:
      raise ConfigError(
          f"config.parallel.coordinator is {coordinator!r}: also set parallel.num_processes "
          f"(>= 1, got {num_processes}) and parallel.process_id (0..num_processes - 1, got "
          f"{process_id}), one process_id per process.")
    jax.distributed.initialize(coordinator, num_processes, process_id, **timeouts)
    return num_processes > 1
  if num_processes > 1 or process_id >= 0:
    raise ConfigError("config.parallel.num_processes/process_id need "
                      "parallel.coordinator='host:port' (the address of process 0).")
  if int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_STEP_ID" in os.environ:
    jax.distributed.initialize(**timeouts)  # JAX reads Slurm's variables itself.
    return True
  return False


def select_devices(num_devices: int) -> list[jax.Device]:
  """`num_devices` devices (0: all), the same number from every process, in process order.

  With several processes each contributes `num_devices / process_count` of its local devices,
  so every process holds a part of the mesh; a count that does not split evenly is refused.
  """
  devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
  if not num_devices:
    return devices
  processes = jax.process_count()
  if num_devices > len(devices):
    raise ConfigError(f"config.parallel.num_devices={num_devices}, but only {len(devices)} "
                      f"devices are visible ({devices[0].platform}).")
  if num_devices % processes:
    raise ConfigError(
        f"config.parallel.num_devices={num_devices} does not split over the {processes} "
        f"processes: every process must take the same number of its devices; use a multiple "
        f"of {processes} (or 0 for all).")
  per_process = num_devices // processes
  chosen = []
  for p in range(processes):
    local = [d for d in devices if d.process_index == p]
    chosen.extend(local[:per_process])
  return chosen


class Parallel:
  """Device layout and compiled steps for one run.

  Args:
    mode: 'jit' or 'pmap'.
    num_devices: devices to use (0: all).
    mesh: axis sizes, {'data': -1, 'fsdp': 1, 'tensor': 1} by default (see
      `layout.resolve_mesh`).
    min_shard_size: arrays with fewer elements stay replicated under 'fsdp'.
    teacher_sharding: 'replicated', or 'fsdp' to shard the teachers by the same rule (over
      'tensor' the teachers follow their models' rules either way).

  With a 'tensor' axis > 1, `declare_models` gives the student's and teachers' modules (their
  tensor rules) before anything is placed or compiled; until then no array is split over it.
  """

  def __init__(self, mode: str = "jit", num_devices: int = 0,
               mesh: Mapping[str, int] | None = None,
               min_shard_size: int = DEFAULT_MIN_SHARD_SIZE,
               teacher_sharding: str = "replicated"):
    check_layout(mode, mesh, teacher_sharding)
    if min_shard_size < 0:
      raise ConfigError(f"config.parallel.min_shard_size must be >= 0, got {min_shard_size}.")
    devices = select_devices(num_devices)
    self.mode = mode
    self.devices = devices
    self.axis_sizes = resolve_mesh(mesh, len(devices))
    self.min_shard_size = int(min_shard_size)
    self.teacher_sharding = teacher_sharding
    self.student_rules: TensorRules = ()  # The student's tensor rules (`declare_models`).
    self.teacher_rules: dict[str, TensorRules] = {}  # Each live teacher's.
    shape = tuple(self.axis_sizes[a] for a in MESH_AXES)
    self.mesh = Mesh(np.asarray(devices).reshape(shape), MESH_AXES)
    self.replicated = NamedSharding(self.mesh, P())
    self.data_sharded = NamedSharding(self.mesh, P(BATCH_AXES))

  @property
  def num_devices(self) -> int:
    return len(self.devices)

  @property
  def num_local_devices(self) -> int:
    return sum(d.process_index == jax.process_index() for d in self.devices)

  @property
  def bn_axis_name(self) -> str | None:
    """The axis name BatchNorm must reduce over (pmap only; jit reduces globally)."""
    return PMAP_AXIS if self.mode == "pmap" else None

  def check_batch_size(self, global_batch_size: int) -> None:
    if global_batch_size % self.num_devices:
      raise ConfigError(f"The batch size {global_batch_size} does not split evenly over "
                        f"{self.num_devices} devices; pick a multiple of {self.num_devices}.")

  # -- layouts ------------------------------------------------------------------------------

  def declare_models(self, student: Any, teachers: Mapping[str, Any]) -> None:
    """Reads the tensor rules of the student's and the live teachers' Flax modules
    (`module.tensor_rules(size)`; `models.transformer.TENSOR_RULES`) for the mesh's 'tensor'
    size ({name: module} for the teachers; student None: no student, e.g. to place a teacher
    alone). Nothing to do with a tensor size of 1.

    Raises ConfigError naming the model when the tensor size is > 1 and a model declares no
    rules (the CNNs: its every device of a tensor group would compute the same thing; use
    'fsdp' or 'data' instead) or its sizes do not split (e.g. KV heads).
    """
    size = self.axis_sizes["tensor"]
    self.student_rules, self.teacher_rules = (), {}
    if size <= 1:
      return
    self.student_rules = () if student is None else _rules_of(student, size, "the student")
    self.teacher_rules = {name: _rules_of(module, size, f"teacher {name!r}")
                          for name, module in teachers.items()}

  def sharding_for(self, shape: tuple[int, ...], fsdp: bool = True,
                   tensor: int | None = None) -> NamedSharding:
    """The sharding of one array of `shape`: dimension `tensor` (None: none) over 'tensor',
    and the FSDP rule over 'fsdp' unless `fsdp=False`."""
    fsdp_size = self.axis_sizes["fsdp"] if fsdp else 1
    spec = fsdp_spec(tuple(shape), fsdp_size, self.min_shard_size, tensor)
    return self.replicated if spec == P() else NamedSharding(self.mesh, spec)

  def _model_sharding(self, rules: TensorRules, path: list[str], x: Any, fsdp: bool
                      ) -> NamedSharding:
    """The sharding of one array of a model with `rules`, at `path` inside its variables."""
    shape = tuple(np.shape(x))
    dim = tensor_dim("/".join(path), shape, rules, self.axis_sizes["tensor"])
    return self.sharding_for(shape, fsdp, dim)

  def state_shardings(self, tree: Any) -> Any:
    """Shardings of a train state (or any pytree laid out like one): the student's tensor
    rules for the leaves under a 'student' key (its parameters and their optimizer moments),
    and the FSDP rule for every leaf."""
    def sharding(path, x):
      names = _names(path)
      if STUDENT in names:
        return self._model_sharding(self.student_rules, names[names.index(STUDENT) + 1:], x,
                                    True)
      return self.sharding_for(np.shape(x))
    return jax.tree_util.tree_map_with_path(sharding, tree)

  def teacher_shardings(self, tree: Any) -> Any:
    """Shardings of the teachers' variables ({name: variables}): each teacher's tensor rules,
    and the FSDP rule or whole over 'fsdp' (`teacher_sharding`)."""
    fsdp = self.teacher_sharding == "fsdp"
    def sharding(path, x):
      name, *rest = _names(path)
      return self._model_sharding(self.teacher_rules.get(name, ()), rest, x, fsdp)
    return jax.tree_util.tree_map_with_path(sharding, tree)

  def teacher_shardings_of(self, tree: Any, module: Any) -> Any:
    """Shardings of one teacher's variables (`tree`, {'params': ...}) for its Flax `module`:
    the module's tensor rules (read from it, as `declare_models` will) and the FSDP rule or
    whole over 'fsdp'. Open weights are read straight into these (`models.hf.load_hf`), before
    the run has declared its models, so `put_teachers` then keeps them as they are."""
    size = self.axis_sizes["tensor"]
    rules = _rules_of(module, size, "an open-weights teacher") if size > 1 else ()
    fsdp = self.teacher_sharding == "fsdp"
    return jax.tree_util.tree_map_with_path(
        lambda path, x: self._model_sharding(rules, _names(path), x, fsdp), tree)

  # -- placing data -------------------------------------------------------------------------

  def _put(self, tree: Any, shardings: Any, keep_placed: bool = False) -> Any:
    # Every process holds the same host value; each fills only its own devices' shards.
    # keep_placed: an array already placed so (open weights read straight into their shards)
    # stays as it is (never for a state, which the step donates: the caller's copy would die).
    def put(x, sharding):
      if keep_placed and isinstance(x, jax.Array) and x.sharding.is_equivalent_to(sharding,
                                                                                  x.ndim):
        return x
      x = np.asarray(jax.device_get(x))
      return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])
    return jax.tree.map(put, tree, shardings)

  def _put_stacked(self, tree: Any) -> Any:
    # One copy per device along a leading axis, sharded over a mesh axis named like the
    # pmap axis: the layout pmap's own outputs have, so the step compiles once, not twice.
    stacked = NamedSharding(Mesh(np.asarray(self.devices), (PMAP_AXIS,)), P(PMAP_AXIS))
    return jax.tree.map(lambda x: jax.device_put(
        np.broadcast_to(np.asarray(x), (self.num_devices, *np.shape(x))), stacked), tree)

  def put_state(self, tree: Any) -> Any:
    """Places a host train state: by `state_shardings` (jit) or one copy per device."""
    if self.mode == "pmap":
      return self._put_stacked(tree)
    return self._put(tree, self.state_shardings(tree))

  def put_teachers(self, tree: Any) -> Any:
    """Places the teachers' host variables by `teacher_shardings` (jit) or one copy per
    device."""
    if self.mode == "pmap":
      return self._put_stacked(tree)
    return self._put(tree, self.teacher_shardings(tree), keep_placed=True)

  def put_replicated(self, tree: Any) -> Any:
    """Places a host pytree whole on every device (the layouts above when fsdp is 1)."""
    if self.mode == "pmap":
      return self._put_stacked(tree)
    return self._put(tree, jax.tree.map(lambda _: self.replicated, tree))

  def put_batch(self, batch: dict[str, np.ndarray]) -> Any:
    """Places this process's batch rows: split over data x fsdp (jit) or a leading device axis
    (pmap)."""
    if self.mode == "pmap":
      local = self.num_local_devices
      return jax.tree.map(lambda x: x.reshape((local, -1) + x.shape[1:]), batch)
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(self.data_sharded, x), batch)

  def get(self, tree: Any) -> Any:
    """A device pytree as it is on one device. jit: the global arrays as they are (orbax saves
    them collectively); pmap: the first copy, fetched to the host (pmap's per-device copies
    are process-local arrays, which orbax cannot save with several processes)."""
    if self.mode == "pmap":
      return jax.device_get(jax.tree.map(lambda x: x[0], tree))
    return tree

  def to_host(self, tree: Any) -> Any:
    """The whole pytree as NumPy arrays on every process (gathers sharded arrays; collective:
    call it on every process)."""
    if self.mode == "pmap":
      return self.get(tree)
    return jax.device_get(_gather(self.replicated)(tree))

  # -- compiling -----------------------------------------------------------------------------

  def compile_train_step(self, **static: Any) -> Callable:
    """`(state, teacher_vars, batch) -> (state, metrics)`, compiled; the state is donated."""
    if self.mode == "pmap":
      fn = functools.partial(step_lib.train_step, axis_name=PMAP_AXIS, **static)
      return jax.pmap(fn, axis_name=PMAP_AXIS, devices=self.devices, donate_argnums=(0,))
    return ShardedStep(self, functools.partial(step_lib.train_step, **static), train=True)

  def compile_eval_step(self, **static: Any) -> Callable:
    """`(state, teacher_vars, batch) -> metric sums`, compiled."""
    if self.mode == "pmap":
      fn = functools.partial(step_lib.eval_step, axis_name=PMAP_AXIS, **static)
      return jax.pmap(fn, axis_name=PMAP_AXIS, devices=self.devices)
    return ShardedStep(self, functools.partial(step_lib.eval_step, **static), train=False)


@functools.cache
def _gather(sharding: NamedSharding) -> Callable:
  return jax.jit(lambda tree: tree, out_shardings=sharding)


class ShardedStep:
  """A step under one `jax.jit` whose in/out shardings follow the parallel layout.

  The shardings depend on the state's structure and shapes (which change between stages, e.g.
  a stage's optimizer state), so the jitted function is made on first use for each and kept:
  each layout compiles once. `lower(...)` gives the AOT lowering (for memory analysis).
  """

  def __init__(self, parallel: Parallel, fn: Callable, train: bool):
    self._parallel, self._fn, self._train = parallel, fn, train
    self._jitted: dict[Any, Callable] = {}

  def _get(self, state: Any, teacher_vars: Any) -> Callable:
    leaves, treedef = jax.tree.flatten((state, teacher_vars))
    key = (treedef, tuple(np.shape(x) for x in leaves))
    if key not in self._jitted:
      p = self._parallel
      state_sh, teacher_sh = p.state_shardings(state), p.teacher_shardings(teacher_vars)
      in_shardings = (state_sh, teacher_sh, p.data_sharded)
      if self._train:
        self._jitted[key] = jax.jit(self._fn, in_shardings=in_shardings,
                                    out_shardings=(state_sh, p.replicated), donate_argnums=(0,))
      else:
        self._jitted[key] = jax.jit(self._fn, in_shardings=in_shardings,
                                    out_shardings=p.replicated)
    return self._jitted[key]

  def __call__(self, state: Any, teacher_vars: Any, batch: Any) -> Any:
    return self._get(state, teacher_vars)(state, teacher_vars, batch)

  def lower(self, state: Any, teacher_vars: Any, batch: Any) -> Any:
    return self._get(state, teacher_vars).lower(state, teacher_vars, batch)
