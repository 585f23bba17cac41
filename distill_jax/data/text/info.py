"""What a model and a run need to know about the configured text data set (`TextInfo`)."""

from __future__ import annotations

import dataclasses
from typing import Any

from distill_jax.data.sources import config_field
from distill_jax.data.text.packing import packed_split
from distill_jax.models.tokenizers import get_tokenizer


@dataclasses.dataclass(frozen=True)
class TextInfo:
  """What a model and a run need to know about a packed text data set."""

  name: str
  tokenizer: str
  vocab_size: int
  seq_len: int
  num_examples: dict[str, int]  # Rows per split.
  documents: dict[str, int]
  dropped: dict[str, int]
  num_bytes: dict[str, int]
  # Per-row arrays the batches carry beyond tokens/targets/mask/document/id: {key: (shape
  # without the row axis, dtype name)}.
  extra: dict[str, tuple[tuple[int, ...], str]] = dataclasses.field(default_factory=dict)
  # {split: Packed.counts} for the splits that counted something (black-box files).
  counts: dict[str, dict[str, int]] = dataclasses.field(default_factory=dict)


def get_text_info(data_config: Any) -> TextInfo:
  """Describes the configured text data set, packed at `data_config.seq_len`."""
  splits = (config_field(data_config, "train_split", "train"),
            config_field(data_config, "eval_split", "test"))
  packs = {s: packed_split(data_config, s) for s in splits}
  tok = get_tokenizer(config_field(data_config, "tokenizer", "bytes"))
  return TextInfo(name=data_config.name, tokenizer=tok.name, vocab_size=tok.vocab_size,
                  seq_len=int(data_config.seq_len),
                  num_examples={s: len(p) for s, p in packs.items()},
                  documents={s: p.documents for s, p in packs.items()},
                  dropped={s: p.dropped for s, p in packs.items()},
                  num_bytes={s: p.num_bytes for s, p in packs.items()},
                  extra={k: (v.shape[1:], v.dtype.name) for k, v in packs[splits[0]].extra.items()},
                  counts={s: dict(p.counts) for s, p in packs.items() if p.counts})
