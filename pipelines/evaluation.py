"""Load a model, score it on whole splits, and log the result to an MLflow run: the one way the
flows (train-magnet's final evaluation, evaluate-magnet) and promotion evaluate a trained model."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from magnet.data import check_text_settings
from magnet.evaluate import Evaluation, evaluate, prediction_figure
from pipelines import mlflow_record
from pipelines.registry import load_model
from pipelines.tracking import MlflowRunLogger, RunRef, log_dataset_inputs

PICTURE_EXAMPLES = 4


def evaluate_model(
    reference: str | Path,
    shards: str,
    splits: Sequence[str],
    *,
    tracking_uri: str | None = None,
    device: str | None = None,
    protocol: str | None = None,
    whole_splits: bool = False,
    log_to: RunRef | None = None,
    step: int = 0,
    pictures_dir: Path | None = None,
) -> Evaluation:
    """Score a model on ``splits`` of the shards; with ``log_to``, record it in that MLflow run.

    Args:
        reference: a checkpoint directory (or its URL) or a registry reference
            (``registry.load_model``: models:/magnet@alias, models:/magnet/N, runs:/, a run id).
        shards: prepared dataset root (absolute path or URL).
        splits: the splits scored, every expression of each.
        tracking_uri: the store a models:/ or runs:/ reference is read from.
        device: where the model runs; None = a GPU when there is one, else the CPU.
        protocol: ``eval.protocol`` to score with; None = the model's config.
        whole_splits: ignore the config's ``eval.max_samples`` (a run's quick-check cap).
        log_to: the run that gets the splits as evaluation
            inputs, the metrics and table (``MlflowRunLogger.log_evaluation``), the per-expression
            table and worst cases (``mlflow_record.log_evaluation``) and a picture per split.
        step: the step the logged evaluation is filed under.
        pictures_dir: also write each split's picture there (``predictions-<split>.png``).
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, cfg = load_model(str(reference), tracking_uri=tracking_uri, device=device)
    check_text_settings(shards, cfg.model.text)  # shards tokenised for another model: refuse by name
    if protocol is not None:
        cfg.eval.protocol = protocol
    if whole_splits:
        cfg.eval.max_samples = None
    if log_to is None:
        return evaluate(model, shards, cfg, splits=list(splits), device=device)
    log_dataset_inputs(log_to, shards, splits, "evaluation")
    result = evaluate(
        model,
        shards,
        cfg,
        splits=list(splits),
        device=device,
        keep_examples=PICTURE_EXAMPLES,
        keep_rows=True,
        keep_worst=mlflow_record.WORST_EXAMPLES,
    )
    logger = MlflowRunLogger(log_to)
    logger.log_evaluation(result, step=step)
    mlflow_record.log_evaluation(log_to, result, shards, step)
    for split in splits:
        if not result.splits[split].examples:
            continue
        figure = prediction_figure(result.splits[split].examples, title=f"{split}: final model")
        logger.log_predictions(figure, f"final_{split}_step{step:08d}.png", step=step)
        if pictures_dir is not None:
            pictures_dir.mkdir(parents=True, exist_ok=True)
            (pictures_dir / f"predictions-{split}.png").write_bytes(figure)
    return result
