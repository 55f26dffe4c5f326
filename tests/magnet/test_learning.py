"""The overfit check: the demo's model fits a few dozen expressions to near what its output grid allows.

A change that breaks learning (a gradient that no longer reaches a part, a loss or a data bug, an
init that stalls) passes every shape and parity test; it does not pass this one. The bound is 90%
of the stride-4 ceiling (``magnet.metrics.grid_ceiling``) on the training expressions themselves.
"""

from __future__ import annotations

import pytest
import torch

from magnet.config import load_config
from magnet.data import build_eval_loader, open_split
from magnet.metrics import grid_ceiling
from magnet.train import LocalReporter, train

IMAGES = 8  # 7 of them train: 50 expressions
STEPS = 250


@pytest.mark.timeout(300)
def test_demo_model_fits_a_few_dozen_expressions(synthetic_shards, tmp_path) -> None:
    shards = str(synthetic_shards(IMAGES, 64, 0, 1000))
    cfg = load_config(
        "demo",
        [
            "data.batch_size=8",
            "data.eval_splits=[train]",
            f"train.max_steps={STEPS}",
            f"train.eval_every={STEPS}",
            f"train.checkpoint_every={STEPS}",
        ],
    )
    split = open_split(shards, "train")
    targets = [
        m for batch in build_eval_loader(split, cfg.data, cfg.eval, image_size=64) for m in batch["orig_mask"]
    ]
    inter, union = grid_ceiling(targets, stride=4)
    ceiling = 100 * float(inter.sum() / union.sum())
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        metrics = train(cfg, shards, reporter=LocalReporter(tmp_path))
    finally:
        torch.set_num_threads(threads)
    fitted = metrics["train/oIoU"]
    print(f"{split.num_samples} expressions: train oIoU {fitted:.1f}, stride-4 ceiling {ceiling:.1f}")
    assert fitted >= 0.9 * ceiling, f"train oIoU {fitted:.1f} < 90% of the stride-4 ceiling {ceiling:.1f}"
