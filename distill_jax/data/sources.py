"""Data sources: where the examples come from, and what a run needs to know about them.

A data set is a TFDS builder prepared in a data_dir as ArrayRecord, read through
`tfds.data_source` (random access by index, no TensorFlow). The embedded data sets
(`digits`) build themselves into the data_dir on first use; anything else is prepared
once with `scripts/prepare_data.py`, and a missing one raises `DataNotPreparedError`
with that command, since training never downloads.

`SourceRef` is one split: it opens lazily (once per process, again in each grain
worker) and reads examples by stored index as raw NumPy arrays. Splits small enough
(`data_config.cache`, < 2 GiB of raw images: digits, CIFAR) are decoded once into
memory, since TFDS's per-record decoding (~6k records/s here) would otherwise dominate
small-model training. `get_info` describes a data set (classes, image shape, split
sizes, normalisation constants) and `split_digest` fingerprints a split's contents.

This module reads data and configs only; the per-example transforms are in
`transforms`, and the batching built on both is in `iterators`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
from collections.abc import Sequence
from typing import Any

import ml_collections
import numpy as np
import tensorflow_datasets as tfds
from absl import logging

from distill_jax.data import embedded

DATA_DIR_ENV = "DISTILL_JAX_DATA_DIR"
DEFAULT_DATA_DIR = "~/.cache/distill_jax/tfds"

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

# Splits whose raw images take at most this much memory are decoded once and kept.
_CACHE_LIMIT_BYTES = 2 * 2**30


class DataNotPreparedError(FileNotFoundError):
  """A TFDS data set is not prepared (as ArrayRecord) in the data_dir; nothing downloads."""


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What a model and a run need to know about a data set."""

  name: str
  num_classes: int
  image_shape: tuple[int, int, int]  # (H, W, C) of the batches.
  # Per split, as stored (before `train_subset`), and the config's train and eval splits when
  # they are TFDS slices of a stored one ('train[:1200]', 'train[1200:]').
  num_examples: dict[str, int]
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
      # A stored split, or a TFDS slice of one: 'train[:1200]' to train and 'train[1200:]' to
      # evaluate tunes a recipe on held-out train images, never on the test split.
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
  data_dir = config_field(data_config, "data_dir", None)
  return os.path.abspath(os.path.expanduser(data_dir)) if data_dir else default_data_dir()


def get_info(data_config: Any) -> DatasetInfo:
  """Describes the configured data set (building an embedded one if needed)."""
  name = data_config.name
  builder = prepared_builder(name, resolve_data_dir(data_config))
  features = builder.info.features
  image_feature = features[config_field(data_config, "image_key", "image")]
  shape = tuple(image_feature.shape)
  if len(shape) == 2:
    shape = (*shape, 1)
  if len(shape) != 3 or any(d is None for d in shape):
    raise ValueError(
        f"Data set {name!r} has images of shape {tuple(image_feature.shape)}; this pipeline "
        "needs a fixed (H, W, C) image shape (variable-size images need a resize step).")
  num_classes = features[config_field(data_config, "label_key", "label")].num_classes
  pixel_max, mean, std = _normalization(data_config, shape[-1])
  return DatasetInfo(
      name=name,
      num_classes=int(num_classes),
      image_shape=(int(shape[0]), int(shape[1]), int(shape[2])),
      num_examples=_split_sizes(builder, data_config),
      mean=mean,
      std=std,
      pixel_max=pixel_max,
  )


# split_digest's results, per (data set, data_dir, split): each split is hashed once per process.
_DIGESTS: dict[tuple[str, str, str], str] = {}


def split_digest(data_config: Any, split: str) -> str:
  """SHA-256 of a split's stored images and labels, in stored order: what "the same data"
  means when a teacher's cached outputs are matched to a run (reads the whole split once
  per process)."""
  key = (data_config.name, resolve_data_dir(data_config), split)
  if key not in _DIGESTS:
    source = SourceRef.from_config(data_config, split)
    digest = hashlib.sha256()
    for start in range(0, len(source), 4096):
      images, labels = source.read(np.arange(start, min(start + 4096, len(source))))
      digest.update(np.ascontiguousarray(images).tobytes())
      digest.update(np.ascontiguousarray(labels, np.int64).tobytes())
    _DIGESTS[key] = digest.hexdigest()
  return _DIGESTS[key]


# --------------------------------------------------------------------------- internals


@dataclasses.dataclass
class SourceRef:
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
  def from_config(cls, data_config: Any, split: str) -> SourceRef:
    """Opens `split` now, so a missing data set fails here, with the preparation hint."""
    ref = cls(name=data_config.name, data_dir=resolve_data_dir(data_config), split=split,
              image_key=config_field(data_config, "image_key", "image"),
              label_key=config_field(data_config, "label_key", "label"))
    if config_field(data_config, "cache", True):
      feature = prepared_builder(ref.name, ref.data_dir).info.features[ref.image_key]
      shape = tuple(feature.shape)
      if all(d is not None for d in shape):
        nbytes = len(ref.get()) * math.prod(shape) * np.dtype(feature.np_dtype).itemsize
        ref.cache = nbytes <= _CACHE_LIMIT_BYTES
    ref.get()
    return ref

  def get(self) -> Sequence[dict[str, Any]]:
    """The TFDS data source of the split (random access to decoded example dicts)."""
    if self._source is None:
      prepared_builder(self.name, self.data_dir)
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


def _read(source: Any, ids: np.ndarray, image_key: str,
          label_key: str) -> tuple[np.ndarray, np.ndarray]:
  """Reads examples `ids` as (uint8-ish images [n, H, W, C], int32 labels [n])."""
  records = source.__getitems__([int(i) for i in ids])
  images = np.stack([np.asarray(r[image_key]) for r in records])
  if images.ndim == 3:  # Grey images stored as (H, W).
    images = images[..., None]
  labels = np.asarray([r[label_key] for r in records], dtype=np.int32)
  return images, labels


def _split_sizes(builder: tfds.core.DatasetBuilder, data_config: Any) -> dict[str, int]:
  """Examples per stored split, plus the configured train/eval splits when they are slices."""
  sizes = {str(k): int(v.num_examples) for k, v in builder.info.splits.items()}
  for key in ("train_split", "eval_split"):
    split = config_field(data_config, key, None)
    if split is None or split in sizes:
      continue
    try:
      sizes[split] = int(builder.info.splits[split].num_examples)
    except (ValueError, KeyError) as e:
      raise ValueError(
          f"data.{key}={split!r} is not a split of {data_config.name!r} ({sorted(sizes)}) or a "
          f"TFDS slice of one, e.g. 'train[:1200]' or 'train[80%:]': "
          f"{str(e).splitlines()[0]}") from None
  return sizes


def config_field(config: Any, name: str, default: Any) -> Any:
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
  if base not in _NORMALIZATION and config_field(data_config, "mean", None) is None:
    logging.warning("No normalisation constants for %r; using mean 0.5, std 0.5 per channel "
                    "(set data.mean / data.std to override).", data_config.name)
  mean = tuple(float(m) for m in config_field(data_config, "mean", mean))
  std = tuple(float(s) for s in config_field(data_config, "std", std))
  pixel_max = float(config_field(data_config, "pixel_max", pixel_max))
  if len(mean) != channels or len(std) != channels:
    raise ValueError(f"Normalisation of {data_config.name!r} has {len(mean)} means and "
                     f"{len(std)} stds for {channels}-channel images.")
  return pixel_max, mean, std


def unprepared(name: str, data_dir: str) -> str | None:
  """Why the TFDS data set `name` cannot be read from `data_dir` as it is, in one line, or None:
  a TFDS set must have been prepared there (`scripts/prepare_data.py`); an embedded set builds
  itself, and other names are not TFDS's. For checks before a launch (sweeps): nothing is
  built or read but TFDS's metadata."""
  if embedded.is_embedded(name):
    return None
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError:
    return None  # Not a TFDS set (e.g. the 'jsonl' of black-box text): its reader checks it.
  if builder.is_prepared():
    return None
  return (f"Data set {name!r} is not prepared in data_dir {data_dir!r} (no {builder.data_path}):"
          f" prepare it once with `python scripts/prepare_data.py {name} --data_dir=DIR` (on a "
          "machine with internet access) and point data.data_dir at DIR")


def prepared_builder(name: str, data_dir: str) -> tfds.core.DatasetBuilder:
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
