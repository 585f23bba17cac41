"""The decoder-only Transformer LM: causality, documents, GQA, tied embeddings, context check,
features tapped by the framework's mechanism."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distill_jax.models import build_model
from distill_jax.models.forward import list_features, make_apply

VOCAB, CONTEXT, BOS = 259, 32, 256
SIZES = dict(num_layers=2, width=32, num_heads=4, num_kv_heads=2, mlp_dim=64, context=CONTEXT,
             bos_id=BOS)


@pytest.fixture(scope="module")
def lm():
  model = build_model("transformer_lm", VOCAB, **SIZES)
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, CONTEXT), jnp.int32))
  apply = jax.jit(make_apply(model, input_key="tokens",
                             features=("hidden2", "block1/attn/probs", "final_norm")),
                  static_argnums=2)
  return model, variables, lambda tokens: apply(variables, {"tokens": jnp.asarray(tokens)}, False)


def _tokens(seed, length=CONTEXT, batch=2):
  return np.random.default_rng(seed).integers(0, 256, size=(batch, length)).astype(np.int32)


def test_changing_a_later_token_leaves_earlier_logits(lm):
  _, _, forward = lm
  tokens = _tokens(0)
  changed = tokens.copy()
  changed[:, 20] = (changed[:, 20] + 7) % 256
  a, b = forward(tokens).logits, forward(changed).logits
  np.testing.assert_array_equal(a[:, :20], b[:, :20])
  assert np.abs(a[:, 20:] - b[:, 20:]).max() > 1e-4  # The change does reach later positions.


def test_documents_do_not_see_each_other_and_do_not_depend_on_their_offset(lm):
  """A document packed after another gives the logits it gives alone at the row's start."""
  _, _, forward = lm
  doc1, doc2 = _tokens(1, 12, 1)[0], _tokens(2, 20, 1)[0]
  doc1[0] = doc2[0] = BOS
  packed = np.concatenate([doc1, doc2])[None]
  alone = np.concatenate([doc2, np.full(12, 5, np.int32)])[None]
  np.testing.assert_allclose(forward(packed).logits[0, 12:], forward(alone).logits[0, :20],
                             atol=2e-5, rtol=1e-5)
  probs = np.asarray(forward(packed).features["block1/attn/probs"])
  assert probs.shape == (1, 4, CONTEXT, CONTEXT)
  np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)
  assert np.all(probs[..., 12:, :12] == 0)  # Document 2 never attends to document 1,
  assert np.all(np.triu(probs[0, 0], k=1) == 0)  # nor any position to a later one.


def test_features_and_gqa_shapes(lm):
  model, variables, forward = lm
  out = forward(_tokens(3))
  assert out.logits.shape == (2, CONTEXT, VOCAB) and out.logits.dtype == jnp.float32
  assert out.features["hidden2"].shape == (2, CONTEXT, 32)
  attn = variables["params"]["block0"]["attn"]
  assert attn["query"]["kernel"].shape == (32, 4, 8)
  assert attn["key"]["kernel"].shape == (32, 2, 8)  # Two kv heads, each shared by two heads.
  assert attn["value"]["kernel"].shape == (32, 2, 8)
  listed = list_features(model, variables, (CONTEXT,))
  assert listed["hidden0"] == (CONTEXT, 32) and listed["hidden2"] == (CONTEXT, 32)
  assert listed["block1/attn/probs"] == (4, CONTEXT, CONTEXT)
  assert listed["block0/mlp"] == (CONTEXT, 32)


def test_tied_embeddings_share_the_matrix(lm):
  """Tied: no head; the logits are the final hidden states times the embedding's transpose."""
  _, variables, forward = lm
  assert "head" not in variables["params"]
  out = forward(_tokens(4))
  embedding = variables["params"]["embed"]["embedding"]
  np.testing.assert_allclose(out.logits, np.einsum("bld,vd->blv", out.features["final_norm"],
                                                   embedding), rtol=1e-5, atol=1e-5)
  untied = build_model("transformer_lm", VOCAB, **{**SIZES, "tie_embeddings": False})
  shapes = jax.eval_shape(untied.init, jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))
  assert shapes["params"]["head"]["kernel"].shape == (32, VOCAB)


def test_grouped_query_heads_read_their_kv_head():
  """Multi-query attention (1 kv head) equals multi-head attention whose 4 kv heads are copies
  of that one head: every query head reads the shared key/value."""
  sizes = {**SIZES, "num_layers": 1}
  mqa = build_model("transformer_lm", VOCAB, **{**sizes, "num_kv_heads": 1})
  mha = build_model("transformer_lm", VOCAB, **{**sizes, "num_kv_heads": 4})
  tokens = jnp.asarray(_tokens(5, 16, 1))
  params = jax.jit(mqa.init)(jax.random.PRNGKey(1), tokens)["params"]
  tiled = jax.tree.map(lambda x: x, params)
  for name in ("key", "value"):
    kernel = params["block0"]["attn"][name]["kernel"]
    tiled["block0"]["attn"][name]["kernel"] = jnp.tile(kernel, (1, 4, 1))
  np.testing.assert_allclose(jax.jit(mqa.apply)({"params": params}, tokens),
                             jax.jit(mha.apply)({"params": tiled}, tokens), rtol=1e-5, atol=1e-5)


def test_too_long_a_sequence_is_refused_with_both_numbers(lm):
  model, variables, _ = lm
  with pytest.raises(ValueError, match=r"33 tokens is longer than the model's context of 32"):
    model.apply(variables, jnp.zeros((1, CONTEXT + 1), jnp.int32))


def test_bad_sizes_name_the_setting():
  with pytest.raises(ValueError, match="num_kv_heads 3 must divide num_heads 4"):
    build_model("transformer_lm", VOCAB, **{**SIZES, "num_kv_heads": 3}).init(
        jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))
