"""The OpenAI protocol as the collector speaks it: request bodies, and answers made records.

Pure functions (no I/O), so each shape is tested on its own. A record is one line of a
black-box teacher file (`data/text/blackbox.py`): `prompt`, `completion`, and, when the
server gave log-probabilities, `tokens` and `top_logprobs`, plus the metadata the reader
ignores (`blackbox.METADATA_KEYS`): the prompt's `id`, the `sample` (choice index), the
server's `model` name, the `finish_reason` and the `sampling` settings.

The two shapes read:

- `/v1/completions`: `choices[i].text`; `choices[i].logprobs = {tokens: [str],
  token_logprobs: [float], top_logprobs: [{token: logprob}], text_offset: [int]}` (a piece of
  a multi-byte character is named `bytes:\\xNN`, as the reader expects).
- `/v1/chat/completions`: `choices[i].message.content`; `choices[i].logprobs.content =
  [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]`. A token whose `bytes`
  are no whole UTF-8 text is written `bytes:\\xNN...` (every byte escaped), so its bytes
  survive.

Per token the record keeps the server's alternatives and, when it is not among them, the
sampled token with its own log-probability (what the API said of it). Alternatives with no
finite log-probability (None, NaN, -inf: probability 0) are dropped and counted; a log-prob
above 0 by rounding (<= 1e-3) is written as 0. Tokens after the text (a stop token or stop
sequence some servers list) are cut; when the tokens do not join to the text at all (a server
that names partial characters otherwise) or are malformed, the record keeps its text and
loses its log-probabilities, and says so (`Parsed.note`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

from distill_jax.data.text import blackbox

APIS = ("completions", "chat")
PATHS = {"completions": "/completions", "chat": "/chat/completions"}
ROUNDING = 1e-3  # A log-prob above 0 by at most this is a rounded 0.


class AnswerError(ValueError):
  """A server's answer is not of the protocol's shape; names what is missing."""


@dataclasses.dataclass(frozen=True)
class Prompt:
  """One prompt: its `id` (the file's, else its line number), the text a record keeps as
  `prompt`, and for the chat API the messages sent (None: one user message, the text)."""

  id: str | int
  text: str
  messages: tuple[Mapping[str, Any], ...] | None = None


@dataclasses.dataclass(frozen=True)
class Parsed:
  """One choice made a record; `dropped` alternatives without a finite log-prob; `note`
  why the record has no log-probabilities although they were asked for (or None)."""

  record: dict[str, Any]
  dropped: int = 0
  note: str | None = None


def request_body(api: str, model: str, prompt: Prompt, sampling: Mapping[str, Any], *,
                 n: int, seed: int | None) -> dict[str, Any]:
  """The JSON body of one request: `n` choices of `prompt` with the `sampling` settings
  (max_tokens, temperature, top_p, top_logprobs: 0 asks for none)."""
  body: dict[str, Any] = {"model": model, "max_tokens": sampling["max_tokens"],
                          "temperature": sampling["temperature"], "top_p": sampling["top_p"],
                          "n": n}
  if seed is not None:
    body["seed"] = seed
  k = sampling["top_logprobs"]
  if api == "completions":
    body["prompt"] = prompt.text
    if k:
      body["logprobs"] = k
  else:
    body["messages"] = (list(prompt.messages) if prompt.messages is not None
                        else [{"role": "user", "content": prompt.text}])
    if k:
      body["logprobs"], body["top_logprobs"] = True, k
  return body


def byte_name(data: bytes) -> str:
  """A token's string for the reader: its text when `data` is whole UTF-8, else
  `bytes:\\xNN...` with every byte escaped (`blackbox.token_bytes` reads it back)."""
  try:
    return data.decode("utf-8")
  except UnicodeDecodeError:
    return "bytes:" + "".join(f"\\x{b:02x}" for b in data)


def _chat_name(entry: Mapping[str, Any]) -> str:
  data = entry.get("bytes")
  if isinstance(data, list) and all(isinstance(b, int) and 0 <= b < 256 for b in data):
    return byte_name(bytes(data))
  token = entry.get("token")
  if not isinstance(token, str):
    raise AnswerError(f"a log-probability entry has no token string: {dict(entry)!r:.80}")
  return token


def _logprob(value: Any) -> float | None:
  """A finite log-prob <= 0 (rounding above 0 clipped), or None."""
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    return None
  value = float(value)
  if not math.isfinite(value) or value > ROUNDING:
    return None
  return min(value, 0.0)


def _position(alternatives: Sequence[tuple[str, Any]], chosen: str, chosen_logprob: Any
              ) -> tuple[dict[str, float], int]:
  """One token's {token: log-prob} (alternatives of the same string add up) and how many
  alternatives were dropped; the chosen token is added when the alternatives lack it."""
  out: dict[str, float] = {}
  dropped = 0
  for token, value in alternatives:
    lp = _logprob(value)
    if lp is None:
      dropped += 1
    elif token in out:
      high, low = max(out[token], lp), min(out[token], lp)
      out[token] = min(high + math.log1p(math.exp(low - high)), 0.0)  # log(p + q).
    else:
      out[token] = lp
  lp = _logprob(chosen_logprob)
  if chosen not in out and lp is not None:
    out[chosen] = lp
  return out, dropped


def _cut_to_text(tokens: list[str], text: str) -> int | None:
  """How many leading tokens join to `text` as the reader joins them: the most that do (a
  partial character at the end decodes to one U+FFFD however many of its bytes are there),
  or None."""
  pieces = [blackbox.token_bytes(t) for t in tokens]
  joined = b"".join(pieces)
  if not joined.decode("utf-8", "replace").startswith(text):
    return None
  ends = [0]
  for piece in pieces:
    ends.append(ends[-1] + len(piece))
  for k in range(len(pieces), -1, -1):  # Usually k = all, or all but a stop token.
    if joined[:ends[k]].decode("utf-8", "replace") == text:
      return k
  return None


def _log_probs(api: str, choice: Mapping[str, Any]
               ) -> tuple[list[str], list[dict[str, float]], int] | None:
  """The choice's tokens, their alternatives and the dropped count; None without any."""
  logprobs = choice.get("logprobs")
  if not isinstance(logprobs, Mapping):
    return None
  if api == "completions":
    tokens = logprobs.get("tokens")
    if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
      return None
    top = logprobs.get("top_logprobs") or [None] * len(tokens)
    chosen = logprobs.get("token_logprobs") or [None] * len(tokens)
    if len(top) != len(tokens) or len(chosen) != len(tokens):
      raise AnswerError(f"logprobs has {len(tokens)} tokens, {len(top)} top_logprobs and "
                        f"{len(chosen)} token_logprobs; expected one each per token")
    positions = [_position(list((t or {}).items()), token, lp)
                 for token, t, lp in zip(tokens, top, chosen, strict=True)]
  else:
    content = logprobs.get("content")
    if not isinstance(content, list):
      return None
    tokens, positions = [], []
    for entry in content:
      if not isinstance(entry, Mapping):
        raise AnswerError(f"logprobs.content holds {entry!r:.60}, not an object")
      tokens.append(_chat_name(entry))
      alternatives = [(_chat_name(a), a.get("logprob")) for a in entry.get("top_logprobs") or ()
                      if isinstance(a, Mapping)]
      positions.append(_position(alternatives, tokens[-1], entry.get("logprob")))
  return tokens, [p for p, _ in positions], sum(d for _, d in positions)


def choice_text(api: str, choice: Mapping[str, Any]) -> str:
  """The text of one choice (a chat message without content, e.g. a refusal: '')."""
  if api == "completions":
    text = choice.get("text")
  else:
    message = choice.get("message")
    if not isinstance(message, Mapping):
      raise AnswerError("a chat choice has no 'message' object")
    text = message.get("content") or ""
  if not isinstance(text, str):
    raise AnswerError(f"a choice's text is {type(text).__name__}, not a string")
  return text


def parse_choice(api: str, choice: Mapping[str, Any], prompt: Prompt, *, sample: int,
                 model: str, sampling: Mapping[str, Any]) -> Parsed:
  """One choice of an answer as a record (see the module docstring)."""
  text = choice_text(api, choice)
  record: dict[str, Any] = {"id": prompt.id, "sample": sample, "prompt": prompt.text,
                            "completion": text}
  dropped, note, found = 0, None, None
  if sampling["top_logprobs"]:
    try:
      found = _log_probs(api, choice)
    except AnswerError as e:  # The text is still good.
      note = f"its log-probabilities are malformed ({e})"
    else:
      note = None if found else "the server gave no log-probabilities"
  if found is not None:
    tokens, top, dropped = found
    keep = _cut_to_text(tokens, text)
    if keep is None:
      note = "its tokens do not join to its text"
    elif not all(top[:keep]):
      note = "a token has no finite log-probability"
    else:
      record["tokens"], record["top_logprobs"] = tokens[:keep], top[:keep]
  record.update(model=model, finish_reason=choice.get("finish_reason"), sampling=dict(sampling))
  if prompt.messages is not None:
    record["messages"] = list(prompt.messages)
  problem = blackbox.record_problem(record)
  if problem and "tokens" in record:
    del record["tokens"], record["top_logprobs"]
    note, problem = f"its log-probabilities do not read ({problem})", blackbox.record_problem(
        record)
  if problem:
    raise AnswerError(f"the answer makes no readable record: {problem}")
  return Parsed(record, dropped, note)


def parse_answer(api: str, answer: Any, prompt: Prompt, *, n: int, first_sample: int,
                 sampling: Mapping[str, Any]) -> tuple[list[Parsed], dict[str, int]]:
  """A whole answer: its `n` choices in index order as records numbered from
  `first_sample`, and its usage ({prompt_tokens, completion_tokens}; 0 where not given)."""
  if not isinstance(answer, Mapping) or not isinstance(answer.get("choices"), list):
    raise AnswerError(f"the answer has no 'choices' list: {answer!r:.120}")
  choices = sorted(answer["choices"], key=lambda c: c.get("index", 0)
                   if isinstance(c, Mapping) else 0)
  if len(choices) != n or not all(isinstance(c, Mapping) for c in choices):
    raise AnswerError(f"asked for {n} choice(s), the answer has {len(choices)}; a server "
                      "without `n` needs --separate_samples")
  model = answer.get("model")
  model = model if isinstance(model, str) else sampling.get("model", "")
  parsed = [parse_choice(api, c, prompt, sample=first_sample + i, model=model,
                         sampling=sampling) for i, c in enumerate(choices)]
  usage = answer.get("usage") if isinstance(answer.get("usage"), Mapping) else {}
  counts = {key: int(usage.get(key) or 0) for key in ("prompt_tokens", "completion_tokens")}
  return parsed, counts
