"""distill-jax: knowledge distillation in JAX/Flax."""

from distill_jax.xla_flags import apply_cpu_defaults as _apply_cpu_defaults

_apply_cpu_defaults()  # Before any JAX backend starts: see distill_jax/xla_flags.py.
