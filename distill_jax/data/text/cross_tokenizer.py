"""A live teacher with its own tokenizer: the student's rows re-tokenised for it, aligned by bytes.

A teacher configured with `teachers.NAME.tokenizer` (a `data.tokenizer` name: `bpe`, `bytes`,
`hf:DIR`) reads the same text as the student in its own tokens. The data layer builds, per
packed student row, on the host:

- `xtok/NAME/tokens` int32 [L_T]: the row's text in the teacher's tokens (L_T =
  `teachers.NAME.seq_len`, default the data's `seq_len`; longer is cut and counted, shorter
  padded with the teacher's PAD);
- `xtok/NAME/index` int32 [L]: for each student position, the teacher position that predicts
  the same boundary (below), and `xtok/NAME/mask` float32 [L]: 1 where one exists.

Cutting. A row is the student's ids: its inputs and its last target (L + 1 tokens), whose
bytes (`models.tokenizers.token_bytes_table`) are the row's text. BOS tokens cut it into
segments (documents; the first may start mid-document, as the row does), and each segment's
bytes are tokenised by the teacher on their own, with its BOS when the student's has one and
its EOS when the student's segment ends with EOS. Bytes of a character cut by the row's start
or end (a byte-level student's row may begin inside 'ö') get no teacher token.

Boundaries. Every token of either row starts at a boundary: (segment, byte offset of its first
byte in the segment's text), BOS just before the text (offset -1), EOS just after it (offset =
the text's length), PAD none. Position t predicts token t + 1, so its boundary is that token's.
A student position and a teacher position align when they predict the same boundary: both
have read exactly the same bytes of the row and predict the token that starts there. This is
the offset rule of the black-box files (`blackbox.py`: a teacher token's log-probabilities apply
at the student position that predicts the student token starting where it does); a student
position whose boundary falls inside a teacher token (a byte student reading 'a' of the BPE
token 'ab') has no teacher position and is masked. For a text tokenizer, pieces that share
a character's start (a byte-level BPE cutting a character) keep only the first one's boundary.

On-policy, the rollout rebuilds these keys from the student's samples with the same
`teacher_rows`, called from the compiled step (`tasks.language_model.on_policy.Retokenize`).

Vocabulary (`vocab_map`): each teacher id maps to the student token its text starts with
(`blackbox.first_student_token`, the black-box files' prefix marginalisation), the teacher's
EOS to the student's; ids with no text (BOS, PAD, other specials) and, for a student that
reads text, pieces that are no whole character map to -1, and the loss counts their mass.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from absl import logging

from distill_jax.data import batch_keys
from distill_jax.data.sources import config_field
from distill_jax.data.text.blackbox import first_student_token
from distill_jax.data.text.packing import packed_split
from distill_jax.losses.cross_tokenizer import XTOK_PREFIX, batch_key
from distill_jax.models.tokenizers import ByteTokenizer, get_tokenizer, token_bytes_table

# The on-policy rollout rebuilds them from the student's samples
# (`tasks.language_model.on_policy.Retokenize`), so they follow the tokens.
batch_keys.declare(
    XTOK_PREFIX, what="a cross-tokenizer teacher's tokens and alignment ({name}), rebuilt from "
    "the student's samples by the on-policy rollout", follows_tokens=True)

# A boundary's key: segment * SEGMENT + byte offset + 1 (BOS: offset -1); -1 for none.
SEGMENT = 1 << 32


def _key(segment: int, offset: int) -> int:
  return segment * SEGMENT + offset + 1


@dataclasses.dataclass(frozen=True)
class Segment:
  """A row's run of tokens between BOS tokens: its text's bytes, whether the student's run
  starts with BOS and ends with EOS."""

  data: bytes
  bos: bool
  eos: bool


def student_segments(ids: Sequence[int], tokenizer: Any) -> tuple[list[Segment], np.ndarray]:
  """A student row's tokens `ids` [n] -> its segments and each token's boundary key int64 [n]
  (see the module docstring)."""
  table = token_bytes_table(tokenizer)
  keys = np.full(len(ids), -1, np.int64)
  segments: list[dict[str, Any]] = []
  for i, token in enumerate(int(t) for t in ids):
    if token == tokenizer.bos_id or not segments:
      segments.append({"data": b"", "bos": token == tokenizer.bos_id, "eos": False})
    seg, current = len(segments) - 1, segments[-1]
    if token == tokenizer.bos_id:
      keys[i] = _key(seg, -1)
    elif token == tokenizer.eos_id:
      keys[i] = _key(seg, len(current["data"]))
      current["eos"] = True
    elif token != tokenizer.pad_id and 0 <= token < len(table) and table[token]:
      keys[i] = _key(seg, len(current["data"]))
      current["data"] += table[token]
  return [Segment(**s) for s in segments], keys


def _char_starts(data: bytes) -> tuple[str, list[int]]:
  """`data`'s whole characters as text and the byte where each starts; bytes of a character
  cut at either end (or no UTF-8 at all) are left out."""
  try:
    text = data.decode("utf-8")
  except UnicodeDecodeError:
    text = None
  if text is not None:
    starts = np.cumsum([0, *(len(c.encode("utf-8")) for c in text[:-1])]) if text else []
    return text, [int(s) for s in starts]
  chars, starts, i = [], [], 0
  while i < len(data):
    lead = data[i]
    size = 1 if lead < 0x80 else 2 if 0xC0 <= lead < 0xE0 else 3 if lead < 0xF0 else 4
    try:
      chars.append(data[i:i + size].decode("utf-8"))
      starts.append(i)
      i += size
    except UnicodeDecodeError:
      i += 1  # A cut or stray byte: no character, no teacher token.
  return "".join(chars), starts


def encode_bytes(tokenizer: Any, data: bytes) -> tuple[np.ndarray, np.ndarray]:
  """`data`'s tokens in `tokenizer` (no BOS/EOS), int32 [n], and the byte of `data` where
  each starts, int64 [n]; -1 for a piece after the first of one character (its start is not a
  boundary of its own)."""
  if isinstance(tokenizer, ByteTokenizer):
    return np.frombuffer(data, np.uint8).astype(np.int32), np.arange(len(data), dtype=np.int64)
  text, starts = _char_starts(data)
  if not text:
    return np.zeros(0, np.int32), np.zeros(0, np.int64)
  ids, offsets = tokenizer.encode_with_offsets(text)
  byte_starts = np.asarray([starts[o] for o in offsets.tolist()], np.int64)
  repeated = np.concatenate([[False], byte_starts[1:] == byte_starts[:-1]])
  return np.asarray(ids, np.int32), np.where(repeated, -1, byte_starts)


def teacher_stream(segments: Sequence[Segment], tokenizer: Any) -> tuple[np.ndarray, np.ndarray]:
  """The teacher's tokens of a row's segments, int32 [m], and their boundary keys int64 [m]."""
  ids, keys = [], []
  for seg, segment in enumerate(segments):
    if segment.bos:
      ids.append(tokenizer.bos_id)
      keys.append(_key(seg, -1))
    body, starts = encode_bytes(tokenizer, segment.data)
    ids.extend(body.tolist())
    keys.extend(_key(seg, s) if s >= 0 else -1 for s in starts.tolist())
    if segment.eos:
      ids.append(tokenizer.eos_id)
      keys.append(_key(seg, len(segment.data)))
  return np.asarray(ids, np.int32), np.asarray(keys, np.int64)


def align_positions(student_keys: np.ndarray, teacher_keys: np.ndarray
                    ) -> tuple[np.ndarray, np.ndarray]:
  """For each student position, the teacher position predicting the same boundary.

  `student_keys` [n] and `teacher_keys` [m]: the boundary each position predicts (the key of
  the next token; -1 for none), unique among the valid ones. Returns `index` int32 [n] (0
  where none) and `mask` float32 [n] (1 where a teacher position predicts the same boundary).
  """
  where = {int(k): u for u, k in enumerate(teacher_keys.tolist()) if k >= 0}
  found = [where.get(int(k), -1) if k >= 0 else -1 for k in student_keys.tolist()]
  index = np.asarray(found, np.int64)
  return np.maximum(index, 0).astype(np.int32), (index >= 0).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class TeacherRows:
  """A split's rows in a teacher's tokens, aligned to the student's (module docstring)."""

  tokens: np.ndarray  # int32 [N, L_T]
  index: np.ndarray  # int32 [N, L]
  mask: np.ndarray  # float32 [N, L]
  counts: Mapping[str, int]

  def batch_arrays(self, name: str) -> dict[str, np.ndarray]:
    """{batch key: [N, ...]} under teacher `name`."""
    return {batch_key(name, "tokens"): self.tokens, batch_key(name, "index"): self.index,
            batch_key(name, "mask"): self.mask}


def teacher_rows(tokens: np.ndarray, targets: np.ndarray, mask: np.ndarray, student: Any,
                 teacher: Any, teacher_len: int) -> TeacherRows:
  """Student rows (`tokens`, `targets`, `mask` [N, L]) re-tokenised for `teacher` at
  `teacher_len` tokens per row and aligned (module docstring). `counts`: the kept student
  positions, those with a teacher position, the rows whose teacher tokens were cut."""
  n, length = tokens.shape
  out_tokens = np.full((n, teacher_len), teacher.pad_id, np.int32)
  index = np.zeros((n, length), np.int32)
  aligned = np.zeros((n, length), np.float32)
  cut = 0
  for r in range(n):
    row = np.concatenate([tokens[r], targets[r, -1:]])
    segments, s_keys = student_segments(row, student)
    t_ids, t_keys = teacher_stream(segments, teacher)
    cut += int(len(t_ids) > teacher_len + 1)
    out_tokens[r, :min(len(t_ids), teacher_len)] = t_ids[:teacher_len]
    index[r], aligned[r] = align_positions(s_keys[1:], t_keys[1:teacher_len + 1])
  kept = mask > 0
  counts = {"kept_positions": int(kept.sum()),
            "aligned_positions": int((aligned * kept).sum()), "cut_rows": cut}
  return TeacherRows(out_tokens, index, aligned * kept, counts)


def vocab_map(teacher: Any, student: Any) -> np.ndarray:
  """int32 [teacher vocab]: the student id each teacher id's probability goes to, or -1
  (module docstring: prefix marginalisation)."""
  table = token_bytes_table(teacher)
  mapped = np.full(teacher.vocab_size, -1, np.int32)
  for i, data in enumerate(table):
    first = first_student_token(student, data) if data else None
    mapped[i] = -1 if first is None else first
  mapped[teacher.eos_id] = student.eos_id
  return mapped


def log_counts(name: str, split: str, counts: Mapping[str, int]) -> None:
  """One log line: how much of the student's rows the teacher's positions cover."""
  logging.info("Cross-tokenizer teacher %r (%s): %d of %d kept student positions have a "
               "teacher position predicting the same boundary; %d rows cut at the teacher's "
               "length.", name, split, counts["aligned_positions"], counts["kept_positions"],
               counts["cut_rows"])


@dataclasses.dataclass(frozen=True)
class CrossTokenizerData:
  """What a run needs for its cross-tokenizer teachers: per split {batch key: fn(epoch, ids)
  -> rows} (side data), each key's (shape without the row axis, dtype name), each teacher's
  vocabulary map and the splits' counts."""

  side_data: dict[str, dict[str, Any]]
  shapes: dict[str, tuple[tuple[int, ...], str]]
  vocab_maps: dict[str, np.ndarray]
  counts: dict[str, dict[str, dict[str, int]]]


def _rows_of(array: np.ndarray) -> Any:
  return lambda epoch, ids: array[np.asarray(ids, np.int64)]


def from_config(teachers_config: Mapping[str, Any], data_config: Any, splits: Sequence[str]
                ) -> CrossTokenizerData:
  """`build` for the entries of `config.teachers` with their own tokenizer
  (`teachers.NAME.tokenizer`, `teachers.NAME.seq_len`); empty without any."""
  own = {name: (settings["tokenizer"], settings.get("seq_len", 0))
         for name, settings in teachers_config.items() if settings.get("tokenizer")}
  return build(data_config, own, splits) if own else CrossTokenizerData({}, {}, {}, {})


def build(data_config: Any, teachers: Mapping[str, tuple[str, int]],
          splits: Sequence[str]) -> CrossTokenizerData:
  """The rows of `splits` re-tokenised and aligned for each teacher {name: (tokenizer name,
  row length; 0: the data's seq_len)}, logged, as side data (`CrossTokenizerData`)."""
  student = get_tokenizer(config_field(data_config, "tokenizer", "bytes"))
  side_data: dict[str, dict[str, Any]] = {s: {} for s in splits}
  shapes, maps, counts = {}, {}, {}
  for name, (tokenizer, length) in teachers.items():
    teacher = get_tokenizer(tokenizer)
    maps[name] = vocab_map(teacher, student)
    length = int(length) or int(data_config.seq_len)
    counts[name] = {}
    for split in splits:
      packed = packed_split(data_config, split)
      rows = teacher_rows(packed.tokens, packed.targets, packed.mask, student, teacher, length)
      log_counts(name, split, rows.counts)
      counts[name][split] = dict(rows.counts)
      for key, array in rows.batch_arrays(name).items():
        side_data[split][key] = _rows_of(array)
        shapes[key] = (array.shape[1:], array.dtype.name)
  return CrossTokenizerData(side_data, shapes, maps, counts)
