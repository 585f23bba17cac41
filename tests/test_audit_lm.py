"""The audit of language models (distill_jax/audit/lm.py): its scores against a NumPy/SciPy
reference, seeded causal sampling, and an end-to-end audit through the CLI of a tiny LM student
distilled (token KD) from one of 3 tiny LM candidates, calibrated by students trained alone."""

import functools
import json
import os

import jax
import numpy as np
import optax
import pytest
from scipy import special, stats

from distill_jax.audit import lm

# --- Scores and sampling against references written here ----------------------------------


def test_per_sequence_scores_match_references():
  rng = np.random.default_rng(0)
  n, length, v, start = 5, 9, 7, 4
  model, cand = rng.normal(size=(2, n, length, v)) * 2.0
  tokens = rng.integers(0, v, size=(n, length))
  cand[0] = model[0]  # One identical row: KL 0, agreement 1.
  got = lm.per_sequence_scores(model, cand, tokens, start, temperatures=(1.0, 3.0))
  for i in range(n):
    ll, agree, kl1, kl3 = [], [], [], []
    for t in range(start, length):  # Token t, predicted at position t - 1.
      ll.append(np.log(special.softmax(cand[i, t - 1])[tokens[i, t]]))
      agree.append(float(np.argmax(model[i, t - 1]) == np.argmax(cand[i, t - 1])))
      kl1.append(stats.entropy(special.softmax(cand[i, t - 1]), special.softmax(model[i, t - 1])))
      kl3.append(stats.entropy(special.softmax(cand[i, t - 1] / 3),
                               special.softmax(model[i, t - 1] / 3)))
    np.testing.assert_allclose(got["loglik"][i], np.mean(ll), rtol=1e-9)
    assert got["top1"][i] == np.mean(agree)
    np.testing.assert_allclose(got["kl_t1"][i], np.mean(kl1), rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(got["kl_t3"][i], np.mean(kl3), rtol=1e-6, atol=1e-12)
  assert got["kl_t1"][0] == pytest.approx(0.0, abs=1e-12) and got["top1"][0] == 1.0
  assert [s.name for s in lm.score_list((1.0, 3.0))] == list(got)


def _bigram_fn(table, calls):
  """A causal toy LM: the next-token logits at position t are `table[token_t]`."""
  def fn(tokens):
    calls.append(np.array(tokens))
    return table[np.asarray(tokens, np.int64)]
  return fn


def test_sampling_is_causal_seeded_and_follows_the_model():
  rng = np.random.default_rng(1)
  table = rng.normal(size=(6, 6)) * 3.0
  prompts = rng.integers(0, 6, size=(4, 3))
  calls = []
  greedy = lm.sample_continuations(_bigram_fn(table, calls), prompts, 5, seed=0,
                                   temperature=0.0, pad_id=5)
  want = prompts.copy()
  for _ in range(5):  # The reference: greedy bigram decoding, one token at a time.
    want = np.concatenate([want, table[want[:, -1]].argmax(-1)[:, None]], 1)
  np.testing.assert_array_equal(greedy, want)
  assert len(calls) == 5 and all(c.shape == (4, 8) for c in calls)  # One fixed shape.
  a = lm.sample_continuations(_bigram_fn(table, []), prompts, 200, seed=3)
  b = lm.sample_continuations(_bigram_fn(table, []), prompts, 200, seed=3)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, lm.sample_continuations(_bigram_fn(table, []), prompts, 200, 4))
  # Sampled bigram frequencies follow softmax(table) (200 x 4 draws; loose bound).
  pairs = np.stack([a[:, 2:-1].ravel(), a[:, 3:].ravel()], 1)
  src = np.bincount(pairs[:, 0], minlength=6).argmax()
  freq = np.bincount(pairs[pairs[:, 0] == src, 1], minlength=6) / (pairs[:, 0] == src).sum()
  assert np.abs(freq - special.softmax(table[src])).max() < 0.12


# --- End to end: tiny LMs on the embedded corpus --------------------------------------------

TEACHER = {"num_layers": 2, "width": 32, "num_heads": 4, "num_kv_heads": 2, "mlp_dim": 64,
           "context": 32, "bos_id": 256}
STUDENT = {"num_layers": 1, "width": 32, "num_heads": 4, "num_kv_heads": 2, "mlp_dim": 64,
           "context": 32, "bos_id": 256}
ROWS = 128  # Training rows (of 32 tokens) for every model: a small corpus, distinct models.
STEPS = 60  # Full-batch Adam steps per model.


@functools.partial(jax.jit, static_argnames=("module", "steps"))
def _fit(module, variables, tokens, targets, mask, steps):
  """`steps` full-batch Adam steps of cross-entropy with soft `targets` [N, L, V] on the
  positions where `mask` is 1 (one-hot: trained alone; a teacher's softmax: token KD)."""
  optimizer = optax.adam(0.01)

  def loss(v):
    ce = optax.softmax_cross_entropy(module.apply(v, tokens), targets)
    return (ce * mask).sum() / mask.sum()

  def step(_, carry):
    v, state = carry
    updates, state = optimizer.update(jax.grad(loss)(v), state, v)
    return optax.apply_updates(v, updates), state

  return jax.lax.fori_loop(0, steps, step, (variables, optimizer.init(variables)))[0]


def _export(root, name, kwargs, variables, data_config):
  """A run-like workdir: `model/` export and a config.json naming the task and the data."""
  from distill_jax.common.model_io import export_model

  workdir = root / name
  export_model(str(workdir / "model"), variables, {
      "model": "transformer_lm", "kwargs": dict(kwargs), "num_classes": 259, "step": 0})
  with open(workdir / "config.json", "w") as f:
    json.dump({"task": "language_model", "data": data_config.to_dict()}, f)
  return str(workdir)


@pytest.fixture(scope="module")
def lm_zoo(data_dir, tmp_path_factory):
  """Candidates A, B, C (the teacher architecture, seeds 0-2, trained on the rows' tokens);
  a student distilled from A by token KD (forward KL to A's softmax, no labels); 3 controls of
  the student's architecture trained alone on the same rows (seeds 10-12)."""
  from distill_jax.config import load_config_file
  from distill_jax.data.text import packing
  from distill_jax.models import build_model

  root = tmp_path_factory.mktemp("lm_zoo")
  config = load_config_file(os.path.join(os.path.dirname(os.path.dirname(
      os.path.abspath(__file__))), "configs", "lm.py") + ":teacher,tiny",
      {"data.data_dir": data_dir})
  packed = packing.packed_split(config.data, "train")
  tokens, mask = packed.tokens[:ROWS], packed.mask[:ROWS]
  onehot = np.eye(259, dtype=np.float32)[packed.targets[:ROWS]]
  teacher, student = (build_model("transformer_lm", 259, **k) for k in (TEACHER, STUDENT))
  paths, fns = {}, {}
  for i, name in enumerate("ABC"):
    variables = _fit(teacher, teacher.init(jax.random.PRNGKey(i), tokens[:1]), tokens, onehot,
                     mask, STEPS)
    paths[name] = _export(root, name, TEACHER, variables, config.data)
    fns[name] = functools.partial(teacher.apply, variables)
  soft = np.asarray(jax.nn.softmax(fns["A"](tokens), -1))
  init = lambda seed: student.init(jax.random.PRNGKey(seed), tokens[:1])  # noqa: E731
  paths["student"] = _export(root, "student", STUDENT,
                             _fit(student, init(5), tokens, soft, mask, STEPS), config.data)
  for i in range(3):
    paths[f"control{i}"] = _export(root, f"control{i}", STUDENT,
                                   _fit(student, init(10 + i), tokens, onehot, mask, STEPS),
                                   config.data)
  return paths


def _lm_audit(lm_zoo, data_dir, out, candidates, *extra):
  from distill_jax.audit import cli

  controls = ",".join(f"control{i}={lm_zoo[f'control{i}']}" for i in range(3))
  args = cli.parser().parse_args([
      f"--student={lm_zoo['student']}", f"--controls={controls}", f"--out={out}",
      "--candidates=" + ",".join(f"{c}={lm_zoo[c]}" for c in candidates),
      f"--data_dir={data_dir}", "--num_inputs=48", *extra])
  return cli.audit(args)


def test_lm_audit_picks_the_true_teacher(lm_zoo, data_dir, tmp_path):
  """The CLI sees a language-model run (config.json's task) and audits with prompts: the
  student's KL to A, contrasted with its KL to B and C, stands out from the controls'."""
  result = _lm_audit(lm_zoo, data_dir, tmp_path, "ABC")
  primary = result["primary"]
  assert (primary["probe"], primary["score"], primary["contrast"]) == ("prompts", "kl_t1", True)
  assert result["probes"]["prompts"]["num_inputs"] == 48
  assert result["probes"]["prompts"]["generated_tokens"] == 48 * 16
  effects = {c: primary["comparisons"][c]["effect"] for c in "ABC"}
  assert max(effects, key=effects.get) == "A", effects
  assert result["answer"] == "A", (effects, result["adjusted_p"])
  # Every score ranks A first for the student (closest by each score's own direction).
  for name, table in {s: {c: result["scores"][c]["prompts"][s]["student"] for c in "ABC"}
                      for s in ("loglik", "top1", "kl_t1")}.items():
    best = (min if name == "kl_t1" else max)(table, key=table.get)
    assert best == "A", (name, table)
  # Candidates were queried on every model's generations: (1 student + 3 controls) x 48.
  assert result["queries"] == {c: 4 * 48 for c in "ABC"}
  assert os.path.exists(tmp_path / "audit.md") and os.path.exists(tmp_path / "audit.json")


def test_lm_audit_says_none_without_the_true_teacher(lm_zoo, data_dir, tmp_path):
  result = _lm_audit(lm_zoo, data_dir, tmp_path, "BC")
  assert result["answer"] == "none", result["adjusted_p"]


def test_prompts_probe_reads_held_out_rows_or_a_file(data_dir, tmp_path):
  """Held-out rows: the eval split's first rows, cut to prompt_len; a file: BOS + the bytes of
  each non-empty line, all cut to the shortest (at most prompt_len)."""
  from distill_jax.config import load_config_file
  from distill_jax.data.text import packing

  config = load_config_file(os.path.join(os.path.dirname(os.path.dirname(
      os.path.abspath(__file__))), "configs", "lm.py") + ":teacher,tiny",
      {"data.data_dir": data_dir})
  rows = lm.prompts_probe(lm.LMProbeContext(config.data, 5, 0, {"prompts": {"prompt_len": 6}}))
  np.testing.assert_array_equal(rows.tokens,
                                packing.packed_split(config.data, "test").tokens[:5, :6])
  assert rows.info["split"] == "test" and rows.info["num_inputs"] == 5
  path = tmp_path / "prompts.txt"
  path.write_text("def f(x):\n\nimport os\nab\u00e9cd\n", encoding="utf-8")
  got = lm.prompts_probe(lm.LMProbeContext(config.data, 10, 0,
                                           {"prompts": {"file": str(path), "prompt_len": 8}}))
  want = [[256, *b"def f("], [256, *b"import"], [256, *"abécd".encode()]]
  np.testing.assert_array_equal(got.tokens, want)  # "abécd" is 6 bytes: the shortest, 1 + 6.
  assert got.info["prompt_len"] == 7 and got.info["num_inputs"] == 3
