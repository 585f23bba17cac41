"""Cross-tokenizer distillation: the embedded corpus's BPE, the alignment of two tokenizations
by byte offsets, the vocabulary map (prefix marginalisation), the `xtok_kl` and `uld` losses
against NumPy references, and live teachers with their own tokenizer end to end."""

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ROOT, run_cli

from distill_jax.common.model_io import export_model
from distill_jax.common.outputs import Head, Outputs
from distill_jax.config import ConfigError, load_config_file, validate
from distill_jax.data.text import cross_tokenizer
from distill_jax.data.text.corpus import pydoc_texts
from distill_jax.losses import cross_tokenizer as xtok
from distill_jax.losses.tokens import token_fkl
from distill_jax.models import build_model, tokenizers
from distill_jax.models.tokenizers import get_tokenizer, train_bpe
from distill_jax.train.build import build_run, init_state


def test_bpe_is_deterministic_and_encodes_like_the_others():
  texts = pydoc_texts("train")
  first, second = train_bpe(texts, 300), train_bpe(texts, 300)
  assert first == second  # Same corpus -> the same vocabulary and merges.
  assert first != train_bpe(texts[:5], 300)  # ... and another corpus another one.
  bpe = get_tokenizer("bpe")
  assert (bpe.name, bpe.vocab_size, bpe.bos_id, bpe.eos_id, bpe.pad_id) == ("bpe", 1024, 0, 1, 2)
  text = "Hello wörld:\n  return x"
  ids = bpe.encode(text)
  assert ids[0] == bpe.bos_id and ids[-1] == bpe.eos_id and bpe.decode(ids) == text
  body, starts = bpe.encode_with_offsets(text)
  np.testing.assert_array_equal(body, ids[1:-1])
  # Each token's bytes (byte_lengths) add up to the text's; its start is where the text's
  # characters before it end ('ö' is two byte tokens sharing its start).
  lengths = bpe.byte_lengths()[body]
  assert lengths.sum() == len(text.encode("utf-8"))
  pieces = [bpe.decode(body[i:i + 1]) for i in range(len(body))]
  assert all(text.startswith(p, int(s)) for p, s in zip(pieces, starts, strict=True)
             if "\ufffd" not in p)
  # It compresses the held-out split (never trained on) and round-trips it.
  test = pydoc_texts("test")
  assert all(bpe.decode(bpe.encode(t)) == t for t in test)
  n_bytes = sum(len(t.encode("utf-8")) for t in test)
  assert n_bytes / sum(len(bpe.encode(t)) - 2 for t in test) > 2.0
  assert tokenizers.BPE_VOCAB_SIZE == 1024


# ------------------------------------------------------------------------------- alignment

BYTES = tokenizers.ByteTokenizer()
FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "hf")


def _row(tok, pieces, target):
  """A one-row batch (tokens, targets, mask) of `pieces` (ids or text pieces) + `target`."""
  ids = [p if isinstance(p, int) else _id(tok, p) for p in [*pieces, target]]
  return (np.asarray([ids[:-1]], np.int32), np.asarray([ids[1:]], np.int32),
          np.ones((1, len(ids) - 1), np.float32))


def _id(tok, piece):
  table = tokenizers.token_bytes_table(tok)
  return table.index(piece.encode("utf-8") if isinstance(piece, str) else piece)


def _pieces(tok, ids):
  table = tokenizers.token_bytes_table(tok)
  return [table[i] if table[i] else int(i) for i in ids]


def _align(student, teacher, pieces, target, teacher_len=16):
  rows = cross_tokenizer.teacher_rows(*_row(student, pieces, target), student, teacher,
                                      teacher_len)
  return rows.tokens[0], rows.index[0].tolist(), rows.mask[0].tolist()


def test_alignment_bytes_student_bpe_teacher_by_hand():
  bpe = get_tokenizer("bpe")
  text = list("the cat sat.")
  tokens, index, mask = _align(BYTES, bpe, [BYTES.bos_id, *text], BYTES.eos_id)
  # The teacher reads BOS 'the' ' c' 'at' ' s' 'at' '.' EOS; byte position t predicts the
  # byte at offset t (position 12: EOS), the teacher's u the token after it.
  assert _pieces(bpe, tokens[:8]) == [0, b"the", b" c", b"at", b" s", b"at", b".", 1]
  assert (tokens[8:] == bpe.pad_id).all()
  assert index == [0, 0, 0, 1, 0, 2, 0, 3, 0, 4, 0, 5, 6]
  assert mask == [1, 0, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 1]


def test_alignment_bpe_student_bytes_and_hf_teachers_by_hand():
  bpe = get_tokenizer("bpe")
  row = [bpe.bos_id, "the", " c", "at", " s", "at", "."]
  # Bytes teacher: every BPE boundary is a byte boundary.
  _, index, mask = _align(bpe, BYTES, row, bpe.eos_id)
  assert index == [0, 3, 5, 7, 9, 11, 12] and mask == [1] * 7
  # The HF fixtures cut 'the' as 't' 'he': BOS t he ' c' at ' s' at '.' EOS.
  for name in ("llama", "qwen2", "mistral"):
    hf = get_tokenizer(f"hf:{os.path.join(FIXTURES, name)}")
    tokens, index, mask = _align(bpe, hf, row, bpe.eos_id)
    assert _pieces(hf, tokens[1:8]) == [b"t", b"he", b" c", b"at", b" s", b"at", b"."]
    assert index == [0, 2, 3, 4, 5, 6, 7] and mask == [1] * 7


def test_alignment_multibyte_and_two_documents_by_hand():
  bpe = get_tokenizer("bpe")
  # 'í' is two bytes; the BPE cuts it into two pieces sharing its character's start, so the
  # boundary inside it (byte 2) has no teacher position.
  data = list("Día: the".encode())
  tokens, index, mask = _align(BYTES, bpe, [BYTES.bos_id, *data], BYTES.eos_id)
  assert _pieces(bpe, tokens[1:7]) == [b"D", b"\xc3", b"\xad", b"a", b":", b" the"]
  assert index == [0, 1, 0, 3, 4, 5, 0, 0, 0, 6]
  assert mask == [1, 1, 0, 1, 1, 1, 0, 0, 0, 1]
  # A row cut inside a document ('at' EOS), then the next one's start (BOS 'the' + ' ').
  row = [*b"at", BYTES.eos_id, BYTES.bos_id, *b"the"]
  tokens, index, mask = _align(BYTES, bpe, row, ord(" "))
  assert _pieces(bpe, tokens[:5]) == [b"at", 1, 0, b"the", b" "]
  assert index == [0, 0, 1, 2, 0, 0, 3] and mask == [0, 1, 1, 1, 0, 0, 1]
  # A teacher length that cuts its row: what lies past it has no position (and is counted).
  rows = cross_tokenizer.teacher_rows(*_row(BYTES, row, ord(" ")), BYTES, bpe, 2)
  assert rows.index[0].tolist()[:4] == [0, 0, 1, 0] and rows.mask[0].tolist() == [0, 1, 1, 0,
                                                                                 0, 0, 0]
  assert rows.counts == {"kept_positions": 7, "aligned_positions": 2, "cut_rows": 1}


def test_vocab_map_is_the_black_box_prefix_rule():
  bpe = get_tokenizer("bpe")
  to_bytes = cross_tokenizer.vocab_map(bpe, BYTES)
  assert to_bytes.shape == (1024,)
  assert to_bytes[_id(bpe, "the")] == ord("t") and to_bytes[_id(bpe, " c")] == ord(" ")
  assert to_bytes[_id(bpe, b"\xc3")] == 0xC3  # The byte student reads any byte.
  assert to_bytes[bpe.eos_id] == BYTES.eos_id
  assert to_bytes[bpe.bos_id] == -1 and to_bytes[bpe.pad_id] == -1
  to_bpe = cross_tokenizer.vocab_map(BYTES, bpe)
  assert to_bpe[ord("t")] == _id(bpe, "t") and to_bpe[BYTES.eos_id] == bpe.eos_id
  assert to_bpe[0xC3] == -1  # Half a character is no text for a text tokenizer.
  # The same tokenizer: every text id and EOS to itself.
  same = cross_tokenizer.vocab_map(bpe, bpe)
  text_ids = np.arange(3, 1024)
  kept = same[text_ids] >= 0
  np.testing.assert_array_equal(same[text_ids][kept], text_ids[kept])
  table = tokenizers.token_bytes_table(bpe)

  def whole_text(data):
    try:
      return bool(data.decode("utf-8"))
    except UnicodeDecodeError:
      return False

  # Unmapped: exactly the ids that are no whole character (bytes 0x80-0xff on their own).
  np.testing.assert_array_equal(kept, [whole_text(table[i]) for i in text_ids])


# ---------------------------------------------------------------------------------- losses

B, L, LT, D = 2, 6, 5, 4


def _softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def _lazy(hidden, kernel, chunk):
  """Outputs with lazy logits: hidden [B, L, D] and a linear head D -> V."""
  head = Head(jnp.asarray(kernel), lambda w, h: h @ w, kernel.shape[1], chunk)
  return Outputs(None, {}, {}, hidden=jnp.asarray(hidden), head=head)


def _setup(seed=0, vocab_student=5, teacher_vocabs=(7,)):
  """Student logits [B, L, V_S] (from hidden @ kernel, so lazy logits can be built too),
  teachers of other vocabularies at LT positions, their maps, the alignment and the batch."""
  rng = np.random.default_rng(seed)
  hidden = rng.normal(size=(B, L, D)).astype(np.float32)
  kernel = rng.normal(size=(D, vocab_student)).astype(np.float32)
  teachers, batch = {}, {"targets": rng.integers(0, vocab_student, (B, L)).astype(np.int32),
                         "mask": (rng.random((B, L)) > 0.2).astype(np.float32)}
  for i, v in enumerate(teacher_vocabs):
    name = f"t{i}"
    t_hidden = rng.normal(size=(B, LT, D)).astype(np.float32)
    t_kernel = 2 * rng.normal(size=(D, v)).astype(np.float32)
    vocab_map = rng.integers(-1, vocab_student, v).astype(np.int32)
    teachers[name] = (t_hidden, t_kernel, vocab_map)
    batch[xtok.batch_key(name, "index")] = rng.integers(0, LT, (B, L)).astype(np.int32)
    batch[xtok.batch_key(name, "mask")] = (rng.random((B, L)) > 0.3).astype(np.float32)
  return hidden, kernel, teachers, batch


def _outputs(hidden, kernel, teachers, lazy_chunk=0):
  def make(h, k, vocab_map=None):
    out = (_lazy(h, k, lazy_chunk) if lazy_chunk else
           Outputs(jnp.asarray(h @ k), {}, {}))
    if vocab_map is not None:
      out = out._replace(features={xtok.VOCAB_MAP: jnp.broadcast_to(vocab_map,
                                                                      (B, len(vocab_map)))})
    return out
  return make(hidden, kernel), {n: make(*t) for n, t in teachers.items()}


def _np_aligned(teachers, batch, name, temperature):
  """The teacher's probabilities at each student position's aligned position [B, L, V_T]."""
  t_hidden, t_kernel, _ = teachers[name]
  idx = batch[xtok.batch_key(name, "index")]
  logits = np.take_along_axis(t_hidden @ t_kernel, idx[..., None], axis=1)
  return _softmax(logits / temperature)


def _np_xtok_kl(hidden, kernel, teachers, batch, temperature, weights):
  """NumPy reference: value and gradient with respect to the student's logits."""
  s = hidden @ kernel
  v_s = s.shape[-1]
  num, den = 0.0, 0.0
  for name, w in weights.items():
    p_t = _np_aligned(teachers, batch, name, temperature)
    vocab_map = teachers[name][2]
    q = np.zeros((B, L, v_s))
    for i, j in enumerate(vocab_map):
      if j >= 0:
        q[..., j] += p_t[..., i]
    q /= q.sum(-1, keepdims=True)
    a = batch[xtok.batch_key(name, "mask")]
    num, den = num + (w * a)[..., None] * q, den + w * a
  target = num / np.maximum(den, 1e-30)[..., None]
  p_s = _softmax(s / temperature)
  with np.errstate(divide="ignore", invalid="ignore"):
    per = temperature**2 * np.where(target > 0, target * (np.log(target) - np.log(p_s)),
                                    0).sum(-1)
  keep = batch["mask"] * (den > 0)
  value = (per * keep).sum() / keep.sum()
  # d/ds T^2 KL(q || softmax(s / T)) = T (softmax(s / T) - q) (q sums to 1 where aligned).
  grad = temperature * (p_s - target) * keep[..., None] / keep.sum()
  return value, grad


def _grad_wrt_logits(fn, hidden, kernel, teachers):
  """The loss and its gradient with respect to the student's logits [B, L, V_S] (compiled
  once: op-by-op dispatch would compile every small op on its own)."""
  _, teacher_out = _outputs(hidden, kernel, teachers)
  return jax.jit(jax.value_and_grad(lambda logits: fn(Outputs(logits, {}, {}), teacher_out)))(
      jnp.asarray(hidden @ kernel))


def _xtok_kl_of(student, teachers, **kw):
  return xtok.xtok_kl(student, teachers, kw.pop("batch"), temperature=2.0, **kw)


def test_xtok_kl_against_numpy_one_and_two_teachers_of_other_vocabularies():
  for vocabs, aggregation, weights in [((7,), "mean", ()), ((7, 3), "weighted", (1.0, 3.0))]:
    hidden, kernel, teachers, batch = _setup(1, 5, vocabs)
    names = list(teachers)
    w = (dict(zip(names, np.asarray(weights) / sum(weights), strict=True)) if weights
         else {n: 1 / len(names) for n in names})
    ref_value, ref_grad = _np_xtok_kl(hidden, kernel, teachers, batch, 2.0, w)
    value, grad = _grad_wrt_logits(
        functools.partial(_xtok_kl_of, batch=batch, aggregation=aggregation,
                          teacher_weights=weights), hidden, kernel, teachers)
    np.testing.assert_allclose(value, ref_value, rtol=1e-5)
    np.testing.assert_allclose(grad, ref_grad, atol=1e-6)


def test_xtok_kl_with_identical_tokenizers_is_token_fkl():
  hidden, kernel, teachers, batch = _setup(2, 6, (6,))
  t_hidden, t_kernel, _ = teachers["t0"]
  t_hidden = np.random.default_rng(3).normal(size=(B, L, D)).astype(np.float32)
  # Through the alignment and the map (identity both), and without (position for position).
  mapped = {"t0": Outputs(jnp.asarray(t_hidden @ t_kernel), {},
                          {}, )._replace(features={xtok.VOCAB_MAP: jnp.tile(jnp.arange(6),
                                                                             (B, 1))})}
  plain = {"t0": Outputs(jnp.asarray(t_hidden @ t_kernel), {}, {})}
  data = {k: v for k, v in batch.items() if not k.startswith(xtok.XTOK_PREFIX)}
  identity = {**data, xtok.batch_key("t0", "index"): np.tile(np.arange(L, dtype=np.int32),
                                                             (B, 1)),
              xtok.batch_key("t0", "mask"): np.ones((B, L), np.float32)}

  @jax.jit
  def losses(logits):
    student = Outputs(logits, {}, {})
    return [jax.value_and_grad(fn)(logits) for fn in (
        lambda s: token_fkl(Outputs(s, {}, {}), plain, data, temperature=2.0),
        lambda s: xtok.xtok_kl(Outputs(s, {}, {}), mapped, identity, temperature=2.0),
        lambda s: xtok.xtok_kl(Outputs(s, {}, {}), mapped, identity, temperature=2.0,
                               chunk_size=4),
        lambda s: xtok.xtok_kl(Outputs(s, {}, {}), plain, data, temperature=2.0))] + [student]

  *results, _ = losses(jnp.asarray(hidden @ kernel))
  (ref_value, ref_grad), *others = results
  for value, grad in others:
    np.testing.assert_allclose(value, ref_value, atol=1e-6)
    np.testing.assert_allclose(grad, ref_grad, atol=1e-6)


def _np_sorted_l1_grad(p, q):
  """d/dp sum_i |sort(p)_i - sort(q)_i| (descending, zero-padded), per row of p [..., V_p]."""
  size = max(p.shape[-1], q.shape[-1])
  pad = lambda x: np.concatenate([x, np.zeros(x.shape[:-1] + (size - x.shape[-1],))], -1)
  order = np.argsort(-p, axis=-1, kind="stable")
  sp, sq = pad(np.take_along_axis(p, order, -1)), pad(-np.sort(-q, axis=-1))
  sign = np.sign(sp - sq)[..., :p.shape[-1]]
  grad = np.zeros_like(p)
  np.put_along_axis(grad, order, sign, -1)
  return np.abs(sp - sq).sum(-1), grad


def _np_uld(hidden, kernel, teachers, batch, temperature, ce_weight, w1_weight):
  s = hidden @ kernel
  p = _softmax(s)
  onehot = np.eye(s.shape[-1])[batch["targets"]]
  kept = batch["mask"]
  ce = -(np.log(p) * onehot).sum(-1)
  ce_value = (ce * kept).sum() / kept.sum()
  ce_grad = (p - onehot) * kept[..., None] / kept.sum()
  p_t = _softmax(s / temperature)
  num, den, dnum = 0.0, 0.0, 0.0
  for name in teachers:
    q = _np_aligned(teachers, batch, name, temperature)
    a = batch[xtok.batch_key(name, "mask")]
    dist, g = _np_sorted_l1_grad(p_t, q)
    num, den, dnum = num + a * dist / len(teachers), den + a / len(teachers), \
        dnum + (a / len(teachers))[..., None] * g
  keep = kept * (den > 0)
  d = num / np.maximum(den, 1e-30)
  dp = dnum / np.maximum(den, 1e-30)[..., None]
  w1_value = (d * keep).sum() / keep.sum()
  # Through softmax(s / T): dL/ds = p * (g - sum(p g)) / T.
  w1_grad = p_t * (dp - (p_t * dp).sum(-1, keepdims=True)) / temperature
  w1_grad = w1_grad * keep[..., None] / keep.sum()
  return (ce_weight * ce_value + w1_weight * w1_value, ce_weight * ce_grad + w1_weight * w1_grad)


def test_uld_against_numpy_with_teachers_of_larger_and_smaller_vocabularies():
  hidden, kernel, teachers, batch = _setup(4, 5, (9, 3))
  ref_value, ref_grad = _np_uld(hidden, kernel, teachers, batch, 2.0, 0.5, 1.5)
  value, grad = _grad_wrt_logits(
      lambda s, t: xtok.uld(s, t, batch, temperature=2.0, crossentropy_weight=0.5,
                            distillation_weight=1.5, chunk_size=4), hidden, kernel, teachers)
  np.testing.assert_allclose(value, ref_value, rtol=1e-5)
  np.testing.assert_allclose(grad, ref_grad, atol=1e-6)
  # The distance itself on a hand example: sorted (0.7, 0.2, 0.1) vs (0.5, 0.5) + a zero.
  np.testing.assert_allclose(xtok.sorted_l1(jnp.asarray([0.1, 0.7, 0.2]),
                                            jnp.asarray([0.5, 0.5])), 0.2 + 0.3 + 0.1,
                             rtol=1e-6)


def test_cross_tokenizer_losses_chunked_and_with_lazy_logits():
  hidden, kernel, teachers, batch = _setup(5, 5, (7, 3))
  _, teacher_out = _outputs(hidden, kernel, teachers)
  _, lazy_teachers = _outputs(hidden, kernel, teachers, lazy_chunk=2)

  @jax.jit
  def run(kernel):
    explicit = lambda fn, k: fn(Outputs(jnp.asarray(hidden) @ k, {}, {}), teacher_out, batch,
                                temperature=1.5)
    lazy = lambda fn, k: fn(_lazy(hidden, k, 2), lazy_teachers, batch, temperature=1.5)
    return [[jax.value_and_grad(functools.partial(way, fn))(kernel) for way in (explicit, lazy)]
            for fn in (xtok.xtok_kl, xtok.uld)]

  # Lazy logits in chunks of 2 positions (of 6) give the explicit whole-sequence value, and
  # the same gradient reaches the head's kernel.
  for (whole, grad), (lazy, lazy_grad) in run(jnp.asarray(kernel)):
    np.testing.assert_allclose(lazy, whole, rtol=1e-5)
    np.testing.assert_allclose(lazy_grad, grad, atol=1e-6)


def test_unmapped_mass_is_the_teachers_probability_on_ids_without_a_student_token():
  hidden, kernel, teachers, batch = _setup(6, 5, (7,))
  student, teacher_out = _outputs(hidden, kernel, teachers)
  mass, aligned = xtok.unmapped_mass("t0", teacher_out["t0"], batch, student)
  p_t = _np_aligned(teachers, batch, "t0", 1.0)
  np.testing.assert_allclose(mass, p_t[..., teachers["t0"][2] < 0].sum(-1), atol=1e-6)
  np.testing.assert_array_equal(aligned, batch[xtok.batch_key("t0", "mask")])


# ------------------------------------------------------------------ live teachers, end to end

LM = os.path.join(ROOT, "configs", "lm.py")


@pytest.fixture(scope="module")
def bpe_teacher(tmp_path_factory):
  """configs/lm.py:bpe_teacher,tiny's model (1024 BPE ids), untrained (weights x4: far from
  uniform), exported: a teacher whose tokenizer is not the byte-level student's."""
  directory = str(tmp_path_factory.mktemp("bpe_teacher"))
  kwargs = load_config_file(f"{LM}:bpe_teacher,tiny").student.kwargs.to_dict()
  module = build_model("transformer_lm", 1024, **kwargs)
  variables = module.init(jax.random.PRNGKey(7), np.zeros((1, 32), np.int32))
  export_model(directory, jax.tree.map(lambda x: 4.0 * x, variables),
               {"model": "transformer_lm", "kwargs": kwargs, "num_classes": 1024, "step": 0})
  return directory


def test_cross_tokenizer_teacher_off_and_on_policy_through_the_cli(bpe_teacher, data_dir,
                                                                  tmp_path):
  """configs/lm.py:xtok_kl,gold,tiny: a byte-level student from the BPE teacher through the
  CLI, 2 steps on the corpus (stage `offline`), then 3 on its own samples re-tokenised for the
  teacher in the step (on_policy.fraction=1); the alignment KL is finite and falls in both,
  and the run reports the aligned share and the unmapped mass."""
  workdir = tmp_path / "xtok"
  run_cli([f"--config={LM}:xtok_kl,gold,tiny", f"--workdir={workdir}",
           f"--config.data.data_dir={data_dir}", f"--config.teachers.teacher.checkpoint="
           f"{bpe_teacher}", "--config.num_steps=3", "--config.on_policy.fraction=1.0",
           "--config.data.train_subset=80", "--config.data.eval_subset=16",
           "--config.checkpoint_every_steps=6"])
  rows = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
  offline, online = ([r[f"{stage}/loss/xtok_kl"] for r in rows if f"{stage}/loss/xtok_kl" in r]
                     for stage in ("offline", "train"))
  assert len(offline) == 2 and len(online) == 3, (offline, online)
  assert all(np.isfinite(offline + online)), (offline, online)
  assert offline[1] < offline[0] and online[2] < online[0], (offline, online)
  # On-policy rows keep only the generated tokens, which the teacher's rows follow.
  assert all(0 < r["train/xtok_aligned/teacher"] <= 1 for r in rows if "train/loss" in r)
  final = json.load(open(workdir / "result.json"))["final"]
  # ~1 byte in 3 starts a BPE token: the share of byte positions with a teacher position.
  assert 0.2 < final["eval/xtok_aligned/teacher"] < 0.5
  assert 0.0 <= final["eval/xtok_unmapped/teacher"] < 0.01  # Only BOS/PAD map nowhere.
  assert np.isfinite(final["eval/perplexity"])


def test_on_policy_rollout_retokenises_the_samples_for_the_teacher(bpe_teacher, data_dir):
  """The rollout rebuilds the teacher's rows from the student's samples inside the compiled
  function: exactly the data layer's rows of the sampled text."""
  config = load_config_file(f"{LM}:xtok_kl,gold,tiny", {
      "data.data_dir": data_dir, "teachers.teacher.checkpoint": bpe_teacher,
      "on_policy.fraction": 1.0, "data.train_subset": 16, "data.eval_subset": 16})
  run = build_run(config)
  state = init_state(config, run)
  batch = next(run.task.train_iterator(config.data, global_batch_size=config.batch_size,
                                       seed=config.seed, side_data=run.side_data["train"]))
  out = jax.device_get(jax.jit(run.extras.on_policy.rollout)(
      {"params": state.params["student"]}, batch, jax.random.PRNGKey(1)))
  rows = cross_tokenizer.teacher_rows(out["tokens"], out["targets"], out["mask"], BYTES,
                                      get_tokenizer("bpe"), 32)
  for key, expected in rows.batch_arrays("teacher").items():
    np.testing.assert_array_equal(out[key], expected, err_msg=key)
  generated = out["mask"] > 0
  assert generated.sum() > 16 and 0 < rows.mask[generated].mean() < 1
  assert not np.array_equal(out[xtok.batch_key("teacher", "index")],
                            batch[xtok.batch_key("teacher", "index")])


def test_only_aligning_terms_may_read_a_teacher_of_another_tokenizer(bpe_teacher, data_dir):
  config = load_config_file(f"{LM}:xtok_kl,tiny", {
      "data.data_dir": data_dir, "teachers.teacher.checkpoint": bpe_teacher})
  with config.unlocked():
    config.losses.xtok_kl.loss = "token_fkl"
  with pytest.raises(ConfigError, match=r"config.losses.xtok_kl \(loss 'token_fkl'\) reads "
                     r"teacher 'teacher', which has its own tokenizer.*uld, xtok_kl"):
    build_run(config)
  with pytest.raises(ConfigError, match="teachers.teacher.tokenizer: Unknown data.tokenizer"):
    validate(load_config_file(f"{LM}:xtok_kl,tiny", {"teachers.teacher.tokenizer": "bpe2"}))


def _largest_intermediate(closed):
  """The most elements of any value a jaxpr (and its sub-jaxprs: scan, remat) computes."""
  def walk(jaxpr):
    sizes = [0]
    for eqn in jaxpr.eqns:
      sizes += [int(np.prod(v.aval.shape)) for v in eqn.outvars if hasattr(v.aval, "shape")]
      for param in eqn.params.values():
        for sub in param if isinstance(param, (tuple, list)) else (param,):
          inner = getattr(sub, "jaxpr", sub)
          if hasattr(inner, "eqns"):
            sizes.append(walk(inner))
    return max(sizes)
  return walk(closed.jaxpr)


def test_lazy_cross_tokenizer_terms_never_hold_whole_logits():
  """With lazy logits (chunks of 8 of 64 student positions, 48 teacher positions) no value of
  the gradient's program is as large as either model's [L, V] logits: the vocabulary-chunked
  losses stay chunked across tokenizers (traced only, nothing compiled)."""
  rng = np.random.default_rng(8)
  length, t_length, v_s, v_t = 64, 48, 40, 56
  hidden = rng.normal(size=(1, length, D)).astype(np.float32)
  kernel = rng.normal(size=(D, v_s)).astype(np.float32)
  teacher = _lazy(rng.normal(size=(1, t_length, D)), rng.normal(size=(D, v_t)), 8)._replace(
      features={xtok.VOCAB_MAP: jnp.asarray(rng.integers(-1, v_s, (1, v_t)), jnp.int32)})
  batch = {"targets": jnp.zeros((1, length), jnp.int32), "mask": jnp.ones((1, length)),
           xtok.batch_key("t", "index"): jnp.asarray(rng.integers(0, t_length, (1, length))),
           xtok.batch_key("t", "mask"): jnp.ones((1, length))}
  whole = min(length * v_s, t_length * v_t)
  for fn in (xtok.xtok_kl, xtok.uld):
    lazy = jax.make_jaxpr(jax.grad(lambda k, f=fn: f(_lazy(hidden, k, 8), {"t": teacher},
                                                     batch)))(kernel)
    explicit = jax.make_jaxpr(jax.grad(lambda k, f=fn: f(
        Outputs(hidden @ k, {}, {}), {"t": teacher._replace(
            logits=teacher.whole_logits(), hidden=None, head=None)}, batch)))(kernel)
    assert _largest_intermediate(lazy) < whole // 4 <= whole <= _largest_intermediate(explicit)
