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

One scan for several terms (`TokenTerm`, `token_term_loss`, `token_terms_means`): a token
term says what it computes per token as a `TokenTerm` (the models whose logits it reads, its
other per-token inputs, its chunk length and the mask of its mean), and the objective runs the
fused terms of equal chunk length together: in one rematerialised scan, each chunk's logits of
each model (the student's and every live teacher's) are computed once and every term's
per-token values come from them, so the backward pass carries one gradient of the student's
head (a [V, D] array) rather than one per term, and computes each chunk's logits once.

Every input is zeroed at the dropped positions before any math reads it (`base.zero_dropped`,
per chunk), so what a model puts there (NaN or inf at padding) changes neither the value nor
the gradient, which is 0 there.
"""

from __future__ import annotations

import dataclasses
import functools
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


@dataclasses.dataclass(frozen=True)
class TokenTerm:
  """What a token-level term computes, for `token_terms_means` to compute it (with others).

  models: key -> the `Outputs` whose logits the term reads ('student', and 'teacher:NAME' for
    a teacher; terms that read the same key must read the same outputs).
  values: (logits of one chunk per key {key: [B, C, V]}, `extras` cut to the chunk) -> the
    per-token values [B, C].
  extras: a pytree of the term's other inputs laid out [B, L, ...] (targets, a cached top-k).
  chunk_size: the term's chunk length (`fused_chunk_size`).
  mask: [B, L] the positions its mean counts (None: all), and, evaluated alone, those whose
    inputs are zeroed (`chunked_per_token`).
  """

  models: Mapping[str, Outputs]
  values: Callable[[Mapping[str, jax.Array], Any], jax.Array]
  extras: Any
  chunk_size: int
  mask: jax.Array | None


def token_terms_means(terms: Mapping[str, TokenTerm], mask: jax.Array | None
                      ) -> dict[str, jax.Array]:
  """Each term's mean over its kept tokens {name: scalar}, all in one `chunked_per_token` scan.

  The terms must share their chunk length. Each chunk's logits of each model key are computed
  once (`Outputs.logits_of` on that chunk of `Outputs.token_inputs()`) and handed to every term
  that reads the key. The inputs are zeroed at the positions `mask` [B, L] drops (the batch's
  mask; a term whose own mask drops more counts only its own positions in its mean).
  """
  sizes = {t.chunk_size for t in terms.values()}
  if len(sizes) != 1:
    raise ValueError(f"token_terms_means: the terms {sorted(terms)} have chunk lengths "
                     f"{sorted(sizes)}; one scan needs one.")
  models: dict[str, Outputs] = {}
  for term in terms.values():
    for key, outputs in term.models.items():
      if models.setdefault(key, outputs) is not outputs:
        raise ValueError(f"token_terms_means: the terms read different outputs as {key!r}.")
  arrays = {"models": {k: o.token_inputs() for k, o in models.items()},
            "extras": {n: t.extras for n, t in terms.items()}}

  def per_token(chunk):
    logits = {k: models[k].logits_of(x) for k, x in chunk["models"].items()}
    return {n: t.values({k: logits[k] for k in t.models}, chunk["extras"][n])
            for n, t in terms.items()}

  values = chunked_per_token(per_token, arrays, sizes.pop(), mask)
  return {n: masked_mean(values[n], t.mask) for n, t in terms.items()}


def token_term_loss(term_fn: Callable[..., TokenTerm]) -> Callable[..., jax.Array]:
  """A token loss from `term_fn` (the loss's signature, returning its `TokenTerm`): the loss
  is the term's mean computed alone (its inputs zeroed where its own mask drops them), and
  `loss.token_term` is `term_fn`, which the objective calls to run several terms in one scan
  (`token_terms_means`)."""

  @functools.wraps(term_fn)
  def loss(*args: Any, **kwargs: Any) -> jax.Array:
    term = term_fn(*args, **kwargs)
    return token_terms_means({"term": term}, term.mask)["term"]

  loss.token_term = term_fn
  return loss
