"""Batches of packed rows: the train iterator and the eval pass of a text data set.

Batches (`train_iterator`, `eval_batches`) are dicts of NumPy arrays: `tokens` int32 [b, L],
`targets` int32 [b, L], `mask` float32 [b, L], `document` int32 [b, L] and `id` int64 [b] (the
row's index; `packing.Packed.rows`). Train batches follow `data.iterators`' contract: batch s is
a pure function of (seed, s, process), epoch e visits the rows in an order hashed from (seed,
e), process i of k takes rows i*b:(i+1)*b of each global batch, and the position saves as a
small dict (`iterators.TrainIterator`). The last eval batch is padded with all-masked rows.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from distill_jax.data import batch_keys
from distill_jax.data.iterators import TrainIterator, local_batch_size
from distill_jax.data.sources import config_field
from distill_jax.data.text.packing import Packed, packed_split
from distill_jax.data.transforms import STREAM_SHUFFLE, hash_keys
from distill_jax.models.tokenizers import get_tokenizer

# Eval batches' bytes per kept target (`eval_batches`): they count the data's targets.
batch_keys.declare("target_bytes", what="the UTF-8 bytes of the data's targets")


@dataclasses.dataclass(frozen=True)
class _SplitName:
  """What `TrainIterator.get_state` records of a source."""

  name: str
  split: str


@dataclasses.dataclass
class _RowBatcher:
  """step -> this process's batch of packed rows; a pure function of its fields and the step."""

  packed: Packed
  source: _SplitName
  num_examples: int
  global_batch_size: int
  batch_size: int
  process_index: int
  seed: int
  side_data: tuple[tuple[str, Any], ...] = ()

  @property
  def steps_per_epoch(self) -> int:
    return self.num_examples // self.global_batch_size

  def epoch_order(self, epoch: int) -> np.ndarray:
    keys = hash_keys(self.seed, STREAM_SHUFFLE, epoch, np.arange(self.num_examples))
    return np.argsort(keys, kind="stable")

  def __call__(self, step: int) -> dict[str, np.ndarray]:
    epoch, index = divmod(int(step), self.steps_per_epoch)
    positions = (index * self.global_batch_size + self.process_index * self.batch_size
                 + np.arange(self.batch_size, dtype=np.int64))
    return self.examples(epoch, self.epoch_order(epoch)[positions])

  def examples(self, epoch: int, ids: np.ndarray) -> dict[str, np.ndarray]:
    """Rows `ids` (not augmented: the same in every epoch), with `side_data`'s keys."""
    batch = self.packed.rows(ids)
    for key, fn in self.side_data:
      batch[key] = np.asarray(fn(epoch, ids))
    return batch


def train_iterator(data_config: Any, *, global_batch_size: int, seed: int,
                   process_index: int = 0, process_count: int = 1,
                   side_data: Mapping[str, Any] | None = None) -> TrainIterator:
  """An infinite, deterministic iterator over this process's share of the packed train rows.
  `side_data` {key: fn(epoch, ids)} adds per-row data (a teacher cache's logits) to batches."""
  split = config_field(data_config, "train_split", "train")
  packed = packed_split(data_config, split)
  if len(packed) < global_batch_size:
    raise ValueError(f"global_batch_size={global_batch_size} is larger than the {len(packed)} "
                     f"packed rows of {data_config.name!r} ({split}) at seq_len "
                     f"{data_config.seq_len}.")
  batcher = _RowBatcher(packed, _SplitName(data_config.name, split), len(packed),
                        global_batch_size,
                        local_batch_size(global_batch_size, process_index, process_count),
                        process_index, int(seed), tuple((side_data or {}).items()))
  return TrainIterator(batcher, num_workers=0)


def eval_batches(data_config: Any, *, global_batch_size: int, split: str | None = None,
                 process_index: int = 0, process_count: int = 1,
                 side_data: Mapping[str, Any] | None = None
                 ) -> Iterator[dict[str, np.ndarray]]:
  """One ordered pass over the packed rows of an eval split; the last global batch is padded
  with rows whose mask is 0 (tokens PAD, id -1; zeros for `side_data`'s keys, read as
  `fn(0, ids)`), so every batch has one shape. Eval batches also carry `target_bytes` float32
  [b, L]: the UTF-8 bytes of text each kept target stands for (the tokenizer's
  `byte_lengths`; 0 where masked), which bits per byte divide by."""
  packed = packed_split(data_config, split or config_field(data_config, "eval_split", "test"))
  b = local_batch_size(global_batch_size, process_index, process_count)
  tok = get_tokenizer(config_field(data_config, "tokenizer", "bytes"))
  pad, byte_lengths = tok.pad_id, tok.byte_lengths()
  for start in range(0, len(packed), global_batch_size):
    positions = start + process_index * b + np.arange(b, dtype=np.int64)
    real = positions[positions < len(packed)]
    batch = packed.rows(real)
    for key, fn in (side_data or {}).items():
      batch[key] = np.asarray(fn(0, real))
    missing = b - len(real)
    if missing:
      fill = {"tokens": pad, "targets": pad, "mask": 0.0, "document": -1, "id": -1}
      batch = {k: np.concatenate([v, np.full((missing, *v.shape[1:]), fill.get(k, 0),
                                             v.dtype)])
               for k, v in batch.items()}
    batch["target_bytes"] = (byte_lengths[batch["targets"]] * batch["mask"]).astype(np.float32)
    yield batch
