"""Settings shared by the sweep tests."""

from __future__ import annotations


def tiny_trial(max_steps: int = 6) -> list[str]:
    """Config overrides for a sweep trial that trains and scores in seconds: 64 px, batch 2, val
    only, an evaluation and a checkpoint every 2 steps."""
    return [
        "model.image_size=64",
        "data.batch_size=2",
        "data.loader_workers=0",
        "data.eval_splits=[val]",
        "eval.eval_size=64",
        f"train.max_steps={max_steps}",
        "train.eval_every=2",
        "train.checkpoint_every=2",
        "train.log_every=1",
    ]
