"""Open-weights checkpoints (models.hf): tiny Llama, Qwen2 and Mistral directories saved by
transformers (tests/fixtures/hf, made by scripts/make_hf_fixtures.py) load into transformer_lm
with the logits transformers computed; their tokenizer gives the ids `tokenizers` gave; export
then load gives the same arrays; an HF teacher distils a student through the CLI."""

import json
import math
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ROOT, run_cli

from distill_jax import models
from distill_jax.common.model_io import CheckpointError
from distill_jax.config import load_config_file
from distill_jax.data.text import batches
from distill_jax.data.text import info as text_info
from distill_jax.models import hf
from distill_jax.models.tokenizers import HfTokenizer, get_tokenizer, hf_byte_lengths
from distill_jax.models.transformer import rope_frequencies
from distill_jax.train.build import build_run, init_state

FIXTURES = os.path.join(ROOT, "tests", "fixtures", "hf")
NAMES = ("llama", "qwen2", "mistral")
LM = os.path.join(ROOT, "configs", "lm.py")


def _logits(name, dtype):
  directory = os.path.join(FIXTURES, name)
  kwargs, variables, tok = hf.load_hf(directory, dtype)
  module = models.build_model("transformer_lm", tok.vocab_size, **kwargs)
  ref = np.load(os.path.join(directory, "reference.npz"), allow_pickle=False)
  return np.asarray(module.apply(variables, ref["ids"])), ref["logits"], kwargs, variables


@pytest.mark.parametrize("name", NAMES)
def test_logits_match_transformers(name):
  ours, ref, kwargs, variables = _logits(name, "float32")
  assert ours.shape == ref.shape == (2, 16, 320)
  np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=0)
  assert jax.tree.leaves(variables)[0].dtype == jnp.float32
  # The layouts the fixtures were made to cover.
  assert kwargs["qkv_bias"] == (name == "qwen2")
  assert kwargs["tie_embeddings"] == (name == "qwen2")
  assert ("head" in variables["params"]) == (name != "qwen2")
  assert (kwargs["rope_scaling"] or {}).get("type") == {"llama": "llama3", "mistral": "linear",
                                                        "qwen2": None}[name]
  assert kwargs["context"] == {"llama": 2048, "qwen2": 128, "mistral": 32}[name]


@pytest.mark.parametrize("name", NAMES)
def test_bfloat16_logits_are_close(name):
  ours, ref, _, variables = _logits(name, "bfloat16")
  assert {x.dtype for x in jax.tree.leaves(variables)} == {jnp.dtype(jnp.bfloat16)}
  err = np.abs(ours - ref).max()
  assert err < 0.02 * np.abs(ref).max(), err  # Measured: 0.6-0.7% of the largest logit.
  assert err > 0  # It did compute in bf16.


def test_llama3_rope_scaling_against_numpy():
  """Llama 3.1's frequency rule written out per frequency in NumPy."""
  scaling = {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
             "original_max_position_embeddings": 512}
  dim, base = 16, 500000.0
  want = []
  for j in range(dim // 2):
    f = base ** (-2 * j / dim)
    wavelength = 2 * np.pi / f
    if wavelength < 512 / 4:
      want.append(f)
    elif wavelength > 512 / 1:
      want.append(f / 8)
    else:
      s = (512 / wavelength - 1) / (4 - 1)
      want.append((1 - s) * f / 8 + s * f)
  np.testing.assert_allclose(rope_frequencies(dim, base, scaling), want, rtol=1e-6)
  np.testing.assert_allclose(rope_frequencies(dim, base, {"type": "linear", "factor": 2.0}),
                             [base ** (-2 * j / dim) / 2 for j in range(dim // 2)], rtol=1e-6)
  with pytest.raises(ValueError, match=r"'yarn' is not supported.*\['linear', 'llama3'\]"):
    rope_frequencies(dim, base, {"type": "yarn", "factor": 2.0})


def test_tokenizer_ids_match_tokenizers():
  ref = json.load(open(os.path.join(FIXTURES, "tokenizer_reference.json")))
  tok = get_tokenizer(f"hf:{os.path.join(FIXTURES, 'llama')}")
  assert isinstance(tok, HfTokenizer)
  assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (0, 1, 2, 320)
  for string, ids in zip(ref["strings"], ref["ids"], strict=True):
    encoded = tok.encode(string)
    assert encoded.dtype == np.int32
    assert encoded.tolist() == [0, *ids, 1]
    assert tok.decode(encoded) == string  # Byte-level BPE is lossless.


BYTE_TEXTS = ("Hello, world!\n", "Ünïcödé — naïve café", "emoji 😀🎉 and 中文 text",
              "  spaces\tand\r\nlines  ")


def test_byte_lengths_add_up_to_the_utf8_bytes_of_the_text(data_dir):
  """Bits per byte divide by `byte_lengths` summed over the scored tokens: over the ids of an
  encoded text (BOS and EOS included, counting 0) they add up to its UTF-8 length, and over
  a packed corpus's kept targets to the bytes of its documents."""
  from pydoc_data import topics
  tok = get_tokenizer(f"hf:{os.path.join(FIXTURES, 'llama')}")
  lengths = tok.byte_lengths()
  assert lengths.shape == (320,) and lengths[[0, 1, 2]].tolist() == [0, 0, 0]
  for string in BYTE_TEXTS:
    ids = tok.encode(string)
    assert int(lengths[ids].sum()) == len(string.encode("utf-8")), string
    assert lengths[ids].max() > 1  # Tokens of several bytes among them.
  byte_tok = get_tokenizer("bytes")
  for string in BYTE_TEXTS:
    assert int(byte_tok.byte_lengths()[byte_tok.encode(string)].sum()) == len(string.encode())
  config = _hf_config(data_dir, os.path.join(FIXTURES, "qwen2"), os.path.join(FIXTURES, "llama"),
                      **{"data.eval_subset": 0})
  info = text_info.get_text_info(config.data)
  assert info.num_bytes["train"] + info.num_bytes["test"] == sum(
      len(t.encode()) for t in topics.topics.values())


def test_byte_lengths_of_byte_fallback_pieces():
  """A SentencePiece-style BPE (Metaspace '▁', `<0xNN>` byte-fallback pieces, as Llama 2 and
  Mistral ship), built here with `tokenizers`: its pieces' bytes add up to the text's."""
  import tokenizers
  from tokenizers import decoders, pre_tokenizers
  vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
  for piece in ("\u2581", "h", "i", "\u2581h", "\u2581hi", "é"):
    vocab[piece] = len(vocab)
  bpe = tokenizers.models.BPE(vocab=vocab, merges=[("\u2581", "h"), ("\u2581h", "i")],
                              unk_token="<unk>", byte_fallback=True)
  tok = tokenizers.Tokenizer(bpe)
  tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="never")
  tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(),
                                   decoders.Fuse()])
  tok.add_special_tokens(["<s>", "</s>"])
  lengths = hf_byte_lengths(json.loads(tok.to_str()), 300)
  assert lengths.shape == (300,) and lengths[[0, 1, 2, 299]].tolist() == [0, 0, 0, 0]
  assert lengths[vocab["<0xF0>"]] == 1 and lengths[vocab["\u2581hi"]] == 3
  for string in ("hi hi!", "hé 😀 x", "Ünï 中"):
    ids = tok.encode(string).ids
    assert any(3 <= i < 259 for i in ids)  # Byte-fallback pieces among them.
    assert int(lengths[ids].sum()) == len(string.encode("utf-8")), string


def test_export_then_load_gives_the_same_arrays(tmp_path):
  for name in ("llama", "qwen2"):
    kwargs, variables, tok = hf.load_hf(os.path.join(FIXTURES, name), "float32")
    out = hf.export_hf(variables, kwargs, str(tmp_path / name), tok)
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors", "tokenizer.json"]
    kwargs2, variables2, tok2 = hf.load_hf(out, "float32")
    assert kwargs2 == kwargs and tok2.fingerprint() == tok.fingerprint()
    jax.tree.map(np.testing.assert_array_equal, variables2, variables)
    # And the HF tensors themselves are the original files' (names, shapes and values).
    from safetensors.numpy import load_file
    original = load_file(os.path.join(FIXTURES, name, "model.safetensors"))
    exported = load_file(os.path.join(out, "model.safetensors"))
    assert sorted(exported) == sorted(original)
    for key in original:
      np.testing.assert_array_equal(exported[key], original[key], err_msg=key)


def test_export_bfloat16_round_trip(tmp_path):
  kwargs, variables, tok = hf.load_hf(os.path.join(FIXTURES, "mistral"), "bfloat16")
  out = hf.export_hf(variables, kwargs, str(tmp_path / "m"), tok.path)
  assert json.load(open(os.path.join(out, "config.json")))["torch_dtype"] == "bfloat16"
  kwargs2, variables2, _ = hf.load_hf(out, "bfloat16")
  assert kwargs2 == kwargs
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.float32(a), np.float32(b)),
               variables2, variables)


def _copy(name, tmp_path):
  target = tmp_path / name
  shutil.copytree(os.path.join(FIXTURES, name), target)
  return target


def test_bad_directories_are_refused_clearly(tmp_path):
  d = _copy("llama", tmp_path)
  config = json.load(open(d / "config.json"))
  json.dump({**config, "model_type": "gpt2"}, open(d / "config.json", "w"))
  with pytest.raises(ValueError, match=r"model_type 'gpt2'.*\['llama', 'mistral', 'qwen2'\]"):
    hf.load_hf(str(d))
  json.dump({**config, "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4}},
            open(d / "config.json", "w"))
  with pytest.raises(ValueError, match=r"'yarn' is not supported"):
    hf.load_hf(str(d))
  json.dump({**config, "intermediate_size": 48}, open(d / "config.json", "w"))
  with pytest.raises(ValueError, match=r"model.layers.0.mlp.(gate|up|down)_proj.weight' has "
                                       r"shape \((64, 32|32, 64)\); config.json implies"):
    hf.load_hf(str(d))
  json.dump(config, open(d / "config.json", "w"))
  from safetensors.numpy import load_file, save_file
  tensors = load_file(d / "model.safetensors")
  save_file({k: v for k, v in tensors.items() if k != "lm_head.weight"}, d / "model.safetensors")
  with pytest.raises(ValueError, match=r"weights missing .*\['lm_head.weight'\]"):
    hf.load_hf(str(d))
  save_file({**tensors, "model.layers.0.mlp.up_proj.bias": tensors["model.norm.weight"]},
            d / "model.safetensors")
  with pytest.raises(ValueError, match=r"'model.layers.0.mlp.up_proj.bias' is not part of the "
                                       r"llama layout"):
    hf.load_hf(str(d))
  os.remove(d / "model.safetensors")
  with pytest.raises(ValueError, match=r"model.safetensors is missing"):
    hf.load_hf(str(d))
  os.remove(d / "tokenizer.json")
  with pytest.raises(ValueError, match=r"tokenizer.json is missing"):
    hf.load_hf(str(d))
  os.remove(d / "config.json")
  with pytest.raises(ValueError, match=r"config.json is missing"):
    hf.load_hf(str(d))


def test_sharded_checkpoint_loads(tmp_path):
  """Weights split over two shards listed by model.safetensors.index.json."""
  from safetensors.numpy import load_file, save_file
  d = _copy("qwen2", tmp_path)
  tensors = load_file(d / "model.safetensors")
  os.remove(d / "model.safetensors")
  keys = sorted(tensors)
  shards = {"model-00001-of-00002.safetensors": keys[::2],
            "model-00002-of-00002.safetensors": keys[1::2]}
  for file, part in shards.items():
    save_file({k: tensors[k] for k in part}, d / file)
  json.dump({"weight_map": {k: f for f, part in shards.items() for k in part}},
            open(d / "model.safetensors.index.json", "w"))
  ours, ref, _, _ = _logits("qwen2", "float32")
  kwargs, variables, tok = hf.load_hf(str(d))
  module = models.build_model("transformer_lm", tok.vocab_size, **kwargs)
  np.testing.assert_array_equal(np.asarray(module.apply(variables, np.load(
      d / "reference.npz")["ids"])), ours)
  os.remove(d / "model-00002-of-00002.safetensors")
  with pytest.raises(ValueError, match=r"model-00002-of-00002.safetensors is missing"):
    hf.load_hf(str(d))


def _hf_config(data_dir, teacher_dir, tokenizer_dir, **overrides):
  return load_config_file(f"{LM}:fkl,tiny", {
      "data.data_dir": data_dir, "data.tokenizer": f"hf:{tokenizer_dir}",
      "teachers.teacher.model": "hf", "teachers.teacher.checkpoint": teacher_dir,
      "student.kwargs.bos_id": 0, **overrides})


def test_hf_teacher_kwargs_reach_its_module(data_dir):
  """`teachers.NAME.kwargs` of an open-weights teacher are set on the module its config.json
  builds: 'xla' attention and remat give transformers' logits (1e-5), 'cudnn' reaches the
  attention (refused on a CPU); architecture keys are refused, at validate and at load, with
  the keys it takes listed."""
  from distill_jax.common.rules import ConfigError
  from distill_jax.config import validate
  from distill_jax.teachers import load_hf_teacher

  llama = os.path.join(FIXTURES, "llama")
  ref = np.load(os.path.join(llama, "reference.npz"), allow_pickle=False)
  settings = {"checkpoint": llama, "kwargs": {"attention_implementation": "xla", "remat": True}}
  teacher = load_hf_teacher("teacher", settings, 320)
  assert (teacher.module.attention_implementation, teacher.module.remat) == ("xla", True)
  assert teacher.module.num_layers == teacher.kwargs["num_layers"] == 2  # config.json's.
  np.testing.assert_allclose(np.asarray(teacher.module.apply(teacher.variables, ref["ids"])),
                             ref["logits"], atol=1e-5, rtol=0)
  cudnn = load_hf_teacher("teacher", {**settings, "kwargs": {
      "attention_implementation": "cudnn"}}, 320)
  with pytest.raises(ValueError, match="attention_implementation 'cudnn' needs an NVIDIA GPU"):
    cudnn.module.apply(cudnn.variables, ref["ids"])
  message = (r"config.teachers.teacher.kwargs has 'num_layers', which an open-weights teacher "
             r"\(model 'hf'\) does not take: its config.json gives the architecture. It takes "
             r"attention_implementation, remat.")
  with pytest.raises(ConfigError, match=message):
    load_hf_teacher("teacher", {**settings, "kwargs": {"num_layers": 1}}, 320)
  config = _hf_config(data_dir, llama, llama, **{"teachers.teacher.kwargs": {"num_layers": 1}})
  with pytest.raises(ConfigError, match=message):
    validate(config)
  validate(_hf_config(data_dir, llama, llama, **{
      "teachers.teacher.kwargs": {"attention_implementation": "xla"}}))


def test_tokenizer_mismatch_is_refused_naming_both(data_dir, tmp_path):
  teacher = os.path.join(FIXTURES, "qwen2")
  other = _copy("llama", tmp_path)
  spec = json.load(open(other / "tokenizer.json"))
  vocab = spec["model"]["vocab"]  # The same tokens, two of them with swapped ids.
  vocab["a"], vocab["b"] = vocab["b"], vocab["a"]
  json.dump(spec, open(other / "tokenizer.json", "w"))
  config = _hf_config(data_dir, teacher, str(other))
  with pytest.raises(CheckpointError, match=rf"{teacher}/tokenizer.json.*{other}/tokenizer"):
    build_run(config)
  config = _hf_config(data_dir, teacher, str(other), **{"data.tokenizer": "bytes"})
  with pytest.raises(CheckpointError, match=r"320 tokens.*tokenizer has 259"):
    build_run(config)


def test_hf_teacher_distils_a_student_through_the_cli(data_dir, tmp_path):
  teacher = os.path.join(FIXTURES, "qwen2")
  workdir = tmp_path / "run"
  run_cli([f"--config={LM}:fkl,tiny", f"--workdir={workdir}",
           f"--config.data.data_dir={data_dir}",
           f"--config.data.tokenizer=hf:{os.path.join(FIXTURES, 'llama')}",
           "--config.teachers.teacher.model=hf", f"--config.teachers.teacher.checkpoint={teacher}",
           "--config.teachers.teacher.dtype=bfloat16", "--config.student.kwargs.bos_id=0"])
  rows = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
  train = [r for r in rows if "train/loss/token_fkl" in r]
  assert len(train) == 6 and all(r["train/loss/token_fkl"] > 0 for r in train)
  assert train[-1]["train/loss"] < train[0]["train/loss"], train  # The student learns.
  # The teacher the run scored is the Hugging Face one: its held-out CE, recomputed here
  # from the directory with the same tokenizer (bf16 both times).
  final = json.load(open(workdir / "result.json"))["final"]
  config = _hf_config(data_dir, teacher, os.path.join(FIXTURES, "llama"))
  kwargs, variables, tok = hf.load_hf(teacher, "bfloat16")
  module = models.build_model("transformer_lm", tok.vocab_size, **kwargs)
  byte_lengths = get_tokenizer(config.data.tokenizer).byte_lengths()
  nll = count = num_bytes = 0.0
  for batch in batches.eval_batches(config.data, global_batch_size=64):
    logp = jax.nn.log_softmax(np.asarray(module.apply(variables, batch["tokens"])), -1)
    picked = np.take_along_axis(np.asarray(logp), batch["targets"][..., None], -1)[..., 0]
    nll -= float(np.sum(picked * batch["mask"]))
    count += float(batch["mask"].sum())
    num_bytes += float(np.sum(byte_lengths[batch["targets"]] * batch["mask"]))
  assert count > 1000 and num_bytes > 1.2 * count  # Tokens of several bytes.
  assert final["eval/teacher_ce/teacher"] == pytest.approx(nll / count, rel=1e-2)
  # Bits per byte: the student's NLL in bits over the bytes its targets decode to.
  assert final["eval/bits_per_byte"] == pytest.approx(
      final["eval/ce"] * count / math.log(2) / num_bytes, rel=1e-5)
  assert final["eval/kl/teacher"] > 0 and np.isfinite(final["eval/ce"])


def test_student_initialised_from_open_weights(data_dir):
  """config.student = hf.student_config(DIR): the run's initial student is the directory's
  model (its logits are transformers'); other kwargs or another tokenizer are refused."""
  llama = os.path.join(FIXTURES, "llama")
  config = _hf_config(data_dir, os.path.join(FIXTURES, "qwen2"), llama)
  config.student = hf.student_config(llama)
  run = build_run(config)
  state = init_state(config, run)
  ref = np.load(os.path.join(llama, "reference.npz"))
  logits = run.student.apply(state.student_variables(), ref["ids"])
  np.testing.assert_allclose(np.asarray(logits), ref["logits"], atol=1e-5, rtol=0)
  config.student.kwargs.norm_eps = 1e-6
  with pytest.raises(ValueError, match=r"differ from its config.json in \['norm_eps'\]"):
    build_run(config)
  config.student.kwargs.norm_eps = 1e-5
  config.data.tokenizer = "bytes"
  with pytest.raises(ValueError, match=r"tokenizer .*llama/tokenizer.json but the data uses "
                                       r"'bytes'"):
    build_run(config)


def test_open_weights_teacher_is_split_over_fsdp_with_the_same_logits(data_dir):
  """An open-weights teacher on the data=2 x fsdp=4 mesh with `teacher_sharding='fsdp'`: its
  large arrays are split four ways over `fsdp`, and its logits from the placed variables are
  still transformers' (the fixture's reference)."""
  qwen2 = os.path.join(FIXTURES, "qwen2")
  config = _hf_config(data_dir, qwen2, os.path.join(FIXTURES, "llama"), **{
      "parallel.mesh": {"data": 2, "fsdp": 4}, "parallel.teacher_sharding": "fsdp",
      "parallel.min_shard_size": 256})
  run = build_run(config)
  placed = run.parallel.put_teachers(run.teacher_vars)["teacher"]
  leaves = jax.tree_util.tree_flatten_with_path(placed)[0]
  split = {jax.tree_util.keystr(p): x for p, x in leaves if "fsdp" in tuple(x.sharding.spec)}
  big = {jax.tree_util.keystr(p) for p, x in leaves if x.size >= 256 and max(x.shape) % 4 == 0}
  assert split and set(split) == big, sorted(big - set(split))
  for x in split.values():  # Each device holds a quarter of the split axis.
    assert {s.data.size for s in x.addressable_shards} == {x.size // 4}
  ref = np.load(os.path.join(qwen2, "reference.npz"), allow_pickle=False)
  logits = jax.jit(run.teachers["teacher"].module.apply)(placed, ref["ids"])
  np.testing.assert_allclose(np.asarray(logits), ref["logits"], atol=1e-5, rtol=0)
