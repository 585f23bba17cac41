"""`Outputs`: what every model forward returns to the objective.

A language model's forward may leave its logits lazy (`models.forward.make_apply` with
`fused_chunk > 0`): `Outputs.hidden` holds the final hidden states [B, L, D] and
`Outputs.head` the output projection, so a token term computes the logits of C positions at a
time (`logits_of(hidden[:, i:i + C])` -> [B, C, V]) and the [B, L, V] logits never exist whole.
Code that reads positions chunk by chunk takes `token_inputs()` ([B, L, ...]: the hidden
states, or the logits when they are not lazy) and `logits_of(chunk)`, and so serves both.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Head:
  """A model's output projection as a pytree: `head(hidden [B, C, D]) -> logits [B, C, V]`
  float32.

  `params` (the variables the projection reads, e.g. the tied embedding; float32 as the
  model's, cast to the compute dtype by `fn` itself, so the gradient summed over chunks is
  float32) are the pytree's leaves, so `stop_gradient` (teachers) and gradients (the
  student's head) go through them as through any array; `fn(params, hidden)`, the vocabulary
  size `size` and the chunk length `chunk_size` (positions per chunk where a term does not set
  its own) are static.
  """

  params: Any
  fn: Callable[[Any, jax.Array], jax.Array] = dataclasses.field(metadata={"static": True})
  size: int = dataclasses.field(metadata={"static": True})
  chunk_size: int = dataclasses.field(metadata={"static": True})

  def __call__(self, hidden: jax.Array) -> jax.Array:
    return self.fn(self.params, hidden)


class Outputs(NamedTuple):
  """One model's forward on one batch.

  Attributes:
    logits: [B, K] unnormalised class scores ([B, L, V] per token for language models); None
      when they are lazy (`head` set).
    features: {name: array} of tapped intermediates (stable sown names such as 'stage2',
      'pool', or module paths); empty when no loss term asks for features.
    new_state: the model's updated mutable collections (e.g. {'batch_stats': ...}) after a
      training-mode forward; empty for eval-mode forwards and teachers.
    hidden: with lazy logits, the final hidden states [B, L, D] (the head's input); else None.
    head: with lazy logits, the output projection (`Head`); else None.
  """

  logits: jax.Array | None
  features: dict[str, jax.Array]
  new_state: dict[str, Any]
  hidden: jax.Array | None = None
  head: Head | None = None

  @property
  def lazy(self) -> bool:
    """Whether the logits are computed on demand from `hidden` (`head` set)."""
    return self.head is not None

  @property
  def vocab_size(self) -> int:
    """The last axis of the logits, lazy or not."""
    return self.head.size if self.lazy else self.logits.shape[-1]

  @property
  def chunk_size(self) -> int:
    """Positions per chunk that lazy logits ask for (0 when they are not lazy)."""
    return self.head.chunk_size if self.lazy else 0

  def token_inputs(self) -> jax.Array:
    """What to cut into chunks along positions: `hidden` [B, L, D] when lazy, else `logits`."""
    return self.hidden if self.lazy else self.logits

  def logits_of(self, chunk: jax.Array) -> jax.Array:
    """The logits [B, C, V] of a chunk of `token_inputs()` [B, C, ...] (the chunk itself when
    the logits are not lazy)."""
    return self.head(chunk) if self.lazy else chunk

  def whole_logits(self) -> jax.Array:
    """All the logits, computed at once when lazy: for small uses (samples), not training."""
    return self.logits_of(self.token_inputs())
