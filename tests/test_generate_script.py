"""scripts/generate.py on a tiny teacher trained through the CLI: the JSON lines parse, one per
prompt, greedy completions equal `generate.sample`'s, and `top_logprobs` are the model's
log-probabilities at those positions."""

import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ROOT, cli_env

from distill_jax.config import load_config_file
from distill_jax.data.text import blackbox
from distill_jax.models.tokenizers import ByteTokenizer
from distill_jax.tasks.language_model import generate
from distill_jax.train.build import build_run

LM = os.path.join(ROOT, "configs", "lm.py")
SCRIPT = os.path.join(ROOT, "scripts", "generate.py")


@pytest.fixture(scope="module")
def teacher(lm_teacher):
  return lm_teacher  # A tiny LM teacher trained through the CLI (conftest).


def _script(*args, check=True):
  proc = subprocess.run([sys.executable, SCRIPT, *map(str, args)], capture_output=True,
                        text=True, env=cli_env(), cwd=ROOT, timeout=600)
  if check:
    assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


def test_greedy_completions_and_top_logprobs(teacher, tmp_path):
  prompts = ["def f(x):", "The", "Ünïcode é"]
  (tmp_path / "p.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
  out = tmp_path / "out.jsonl"
  _script(f"--workdir={teacher}", f"--prompts={tmp_path / 'p.jsonl'}", "--temperature=0",
          "--max_new_tokens=8", "--top_logprobs=3", f"--output={out}", "--batch_size=2")
  records = [json.loads(line) for line in out.read_text().splitlines()]
  assert [r["prompt"] for r in records] == prompts
  # The same prompts through generate.sample in-process (greedy).
  from distill_jax.common.model_io import load_model_variables, read_model_meta
  from distill_jax.models import build_model
  from distill_jax.teachers import init_shapes

  meta = read_model_meta(os.path.join(teacher, "model"))
  model = build_model(meta["model"], meta["num_classes"], **meta["kwargs"])
  variables = load_model_variables(os.path.join(teacher, "model"), init_shapes(model, (32,)))
  tok = ByteTokenizer()
  for prompt, record in zip(prompts, records, strict=True):
    ids = tok.encode(prompt)[:-1]
    tokens, mask = generate.sample(model, variables, ids[None], max_new_tokens=8,
                                   rng=jax.random.PRNGKey(0), greedy=True, eos_id=tok.eos_id,
                                   pad_id=tok.pad_id)
    new = np.asarray(tokens[0, len(ids):])[np.asarray(mask[0, len(ids):]) > 0]
    assert record["completion"] == tok.decode(new)
    body = new[:-1] if len(new) and new[-1] == tok.eos_id else new  # EOS adds no text.
    assert record["tokens"] == [generate.token_str(tok, int(t)) for t in body]
    assert len(record["top_logprobs"]) == len(body) > 0
    # NumPy on the full forward: the 3 most likely tokens and their log-probs at each position.
    logits = np.asarray(model.apply(variables, jnp.asarray(tokens[:, :len(ids) + len(new)])),
                        np.float64)[0, len(ids) - 1:-1]
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1,
                                                                                keepdims=True))
    logp -= logits.max(-1, keepdims=True)
    for row, top in zip(logp[:len(body)], record["top_logprobs"], strict=True):
      want = np.argsort(-row)[:3]
      assert list(top) == [generate.token_str(tok, int(t)) for t in want]
      np.testing.assert_allclose(list(top.values()), row[want], atol=1e-4)
      assert max(top.values()) == pytest.approx(row.max(), abs=1e-4)  # Greedy took the top.
    assert all(math.isfinite(v) for top in record["top_logprobs"] for v in top.values())


def test_prompts_from_the_data_set_and_bad_input(teacher, data_dir, tmp_path):
  out = tmp_path / "data.jsonl"
  _script(f"--workdir={teacher}", f"--config={LM}:teacher,tiny",
          f"--config.data.data_dir={data_dir}", "--num_prompts=5", "--prompt_len=8",
          "--max_new_tokens=6", "--seed=1", f"--output={out}")
  records = [json.loads(line) for line in out.read_text().splitlines()]
  assert len(records) == 5 and all(set(r) == {"prompt", "completion"} for r in records)
  assert all(len(r["completion"].encode()) <= 6 * 3 for r in records)
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"prompt": "a"}\n{"text": "b"}\n')
  proc = _script(f"--workdir={teacher}", f"--prompts={bad}", f"--output={out}", check=False)
  assert proc.returncode != 0 and 'bad.jsonl:2: expected an object with a "prompt"' in proc.stderr
  good = tmp_path / "good.txt"
  good.write_text("a\n")
  proc = _script(f"--workdir={teacher}", f"--prompts={good}", "--max_new_tokens=40",
                 f"--output={out}", check=False)
  assert "exceeds the model's context of 32" in proc.stderr


def test_a_generated_file_is_a_teacher_for_sequence_level_and_top_k_kd(teacher, data_dir,
                                                                       tmp_path):
  """The black-box path end to end: the teacher writes completions with top-k log-probs
  (as an API would), a student trains on that file alone, and the `sequence,kd` role (the
  same file plus the live teacher) builds."""
  out = tmp_path / "teacher.jsonl"
  _script(f"--workdir={teacher}", f"--config={LM}:teacher,tiny",
          f"--config.data.data_dir={data_dir}", "--num_prompts=40", "--prompt_len=8",
          "--max_new_tokens=12", "--top_logprobs=4", f"--output={out}")
  records = [json.loads(line) for line in out.read_text().splitlines()]
  assert len(records) == 40 and all(len(r["top_logprobs"]) == len(r["tokens"]) for r in records)
  workdir = tmp_path / "student"
  proc = subprocess.run(
      [sys.executable, "-m", "distill_jax.main", f"--config={LM}:blackbox_topk,tiny",
       f"--workdir={workdir}", f"--config.data.train_files={out}", "--config.num_steps=4",
       "--config.batch_size=8"], capture_output=True, text=True, env=cli_env(), cwd=ROOT,
      timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.load(open(workdir / "result.json"))
  assert result["steps"] == 4 and math.isfinite(result["final"]["eval/ce"])
  rows = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
  assert all(r["train/loss/token_sparse_topk_kd"] > 0 for r in rows if "train/loss" in r)
  # The log counts what did not map: of the 36 train records' alternatives, the named
  # specials (<eos>, <bos>, <pad>), and all those of a special token in the text (no text, no
  # position); every byte, `bytes:\xNN` pieces included, maps.
  train = records[:36]
  specials = ("<eos>", "<bos>", "<pad>")
  entries = sum(len(a) for r in train for a in r["top_logprobs"])
  unmapped = sum(len(a) if token in specials else sum(t in specials for t in a)
                 for r in train for token, a in zip(r["tokens"], r["top_logprobs"],
                                                    strict=True))
  cut = sum(len(r["prompt"].encode()) + len(b"".join(map(blackbox.token_bytes, r["tokens"])))
            + 1 > 32 for r in train)
  assert cut == 0, "a row was cut: the counts below would cover fewer alternatives"
  assert f"36 records, 0 truncated at seq_len; log-probs: {unmapped} of {entries} " \
         "alternatives do not map" in proc.stderr, proc.stderr[-2000:]
  config = load_config_file(f"{LM}:sequence,kd,tiny", {
      "data.train_files": str(out), "teachers.teacher.checkpoint": teacher})
  run = build_run(config)
  assert set(config.losses) == {"token_ce", "token_fkl"} and "teacher" in run.teacher_vars


def test_the_log_holds_the_scripts_lines_not_orbaxs(tmp_path):
  """An untrained tiny transformer_lm export: loading it (orbax) logs nothing of the
  library's; the script's own line stays."""
  from distill_jax.common.model_io import export_model
  from distill_jax.models import build_model

  kwargs = {"num_layers": 1, "width": 16, "num_heads": 2, "context": 16, "bos_id": 256}
  model = build_model("transformer_lm", 259, **kwargs)
  variables = model.init(jax.random.PRNGKey(0), np.zeros((1, 16), np.int32), train=False)
  export_model(str(tmp_path / "model"), variables, {"model": "transformer_lm",
                                                     "kwargs": kwargs, "num_classes": 259,
                                                     "step": 0})
  (tmp_path / "p.txt").write_text("ab\n")
  out = tmp_path / "out.jsonl"
  proc = _script(f"--checkpoint={tmp_path / 'model'}", f"--prompts={tmp_path / 'p.txt'}",
                 "--max_new_tokens=2", f"--output={out}")
  assert len(out.read_text().splitlines()) == 1
  lines = proc.stderr.splitlines()
  assert not [line for line in lines if "orbax" in line or "checkpoint" in line.lower()], lines
  assert [line for line in lines if "Wrote 1 completions to" in line]
