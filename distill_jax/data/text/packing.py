"""Documents packed into fixed-length rows: what a split of a text data set becomes.

Packing (`pack`): the documents of a split are concatenated, in stored order, into one stream,
which is cut into rows of `seq_len` positions. Row r reads the stream's tokens
`[r * L, r * L + L]` as inputs and the next `L` as targets, so every adjacent pair of the stream
is one position of exactly one row; the end is padded with PAD. A position's `mask` is 1 where
its target is a real token of the same document (0 for padding and for the BOS that starts the
next document: the previous document's EOS does not predict it). `document` [N, L] gives the
index of the document each input token belongs to (-1 for padding): the boundaries. The model
itself finds them from the BOS tokens (`TransformerLM.bos_id`), so packed documents do not
attend to each other.

A document with fewer than two tokens (after tokenization, `models.tokenizers`) holds no
(input, target) pair: it is dropped and counted (`Packed.dropped`), never an error; so is a
stored document with no text.

`packed_split` reads a configured split (a prepared TFDS data set with a `text` feature, or a
black-box teacher's JSONL file, `blackbox.py`) and packs it once per process; `rows_digest`
names its rows for a teacher cache.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from distill_jax.data.sources import config_field, prepared_builder, resolve_data_dir
from distill_jax.models.tokenizers import ByteTokenizer, get_tokenizer


@dataclasses.dataclass(frozen=True)
class Packed:
  """A split's documents packed into rows; see the module docstring."""

  tokens: np.ndarray  # int32 [N, L]
  targets: np.ndarray  # int32 [N, L]
  mask: np.ndarray  # float32 [N, L]
  document: np.ndarray  # int32 [N, L]
  documents: int  # Documents packed.
  dropped: int  # Documents dropped (fewer than two tokens).
  num_bytes: int  # UTF-8 bytes of text the kept targets stand for (for bits per byte).
  # Per-row arrays beyond the five (a black-box file's top-k log-probs): {key: [N, ...]}.
  extra: Mapping[str, np.ndarray] = dataclasses.field(default_factory=dict)
  # What reading the split counted (a black-box file's `MappingCounts.summary`), for result.json.
  counts: Mapping[str, int] = dataclasses.field(default_factory=dict)

  def __len__(self) -> int:
    return len(self.tokens)

  def rows(self, ids: np.ndarray) -> dict[str, np.ndarray]:
    return {"tokens": self.tokens[ids], "targets": self.targets[ids], "mask": self.mask[ids],
            "document": self.document[ids], "id": np.asarray(ids, np.int64),
            **{key: value[ids] for key, value in self.extra.items()}}


def text_bytes(targets: np.ndarray, mask: np.ndarray, tokenizer: Any) -> int:
  """The UTF-8 bytes of text the kept (`mask` != 0) `targets` stand for (`byte_lengths`)."""
  return int(np.sum(tokenizer.byte_lengths()[targets][mask.astype(bool)]))


def pack(documents: Sequence[np.ndarray], seq_len: int, tokenizer: ByteTokenizer) -> Packed:
  """Packs tokenized `documents` (int arrays) into rows of `seq_len`; see the module docstring."""
  if seq_len < 1:
    raise ValueError(f"data.seq_len must be positive, got {seq_len}.")
  kept = [np.asarray(d, np.int32) for d in documents if len(d) >= 2]
  dropped = len(documents) - len(kept)
  if not kept:
    raise ValueError(f"No document to pack: all {len(documents)} have fewer than two tokens.")
  stream = np.concatenate(kept)
  doc_index = np.repeat(np.arange(len(kept), dtype=np.int32), [len(d) for d in kept])
  rows = math.ceil((len(stream) - 1) / seq_len)
  size = rows * seq_len + 1
  stream = np.concatenate([stream, np.full(size - len(stream), tokenizer.pad_id, np.int32)])
  doc_index = np.concatenate([doc_index, np.full(size - len(doc_index), -1, np.int32)])
  tokens = stream[:-1].reshape(rows, seq_len)
  targets = stream[1:].reshape(rows, seq_len)
  mask = (targets != tokenizer.pad_id) & (targets != tokenizer.bos_id)
  return Packed(tokens=tokens, targets=targets, mask=mask.astype(np.float32),
                document=doc_index[:-1].reshape(rows, seq_len), documents=len(kept),
                dropped=dropped, num_bytes=text_bytes(targets, mask, tokenizer))


@functools.cache
def _packed(name: str, data_dir: str, split: str, seq_len: int, tokenizer: str,
            max_documents: int = 0) -> Packed:
  """One split, read and packed once per process (the embedded corpus is ~0.5 MB); with
  `max_documents` = N > 0, only its first N documents (a large corpus on one machine)."""
  builder = prepared_builder(name, data_dir)
  key = "text" if "text" in builder.info.features else None
  if key is None:
    raise ValueError(f"Data set {name!r} has no 'text' feature (it has "
                     f"{sorted(builder.info.features)}); it is not a text data set.")
  source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
  count = min(len(source), max_documents) if max_documents > 0 else len(source)
  tok = get_tokenizer(tokenizer)
  docs = []
  for i in range(0, count, 1024):
    for record in source.__getitems__(list(range(i, min(i + 1024, count)))):
      text = record[key]
      text = text.tobytes() if isinstance(text, np.ndarray) else text
      docs.append(tok.encode(text) if len(text) else np.zeros(0, np.int32))
  return pack(docs, seq_len, tok)


@functools.cache
def _packed_records(train_files: str, eval_files: str, eval_fraction: float, train_split: str,
                    split: str, seq_len: int, tokenizer: str) -> Packed:
  """A black-box teacher's output file(s) as rows (`blackbox.py`), once per process."""
  from distill_jax.data.text import blackbox

  config = {"train_files": train_files, "eval_files": eval_files,
            "eval_fraction": eval_fraction, "train_split": train_split}
  tok = get_tokenizer(tokenizer)
  rows, counts = blackbox.build_rows(blackbox.split_records(config, split), tok, seq_len)
  blackbox.log_counts(eval_files if eval_files and split != train_split else train_files,
                      split, counts)
  extra = {key: rows.pop(key) for key in blackbox.TOPK_KEYS if key in rows}
  return Packed(**rows, documents=counts.records, dropped=0,
                num_bytes=text_bytes(rows["targets"], rows["mask"], tok), extra=extra,
                counts=counts.summary())


def packed_split(data_config: Any, split: str) -> Packed:
  """The packed rows of `split`: with `data.train_subset` / `data.eval_subset` = N > 0 (for the
  train / eval split), only its first N rows; with `data.max_documents` = N > 0, the rows packed
  from the split's first N documents (e.g. lm1b's 30M sentences on one machine).
  `data.name='jsonl'` reads a black-box teacher's output file(s) (`blackbox.py`) instead of a
  TFDS data set."""
  tokenizer = config_field(data_config, "tokenizer", "bytes")
  if data_config.name == "jsonl":
    def files(key):  # A list or a comma-separated string, as one hashable string.
      value = config_field(data_config, key, "") or ""
      return value if isinstance(value, str) else ",".join(map(str, value))
    packed = _packed_records(files("train_files"), files("eval_files"),
                             float(config_field(data_config, "eval_fraction", 0.1)),
                             config_field(data_config, "train_split", "train"), split,
                             int(data_config.seq_len), tokenizer)
  else:
    packed = _packed(data_config.name, resolve_data_dir(data_config), split,
                     int(data_config.seq_len), tokenizer,
                     int(config_field(data_config, "max_documents", 0) or 0))
  subset_key = ("train_subset" if split == config_field(data_config, "train_split", "train")
                else "eval_subset")
  subset = int(config_field(data_config, subset_key, 0) or 0)
  if 0 < subset < len(packed):
    cut = {f.name: getattr(packed, f.name)[:subset] for f in dataclasses.fields(packed)
           if isinstance(getattr(packed, f.name), np.ndarray)}
    packed = dataclasses.replace(packed, **cut, num_bytes=text_bytes(
                                     cut["targets"], cut["mask"], get_tokenizer(tokenizer)),
                                 extra={k: v[:subset] for k, v in packed.extra.items()})
  return packed


def rows_digest(data_config: Any, split: str) -> str:
  """SHA-256 of the packed rows of `split` (tokens, targets, masks, documents): what "the same
  text" means when a teacher's cached outputs are matched to a run."""
  packed = packed_split(data_config, split)
  digest = hashlib.sha256()
  arrays = {name: getattr(packed, name) for name in ("tokens", "targets", "mask", "document")}
  for name, array in {**arrays, **packed.extra}.items():
    array = np.ascontiguousarray(array)
    digest.update(f"{name}:{array.dtype}:{array.shape}".encode())
    digest.update(array.tobytes())
  return digest.hexdigest()
