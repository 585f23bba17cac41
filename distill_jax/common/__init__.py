"""The shared vocabulary every layer may use: registries (`registry`), what a forward returns
(`outputs`), weight initialisers, the rules settings are checked with (`rules`), what
`config.parallel` may say (`layout`), exported models on disk (`model_io`), the XLA flags
set before any JAX backend starts (`xla_flags`), the backend a run found (`backend`) and how
the command-line front ends print a failure (`console`). It
imports nothing else of distill_jax.
"""
