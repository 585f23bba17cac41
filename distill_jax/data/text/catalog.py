"""TFDS text data sets (`tiny_shakespeare`, `lm1b`) prepared without TensorFlow.

Training reads any prepared TFDS data set with a `text` feature by name (`packing.py`), and
reading needs no TensorFlow. The catalog's builders for these two sets, though, read their
downloaded files through `tf.io.gfile`, so preparing them would need TensorFlow only for that.
The builders here are the catalog's own classes (same name, version, features, splits and
metadata, so the prepared files are the ones TFDS would write) with the file reading done by
`etils.epath`. `scripts/prepare_data.py NAME` uses them; the download itself is TFDS's.

- `tiny_shakespeare`: one file (~1 MB) cut by characters into train 90% / validation 5% /
  test 5%, each split one document.
- `lm1b`: the One Billion Word benchmark, one sentence per document (train ~30M, test
  ~0.3M); a 1.7 GB download. Packing reads a split into memory: cap it with
  `data.max_documents` on one machine.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import tensorflow_datasets as tfds
from etils import epath
from tensorflow_datasets.datasets.lm1b import lm1b_dataset_builder as catalog_lm1b
from tensorflow_datasets.datasets.tiny_shakespeare import (
    tiny_shakespeare_dataset_builder as catalog_tiny_shakespeare,
)

from distill_jax.data.embedded import LocalBuilder

TINY_SHAKESPEARE_URL = ("https://raw.githubusercontent.com/karpathy/char-rnn/master/data/"
                        "tinyshakespeare/input.txt")
LM1B_URL = ("http://www.statmt.org/lm-benchmark/"
            "1-billion-word-language-modeling-benchmark-r13output.tar.gz")
LM1B_TOP = "1-billion-word-language-modeling-benchmark-r13output"
LM1B_FILES = {"train": "training-monolingual.tokenized.shuffled/news.en-*",
              "test": "heldout-monolingual.tokenized.shuffled/news.en.heldout-*"}


def _catalog_dir(module: Any) -> epath.Path:
  """Where the catalog keeps a builder's metadata (README, citations, checksums)."""
  return epath.Path(module.__file__).parent


def tiny_shakespeare_splits(text: str) -> dict[str, str]:
  """TFDS's 90 / 5 / 5 cut of the text, by characters."""
  cut = int(len(text) * 0.9)
  train, rest = text[:cut], text[cut:]
  cut = int(len(rest) * 0.5)
  return {"train": train, "validation": rest[:cut], "test": rest[cut:]}


with tfds.core.registered.skip_registration():

  class TinyShakespeare(LocalBuilder, catalog_tiny_shakespeare.Builder):
    """The catalog's `tiny_shakespeare`, its file read without TensorFlow."""

    name = "tiny_shakespeare"
    pkg_dir_path = _catalog_dir(catalog_tiny_shakespeare)
    code_module = catalog_tiny_shakespeare.__name__

    def _split_generators(self, dl_manager: Any) -> dict[str, Iterator[tuple[str, dict]]]:
      path = epath.Path(dl_manager.download(TINY_SHAKESPEARE_URL))
      if path.is_dir():  # A directory holding the file (TFDS's test doubles hand one).
        path = path / "input.txt"
      splits = tiny_shakespeare_splits(path.read_text())
      return {name: self._generate_examples(name, text) for name, text in splits.items()}

  class Lm1b(LocalBuilder, catalog_lm1b.Builder):
    """The catalog's `lm1b`, its files listed and read without TensorFlow."""

    name = "lm1b"
    pkg_dir_path = _catalog_dir(catalog_lm1b)
    code_module = catalog_lm1b.__name__

    def _split_generators(self, dl_manager: Any) -> dict[str, Iterator[tuple[str, dict]]]:
      root = epath.Path(dl_manager.download_and_extract(LM1B_URL)) / LM1B_TOP
      return {split: self._lines(sorted(root.glob(pattern)))
              for split, pattern in LM1B_FILES.items()}

    def _lines(self, files: list[epath.Path]) -> Iterator[tuple[str, dict]]:
      for path in files:
        with path.open() as f:
          for index, line in enumerate(f):
            yield f"{path.name}_{index}", {"text": line.strip()}


BUILDERS = {"tiny_shakespeare": TinyShakespeare, "lm1b": Lm1b}


def prepare(name: str, data_dir: str, file_format: str = "array_record",
            download_config: tfds.download.DownloadConfig | None = None) -> str:
  """Downloads and prepares `name` (a key of `BUILDERS`) in `data_dir`; returns its directory.

  A no-op when it is prepared already."""
  builder = BUILDERS[name](data_dir=os.fspath(data_dir), file_format=file_format)
  if not builder.is_prepared():
    builder.download_and_prepare(download_config=download_config)
  return os.fspath(builder.data_path)
