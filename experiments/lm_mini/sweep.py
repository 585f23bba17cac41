r"""Token-level distillation of a small language model on the embedded corpus.

    distill-jax sweep --config=experiments/lm_mini/sweep.py --workdir=runs/lm_mini --workers=1
    distill-jax report runs/lm_mini --metric=final.eval/perplexity --scale=1 --csv

Stage `teachers`: `configs/lm.py:teacher` (4 layers, width 128, byte-level, Python's
documentation topics) for 4 epochs, seed 0. Stage `students`: the 2-layer width-64 student of
`configs/lm.py` trained alone (`ce`) and distilled by forward KL, reverse KL, JSD(0.5), skew
KL, top-k KD (k 16, from the live teacher) and forward KL plus hidden-state MSE and attention
KL (`hidden`), and on-policy GKD with lambda 0.5 (`gkd`) and 1.0 (`gkd1`), each with seeds
0..N-1, all reading the teacher's export.

Arg: `[SEEDS][,tiny][,epochs=E]`: SEEDS (default 3) seeds per method; `tiny` makes every run a
few steps (tests); `epochs=E` the students' epochs over the corpus (default 1, as in
`configs/lm.py`).
"""

from distill_jax import sweep as sw

CONFIG = "../../configs/lm.py"
TEACHER_EPOCHS = 4.0
METHODS = ("ce", "fkl", "rkl", "jsd", "skew", "topk", "hidden")


def get_sweep(arg: str | None = None) -> sw.Sweep:
  options = [o for o in (arg or "").split(",") if o]
  num_seeds = next((int(o) for o in options if o.isdigit()), 3)
  epochs = next((float(o[len("epochs="):]) for o in options if o.startswith("epochs=")), 1.0)
  tiny = "tiny" in options
  size = sw.fixed(arg="tiny") if tiny else sw.fixed()
  students = sw.product(sw.args("method", METHODS), sw.seeds(num_seeds), size)
  # On-policy distillation (GKD, token JSD alone): lambda 0.5 (`gkd`, the role's default)
  # and 1.0 (`gkd1`: every batch is the student's own continuation).
  students += sw.product(sw.args("method", {"gkd": "gkd"}), sw.seeds(num_seeds), size)
  students += sw.with_overrides(sw.product(sw.args("method", {"gkd1": "gkd"}),
                                           sw.seeds(num_seeds), size),
                                {"on_policy.fraction": 1.0})
  # One evaluation per epoch (the configs' four per epoch are for curves).
  length = lambda n: {} if tiny else {"num_epochs": n, "eval_every_epochs": 1.0}
  students = sw.with_overrides(students, {"teachers.teacher.checkpoint": "{ROOT}/teacher",
                                          **length(epochs)})
  teacher = sw.with_overrides(sw.product(sw.fixed("teacher", "teacher", method="teacher"), size),
                              length(TEACHER_EPOCHS))
  return sw.Sweep(config=CONFIG, stages={"teachers": teacher, "students": students})
