r"""The CRD paper's CIFAR-100 table as one sweep: 6 teachers, then 13 pairs x 16 methods x seeds.

    distill-jax sweep --config=experiments/crd_cifar100/sweep.py --workdir=runs/crd_cifar100 \
        --set=data.data_dir=$DATA --launcher=slurm --gpus_per_task=1 --cpus_per_task=8 \
        --time=24:00:00 --parallel=64
    distill-jax report runs/crd_cifar100 --rows=method --cols=pair \
        --expected=experiments/crd_cifar100/expected.csv --baseline=alone --csv --png

Stage `teachers`: each teacher architecture of the table trained once (seed 0) with
`configs/cifar_kd.py:ce,MODEL`, the CRD code's recipe. Stage `students`: for each of the
paper's 13 teacher -> student pairs (7 of one family, 6 across families) the student alone
(`ce,STUDENT`) and distilled with KD, FitNet, AT, SP, CC, VID, RKD, PKT, AB, FT, FSP, NST, CRD,
CRD+KD and DKD (`METHOD,TEACHER,STUDENT`, each method's recipe in configs/cifar_kd.py), each with
seeds 0, 1, 2, reading its teacher's export from `{ROOT}/teacher-<model>`. FSP is left out where
the paper has no entry: wrn40-2 -> wrn40-1 (layers of different depth) and every
cross-architecture pair (its flow matrices need matching channel counts between layers).

Arg: `[seeds=N][,tiny][,cifar10]`: N seeds (default 3); `tiny` a few steps per run (smoke
tests); `cifar10` the same grid on CIFAR-10 (no paper numbers).
"""

from distill_jax import sweep as sw

CONFIG = "../../configs/cifar_kd.py"
SAME_FAMILY = (("wrn_40_2", "wrn_16_2"), ("wrn_40_2", "wrn_40_1"), ("resnet56", "resnet20"),
               ("resnet110", "resnet20"), ("resnet110", "resnet32"),
               ("resnet32x4", "resnet8x4"), ("vgg13", "vgg8"))
CROSS_FAMILY = (("vgg13", "mobilenetv2"), ("resnet50", "mobilenetv2"), ("resnet50", "vgg8"),
                ("resnet32x4", "shufflev1"), ("resnet32x4", "shufflev2"),
                ("wrn_40_2", "shufflev1"))
PAIRS = SAME_FAMILY + CROSS_FAMILY
METHODS = ("kd", "fitnet", "at", "sp", "cc", "vid", "rkd", "pkt", "ab", "ft", "fsp", "nst",
           "crd", "crd_kd", "dkd")
NO_FSP = {("wrn_40_2", "wrn_40_1"), *CROSS_FAMILY}


def methods_of(pair: tuple[str, str]) -> tuple[str, ...]:
  return tuple(m for m in METHODS if not (m == "fsp" and pair in NO_FSP))


def get_sweep(arg: str | None = None) -> sw.Sweep:
  options = [o for o in (arg or "").split(",") if o]
  num_seeds = next((int(o[len("seeds="):]) for o in options if o.startswith("seeds=")), 3)
  extra = sw.fixed(arg=",".join(o for o in options if o in ("tiny", "cifar10")))
  teachers = sw.named(sw.product(
      sw.args("teacher", {t: f"ce,{t}" for t in dict.fromkeys(t for t, _ in PAIRS)}), extra),
      "teacher")
  students = []
  for teacher, student in PAIRS:
    pair = sw.fixed(f"{teacher}-{student}", pair=f"{teacher}-{student}")
    alone = sw.product(sw.args("method", {"alone": f"ce,{student}"}), pair, sw.seeds(num_seeds),
                       extra)
    distilled = sw.product(sw.args("method", methods_of((teacher, student))),
                           sw.fixed(arg=f"{teacher},{student}"), pair, sw.seeds(num_seeds),
                           extra)
    students += alone + sw.with_overrides(
        distilled, {"teachers.teacher.checkpoint": f"{{ROOT}}/teacher-{teacher}"})
  return sw.Sweep(config=CONFIG, stages={"teachers": teachers, "students": students})
