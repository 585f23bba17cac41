"""Sampling from a `TransformerLM` with its key/value cache, in one compiled loop.

    tokens, mask = sample(model, variables, prompts, max_new_tokens=32, rng=key)

`prompts` [B, P] int are right-aligned (left-padded): row b's prompt is its last
`prompt_lengths[b]` tokens (all P when `prompt_lengths` is None), the positions before it hold
`pad_id` and are never attended to. Right-padded prompts would decode from their padding:
`check_prompts` refuses them, which `sample` runs itself on concrete (host) arrays; under
`jax.jit` the prompts are traced and cannot be read, so call `check_prompts` on the host before
the compiled call (as `scripts/generate.py` does).

The prompt is processed once (prefill), then `max_new_tokens` = N tokens are drawn one at a
time in a `lax.while_loop` (fixed shapes, so it compiles once and runs inside a train step
too) that stops as soon as every row has drawn `eos_id`: the steps it skips would only write
`pad_id` (the tokens and mask are those of running all N). Returns tokens [B, P + N] (the
prompts as given, then the samples) and `mask` [B, P + N] float32, 1 at generated positions up
to and including the first `eos_id`, 0 on the prompt and after EOS (where the tokens are
`pad_id`).

Sampling per step (the first token from the prefill; no forward is spent on the last token):
logits / `temperature`, then `top_k` (keep the k largest; 0: all) and
`top_p` (nucleus: keep the smallest set of most likely tokens whose probability reaches p; 1:
all), then a categorical draw with the key `fold_in(rng, step)` (reproducible from `rng`).
`greedy=True` or `temperature=0` takes the argmax. `rng` may also be one key per row ([B]
typed keys or [B, 2] raw ones): row b then draws with `fold_in(rng[b], step)` alone, so its
samples do not depend on the rows it is batched with (a server's batches). `max_tokens` [B]
(int, each in 1..N) ends row b after it has drawn `max_tokens[b]` tokens, as EOS does.
With `return_logprobs=True` the model's
log-probabilities at temperature 1 (before any truncation) of each step are returned too,
[B, N, vocab]: what an API's `top_logprobs` reports (meaningful where `mask` is 1; 0 at the
steps skipped once every row has ended). `return_steps=True` also returns the number of
one-token forwards run after the prefill (int32; N - 1 when some row never ends).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def filter_logits(logits: jax.Array, top_k: int = 0, top_p: float = 1.0) -> jax.Array:
  """logits [..., V] with every token outside the top-k / the top-p nucleus set to -inf.

  Top-k keeps the tokens whose logit is at least the k-th largest (ties at the boundary are
  kept). Top-p sorts the probabilities in decreasing order and keeps a token when the mass
  before it is below p, so the most likely token is always kept.
  """
  if top_k > 0 and top_k < logits.shape[-1]:
    kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if top_p < 1.0:
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs
    keep_sorted = before < top_p
    keep = jnp.zeros_like(keep_sorted).at[
        tuple(jnp.indices(order.shape)[:-1]) + (order,)].set(keep_sorted)
    logits = jnp.where(keep, logits, -jnp.inf)
  return logits


def per_row_keys(rng: jax.Array) -> bool:
  """Whether `rng` holds one key per row ([B] typed keys or [B, 2] raw keys), not one key."""
  typed = jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key)
  return jnp.ndim(rng) == (1 if typed else 2)


def _choose(logits: jax.Array, key: jax.Array, temperature: float, top_k: int, top_p: float,
            greedy: bool) -> jax.Array:
  """The next token [B] from logits [B, V]; `key` one key, or one per row ([B] / [B, 2])."""
  if greedy or temperature == 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = filter_logits(logits.astype(jnp.float32) / temperature, top_k, top_p)
  if per_row_keys(key):
    return jax.vmap(jax.random.categorical)(key, logits).astype(jnp.int32)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def check_settings(max_new_tokens: int, temperature: float, top_k: int, top_p: float) -> None:
  """Raises ValueError naming the setting that cannot be used."""
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}.")
  if temperature < 0:
    raise ValueError(f"temperature must be >= 0 (0: greedy), got {temperature}.")
  if top_k < 0:
    raise ValueError(f"top_k must be >= 0 (0: no top-k cut), got {top_k}.")
  if not 0.0 < top_p <= 1.0:
    raise ValueError(f"top_p must be in (0, 1] (1: no nucleus cut), got {top_p}.")


def check_prompts(prompts: Any, prompt_lengths: Any, pad_id: int = 0) -> None:
  """Raises ValueError unless `prompts` [B, P] are left-padded for `prompt_lengths` [B]: every
  length in [1, P], and in row b the P - prompt_lengths[b] positions before its prompt hold
  `pad_id` (a right-padded row has its prompt there instead). Reads the arrays on the host:
  for concrete arrays only (a traced one, under `jax.jit`, is not checked)."""
  if prompt_lengths is None or any(isinstance(x, jax.core.Tracer)
                                   for x in (prompts, prompt_lengths)):
    return
  prompts, lengths = np.asarray(prompts), np.asarray(prompt_lengths)
  batch, prompt_len = prompts.shape
  if lengths.shape != (batch,):
    raise ValueError(f"prompt_lengths has shape {lengths.shape}; the prompts [{batch}, "
                     f"{prompt_len}] need one length per row, ({batch},).")
  out_of_range = np.flatnonzero((lengths < 1) | (lengths > prompt_len))
  if out_of_range.size:
    b = int(out_of_range[0])
    raise ValueError(f"prompt_lengths[{b}] = {int(lengths[b])}: each prompt has 1 to "
                     f"{prompt_len} tokens (the prompts' width; BOS counts).")
  before = np.arange(prompt_len)[None, :] < (prompt_len - lengths)[:, None]
  wrong = before & (prompts != pad_id)
  rows = np.flatnonzero(wrong.any(axis=1))
  if rows.size:
    b = int(rows[0])
    pos = int(np.argmax(wrong[b]))
    raise ValueError(
        f"Prompt row {b} has prompt_lengths[{b}] = {int(lengths[b])} of {prompt_len} positions, "
        f"but position {pos}, before its prompt, holds token {int(prompts[b, pos])}, not "
        f"pad_id {pad_id} ({rows.size} such row(s)): left-pad (right-align) the prompts, row "
        "b's prompt in its last prompt_lengths[b] positions and pad_id before it.")


def sample(model: Any, variables: Any, prompts: jax.Array, *, max_new_tokens: int,
           rng: jax.Array, prompt_lengths: jax.Array | None = None, temperature: float = 1.0,
           top_k: int = 0, top_p: float = 1.0, greedy: bool = False, eos_id: int | None = None,
           pad_id: int = 0, return_logprobs: bool = False, return_steps: bool = False,
           max_tokens: jax.Array | None = None) -> Any:
  """Samples `max_new_tokens` after each prompt; see the module docstring.

  `model` is a `TransformerLM` (anything with its `init_cache` and `cache=` call), `variables`
  its variables. Everything but the arrays is static: bind them with `functools.partial`
  before `jax.jit`. Returns (tokens [B, P + N] int32, mask [B, P + N] float32), then with
  `return_logprobs` the log-probs [B, N, V] and with `return_steps` the forwards run.
  Concrete prompts with `prompt_lengths` must be left-padded with `pad_id` (`check_prompts`
  raises otherwise); traced ones (under jit) are the caller's to check. `rng`: one key, or
  one per row; `max_tokens` [B]: each row's own budget (None: `max_new_tokens` for all).
  """
  check_settings(max_new_tokens, temperature, top_k, top_p)
  check_prompts(prompts, prompt_lengths, pad_id)
  prompts = jnp.asarray(prompts).astype(jnp.int32)
  batch, prompt_len = prompts.shape
  if prompt_len < 1:
    raise ValueError("Prompts need at least one token (e.g. BOS).")
  total = prompt_len + max_new_tokens
  valid = jnp.ones((batch, total), bool)
  if prompt_lengths is not None:
    first = prompt_len - jnp.asarray(prompt_lengths, jnp.int32)  # The first real position.
    valid = jnp.arange(total)[None, :] >= first[:, None]
  cache = model.init_cache(batch, total, valid)
  logits, cache = model.apply(variables, prompts, cache=cache)
  last = logits[:, -1]

  def draw(last, done, t):
    """Token t from the logits `last` [B, V] of the position before it."""
    key = (jax.vmap(jax.random.fold_in, (0, None))(rng, t) if per_row_keys(rng)
           else jax.random.fold_in(rng, t))
    token = _choose(last, key, temperature, top_k, top_p, greedy)
    token = jnp.where(done, pad_id, token)
    keep = ~done
    if eos_id is not None:
      done = done | (token == eos_id)
    if max_tokens is not None:  # Row b has drawn t + 1 tokens.
      done = done | (t + 1 >= jnp.asarray(max_tokens, jnp.int32))
    logprobs = jax.nn.log_softmax(last.astype(jnp.float32), axis=-1) if return_logprobs else None
    return token, done, (token, keep, logprobs)

  def step(carry, t):
    token, cache, done = carry
    logits, cache = model.apply(variables, token[:, None], cache=cache)
    token, done, out = draw(logits[:, 0], done, t)
    return (token, cache, done), out

  def running(carry):
    t, _, _, done, _ = carry
    return (t < max_new_tokens) & ~jnp.all(done)

  def body(carry):
    t, token, cache, done, outs = carry
    (token, cache, done), out = step((token, cache, done), t)
    outs = jax.tree.map(lambda buf, x: jax.lax.dynamic_update_index_in_dim(buf, x, t, 0),
                        outs, out)
    return t + 1, token, cache, done, outs

  # The first token from the prefill's logits; the loop feeds each token and draws the next,
  # so no forward is spent on the last token. Steps never run keep what they would have
  # written for rows that have ended: `pad_id`, mask 0 (and log-probs 0).
  token, done, first = draw(last, jnp.zeros((batch,), bool), 0)
  outs = jax.tree.map(lambda x, fill: jnp.full((max_new_tokens, *x.shape), fill, x.dtype)
                      .at[0].set(x), first,
                      (pad_id, False, 0.0 if return_logprobs else None))
  t, _, _, _, (new, keep, logprobs) = jax.lax.while_loop(
      running, body, (jnp.int32(1), token, cache, done, outs))
  tokens = jnp.concatenate([prompts, new.T], axis=1)
  mask = jnp.concatenate([jnp.zeros((batch, prompt_len), jnp.float32),
                          keep.T.astype(jnp.float32)], axis=1)
  out = (tokens, mask)
  if return_logprobs:
    out += (jnp.moveaxis(logprobs, 0, 1),)
  if return_steps:
    out += (t - 1,)
  return out


# ------------------------------------------------------------------ completions as JSON records

# How `token_str` names the special tokens (`data.text.blackbox.SPECIAL_TOKENS` reads them back).
SPECIAL_NAMES = {"bos_id": "<bos>", "eos_id": "<eos>", "pad_id": "<pad>"}


def token_str(tokenizer: Any, token: int) -> str:
  """The text of one token id, as `tokens` and `top_logprobs` in a completion record name it:
  the tokenizer's decode of the id alone; `<bos>`, `<eos>`, `<pad>` for the special tokens; and
  for a byte that is not text on its own (part of a multi-byte UTF-8 character) `bytes:\\xNN`
  (as APIs write it), so distinct ids never share a name."""
  for field, name in SPECIAL_NAMES.items():
    if token == getattr(tokenizer, field, None):
      return name
  text = tokenizer.decode([token])
  if "\ufffd" in text and token < 256:
    return f"bytes:\\x{token:02x}"
  return text


def completion_records(tokenizer: Any, prompts: list[str], tokens: Any, mask: Any,
                       prompt_len: int, logprobs: Any = None, top_logprobs: int = 0
                       ) -> list[dict[str, Any]]:
  """One JSON-ready record per row: `{"prompt", "completion"}` and, with `top_logprobs` = K > 0
  (and the `logprobs` [B, N, V] of `sample`), `"tokens"` (each completion token's
  `token_str`) and `"top_logprobs"` (per completion token, the K most likely tokens at that
  position -> their log-probabilities, most likely first). The completion is the generated
  tokens up to EOS; `tokens` leave EOS out, so their bytes join to the completion."""
  tokens, mask = np.asarray(tokens), np.asarray(mask)
  records = []
  for b, prompt in enumerate(prompts):
    kept = np.flatnonzero(mask[b, prompt_len:] > 0)
    ids = tokens[b, prompt_len:][kept]
    record = {"prompt": prompt, "completion": tokenizer.decode(ids)}
    if top_logprobs > 0:
      if len(ids) and ids[-1] == getattr(tokenizer, "eos_id", None):  # EOS adds no text: the
        ids, kept = ids[:-1], kept[:-1]  # tokens join to the completion, as an API's do.
      record["tokens"] = [token_str(tokenizer, int(t)) for t in ids]
      rows = np.asarray(logprobs[b])[kept]
      top = np.argsort(-rows, axis=-1, kind="stable")[:, :top_logprobs]
      record["top_logprobs"] = [{token_str(tokenizer, int(t)): float(row[t]) for t in ids_}
                                for row, ids_ in zip(rows, top, strict=True)]
    records.append(record)
  return records
