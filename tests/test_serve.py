"""`distill-jax serve` with the official `openai` client, on 127.0.0.1: completions and chat
equal the sampler's output for the same prompt (greedy, and seeded sampling with the server's
per-choice keys), log-probs equal a NumPy log-softmax of the model's full forward to 1e-5,
`stop` and `n` do what they say, every bad request is a 4xx in OpenAI's error shape naming the
field while the server goes on answering, and 64 concurrent clients all get their own answers.
"""

import functools
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request

import jax
import jax.numpy as jnp
import numpy as np
import openai
import pytest

from distill_jax.common.model_io import export_model
from distill_jax.data.text import blackbox
from distill_jax.endpoints import schema, serve
from distill_jax.models import build_model
from distill_jax.models.tokenizers import ByteTokenizer
from distill_jax.tasks.language_model import generate

KWARGS = {"num_layers": 1, "width": 32, "num_heads": 2, "mlp_dim": 64, "context": 32,
          "bos_id": 256}
NAME = "tiny-lm"
TOK = ByteTokenizer()
PROMPTS = ["The", "def f", "abc", "Hi é"]  # At most 8 tokens with BOS: one prompt bucket.


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
  """A tiny transformer_lm (weights 4x the init's, so its distributions are far from
  uniform), exported as a run's workdir (model/ and a config.json naming the tokenizer)."""
  model = build_model("transformer_lm", 259, **KWARGS)
  variables = jax.jit(model.init)(jax.random.PRNGKey(1), jnp.zeros((1, 32), jnp.int32))
  variables = jax.tree.map(lambda x: 4.0 * x, variables)
  workdir = tmp_path_factory.mktemp("serve") / "run"
  export_model(str(workdir / "model"), variables, {"model": "transformer_lm", "kwargs": KWARGS,
                                                   "num_classes": 259, "step": 0})
  (workdir / "config.json").write_text(json.dumps({"data": {"tokenizer": "bytes"}}))
  return model, variables, str(workdir)


@pytest.fixture(scope="module")
def server(lm):
  with serve.start(lm[2], port=0, max_batch=4, max_new_tokens=8, name=NAME,
                   window_s=0.02) as running:
    yield running


@pytest.fixture(scope="module")
def client(server):
  return openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def reference(lm):
  """The sampler alone on one prompt (batch 1, left-padded to 8 or 24 columns as
  `generate.sample` allows): (prompt ids, the new tokens up to EOS)."""
  model, variables, _ = lm
  compiled = {}

  def run(prompt, max_tokens, temperature=0.0, seed=0, index=0):
    """The first `max_tokens` of 8 drawn (each draw depends only on the tokens before it and
    its step's key, so a shorter budget's draws are a prefix)."""
    ids = TOK.encode(prompt)[:-1]
    width = 8 if len(ids) <= 8 else 24
    if (width, temperature) not in compiled:
      compiled[width, temperature] = jax.jit(functools.partial(
          generate.sample, model, max_new_tokens=8, temperature=temperature,
          eos_id=TOK.eos_id, pad_id=TOK.pad_id))
    padded = np.full((1, width), TOK.pad_id, np.int32)
    padded[0, width - len(ids):] = ids
    rng = jax.random.fold_in(jax.random.PRNGKey(seed), index)[None]
    tokens, mask = jax.device_get(compiled[width, temperature](
        variables, padded, rng=rng, prompt_lengths=np.array([len(ids)])))
    return ids, tokens[0, width:][mask[0, width:] > 0][:max_tokens]
  return run


@pytest.fixture(scope="module")
def log_softmax(lm):
  """(ids, new [n], T) -> NumPy float64 log-softmax of the full forward's logits / T at the
  positions predicting `new` after the prompt `ids`: [n, vocab]. The forward runs on the
  tokens right-padded to the context (causal: the padding changes no earlier logit)."""
  model, variables, _ = lm
  forward = jax.jit(model.apply)

  def run(ids, new, temperature=1.0):
    tokens = np.full((1, KWARGS["context"]), TOK.pad_id, np.int32)
    tokens[0, :len(ids) + len(new)] = np.concatenate([ids, new])
    logits = np.asarray(forward(variables, tokens), np.float64)[0]
    logits = logits[len(ids) - 1:len(ids) - 1 + len(new)] / temperature
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
  return run


def _text(new):
  return TOK.decode(new[:-1] if len(new) and new[-1] == TOK.eos_id else new)


def test_models_and_greedy_completions_with_logprobs(client, reference, log_softmax):
  assert [m.id for m in client.models.list().data] == [NAME]
  response = client.completions.create(model=NAME, prompt=PROMPTS, max_tokens=8,
                                       temperature=0, logprobs=5)
  assert [c.index for c in response.choices] == list(range(len(PROMPTS)))
  generated = 0
  for prompt, choice in zip(PROMPTS, response.choices, strict=True):
    ids, new = reference(prompt, 8)
    generated += len(new)
    assert choice.text == _text(new)
    assert choice.finish_reason == ("stop" if new[-1] == TOK.eos_id else "length")
    body = new[:-1] if new[-1] == TOK.eos_id else new
    lp = log_softmax(ids, body)
    logprobs = choice.logprobs
    assert logprobs.tokens == [generate.token_str(TOK, int(t)) for t in body]
    np.testing.assert_allclose(logprobs.token_logprobs, lp[np.arange(len(body)), body],
                               atol=1e-5)
    for row, top in zip(lp, logprobs.top_logprobs, strict=True):
      want = np.argsort(-row)[:5]
      assert list(top) == [generate.token_str(TOK, int(t)) for t in want]
      np.testing.assert_allclose(list(top.values()), row[want], atol=1e-5)
    starts = [len(prompt) + len(TOK.decode(body[:i])) for i in range(len(body))]
    assert logprobs.text_offset == starts
  assert response.usage.completion_tokens == generated
  assert response.usage.prompt_tokens == sum(len(TOK.encode(p)) - 1 for p in PROMPTS)


def test_chat_seeded_sampling_and_logprobs_at_the_temperature(client, reference, log_softmax):
  """A seeded chat request at T=0.7 with n=2: choice i is the sampler's draw with key
  fold_in(PRNGKey(seed), i); its log-probs are log_softmax(logits / 0.7); the same request
  again gives the same answer."""
  assert schema.chat_prompt([{"role": "system", "content": "Be"}, {
      "role": "user", "content": "hi"}]) == "system: Be\nuser: hi\nassistant:"
  messages = [{"role": "user", "content": "hi"}]
  prompt = schema.chat_prompt(messages)

  def ask():
    return client.chat.completions.create(model=NAME, messages=messages, max_tokens=6,
                                          temperature=0.7, seed=42, n=2, logprobs=True,
                                          top_logprobs=3)

  first = ask()
  for i, choice in enumerate(first.choices):
    ids, new = reference(prompt, 6, temperature=0.7, seed=42, index=i)
    assert choice.index == i and choice.message.role == "assistant"
    assert choice.message.content == _text(new)
    body = new[:-1] if new[-1] == TOK.eos_id else new
    lp = log_softmax(ids, body, temperature=0.7)
    atol = 1e-5 / 0.7  # The model's log-probs to 1e-5, divided by T.
    content = choice.logprobs.content
    assert [c.token for c in content] == [generate.token_str(TOK, int(t)) for t in body]
    assert [c.bytes for c in content] == [[int(t)] for t in body]
    np.testing.assert_allclose([c.logprob for c in content], lp[np.arange(len(body)), body],
                               atol=atol)
    for row, c in zip(lp, content, strict=True):
      want = np.argsort(-row)[:3]
      assert [a.token for a in c.top_logprobs] == [generate.token_str(TOK, int(t))
                                                   for t in want]
      np.testing.assert_allclose([a.logprob for a in c.top_logprobs], row[want], atol=atol)
  assert first.choices[0].message.content != first.choices[1].message.content
  again = ask()
  assert [c.message.content for c in again.choices] == [c.message.content
                                                         for c in first.choices]


def test_stop_cuts_the_text(client, reference):
  _, new = reference(PROMPTS[0], 8)
  text = _text(new)
  stop = text[2:4]
  response = client.completions.create(model=NAME, prompt=PROMPTS[0], max_tokens=8,
                                       temperature=0, stop=[stop], logprobs=0)
  choice = response.choices[0]
  assert choice.text == text[:text.index(stop)] and choice.finish_reason == "stop"
  assert "".join(choice.logprobs.tokens) == choice.text  # Byte tokens: one character each.


def _post(server, path, data, content_type="application/json"):
  """(status, parsed JSON body) of a raw POST."""
  request = urllib.request.Request(server.url + path, data=data, method="POST",
                                   headers={"Content-Type": content_type})
  try:
    with urllib.request.urlopen(request, timeout=60) as response:
      return response.status, json.loads(response.read())
  except urllib.error.HTTPError as e:
    return e.code, json.loads(e.read())


# With logprobs, as the first test's requests: the same compiled batch (no compile more).
GOOD = {"model": NAME, "prompt": "ab", "max_tokens": 2, "temperature": 0, "logprobs": 0}
BAD = [  # (path, body, status, the field the error names, words of its message)
    ("/completions", b'{"model": "tiny-lm", "prompt": ', 400, None, "not valid JSON"),
    ("/completions", b"[1, 2]", 400, None, "JSON object"),
    ("/completions", {**GOOD, "frobnicate": 1}, 400, "frobnicate", "Unknown field"),
    ("/completions", {**GOOD, "temperature": "hot"}, 400, "temperature", "must be a number"),
    ("/completions", {**GOOD, "max_tokens": -3}, 400, "max_tokens", "must be in [1, 8]"),
    ("/completions", {**GOOD, "max_tokens": 2.5}, 400, "max_tokens", "must be an integer"),
    ("/completions", {**GOOD, "prompt": "x" * 40}, 400, "prompt", "max_prompt_tokens=31"),
    ("/completions", {**GOOD, "prompt": "x" * 28, "max_tokens": 8}, 400, "max_tokens",
     "context of 32"),
    ("/completions", {**GOOD, "prompt": 7}, 400, "prompt", "a string or a non-empty list"),
    ("/completions", {**GOOD, "model": "gpt-9"}, 404, "model", "does not exist here"),
    ("/completions", {**GOOD, "n": 5}, 400, "n", "--max_n"),
    ("/completions", {**GOOD, "prompt": ["a", "b", "c"], "n": 2}, 400, "n", "--max_n=4"),
    ("/completions", {**GOOD, "logprobs": 21}, 400, "logprobs", "in [0, 20]"),
    ("/completions", {**GOOD, "stream": True}, 400, "stream", "not supported"),
    ("/completions", {**GOOD, "top_p": 1.5}, 400, "top_p", "in [0.0, 1.0]"),
    ("/chat/completions", {"model": NAME}, 400, "messages", "messages is required"),
    ("/chat/completions", {"model": NAME, "messages": [{"role": "robot", "content": "x"}]},
     400, "messages[0].role", "needs a role"),
    ("/chat/completions", {"model": NAME, "messages": [{"role": "user", "content": "x"}],
                           "top_logprobs": 2}, 400, "top_logprobs", "needs logprobs: true"),
    ("/nowhere", GOOD, 404, None, "No route"),
]


@pytest.mark.parametrize("case", range(len(BAD)))
def test_bad_requests_get_a_4xx_naming_the_field_and_the_server_goes_on(server, client, case):
  path, body, status, param, words = BAD[case]
  data = body if isinstance(body, bytes) else json.dumps(body).encode()
  got, error = _post(server, path, data)
  assert got == status, error
  assert set(error["error"]) == {"message", "type", "param", "code"}
  assert error["error"]["param"] == param and words in error["error"]["message"], error
  assert client.completions.create(**GOOD).choices[0].finish_reason in ("stop", "length")


def test_the_client_sees_the_errors(client):
  with pytest.raises(openai.NotFoundError, match="does not exist here"):
    client.completions.create(model="gpt-9", prompt="a")
  with pytest.raises(openai.BadRequestError, match="max_tokens must be in"):
    client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "a"}],
                                   max_tokens=0)
  with pytest.raises(openai.BadRequestError, match="Unknown field 'presence'"):
    client.completions.create(**GOOD, extra_body={"presence": 1})


def test_64_concurrent_clients_each_get_their_own_greedy_answer(server, reference):
  """64 threads, each with its own client, send 2 requests (prompt and max_tokens varying by
  thread): every answer equals its single-request greedy answer (the sampler alone), none
  fails, and the engine batched them (fewer batches than rows)."""
  budgets = (8, 5)
  want = {(p, m): _text(reference(p, m)[1]) for p in PROMPTS for m in budgets}
  batches, rows = server.engine.batches, server.engine.rows
  answers, errors = {}, []

  def work(i):
    client = openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=300)
    try:
      for j in range(2):
        prompt, budget = PROMPTS[(i + j) % len(PROMPTS)], budgets[(i // 4 + j) % 2]
        response = client.completions.create(model=NAME, prompt=prompt, max_tokens=budget,
                                             temperature=0, logprobs=0)
        answers[i, j] = (prompt, budget, response.choices[0].text)
    except Exception as e:  # noqa: BLE001 - collected and reported below.
      errors.append(repr(e))
    finally:
      client.close()

  threads = [threading.Thread(target=work, args=(i,)) for i in range(64)]
  for t in threads:
    t.start()
  for t in threads:
    t.join(timeout=600)
  assert not errors, errors[:3]
  assert len(answers) == 128
  wrong = [(p, m, text) for p, m, text in answers.values() if text != want[p, m]]
  assert not wrong, wrong[:3]
  assert server.engine.rows - rows == 128
  assert server.engine.batches - batches < 128 / 2  # Batched: 4 slots, most of them full.


def test_the_command_serves_until_interrupted_and_refuses_a_bad_directory(lm, tmp_path,
                                                                           capsys):
  """`distill-jax serve` as a user runs it: it prints its URL, answers, and Ctrl-C (SIGINT)
  ends it with exit code 0. A directory with no model is one line on stderr, exit code 2."""
  from conftest import ROOT, cli_env

  proc = subprocess.Popen(
      [sys.executable, "-m", "distill_jax.main", "serve", f"--model={lm[2]}", "--port=0",
       "--max_new_tokens=4", "--served_name=cli-lm"], stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True, env=cli_env(), cwd=ROOT)
  try:
    line = proc.stdout.readline()
    assert line.startswith("Serving 'cli-lm' at http://127.0.0.1:"), (line, proc.stderr.read()
                                                                      if not line else "")
    url = line.split(" at ")[1].split(" ")[0]
    with urllib.request.urlopen(url + "/models", timeout=60) as response:
      assert json.loads(response.read())["data"][0]["id"] == "cli-lm"
  finally:
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=60)
  assert proc.returncode == 0
  assert serve.main([f"--model={tmp_path}"]) == 2
  error = capsys.readouterr().err.strip()
  assert "holds neither an exported model" in error and "\n" not in error, error


def test_an_open_weights_directory_with_its_own_tokenizer():
  """The tiny Llama fixture (a Hugging Face directory, its tokenizer.json a byte-fallback
  SentencePiece-style BPE): the greedy completion is the full forward's argmax token after
  token, and each token's log-prob and top-2 are a NumPy log-softmax of that forward's."""
  from conftest import ROOT

  from distill_jax.endpoints import engine

  served = engine.load_served_model(os.path.join(ROOT, "tests", "fixtures", "hf", "llama"))
  tok, model, variables = served.tokenizer, served.module, served.variables
  assert tok.name.startswith("hf:") and served.name == "llama"
  prompt, steps = "hi hi", 6
  with serve.start(served, port=0, max_batch=2, max_new_tokens=steps) as server:
    client = openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=120)
    choice = client.completions.create(model="llama", prompt=prompt, max_tokens=steps,
                                       temperature=0, logprobs=2).choices[0]
  # Greedy by the full forward, right-padded to 16 tokens (causal: padding changes nothing
  # before it), one compile.
  forward = jax.jit(model.apply)
  tokens = np.full((1, 16), tok.pad_id, np.int32)
  ids = tok.encode(prompt)[:-1]
  tokens[0, :len(ids)] = ids
  for t in range(len(ids), len(ids) + steps):
    tokens[0, t] = int(np.argmax(forward(variables, tokens)[0, t - 1]))
    if tokens[0, t] == tok.eos_id:
      break
  new = tokens[0, len(ids):t + 1]
  body = new[:-1] if new[-1] == tok.eos_id else new
  # The text is the tokens' bytes joined (the reader's own parse of the names; a random model's
  # bytes need not be UTF-8), which is the tokenizer's decode but for a leading space its
  # decoder drops at a document's start.
  assert len(body) > 0 and choice.text.lstrip(" ") == tok.decode(new).lstrip(" ")
  joined = b"".join(map(blackbox.token_bytes, choice.logprobs.tokens))
  assert joined.decode("utf-8", errors="replace") == choice.text
  assert choice.finish_reason == ("stop" if new[-1] == tok.eos_id else "length")
  logits = np.asarray(forward(variables, tokens), np.float64)[0, len(ids) - 1:]
  lp = logits - logits.max(-1, keepdims=True)
  lp = (lp - np.log(np.exp(lp).sum(-1, keepdims=True)))[:len(body)]
  np.testing.assert_allclose(choice.logprobs.token_logprobs, lp[np.arange(len(body)), body],
                             atol=1e-5)
  for row, top in zip(lp, choice.logprobs.top_logprobs, strict=True):
    want = np.argsort(-row)[:2]
    np.testing.assert_allclose(list(top.values()), row[want], atol=1e-5)


@pytest.mark.parametrize("name", ["llama", "mistral", "qwen2"])
def test_token_bytes_of_the_hf_fixtures(name):
  """`token_bytes_table` (what the server names tokens by): a text's ids join back to its
  bytes (byte-fallback, SentencePiece and byte-level BPE tokenizers). (`hf_byte_lengths`,
  bits per byte's counts, are these bytes' lengths.)"""
  from conftest import ROOT

  from distill_jax.models import tokenizers

  tok = tokenizers.HfTokenizer.from_dir(os.path.join(ROOT, "tests", "fixtures", "hf", name))
  table = tokenizers.token_bytes_table(tok)
  for text in ("hi hi", "hé 😀 x", " Ünï 中"):
    assert b"".join(table[i] for i in tok.encode(text)[1:-1]) == text.encode("utf-8")


def test_a_failed_batch_is_a_500_and_a_body_without_length_a_411(server, client):
  """The worker survives a batch that raises (its requests get a 500 in the error shape, the
  next request is answered), and a POST without Content-Length gets a 411, not a hang."""
  run = server.engine._run
  calls = []

  def fail_once(rows):
    calls.append(len(rows))
    if len(calls) == 1:
      raise RuntimeError("device lost")
    return run(rows)

  server.engine._run = fail_once
  try:
    with pytest.raises(openai.InternalServerError, match="RuntimeError: device lost"):
      client.completions.create(**GOOD)
    assert client.completions.create(**GOOD).choices[0].finish_reason in ("stop", "length")
  finally:
    del server.engine._run
  assert len(calls) == 2
  with socket.create_connection(("127.0.0.1", server.port), timeout=60) as connection:
    connection.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n\r\n")
    reply = b""
    while chunk := connection.recv(65536):  # The server closes the connection after it.
      reply += chunk
    reply = reply.decode()
  assert reply.startswith("HTTP/1.1 411") and "Content-Length header is required" in reply



@pytest.mark.parametrize("api", ["completions", "chat"])
def test_the_collector_reads_the_server_into_a_file_that_trains(server, reference, log_softmax,
                                                                api, tmp_path):
  """`distill-jax collect` against `distill-jax serve` (issue 31's two halves end to end):
  greedy answers with their top-3 log-probs become black-box records in prompt order whose
  tokens' bytes are the text (invalid UTF-8 shown as U+FFFD), each token the argmax of the
  model's own log-softmax after the prompt (the completions' text the sampler's too) with that
  log-prob to 1e-5, and the data layer reads the file into rows with every teacher token at a
  position. (That such a file trains a student through the CLI is test_collect.py's.)"""
  from distill_jax.endpoints import collect

  out, prompts = str(tmp_path / "teacher.jsonl"), PROMPTS[:3]
  summary = collect.collect(server.url, NAME, prompts, out, api=api, max_tokens=8,
                            temperature=0.0, top_logprobs=3, concurrency=3, progress=False)
  records = blackbox.read_records(out)
  assert summary.records == len(prompts) and [r.prompt for r in records] == prompts
  for prompt, record in zip(prompts, records, strict=True):
    if api == "completions":
      ids, new = reference(prompt, 8)
      assert record.completion == _text(new)
    else:  # The server's chat template around the prompt (endpoints/schema.py).
      ids = TOK.encode(schema.chat_prompt([{"role": "user", "content": prompt}]))[:-1]
    data = b"".join(blackbox.token_bytes(t) for t in record.tokens)  # A byte per token here.
    assert data.decode("utf-8", "replace") == record.completion
    body = np.frombuffer(data, np.uint8).astype(np.int64)
    lp = log_softmax(np.asarray(ids), body)
    chosen = [dict(alts)[t] for t, alts in zip(record.tokens, record.top_logprobs, strict=True)]
    np.testing.assert_allclose(chosen, lp[np.arange(len(body)), body], atol=1e-5)
    np.testing.assert_array_equal(np.argmax(lp, -1), body)
  rows, counts = blackbox.build_rows(records, TOK, 32)
  assert counts.positions > 0 and counts.unaligned == 0 and counts.empty_positions == 0
  assert rows["topk_valid"].sum() == counts.entries - counts.unmapped
