"""Language models end to end: a tiny teacher trained through the CLI on the embedded corpus
learns (held-out loss falls), a token-KD step gives the single-device result on the 8-device
mesh, gradient accumulation over micro-batches with uneven masks is the big-batch step, and a
per-token teacher cache trains as the live teacher does."""

import json
import math
import os

import jax
import numpy as np
import pytest
import scipy.special
from conftest import ROOT

from distill_jax.common.model_io import export_model
from distill_jax.config import ConfigError, load_config_file, validate
from distill_jax.data import teacher_cache
from distill_jax.data.text import batches, packing
from distill_jax.models import build_model
from distill_jax.teachers import cache_teachers
from distill_jax.train.build import build_run, init_state

LM = os.path.join(ROOT, "configs", "lm.py")


def lm_config(role, data_dir, **overrides):
  return load_config_file(f"{LM}:{role},tiny", {"data.data_dir": data_dir, **overrides})


def test_teacher_learns_the_held_out_text(lm_teacher, data_dir):
  result = json.load(open(os.path.join(lm_teacher, "result.json")))
  rows = [json.loads(line) for line in open(os.path.join(lm_teacher, "metrics.jsonl"))]
  evals = [r for r in rows if "eval/ce" in r]
  assert [r["step"] for r in evals] == [10, 20, 30, 40]
  ce = [r["eval/ce"] for r in evals]
  # Held-out loss falls at every eval, to well below a uniform guess over 259 tokens.
  assert all(b < a for a, b in zip(ce, ce[1:], strict=False)), ce
  assert ce[-1] < math.log(259) - 1.0, ce
  final = result["final"]
  assert result["best_perplexity"] == pytest.approx(math.exp(final["eval/ce"]))
  # Bits per byte: the NLL in bits over the kept targets that are bytes (ids < 256; the EOS
  # predictions are scored but stand for no text).
  count = num_bytes = 0
  for batch in batches.eval_batches(lm_config("teacher", data_dir).data, global_batch_size=64):
    kept = batch["mask"] > 0
    count += int(kept.sum())
    num_bytes += int(np.sum(kept & (batch["targets"] < 256)))
  assert 0.9 * count < num_bytes <= count
  assert final["eval/bits_per_byte"] == pytest.approx(
      final["eval/ce"] * count / math.log(2) / num_bytes, rel=1e-6)
  assert result["steps"] == 40 and os.path.exists(os.path.join(lm_teacher, "model"))


def _steps(config, num_steps):
  run = build_run(config)
  parallel = run.parallel
  init = jax.device_get(init_state(config, run))
  state = parallel.put_state(init)
  teacher_vars = parallel.put_teachers(run.teacher_vars)
  batches = run.task.train_iterator(config.data, global_batch_size=config.batch_size,
                                       seed=config.seed, side_data=run.side_data["train"])
  for _ in range(num_steps):
    state, metrics = run.train_step(state, teacher_vars, parallel.put_batch(next(batches)))
  return init, parallel.to_host(state), jax.device_get(parallel.get(metrics))


KD_BASE = {"optim.name": "sgd", "optim.lr": 0.5}


@pytest.fixture(scope="module")
def token_kd_one_device(data_dir, lm_teacher):
  """2 steps of configs/lm.py:hidden on one device: the reference for the parallel layouts."""
  return _steps(lm_config("hidden", data_dir, **KD_BASE, **{
      "teachers.teacher.checkpoint": lm_teacher, "parallel.num_devices": 1}), 2)


@pytest.mark.parametrize("layout", [{"parallel.mesh": {"data": 8, "fsdp": 1}},
                                    {"parallel.mode": "pmap"}], ids=["mesh8", "pmap8"])
def test_token_kd_step_on_8_devices_equals_one_device(data_dir, lm_teacher, token_kd_one_device,
                                                      layout):
  """CE + forward KL (chunked) + hidden-state MSE + attention KL (configs/lm.py:hidden) from
  the CLI-trained teacher: 2 steps on 1 device, on the 8-device data mesh and under pmap give
  the same parameters and metrics. (SGD: Adam's first steps divide
  each gradient by its own magnitude, which turns float rounding in near-zero gradients into
  differences of the order of the learning rate.)"""
  init, one, one_metrics = token_kd_one_device
  _, got, got_metrics = _steps(lm_config("hidden", data_dir, **KD_BASE, **layout, **{
      "teachers.teacher.checkpoint": lm_teacher}), 2)
  assert jax.device_count() == 8
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(one.params)[0],
                          jax.tree.leaves(got.params), strict=True):
    np.testing.assert_allclose(b, a, atol=1e-6, rtol=0, err_msg=jax.tree_util.keystr(path))
  for key in ("loss", "loss/token_ce", "loss/token_fkl", "loss/token_hidden_mse",
              "loss/token_attention_kl", "top1", "agreement"):
    np.testing.assert_allclose(np.mean(got_metrics[key]), one_metrics[key], rtol=1e-5,
                               err_msg=key)
  assert min(one_metrics[f"loss/{k}"] for k in ("token_fkl", "token_hidden_mse",
                                                   "token_attention_kl")) > 0
  moved = [np.abs(a - b).max() for a, b in zip(jax.tree.leaves(one.params["student"]),
                                               jax.tree.leaves(init.params["student"]),
                                               strict=True)]
  assert max(moved) > 1e-4  # The steps did train the student.


def test_unknown_task_and_too_long_rows_are_refused(data_dir):
  with pytest.raises(ConfigError, match=r"config.task: Unknown task 'lm'.*language_model"):
    validate(lm_config("teacher", data_dir, task="lm"))
  config = lm_config("teacher", data_dir, **{"data.seq_len": 48})
  with pytest.raises(ValueError, match="48 tokens is longer than the model's context of 32"):
    build_run(config)


def test_per_token_cache_equals_the_live_teacher(data_dir, lm_teacher, tmp_path):
  """scripts/cache_teacher.py's writer on a language model: each row's [L, k] top-k
  log-probabilities and remaining mass per token. Top-k KD with the same k reads exactly the
  live teacher's top k and rest, so two steps from the cache equal two live steps; a cache
  made at another row length is refused, naming it."""
  base = {"teachers.teacher.checkpoint": lm_teacher, "data.train_subset": 64,
          "parallel.num_devices": 1}
  config = lm_config("topk", data_dir, **base)
  directory = cache_teachers(config, str(tmp_path), top_k=16,
                                           batch_size=32)["teacher"]
  run = build_run(lm_config("topk", data_dir, **base,
                            **{"teachers.teacher.cache": directory}))
  assert run.teacher_vars["teacher"] == {}  # No forward: the logits come with the batch.
  # The reader against NumPy on the live teacher's logits: top 16 exact, the rest spread.
  live = build_run(config)
  ids = np.array([3, 0, 63])
  rows = packing.packed_split(config.data, "train").rows(ids)
  logits = np.asarray(live.teacher_applies["teacher"](
      live.teacher_vars["teacher"], rows, False).logits, np.float64)
  log_probs = logits - scipy.special.logsumexp(logits, axis=-1, keepdims=True)
  packed = run.side_data["train"][teacher_cache.batch_key("teacher")](0, ids)
  assert packed.shape == (3, 32, 1 + 2 * 16)  # Sparse on the host: decoded on the device.
  cached = np.asarray(jax.jit(teacher_cache.unpack, static_argnums=1)(packed, 259))
  assert cached.shape == (3, 32, 259)
  top = np.argsort(-log_probs, axis=-1)[..., :16]
  np.testing.assert_allclose(np.take_along_axis(cached, top, -1),
                             np.take_along_axis(log_probs, top, -1), atol=1e-5)
  rest = np.log1p(-np.exp(np.take_along_axis(log_probs, top, -1)).sum(-1))
  others = np.ones_like(cached, bool)
  np.put_along_axis(others, top, False, axis=-1)
  np.testing.assert_allclose(cached[others].reshape(3, 32, 243), np.broadcast_to(
      (rest - np.log(243))[..., None], (3, 32, 243)), atol=1e-4)
  # Training from the cache = training with the live teacher.
  _, from_cache, cache_metrics = _steps(lm_config("topk", data_dir, **base, **{
      "teachers.teacher.cache": directory}), 2)
  _, from_live, live_metrics = _steps(config, 2)
  for a, b in zip(jax.tree.leaves(from_live.params), jax.tree.leaves(from_cache.params),
                  strict=True):
    np.testing.assert_allclose(b, a, atol=1e-6, rtol=0)
  for key in ("loss", "loss/token_ce", "loss/token_topk_kd", "agreement"):
    np.testing.assert_allclose(cache_metrics[key], live_metrics[key], rtol=1e-5, err_msg=key)
  assert live_metrics["loss/token_topk_kd"] > 0
  # Other rows (another length) than the cache's: refused, naming the difference.
  with pytest.raises(teacher_cache.CacheError, match=r"seq_len: cache has 32, this run has 16"):
    build_run(lm_config("topk", data_dir, **base, **{
        "teachers.teacher.cache": directory, "data.seq_len": 16}))


def _log_softmax(x):
  x = np.asarray(x, np.float64)
  return x - scipy.special.logsumexp(x, axis=-1, keepdims=True)


@pytest.fixture(scope="module")
def untrained_lm_teacher(data_dir, tmp_path_factory):
  """configs/lm.py's tiny teacher, untrained (weights x4: far from uniform), exported: for
  tests that need a teacher's numbers, not a good one."""
  directory = str(tmp_path_factory.mktemp("lm_untrained"))
  kwargs = lm_config("teacher", data_dir).student.kwargs.to_dict()
  module = build_model("transformer_lm", 259, **kwargs)
  variables = module.init(jax.random.PRNGKey(7), np.zeros((1, 32), np.int32))
  export_model(directory, jax.tree.map(lambda x: 4.0 * x, variables),
               {"model": "transformer_lm", "kwargs": kwargs, "num_classes": 259, "step": 0})
  return directory


@pytest.fixture(scope="module")
def uneven_kd(data_dir, untrained_lm_teacher):
  """configs/lm.py:fkl,tiny (token_ce + token_fkl, chunked) from the untrained teacher, a
  batch whose micro-batch 0 of 2 (the even rows, `step._split`) keeps 4 tokens per row, 7
  times fewer than micro-batch 1, and the big-batch step's parameters."""
  base = {**KD_BASE, "teachers.teacher.checkpoint": untrained_lm_teacher,
          "parallel.num_devices": 1}
  config = lm_config("fkl", data_dir, **base)
  run = build_run(config)
  init = jax.device_get(init_state(config, run))
  batch = next(run.task.train_iterator(config.data, global_batch_size=config.batch_size,
                                       seed=config.seed))
  batch["mask"][0::2, 4:] = 0.0
  assert batch["mask"][1::2].sum() > 7 * batch["mask"][0::2].sum() > 0

  def step(**overrides):
    built = build_run(lm_config("fkl", data_dir, **{**base, **overrides}))
    parallel = built.parallel
    new, metrics = built.train_step(parallel.put_state(init),
                                    parallel.put_teachers(built.teacher_vars),
                                    parallel.put_batch(batch))
    return parallel.to_host(new).params, jax.device_get(parallel.get(metrics))

  return run, init, batch, step, step()[0]


@pytest.mark.parametrize("layout", [{}, {"parallel.mode": "pmap", "parallel.num_devices": 0}],
                         ids=["one", "pmap8"])
def test_accumulation_with_uneven_masks_is_the_big_batch_step(uneven_kd, layout):
  """Accumulating 2 micro-batches whose kept tokens differ 7-fold: the step's loss terms are
  the NumPy token means over the whole batch, and its update is the big-batch step's (SGD:
  equal parameters are equal gradients); on one device and under pmap (each device's share
  of a micro-batch). Averaging the two micro-batch means instead weighs micro-batch 0's few
  tokens 7 times too much."""
  run, init, batch, step, big_params = uneven_kd
  acc_params, acc = step(**{"optim.accumulate_steps": 2, **layout})
  # NumPy: the token means over the whole batch at the initial parameters.
  student = run.student.apply({"params": init.params["student"], **init.model_state},
                              batch["tokens"])
  teacher = run.teachers["teacher"]
  log_s = _log_softmax(student)
  log_t = _log_softmax(teacher.module.apply(teacher.variables, batch["tokens"]))
  kept = batch["mask"] > 0
  ce = -np.take_along_axis(log_s, batch["targets"][..., None], -1)[..., 0][kept].mean()
  fkl = (np.exp(log_t) * (log_t - log_s)).sum(-1)[kept].mean()
  np.testing.assert_allclose(np.mean(acc["loss/token_ce"]), ce, rtol=1e-5)
  np.testing.assert_allclose(np.mean(acc["loss/token_fkl"]), fkl, rtol=1e-5)
  np.testing.assert_allclose(np.mean(acc["loss"]), 0.5 * ce + 0.5 * fkl, rtol=1e-5)
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(big_params)[0],
                          jax.tree.leaves(acc_params), strict=True):
    np.testing.assert_allclose(b, a, atol=1e-6, rtol=0, err_msg=jax.tree_util.keystr(path))
  moved = max(np.abs(a - b).max() for a, b in zip(jax.tree.leaves(big_params["student"]),
                                                   jax.tree.leaves(init.params["student"]),
                                                   strict=True))
  assert moved > 1e-3


def test_a_top_k_cache_is_refused_to_a_term_with_a_larger_k(data_dir, untrained_lm_teacher,
                                                            tmp_path):
  """A cache of the teacher's top 4 tokens per position, read by token_topk_kd with k = 16:
  beyond the 4 the cache holds only an even spread of the rest, so the run is refused before
  anything is compiled, naming the term, both k and the fixes; k = 4 reads it."""
  base = {"teachers.teacher.checkpoint": untrained_lm_teacher, "data.train_subset": 32,
          "parallel.num_devices": 1}
  directory = cache_teachers(lm_config("topk", data_dir, **base), str(tmp_path),
                                           top_k=4, batch_size=32)["teacher"]
  cached = {**base, "teachers.teacher.cache": directory}
  with pytest.raises(ConfigError) as error:
    build_run(lm_config("topk", data_dir, **cached))
  assert str(error.value) == (
      f"Loss term 'token_topk_kd' (token_topk_kd) reads teacher 'teacher''s top k=16 tokens, "
      f"but its cache {directory!r} holds only its top 4 (the rest is an even spread of the "
      "remaining mass): set losses.token_topk_kd.k <= 4, or rebuild the cache with "
      "scripts/cache_teacher.py --top_k=16 (or 0: all logits).")
  run = build_run(lm_config("topk", data_dir, **cached, **{"losses.token_topk_kd.k": 4}))
  assert run.side_data["train"][teacher_cache.batch_key("teacher")].top_k == 4
