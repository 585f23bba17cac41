"""Feature taps by name or module path, and the errors that name layers, shapes and fixes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny

from distill_jax import models
from distill_jax.common.outputs import Outputs
from distill_jax.losses import register_loss
from distill_jax.losses.objective import ObjectiveError, build_objective
from distill_jax.models.forward import FeatureError, list_features, make_apply
from distill_jax.train import loop
from distill_jax.train.build import build_run
from distill_jax.train.guard import NonFiniteLossError


def test_module_paths_tap_the_same_values_as_sown_names():
  model = models.build_model("resnet8", 10)
  variables = jax.jit(lambda r: model.init(r, jnp.zeros((1, 32, 32, 3))))(jax.random.PRNGKey(0))
  available = list_features(model, variables, (32, 32, 3))
  assert available["stage2"] == (16, 16, 32) and available["pool"] == (64,)
  assert available["stage2_block0/conv2"] == (16, 16, 32)
  apply = make_apply(model, input_key="image",
                     features=("stage3", "stage3_block0", "stage3_block0/conv1"))
  image = jax.random.normal(jax.random.PRNGKey(1), (2, 32, 32, 3))
  out = jax.jit(lambda v, x: apply(v, {"image": x}, False))(variables, image)
  assert set(out.features) == {"stage3", "stage3_block0", "stage3_block0/conv1"}
  # A CIFAR ResNet block returns its pre-ReLU sum; the sown stage output is after the ReLU.
  np.testing.assert_allclose(out.features["stage3"], jax.nn.relu(out.features["stage3_block0"]),
                             atol=1e-6)
  assert out.features["stage3_block0/conv1"].shape == (2, 8, 8, 64)


def test_unknown_feature_fails_before_training_listing_tappable_ones(data_dir, teacher_dir):
  config = tiny("at", data_dir, **{"teachers.teacher.checkpoint": teacher_dir,
                                   "losses.at.student_layers": ("stage1", "stage9")})
  with pytest.raises(FeatureError, match=r"no feature\(s\) \['stage9'\].*stage2_conv"):
    build_run(config)


def test_shape_mismatch_names_both_layers_shapes_and_the_connector(data_dir, teacher_dir):
  # The digits CNN student has 32 channels at stage2, the teacher 64.
  config = tiny("fitnet", data_dir, **{"teachers.teacher.checkpoint": teacher_dir})
  with config.unlocked():
    config.losses.fitnet.connector = "identity"
  with pytest.raises(ObjectiveError, match=r"fitnet.*'stage2'.*32\).*'stage2'.*64\).*conv1x1_bn"):
    build_run(config)
  # With the connector it builds (and its connector's parameters are in the objective).
  run = build_run(tiny("fitnet", data_dir, **{"teachers.teacher.checkpoint": teacher_dir}))
  assert run.objective.student_features == ("stage2",)
  assert run.objective.teacher_features("teacher") == ("stage2",)


@register_loss("test_vector_loss")
def _vector_loss(student, teachers, batch):
  return jnp.sum(student.logits, axis=0)


@register_loss("test_nan_loss", uses_teachers=False)
def _nan_loss(student, teachers, batch):
  return jnp.mean(student.logits) * jnp.nan


def test_a_non_scalar_loss_is_refused_naming_the_term():
  objective = build_objective({"oops": {"loss": "test_vector_loss"}}, ["t"])
  outputs = Outputs(jnp.zeros((4, 3)), {}, {})
  with pytest.raises(ObjectiveError, match="'oops'.*shape \\(3,\\).*scalar"):
    objective({}, {}, outputs, {"t": outputs}, {}, jnp.asarray(0), jax.random.PRNGKey(0))


def test_a_nan_loss_stops_the_run_naming_the_step_and_term(data_dir, tmp_path):
  config = tiny("teacher", data_dir)
  with config.unlocked():
    config.losses.bad = {"loss": "test_nan_loss", "weight": 1.0}
  with pytest.raises(NonFiniteLossError, match=r"step 1: .*loss/bad=nan"):
    loop.train_and_evaluate(config, str(tmp_path))


def test_function_terms_are_checked_before_training(data_dir, teacher_dir):
  # AT compares attention maps position by position: stage1 (4x4) against stage2 (2x2) fails.
  config = tiny("at", data_dir, **{"teachers.teacher.checkpoint": teacher_dir,
                                   "losses.at.student_layers": ("stage1", "stage2"),
                                   "losses.at.teacher_layers": ("stage2", "stage2")})
  with pytest.raises(ObjectiveError, match=r"'at'.*'stage1'.*'stage2'"):
    build_run(config)
  config = tiny("kd", data_dir, **{"teachers.teacher.checkpoint": teacher_dir})
  with config.unlocked():
    config.losses.kd.aggregation = "median"
  with pytest.raises(ObjectiveError, match="Unknown aggregation 'median'"):
    build_run(config)
