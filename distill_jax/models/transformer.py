"""A decoder-only Transformer language model (Flax Linen), sized from the config.

Registered as `transformer_lm`: `(num_classes, **kwargs)`, where `num_classes` is the vocabulary
(259 for the byte-level tokenizer: 256 bytes, BOS, EOS, pad). The architecture is the common
modern one (Llama-style): token embedding; `num_layers` pre-norm blocks, each
`x + Attention(RMSNorm(x))` then `x + SwiGLU(RMSNorm(x))`; a final RMSNorm; logits by the
transposed embedding (`tie_embeddings`) or a separate `head`. Attention is causal, with rotary
position embeddings (RoPE, Su et al. 2021) on queries and keys and grouped-query attention
(`num_kv_heads` key/value heads shared by `num_heads / num_kv_heads` query heads each; equal
counts give multi-head attention, one gives multi-query attention). No biases, no dropout.

Attention (models/attention.py) runs through `jax.nn.dot_product_attention`
(`attention_implementation`: None/'auto', 'xla' or 'cudnn', the fused flash-attention kernel on
NVIDIA GPUs) or, with 'chunked', memory-efficient attention `attention_block_size` queries at a
time (memory linear in L on any backend); causal and the document mask, K/V with their own head
count (no per-query-head copies). Only when a loss taps `block{i}/attn/probs` does the model
write the probabilities out (`attention_probs`, set by `models.forward.make_apply` through
`for_features`); every path gives the same numbers.

Packed documents: with `bos_id` set, a position attends only to positions of its own document,
a document being what lies between one BOS token and the next (a row may hold several). RoPE's
positions are the row's positions: attention depends only on the distance between two
tokens, so a document's numbers do not depend on where in the row it was packed.

Input: token ids [B, L] (any numeric dtype; cast to int32, so the framework's float example
inputs work) with `L <= context`; a longer sequence is refused with both numbers. Output:
float32 logits [B, L, vocab].

Decoding (`distill_jax.tasks.language_model.generate`): `init_cache` makes an explicit key/value
cache pytree that `__call__(tokens, cache=cache)` takes and returns updated, so a prompt is
processed once and each new token costs one position's forward (the logits equal the full
forward's).

Features (the framework's mechanism: `sow` into 'intermediates', tapped by name or path):
`hidden0` (the embeddings) and `hidden{i}` (the residual stream after block i, i = 1..
num_layers), each [B, L, width], and per block `block{i-1}/attn/probs`, the attention
probabilities [B, num_heads, L, L] (sown only with `attention_probs`; see above). Modules:
`embed`, `block0`.. (each `attn_norm`, `attn` with `query`, `key`, `value`, `out`; `mlp_norm`,
`mlp` with `gate`, `up`, `down`), `final_norm`, and `head` when untied.

Tensor parallelism (the mesh's `tensor` axis, `train/parallel.py`): `TENSOR_RULES` below says
which axis of each parameter is split over it, Megatron-style, and `TransformerLM.tensor_rules`
checks that the model's sizes split.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from distill_jax.models import register_model
from distill_jax.models.attention import attend, check_attention_implementation, explicit_attention

# Initialisers: normal(0.02) for the embedding and every projection (GPT-2's and Llama's).
_init = nn.initializers.normal(stddev=0.02)


ROPE_SCALINGS = ("linear", "llama3")

# Megatron-style tensor parallelism (Shoeybi et al. 2019): parameter path (a regular expression
# matched against the end of the '/'-joined path in the model's variables) -> the axis of the
# array split over the mesh's `tensor` axis. Each device of a tensor group holds whole
# attention heads and whole MLP hidden units: q/k/v (and their biases) and gate/up split by
# their outputs, out and down by their inputs, so each block's two halves end in one
# reduction over the group; the embedding and the head split by vocabulary. What is not listed
# (the RMSNorm scales, over the width) is whole on every device of the group.
TENSOR_RULES: tuple[tuple[str, int], ...] = (
    (r"embed/embedding", 0),  # [vocab, width]
    (r"attn/(query|key|value)/kernel", 1),  # [width, heads, head_dim]
    (r"attn/(query|key|value)/bias", 0),  # [heads, head_dim]
    (r"attn/out/kernel", 0),  # [heads, head_dim, width]
    (r"mlp/(gate|up)/kernel", 1),  # [width, mlp_dim]
    (r"mlp/down/kernel", 0),  # [mlp_dim, width]
    (r"head/kernel", 1),  # [width, vocab]
)
VOCAB_RULES = (r"embed/embedding", r"head/kernel")  # The rules that split the vocabulary.


def rope_frequencies(dim: int, base: float = 10000.0, scaling: Any = None) -> jax.Array:
  """RoPE's D/2 angular frequencies `base^(-2j/D)` [D/2], float32, optionally rescaled.

  `scaling` (None: none) is a mapping (or (key, value) pairs) with `type` in ROPE_SCALINGS:
  'linear' (`factor`): every frequency divided by `factor` (positions interpolated);
  'llama3' (`factor`, `low_freq_factor`, `high_freq_factor`,
  `original_max_position_embeddings` = N): wavelengths longer than N / low_freq_factor are
  stretched by `factor`, shorter than N / high_freq_factor kept, those between interpolated
  linearly in N / wavelength (Llama 3.1's long-context recipe).
  """
  freqs = base ** (-jnp.arange(dim // 2, dtype=jnp.float32) * 2.0 / dim)
  if not scaling:
    return freqs
  scaling = dict(scaling.items() if hasattr(scaling, "items") else scaling)
  kind, factor = scaling.get("type"), float(scaling.get("factor", 1.0))
  if kind == "linear":
    return freqs / factor
  if kind == "llama3":
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    original = float(scaling["original_max_position_embeddings"])
    wavelength = 2 * jnp.pi / freqs
    smooth = (original / wavelength - low) / (high - low)
    mixed = (1 - smooth) * freqs / factor + smooth * freqs
    return jnp.where(wavelength < original / high, freqs,
                     jnp.where(wavelength > original / low, freqs / factor, mixed))
  raise ValueError(f"transformer_lm: rope_scaling type {kind!r} is not supported; the "
                   f"supported types are {list(ROPE_SCALINGS)} (or None).")


def rope(x: jax.Array, positions: jax.Array, base: float = 10000.0,
         scaling: Any = None) -> jax.Array:
  """Rotary position embedding of `x` [B, L, H, D] at integer `positions` [L] (D even).

  The first and second halves of the head dimension form D/2 pairs; pair j is rotated by the
  angle `position * freqs[j]`, `freqs = rope_frequencies(D, base, scaling)` (the "rotate half"
  layout, the one Hugging Face's Llama-family models use).
  """
  half = x.shape[-1] // 2
  freqs = rope_frequencies(x.shape[-1], base, scaling)
  angles = positions.astype(jnp.float32)[:, None] * freqs[None, :]  # [L, D/2]
  sin, cos = jnp.sin(angles)[None, :, None, :], jnp.cos(angles)[None, :, None, :]
  x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


class Attention(nn.Module):
  """Causal grouped-query self-attention with RoPE.

  By `models.attention.attend` (`implementation`: None/'auto' lets JAX choose, 'xla', 'cudnn':
  `jax.nn.dot_product_attention`; 'chunked': `block_size` queries at a time): K/V keep their
  `num_kv_heads` heads (no copies per query head), the scores accumulate in float32 whatever
  the inputs' dtype, and a fused kernel (cuDNN's flash attention) never materialises them, the
  chunked path one block of them at a time. With `probs=True` the probabilities are written out
  (`explicit_attention`) and sown as `probs` [B, num_heads, L, L] for attention KD.
  """

  num_heads: int
  num_kv_heads: int
  head_dim: int
  rope_base: float = 10000.0
  qkv_bias: bool = False  # Biases on the query, key and value projections (Qwen2).
  rope_scaling: Any = None  # See `rope_frequencies`.
  implementation: str | None = None  # models.attention.attend's; 'auto' = None.
  block_size: int = 512  # Queries per block of the 'chunked' implementation.
  probs: bool = False  # The explicit path, sowing the probabilities.

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None,
               cache: dict[str, jax.Array] | None = None, index: jax.Array | None = None) -> Any:
    """x [B, L, D] -> [B, L, D]; `mask` [B or 1, L, L] (None: all True): which earlier
    positions a query may see besides causality (the document mask), causality being applied
    on top.

    Decoding (`cache` = {'k', 'v'}, each [B, S, num_kv_heads, head_dim]): x holds the L new
    tokens at positions `index`..`index + L - 1`; their keys and values are written into the
    cache there, the queries attend over all S cached positions, `mask` [B, L, S] is then the
    whole rule (causality by position included: the queries are offset), and the call
    returns (out, new cache).
    """
    b, length, width = x.shape
    dense = lambda n, name: nn.DenseGeneral((n, self.head_dim), use_bias=self.qkv_bias,
                                            kernel_init=_init, name=name)
    q = dense(self.num_heads, "query")(x)
    k = dense(self.num_kv_heads, "key")(x)
    v = dense(self.num_kv_heads, "value")(x)
    positions = jnp.arange(length) + (0 if cache is None else index)
    q = rope(q, positions, self.rope_base, self.rope_scaling)
    k = rope(k, positions, self.rope_base, self.rope_scaling)
    if cache is not None:
      start = (0, index, 0, 0)
      cache = {"k": jax.lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype), start),
               "v": jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype), start)}
      k, v = cache["k"].astype(q.dtype), cache["v"].astype(q.dtype)
    causal = cache is None
    if self.probs:
      allowed = jnp.ones((1, length, k.shape[1]), bool) if mask is None else mask
      if causal:
        allowed = allowed & jnp.tril(jnp.ones((length, length), bool))[None]
      out, probs = explicit_attention(q, k, v, allowed)
      if cache is None:
        self.sow("intermediates", "probs", probs)
    else:
      out = attend(q, k, v, mask, causal, self.implementation, self.block_size)
    out = nn.DenseGeneral(width, axis=(-2, -1), use_bias=False, kernel_init=_init,
                          name="out")(out)
    return out if cache is None else (out, cache)


class SwiGLU(nn.Module):
  """`down(silu(gate(x)) * up(x))` with hidden width `mlp_dim` (Shazeer 2020)."""

  mlp_dim: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    dense = lambda n, name: nn.Dense(n, use_bias=False, kernel_init=_init, name=name)
    hidden = nn.silu(dense(self.mlp_dim, "gate")(x)) * dense(self.mlp_dim, "up")(x)
    return dense(x.shape[-1], "down")(hidden)


class Block(nn.Module):
  """One pre-norm Transformer block: attention and MLP, each around a residual."""

  num_heads: int
  num_kv_heads: int
  head_dim: int
  mlp_dim: int
  rope_base: float = 10000.0
  qkv_bias: bool = False
  rope_scaling: Any = None
  norm_eps: float = 1e-6
  attention_implementation: str | None = None
  attention_block_size: int = 512
  attention_probs: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None,
               cache: dict[str, jax.Array] | None = None, index: jax.Array | None = None) -> Any:
    """x [B, L, D] -> [B, L, D]; with a `cache` (decoding; see `Attention`): (x, new cache)."""
    norm = lambda name: nn.RMSNorm(epsilon=self.norm_eps, name=name)
    attn = Attention(self.num_heads, self.num_kv_heads, self.head_dim, self.rope_base,
                     qkv_bias=self.qkv_bias, rope_scaling=self.rope_scaling,
                     implementation=self.attention_implementation,
                     block_size=self.attention_block_size, probs=self.attention_probs,
                     name="attn")
    h = attn(norm("attn_norm")(x), mask, cache, index)
    h, cache = (h, None) if cache is None else h
    x = x + h
    x = x + SwiGLU(self.mlp_dim, name="mlp")(norm("mlp_norm")(x))
    return x if cache is None else (x, cache)


class TransformerLM(nn.Module):
  """Decoder-only Transformer LM; see the module docstring.

  Attributes:
    num_classes: the vocabulary size.
    num_layers, width, num_heads, num_kv_heads, mlp_dim: sizes; `width` must split into
      `num_heads` heads of even size, and `num_kv_heads` must divide `num_heads`
      (`num_kv_heads=0`: as many as `num_heads`). `mlp_dim=0`: `4 * width`.
    context: the longest sequence the model accepts.
    tie_embeddings: logits by the transposed token embedding (no separate head).
    bos_id: the token that starts a document; attention does not cross documents. None: a row
      is one sequence.
    rope_base: RoPE's base wavelength.
    rope_scaling: None, or RoPE's frequency rescaling for long contexts, a mapping with
      `type` 'linear' or 'llama3' and that type's numbers (`rope_frequencies`).
    qkv_bias: biases on the query, key and value projections (Qwen2 has them).
    norm_eps: every RMSNorm's epsilon.
    attention_implementation: `jax.nn.dot_product_attention`'s `implementation`: None or
      'auto' (JAX chooses; XLA in JAX 0.10, on GPUs too), 'xla', or 'cudnn' (cuDNN's fused
      flash attention: an NVIDIA GPU, refused elsewhere, and bfloat16/float16 activations,
      e.g. `config.dtype='bfloat16'`; float32 calls, such as sampling with the float32
      parameters, fall back to XLA's with a warning; `resolve_implementation`); or
      'chunked' (`models.attention.chunked_attention`: memory-efficient attention whose
      float32 scores exist one block of `attention_block_size` queries at a time, forward and
      backward, on any backend: for long contexts on CPU/TPU, where XLA's writes out
      [B, num_heads, L, L]).
    attention_block_size: queries per block of the 'chunked' implementation (ignored by the
      others).
    attention_probs: compute attention with its probabilities written out
      (`explicit_attention`) and sow them as `block{i}/attn/probs`. Set automatically by
      `models.forward.make_apply` (through `for_features`) when a feature names them; the
      same numbers otherwise, at the cost of float32 [B, num_heads, L, L] per layer.
    bn_axis_name: unused (no BatchNorm); present so every model accepts it.
    remat: recompute each block's activations in the backward pass (`nn.remat`).
  """

  num_classes: int
  num_layers: int = 2
  width: int = 64
  num_heads: int = 4
  num_kv_heads: int = 0
  mlp_dim: int = 0
  context: int = 128
  tie_embeddings: bool = True
  bos_id: int | None = None
  rope_base: float = 10000.0
  rope_scaling: Any = None
  qkv_bias: bool = False
  norm_eps: float = 1e-6
  attention_implementation: str | None = None
  attention_block_size: int = 512
  attention_probs: bool = False
  bn_axis_name: str | None = None
  remat: bool = False

  def for_features(self, features: Any = None) -> TransformerLM:
    """This model as it must run to sow `features` (names or paths; None: every feature it
    can sow, for listing them): with `attention_probs` when one of them is a block's
    `attn/probs`, itself otherwise."""
    wants = features is None or any(str(f).endswith("attn/probs") for f in features)
    return self.clone(attention_probs=True) if wants and not self.attention_probs else self

  def check(self) -> None:
    """Raises ValueError naming the setting when the sizes do not fit together."""
    kv = self.num_kv_heads or self.num_heads
    if self.num_heads < 1 or self.width % self.num_heads or (self.width // self.num_heads) % 2:
      raise ValueError(f"transformer_lm: width {self.width} must split into num_heads "
                       f"{self.num_heads} heads of even size (RoPE rotates pairs).")
    if kv < 1 or self.num_heads % kv:
      raise ValueError(f"transformer_lm: num_kv_heads {self.num_kv_heads} must divide "
                       f"num_heads {self.num_heads} (grouped-query attention).")
    if self.rope_scaling:
      rope_frequencies(2, self.rope_base, self.rope_scaling)  # Refuses an unknown type.
    check_attention_implementation(self.attention_implementation, self.attention_block_size)
    if self.num_layers < 1 or self.context < 1:
      raise ValueError(f"transformer_lm: num_layers ({self.num_layers}) and context "
                       f"({self.context}) must be positive.")

  def tensor_rules(self, size: int) -> tuple[tuple[str, int], ...]:
    """`TENSOR_RULES` for a `tensor` mesh axis of `size` devices (see the table).

    Raises ValueError naming the sizes when `num_heads`, `num_kv_heads` (grouped-query
    attention keeps whole key/value heads on each device) or the MLP width do not split into
    `size`. A vocabulary that does not split (the byte tokenizer's 259) leaves the embedding
    and head whole over `tensor` rather than failing: Megatron pads the vocabulary instead,
    which would change the checkpoint's shapes.
    """
    kv, mlp_dim = self.num_kv_heads or self.num_heads, self.mlp_dim or 4 * self.width
    for name, value in (("num_heads", self.num_heads), ("num_kv_heads", kv),
                        ("mlp_dim", mlp_dim)):
      if value % size:
        raise ValueError(
            f"transformer_lm: {name} {value} does not split over a tensor axis of {size} "
            "devices (each device holds whole attention heads, key/value heads and MLP "
            f"units); choose a tensor size that divides num_heads {self.num_heads}, "
            f"num_kv_heads {kv} and mlp_dim {mlp_dim}.")
    if self.num_classes % size:
      return tuple(rule for rule in TENSOR_RULES if rule[0] not in VOCAB_RULES)
    return TENSOR_RULES

  def init_cache(self, batch: int, length: int, valid: jax.Array | None = None,
                 dtype: Any = jnp.float32) -> dict[str, Any]:
    """An empty decoding cache for `batch` rows of up to `length` (<= context) tokens.

    `valid` [batch, length] (default all True) marks the positions that may be attended to:
    False at the left padding of prompts shorter than the longest (their tokens are still
    fed, so every row advances together, but no query ever sees them). Keys: `index` (the
    next position to write), `valid`, `document` (the document number of each written
    position, for `bos_id`) and `layers` (per block, keys and values [batch, length,
    num_kv_heads, head_dim]).
    """
    if length > self.context:
      raise ValueError(f"A decoding cache of {length} tokens is longer than the model's context "
                       f"of {self.context}: generate fewer tokens or use shorter prompts.")
    kv, head_dim = self.num_kv_heads or self.num_heads, self.width // self.num_heads
    zeros = lambda: jnp.zeros((batch, length, kv, head_dim), dtype)
    return {"index": jnp.zeros((), jnp.int32),
            "valid": jnp.ones((batch, length), bool) if valid is None else valid.astype(bool),
            "document": jnp.zeros((batch, length), jnp.int32),
            "layers": tuple({"k": zeros(), "v": zeros()} for _ in range(self.num_layers))}

  def head(self, hidden: jax.Array) -> jax.Array:
    """The output projection alone: final hidden states [B, C, width] (after `final_norm`, as
    `__call__(..., return_hidden=True)` gives them) -> logits [B, C, vocab] float32.

    Reads the parameters `__call__` creates (the tied `embed` table or the `head` kernel), so
    a loss can compute the logits of a few positions at a time (`module.apply(variables,
    hidden, method='head')`) and the same numbers as the full forward's.
    """
    params = self.variables["params"]
    # hidden [..., D] against the table [V, D] (tied: nn.Embed.attend's product, contracted in
    # place rather than through a transposed copy, which a loop over chunks would keep) or the
    # kernel [D, V] (nn.Dense without bias).
    weight, axis = ((params["embed"]["embedding"], 1) if self.tie_embeddings
                    else (params["head"]["kernel"], 0))
    logits = jax.lax.dot_general(hidden, weight, (((hidden.ndim - 1,), (axis,)), ((), ())))
    return logits.astype(jnp.float32)

  @nn.compact
  def __call__(self, tokens: jax.Array, train: bool = False,
               cache: dict[str, Any] | None = None, return_hidden: bool = False) -> Any:
    """tokens [B, L] -> logits [B, L, vocab].

    `return_hidden=True` (training forward only, no cache): the final hidden states
    [B, L, width] after `final_norm` instead of the logits, which `head` projects; the
    [B, L, vocab] logits are then never computed here.

    Decoding: with a `cache` (`init_cache`), `tokens` are the next L tokens of every row, at
    positions `cache['index']`.. (a prompt's prefill, then one token at a time); they attend
    to themselves and to every valid cached position before them, and the call returns
    (logits, new cache). The logits equal the full forward's at those positions.
    """
    del train  # No dropout: train and eval are the same function.
    self.check()
    if tokens.ndim != 2:
      raise ValueError(f"transformer_lm takes token ids [batch, length], got shape "
                       f"{tokens.shape}.")
    if return_hidden and cache is not None:
      raise ValueError("transformer_lm: return_hidden is for the training forward; decoding "
                       "with a cache returns logits.")
    length = tokens.shape[1]
    if length > self.context:
      raise ValueError(f"A sequence of {length} tokens is longer than the model's context of "
                       f"{self.context}: shorten data.seq_len or raise the model's context.")
    tokens = tokens.astype(jnp.int32)
    if cache is None:
      index, allowed = None, None  # Causal (applied by the attention) within documents:
      if self.bos_id is not None:
        document = jnp.cumsum(tokens == self.bos_id, axis=1)
        allowed = document[:, :, None] == document[:, None, :]
    else:
      index, size = cache["index"], cache["valid"].shape[1]
      query = index + jnp.arange(length)
      allowed = cache["valid"][:, None, :] & (jnp.arange(size)[None, None, :] <= query[:, None])
      if self.bos_id is not None:
        last = jax.lax.dynamic_index_in_dim(cache["document"], jnp.maximum(index - 1, 0), axis=1,
                                            keepdims=False)
        new = jnp.where(index > 0, last, 0)[:, None] + jnp.cumsum(tokens == self.bos_id, axis=1)
        document = jax.lax.dynamic_update_slice(cache["document"], new, (0, index))
        allowed = allowed & (document[:, None, :] == new[:, :, None])
        cache = {**cache, "document": document}
      layer_caches = []
    embed = nn.Embed(self.num_classes, self.width, embedding_init=_init, name="embed")
    x = embed(tokens)
    self.sow("intermediates", "hidden0", x)
    block = nn.remat(Block) if self.remat else Block
    kv = self.num_kv_heads or self.num_heads
    for i in range(self.num_layers):
      layer = block(self.num_heads, kv, self.width // self.num_heads,
                    self.mlp_dim or 4 * self.width, self.rope_base, qkv_bias=self.qkv_bias,
                    rope_scaling=self.rope_scaling, norm_eps=self.norm_eps,
                    attention_implementation=self.attention_implementation,
                    attention_block_size=self.attention_block_size,
                    attention_probs=self.attention_probs, name=f"block{i}")
      if cache is None:
        x = layer(x, allowed)
      else:
        x, layer_cache = layer(x, allowed, cache["layers"][i], index)
        layer_caches.append(layer_cache)
      self.sow("intermediates", f"hidden{i + 1}", x)
    x = nn.RMSNorm(epsilon=self.norm_eps, name="final_norm")(x)
    if return_hidden and not self.is_initializing():
      return x
    if self.tie_embeddings:
      logits = embed.attend(x)
    else:
      logits = nn.Dense(self.num_classes, use_bias=False, kernel_init=_init, name="head")(x)
    if cache is None:
      return logits.astype(jnp.float32)
    cache = {**cache, "index": index + length, "layers": tuple(layer_caches)}
    return logits.astype(jnp.float32), cache


@register_model("transformer_lm")
def transformer_lm(num_classes: int, **kwargs: Any) -> TransformerLM:
  """Decoder-only Transformer LM over a vocabulary of `num_classes` tokens."""
  return TransformerLM(num_classes=num_classes, **kwargs)
