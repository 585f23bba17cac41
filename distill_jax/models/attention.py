"""Scaled dot-product attention for `transformer_lm`: the implementations and their choice.

Every function takes queries q [B, T, N, D] and keys/values k, v [B, S, K, D] with K dividing N
(grouped-query attention: query head h reads key/value head h // (N / K)), and computes

    out[b, t, h] = sum_s softmax_s(q[b, t, h] . k[b, s, h // G] / sqrt(D), allowed) v[b, s, h // G]

with `allowed` [B or 1, T, S] (query t may attend to key s). Three ways
(`attention_implementation`):

- None/'auto', 'xla', 'cudnn': `jax.nn.dot_product_attention` (`attend`), JAX's own, cuDNN's
  fused flash attention on NVIDIA GPUs. XLA's implementation (CPU, TPU, GPU without cuDNN)
  writes out the float32 scores [B, N, T, S], and keeps them for the backward pass: memory
  that grows as L^2 (512 MiB per layer at 32 heads and L = 2048, 8 GiB at L = 8192).
- 'chunked': `chunked_attention`, memory-efficient attention (Rabe & Staats 2021, "Self-attention
  does not need O(n^2) memory"): a `lax.scan` over blocks of `block_size` queries, each block's
  scores [B, N, Cq, S] softmaxed in float32 (stable: the row maximum subtracted) and
  rematerialised (`jax.checkpoint`), so the forward and the backward hold one block's scores
  at a time, [B, N, block_size, S]: linear in L, on every backend. K/V keep their K heads (the
  query heads are grouped, not the keys copied).
- `explicit_attention`: the probabilities written out and returned, for a loss that taps them
  (`token_attention_kl`); `transformer_lm` selects it itself (`attention_probs`).

All three give the same numbers to float32 rounding (tests/test_attention.py: 1e-5, value and
gradient). A query row with no allowed key (a left-padded prompt's padding while decoding)
gets a finite output: the explicit and chunked paths fill the disallowed scores with float32's
lowest value, as XLA's does, so such a row averages all values.
"""

from __future__ import annotations

import warnings
from typing import Any

import jax
import jax.numpy as jnp

ATTENTION_IMPLEMENTATIONS = ("auto", "xla", "cudnn", "chunked")


def check_attention_implementation(value: Any, block_size: int = 1) -> None:
  """Raises ValueError naming `attention_implementation` unless it is None or one of
  ATTENTION_IMPLEMENTATIONS, and naming `attention_block_size` unless it is positive."""
  if value is not None and value not in ATTENTION_IMPLEMENTATIONS:
    raise ValueError(f"transformer_lm: attention_implementation {value!r} is not one of "
                     f"{[None, *ATTENTION_IMPLEMENTATIONS]} (None and 'auto' let JAX choose; "
                     "'cudnn', cuDNN's fused attention, needs an NVIDIA GPU; 'chunked' is "
                     "memory-efficient attention, linear in the length on any backend).")
  if not isinstance(block_size, int) or block_size < 1:
    raise ValueError(f"transformer_lm: attention_block_size {block_size!r} must be a positive "
                     "number of queries per block (e.g. 512).")


def resolve_implementation(implementation: str | None, dtype: Any) -> str | None:
  """`jax.nn.dot_product_attention`'s `implementation` for `attention_implementation` and the
  activations' `dtype`: 'auto' is None (JAX chooses); 'cudnn' stays 'cudnn' for bfloat16 and
  float16 and becomes 'xla' (with a warning) for float32, which cuDNN's fused attention does
  not take (e.g. sampling with a bfloat16-trained student's float32 parameters). 'cudnn'
  without a GPU raises ValueError naming the setting. ('chunked' is not JAX's: `attend`
  dispatches it before asking.)"""
  if implementation == "auto":
    return None
  if implementation != "cudnn":
    return implementation
  if jax.default_backend() != "gpu":
    raise ValueError(f"transformer_lm: attention_implementation 'cudnn' needs an NVIDIA GPU, "
                     f"but JAX's backend is {jax.default_backend()!r}: use None or 'xla'.")
  if jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
    return "cudnn"
  warnings.warn(f"transformer_lm: attention_implementation 'cudnn' takes bfloat16 or float16 "
                f"activations; these are {jnp.dtype(dtype).name}, so XLA's attention runs "
                "(set the compute dtype, e.g. --config.dtype=bfloat16, for cuDNN's).",
                stacklevel=2)
  return "xla"


def explicit_attention(q: jax.Array, k: jax.Array, v: jax.Array, allowed: jax.Array
                       ) -> tuple[jax.Array, jax.Array]:
  """Attention with its probabilities written out: (out [B, T, N, D], probs [B, N, T, S]).

  Shapes as the module docstring; allowed [B or 1, T, S]. The scores are computed in the
  inputs' dtype and softmaxed in float32; the probabilities are cast back to the values' dtype
  for the weighted sum. Costs float32 [B, N, T, S] twice over (scores and probabilities) and
  copies K/V per query head: the path for a loss that taps the probabilities
  (`token_attention_kl`), not for speed.
  """
  group = q.shape[2] // k.shape[2]
  # [B, S, K, D] -> [B, S, K * group, D]: head h reads kv head h // group.
  k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
  scores = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / jnp.sqrt(q.shape[-1])
  scores = jnp.where(allowed[:, None], scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1)
  return jnp.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), v), probs


def _block_attention(q: jax.Array, k: jax.Array, v: jax.Array, allowed: jax.Array
                     ) -> jax.Array:
  """One block of queries q [B, C, N, D] against all keys k, v [B, S, K, D] with allowed
  [B or 1, C, S]: out [B, C, N, D]. The query heads are grouped [B, C, K, G, D] so each reads
  its key/value head in place; the scores [B, K, G, C, S] are float32 (accumulated so from
  any input dtype), the probabilities cast to the values' dtype for the weighted sum, as
  `explicit_attention` does."""
  b, c, n, d = q.shape
  kv = k.shape[2]
  grouped = q.reshape(b, c, kv, n // kv, d)
  scores = jnp.einsum("bckgd,bskd->bkgcs", grouped, k, preferred_element_type=jnp.float32)
  scores = scores / jnp.sqrt(jnp.float32(d))
  scores = jnp.where(allowed[:, None, None], scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1)
  out = jnp.einsum("bkgcs,bskd->bckgd", probs.astype(v.dtype), v)
  return out.reshape(b, c, n, d)


def chunked_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None,
                      causal: bool, block_size: int = 512) -> jax.Array:
  """Memory-efficient attention (see the module docstring): out [B, T, N, D].

  `mask` [B or 1, T, S] (None: all True) is which keys each query may see; with `causal`
  (T == S, the training forward) query t also sees only keys s <= t. The queries go
  `block_size` at a time through a `lax.scan` whose body is rematerialised, so the scores
  [B, N, block_size, S] of one block exist at a time, forward and backward; a remainder of
  T % block_size queries is one smaller block; `block_size >= T` is one block (no scan).
  """
  length, keys = q.shape[1], k.shape[1]
  if mask is None:
    mask = jnp.ones((1, length, keys), bool)

  def allowed_at(start: Any, size: int) -> jax.Array:
    rows = jax.lax.dynamic_slice_in_dim(mask, start, size, axis=1)
    if causal:
      rows = rows & (jnp.arange(keys)[None, :] <= start + jnp.arange(size)[:, None])[None]
    return rows

  @jax.checkpoint
  def block(q, k, v, mask_start):
    start, size = mask_start, q.shape[1]
    return _block_attention(q, k, v, allowed_at(start, size))

  if block_size >= length:
    return block(q, k, v, 0)
  num_blocks, rest = divmod(length, block_size)

  # The slicing is inside the rematerialised body, so the backward pass keeps a block's index,
  # not a copy of its queries.
  @jax.checkpoint
  def scanned(q, k, v, i):
    start = i * block_size
    query = jax.lax.dynamic_slice_in_dim(q, start, block_size, axis=1)
    return _block_attention(query, k, v, allowed_at(start, block_size))

  _, outs = jax.lax.scan(lambda carry, i: (carry, scanned(q, k, v, i)), None,
                         jnp.arange(num_blocks))  # [n, B, C, N, D]
  out = jnp.moveaxis(outs, 0, 1).reshape(q.shape[0], num_blocks * block_size, *q.shape[2:])
  if rest:
    start = num_blocks * block_size
    out = jnp.concatenate([out, block(q[:, start:], k, v, start)], axis=1)
  return out


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None, causal: bool,
           implementation: str | None = None, block_size: int = 512) -> jax.Array:
  """Attention without its probabilities: out [B, T, N, D] by `implementation`
  ('chunked': `chunked_attention` with `block_size`; otherwise `jax.nn.dot_product_attention`
  with `resolve_implementation`'s choice). `mask` [B or 1, T, S] or None; `causal` adds
  s <= t (T == S)."""
  if implementation == "chunked":
    return chunked_attention(q, k, v, mask, causal, block_size)
  return jax.nn.dot_product_attention(
      q, k, v, mask=None if mask is None else mask[:, None], is_causal=causal,
      implementation=resolve_implementation(implementation, q.dtype))
