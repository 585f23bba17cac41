"""Per-token values computed in chunks along the sequence: the reduction of every token loss.

A token-level term maps [B, L, V] logits (and whatever else it reads, laid out [B, L, ...]) to
one value per token [B, L], then takes the mean over the kept tokens (`token_mean`). With
`chunk_size = C > 0` the per-token values are computed C positions at a time in a `lax.scan`
whose body is rematerialised (`jax.checkpoint`, `chunked_per_token`), so the float32
log-softmaxes, probabilities and mixtures of the student and the teachers (each [B, L, V],
several per term) and their gradients exist for one chunk [B, C, V] at a time, forward and
backward. The models' logits themselves are inputs of the term and are not duplicated (the
chunks are `dynamic_slice`s of them). The result equals the unchunked one (`chunk_size = 0`)
to float rounding. A remainder of `L % C` positions is one more, smaller chunk.

Lazy logits (`config.fused_logits`: `Outputs.hidden` and `Outputs.head`): a term chunks the
hidden states [B, L, D] instead (`Outputs.token_inputs`) and computes each chunk's logits in
`fn` (`Outputs.logits_of`), so the rematerialised body holds the student's and the teachers'
logits [B, C, V] of one chunk, forward and backward, and the [B, L, V] logits exist nowhere.
Such a term chunks at `fused_chunk_size`: its own `chunk_size`, else the outputs' (the
config's), never the whole sequence at once.

Every input is zeroed at the dropped positions before any math reads it (`base.zero_dropped`,
per chunk), so what a model puts there (NaN or inf at padding) changes neither the value nor
the gradient, which is 0 there.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from distill_jax.common.outputs import Outputs
from distill_jax.losses.base import masked_mean, zero_dropped


def chunked_per_token(fn: Callable[[Any], jax.Array], arrays: Any, chunk_size: int,
                      mask: jax.Array | None = None) -> jax.Array:
  """Per-token values [B, L] of `fn`, computed `chunk_size` positions at a time.

  `arrays` is a pytree of arrays laid out [B, L, ...]; `fn` maps the same pytree with every
  leaf cut to [B, C, ...] (a run of C positions) to values [B, C] (or a pytree of them, e.g.
  a task's several metrics, each then [B, L]). Each chunk's forward is
  recomputed in the backward pass (`jax.checkpoint`), so only one chunk's intermediates are
  alive at a time. `chunk_size <= 0` or `>= L`: one call on the whole arrays.

  With `mask` [B, L] (1 kept, 0 dropped), `fn` sees every float leaf zeroed at the dropped
  positions (`base.zero_dropped`, per chunk, fused into `fn`'s first read: no extra pass over
  the logits), so a NaN or inf there (a model's logits at padding) gives finite values and a
  gradient of exactly 0 at those positions, not the NaN of `where(mask, f(NaN), 0)`. The
  values at dropped positions are then those of zero inputs, for `masked_mean` to drop.
  """
  if mask is not None:
    arrays, inner = (arrays, mask), fn
    fn = lambda pair: inner(jax.tree.map(lambda x: zero_dropped(x, pair[1]), pair[0]))
  length = jax.tree.leaves(arrays)[0].shape[1]
  if chunk_size <= 0 or chunk_size >= length:
    return fn(arrays)
  num_chunks, rest = divmod(length, chunk_size)

  # The slicing is inside the rematerialised function, so what the backward pass keeps of a
  # chunk is its index, not a copy of its slices (which, stacked, would be the whole arrays).
  @jax.checkpoint
  def chunk_values(arrays, i):
    return fn(jax.tree.map(
        lambda x: jax.lax.dynamic_slice_in_dim(x, i * chunk_size, chunk_size, axis=1), arrays))

  _, values = jax.lax.scan(lambda carry, i: (carry, chunk_values(arrays, i)), None,
                           jnp.arange(num_chunks))  # [n, B, C] each
  values = jax.tree.map(
      lambda v: jnp.moveaxis(v, 0, 1).reshape(v.shape[1], num_chunks * chunk_size), values)
  if rest:
    tail = jax.tree.map(lambda x: x[:, num_chunks * chunk_size:], arrays)
    values = jax.tree.map(lambda v, t: jnp.concatenate([v, t], axis=1), values,
                          jax.checkpoint(fn)(tail))
  return values


def token_mean(fn: Callable[[Any], jax.Array], arrays: Any, chunk_size: int,
               mask: jax.Array | None) -> jax.Array:
  """The mean over the kept tokens (`masked_mean`) of `fn`'s per-token values, computed in
  chunks on inputs zeroed at the dropped positions (`chunked_per_token` with `mask`): the
  reduction of every token-level divergence."""
  return masked_mean(chunked_per_token(fn, arrays, chunk_size, mask), mask)


def fused_chunk_size(chunk_size: int, student: Outputs,
                     teachers: Mapping[str, Outputs] | None = None) -> int:
  """The chunk length of a token term: its own `chunk_size` when set (> 0), else that of the
  lazy logits among the student's and the teachers' outputs (`Outputs.chunk_size`, from
  `config.fused_logits`), else 0 (the whole sequence at once)."""
  if chunk_size > 0:
    return chunk_size
  sizes = [o.chunk_size for o in (student, *(teachers or {}).values()) if o.lazy]
  return max(sizes, default=0)
