"""Random model inputs for the model tests: cheap, seeded, shaped as the shard reader's batches."""

from __future__ import annotations

import torch

PAD, CLS, SEP = 0, 101, 102  # bert-base-uncased, the vocabulary of every preset


def random_batch(size: tuple[int, int], n: int = 2, seed: int = 0, words: int = 6) -> dict[str, torch.Tensor]:
    """Random image, an expression of ``words`` random ids between [CLS] and [SEP] padded to 20,
    random target mask: the keyword arguments of a training forward."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.full((n, 20), PAD, dtype=torch.long)
    ids[:, 0], ids[:, words + 1] = CLS, SEP
    ids[:, 1 : words + 1] = torch.randint(1000, 5000, (n, words), generator=g)
    return {
        "image": torch.randn(n, 3, *size, generator=g),
        "input_ids": ids,
        "attention_mask": (ids != PAD).long(),
        "target_mask": (torch.rand(n, *size, generator=g) > 0.5).float(),
    }
