"""Open weights straight into shards (models.hf.load_hf(shardings=...), reading through
models.hf_loading), and the checkpoints transformers accepts that the loader used to refuse: each
process reads only its devices' slices, the arrays equal a whole read exactly (one process x 8
devices under several shardings, and 2 processes x 4 devices with each process's peak host memory
measured); a tied checkpoint that also stores lm_head.weight; Qwen2 with use_sliding_window where no
layer slides; an open-weights teacher masks documents when the student does."""

import json
import os
import shutil
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import ROOT
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from distill_jax import models
from distill_jax.models import hf, hf_loading
from distill_jax.train.parallel import Parallel

FIXTURES = os.path.join(ROOT, "tests", "fixtures", "hf")


def _whole(directory):
  kwargs, variables, tok = hf.load_hf(directory)
  return kwargs, jax.tree.map(np.asarray, variables), tok


def hf_module(directory):
  kwargs = hf.model_kwargs_from_config(json.load(open(os.path.join(directory, "config.json"))))
  return models.build_model("transformer_lm", 320, **kwargs)


def _logits(directory, variables, ids):
  kwargs = hf.model_kwargs_from_config(json.load(open(os.path.join(directory, "config.json"))))
  module = models.build_model("transformer_lm", 320, **kwargs)
  return np.asarray(jax.jit(module.apply)(variables, ids))


def _split_rule(order):
  """A sharding per leaf over a 2 x 4 mesh ('a', 'b'): 'b' on the first (order=1) or last
  (order=-1) dimension 4 divides, 'a' on another that 2 divides: a layout unlike FSDP's, which
  splits head_dim (the query kernel [32, 4, 8] with order=-1) and several dimensions at once."""
  mesh = Mesh(np.asarray(jax.devices()).reshape(2, 4), ("a", "b"))
  def rule(x):
    spec = [None] * len(x.shape)
    for axis, size in (("b", 4), ("a", 2)):
      for d in list(range(len(x.shape)))[::order]:
        if spec[d] is None and x.shape[d] % size == 0:
          spec[d] = axis
          break
    return NamedSharding(mesh, P(*spec))
  return lambda tree, module=None: jax.tree.map(rule, tree)


@pytest.mark.parametrize("name", ("llama", "qwen2", "mistral"))
def test_sharded_load_equals_the_whole_read(name):
  """FSDP over 8 (the run's own rule), and two 2 x 4 layouts: every parameter has the
  sharding asked for and equals the whole read exactly; the logits from the placed arrays are
  transformers' (the fixture's reference)."""
  directory = os.path.join(FIXTURES, name)
  _, whole, _ = _whole(directory)
  flat = dict(jax.tree_util.tree_flatten_with_path(whole)[0])
  fsdp = Parallel("jit", mesh={"data": 1, "fsdp": 8}, teacher_sharding="fsdp",
                  min_shard_size=64).teacher_shardings_of
  ref = np.load(os.path.join(directory, "reference.npz"))
  for shardings in (fsdp, _split_rule(1), _split_rule(-1)):
    _, placed, _ = hf.load_hf(directory, shardings=shardings)
    want = shardings(jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), whole),
                     hf_module(directory))
    split = 0
    for (path, x), s in zip(jax.tree_util.tree_flatten_with_path(placed)[0],
                            jax.tree.leaves(want), strict=True):
      assert x.sharding == s, jax.tree_util.keystr(path)
      split += len({str(sh.index) for sh in x.addressable_shards}) > 1
      np.testing.assert_array_equal(np.asarray(x), flat[path], err_msg=jax.tree_util.keystr(path))
    assert split >= 10  # Most parameters really are split.
    np.testing.assert_allclose(_logits(directory, placed, ref["ids"]), ref["logits"],
                               atol=1e-5, rtol=0)


def test_read_slice_applies_the_layout_to_each_block():
  """`read_slice` of a block of our layout equals the NumPy conversion of the whole file
  tensor (written here: transposes and reshapes), for every conversion and blocks that
  split heads, head_dim and width."""
  from safetensors.numpy import load_file
  directory = os.path.join(FIXTURES, "qwen2")
  file = os.path.join(directory, "model.safetensors")
  tensors = load_file(file)
  heads = {"q": 4, "k": 2}
  def ours(key):
    t = tensors[key]
    if key.endswith("_proj.weight") and ".self_attn." in key and "o_proj" not in key:
      return t.T.reshape(32, heads.get(key.split(".")[-2][0], 2), 8)  # [width, H, D]
    if key.endswith("o_proj.weight"):
      return t.T.reshape(4, 8, 32)  # [H, D, width]
    if key.endswith("_proj.bias"):
      return t.reshape(-1, 8)  # [H, D]
    if key.endswith("mlp.down_proj.weight") or "mlp." in key:
      return t.T  # [in, out]
    return t
  hows = {"self_attn.q_proj.weight": "heads", "self_attn.k_proj.weight": "heads",
          "self_attn.o_proj.weight": "out", "self_attn.q_proj.bias": "bias",
          "self_attn.v_proj.bias": "bias", "mlp.down_proj.weight": "dense",
          "mlp.gate_proj.weight": "dense", "input_layernorm.weight": "same"}
  rng = np.random.default_rng(0)
  for suffix, how in hows.items():
    key = f"model.layers.1.{suffix}"
    want = ours(key)
    np.testing.assert_array_equal(
        hf_loading.read_slice(file, key, how, want.shape, np.float32), want)
    for _ in range(6):
      index = []
      for n in want.shape:
        start = int(rng.integers(0, n))
        index.append(slice(start, int(rng.integers(start + 1, n + 1))))
      got = hf_loading.read_slice(file, key, how, want.shape, np.float32, tuple(index))
      np.testing.assert_array_equal(got, want[tuple(index)], err_msg=f"{key} {index}")


# -- two processes -------------------------------------------------------------------------

# Big enough that the load's fixed costs (tracing the model's shapes, ~2 MB) are small beside
# it, with a real model's proportions (its largest weight 3% of it; Llama 3.2 1B's: 1.4%).
BIG = {"num_layers": 8, "width": 512, "num_heads": 8, "num_kv_heads": 4, "mlp_dim": 1536,
       "context": 256, "tie_embeddings": False, "bos_id": None, "rope_base": 10000.0,
       "rope_scaling": None, "qkv_bias": False, "norm_eps": 1e-5}


def _write_big_llama(directory):
  """A Llama directory of 101 MB float32 (random weights in the file's own layout), written
  with safetensors' NumPy API and `hf.hf_config`; returns its weights' bytes."""
  from safetensors.numpy import save_file
  os.makedirs(directory)
  config = hf.hf_config(BIG, 320)
  json.dump(config, open(os.path.join(directory, "config.json"), "w"))
  shutil.copy(os.path.join(FIXTURES, "llama", "tokenizer.json"), directory)
  kwargs = hf.model_kwargs_from_config(config)
  rng = np.random.default_rng(1)
  w, m = BIG["width"], BIG["mlp_dim"]
  q, kv = w, w * BIG["num_kv_heads"] // BIG["num_heads"]
  tensors = {"model.embed_tokens.weight": (320, w), "model.norm.weight": (w,),
             "lm_head.weight": (320, w)}
  for i in range(kwargs["num_layers"]):
    layer = f"model.layers.{i}."
    tensors.update({layer + "input_layernorm.weight": (w,),
                    layer + "post_attention_layernorm.weight": (w,),
                    layer + "self_attn.q_proj.weight": (q, w),
                    layer + "self_attn.k_proj.weight": (kv, w),
                    layer + "self_attn.v_proj.weight": (kv, w),
                    layer + "self_attn.o_proj.weight": (w, q),
                    layer + "mlp.gate_proj.weight": (m, w), layer + "mlp.up_proj.weight": (m, w),
                    layer + "mlp.down_proj.weight": (w, m)})
  tensors = {k: rng.standard_normal(s, dtype=np.float32) * 0.02 for k, s in tensors.items()}
  save_file(tensors, os.path.join(directory, "model.safetensors"))
  return sum(t.nbytes for t in tensors.values())


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_read_only_their_shards(tmp_path):
  """2 processes x 4 CPU devices load a 101 MB Llama with FSDP over all 8 devices: the blocks
  each process holds tile every parameter and equal a whole read exactly, and each process's
  peak host memory while loading (VmHWM after minus VmRSS before, tests/hf_shard_worker.py)
  is at most 0.6x the checkpoint (its own half of the shards is 0.5x), while the same
  measurement of a whole read in the same process is at least 0.9x."""
  directory = str(tmp_path / "llama")
  size = _write_big_llama(directory)
  assert size > 100e6
  out = tmp_path / "out"
  out.mkdir()
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
         "DISTILL_JAX_CPU_FLAGS": "0", "MALLOC_MMAP_THRESHOLD_": "65536",
         "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
  coordinator = f"127.0.0.1:{_free_port()}"
  logs = [open(tmp_path / f"{i}.log", "w") for i in range(2)]
  procs = [subprocess.Popen(
      [sys.executable, os.path.join(ROOT, "tests", "hf_shard_worker.py"), directory,
       os.path.join(FIXTURES, "llama"), str(out), coordinator, str(i)],
      env=env, cwd=ROOT, stdout=logs[i], stderr=subprocess.STDOUT) for i in range(2)]
  try:
    for i, proc in enumerate(procs):
      code = proc.wait(timeout=240)
      logs[i].close()
      assert code == 0, open(tmp_path / f"{i}.log").read()[-3000:]
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
        proc.wait()
  _, whole, _ = _whole(directory)
  flat = {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(whole)[0]}
  covered = {k: np.zeros(x.shape, bool) for k, x in flat.items()}
  for i in range(2):
    blocks = np.load(out / f"{i}.npz")
    mine = {k: np.zeros(x.shape, bool) for k, x in flat.items()}
    for name in blocks.files:
      key, index = name.split("|")
      index = tuple(slice(*map(int, s.split(":"))) for s in index.split(","))
      np.testing.assert_array_equal(blocks[name], flat[key][index], err_msg=name)
      mine[key][index] = covered[key][index] = True
    # Half of each split parameter (all but the norms' scales, replicated) is this process's.
    assert sorted(k for k, m in mine.items() if m.mean() == 1) == sorted(
        k for k in flat if k.endswith("['scale']"))
    assert all(m.mean() == 0.5 for k, m in mine.items() if not k.endswith("['scale']"))
    memory = json.load(open(out / f"{i}.json"))
    print(f"process {i}: checkpoint {size / 2**20:.1f} MiB, sharded load peak "
          f"{memory['sharded_peak'] / size:.2f}x, whole read {memory['whole_peak'] / size:.2f}x")
    assert memory["sharded_peak"] <= 0.6 * size, (memory, size)
    assert memory["whole_peak"] >= 0.9 * size, (memory, size)
  assert all(c.all() for c in covered.values())


# -- checkpoints transformers accepts ------------------------------------------------------

def _copy(name, tmp_path):
  target = tmp_path / name
  shutil.copytree(os.path.join(FIXTURES, name), target)
  return target


def test_tied_checkpoint_that_also_stores_lm_head(tmp_path):
  """Qwen2 (tied) with an lm_head.weight in the file that differs from the embedding: it
  loads, the embedding is the head (transformers ties the head to it after loading), so the
  logits are the tied fixture's reference; an untied config reads the stored head."""
  from safetensors.numpy import load_file, save_file
  d = _copy("qwen2", tmp_path)
  tensors = load_file(d / "model.safetensors")
  head = np.random.default_rng(0).standard_normal(tensors["model.embed_tokens.weight"].shape,
                                                  dtype=np.float32)
  save_file({**tensors, "lm_head.weight": head}, d / "model.safetensors")
  ref = np.load(d / "reference.npz")
  kwargs, variables, _ = hf.load_hf(str(d))
  assert kwargs["tie_embeddings"] and "head" not in variables["params"]
  np.testing.assert_allclose(_logits(str(d), variables, ref["ids"]), ref["logits"], atol=1e-5,
                             rtol=0)
  config = json.load(open(d / "config.json"))
  json.dump({**config, "tie_word_embeddings": False}, open(d / "config.json", "w"))
  _, untied, _ = hf.load_hf(str(d))
  np.testing.assert_array_equal(np.asarray(untied["params"]["head"]["kernel"]), head.T)


def test_qwen2_sliding_window_only_where_a_layer_slides(tmp_path):
  """transformers' rule: with use_sliding_window, Qwen2 layers i >= max_window_layers slide
  (or those layer_types names). The fixture (2 layers) with a window of 16 and
  max_window_layers=2 slides nowhere: it loads with its full context and transformers'
  logits; max_window_layers=1 or a layer_types entry slides: the context is the window."""
  d = _copy("qwen2", tmp_path)
  config = json.load(open(d / "config.json"))
  ref = np.load(d / "reference.npz")
  def load(**changes):
    json.dump({**config, "use_sliding_window": True, "sliding_window": 16, **changes},
              open(d / "config.json", "w"))
    return hf.load_hf(str(d))
  kwargs, variables, _ = load(max_window_layers=2, layer_types=None)
  assert kwargs["context"] == 128
  np.testing.assert_allclose(_logits(str(d), variables, ref["ids"]), ref["logits"], atol=1e-5,
                             rtol=0)
  assert load(max_window_layers=2)[0]["context"] == 128  # layer_types: both full.
  assert load(max_window_layers=1, layer_types=None)[0]["context"] == 16
  assert load(layer_types=["full_attention", "sliding_attention"])[0]["context"] == 16
  assert load(use_sliding_window=False, max_window_layers=0)[0]["context"] == 128
  json.dump({**config, "model_type": "mistral", "sliding_window": 16},
            open(d / "config.json", "w"))  # Mistral: every layer slides.
  assert hf.model_kwargs_from_config(json.load(open(d / "config.json")))["context"] == 16


def test_teacher_masks_documents_when_the_student_does(data_dir):
  """The student attends within documents (`student.kwargs.bos_id=0`): the open-weights
  teacher the run builds (read straight into its FSDP shards) does too, at its tokenizer's
  BOS, so a packed row's second document gets the logits it gets alone (RoPE is relative:
  1e-5); with the student's bos_id None the teacher's is None (the directory's own model,
  which lets documents see each other)."""
  from distill_jax.config import load_config_file
  from distill_jax.train.build import build_run
  qwen2, llama = os.path.join(FIXTURES, "qwen2"), os.path.join(FIXTURES, "llama")
  def config(bos_id, **overrides):
    return load_config_file(f"{os.path.join(ROOT, 'configs', 'lm.py')}:fkl,tiny", {
        "data.data_dir": data_dir, "data.tokenizer": f"hf:{llama}",
        "teachers.teacher.model": "hf", "teachers.teacher.checkpoint": qwen2,
        "student.kwargs.bos_id": bos_id, **overrides})
  run = build_run(config(0, **{"parallel.mesh": {"data": 2, "fsdp": 4},
                               "parallel.teacher_sharding": "fsdp"}))
  teacher = run.teachers["teacher"]
  assert teacher.kwargs["bos_id"] == teacher.module.bos_id == 0
  # The run read the teacher straight into the shards the step takes; placing keeps them.
  placed = run.parallel.put_teachers(run.teacher_vars)
  want = run.parallel.teacher_shardings(run.teacher_vars)
  for x, y, s in zip(jax.tree.leaves(run.teacher_vars), jax.tree.leaves(placed),
                     jax.tree.leaves(want), strict=True):
    assert x is y and x.sharding == s
  assert any("fsdp" in tuple(x.sharding.spec) for x in jax.tree.leaves(placed))
  ids = np.load(os.path.join(qwen2, "reference.npz"))["ids"]
  first, second = np.r_[0, ids[0, 1:8]], np.r_[0, ids[1, 1:8]]
  packed = np.r_[first, second][None]
  variables = jax.device_get(teacher.variables)
  alone = np.asarray(teacher.module.apply(variables, second[None]))
  np.testing.assert_allclose(np.asarray(teacher.module.apply(variables, packed))[:, 8:], alone,
                             atol=1e-5, rtol=0)
  unmasked = build_run(config(None)).teachers["teacher"]
  assert unmasked.kwargs["bos_id"] is None
  assert np.abs(np.asarray(unmasked.module.apply(variables, packed))[:, 8:] - alone).max() > 1e-3
