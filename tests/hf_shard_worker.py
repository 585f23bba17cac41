"""One of the processes of tests/test_hf_loading.py's two-process load (not a test itself).

    python tests/hf_shard_worker.py CHECKPOINT_DIR WARMUP_DIR OUT_DIR COORDINATOR PROCESS_ID

Joins a cluster of 2 processes x 4 CPU devices (gloo), loads WARMUP_DIR (a small checkpoint:
imports, the tokenizer and JAX's first arrays are not counted), then CHECKPOINT_DIR with
`hf.load_hf(..., shardings=Parallel(fsdp=8).teacher_shardings)`, then whole (no shardings),
and writes OUT_DIR/PROCESS_ID.npz (this process's shards: 'PATH|INDEX' -> block) and
OUT_DIR/PROCESS_ID.json: the peak host memory each load added, in bytes.

Peak host memory: Linux's VmHWM (the process's peak resident set) is reset to the current
resident set by writing 5 to /proc/self/clear_refs just before a load; the load's peak is
VmHWM after it minus VmRSS before it (anonymous memory, the devices' CPU buffers among them,
and the pages of the safetensors files it mapped).
"""

import json
import os
import sys

import jax
import numpy as np


def _status(field: str) -> int:
  """A /proc/self/status field in bytes (VmRSS, VmHWM)."""
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith(field + ":"):
        return int(line.split()[1]) * 1024
  raise KeyError(field)


def peak_added(load):
  """(load(), the peak host memory it added in bytes)."""
  with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # VmHWM := VmRSS.
  before = _status("VmRSS")
  result = load()
  jax.block_until_ready(result)
  return result, _status("VmHWM") - before


def main(checkpoint: str, warmup: str, out: str, coordinator: str, process_id: int
         ) -> None:
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator, num_processes=2, process_id=process_id)
  from distill_jax.models import hf
  from distill_jax.train.parallel import Parallel
  assert (jax.device_count(), jax.local_device_count()) == (8, 4)
  parallel = Parallel("jit", mesh={"data": 1, "fsdp": 8}, teacher_sharding="fsdp")
  hf.load_hf(warmup, shardings=parallel.teacher_shardings_of)  # Imports, first arrays.
  (_, sharded, _), sharded_peak = peak_added(
      lambda: hf.load_hf(checkpoint, shardings=parallel.teacher_shardings_of))
  (_, whole, _), whole_peak = peak_added(lambda: hf.load_hf(checkpoint))
  del whole
  blocks = {}
  for path, x in jax.tree_util.tree_flatten_with_path(sharded)[0]:
    assert not x.is_fully_addressable
    for shard in x.addressable_shards:
      index = ",".join(f"{s.start or 0}:{s.stop if s.stop is not None else n}"
                       for s, n in zip(shard.index, x.shape, strict=True))
      blocks[f"{jax.tree_util.keystr(path)}|{index}"] = np.asarray(shard.data)
  np.savez(os.path.join(out, f"{process_id}.npz"), **blocks)
  with open(os.path.join(out, f"{process_id}.json"), "w") as f:
    json.dump({"sharded_peak": sharded_peak, "whole_peak": whole_peak}, f)
  jax.distributed.shutdown()


if __name__ == "__main__":
  main(*sys.argv[1:5], int(sys.argv[5]))
