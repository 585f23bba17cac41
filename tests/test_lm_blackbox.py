"""Black-box teachers: a JSONL file of a teacher's outputs as training data (data.text.blackbox).

Rows and log-probability mapping against hand-computed arrays, the sparse top-k KL against
NumPy, every kind of malformed line refused by number, a text-only and a top-k file each
training a student through the CLI, and a top-k file refused on-policy."""

import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special
from conftest import ROOT, cli_env

from distill_jax.common.outputs import Outputs
from distill_jax.config import ConfigError, load_config_file
from distill_jax.data.text import blackbox
from distill_jax.losses import token_topk
from distill_jax.models.tokenizers import ByteTokenizer, HfTokenizer

LM = os.path.join(ROOT, "configs", "lm.py")
BYTES = ByteTokenizer()
BOS, EOS, PAD = BYTES.bos_id, BYTES.eos_id, BYTES.pad_id


def write_jsonl(path, records):
  with open(path, "w") as f:
    for record in records:
      f.write((record if isinstance(record, str) else json.dumps(record)) + "\n")
  return str(path)


def test_rows_mask_the_prompt_and_map_log_probs_by_hand():
  records = [
      # Alternatives map to their first byte: "c"; "é" (2 bytes) to 0xC3; "zz" to "z".
      blackbox.Record("ab", "cd", ("c", "d"), ((("c", -0.1), ("é", -2.0), ("zz", -3.0)),
                                               (("d", -0.2),))),
      # "xy" and "xz" share their first byte: one entry with their summed probability.
      # Both records lose their end to seq_len.
      blackbox.Record("", "xyzw", ("xy", "zw"), ((("xy", -0.5), ("xz", -1.5)),
                                                 (("z", -0.3), ("q", -2.0)))),
      blackbox.Record("p", "q"),  # Text only.
  ]
  rows, counts = blackbox.build_rows(records, BYTES, seq_len=4)
  o = ord
  np.testing.assert_array_equal(rows["tokens"], [[BOS, o("a"), o("b"), o("c")],
                                                 [BOS, o("x"), o("y"), o("z")],
                                                 [BOS, o("p"), o("q"), PAD]])
  np.testing.assert_array_equal(rows["targets"], [[o("a"), o("b"), o("c"), o("d")],
                                                  [o("x"), o("y"), o("z"), o("w")],
                                                  [o("p"), o("q"), EOS, PAD]])
  # The loss counts completion targets (and the final EOS) only.
  np.testing.assert_array_equal(rows["mask"], [[0, 0, 1, 1], [1, 1, 1, 1], [0, 1, 1, 0]])
  assert rows["topk_ids"].shape == (3, 4, 3)
  # Record 0: "c" is predicted at position 2, "d" at 3.
  np.testing.assert_array_equal(rows["topk_valid"][0], [[0, 0, 0], [0, 0, 0], [1, 1, 1],
                                                        [1, 0, 0]])
  np.testing.assert_array_equal(rows["topk_ids"][0, 2], [o("c"), 0xC3, o("z")])
  np.testing.assert_allclose(rows["topk_logprobs"][0, 2], [-0.1, -2.0, -3.0])
  assert rows["topk_ids"][0, 3, 0] == o("d") and rows["topk_logprobs"][0, 3, 0] == np.float32(-0.2)
  # Record 1: "xy" at position 0 (one entry, "x"), "zw" at position 2 ("z" and "q").
  np.testing.assert_array_equal(rows["topk_valid"][1, 0], [1, 0, 0])
  assert rows["topk_ids"][1, 0, 0] == o("x")
  np.testing.assert_allclose(rows["topk_logprobs"][1, 0, 0],
                             math.log(math.exp(-0.5) + math.exp(-1.5)), rtol=1e-6)
  np.testing.assert_array_equal(rows["topk_ids"][1, 2, :2], [o("z"), o("q")])
  np.testing.assert_allclose(rows["topk_logprobs"][1, 2, :2], [-0.3, -2.0])
  assert not rows["topk_valid"][1, [1, 3]].any() and not rows["topk_valid"][2].any()
  assert counts == blackbox.MappingCounts(records=3, truncated=2, entries=8, unmapped=0,
                                          positions=4, empty_positions=0, unaligned=0)


def bpe_merging_ab(directory):
  """A byte-level BPE (the `tokenizers` package, trained offline) whose merges are 'ab' and
  ' c' (written 'Ġc'), as the Hugging Face tokenizer.json of a model directory. Its
  post-processor trims offsets, as RoBERTa's does: 'Ġc' would seem to start after its space."""
  import tokenizers

  tok = tokenizers.Tokenizer(tokenizers.models.BPE())
  tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = tokenizers.decoders.ByteLevel()
  tok.post_processor = tokenizers.processors.ByteLevel(trim_offsets=True)
  trainer = tokenizers.trainers.BpeTrainer(
      vocab_size=256 + 3 + 2, special_tokens=["<s>", "</s>", "<pad>"], show_progress=False,
      initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(["ab", " c"] * 5, trainer=trainer)
  os.makedirs(directory, exist_ok=True)
  tok.save(os.path.join(directory, "tokenizer.json"))
  return HfTokenizer.from_dir(str(directory)), tok.token_to_id


def test_teacher_tokens_align_with_a_bpe_student_by_offsets(tmp_path):
  """Teacher tokens a, b, c against a student that merges 'ab': 'a' starts where the
  student's 'ab' does and 'c' where its 'c' does, so their log-probs land on the positions
  that predict those; 'b' starts inside 'ab': no position, counted, and nothing of it is
  written (the old rule put it on the position predicting 'c', whose one entry then left
  b's other two alternatives marked valid). The same for the second byte of 'é' (two bytes,
  two student tokens that start at its one character). A teacher's ' c' meets the student's
  'Ġc' where its space is (the offsets are the tokenizer model's, untrimmed)."""
  student, vocab = bpe_merging_ab(tmp_path / "bpe")
  a, ab, c, x = vocab("a"), vocab("ab"), vocab("c"), vocab("x")
  c3, a9 = vocab("Ã"), vocab("©")  # The byte-level BPE's characters for bytes 0xC3, 0xA9.
  space, space_c = vocab("Ġ"), vocab("Ġc")
  assert student.encode("abc").tolist() == [student.bos_id, ab, c, student.eos_id]
  records = [
      blackbox.Record("", "abc", ("a", "b", "c"), (
          (("a", -0.2), ("ab", -1.0), ("x", -3.0)),
          (("b", -0.1), ("d", -2.0), ("a", -3.0)),
          (("c", -0.05), ("cab", -3.5)))),  # The student writes 'cab' as c, ab: with 'c'.
      blackbox.Record("", "é", ("bytes:\\xc3", "bytes:\\xa9"), (
          # A lone byte is no text the student reads: it does not map; 'é' starts with 0xC3.
          (("bytes:\\xc3", -0.1), ("é", -0.5)),
          (("bytes:\\xa9", -0.01),))),
      blackbox.Record("", "a c", ("a", " c"), ((("a", -0.1),),
                                               ((" c", -0.2), (" d", -1.0)))),  # Ġ, d.
  ]
  rows, counts = blackbox.build_rows(records, student, seq_len=4)
  bos, eos, pad = student.bos_id, student.eos_id, student.pad_id
  np.testing.assert_array_equal(rows["tokens"], [[bos, ab, c, pad], [bos, c3, a9, pad],
                                                 [bos, a, space_c, pad]])
  np.testing.assert_array_equal(rows["targets"], [[ab, c, eos, pad], [c3, a9, eos, pad],
                                                  [a, space_c, eos, pad]])
  # Record 0: position 0 predicts 'ab' (teacher token a), position 1 predicts 'c'.
  np.testing.assert_array_equal(rows["topk_valid"][0], [[1, 1, 1], [1, 0, 0], [0, 0, 0],
                                                        [0, 0, 0]])
  np.testing.assert_array_equal(rows["topk_ids"][0, 0], [a, ab, x])
  np.testing.assert_allclose(rows["topk_logprobs"][0, 0], [-0.2, -1.0, -3.0])
  assert rows["topk_ids"][0, 1, 0] == c
  np.testing.assert_allclose(rows["topk_logprobs"][0, 1, 0],
                             math.log(math.exp(-0.05) + math.exp(-3.5)), rtol=1e-6)
  # Record 1: position 0 predicts 0xC3 (where 'é' starts); the second piece has none.
  np.testing.assert_array_equal(rows["topk_valid"][1], [[1, 0, 0], *[[0, 0, 0]] * 3])
  assert rows["topk_ids"][1, 0, 0] == c3 and rows["topk_logprobs"][1, 0, 0] == np.float32(-0.5)
  # Record 2: 'a' at position 0, ' c' at position 1 ('Ġc' and the 'Ġ' that ' d' starts with).
  np.testing.assert_array_equal(rows["topk_valid"][2], [[1, 0, 0], [1, 1, 0], *[[0, 0, 0]] * 2])
  np.testing.assert_array_equal(rows["topk_ids"][2, :2, :2], [[a, 0], [space_c, space]])
  np.testing.assert_allclose(rows["topk_logprobs"][2, :2, :2], [[-0.1, 0], [-0.2, -1.0]])
  # Alternatives 8 + 3 + 3; not mapped: b's 3, the lone 0xC3 and the second piece's one.
  assert counts == blackbox.MappingCounts(records=3, entries=14, unmapped=5, positions=7,
                                          empty_positions=2, unaligned=2)
  assert counts.summary()["unaligned_teacher_tokens"] == 2
  # Cut after one position, 'é' keeps its first piece (0xC3 is that position's target) and
  # loses the second with the token 0xA9 that holds it, though both tokens start at char 0.
  rows, counts = blackbox.build_rows(records[1:2], student, seq_len=1)
  np.testing.assert_array_equal(rows["topk_valid"], [[[1, 0]]])
  assert counts == blackbox.MappingCounts(records=1, truncated=1, entries=2, unmapped=1,
                                          positions=1)


def test_alternatives_merge_by_first_token_and_the_loss_keeps_the_rest():
  """A byte student and word alternatives: 'hello', 'Hi' and 'H' land on the position that
  predicts the first byte as p(h) and p(H) = p(Hi) + p(H). The loss's target is those
  probabilities and the rest 1 - sum as one outcome; here they sum to more than 1, so the
  target divides them by their sum (p(h) = 0.87) and the rest is 0. A second record's
  alternatives sum to 0.88: the rest, 0.12, is the teacher's mass on every other byte."""
  records = [blackbox.Record("", "hello", ("hello",),
                             ((("hello", -0.1), ("Hi", -2.5), ("H", -3.0)),)),
             blackbox.Record("", "Hi", ("Hi",),
                             ((("Hi", -0.5), ("Hello", -1.5), ("hey", -3.0), ("<eos>", -4.0)),))]
  rows, counts = blackbox.build_rows(records, BYTES, seq_len=6)
  h, big_h = ord("h"), ord("H")
  np.testing.assert_array_equal(rows["topk_ids"][:, 0], [[h, big_h, 0, 0], [big_h, h, 0, 0]])
  np.testing.assert_array_equal(rows["topk_valid"][:, 0], [[1, 1, 0, 0], [1, 1, 0, 0]])
  assert not rows["topk_valid"][:, 1:].any()
  log_p = np.log([[math.exp(-0.1), math.exp(-2.5) + math.exp(-3.0)],
                  [math.exp(-0.5) + math.exp(-1.5), math.exp(-3.0)]])
  np.testing.assert_allclose(rows["topk_logprobs"][:, 0, :2], log_p, rtol=1e-6)
  assert counts == blackbox.MappingCounts(records=2, entries=7, unmapped=1, positions=2)
  # The loss's targets, by hand: first-byte marginals, over their sum only where it is > 1.
  p = np.exp(log_p)
  first = p[0] / p[0].sum()
  assert abs(first[0] - 0.8728) < 1e-4 and p[0].sum() > 1
  second, rest = p[1], 1 - p[1].sum()
  assert abs(rest - 0.1206) < 1e-4
  logits = np.random.default_rng(3).normal(size=(2, 6, BYTES.vocab_size)).astype(np.float32)
  q = scipy.special.softmax(logits[:, 0].astype(np.float64), axis=-1)
  want = [np.sum(first * np.log(first / q[0, [h, big_h]])),
          np.sum(second * np.log(second / q[1, [big_h, h]]))
          + rest * np.log(rest / (1 - q[1, [big_h, h]].sum()))]
  batch = {key: rows[key] for key in ("mask", *blackbox.TOPK_KEYS)}
  got = token_topk.token_sparse_topk_kd(Outputs(jnp.asarray(logits), {}, {}), {}, batch)
  np.testing.assert_allclose(got, np.mean(want), rtol=1e-5)


def test_sparse_topk_kl_against_numpy():
  rng = np.random.default_rng(0)
  b, length, vocab, k = 2, 5, 11, 4
  logits = rng.normal(size=(b, length, vocab)).astype(np.float32)
  ids = np.stack([rng.permutation(vocab)[:k] for _ in range(b * length)]).reshape(b, length, k)
  log_probs = np.log(rng.dirichlet(np.ones(k + 1), size=(b, length))[..., :k]).astype(np.float32)
  valid = (rng.random((b, length, k)) < 0.7).astype(np.float32)
  valid[0, 1] = 0  # No mapped token: the position does not count.
  log_probs[1, 2, :2] = np.log([0.7, 0.6])  # Summing to more than 1: divided by the sum.
  valid[1, 2, :2] = 1
  mask = np.ones((b, length), np.float32)
  mask[1, 4] = 0
  batch = {"topk_ids": ids.astype(np.int32), "topk_logprobs": log_probs, "topk_valid": valid,
           "mask": mask}
  want, count = 0.0, 0
  for i in range(b):
    for t in range(length):
      on = valid[i, t] > 0
      if not on.any() or not mask[i, t]:
        continue
      p = np.exp(log_probs[i, t][on].astype(np.float64))
      p = p / max(p.sum(), 1.0)
      q = scipy.special.softmax(logits[i, t].astype(np.float64))
      q_top = q[ids[i, t][on]]
      rest, q_rest = 1.0 - p.sum(), 1.0 - q_top.sum()
      want += np.sum(p * np.log(p / q_top)) + (rest * np.log(rest / q_rest) if rest > 0 else 0)
      count += 1
  student = Outputs(jnp.asarray(logits), {}, {})
  for chunk in (0, 2):
    got = token_topk.token_sparse_topk_kd(student, {}, batch, chunk_size=chunk)
    np.testing.assert_allclose(got, want / count, rtol=1e-5)
  # Zero exactly when the student holds the teacher's probabilities on its tokens and the
  # rest (0.6) on the others, not when it renormalises them over the teacher's tokens.
  exact = np.log(np.full((1, 1, vocab), 0.6 / (vocab - 2), np.float32))
  exact[0, 0, [3, 5]] = np.log([0.1, 0.3])
  one = {"topk_ids": np.array([[[3, 5, 0]]], np.int32),
         "topk_logprobs": np.log(np.array([[[0.1, 0.3, 0.2]]], np.float32)),
         "topk_valid": np.array([[[1, 1, 0]]], np.float32)}
  got = token_topk.token_sparse_topk_kd(Outputs(jnp.asarray(exact), {}, {}), {}, one)
  assert abs(float(got)) < 1e-6
  renormalised = np.full((1, 1, vocab), -1e9, np.float32)
  renormalised[0, 0, [3, 5]] = np.log([0.25, 0.75])
  got = token_topk.token_sparse_topk_kd(Outputs(jnp.asarray(renormalised), {}, {}), {}, one)
  assert float(got) > 1.0
  grad = jax.grad(lambda x: token_topk.token_sparse_topk_kd(Outputs(x, {}, {}), {}, batch))(
      jnp.asarray(logits))
  assert np.all(np.isfinite(grad)) and np.abs(grad).max() > 0


def run_cli(*args):
  return subprocess.run([sys.executable, "-m", "distill_jax.main", *args], capture_output=True,
                        text=True, cwd=ROOT, env=cli_env(), timeout=600)


def test_malformed_lines_are_refused_with_their_numbers(tmp_path):
  good = {"prompt": "a", "completion": "b"}
  path = write_jsonl(tmp_path / "bad.jsonl", [
      good,
      "{not json",
      {"prompt": "a"},
      {"prompt": "a", "completion": "bc", "tokens": ["b", "x"], "top_logprobs": [{"b": -1},
                                                                                  {"x": -1}]},
      {"prompt": "a", "completion": "b", "tokens": ["b"], "top_logprobs": [{"b": 0.5}]},
      {"prompt": "a", "completion": "b", "tokens": ["b"]},
      {"prompt": "a", "completion": "b", "tokens": ["b"], "top_logprobs": [{}]},
      good,
  ])
  with pytest.raises(blackbox.BlackboxFileError) as error:
    blackbox.read_records(path)
  message = str(error.value)
  assert "has 6 malformed line(s)" in message
  reported = {int(line.split(":")[1]): line for line in
              (entry.strip()[len(path):] for entry in message.splitlines()[1:])}
  assert sorted(reported) == [2, 3, 4, 5, 6, 7], message
  for line, why in ((2, "not JSON"), (3, "field 'completion' must be a string"),
                    (4, "the 'tokens' do not join"), (5, "finite number <= 0"),
                    (6, "come together"), (7, "non-empty object")):
    assert why in reported[line], (line, message)
  # The CLI refuses to start: the same message as its last lines, no traceback, no run.
  workdir = tmp_path / "run"
  proc = run_cli(f"--config={LM}:blackbox_text,tiny", f"--workdir={workdir}",
                 f"--config.data.train_files={path}")
  assert proc.returncode != 0 and f"{path}:5: top_logprobs[0]['b'] = 0.5" in proc.stderr
  assert "Traceback" not in proc.stderr and not (workdir / "checkpoints").exists()
  proc = run_cli(f"--config={LM}:blackbox_text,tiny", f"--workdir={workdir}")
  assert proc.returncode != 0 and "config.data.train_files is not set" in proc.stderr


def teacher_file(path, num_records, with_log_probs):
  """A teacher that answers 'say WORD' with 'WORD WORD.' (and, with log-probs, the chosen
  character at -0.05 beside two ASCII alternatives and one token that does not map)."""
  words = ["apple", "river", "stone", "cloud", "maple", "tiger", "lemon", "orbit"]
  records = []
  for i in range(num_records):
    word = words[i % len(words)]
    completion = f"{word} {word}."
    record = {"prompt": f"say {word}: ", "completion": completion}
    if with_log_probs:
      record["tokens"] = list(completion)
      record["top_logprobs"] = [{ch: -0.05, "#": -4.0, "%": -4.5, "éé": -5.0}
                                for ch in completion]
    records.append(record)
  return write_jsonl(path, records)


@pytest.mark.parametrize("role", ["blackbox_text", "blackbox_topk"])
def test_a_teacher_file_trains_the_student_through_the_cli(tmp_path, role):
  path = teacher_file(tmp_path / "teacher.jsonl", 400, with_log_probs=role == "blackbox_topk")
  workdir = tmp_path / "run"
  # 360 train rows / 16 = 22 steps per epoch: an evaluation every 11 steps.
  proc = run_cli(f"--config={LM}:{role},tiny", f"--workdir={workdir}",
                 f"--config.data.train_files={path}", "--config.num_steps=44",
                 "--config.eval_every_epochs=0.5", "--config.optim.lr=0.01")
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
  evals = [r for r in rows if "eval/ce" in r]
  assert [r["step"] for r in evals] == [11, 22, 33, 44]
  ce = [r["eval/ce"] for r in evals]
  # Held-out completions: the loss falls, far below a uniform guess over 259 tokens.
  assert ce[-1] < ce[0] and ce[-1] < math.log(259) - 2.0, ce
  result = json.load(open(workdir / "result.json"))
  assert result["steps"] == 44
  # What reading the file counted, per split: 360 train and 40 eval records (eval_fraction
  # 0.1), none cut at seq_len 32; with log-probs each has 12 teacher tokens (the characters
  # of 'WORD WORD.') of 4 alternatives, all of which map ('éé' by its first byte).
  def counts(records):
    tokens = 12 * records if role == "blackbox_topk" else 0
    return {"records": records, "truncated_records": 0, "alternatives": 4 * tokens,
            "unmapped_alternatives": 0, "teacher_tokens": tokens,
            "teacher_tokens_without_mapped_alternative": 0, "unaligned_teacher_tokens": 0}
  assert result["data"] == {"train": counts(360), "test": counts(40)}
  logged = [r for r in rows if "train/loss" in r]
  if role == "blackbox_topk":
    kd = [r["train/loss/token_sparse_topk_kd"] for r in logged]
    assert kd[-1] < kd[0] and kd[0] > 0, kd
    # The counts of what did not map are reported (here nothing).
    assert "0 of 17280 alternatives do not map to the student's vocabulary" in proc.stderr
  else:
    assert not any("sparse" in key for key in logged[-1])


def test_byte_pieces_and_special_tokens_keep_the_teachers_offsets():
  """A lone byte of a multi-byte character (`bytes:\\xc3`, U+FFFD in the completion's text)
  stays one byte, so the next token's log-probs land on its own position, and 'é' shares its
  first byte with it; a special token adds no text and maps nothing."""
  record = {"prompt": "", "completion": "a\ufffdb", "tokens": ["a", "bytes:\\xc3", "<pad>", "b"],
            "top_logprobs": [{"a": -0.1}, {"bytes:\\xc3": -0.2, "é": -3.0}, {"<pad>": -0.3},
                             {"b": -0.4}]}
  assert blackbox.record_problem(record) is None
  records = [blackbox.Record(record["prompt"], record["completion"], tuple(record["tokens"]),
                             tuple(tuple(a.items()) for a in record["top_logprobs"]))]
  rows, counts = blackbox.build_rows(records, BYTES, seq_len=8)
  np.testing.assert_array_equal(rows["tokens"][0, :4], [BOS, ord("a"), 0xC3, ord("b")])
  assert [rows["topk_ids"][0, t, 0] for t in range(3)] == [ord("a"), 0xC3, ord("b")]
  np.testing.assert_allclose(rows["topk_logprobs"][0, :3, 0],
                             [-0.1, np.logaddexp(-0.2, -3.0), -0.4], rtol=1e-6)
  np.testing.assert_array_equal(rows["topk_valid"][0, :4].sum(-1), [1, 1, 1, 0])
  assert counts == blackbox.MappingCounts(records=1, entries=5, unmapped=1, positions=4,
                                          empty_positions=1)


def test_teacher_file_batches_resume_and_split_by_process(tmp_path):
  """A run on a teacher file resumes where it stopped: an iterator restored from another's
  saved position gives the same next batch, log-probs included, and two processes' halves
  make up the one-process batch."""
  import ml_collections

  from distill_jax.data.text import batches

  path = teacher_file(tmp_path / "teacher.jsonl", 60, with_log_probs=True)
  config = ml_collections.ConfigDict({"name": "jsonl", "train_files": str(path),
                                      "eval_files": "", "eval_fraction": 0.1,
                                      "train_split": "train", "eval_split": "test",
                                      "seq_len": 32, "tokenizer": "bytes"})
  one = batches.train_iterator(config, global_batch_size=8, seed=1)
  first = [next(one) for _ in range(9)]  # 54 train records: past the first epoch (6 steps).
  keys = ("tokens", "targets", "mask", "id", *blackbox.TOPK_KEYS)
  assert set(keys) <= set(first[0]) and first[0]["topk_valid"].sum() > 0
  halves = [batches.train_iterator(config, global_batch_size=8, seed=1, process_index=i,
                                process_count=2) for i in range(2)]
  for batch in first[:2]:
    parts = [next(h) for h in halves]
    for key in keys:
      np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), batch[key])
  for step in (3, 7):
    resumed = batches.train_iterator(config, global_batch_size=8, seed=1)
    resumed.set_state(json.loads(json.dumps({**one.get_state(), "step": step})))
    batch = next(resumed)
    for key in keys:
      np.testing.assert_array_equal(batch[key], first[step][key], err_msg=f"{step} {key}")


def test_a_top_k_file_is_refused_on_policy(tmp_path):
  """A file's top-k log-probabilities are for the file's tokens: with on_policy.fraction > 0
  the rows would be the student's samples, which no file scores, so `build_run` refuses,
  naming the keys; a text-only file (no side data) is accepted on-policy."""
  from distill_jax.train.build import build_run

  settings = {"on_policy.fraction": 1.0, "parallel.num_devices": 1}
  path = teacher_file(tmp_path / "topk.jsonl", 40, with_log_probs=True)
  with pytest.raises(ConfigError) as error:
    build_run(load_config_file(f"{LM}:blackbox_topk,tiny",
                               {"data.train_files": path, **settings}))
  assert str(error.value) == (
      "config.on_policy.fraction=1.0 replaces the rows by the student's samples, but these "
      "batch keys would still describe the original rows: topk_ids, topk_logprobs, topk_valid "
      "(a black-box teacher's top-k log-probabilities for the file's tokens, which no teacher "
      "can give for the student's samples; train on the file's text (on_policy.fraction=0), "
      "or distill on-policy from a live teacher).")
  path = teacher_file(tmp_path / "text.jsonl", 40, with_log_probs=False)
  built = build_run(load_config_file(f"{LM}:blackbox_text,tiny",
                                     {"data.train_files": path, **settings}))
  assert built.extras.on_policy.fraction == 1.0
