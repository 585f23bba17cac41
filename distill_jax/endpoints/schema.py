"""The requests `distill-jax serve` accepts, checked field by field (OpenAI's protocol).

    request = parse_completion(body, limits)       # POST /v1/completions
    request = parse_chat(body, limits)             # POST /v1/chat/completions

Each returns a `Request` (the prompts as text, the sampling settings, what to report) or
raises `RequestError` with the HTTP status, a one-line message and the field (`param`) at
fault, which the server sends in OpenAI's error shape:
`{"error": {"message", "type": "invalid_request_error", "param", "code"}}`.

Fields OpenAI defines but this server does not implement are refused unless they hold their
default (e.g. `presence_penalty: 0`), so a client never silently gets something else than it
asked for; fields OpenAI does not define are refused by name.

The chat template (`chat_prompt`), used for every tokenizer (a Hugging Face directory's own
Jinja template is not applied): each message as `"{role}: {content}\\n"`, then `"assistant:"`,
which the model continues.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

MAX_TOP_LOGPROBS = 20  # OpenAI's cap on chat's `top_logprobs` (completions' `logprobs`: 5).
ROLES = ("system", "developer", "user", "assistant", "tool")


class RequestError(ValueError):
  """A request the server refuses: `status` (4xx), `param` (the field at fault), `code`."""

  def __init__(self, message: str, param: str | None = None, status: int = 400,
               code: str | None = None, kind: str = "invalid_request_error"):
    super().__init__(message)
    self.message, self.param, self.status, self.code, self.kind = (message, param, status,
                                                                   code, kind)

  def body(self) -> dict[str, Any]:
    """OpenAI's error object."""
    return {"error": {"message": self.message, "type": self.kind, "param": self.param,
                      "code": self.code}}


@dataclasses.dataclass(frozen=True)
class Limits:
  """What the server allows: `max_new_tokens` (the largest `max_tokens`), `max_prompt_tokens`
  (BOS counts), `context` (prompt + new tokens), `max_n` (choices per request)."""

  model: str
  max_new_tokens: int
  max_prompt_tokens: int
  context: int
  max_n: int


@dataclasses.dataclass(frozen=True)
class Request:
  """A checked request: `prompts` (text; one per prompt of a batch request, chat has one),
  `n` choices each, and the sampling settings. `top_logprobs` None: no log-probs reported;
  K >= 0: each generated token's log-prob and its K most likely alternatives. `seed` None: a
  fresh random seed."""

  chat: bool
  prompts: tuple[str, ...]
  max_tokens: int | None  # None: the endpoint's default (`default_max_tokens`).
  temperature: float = 1.0
  top_p: float = 1.0
  top_k: int = 0
  n: int = 1
  stop: tuple[str, ...] = ()
  seed: int | None = None
  top_logprobs: int | None = None


# Fields each endpoint implements; `IGNORED` are accepted and have no effect; `DEFAULT_ONLY`
# are accepted only at the value that means "not used".
COMMON = {"model", "max_tokens", "temperature", "top_p", "top_k", "n", "stop", "seed",
          "stream", "user"}
COMPLETION = COMMON | {"prompt", "logprobs", "echo", "best_of", "presence_penalty",
                       "frequency_penalty", "logit_bias", "suffix"}
CHAT = COMMON | {"messages", "logprobs", "top_logprobs", "max_completion_tokens",
                 "presence_penalty", "frequency_penalty", "logit_bias", "stream_options"}
DEFAULT_ONLY = {"stream": (False, None), "echo": (False, None), "presence_penalty": (0, None),
                "frequency_penalty": (0, None), "logit_bias": (None, {}), "suffix": (None, ""),
                "stream_options": (None,)}


def _number(body: Mapping[str, Any], name: str, default: float, low: float, high: float
            ) -> float:
  value = body.get(name, default)
  if value is None:
    return default
  if isinstance(value, bool) or not isinstance(value, int | float):
    raise RequestError(f"{name} must be a number, got {type(value).__name__}.", name)
  if not low <= value <= high:
    raise RequestError(f"{name} must be in [{low}, {high}], got {value}.", name)
  return float(value)


def _integer(body: Mapping[str, Any], name: str, default: int | None, low: int,
             high: int | None = None, why: str = "") -> int | None:
  value = body.get(name, default)
  if value is None:
    return default
  if isinstance(value, bool) or not isinstance(value, int):
    raise RequestError(f"{name} must be an integer, got {type(value).__name__}.", name)
  if value < low or (high is not None and value > high):
    bound = f"at least {low}" if high is None else f"in [{low}, {high}]"
    raise RequestError(f"{name} must be {bound}{why}, got {value}.", name)
  return value


def _common(body: Any, allowed: set[str], limits: Limits) -> dict[str, Any]:
  """The checks and settings both endpoints share."""
  if not isinstance(body, dict):
    raise RequestError(f"The request body must be a JSON object, got {type(body).__name__}.")
  unknown = sorted(set(body) - allowed)
  if unknown:
    raise RequestError(f"Unknown field {unknown[0]!r}; this endpoint accepts "
                       f"{', '.join(sorted(allowed))}.", unknown[0])
  for name, defaults in DEFAULT_ONLY.items():
    if name in body and body[name] not in defaults:
      raise RequestError(f"{name}={body[name]!r} is not supported by this server (leave it "
                         f"out or set {defaults[0]!r}).", name)
  model = body.get("model")
  if not isinstance(model, str):
    raise RequestError("model is required: a string naming the served model "
                       f"({limits.model!r}).", "model")
  if model != limits.model:
    raise RequestError(f"The model {model!r} does not exist here; this server serves "
                       f"{limits.model!r} (GET /v1/models).", "model", 404, "model_not_found")
  stop = body.get("stop")
  stop = (stop,) if isinstance(stop, str) else stop
  if stop is not None and (not isinstance(stop, list | tuple) or len(stop) > 4 or not all(
      isinstance(s, str) and s for s in stop)):
    raise RequestError("stop must be a non-empty string or a list of up to 4 of them.", "stop")
  user = body.get("user")
  if user is not None and not isinstance(user, str):
    raise RequestError(f"user must be a string, got {type(user).__name__}.", "user")
  return {
      "temperature": _number(body, "temperature", 1.0, 0.0, 2.0),
      "top_p": _number(body, "top_p", 1.0, 0.0, 1.0) or 1e-9,  # 0: the most likely only.
      "top_k": _integer(body, "top_k", 0, 0, None, " (0: no top-k cut)"),
      "n": _integer(body, "n", 1, 1, limits.max_n, " (this server's --max_n)"),
      "seed": _integer(body, "seed", None, -2**63, 2**64 - 1),
      "stop": tuple(stop or ()),
  }


def _max_tokens(body: Mapping[str, Any], names: tuple[str, ...], limits: Limits
                ) -> int | None:
  name = next((n for n in names if body.get(n) is not None), names[0])
  return _integer(body, name, None, 1, limits.max_new_tokens,
                  " (this server's --max_new_tokens)")


def default_max_tokens(request: Request, prompt_tokens: int, limits: Limits) -> int:
  """`max_tokens` when the request leaves it out: 16 for completions (OpenAI's default), the
  server's --max_new_tokens for chat; either at most what the context leaves after the prompt."""
  if request.max_tokens is not None:
    return request.max_tokens
  wanted = limits.max_new_tokens if request.chat else min(16, limits.max_new_tokens)
  return max(1, min(wanted, limits.context - prompt_tokens))


def parse_completion(body: Any, limits: Limits) -> Request:
  """A `/v1/completions` request: `prompt` a string or a list of strings; `logprobs` K in
  0..20 (the chosen token's log-prob and K alternatives); `max_tokens` defaults to 16 as
  OpenAI's does (`default_max_tokens`)."""
  settings = _common(body, COMPLETION, limits)
  prompt = body.get("prompt")
  prompts = (prompt,) if isinstance(prompt, str) else prompt
  if not isinstance(prompts, list | tuple) or not prompts or not all(
      isinstance(p, str) for p in prompts):
    raise RequestError("prompt is required: a string or a non-empty list of strings (token "
                       "id prompts are not supported).", "prompt")
  if len(prompts) * settings["n"] > limits.max_n:
    raise RequestError(f"{len(prompts)} prompts x n={settings['n']} choices exceed this "
                       f"server's --max_n={limits.max_n}; send fewer at once.", "n")
  best_of = _integer(body, "best_of", None, 1)
  if best_of is not None and best_of != settings["n"]:
    raise RequestError("best_of is not supported by this server (leave it out or set it "
                       "equal to n).", "best_of")
  return Request(chat=False, prompts=tuple(prompts),
                 max_tokens=_max_tokens(body, ("max_tokens",), limits),
                 top_logprobs=_integer(body, "logprobs", None, 0, MAX_TOP_LOGPROBS), **settings)


def chat_prompt(messages: list[dict[str, str]]) -> str:
  """The text the model continues for a conversation (the module docstring's template)."""
  return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"


def _content(message: Mapping[str, Any], i: int) -> str:
  """A message's text: a string, or a list of `{"type": "text", "text": ...}` parts."""
  content = message.get("content")
  if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" and
                                       isinstance(p.get("text"), str) for p in content):
    return "".join(p["text"] for p in content)
  if not isinstance(content, str):
    raise RequestError(f"messages[{i}].content must be a string or a list of text parts.",
                       f"messages[{i}].content")
  return content


def parse_chat(body: Any, limits: Limits) -> Request:
  """A `/v1/chat/completions` request: `messages` [{role, content}], `logprobs` true/false
  and `top_logprobs` K in 0..20 (needs `logprobs: true`); `max_tokens` (or
  `max_completion_tokens`) defaults to the server's --max_new_tokens."""
  settings = _common(body, CHAT, limits)
  messages = body.get("messages")
  if not isinstance(messages, list) or not messages:
    raise RequestError("messages is required: a non-empty list of {role, content} objects.",
                       "messages")
  parsed = []
  for i, m in enumerate(messages):
    if not isinstance(m, dict) or m.get("role") not in ROLES:
      raise RequestError(f"messages[{i}] needs a role, one of {', '.join(ROLES)}.",
                         f"messages[{i}].role")
    parsed.append({"role": m["role"], "content": _content(m, i)})
  logprobs = body.get("logprobs", False)
  if not isinstance(logprobs, bool | None):
    raise RequestError(f"logprobs must be true or false, got {logprobs!r}.", "logprobs")
  top = _integer(body, "top_logprobs", None, 0, MAX_TOP_LOGPROBS)
  if top is not None and not logprobs:
    raise RequestError("top_logprobs needs logprobs: true.", "top_logprobs")
  return Request(chat=True, prompts=(chat_prompt(parsed),),
                 max_tokens=_max_tokens(body, ("max_completion_tokens", "max_tokens"), limits),
                 top_logprobs=(top or 0) if logprobs else None, **settings)
