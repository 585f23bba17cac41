r"""Prepares data sets as ArrayRecord files in a data_dir, once, before any training.

Training never downloads: it reads `data_dir/NAME/VERSION/*.array_record-*` with
`tfds.data_source` (random access, no TensorFlow). This script makes those files.

Usage:
  python scripts/prepare_data.py cifar10 --data_dir=/data/tfds
  python scripts/prepare_data.py cifar10 cifar100 --data_dir=/data/tfds
  python scripts/prepare_data.py digits --data_dir=/data/tfds   # offline, from scikit-learn
  python scripts/prepare_data.py tiny_shakespeare lm1b --data_dir=/data/tfds   # text

`--data_dir` defaults to $DISTILL_JAX_DATA_DIR, else ~/.cache/distill_jax/tfds (what
training uses when the config's `data.data_dir` is unset).

Embedded data sets (`digits`) build offline from packages already installed (and
training builds them by itself on first use anyway). TFDS data sets such as
cifar10 / cifar100 download their source files, so run this on a machine with
internet access. Encoding their images (`tfds.features.Image`) needs TensorFlow:
install it (`pip install tensorflow-cpu`) on the machine that prepares the data;
the machines that train need neither TensorFlow nor network. The text sets
`tiny_shakespeare` and `lm1b` (for `configs/lm.py`) need no TensorFlow even here
(`distill_jax/data/tfds_text.py`). Copy the resulting
data_dir to the cluster's shared storage and point `data.data_dir` at it.
"""

from __future__ import annotations

import importlib
import importlib.resources
import importlib.resources.abc
import os
import sys
import time
from collections.abc import Sequence

from absl import app, flags, logging

_DATA_DIR = flags.DEFINE_string(
    "data_dir", None,
    "TFDS data_dir to prepare into (default: $DISTILL_JAX_DATA_DIR, else "
    "~/.cache/distill_jax/tfds).")
_FILE_FORMAT = flags.DEFINE_string(
    "file_format", "array_record",
    "TFDS file format; training needs random access, i.e. array_record (or parquet).")
_MANUAL_DIR = flags.DEFINE_string(
    "manual_dir", None,
    "For data sets whose files must be downloaded by hand (e.g. imagenet2012): where they are.")


def _alias_importlib_resources() -> None:
  """Lets TFDS run without the `importlib_resources` backport.

  TFDS (4.9.x) looks up `importlib_resources.abc.Traversable` when it locates a
  builder's code, but only installs the backport on Python < 3.9; the standard
  library's `importlib.resources` has the same class on the Pythons we support.
  """
  try:
    importlib.import_module("importlib_resources")
  except ImportError:
    sys.modules["importlib_resources"] = importlib.resources


def prepare(name: str, data_dir: str) -> str:
  """Prepares `name` in `data_dir` (no-op if already there); returns its directory."""
  import tensorflow_datasets as tfds

  from distill_jax.data import embedded, tfds_text

  if embedded.is_embedded(name):
    return embedded.ensure_embedded(name, data_dir)
  kwargs = {}
  if _MANUAL_DIR.value:
    kwargs["download_config"] = tfds.download.DownloadConfig(manual_dir=_MANUAL_DIR.value)
  if name in tfds_text.BUILDERS:  # Text sets: the catalog's builders, without TensorFlow.
    return tfds_text.prepare(name, data_dir, _FILE_FORMAT.value, **kwargs)
  builder = tfds.builder(name, data_dir=data_dir, file_format=_FILE_FORMAT.value)
  builder.download_and_prepare(**kwargs)
  return os.fspath(builder.data_path)


def main(argv: Sequence[str]) -> None:
  names = argv[1:]
  if not names:
    raise app.UsageError("Name at least one data set, e.g. `prepare_data.py cifar10`.")
  _alias_importlib_resources()
  from distill_jax.data.sources import default_data_dir

  data_dir = (os.path.abspath(os.path.expanduser(_DATA_DIR.value)) if _DATA_DIR.value
              else default_data_dir())
  for name in names:
    start = time.time()
    logging.info("Preparing %s in %s ...", name, data_dir)
    path = prepare(name, data_dir)
    print(f"{name}: ready in {path} ({time.time() - start:.1f} s)")


if __name__ == "__main__":
  app.run(main)
