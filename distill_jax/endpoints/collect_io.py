"""The collector's files: the prompts it reads, and the output it appends to and resumes.

Prompts (`read_prompts`): a file ending in `.jsonl` holds one JSON object a line, with
`"prompt"` (a string) and optionally `"id"` (a string or an integer, unique; default the line
number) and, for the chat API, `"messages"` (a list of `{role, content}`, sent as they are;
the record's `prompt` is then the line's `"prompt"`, or else the messages' contents joined by
newlines). Any other file is plain text: one prompt a line (the line without its newline;
blank lines skipped), its id the line number. From Python, a list of strings or of such
objects does as well.

Output (`resume`, `Appender`): records are appended a prompt at a time (all its samples in
one write), each write flushed to disk (fsync) before the next, in prompt order. A file left
by a killed run ends, at worst, in a partial line or a prompt with fewer samples than asked
(a write cut short): `resume` cuts those off, checks that every record was made from this
prompts file with these sampling settings, and returns the ids done, which a rerun skips.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from absl import logging

from distill_jax.endpoints.answers import Prompt


class CollectError(ValueError):
  """Bad settings or input files for the collector; one line naming the flag or file."""


def _prompt_of(value: Any, where: str, number: int, api: str) -> Prompt:
  if not isinstance(value, Mapping):
    raise CollectError(f"{where}:{number}: expected a JSON object with \"prompt\", got "
                       f"{type(value).__name__}")
  unknown = sorted(set(value) - {"prompt", "id", "messages"})
  if unknown:
    raise CollectError(f"{where}:{number}: unknown field(s) {unknown}; a prompt line has "
                       "\"prompt\" and optionally \"id\" and \"messages\"")
  key = value.get("id", number)
  if isinstance(key, bool) or not isinstance(key, (str, int)):
    raise CollectError(f"{where}:{number}: \"id\" must be a string or an integer")
  messages = value.get("messages")
  if messages is not None:
    if api != "chat":
      raise CollectError(f"{where}:{number}: \"messages\" needs --api=chat")
    if not isinstance(messages, list) or not messages or not all(
        isinstance(m, Mapping) and isinstance(m.get("role"), str)
        and isinstance(m.get("content"), str) for m in messages):
      raise CollectError(f"{where}:{number}: \"messages\" must be a non-empty list of "
                         "{\"role\": str, \"content\": str}")
    messages = tuple(dict(m) for m in messages)
  text = value.get("prompt")
  if text is None and messages is not None:
    text = "\n".join(m["content"] for m in messages)
  if not isinstance(text, str):
    raise CollectError(f"{where}:{number}: \"prompt\" must be a string")
  return Prompt(key, text, messages)


def read_prompts(source: str | os.PathLike | Sequence[str | Mapping[str, Any]], api: str
                 ) -> list[Prompt]:
  """The prompts of a file (see the module docstring) or, from Python, of a list of strings
  or of objects as a .jsonl line holds (ids: their numbers from 1 unless given); every id
  unique."""
  if isinstance(source, (str, os.PathLike)):
    path = os.fspath(source)
    if not os.path.isfile(path):
      raise CollectError(f"--prompts={path}: no such file (a .jsonl file of {{\"prompt\": "
                         "...}} lines, or a text file with one prompt a line).")
    prompts = list(_file_prompts(path, api))
  else:
    path = "prompts"
    prompts = [Prompt(number, value) if isinstance(value, str) else
               _prompt_of(value, "prompts", number, api)
               for number, value in enumerate(source, 1)]
  if not prompts:
    raise CollectError(f"--prompts={path} holds no prompt.")
  seen: set[str | int] = set()
  for prompt in prompts:
    if prompt.id in seen:
      raise CollectError(f"{path}: the id {prompt.id!r} is given twice; ids must be unique.")
    seen.add(prompt.id)
  return prompts


def _file_prompts(path: str, api: str) -> Iterator[Prompt]:
  with open(path, encoding="utf-8") as f:
    for number, line in enumerate(f, 1):
      line = line.rstrip("\r\n")
      if not line.strip():
        continue
      if not path.endswith(".jsonl"):
        yield Prompt(number, line)
        continue
      try:
        value = json.loads(line)
      except json.JSONDecodeError as e:
        raise CollectError(f"{path}:{number}: not JSON ({e.msg} at column {e.colno}); a "
                           ".jsonl prompts file has one object a line") from e
      yield _prompt_of(value, path, number, api)


def _cut(path: str, size: int, why: str) -> None:
  logging.warning("%s: cut %d byte(s) at its end (%s), left by a run that stopped while "
                  "writing.", path, os.path.getsize(path) - size, why)
  with open(path, "r+b") as f:
    f.truncate(size)
    f.flush()
    os.fsync(f.fileno())


def _record_key(line: bytes, where: str, texts: Mapping[Any, str],
                sampling: Mapping[str, Any]) -> tuple[Any, Any]:
  """The (id, sample) of the record on `line`; raises CollectError unless it is a record of
  one of the prompts (`texts`: id -> text) made with `sampling`."""
  try:
    record = json.loads(line)
  except json.JSONDecodeError:
    raise CollectError(f"{where}: not JSON; this file was not written by `distill-jax "
                       "collect` (or was edited): write to another --out.") from None
  if not isinstance(record, dict) or "id" not in record or "sample" not in record:
    raise CollectError(f"{where}: not a record of `distill-jax collect` (no id and sample); "
                       "write to another --out.")
  key = record["id"]
  if key not in texts or record.get("prompt") != texts[key]:
    raise CollectError(f"{where}: the prompt {key!r} is not in this --prompts file (or its "
                       "text differs): the file was collected from other prompts; write to "
                       "another --out.")
  if record.get("sampling") != dict(sampling):
    theirs = record.get("sampling") if isinstance(record.get("sampling"), dict) else {}
    differ = ", ".join(f"{k}={theirs.get(k)!r} (now {v!r})" for k, v in sampling.items()
                       if theirs.get(k) != v) or "sampling"
    raise CollectError(f"{where}: collected with other settings: {differ}; rerun with those "
                       "or write to another --out.")
  return key, record["sample"]


def resume(path: str, prompts: Sequence[Prompt], sampling: Mapping[str, Any], n: int
           ) -> set[str | int]:
  """The ids of the prompts `path` already answers (all `n` samples), after cutting off what
  a killed run left half-written; raises CollectError when the file was made from other
  prompts or settings (see the module docstring)."""
  if not os.path.exists(path):
    return set()
  texts = {p.id: p.text for p in prompts}
  groups: list[tuple[Any, int, list[int]]] = []  # (id, byte offset, samples) in file order.
  offset = 0
  with open(path, "rb") as f:  # Line by line: a file of top-k log-probs may be large.
    for number, line in enumerate(f, 1):
      if not line.endswith(b"\n"):
        break
      key, sample = _record_key(line, f"--out={path}:{number}", texts, sampling)
      if not groups or groups[-1][0] != key:
        groups.append((key, offset, []))
      groups[-1][2].append(sample)
      offset += len(line)
  if offset < os.path.getsize(path):
    _cut(path, offset, "a partial line")
  done = set()
  for i, (key, start, samples) in enumerate(groups):
    if samples == list(range(n)) and key not in done:
      done.add(key)
    elif i == len(groups) - 1 and samples == list(range(len(samples))) and len(samples) < n:
      _cut(path, start, f"prompt {key!r} with {len(samples)} of {n} samples")
    else:
      raise CollectError(f"--out={path}: the records of prompt {key!r} are not samples "
                         f"0..{n - 1} once each, in order ({samples}); write to another --out.")
  return done


class Appender:
  """Appends one prompt's records at a time to `path`: one write, then fsync. The file is
  made by the first write (a run that writes nothing leaves none)."""

  def __init__(self, path: str):
    self.path, self.fd = path, None

  def __enter__(self) -> Appender:
    return self

  def __exit__(self, *_: Any) -> None:
    if self.fd is not None:
      os.close(self.fd)

  def write(self, records: Sequence[Mapping[str, Any]]) -> None:
    if self.fd is None:
      os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
      self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")
    view = memoryview(data)
    while view:
      view = view[os.write(self.fd, view):]
    os.fsync(self.fd)
