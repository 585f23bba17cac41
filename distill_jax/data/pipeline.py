"""Input pipelines: TFDS ArrayRecord sources (random access, no TensorFlow) + grain.

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
`data_config.num_workers > 0`. Splits small enough (`data_config.cache`, < 2 GiB of
raw images: digits, CIFAR) are decoded once into memory, since TFDS's per-record
decoding (~6k records/s here) would otherwise dominate small-model training.

Pseudo-random numbers come from a counter-based hash (SplitMix64 finaliser) of the
keys rather than a stateful generator: it is cheap to vectorise, has no state to
save, and gives the same numbers on every NumPy version and machine.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import grain
import ml_collections
import numpy as np
import tensorflow_datasets as tfds
from absl import flags, logging

from distill_jax.data import embedded

DATA_DIR_ENV = "DISTILL_JAX_DATA_DIR"
DEFAULT_DATA_DIR = "~/.cache/distill_jax/tfds"
AUGMENTATIONS = ("crop_flip", "crop", "none")

# (max pixel value, per-channel mean, per-channel std) of pixels scaled to [0, 1].
_NORMALIZATION: dict[str, tuple[float, tuple[float, ...], tuple[float, ...]]] = {
    # Computed once from the 1500 train images of `digits` (pixels / 16, all pixels
    # pooled): x = load_digits().images[default_rng(0).permutation(1797)[:1500]] / 16;
    # x.mean() = 0.305693359375, x.std() = 0.37606837746108696.
    "digits": (16.0, (0.305693359375,), (0.37606837746108696,)),
    # The usual CIFAR constants: per-channel mean and std over all training pixels.
    "cifar10": (255.0, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": (255.0, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "mnist": (255.0, (0.1307,), (0.3081,)),
    "fashion_mnist": (255.0, (0.2860,), (0.3530,)),
    "imagenet2012": (255.0, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}

# Upper bound for the step-indexed grain dataset (it must have a length).
_MAX_STEPS = 2**62
# Splits whose raw images take at most this much memory are decoded once and kept.
_CACHE_LIMIT_BYTES = 2 * 2**30

# (epoch, example ids [n]) -> per-example values [n, ...] added to each batch under a key.
SideData = Callable[[int, np.ndarray], np.ndarray]

# Hash streams: independent random numbers for the shuffle and the augmentation.
_STREAM_SHUFFLE = 1
_STREAM_AUGMENT = 2


class DataNotPreparedError(FileNotFoundError):
  """A TFDS data set is not prepared (as ArrayRecord) in the data_dir; nothing downloads."""


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What a model and a run need to know about a data set."""

  name: str
  num_classes: int
  image_shape: tuple[int, int, int]  # (H, W, C) of the batches.
  num_examples: dict[str, int]  # Per split, as stored (before `train_subset`).
  mean: tuple[float, ...]  # Per channel, of pixels scaled to [0, 1].
  std: tuple[float, ...]
  pixel_max: float = 255.0  # Raw pixels are divided by this before normalising.


def default_data_config(name: str = "digits") -> ml_collections.ConfigDict:
  """Sensible data settings for `name` (digits: crop only, padding 1; others: crop+flip, 4)."""
  small = name == "digits"
  return ml_collections.ConfigDict({
      "name": name,
      # None -> $DISTILL_JAX_DATA_DIR, else ~/.cache/distill_jax/tfds.
      "data_dir": ml_collections.config_dict.placeholder(str),
      "train_split": "train",
      "eval_split": "test",
      # A flipped digit is another symbol (or none), so digits only crop.
      "augment": "crop" if small else "crop_flip",
      "crop_padding": 1 if small else 4,
      # None: the run's seed. Fixing it gives every seed of a sweep the same augmentations.
      "augment_seed": ml_collections.config_dict.placeholder(int),
      # 0: new augmentation draws every epoch; P > 0: epoch e reuses epoch e % P's draws.
      "augment_period": 0,
      "num_workers": 0,  # 0: batches are made in-process; N: N grain worker processes.
      "train_subset": 0,  # 0: all training examples; N: only the first N (stored order).
      "cache": True,  # Keep a decoded copy of each split in memory when it is < 2 GiB.
  })


def default_data_dir() -> str:
  """$DISTILL_JAX_DATA_DIR if set, else ~/.cache/distill_jax/tfds (absolute)."""
  return os.path.abspath(os.path.expanduser(os.environ.get(DATA_DIR_ENV) or DEFAULT_DATA_DIR))


def resolve_data_dir(data_config: Any) -> str:
  """The data_dir a config means: its own `data_dir`, else `default_data_dir()`."""
  data_dir = _field(data_config, "data_dir", None)
  return os.path.abspath(os.path.expanduser(data_dir)) if data_dir else default_data_dir()


def get_info(data_config: Any) -> DatasetInfo:
  """Describes the configured data set (building an embedded one if needed)."""
  name = data_config.name
  builder = _prepared_builder(name, resolve_data_dir(data_config))
  features = builder.info.features
  image_feature = features[_field(data_config, "image_key", "image")]
  shape = tuple(image_feature.shape)
  if len(shape) == 2:
    shape = (*shape, 1)
  if len(shape) != 3 or any(d is None for d in shape):
    raise ValueError(
        f"Data set {name!r} has images of shape {tuple(image_feature.shape)}; this pipeline "
        "needs a fixed (H, W, C) image shape (variable-size images need a resize step).")
  num_classes = features[_field(data_config, "label_key", "label")].num_classes
  pixel_max, mean, std = _normalization(data_config, shape[-1])
  return DatasetInfo(
      name=name,
      num_classes=int(num_classes),
      image_shape=(int(shape[0]), int(shape[1]), int(shape[2])),
      num_examples={str(k): int(v.num_examples) for k, v in builder.info.splits.items()},
      mean=mean,
      std=std,
      pixel_max=pixel_max,
  )


def train_iterator(data_config: Any, *, global_batch_size: int, seed: int,
                   process_index: int = 0, process_count: int = 1,
                   side_data: Mapping[str, SideData] | None = None) -> TrainIterator:
  """An infinite, deterministic iterator over this process's share of the train batches.

  Each batch is `{'image': float32 [b, H, W, C] (normalised, augmented), 'label':
  int32 [b], 'id': int64 [b]}` with b = global_batch_size // process_count; `id` is
  the example's index in the stored train split. `side_data` adds `key: fn(epoch, id)`.
  """
  batch_size = _local_batch_size(global_batch_size, process_index, process_count)
  augment = _field(data_config, "augment", "none")
  if augment not in AUGMENTATIONS:
    raise ValueError(f"Unknown augment {augment!r}; choose one of {AUGMENTATIONS}.")
  info = get_info(data_config)
  source = _SourceRef.from_config(data_config, _field(data_config, "train_split", "train"))
  num_stored = len(source)
  subset = int(_field(data_config, "train_subset", 0) or 0)
  num_examples = num_stored if subset <= 0 else min(subset, num_stored)
  if subset > num_stored:
    logging.warning("train_subset=%d is more than the %d examples of %s; using all of them.",
                    subset, num_stored, source.split)
  if num_examples < global_batch_size:
    raise ValueError(
        f"global_batch_size={global_batch_size} is larger than the {num_examples} training "
        f"examples of {data_config.name!r}; an epoch would have no full batch.")
  period = int(_field(data_config, "augment_period", 0) or 0)
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
      crop_padding=int(_field(data_config, "crop_padding", 0) or 0),
      pixel_max=info.pixel_max,
      mean=info.mean,
      std=info.std,
      augment_seed=augment_seed(data_config, seed),
      augment_period=period,
      side_data=tuple((side_data or {}).items()),
  )
  return TrainIterator(batcher, num_workers=int(_field(data_config, "num_workers", 0) or 0))


def eval_batches(data_config: Any, *, global_batch_size: int, split: str | None = None,
                 process_index: int = 0, process_count: int = 1,
                 side_data: Mapping[str, SideData] | None = None) -> EvalIterator:
  """One ordered pass over an eval split, no augmentation, every batch the same shape.

  Batches are `{'image', 'label', 'id', 'mask'}` (and `side_data`'s keys, `fn(0, ids)`);
  the last global batch is padded to full size with rows whose `mask` is 0 (image 0,
  label 0, id -1, side data 0), so one compiled eval step serves every batch. Every
  process gets the same number of batches.
  """
  batch_size = _local_batch_size(global_batch_size, process_index, process_count)
  split = split or _field(data_config, "eval_split", "test")
  info = get_info(data_config)
  source = _SourceRef.from_config(data_config, split)
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
  return int(_field(data_config, "augment_seed", seed))


# split_digest's results, per (data set, data_dir, split): each split is hashed once per process.
_DIGESTS: dict[tuple[str, str, str], str] = {}


def split_digest(data_config: Any, split: str) -> str:
  """SHA-256 of a split's stored images and labels, in stored order: what "the same data"
  means when a teacher's cached outputs are matched to a run (reads the whole split once
  per process)."""
  key = (data_config.name, resolve_data_dir(data_config), split)
  if key not in _DIGESTS:
    source = _SourceRef.from_config(data_config, split)
    digest = hashlib.sha256()
    for start in range(0, len(source), 4096):
      images, labels = source.read(np.arange(start, min(start + 4096, len(source))))
      digest.update(np.ascontiguousarray(images).tobytes())
      digest.update(np.ascontiguousarray(labels, np.int64).tobytes())
    _DIGESTS[key] = digest.hexdigest()
  return _DIGESTS[key]



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

  def __init__(self, *, source: _SourceRef, global_batch_size: int, batch_size: int,
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
      image[:n] = _normalize(raw, *self._norm)
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
class _SourceRef:
  """One split of a data set: opens the TFDS data source lazily (once per process).

  With `cache`, the first read decodes the whole split into two NumPy arrays and
  later reads are array gathers (TFDS decodes ~10k records/s, a gather is ~100x
  faster). Pickles without the open source or the cache, so grain worker processes
  reopen the split themselves.
  """

  name: str
  data_dir: str
  split: str
  image_key: str = "image"
  label_key: str = "label"
  cache: bool = False
  _source: Any = dataclasses.field(default=None, repr=False, compare=False)
  _arrays: tuple[np.ndarray, np.ndarray] | None = dataclasses.field(
      default=None, repr=False, compare=False)

  @classmethod
  def from_config(cls, data_config: Any, split: str) -> _SourceRef:
    """Opens `split` now, so a missing data set fails here, with the preparation hint."""
    ref = cls(name=data_config.name, data_dir=resolve_data_dir(data_config), split=split,
              image_key=_field(data_config, "image_key", "image"),
              label_key=_field(data_config, "label_key", "label"))
    if _field(data_config, "cache", True):
      feature = _prepared_builder(ref.name, ref.data_dir).info.features[ref.image_key]
      shape = tuple(feature.shape)
      if all(d is not None for d in shape):
        nbytes = len(ref.get()) * math.prod(shape) * np.dtype(feature.np_dtype).itemsize
        ref.cache = nbytes <= _CACHE_LIMIT_BYTES
    ref.get()
    return ref

  def get(self) -> Sequence[dict[str, Any]]:
    """The TFDS data source of the split (random access to decoded example dicts)."""
    if self._source is None:
      _prepared_builder(self.name, self.data_dir)
      self._source = tfds.data_source(
          self.name, split=self.split, data_dir=self.data_dir, download=False)
    return self._source

  def __len__(self) -> int:
    return len(self.get())

  def read(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Examples `ids` (indices into the split) as (raw images [n, H, W, C], int32 labels)."""
    if not self.cache:
      return _read(self.get(), ids, self.image_key, self.label_key)
    if self._arrays is None:
      chunks = [_read(self.get(), np.arange(i, min(i + 4096, len(self))), self.image_key,
                      self.label_key) for i in range(0, len(self), 4096)]
      self._arrays = (np.concatenate([c[0] for c in chunks]),
                      np.concatenate([c[1] for c in chunks]))
    return self._arrays[0][ids], self._arrays[1][ids]

  def __getstate__(self) -> dict[str, Any]:
    return {**self.__dict__, "_source": None, "_arrays": None}


@dataclasses.dataclass
class _TrainBatcher:
  """step -> this process's train batch; a pure function of its fields and the step."""

  source: _SourceRef
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
      keys = _hash(self.seed, _STREAM_SHUFFLE, epoch, np.arange(self.num_examples))
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
    bits = _hash(self.augment_seed, _STREAM_AUGMENT, draw_epoch, ids)
    raw = _augment(raw, self.augment, self.crop_padding, bits)
    return {"image": _normalize(raw, self.pixel_max, self.mean, self.std), "label": labels,
            "id": ids}

  def __getstate__(self) -> dict[str, Any]:
    return {**self.__dict__, "_order": None}


def _read(source: Any, ids: np.ndarray, image_key: str,
          label_key: str) -> tuple[np.ndarray, np.ndarray]:
  """Reads examples `ids` as (uint8-ish images [n, H, W, C], int32 labels [n])."""
  records = source.__getitems__([int(i) for i in ids])
  images = np.stack([np.asarray(r[image_key]) for r in records])
  if images.ndim == 3:  # Grey images stored as (H, W).
    images = images[..., None]
  labels = np.asarray([r[label_key] for r in records], dtype=np.int32)
  return images, labels


def _augment(images: np.ndarray, mode: str, padding: int, bits: np.ndarray) -> np.ndarray:
  """Random crop from the zero-padded image (and, for 'crop_flip', a horizontal flip).

  `bits` holds one random 64-bit word per image: bits 0..15 pick the row offset,
  16..31 the column offset, bit 32 the flip. Done as one gather over the batch.
  """
  if mode == "none" or (mode == "crop" and padding == 0):
    return images
  n, h, w, _ = images.shape
  size = np.uint64(2 * padding + 1)
  dy = (bits % size).astype(np.int64)
  dx = ((bits >> np.uint64(16)) % size).astype(np.int64)
  if mode == "crop_flip":
    flip = ((bits >> np.uint64(32)) & np.uint64(1)).astype(bool)
  else:
    flip = np.zeros(n, bool)
  padded = np.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  rows = dy[:, None] + np.arange(h)
  cols = dx[:, None] + np.where(flip[:, None], np.arange(w)[::-1], np.arange(w))
  return padded[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]


def _normalize(images: np.ndarray, pixel_max: float, mean: Sequence[float],
               std: Sequence[float]) -> np.ndarray:
  scale = np.float32(1.0 / pixel_max)
  mean = np.asarray(mean, np.float32)
  inv_std = np.float32(1.0) / np.asarray(std, np.float32)
  return (images.astype(np.float32) * scale - mean) * inv_std


_GOLDEN = 0x9E3779B97F4A7C15


def _mix64(x: np.ndarray) -> np.ndarray:
  """SplitMix64's finaliser: a bijection on uint64 that scrambles every bit."""
  x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
  x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
  return x ^ (x >> np.uint64(31))


def _hash(*keys: int | np.ndarray) -> np.ndarray:
  """Random-looking uint64 words from integer keys (broadcast; at least 1-D)."""
  arrays = [np.atleast_1d(np.asarray(k % 2**64 if isinstance(k, int) else k)).astype(np.uint64)
            for k in keys]
  arrays = np.broadcast_arrays(*arrays)
  h = np.full(arrays[0].shape, _GOLDEN, np.uint64)
  for a in arrays:  # 1-D+ arrays: uint64 arithmetic wraps silently, as intended.
    h = _mix64(h ^ (a + np.uint64(_GOLDEN)))
  return h


def _local_batch_size(global_batch_size: int, process_index: int, process_count: int) -> int:
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(f"Bad process_index={process_index} / process_count={process_count}.")
  if global_batch_size < 1 or global_batch_size % process_count:
    raise ValueError(f"global_batch_size={global_batch_size} must be a positive multiple of "
                     f"process_count={process_count}.")
  return global_batch_size // process_count


def _field(config: Any, name: str, default: Any) -> Any:
  """`config.name`, or `default` when the config has no such field."""
  try:
    value = getattr(config, name)
  except (AttributeError, KeyError):
    return default
  return default if value is None else value


def _base_name(name: str) -> str:
  """'cifar10:3.0.2' or 'cifar10/config' -> 'cifar10'."""
  return name.split(":")[0].split("/")[0]


def _normalization(data_config: Any, channels: int
                   ) -> tuple[float, tuple[float, ...], tuple[float, ...]]:
  """(pixel_max, mean, std): the config's own, else the table's, else 0.5 / 0.5."""
  base = _base_name(data_config.name)
  pixel_max, mean, std = _NORMALIZATION.get(base, (255.0, (0.5,) * channels, (0.5,) * channels))
  if base not in _NORMALIZATION and _field(data_config, "mean", None) is None:
    logging.warning("No normalisation constants for %r; using mean 0.5, std 0.5 per channel "
                    "(set data.mean / data.std to override).", data_config.name)
  mean = tuple(float(m) for m in _field(data_config, "mean", mean))
  std = tuple(float(s) for s in _field(data_config, "std", std))
  pixel_max = float(_field(data_config, "pixel_max", pixel_max))
  if len(mean) != channels or len(std) != channels:
    raise ValueError(f"Normalisation of {data_config.name!r} has {len(mean)} means and "
                     f"{len(std)} stds for {channels}-channel images.")
  return pixel_max, mean, std


def _prepared_builder(name: str, data_dir: str) -> tfds.core.DatasetBuilder:
  """The TFDS builder of a prepared, random-access copy of `name` in `data_dir`.

  Embedded data sets are built on the spot; anything else must have been prepared
  beforehand (training never downloads), else a DataNotPreparedError says how.
  """
  if embedded.is_embedded(name):
    embedded.ensure_embedded(name, data_dir)
    return embedded.EMBEDDED.get(name)(data_dir=data_dir, file_format="array_record")
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise ValueError(
        f"Unknown data set {name!r}: neither an embedded data set "
        f"({', '.join(embedded.EMBEDDED.names())}) nor a TFDS data set.\n{e}") from None
  command = f"python scripts/prepare_data.py {name} --data_dir={data_dir}"
  if not builder.is_prepared():
    raise DataNotPreparedError(
        f"Data set {name!r} is not prepared in data_dir {data_dir!r} (looked in "
        f"{builder.data_path}); training never downloads. Prepare it once, on a machine with "
        f"internet access (and TensorFlow installed, to encode the images), with:\n"
        f"  {command}\n"
        f"then copy that data_dir here, or point data.data_dir / ${DATA_DIR_ENV} at it.")
  file_format = builder.info.file_format
  if file_format not in tfds.core.file_adapters.FileFormat.with_random_access():
    raise DataNotPreparedError(
        f"Data set {name!r} in {builder.data_path} is stored as {file_format}, which has no "
        f"random access; prepare an ArrayRecord copy (in another data_dir) with:\n"
        f"  {command}")
  return builder
