"""Promotion: pick the best finished run, score it and the current `champion` on the same data, and
move the registry alias only when the challenger wins by a margin.

    promote(tracking_uri, experiment="magnet", metric="val_oIoU", shards=..., min_gain=0.5) -> Promotion

The comparison is written on the challenger's model version (tags, and a `## Promotion` section of
its description, below the model card the train flow wrote), so the MLflow UI tells why an alias
sits where it does. Scores are cached on each version as tags keyed by split, protocol and the
dataset's summary.json hash, and every write happens only when the value differs: running a
promotion twice changes nothing the second time.

Promotions at once (two sweeps finishing together, a flow retried beside a manual run) are
serialised by a lock kept in the registry itself: the registered model ``<model>.promotion-lock``,
created to take the lock and deleted to release it. MLflow has no transactions or conditional
writes, so two promoters that both read champion v1 and then both write would leave the last
writer's champion without comparing the two challengers (and `challenger` pointing at v1). Creating
a registered model is the one atomic check-and-set the registry offers: the database-backed stores
(the tracking server, SQLite) refuse a second model of that name, so the lock holds across machines,
where a file lock would only cover one. Scoring (the slow part, cached in tags and idempotent) runs
outside it; reading the champion, deciding and writing run inside, so every outcome is the one of
some serial order of the promotions. A lock older than ``LOCK_STALE_S`` belongs to a crashed
promoter and is broken. The file-based registry store checks before it creates, so it is not safe
for concurrent promoters.
"""

from __future__ import annotations

import os
import random
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pipelines.defaults import PROMOTE
from pipelines.evaluation import evaluate_model
from pipelines.mlflow_record import with_section
from pipelines.registry import MODEL_NAME
from pipelines.tracking import client_for, dataset_tags, resolve_tracking_uri

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import Run
    from mlflow.entities.model_registry import ModelVersion

CHAMPION = "champion"
CHALLENGER = "challenger"
DATASET_TAG = "dataset.summary_sha256"
PARENT_TAG = "mlflow.parentRunId"
LOCK_SUFFIX = ".promotion-lock"
LOCK_STALE_S = 600.0  # far above the seconds a holder needs: it reads and writes tags only
LOCK_WAIT_S = 1800.0
PROMOTION_SECTION = "Promotion"  # the description's section holding the decision (mlflow_record.with_section)


class PromotionError(ValueError):
    """A promotion that cannot be decided fairly (missing metrics, different data)."""


@dataclass(frozen=True)
class Score:
    """One version's score on (dataset hash, split, protocol)."""

    version: str
    run_id: str
    value: float
    dataset_sha256: str
    split: str
    protocol: str


@dataclass(frozen=True)
class Promotion:
    """What a promotion decided; ``changed`` says whether anything in the registry was written."""

    decision: str  # "promoted", "first-champion", "kept", "already-champion"
    metric: str
    challenger: Score
    champion: Score | None
    gain: float | None
    min_gain: float
    champion_version: str
    changed: bool
    summary: str


# --------------------------------------------------------------------------------- selection
def resolve_metric(name: str) -> str:
    """``val_oIoU`` (shell-friendly) or ``val/oIoU`` -> the run metric key ``val/oIoU``."""
    if "/" in name:
        return name
    split, sep, rest = name.partition("_")
    if not sep or not rest:
        raise PromotionError(f"metric {name!r} must name a split and a score, e.g. val_oIoU or val/oIoU")
    return f"{split}/{rest}"


def _versions_of(client: MlflowClient, run_id: str, model_name: str) -> list[ModelVersion]:
    return client.search_model_versions(f"name = '{model_name}' and run_id = '{run_id}'")


def select_challenger(
    client: MlflowClient,
    experiment: str,
    metric: str,
    *,
    sweep_run_id: str | None = None,
    model_name: str = MODEL_NAME,
) -> tuple[Run, ModelVersion]:
    """The finished run with the highest ``metric`` that has a registered version (its newest).

    Args:
        client: MLflow client.
        experiment: experiment name whose runs compete.
        metric: run metric key (``val/oIoU``).
        sweep_run_id: only the children of this sweep's parent run compete.
        model_name: registered model.
    """
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise PromotionError(f"no MLflow experiment named {experiment!r}")
    filters = ["attributes.status = 'FINISHED'"]
    if sweep_run_id:
        filters.append(f"tags.`{PARENT_TAG}` = '{sweep_run_id}'")
    runs = client.search_runs([found.experiment_id], filter_string=" and ".join(filters), max_results=5000)
    where = f"sweep {sweep_run_id}" if sweep_run_id else f"experiment {experiment!r}"
    if not runs:
        raise PromotionError(f"no finished run in {where}")
    scored = [run for run in runs if metric in run.data.metrics]
    if not scored:
        names = ", ".join(run.info.run_name or run.info.run_id for run in runs[:10])
        raise PromotionError(f"no finished run in {where} reports metric {metric!r} (runs: {names})")
    for run in sorted(scored, key=lambda r: r.data.metrics[metric], reverse=True):
        versions = _versions_of(client, run.info.run_id, model_name)
        if versions:
            return run, max(versions, key=lambda v: int(v.version))
    raise PromotionError(
        f"no run in {where} with metric {metric!r} has a registered version of {model_name!r}"
    )


def _check_same_data(run: Run, dataset_sha256: str, protocol: str, role: str) -> None:
    """Refuse when the run was trained and scored on other data or with another protocol."""
    ran_on = run.data.tags.get(DATASET_TAG)
    if ran_on is None:
        raise PromotionError(f"{role} run {run.info.run_id} has no {DATASET_TAG} tag: unknown data")
    if ran_on != dataset_sha256:
        raise PromotionError(
            f"{role} run {run.info.run_id} was scored on data with summary.json sha256 {ran_on[:12]}..., "
            f"but the shards to compare on have {dataset_sha256[:12]}...: the models were scored on "
            "different data; promote with the shards they were trained on"
        )
    ran_protocol = run.data.params.get("eval.protocol")
    if ran_protocol is not None and ran_protocol != protocol:
        raise PromotionError(
            f"{role} run {run.info.run_id} was scored with protocol {ran_protocol!r}, not {protocol!r}"
        )


# ----------------------------------------------------------------------------------- scoring
def _score_tag(split: str, protocol: str, name: str) -> str:
    return f"promotion.score.{split}.{protocol}.{name}"


def score_version(
    client: MlflowClient,
    version: ModelVersion,
    *,
    shards: str,
    split: str,
    protocol: str,
    score_name: str,
    dataset_sha256: str,
    tracking_uri: str,
    device: str = "cpu",
) -> Score:
    """The version's score on the shards: from its cached tags when they were made on this very
    data, else by evaluating it (pipelines.evaluation.evaluate_model)."""
    tags = version.tags or {}
    cached_sha = tags.get(_score_tag(split, protocol, "dataset_sha256"))
    cached = tags.get(_score_tag(split, protocol, score_name))
    if cached is not None and cached_sha == dataset_sha256:
        value = float(cached)
    else:
        metrics = evaluate_model(
            f"models:/{version.name}/{version.version}",
            shards,
            [split],
            tracking_uri=tracking_uri,
            device=device,
            protocol=protocol,
            whole_splits=True,  # a run's quick-check cap must not shrink its test
        ).metrics
        key = f"{split}/{score_name}"
        if key not in metrics:
            raise PromotionError(
                f"evaluation of version {version.version} gave no {key!r} (has {sorted(metrics)})"
            )
        value = float(metrics[key])
        _set_version_tag(client, version, _score_tag(split, protocol, score_name), f"{value:.6f}")
        _set_version_tag(client, version, _score_tag(split, protocol, "dataset_sha256"), dataset_sha256)
        value = float(f"{value:.6f}")  # the same number a later run reads back from the tag
    return Score(str(version.version), version.run_id, value, dataset_sha256, split, protocol)


# ----------------------------------------------------------------------------- registry writes
def _set_version_tag(client: MlflowClient, version: ModelVersion, key: str, value: str) -> bool:
    if (version.tags or {}).get(key) == value:
        return False
    client.set_model_version_tag(version.name, version.version, key, value)
    version.tags[key] = value
    return True


def _set_alias(client: MlflowClient, model_name: str, alias: str, version: str) -> bool:
    aliases = client.get_registered_model(model_name).aliases or {}
    if str(aliases.get(alias)) == version:  # MLflow hands alias targets back as int
        return False
    client.set_registered_model_alias(model_name, alias, version)
    return True


def _set_description(client: MlflowClient, version: ModelVersion, text: str) -> bool:
    """The promotion's record as the ``Promotion`` section of the version's description: the model
    card the train flow wrote above it stays."""
    described = with_section(version.description, PROMOTION_SECTION, text)
    if (version.description or "") == described:
        return False
    client.update_model_version(version.name, version.version, description=described)
    return True


def _current_champion(client: MlflowClient, model_name: str) -> ModelVersion | None:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(model_name, CHAMPION)
    except MlflowException:
        return None


@contextmanager
def registry_lock(
    client: MlflowClient, model_name: str, *, wait_s: float = LOCK_WAIT_S, stale_s: float = LOCK_STALE_S
) -> Iterator[None]:
    """Hold the promotion lock of ``model_name``: the registered model ``<model_name>.promotion-lock``
    exists exactly while someone holds it (see the module docstring for why).

    Args:
        client: MLflow client of the registry.
        model_name: registered model whose aliases the holder will move.
        wait_s: give up with PromotionError after waiting this long for another holder.
        stale_s: break a lock created longer ago than this (its holder died).
    """
    from mlflow.exceptions import MlflowException

    name = f"{model_name}{LOCK_SUFFIX}"
    holder = f"{socket.gethostname()}:{os.getpid()}"
    deadline = time.monotonic() + wait_s
    while True:
        try:
            client.create_registered_model(
                name, tags={"holder": holder}, description="held while a promotion moves aliases"
            )
            break
        except MlflowException as err:
            # RESOURCE_DOES_NOT_EXIST: the holder released it between our create and the store's look-up
            if err.error_code not in ("RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST"):
                raise
        try:
            lock = client.get_registered_model(name)
        except MlflowException:
            continue  # released meanwhile: try again at once
        age_s = time.time() - lock.creation_timestamp / 1000
        if age_s > stale_s:
            client.delete_registered_model(name)  # its holder died: a live one finishes in seconds
            continue
        if time.monotonic() > deadline:
            raise PromotionError(
                f"registered model {name!r} (the promotion lock) held by {lock.tags.get('holder')} "
                f"for {age_s:.0f} s; delete it if no promotion is running"
            )
        time.sleep(0.2 + 0.3 * random.random())
    try:
        yield
    finally:
        client.delete_registered_model(name)


# -------------------------------------------------------------------------------- the decision
def _describe(
    decision: str, metric: str, challenger: Score, champion: Score | None, gain: float | None, min_gain: float
) -> str:
    data = challenger.dataset_sha256[:12]
    where = f"{challenger.split} split, protocol {challenger.protocol}, data sha256 {data}"
    if champion is None:
        return f"Promotion: first `{CHAMPION}` ({metric} {challenger.value:.2f} on {where})."
    verdict = {
        "promoted": f"became `{CHAMPION}`",
        "kept": f"stays `{CHALLENGER}`; version {champion.version} remains `{CHAMPION}`",
        "already-champion": f"is already `{CHAMPION}`",
    }[decision]
    return (
        f"Promotion: challenger version {challenger.version} (run {challenger.run_id}) scored "
        f"{challenger.value:.2f} vs champion version {champion.version} {champion.value:.2f} "
        f"({metric} on {where}); gain {gain:+.2f}, required {min_gain:+.2f}: {verdict}."
    )


def promote(
    *,
    shards: str,
    experiment: str,
    metric: str = PROMOTE.metric,
    sweep_run_id: str | None = None,
    min_gain: float = PROMOTE.min_gain,
    split: str | None = None,
    protocol: str = PROMOTE.protocol,
    tracking_uri: str | None = None,
    model_name: str = MODEL_NAME,
    device: str = PROMOTE.device,
) -> Promotion:
    """Compare the best finished run's model with the `champion` and move the aliases.

    Args:
        shards: prepared dataset root both models are scored on (absolute path or URL).
        experiment: MLflow experiment whose finished runs compete.
        metric: run metric that picks the challenger (``val_oIoU`` or ``val/oIoU``); its score name
            (oIoU) is also what the two models are compared on.
        sweep_run_id: only the children of this sweep compete.
        min_gain: the challenger must beat the champion by at least this (metric points).
        split: split scored; None = the metric's split.
        protocol: lavt or original.
        tracking_uri: MLflow; None = MLFLOW_TRACKING_URI or ./mlflow.db.
        model_name: registered model.
        device: where evaluation runs.
    """
    uri = resolve_tracking_uri(tracking_uri, existing=True)  # it reads runs: a missing store is no store
    client = client_for(uri)
    key = resolve_metric(metric)
    metric_split, score_name = key.split("/", 1)
    split = split or metric_split
    dataset_sha = dataset_tags(shards)[DATASET_TAG]
    run, version = select_challenger(
        client, experiment, key, sweep_run_id=sweep_run_id, model_name=model_name
    )
    _check_same_data(run, dataset_sha, protocol, "challenger")

    def score(v: ModelVersion) -> Score:
        return score_version(
            client, v, shards=shards, split=split, protocol=protocol, score_name=score_name,
            dataset_sha256=dataset_sha, tracking_uri=uri, device=device,
        )  # fmt: skip

    challenger = score(version)  # the slow part, outside the lock: cached on the version, idempotent
    with registry_lock(client, model_name):
        # read again under the lock: another promoter may have moved the alias or written tags
        version = client.get_model_version(model_name, version.version)
        champion_version = _current_champion(client, model_name)
        if champion_version is not None:
            _check_same_data(client.get_run(champion_version.run_id), dataset_sha, protocol, "champion")
        changed = False
        if champion_version is None:
            decision, champion, gain = "first-champion", None, None
            changed |= _set_alias(client, model_name, CHAMPION, challenger.version)
        elif str(champion_version.version) == str(version.version):
            decision, champion, gain = "already-champion", challenger, 0.0
        else:
            champion = score(champion_version)
            gain = challenger.value - champion.value
            if gain >= min_gain:
                decision = "promoted"
                changed |= _set_alias(client, model_name, CHAMPION, challenger.version)
                changed |= _set_alias(client, model_name, CHALLENGER, champion.version)
            else:
                decision = "kept"
                changed |= _set_alias(client, model_name, CHALLENGER, challenger.version)
        summary = _describe(decision, f"{split}/{score_name}", challenger, champion, gain, min_gain)
        if decision != "already-champion":
            tags = {
                "promotion.decision": decision,
                "promotion.metric": f"{split}/{score_name}",
                "promotion.protocol": protocol,
                "promotion.min_gain": f"{min_gain:g}",
                "promotion.score": f"{challenger.value:.6f}",
                "promotion.dataset_sha256": dataset_sha,
            }
            if champion is not None:
                tags |= {
                    "promotion.against_version": champion.version,
                    "promotion.against_score": f"{champion.value:.6f}",
                    "promotion.gain": f"{gain:.6f}",
                }
            for name, value in tags.items():
                changed |= _set_version_tag(client, version, name, value)
            changed |= _set_description(client, version, summary)
        champion_now = str(client.get_model_version_by_alias(model_name, CHAMPION).version)
    return Promotion(
        decision=decision,
        metric=f"{split}/{score_name}",
        challenger=challenger,
        champion=champion,
        gain=gain,
        min_gain=min_gain,
        champion_version=champion_now,
        changed=changed,
        summary=summary,
    )
