"""Text for language models: byte-level tokens, documents packed into fixed-length rows.

Tokens: `ByteTokenizer` maps a document to `[BOS, its UTF-8 bytes..., EOS]` (ids 0..255 are the
bytes, then BOS 256, EOS 257, PAD 258: a vocabulary of 259). Nothing to download or train, and
bits per byte follow directly from the loss. `HfTokenizer` reads a Hugging Face tokenizer.json;
every tokenizer's `byte_lengths` gives the UTF-8 bytes of text each id stands for, which bits
per byte divide by.

Packing (`pack`): the documents of a split are concatenated, in stored order, into one stream,
which is cut into rows of `seq_len` positions. Row r reads the stream's tokens
`[r * L, r * L + L]` as inputs and the next `L` as targets, so every adjacent pair of the stream
is one position of exactly one row; the end is padded with PAD. A position's `mask` is 1 where
its target is a real token of the same document (0 for padding and for the BOS that starts the
next document: the previous document's EOS does not predict it). `document` [N, L] gives the
index of the document each input token belongs to (-1 for padding): the boundaries. The model
itself finds them from the BOS tokens (`TransformerLM.bos_id`), so packed documents do not
attend to each other.

A document with fewer than two tokens (after tokenization) holds no (input, target) pair: it is
dropped and counted (`Packed.dropped`), never an error; so is a stored document with no text.

Batches (`train_iterator`, `eval_batches`) are dicts of NumPy arrays: `tokens` int32 [b, L],
`targets` int32 [b, L], `mask` float32 [b, L], `document` int32 [b, L] and `id` int64 [b] (the
row's index). Train batches follow `iterators`' contract: batch s is a pure function of (seed,
s, process), epoch e visits the rows in an order hashed from (seed, e), process i of k takes
rows i*b:(i+1)*b of each global batch, and the position saves as a small dict
(`iterators.TrainIterator`). The last eval batch is padded with all-masked rows.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from distill_jax.data import batch_keys
from distill_jax.data.iterators import TrainIterator, local_batch_size
from distill_jax.data.sources import config_field, prepared_builder, resolve_data_dir
from distill_jax.data.transforms import STREAM_SHUFFLE, hash_keys

# Eval batches' bytes per kept target (`eval_batches`): they count the data's targets.
batch_keys.declare("target_bytes", what="the UTF-8 bytes of the data's targets")


@dataclasses.dataclass(frozen=True)
class ByteTokenizer:
  """UTF-8 bytes as tokens, plus BOS, EOS and PAD ids after the 256 byte values."""

  name: str = "bytes"
  bos_id: int = 256
  eos_id: int = 257
  pad_id: int = 258
  vocab_size: int = 259

  def encode(self, text: str | bytes) -> np.ndarray:
    """`[BOS, bytes..., EOS]` as int32 [n + 2]."""
    data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
    return np.concatenate([[self.bos_id], np.frombuffer(data, np.uint8), [self.eos_id]]
                          ).astype(np.int32)

  def encode_with_offsets(self, text: str | bytes) -> tuple[np.ndarray, np.ndarray]:
    """`text`'s tokens without BOS/EOS, int32 [n], and where each starts in `text`'s UTF-8
    bytes, int32 [n] (token i is byte i: 0, 1, ..., n - 1)."""
    ids = self.encode(text)[1:-1]
    return ids, np.arange(len(ids), dtype=np.int32)

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    """The text of the byte tokens among `ids` (special tokens dropped; bad UTF-8 replaced)."""
    ids = np.asarray(ids)
    return bytes(ids[ids < 256].astype(np.uint8).tolist()).decode("utf-8", errors="replace")

  def byte_lengths(self) -> np.ndarray:
    """int32 [vocab_size]: the UTF-8 bytes each id stands for (1 per byte, 0 for BOS/EOS/PAD)."""
    return (np.arange(self.vocab_size) < 256).astype(np.int32)


@dataclasses.dataclass(frozen=True)
class HfTokenizer:
  """A Hugging Face `tokenizer.json` (`tokenizers.Tokenizer.from_file`) with ByteTokenizer's
  interface: `encode` gives `[BOS, ids..., EOS]`, `decode` drops the special tokens.

  BOS, EOS and PAD are the ids `config.json` beside the file names (`bos_token_id`, ...),
  else the tokens `<s>`, `</s>`, `<pad>` (or `<|endoftext|>`) of its vocabulary; with no pad
  token PAD is EOS. `vocab_size` is the larger of the tokenizer's size and `config.json`'s
  `vocab_size` (models often pad their embedding beyond the tokenizer), so it is the number
  of logits. `name` is `hf:<directory>`, the value of `data.tokenizer` that selects it.
  """

  name: str
  path: str  # The tokenizer.json.
  bos_id: int
  eos_id: int
  pad_id: int
  vocab_size: int

  @staticmethod
  def from_dir(directory: str) -> HfTokenizer:
    """The tokenizer of a Hugging Face model directory (or a tokenizer.json file itself)."""
    path = directory if directory.endswith(".json") else os.path.join(directory,
                                                                       "tokenizer.json")
    if not os.path.exists(path):
      raise ValueError(f"{path} is missing: a Hugging Face tokenizer is read from the "
                       "tokenizer.json of its model directory.")
    return HfTokenizer._read(path, os.stat(path).st_mtime_ns)

  @staticmethod
  @functools.cache
  def _read(path: str, mtime: int) -> HfTokenizer:
    """`from_dir`'s work, once per file version (`mtime`)."""
    del mtime  # Part of the cache key only.
    tok = _hf_tokenizer(path)
    config_path = os.path.join(os.path.dirname(path), "config.json")
    config = json.load(open(config_path)) if os.path.exists(config_path) else {}

    def special(key, *tokens):
      value = config.get(key)
      if isinstance(value, list):
        value = value[0] if value else None
      for t in tokens:
        if value is None:
          value = tok.token_to_id(t)
      return value

    bos = special("bos_token_id", "<s>", "<|begin_of_text|>", "<|endoftext|>")
    eos = special("eos_token_id", "</s>", "<|end_of_text|>", "<|endoftext|>")
    if bos is None or eos is None:
      raise ValueError(f"{path}: no BOS or EOS token found (set bos_token_id and "
                       f"eos_token_id in {config_path}).")
    pad = special("pad_token_id", "<pad>")
    size = max(tok.get_vocab_size(with_added_tokens=True), int(config.get("vocab_size", 0)))
    return HfTokenizer(f"hf:{os.path.dirname(path)}", path, int(bos), int(eos),
                       int(eos if pad is None else pad), size)

  def encode(self, text: str | bytes) -> np.ndarray:
    """`[BOS, ids..., EOS]` as int32."""
    text = text.decode("utf-8", errors="replace") if isinstance(text, bytes) else text
    ids = _hf_tokenizer(self.path).encode(text, add_special_tokens=False).ids
    return np.asarray([self.bos_id, *ids, self.eos_id], np.int32)

  def encode_with_offsets(self, text: str) -> tuple[np.ndarray, np.ndarray]:
    """`text`'s tokens without BOS/EOS, int32 [n] (`encode`'s), and the character of `text`
    where each starts, int32 [n] (HF `Encoding.offsets`; pieces of one character, as a
    byte-level BPE cuts an unmerged multi-byte character, share its start). The offsets are
    the model's, untrimmed: a post-processor's `trim_offsets` would move the start of a token
    like 'Ġcat' past its space, off the token's first character."""
    encoding = _hf_untrimmed_tokenizer(self.path).encode(text, add_special_tokens=False)
    return (np.asarray(encoding.ids, np.int32),
            np.asarray([start for start, _ in encoding.offsets], np.int32))

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    """The text of `ids`, special tokens dropped."""
    return _hf_tokenizer(self.path).decode([int(i) for i in np.asarray(ids).reshape(-1)],
                                           skip_special_tokens=True)

  def byte_lengths(self) -> np.ndarray:
    """int32 [vocab_size]: the UTF-8 bytes of text each id stands for (`hf_byte_lengths`)."""
    return _hf_byte_lengths(self.path, self.vocab_size)

  def fingerprint(self) -> str:
    """The SHA-256 of its tokenizer.json: two tokenizers are the same when these are."""
    with open(self.path, "rb") as f:
      return hashlib.sha256(f.read()).hexdigest()


@functools.cache
def _hf_tokenizer(path: str) -> Any:
  import tokenizers  # Only runs with an open-weights tokenizer need it.
  return tokenizers.Tokenizer.from_file(path)


@functools.cache
def _hf_untrimmed_tokenizer(path: str) -> Any:
  """The tokenizer at `path` without its post-processor: the same ids without special tokens,
  and offsets that start where each token's text does (`HfTokenizer.encode_with_offsets`)."""
  import tokenizers
  tok = tokenizers.Tokenizer.from_file(path)
  tok.post_processor = None
  return tok


def _byte_level_alphabet() -> dict[str, int]:
  """The character byte-level BPE (GPT-2's `bytes_to_unicode`) writes for each byte -> the
  byte: printable Latin-1 bytes ('!'..'~', '¡'..'¬', '®'..'ÿ') stand for themselves, the other
  68 for U+0100 + their rank among those (so ' ' is 'Ġ' and '\\n' is 'Ċ')."""
  printable = {*range(33, 127), *range(161, 173), *range(174, 256)}
  others = [b for b in range(256) if b not in printable]
  return {**{chr(b): b for b in printable}, **{chr(256 + i): b for i, b in enumerate(others)}}


_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def _uses(component: Any, kind: str) -> bool:
  """Whether a tokenizer.json pre-tokenizer/decoder (possibly a `Sequence`) has `kind`."""
  if not isinstance(component, dict):
    return False
  parts = component.get("pretokenizers") or component.get("decoders") or [component]
  return any(isinstance(p, dict) and p.get("type") == kind for p in parts)


def hf_byte_lengths(spec: Mapping[str, Any], vocab_size: int) -> np.ndarray:
  """int32 [vocab_size]: how many UTF-8 bytes of text each id of a tokenizer.json (`spec`)
  stands for, so a sum over scored targets is the bytes they predict (bits per byte).

  Special added tokens (BOS, EOS, PAD, chat markers), the model's unknown token and ids past
  the vocabulary (a padded embedding) count 0; other added tokens their content's bytes. A
  model piece under a byte-level pre-tokenizer or decoder is one byte per character
  (`_byte_level_alphabet`: 'Ġ' is the space byte); otherwise a byte-fallback piece `<0xNN>`
  is one byte and any other piece its UTF-8 with SentencePiece's '▁' read as a space (the one
  a Metaspace pre-tokenizer prepends to a document then counts one byte not in the text).
  """
  model = spec["model"]
  vocab = model["vocab"]
  pieces = ({i: entry[0] for i, entry in enumerate(vocab)} if isinstance(vocab, list)
            else {int(i): piece for piece, i in vocab.items()})
  byte_level = _uses(spec.get("pre_tokenizer"), "ByteLevel") or _uses(spec.get("decoder"),
                                                                       "ByteLevel")
  alphabet = _byte_level_alphabet()
  prefix = model.get("continuing_subword_prefix") or ""
  lengths = np.zeros(vocab_size, np.int32)
  for i, piece in pieces.items():
    if byte_level:
      n = sum(1 if c in alphabet else len(c.encode("utf-8")) for c in piece)
    elif _BYTE_PIECE.fullmatch(piece) and model.get("byte_fallback", True):
      n = 1
    else:
      piece = piece[len(prefix):] if prefix and piece.startswith(prefix) else piece
      n = len(piece.replace("\u2581", " ").encode("utf-8"))
    if i < vocab_size and piece != model.get("unk_token"):
      lengths[i] = n
  for token in spec.get("added_tokens", []):
    if token["id"] < vocab_size:
      lengths[token["id"]] = 0 if token.get("special") else len(token["content"].encode("utf-8"))
  return lengths


@functools.cache
def _hf_byte_lengths(path: str, vocab_size: int) -> np.ndarray:
  """`hf_byte_lengths` of the tokenizer.json at `path`, read once per process."""
  with open(path, encoding="utf-8") as f:
    lengths = hf_byte_lengths(json.load(f), vocab_size)
  lengths.setflags(write=False)
  return lengths


TOKENIZERS = {"bytes": ByteTokenizer()}


def get_tokenizer(name: str) -> ByteTokenizer | HfTokenizer:
  """`bytes`, or `hf:<directory>`: the tokenizer.json of a Hugging Face model directory."""
  if name.startswith("hf:"):
    return HfTokenizer.from_dir(name[3:])
  if name not in TOKENIZERS:
    raise ValueError(f"Unknown data.tokenizer {name!r}; choose one of {sorted(TOKENIZERS)} "
                     "or 'hf:<directory holding tokenizer.json>'.")
  return TOKENIZERS[name]


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


@dataclasses.dataclass(frozen=True)
class TextInfo:
  """What a model and a run need to know about a packed text data set."""

  name: str
  tokenizer: str
  vocab_size: int
  seq_len: int
  num_examples: dict[str, int]  # Rows per split.
  documents: dict[str, int]
  dropped: dict[str, int]
  num_bytes: dict[str, int]
  # Per-row arrays the batches carry beyond tokens/targets/mask/document/id: {key: (shape
  # without the row axis, dtype name)}.
  extra: dict[str, tuple[tuple[int, ...], str]] = dataclasses.field(default_factory=dict)
  # {split: Packed.counts} for the splits that counted something (black-box files).
  counts: dict[str, dict[str, int]] = dataclasses.field(default_factory=dict)


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
  """A black-box teacher's output file(s) as rows (`data.blackbox`), once per process."""
  from distill_jax.data import blackbox

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
  `data.name='jsonl'` reads a black-box teacher's output file(s) (`data.blackbox`) instead of a
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


def get_text_info(data_config: Any) -> TextInfo:
  """Describes the configured text data set, packed at `data_config.seq_len`."""
  splits = (config_field(data_config, "train_split", "train"),
            config_field(data_config, "eval_split", "test"))
  packs = {s: packed_split(data_config, s) for s in splits}
  tok = get_tokenizer(config_field(data_config, "tokenizer", "bytes"))
  return TextInfo(name=data_config.name, tokenizer=tok.name, vocab_size=tok.vocab_size,
                  seq_len=int(data_config.seq_len),
                  num_examples={s: len(p) for s, p in packs.items()},
                  documents={s: p.documents for s, p in packs.items()},
                  dropped={s: p.dropped for s, p in packs.items()},
                  num_bytes={s: p.num_bytes for s, p in packs.items()},
                  extra={k: (v.shape[1:], v.dtype.name) for k, v in packs[splits[0]].extra.items()},
                  counts={s: dict(p.counts) for s, p in packs.items() if p.counts})


@dataclasses.dataclass(frozen=True)
class _SplitName:
  """What `TrainIterator.get_state` records of a source."""

  name: str
  split: str


@dataclasses.dataclass
class _RowBatcher:
  """step -> this process's batch of packed rows; a pure function of its fields and the step."""

  packed: Packed
  source: _SplitName
  num_examples: int
  global_batch_size: int
  batch_size: int
  process_index: int
  seed: int
  side_data: tuple[tuple[str, Any], ...] = ()

  @property
  def steps_per_epoch(self) -> int:
    return self.num_examples // self.global_batch_size

  def epoch_order(self, epoch: int) -> np.ndarray:
    keys = hash_keys(self.seed, STREAM_SHUFFLE, epoch, np.arange(self.num_examples))
    return np.argsort(keys, kind="stable")

  def __call__(self, step: int) -> dict[str, np.ndarray]:
    epoch, index = divmod(int(step), self.steps_per_epoch)
    positions = (index * self.global_batch_size + self.process_index * self.batch_size
                 + np.arange(self.batch_size, dtype=np.int64))
    return self.examples(epoch, self.epoch_order(epoch)[positions])

  def examples(self, epoch: int, ids: np.ndarray) -> dict[str, np.ndarray]:
    """Rows `ids` (not augmented: the same in every epoch), with `side_data`'s keys."""
    batch = self.packed.rows(ids)
    for key, fn in self.side_data:
      batch[key] = np.asarray(fn(epoch, ids))
    return batch


def train_iterator(data_config: Any, *, global_batch_size: int, seed: int,
                   process_index: int = 0, process_count: int = 1,
                   side_data: Mapping[str, Any] | None = None) -> TrainIterator:
  """An infinite, deterministic iterator over this process's share of the packed train rows.
  `side_data` {key: fn(epoch, ids)} adds per-row data (a teacher cache's logits) to batches."""
  split = config_field(data_config, "train_split", "train")
  packed = packed_split(data_config, split)
  if len(packed) < global_batch_size:
    raise ValueError(f"global_batch_size={global_batch_size} is larger than the {len(packed)} "
                     f"packed rows of {data_config.name!r} ({split}) at seq_len "
                     f"{data_config.seq_len}.")
  batcher = _RowBatcher(packed, _SplitName(data_config.name, split), len(packed),
                        global_batch_size,
                        local_batch_size(global_batch_size, process_index, process_count),
                        process_index, int(seed), tuple((side_data or {}).items()))
  return TrainIterator(batcher, num_workers=0)


def eval_batches(data_config: Any, *, global_batch_size: int, split: str | None = None,
                 process_index: int = 0, process_count: int = 1,
                 side_data: Mapping[str, Any] | None = None
                 ) -> Iterator[dict[str, np.ndarray]]:
  """One ordered pass over the packed rows of an eval split; the last global batch is padded
  with rows whose mask is 0 (tokens PAD, id -1; zeros for `side_data`'s keys, read as
  `fn(0, ids)`), so every batch has one shape. Eval batches also carry `target_bytes` float32
  [b, L]: the UTF-8 bytes of text each kept target stands for (the tokenizer's
  `byte_lengths`; 0 where masked), which bits per byte divide by."""
  packed = packed_split(data_config, split or config_field(data_config, "eval_split", "test"))
  b = local_batch_size(global_batch_size, process_index, process_count)
  tok = get_tokenizer(config_field(data_config, "tokenizer", "bytes"))
  pad, byte_lengths = tok.pad_id, tok.byte_lengths()
  for start in range(0, len(packed), global_batch_size):
    positions = start + process_index * b + np.arange(b, dtype=np.int64)
    real = positions[positions < len(packed)]
    batch = packed.rows(real)
    for key, fn in (side_data or {}).items():
      batch[key] = np.asarray(fn(0, real))
    missing = b - len(real)
    if missing:
      fill = {"tokens": pad, "targets": pad, "mask": 0.0, "document": -1, "id": -1}
      batch = {k: np.concatenate([v, np.full((missing, *v.shape[1:]), fill.get(k, 0),
                                             v.dtype)])
               for k, v in batch.items()}
    batch["target_bytes"] = (byte_lengths[batch["targets"]] * batch["mask"]).astype(np.float32)
    yield batch
