"""Data: TFDS sources (ArrayRecord, random access, no TensorFlow) + grain pipelines.

`train_iterator` / `eval_batches` turn a data config into NumPy batches for one
process; the embedded data sets (`digits`, `pydoc_topics`) build themselves into the
data_dir on first use, anything else is prepared once with `scripts/prepare_data.py`.
`sources` reads the prepared splits, `transforms` holds the pure NumPy per-example
transforms (augmentation, normalisation, the counter hash), and `iterators` orders,
shards and batches the examples with grain. Text for language models is the package
`text/`.

A new embedded data set is one module that registers its TFDS builder with
`@EMBEDDED.register(name)` (`embedded.py`), imported below so that it is known wherever
this package is.
"""

from distill_jax.data import digits  # noqa: F401  (registers `digits` with EMBEDDED)
from distill_jax.data.contrast import build_side_data, class_contrast_indices, train_labels
from distill_jax.data.embedded import EMBEDDED, ensure_embedded, is_embedded
from distill_jax.data.iterators import (
    EvalIterator,
    SideData,
    TrainIterator,
    augment_seed,
    eval_batches,
    train_iterator,
)
from distill_jax.data.sources import (
    DATA_DIR_ENV,
    DataNotPreparedError,
    DatasetInfo,
    default_data_config,
    default_data_dir,
    get_info,
    resolve_data_dir,
    split_digest,
)
from distill_jax.data.text import corpus  # noqa: F401  (registers `pydoc_topics`)
from distill_jax.data.transforms import AUGMENTATIONS

__all__ = [
    "AUGMENTATIONS",
    "DATA_DIR_ENV",
    "EMBEDDED",
    "DataNotPreparedError",
    "DatasetInfo",
    "EvalIterator",
    "SideData",
    "TrainIterator",
    "augment_seed",
    "build_side_data",
    "class_contrast_indices",
    "default_data_config",
    "default_data_dir",
    "ensure_embedded",
    "eval_batches",
    "get_info",
    "is_embedded",
    "resolve_data_dir",
    "split_digest",
    "train_iterator",
    "train_labels",
]
