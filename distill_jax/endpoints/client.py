"""POST with retries to an OpenAI-compatible server: backoff, Retry-After, a request rate.

`Poster.post(path, body)` returns the answer's JSON. It retries what may pass on its own:
HTTP 408, 409, 429 and 5xx, timeouts, refused or dropped connections and answers cut short
or not JSON, up to `retries` times, waiting `min(max_backoff, backoff * 2^attempt)` seconds
times a random factor in [0.5, 1] (jitter, so that clients that failed together do not retry
together), or what the server's `Retry-After` header says (seconds or an HTTP date, at most
`MAX_RETRY_AFTER`). A request the server refuses for what it is (HTTP 400, 413, 422: e.g. a
prompt longer than the model's context) raises `Refused`: that prompt is left out. Any other
HTTP error (401 a bad key, 404 an unknown model or path) raises `ServerError` at once: no
prompt would fare better. Every attempt waits its turn under the request rate (`rate`
requests per second over all threads; 0: no limit).

The API key goes into the Authorization header only; every message this module makes has it
replaced by `***` (`redact`), should a server echo it.
"""

from __future__ import annotations

import email.utils
import math
import random
import threading
import time
from collections import Counter
from collections.abc import Mapping
from typing import Any

import httpx
from absl import logging

RETRY_STATUS = frozenset({408, 409, 429})  # And every 5xx.
REFUSED_STATUS = frozenset({400, 413, 422})  # This request's fault: the prompt is left out.
MAX_RETRY_AFTER = 600.0  # Seconds: a longer Retry-After is cut to this.


class ServerError(RuntimeError):
  """The server cannot answer (a fatal HTTP status, or retries used up); one line."""


class Refused(Exception):
  """The server refused this request for what it is (HTTP 400/413/422)."""

  def __init__(self, status: int, message: str):
    super().__init__(f"HTTP {status}: {message}")
    self.status = status


class Stopped(Exception):
  """The run is stopping (an error elsewhere, Ctrl-C): no further attempt."""


class RateLimiter:
  """At most `rate` request starts per second over all threads (0: no limit)."""

  def __init__(self, rate: float):
    self.interval = 1.0 / rate if rate > 0 else 0.0
    self.next = time.monotonic()
    self.lock = threading.Lock()

  def wait(self, stop: threading.Event) -> None:
    if not self.interval:
      return
    with self.lock:
      now = time.monotonic()
      start = max(now, self.next)
      self.next = start + self.interval
    if start > now and stop.wait(start - now):
      raise Stopped


def retry_after(value: str | None) -> float | None:
  """Seconds a Retry-After header asks for (a number or an HTTP date), or None."""
  if not value:
    return None
  try:
    seconds = float(value)
  except ValueError:
    try:
      seconds = email.utils.parsedate_to_datetime(value).timestamp() - time.time()
    except (TypeError, ValueError, IndexError):
      return None
  if math.isnan(seconds):
    return None
  return min(max(seconds, 0.0), MAX_RETRY_AFTER)


def backoff_delay(attempt: int, backoff: float, max_backoff: float) -> float:
  """Exponential backoff with jitter: attempt 0 waits `backoff` * [0.5, 1] seconds."""
  return min(max_backoff, backoff * 2.0 ** attempt) * random.uniform(0.5, 1.0)


def _server_message(response: httpx.Response) -> str:
  """The error message of an OpenAI-shaped error body (`{"error": {"message"}}`), else the
  start of the body."""
  try:
    body = response.json()
  except ValueError:
    body = None
  if isinstance(body, Mapping):
    error = body.get("error")
    message = error.get("message") if isinstance(error, Mapping) else error or body.get(
        "detail")
    if message:
      return " ".join(str(message).split())[:300]
  return " ".join(response.text.split())[:300] or response.reason_phrase


class Poster:
  """A thread-safe client of one server (`base_url`, e.g. http://127.0.0.1:8000/v1) that
  retries as the module docstring says; counts requests and retries by reason."""

  def __init__(self, base_url: str, *, api_key: str | None, timeout: float, retries: int,
               backoff: float, max_backoff: float, rate: float, connections: int,
               stop: threading.Event):
    self.base_url, self.api_key, self.retries = base_url.rstrip("/"), api_key, retries
    self.backoff, self.max_backoff, self.stop = backoff, max_backoff, stop
    self.limiter = RateLimiter(rate)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    self.client = httpx.Client(
        timeout=httpx.Timeout(timeout), headers=headers, follow_redirects=False,
        limits=httpx.Limits(max_connections=connections, max_keepalive_connections=connections))
    self.lock = threading.Lock()
    self.requests = 0
    self.reasons: Counter[str] = Counter()  # Retries by reason.

  def __enter__(self) -> Poster:
    return self

  def __exit__(self, *_: Any) -> None:
    self.client.close()

  def retries_so_far(self) -> int:
    with self.lock:
      return sum(self.reasons.values())

  def redact(self, text: str) -> str:
    """`text` with the API key replaced by ***."""
    return text.replace(self.api_key, "***") if self.api_key else text

  def post(self, path: str, body: Mapping[str, Any]) -> Any:
    """The JSON answer of POST base_url + path (see the module docstring)."""
    url = self.base_url + path
    for attempt in range(self.retries + 1):
      if self.stop.is_set():
        raise Stopped
      self.limiter.wait(self.stop)
      delay = None
      with self.lock:
        self.requests += 1
      try:
        response = self.client.post(url, json=body)
      except (httpx.TransportError, httpx.DecodingError) as e:  # Timeouts, dropped links.
        reason = f"{type(e).__name__}"
      except RuntimeError as e:  # The client was closed: the run is stopping.
        raise Stopped from e
      else:
        status = response.status_code
        if status == 200:
          try:
            return response.json()
          except ValueError:
            reason = "an answer that is not JSON"
        elif status in RETRY_STATUS or status >= 500:
          reason = f"HTTP {status}"
          delay = retry_after(response.headers.get("retry-after"))
        elif status in REFUSED_STATUS:
          raise Refused(status, self.redact(_server_message(response)))
        else:
          raise ServerError(self.redact(
              f"POST {url}: HTTP {status}: {_server_message(response)}"
              + (" (is the API key right? it is read from --api_key_env)"
                 if status in (401, 403) else "")))
      if attempt == self.retries:
        raise ServerError(self.redact(
            f"POST {url}: no answer after {self.retries + 1} attempts (the last: {reason}); "
            "rerun later to continue, or raise --retries"))
      with self.lock:
        self.reasons[reason] += 1
      if delay is None:
        delay = backoff_delay(attempt, self.backoff, self.max_backoff)
      logging.debug("POST %s: %s; retry %d in %.2f s.", url, reason, attempt + 1, delay)
      if self.stop.wait(delay):
        raise Stopped
    raise AssertionError("unreachable")
