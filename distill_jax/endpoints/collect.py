"""`distill-jax collect`: a black-box teacher's outputs from any OpenAI-compatible endpoint.

    distill-jax collect --endpoint=http://127.0.0.1:8000/v1 --model=NAME --prompts=FILE \
        --out=teacher.jsonl [--api=completions|chat --max_tokens=256 --temperature=1 --top_p=1
        --top_logprobs=K --n=SAMPLES --seed=S --concurrency=8 --rate=REQ_PER_S --retries=8
        --timeout=120 --price_per_1k_prompt=P --price_per_1k_completion=C]

    from distill_jax.endpoints.collect import collect
    summary = collect("http://127.0.0.1:8000", "NAME", "prompts.jsonl", "teacher.jsonl",
                      top_logprobs=5, n=2)

Sends each prompt of `--prompts` (`collect_io.read_prompts`: .jsonl with "prompt", or text
lines) to `/completions` or `/chat/completions` under the endpoint (a URL without a path gets
`/v1`), asking for `n` samples (one request with `n`, or with `--separate_samples` one request
per sample with seed + i, for servers without `n`) and, with `--top_logprobs=K > 0`, each
token's K most likely alternatives. Writes one record per (prompt, sample), in prompt order,
in the format `data.name='jsonl'` trains from (`answers.py`; docs/blackbox.md), with the
server's model name and the sampling settings.

Robustness: at most `concurrency` prompts are in flight, and none is written before all the
prompts before it are (so a kill loses at most `concurrency` prompts' requests); retries
with backoff and jitter on 429/5xx, timeouts and dropped connections, honouring Retry-After
(`client.py`); at most `rate` requests a second; a rerun skips what the file answers
(`collect_io.resume`). A prompt the server refuses (HTTP 400/413/422) is left out and
listed in the summary; a rerun tries it again and appends it. The API key is read from the
environment variable `--api_key_env` (default OPENAI_API_KEY; unset: no key is sent), and
is never written to the output or the logs.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import os
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import urlsplit

from absl import logging

from distill_jax.common.console import print_failure
from distill_jax.endpoints import answers
from distill_jax.endpoints.answers import APIS, PATHS, AnswerError, Prompt
from distill_jax.endpoints.client import Poster, Refused, ServerError
from distill_jax.endpoints.collect_io import Appender, CollectError, read_prompts, resume

__all__ = ["CollectError", "ServerError", "Settings", "Summary", "collect"]
# The first prompts of a new file all refused: the settings are wrong, not the prompts.
REFUSED_AT_START = 10


@dataclasses.dataclass(frozen=True)
class Settings:
  """Everything but the endpoint, model and files; each field is the flag of its name."""

  api: str = "completions"
  max_tokens: int = 256
  temperature: float = 1.0
  top_p: float = 1.0
  top_logprobs: int = 0  # K alternatives per token; 0: text only.
  n: int = 1  # Samples per prompt.
  seed: int | None = None  # Sent as `seed` (with --separate_samples, seed + i per sample).
  separate_samples: bool = False  # One request per sample (servers without `n`).
  concurrency: int = 8  # Prompts in flight.
  rate: float = 0.0  # Requests per second, retries included; 0: no limit.
  retries: int = 8  # Per request, on 429/5xx, timeouts and dropped connections.
  timeout: float = 120.0  # Seconds per request.
  backoff: float = 1.0  # Seconds before the first retry (doubling, with jitter).
  max_backoff: float = 60.0
  api_key_env: str = "OPENAI_API_KEY"
  price_per_1k_prompt: float = 0.0  # For the summary's estimated cost.
  price_per_1k_completion: float = 0.0
  progress: bool = True

  def check(self) -> None:
    """Raises CollectError naming the first flag out of range."""
    rules = [("api", self.api in APIS, f"one of {', '.join(APIS)}"),
             ("max_tokens", self.max_tokens >= 1, "an integer >= 1"),
             ("temperature", self.temperature >= 0, "a number >= 0"),
             ("top_p", 0 < self.top_p <= 1, "a number in (0, 1]"),
             ("top_logprobs", self.top_logprobs >= 0, "an integer >= 0 (0: none)"),
             ("n", self.n >= 1, "an integer >= 1"),
             ("concurrency", self.concurrency >= 1, "an integer >= 1"),
             ("rate", self.rate >= 0, "requests per second >= 0 (0: no limit)"),
             ("retries", self.retries >= 0, "an integer >= 0"),
             ("timeout", self.timeout > 0, "seconds > 0"),
             ("backoff", self.backoff >= 0, "seconds >= 0"),
             ("max_backoff", self.max_backoff >= 0, "seconds >= 0"),
             ("price_per_1k_prompt", self.price_per_1k_prompt >= 0, "a price >= 0"),
             ("price_per_1k_completion", self.price_per_1k_completion >= 0, "a price >= 0")]
    for name, ok, fits in rules:
      if not ok:
        raise CollectError(f"--{name}={getattr(self, name)!r}: expected {fits}.")

  def sampling(self, model: str) -> dict[str, Any]:
    """What each record keeps as `sampling` (a rerun must match it to continue a file)."""
    return {"api": self.api, "model": model, "max_tokens": self.max_tokens,
            "temperature": self.temperature, "top_p": self.top_p,
            "top_logprobs": self.top_logprobs, "n": self.n, "seed": self.seed,
            "separate_samples": self.separate_samples}


@dataclasses.dataclass(frozen=True)
class Summary:
  """What a run did (also printed by the CLI)."""

  out: str
  prompts: int  # In the prompts file.
  already_done: int  # Answered by the file before this run.
  answered: int  # Prompts answered in this run.
  records: int  # Records written in this run.
  refused: tuple[tuple[Any, str], ...]  # (id, the server's reason): left out.
  requests: int
  retries: dict[str, int]  # By reason.
  prompt_tokens: int  # The servers' usage counts.
  completion_tokens: int
  cost: float  # From the price flags.
  seconds: float
  without_logprobs: int  # Records without log-probabilities although asked for.
  dropped_alternatives: int  # Alternatives without a finite log-probability.

  def text(self) -> str:
    rate = max(self.seconds, 1e-9)
    lines = [
        f"{self.out}: {self.already_done + self.answered} of {self.prompts} prompts answered "
        f"({self.answered} in this run, {self.records} records, {self.seconds:.1f} s).",
        f"Requests: {self.requests} ({self.requests / rate:.2f}/s), retries: "
        f"{sum(self.retries.values())}"
        + (f" ({', '.join(f'{k}: {v}' for k, v in sorted(self.retries.items()))})"
           if self.retries else "") + ".",
        f"Tokens: {self.prompt_tokens} prompt, {self.completion_tokens} completion "
        f"({self.completion_tokens / rate:.1f}/s); estimated cost {self.cost:.4f}.",
    ]
    if self.without_logprobs or self.dropped_alternatives:
      lines.append(f"Log-probabilities: {self.without_logprobs} record(s) have none although "
                   f"asked for; {self.dropped_alternatives} alternative(s) without a finite "
                   "log-probability dropped.")
    if self.refused:
      lines.append(f"Refused by the server and left out ({len(self.refused)}; a rerun tries "
                   "them again): " + "; ".join(f"{k!r}: {m}" for k, m in self.refused[:5])
                   + (" ..." if len(self.refused) > 5 else ""))
    return "\n".join(lines)


def base_url(endpoint: str) -> str:
  """The endpoint as a base URL: http(s) only; without a path, `/v1` is added."""
  parts = urlsplit(endpoint)
  if parts.scheme not in ("http", "https") or not parts.netloc:
    raise CollectError(f"--endpoint={endpoint!r}: expected an http(s) URL, e.g. "
                       "http://127.0.0.1:8000/v1 or https://api.openai.com/v1.")
  return endpoint.rstrip("/") + ("/v1" if parts.path in ("", "/") else "")


def api_key(env: str) -> str | None:
  """The key in environment variable `env` (None when unset and `env` is the default)."""
  key = os.environ.get(env)
  if not key and env != Settings.api_key_env:
    raise CollectError(f"--api_key_env={env}: that environment variable is not set.")
  return key or None


@dataclasses.dataclass
class _Done:
  records: list[dict[str, Any]]
  usage: collections.Counter
  notes: list[str]
  dropped: int
  refused: str | None = None


def _ask(poster: Poster, settings: Settings, model: str, prompt: Prompt,
         sampling: dict[str, Any]) -> _Done:
  """One prompt's `n` samples (one request, or one per sample)."""
  requests = ([(settings.n, settings.seed, 0)] if not settings.separate_samples else
              [(1, None if settings.seed is None else settings.seed + i, i)
               for i in range(settings.n)])
  done = _Done([], collections.Counter(), [], 0)
  for n, seed, first in requests:
    body = answers.request_body(settings.api, model, prompt, sampling, n=n, seed=seed)
    try:
      answer = poster.post(PATHS[settings.api], body)
    except Refused as e:
      return _Done([], done.usage, [], 0, refused=str(e))
    try:
      parsed, usage = answers.parse_answer(settings.api, answer, prompt, n=n,
                                           first_sample=first, sampling=sampling)
    except AnswerError as e:
      raise ServerError(poster.redact(f"the answer to prompt {prompt.id!r} is not of the "
                                      f"OpenAI shape: {e}")) from None
    done.usage.update(usage)
    for p in parsed:
      done.records.append(p.record)
      done.dropped += p.dropped
      if p.note:
        done.notes.append(p.note)
  return done


def collect(endpoint: str, model: str, prompts: str | os.PathLike | Sequence[Any], out: str,
            **options: Any) -> Summary:
  """Collects the answers to `prompts` (a file, or a list of strings or {"prompt", "id"?,
  "messages"?} objects: `collect_io.read_prompts`) into `out` (JSONL), resuming what `out`
  holds; `options` are `Settings`' fields. Returns the Summary. Raises CollectError for bad
  settings or files, ServerError when the server cannot answer, or refuses the first
  `REFUSED_AT_START` prompts of a new file (what was written stays)."""
  try:
    settings = Settings(**options)
  except TypeError as e:
    names = [f.name for f in dataclasses.fields(Settings)]
    raise CollectError(f"collect(): {e}; the options are {names}.") from None
  settings.check()
  url, key = base_url(endpoint), api_key(settings.api_key_env)
  items = read_prompts(prompts, settings.api)
  sampling = settings.sampling(model)
  done_ids = resume(out, items, sampling, settings.n)
  todo = [p for p in items if p.id not in done_ids]
  from tqdm import tqdm

  start, stop = time.monotonic(), threading.Event()
  usage: collections.Counter = collections.Counter()
  records, answered, without, dropped, refused = 0, 0, 0, 0, []
  pool = ThreadPoolExecutor(settings.concurrency, thread_name_prefix="collect")
  finished = False
  try:
    with Poster(url, api_key=key, timeout=settings.timeout, retries=settings.retries,
                backoff=settings.backoff, max_backoff=settings.max_backoff, rate=settings.rate,
                connections=settings.concurrency, stop=stop) as poster, Appender(out) as file, \
        tqdm(total=len(todo), unit="prompt", disable=not settings.progress,
             desc="collect", dynamic_ncols=True) as bar:
      pending, window = iter(todo), collections.deque()

      def refill() -> None:
        while len(window) < settings.concurrency:
          prompt = next(pending, None)
          if prompt is None:
            return
          window.append((prompt, pool.submit(_ask, poster, settings, model, prompt, sampling)))

      refill()
      while window:
        prompt, future = window.popleft()
        try:
          result = future.result()  # In prompt order: a later prompt waits for this one.
        except BaseException:
          stop.set()  # Before the client closes: waiting retries give up at once.
          raise
        usage.update(result.usage)
        if result.refused:
          refused.append((prompt.id, result.refused))
          logging.warning("Prompt %r refused by the server, left out: %s", prompt.id,
                          result.refused)
          if len(refused) >= REFUSED_AT_START and not answered and not done_ids:
            stop.set()
            raise ServerError(f"the server refused the first {len(refused)} prompts (the "
                              f"last: {result.refused}); check the settings against its "
                              "limits (--top_logprobs, --max_tokens, --n, --model)")
        else:
          file.write(result.records)
          records, answered = records + len(result.records), answered + 1
          without, dropped = without + len(result.notes), dropped + result.dropped
          for note in result.notes[:1]:
            logging.log_first_n(logging.WARNING, "Prompt %r: a record without "
                                "log-probabilities: %s.", 5, prompt.id, note)
        bar.update(1)
        elapsed = max(time.monotonic() - start, 1e-9)
        bar.set_postfix_str(f"{poster.requests / elapsed:.1f} req/s, "
                            f"{usage['completion_tokens'] / elapsed:.0f} tok/s, "
                            f"{poster.retries_so_far()} retries", refresh=False)
        refill()
      requests, reasons = poster.requests, dict(poster.reasons)  # The workers are idle.
      finished = True
  finally:
    stop.set()  # Waiting retries give up; requests in flight end with the closed client.
    # After an error or Ctrl-C the requests in flight are not waited for: nothing they bring
    # is written (only this thread writes).
    pool.shutdown(wait=finished, cancel_futures=True)
  cost = (usage["prompt_tokens"] * settings.price_per_1k_prompt
          + usage["completion_tokens"] * settings.price_per_1k_completion) / 1000
  return Summary(out, len(items), len(done_ids), answered, records, tuple(refused), requests,
                 reasons, usage["prompt_tokens"], usage["completion_tokens"], cost,
                 time.monotonic() - start, without, dropped)


# --- The command line ----------------------------------------------------------------------

PROG = "distill-jax collect"


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog=PROG, description="Query an OpenAI-compatible endpoint with each prompt and write "
      "the answers (text, and top-k log-probabilities when asked) as a black-box teacher file "
      "that data.name='jsonl' trains from (docs/api_teachers.md). A rerun continues the file.")
  p.add_argument("--endpoint", required=True, help="Base URL, e.g. http://127.0.0.1:8000/v1 "
                 "(without a path, /v1 is added).")
  p.add_argument("--model", required=True, help="The model name the server knows.")
  p.add_argument("--prompts", required=True, help="A .jsonl file of {\"prompt\", \"id\"?, "
                 "\"messages\"?} lines, or a text file with one prompt a line.")
  p.add_argument("--out", required=True, help="The JSONL file to write (continued if it "
                 "exists).")
  defaults = Settings()
  p.add_argument("--api", choices=APIS, default=defaults.api)
  for name, kind, what in (
      ("max_tokens", int, "tokens per completion"), ("temperature", float, "0: greedy"),
      ("top_p", float, "nucleus mass"),
      ("top_logprobs", int, "K alternatives per token with log-probabilities; 0: text only"),
      ("n", int, "samples per prompt"), ("seed", int, "sent as the requests' seed"),
      ("concurrency", int, "prompts in flight"),
      ("rate", float, "at most this many requests a second (retries too); 0: no limit"),
      ("retries", int, "per request on 429/5xx, timeouts and dropped connections"),
      ("timeout", float, "seconds per request"),
      ("backoff", float, "seconds before the first retry (then doubling, with jitter)"),
      ("max_backoff", float, "the longest wait between retries"),
      ("api_key_env", str, "the environment variable that holds the API key"),
      ("price_per_1k_prompt", float, "price per 1000 prompt tokens, for the estimated cost"),
      ("price_per_1k_completion", float, "price per 1000 completion tokens")):
    p.add_argument(f"--{name}", type=kind, default=getattr(defaults, name),
                   help=f"{what} (default {getattr(defaults, name)})")
  p.add_argument("--separate_samples", action="store_true",
                 help="one request per sample (seed + i), for servers without `n`")
  p.add_argument("--no_progress", action="store_true", help="no progress bar")
  p.add_argument("--verbosity", type=int, default=0,
                 help="1: every retry in the log, and tracebacks of errors")
  return p


def main(argv: Sequence[str], banner: str = "") -> int:
  """Runs the command; returns the exit code (0 done, 2 bad input, 1 the server failed,
  130 interrupted: a rerun continues)."""
  from absl import flags

  args = parser().parse_args(list(argv))
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()  # absl logging without its "before flag parsing" note.
  logging.set_verbosity(logging.DEBUG if args.verbosity >= 1 else logging.INFO)
  for name in ("httpx", "httpcore"):  # Their request lines would fill the log.
    logging.logging.getLogger(name).setLevel(logging.logging.WARNING)
  if banner:
    print(banner, file=sys.stderr, flush=True)
  options = {f.name: getattr(args, f.name) for f in dataclasses.fields(Settings)
             if f.name != "progress"}
  try:
    summary = collect(args.endpoint, args.model, args.prompts, args.out,
                      progress=not args.no_progress, **options)
  except CollectError as e:
    return print_failure(e, 2, args.verbosity)
  except (ServerError, OSError) as e:
    return print_failure(e, 1, args.verbosity)
  except KeyboardInterrupt:
    print(f"Interrupted: the same command continues {args.out}.", file=sys.stderr, flush=True)
    return 130
  print(summary.text())
  return 0

