"""Settings and step-log readers shared by the Ray Train and Ray Tune tests."""

from __future__ import annotations

import json
from pathlib import Path

# The tiny preset quick to build: 64 px, and a random 5 M-parameter text encoder (MiniLM's
# vocabulary) instead of the preset's 22.7 M MiniLM: a checkpoint is 140 MB instead of 390, and a
# step a third quicker.
TINY_MODEL = [
    "model.image_size=64",
    "model.text.name_or_path=google/bert_uncased_L-6_H-128_A-2",
    "model.text.pretrained=false",
]
# A run that trains in seconds: batch 2, no loader processes, a log line every step.
TINY_RUN = [*TINY_MODEL, "data.batch_size=2", "data.loader_workers=0", "train.log_every=1"]
# Evaluation on val only, at the input size.
SCORE_VAL = ["data.eval_splits=[val]", "eval.eval_size=64"]


# A sweep of two trials, seeds 0 and 1, that all run to the end (no early stopping).
TWO_SEED_SWEEP = """
metric: val/oIoU
mode: max
search: grid
num_samples: 1
scheduler: {early_stopping: false}
params:
  train.seed: {grid: [0, 1]}
"""


def tiny_trial(max_steps: int = 6) -> list[str]:
    """Config overrides for a sweep trial that trains and scores in seconds: an evaluation and a
    checkpoint every 2 steps."""
    return [
        *TINY_RUN,
        *SCORE_VAL,
        f"train.max_steps={max_steps}",
        "train.eval_every=2",
        "train.checkpoint_every=2",
    ]


def step_records(log_file: Path) -> list[dict]:
    """The JSON lines a step hook appended; a line cut short by a killed writer is left out."""
    if not log_file.exists():
        return []
    return [json.loads(line) for line in log_file.read_text().splitlines() if line.endswith("}")]


def lifetimes(log_file: Path, rank: int) -> list[list[dict]]:
    """The records of one rank split by worker process (one list per pid, in order)."""
    runs: list[list[dict]] = []
    for record in step_records(log_file):
        if record["rank"] != rank:
            continue
        if not runs or runs[-1][-1]["pid"] != record["pid"]:
            runs.append([])
        runs[-1].append(record)
    return runs
