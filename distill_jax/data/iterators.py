"""Iterators: a data config turned into this process's train and eval batches (grain).

Every train batch is a pure function of (data config, seed, global batch size,
step, process index): step `s` is batch `j = s % steps_per_epoch` of epoch
`e = s // steps_per_epoch`; epoch `e` visits the training examples in an order
derived from (seed, e), drops the remainder that does not fill a global batch, and
process `i` of `k` takes rows `i*b:(i+1)*b` (b = global_batch_size // k) of each
global batch. Augmentation draws its randomness from (augment seed, e, example id),
so it does not depend on the number of processes either; with `augment_period = P`
epoch e reuses the draws of epoch e % P, so every example is seen in only P
augmented versions (what a cache of teacher outputs needs, see `teacher_cache`).

Per-example side data (e.g. cached teacher logits) joins the batches through
`side_data={key: fn}`: `batch[key] = fn(epoch, ids)`, computed with the batch.

Because a batch is a function of its step, the iterator's whole state is the next
step (`TrainIterator.get_state()`, a small JSON-able dict saved beside the model
checkpoint); a restarted run - with any number of processes - continues with
exactly the batch it would have seen.

The pipeline itself is a grain `MapDataset` over step indices mapped to batches:
random access by step in-process, and grain's multiprocessing prefetch when
`data_config.num_workers > 0`. The examples come from `sources` and are augmented and
normalised by `transforms`; this module only orders, shards and batches them.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import grain
import numpy as np
from absl import flags, logging

from distill_jax.data.sources import SourceRef, config_field, get_info
from distill_jax.data.transforms import (
    AUGMENTATIONS,
    STREAM_AUGMENT,
    STREAM_SHUFFLE,
    augment_images,
    hash_keys,
    normalize_images,
)

# Upper bound for the step-indexed grain dataset (it must have a length).
_MAX_STEPS = 2**62

# (epoch, example ids [n]) -> per-example values [n, ...] added to each batch under a key.
SideData = Callable[[int, np.ndarray], np.ndarray]


def train_iterator(data_config: Any, *, global_batch_size: int, seed: int,
                   process_index: int = 0, process_count: int = 1,
                   side_data: Mapping[str, SideData] | None = None) -> TrainIterator:
  """An infinite, deterministic iterator over this process's share of the train batches.

  Each batch is `{'image': float32 [b, H, W, C] (normalised, augmented), 'label':
  int32 [b], 'id': int64 [b]}` with b = global_batch_size // process_count; `id` is
  the example's index in the stored train split. `side_data` adds `key: fn(epoch, id)`.
  """
  batch_size = local_batch_size(global_batch_size, process_index, process_count)
  augment = config_field(data_config, "augment", "none")
  if augment not in AUGMENTATIONS:
    raise ValueError(f"Unknown augment {augment!r}; choose one of {AUGMENTATIONS}.")
  info = get_info(data_config)
  source = SourceRef.from_config(data_config, config_field(data_config, "train_split", "train"))
  num_stored = len(source)
  subset = int(config_field(data_config, "train_subset", 0) or 0)
  num_examples = num_stored if subset <= 0 else min(subset, num_stored)
  if subset > num_stored:
    logging.warning("train_subset=%d is more than the %d examples of %s; using all of them.",
                    subset, num_stored, source.split)
  if num_examples < global_batch_size:
    raise ValueError(
        f"global_batch_size={global_batch_size} is larger than the {num_examples} training "
        f"examples of {data_config.name!r}; an epoch would have no full batch.")
  period = int(config_field(data_config, "augment_period", 0) or 0)
  if period < 0:
    raise ValueError(f"data.augment_period must be >= 0, got {period}.")
  batcher = _TrainBatcher(
      source=source,
      num_examples=num_examples,
      global_batch_size=global_batch_size,
      batch_size=batch_size,
      process_index=process_index,
      seed=int(seed),
      augment=augment,
      crop_padding=int(config_field(data_config, "crop_padding", 0) or 0),
      pixel_max=info.pixel_max,
      mean=info.mean,
      std=info.std,
      augment_seed=augment_seed(data_config, seed),
      augment_period=period,
      side_data=tuple((side_data or {}).items()),
  )
  return TrainIterator(batcher, num_workers=int(config_field(data_config, "num_workers", 0) or 0))


def eval_batches(data_config: Any, *, global_batch_size: int, split: str | None = None,
                 process_index: int = 0, process_count: int = 1,
                 side_data: Mapping[str, SideData] | None = None) -> EvalIterator:
  """One ordered pass over an eval split, no augmentation, every batch the same shape.

  Batches are `{'image', 'label', 'id', 'mask'}` (and `side_data`'s keys, `fn(0, ids)`);
  the last global batch is padded to full size with rows whose `mask` is 0 (image 0,
  label 0, id -1, side data 0), so one compiled eval step serves every batch. Every
  process gets the same number of batches.
  """
  batch_size = local_batch_size(global_batch_size, process_index, process_count)
  split = split or config_field(data_config, "eval_split", "test")
  info = get_info(data_config)
  source = SourceRef.from_config(data_config, split)
  return EvalIterator(
      source=source,
      global_batch_size=global_batch_size,
      batch_size=batch_size,
      process_index=process_index,
      image_shape=info.image_shape,
      pixel_max=info.pixel_max,
      mean=info.mean,
      std=info.std,
      side_data=tuple((side_data or {}).items()),
  )


def augment_seed(data_config: Any, seed: int) -> int:
  """The seed of the augmentation draws: `data.augment_seed`, else the run's `seed`."""
  return int(config_field(data_config, "augment_seed", seed))


class TrainIterator(Iterator[dict[str, np.ndarray]]):
  """Infinite iterator of train batches whose position saves and restores as a JSON dict."""

  def __init__(self, batcher: _TrainBatcher, num_workers: int = 0):
    self._batcher = batcher
    self._num_workers = num_workers
    # Random access by step: `dataset[s]` is batch s of this process.
    self.dataset: grain.MapDataset = grain.MapDataset.range(0, _MAX_STEPS).map(batcher)
    self._step = 0
    self._prefetch: Any = None  # grain multiprocessing iterator, started lazily.

  @property
  def step(self) -> int:
    """The step of the next batch (number of batches consumed since step 0)."""
    return self._step

  @property
  def steps_per_epoch(self) -> int:
    return self._batcher.steps_per_epoch

  @property
  def epoch(self) -> int:
    """The epoch that the next batch belongs to."""
    return self._step // self.steps_per_epoch

  @property
  def num_examples(self) -> int:
    """Training examples in use (after `train_subset`)."""
    return self._batcher.num_examples

  def examples(self, epoch: int, ids: np.ndarray) -> dict[str, np.ndarray]:
    """Examples `ids` (any stored ids) exactly as epoch `epoch`'s batches show them."""
    return self._batcher.examples(epoch, np.asarray(ids, np.int64))

  def __iter__(self) -> TrainIterator:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self._num_workers > 0:
      if self._prefetch is None:
        # grain's worker processes read absl flags (e.g. its profiling flag); outside an
        # absl app (pytest, a notebook) nothing has parsed them, so use their defaults.
        if not flags.FLAGS.is_parsed():
          flags.FLAGS.mark_as_parsed()
        self._prefetch = iter(
            self.dataset[self._step:]
            .to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=1))
            .mp_prefetch(grain.MultiprocessingOptions(
                num_workers=self._num_workers, per_worker_buffer_size=2)))
      batch = next(self._prefetch)
    else:
      batch = self.dataset[self._step]
    self._step += 1
    return batch

  def get_state(self) -> dict[str, Any]:
    """The position, as a JSON-serialisable dict (plus what it is only valid for)."""
    b = self._batcher
    return {
        "step": self._step,
        "seed": b.seed,
        "global_batch_size": b.global_batch_size,
        "num_examples": b.num_examples,
        "split": b.source.split,
        "name": b.source.name,
    }

  def set_state(self, state: dict[str, Any]) -> None:
    """Continues at `state['step']`; refuses a state made for another data stream."""
    mine = self.get_state()
    for key in ("seed", "global_batch_size", "num_examples", "split", "name"):
      if key in state and state[key] != mine[key]:
        raise ValueError(
            f"Data iterator state was saved with {key}={state[key]!r}, but this iterator has "
            f"{key}={mine[key]!r}: its step {state['step']} would point at other batches.")
    self.close()
    self._step = int(state["step"])

  def close(self) -> None:
    """Stops prefetch workers, if any (the iterator stays usable)."""
    if self._prefetch is not None:
      close = getattr(self._prefetch, "close", None)
      if close is not None:
        close()
      self._prefetch = None


class EvalIterator(Iterator[dict[str, np.ndarray]]):
  """One pass over an eval split in stored order; see `eval_batches`."""

  def __init__(self, *, source: SourceRef, global_batch_size: int, batch_size: int,
               process_index: int, image_shape: tuple[int, int, int], pixel_max: float,
               mean: Sequence[float], std: Sequence[float],
               side_data: tuple[tuple[str, SideData], ...] = ()):
    self._source = source
    self._global_batch_size = global_batch_size
    self._batch_size = batch_size
    self._process_index = process_index
    self._image_shape = image_shape
    self._norm = (pixel_max, mean, std)
    self._side_data = side_data
    self.num_examples = len(source)
    self._num_batches = math.ceil(self.num_examples / global_batch_size)
    self._next = 0

  def __len__(self) -> int:
    return self._num_batches

  def __iter__(self) -> EvalIterator:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self._next >= self._num_batches:
      raise StopIteration
    b = self._batch_size
    positions = (self._next * self._global_batch_size + self._process_index * b
                 + np.arange(b, dtype=np.int64))
    self._next += 1
    real = positions[positions < self.num_examples]  # A prefix: positions increase.
    n = len(real)
    image = np.zeros((b, *self._image_shape), np.float32)
    label = np.zeros((b,), np.int32)
    ids = np.full((b,), -1, np.int64)
    mask = np.zeros((b,), np.float32)
    if n:
      raw, labels = self._source.read(real)
      image[:n] = normalize_images(raw, *self._norm)
      label[:n] = labels
      ids[:n] = real
      mask[:n] = 1.0
    batch = {"image": image, "label": label, "id": ids, "mask": mask}
    for key, fn in self._side_data:
      value = np.asarray(fn(0, real))
      batch[key] = np.zeros((b, *value.shape[1:]), value.dtype)
      batch[key][:n] = value
    return batch


# --------------------------------------------------------------------------- internals


@dataclasses.dataclass
class _TrainBatcher:
  """step -> this process's train batch; a pure function of its fields and the step."""

  source: SourceRef
  num_examples: int
  global_batch_size: int
  batch_size: int
  process_index: int
  seed: int
  augment: str
  crop_padding: int
  pixel_max: float
  mean: tuple[float, ...]
  std: tuple[float, ...]
  augment_seed: int = 0
  augment_period: int = 0
  side_data: tuple[tuple[str, SideData], ...] = ()
  _order: tuple[int, np.ndarray] | None = dataclasses.field(default=None, repr=False)

  @property
  def steps_per_epoch(self) -> int:
    return self.num_examples // self.global_batch_size

  def epoch_order(self, epoch: int) -> np.ndarray:
    """The order in which epoch `epoch` visits the examples (a permutation of range(n))."""
    if self._order is None or self._order[0] != epoch:
      keys = hash_keys(self.seed, STREAM_SHUFFLE, epoch, np.arange(self.num_examples))
      self._order = (epoch, np.argsort(keys, kind="stable"))
    return self._order[1]

  def __call__(self, step: int) -> dict[str, np.ndarray]:
    epoch, index = divmod(int(step), self.steps_per_epoch)
    positions = (index * self.global_batch_size + self.process_index * self.batch_size
                 + np.arange(self.batch_size, dtype=np.int64))
    ids = self.epoch_order(epoch)[positions].astype(np.int64)
    batch = self.examples(epoch, ids)
    for key, fn in self.side_data:
      batch[key] = np.asarray(fn(epoch, ids))
    return batch

  def examples(self, epoch: int, ids: np.ndarray) -> dict[str, np.ndarray]:
    """Examples `ids` as epoch `epoch` shows them: the augmentation is a function of
    (augment seed, epoch or epoch % augment_period, id) alone."""
    raw, labels = self.source.read(ids)
    draw_epoch = epoch % self.augment_period if self.augment_period else epoch
    bits = hash_keys(self.augment_seed, STREAM_AUGMENT, draw_epoch, ids)
    raw = augment_images(raw, self.augment, self.crop_padding, bits)
    return {"image": normalize_images(raw, self.pixel_max, self.mean, self.std), "label": labels,
            "id": ids}

  def __getstate__(self) -> dict[str, Any]:
    return {**self.__dict__, "_order": None}


def local_batch_size(global_batch_size: int, process_index: int, process_count: int) -> int:
  """Rows per process, global_batch_size // process_count, after checking that it divides."""
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(f"Bad process_index={process_index} / process_count={process_count}.")
  if global_batch_size < 1 or global_batch_size % process_count:
    raise ValueError(f"global_batch_size={global_batch_size} must be a positive multiple of "
                     f"process_count={process_count}.")
  return global_batch_size // process_count
