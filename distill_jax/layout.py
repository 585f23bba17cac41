"""The device layout's vocabulary: what `config.parallel` may say.

A leaf module, shared by the config's validation (`config.py`) and the layer that builds the
layout (`train/parallel.py`), so the config never imports training code.
"""

MODES = ("jit", "pmap")  # parallel.mode
MESH_AXES = ("data", "fsdp")  # parallel.mesh's axes, in mesh order
BATCH_AXES = ("data", "fsdp")  # The batch is split over both.
TEACHER_SHARDINGS = ("fsdp", "replicated")  # parallel.teacher_sharding
DEFAULT_MIN_SHARD_SIZE = 4096  # Elements: a 3x3x32x16 conv kernel and up are split over fsdp.
