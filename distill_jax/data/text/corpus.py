"""`pydoc_topics`: Python's documentation topics as an embedded text data set (`data/embedded.py`).

Real English text (with code) that ships with every Python, so the language-model runs and tests
work offline; `packing.py` tokenizes and packs it like any TFDS text data set. TFDS names the
builder after its class (`PydocTopics` -> `pydoc_topics`), and the prepared files lie in
`data_dir/pydoc_topics/1.0.0`: renaming the class or changing its version would leave users'
prepared data (and the teacher caches keyed to it) behind.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from distill_jax.data.embedded import EMBEDDED, LocalBuilder

PYDOC_NUM_TEST = 8
PYDOC_SPLIT_SEED = 0


def _pydoc_order() -> tuple[list[str], np.ndarray]:
  """The sorted topic names and the split's permutation of them (the last 8 are `test`)."""
  from pydoc_data import topics

  names = sorted(topics.topics)
  return names, np.random.default_rng(PYDOC_SPLIT_SEED).permutation(len(names))


def pydoc_texts(split: str) -> list[str]:
  """The documents of `split` ('train' or 'test') in stored order, as text, read straight from
  `pydoc_data` (no prepared data set needed): what `scripts/train_bpe.py` trains the 'bpe'
  tokenizer on (the train split only)."""
  from pydoc_data import topics

  names, order = _pydoc_order()
  picked = {"train": order[:-PYDOC_NUM_TEST], "test": order[-PYDOC_NUM_TEST:]}.get(split)
  if picked is None:
    raise ValueError(f"pydoc_topics has splits 'train' and 'test', not {split!r}.")
  return [topics.topics[names[i]] for i in picked.tolist()]


@EMBEDDED.register("pydoc_topics")
class PydocTopics(LocalBuilder):
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
    names, order = _pydoc_order()
    from pydoc_data import topics

    texts = [np.frombuffer(topics.topics[n].encode("utf-8"), np.uint8) for n in names]
    return {"train": self._generate_examples(texts, order[:-PYDOC_NUM_TEST]),
            "test": self._generate_examples(texts, order[-PYDOC_NUM_TEST:])}

  def _generate_examples(self, texts: list[np.ndarray], indices: np.ndarray
                         ) -> Iterator[tuple[int, dict]]:
    for position, i in enumerate(indices.tolist()):
      yield position, {"text": texts[i], "id": i}
