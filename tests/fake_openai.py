"""A fake OpenAI-compatible teacher for the collector's tests: stdlib `http.server` on
127.0.0.1 in a thread, `/v1/completions` and `/v1/chat/completions`, deterministic answers
with top-k log-probabilities, and faults on demand.

The teacher (`teach`) is a function of (prompt, seed, sample): each step draws a token from a
softmax over `VOCAB` (scores from a seeded generator, one token favoured per prompt); '€' is
written as its three UTF-8 bytes, one token each (`bytes:\\xNN` pieces), so answers hold
partial characters; an answer stopped before `max_tokens` ends with a stop token that the
completions API lists in its log-probs but not in its text (as some servers do).

Faults (`faults=True`): each distinct request (path and body) fails its first 0 to 3 attempts,
how many and how drawn from the request itself (so a run's faults do not depend on thread
timing): HTTP 429 with Retry-After: 0, HTTP 500, the connection closed without an answer, an
answer cut short, or no answer before the client's timeout (`stall` seconds). `fail_first`
names faults for the first requests, whatever they ask (Retry-After: `retry_after`).
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import socket
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

VOCAB = ("a", "b", "c", " ", "de", "é", "€", "!")
FAULTS = ("429", "500", "drop", "cut", "stall")
STOP = "</s>"
MODEL = "fake-teacher-1"


def piece_name(data: bytes) -> str:
  """A token's name in the black-box file's convention (the test's own, independent of the
  collector's): whole UTF-8 text as itself, else every byte as \\xNN after `bytes:`."""
  try:
    return data.decode("utf-8")
  except UnicodeDecodeError:
    return "bytes:" + "".join(f"\\x{b:02x}" for b in data)


def teach(prompt: str, seed, sample: int, max_tokens: int, k: int):
  """The teacher's answer: ([(token bytes, logprob, [(alternative bytes, logprob)] top-k)],
  finish_reason)."""
  rng = random.Random(f"{prompt}\x00{seed}\x00{sample}")
  favourite = int(hashlib.sha256(prompt.encode()).hexdigest(), 16) % len(VOCAB)
  length = rng.randint(2, max_tokens)
  steps, pending = [], []
  while len(steps) < length:
    if pending:  # The rest of a character: near certain.
      piece = pending.pop(0)
      steps.append((piece, -0.001, [(piece, -0.001), (b"a", -7.0)][:k]))
      continue
    scores = [rng.gauss(0.0, 1.5) + (3.0 if i == favourite else 0.0) for i in range(len(VOCAB))]
    top = max(scores)
    norm = top + math.log(sum(math.exp(s - top) for s in scores))
    logprobs = [s - norm for s in scores]
    chosen = rng.choices(range(len(VOCAB)), weights=[math.exp(lp) for lp in logprobs])[0]
    order = sorted(range(len(VOCAB)), key=lambda i: -logprobs[i])[:k]
    alternatives = [(VOCAB[i].encode(), logprobs[i]) for i in order]
    data = VOCAB[chosen].encode()
    if VOCAB[chosen] == "€":
      data, pending = data[:1], [data[1:2], data[2:3]]
    steps.append((data, logprobs[chosen], alternatives))
  return steps, ("length" if length == max_tokens else "stop")


def text_of(steps) -> str:
  return b"".join(s[0] for s in steps).decode("utf-8", "replace")


def expected_records(prompt_id, prompt: str, sampling: dict, model: str = MODEL):
  """The records a correct collector writes for one prompt (top_logprobs: the server's
  alternatives, plus the sampled token where they lack it)."""
  records = []
  for j in range(sampling["n"]):
    steps, finish = teach(prompt, sampling["seed"], j, sampling["max_tokens"],
                          sampling["top_logprobs"])
    record = {"id": prompt_id, "sample": j, "prompt": prompt, "completion": text_of(steps)}
    if sampling["top_logprobs"]:
      record["tokens"] = [piece_name(s[0]) for s in steps]
      record["top_logprobs"] = []
      for data, lp, alternatives in steps:
        top = {piece_name(a): v for a, v in alternatives}
        top.setdefault(piece_name(data), lp)
        record["top_logprobs"].append(top)
    record.update(model=model, finish_reason=finish, sampling=sampling)
    records.append(record)
  return records


def _chat_entry(data: bytes, lp: float) -> dict:
  # The token string as a naive server writes it (a partial character decodes to U+FFFD);
  # `bytes` are exact.
  return {"token": data.decode("utf-8", "replace"), "logprob": lp, "bytes": list(data)}


def answer(path: str, body: dict) -> dict:
  """The OpenAI-shaped answer to a valid request."""
  chat = path.endswith("/chat/completions")
  prompt = "\n".join(m["content"] for m in body["messages"]) if chat else body["prompt"]
  k = (body.get("top_logprobs", 0) if body.get("logprobs") else 0) if chat else body.get(
      "logprobs") or 0
  choices, completion_tokens = [], 0
  for j in range(body.get("n", 1)):
    steps, finish = teach(prompt, body.get("seed"), j, body["max_tokens"], k)
    completion_tokens += len(steps)
    text = text_of(steps)
    if chat:
      logprobs = {"content": [{**_chat_entry(d, lp), "top_logprobs": [
          _chat_entry(a, v) for a, v in alts]} for d, lp, alts in steps]} if k else None
      choices.append({"index": j, "message": {"role": "assistant", "content": text},
                      "logprobs": logprobs, "finish_reason": finish})
    else:
      logprobs = None
      if k:
        tokens = [piece_name(d) for d, _, _ in steps]
        token_lps = [lp for _, lp, _ in steps]
        tops = [{piece_name(a): v for a, v in alts} for _, _, alts in steps]
        if finish == "stop":  # Listed, not in the text.
          tokens, token_lps, tops = tokens + [STOP], token_lps + [-0.2], tops + [{STOP: -0.2}]
        offsets = [len(text_of(steps[:i])) for i in range(len(tokens))]
        logprobs = {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops,
                    "text_offset": offsets}
      choices.append({"index": j, "text": text, "logprobs": logprobs, "finish_reason": finish})
  choices.reverse()  # Index order is the client's to restore.
  return {"id": "cmpl-1", "object": "chat.completion" if chat else "text_completion",
          "created": 0, "model": MODEL, "choices": choices,
          "usage": {"prompt_tokens": len(prompt.encode()), "completion_tokens":
                    completion_tokens, "total_tokens": len(prompt.encode()) + completion_tokens}}


class FakeOpenAI:
  """The server; `url` is its base URL (.../v1). `requests` logs (time, path, body,
  Authorization header) of every request; `faults` counts the faults served by kind."""

  def __init__(self, *, faults: bool = False, latency: float = 0.0, stall: float = 0.5,
               api_key: str | None = None, requested_model: str = "teacher",
               fail_first: tuple[str, ...] = (), retry_after: str = "0"):
    self.fault_mode, self.latency, self.stall = faults, latency, stall
    self.fail_first, self.retry_after = list(fail_first), retry_after  # Faults, whatever asks.
    self.api_key, self.model = api_key, requested_model
    self.lock = threading.Lock()
    self.requests: list[tuple[float, str, dict, str | None]] = []
    self.attempts: Counter = Counter()
    self.faults: Counter = Counter()
    app = self

    class Handler(BaseHTTPRequestHandler):
      protocol_version = "HTTP/1.1"

      def log_message(self, *args):  # Quiet.
        pass

      def do_POST(self):  # noqa: N802  (http.server's name)
        app.handle(self)

    self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    self.server.daemon_threads = True
    self.server.handle_error = lambda *args: None  # A client gone after a stall: fine.
    self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
    self.thread.start()
    self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

  def close(self):
    self.server.shutdown()
    self.server.server_close()

  def _send(self, handler, status: int, payload: dict, headers=(), cut: bool = False):
    data = json.dumps(payload).encode()
    handler.send_response(status)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(data)))
    for name, value in headers:
      handler.send_header(name, value)
    handler.end_headers()
    handler.wfile.write(data[:len(data) // 2] if cut else data)
    handler.wfile.flush()
    if cut:
      handler.close_connection = True
      handler.connection.shutdown(socket.SHUT_RDWR)

  def _fault(self, key: str) -> str | None:
    """The fault this attempt of request `key` gets, or None (drawn from the request)."""
    rng = random.Random(key)
    kinds = [rng.choice(FAULTS) for _ in range(rng.choice((0, 0, 1, 2, 3)))]
    with self.lock:
      if self.fail_first:
        self.faults[self.fail_first[0]] += 1
        return self.fail_first.pop(0)
      attempt = self.attempts[key]
      self.attempts[key] += 1
      if self.fault_mode and attempt < len(kinds):
        self.faults[kinds[attempt]] += 1
        return kinds[attempt]
    return None

  def handle(self, handler):
    raw = handler.rfile.read(int(handler.headers.get("Content-Length", 0)))
    auth = handler.headers.get("Authorization")
    try:
      body = json.loads(raw)
    except json.JSONDecodeError:
      return self._send(handler, 400, {"error": {"message": "malformed JSON"}})
    with self.lock:
      self.requests.append((time.monotonic(), handler.path, body, auth))
    if self.api_key and auth != f"Bearer {self.api_key}":
      return self._send(handler, 401, {"error": {"message": "invalid API key"}})
    if handler.path not in ("/v1/completions", "/v1/chat/completions"):
      return self._send(handler, 404, {"error": {"message": f"no route {handler.path}"}})
    if body.get("model") != self.model:
      return self._send(handler, 404, {"error": {"message": f"model {body.get('model')!r} "
                                                 "does not exist"}})
    fault = self._fault(handler.path + json.dumps(body, sort_keys=True))
    if fault == "429":
      return self._send(handler, 429, {"error": {"message": "rate limited"}},
                        headers=[("Retry-After", self.retry_after)])
    if fault == "503":
      return self._send(handler, 503, {"error": {"message": "overloaded"}},
                        headers=[("Retry-After", self.retry_after)])
    if fault == "500":
      return self._send(handler, 500, {"error": {"message": "internal error"}})
    if fault == "drop":
      handler.close_connection = True
      handler.connection.shutdown(socket.SHUT_RDWR)
      return None
    if fault == "stall":
      time.sleep(self.stall)
    elif self.latency:
      time.sleep(self.latency)
    text = "\n".join(m["content"] for m in body["messages"]) if "messages" in body else body[
        "prompt"]
    if "REFUSE" in text:  # Echoes the key, as a careless server might.
      return self._send(handler, 400, {"error": {"message": f"prompt refused (auth: {auth})"}})
    return self._send(handler, 200, answer(handler.path, body), cut=fault == "cut")
