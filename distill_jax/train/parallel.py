"""Compiles the one step function for the devices at hand: `jit` on a mesh, or `pmap`.

Both modes run the same `train_step` / `eval_step` body:
- 'jit': one `jax.jit` with shardings on a 1-D `Mesh(('data',))`; the batch is split over
  'data', everything else is replicated, and XLA inserts the cross-device reductions.
  One device is simply a mesh of one.
- 'pmap': `jax.pmap` over the same devices with `axis_name='batch'`; the step averages
  gradients and metrics with `lax.pmean`, and BatchNorm reduces its statistics over the
  axis (models take `bn_axis_name`), so both modes compute the global-batch result.

The `Parallel` object owns the device layout: it puts states, teacher variables and host
batches on the devices, and gets states back for checkpoints.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from distill_jax.train import step as step_lib

PMAP_AXIS = "batch"
MODES = ("jit", "pmap")


class Parallel:
  """Device layout and compiled steps for one run."""

  def __init__(self, mode: str = "jit", num_devices: int = 0):
    if mode not in MODES:
      raise ValueError(f"Unknown parallel.mode {mode!r}; choose one of {list(MODES)}.")
    devices = jax.devices()
    if num_devices:
      if num_devices > len(devices):
        raise ValueError(f"parallel.num_devices={num_devices}, but only {len(devices)} "
                         f"devices are visible ({devices[0].platform}).")
      devices = devices[:num_devices]
    self.mode = mode
    self.devices = devices
    self.mesh = Mesh(np.asarray(devices), ("data",))
    self.replicated = NamedSharding(self.mesh, P())
    self.data_sharded = NamedSharding(self.mesh, P("data"))

  @property
  def num_devices(self) -> int:
    return len(self.devices)

  @property
  def bn_axis_name(self) -> str | None:
    """The axis name BatchNorm must reduce over (pmap only; jit reduces globally)."""
    return PMAP_AXIS if self.mode == "pmap" else None

  def check_batch_size(self, global_batch_size: int) -> None:
    if global_batch_size % self.num_devices:
      raise ValueError(f"The batch size {global_batch_size} does not split evenly over "
                       f"{self.num_devices} devices; pick a multiple of {self.num_devices}.")

  # -- placing data -------------------------------------------------------------------------

  def put_replicated(self, tree: Any) -> Any:
    """Places a host pytree (state, teacher variables) on every device."""
    if self.mode == "pmap":
      # One copy per device along a leading axis, sharded over a mesh axis named like the
      # pmap axis: the layout pmap's own outputs have, so the step compiles once, not twice.
      stacked = NamedSharding(Mesh(np.asarray(self.devices), (PMAP_AXIS,)), P(PMAP_AXIS))
      return jax.tree.map(lambda x: jax.device_put(
          np.broadcast_to(np.asarray(x), (self.num_devices, *np.shape(x))), stacked), tree)
    return jax.device_put(tree, self.replicated)

  def put_batch(self, batch: dict[str, np.ndarray]) -> Any:
    """Places this host's batch rows: split over 'data' (jit) or a leading device axis (pmap)."""
    if self.mode == "pmap":
      local = len(jax.local_devices()) if jax.process_count() > 1 else self.num_devices
      return jax.tree.map(lambda x: x.reshape((local, -1) + x.shape[1:]), batch)
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(self.data_sharded, x), batch)

  def get(self, tree: Any) -> Any:
    """A device pytree as it is on one device: unreplicates pmap's leading axis."""
    if self.mode == "pmap":
      return jax.tree.map(lambda x: x[0], tree)
    return tree

  # -- compiling -----------------------------------------------------------------------------

  def compile_train_step(self, **static: Any) -> Callable:
    """`(state, teacher_vars, batch) -> (state, metrics)`, compiled; the state is donated."""
    if self.mode == "pmap":
      fn = functools.partial(step_lib.train_step, axis_name=PMAP_AXIS, **static)
      return jax.pmap(fn, axis_name=PMAP_AXIS, devices=self.devices, donate_argnums=(0,))
    fn = functools.partial(step_lib.train_step, **static)
    return jax.jit(fn, in_shardings=(self.replicated, self.replicated, self.data_sharded),
                   out_shardings=(self.replicated, self.replicated), donate_argnums=(0,))

  def compile_eval_step(self, **static: Any) -> Callable:
    """`(state, teacher_vars, batch) -> metric sums`, compiled."""
    if self.mode == "pmap":
      fn = functools.partial(step_lib.eval_step, axis_name=PMAP_AXIS, **static)
      return jax.pmap(fn, axis_name=PMAP_AXIS, devices=self.devices)
    fn = functools.partial(step_lib.eval_step, **static)
    return jax.jit(fn, in_shardings=(self.replicated, self.replicated, self.data_sharded),
                   out_shardings=self.replicated)
