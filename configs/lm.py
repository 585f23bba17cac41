r"""Language models on the embedded corpus (Python's documentation topics, byte-level).

A Transformer teacher trained on the text, then a smaller student trained alone (`ce`) or
distilled from it token by token: forward KL (`fkl`), reverse KL (`rkl`), generalized JSD
(`jsd`, beta 0.5), skew KL (`skew`, alpha 0.1), top-k KD (`topk`, k 16), or forward KL plus
hidden-state MSE and last-layer attention KL with a layer map (`hidden`: student layer i <-
teacher layer 2i), or on-policy (`gkd`, Agarwal et al. 2024: generalized JSD, beta 0.5, on the
student's own continuations of the rows' first tokens for half of the batches, no CE), or
MiniLLM (`minillm`, Gu et al. 2024: the sequence-level reverse KL by policy gradient on the
student's continuations of every batch, sampled from the mixture 0.2 teacher + 0.8 student,
no CE; `losses/minillm.py`). Offline; minutes on a CPU at the default sizes.

    distill-jax --config=configs/lm.py:teacher --workdir=runs/lm/teacher
    distill-jax --config=configs/lm.py:fkl --workdir=runs/lm/fkl \
        --config.teachers.teacher.checkpoint=runs/lm/teacher

From what a teacher wrote (a JSONL file of prompts and completions, `docs/blackbox.md`):
`sequence` (sequence-level KD: CE on the completions a local teacher sampled with
`scripts/generate.py`, the teacher listed for evaluation; `sequence,kd` adds forward KL from it
live), `blackbox_text` (an API's text only, no teacher) and `blackbox_topk` (its text and
per-token top-k log-probabilities: CE 0.5 + `token_sparse_topk_kd` 0.5):

    distill-jax --config=configs/lm.py:blackbox_topk --workdir=runs/lm/api \
        --config.data.train_files=teacher_outputs.jsonl

Arg: `ROLE[,tiny]`, ROLE in {teacher, ce, fkl, rkl, jsd, skew, topk, hidden, gkd, minillm,
sequence, blackbox_text, blackbox_topk}; `gkd,warm` (and `minillm,warm`) first trains the
student with CE alone for half the run (a stage `warm`, on the corpus), then on-policy for
the other half, as GKD (and MiniLLM) start from a supervised student (`ce,warm`: the same
two stages with CE in both, its control for the schedule); `sequence,kd` adds token KD from
the live teacher. `tiny` shrinks the models and the run to a few steps (tests and smoke
runs). Held-out perplexity is the headline of `result.json` (`best_perplexity`); bits per
byte, token top-1 agreement with the teacher and the teacher-student KL are reported beside
it (`final`).
"""

import ml_collections

from distill_jax.config import base_config, teacher_config

# Byte-level tokens: BOS is 256 (models.tokenizers.ByteTokenizer); attention stays inside documents.
TEACHER = {"num_layers": 4, "width": 128, "num_heads": 4, "num_kv_heads": 2, "mlp_dim": 384,
           "context": 128, "bos_id": 256}
STUDENT = {"num_layers": 2, "width": 64, "num_heads": 4, "num_kv_heads": 2, "mlp_dim": 192,
           "context": 128, "bos_id": 256}
TINY_TEACHER = {"num_layers": 2, "width": 32, "num_heads": 4, "num_kv_heads": 2, "mlp_dim": 64,
                "context": 32, "bos_id": 256}
TINY_STUDENT = {"num_layers": 1, "width": 16, "num_heads": 4, "num_kv_heads": 1, "mlp_dim": 32,
                "context": 32, "bos_id": 256}
# role -> the distillation term beside CE (weights: CE 0.5 + divergence 0.5 for all of them).
METHODS = {
    "ce": {},
    "fkl": {"token_fkl": {"weight": 0.5}},
    "rkl": {"token_rkl": {"weight": 0.5}},
    "jsd": {"token_jsd": {"weight": 0.5, "beta": 0.5}},
    "skew": {"token_skew_kl": {"weight": 0.5, "alpha": 0.1}},
    "topk": {"token_topk_kd": {"weight": 0.5, "k": 16}},
    "hidden": {"token_fkl": {"weight": 0.5}},  # + the layer-mapped terms of `hidden_terms`.
    "gkd": {"token_jsd": {"weight": 1.0, "beta": 0.5}},  # Alone: CE on own samples is moot.
    "minillm": {"minillm": {"weight": 1.0, "teacher_mix": 0.2}},  # Alone, every batch sampled.
}
# On-policy roles -> the share of batches the student's samples replace (config.on_policy).
ON_POLICY = {"gkd": 0.5, "minillm": 1.0}
# Roles that learn from what a teacher wrote (a JSONL file, `data.name='jsonl'`,
# distill_jax/data/text/blackbox.py) rather than from its live logits.
FILE_ROLES = {
    "sequence": {},  # Sequence-level KD: CE on a local teacher's samples (scripts/generate.py).
    "blackbox_text": {},  # An API's text only: the same, with no teacher at hand.
    "blackbox_topk": {"token_sparse_topk_kd": {"weight": 0.5}},  # Its text and top-k log-probs.
}
ROLES = ("teacher", *METHODS, *FILE_ROLES)


def hidden_terms(student: dict, teacher: dict) -> dict:
  """Hidden-state MSE and attention KL with the layer map student layer i <- teacher layer
  i * (teacher layers / student layers) (TinyBERT's uniform map; the last layers pair up)."""
  ratio = teacher["num_layers"] // student["num_layers"]
  layers = range(1, student["num_layers"] + 1)
  return {
      "token_hidden_mse": {"weight": 1.0, "student_layers": tuple(f"hidden{i}" for i in layers),
                           "teacher_layers": tuple(f"hidden{i * ratio}" for i in layers)},
      # MiniLM: the last layer's attention distributions (needs as many heads).
      "token_attention_kl": {
          "weight": 1.0, "student_layers": (f"block{student['num_layers'] - 1}/attn/probs",),
          "teacher_layers": (f"block{teacher['num_layers'] - 1}/attn/probs",)},
  }


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  role, *options = (arg or "fkl").split(",")
  if role in XTOK_ROLES:  # Cross-tokenizer distillation: the block at the end of this file.
    return xtok_config(role, options)
  allowed = {"tiny", {"sequence": "kd", "gkd": "warm", "minillm": "warm",
                      "ce": "warm"}.get(role, "tiny")}
  if role not in ROLES or set(options) - allowed:
    raise ValueError(f"configs/lm.py arg {arg!r}: expected ROLE[,tiny] with ROLE in "
                     f"{list(ROLES)} (sequence also takes ',kd'; gkd, minillm and ce ',warm').")
  tiny = "tiny" in options
  c = base_config()
  c.task = "language_model"
  c.data = ml_collections.ConfigDict({
      "name": "pydoc_topics",
      "data_dir": ml_collections.config_dict.placeholder(str),
      "train_split": "train", "eval_split": "test",
      "tokenizer": "bytes",
      "seq_len": 32 if tiny else 128,
      "train_subset": 0,  # 0: every packed row; N: the first N rows.
      "eval_subset": 64 if tiny else 0,
      "max_documents": 0,  # 0: every document of a split; N: its first N (large corpora).
  })
  if role in FILE_ROLES:
    # The teacher's outputs, one JSON object per line; the last 10% of records are held out
    # unless data.eval_files is set.
    c.data.update({"name": "jsonl", "train_files": ml_collections.config_dict.placeholder(str),
                   "eval_files": "", "eval_fraction": 0.1})
  teacher, student = (TINY_TEACHER, TINY_STUDENT) if tiny else (TEACHER, STUDENT)
  model = teacher if role == "teacher" else student
  c.student = ml_collections.ConfigDict(
      {"name": "transformer_lm", "kwargs": dict(model), "remat": False})
  if role not in ("teacher", "blackbox_text", "blackbox_topk"):
    # The student trained alone lists the teacher too: evaluation then reports agreement
    # and KL with it, so every student is measured the same way.
    c.teachers = ml_collections.ConfigDict(
        {"teacher": teacher_config("transformer_lm", dict(teacher))})
  chunk = {"chunk_size": 8 if tiny else 32}
  methods = {**METHODS, **FILE_ROLES}
  if "kd" in options:  # Sequence-level KD plus word-level KD from the live teacher.
    methods["sequence"] = METHODS["fkl"]
  terms = {name: {**settings, **chunk} for name, settings in methods.get(role, {}).items()}
  if role == "hidden":
    terms.update(hidden_terms(student, teacher))
  ce_weight = 0.5 if terms else 1.0
  c.losses = ml_collections.ConfigDict(
      terms if role in ON_POLICY else {"token_ce": {"weight": ce_weight, **chunk}, **terms})
  # On-policy distillation (GKD): with probability `fraction` per batch the student continues
  # each row's first `prompt_len` tokens by `max_new_tokens` sampled ones (`temperature`,
  # `top_k`: 0 = all), and the terms compare it with the teachers on those tokens. 0: off.
  c.on_policy = ml_collections.ConfigDict({
      "fraction": ON_POLICY.get(role, 0.0),
      "prompt_len": 8 if tiny else 32, "max_new_tokens": 16 if tiny else 64,
      "temperature": 1.0, "top_k": 0})
  # Student samples (continuations of held-out rows' first on_policy.prompt_len tokens) in
  # the log and TensorBoard at each evaluation; on-policy runs also get eval/sample_length and
  # eval/teacher_logprob/NAME. 0: none.
  c.eval_samples = 4
  c.optim = ml_collections.ConfigDict({
      "name": "adamw", "lr": 3e-3, "momentum": 0.9, "nesterov": False, "weight_decay": 0.01,
      "schedule": "cosine", "decay_epochs": (), "decay_factor": 0.1, "warmup_epochs": 0.05,
      "accumulate_steps": 1})
  c.batch_size = 32
  c.eval_batch_size = 64
  c.num_epochs = 1.0
  if "warm" in options:  # Half the run CE alone on the corpus, then the on-policy half.
    c.stages = ml_collections.ConfigDict({"warm": {
        "num_epochs": 0.5, "losses": {"token_ce": {"weight": 1.0, **chunk}}}})
    c.num_epochs = 0.5
  c.eval_every_epochs = 0.25
  c.log_every_steps = 50
  c.checkpoint_every_steps = 500
  if tiny:
    c.batch_size = 16
    c.num_steps = 6
    c.eval_every_epochs = 0.0
    c.log_every_steps = 1
    c.checkpoint_every_steps = 3
    c.optim.warmup_epochs = 0.0
    c.progress_bar = False
    c.eval_samples = 2 if role in ON_POLICY else 0  # The other tiny runs skip that compile.
    for stage in c.stages.values():
      stage.num_epochs, stage.num_steps = 0.0, 2
  return c


# ---------------------------------------------------------------- cross-tokenizer distillation
# A teacher with another tokenizer than the student's (docs/cross_tokenizer.md): `bpe_teacher`
# is the teacher trained on the corpus in the embedded BPE's tokens (data.tokenizer='bpe', 1024
# ids); `xtok_kl` and `uld` distill the byte-level student from it (its tokenizer named by
# teachers.teacher.tokenizer='bpe'), CE 0.5 + the alignment KL 0.5, or ULD (its own CE 0.5 +
# the sorted-probability distance 0.5):
#
#     distill-jax --config=configs/lm.py:bpe_teacher --workdir=runs/lm/bpe_teacher
#     distill-jax --config=configs/lm.py:xtok_kl --workdir=runs/lm/xtok_kl \
#         --config.teachers.teacher.checkpoint=runs/lm/bpe_teacher
#
# `,gold` (GOLD, TRL's on-policy cross-tokenizer distillation): the first half of the run as
# above on the corpus (a stage `offline`), then the same terms on-policy (fraction 0.5): the
# student's samples are re-tokenised for the teacher inside the step.
XTOK_ROLES = ("bpe_teacher", "xtok_kl", "uld")
BPE_BOS = 0  # The embedded BPE's BOS id (models.tokenizers.BPE_SPECIAL_TOKENS).


def xtok_config(role: str, options: list[str]) -> ml_collections.ConfigDict:
  """`configs/lm.py:ROLE[,tiny]` for ROLE in XTOK_ROLES (see the block's comment)."""
  if set(options) - {"tiny", "gold"} or (role == "bpe_teacher" and "gold" in options):
    raise ValueError(f"configs/lm.py arg {role!r}: expected {role}[,tiny] (xtok_kl and uld "
                     "also take ',gold').")
  tiny = "tiny" in options
  teacher = {**(TINY_TEACHER if tiny else TEACHER), "bos_id": BPE_BOS}
  if role == "bpe_teacher":
    c = get_config(",".join(["teacher", *options]))
    c.data.tokenizer = "bpe"
    c.student.kwargs = dict(teacher)
    return c
  c = get_config(",".join(["ce", *(o for o in options if o == "tiny")]))
  chunk = c.losses.token_ce.chunk_size
  c.teachers = ml_collections.ConfigDict({"teacher": teacher_config(
      "transformer_lm", teacher, tokenizer="bpe", seq_len=0)})
  if role == "xtok_kl":
    c.losses = ml_collections.ConfigDict({
        "token_ce": {"weight": 0.5, "chunk_size": chunk},
        "xtok_kl": {"weight": 0.5, "chunk_size": chunk}})
  else:
    c.losses = ml_collections.ConfigDict({"uld": {
        "weight": 1.0, "crossentropy_weight": 0.5, "distillation_weight": 0.5,
        "chunk_size": chunk}})
  if "gold" in options:
    c.stages = ml_collections.ConfigDict({"offline": {
        "num_epochs": 0.0 if tiny else c.num_epochs / 2, "num_steps": 2 if tiny else 0,
        "losses": c.losses.to_dict()}})
    c.num_epochs = c.num_epochs / 2
    c.on_policy.fraction = 0.5
  return c
