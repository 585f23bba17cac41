"""MiniLLM (`losses/minillm.py`): the policy-gradient estimate of the sequence-level reverse KL
against its exact gradient on a tiny autoregressive table (vocabulary 4, length 3, every
sequence enumerated), with and without teacher-mixed sampling; its value and gradient against
a NumPy reference of the paper's estimator (per-step weights, PPO clipping, length
normalisation); the teacher-mixed decoder's next-token distribution is α p + (1 - α) q; the
config checks; and
configs/lm.py:minillm,tiny through the CLI."""

import functools
import itertools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ROOT, run_cli

from distill_jax.common.outputs import Outputs
from distill_jax.config import ConfigError, load_config_file, validate
from distill_jax.losses.minillm import minillm
from distill_jax.models import build_model
from distill_jax.tasks.language_model import generate
from distill_jax.tasks.language_model.on_policy import OnPolicy, TeacherMix
from distill_jax.train.build import build_run, init_state

LM = os.path.join(ROOT, "configs", "lm.py")
V, T = 4, 3  # The table model: vocabulary and response length.


# ------------------------------------------------ the exact gradient of a tiny table model

def _table_logits(tables, ys):
  """Logits [N, T + 1, V] of the autoregressive table for responses ys [N, T] after a
  one-token prompt: position t predicts y_{t+1} from y_1..y_t (the last position is unused)."""
  n = ys.shape[0]
  first = jnp.broadcast_to(tables[0], (n, V))
  second = tables[1][ys[:, 0]]
  third = tables[2][ys[:, 0], ys[:, 1]]
  return jnp.stack([first, second, third, jnp.zeros((n, V))], axis=1)


def _batch(ys):
  n = ys.shape[0]
  tokens = jnp.concatenate([jnp.zeros((n, 1), jnp.int32), ys], axis=1)
  targets = jnp.concatenate([ys, jnp.zeros((n, 1), jnp.int32)], axis=1)
  mask = jnp.concatenate([jnp.ones((n, T)), jnp.zeros((n, 1))], axis=1)
  return {"tokens": tokens, "targets": targets, "mask": mask}


def _tables(key, scale):
  k0, k1, k2 = jax.random.split(key, 3)
  return (scale * jax.random.normal(k0, (V,)), scale * jax.random.normal(k1, (V, V)),
          scale * jax.random.normal(k2, (V, V, V)))


ALL = jnp.asarray(list(itertools.product(range(V), repeat=T)), jnp.int32)  # [64, 3]


def _sequence_log_prob(tables, ys):
  logp = jax.nn.log_softmax(_table_logits(tables, ys)[:, :T], -1)
  return jnp.take_along_axis(logp, ys[..., None], -1)[..., 0].sum(-1)


def _exact_reverse_kl(student, teacher):
  """KL(q || p) over whole sequences, by enumerating all V^T of them."""
  logq, logp = _sequence_log_prob(student, ALL), _sequence_log_prob(teacher, ALL)
  return jnp.sum(jnp.exp(logq) * (logq - logp))


def _mixture_log_prob(student, teacher, alpha, ys):
  """log p̃(y) of responses ys [N, T] under the per-step mixture α p + (1 - α) q."""
  q = jax.nn.softmax(_table_logits(student, ys)[:, :T], -1)
  p = jax.nn.softmax(_table_logits(teacher, ys)[:, :T], -1)
  mix = jnp.log(alpha * p + (1 - alpha) * q)
  return jnp.take_along_axis(mix, ys[..., None], -1)[..., 0].sum(-1)


@functools.partial(jax.jit, static_argnums=(2, 4))
def _sample(student, teacher, alpha, key, n):
  """n responses drawn step by step from α p + (1 - α) q."""
  ys = jnp.zeros((n, T), jnp.int32)
  for t in range(T):
    q = jax.nn.softmax(_table_logits(student, ys)[:, t], -1)
    p = jax.nn.softmax(_table_logits(teacher, ys)[:, t], -1)
    mix = jnp.log(alpha * p + (1 - alpha) * q)
    ys = ys.at[:, t].set(jax.random.categorical(jax.random.fold_in(key, t), mix))
  return ys


@pytest.mark.parametrize("alpha,importance,single_step,clip,unbiased", [
    (0.0, "token", True, 0.2, True),  # On-policy: every weight is 1, so the clip never acts.
    (0.3, "sequence", True, 0.0, True),  # Teacher-mixed sampling with the exact weights.
    (0.3, "sequence", False, 0.0, True),  # The plain policy gradient (2), no decomposition.
    (0.3, "token", True, 0.0, False),  # The paper's per-step weights: biased, as noted.
])
def test_estimate_matches_the_exact_sequence_level_gradient(alpha, importance, single_step,
                                                            clip, unbiased):
  """jax.grad of the enumerated sequence-level KL(q || p) = the estimate's expectation (every
  sequence's estimate weighted by its sampling probability under α p + (1 - α) q, 1e-5) and
  = its mean over 8192 sampled sequences within sampling error (squared error below 3x the
  summed squared standard errors, whose expected ratio is 1; cosine > 0.99). The paper's
  per-step importance weights with α > 0 are biased, and the same checks see it."""
  student, teacher = _tables(jax.random.PRNGKey(0), 1.0), _tables(jax.random.PRNGKey(1), 2.0)
  exact = jax.jit(jax.grad(_exact_reverse_kl))(student, teacher)
  settings = dict(teacher_mix=alpha, importance=importance, clip=clip, length_norm=False,
                  single_step=single_step)

  def one(tables, y):  # The loss is a mean over tokens: x T is one sequence's estimate.
    y = y[None]
    loss = minillm(Outputs(_table_logits(tables, y), {}, {}),
                   {"teacher": Outputs(_table_logits(teacher, y), {}, {})}, _batch(y), **settings)
    return T * loss

  per_sequence = jax.jit(jax.vmap(jax.grad(one), in_axes=(None, 0)))
  flat = lambda tree: np.concatenate([np.asarray(x, np.float64).reshape(x.shape[0], -1)
                                      for x in tree], axis=1)
  want = flat(jax.tree.map(lambda x: x[None], exact))[0]  # [84]
  assert np.abs(want).max() > 0.05  # A gradient worth estimating.
  chance = np.exp(np.asarray(jax.jit(_mixture_log_prob, static_argnums=2)(
      student, teacher, alpha, ALL), np.float64))
  expectation = chance @ flat(per_sequence(student, ALL))
  n = 8192
  samples = flat(per_sequence(student, _sample(student, teacher, alpha, jax.random.PRNGKey(2),
                                               n)))  # [n, 84]
  mean = samples.mean(0)
  se2 = np.sum(samples.var(0, ddof=1) / n)
  cosine = mean @ want / (np.linalg.norm(mean) * np.linalg.norm(want))
  if unbiased:
    np.testing.assert_allclose(expectation, want, atol=1e-5)
    assert np.sum((mean - want) ** 2) < 3.0 * se2
    assert cosine > 0.99
  else:
    assert np.abs(expectation - want).max() > 0.05
    assert np.sum((mean - want) ** 2) > 20.0 * se2


# ------------------------------------------------ NumPy reference of the estimator

def _np_log_softmax(x):
  x = np.asarray(x, np.float64)
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _np_minillm(z_s, z_t, targets, mask, alpha, importance, clip, length_norm, single_step):
  """(value, d value / d student logits) of the estimator, written out with loops."""
  logq, logp = _np_log_softmax(z_s), _np_log_softmax(z_t)
  q = np.exp(logq)
  kl = (q * (logq - logp)).sum(-1)
  batch, length = targets.shape
  lq = np.take_along_axis(logq, targets[..., None], -1)[..., 0]
  lp = np.take_along_axis(logp, targets[..., None], -1)[..., 0]
  w = np.where(mask > 0, np.exp(lq) / (alpha * np.exp(lp) + (1 - alpha) * np.exp(lq)), 1.0)
  value, grad = 0.0, np.zeros_like(q)
  count = mask.sum()
  for b in range(batch):
    kept = [t for t in range(length) if mask[b, t] > 0]
    for t in kept:
      before = [k for k in kept if k < t]
      future = [k for k in kept if (k > t if single_step else k >= t)]
      if importance == "sequence":
        kl_weight = np.prod([w[b, k] for k in before])
        rewards = [np.prod([w[b, j] for j in kept if j <= k]) * (lp[b, k] - lq[b, k])
                   for k in future]
        pg_weight = 1.0
      else:
        kl_weight = pg_weight = w[b, t]
        rewards = [lp[b, k] - lq[b, k] for k in future]
      advantage = sum(rewards) / (max(len(future), 1) if length_norm else 1)
      clipped = clip > 0 and ((advantage > 0 and pg_weight > 1 + clip)
                              or (advantage < 0 and pg_weight < 1 - clip))
      value += kl_weight * kl[b, t] / count
      onehot = np.eye(q.shape[-1])[targets[b, t]]
      if single_step:
        grad[b, t] += kl_weight * q[b, t] * (logq[b, t] - logp[b, t] - kl[b, t]) / count
      if not clipped:
        grad[b, t] -= advantage * pg_weight * (onehot - q[b, t]) / count
  return value, grad


@pytest.mark.parametrize("settings,chunk_size", [
    (dict(alpha=0.2, importance="token", clip=0.2, length_norm=True, single_step=True), 0),
    (dict(alpha=0.2, importance="token", clip=0.2, length_norm=True, single_step=True), 3),
    (dict(alpha=0.2, importance="token", clip=0.05, length_norm=False, single_step=False), 0),
    (dict(alpha=0.4, importance="sequence", clip=0.0, length_norm=True, single_step=False), 3),
])
def test_value_and_gradient_match_numpy(settings, chunk_size):
  """The term's value (the weighted per-step reverse KL per kept token) and its gradient with
  respect to the student's logits = the NumPy estimator, on rows with a masked prompt and a
  sample that ended early (1e-5); chunked along the sequence or not."""
  rng = np.random.default_rng(0)
  batch, length, vocab = 3, 7, 5
  z_s = rng.normal(size=(batch, length, vocab)).astype(np.float32)
  z_t = 2.0 * rng.normal(size=(batch, length, vocab)).astype(np.float32)
  targets = rng.integers(0, vocab, size=(batch, length)).astype(np.int32)
  mask = np.ones((batch, length), np.float32)
  mask[:, :2] = 0  # The prompt.
  mask[1, 5:] = 0  # A sample that drew EOS early.
  z_t[1, 6] = np.nan  # Whatever a model puts where the mask is 0 does not matter.
  kwargs = dict(teacher_mix=settings["alpha"], importance=settings["importance"],
                clip=settings["clip"], length_norm=settings["length_norm"],
                single_step=settings["single_step"], chunk_size=chunk_size)

  def loss(z):
    return minillm(Outputs(z, {}, {}), {"teacher": Outputs(jnp.asarray(z_t), {}, {})},
                   {"targets": jnp.asarray(targets), "mask": jnp.asarray(mask)}, **kwargs)

  value, grad = jax.jit(jax.value_and_grad(loss))(jnp.asarray(z_s))
  z_t[1, 6] = 0.0
  want_value, want_grad = _np_minillm(z_s, z_t, targets, mask, **settings)
  assert want_value > 0.1
  np.testing.assert_allclose(value, want_value, rtol=1e-5)
  np.testing.assert_allclose(grad, want_grad, rtol=1e-4, atol=1e-6)
  if settings["clip"] == 0.2:  # The paper's setting: the clip acts on some tokens.
    assert np.abs(want_grad).max() > 1e-3


def test_bad_settings_are_refused():
  z = Outputs(jnp.zeros((1, 2, 3)), {}, {})
  batch = {"targets": jnp.zeros((1, 2), jnp.int32), "mask": jnp.ones((1, 2))}
  with pytest.raises(ValueError, match="importance is 'chunk'; choose 'token'"):
    minillm(z, {"t": z}, batch, importance="chunk")
  with pytest.raises(ValueError, match="with importance='sequence' set clip=0"):
    minillm(z, {"t": z}, batch, importance="sequence", clip=0.2)
  with pytest.raises(ValueError, match=r"there are 2 \['a', 'b'\]: set its teacher"):
    minillm(z, {"a": z, "b": z}, batch)


# ------------------------------------------------ the teacher-mixed sampler

def test_teacher_mix_decodes_the_mixture():
  """`TeacherMix` (what the rollout hands `generate.sample` for teacher-mixed sampling): a
  prefill then two one-token steps, both models' caches advancing together, give at every
  position log(α p + (1 - α) q) of the two models' full forwards (2e-5)."""
  kwargs = {"num_layers": 1, "width": 16, "num_heads": 2, "num_kv_heads": 1, "mlp_dim": 16,
            "context": 8}
  student = build_model("transformer_lm", 11, **kwargs)
  teacher = build_model("transformer_lm", 11, **{**kwargs, "width": 8})
  alpha, tokens = 0.3, jnp.asarray([[1, 2, 3, 7, 9], [4, 5, 6, 0, 10]], jnp.int32)
  mix = TeacherMix(student, teacher, alpha)

  @jax.jit
  def run(tokens):  # One compile: eager Flax inits are slow on a busy CPU.
    s_vars = student.init(jax.random.PRNGKey(0), tokens)
    t_vars = jax.tree.map(lambda x: 3.0 * x, teacher.init(jax.random.PRNGKey(1), tokens))
    cache = mix.init_cache(2, 5)
    variables = (s_vars, t_vars)
    prefill, cache = mix.apply(variables, tokens[:, :3], cache=cache)
    fourth, cache = mix.apply(variables, tokens[:, 3:4], cache=cache)
    fifth, _ = mix.apply(variables, tokens[:, 4:5], cache=cache)
    return (jnp.concatenate([prefill, fourth, fifth], axis=1), student.apply(s_vars, tokens),
            teacher.apply(t_vars, tokens))

  got, q, p = jax.device_get(run(tokens))
  q, p = np.exp(_np_log_softmax(q)), np.exp(_np_log_softmax(p))
  want = np.log(alpha * p + (1 - alpha) * q)
  np.testing.assert_allclose(got, want, atol=2e-5)
  assert np.abs(want - np.log(q)).max() > 0.1  # The teacher does change it.


# ------------------------------------------------ the run: config checks and the CLI

def _config(data_dir, teacher_dir, arg="minillm,tiny", **overrides):
  return load_config_file(f"{LM}:{arg}", {"data.data_dir": data_dir,
                                          "teachers.teacher.checkpoint": teacher_dir,
                                          **overrides})


def test_config_checks(data_dir, tmp_path):
  minillm_teacher = str(tmp_path)  # Validation reads no teacher.
  config = _config(data_dir, minillm_teacher)
  assert config.on_policy.fraction == 1.0 and config.losses.minillm.teacher_mix == 0.2
  validate(config)
  with pytest.raises(ConfigError, match=r"config.losses.minillm \(minillm\) is a policy "
                     r"gradient on the student's own samples: set config.on_policy.fraction=1 "
                     r"\(got 0.5\)"):
    validate(_config(data_dir, minillm_teacher, **{"on_policy.fraction": 0.5}))
  with pytest.raises(ConfigError, match=r"set config.on_policy.temperature=1 and top_k=0 "
                     r"\(got 0.7 and 0\)"):
    validate(_config(data_dir, minillm_teacher, **{"on_policy.temperature": 0.7}))
  with pytest.raises(ConfigError, match=r"config.stages.warm.losses.minillm \(minillm\) learns "
                     "from the student's own samples, which only the main stage draws"):
    validate(_config(data_dir, minillm_teacher, "minillm,warm,tiny",
                     **{"stages.warm.losses": {"minillm": {"weight": 1.0}}}))
  with pytest.raises(ConfigError, match="teacher_mix"):
    validate(_config(data_dir, minillm_teacher, **{"losses.minillm.teacher_mix": 1.0}))


def test_minillm_trains_through_the_cli(data_dir, lm_teacher, tmp_path):
  """configs/lm.py:minillm,tiny (teacher-mixed sampling, α 0.2) from the shared trained tiny
  teacher for 12 steps on the CLI's default mesh (8 devices here): the loss (the estimate of
  the sequence-level reverse KL per generated token) stays finite and falls by more than 20%
  (0.83 -> 0.54 when written, the learning rate's cosine decaying to 0 over the 12 steps);
  the first step's loss = the NumPy estimate on the tokens `TeacherMix` draws on one device
  with that step's key from 0.2 teacher + 0.8 student (the step hands the rollout the
  teacher's variables), scored by both models' full forwards (1e-4)."""
  workdir = tmp_path / "minillm"
  run_cli([f"--config={LM}:minillm,tiny", f"--workdir={workdir}",
           f"--config.data.data_dir={data_dir}",
           f"--config.teachers.teacher.checkpoint={lm_teacher}", "--config.num_steps=12",
           "--config.optim.lr=0.01", "--config.eval_samples=0"])  # GKD's test covers those.
  result = json.load(open(workdir / "result.json"))
  rows = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
  losses = [r["train/loss/minillm"] for r in rows if "train/loss/minillm" in r]
  assert result["steps"] == 12 and len(losses) == 12
  assert all(np.isfinite(losses)) and min(losses) > 0
  assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3]), losses

  # The first step, again: its initial state and batch follow from the seed alone.
  config = _config(data_dir, lm_teacher, **{"parallel.num_devices": 1})
  built = build_run(config)
  on_policy = built.extras.on_policy
  assert (on_policy.mix, on_policy.mix_teacher, on_policy.fraction) == (0.2, "teacher", 1.0)
  state = jax.device_get(init_state(config, built))
  batch = next(built.task.train_iterator(config.data, global_batch_size=config.batch_size,
                                         seed=config.seed))
  student_vars = {"params": state.params["student"], **state.model_state}
  teacher = built.teachers["teacher"]
  prompt, new = config.on_policy.prompt_len, config.on_policy.max_new_tokens
  tokens, mask = jax.jit(lambda v, p, k: generate.sample(
      TeacherMix(built.student, teacher.module, 0.2), v, p, max_new_tokens=new, rng=k,
      eos_id=on_policy.eos_id, pad_id=on_policy.pad_id))(
          (student_vars, teacher.variables), batch["tokens"][:, :prompt],
          OnPolicy.keys(state.rng)[1])
  length = batch["tokens"].shape[1]
  rows = np.pad(np.asarray(tokens), ((0, 0), (0, length - prompt - new)),
                constant_values=on_policy.pad_id)
  kept = np.pad(np.asarray(mask)[:, 1:], ((0, 0), (0, length - prompt - new + 1)))
  targets = np.pad(rows[:, 1:], ((0, 0), (0, 1)))
  forward = jax.jit(lambda v, x, model: model.apply(v, x), static_argnums=2)
  want, _ = _np_minillm(forward(student_vars, rows, built.student),
                        forward(teacher.variables, rows, teacher.module), targets, kept,
                        alpha=0.2, importance="token", clip=0.2, length_norm=True,
                        single_step=True)
  assert kept.sum() > 16
  np.testing.assert_allclose(losses[0], want, rtol=1e-4)
