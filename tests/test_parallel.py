"""One mesh from the config: every layout (pmap, data, data x fsdp with sharded teachers and
states) gives the single-device result, and the arrays really are split as the rule says."""

import jax
import numpy as np
import pytest
from conftest import tiny
from jax.sharding import PartitionSpec as P

from distill_jax import data as data_lib
from distill_jax.common.layout import resolve_mesh
from distill_jax.config import ConfigError
from distill_jax.train import loop
from distill_jax.train.build import build_run, init_state
from distill_jax.train.parallel import Parallel, fsdp_spec

CNN_STUDENT = {"student.name": "cnn", "student.kwargs": {"widths": (8, 16)}}
# name -> overrides. The teacher is configs/digits.py's CNN (32, 64): its stage1/stage2 kernels
# (9216 and 18432 elements) are above the default threshold (4096), the student's are not.
LAYOUTS = {
    "pmap8": {"parallel.mode": "pmap"},
    "data8": {"parallel.mesh": {"data": 8, "fsdp": 1}},
    # The student's and optimizer's arrays sharded too (threshold lowered), and the teacher.
    "data4_fsdp2": {"parallel.mesh": {"data": 4, "fsdp": 2}, "parallel.min_shard_size": 256,
                    "parallel.teacher_sharding": "fsdp"},
    # A sharded teacher and a replicated student (all its arrays below the threshold).
    "data2_fsdp4": {"parallel.mesh": {"data": -1, "fsdp": 4},
                    "parallel.teacher_sharding": "fsdp"},
}


def run_layout(config, num_steps, init=None):
  """`num_steps` compiled steps of the main stage from the host state `init` (default: the
  config's initial state, with the main stage's optimizer state); returns (host init, device
  state, device teacher vars, host state, host metrics)."""
  run = build_run(config)
  parallel = run.parallel
  if init is None:
    init = jax.device_get(init_state(config, run, run.stages[-1]))
  state = parallel.put_state(init)
  teacher_vars = parallel.put_teachers(run.teacher_vars)
  batches = data_lib.train_iterator(config.data, global_batch_size=config.batch_size,
                                    seed=config.seed)
  for _ in range(num_steps):
    state, metrics = run.train_step(state, teacher_vars, parallel.put_batch(next(batches)))
  return init, state, teacher_vars, parallel.to_host(state), parallel.get(metrics)


def assert_close(got, want, atol, what):
  """Leaf by leaf within `atol`, or 1e-5 relative for large values (a BatchNorm variance of 7
  summed in another order differs by a few float32 ulps, about 1e-6 of it)."""
  flat_want = dict(jax.tree_util.tree_flatten_with_path(want)[0])
  flat_got = jax.tree_util.tree_flatten_with_path(got)[0]
  assert len(flat_got) == len(flat_want), what
  for path, value in flat_got:
    np.testing.assert_allclose(value, flat_want[path], atol=atol, rtol=1e-5,
                               err_msg=f"{what} {jax.tree_util.keystr(path)}")


@pytest.fixture(scope="module")
def kd_runs(data_dir, teacher_dir):
  """3 KD steps (CNN student with BatchNorm) on one device and in every layout."""
  base = {"teachers.teacher.checkpoint": teacher_dir, **CNN_STUDENT}
  init, _, _, ref, ref_metrics = run_layout(
      tiny("kd", data_dir, **base, **{"parallel.num_devices": 1}), 3)
  runs = {"one": (None, None, ref, ref_metrics)}
  for name, overrides in LAYOUTS.items():
    _, state, teacher_vars, host, metrics = run_layout(
        tiny("kd", data_dir, **base, **overrides), 3, init)
    runs[name] = (state, teacher_vars, host, metrics)
  return init, runs


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_every_layout_matches_one_device(kd_runs, layout):
  assert jax.device_count() == 8
  init, runs = kd_runs
  _, _, ref, ref_metrics = runs["one"]
  _, _, host, metrics = runs[layout]
  assert int(host.step) == 3
  assert not np.allclose(init.params["student"]["head"]["kernel"],
                         ref.params["student"]["head"]["kernel"])
  for part in ("params", "model_state", "opt_state"):
    assert_close(getattr(host, part), getattr(ref, part), 1e-5, f"{layout} {part}")
  np.testing.assert_allclose(metrics["loss"], ref_metrics["loss"], rtol=1e-5)
  np.testing.assert_allclose(metrics["top1"], ref_metrics["top1"], atol=1e-6)


def _spec(x):
  return x.sharding.spec


def test_teacher_kernels_are_split_and_the_small_student_replicated(kd_runs):
  _, runs = kd_runs
  state, teacher_vars, _, _ = runs["data2_fsdp4"]
  teacher = teacher_vars["teacher"]["params"]
  kernel = teacher["stage2_conv"]["kernel"]  # (3, 3, 32, 64): 18432 elements.
  assert _spec(kernel) == P(None, None, None, "fsdp")
  assert {s.data.shape for s in kernel.addressable_shards} == {(3, 3, 32, 16)}
  # (3, 3, 32, 32): of equal dimensions the first is split.
  assert _spec(teacher["stage1_conv"]["kernel"]) == P(None, None, "fsdp", None)
  assert _spec(teacher["stem_conv"]["kernel"]) == P()  # 288 elements: below the threshold.
  assert all(_spec(x) == P() for x in jax.tree.leaves(state.params["student"]))
  assert all(_spec(x) == P() for x in jax.tree.leaves(state.opt_state))


def test_student_and_optimizer_state_follow_the_rule(kd_runs):
  _, runs = kd_runs
  state, teacher_vars, _, _ = runs["data4_fsdp2"]
  kernel = state.params["student"]["stage2_conv"]["kernel"]  # (3, 3, 8, 16)
  assert _spec(kernel) == P(None, None, None, "fsdp")
  assert {s.data.shape for s in kernel.addressable_shards} == {(3, 3, 8, 8)}
  momenta = [x for x in jax.tree.leaves(state.opt_state) if np.shape(x) == (3, 3, 8, 16)]
  assert momenta and all(_spec(m) == P(None, None, None, "fsdp") for m in momenta)
  assert _spec(state.params["student"]["head"]["bias"]) == P()  # 10 elements.
  assert _spec(teacher_vars["teacher"]["params"]["stage2_conv"]["kernel"]) == P(
      None, None, None, "fsdp")


def test_every_method_on_data2_fsdp4_matches_one_device(data_dir, teacher_dir):
  """Every loss of the library at once (configs/digits.py:all) with the student, the teacher
  and the objective's parameters (connectors, CRD's heads and memory) split where they can."""
  base = {"teachers.teacher.checkpoint": teacher_dir}
  init, _, _, ref, ref_metrics = run_layout(
      tiny("all", data_dir, **base, **{"parallel.num_devices": 1}), 3)
  _, state, teacher_vars, host, metrics = run_layout(tiny("all", data_dir, **base, **{
      "parallel.mesh": {"data": 2, "fsdp": 4}, "parallel.teacher_sharding": "fsdp",
      "parallel.min_shard_size": 1024}), 3, init)
  for part in ("params", "model_state", "objective_state"):
    assert_close(getattr(host, part), getattr(ref, part), 1e-5, f"all {part}")
  np.testing.assert_allclose(metrics["loss"], ref_metrics["loss"], rtol=1e-5)
  split = [x for x in jax.tree.leaves(state) if "fsdp" in tuple(_spec(x))]
  assert len(split) > 10  # Student kernels, connector kernels, CRD memory banks, momenta.


def test_fsdp_rule():
  assert fsdp_spec((3, 3, 32, 64), 4, 4096) == P(None, None, None, "fsdp")
  assert fsdp_spec((3, 3, 32, 64), 4, 100_000) == P()  # Too small.
  assert fsdp_spec((1500, 128), 4, 0) == P("fsdp", None)  # The largest dimension first.
  assert fsdp_spec((1502, 128), 4, 0) == P(None, "fsdp")  # Else the largest that divides.
  assert fsdp_spec((7, 9), 4, 0) == P()  # None divides: replicated.
  assert fsdp_spec((64, 64), 1, 0) == P()  # No fsdp axis.


@pytest.mark.parametrize("mesh, message", [
    ({"data": -1, "fsdp": 3}, "does not divide the 8 devices"),
    ({"data": 3}, "has 3 devices but 8 are in use"),
    ({"data": 2, "fsdp": 2}, "has 4 devices but 8 are in use"),
    ({"data": -1, "fsdp": -1}, "only one axis may be -1"),
    ({"data": -1, "fsdp": 0}, "mesh.fsdp is 0"),
    ({"data": -1, "model": 2}, r"unknown axes \['model'\]"),
])
def test_bad_meshes_are_named(mesh, message):
  with pytest.raises(ConfigError, match=message):
    resolve_mesh(mesh, 8)


@pytest.mark.parametrize("parallel", [
    {"parallel.mesh": {"data": -1, "fsdp": -1}},
    {"parallel.mesh": {"data": -1, "fsdp": 0}},
    {"parallel.mesh": {"data": 2, "model": 2}},
    {"parallel.mesh": {"data": -1, "fsdp": 2}, "parallel.mode": "pmap"},
    {"parallel.teacher_sharding": "sharded"},
    {"parallel.mode": "spmd"},
])
def test_validation_and_parallel_refuse_a_bad_layout_with_one_message(parallel):
  """The layout's rules are written once (common/layout.py): validate() refuses what needs no
  devices with the very message `Parallel` gives for the same settings."""
  from distill_jax.config import validate

  config = tiny("kd", "unused", **parallel)
  with pytest.raises(ConfigError) as validated:
    validate(config)
  p = config.parallel
  with pytest.raises(ConfigError) as built:
    Parallel(p.mode, 8, p.mesh.to_dict(), teacher_sharding=p.teacher_sharding)
  assert str(validated.value) == str(built.value)
  assert str(validated.value).startswith("config.parallel.")


def test_mesh_sizes_resolve():
  assert resolve_mesh({"data": -1, "fsdp": 4}, 8) == {"data": 2, "fsdp": 4, "tensor": 1}
  assert resolve_mesh(None, 8) == {"data": 8, "fsdp": 1, "tensor": 1}
  assert resolve_mesh({"fsdp": 2}, 8) == {"data": 4, "fsdp": 2, "tensor": 1}
  with pytest.raises(ConfigError, match="pmap is data parallel only"):
    Parallel("pmap", 8, {"data": -1, "fsdp": 2})
  with pytest.raises(ConfigError, match="teacher_sharding"):
    Parallel("jit", 8, teacher_sharding="sharded")


def test_bad_parallel_settings_fail_before_the_workdir(data_dir, teacher_dir, tmp_path):
  config = tiny("kd", data_dir, **{"teachers.teacher.checkpoint": teacher_dir,
                                   "parallel.mesh": {"data": 3, "fsdp": 1}})
  with pytest.raises(ConfigError, match="parallel.mesh"):
    loop.train_and_evaluate(config, str(tmp_path / "run"))
  assert not (tmp_path / "run" / "checkpoints").exists()


def test_sharded_resnet56_teacher_takes_under_a_third_of_the_memory_per_device():
  """The benchmark's teacher on data=2 x fsdp=4: at most 1/3 of its replicated bytes per
  device (the 3x3 kernels of stages 2 and 3 are split four ways; small arrays stay whole)."""
  from distill_jax import models

  teacher = models.build_model("resnet56", 100)
  shapes = jax.eval_shape(lambda: teacher.init(jax.random.PRNGKey(0),
                                               np.zeros((1, 32, 32, 3), np.float32)))
  variables = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)
  per_device = {}
  for sharding in ("replicated", "fsdp"):
    parallel = Parallel("jit", 8, {"data": 2, "fsdp": 4}, teacher_sharding=sharding)
    placed = parallel.put_teachers(variables)
    per_device[sharding] = sum(s.data.nbytes for x in jax.tree.leaves(placed)
                               for s in x.addressable_shards if s.device == parallel.devices[0])
  assert per_device["replicated"] == 4 * sum(x.size for x in jax.tree.leaves(variables))
  assert per_device["fsdp"] <= per_device["replicated"] / 3, per_device
