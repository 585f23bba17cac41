"""Data: TFDS sources (ArrayRecord, random access, no TensorFlow) + grain pipelines.

`train_iterator` / `eval_batches` turn a data config into NumPy batches for one
process; the embedded data sets (`digits`) build themselves into the data_dir on
first use, anything else is prepared once with `scripts/prepare_data.py`.
"""

from distill_jax.data.contrast import class_contrast_indices, train_labels
from distill_jax.data.embedded import EMBEDDED, ensure_embedded, is_embedded
from distill_jax.data.pipeline import (
    AUGMENTATIONS,
    DATA_DIR_ENV,
    DataNotPreparedError,
    DatasetInfo,
    EvalIterator,
    SideData,
    TrainIterator,
    augment_seed,
    default_data_config,
    default_data_dir,
    eval_batches,
    get_info,
    resolve_data_dir,
    split_digest,
    train_iterator,
)

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
