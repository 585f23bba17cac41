"""`distill-jax collect` against a fake OpenAI-compatible teacher on 127.0.0.1
(tests/fake_openai.py): both API shapes parsed into the black-box format, faults (429 with
Retry-After, 500, dropped connections, answers cut short, stalls) ending in the fault-free
file, a run killed with SIGKILL and rerun ending in the same file, the API key kept out of the
output and the logs, the request rate, bad settings refused, and a student trained through the
CLI on a collected file."""

import email.utils
import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import ROOT, cli_env
from fake_openai import MODEL, FakeOpenAI, expected_records, teach, text_of

from distill_jax.data.text import blackbox
from distill_jax.endpoints import answers, client
from distill_jax.endpoints.collect import CollectError, ServerError, collect
from distill_jax.endpoints.collect_io import read_prompts

FAST = {"backoff": 0.005, "max_backoff": 0.02, "progress": False}


def sampling(api="completions", n=2, k=3, seed=7, max_tokens=12, separate=False):
  return {"api": api, "model": "teacher", "max_tokens": max_tokens, "temperature": 1.0,
          "top_p": 1.0, "top_logprobs": k, "n": n, "seed": seed, "separate_samples": separate}


def prompts_file(path, count, jsonl=True):
  with open(path, "w") as f:
    for i in range(count):
      text = f"say {['apple', 'river', 'stone', 'cloud'][i % 4]} {i}: "
      f.write(json.dumps({"id": f"p{i}", "prompt": text}) + "\n" if jsonl else text + "\n")
  return str(path)


def lines(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def clean_server():
  server = FakeOpenAI()
  yield server
  server.close()


def test_both_shapes_become_records_by_hand():
  prompt = answers.Prompt(3, "Q: ")
  settings = sampling(n=1, k=2)
  # Completions: a partial character named bytes:, a stop token after the text (cut), the
  # sampled token missing from the top-k (added), a -inf alternative (dropped).
  completion = {"choices": [{"index": 0, "text": "é!", "finish_reason": "stop", "logprobs": {
      "tokens": ["bytes:\\xc3", "bytes:\\xa9", "!", "<|end|>"],
      "token_logprobs": [-0.5, -0.01, -2.0, -0.1],
      "top_logprobs": [{"bytes:\\xc3": -0.5, "x": -1.5}, {"bytes:\\xa9": -0.01},
                       {"?": -0.3, "z": float("-inf")}, {"<|end|>": -0.1}]}}],
      "model": "served-name", "usage": {"prompt_tokens": 3, "completion_tokens": 4}}
  parsed, usage = answers.parse_answer("completions", completion, prompt, n=1, first_sample=0,
                                       sampling=settings)
  assert usage == {"prompt_tokens": 3, "completion_tokens": 4}
  assert parsed[0].dropped == 1 and parsed[0].note is None
  assert parsed[0].record == {
      "id": 3, "sample": 0, "prompt": "Q: ", "completion": "é!",
      "tokens": ["bytes:\\xc3", "bytes:\\xa9", "!"],
      "top_logprobs": [{"bytes:\\xc3": -0.5, "x": -1.5}, {"bytes:\\xa9": -0.01},
                       {"?": -0.3, "!": -2.0}],
      "model": "served-name", "finish_reason": "stop", "sampling": settings}
  # Chat: bytes decide the names; two alternatives of one string add up (log-sum-exp); a
  # log-prob above 0 by rounding is 0.
  entry = {"token": "\ufffd", "logprob": 1e-5, "bytes": [0xe2], "top_logprobs": [
      {"token": "\ufffd", "logprob": 1e-5, "bytes": [0xe2]},
      {"token": "ab", "logprob": -2.0, "bytes": [97, 98]},
      {"token": "ab", "logprob": -3.0, "bytes": [97, 98]}]}
  rest = [{"token": "\ufffd", "logprob": -0.1, "bytes": [0x82, 0xac], "top_logprobs": []}]
  chat = {"choices": [{"index": 0, "message": {"content": "€"}, "finish_reason": "length",
                       "logprobs": {"content": [entry, *rest]}}]}
  parsed, usage = answers.parse_answer("chat", chat, prompt, n=1, first_sample=4,
                                       sampling=settings)
  record = parsed[0].record
  assert usage == {"prompt_tokens": 0, "completion_tokens": 0}
  assert record["tokens"] == ["bytes:\\xe2", "bytes:\\x82\\xac"] and record["sample"] == 4
  assert record["model"] == "teacher"  # No model in the answer: the one asked for.
  top = record["top_logprobs"]
  assert top[0]["bytes:\\xe2"] == 0.0 and top[1] == {"bytes:\\x82\\xac": -0.1}
  np.testing.assert_allclose(top[0]["ab"], np.logaddexp(-2.0, -3.0), rtol=1e-12)
  assert blackbox.record_problem(record) is None  # The metadata reads; a misspelling not.
  assert "unknown field(s) ['top_logprob']" in blackbox.record_problem({**record,
                                                                        "top_logprob": []})
  # Tokens that do not join to the text: the text stays, the log-probs go, with a note.
  chat["choices"][0]["message"]["content"] = "x€"
  parsed, _ = answers.parse_answer("chat", chat, prompt, n=1, first_sample=0,
                                   sampling=settings)
  assert "tokens" not in parsed[0].record and "do not join" in parsed[0].note
  # Malformed log-probs (a length mismatch): the text stays, with a note.
  completion["choices"][0]["logprobs"]["token_logprobs"].pop()
  parsed, _ = answers.parse_answer("completions", completion, prompt, n=1, first_sample=0,
                                   sampling=settings)
  assert parsed[0].record["completion"] == "é!" and "tokens" not in parsed[0].record
  assert "malformed (logprobs has 4 tokens, 4 top_logprobs and 3" in parsed[0].note
  with pytest.raises(answers.AnswerError, match="asked for 2 choice"):
    answers.parse_answer("chat", chat, prompt, n=2, first_sample=0, sampling=settings)


@pytest.mark.parametrize("api", ["completions", "chat"])
def test_faults_end_in_the_fault_free_file(tmp_path, clean_server, api):
  prompts = prompts_file(tmp_path / "prompts.jsonl", 24)
  options = {"api": api, "n": 2, "top_logprobs": 3, "seed": 7, "max_tokens": 12,
             "concurrency": 4, **FAST}
  reference = tmp_path / "clean.jsonl"
  before = len(clean_server.requests)
  collect(clean_server.url, "teacher", prompts, str(reference), **options)
  # Every prompt once, in order, each as the teacher answered it (the fake's own account).
  expected = [r for p in read_prompts(prompts, api)
              for r in expected_records(p.id, p.text, sampling(api))]
  assert lines(reference) == expected
  bodies = [body for _, _, body, _ in clean_server.requests[before:]]
  assert len(bodies) == 24 and {(b["seed"], b["n"]) for b in bodies} == {(7, 2)}
  faulty = FakeOpenAI(faults=True, stall=0.6)
  try:
    out = tmp_path / "faulty.jsonl"
    summary = collect(faulty.url, "teacher", prompts, str(out), retries=5, timeout=0.3,
                      **options)
  finally:
    faulty.close()
  assert out.read_bytes() == reference.read_bytes()
  # Every kind of fault was served and retried.
  assert set(faulty.faults) == {"429", "500", "drop", "cut", "stall"}, faulty.faults
  assert sum(summary.retries.values()) == sum(faulty.faults.values()) >= 10
  assert {"HTTP 429", "HTTP 500", "ReadTimeout"} <= set(summary.retries), summary.retries
  assert summary.answered == 24 and summary.records == 48 and summary.refused == ()
  assert summary.completion_tokens == sum(len(r["tokens"]) for r in expected)
  assert summary.requests == len(faulty.requests)
  # The file reads as a black-box teacher file.
  records = blackbox.read_records(str(out))
  assert len(records) == 48 and records[0].tokens == tuple(expected[0]["tokens"])


def test_a_killed_run_resumes_to_the_same_file_and_the_key_stays_secret(
    tmp_path, clean_server, caplog, monkeypatch):
  secret = "sk-test-5ecret-never-logged"
  prompts = prompts_file(tmp_path / "prompts.txt", 60, jsonl=False)
  with open(prompts, "a") as f:
    f.write("REFUSE this one\n")  # Line 61: a 400 whose message echoes the key.
  options = {"n": 2, "top_logprobs": 2, "seed": 3, "max_tokens": 8, "concurrency": 2}
  reference = tmp_path / "clean.jsonl"
  collect(clean_server.url, "teacher", prompts, str(reference), **options, **FAST)
  server = FakeOpenAI(faults=True, latency=0.03, api_key=secret)
  out = tmp_path / "out.jsonl"
  try:
    # The CLI, killed with SIGKILL once it has written 12 records.
    proc = subprocess.Popen(
        [sys.executable, "-m", "distill_jax.main", "collect", f"--endpoint={server.url}",
         "--model=teacher", f"--prompts={prompts}", f"--out={out}", "--backoff=0.005",
         "--verbosity=1", *(f"--{k}={v}" for k, v in options.items())],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
        env={**cli_env(), "OPENAI_API_KEY": secret})
    deadline = time.monotonic() + 120
    while (not out.exists() or out.read_text().count("\n") < 12) and proc.poll() is None:
      assert time.monotonic() < deadline
      time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    killed = proc.communicate()
    written = out.read_text().count("\n")
    assert proc.returncode == -signal.SIGKILL and 12 <= written < 120, (written, killed[1])
    assert "retry 1 in" in killed[1]  # --verbosity=1 logs each retry.
    # As if killed inside a write: the last prompt with one of its two samples, and a
    # partial line.
    kept = out.read_text().splitlines(keepends=True)[:-1]
    out.write_text("".join(kept) + '{"id": 99, "sample": 0, "prom')
    # The rerun (here the Python function) continues the file.
    monkeypatch.setenv("OPENAI_API_KEY", secret)
    summary = collect(server.url, "teacher", prompts, str(out), **options, **FAST)
  finally:
    server.close()
  assert out.read_bytes() == reference.read_bytes()
  assert len(lines(out)) == 120 and "cut 29 byte(s) at its end (a partial line)" in caplog.text
  assert f"(prompt {written // 2} with 1 of 2 samples)" in caplog.text
  assert (summary.already_done, summary.answered) == (written // 2 - 1, 61 - written // 2)
  assert [key for key, _ in summary.refused] == [61] and "Bearer ***" in summary.text()
  # The key was sent, and is nowhere in the output, the logs or the file.
  assert {auth for *_, auth in server.requests} == {f"Bearer {secret}"}
  for text in (*killed, caplog.text, summary.text(), out.read_text()):
    assert secret not in text


def test_rate_limit_spaces_the_requests(tmp_path, clean_server):
  prompts = prompts_file(tmp_path / "prompts.jsonl", 8)
  before = len(clean_server.requests)
  collect(clean_server.url, "teacher", prompts, str(tmp_path / "out.jsonl"), n=1,
          max_tokens=4, concurrency=4, rate=25.0, **FAST)
  times = sorted(t for t, *_ in clean_server.requests[before:])
  assert len(times) == 8 and times[-1] - times[0] >= 7 / 25 * 0.9, np.diff(times)


def test_retry_after_is_honoured(tmp_path):
  assert client.retry_after("2.5") == 2.5
  assert client.retry_after("junk") is None and client.retry_after("nan") is None
  assert client.retry_after("99999") == client.MAX_RETRY_AFTER
  later = email.utils.formatdate(time.time() + 30, usegmt=True)
  assert 28 <= client.retry_after(later) <= 30
  server = FakeOpenAI(fail_first=("429", "503"), retry_after="0.4")
  try:
    summary = collect(server.url, "teacher", ["apple"], str(tmp_path / "out.jsonl"),
                      max_tokens=4, **FAST)
  finally:
    server.close()
  times = [t for t, *_ in server.requests]
  assert len(times) == 3 and summary.retries == {"HTTP 429": 1, "HTTP 503": 1}
  # Each retry waited what the server asked, not the 5 ms backoff.
  assert min(np.diff(times)) >= 0.4, np.diff(times)


def test_separate_samples_seeds_and_the_cost(tmp_path, clean_server):
  prompts = prompts_file(tmp_path / "prompts.jsonl", 3)
  before = len(clean_server.requests)
  summary = collect(clean_server.url, "teacher", prompts, str(tmp_path / "out.jsonl"), n=2,
                    separate_samples=True, seed=5, max_tokens=6, price_per_1k_prompt=2.0,
                    price_per_1k_completion=30.0, **FAST)
  bodies = [body for _, _, body, _ in clean_server.requests[before:]]
  # One request per sample, seed + i each, in prompt order per prompt.
  assert sorted((b["prompt"], b["n"], b["seed"]) for b in bodies) == sorted(
      (text, 1, seed) for text in (p.text for p in read_prompts(prompts, "completions"))
      for seed in (5, 6))
  records = lines(tmp_path / "out.jsonl")
  assert [(r["id"], r["sample"]) for r in records] == [
      (f"p{i}", j) for i in range(3) for j in range(2)]
  for r in records:
    assert r["completion"] == text_of(teach(r["prompt"], 5 + r["sample"], 0, 6, 0)[0])
  prompt_tokens = 2 * sum(len(r["prompt"].encode()) for r in records[::2])
  completion_tokens = sum(len(teach(r["prompt"], 5 + r["sample"], 0, 6, 0)[0]) for r in records)
  assert (summary.prompt_tokens, summary.completion_tokens) == (prompt_tokens,
                                                                completion_tokens)
  assert summary.cost == pytest.approx((2.0 * prompt_tokens + 30.0 * completion_tokens) / 1000,
                                       rel=1e-12)


def test_bad_settings_and_other_files_are_refused(tmp_path, clean_server):
  prompts = prompts_file(tmp_path / "prompts.jsonl", 3)
  out = str(tmp_path / "out.jsonl")
  for options, message in (({"top_p": 0.0}, "--top_p=0.0: expected a number in (0, 1]"),
                           ({"api": "edit"}, "--api='edit': expected one of"),
                           ({"n": 0}, "--n=0: expected an integer >= 1"),
                           ({"api_key_env": "NO_SUCH_VAR_X"}, "--api_key_env=NO_SUCH_VAR_X")):
    with pytest.raises(CollectError, match=message.replace("(", r"\(").replace(")", r"\)")
                       .replace("[", r"\[").replace("]", r"\]")):
      collect(clean_server.url, "teacher", prompts, out, **options, **FAST)
  with pytest.raises(CollectError, match="expected an http"):
    collect("127.0.0.1:1", "teacher", prompts, out, **FAST)
  with pytest.raises(ServerError, match="HTTP 404: model 'nobody' does not exist"):
    collect(clean_server.url, "nobody", prompts, out, **FAST)
  assert not os.path.exists(out)  # Nothing written, no file.
  collect(clean_server.url.removesuffix("/v1"), "teacher", prompts, out, max_tokens=4, **FAST)
  with pytest.raises(CollectError, match=r"other settings: temperature=1.0 \(now 0.5\)"):
    collect(clean_server.url, "teacher", prompts, out, max_tokens=4, temperature=0.5, **FAST)
  other = prompts_file(tmp_path / "other.jsonl", 2)
  with open(other, "a") as f:
    f.write(json.dumps({"id": "p0", "prompt": "changed"}) + "\n")
  with pytest.raises(CollectError, match="given twice"):
    collect(clean_server.url, "teacher", other, out, max_tokens=4, **FAST)
  with open(other, "w") as f:
    f.write(json.dumps({"id": "p0", "prompt": "changed"}) + "\n")
  with pytest.raises(CollectError, match="out.jsonl:1: the prompt 'p0' is not in this"):
    collect(clean_server.url, "teacher", other, out, max_tokens=4, **FAST)
  # Every prompt refused from the start: the settings, not the prompts; the run stops.
  with pytest.raises(ServerError, match="refused the first 10 prompts"):
    collect(clean_server.url, "teacher", [f"REFUSE {i}" for i in range(30)],
            str(tmp_path / "refused.jsonl"), max_tokens=4, concurrency=2, **FAST)
  # From Python, a list of prompts (strings, or objects with their own ids).
  listed = tmp_path / "listed.jsonl"
  collect(clean_server.url, "teacher", ["apple", {"id": "x", "prompt": "river"}], str(listed),
          max_tokens=4, **FAST)
  assert [(r["id"], r["prompt"]) for r in lines(listed)] == [(1, "apple"), ("x", "river")]
  # Chat messages are sent as they are and kept; the record's prompt joins their contents.
  messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
  chat = tmp_path / "chat.jsonl"
  collect(clean_server.url, "teacher", [{"messages": messages}], str(chat), api="chat",
          max_tokens=4, **FAST)
  (record,) = lines(chat)
  assert clean_server.requests[-1][2]["messages"] == messages == record["messages"]
  assert record["prompt"] == "be brief\nhi"
  assert record["completion"] == text_of(teach("be brief\nhi", None, 0, 4, 0)[0])
  with pytest.raises(CollectError, match="prompts:1: \"messages\" needs --api=chat"):
    collect(clean_server.url, "teacher", [{"messages": messages}], str(chat), **FAST)
  # Done is done: a rerun sends nothing.
  before = len(clean_server.requests)
  summary = collect(clean_server.url, "teacher", prompts, out, max_tokens=4, **FAST)
  assert summary.already_done == 3 and summary.answered == 0
  assert len(clean_server.requests) == before


def test_a_student_trains_on_a_collected_file_through_the_cli(tmp_path, clean_server):
  prompts = prompts_file(tmp_path / "prompts.jsonl", 160)
  out = tmp_path / "teacher.jsonl"
  collect(clean_server.url, "teacher", prompts, str(out), api="chat", top_logprobs=4,
          max_tokens=16, seed=1, concurrency=8, **FAST)
  workdir = tmp_path / "run"
  proc = subprocess.run(
      [sys.executable, "-m", "distill_jax.main",
       f"--config={os.path.join(ROOT, 'configs', 'lm.py')}:blackbox_topk,tiny",
       f"--workdir={workdir}", f"--config.data.train_files={out}", "--config.num_steps=8",
       "--config.optim.lr=0.01"], capture_output=True, text=True, cwd=ROOT, env=cli_env(),
      timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  logged = [r for r in map(json.loads, open(workdir / "metrics.jsonl")) if "train/loss" in r]
  loss = [r["train/loss"] for r in logged]
  kd = [r["train/loss/token_sparse_topk_kd"] for r in logged]
  assert len(loss) == 8 and all(map(math.isfinite, loss)), loss
  assert np.mean(loss[-3:]) < np.mean(loss[:3]) - 0.5 and np.mean(kd[-3:]) < np.mean(kd[:3])
  counts = json.load(open(workdir / "result.json"))["data"]["train"]
  assert counts["records"] == 144 and counts["teacher_tokens"] > 0
  assert MODEL in out.read_text()
