"""`distill-jax serve`: a language model behind an OpenAI-compatible HTTP endpoint.

    distill-jax serve --model=runs/lm/teacher [--host=127.0.0.1 --port=8000 --max_batch=8]

    server = start("runs/lm/teacher", port=0)      # in-process (tests): a running Server
    openai.OpenAI(base_url=server.url, api_key="unused").completions.create(...)
    server.close()

Routes: `GET /v1/models` (and `/v1/models/NAME`), `POST /v1/completions`, `POST
/v1/chat/completions` (OpenAI's request and response shapes; `endpoints/schema.py` checks
requests and names what it refuses), `GET /health`. Not implemented: streaming, token-id
prompts, penalties, `logit_bias`, `echo`, `best_of` > n (refused with a 400 naming the field).

Requests are decoded by `endpoints/engine.py`'s worker (fixed-slot batching into the compiled
KV-cache sampler; its docstring says how and why). The stdlib `ThreadingHTTPServer` answers each
connection on its own thread, which waits for its rows; one worker thread owns the device.

Responses. Completions' `logprobs` (with `logprobs: K`): `tokens` (each generated token's
name, `Vocab.name`), `token_logprobs`, `top_logprobs` (per token, the K most likely
tokens -> log-prob) and `text_offset` (where each token starts, in characters of prompt +
completion, as OpenAI counts). Chat's (`logprobs: true, top_logprobs: K`): `content`, per token
`{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}`. The log-probs are those of
the distribution sampled from: at the request's temperature T > 0, `log_softmax(logits / T)`
(before the top-k/top-p cut); at temperature 0 the model's own. EOS ends a choice
(`finish_reason: "stop"`) and is not reported as a token; a choice's text is its tokens' bytes
joined (`Vocab`: a continuation keeps the leading space a decoder may drop), so tokens and text
always agree; a `stop` string cuts the text before it (`"stop"` too), keeping the tokens that
start before the cut; otherwise `"length"`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import secrets
import sys
import threading
import time
from concurrent.futures import TimeoutError as FutureTimeout
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np
from absl import logging

from distill_jax.common.model_io import CheckpointError
from distill_jax.endpoints import engine as engines
from distill_jax.endpoints import schema
from distill_jax.models.tokenizers import token_bytes_table
from distill_jax.tasks.language_model.generate import SPECIAL_NAMES, token_str

MAX_BODY = 4 << 20  # Bytes a request body may have.


@dataclasses.dataclass(frozen=True)
class Vocab:
  """How a tokenizer's ids are reported: each id's bytes (`tokenizers.token_bytes_table`) and
  its name. A name is its bytes as text, or `bytes:\\xNN...` when they are no whole UTF-8
  text (as APIs write a piece of a character); the special tokens `generate.token_str`'s
  names (`<eos>`, ...) with no bytes. A choice's text is its tokens' bytes joined, so the
  tokens always join to the text (the black-box reader checks that)."""

  tokenizer: Any

  @functools.cached_property
  def table(self) -> tuple[bytes, ...]:
    return token_bytes_table(self.tokenizer)

  def name(self, token: int) -> str:
    special = {getattr(self.tokenizer, f, None) for f in SPECIAL_NAMES}
    if token in special:
      return token_str(self.tokenizer, token)
    data = self.table[token] if token < len(self.table) else b""
    try:
      return data.decode("utf-8")
    except UnicodeDecodeError:
      return "bytes:" + "".join(f"\\x{b:02x}" for b in data)

  def bytes(self, token: int) -> list[int]:
    return list(self.table[token]) if token < len(self.table) else []

  def text(self, ids: Any) -> str:
    return b"".join(self.table[int(t)] for t in ids if int(t) < len(self.table)).decode(
        "utf-8", errors="replace")


@dataclasses.dataclass(frozen=True)
class Choice:
  """One choice's text, its reported tokens (ids, after the EOS and stop cuts), why it ended,
  and where each token starts in the text (characters)."""

  text: str
  ids: np.ndarray
  finish_reason: str
  offsets: list[int]
  kept: int  # How many of the Generated's tokens are reported.


def cut(vocab: Vocab, generated: engines.Generated, stop: tuple[str, ...]) -> Choice:
  """A Generated -> its Choice: EOS dropped; the text cut before the first `stop` string."""
  ids = generated.ids[:-1] if generated.eos else generated.ids
  offsets = [len(vocab.text(ids[:i])) for i in range(len(ids))]
  text = vocab.text(ids)
  reason = "stop" if generated.eos else "length"
  found = [i for i in (text.find(s) for s in stop) if i >= 0]
  if found:
    text, reason = text[:min(found)], "stop"
    ids = ids[:sum(o < len(text) for o in offsets)]
    offsets = offsets[:len(ids)]
  return Choice(text, ids, reason, offsets, len(ids))


def completion_logprobs(vocab: Vocab, g: engines.Generated, c: Choice, k: int, start: int
                        ) -> dict[str, Any]:
  """Completions' `logprobs` object for a choice (`start`: the prompt's length in characters)."""
  top = [{vocab.name(int(t)): float(v) for t, v in zip(ids[:k], lps[:k], strict=True)}
         for ids, lps in zip(g.top_ids[:c.kept], g.top_logprobs[:c.kept], strict=True)]
  return {"tokens": [vocab.name(int(t)) for t in c.ids],
          "token_logprobs": [float(v) for v in g.logprobs[:c.kept]],
          "top_logprobs": top, "text_offset": [start + o for o in c.offsets]}


def chat_logprobs(vocab: Vocab, g: engines.Generated, c: Choice, k: int) -> dict[str, Any]:
  """Chat's `logprobs` object for a choice."""

  def entry(t: int, lp: float) -> dict[str, Any]:
    return {"token": vocab.name(t), "logprob": float(lp), "bytes": vocab.bytes(t)}

  content = []
  for i, t in enumerate(c.ids):
    alts = [entry(int(a), v) for a, v in zip(g.top_ids[i][:k], g.top_logprobs[i][:k],
                                             strict=True)]
    content.append({**entry(int(t), g.logprobs[i]), "top_logprobs": alts})
  return {"content": content}


class Service:
  """What the HTTP handler calls: checks a request, decodes it, shapes the response."""

  def __init__(self, served: engines.ServedModel, engine: engines.Engine, limits: schema.Limits,
               timeout_s: float = 600.0):
    self.served, self.engine, self.limits, self.timeout_s = served, engine, limits, timeout_s
    self.vocab = Vocab(served.tokenizer)
    self.created = int(time.time())

  def models(self) -> dict[str, Any]:
    return {"object": "list", "data": [self.model_card()]}

  def model_card(self) -> dict[str, Any]:
    return {"id": self.served.name, "object": "model", "created": self.created,
            "owned_by": "distill-jax"}

  def respond(self, body: Any, chat: bool) -> dict[str, Any]:
    """The response to a parsed JSON body (raises schema.RequestError)."""
    parse = schema.parse_chat if chat else schema.parse_completion
    request = parse(body, self.limits)
    tok, limits = self.served.tokenizer, self.limits
    field = "messages" if chat else "prompt"
    encoded = [tok.encode(p)[:-1] for p in request.prompts]  # [BOS, ...]: the text goes on.
    for i, ids in enumerate(encoded):
      where = field if len(encoded) == 1 else f"{field}[{i}]"
      if len(ids) > limits.max_prompt_tokens:
        raise schema.RequestError(
            f"The {field} is {len(ids)} tokens (BOS included); this server takes at most "
            f"--max_prompt_tokens={limits.max_prompt_tokens}.", where,
            code="context_length_exceeded")
      wanted = schema.default_max_tokens(request, len(ids), limits)
      if len(ids) + wanted > limits.context:
        raise schema.RequestError(
            f"The {field} ({len(ids)} tokens) plus max_tokens={wanted} exceeds the model's "
            f"context of {limits.context}: ask for at most {limits.context - len(ids)} tokens "
            "or shorten it.", "max_tokens", code="context_length_exceeded")
    seed = secrets.randbits(64) if request.seed is None else request.seed
    rows, futures = [], []
    for p, ids in enumerate(encoded):
      for j in range(request.n):
        row = engines.Row(ids, schema.default_max_tokens(request, len(ids), limits),
                          engines.seed_key(seed), p * request.n + j, request.temperature,
                          request.top_k, request.top_p, request.top_logprobs is not None)
        rows.append((p, row))
        futures.append(self.engine.submit(row))
    deadline = time.monotonic() + self.timeout_s
    results = [f.result(timeout=max(0.0, deadline - time.monotonic())) for f in futures]
    return self._shape(request, encoded, rows, results)

  def _shape(self, request: schema.Request, encoded: list[np.ndarray], rows: list,
             results: list[engines.Generated]) -> dict[str, Any]:
    vocab, k = self.vocab, request.top_logprobs
    choices = []
    for (p, row), g in zip(rows, results, strict=True):
      c = cut(vocab, g, request.stop)
      choice: dict[str, Any] = {"index": row.index, "finish_reason": c.finish_reason}
      if request.chat:
        choice["message"] = {"role": "assistant", "content": c.text}
        choice["logprobs"] = None if k is None else chat_logprobs(vocab, g, c, k)
      else:
        choice["text"] = c.text
        choice["logprobs"] = (None if k is None else
                              completion_logprobs(vocab, g, c, k, len(request.prompts[p])))
      choices.append(choice)
    prompt_tokens = sum(len(ids) for ids in encoded)
    completion_tokens = sum(len(g.ids) for g in results)
    kind = "chatcmpl" if request.chat else "cmpl"
    return {"id": f"{kind}-{secrets.token_hex(12)}",
            "object": "chat.completion" if request.chat else "text_completion",
            "created": int(time.time()), "model": self.served.name, "choices": choices,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens}}


class Handler(BaseHTTPRequestHandler):
  """One HTTP/1.1 connection; `server.service` answers."""

  protocol_version = "HTTP/1.1"
  server_version = "distill-jax-serve"
  timeout = 300  # Seconds a connection may stay silent (a body shorter than its length).

  def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base's name.
    logging.debug("%s %s", self.address_string(), format % args)

  def _send(self, status: int, body: dict[str, Any]) -> None:
    data = json.dumps(body).encode("utf-8")
    self.send_response(status)
    self.send_header("Content-Type", "application/json")
    self.send_header("Content-Length", str(len(data)))
    self.end_headers()
    self.wfile.write(data)

  def _error(self, error: schema.RequestError) -> None:
    self._send(error.status, error.body())

  def do_GET(self) -> None:  # noqa: N802 - BaseHTTPRequestHandler's name.
    service = self.server.service
    path = self.path.split("?")[0].rstrip("/")
    if path == "/v1/models":
      return self._send(200, service.models())
    if path.startswith("/v1/models/"):
      if path[len("/v1/models/"):] == service.served.name:
        return self._send(200, service.model_card())
      return self._error(schema.RequestError(
          f"The model {path[len('/v1/models/'):]!r} does not exist here; this server serves "
          f"{service.served.name!r}.", "model", 404, "model_not_found"))
    if path == "/health":
      return self._send(200, {"status": "ok"})
    self._error(schema.RequestError(f"No route GET {path}; try /v1/models.", None, 404))

  def do_POST(self) -> None:  # noqa: N802 - BaseHTTPRequestHandler's name.
    path = self.path.split("?")[0].rstrip("/")
    routes = {"/v1/completions": False, "/v1/chat/completions": True}
    try:
      body = self._body()  # Read before answering, so the connection stays usable.
      if path not in routes:
        raise schema.RequestError(f"No route POST {path}; this server answers "
                                  f"{', '.join(routes)}.", None, 404)
      self._send(200, self.server.service.respond(body, routes[path]))
    except schema.RequestError as e:
      self._error(e)
    except FutureTimeout:
      self._error(schema.RequestError("The request timed out waiting for the model.", None,
                                      503, kind="server_error"))
    except Exception as e:  # noqa: BLE001 - a failed batch answers 500; the server goes on.
      logging.exception("Request to %s failed.", path)
      self._error(schema.RequestError(f"Internal error: {type(e).__name__}: {e}", None, 500,
                                      kind="server_error"))

  def _body(self) -> Any:
    length = self.headers.get("Content-Length")
    if length is None or not length.isdigit():
      self.close_connection = True
      raise schema.RequestError("A request body with a Content-Length header is required.",
                                None, 411)
    if int(length) > MAX_BODY:
      self.close_connection = True
      raise schema.RequestError(f"The request body is {length} bytes; at most {MAX_BODY}.",
                                None, 413)
    raw = self.rfile.read(int(length))
    try:
      return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
      raise schema.RequestError(f"The request body is not valid JSON: {e}.") from None


class _HTTPServer(ThreadingHTTPServer):
  """A thread per connection; a listen backlog for many clients connecting at once (the
  stdlib's default of 5 refuses connections beyond it)."""

  daemon_threads = True
  request_queue_size = 1024


@dataclasses.dataclass
class Server:
  """A running server: `url` (`http://host:port/v1`, an OpenAI client's base_url), `close()`."""

  http: ThreadingHTTPServer
  engine: engines.Engine
  service: Service
  thread: threading.Thread

  @property
  def port(self) -> int:
    return self.http.server_address[1]

  @property
  def url(self) -> str:
    return f"http://{self.http.server_address[0]}:{self.port}/v1"

  def close(self) -> None:
    """Stops answering, then ends the engine's worker."""
    self.http.shutdown()
    self.http.server_close()
    self.thread.join()
    self.engine.stop()

  def __enter__(self) -> Server:
    return self

  def __exit__(self, *exc: Any) -> None:
    self.close()


def start(model: str | engines.ServedModel, host: str = "127.0.0.1", port: int = 0, *,
          max_batch: int = 8, max_prompt_tokens: int | None = None, max_new_tokens: int = 256,
          max_n: int | None = None, tokenizer: str | None = None, name: str | None = None,
          window_s: float = 0.0, timeout_s: float = 600.0, dtype: str = "float32"
          ) -> Server:
  """Loads `model` (a directory, as `engine.load_served_model` takes, or a ServedModel) and
  serves it on a background thread; `port=0` picks a free port (`Server.port`). Limits:
  `max_prompt_tokens` (default the context - 1), `max_new_tokens` (at most the context - 1),
  `max_n` choices per request (default `max_batch`)."""
  served = (model if isinstance(model, engines.ServedModel)
            else engines.load_served_model(model, tokenizer, name, dtype))
  context = served.module.context
  for setting, value, high in (("max_batch", max_batch, None), ("max_n", max_n, None),
                               ("max_prompt_tokens", max_prompt_tokens, context - 1),
                               ("max_new_tokens", max_new_tokens, None)):
    if value is not None and (value < 1 or (high is not None and value > high)):
      raise ValueError(f"--{setting}={value}: must be at least 1"
                       + (f" and at most {high} (the model's context - 1)." if high else "."))
  limits = schema.Limits(served.name, min(max_new_tokens, context - 1),
                         max_prompt_tokens or context - 1, context, max_n or max_batch)
  engine = engines.Engine(served, max_batch=max_batch, window_s=window_s)
  http = _HTTPServer((host, port), Handler)
  http.service = Service(served, engine, limits, timeout_s)
  thread = threading.Thread(target=http.serve_forever, name="serve-http", daemon=True)
  thread.start()
  return Server(http, engine, http.service, thread)


def main(args: list[str]) -> int:
  """`distill-jax serve ...`: parses the flags, serves until interrupted (Ctrl-C)."""
  import argparse

  parser = argparse.ArgumentParser(prog="distill-jax serve", description=__doc__.split("\n")[0])
  parser.add_argument("--model", required=True,
                      help="a run's workdir, an export directory or a Hugging Face directory")
  parser.add_argument("--host", default="127.0.0.1", help="the address to listen on")
  parser.add_argument("--port", type=int, default=8000, help="the port (0: any free one)")
  parser.add_argument("--max_batch", type=int, default=8, help="rows decoded at once (slots)")
  parser.add_argument("--max_prompt_tokens", type=int, default=None,
                      help="the longest prompt, BOS included (default: the context - 1)")
  parser.add_argument("--max_new_tokens", type=int, default=256,
                      help="the largest max_tokens a request may ask for")
  parser.add_argument("--max_n", type=int, default=None,
                      help="choices per request, n x prompts (default: --max_batch)")
  parser.add_argument("--tokenizer", default=None,
                      help="bytes or hf:<directory> (default: the run's, or the HF directory's)")
  parser.add_argument("--served_name", default=None,
                      help="the model name clients send (default: the directory's name)")
  parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                      help="a Hugging Face directory's weights and compute dtype")
  parser.add_argument("--window_ms", type=float, default=0.0,
                      help="how long the worker waits for more rows to batch (0: takes those "
                      "waiting)")
  flags = parser.parse_args(args)
  try:
    server = start(flags.model, flags.host, flags.port, max_batch=flags.max_batch,
                   max_prompt_tokens=flags.max_prompt_tokens,
                   max_new_tokens=flags.max_new_tokens, max_n=flags.max_n,
                   tokenizer=flags.tokenizer, name=flags.served_name,
                   window_s=flags.window_ms / 1000, dtype=flags.dtype)
  except (ValueError, OSError, CheckpointError) as e:
    print(f"serve: {e}", file=sys.stderr, flush=True)
    return 2
  print(f"Serving {server.service.served.name!r} at {server.url} (max_batch="
        f"{flags.max_batch}); Ctrl-C stops.", flush=True)
  try:
    server.thread.join()
  except KeyboardInterrupt:
    pass
  finally:
    server.close()
  return 0
