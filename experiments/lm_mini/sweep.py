r"""Token-level distillation of a small language model on the embedded corpus.

    distill-jax sweep --config=experiments/lm_mini/sweep.py --workdir=runs/lm_mini --workers=1
    distill-jax report runs/lm_mini --metric=final.eval/perplexity --scale=1 --csv

Stage `teachers`: `configs/lm.py:teacher` (4 layers, width 128, byte-level, Python's
documentation topics) for 4 epochs, seed 0. Stage `outputs` (scripts, no training): the
teacher's top-16 log-probs per token (`cache`, `scripts/cache_teacher.py`), its
completions of the first 32 tokens of 1800 training rows by 96 tokens with its top-8 log-probs
per token (`completions`, `scripts/generate.py`), and the held-out rows as text (`heldout`).
Stage `students`: the 2-layer width-64 student of `configs/lm.py` trained alone (`ce`) and
distilled by forward KL, reverse KL, JSD(0.5), skew KL, top-k KD (k 16, from the live teacher),
forward KL plus hidden-state MSE and attention KL (`hidden`), top-k KD from the teacher's cache
(`topk_cache`), on-policy GKD with lambda 0.5 (`gkd`) and 1.0 (`gkd1`) and after a CE warm
start (`gkd_warm`: CE for half the run, then GKD lambda 0.5; `ce_warm`, its control, CE in
both halves), and from the teacher's file (as many steps as the others):
sequence-level KD (`sequence`, CE on its completions), black-box text only (`blackbox_text`:
the same training with no teacher at hand, not even at evaluation) and black-box top-k
(`blackbox_topk`, its text and top-8 log-probs), each with seeds 0..N-1. The file students
are scored on the held-out rows written as a file.

Arg: `[SEEDS][,tiny][,epochs=E][,only=M1-M2]`: SEEDS (default 3) seeds per method; `tiny` makes
every run a few steps (tests); `epochs=E` the students' epochs over the corpus (default 1, as in
`configs/lm.py`); `only=` the students of these methods, with the teacher and the outputs they
read.
"""

from distill_jax import sweep as sw

CONFIG = "../../configs/lm.py"
TEACHER_EPOCHS = 4.0
METHODS = ("ce", "fkl", "rkl", "jsd", "skew", "topk", "hidden")
# name -> (configs/lm.py arg, overrides): the other students.
OTHERS = {
    "topk_cache": ("topk", {"teachers.teacher.cache": "{ROOT}/cache/teacher"}),
    "gkd": ("gkd", {}),  # Lambda 0.5, the role's default.
    "gkd1": ("gkd", {"on_policy.fraction": 1.0}),  # Every batch the student's own text.
    "gkd_warm": ("gkd,warm", {}),
    "ce_warm": ("ce,warm", {}),  # gkd_warm's control: the same two stages, CE in both.
    "sequence": ("sequence", {"data.train_files": "{ROOT}/completions/teacher.jsonl",
                              "data.eval_files": "{ROOT}/heldout/heldout.jsonl"}),
    "blackbox_text": ("blackbox_text", {"data.train_files": "{ROOT}/completions/teacher.jsonl",
                                        "data.eval_files": "{ROOT}/heldout/heldout.jsonl"}),
    "blackbox_topk": ("blackbox_topk", {"data.train_files": "{ROOT}/completions/teacher.jsonl",
                                        "data.eval_files": "{ROOT}/heldout/heldout.jsonl"}),
}
FILE_STUDENTS = ("sequence", "blackbox_text", "blackbox_topk")
# Trained on the file alone: no teacher at evaluation either.
NO_TEACHER = ("blackbox_text", "blackbox_topk")
# The teacher's file: 1800 training rows' first 32 tokens continued by 96 (the rows are 128).
COMPLETIONS = {"num_prompts": 1800, "prompt_len": 32, "max_new_tokens": 96, "top_logprobs": 8}
CORPUS_STEPS = 105  # One epoch of the corpus' 3360 training rows at batch 32.


def retime(method: str, epochs: float) -> dict:
  """The run length of a student beside `length`'s: the warm-started ones split it in two
  halves (the CE stage, then the main one); the file students run as many steps as the corpus
  students (their 1800 records are about half the corpus' rows)."""
  if method.endswith("_warm"):
    return {"num_epochs": epochs / 2, "stages.warm.num_epochs": epochs / 2}
  if method in FILE_STUDENTS:
    return {"num_steps": round(CORPUS_STEPS * epochs)}
  return {}


def get_sweep(arg: str | None = None) -> sw.Sweep:
  options = [o for o in (arg or "").split(",") if o]
  num_seeds = next((int(o) for o in options if o.isdigit()), 3)
  epochs = next((float(o[len("epochs="):]) for o in options if o.startswith("epochs=")), 1.0)
  tiny = "tiny" in options
  only = next((o[len("only="):].split("-") for o in options if o.startswith("only=")),
              [*METHODS, *OTHERS])
  unknown = set(only) - {*METHODS, *OTHERS}
  if unknown:
    raise sw.SweepError(f"lm_mini only={'-'.join(only)}: unknown {sorted(unknown)}; known: "
                        f"{', '.join([*METHODS, *OTHERS])}.")
  size = sw.fixed(arg="tiny") if tiny else sw.fixed()
  # One evaluation per epoch (the configs' four per epoch are for curves).
  length = lambda n: {} if tiny else {"num_epochs": n, "eval_every_epochs": 1.0}
  students = []
  for name in only:
    role, overrides = (name, {}) if name in METHODS else OTHERS[name]
    points = sw.product(sw.args("method", {name: role}), sw.seeds(num_seeds), size)
    teacher = {} if name in NO_TEACHER else {"teachers.teacher.checkpoint": "{ROOT}/teacher"}
    students += sw.with_overrides(points, {**overrides, **teacher, **length(epochs)})
  if not tiny:
    students = [sw.with_overrides([p], retime(p.labels["method"], epochs))[0] for p in students]
  outputs = []
  if "topk_cache" in only:  # Text is never augmented: one cache serves every seed.
    outputs += sw.script("cache", "../../scripts/cache_teacher.py", {
        "config": f"{CONFIG}:topk{',tiny' if tiny else ''}", "cache_dir": "{TRIAL}",
        "top_k": 16, "config.teachers.teacher.checkpoint": "{ROOT}/teacher"})
  if set(FILE_STUDENTS) & set(only):
    data = {"config": f"{CONFIG}:teacher{',tiny' if tiny else ''}"}
    outputs += sw.script("completions", "../../scripts/generate.py", {
        "workdir": "{ROOT}/teacher", **data, "config.data.eval_split": "train",
        **({"num_prompts": 64, "prompt_len": 8, "max_new_tokens": 16, "top_logprobs": 4}
           if tiny else COMPLETIONS),
        "output": "{TRIAL}/teacher.jsonl"})
    outputs += sw.script("heldout", "../../scripts/generate.py", {
        **data, "rows_as_text": True, "num_prompts": 100000, "output": "{TRIAL}/heldout.jsonl"})
  teacher = sw.with_overrides(sw.product(sw.fixed("teacher", "teacher", method="teacher"), size),
                              length(TEACHER_EPOCHS))
  stages = {"teachers": teacher, "outputs": outputs, "students": students}
  return sw.Sweep(config=CONFIG, stages={k: v for k, v in stages.items() if v})
