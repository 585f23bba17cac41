"""The device side of `distill-jax serve`: the served model and the worker that batches rows.

    served = load_served_model("runs/lm/teacher")       # a run, an export or an HF directory
    engine = Engine(served, max_batch=8)
    future = engine.submit(Row(ids, max_tokens=16, seed=..., index=0, temperature=0.0))
    result = future.result()                             # a Generated
    engine.stop()

Fixed-slot batching: one worker thread owns the device. It waits for a row, then gathers the
rows already waiting (and those arriving within `window_s`, default 0: under load the queue
fills while a batch runs, and a lone request should not wait), up to `max_batch`, with the
same sampling settings (temperature, top_k, top_p: the sampler compiles them in), and decodes
them together with the compiled KV-cache sampler (`tasks.language_model.generate.sample`);
rows with other settings wait for the next batch, in order. A batch has a power of two of
slots, at most `max_batch` (unused ones hold a one-token prompt that ends at once: a lone
request costs a batch of 1, not of `max_batch`), its prompts are left-padded to a power-of-two
width and its budget is a power of two too, so the sampler compiles at most once per (slots,
prompt width, budget, settings): (log2(max_batch) + 1) * log2(context)^2 shapes per setting,
whatever the traffic (`warm_up` compiles them ahead). Fixed slots rather than continuous
batching because the sampler runs a whole batch in one compiled loop
(which is what makes it fast here); a row that ends early idles until its batch ends, and a
row's own `max_tokens` ends it (its mask) without ending the batch.

Each row draws with its own key, `fold_in(PRNGKey(seed), index)` (`index`: the choice), so a
seeded request's samples do not depend on what it is batched with.

Log-probabilities (when a row asks for them) are those of the distribution sampled from, at
the row's temperature: `log_softmax(logits / T)` before the top-k/top-p cut; at temperature 0
(greedy) the model's own, `log_softmax(logits)`. Each generated token's, and the
`TOP_LOGPROBS` most likely tokens at its position.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import queue
import threading
import time
from concurrent.futures import Future
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from distill_jax import models
from distill_jax.common.model_io import CheckpointError, load_model_variables, read_model_meta
from distill_jax.models import tokenizers
from distill_jax.tasks.language_model import generate
from distill_jax.teachers import init_shapes, resolve_export_dir

TOP_LOGPROBS = 20  # Alternatives computed per position when a batch reports log-probs.
MIN_BUCKET = 8  # The narrowest prompt width and smallest budget compiled.


@dataclasses.dataclass(frozen=True)
class ServedModel:
  """A `transformer_lm` ready to decode: module, variables, tokenizer and the name served."""

  name: str
  module: Any
  variables: Any
  tokenizer: Any
  source: str  # The directory it was loaded from.


def _is_hf_dir(path: str) -> bool:
  return all(os.path.exists(os.path.join(path, f)) for f in ("config.json", "tokenizer.json"))


def load_served_model(path: str, tokenizer: str | None = None, name: str | None = None,
                      dtype: str = "float32") -> ServedModel:
  """A run's workdir (its `model/`), an export directory, or a Hugging Face directory.

  The tokenizer: `tokenizer` (`bytes` or `hf:<directory>`) when given; else a run's
  `config.json`'s `data.tokenizer` (the run's workdir, or the export's parent); else the HF
  directory's own; else bytes. `name` (default the directory's name; a run's for its
  `model/`) is the model clients name; `dtype` an HF directory's weights' and forward's
  ('float32' or 'bfloat16')."""
  path = os.path.normpath(path)
  if not os.path.isdir(path):
    raise CheckpointError(f"--model={path}: no such directory (a run's workdir, an export "
                          "directory or a Hugging Face model directory).")
  export = resolve_export_dir(path)
  default_name = os.path.basename(path)
  if default_name == "model":  # A run's export: the run's name.
    default_name = os.path.basename(os.path.dirname(path)) or default_name
  if os.path.exists(os.path.join(export, "model.json")):
    meta = read_model_meta(export)
    module = models.build_model(meta["model"], meta["num_classes"], **(meta.get("kwargs") or {}))
    if not hasattr(module, "init_cache"):
      raise CheckpointError(f"--model={path} holds a {meta['model']}, not a language model "
                            "with a decoding cache (transformer_lm).")
    variables = load_model_variables(export, init_shapes(module, (module.context,)))
    if tokenizer is None:
      run_dir = path if export != path else os.path.dirname(path)
      config = os.path.join(run_dir, "config.json")
      if os.path.exists(config):
        with open(config) as f:
          tokenizer = (json.load(f).get("data") or {}).get("tokenizer")
  elif _is_hf_dir(path):
    from distill_jax.models import hf

    kwargs, variables, hf_tokenizer = hf.load_hf(path, dtype)
    with open(os.path.join(path, "config.json")) as f:
      vocab = int(json.load(f)["vocab_size"])
    module = models.build_model("transformer_lm", vocab, **kwargs)
    tokenizer = tokenizer or hf_tokenizer.name
  else:
    raise CheckpointError(f"--model={path} holds neither an exported model (model.json, or a "
                          "run's model/) nor a Hugging Face directory (config.json and "
                          "tokenizer.json).")
  tok = tokenizers.get_tokenizer(tokenizer or "bytes")
  if tok.vocab_size > module.num_classes:
    raise CheckpointError(f"--tokenizer={tok.name} has {tok.vocab_size} tokens but the model "
                          f"at {path} predicts {module.num_classes}: name the model's own "
                          "tokenizer (bytes or hf:<directory>).")
  return ServedModel(name or default_name, module, variables, tok, path)


@dataclasses.dataclass(frozen=True)
class Row:
  """One sequence to decode: prompt `ids` [L] (BOS first), `max_tokens` to draw, the request's
  `seed` (a raw key [2] uint32) and this choice's `index`, the sampling settings, and whether
  to return log-probs."""

  ids: np.ndarray
  max_tokens: int
  seed: np.ndarray
  index: int = 0
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  logprobs: bool = False

  def settings(self) -> tuple[float, int, float]:
    """What the sampler compiles in; greedy ignores the cuts, so all greedy rows share one."""
    return (0.0, 0, 1.0) if self.temperature == 0 else (self.temperature, self.top_k,
                                                        self.top_p)


@dataclasses.dataclass(frozen=True)
class Generated:
  """A row's result: the generated `ids` [n] (EOS included when drawn), `eos` (it ended at
  EOS), and with log-probs each token's `logprobs` [n] and the most likely `top_ids`,
  `top_logprobs` [n, TOP_LOGPROBS] at its position (most likely first)."""

  ids: np.ndarray
  eos: bool
  logprobs: np.ndarray | None = None
  top_ids: np.ndarray | None = None
  top_logprobs: np.ndarray | None = None


def seed_key(seed: int) -> np.ndarray:
  """`jax.random.PRNGKey(seed)`'s raw key [2] uint32 for any 64-bit seed (negative ones wrap)."""
  seed %= 2**64
  return np.array([seed >> 32, seed & 0xFFFFFFFF], np.uint32)


def bucket(n: int, cap: int) -> int:
  """The smallest power of two >= n (at least MIN_BUCKET), at most `cap` (>= n)."""
  return min(max(MIN_BUCKET, 1 << max(0, n - 1).bit_length()), cap)


def _decode(model: Any, eos_id: int, pad_id: int, new: int, settings: tuple, top: int,
            variables: Any, prompts: jax.Array, lengths: jax.Array, limits: jax.Array,
            seeds: jax.Array, index: jax.Array) -> tuple:
  """The compiled batch: the new tokens [B, N] and their mask, and with `top` > 0 each
  token's log-prob [B, N] and the `top` most likely (ids, log-probs) [B, N, top]."""
  temperature, top_k, top_p = settings
  keys = jax.vmap(jax.random.fold_in)(seeds, index)
  out = generate.sample(model, variables, prompts, max_new_tokens=new, rng=keys,
                        prompt_lengths=lengths, temperature=temperature, top_k=top_k,
                        top_p=top_p, eos_id=eos_id, pad_id=pad_id, return_logprobs=top > 0,
                        max_tokens=limits)
  width = prompts.shape[1]
  tokens, mask = out[0][:, width:], out[1][:, width:]
  if not top:
    return tokens, mask
  logprobs = out[2]  # At temperature 1; the sampled distribution's at T > 0.
  if temperature > 0:
    logprobs = jax.nn.log_softmax(logprobs / temperature, axis=-1)
  chosen = jnp.take_along_axis(logprobs, tokens[..., None], axis=-1)[..., 0]
  top_logprobs, top_ids = jax.lax.top_k(logprobs, top)
  return tokens, mask, chosen, top_ids, top_logprobs


class Engine:
  """The worker thread that owns the device; see the module docstring."""

  def __init__(self, served: ServedModel, *, max_batch: int = 8, window_s: float = 0.0):
    self.served, self.max_batch, self.window_s = served, max_batch, window_s
    self.context = served.module.context
    tok = served.tokenizer
    self.top = min(TOP_LOGPROBS, served.module.num_classes)
    self._compiled = functools.cache(lambda new, settings, top: jax.jit(functools.partial(
        _decode, served.module, tok.eos_id, tok.pad_id, new, settings, top)))
    self._queue: queue.Queue = queue.Queue()
    self._pending: list[tuple[Row, Future]] = []
    self.batches = 0  # Batches run and rows decoded (for the benchmark and the tests).
    self.rows = 0
    self._thread = threading.Thread(target=self._loop, name="serve-engine", daemon=True)
    self._thread.start()

  def submit(self, row: Row) -> Future:
    """Queues `row`; the future holds its `Generated` (or the exception its batch raised)."""
    future: Future = Future()
    self._queue.put((row, future))
    return future

  def stop(self) -> None:
    """Ends the worker after the rows already queued."""
    self._queue.put(None)
    self._thread.join()

  def warm_up(self, longest_prompt: int, max_tokens: int, temperature: float = 0.0,
              logprobs: bool = False) -> int:
    """Compiles, before any request, the batches that prompts of 1..`longest_prompt` tokens
    drawing `max_tokens` at `temperature` may need: every slot count and prompt width. Call it
    before requests arrive (it runs on the caller's thread). Returns the batches compiled."""
    tok, compiled = self.served.tokenizer, 0
    new = bucket(max_tokens, self.context - longest_prompt)
    widths = sorted({bucket(n, self.context - new) for n in range(1, longest_prompt + 1)})
    slots = sorted({min(self.max_batch, 1 << (n - 1).bit_length())
                    for n in range(1, self.max_batch + 1)})
    for width in widths:
      ids = np.full(min(width, longest_prompt), tok.bos_id, np.int32)
      row = Row(ids, max_tokens, seed_key(0), 0, temperature, 0, 1.0, logprobs)
      for n in slots:
        self._run([row] * n)
        compiled += 1
    self.batches, self.rows = 0, 0
    return compiled

  def _loop(self) -> None:
    stopping = False
    while not stopping or self._pending:
      if not self._pending:
        item = self._queue.get()
        if item is None:
          break
        self._pending.append(item)
      key = self._pending[0][0].settings()
      deadline = time.monotonic() + self.window_s
      while not stopping and sum(r.settings() == key for r, _ in self._pending) < self.max_batch:
        try:
          item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
          break
        if item is None:
          stopping = True
        else:
          self._pending.append(item)
      batch = [p for p in self._pending if p[0].settings() == key][:self.max_batch]
      self._pending = [p for p in self._pending if all(p is not b for b in batch)]
      try:
        results = self._run([row for row, _ in batch])
      except Exception as e:  # noqa: BLE001 - the batch's requests get the error, not the loop.
        for _, future in batch:
          future.set_exception(e)
        continue
      for (_, future), result in zip(batch, results, strict=True):
        future.set_result(result)

  def _run(self, rows: list[Row]) -> list[Generated]:
    """Decodes up to `max_batch` rows of one setting in one compiled call."""
    tok = self.served.tokenizer
    slots = min(self.max_batch, 1 << (len(rows) - 1).bit_length())  # A power of two.
    longest, budget = max(len(r.ids) for r in rows), max(r.max_tokens for r in rows)
    new = bucket(budget, self.context - longest)
    width = bucket(longest, self.context - new)
    prompts = np.full((slots, width), tok.pad_id, np.int32)
    prompts[:, -1] = tok.bos_id  # Idle slots: a BOS prompt that draws one token.
    lengths, limits = np.ones(slots, np.int32), np.ones(slots, np.int32)
    seeds, index = np.zeros((slots, 2), np.uint32), np.zeros(slots, np.int32)
    for i, r in enumerate(rows):
      prompts[i, width - len(r.ids):], lengths[i], limits[i] = r.ids, len(r.ids), r.max_tokens
      seeds[i], index[i] = r.seed, r.index
    top = self.top if any(r.logprobs for r in rows) else 0
    fn = self._compiled(new, rows[0].settings(), top)
    out = jax.device_get(fn(self.served.variables, prompts, lengths, limits, seeds, index))
    self.batches, self.rows = self.batches + 1, self.rows + len(rows)
    results = []
    for i, r in enumerate(rows):
      kept = np.flatnonzero(out[1][i] > 0)
      ids = out[0][i][kept]
      eos = bool(len(ids)) and int(ids[-1]) == tok.eos_id
      extra = (out[2][i][kept], out[3][i][kept], out[4][i][kept]) if r.logprobs else ()
      results.append(Generated(ids, eos, *extra))
    return results
