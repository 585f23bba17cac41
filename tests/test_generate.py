"""KV-cache decoding and sampling: cached logits equal the full forward's (GQA, documents,
left padding); samples are reproducible from the seed, top-k/top-p cut what they should, EOS
ends a row's mask, and the length is what was asked."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distill_jax.models import build_model
from distill_jax.tasks.language_model import generate

VOCAB, BOS, EOS = 259, 256, 257
SIZES = dict(num_layers=2, width=32, num_heads=4, num_kv_heads=2, mlp_dim=64, context=32,
             bos_id=BOS)


@pytest.fixture(scope="module")
def lm():
  model = build_model("transformer_lm", VOCAB, **SIZES)
  variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32), jnp.int32))
  # Larger weights than the init's 0.02 so the distributions are far from uniform.
  variables = jax.tree.map(lambda x: x * 4.0, variables)
  return model, variables


@pytest.fixture(scope="module")
def sampler(lm):
  model, variables = lm
  cache = {}

  def run(prompts, rng=0, lengths=None, **settings):
    key = tuple(sorted(settings.items()))
    if key not in cache:
      cache[key] = jax.jit(functools.partial(generate.sample, model, **settings))
    return jax.device_get(cache[key](variables, jnp.asarray(prompts), rng=jax.random.PRNGKey(rng),
                                     prompt_lengths=lengths))
  return run


def _tokens(seed, batch, length):
  tokens = np.random.default_rng(seed).integers(0, 256, size=(batch, length)).astype(np.int32)
  tokens[:, 0] = BOS
  return tokens


@pytest.mark.parametrize("kv_heads", [2, 4, 1])
def test_cached_decoding_equals_the_full_forward(kv_heads):
  """Prefill of 9 tokens then one token at a time (with a second document starting at
  position 14): the logits at every position equal the full forward's."""
  model = build_model("transformer_lm", VOCAB, **{**SIZES, "num_kv_heads": kv_heads})
  variables = model.init(jax.random.PRNGKey(1), jnp.zeros((1, 32), jnp.int32))
  tokens = _tokens(kv_heads, 3, 24)
  tokens[1, 14] = BOS
  full = np.asarray(jax.jit(model.apply)(variables, tokens))
  step = jax.jit(lambda v, t, c: model.apply(v, t, cache=c))
  cache = model.init_cache(3, 24)
  logits, cache = step(variables, tokens[:, :9], cache)
  parts = [logits]
  for i in range(9, 24):
    logits, cache = step(variables, tokens[:, i:i + 1], cache)
    parts.append(logits)
  decoded = np.concatenate([np.asarray(p) for p in parts], axis=1)
  assert int(cache["index"]) == 24
  np.testing.assert_allclose(decoded, full, atol=1e-5, rtol=1e-5)
  assert np.abs(full[1, 14:] - full[0, 14:]).max() > 1e-3  # The rows do differ.


def test_left_padded_prompts_decode_as_if_alone(lm):
  """A prompt of 5 tokens left-padded to 8 gives the logits it gives unpadded."""
  model, variables = lm
  tokens = _tokens(5, 2, 8)
  cache = model.init_cache(2, 8, jnp.asarray([[True] * 8, [False] * 3 + [True] * 5]))
  padded = np.asarray(model.apply(variables, tokens, cache=cache)[0])
  alone = np.asarray(model.apply(variables, tokens[1:, 3:]))
  np.testing.assert_allclose(padded[1, 3:], alone[0], atol=1e-5, rtol=1e-5)
  with pytest.raises(ValueError, match="cache of 40 tokens is longer than the model's context"):
    model.init_cache(2, 40)


def _greedy_reference(model, variables, prompt, n):
  """Greedy decoding by the full forward, one position at a time (no cache)."""
  forward = _full_forward(model)
  tokens = list(prompt)
  for _ in range(n):
    # Padded to the context (causal: the padding does not change earlier logits); one compile.
    logits = forward(variables, jnp.asarray([tokens + [0] * (32 - len(tokens))]))
    tokens.append(int(jnp.argmax(logits[0, len(tokens) - 1])))
  return tokens


@functools.cache
def _full_forward(model):
  return jax.jit(model.apply)


def test_greedy_equals_argmax_of_the_full_forward_and_padding_is_ignored(lm, sampler):
  model, variables = lm
  prompts = _tokens(6, 2, 6)
  prompts[1, :2] = 0  # Row 1: a 4-token prompt, left-padded.
  tokens, mask = sampler(prompts, lengths=np.array([6, 4]), max_new_tokens=8, greedy=True)
  assert tokens.shape == (2, 14) and mask.shape == (2, 14)
  np.testing.assert_array_equal(tokens[0], _greedy_reference(model, variables, prompts[0], 8))
  np.testing.assert_array_equal(tokens[1, 2:], _greedy_reference(model, variables,
                                                                  prompts[1, 2:], 8))
  np.testing.assert_array_equal(mask, np.concatenate([np.zeros((2, 6)), np.ones((2, 8))], 1))
  same, _ = sampler(prompts, lengths=np.array([6, 4]), max_new_tokens=8, temperature=0.0)
  np.testing.assert_array_equal(same, tokens)  # Temperature 0 is greedy.


def test_right_padded_prompts_are_refused_and_left_padded_ones_decode(lm, sampler):
  """Concrete prompts with `prompt_lengths` must be left-padded with pad_id: a right-padded row
  (its prompt first, then padding) would decode from its padding, so it is refused, naming
  the row; the left-padded batch decodes eagerly exactly as the jitted sampler does."""
  model, variables = lm
  left = _tokens(6, 2, 6)
  left[1, :2] = 0
  lengths = np.array([6, 4])
  right = left.copy()
  right[1] = np.concatenate([left[1, 2:], [0, 0]])  # The same 4 tokens, padded on the right.
  run = functools.partial(generate.sample, model, variables, max_new_tokens=8, greedy=True,
                          rng=jax.random.PRNGKey(0), prompt_lengths=lengths)
  with pytest.raises(ValueError, match=r"Prompt row 1 has prompt_lengths\[1\] = 4 of 6 .*"
                                       r"left-pad \(right-align\) the prompts"):
    run(right)
  with pytest.raises(ValueError, match=r"Prompt row 1 .*not pad_id 7"):
    generate.check_prompts(left, lengths, pad_id=7)  # Padding must be pad_id.
  with pytest.raises(ValueError, match=r"prompt_lengths\[0\] = 7: each prompt has 1 to 6"):
    generate.check_prompts(left, np.array([7, 4]))
  tokens, mask = jax.device_get(run(left))
  want, want_mask = sampler(left, lengths=lengths, max_new_tokens=8, greedy=True)
  np.testing.assert_array_equal(tokens, want)
  np.testing.assert_array_equal(mask, want_mask)


def test_seeds_reproduce_and_top_k1_and_tiny_top_p_are_greedy(sampler):
  prompts = _tokens(7, 4, 4)
  a, _ = sampler(prompts, rng=1, max_new_tokens=12)
  b, _ = sampler(prompts, rng=1, max_new_tokens=12)
  c, _ = sampler(prompts, rng=2, max_new_tokens=12)
  np.testing.assert_array_equal(a, b)
  assert (a[:, 4:] != c[:, 4:]).mean() > 0.3
  greedy, _ = sampler(prompts, max_new_tokens=12, greedy=True)
  assert (a[:, 4:] != greedy[:, 4:]).any()  # Sampling at T=1 is not greedy here.
  np.testing.assert_array_equal(sampler(prompts, rng=3, max_new_tokens=12, top_k=1)[0], greedy)
  np.testing.assert_array_equal(sampler(prompts, rng=3, max_new_tokens=12, top_p=1e-6)[0],
                                greedy)


def test_top_k_samples_stay_in_the_top_k(lm, sampler):
  """Every sampled token is among the k largest logits of its position (NumPy on the
  returned log-probs), and the draws do use more than the argmax."""
  prompts = _tokens(8, 8, 4)
  tokens, _, logprobs = sampler(prompts, rng=4, max_new_tokens=16, top_k=3,
                                return_logprobs=True)
  picked = tokens[:, 4:]
  top3 = np.argsort(-logprobs, axis=-1)[..., :3]
  assert np.all((top3 == picked[..., None]).any(-1))
  assert (picked != top3[..., 0]).mean() > 0.05
  # The log-probs are the model's at those positions (full forward on the sampled rows).
  model, variables = lm
  full = jax.nn.log_softmax(model.apply(variables, jnp.asarray(tokens)), -1)
  np.testing.assert_allclose(logprobs, np.asarray(full[:, 3:-1]), atol=1e-4)


def test_top_p_keeps_the_nucleus():
  logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
  kept = np.isfinite(np.asarray(generate.filter_logits(logits, top_p=0.7)))
  np.testing.assert_array_equal(kept, [[True, True, False, False]])
  kept = np.isfinite(np.asarray(generate.filter_logits(logits, top_p=0.81)))
  np.testing.assert_array_equal(kept, [[True, True, True, False]])
  kept = np.isfinite(np.asarray(generate.filter_logits(logits, top_k=2)))
  np.testing.assert_array_equal(kept, [[True, True, False, False]])


def test_eos_ends_the_mask(sampler):
  """With EOS = the token greedy decoding emits at step 3 of row 0, that row's mask is 1 up
  to and including it, 0 after, where the tokens are pad."""
  prompts = _tokens(9, 2, 4)
  greedy, _ = sampler(prompts, max_new_tokens=10, greedy=True)
  eos = int(greedy[0, 4 + 3])
  first = 4 + int(np.argmax(greedy[0, 4:] == eos))
  tokens, mask = sampler(prompts, max_new_tokens=10, greedy=True, eos_id=eos, pad_id=258)
  want = np.zeros(14)
  want[4:first + 1] = 1
  np.testing.assert_array_equal(mask[0], want)
  assert np.all(tokens[0, first + 1:] == 258) and tokens[0, first] == eos
  np.testing.assert_array_equal(tokens[0, :first + 1], greedy[0, :first + 1])
  with pytest.raises(ValueError, match="top_p must be in"):
    generate.check_settings(4, 1.0, 0, 0.0)


def test_decoding_stops_once_every_row_has_ended(lm):
  """With an EOS every row draws early (its embedding, which is also its output row, along
  the mean final hidden state, so it is likely everywhere), decoding runs only until the last
  row's EOS, and its tokens, mask and (kept) log-probs are bit for bit those of running all
  steps: the full decode without EOS, cut after each row's first EOS in NumPy."""
  model, variables = lm
  prompts = _tokens(0, 6, 6)
  table = np.array(variables["params"]["embed"]["embedding"])
  logits = np.asarray(model.apply(variables, jnp.asarray(_tokens(1, 8, 32)))).reshape(-1, VOCAB)
  hidden = (logits @ np.linalg.pinv(table.T)).mean(0)  # Mean final hidden state.
  table[EOS] = 1.2 * hidden / np.linalg.norm(hidden) * np.linalg.norm(table, axis=1).mean()
  variables = {"params": {**variables["params"], "embed": {"embedding": jnp.asarray(table)}}}
  new, pad = 16, 258

  def run(eos_id):
    fn = functools.partial(generate.sample, model, max_new_tokens=new, eos_id=eos_id,
                           pad_id=pad, return_logprobs=True, return_steps=True)
    return jax.device_get(jax.jit(fn)(variables, prompts, rng=jax.random.PRNGKey(1)))

  full_tokens, full_mask, full_logprobs, full_steps = run(None)
  tokens, mask, logprobs, steps = run(EOS)
  assert full_steps == new - 1 and full_mask[:, 6:].all()
  ends = np.argmax(full_tokens[:, 6:] == EOS, axis=1)  # Each row's first EOS.
  assert (full_tokens[:, 6:] == EOS).any(axis=1).all() and ends.max() < new - 1, ends
  assert len(set(ends.tolist())) > 2  # The rows end at different steps.
  assert steps == ends.max()  # One forward per step up to the last row's EOS, none after.
  kept = np.arange(new)[None, :] <= ends[:, None]
  np.testing.assert_array_equal(mask, np.concatenate([np.zeros((6, 6)), kept], axis=1))
  np.testing.assert_array_equal(tokens[:, 6:], np.where(kept, full_tokens[:, 6:], pad))
  np.testing.assert_array_equal(tokens[:, :6], prompts)
  np.testing.assert_array_equal(logprobs[kept], full_logprobs[kept])
  assert np.all(logprobs[:, ends.max() + 1:] == 0)  # Steps never run.


def test_per_row_keys_and_budgets(lm):
  """One key per row: each row's samples equal that row decoded alone with its key (so they
  do not depend on the batch); `max_tokens` [B] ends row b's mask after max_tokens[b] tokens,
  which are the first max_tokens[b] of the row decoded alone without a budget."""
  model, variables = lm
  prompts = _tokens(11, 3, 4)
  keys = jax.vmap(jax.random.fold_in, (None, 0))(jax.random.PRNGKey(5), jnp.arange(3))
  budgets = np.array([10, 3, 6], np.int32)
  run = jax.jit(functools.partial(generate.sample, model, max_new_tokens=10, temperature=0.8))
  tokens, mask = jax.device_get(run(variables, prompts, rng=keys, max_tokens=budgets))
  for b in range(3):
    alone, _ = jax.device_get(run(variables, prompts[b:b + 1], rng=keys[b:b + 1]))
    np.testing.assert_array_equal(mask[b], np.r_[np.zeros(4), np.ones(budgets[b]),
                                                 np.zeros(10 - budgets[b])])
    np.testing.assert_array_equal(tokens[b, :4 + budgets[b]], alone[0, :4 + budgets[b]])
    assert np.all(tokens[b, 4 + budgets[b]:] == 0)  # pad_id after the budget.
