"""Embedded data sets: real data that ships with the Python environment, built into local TFDS.

The default run and the tests must work offline, yet go through exactly the same
`tfds.data_source` -> grain path as CIFAR or ImageNet on a cluster. So the small
data sets that come with installed packages are turned into ordinary TFDS data
sets (ArrayRecord files with random access) on first use, in the run's data_dir.

`digits`: scikit-learn's handwritten digits (`sklearn.datasets.load_digits`), 1797
real 8x8 grey images with pixel values 0..16, 10 classes. The split is a fixed
permutation (NumPy `default_rng(0)`) of the 1797 examples: the first 1500 are
`train`, the last 297 `test`. TFDS's own write-time shuffling is disabled, so the
stored order of each split is exactly that permutation; `id` is the example's index
in `load_digits()`.

Images are `tfds.features.Tensor`, not `tfds.features.Image`: encoding an Image
feature needs TensorFlow, which training must not require.

`digits` is not a name in the TFDS catalog (checked against tensorflow-datasets
4.9.10: only `binary_alpha_digits` and `spoken_digit` are close), so registering
the builder below under that name does not shadow a catalog data set.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from etils import epath

from distill_jax.registry import Registry

# Builders of the embedded data sets, by user-facing name.
EMBEDDED = Registry("embedded data set")

DIGITS_NUM_TRAIN = 1500
DIGITS_NUM_EXAMPLES = 1797
DIGITS_SPLIT_SEED = 0


@EMBEDDED.register("digits")
class Digits(tfds.core.GeneratorBasedBuilder):
  """scikit-learn's 8x8 handwritten digits as a TFDS data set (train 1500 / test 297)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First version: load_digits, permutation seed 0, 1500/297."}

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    """This file. Overridden because TFDS's own lookup, for a builder defined inside a
    package, imports `importlib_resources`, which TFDS only installs on Python < 3.9."""
    return epath.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    # DatasetInfo is built directly: `dataset_info_from_configs` would look for
    # metadata files (README, citations) next to this module.
    return tfds.core.DatasetInfo(
        builder=self,
        description=("scikit-learn's handwritten digits (UCI optdigits test set): 8x8 "
                     "grey images, pixel values 0..16, 10 classes."),
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Tensor(shape=(8, 8, 1), dtype=np.uint8),
            "label": tfds.features.ClassLabel(num_classes=10),
            "id": tfds.features.Scalar(dtype=np.int64),
        }),
        supervised_keys=("image", "label"),
        # Keep the stored order equal to the fixed permutation below, so "the first N
        # training examples" (train_subset) means the same thing everywhere.
        disable_shuffling=True,
        homepage="https://scikit-learn.org/stable/modules/generated/sklearn.datasets.load_digits.html",
    )

  def _split_generators(self, dl_manager: Any) -> dict[str, Iterator[tuple[int, dict]]]:
    del dl_manager  # Nothing to download: the data ships with scikit-learn.
    from sklearn.datasets import load_digits  # Imported here: only the build needs it.

    digits = load_digits()
    images = digits.images.astype(np.uint8)[..., None]  # float 0..16 -> uint8 (exact).
    labels = digits.target.astype(np.int64)
    order = np.random.default_rng(DIGITS_SPLIT_SEED).permutation(len(labels))
    return {
        "train": self._generate_examples(images, labels, order[:DIGITS_NUM_TRAIN]),
        "test": self._generate_examples(images, labels, order[DIGITS_NUM_TRAIN:]),
    }

  def _generate_examples(self, images: np.ndarray, labels: np.ndarray,
                         indices: np.ndarray) -> Iterator[tuple[int, dict]]:
    # With shuffling disabled TFDS stores examples sorted by key, so the key is the
    # position in the split (and `id` the index in load_digits).
    for position, i in enumerate(indices.tolist()):
      yield position, {"image": images[i], "label": int(labels[i]), "id": i}


PYDOC_NUM_TEST = 8
PYDOC_SPLIT_SEED = 0


@EMBEDDED.register("pydoc_topics")
class PydocTopics(tfds.core.GeneratorBasedBuilder):
  """Python's own documentation topics (`pydoc_data.topics`) as a text data set.

  Each of the topics (79 on Python 3.11, ~466 kB of English text with code) is one document:
  `text` (its UTF-8 bytes, uint8 [n]) and `id` (its index among the sorted topic names). The
  split is a fixed permutation (NumPy `default_rng(0)`) of the sorted names: the last 8 are
  `test` (held out), the others `train`. The text ships with every Python, so it differs a
  little between Python versions: the data set's description records the version it was
  built from.
  """

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First version: pydoc_data.topics, permutation seed 0, 8 test."}

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    """This file (see `Digits.code_path`)."""
    return epath.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    import sys

    return tfds.core.DatasetInfo(
        builder=self,
        description=("Python's documentation topics (pydoc_data.topics) from Python "
                     f"{sys.version.split()[0]}, one document per topic, UTF-8 bytes."),
        features=tfds.features.FeaturesDict({
            "text": tfds.features.Tensor(shape=(None,), dtype=np.uint8),
            "id": tfds.features.Scalar(dtype=np.int64),
        }),
        disable_shuffling=True,
        homepage="https://docs.python.org/3/library/pydoc.html",
    )

  def _split_generators(self, dl_manager: Any) -> dict[str, Iterator[tuple[int, dict]]]:
    del dl_manager  # Nothing to download: the text ships with Python.
    from pydoc_data import topics

    names = sorted(topics.topics)
    texts = [np.frombuffer(topics.topics[n].encode("utf-8"), np.uint8) for n in names]
    order = np.random.default_rng(PYDOC_SPLIT_SEED).permutation(len(names))
    return {"train": self._generate_examples(texts, order[:-PYDOC_NUM_TEST]),
            "test": self._generate_examples(texts, order[-PYDOC_NUM_TEST:])}

  def _generate_examples(self, texts: list[np.ndarray], indices: np.ndarray
                         ) -> Iterator[tuple[int, dict]]:
    for position, i in enumerate(indices.tolist()):
      yield position, {"text": texts[i], "id": i}


def is_embedded(name: str) -> bool:
  """True if `name` is one of the data sets built locally by this module."""
  return name in EMBEDDED


def ensure_embedded(name: str, data_dir: str | os.PathLike) -> str:
  """Builds the embedded data set `name` into `data_dir` unless it is there already.

  Cheap after the first call (a few ms; digits builds in about half a second, plus
  scikit-learn's import). Concurrent
  callers (several processes of one run, parallel tests) are serialised with an
  exclusive file lock in `data_dir`; TFDS itself writes into a temporary directory
  and renames it into place, so a reader never sees a half-written data set.

  Returns:
    The directory of the prepared data set (`data_dir/NAME/VERSION`).

  Raises:
    UnknownNameError: `name` is not an embedded data set (the message lists them).
  """
  builder_cls = EMBEDDED.get(name)
  data_dir = os.path.abspath(os.path.expanduser(os.fspath(data_dir)))
  builder = builder_cls(data_dir=data_dir, file_format="array_record")
  if not _is_prepared(builder):
    os.makedirs(data_dir, exist_ok=True)
    # flock excludes other processes and, since every call opens the file anew, other
    # threads of this one too.
    with _file_lock(os.path.join(data_dir, f".{name}.build.lock")):
      # Another builder may have finished while this one waited.
      builder = builder_cls(data_dir=data_dir, file_format="array_record")
      if not _is_prepared(builder):
        logging.info("Building the embedded data set %r into %s (once).", name, data_dir)
        with _quiet_build():
          builder.download_and_prepare(
              download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  return os.fspath(builder.data_path)


def _is_prepared(builder: tfds.core.DatasetBuilder) -> bool:
  # Checking the folder first spares TFDS's warning about a folder without metadata.
  return builder.data_path.exists() and builder.is_prepared()


@contextlib.contextmanager
def _quiet_build() -> Iterator[None]:
  """Silences TFDS while it builds a local data set: its "Downloading and preparing" lines
  (printed to stdout, though nothing downloads) and its progress bars (a dozen per build)."""
  from tensorflow_datasets.core.utils import tqdm_utils

  was_active = tqdm_utils._active  # TFDS has no getter; restored below.
  tfds.display_progress_bar(False)
  try:
    with contextlib.redirect_stdout(io.StringIO()):
      yield
  finally:
    tfds.display_progress_bar(was_active)


@contextlib.contextmanager
def _file_lock(path: str) -> Iterator[None]:
  """An exclusive advisory lock on `path`, held for the body of the `with`."""
  with open(path, "a") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)
