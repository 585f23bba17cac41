"""Embedded data sets: real data that ships with the Python environment, built into local TFDS.

The default run and the tests must work offline, yet go through exactly the same
`tfds.data_source` -> grain path as CIFAR or ImageNet on a cluster. So the small
data sets that come with installed packages are turned into ordinary TFDS data
sets (ArrayRecord files with random access) on first use, in the run's data_dir.

This module is the mechanism: the registry `EMBEDDED` (user-facing name -> TFDS builder
class), `is_embedded` and `ensure_embedded` (build once, under a file lock, quietly). Each
data set is one module that registers its builder with `@EMBEDDED.register(name)`:
`data/digits.py` (scikit-learn's 8x8 digits) and `data/text/corpus.py` (Python's
documentation topics). `distill_jax/data/__init__.py` imports them, so every one is known
wherever the data package is. Their builders, and every other TFDS builder defined in this
package (`data/text/catalog.py`'s), subclass `LocalBuilder`, which finds the builder's code
without TFDS's own lookup.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import os
import sys
from collections.abc import Iterator

import tensorflow_datasets as tfds
from absl import logging
from etils import epath

from distill_jax.common.registry import Registry

# Builders of the embedded data sets, by user-facing name.
EMBEDDED = Registry("embedded data set")


class LocalBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """The base of the TFDS builders defined in this package (abstract: it registers no data
  set, and its subclasses implement `_info` and the generators, or inherit them).

  `code_path` is the file of module `code_module` (default: the subclass's own module), where
  TFDS looks for the builder's metadata and checksums; a subclass of a catalog builder names
  the catalog's module. Overridden because TFDS's own lookup, for a builder defined inside a
  package, imports `importlib_resources`, which TFDS only installs on Python < 3.9.
  """

  code_module: str | None = None

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    return epath.Path(sys.modules[cls.code_module or cls.__module__].__file__)


def is_embedded(name: str) -> bool:
  """True if `name` is one of the data sets built locally (`EMBEDDED`)."""
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
