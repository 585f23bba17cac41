"""Black-box teachers: a JSONL file of what a teacher wrote is a data set (`data.name='jsonl'`).

A teacher reachable only through an API (or a local one sampled by `scripts/generate.py`)
leaves a file, one JSON object per line:

    {"prompt": "...", "completion": "..."}
    {"prompt": "...", "completion": "...", "tokens": ["Hel", "lo"],
     "top_logprobs": [{"Hel": -0.1, "He": -2.5}, {"lo": -0.01, "p": -4.7}]}

`tokens` are the completion's tokens as the teacher's tokenizer cut it (their bytes must join
to the completion; a piece of a multi-byte character is written `bytes:\\xNN`, as APIs do)
and `top_logprobs[i]` the teacher's k most likely tokens at token i with their natural-log
probabilities, as chat APIs return them. Both or neither. A line may also carry metadata
that is not read (`METADATA_KEYS`: what `distill-jax collect` writes, and `meta`); any other
field is refused.

Rows. Each record is one row: `BOS prompt completion EOS` in the student's tokenizer
(`data.tokenizer`), inputs and next-token targets, truncated to `data.seq_len` (truncated
records are counted) and padded. The loss mask is 1 only where the target is a completion
token or the final EOS: the student learns to write the completion, not the prompt
(sequence-level KD, Kim and Rush 2016).

Log-probabilities. Teacher and student tokens meet at offsets of the completion: the
student's tokenizer encodes the completion once with offsets (`encode_with_offsets`: bytes
for the byte-level student, which reads the teacher's exact bytes; characters for an HF
tokenizer), and teacher token i starts at the offset where its predecessors' bytes end. When
a student token starts there, teacher token i's log-probabilities apply at the position
that predicts that student token. When none does (the teacher token starts inside a student
token, e.g. teacher 'a', 'b' under a student that writes 'ab' as one token: 'b' starts inside
it), teacher token i has no student position: it is counted (`unaligned`) and nothing of it
is written. So no position is written twice. A special token in `tokens` (`<bos>`, `<eos>`,
`<pad>`: no text) has no position either.

Alternatives. Each alternative maps to its first student token: the one the student's
tokenization of the alternative's text starts with (for the byte-level student, its first
byte). Alternatives that share a first token add their probabilities (a log-sum-exp of their
log-probs): as far as its top-k shows it, the teacher's probability that the student's next
token is that one (prefix marginalisation; each alternative is tokenized on its own). So
'hello', 'Hi' and 'H' become p(h) and p(H) = p(Hi) + p(H) at the position that predicts the
first byte, and a position may hold fewer entries than the teacher gave. An alternative with
no text (a named special token, an empty string; for an HF student, a `bytes:\\xNN` piece
that is no whole character) does not map. Everything that does not reach the student is
counted, never silently dropped: the alternatives that do not map (those of a token with no
position included) and the teacher tokens none of whose alternatives mapped. The rows carry
`topk_ids` int32 [L, K], `topk_logprobs` float32 [L, K] (the summed log-probabilities, not
renormalised) and `topk_valid` float32 [L, K] (K = the file's largest k) for
`token_sparse_topk_kd`, whose target keeps the mass the entries leave (1 - their sum) as one
"any other token" outcome.

Every problem in the file is reported with its line number before anything is trained.
"""

from __future__ import annotations

import bisect
import codecs
import dataclasses
import functools
import json
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from absl import logging

from distill_jax.data import batch_keys

NAME = "jsonl"
TOPK_KEYS = ("topk_ids", "topk_logprobs", "topk_valid")
for _key in TOPK_KEYS:  # The file's log-probabilities are for its own tokens, not a sample's.
  batch_keys.declare(
      _key, what="a black-box teacher's top-k log-probabilities for the file's tokens, which "
      "no teacher can give for the student's samples", fix="train on the file's text "
      "(on_policy.fraction=0), or distill on-policy from a live teacher")
# Token strings that name a special token (scripts/generate.py writes them): no text.
SPECIAL_TOKENS = ("<bos>", "<eos>", "<pad>")
FIELDS = ("prompt", "completion", "tokens", "top_logprobs")
# What a line may carry beside FIELDS, never read for training: where it came from
# (`distill-jax collect` writes the prompt's id, the sample's number, the server's model name,
# why it stopped, the sampling settings and a chat prompt's messages) and `meta`, anything of
# the user's. Any other field is refused, so a misspelt field is not silently ignored.
METADATA_KEYS = ("id", "sample", "model", "finish_reason", "sampling", "messages", "meta")


class BlackboxFileError(ValueError):
  """A teacher-output file is missing or malformed; names the file and the lines."""


@dataclasses.dataclass(frozen=True)
class Record:
  """One line of a teacher-output file."""

  prompt: str
  completion: str
  tokens: tuple[str, ...] | None = None
  top_logprobs: tuple[tuple[tuple[str, float], ...], ...] | None = None


@dataclasses.dataclass(frozen=True)
class MappingCounts:
  """How much of a file's log-probability information reached the student's vocabulary."""

  records: int = 0
  truncated: int = 0  # Records cut at seq_len.
  entries: int = 0  # (token, log-prob) alternatives in the file's kept positions.
  unmapped: int = 0  # Alternatives with no text or whose teacher token has no position.
  positions: int = 0  # Teacher tokens with log-probabilities, within seq_len.
  empty_positions: int = 0  # Of those, tokens none of whose alternatives mapped.
  unaligned: int = 0  # Of those, tokens that start inside a student token: no position.

  def __add__(self, other: MappingCounts) -> MappingCounts:
    return MappingCounts(*(a + b for a, b in zip(dataclasses.astuple(self),
                                                 dataclasses.astuple(other), strict=True)))

  def summary(self) -> dict[str, int]:
    """The counts by the names a run's `result.json` gives them (under "data", per split)."""
    return {"records": self.records, "truncated_records": self.truncated,
            "alternatives": self.entries, "unmapped_alternatives": self.unmapped,
            "teacher_tokens": self.positions,
            "teacher_tokens_without_mapped_alternative": self.empty_positions,
            "unaligned_teacher_tokens": self.unaligned}


def token_bytes(token: str) -> bytes:
  """The bytes a teacher's token string stands for: `bytes:\\xNN...` (how APIs name a piece
  of a multi-byte UTF-8 character) those bytes, a special token's name (`SPECIAL_TOKENS`)
  none, any other string its UTF-8 encoding."""
  if token in SPECIAL_TOKENS:
    return b""
  if token.startswith("bytes:"):
    try:
      return token[len("bytes:"):].encode("latin-1").decode("unicode_escape").encode("latin-1")
    except (UnicodeError, ValueError):
      pass
  return token.encode("utf-8")


def record_problem(record: Any) -> str | None:
  """What is wrong with one parsed line, or None (the collector checks each record it writes
  with it, so what it writes reads)."""
  if not isinstance(record, dict):
    return f"expected a JSON object, got {type(record).__name__}"
  for key in ("prompt", "completion"):
    if not isinstance(record.get(key), str):
      return f"field {key!r} must be a string (got {record.get(key)!r:.40})"
  unknown = sorted(set(record) - {*FIELDS, *METADATA_KEYS})
  if unknown:
    return (f"unknown field(s) {unknown}; a line has {', '.join(FIELDS)} and may carry "
            f"{', '.join(METADATA_KEYS)} (not read)")
  tokens, top = record.get("tokens"), record.get("top_logprobs")
  if (tokens is None) != (top is None):
    return "'tokens' and 'top_logprobs' come together (both or neither)"
  if tokens is None:
    return None
  if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
    return "'tokens' must be a list of strings"
  if not isinstance(top, list) or len(top) != len(tokens):
    return (f"'top_logprobs' must be a list with one entry per token ({len(tokens)} tokens, "
            f"{len(top) if isinstance(top, list) else type(top).__name__} entries)")
  if b"".join(map(token_bytes, tokens)).decode("utf-8", "replace") != record["completion"]:
    return "the 'tokens' do not join to the 'completion'"
  for i, alternatives in enumerate(top):
    if not isinstance(alternatives, dict) or not alternatives:
      return f"top_logprobs[{i}] must be a non-empty object {{token: log-prob}}"
    for token, value in alternatives.items():
      if (isinstance(value, bool) or not isinstance(value, (int, float))
          or not math.isfinite(value) or value > 1e-6):
        return (f"top_logprobs[{i}][{token!r}] = {value!r}: a log-probability is a finite "
                "number <= 0")
  return None


@functools.cache
def _read_file(path: str, mtime: int) -> tuple[Record, ...]:
  del mtime  # Part of the cache key only.
  records, problems = [], []
  with open(path, encoding="utf-8") as f:
    for number, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        problems.append(f"{path}:{number}: not JSON ({e.msg} at column {e.colno})")
        continue
      problem = record_problem(record)
      if problem:
        problems.append(f"{path}:{number}: {problem}")
        continue
      top = record.get("top_logprobs")
      records.append(Record(
          record["prompt"], record["completion"],
          None if top is None else tuple(record["tokens"]),
          None if top is None else tuple(tuple((t, float(v)) for t, v in alternatives.items())
                                         for alternatives in top)))
  if problems:
    shown = "\n  ".join(problems[:10])
    more = f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""
    raise BlackboxFileError(f"Teacher-output file {path} has {len(problems)} malformed "
                            f"line(s); fix them and rerun (format: docs/blackbox.md):\n  "
                            f"{shown}{more}")
  if not records:
    raise BlackboxFileError(f"Teacher-output file {path} has no records.")
  return tuple(records)


def read_records(path: str) -> tuple[Record, ...]:
  """The records of a teacher-output file; raises BlackboxFileError listing every malformed
  line by number (the run then refuses to start)."""
  path = os.path.abspath(os.path.expanduser(path))
  if not os.path.isfile(path):
    raise BlackboxFileError(f"No teacher-output file {path}: set config.data.train_files to "
                            "the JSONL file(s) of the teacher's outputs (docs/blackbox.md).")
  return _read_file(path, os.stat(path).st_mtime_ns)


def _body(tokenizer: Any, text: str) -> np.ndarray:
  """`text`'s student tokens without BOS/EOS."""
  return np.asarray(tokenizer.encode(text), np.int32)[1:-1]


def _first_token(tokenizer: Any, text: str) -> int | None:
  """The first student token of an alternative's text (the student's tokenization of it
  starts with this id; for the byte-level student its first byte), or None when it has no
  text: a named special token, an empty string, or (for a student that reads text, not
  bytes) a `bytes:\\xNN` piece that is no whole character."""
  return first_student_token(tokenizer, token_bytes(text))


def first_student_token(tokenizer: Any, data: bytes) -> int | None:
  """The first student token of the text `data` (bytes): the rule of prefix marginalisation,
  shared by the black-box files' alternatives and a live teacher's vocabulary
  (`cross_tokenizer.vocab_map`). None for no bytes, or (a student that reads text) bytes
  that are no whole UTF-8 text."""
  if tokenizer.name == "bytes":
    return data[0] if data else None
  try:
    ids = _body(tokenizer, data.decode("utf-8")) if data else ()
  except UnicodeDecodeError:
    return None
  return int(ids[0]) if len(ids) else None


def _teacher_starts(pieces: Sequence[bytes], in_bytes: bool) -> list[tuple[int, bool]]:
  """Where each teacher token (its bytes, `pieces`) starts in the completion, as
  (offset, inside): in bytes when `in_bytes`, else in characters of the completion's text
  (the pieces decoded as one, bad UTF-8 replaced); `inside` when the token starts inside a
  character (a `bytes:\\xNN` piece after the first), `offset` then that character's."""
  if in_bytes:
    return [(int(o), False) for o in np.cumsum([0, *map(len, pieces[:-1])])]
  decoder = codecs.getincrementaldecoder("utf-8")("replace")
  starts, chars = [], 0
  for piece in pieces:
    starts.append((chars, bool(decoder.getstate()[0])))  # Bytes pending: inside a character.
    chars += len(decoder.decode(piece))
  return starts


def build_rows(records: Sequence[Record], tokenizer: Any, seq_len: int
               ) -> tuple[dict[str, np.ndarray], MappingCounts]:
  """Rows (`tokens`, `targets`, `mask`, `document` [N, L], and with log-probabilities the
  `TOPK_KEYS` arrays [N, L, K]) and the mapping counts; see the module docstring."""
  n, pad = len(records), tokenizer.pad_id
  k = max((len(a) for r in records if r.top_logprobs for a in r.top_logprobs), default=0)
  rows = {"tokens": np.full((n, seq_len), pad, np.int32),
          "targets": np.full((n, seq_len), pad, np.int32),
          "mask": np.zeros((n, seq_len), np.float32),
          "document": np.full((n, seq_len), -1, np.int32)}
  if k:
    rows.update(topk_ids=np.zeros((n, seq_len, k), np.int32),
                topk_logprobs=np.zeros((n, seq_len, k), np.float32),
                topk_valid=np.zeros((n, seq_len, k), np.float32))
  counts = MappingCounts(records=n)
  in_bytes = tokenizer.name == "bytes"
  first_token = functools.lru_cache(maxsize=None)(functools.partial(_first_token, tokenizer))
  for r, record in enumerate(records):
    prompt = np.asarray(tokenizer.encode(record.prompt), np.int32)[:-1]  # BOS + prompt.
    pieces = None if record.tokens is None else [token_bytes(t) for t in record.tokens]
    if pieces is not None and in_bytes:
      # The teacher's exact bytes (a lone `bytes:\\xNN` piece stays one byte, where the
      # completion's text shows U+FFFD), so its tokens' byte offsets are the student's.
      text: str | bytes = b"".join(pieces)
    else:
      text = record.completion
    completion, offsets = tokenizer.encode_with_offsets(text)
    stream = np.concatenate([prompt, completion, [tokenizer.eos_id]]).astype(np.int32)
    length = min(len(stream) - 1, seq_len)
    counts += MappingCounts(truncated=int(len(stream) - 1 > seq_len))
    rows["tokens"][r, :length] = stream[:length]
    rows["targets"][r, :length] = stream[1:length + 1]
    rows["document"][r, :length] = 0
    # Position t predicts stream[t + 1]: completion token j is predicted at `first + j`.
    first = len(prompt) - 1
    rows["mask"][r, max(first, 0):length] = 1.0
    if not record.top_logprobs:
      continue
    starts = offsets.tolist()
    student_at = {}  # Offset -> the first student token that starts there.
    for j, start in enumerate(starts):
      student_at.setdefault(start, j)
    for piece, alternatives, (start, inside) in zip(
        pieces, record.top_logprobs, _teacher_starts(pieces, in_bytes), strict=True):
      aligned = bool(piece) and not inside and start in student_at
      if aligned:
        j = student_at[start]
      elif piece:  # Inside a student token: the last one that starts at or before it.
        j = max(bisect.bisect_right(starts, start) - 1, 0)
      else:  # No text: where the next student token (or the EOS, j = len(starts)) starts.
        j = bisect.bisect_left(starts, start)
      if first + j >= length:
        break  # Truncated away (with everything after it).
      if not aligned:  # No text, or it starts inside a student token: no student position.
        counts += MappingCounts(entries=len(alternatives), unmapped=len(alternatives),
                                positions=1, empty_positions=1, unaligned=int(bool(piece)))
        continue
      mapped: dict[int, list[float]] = {}
      for alternative, value in alternatives:
        token_id = first_token(alternative)
        if token_id is not None:
          mapped.setdefault(token_id, []).append(value)
      unmapped = len(alternatives) - sum(map(len, mapped.values()))
      counts += MappingCounts(entries=len(alternatives), unmapped=unmapped, positions=1,
                              empty_positions=int(not mapped))
      for slot, (token_id, values) in enumerate(mapped.items()):
        # Alternatives that start with the same student token: their probabilities add up.
        rows["topk_ids"][r, first + j, slot] = token_id
        rows["topk_logprobs"][r, first + j, slot] = np.logaddexp.reduce(values)
        rows["topk_valid"][r, first + j, slot] = 1.0
  return rows, counts


def _files(value: Any) -> list[str]:
  if not value:
    return []
  items = value.split(",") if isinstance(value, str) else list(value)
  return [os.path.expanduser(str(v).strip()) for v in items if str(v).strip()]


def split_records(data_config: Any, split: str) -> tuple[Record, ...]:
  """The records of `split`: `data.train_files` for the train split; for the eval split
  `data.eval_files`, or else the last `data.eval_fraction` of the train records (which the
  train split then leaves out)."""
  train_files = _files(data_config.get("train_files"))
  if not train_files:
    raise BlackboxFileError("config.data.train_files is not set: give the JSONL file(s) of the "
                            "teacher's outputs (comma-separated; format: docs/blackbox.md).")
  records = tuple(r for path in train_files for r in read_records(path))
  eval_files = _files(data_config.get("eval_files"))
  is_train = split == data_config.get("train_split", "train")
  if eval_files:
    return records if is_train else tuple(r for p in eval_files for r in read_records(p))
  fraction = float(data_config.get("eval_fraction", 0.1))
  if len(records) < 2:
    raise BlackboxFileError(f"{train_files}: one record cannot be split into train and eval "
                            "rows; add records or set config.data.eval_files.")
  held = min(max(1, round(fraction * len(records))), len(records) - 1)
  return records[:-held] if is_train else records[-held:]


def log_counts(path_names: str, split: str, counts: MappingCounts) -> None:
  """One log line with what did not reach the student (never silently dropped)."""
  logging.info(
      "Black-box %s (%s): %d records, %d truncated at seq_len; log-probs: %d of %d "
      "alternatives do not map to the student's vocabulary, %d of %d teacher tokens have "
      "none that maps (%d of them start inside a student token).", split, path_names,
      counts.records, counts.truncated, counts.unmapped, counts.entries,
      counts.empty_positions, counts.positions, counts.unaligned)
