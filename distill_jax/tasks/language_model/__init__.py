"""The language-model task and what is its own: next-token prediction on packed text.

- `task`: `LanguageModel` (batch keys, metrics, the headline perplexity, its hooks) and
  `check_tokenizers` (open-weights teachers must share the data's tokenizer);
- `generate`: sampling with the key/value cache (`sample`, `check_prompts`,
  `completion_records`), which `scripts/generate.py` uses too;
- `on_policy`: on-policy distillation (GKD): `OnPolicy`, `on_policy_from_config`;
- `eval_sampler`: `EvalSampler`, a few of the student's samples at each evaluation.
"""

from distill_jax.tasks.language_model.task import LanguageModel, check_tokenizers

__all__ = ["LanguageModel", "check_tokenizers"]
