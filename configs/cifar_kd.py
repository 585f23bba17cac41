r"""CIFAR-100 (or -10) with the CRD paper code's recipes: teachers, students alone, every method.

The recipe (RepDistiller, see docs/references.md): 240 epochs, batch 64, SGD momentum
0.9, lr 0.05 (0.01 for MobileNetV2/ShuffleNet students), x0.1 at epochs 150, 180 and 210,
weight decay 5e-4, random crop 32 with padding 4 and horizontal flip, T = 4. Loss weights:
KD gamma 0.1 on CE and alpha 0.9 on KD; every other method gamma 1 on CE, alpha 0, and beta on
its term (FitNet 100, AT 1000, SP 3000, CC 0.02, VID 1, RKD 1, PKT 30000, AB 1, FT 200,
FSP 50, NST 50, CRD 0.8). AB, FT and FSP first pre-train for 30 epochs (a stage): AB and FSP
then train with CE alone, FT with its factor loss. DKD (mdistiller): CE 1, alpha 1, T 4,
beta 8 (2 for resnet56/resnet110 teachers, 6 for vgg13 and WRN teachers), weight warmed up over
20 epochs. The papers report the last epoch's top-1.

Arg: `METHOD,MODEL[,STUDENT][,cifar10][,tiny]`:
- `ce,resnet56` trains resnet56 alone (a teacher, or a student baseline);
- `METHOD,TEACHER,STUDENT` distills STUDENT from TEACHER, METHOD in `METHODS` below;
  `fitnet_hint` is FitNet with the original paper's hint pre-training stage (30 epochs).

    python scripts/prepare_data.py cifar100 --data_dir=$DATA      # once, with internet
    distill-jax --config=configs/cifar_kd.py:ce,resnet56 --workdir=runs/cifar100/resnet56 \
        --config.data.data_dir=$DATA
    distill-jax --config=configs/cifar_kd.py:crd,resnet56,resnet20 \
        --workdir=runs/cifar100/crd_resnet56_resnet20 --config.data.data_dir=$DATA \
        --config.teachers.teacher.checkpoint=runs/cifar100/resnet56

Cross-architecture pairs (the CRD paper's second table: `CROSS_PAIRS`, e.g.
`at,resnet50,mobilenetv2`) compare the layers the CRD code compares for them (`cross_layers`),
AT pooling maps of different resolution to the smaller one; FSP is refused there. CRD (and
CRD+KD) draw their negatives from other classes, as the CRD code's data loader does.

`tiny` shrinks the run to a few steps (for smoke tests).
"""

import ml_collections

from distill_jax.config import base_config, teacher_config
from distill_jax.data import default_data_config

# method -> (main-stage loss terms besides CE, CE weight, pre-training stage losses or None).
METHODS = {
    "kd": ({"kd": {"weight": 0.9, "temperature": 4.0}}, 0.1, None),
    "fitnet": ({"fitnet": {"weight": 100.0}}, 1.0, None),
    "fitnet_hint": ({"fitnet": {"weight": 100.0}}, 1.0, {"fitnet": {}}),
    "at": ({"at": {"weight": 1000.0}}, 1.0, None),
    "sp": ({"sp": {"weight": 3000.0}}, 1.0, None),
    # CC and FT at the CRD code's weights use that code's forms of the losses (see
    # losses/relations.py and losses/factor_transfer.py).
    "cc": ({"cc": {"weight": 0.02, "form": "repdistiller"}}, 1.0, None),
    "vid": ({"vid": {"weight": 1.0}}, 1.0, None),
    "rkd": ({"rkd": {"weight": 1.0}}, 1.0, None),
    "pkt": ({"pkt": {"weight": 30000.0}}, 1.0, None),
    "ab": ({}, 1.0, {"ab": {"weight": 1.0}}),  # scale 3/1000 and layer weights: the CRD code's.
    "ft": ({"ft": {"weight": 200.0, "form": "repdistiller"}}, 1.0,
           {"ft": {"mode": "reconstruct", "form": "repdistiller"}}),
    "fsp": ({}, 1.0, {"fsp": {"weight": 50.0}}),
    "nst": ({"nst": {"weight": 50.0}}, 1.0, None),
    # Negatives from other classes, as RepDistiller's CRD data loader draws them.
    "crd": ({"crd": {"weight": 0.8, "negatives": "other_class"}}, 1.0, None),
    "crd_kd": ({"crd": {"weight": 0.8, "negatives": "other_class"},
                "kd": {"weight": 1.0, "temperature": 4.0}}, 1.0, None),
    "dkd": ({"dkd": {"weight": 1.0, "alpha": 1.0, "beta": 8.0, "temperature": 4.0,
                     "warmup_epochs": 20.0}}, 1.0, None),
    "logit_mse": ({"logit_mse": {"weight": 1.0}}, 1.0, None),
    "reverse_kl": ({"reverse_kl": {"weight": 1.0, "temperature": 4.0}}, 1.0, None),
    "gjsd": ({"gjsd": {"weight": 1.0, "beta": 0.5, "temperature": 4.0}}, 1.0, None),
}
# Pre-training stages: what they train (RepDistiller's init(): AB and FSP the student's feature
# layers (and AB's connector), FT the paraphraser alone, FitNet's hint stage the regressor).
STAGE_TRAINS = {"ab": "all", "fsp": "all", "ft": "objective", "fitnet_hint": "all"}
DKD_BETA = {"resnet56": 2.0, "resnet110": 2.0, "vgg13": 6.0, "wrn_40_2": 6.0, "wrn_16_2": 6.0}
SMALL_LR_STUDENTS = ("mobilenetv2", "shufflev1", "shufflev2")
PRETRAIN_EPOCHS = 30.0
# Spatial sizes (32x32 inputs) of the sown `stage1`.. features of the models in the CRD paper's
# cross-architecture pairs; their layer pairings are derived from these (`cross_layers`).
STAGE_SIZES = {"vgg13": (16, 8, 4, 4), "vgg8": (16, 8, 4, 4), "resnet50": (32, 16, 8, 4),
               "resnet32x4": (32, 16, 8), "wrn_40_2": (32, 16, 8),
               "mobilenetv2": (16, 8, 4, 2), "shufflev1": (16, 8, 4), "shufflev2": (16, 8, 4)}
CROSS_PAIRS = (("vgg13", "mobilenetv2"), ("resnet50", "mobilenetv2"), ("resnet50", "vgg8"),
               ("resnet32x4", "shufflev1"), ("resnet32x4", "shufflev2"),
               ("wrn_40_2", "shufflev1"))


def cross_layers(teacher: str, student: str) -> dict[str, dict[str, object]]:
  """Per method, the layer settings of a cross-architecture pair, as RepDistiller pairs them.

  Its feature list is [stem, stage1 .. stageN, pool]; it compares:
  - AT, NST, VID: `feat[1:-1]` zipped, i.e. stage i with stage i for i <= min(N_s, N_t); maps
    of different resolution are pooled to the smaller one (AT: `pool_to_smaller`; NST and VID
    pool integer ratios themselves);
  - SP and FT: `feat[-2]`, each network's last stage (FT pools the larger map);
  - CRD, RKD, PKT, CC: `feat[-1]`, the pooled vectors (the terms' defaults);
  - FitNet: `feat[2]` of both through a regressor that strides or up-samples where they differ;
    our connectors change channels only, so the student's stage2 is paired with the teacher's
    first stage of the same resolution instead;
  - AB: `feat[1:-1]` with 1x1 connectors, which needs equal resolutions: each student stage is
    paired with the teacher's first stage of its resolution, stages without one are dropped.
  FSP (flows between consecutive layers of equal channel counts) is not defined across these
  architectures; the CRD paper has no FSP entry for them.
  """
  t_sizes, s_sizes = STAGE_SIZES[teacher], STAGE_SIZES[student]
  n = min(len(t_sizes), len(s_sizes))
  common = tuple(f"stage{i}" for i in range(1, n + 1))

  def same_size(i: int) -> str | None:
    matches = [j for j, size in enumerate(t_sizes, 1) if size == s_sizes[i - 1]]
    return f"stage{matches[0]}" if matches else None

  ab = [(f"stage{i}", same_size(i)) for i in range(1, len(s_sizes) + 1) if same_size(i)]
  last = {"student_layers": (f"stage{len(s_sizes)}",), "teacher_layers": (f"stage{len(t_sizes)}",)}
  return {
      "at": {"student_layers": common, "teacher_layers": common, "pool_to_smaller": True},
      "nst": {"student_layers": common, "teacher_layers": common},
      "vid": {"student_layers": common, "teacher_layers": common},
      "sp": last,
      "ft": {"student_layer": last["student_layers"][0],
             "teacher_layer": last["teacher_layers"][0]},
      "fitnet": {"student_layer": "stage2", "teacher_layer": same_size(2)},
      "ab": {"student_layers": tuple(s for s, _ in ab), "teacher_layers": tuple(t for _, t in ab),
             # The CRD code's layer weights 2^(l - n + 1) for n pairs.
             "layer_weights": tuple(2.0 ** (i - len(ab) + 1) for i in range(len(ab)))},
  }


def get_config(arg: str = "kd,resnet56,resnet20") -> ml_collections.ConfigDict:
  parts = arg.split(",")
  options = {p for p in parts if p in ("cifar10", "tiny")}
  method, *names = [p for p in parts if p not in options]
  if method != "ce" and method not in METHODS or len(names) != (1 if method == "ce" else 2):
    raise ValueError(f"configs/cifar_kd.py arg {arg!r}: expected ce,MODEL or "
                     f"METHOD,TEACHER,STUDENT with METHOD in {['ce', *METHODS]}.")
  dataset = "cifar10" if "cifar10" in options else "cifar100"
  c = base_config()
  c.data = default_data_config(dataset)
  c.data.augment = "crop_flip"
  c.data.crop_padding = 4
  c.batch_size = 64
  c.eval_batch_size = 500
  c.num_epochs = 240.0
  c.optim.lr = 0.01 if names[-1] in SMALL_LR_STUDENTS else 0.05
  c.optim.momentum = 0.9
  c.optim.weight_decay = 5e-4
  c.optim.schedule = "step"
  c.optim.decay_epochs = (150, 180, 210)
  c.optim.decay_factor = 0.1
  c.eval_every_epochs = 5.0
  c.log_every_steps = 100
  c.checkpoint_every_steps = 2000
  c.student.name = names[-1]
  if method != "ce":
    terms, ce_weight, stage = METHODS[method]
    c.teachers = ml_collections.ConfigDict(
        {"teacher": teacher_config(names[0], checkpoint=f"runs/{dataset}/{names[0]}")})
    losses = {"ce": {"weight": ce_weight}, **{k: dict(v) for k, v in terms.items()}}
    stage = None if stage is None else {k: dict(v) for k, v in stage.items()}
    if method == "dkd":
      losses["dkd"]["beta"] = DKD_BETA.get(names[0], 8.0)
    if tuple(names) in CROSS_PAIRS:
      if method == "fsp":
        raise ValueError(f"configs/cifar_kd.py arg {arg!r}: FSP compares flows between layers "
                         "of equal channel counts, which these architectures do not share "
                         "(the CRD paper has no FSP entry for cross-architecture pairs).")
      for term, settings in cross_layers(*names).items():
        for terms_of in (losses, stage or {}):
          if term in terms_of:
            terms_of[term].update(settings)
    c.losses = ml_collections.ConfigDict(losses)
    if stage is not None:
      c.stages = ml_collections.ConfigDict({"pretrain": {
          "num_epochs": PRETRAIN_EPOCHS, "train": STAGE_TRAINS[method], "losses": stage}})
  if "tiny" in options:
    c.num_steps = 4
    c.eval_every_epochs = 0.0
    c.progress_bar = False
    for stage in c.stages.values():
      stage.num_epochs = 0.0
      stage.num_steps = 2
  return c
