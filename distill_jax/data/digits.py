"""`digits`: scikit-learn's handwritten digits as an embedded TFDS data set (`data/embedded.py`).

`sklearn.datasets.load_digits`: 1797 real 8x8 grey images with pixel values 0..16, 10 classes.
The split is a fixed permutation (NumPy `default_rng(0)`) of the 1797 examples: the first 1500
are `train`, the last 297 `test`. TFDS's own write-time shuffling is disabled, so the stored
order of each split is exactly that permutation; `id` is the example's index in
`load_digits()`.

Images are `tfds.features.Tensor`, not `tfds.features.Image`: encoding an Image feature needs
TensorFlow, which training must not require.

`digits` is not a name in the TFDS catalog (checked against tensorflow-datasets 4.9.10: only
`binary_alpha_digits` and `spoken_digit` are close), so registering the builder under that name
does not shadow a catalog data set. TFDS names the builder after its class (`Digits` ->
`digits`), and the prepared files lie in `data_dir/digits/1.0.0`: renaming the class or
changing its version would leave users' prepared data behind.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from distill_jax.data.embedded import EMBEDDED, LocalBuilder

DIGITS_NUM_TRAIN = 1500
DIGITS_NUM_EXAMPLES = 1797
DIGITS_SPLIT_SEED = 0


@EMBEDDED.register("digits")
class Digits(LocalBuilder):
  """scikit-learn's 8x8 handwritten digits as a TFDS data set (train 1500 / test 297)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First version: load_digits, permutation seed 0, 1500/297."}

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
