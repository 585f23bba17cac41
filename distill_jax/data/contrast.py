"""Class-aware contrast indices for CRD: per example, a positive and negatives of other classes.

RepDistiller's CIFAR-100 loader for CRD (`CIFAR100InstanceSample`) gives every training example,
besides its image, `sample_idx = [positive, n_1 .. n_K]`: memory-bank rows that the `crd` loss
scores the example against. The negatives are drawn from the examples of *other* classes; the
positive is the example itself (its `mode='exact'`) or a random example of the same class
(`mode='relax'`). `class_contrast_indices` builds that as side data of the train pipeline
(`train_iterator(side_data={'contrast_idx': fn})`), so the ids travel with the batch as
`batch['contrast_idx']` (int32 [B, 1 + K]) and `crd` with `negatives='other_class'` uses them.

The draws are a pure function of (seed, epoch, example id, column), from the same counter-based
hash as the rest of the pipeline: deterministic per seed, new every epoch (as the reference's
loader, which draws anew at every visit), independent of the batch, of the process layout and
of the step at which a run resumed. Negatives are drawn uniformly from the other classes' examples
*with* replacement (the reference draws without replacement when K is at most their number;
the two differ only in how often a row repeats within one example's K, 16384 of ~49500 on
CIFAR-100, which leaves the loss's expectation unchanged) at a cost of a few vector operations
per entry, no per-example permutation (about 40-80 ms for a batch of 64 with K = 16384 on one
CPU core; `data.num_workers > 0` makes the batches, these draws included, in parallel worker
processes).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

from distill_jax.data import batch_keys
from distill_jax.data.sources import SourceRef, config_field
from distill_jax.data.transforms import GOLDEN, hash_keys, mix64

POSITIVES = ("self", "same_class")
batch_keys.declare("contrast_idx", what="CRD's memory-bank rows drawn from the data's labels, "
                   "which a sample has none of")
_STREAM_CONTRAST = 3  # Streams 1 and 2 are transforms.STREAM_SHUFFLE and STREAM_AUGMENT.


def class_contrast_indices(labels: np.ndarray, num_negatives: int, seed: int,
                           positive: str = "self") -> ClassContrastIndices:
  """Side data `fn(epoch, ids) -> int32 [n, 1 + num_negatives]`: column 0 the positive, then
  negatives drawn uniformly (with replacement) from the examples whose label differs.

  Args:
    labels: int [N], the label of every training example, indexed by id.
    num_negatives: K, negatives per example.
    seed: the draws' seed (the run's seed).
    positive: 'self' (the example's own id, RepDistiller's 'exact') or 'same_class' (a random
      example of its class, possibly itself: 'relax').
  """
  labels = np.asarray(labels, np.int64)
  if labels.ndim != 1 or not len(labels):
    raise ValueError(f"class_contrast_indices needs labels [N], got shape {labels.shape}.")
  if positive not in POSITIVES:
    raise ValueError(f"Unknown positive {positive!r}; choose one of {POSITIVES}.")
  if num_negatives < 1:
    raise ValueError(f"num_negatives must be >= 1, got {num_negatives}.")
  order = np.argsort(labels, kind="stable")  # Ids grouped by class.
  classes, starts, counts = np.unique(labels[order], return_index=True, return_counts=True)
  if len(classes) < 2:
    raise ValueError("Negatives from other classes need at least two classes in the training "
                     f"labels; all {len(labels)} examples have label {classes[0]}.")
  # Per id: where its class sits in `order`, and how many examples it has.
  slot = np.searchsorted(classes, labels)
  return ClassContrastIndices(order=order, start=starts[slot].astype(np.uint64),
                              count=counts[slot].astype(np.uint64), num_negatives=num_negatives,
                              seed=int(seed), positive=positive)


@dataclasses.dataclass(frozen=True)
class ClassContrastIndices:
  """The side data `class_contrast_indices` returns: plain arrays, so it pickles into grain's
  worker processes (`data.num_workers > 0`)."""

  order: np.ndarray  # [N] ids sorted by label.
  start: np.ndarray  # [N] uint64: where each id's class begins in `order`.
  count: np.ndarray  # [N] uint64: the size of each id's class.
  num_negatives: int
  seed: int
  positive: str

  def __call__(self, epoch: int, ids: np.ndarray) -> np.ndarray:
    ids = np.asarray(ids, np.int64)
    base = hash_keys(self.seed, _STREAM_CONTRAST, epoch, ids)  # [n]: one stream per example.
    columns = np.arange(self.num_negatives + 1, dtype=np.uint64)
    bits = mix64(base[:, None] + (columns + np.uint64(1)) * np.uint64(GOLDEN))  # [n, 1 + K]
    s, c = self.start[ids][:, None], self.count[ids][:, None]
    # Uniform over the other classes: a position among the N - n_c others, skipping the block
    # [s, s + n_c) of the anchor's class in `order`.
    r = _below(bits[:, 1:], np.uint64(len(self.order)) - c)
    negatives = self.order[(r + (r >= s) * c).astype(np.int64)]
    if self.positive == "self":
      first = ids
    else:
      first = self.order[(s[:, 0] + _below(bits[:, 0], c[:, 0])).astype(np.int64)]
    return np.concatenate([first[:, None], negatives], axis=1).astype(np.int32)


def _below(bits: np.ndarray, bound: np.ndarray) -> np.ndarray:
  """Uniform integers in [0, bound) from random uint64 words: the top 32 bits scaled by bound
  (multiply-shift, cheaper than a modulo; bound < 2^32)."""
  return ((bits >> np.uint64(32)) * bound) >> np.uint64(32)


def train_labels(data_config: Any, num_examples: int) -> np.ndarray:
  """The labels [num_examples] of the training examples in use (ids 0 .. num_examples - 1 of
  the configured train split), read once (this decodes the split)."""
  source = SourceRef.from_config(data_config, config_field(data_config, "train_split", "train"))
  chunks = [source.read(np.arange(i, min(i + 4096, num_examples)))[1]
            for i in range(0, num_examples, 4096)]
  return np.concatenate(chunks).astype(np.int64)


def _class_contrast_side_data(data_config: Any, num_examples: int, seed: int, *,
                              num_negatives: int, positive: str) -> ClassContrastIndices:
  """`class_contrast_indices` over the labels of the training examples in use."""
  return class_contrast_indices(train_labels(data_config, num_examples), num_negatives, seed,
                                positive)


# A loss's declared side data (`losses.base.SideDataNeed.builder`) -> what builds it from
# (data config, training examples in use, seed, **the declaration's settings).
SIDE_DATA_BUILDERS = {"class_contrast_indices": _class_contrast_side_data}


def build_side_data(builder: str, settings: Mapping[str, Any], data_config: Any,
                    num_examples: int, seed: int) -> Any:
  """The side data (`fn(epoch, ids) -> array [n, ...]`) that `builder` makes for the training
  examples 0 .. num_examples - 1 under `seed`; raises ValueError for an unknown builder."""
  if builder not in SIDE_DATA_BUILDERS:
    raise ValueError(f"Unknown side-data builder {builder!r}; the data builds "
                     f"{sorted(SIDE_DATA_BUILDERS)}.")
  return SIDE_DATA_BUILDERS[builder](data_config, num_examples, seed, **settings)
