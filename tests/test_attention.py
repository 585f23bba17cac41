"""transformer_lm's attention through `jax.nn.dot_product_attention` and the chunked
(memory-efficient) path against the explicit probabilities (and all against NumPy): logits and
gradients for MHA and GQA with several documents per row, cached decoding with left padding,
greedy tokens; tapping `attn/probs` selects the explicit path; an unknown implementation or a
bad block size is refused naming the setting."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distill_jax.models import build_model
from distill_jax.models.attention import (
  chunked_attention,
  explicit_attention,
  resolve_implementation,
)
from distill_jax.models.forward import list_features, make_apply
from distill_jax.models.transformer import rope
from distill_jax.tasks.language_model import generate

VOCAB, BOS, CONTEXT = 259, 256, 24
SIZES = dict(num_layers=2, width=32, num_heads=4, mlp_dim=64, context=CONTEXT, bos_id=BOS)


def _tokens(seed, batch=2, length=CONTEXT):
  """Rows of several documents: BOS at 0 and, within `length`, at 7 and 15 (row 0), 11 (row 1)."""
  tokens = np.random.default_rng(seed).integers(0, 256, size=(batch, length)).astype(np.int32)
  tokens[:, 0] = BOS
  for row, start in ((0, 7), (0, 15), (1, 11)):
    if start < length:
      tokens[row, start] = BOS
  return tokens


@functools.cache
def _lm(kv_heads, implementation=None, block_size=512):
  """(fused model, explicit model, variables): weights x4 so the softmaxes are far from flat."""
  model = build_model("transformer_lm", VOCAB, **SIZES, num_kv_heads=kv_heads,
                      attention_implementation=implementation, attention_block_size=block_size)
  variables = jax.jit(model.init)(jax.random.PRNGKey(kv_heads), jnp.zeros((1, CONTEXT), jnp.int32))
  return model, model.clone(attention_probs=True), jax.tree.map(lambda x: x * 4.0, variables)


def _numpy_attention(q, k, v, allowed):
  """softmax(q k^T / sqrt(D), masked) v per head, query head h reading kv head h // group."""
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  group = q.shape[2] // k.shape[2]
  k, v = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
  scores = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
  scores = np.where(np.asarray(allowed)[:, None], scores, -np.inf)
  probs = np.exp(scores - scores.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  return np.einsum("bhqk,bkhd->bqhd", probs, v), probs


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_both_paths_equal_numpy_on_one_layer(kv_heads):
  """MHA, GQA and MQA with a document mask and causality: dot_product_attention (as the
  module calls it) and the explicit path give NumPy's outputs; the explicit path its probs."""
  rng = np.random.default_rng(kv_heads)
  q = rng.normal(size=(2, 10, 4, 8)).astype(np.float32)
  k, v = (rng.normal(size=(2, 10, kv_heads, 8)).astype(np.float32) for _ in range(2))
  document = np.cumsum(rng.random((2, 10)) < 0.3, axis=1)
  mask = document[:, :, None] == document[:, None, :]
  allowed = mask & np.tril(np.ones((10, 10), bool))
  want, want_probs = _numpy_attention(q, k, v, allowed)
  fused = jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], is_causal=True)
  out, probs = explicit_attention(q, k, v, allowed)
  np.testing.assert_allclose(fused, want, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(out, want, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(probs, want_probs, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("kv_heads,block_size", [(4, 3), (2, 4), (1, 10)])
def test_chunked_attention_equals_numpy_and_the_explicit_gradient(kv_heads, block_size):
  """Memory-efficient attention over query blocks (10 queries in blocks of 3: three blocks and
  a remainder of 1; of 4: two and a remainder of 2; of 10: one), causal with a document mask:
  NumPy's outputs to 1e-5, and the gradient of q, k and v those of the explicit path."""
  rng = np.random.default_rng(10 + kv_heads)
  q = 2.0 * rng.normal(size=(2, 10, 4, 8)).astype(np.float32)
  k, v = (2.0 * rng.normal(size=(2, 10, kv_heads, 8)).astype(np.float32) for _ in range(2))
  document = np.cumsum(rng.random((2, 10)) < 0.3, axis=1)
  mask = document[:, :, None] == document[:, None, :]
  allowed = mask & np.tril(np.ones((10, 10), bool))
  weights = rng.normal(size=(2, 10, 4, 8)).astype(np.float32)
  want, _ = _numpy_attention(q, k, v, allowed)
  chunked = lambda q, k, v: chunked_attention(q, k, v, jnp.asarray(mask), True, block_size)
  np.testing.assert_allclose(jax.jit(chunked)(q, k, v), want, atol=1e-5, rtol=1e-5)
  grad = lambda f: jax.jit(jax.grad(lambda *a: jnp.sum(f(*a) * weights), argnums=(0, 1, 2)))
  got = grad(chunked)(q, k, v)
  expected = grad(lambda q, k, v: explicit_attention(q, k, v, jnp.asarray(allowed))[0])(q, k, v)
  for name, g, w in zip("qkv", got, expected, strict=True):
    np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-5, err_msg=name)
  assert float(np.abs(expected[1]).max()) > 1e-2  # Keys' gradients are not all zero.


@pytest.mark.parametrize("kv_heads,implementation,block_size",
                         [(4, None, 512), (2, "xla", 512), (1, "auto", 512), (2, "chunked", 5)])
def test_logits_and_gradients_equal_the_explicit_path(kv_heads, implementation, block_size):
  """The whole model, three documents in one row and two in the other: the same logits and the
  same gradient of every parameter, to 1e-5 float32 (the chunked path in blocks of 5 queries:
  four blocks and a remainder of 4)."""
  model, explicit, variables = _lm(kv_heads, implementation, block_size)
  tokens = _tokens(kv_heads)
  weights = np.random.default_rng(9).normal(size=(2, CONTEXT, VOCAB)).astype(np.float32)

  def value_and_grad(module):
    loss = lambda params: jnp.sum(module.apply({"params": params}, tokens) * weights)
    logits = jax.jit(module.apply)(variables, tokens)
    return logits, jax.jit(jax.grad(loss))(variables["params"])

  logits, grads = value_and_grad(model)
  want_logits, want_grads = value_and_grad(explicit)
  np.testing.assert_allclose(logits, want_logits, atol=1e-5, rtol=1e-5)
  for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(grads),
                               jax.tree.leaves(want_grads), strict=True):
    scale = max(1.0, float(np.abs(want).max()))
    np.testing.assert_allclose(got, want, atol=1e-5 * scale, rtol=1e-5, err_msg=str(path))
  # The documents do matter here: without them the logits of row 0's later documents change.
  no_docs = build_model("transformer_lm", VOCAB, **{**SIZES, "bos_id": None},
                        num_kv_heads=kv_heads)
  assert np.abs(jax.jit(no_docs.apply)(variables, tokens)[0, 8:] - logits[0, 8:]).max() > 1e-2


@pytest.mark.parametrize("implementation", [None, "chunked"])
def test_left_padded_cached_decoding_equals_the_explicit_path(implementation):
  """A left-padded prompt (3 pads) with a second document, prefilled then decoded one token at
  a time through the KV cache: the same logits on both paths (the chunked one in blocks of 4
  queries: the 6-token prefill is a block and a remainder), and the padded row's as alone."""
  model, explicit, variables = _lm(2, implementation, 4)
  tokens = _tokens(3, 2, 16)
  valid = np.ones((2, 16), bool)
  valid[1, :3] = False
  tokens[1, 3] = BOS  # Row 1's prompt starts after its padding.

  def decode(module):
    step = jax.jit(lambda v, t, c: module.apply(v, t, cache=c))
    cache = module.init_cache(2, 16, jnp.asarray(valid))
    logits, cache = step(variables, tokens[:, :6], cache)
    parts = [logits]
    for i in range(6, 16):
      logits, cache = step(variables, tokens[:, i:i + 1], cache)
      parts.append(logits)
    return np.concatenate([np.asarray(p) for p in parts], axis=1)

  fused, want = decode(model), decode(explicit)
  np.testing.assert_allclose(fused, want, atol=1e-5, rtol=1e-5)
  alone = np.asarray(jax.jit(model.apply)(variables, tokens[1:, 3:]))
  np.testing.assert_allclose(fused[1, 3:], alone[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("implementation", [None, "chunked"])
def test_greedy_tokens_are_those_of_the_explicit_path(implementation):
  model, explicit, variables = _lm(2, implementation, 4)
  prompts = _tokens(4, 2, 6)
  prompts[0, 3] = BOS  # Row 0: two documents.
  prompts[1, :2] = 0  # Row 1: a 4-token prompt, left-padded.
  prompts[1, 2] = BOS

  def greedy(module):
    run = jax.jit(functools.partial(generate.sample, module, max_new_tokens=10, greedy=True))
    return np.asarray(run(variables, jnp.asarray(prompts), rng=jax.random.PRNGKey(0),
                          prompt_lengths=np.array([6, 4]))[0])

  tokens = greedy(model)
  np.testing.assert_array_equal(tokens, greedy(explicit))
  assert len(set(tokens[0, 6:].tolist())) > 1  # Not one token repeated: a real comparison.


def test_tapping_probs_selects_the_explicit_path_with_numpy_probabilities():
  """make_apply with `block1/attn/probs` runs the explicit path (the probabilities are those of
  NumPy's softmax over block 1's own queries and keys, masked by causality and documents);
  without it nothing sows them."""
  model, _, variables = _lm(2)
  tokens = _tokens(5)
  apply = jax.jit(make_apply(model, input_key="tokens", features=(
      "block1/attn/probs", "block1/attn/query", "block1/attn/key")), static_argnums=2)
  out = apply(variables, {"tokens": tokens}, False)
  positions = jnp.arange(CONTEXT)
  q = rope(out.features["block1/attn/query"], positions)
  k = rope(out.features["block1/attn/key"], positions)
  document = np.cumsum(tokens == BOS, axis=1)
  causal = np.tril(np.ones((CONTEXT, CONTEXT), bool))
  allowed = (document[:, :, None] == document[:, None, :]) & causal
  _, want = _numpy_attention(q, k, np.zeros_like(k), allowed)
  np.testing.assert_allclose(out.features["block1/attn/probs"], want, atol=1e-6, rtol=1e-5)
  np.testing.assert_allclose(out.logits, jax.jit(model.apply)(variables, tokens), atol=1e-5,
                             rtol=1e-5)
  _, state = jax.jit(lambda v, t: model.apply(v, t, mutable=["intermediates"]))(variables, tokens)
  assert set(state["intermediates"]) == {"hidden0", "hidden1", "hidden2"}  # No probs sown.
  assert list_features(model, variables, (CONTEXT,))["block0/attn/probs"] == (4, CONTEXT, CONTEXT)
  assert model.for_features(["hidden1"]) is model
  assert model.for_features(["block0/attn/probs"]).attention_probs


def test_unknown_implementation_is_refused_listing_the_choices():
  model = build_model("transformer_lm", VOCAB, **SIZES, attention_implementation="flash")
  with pytest.raises(ValueError, match=r"attention_implementation 'flash' is not one of "
                                       r"\[None, 'auto', 'xla', 'cudnn', 'chunked'\]"):
    model.init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))
  model = build_model("transformer_lm", VOCAB, **SIZES, attention_implementation="chunked",
                      attention_block_size=0)
  with pytest.raises(ValueError, match=r"attention_block_size 0 must be a positive number"):
    model.init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))


def test_implementation_resolution(monkeypatch):
  """'auto' is JAX's choice; 'cudnn' is refused off a GPU and, on one, falls back to XLA for
  float32 activations (which cuDNN's kernel does not take) with a warning."""
  assert resolve_implementation("auto", jnp.float32) is None
  assert resolve_implementation(None, jnp.bfloat16) is None
  assert resolve_implementation("xla", jnp.bfloat16) == "xla"
  with pytest.raises(ValueError, match=r"'cudnn' needs an NVIDIA GPU, but JAX's backend is "
                                       r"'cpu': use None or 'xla'"):
    resolve_implementation("cudnn", jnp.bfloat16)
  model = build_model("transformer_lm", VOCAB, **SIZES, attention_implementation="cudnn")
  with pytest.raises(ValueError, match="'cudnn' needs an NVIDIA GPU"):
    model.init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert resolve_implementation("cudnn", jnp.bfloat16) == "cudnn"
  assert resolve_implementation("cudnn", jnp.float16) == "cudnn"
  with pytest.warns(UserWarning, match="float32, so XLA's attention runs"):
    assert resolve_implementation("cudnn", jnp.float32) == "xla"
