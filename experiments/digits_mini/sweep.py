r"""The CRD protocol scaled to the embedded digits: a teacher, then every method x seeds.

    distill-jax sweep --config=experiments/digits_mini/sweep.py --workdir=runs/digits_mini \
        --workers=2
    distill-jax report runs/digits_mini --rows=method --cols=student --png --csv

Stage `teachers`: the CNN teacher of `configs/digits.py` (widths 32/64, 30 epochs), seed 0.
Stage `students`: every method of `configs/digits.py`'s METHODS and the student trained alone
('alone'), each with seeds 0..N-1, all reading the teacher's export. As in the CRD table, one
student architecture per column: the methods distill a CNN of widths 16/32 (KD's student, an
MLP in configs/digits.py, is made that CNN here so every row shares one baseline); FSP compares
Gram matrices between layers and needs the teacher's widths, so it has its own column (a CNN of
widths 32/64, the teacher's architecture) with its own 'alone' baseline.

Arg: `[SEEDS][,tiny][,epochs=E]`: SEEDS (default 3) seeds per cell; `tiny` makes every run a
few steps (tests); `epochs=E` the students' epochs (default 20).
"""

from distill_jax import sweep as sw

CONFIG = "../../configs/digits.py"
METHODS = ("kd", "fitnet", "at", "sp", "cc", "vid", "rkd", "pkt", "ab", "ft", "nst", "crd",
           "dkd", "logit_mse", "reverse_kl", "gjsd")
# Student column -> (its model, the methods distilled into it).
STUDENTS = {"cnn16-32": ((16, 32), METHODS), "cnn32-64": ((32, 64), ("fsp",))}


def get_sweep(arg: str | None = None) -> sw.Sweep:
  options = [o for o in (arg or "").split(",") if o]
  num_seeds = next((int(o) for o in options if o.isdigit()), 3)
  epochs = next((float(o[len("epochs="):]) for o in options if o.startswith("epochs=")), 20.0)
  size = sw.fixed(arg="tiny") if "tiny" in options else sw.fixed()
  students = []
  for column, (widths, methods) in STUDENTS.items():
    # 'kd' and 'alone' start from digits.py's MLP-student configs, whose recipe drops the crop:
    # the CNN students all keep the teacher's crop, so every row of a column trains alike.
    model = {"student.name": "cnn", "student.kwargs": {"widths": widths}, "data.augment": "crop"}
    students += sw.product(
        sw.args("method", {**{m: m for m in methods}, "alone": "student"}),
        sw.fixed(column, overrides=model, student=column), sw.seeds(num_seeds), size)
  students = sw.with_overrides(
      students, {"teachers.teacher.checkpoint": "{ROOT}/teacher", "num_epochs": epochs})
  teacher = sw.product(sw.fixed("teacher", "teacher", role="teacher"), size)
  return sw.Sweep(config=CONFIG, stages={"teachers": teacher, "students": students})
