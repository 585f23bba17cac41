"""Black-box teachers: a JSONL file of a teacher's outputs as training data (data.blackbox).

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

from distill_jax.config import ConfigError, load_config_file
from distill_jax.data import blackbox
from distill_jax.data.text import ByteTokenizer
from distill_jax.losses import tokens
from distill_jax.outputs import Outputs

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
      # Alternatives: "c" maps; "é" (2 bytes) and "zz" (2 tokens) do not.
      blackbox.Record("ab", "cd", ("c", "d"), ((("c", -0.1), ("é", -2.0), ("zz", -3.0)),
                                               (("d", -0.2),))),
      # A position none of whose alternatives maps. Both records lose their end to seq_len.
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
  np.testing.assert_array_equal(rows["topk_valid"][0], [[0, 0, 0], [0, 0, 0], [1, 0, 0],
                                                        [1, 0, 0]])
  assert rows["topk_ids"][0, 2, 0] == o("c") and rows["topk_ids"][0, 3, 0] == o("d")
  np.testing.assert_allclose(rows["topk_logprobs"][0, 2:, 0], [-0.1, -0.2])
  # Record 1: "xy" at position 0 (nothing maps), "zw" at position 2 ("z" and "q" map).
  assert not rows["topk_valid"][1, 0].any()
  np.testing.assert_array_equal(rows["topk_ids"][1, 2, :2], [o("z"), o("q")])
  np.testing.assert_allclose(rows["topk_logprobs"][1, 2, :2], [-0.3, -2.0])
  assert not rows["topk_valid"][2].any()
  assert counts == blackbox.MappingCounts(records=3, truncated=2, entries=8, unmapped=4,
                                          positions=4, empty_positions=1)


def test_sparse_topk_kl_against_numpy():
  rng = np.random.default_rng(0)
  b, length, vocab, k = 2, 5, 11, 4
  logits = rng.normal(size=(b, length, vocab)).astype(np.float32)
  ids = np.stack([rng.permutation(vocab)[:k] for _ in range(b * length)]).reshape(b, length, k)
  log_probs = np.log(rng.dirichlet(np.ones(k + 1), size=(b, length))[..., :k]).astype(np.float32)
  valid = (rng.random((b, length, k)) < 0.7).astype(np.float32)
  valid[0, 1] = 0  # No mapped token: the position does not count.
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
      p = scipy.special.softmax(log_probs[i, t][on].astype(np.float64))
      q = scipy.special.log_softmax(logits[i, t].astype(np.float64))[ids[i, t][on]]
      want += np.sum(p * (np.log(p) - q))
      count += 1
  student = Outputs(jnp.asarray(logits), {}, {})
  for chunk in (0, 2):
    got = tokens.token_sparse_topk_kd(student, {}, batch, chunk_size=chunk)
    np.testing.assert_allclose(got, want / count, rtol=1e-5)
  # Zero exactly when the student holds the teacher's renormalised distribution.
  exact = np.full((1, 1, vocab), -1e9, np.float32)
  exact[0, 0, [3, 5]] = np.log([0.25, 0.75])
  one = {"topk_ids": np.array([[[3, 5, 0]]], np.int32),
         "topk_logprobs": np.log(np.array([[[0.1, 0.3, 0.2]]], np.float32)),
         "topk_valid": np.array([[[1, 1, 0]]], np.float32)}
  got = tokens.token_sparse_topk_kd(Outputs(jnp.asarray(exact), {}, {}), {}, one)
  assert abs(float(got)) < 1e-6
  grad = jax.grad(lambda x: tokens.token_sparse_topk_kd(Outputs(x, {}, {}), {}, batch))(
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
  # of 'WORD WORD.') of 4 alternatives, of which 'éé' (two bytes) does not map.
  def counts(records):
    tokens = 12 * records if role == "blackbox_topk" else 0
    return {"records": records, "truncated_records": 0, "alternatives": 4 * tokens,
            "unmapped_alternatives": tokens, "teacher_tokens": tokens,
            "teacher_tokens_without_mapped_alternative": 0}
  assert result["data"] == {"train": counts(360), "test": counts(40)}
  logged = [r for r in rows if "train/loss" in r]
  if role == "blackbox_topk":
    kd = [r["train/loss/token_sparse_topk_kd"] for r in logged]
    assert kd[-1] < kd[0] and kd[0] > 0, kd
    # The counts of what did not map are reported: here the 'éé' alternatives, every one.
    assert "do not map to the student's vocabulary" in proc.stderr
  else:
    assert not any("sparse" in key for key in logged[-1])


def test_byte_pieces_and_special_tokens_keep_the_teachers_offsets():
  """A lone byte of a multi-byte character (`bytes:\\xc3`, U+FFFD in the completion's text)
  stays one byte, so the next token's log-probs land on its own position; a special token
  adds no text and maps nothing."""
  record = {"prompt": "", "completion": "a\ufffdb", "tokens": ["a", "bytes:\\xc3", "<pad>", "b"],
            "top_logprobs": [{"a": -0.1}, {"bytes:\\xc3": -0.2, "é": -3.0}, {"<pad>": -0.3},
                             {"b": -0.4}]}
  assert blackbox._problem(record) is None
  records = [blackbox.Record(record["prompt"], record["completion"], tuple(record["tokens"]),
                             tuple(tuple(a.items()) for a in record["top_logprobs"]))]
  rows, counts = blackbox.build_rows(records, BYTES, seq_len=8)
  np.testing.assert_array_equal(rows["tokens"][0, :4], [BOS, ord("a"), 0xC3, ord("b")])
  assert [rows["topk_ids"][0, t, 0] for t in range(3)] == [ord("a"), 0xC3, ord("b")]
  np.testing.assert_allclose(rows["topk_logprobs"][0, :3, 0], [-0.1, -0.2, -0.4])
  assert counts == blackbox.MappingCounts(records=1, entries=5, unmapped=2, positions=4,
                                          empty_positions=1)


def test_teacher_file_batches_resume_and_split_by_process(tmp_path):
  """A run on a teacher file resumes where it stopped: an iterator restored from another's
  saved position gives the same next batch, log-probs included, and two processes' halves
  make up the one-process batch."""
  import ml_collections

  from distill_jax.data import text

  path = teacher_file(tmp_path / "teacher.jsonl", 60, with_log_probs=True)
  config = ml_collections.ConfigDict({"name": "jsonl", "train_files": str(path),
                                      "eval_files": "", "eval_fraction": 0.1,
                                      "train_split": "train", "eval_split": "test",
                                      "seq_len": 32, "tokenizer": "bytes"})
  one = text.train_iterator(config, global_batch_size=8, seed=1)
  first = [next(one) for _ in range(9)]  # 54 train records: past the first epoch (6 steps).
  keys = ("tokens", "targets", "mask", "id", *blackbox.TOPK_KEYS)
  assert set(keys) <= set(first[0]) and first[0]["topk_valid"].sum() > 0
  halves = [text.train_iterator(config, global_batch_size=8, seed=1, process_index=i,
                                process_count=2) for i in range(2)]
  for batch in first[:2]:
    parts = [next(h) for h in halves]
    for key in keys:
      np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), batch[key])
  for step in (3, 7):
    resumed = text.train_iterator(config, global_batch_size=8, seed=1)
    resumed.set_state(json.loads(json.dumps({**one.get_state(), "step": step})))
    batch = next(resumed)
    for key in keys:
      np.testing.assert_array_equal(batch[key], first[step][key], err_msg=f"{step} {key}")


def test_a_top_k_file_is_refused_on_policy(tmp_path):
  """A file's top-k log-probabilities are for the file's tokens: with on_policy.fraction > 0
  the rows would be the student's samples, which no file scores, so `build_run` refuses,
  naming the keys; a text-only file (no side data) is accepted on-policy."""
  from distill_jax.train import loop

  settings = {"on_policy.fraction": 1.0, "parallel.num_devices": 1}
  path = teacher_file(tmp_path / "topk.jsonl", 40, with_log_probs=True)
  with pytest.raises(ConfigError) as error:
    loop.build_run(load_config_file(f"{LM}:blackbox_topk,tiny",
                                    {"data.train_files": path, **settings}))
  assert str(error.value) == (
      "config.on_policy.fraction=1.0 replaces the rows by the student's samples, but these "
      "batch keys would still describe the original rows: topk_ids, topk_logprobs, topk_valid "
      "(a black-box teacher's top-k log-probabilities for the file's tokens, which no teacher "
      "can give for the student's samples; train on the file's text (on_policy.fraction=0), "
      "or distill on-policy from a live teacher).")
  path = teacher_file(tmp_path / "text.jsonl", 40, with_log_probs=False)
  built = loop.build_run(load_config_file(f"{LM}:blackbox_text,tiny",
                                          {"data.train_files": path, **settings}))
  assert built.on_policy.fraction == 1.0
