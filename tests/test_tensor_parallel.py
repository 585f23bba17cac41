"""Tensor parallelism: the mesh's `tensor` axis splits transformer_lm's layers by the rules
declared beside the model (models/transformer.py:TENSOR_RULES), composed with FSDP, for the
student and the live teachers alike. The LM KD step on data=2 x fsdp=2 x tensor=2 and on
tensor=8 gives the single-device result; the arrays really are split as the rules say; pmap,
a model without rules and KV heads that do not split are refused, naming the fix."""

import os

import jax
import numpy as np
import pytest
from conftest import ROOT, tiny
from jax.sharding import PartitionSpec as P

from distill_jax.common.layout import check_layout, resolve_mesh
from distill_jax.common.model_io import export_model
from distill_jax.config import ConfigError, load_config_file, validate
from distill_jax.models import build_model
from distill_jax.train.build import build_run, init_state
from distill_jax.train.parallel import Parallel, fsdp_spec

LM = os.path.join(ROOT, "configs", "lm.py")
LLAMA = os.path.join(ROOT, "tests", "fixtures", "hf", "llama")  # Its tokenizer: 320 tokens.
VOCAB = 320  # Splits over 2 and 8, so the embedding and the head are split by vocabulary.
# Every count splits over 8; the student is grouped-query (16 heads read 8 KV heads).
STUDENT = {"num_layers": 1, "width": 32, "num_heads": 16, "num_kv_heads": 8, "mlp_dim": 64,
           "context": 32, "bos_id": 0}
TEACHER = {"num_layers": 2, "width": 32, "num_heads": 8, "num_kv_heads": 8, "mlp_dim": 64,
           "context": 32, "bos_id": 0, "tie_embeddings": False}
LAYOUTS = {
    "one": {"parallel.num_devices": 1},
    # The teacher split over fsdp too, and the student's arrays down to 64 elements.
    "data2_fsdp2_tensor2": {"parallel.mesh": {"data": 2, "fsdp": 2, "tensor": 2},
                            "parallel.teacher_sharding": "fsdp", "parallel.min_shard_size": 64},
    "tensor8": {"parallel.mesh": {"data": 1, "fsdp": 1, "tensor": 8}},
}


@pytest.fixture(scope="module")
def lm_teacher_dir(tmp_path_factory):
  """An untrained (random) transformer_lm teacher over the fixture tokenizer's 320 tokens,
  exported as a run's model: a live teacher whose predictions differ from the student's."""
  directory = str(tmp_path_factory.mktemp("tp") / "teacher")
  module = build_model("transformer_lm", VOCAB, **TEACHER)
  variables = module.init(jax.random.PRNGKey(5), np.zeros((1, 32), np.int32))
  export_model(directory, jax.tree.map(lambda x: 4.0 * x, variables),
               {"model": "transformer_lm", "kwargs": TEACHER, "num_classes": VOCAB, "step": 0})
  return directory


def tp_config(data_dir, teacher_dir, **overrides):
  """configs/lm.py:fkl,tiny (CE + chunked forward KL from a live teacher) over the fixture
  tokenizer, with the sizes above; SGD (see tests/test_lm_train.py on Adam's first steps)."""
  config = load_config_file(f"{LM}:fkl,tiny", {
      "data.data_dir": data_dir, "data.tokenizer": f"hf:{LLAMA}",
      "teachers.teacher.checkpoint": teacher_dir, "optim.name": "sgd", "optim.lr": 0.5,
      **overrides})
  config.student.kwargs = STUDENT
  config.teachers.teacher.kwargs = TEACHER
  return config


def run_steps(config, num_steps, init=None):
  """`num_steps` compiled steps from the host state `init` (default: the config's); returns
  (host init, device state, device teacher vars, host state, host metrics)."""
  run = build_run(config)
  parallel = run.parallel
  if init is None:
    init = jax.device_get(init_state(config, run))
  state = parallel.put_state(init)
  teacher_vars = parallel.put_teachers(run.teacher_vars)
  batches = run.task.train_iterator(config.data, global_batch_size=config.batch_size,
                                    seed=config.seed, side_data=run.side_data["train"])
  for _ in range(num_steps):
    state, metrics = run.train_step(state, teacher_vars, parallel.put_batch(next(batches)))
  return init, state, teacher_vars, parallel.to_host(state), jax.device_get(parallel.get(metrics))


@pytest.fixture(scope="module")
def tp_runs(data_dir, lm_teacher_dir):
  """3 token-KD steps in every layout, all from the one-device run's initial state."""
  init, runs = None, {}
  for name, overrides in LAYOUTS.items():
    init, *runs[name] = run_steps(tp_config(data_dir, lm_teacher_dir, **overrides), 3, init)
  return init, runs


@pytest.mark.parametrize("layout", [name for name in LAYOUTS if name != "one"])
def test_token_kd_step_with_a_tensor_axis_equals_one_device(tp_runs, layout):
  assert jax.device_count() == 8
  init, runs = tp_runs
  _, _, one, one_metrics = runs["one"]
  _, _, got, got_metrics = runs[layout]
  assert int(got.step) == 3
  for (path, want), value in zip(jax.tree_util.tree_flatten_with_path(one.params)[0],
                                 jax.tree.leaves(got.params), strict=True):
    np.testing.assert_allclose(value, want, atol=1e-6, rtol=0,
                               err_msg=f"{layout} {jax.tree_util.keystr(path)}")
  for key in ("loss", "loss/token_ce", "loss/token_fkl", "top1", "agreement"):
    np.testing.assert_allclose(got_metrics[key], one_metrics[key], rtol=1e-5, atol=1e-7,
                               err_msg=f"{layout} {key}")
  assert one_metrics["loss/token_fkl"] > 0.1  # The teacher's predictions differ.
  moved = max(np.abs(a - b).max() for a, b in zip(jax.tree.leaves(one.params["student"]),
                                                  jax.tree.leaves(init.params["student"]),
                                                  strict=True))
  assert moved > 1e-3  # The steps did train the student.


def _spec(x):
  return tuple(x.sharding.spec)


def _shard_shapes(x):
  return {s.data.shape for s in x.addressable_shards}


def test_tensor8_splits_the_student_and_teacher_by_the_rules(tp_runs):
  """On tensor=8 every rule's dimension is split 8 ways (and nothing over fsdp): q/k/v and
  gate/up by outputs, out and down by inputs, the embedding and head by vocabulary; the norms
  whole. The optimizer's momenta follow their parameter."""
  _, runs = tp_runs
  state, teacher_vars, _, _ = runs["tensor8"]
  student = state.params["student"]
  attn, mlp = student["block0"]["attn"], student["block0"]["mlp"]
  assert _spec(attn["query"]["kernel"]) == (None, "tensor", None)  # [32, 16, 2]
  assert _shard_shapes(attn["query"]["kernel"]) == {(32, 2, 2)}
  assert _spec(attn["key"]["kernel"]) == (None, "tensor", None)  # [32, 8, 2]: one KV head each.
  assert _shard_shapes(attn["key"]["kernel"]) == {(32, 1, 2)}
  assert _spec(attn["out"]["kernel"]) == ("tensor", None, None)  # [16, 2, 32]
  assert _spec(mlp["gate"]["kernel"]) == (None, "tensor")
  assert _spec(mlp["up"]["kernel"]) == (None, "tensor")
  assert _spec(mlp["down"]["kernel"]) == ("tensor", None)
  assert _spec(student["embed"]["embedding"]) == ("tensor", None)  # [320, 32]
  assert _shard_shapes(student["embed"]["embedding"]) == {(40, 32)}
  assert _spec(student["final_norm"]["scale"]) == ()
  momenta = [x for x in jax.tree.leaves(state.opt_state) if np.shape(x) == (32, 16, 2)]
  assert momenta and all(_spec(m) == (None, "tensor", None) for m in momenta)
  teacher = teacher_vars["teacher"]["params"]
  assert _spec(teacher["block1"]["attn"]["query"]["kernel"]) == (None, "tensor", None)
  assert _shard_shapes(teacher["block1"]["attn"]["query"]["kernel"]) == {(32, 1, 4)}
  assert _spec(teacher["block1"]["attn"]["out"]["kernel"]) == ("tensor", None, None)
  assert _spec(teacher["head"]["kernel"]) == (None, "tensor")  # [32, 320]: by vocabulary.


def test_tensor_and_fsdp_compose(tp_runs):
  """On data=2 x fsdp=2 x tensor=2 (teacher_sharding='fsdp', min_shard_size 64) an array is
  split over tensor by its rule and over fsdp on another dimension (the largest it divides)."""
  _, runs = tp_runs
  state, teacher_vars, _, _ = runs["data2_fsdp2_tensor2"]
  student = state.params["student"]["block0"]
  query = student["attn"]["query"]["kernel"]  # [32, 16, 2]
  assert _spec(query) == ("fsdp", "tensor", None)
  assert _shard_shapes(query) == {(16, 8, 2)}
  assert _spec(student["attn"]["out"]["kernel"]) == ("tensor", None, "fsdp")  # [16, 2, 32]
  assert _spec(student["mlp"]["down"]["kernel"]) == ("tensor", "fsdp")  # [64, 32]
  teacher = teacher_vars["teacher"]["params"]
  assert _spec(teacher["block0"]["attn"]["query"]["kernel"]) == ("fsdp", "tensor", None)
  assert _spec(teacher["embed"]["embedding"]) == ("tensor", "fsdp")  # [320, 32]
  assert _spec(teacher["final_norm"]["scale"]) == ()  # 32 elements: under the threshold.


def test_fsdp_rule_beside_a_tensor_dimension():
  assert fsdp_spec((32, 16, 2), 2, 0, tensor_dim=1) == P("fsdp", "tensor", None)
  assert fsdp_spec((64, 32), 2, 0, tensor_dim=0) == P("tensor", "fsdp")  # Not the largest.
  assert fsdp_spec((64, 32), 2, 10_000, tensor_dim=0) == P("tensor", None)  # Too small.
  assert fsdp_spec((64, 32), 1, 0, tensor_dim=1) == P(None, "tensor")
  assert fsdp_spec((64, 32), 2, 0) == P("fsdp", None)  # No tensor rule: as before.


def test_pmap_refuses_a_tensor_axis_with_one_message():
  """validate() and Parallel give the same one line, naming the fix."""
  config = tiny("teacher", "unused", **{"parallel.mode": "pmap",
                                        "parallel.mesh": {"data": -1, "tensor": 2}})
  with pytest.raises(ConfigError) as validated:
    validate(config)
  with pytest.raises(ConfigError) as built:
    Parallel("pmap", 8, {"data": -1, "tensor": 2})
  assert str(validated.value) == str(built.value)
  assert "pmap is data parallel only; use parallel.mode='jit' to shard over ['tensor'] " \
         "(or set tensor to 1)" in str(built.value)
  assert resolve_mesh({"tensor": 4}, 8) == {"data": 2, "fsdp": 1, "tensor": 4}
  assert check_layout("jit", {"data": 2, "fsdp": 2, "tensor": 2})["tensor"] == 2
  with pytest.raises(ConfigError, match="has 16 devices but 8 are in use"):
    resolve_mesh({"data": 2, "fsdp": 2, "tensor": 4}, 8)


def test_a_cnn_with_a_tensor_axis_is_refused(data_dir):
  """The CNNs declare no rules: a tensor axis would only repeat their compute, so build_run
  stops (before anything is compiled) naming the model and the fix."""
  config = tiny("teacher", data_dir, **{"parallel.mesh": {"data": -1, "tensor": 2}})
  with pytest.raises(ConfigError, match=r"config.parallel.mesh.tensor=2: the student \(\w+\) "
                                        r"declares no tensor-parallel rules.*set tensor to 1"):
    build_run(config)


def test_kv_heads_that_do_not_split_are_refused(data_dir, lm_teacher_dir):
  config = tp_config(data_dir, lm_teacher_dir, **{"parallel.mesh": {"data": -1, "tensor": 2}})
  config.student.kwargs = {**STUDENT, "num_kv_heads": 1}
  with pytest.raises(ConfigError, match=r"tensor=2 does not fit the student: transformer_lm: "
                                        r"num_kv_heads 1 does not split over a tensor axis of 2"):
    build_run(config)
  parallel = Parallel("jit", 8, {"data": -1, "tensor": 4})
  teacher = build_model("transformer_lm", VOCAB, **{**TEACHER, "num_heads": 4,
                                                    "num_kv_heads": 2})
  with pytest.raises(ConfigError, match=r"does not fit teacher 'big'.*num_kv_heads 2"):
    parallel.declare_models(None, {"big": teacher})


def test_a_vocabulary_that_does_not_split_stays_whole():
  """The byte tokenizer's 259 tokens: the embedding and head stay whole over tensor (no
  padding, which would change the checkpoint's shapes); every other rule applies."""
  module = build_model("transformer_lm", 259, **TEACHER)
  rules = dict(module.tensor_rules(2))
  assert "embed/embedding" not in rules and "head/kernel" not in rules
  assert rules["attn/(query|key|value)/kernel"] == 1
  shapes = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0),
                                              np.zeros((1, 8), np.int32)))
  parallel = Parallel("jit", 8, {"data": -1, "tensor": 2})
  parallel.declare_models(None, {"teacher": module})
  specs = parallel.teacher_shardings({"teacher": shapes})["teacher"]["params"]
  assert tuple(specs["embed"]["embedding"].spec) == ()
  assert tuple(specs["head"]["kernel"].spec) == ()
  assert tuple(specs["block0"]["mlp"]["up"]["kernel"].spec) == (None, "tensor")


def test_tensor4_teacher_takes_under_0_3_of_the_replicated_parameter_bytes():
  """A Llama-like teacher at width 1024 (2 layers, 16 heads / 4 KV heads, MLP 4096, 32,000
  tokens, untied head), abstractly (nothing is materialised): its per-device parameter bytes
  on data=2 x tensor=4 are the sum of its shards' sizes on one device, at most 0.3x (0.2500x:
  91.5 of 366.0 MiB) of the replicated bytes; XLA's compiled memory analysis of its forward
  counts the same argument bytes."""
  kwargs = {"num_layers": 2, "width": 1024, "num_heads": 16, "num_kv_heads": 4,
            "mlp_dim": 4096, "context": 16, "tie_embeddings": False}
  module = build_model("transformer_lm", 32_000, **kwargs)
  tokens = jax.ShapeDtypeStruct((8, 16), np.int32)
  shapes = {"teacher": jax.eval_shape(module.init, jax.random.PRNGKey(0), tokens)}
  per_device, analysed = {}, {}
  for name, mesh in (("replicated", {"data": 8}), ("tensor4", {"data": 2, "tensor": 4})):
    parallel = Parallel("jit", 8, mesh)
    parallel.declare_models(None, {"teacher": module})
    shardings = parallel.teacher_shardings(shapes)
    per_device[name] = sum(
        np.prod(s.shard_shape(x.shape)) * x.dtype.itemsize
        for x, s in zip(jax.tree.leaves(shapes), jax.tree.leaves(shardings), strict=True))
    forward = jax.jit(lambda v, t: module.apply(v["teacher"], t),
                      in_shardings=(shardings, parallel.data_sharded))
    memory = forward.lower(shapes, tokens).compile().memory_analysis()
    rows = parallel.data_sharded.shard_shape(tokens.shape)
    analysed[name] = memory.argument_size_in_bytes - np.prod(rows) * 4  # Less the tokens.
    # The layers run split (Megatron), not by gathering the weights: the forward's
    # temporaries stay under a quarter of one MLP kernel (1024 x 4096 float32, 16 MiB).
    assert memory.temp_size_in_bytes < 4 * 2**20, (name, memory.temp_size_in_bytes)
  total = sum(x.size * 4 for x in jax.tree.leaves(shapes))
  assert per_device["replicated"] == total
  ratio = per_device["tensor4"] / per_device["replicated"]
  assert ratio <= 0.3, ratio
  assert 0.25 <= ratio < 0.2502, ratio  # Only the RMSNorm scales are whole on every device.
  assert analysed == per_device, (analysed, per_device)


def test_open_weights_teacher_split_over_tensor_and_fsdp_gives_transformers_logits(data_dir):
  """The Qwen2 fixture (q/k/v biases, 4 heads / 2 KV heads, 320 tokens) as a teacher on
  data=2 x fsdp=2 x tensor=2: its query kernel and bias are split by heads, its out kernel by
  its input heads, and its logits from the placed variables are still transformers' (the
  fixture's reference)."""
  qwen2 = os.path.join(ROOT, "tests", "fixtures", "hf", "qwen2")
  config = load_config_file(f"{LM}:fkl,tiny", {
      "data.data_dir": data_dir, "data.tokenizer": f"hf:{LLAMA}",
      "teachers.teacher.model": "hf", "teachers.teacher.checkpoint": qwen2,
      "parallel.mesh": {"data": 2, "fsdp": 2, "tensor": 2},
      "parallel.teacher_sharding": "fsdp", "parallel.min_shard_size": 256})
  config.student.kwargs = STUDENT
  run = build_run(config)
  placed = run.parallel.put_teachers(run.teacher_vars)["teacher"]
  # Read straight into these shards (models.hf.load_hf): placing keeps the loaded arrays.
  for loaded, kept in zip(jax.tree.leaves(run.teacher_vars["teacher"]), jax.tree.leaves(placed),
                          strict=True):
    assert kept is loaded
  attn = placed["params"]["block0"]["attn"]
  assert _spec(attn["query"]["kernel"]) == ("fsdp", "tensor", None)  # [32, 4, 8]
  assert _shard_shapes(attn["query"]["kernel"]) == {(16, 2, 8)}
  assert _spec(attn["query"]["bias"]) == ("tensor", None)  # [4, 8]: under the threshold.
  assert _spec(attn["key"]["bias"]) == ("tensor", None)  # [2, 8]: one KV head per device.
  assert _spec(attn["out"]["kernel"]) == ("tensor", None, "fsdp")  # [4, 8, 32]
  ref = np.load(os.path.join(qwen2, "reference.npz"), allow_pickle=False)
  logits = jax.jit(run.teachers["teacher"].module.apply)(placed, ref["ids"])
  np.testing.assert_allclose(np.asarray(logits), ref["logits"], atol=1e-5, rtol=0)


def test_on_policy_step_with_a_tensor_axis_equals_one_device(data_dir, lm_teacher_dir):
  """GKD (configs/lm.py:gkd: the student samples every batch's continuations with its KV
  cache inside the step, then generalized JSD against the live teacher): one step on
  data=4 x tensor=2 draws the same samples as on one device (same loss, same parameters)."""
  results = []
  for overrides in ({"parallel.num_devices": 1},
                    {"parallel.mesh": {"data": 4, "fsdp": 1, "tensor": 2}}):
    config = load_config_file(f"{LM}:gkd,tiny", {
        "data.data_dir": data_dir, "data.tokenizer": f"hf:{LLAMA}",
        "teachers.teacher.checkpoint": lm_teacher_dir, "optim.name": "sgd", "optim.lr": 0.5,
        "on_policy.fraction": 1.0, **overrides})
    config.student.kwargs = STUDENT
    config.teachers.teacher.kwargs = TEACHER
    results.append(run_steps(config, 1, results[0][0] if results else None))
  (_, _, _, one, one_metrics), (_, state, _, got, got_metrics) = results
  assert _spec(state.params["student"]["block0"]["attn"]["query"]["kernel"]) == (
      None, "tensor", None)
  np.testing.assert_allclose(got_metrics["loss"], one_metrics["loss"], rtol=1e-5)
  assert one_metrics["loss/token_jsd"] > 0.01
  for (path, want), value in zip(jax.tree_util.tree_flatten_with_path(one.params)[0],
                                 jax.tree.leaves(got.params), strict=True):
    np.testing.assert_allclose(value, want, atol=1e-6, rtol=0,
                               err_msg=jax.tree_util.keystr(path))
