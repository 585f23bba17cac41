"""Tokenizers: text <-> token ids for the language models, and the bytes each id stands for.

`ByteTokenizer` maps a document to `[BOS, its UTF-8 bytes..., EOS]` (ids 0..255 are the bytes,
then BOS 256, EOS 257, PAD 258: a vocabulary of 259). Nothing to download or train, and bits per
byte follow directly from the loss. `HfTokenizer` reads a Hugging Face tokenizer.json (the one of
an open-weights model directory, `models/hf.py`). `bpe` is a second tokenizer family for the
embedded corpus: a byte-level BPE of `BPE_VOCAB_SIZE` ids trained (`train_bpe`) on the train
split of `pydoc_topics` and committed beside this module (`bpe/tokenizer.json`, made by
`scripts/train_bpe.py`), read as an `HfTokenizer` named 'bpe'. Every tokenizer's
`byte_lengths` gives the UTF-8 bytes of text each id stands for, which bits per byte divide by.
`get_tokenizer` turns the setting `data.tokenizer` (`bytes`, `bpe` or `hf:<directory>`) into one.

Why the BPE is committed, not trained on first use: a tokenizer is part of every model trained
with it (an exported teacher's ids mean nothing under another vocabulary), so it must be the
same file on every machine. The corpus it is trained from is Python's own documentation, which
changes a little between Python versions; a tokenizer trained on first use would silently
differ between them. The file is ~40 kB, and `scripts/train_bpe.py --check` says whether this
Python's corpus still gives it.

They live beside the models that read their ids (a leaf of the models layer: this module
imports nothing of distill_jax); the data layer packs text with them.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np


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
  return np.asarray([len(data) for data in hf_token_bytes(spec, vocab_size)], np.int32)


@functools.cache
def _hf_byte_lengths(path: str, vocab_size: int) -> np.ndarray:
  """`hf_byte_lengths` of the tokenizer.json at `path`, read once per process."""
  with open(path, encoding="utf-8") as f:
    lengths = hf_byte_lengths(json.load(f), vocab_size)
  lengths.setflags(write=False)
  return lengths


def hf_token_bytes(spec: Mapping[str, Any], vocab_size: int) -> list[bytes]:
  """The UTF-8 bytes of text each id of a tokenizer.json (`spec`) stands for, [vocab_size]:
  what `hf_byte_lengths` counts, as bytes (a byte-level piece's characters mapped back to
  their bytes, `<0xNN>` its byte, '▁' a space; b"" for special tokens, the unknown token and
  ids past the vocabulary). Joined, a continuation's ids give its text as it follows the
  prompt (a decoder may drop a document's leading space; these keep it)."""
  model = spec["model"]
  vocab = model["vocab"]
  pieces = ({i: entry[0] for i, entry in enumerate(vocab)} if isinstance(vocab, list)
            else {int(i): piece for piece, i in vocab.items()})
  byte_level = _uses(spec.get("pre_tokenizer"), "ByteLevel") or _uses(spec.get("decoder"),
                                                                       "ByteLevel")
  alphabet = _byte_level_alphabet()
  prefix = model.get("continuing_subword_prefix") or ""
  table = [b""] * vocab_size
  for i, piece in pieces.items():
    if i >= vocab_size or piece == model.get("unk_token"):
      continue
    if byte_level:
      table[i] = b"".join(bytes([alphabet[c]]) if c in alphabet else c.encode("utf-8")
                          for c in piece)
    elif _BYTE_PIECE.fullmatch(piece) and model.get("byte_fallback", True):
      table[i] = bytes([int(piece[3:5], 16)])
    else:
      piece = piece[len(prefix):] if prefix and piece.startswith(prefix) else piece
      table[i] = piece.replace("\u2581", " ").encode("utf-8")
  for token in spec.get("added_tokens", []):
    if token["id"] < vocab_size:
      table[token["id"]] = b"" if token.get("special") else token["content"].encode("utf-8")
  return table


@functools.cache
def token_bytes_table(tokenizer: ByteTokenizer | HfTokenizer) -> tuple[bytes, ...]:
  """`hf_token_bytes` of an HfTokenizer's file; for ByteTokenizer each byte id's byte (b"" for
  BOS, EOS, PAD). Read once per tokenizer."""
  if isinstance(tokenizer, ByteTokenizer):
    return tuple(bytes([i]) if i < 256 else b"" for i in range(tokenizer.vocab_size))
  with open(tokenizer.path, encoding="utf-8") as f:
    return tuple(hf_token_bytes(json.load(f), tokenizer.vocab_size))


BPE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bpe")
BPE_VOCAB_SIZE = 1024
BPE_SPECIAL_TOKENS = ("<s>", "</s>", "<pad>")  # BOS, EOS, PAD: ids 0, 1, 2.


def train_bpe(texts: Iterable[str], vocab_size: int = BPE_VOCAB_SIZE) -> str:
  """A byte-level BPE (GPT-2's scheme: any text, no unknown token) of `vocab_size` ids trained
  on `texts`, as tokenizer.json text: BOS `<s>`, EOS `</s>`, PAD `<pad>` (ids 0, 1, 2), the
  256 byte symbols, then the merges. Deterministic: the same texts give the same file."""
  import tokenizers
  from tokenizers import decoders, models, pre_tokenizers, trainers

  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False,
                                special_tokens=list(BPE_SPECIAL_TOKENS),
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(list(texts), trainer=trainer)
  return tok.to_str(pretty=True)


def bpe_tokenizer() -> HfTokenizer:
  """The committed byte-level BPE of the embedded corpus (`data.tokenizer='bpe'`)."""
  return dataclasses.replace(HfTokenizer.from_dir(BPE_DIR), name="bpe")


TOKENIZERS = {"bytes": ByteTokenizer, "bpe": bpe_tokenizer}


def get_tokenizer(name: str) -> ByteTokenizer | HfTokenizer:
  """`bytes`, `bpe` (the embedded corpus's BPE), or `hf:<directory>`: the tokenizer.json of a
  Hugging Face model directory."""
  if name.startswith("hf:"):
    return HfTokenizer.from_dir(name[3:])
  if name not in TOKENIZERS:
    raise ValueError(f"Unknown data.tokenizer {name!r}; choose one of {sorted(TOKENIZERS)} "
                     "or 'hf:<directory holding tokenizer.json>'.")
  return TOKENIZERS[name]()
