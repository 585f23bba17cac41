"""Loss terms: a registry of pure functions, one decorator to add one.

A loss term is `fn(student: Outputs, teachers: dict[str, Outputs], batch, **hparams) -> scalar`.
Its keyword-only hyper-parameters, with their defaults, are the config knobs of the term:
`config.losses.<term>.<hparam>`; the objective checks them against the signature before
anything is built, so a typo fails at once.

Add a loss in any importable file:

    from distill_jax.losses import register_loss

    @register_loss('my_loss')
    def my_loss(student, teachers, batch, *, temperature: float = 1.0):
      ...

and name that file in the config: `config.imports = ['my_pkg.my_losses']`.

Beside the losses: `objective` (the config's weighted sum of terms: `build_objective`) and
`connectors` (the trainable maps that module terms use). The modules, by kind of loss:
`logits`, `features` (feature maps), `relations` (between a batch's examples), `hints`,
`factor_transfer`, `contrastive`; for language models `tokens`, `token_topk`, `token_layers`,
`cross_tokenizer` (teachers of other tokenizers), all reduced per token by `chunking`, and
`minillm` (sequence-level reverse KL by policy gradient on the student's samples). Shared
helpers are in `base`.
"""

from distill_jax.losses import (
    contrastive,  # noqa: F401  (registers crd)
    cross_tokenizer,  # noqa: F401  (registers xtok_kl, uld)
    factor_transfer,  # noqa: F401  (registers ft, ft_paraphraser)
    features,  # noqa: F401  (registers at, nst, fsp)
    hints,  # noqa: F401  (registers fitnet, vid, ab)
    logits,  # noqa: F401  (registers ce, kd, dkd, logit_mse, reverse_kl, gjsd)
    minillm,  # noqa: F401  (registers minillm)
    relations,  # noqa: F401  (registers sp, rkd, pkt, cc)
    token_layers,  # noqa: F401  (registers token_hidden_mse, token_attention_kl)
    token_topk,  # noqa: F401  (registers token_topk_kd, token_sparse_topk_kd)
    tokens,  # noqa: F401  (registers token_ce, token_fkl, token_rkl, token_jsd, token_skew_kl)
)
from distill_jax.losses.base import LOSSES, loss_hparams, register_loss

__all__ = ["LOSSES", "register_loss", "loss_hparams"]
