"""Teacher output cache: each teacher's logits per example, computed once, read by training.

When a teacher sees fixed inputs - no random augmentation, or a fixed set of augmentation
draws per example (`data.augment_period = P`: epoch e reuses epoch e % P's crops), or packed
text rows - its outputs are a function of the example alone, and running it every step is
wasted work (with 4 ResNet-56 teachers, most of a KD step). The cache knows no task: the
config's task gives the inputs (its iterators), what decides them (`Task.input_fingerprint`)
and the shape of one example's logits (`[K]` for an image, `[L, V]` for a row of L tokens).
`scripts/cache_teacher.py` (`teachers.cache_teachers`) runs every teacher once over the train
split (P times when augmented) and the eval split and writes, per teacher, a directory:

    CACHE/NAME/cache.json            what was cached, and from what (the fingerprints)
    CACHE/NAME/SPLIT.array_record    one record per (slot, example id), at slot * n + id

A record holds the teacher's logits at T = 1 (float32 or float16) or, with `top_k = k`, its k
largest log-probabilities, their classes and the log of the remaining probability mass (per
token, for text), which reading spreads evenly over the other classes (so the tempered
distribution is approximate; `top_k = 0` is exact; top-k KD with the same k, or a smaller one,
reads exactly the live teacher's top k and remaining mass, and a run refuses a larger k:
`train.build.check_cache_top_k`). Records are fixed-size NumPy structs: nothing is unpickled.

A run reads a cache with `config.teachers.NAME.cache = CACHE/NAME`: the pipeline adds
`batch['teacher_logits/NAME']` and the teacher's forward becomes a read of that key, in the
same compiled step. A top-k cache stays sparse until it is on the device: the batch holds each
position's `1 + 2k` numbers packed into one float32 array [..., 1 + 2k] (`pack`: the value of
the classes outside the top k, the k log-probabilities, the k class ids, exact as float32
below 2^24 classes), and the teacher's forward decodes them there (`unpack`): all at once into
the logits [B, ..., K], or, with lazy logits (`config.fused_logits`), one chunk of positions at
a time inside the loss's scan, so the dense [B, L, V] exists neither on the host nor whole on
the device. The run refuses the cache, saying why, when it was made from another
teacher checkpoint (SHA-256 of the variables), another data set or split content, or other
augmentation or normalisation settings than the run's; and on-policy (`data.batch_keys`: the
cached logits describe the data's rows, not the student's samples).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from array_record.python import array_record_module

from distill_jax.common.outputs import Head, Outputs
from distill_jax.data import batch_keys

FORMAT = 1
META_FILE = "cache.json"
# Caches up to this size are read into memory at the first batch; larger ones per batch.
_MEMORY_LIMIT_BYTES = 1 << 30


class CacheError(ValueError):
  """A teacher cache is missing, corrupt or stale; the message names the file and the reason."""


KEY_PREFIX = "teacher_logits/"
# Cached logits describe the data's rows: after an on-policy rollout they would score tokens
# the batch no longer holds.
batch_keys.declare(
    KEY_PREFIX, what="teacher {name!r}'s logits cached for the data's rows, not for the "
    "student's samples", fix="run that teacher live (unset config.teachers.{name}.cache)")


def batch_key(teacher: str) -> str:
  """The batch key under which teacher `teacher`'s cached logits reach the step."""
  return f"{KEY_PREFIX}{teacher}"


@dataclasses.dataclass(frozen=True)
class Unpack:
  """`Head.fn` of a top-k cache's lazy logits: (no params, packed [B, C, 1 + 2k]) -> logits
  [B, C, num_classes] (`unpack`). A value (hashable, equal by its number), as a static field."""

  num_classes: int

  def __call__(self, params: Any, packed: jax.Array) -> jax.Array:
    del params
    return unpack(packed, self.num_classes)


def cached_apply(teacher: str, num_classes: int = 0, top_k: int = 0, fused_chunk: int = 0):
  """The forward of a cached teacher: its logits, read from the batch (no features).

  A cache of all logits (`top_k = 0`) is read as it is. A top-k cache's packed records
  (`pack`) are decoded on the device into `num_classes` logits (`unpack`): whole, or with
  `fused_chunk = C > 0` lazily (`Outputs.hidden` the packed records, `Outputs.head` their
  decoding, C positions per chunk), as a language model's lazy logits.
  """
  key = batch_key(teacher)

  def apply(variables: Any, batch: Mapping[str, jax.Array], train: bool,
            rng: jax.Array | None = None) -> Outputs:
    del variables, train, rng
    if not top_k:
      return Outputs(batch[key], {}, {})
    if fused_chunk:
      return Outputs(None, {}, {}, hidden=batch[key],
                     head=Head({}, Unpack(num_classes), num_classes, fused_chunk))
    return Outputs(unpack(batch[key], num_classes), {}, {})

  return apply


def teacher_digest(teacher: Any) -> str:
  """SHA-256 of a teacher's model name, settings, input size and every variable (path, dtype,
  shape, bytes): what "the same teacher" means for its cached outputs."""
  digest = hashlib.sha256(json.dumps([teacher.model, dict(teacher.kwargs), teacher.input_size],
                                     sort_keys=True, default=str).encode())
  leaves, _ = jax.tree_util.tree_flatten_with_path(jax.device_get(teacher.variables))
  for path, leaf in sorted(leaves, key=lambda kv: jax.tree_util.keystr(kv[0])):
    leaf = np.ascontiguousarray(leaf)
    digest.update(f"{jax.tree_util.keystr(path)}:{leaf.dtype}:{leaf.shape}".encode())
    digest.update(leaf.tobytes())
  return digest.hexdigest()


def num_slots(fingerprint: Mapping[str, Any]) -> int:
  """Versions of each example in a split: its augmentation period, or 1 without augmentation."""
  if fingerprint["augment"] == "none":
    return 1
  period = fingerprint["augment_period"]
  if period < 1:
    raise CacheError(
        f"Cannot cache teacher outputs on {fingerprint['split']!r} with augment="
        f"{fingerprint['augment']!r} and augment_period=0: every epoch draws new crops, so no "
        "teacher input repeats. Set data.augment='none', or data.augment_period=P to reuse P "
        "epochs' draws (the cache then holds P versions of each example).")
  return int(period)


def _record_dtype(output_shape: Sequence[int], top_k: int, dtype: str) -> np.dtype:
  """One example's record for logits of `output_shape` (`[..., num_classes]`)."""
  *positions, num_classes = (int(d) for d in output_shape)
  if top_k:
    return np.dtype([("index", "<i4", (*positions, top_k)),
                     ("log_prob", "<f4", (*positions, top_k)),
                     ("log_rest", "<f4", tuple(positions))])
  return np.dtype([("logits", np.dtype(dtype).newbyteorder("<"), (*positions, num_classes))])


def _log_softmax(logits: np.ndarray) -> np.ndarray:
  logits = np.asarray(logits, np.float64)
  shifted = logits - logits.max(axis=-1, keepdims=True)
  return shifted - np.log(np.sum(np.exp(shifted), axis=-1, keepdims=True))


def encode(logits: np.ndarray, top_k: int, dtype: str = "float32") -> np.ndarray:
  """Logits [n, ..., K] -> n cache records (a structured array)."""
  records = np.zeros(len(logits), _record_dtype(logits.shape[1:], top_k, dtype))
  if not top_k:
    records["logits"] = logits
    return records
  log_probs = _log_softmax(logits)
  index = np.argsort(-log_probs, axis=-1, kind="stable")[..., :top_k]
  rest = log_probs.copy()
  np.put_along_axis(rest, index, -np.inf, axis=-1)
  top = rest.max(axis=-1, keepdims=True)
  with np.errstate(invalid="ignore", divide="ignore"):
    log_rest = np.squeeze(top, -1) + np.log(np.sum(np.exp(rest - top), axis=-1))
  records["index"] = index
  records["log_prob"] = np.take_along_axis(log_probs, index, axis=-1)
  records["log_rest"] = np.where(np.isfinite(log_rest), log_rest, -np.inf)
  return records


# Class ids travel as float32 in a packed top-k batch: exact below this many classes.
MAX_PACKED_CLASSES = 1 << 24


def pack(records: np.ndarray, num_classes: int) -> np.ndarray:
  """Top-k cache records -> float32 [n, ..., 1 + 2k]: per position the value every class
  outside the top k decodes to (`log_rest - log(K - k)`, computed in float64 as `decode` does),
  the k log-probabilities and the k class ids (as float32: exact below MAX_PACKED_CLASSES).
  What a batch carries to the device instead of the dense logits (k + 1 + k numbers, not K)."""
  if num_classes >= MAX_PACKED_CLASSES:
    raise CacheError(f"A top-k cache of {num_classes} classes cannot be packed: class ids "
                     f"travel as float32, exact below {MAX_PACKED_CLASSES}; use top_k=0.")
  top_k = records["index"].shape[-1]
  fill = records["log_rest"].astype(np.float64) - np.log(num_classes - top_k)
  return np.concatenate([fill.astype(np.float32)[..., None], records["log_prob"],
                         records["index"].astype(np.float32)], axis=-1)


def unpack(packed: jax.Array, num_classes: int) -> jax.Array:
  """`pack`'s [..., 1 + 2k] -> float32 logits [..., num_classes], on the device: each top-k
  class its log-probability, every other class the packed fill value: the numbers `decode`
  gives on the host."""
  top_k = (packed.shape[-1] - 1) // 2
  fill, log_probs = packed[..., :1], packed[..., 1:1 + top_k]
  ids = packed[..., 1 + top_k:].astype(jnp.int32)
  flat_ids = ids.reshape(-1, top_k)
  rows = jnp.arange(flat_ids.shape[0])[:, None]
  logits = jnp.broadcast_to(fill, (*packed.shape[:-1], num_classes)).reshape(-1, num_classes)
  logits = logits.at[rows, flat_ids].set(log_probs.reshape(-1, top_k))
  return logits.reshape(*packed.shape[:-1], num_classes)


def decode(records: np.ndarray, num_classes: int) -> np.ndarray:
  """Cache records -> float32 logits [n, ..., K]; top-k records give log-probabilities with
  the remaining mass spread evenly over the classes outside the top k."""
  if "logits" in records.dtype.names:
    return records["logits"].astype(np.float32)
  top_k = records["index"].shape[-1]
  fill = records["log_rest"].astype(np.float64) - np.log(num_classes - top_k)
  logits = np.repeat(fill[..., None], num_classes, axis=-1)
  np.put_along_axis(logits, records["index"].astype(np.int64), records["log_prob"], axis=-1)
  return logits.astype(np.float32)


def write_cache(directory: str, teacher: Any, task: Any, data_config: Any, *, seed: int,
                splits: Sequence[str], batch_size: int = 256, top_k: int = 0,
                dtype: str = "float32", checkpoint: str = "", progress: Any = None
                ) -> dict[str, Any]:
  """Runs `teacher` (a `teachers.Teacher`) over `splits` and writes its cache to `directory`.

  `task` (a `tasks.Task`) gives the inputs: the first split read as training sees it
  (augmented: one version per slot), the others as evaluation does. `cache.json` is written
  last, so an interrupted write leaves no cache that a run would accept. Returns the cache's
  metadata.
  """
  from distill_jax.models.forward import make_apply  # The forward the run would use.

  info = task.info(data_config)
  if not 0 <= top_k < info.num_classes:
    raise CacheError(f"top_k must be in [0, {info.num_classes}) for {info.num_classes} "
                     f"classes (0: all logits), got {top_k}.")
  if dtype not in ("float32", "float16"):
    raise CacheError(f"dtype must be 'float32' or 'float16', got {dtype!r}.")
  os.makedirs(directory, exist_ok=True)
  meta_path = os.path.join(directory, META_FILE)
  if os.path.exists(meta_path):
    os.remove(meta_path)
  forward = make_apply(teacher.module, input_key=task.input_key, input_size=teacher.input_size)
  apply = jax.jit(lambda variables, inputs: forward(
      variables, {task.input_key: inputs}, False).logits)
  train_iter = task.train_iterator(data_config, global_batch_size=1, seed=seed)
  meta: dict[str, Any] = {
      "format": FORMAT, "teacher": teacher.name, "model": teacher.model,
      "checkpoint": checkpoint, "num_classes": info.num_classes, "top_k": int(top_k),
      "dtype": dtype, "splits": {}, "teacher_sha256": teacher_digest(teacher)}
  for i, split in enumerate(splits):
    fingerprint = task.input_fingerprint(data_config, split, seed, augmented=i == 0)
    slots, n = num_slots(fingerprint), fingerprint["num_examples"]
    path = os.path.join(directory, f"{split}.array_record")
    writer = array_record_module.ArrayRecordWriter(path, "group_size:1")
    eval_source = None if i == 0 else task.eval_batches(
        data_config, global_batch_size=batch_size, split=split)
    for slot in range(slots):
      for start in range(0, n, batch_size):
        ids = np.arange(start, min(start + batch_size, n))
        inputs = (train_iter.examples(slot, ids) if i == 0 else next(eval_source))
        inputs = np.asarray(inputs[task.input_key])
        padded = np.zeros((batch_size, *inputs.shape[1:]), inputs.dtype)
        padded[:len(ids)] = inputs[:len(ids)]
        logits = np.asarray(apply(teacher.variables, padded))[:len(ids)]
        meta["output_shape"] = list(logits.shape[1:])
        for record in encode(logits, top_k, dtype):
          writer.write(record.tobytes())
        if progress is not None:
          progress(len(ids))
    writer.close()
    meta["splits"][split] = {"file": os.path.basename(path), "slots": slots,
                             "inputs": fingerprint}
  with open(meta_path, "w") as f:
    json.dump(meta, f, indent=2, sort_keys=True)
  return meta


class CacheReader:
  """`(epoch, ids) -> float32 logits [n, *output_shape]` (a top-k cache: its packed records
  [n, *batch_shape], decoded on the device) of one cached split: the pipeline's side data.

  Epoch e reads slot e % slots (the pipeline reuses the same augmentation draws then).
  Small caches are read into memory once; pickles without the open file (grain workers
  reopen it).
  """

  def __init__(self, path: str, num_examples: int, slots: int, output_shape: Sequence[int],
               record_dtype: np.dtype):
    self.path, self.num_examples, self.slots = path, num_examples, slots
    self.output_shape, self.record_dtype = tuple(output_shape), record_dtype
    self._reader: Any = None
    self._table: np.ndarray | None = None

  @property
  def top_k(self) -> int:
    """The teacher's most likely classes each record holds (0: all its logits)."""
    names = self.record_dtype.names or ()
    return int(self.record_dtype["index"].shape[-1]) if "index" in names else 0

  @property
  def batch_shape(self) -> tuple[int, ...]:
    """One example's array in a batch: the logits' shape, or for a top-k cache its packed
    records' [..., 1 + 2k] (`pack`)."""
    top_k = self.top_k
    return self.output_shape if not top_k else (*self.output_shape[:-1], 1 + 2 * top_k)

  def _open(self) -> Any:
    if self._reader is None:
      self._reader = array_record_module.ArrayRecordReader(self.path)
      if self.num_examples * self.slots * self.record_dtype.itemsize <= _MEMORY_LIMIT_BYTES:
        self._table = np.frombuffer(b"".join(self._reader.read_all()), self.record_dtype)
    return self._reader

  def __call__(self, epoch: int, ids: np.ndarray) -> np.ndarray:
    """The records of examples `ids` at `epoch`: float32 logits [n, *output_shape], or for a
    top-k cache their packed form [n, *batch_shape] (`pack`; `unpack` decodes it)."""
    index = (int(epoch) % self.slots) * self.num_examples + np.asarray(ids, np.int64)
    reader = self._open()
    if self._table is not None:
      records = self._table[index]
    else:
      records = np.frombuffer(b"".join(reader.read([int(i) for i in index])) if len(index)
                              else b"", self.record_dtype)
    if self.top_k:
      return pack(records, self.output_shape[-1])
    return decode(records, self.output_shape[-1])

  def __getstate__(self) -> dict[str, Any]:
    return {**self.__dict__, "_reader": None, "_table": None}


def _differences(cached: Mapping[str, Any], wanted: Mapping[str, Any]) -> list[str]:
  keys = sorted(set(cached) | set(wanted))
  return [f"{k}: cache has {cached.get(k)!r}, this run has {wanted.get(k)!r}"
          for k in keys if cached.get(k) != wanted.get(k)]


def open_cache(directory: str, teacher: Any, task: Any, data_config: Any, *, seed: int,
               splits: Sequence[str], rebuild_hint: str = "") -> dict[str, CacheReader]:
  """Checks the cache in `directory` against this run and returns a reader per split.

  `splits[0]` is the train split (compared with augmentation), the rest eval splits, their
  inputs described by `task.input_fingerprint`. Raises CacheError naming the file and every
  difference: teacher checkpoint, data, augmentation.
  """
  meta_path = os.path.join(directory, META_FILE)
  hint = f"\nRebuild it with: {rebuild_hint}" if rebuild_hint else ""
  if not os.path.exists(meta_path):
    raise CacheError(f"Teacher {teacher.name!r}: no teacher cache at {directory!r} (no "
                     f"{META_FILE}; a write that did not finish leaves none).{hint}")
  try:
    with open(meta_path) as f:
      meta = json.load(f)
  except (OSError, ValueError) as e:
    raise CacheError(f"Teacher {teacher.name!r}: cannot read {meta_path}: {e}{hint}") from e
  problems = []
  if meta.get("format") != FORMAT:
    problems.append(f"format {meta.get('format')!r}, this version reads {FORMAT}")
  digest = teacher_digest(teacher)
  if meta.get("teacher_sha256") != digest:
    problems.append(
        f"it was made from another teacher checkpoint: {meta.get('model')} from "
        f"{meta.get('checkpoint') or '?'} (variables sha256 "
        f"{str(meta.get('teacher_sha256'))[:12]}), but this run's teacher {teacher.name!r} is "
        f"{teacher.model} with variables sha256 {digest[:12]}")
  readers = {}
  for i, split in enumerate(splits):
    entry = meta.get("splits", {}).get(split)
    if entry is None:
      problems.append(f"it has no split {split!r} (it has {sorted(meta.get('splits', {}))})")
      continue
    wanted = task.input_fingerprint(data_config, split, seed, augmented=i == 0)
    num_slots(wanted)  # A run whose crops never repeat can use no cache: say so, plainly.
    changed = _differences(entry["inputs"], wanted)
    if changed:
      problems.append(f"split {split!r} was cached from other inputs: " + "; ".join(changed))
      continue
    path = os.path.join(directory, entry["file"])
    output_shape = meta.get("output_shape", [meta["num_classes"]])
    record_dtype = _record_dtype(output_shape, meta["top_k"], meta["dtype"])
    expected = entry["slots"] * wanted["num_examples"]
    try:
      reader = array_record_module.ArrayRecordReader(path)
      found, size = reader.num_records(), len(reader.read([0])[0]) if expected else 0
      reader.close()
    except Exception as e:  # noqa: BLE001  (the C++ reader raises plain RuntimeErrors)
      raise CacheError(f"Teacher {teacher.name!r}: cannot read cache file {path}: {e}{hint}"
                       ) from e
    if found != expected or (expected and size != record_dtype.itemsize):
      raise CacheError(f"Teacher {teacher.name!r}: cache file {path} is corrupt: {found} "
                       f"records of {size} bytes, {META_FILE} says {expected} of "
                       f"{record_dtype.itemsize}.{hint}")
    readers[split] = CacheReader(path, wanted["num_examples"], entry["slots"], output_shape,
                                 record_dtype)
  if problems:
    raise CacheError(f"Teacher {teacher.name!r}: refusing the stale cache {directory!r}:\n  - "
                     + "\n  - ".join(problems) + hint)
  return readers
