"""On-policy distillation (GKD): the teacher gets no gradient and the student a finite one
through the sampled batch; the step's loss equals sampling with the step's key, the teacher's
forward and a NumPy generalized JSD on the generated tokens; configs/lm.py:gkd,tiny trains
through the CLI; bad settings are refused naming the setting, and so is side data that cannot
follow the student's samples (a teacher cache, an undeclared batch key)."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ROOT, run_cli

from distill_jax.common.model_io import export_model, load_model_variables
from distill_jax.config import ConfigError, load_config_file
from distill_jax.data import batch_keys
from distill_jax.data.text import blackbox, packing
from distill_jax.models import build_model
from distill_jax.tasks import get_task
from distill_jax.tasks.language_model import generate
from distill_jax.tasks.language_model.on_policy import OnPolicy
from distill_jax.teachers import cache_teachers, init_shapes
from distill_jax.train import step as step_lib
from distill_jax.train.build import build_run, init_state

LM = os.path.join(ROOT, "configs", "lm.py")
TEACHER = {"num_layers": 2, "width": 32, "num_heads": 4, "num_kv_heads": 2, "mlp_dim": 64,
           "context": 32, "bos_id": 256}
PROMPT, NEW, PAD, EOS = 8, 16, 258, 257


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
  """An untrained tiny LM teacher (weights x4, so it is far from uniform), exported."""
  directory = str(tmp_path_factory.mktemp("gkd_teacher"))
  module = build_model("transformer_lm", 259, **TEACHER)
  variables = module.init(jax.random.PRNGKey(5), jnp.zeros((1, 32), jnp.int32))
  export_model(directory, jax.tree.map(lambda x: 4.0 * x, variables),
               {"model": "transformer_lm", "kwargs": TEACHER, "num_classes": 259, "step": 0})
  return directory


def gkd_config(data_dir, teacher_dir, **overrides):
  return load_config_file(f"{LM}:gkd,tiny", {
      "data.data_dir": data_dir, "teachers.teacher.checkpoint": teacher_dir,
      "on_policy.fraction": 1.0, "parallel.num_devices": 1, **overrides})


@pytest.fixture(scope="module")
def run(data_dir, teacher_dir):
  config = gkd_config(data_dir, teacher_dir)
  built = build_run(config)
  state = jax.device_get(init_state(config, built))
  batch = next(built.task.train_iterator(config.data, global_batch_size=config.batch_size,
                                         seed=config.seed))
  return config, built, state, batch


def test_teacher_gets_no_gradient_and_student_a_finite_one(run):
  config, built, state, batch = run
  on_policy = built.extras.on_policy
  assert on_policy.fraction == 1.0 and on_policy.prompt_len == PROMPT

  def loss(student_params, teacher_vars):
    variables = {"params": student_params, **state.model_state}
    rolled = on_policy(variables, batch, state.rng)
    teachers = step_lib.teacher_forward(built.teacher_applies, teacher_vars, rolled)
    student = built.student_apply(variables, rolled, True, jax.random.PRNGKey(1))
    total, _, _ = built.objective(state.params["objective"], state.objective_state,
                                     student, teachers, rolled, 0, jax.random.PRNGKey(2))
    return total

  student_grads, teacher_grads = jax.jit(jax.grad(loss, argnums=(0, 1)))(
      state.params["student"], built.teacher_vars)
  assert all(np.all(np.asarray(g) == 0) for g in jax.tree.leaves(teacher_grads))
  leaves = [np.asarray(g) for g in jax.tree.leaves(student_grads)]
  assert all(np.all(np.isfinite(g)) for g in leaves)
  assert max(np.abs(g).max() for g in leaves) > 1e-6


def _log_softmax(x):
  x = np.asarray(x, np.float64)
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_step_loss_is_the_jsd_on_the_students_samples(run):
  """One step's loss = generalized JSD (beta 0.5, NumPy) between the student and the teacher
  on the positions that predict the tokens the student sampled with the step's key."""
  config, built, state, batch = run
  metrics = jax.device_get(built.train_step(
      built.parallel.put_state(state), built.parallel.put_teachers(built.teacher_vars),
      built.parallel.put_batch(batch))[1])
  student_vars = {"params": state.params["student"], **state.model_state}
  _, key = OnPolicy.keys(state.rng)
  model = built.student
  tokens, mask = jax.jit(lambda v, p, k: generate.sample(
      model, v, p, max_new_tokens=NEW, rng=k, eos_id=EOS, pad_id=PAD))(
          student_vars, batch["tokens"][:, :PROMPT], key)
  tokens, mask = np.asarray(tokens), np.asarray(mask)
  assert tokens.shape == (16, PROMPT + NEW) and mask[:, PROMPT:].sum() > 16
  rows = np.pad(tokens, ((0, 0), (0, 32 - PROMPT - NEW)), constant_values=PAD)
  # Position i predicts token i + 1: the loss counts positions whose target was generated.
  kept = np.pad(mask[:, 1:], ((0, 0), (0, 32 - PROMPT - NEW + 1))) > 0
  teacher = built.teachers["teacher"]
  log_s = _log_softmax(model.apply(student_vars, rows))
  log_t = _log_softmax(teacher.module.apply(teacher.variables, rows))
  p_s, p_t = np.exp(log_s), np.exp(log_t)
  log_m = np.log(0.5 * p_t + 0.5 * p_s)
  jsd = 0.5 * (p_t * (log_t - log_m)).sum(-1) + 0.5 * (p_s * (log_s - log_m)).sum(-1)
  want = jsd[kept].mean()
  assert want > 1e-3
  np.testing.assert_allclose(metrics["loss"], want, rtol=1e-4)
  np.testing.assert_allclose(metrics["loss/token_jsd"], want, rtol=1e-4)


def test_gkd_trains_through_the_cli(data_dir, teacher_dir, tmp_path):
  workdir = tmp_path / "gkd"
  run_cli([f"--config={LM}:gkd,tiny", f"--workdir={workdir}",
           f"--config.data.data_dir={data_dir}", f"--config.teachers.teacher.checkpoint="
           f"{teacher_dir}", "--config.num_steps=4"])
  result = json.load(open(workdir / "result.json"))
  rows = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
  losses = [r["train/loss/token_jsd"] for r in rows if "train/loss/token_jsd" in r]
  assert result["steps"] == 4 and len(losses) == 4
  assert all(np.isfinite(losses)) and min(losses) > 0
  # The final evaluation's samples: recomputed from the exported student (seed 0, the first
  # 2 held-out rows' first 8 tokens), with the teacher's log-likelihood of them in NumPy.
  final = [r for r in rows if "eval/sample_length" in r][-1]
  config = gkd_config(data_dir, teacher_dir)
  student = build_model("transformer_lm", 259, **config.student.kwargs)
  variables = load_model_variables(str(workdir / "model"), init_shapes(student, (32,)))
  prompts = packing.packed_split(config.data, "test").tokens[:2, :PROMPT]
  tokens, mask = generate.sample(student, variables, prompts, max_new_tokens=NEW,
                                 rng=jax.random.PRNGKey(0), eos_id=EOS, pad_id=PAD)
  tokens, mask = np.asarray(tokens), np.asarray(mask)
  teacher = build_model("transformer_lm", 259, **TEACHER)
  log_t = _log_softmax(teacher.apply(load_model_variables(
      teacher_dir, init_shapes(teacher, (32,))), tokens))[:, :-1]
  ll = np.take_along_axis(log_t, tokens[:, 1:, None], -1)[..., 0]
  assert final["eval/sample_length"] == pytest.approx(mask.sum(1).mean())
  np.testing.assert_allclose(final["eval/teacher_logprob/teacher"],
                             (ll * mask[:, 1:]).sum() / mask[:, 1:].sum(), rtol=1e-4)
  # The texts went to TensorBoard's Text tab.
  events = b"".join(p.read_bytes() for p in (workdir / "tb").iterdir())
  assert b"samples/1" in events and b"text" in events


def test_warm_start_stage_trains_on_the_corpus_then_the_main_stage_on_policy(run, data_dir,
                                                                            teacher_dir):
  """`gkd,warm`: a CE stage on the corpus rows first (no sampling: its loss is the NumPy CE of
  the batch's own targets), then GKD; the on-policy sampling belongs to the main stage only."""
  config = load_config_file(f"{LM}:gkd,warm,tiny", {
      "data.data_dir": data_dir, "teachers.teacher.checkpoint": teacher_dir,
      "on_policy.fraction": 1.0, "parallel.num_devices": 1})
  built = build_run(config)
  assert [(s.name, s.end - s.start) for s in built.stages] == [("warm", 2), ("train", 6)]
  state = jax.device_get(init_state(config, built))
  batch = next(built.task.train_iterator(config.data, global_batch_size=config.batch_size,
                                         seed=config.seed))
  parallel = built.parallel
  metrics = jax.device_get(built.stages[0].train_step(
      parallel.put_state(state), parallel.put_teachers(built.teacher_vars),
      parallel.put_batch(batch))[1])
  variables = {"params": state.params["student"], **state.model_state}
  log_p = _log_softmax(built.student.apply(variables, batch["tokens"]))
  nll = -np.take_along_axis(log_p, batch["targets"][..., None], -1)[..., 0]
  want = (nll * batch["mask"]).sum() / batch["mask"].sum()
  assert set(config.stages.warm.losses) == {"token_ce"}
  np.testing.assert_allclose(metrics["loss/token_ce"], want, rtol=1e-5)
  # The main stage's step samples: its JSD is on the student's own continuations.
  main = jax.device_get(built.train_step(
      parallel.put_state(state), parallel.put_teachers(built.teacher_vars),
      parallel.put_batch(batch))[1])
  gkd_alone = run[1]  # The same settings without the warm stage.
  np.testing.assert_allclose(main["loss"], jax.device_get(gkd_alone.train_step(
      parallel.put_state(state), parallel.put_teachers(built.teacher_vars),
      parallel.put_batch(batch))[1])["loss"], rtol=1e-6)


def test_bad_settings_name_the_setting(data_dir, teacher_dir):
  with pytest.raises(ConfigError, match=r"on_policy.prompt_len \+ max_new_tokens = 8 \+ 30 "
                                        r"exceeds data.seq_len 32"):
    build_run(gkd_config(data_dir, teacher_dir, **{"on_policy.max_new_tokens": 30}))
  with pytest.raises(ConfigError, match=r"on_policy.fraction must be in \[0, 1\], got 1.5"):
    build_run(gkd_config(data_dir, teacher_dir, **{"on_policy.fraction": 1.5}))


def test_on_policy_step_on_the_mesh_equals_one_device_and_pmap_runs(run, data_dir,
                                                                    teacher_dir):
  """The same on-policy step (same coin, same samples) on 1 device and on the 8-device data
  mesh: equal losses and parameters. Under pmap each device samples with its own key (see
  `OnPolicy.__call__`), so its samples, and loss, differ from one device's: finite and
  close."""
  batch = run[3]
  results = []
  for overrides in ({"parallel.num_devices": 1}, {"parallel.mesh": {"data": 8, "fsdp": 1},
                                                  "parallel.num_devices": 0},
                    {"parallel.mode": "pmap", "parallel.num_devices": 0}):
    config = gkd_config(data_dir, teacher_dir, **{"optim.name": "sgd", "optim.lr": 0.5,
                                                  **overrides})
    built = build_run(config)
    parallel = built.parallel
    state = jax.device_get(init_state(config, built))
    new, metrics = built.train_step(parallel.put_state(state),
                                       parallel.put_teachers(built.teacher_vars),
                                       parallel.put_batch(batch))
    results.append((parallel.to_host(new).params, jax.device_get(parallel.get(metrics))))
  (one, one_metrics), (mesh, mesh_metrics), (_, pmap_metrics) = results
  np.testing.assert_allclose(mesh_metrics["loss"], one_metrics["loss"], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(mesh), strict=True):
    np.testing.assert_allclose(b, a, atol=1e-6)
  assert pmap_metrics["loss"] != one_metrics["loss"]
  np.testing.assert_allclose(pmap_metrics["loss"], one_metrics["loss"], rtol=0.2)


def test_side_data_declares_whether_it_follows_the_samples():
  """The rollout keeps the task's own keys; a key declared to follow the tokens passes; a
  teacher cache's logits, a black-box file's top-k and a key nobody declared are refused
  (the safe default), grouped by reason."""
  task_keys = get_task("language_model").rollout_keys
  assert blackbox.TOPK_KEYS  # Imported: the module that adds the keys declares them.
  assert set(task_keys) == {"tokens", "targets", "mask", "document", "id"}
  batch_keys.declare("test_row_weight", what="a weight per row", follows_tokens=True)
  assert batch_keys.rollout_problems([*task_keys, "test_row_weight"], task_keys) == []
  problems = batch_keys.rollout_problems(
      [*task_keys, "test_row_weight", "teacher_logits/big", "test_new_key", "topk_ids",
       "topk_valid", "target_bytes", "contrast_idx"], task_keys)
  assert len(problems) == 5, problems
  assert problems[0].startswith("contrast_idx (CRD's memory-bank rows")
  assert problems[1] == ("target_bytes (the UTF-8 bytes of the data's targets)")
  assert problems[2] == ("teacher_logits/big (teacher 'big''s logits cached for the data's "
                         "rows, not for the student's samples; run that teacher live (unset "
                         "config.teachers.big.cache))")
  assert problems[3].startswith("test_new_key (undeclared: the module that adds it must say")
  assert problems[4].startswith("topk_ids, topk_valid (a black-box teacher's top-k")
  with pytest.raises(ValueError, match="already declared"):
    batch_keys.declare("test_row_weight", what="a weight per row", follows_tokens=False)


def test_a_teacher_cache_is_refused_on_policy(data_dir, teacher_dir, tmp_path):
  """A per-token cache holds the teacher's logits for the data's rows; on-policy batches hold
  the student's samples instead, so `build_run` refuses the combination, naming the key and
  the fix (off-policy, the same cache is accepted)."""
  subset = {"data.train_subset": 32}
  directory = cache_teachers(gkd_config(data_dir, teacher_dir, **subset),
                                           str(tmp_path), top_k=8, batch_size=32)["teacher"]
  cached = {**subset, "teachers.teacher.cache": directory}
  built = build_run(gkd_config(data_dir, teacher_dir, **cached,
                               **{"on_policy.fraction": 0.0}))
  assert built.extras.on_policy is None and "teacher_logits/teacher" in built.example
  with pytest.raises(ConfigError) as error:
    build_run(gkd_config(data_dir, teacher_dir, **cached, **{"on_policy.fraction": 0.5}))
  assert str(error.value) == (
      "config.on_policy.fraction=0.5 replaces the rows by the student's samples, but these "
      "batch keys would still describe the original rows: teacher_logits/teacher (teacher "
      "'teacher''s logits cached for the data's rows, not for the student's samples; run that "
      "teacher live (unset config.teachers.teacher.cache)).")


def test_the_on_policy_step_refuses_an_undeclared_batch_key(run):
  """The compiled step checks too (at trace time), for callers that bypass `build_run`."""
  _, built, state, batch = run
  parallel = built.parallel
  with pytest.raises(ValueError, match=r"would still describe the original rows: "
                                       r"test_extra_key \(undeclared"):
    built.train_step(parallel.put_state(state), parallel.put_teachers(built.teacher_vars),
                     parallel.put_batch({**batch, "test_extra_key": batch["mask"]}))
