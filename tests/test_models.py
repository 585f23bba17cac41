"""Tests for `distill_jax.models`: sizes against the CRD paper code, the model contract, registry.

The big models are only traced with `jax.eval_shape` (no compile), so the file stays fast; the
small models and a resnet8 run real forward passes on tiny inputs.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distill_jax.common.registry import UnknownNameError
from distill_jax.models import MODELS, build_model, num_params
from distill_jax.models.resnet_cifar import CifarResNet
from distill_jax.models.wrn import WideResNet

# Trainable parameters with a 100-class head, from the CRD paper code (REFERENCES.md).
CRD_PARAMS = {
    "resnet8": 83_892,
    "resnet14": 181_108,
    "resnet20": 278_324,
    "resnet32": 472_756,
    "resnet44": 667_188,
    "resnet56": 861_620,
    "resnet110": 1_736_564,
    "resnet8x4": 1_233_540,
    "resnet32x4": 7_433_860,
    "wrn_16_1": 180_916,
    "wrn_16_2": 703_284,
    "wrn_40_1": 569_780,
    "wrn_40_2": 2_255_156,
    "vgg8": 3_965_028,
    "vgg13": 9_462_180,
    # The cross-architecture models of the CRD paper's table.
    "mobilenetv2": 812_836,
    "shufflev1": 949_258,
    "shufflev2": 1_355_528,
    "resnet50": 23_705_252,
}
CROSS_ARCH = ("mobilenetv2", "shufflev1", "shufflev2", "resnet50")

CIFAR = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)


def _abstract_init(model, x):
  return jax.eval_shape(model.init, jax.random.key(0), x)


def _abstract_intermediates(model, variables, x, train=False):
  """Shapes of the sown features, by tracing only."""
  mutable = ["intermediates", "batch_stats"] if train else ["intermediates"]
  (logits, state) = jax.eval_shape(
      lambda v, x: model.apply(v, x, train=train, mutable=mutable), variables, x)
  return logits, {name: value[0].shape for name, value in state["intermediates"].items()}


@pytest.mark.parametrize("name", sorted(CRD_PARAMS))
def test_param_count_matches_crd_code(name):
  variables = _abstract_init(build_model(name, 100), CIFAR)
  assert num_params(variables["params"]) == CRD_PARAMS[name]


def test_num_params_on_concrete_arrays():
  params = {"a": {"kernel": np.zeros((3, 4))}, "b": jnp.zeros((5,))}
  assert num_params(params) == 17


@pytest.mark.parametrize(
    "name, expected",
    [
        # CRD "feat" shapes on a 32x32 input, B = 2.
        ("resnet32x4", {"stem": (2, 32, 32, 32), "stage1": (2, 32, 32, 64),
                        "stage2": (2, 16, 16, 128), "stage3": (2, 8, 8, 256), "pool": (2, 256)}),
        ("wrn_40_2", {"stem": (2, 32, 32, 16), "stage1": (2, 32, 32, 32),
                      "stage2": (2, 16, 16, 64), "stage3": (2, 8, 8, 128), "pool": (2, 128)}),
        ("vgg13", {"stem": (2, 32, 32, 64), "stage1": (2, 16, 16, 128), "stage2": (2, 8, 8, 256),
                   "stage3": (2, 4, 4, 512), "stage4": (2, 4, 4, 512), "pool": (2, 512)}),
        ("mobilenetv2", {"stem": (2, 16, 16, 16), "stage1": (2, 16, 16, 12),
                         "stage2": (2, 8, 8, 16), "stage3": (2, 4, 4, 48),
                         "stage4": (2, 2, 2, 160), "pool": (2, 1280)}),
        ("shufflev1", {"stem": (2, 32, 32, 24), "stage1": (2, 16, 16, 240),
                       "stage2": (2, 8, 8, 480), "stage3": (2, 4, 4, 960), "pool": (2, 960)}),
        ("shufflev2", {"stem": (2, 32, 32, 24), "stage1": (2, 16, 16, 116),
                       "stage2": (2, 8, 8, 232), "stage3": (2, 4, 4, 464), "pool": (2, 1024)}),
        ("resnet50", {"stem": (2, 32, 32, 64), "stage1": (2, 32, 32, 256),
                      "stage2": (2, 16, 16, 512), "stage3": (2, 8, 8, 1024),
                      "stage4": (2, 4, 4, 2048), "pool": (2, 2048)}),
    ])
def test_sown_feature_shapes(name, expected):
  model = build_model(name, 100)
  variables = _abstract_init(model, CIFAR)
  for train in (False, True):
    logits, features = _abstract_intermediates(model, variables, CIFAR, train=train)
    assert logits.shape == (2, 100)
    assert features == expected


def test_vgg_pools_after_stage3_only_for_64px_inputs():
  model = build_model("vgg8", 10)
  x = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
  _, features = _abstract_intermediates(model, _abstract_init(model, x), x)
  assert features["stage3"] == (1, 8, 8, 512)
  assert features["stage4"] == (1, 4, 4, 512)


def test_module_names_are_stable():
  params = _abstract_init(build_model("resnet8x4", 10), CIFAR)["params"]
  assert set(params) == {"stem_conv", "stem_bn", "stage1_block0", "stage2_block0",
                         "stage3_block0", "head"}
  # 32 -> 64 channels at stride 1: the first block already needs a projection shortcut.
  assert set(params["stage1_block0"]) == {"conv1", "bn1", "conv2", "bn2", "shortcut_conv",
                                          "shortcut_bn"}
  assert params["head"]["kernel"].shape == (256, 10)
  wrn = _abstract_init(build_model("wrn_16_1", 10), CIFAR)["params"]
  assert "shortcut_conv" not in wrn["stage1_block0"]  # 16 -> 16: identity shortcut.
  assert "shortcut_conv" in wrn["stage2_block0"]
  vgg = _abstract_init(build_model("vgg13", 10), CIFAR)["params"]
  assert set(vgg) == {f"block{i}" for i in range(5)} | {"head"}
  assert set(vgg["block1"]["conv1"]) == {"kernel", "bias"}  # CRD's VGG convs keep their bias.


def test_cross_architecture_module_names():
  mobile = _abstract_init(build_model("mobilenetv2", 10), CIFAR)["params"]
  assert len([k for k in mobile if k.startswith("group")]) == 17  # 1+2+3+4+3+3+1 blocks.
  # The t = 1 block keeps its expansion conv (16 -> 16 channels), as in the reference.
  assert mobile["group0_block0"]["expand_conv"]["kernel"].shape == (1, 1, 16, 16)
  assert mobile["group1_block0"]["dw_conv"]["kernel"].shape == (3, 3, 1, 48)  # Depthwise.
  v1 = _abstract_init(build_model("shufflev1", 10), CIFAR)["params"]
  # The first unit's conv1 is ungrouped (its input is the stem), later ones have 3 groups.
  assert v1["stage1_block0"]["conv1"]["kernel"].shape == (1, 1, 24, 54)
  assert v1["stage1_block1"]["conv1"]["kernel"].shape == (1, 1, 80, 60)
  assert v1["stage2_block0"]["conv3"]["kernel"].shape == (1, 1, 20, 240)  # 480 - 240 out.
  v2 = _abstract_init(build_model("shufflev2", 10), CIFAR)["params"]
  assert len([k for k in v2 if k.startswith("stage2_")]) == 8  # Down unit + 7.
  assert set(v2["stage1_block0"]) == {f"{k}{i}" for k in ("conv", "bn") for i in range(1, 6)}
  r50 = _abstract_init(build_model("resnet50", 10), CIFAR)["params"]
  assert r50["stem_conv"]["kernel"].shape == (3, 3, 3, 64)  # CIFAR stem, no max-pool.
  assert "shortcut_conv" in r50["stage1_block0"] and "shortcut_conv" not in r50["stage1_block1"]
  assert r50["head"]["kernel"].shape == (2048, 10)


def test_channel_shuffle_matches_the_nchw_reference():
  from distill_jax.models.shufflenet import channel_shuffle
  x = np.arange(2 * 2 * 3 * 12, dtype=np.float32).reshape(2, 2, 3, 12)  # NHWC
  nchw = x.transpose(0, 3, 1, 2)
  n, c, h, w = nchw.shape
  want = nchw.reshape(n, 3, c // 3, h, w).transpose(0, 2, 1, 3, 4).reshape(n, c, h, w)
  np.testing.assert_array_equal(channel_shuffle(jnp.asarray(x), 3),
                                want.transpose(0, 2, 3, 1))


@pytest.mark.parametrize("name, kwargs", [
    # Shallow versions (every kind of block, fewer of them): compile time grows with depth.
    ("mobilenetv2", {"cfg": ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 1, 2))}),
    ("shufflev1", {"num_blocks": (2, 1, 1)}),
    ("shufflev2", {"num_blocks": (1, 1, 1)}),
    ("resnet50", {"num_blocks": (2, 1, 1, 1), "widths": (8, 16, 16, 16)}),
])
def test_remat_gives_the_same_forward(name, kwargs):
  """`remat=True` checkpoints the blocks (the gradient's jaxpr has remat, with the same params)
  and changes no number of a training forward: logits, updated BN statistics, sown features.
  (Gradients under remat are jax.checkpoint's business; only one forward is compiled here.)"""
  plain, remat = build_model(name, 10, **kwargs), build_model(name, 10, remat=True, **kwargs)
  x = jax.random.normal(jax.random.key(1), (2, 8, 8, 3))  # 8x8 is enough for every stage.

  def forward(model, variables, x):
    return model.apply(variables, x, train=True, mutable=["batch_stats", "intermediates"])

  shapes = _abstract_init(plain, x)
  assert jax.tree.structure(_abstract_init(remat, x)) == jax.tree.structure(shapes)
  jaxpr = str(jax.make_jaxpr(jax.grad(lambda p, v, x: jnp.sum(forward(remat, {**v, "params": p},
                                                                     x)[0])))(
      shapes["params"], shapes, x))
  assert "remat" in jaxpr or "checkpoint" in jaxpr

  def run(x):
    variables = plain.init(jax.random.key(0, impl="rbg"), x)
    return variables, forward(plain, variables, x), forward(remat, variables, x)

  variables, (logits, state), (r_logits, r_state) = jax.jit(run)(x)
  assert logits.shape == (2, 10) and np.all(np.isfinite(logits))
  np.testing.assert_allclose(r_logits, logits, rtol=1e-5, atol=1e-6)
  assert jax.tree.structure(r_state) == jax.tree.structure(state)
  for a, b in zip(jax.tree.leaves(r_state), jax.tree.leaves(state), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  # Training moved the running statistics (so they did flow out through the remat blocks).
  assert any(not np.allclose(a, b) for a, b in zip(
      jax.tree.leaves(variables["batch_stats"]), jax.tree.leaves(r_state["batch_stats"]),
      strict=True))


DIGITS = (4, 8, 8, 1)


@pytest.mark.parametrize(
    "name, shape, expected",
    [
        ("cnn", DIGITS, {"stem": (4, 8, 8, 32), "stage1": (4, 4, 4, 32),
                         "stage2": (4, 2, 2, 64), "pool": (4, 64)}),
        ("mlp", DIGITS, {"hidden1": (4, 64), "pool": (4, 64)}),
        ("resnet8", (4, 8, 8, 3), {"stem": (4, 8, 8, 16), "stage1": (4, 8, 8, 16),
                                   "stage2": (4, 4, 4, 32), "stage3": (4, 2, 2, 64),
                                   "pool": (4, 64)}),
    ])
def test_forward_train_and_eval(name, shape, expected):
  model = build_model(name, 10)
  x = jax.random.normal(jax.random.key(1), shape)
  # One jitted call each: op-by-op execution would compile every primitive separately.
  variables = jax.jit(model.init)(jax.random.key(0, impl="rbg"), x)
  has_bn = "batch_stats" in variables

  eval_fn = jax.jit(functools.partial(model.apply, train=False, mutable=["intermediates"]))
  logits, state = eval_fn(variables, x)
  assert logits.shape == (shape[0], 10)
  assert logits.dtype == jnp.float32
  assert np.all(np.isfinite(logits))
  assert {k: v[0].shape for k, v in state["intermediates"].items()} == expected

  train_fn = jax.jit(
      functools.partial(model.apply, train=True, mutable=["intermediates", "batch_stats"]))
  train_logits, state = train_fn(variables, x)
  assert train_logits.shape == (shape[0], 10)
  assert {k: v[0].shape for k, v in state["intermediates"].items()} == expected
  if has_bn:
    # Training mutates the running statistics, and uses batch statistics instead of them.
    before = jax.tree_util.tree_leaves(variables["batch_stats"])
    after = jax.tree_util.tree_leaves(state["batch_stats"])
    assert any(not np.allclose(a, b) for a, b in zip(before, after, strict=True))
    assert not np.allclose(train_logits, logits)
  else:
    assert "batch_stats" not in state
    np.testing.assert_allclose(train_logits, logits, rtol=1e-6)


def test_pmapped_batchnorm_uses_the_global_batch():
  """With `bn_axis_name` set, BN under pmap matches BN on the whole batch on one device."""
  n = jax.local_device_count()
  assert n == 8, "conftest.py forces 8 CPU devices"
  model = build_model("cnn", 10, widths=(8,))
  sharded_model = build_model("cnn", 10, widths=(8,), bn_axis_name="batch")
  x = jax.random.normal(jax.random.key(1), (2 * n, 8, 8, 1)) * 3.0 + 1.0
  variables = jax.jit(model.init)(jax.random.key(0, impl="rbg"), x[:1])

  def train_forward(m, v, x):
    return m.apply(v, x, train=True, mutable=["batch_stats"])

  logits, state = jax.jit(functools.partial(train_forward, model))(variables, x)
  replicated = jax.tree_util.tree_map(lambda a: jnp.broadcast_to(a, (n, *a.shape)), variables)
  p_logits, p_state = jax.pmap(
      lambda v, x: train_forward(sharded_model, v, x), axis_name="batch")(
          replicated, x.reshape(n, 2, *x.shape[1:]))
  np.testing.assert_allclose(p_logits.reshape(logits.shape), logits, rtol=1e-4, atol=1e-5)
  for single, per_device in zip(jax.tree_util.tree_leaves(state),
                                jax.tree_util.tree_leaves(p_state), strict=True):
    np.testing.assert_allclose(per_device[0], single, rtol=1e-4, atol=1e-6)


def test_registry_lists_every_model():
  assert set(CRD_PARAMS) | {"cnn", "mlp"} <= set(MODELS.names())


def test_unknown_model_lists_known_names():
  with pytest.raises(UnknownNameError) as info:
    build_model("resnet21", 10)
  message = str(info.value)
  assert "resnet21" in message
  for known in ("resnet20", "wrn_40_2", "vgg8", "cnn", "mlp"):
    assert known in message


def test_build_model_passes_kwargs():
  model = build_model("mlp", 3, hidden=(16, 8), bn_axis_name="batch")
  assert model.num_classes == 3 and model.bn_axis_name == "batch"
  x = jax.ShapeDtypeStruct(DIGITS, jnp.float32)
  variables = _abstract_init(model, x)
  assert num_params(variables["params"]) == 64 * 16 + 16 + 16 * 8 + 8 + 8 * 3 + 3
  _, features = _abstract_intermediates(model, variables, x)
  assert features == {"hidden1": (4, 16), "hidden2": (4, 8), "pool": (4, 8)}


def test_bad_depth_is_rejected():
  with pytest.raises(ValueError, match="6n \\+ 2"):
    _abstract_init(CifarResNet(num_classes=10, depth=9), CIFAR)
  with pytest.raises(ValueError, match="6n \\+ 4"):
    _abstract_init(WideResNet(num_classes=10, depth=15), CIFAR)
