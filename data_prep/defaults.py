"""Preparation's defaults, in one place: data_prep.shards, the prepare-refcoco flow and
`magnet prepare` read them here. It imports nothing heavy, so `magnet --help` stays quick."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from data_prep.masks import MaskMode


@dataclass(frozen=True)
class PrepareDefaults:
    """What a preparation uses when the caller does not say."""

    dataset: str = "refcoco"
    split_by: str = "unc"
    tokenizer: str = "all-minilm-l6-v2"  # the offline alias (data_prep.tokenize.MINILM_ALIAS)
    max_tokens: int = 20
    samples_per_shard: int = 1000
    mask_mode: MaskMode = "union"
    workers: int = 2  # processes for the chunks, in the flow and the command


PREPARE = PrepareDefaults()
