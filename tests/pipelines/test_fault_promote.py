"""Two promotions at once: two sweeps finish together and each process promotes its own best model
against the same registry, released together by a barrier. Afterwards the registry reads as if they
had run one after the other: one `champion`, one `challenger`, no version added, tags and
descriptions telling that story, the lock gone; a third promotion changes nothing."""

from __future__ import annotations

import multiprocessing
import os
from pathlib import Path

import pytest
from test_promote import aliases, registry_state, run_promotion, trained_run

from pipelines import tracking
from pipelines.promote import CHALLENGER, CHAMPION, LOCK_SUFFIX, PARENT_TAG

pytestmark = pytest.mark.slow


@pytest.fixture
def store(tmp_path: Path, synthetic_shards) -> dict:
    return {
        "root": tmp_path,
        "shards": str(synthetic_shards(num_images=12, image_size=64, seed=0, samples_per_shard=8)),
        "uri": f"sqlite:///{tmp_path}/mlflow.db",
    }


def promote_after_barrier(store: dict, sweep: str, barrier, results) -> None:
    """One contender: everything imported first, then it promotes its sweep the moment both are ready."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    barrier.wait(timeout=300)
    outcome = run_promotion(store, min_gain=1.0, sweep_run_id=sweep)
    results.put((outcome.challenger.version, outcome.decision, outcome.champion_version))


def test_two_concurrent_promotions_leave_the_registry_consistent(store):
    client = tracking.client_for(store["uri"])
    weak = trained_run(store, "weak", threshold=0.7, val_oiou=10.0)  # scores 0
    assert run_promotion(store).decision == "first-champion"
    # two sweeps, each with one model that beats the champion; the two score the same
    sweeps = {}
    for sweep, metric in (("sweep-a", 20.0), ("sweep-b", 30.0)):
        version = trained_run(store, sweep, threshold=0.3, val_oiou=metric)
        client.set_tag(client.get_model_version("magnet", version).run_id, PARENT_TAG, sweep)
        sweeps[sweep] = version
    versions_before = sorted(v.version for v in client.search_model_versions("name = 'magnet'"))

    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(2), context.Queue()
    contenders = [
        context.Process(target=promote_after_barrier, args=(store, sweep, barrier, results))
        for sweep in sweeps
    ]
    for process in contenders:
        process.start()
    for process in contenders:
        process.join(timeout=400)
    assert [p.exitcode for p in contenders] == [0, 0], "a contender failed (see its stderr)"
    outcomes = {
        version: (decision, champion) for version, decision, champion in (results.get() for _ in sweeps)
    }

    # as if one after the other: the first beat the old champion, the second did not beat the first
    first = next(v for v, (decision, _) in outcomes.items() if decision == "promoted")
    (second,) = set(sweeps.values()) - {first}
    assert outcomes == {first: ("promoted", first), second: ("kept", first)}
    assert aliases(store) == {CHAMPION: first, CHALLENGER: second}
    winner, loser = client.get_model_version("magnet", first), client.get_model_version("magnet", second)
    assert (
        winner.tags["promotion.decision"] == "promoted" and winner.tags["promotion.against_version"] == weak
    )
    assert f"champion version {weak}" in winner.description and "became `champion`" in winner.description
    assert loser.tags["promotion.decision"] == "kept" and loser.tags["promotion.against_version"] == first
    assert f"version {first} remains `champion`" in loser.description
    versions = client.search_model_versions("name = 'magnet'")
    assert sorted(v.version for v in versions) == versions_before, "a promotion registered a version"
    assert len({v.run_id for v in versions}) == len(versions), "two versions of one run"
    assert [m.name for m in client.search_registered_models()] == ["magnet"], "the lock was left behind"

    # a third promotion (every run competing) finds nothing to do
    before = registry_state(client)
    assert not run_promotion(store, min_gain=1.0).changed
    assert registry_state(client) == before
    assert LOCK_SUFFIX not in "".join(m.name for m in client.search_registered_models())
