"""Token-level losses against float64 NumPy references written here, with per-token masks;
chunked equals unchunked; top-k KD with k = vocabulary equals forward KL."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distill_jax.common.outputs import Outputs
from distill_jax.losses import LOSSES, token_topk
from distill_jax.losses.base import masked_mean

B, L, V = 2, 11, 13


def _data(seed=0, scale=3.0, teachers=1):
  rng = np.random.default_rng(seed)
  s = rng.normal(size=(B, L, V)) * scale
  ts = [rng.normal(size=(B, L, V)) * scale for _ in range(teachers)]
  s[0, 1, 2] = 40.0  # An extreme logit: probabilities near 0 and 1.
  ts[0][1, 3, :] = -30.0
  ts[0][1, 3, 5] = 30.0
  targets = rng.integers(0, V, size=(B, L))
  mask = (rng.random((B, L)) > 0.3).astype(np.float32)
  mask[0, 0] = 1.0
  return s, ts, targets, mask


@functools.cache
def _jitted(name, hparams, grad):
  loss = LOSSES.get(name)

  def fn(s, ts, targets, mask):
    teachers = {f"t{i}": Outputs(t, {}, {}) for i, t in enumerate(ts)}
    batch = {"targets": targets, "mask": mask}
    return loss(Outputs(s, {}, {}), teachers, batch, **dict(hparams))

  return jax.jit(jax.value_and_grad(fn) if grad else fn)


def _call(name, s, ts, targets, mask, grad=False, **hparams):
  """The registered loss (jitted, one compile per setting), with `grad` also its gradient
  w.r.t. the student's logits."""
  return _jitted(name, tuple(sorted(hparams.items())), grad)(
      jnp.asarray(s, jnp.float32), [jnp.asarray(t, jnp.float32) for t in ts],
      jnp.asarray(targets, jnp.int32), jnp.asarray(mask, jnp.float32))


# ---------------------------------------------------------------- float64 references
def _logsoftmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _kl(logp, logq):
  p = np.exp(logp)
  return np.sum(np.where(p > 0, p * (logp - np.where(p > 0, logq, 0.0)), 0.0), -1)


def _mean(values, mask):
  return np.sum(values * mask) / np.sum(mask)


def _ref(name, s, t, targets, mask, temperature=1.0, beta=0.5, alpha=0.1, reverse=False, k=4):
  ls, lt = _logsoftmax(s / temperature), _logsoftmax(t / temperature)
  ps, pt = np.exp(ls), np.exp(lt)
  if name == "token_ce":
    values = -np.take_along_axis(_logsoftmax(s), targets[..., None], -1)[..., 0]
  elif name == "token_fkl":
    values = temperature**2 * np.sum(pt * (lt - ls), -1)
  elif name == "token_rkl":
    values = temperature**2 * np.sum(ps * (ls - lt), -1)
  elif name == "token_jsd":
    m = beta * pt + (1 - beta) * ps
    values = beta * np.sum(pt * (lt - np.log(m)), -1) + (1 - beta) * np.sum(ps * (ls - np.log(m)),
                                                                           -1)
  elif name == "token_skew_kl":
    p, q = (ps, pt) if reverse else (pt, ps)
    values = temperature**2 * _kl(np.log(p), np.log(alpha * p + (1 - alpha) * q))
  elif name == "token_topk_kd":
    values = np.zeros(targets.shape)
    for idx in np.ndindex(*targets.shape):
      top = np.argsort(-lt[idx])[:k]
      rest_t = 1.0 - pt[idx][top].sum()
      rest_s = 1.0 - ps[idx][top].sum()
      kl = np.sum(pt[idx][top] * (lt[idx][top] - ls[idx][top]))
      if rest_t > 0:
        kl += rest_t * (np.log(rest_t) - np.log(rest_s))
      values[idx] = temperature**2 * kl
  return _mean(values, mask)


CASES = [
    ("token_ce", {}),
    ("token_fkl", {"temperature": 2.0}),
    ("token_rkl", {"temperature": 2.0}),
    ("token_jsd", {"beta": 0.3}),
    ("token_skew_kl", {"alpha": 0.1}),
    ("token_skew_kl", {"alpha": 0.2, "reverse": True}),
    ("token_topk_kd", {"k": 4}),
    ("token_topk_kd", {"k": 1, "temperature": 2.0}),
]


@pytest.mark.parametrize("name,hparams", CASES)
def test_matches_numpy_reference_with_mask(name, hparams):
  s, (t,), targets, mask = _data()
  got = float(_call(name, s, [t], targets, mask, **hparams))
  want = _ref(name, s.astype(np.float32).astype(np.float64),
              t.astype(np.float32).astype(np.float64), targets, mask, **hparams)
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-6)
  assert np.isfinite(got) and got > 0


def test_jsd_endpoints_are_forward_and_reverse_kl():
  s, ts, targets, mask = _data(1)
  for beta, other in ((0.0, "token_fkl"), (1.0, "token_rkl")):
    np.testing.assert_allclose(_call("token_jsd", s, ts, targets, mask, beta=beta),
                               _call(other, s, ts, targets, mask), rtol=1e-6)


def test_masked_tokens_do_not_count():
  """Changing the logits at dropped positions (even to NaN) changes nothing."""
  s, ts, targets, mask = _data(2)
  base = _call("token_fkl", s, ts, targets, mask)
  s2 = s.copy()
  s2[mask == 0] = np.nan
  np.testing.assert_allclose(_call("token_fkl", s2, ts, targets, mask), base, rtol=0)
  only_first = np.zeros_like(mask)
  only_first[0, 0] = 1.0
  want = _ref("token_fkl", s[:1, :1], ts[0][:1, :1], targets[:1, :1], np.ones((1, 1)))
  np.testing.assert_allclose(_call("token_fkl", s, ts, targets, only_first), want, rtol=2e-5)


def test_masked_mean_per_example_and_per_token():
  values = jnp.asarray([[1.0, 2.0, 3.0], [4.0, np.inf, 6.0]])
  np.testing.assert_allclose(masked_mean(values, jnp.asarray([[1, 1, 0], [1, 0, 1]])),
                             (1 + 2 + 4 + 6) / 4)
  np.testing.assert_allclose(masked_mean(values[:, 0], jnp.asarray([0.0, 1.0])), 4.0)
  np.testing.assert_allclose(masked_mean(values[:, ::2], jnp.asarray([1.0, 0.0])), 2.0)
  assert float(masked_mean(values, jnp.zeros((2, 3)))) == 0.0


# token_ce and the divergences share `chunked_per_token`; token_fkl/rkl/skew_kl share the
# divergence path, so one of them stands for the three.
CHUNKED = [("token_ce", {}), ("token_fkl", {"temperature": 2.0}), ("token_jsd", {"beta": 0.5}),
           ("token_topk_kd", {"k": 3})]


@pytest.mark.parametrize("name,hparams", CHUNKED)
def test_chunked_equals_unchunked_values_and_grads(name, hparams):
  """Chunks of 4 over 11 positions (two chunks and a remainder of 3) give the unchunked value
  and gradient to 1e-6."""
  s, ts, targets, mask = _data(3)
  full, full_grad = _call(name, s, ts, targets, mask, grad=True, **hparams)
  value, grad = _call(name, s, ts, targets, mask, grad=True, chunk_size=4, **hparams)
  np.testing.assert_allclose(value, full, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(grad, full_grad, rtol=1e-5, atol=1e-6)
  assert np.abs(np.asarray(full_grad)).max() > 1e-3  # The comparison is not of zeros.


def test_chunking_bounds_the_vocabulary_sized_temporaries():
  """The compiled chunked gradient needs far less temporary memory than the unchunked one
  (the full-vocabulary float32 intermediates exist for one chunk at a time)."""
  b, length, vocab = 2, 64, 4096
  x = jax.ShapeDtypeStruct((b, length, vocab), jnp.float32)
  targets = jnp.zeros((b, length), jnp.int32)

  def temp_bytes(chunk_size):
    def loss(s, t):
      return LOSSES.get("token_fkl")(Outputs(s, {}, {}), {"t": Outputs(t, {}, {})},
                                     {"targets": targets}, chunk_size=chunk_size)
    compiled = jax.jit(jax.grad(loss)).lower(x, x).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  logits_bytes = b * length * vocab * 4
  unchunked, chunked = temp_bytes(0), temp_bytes(8)
  assert unchunked >= 2 * logits_bytes, unchunked
  assert chunked < unchunked / 2, (chunked, unchunked)


def test_topk_with_full_vocabulary_equals_forward_kl():
  s, ts, targets, mask = _data(4)
  np.testing.assert_allclose(
      _call("token_topk_kd", s, ts, targets, mask, k=V, temperature=2.0),
      _call("token_fkl", s, ts, targets, mask, temperature=2.0), rtol=1e-6, atol=1e-7)


def test_topk_from_cached_features_equals_live_teacher():
  """A teacher that provides only its top-k view (as a cache does) gives the live value."""
  s, (t,), targets, mask = _data(5)
  top, idx, rest = jax.jit(token_topk.teacher_topk, static_argnums=1)(
      jnp.asarray(t, jnp.float32), 5)
  cached = Outputs(None, {token_topk.TOPK_LOG_PROBS: top, token_topk.TOPK_INDICES: idx,
                          token_topk.TOPK_LOG_REST: rest}, {})
  batch = {"targets": jnp.asarray(targets), "mask": jnp.asarray(mask)}
  got = jax.jit(functools.partial(LOSSES.get("token_topk_kd"), k=5, chunk_size=4))(
      Outputs(jnp.asarray(s, jnp.float32), {}, {}), {"t": cached}, batch)
  np.testing.assert_allclose(got, _call("token_topk_kd", s, [t], targets, mask, k=5), rtol=1e-6)


def test_two_teachers_mix_per_token_by_entropy():
  """aggregation='entropy' weighs each teacher per token by softmax(-entropy) over teachers."""
  s, ts, targets, mask = _data(6, teachers=2)
  ls = _logsoftmax(s)
  lts = np.stack([_logsoftmax(t) for t in ts])
  entropy = -np.sum(np.exp(lts) * lts, -1)  # [2, B, L]
  w = np.exp(-entropy) / np.exp(-entropy).sum(0)
  mix = np.sum(w[..., None] * np.exp(lts), 0)
  want = _mean(np.sum(mix * (np.log(mix) - ls), -1), mask)
  got = _call("token_fkl", s, ts, targets, mask, aggregation="entropy", chunk_size=4)
  np.testing.assert_allclose(got, want, rtol=2e-5)
  mean_mix = np.exp(lts).mean(0)
  np.testing.assert_allclose(_call("token_fkl", s, ts, targets, mask),
                             _mean(np.sum(mean_mix * (np.log(mean_mix) - ls), -1), mask),
                             rtol=2e-5)


def test_vocabulary_mismatch_names_both_sizes():
  s, (t,), targets, mask = _data(7)
  with pytest.raises(ValueError, match=r"vocabulary of 12 tokens and the student over 13"):
    _call("token_fkl", s, [t[..., :12]], targets, mask)


def test_bad_settings_are_refused():
  s, ts, targets, mask = _data(8)
  with pytest.raises(ValueError, match="beta"):
    _call("token_jsd", s, ts, targets, mask, beta=1.5)
  with pytest.raises(ValueError, match="alpha"):
    _call("token_skew_kl", s, ts, targets, mask, alpha=1.0)
  with pytest.raises(ValueError, match=r"1 <= k <= the vocabulary \(13\)"):
    _call("token_topk_kd", s, ts, targets, mask, k=14)


def test_hidden_mse_through_the_layer_map_and_connector():
  """Student hidden1 <- teacher hidden2 (same width: compared directly) and student hidden2 <-
  teacher hidden4 (wider teacher: through connector1), mean over kept tokens, summed."""
  rng = np.random.default_rng(9)
  s1, t2 = rng.normal(size=(B, L, 6)), rng.normal(size=(B, L, 6))
  s2, t4 = rng.normal(size=(B, L, 6)), rng.normal(size=(B, L, 10))
  mask = (rng.random((B, L)) > 0.4).astype(np.float32)
  f32 = lambda x: jnp.asarray(x, jnp.float32)
  student = Outputs(None, {"hidden1": f32(s1), "hidden2": f32(s2)}, {})
  teachers = {"t": Outputs(None, {"hidden2": f32(t2), "hidden4": f32(t4)}, {})}
  batch = {"mask": jnp.asarray(mask)}
  loss = LOSSES.get("token_hidden_mse")(student_layers=("hidden1", "hidden2"),
                                        teacher_layers=("hidden2", "hidden4"))
  variables = jax.jit(loss.init)(jax.random.PRNGKey(0), student, teachers, batch)
  assert set(variables["params"]) == {"connector1"}
  w = np.asarray(variables["params"]["connector1"]["kernel"], np.float64)
  assert w.shape == (6, 10)
  want = (_mean(np.mean((s1 - t2) ** 2, -1), mask) + _mean(np.mean((s2 @ w - t4) ** 2, -1), mask))
  np.testing.assert_allclose(jax.jit(loss.apply)(variables, student, teachers, batch), want,
                             rtol=1e-5)


def test_attention_kl_matches_reference_and_refuses_other_head_counts():
  rng = np.random.default_rng(10)
  length = 6
  causal = np.tril(np.ones((length, length), bool))

  def probs(heads):
    x = np.where(causal, rng.normal(size=(B, heads, length, length)) * 2, -np.inf)
    return np.exp(_logsoftmax(x))

  s, t = probs(2), probs(2)
  mask = np.ones((B, length), np.float32)
  mask[1, 3:] = 0
  outs = lambda x, name: Outputs(None, {name: jnp.asarray(x, jnp.float32)}, {})
  loss = jax.jit(functools.partial(LOSSES.get("token_attention_kl"), student_layers="a",
                                   teacher_layers="b"))
  got = loss(outs(s, "a"), {"t": outs(t, "b")}, {"mask": jnp.asarray(mask)})
  kl = np.sum(np.where(t > 0, t * (np.log(np.where(t > 0, t, 1)) - np.log(np.where(t > 0, s, 1))),
                       0), -1)  # [B, H, L]
  np.testing.assert_allclose(got, _mean(kl.mean(1), mask), rtol=1e-5)
  with pytest.raises(ValueError, match=r"layer 'a' of shape \(2, 2, 6, 6\).*layer 'b' of shape "
                                       r"\(2, 4, 6, 6\)"):
    loss(outs(s, "a"), {"t": outs(probs(4), "b")}, {"mask": jnp.asarray(mask)})


# ---------------------------------------------------------------- non-finite inputs at padding
BAD = (np.nan, np.inf, -np.inf)


def _poisoned(x, dropped, bad):
  """A copy of `x` [B, L, ...] holding `bad` at the dropped positions `dropped` [B, L]."""
  x = np.array(x, np.float64)
  x[dropped] = bad
  return x


@pytest.mark.parametrize("name,hparams",
                         CASES + [(n, {**h, "chunk_size": 4}) for n, h in CHUNKED])
def test_nonfinite_logits_at_dropped_tokens_change_neither_value_nor_gradient(name, hparams):
  """NaN or inf logits of the student and the teacher at masked positions (what a model may
  give at padding) give exactly the loss and gradient of finite ones: the gradient is finite,
  and 0 at the masked positions (a `where` after the math would leave it NaN)."""
  s, (t,), targets, mask = _data(11)
  dropped = mask == 0
  value, grad = _call(name, s, [t], targets, mask, grad=True, **hparams)
  grad = np.asarray(grad)
  assert np.all(grad[dropped] == 0) and np.abs(grad[~dropped]).max() > 1e-3
  for bad in BAD:
    got, got_grad = _call(name, _poisoned(s, dropped, bad), [_poisoned(t, dropped, bad)],
                          targets, mask, grad=True, **hparams)
    np.testing.assert_array_equal(got, value, err_msg=f"{bad} at padding")
    np.testing.assert_array_equal(got_grad, grad, err_msg=f"{bad} at padding")


def _value_and_grads(fn, *args):
  """`fn`'s value and its gradients w.r.t. every argument, jitted, as NumPy."""
  value, grads = jax.jit(jax.value_and_grad(fn, argnums=tuple(range(len(args)))))(*args)
  return np.asarray(value), [np.asarray(g) for g in jax.tree.leaves(grads)]


def _same_with_bad_values(fn, arrays, dropped, poison):
  """Checks `fn(*arrays)` against `fn` of the arrays with NaN/inf at the dropped positions
  (for the arrays whose index is in `poison`): same value and gradients, all finite, and the
  gradients of the poisoned arrays 0 at the dropped positions (the student's, the first, not
  0 elsewhere; a teacher's are 0 everywhere, under stop_gradient)."""
  value, grads = _value_and_grads(fn, *arrays)
  assert np.isfinite(value) and value > 0
  assert np.abs(grads[0][~dropped]).max() > 1e-4
  for i in poison:
    assert np.all(grads[i][dropped] == 0)
  for bad in BAD:
    bad_arrays = [jnp.asarray(_poisoned(x, dropped, bad), x.dtype) if i in poison else x
                  for i, x in enumerate(arrays)]
    got, got_grads = _value_and_grads(fn, *bad_arrays)
    np.testing.assert_array_equal(got, value, err_msg=f"{bad} at padding")
    for g, want in zip(got_grads, grads, strict=True):
      np.testing.assert_array_equal(g, want, err_msg=f"{bad} at padding")


def _padded_batch(seed):
  s, (t,), targets, mask = _data(seed)
  batch = {"targets": jnp.asarray(targets), "mask": jnp.asarray(mask)}
  return jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32), batch, mask == 0


def test_nonfinite_topk_cache_at_dropped_tokens():
  """The same for a top-k cache's features (what `token_topk_kd` reads instead of logits)."""
  s, t, batch, dropped = _padded_batch(12)
  top, idx, rest = jax.jit(token_topk.teacher_topk, static_argnums=1)(t, 5)

  def cached(student, top, rest):
    features = {token_topk.TOPK_LOG_PROBS: top, token_topk.TOPK_INDICES: idx,
                token_topk.TOPK_LOG_REST: rest}
    return LOSSES.get("token_topk_kd")(Outputs(student, {}, {}),
                                       {"t": Outputs(None, features, {})}, batch, k=5,
                                       chunk_size=4)

  _same_with_bad_values(cached, [s, top, rest], dropped, (0, 1, 2))


def test_nonfinite_blackbox_log_probs_at_dropped_tokens():
  """The same for a black-box file's top-k log-probabilities (batch keys)."""
  s, _, batch, dropped = _padded_batch(13)
  rng = np.random.default_rng(13)
  ids, valid = rng.integers(0, V, size=(B, L, 3)), (rng.random((B, L, 3)) > 0.2)

  def blackbox(student, log_probs):
    file_batch = {**batch, "topk_ids": jnp.asarray(ids), "topk_logprobs": log_probs,
                  "topk_valid": jnp.asarray(valid, jnp.float32)}
    return LOSSES.get("token_sparse_topk_kd")(Outputs(student, {}, {}), {}, file_batch)

  log_probs = jnp.asarray(-rng.random((B, L, 3)) * 3, jnp.float32)
  _same_with_bad_values(blackbox, [s, log_probs], dropped, (0, 1))


def test_nonfinite_hidden_states_at_dropped_tokens():
  """The same for hidden states through a connector: its kernel's gradient sums over every
  row, so a NaN row would reach it unless zeroed before the connector."""
  _, _, batch, dropped = _padded_batch(14)
  rng = np.random.default_rng(14)
  hidden = LOSSES.get("token_hidden_mse")(student_layers=("h",), teacher_layers=("g",))
  hs = jnp.asarray(rng.normal(size=(B, L, 6)), jnp.float32)
  ht = jnp.asarray(rng.normal(size=(B, L, 10)), jnp.float32)
  variables = jax.jit(hidden.init)(jax.random.PRNGKey(0), Outputs(None, {"h": hs}, {}),
                                   {"t": Outputs(None, {"g": ht}, {})}, batch)

  def hidden_mse(student, teacher, kernel):
    return hidden.apply({"params": {"connector0": {"kernel": kernel}}},
                        Outputs(None, {"h": student}, {}),
                        {"t": Outputs(None, {"g": teacher}, {})}, batch)

  _same_with_bad_values(hidden_mse, [hs, ht, variables["params"]["connector0"]["kernel"]],
                        dropped, (0, 1))


def test_nonfinite_attention_at_dropped_query_tokens():
  """The same for attention probabilities [B, H, L(query), L(key)], masked by query."""
  _, _, batch, dropped = _padded_batch(15)
  rng = np.random.default_rng(15)
  causal = np.tril(np.ones((L, L), bool))

  def probs():
    x = np.where(causal, rng.normal(size=(B, 2, L, L)), -np.inf)
    return jnp.asarray(np.exp(_logsoftmax(x)), jnp.float32)

  def attention(student, teacher):
    return LOSSES.get("token_attention_kl")(Outputs(None, {"a": student}, {}),
                                            {"t": Outputs(None, {"b": teacher}, {})}, batch,
                                            student_layers="a", teacher_layers="b")

  query_dropped = np.broadcast_to(dropped[:, None, :, None], (B, 2, L, L))
  _same_with_bad_values(attention, [probs(), probs()], query_dropped, (0, 1))


def test_language_model_eval_sums_drop_nonfinite_logits_at_padding():
  """The LM eval sums (CE, top-1, bytes, per-teacher agreement/KL/CE) over the kept tokens,
  against NumPy, when the student's and teacher's logits at padding are NaN or inf."""
  from distill_jax.tasks.language_model import LanguageModel

  s, (t,), targets, mask = _data(16)
  dropped = mask == 0
  nbytes = np.random.default_rng(16).integers(1, 4, size=(B, L))
  ls, lt = _logsoftmax(s.astype(np.float32)), _logsoftmax(t.astype(np.float32))
  pred, t_pred = ls.argmax(-1), lt.argmax(-1)
  nll = lambda logp: -np.take_along_axis(logp, targets[..., None], -1)[..., 0]
  keep = lambda x: np.sum(np.where(dropped, 0, x))
  want = {"count": mask.sum(), "num_bytes": keep(nbytes), "ce": keep(nll(ls)),
          "top1": keep(pred == targets), "agreement/t": keep(t_pred == pred),
          "kl/t": keep(_kl(lt, ls)), "teacher_ce/t": keep(nll(lt)),
          "teacher_top1/t": keep(t_pred == targets)}
  sums = jax.jit(LanguageModel().eval_sums)
  for bad in BAD:
    batch = {"targets": jnp.asarray(targets), "mask": jnp.asarray(mask),
             "target_bytes": jnp.asarray(nbytes)}
    got = sums(Outputs(jnp.asarray(_poisoned(s, dropped, bad), jnp.float32), {}, {}),
               {"t": Outputs(jnp.asarray(_poisoned(t, dropped, bad), jnp.float32), {}, {})},
               batch)
    assert sorted(got) == sorted(want)
    for key, value in want.items():
      np.testing.assert_allclose(got[key], value, rtol=1e-5, err_msg=f"{key}, {bad} at padding")
