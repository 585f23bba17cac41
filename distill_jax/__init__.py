"""distill-jax: knowledge distillation in JAX/Flax."""

from distill_jax.common.xla_flags import apply_cpu_defaults as _apply_cpu_defaults

_apply_cpu_defaults()  # Before any JAX backend starts: see distill_jax/common/xla_flags.py.
