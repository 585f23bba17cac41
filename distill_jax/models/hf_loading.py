"""Reading a Hugging Face directory's safetensors files: whole weights, or only the blocks a
process's devices hold, in `transformer_lm`'s layout.

`models/hf.py` says which file weight is which parameter of ours and how it converts (a
conversion name, `how`: 'dense', 'heads', 'out', 'bias' or 'same'); this module reads them:
`locate_weights` (the files' headers against the expected names and shapes, no tensor read),
`read_slice` (a block of our param through safetensors' slicing API, converting only the
slice) and `read_sharded` (a global `jax.Array` with a sharding, each process reading only its
own devices' blocks), and `to_file_layout`, the inverse conversion `export_hf` writes with.
"""

from __future__ import annotations

import collections
import json
import math
import os
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np

INDEX = "model.safetensors.index.json"


class HfCheckpointError(ValueError):
  """A Hugging Face directory that cannot be loaded: names the file, setting or weight."""


def read_json(path: str) -> dict[str, Any]:
  """A JSON file of a Hugging Face directory; a missing one names what a directory holds."""
  if not os.path.exists(path):
    raise HfCheckpointError(f"{path} is missing: a Hugging Face model directory holds "
                            "config.json, model.safetensors (or shards with "
                            f"{INDEX}) and tokenizer.json.")
  with open(path) as f:
    return json.load(f)


def weight_files(path: str) -> list[str]:
  """The safetensors files of directory `path`: the shards its index lists, else
  model.safetensors; a missing one is an HfCheckpointError."""
  index = os.path.join(path, INDEX)
  if os.path.exists(index):
    files = sorted(set(read_json(index)["weight_map"].values()))
  else:
    files = ["model.safetensors"]
  files = [os.path.join(path, f) for f in files]
  for f in files:
    if not os.path.exists(f):
      raise HfCheckpointError(f"{f} is missing: a Hugging Face model directory holds its "
                              f"weights in model.safetensors or in the shards {INDEX} lists.")
  return files


def locate_weights(path: str, names: Mapping[str, tuple[tuple[str, ...], str]], shapes: Any,
                   layout: str, ignored: Callable[[str], bool] = lambda key: False
                   ) -> dict[tuple[str, ...], tuple[str, str, str]]:
  """{our param path: (file, HF weight name, conversion)}, from the safetensors headers only
  (no tensor is read): every weight of `names` (HF name -> (our path, conversion)) present once
  and of the shape our param in `shapes` (a tree of ShapeDtypeStructs) implies. A stored
  weight not in `names` is refused, naming `layout`, unless `ignored(name)`."""
  from safetensors import safe_open
  names = dict(names)
  found: dict[tuple[str, ...], tuple[str, str, str]] = {}
  for f in weight_files(path):
    with safe_open(f, framework="numpy") as st:
      for key in st.keys():
        if key not in names:
          if ignored(key):
            continue
          raise HfCheckpointError(f"{f}: weight {key!r} is not part of the {layout}.")
        where, how = names.pop(key)
        stored = tuple(st.get_slice(key).get_shape())
        want = file_shape(tuple(get_path(shapes, where).shape), how)
        if stored != want:
          raise HfCheckpointError(f"{f}: weight {key!r} has shape {stored}; "
                                  f"config.json implies {want}.")
        found[where] = (f, key, how)
  if names:
    raise HfCheckpointError(f"{path}: weights missing from the safetensors files: "
                            f"{sorted(names)[:5]}{' ...' if len(names) > 5 else ''}.")
  return found


def file_shape(shape: tuple[int, ...], how: str) -> tuple[int, ...]:
  """The file's shape of our param of `shape` (`to_file_layout`'s, without an array)."""
  if how == "dense":
    return shape[::-1]
  if how == "heads":
    return (shape[1] * shape[2], shape[0])
  if how == "out":
    return (shape[2], shape[0] * shape[1])
  return (shape[0] * shape[1],) if how == "bias" else shape


def read_slice(file: str, key: str, how: str, shape: tuple[int, ...], dtype: Any,
               index: tuple[slice, ...] | None = None) -> np.ndarray:
  """Block `index` (slices of our param's `shape`; None: all of it) of our param, read from
  weight `key` of safetensors `file` through safetensors' slicing API, as a NumPy array in
  `dtype`. Only the file's rows/columns the block maps to are read: the layout's conversions
  (`models.hf`'s names) are applied to the slice, never to the whole tensor.

  'dense' ours [in, out] = file [out, in]^T: ours[i, o] is file[o, i]. 'heads' ours [width,
  heads, head_dim] = file [heads * head_dim, width]^T: heads h0:h1 are file rows
  h0 * head_dim : h1 * head_dim (whole heads are read, then the head_dim slice taken: a
  sharding rarely splits head_dim). 'out' ours [heads, head_dim, width] = file
  [width, heads * head_dim]^T; 'bias' ours [heads, head_dim] = file [heads * head_dim].
  """
  index = tuple(slice(None) for _ in shape) if index is None else tuple(index)
  idx = tuple(slice(*s.indices(n)) for s, n in zip(index, shape, strict=True))
  if any(s.step != 1 for s in idx):
    raise ValueError(f"read_slice: {key}: strided block {index} is not supported.")
  stored = file_shape(shape, how)
  if how == "dense":
    block = _read_rows(file, key, stored, (idx[1], idx[0])).T
  elif how in ("heads", "out", "bias"):
    h, d = (idx[1], idx[2]) if how == "heads" else (idx[0], idx[1])
    head_dim = shape[2] if how == "heads" else shape[1]
    rows = slice(h.start * head_dim, h.stop * head_dim)
    if how == "heads":  # file [H * D, width] -> [width', H', D']
      block = _read_rows(file, key, stored, (rows, idx[0]))
      block = block.reshape(h.stop - h.start, head_dim, -1)[:, d].transpose(2, 0, 1)
    elif how == "out":  # file [width, H * D] -> [H', D', width']
      block = _read_rows(file, key, stored, (idx[2], rows))
      block = block.reshape(-1, h.stop - h.start, head_dim)[:, :, d].transpose(1, 2, 0)
    else:  # file [H * D] -> [H', D']
      block = _read_rows(file, key, stored, (rows,)).reshape(-1, head_dim)[:, d]
  else:
    block = _read_rows(file, key, stored, idx)
  return np.ascontiguousarray(block, dtype=dtype)


_READ_BYTES = 1 << 20  # At most this much of a file is mapped at once by a read.


def _read_rows(file: str, key: str, stored: tuple[int, ...], index: tuple[slice, ...]
               ) -> np.ndarray:
  """`file[key][index]` (step-1 slices of the file's layout, of shape `stored`) with
  safetensors' `get_slice`, a few rows at a time, each through its own `safe_open`: the file
  is memory-mapped, and a slice of columns touches every row's pages, which stay resident
  until the file is closed; so at most `_READ_BYTES` of it are mapped at once,
  not the whole weight."""
  from safetensors import safe_open
  rows = index[0]
  step = max(1, _READ_BYTES // (4 * math.prod(stored[1:])))
  if rows.stop <= rows.start:
    with safe_open(file, framework="numpy") as st:
      return st.get_slice(key)[index]
  out = None
  for start in range(rows.start, rows.stop, step):
    stop = min(start + step, rows.stop)
    with safe_open(file, framework="numpy") as st:
      part = st.get_slice(key)[(slice(start, stop), *index[1:])]
    if out is None:
      out = np.empty((rows.stop - rows.start, *part.shape[1:]), part.dtype)
    out[start - rows.start:stop - rows.start] = part
  return out


def read_sharded(file: str, key: str, how: str, shape: tuple[int, ...], dtype: Any,
                 sharding: Any) -> jax.Array:
  """Our param as a global `jax.Array` with `sharding`: this process reads the blocks of its
  own devices only, each distinct block once (replicas share it): the host memory in flight
  is about one block (and `_READ_BYTES` of the file), beside the shards already placed."""
  def block_key(index: tuple[slice, ...]) -> tuple:
    return tuple(s.indices(n) for s, n in zip(index, shape, strict=True))
  uses = collections.Counter(block_key(index) for index in
                             sharding.addressable_devices_indices_map(shape).values())
  kept: dict[tuple, np.ndarray] = {}  # Blocks that further devices of this process hold.
  def callback(index: tuple[slice, ...]) -> np.ndarray:
    k = block_key(index)
    block = kept.pop(k) if k in kept else read_slice(file, key, how, shape, dtype, index)
    uses[k] -= 1
    if uses[k] > 0:
      kept[k] = block
    return block
  return jax.make_array_from_callback(shape, sharding, callback)


def get_path(tree: Mapping, path: tuple[str, ...]) -> Any:
  """tree[path[0]][path[1]]...: a parameter of a nested dict by its path."""
  for part in path:
    tree = tree[part]
  return tree


def set_path(tree: dict, path: tuple[str, ...], value: Any) -> None:
  """Puts `value` at `path` of the nested dict `tree`, making the dicts on the way."""
  for part in path[:-1]:
    tree = tree.setdefault(part, {})
  tree[path[-1]] = value


def to_file_layout(array: jax.Array, how: str) -> jax.Array:
  """Our param in the file's layout: the inverse of `read_slice`'s conversions."""
  if how == "dense":
    return array.T
  if how == "heads":
    return array.reshape(array.shape[0], -1).T
  if how == "out":
    return array.reshape(-1, array.shape[-1]).T
  return array.reshape(-1) if how == "bias" else array
