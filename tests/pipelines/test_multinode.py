"""What users meet on a GPU cluster, on a real multi-node Ray cluster: a head and two worker nodes
started with `ray start` on this machine (tests/ray_cluster.py), each worker node with one CPU, a
custom resource naming it and a disk of its own that no other node, nor the `magnet` command, can
see. Shards, Ray storage and MLflow's artifacts live on the S3-compatible server (``s3_store``),
MLflow tracks to its server (``mlflow_server``), Prefect runs its own server. The scenarios share
the cluster and a training config (TRAIN: 2 ranks, a checkpoint every 2 steps):

1. Prefect to the cluster: the train-magnet deployment, as prefect.yaml's gpu-cluster entry with
   the process pool, run by a `prefect worker` whose job variables hold the cluster's RAY_ADDRESS;
   its 2 ranks are forced onto the 2 worker nodes (``--placement-strategy STRICT_SPREAD``), the run
   records which node each rank trained on, and every location it records is in object storage.
2. A node lost mid-run: `magnet train --ray-address` of the same config; once a checkpoint is
   registered, rank 0's node is SIGKILLed (every process, its disk with it) and a node with the
   same resource starts in its place. The run resumes from that checkpoint, redoes only the steps
   since, and ends with run 1's step count and metrics (each step's loss to 1e-6 relative: resume
   is exact); MLflow shows one run.
3. A sweep across nodes: `magnet tune` with two one-worker trials, one per node; one trial's node
   is lost mid-sweep. That trial resumes from its checkpoint on the new node (its workers restart:
   `--max-failures`, 2 by default), the other is untouched, the parent ranks both, and `magnet
   promote` makes the best the champion.

Run alone with ``pytest -m multinode``.
"""

from __future__ import annotations

import csv
import io
import json
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import fsspec
import pytest
import yaml
from prefect_server import PrefectServer, prefect_server
from ray_cluster import RayCluster, ray_cluster
from tiny_runs import SCORE_VAL, TINY_RUN, TWO_SEED_SWEEP

from data_prep.shards import prepare_dataset
from data_prep.synth import synthesize
from magnet.checkpoint import CHECKPOINT_PREFIX, checkpoint_name, checkpoint_step
from pipelines import tracking
from pipelines.mlflow_record import RESUMED_FROM_TAG, WORKER_GROUPS_TAG, worker_tag

pytestmark = [pytest.mark.slow, pytest.mark.multinode]

REPO = Path(__file__).resolve().parents[2]
NODES = ("node_a", "node_b")
STEPS = 4  # the fewest that show a resume: a checkpoint, steps lost after it, a last checkpoint
# A checkpoint at step 2 and 4 (each 140 MB to upload), evaluated once, at the end (val only).
TRAIN = [*TINY_RUN, *SCORE_VAL, f"train.max_steps={STEPS}", f"train.checkpoint_every={STEPS // 2}"]
EXPERIMENT, SWEEP_EXPERIMENT = "multinode", "multinode-sweeps"
PREFIX = "multinode"  # of this module's objects in the bucket
DEADLINE_S = 900  # a safety net for a loaded machine; idle, each scenario takes under a minute
# Two trials side by side (one CPU each, and each worker node has one), no early stopping.
SWEEP = TWO_SEED_SWEEP


# ---------------------------------------------------------------------------------- services
@pytest.fixture(scope="module")
def prefect(module_tmp) -> Iterator[PrefectServer]:
    """Prefect's server, starting while the cluster starts."""
    with prefect_server(module_tmp("prefect")) as server:
        yield server


@pytest.fixture(scope="module")
def cluster(s3_store, module_tmp) -> Iterator[RayCluster]:
    """The head and the worker nodes NODES (their processes inherit AWS_*: the store's)."""
    nodes = {name: 1 for name in NODES}
    with ray_cluster(
        module_tmp("cluster"), nodes, {"PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    ) as started:
        yield started


@pytest.fixture(scope="module")
def shards(s3_store, module_tmp) -> str:
    refer = module_tmp("refer")
    synthesize(refer, num_images=16, image_size=64, seed=3, workers=1)
    return prepare_dataset(
        refer, "refcoco", "unc", s3_store.url(f"{PREFIX}/data"), samples_per_shard=8
    ).out_dir


@pytest.fixture(scope="module")
def user_env(prefect, cluster, mlflow_server) -> dict[str, str]:
    """A user's shell beside the cluster: the token, the stores, this checkout (as installed on
    every node), no RAY_ADDRESS (each scenario says how it reaches the cluster)."""
    env = {**prefect.wait(), **cluster.env, "PYTHONPATH": str(REPO), "MLFLOW_TRACKING_URI": mlflow_server.url}
    env.pop("RAY_ADDRESS")
    return env


# ---------------------------------------------------------------------------------- helpers
def magnet(*args: str) -> list[str]:
    return [sys.executable, "-m", "pipelines.cli", *args]


def sets(overrides: list[str]) -> list[str]:
    return [arg for override in overrides for arg in ("--set", override)]


def registered(run_url: str) -> list[int]:
    """Steps of the checkpoints Ray Train's controller has registered for the run at ``run_url``
    (the ones a restart resumes from), from its snapshot in object storage."""
    store, path = fsspec.core.url_to_fs(f"{run_url}/checkpoint_manager_snapshot.json")
    try:
        snapshot = json.loads(store.cat_file(path))
    except (FileNotFoundError, json.JSONDecodeError):
        return []
    finally:
        store.invalidate_cache()
    names = [entry["checkpoint_dir_name"] for entry in snapshot["checkpoint_results"]]
    return sorted(checkpoint_step(name) for name in names)


def placement(tags: dict[str, str], ranks: int) -> list[str]:
    """The node id each rank last trained on, as the run records it (empty before it started)."""
    return [tags[worker_tag(rank, "node_id")] for rank in range(ranks) if worker_tag(rank, "node_id") in tags]


def run_named(uri: str, experiment: str, name: str) -> list[Any]:
    client = tracking.client_for(uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return []
    return client.search_runs([found.experiment_id], filter_string=f"attributes.run_name = '{name}'")


def loss_steps(uri: str, run_id: str) -> dict[int, float]:
    history = tracking.client_for(uri).get_metric_history(run_id, "train/loss")
    assert len(history) == len({point.step for point in history}), "a step was logged twice"
    return {point.step: point.value for point in history}


def largest_difference(metrics: dict[str, float], reference: dict[str, float]) -> float:
    """The largest relative difference of a metric of ``reference`` in ``metrics``."""
    return max(abs(metrics[k] - v) / max(abs(v), 1e-12) for k, v in reference.items())


def lose_node_when(
    cluster: RayCluster, driver: subprocess.Popen, victim: Callable[[], tuple[str, Any] | None]
) -> Any:
    """Poll ``victim()`` until it names a worker node (and what to remember of that moment), then
    SIGKILL that node's every process and start a node of the same name and resources in its
    place (``RayCluster.replace``). Returns what ``victim`` remembered."""
    deadline = time.monotonic() + DEADLINE_S
    while (chosen := victim()) is None:
        assert driver.poll() is None, "the run ended before a node could be lost"
        assert time.monotonic() < deadline, f"no node to lose within {DEADLINE_S} s"
        time.sleep(0.2)
    name, remembered = chosen
    cluster.replace(name)
    return remembered


def finished(driver: subprocess.Popen, log: Path) -> None:
    assert driver.wait(timeout=DEADLINE_S) == 0, log.read_text()[-6000:]


def checkout_files() -> set[str]:
    """Files of the checkout besides the committed ones, ignored ones included (not bytecode)."""
    listed = subprocess.run(
        ["git", "status", "--porcelain", "--ignored", "--untracked-files=all"],
        cwd=REPO, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    return {line for line in listed.splitlines() if "__pycache__" not in line}


# ----------------------------------------------------------------- 1. Prefect to the cluster
def gpu_cluster_deployment(cluster: RayCluster, shards: str, storage: str) -> dict[str, Any]:
    """prefect.yaml's train-magnet gpu-cluster deployment for this cluster: the process pool (a
    worker beside the head) for the Kubernetes one, this checkout for the image's, the tiny config
    on 2 CPU workers, and the cluster's address in the job's environment as there."""
    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    (entry,) = [
        d for d in spec["deployments"]
        if d["name"] == "gpu-cluster" and d["entrypoint"] == "pipelines/flows/train.py:train_magnet"
    ]  # fmt: skip
    job_env = entry["work_pool"]["job_variables"]["env"]
    assert set(job_env) == {"RAY_ADDRESS", "RAY_AUTH_MODE"}
    entry["parameters"].update(
        config="tiny", shards=shards, storage_path=storage, num_workers=2, use_gpu=False,
        overrides=TRAIN, placement_strategy="STRICT_SPREAD", run_name="across-nodes", experiment=EXPERIMENT,
        eval_splits=["val"], register_model=False,  # the sweep registers (and promotes) below
    )  # fmt: skip
    entry["pull"] = [{"prefect.deployments.steps.set_working_directory": {"directory": str(REPO)}}]
    entry["work_pool"] = {
        "name": "magnet-process",
        "job_variables": {"env": {"RAY_ADDRESS": cluster.address, "RAY_AUTH_MODE": "token"}},
    }
    return {**spec, "deployments": [entry]}


@pytest.fixture(scope="module")
def across_nodes(prefect, cluster, shards, user_env, mlflow_server, s3_store, module_tmp) -> dict[str, Any]:
    """The train-magnet deployment run by a process worker against the cluster: its flow run and
    MLflow run, and the checkout's files before and after."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    root = module_tmp("deploy")
    storage = s3_store.url(f"{PREFIX}/ray")
    (root / "prefect.yaml").write_text(yaml.safe_dump(gpu_cluster_deployment(cluster, shards, storage)))

    def cli(*args: str) -> None:
        done = subprocess.run(
            ["prefect", "--no-prompt", *args], env=user_env, cwd=REPO, capture_output=True, text=True
        )
        assert done.returncode == 0, f"prefect {args}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"

    cli("work-pool", "create", "magnet-process", "--type", "process")
    cli("deploy", "--prefect-file", str(root / "prefect.yaml"), "--name", "gpu-cluster")
    with temporary_settings({PREFECT_API_URL: prefect.api}), get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name("train-magnet/gpu-cluster")
        flow_run = client.create_flow_run_from_deployment(deployment.id)
    before = checkout_files()
    log = root / "worker.log"
    with log.open("w") as out:  # the worker's own environment has no RAY_ADDRESS: the job brings it
        worker = subprocess.run(
            ["prefect", "worker", "start", "--pool", "magnet-process", "--run-once", "--limit", "1"],
            env=user_env, cwd=root, stdout=out, stderr=subprocess.STDOUT, timeout=DEADLINE_S,
        )  # fmt: skip
    assert worker.returncode == 0, log.read_text()[-6000:]
    with temporary_settings({PREFECT_API_URL: prefect.api}), get_client(sync_client=True) as client:
        state = client.read_flow_run(flow_run.id).state
    assert state.is_completed(), f"{state}\n{log.read_text()[-6000:]}"
    # Train's PlacementGroupCleaner, which cannot reach the state API here, is kept quiet: not a
    # warning a second in the flow's log, though no `magnet` command started this Ray driver
    assert "Failed to query Ray Train Controller actor state" not in log.read_text()
    (run,) = run_named(mlflow_server.url, EXPERIMENT, "across-nodes")
    return {"run": run, "storage": storage, "before": before, "after": checkout_files()}


def test_prefect_worker_trains_on_two_nodes_and_keeps_everything_in_object_storage(
    across_nodes, cluster, shards
):
    run, storage = across_nodes["run"], across_nodes["storage"]
    assert run.info.status == "FINISHED"
    tags = run.data.tags
    # the run's own record: rank 0 and rank 1 on the two worker nodes, one each, never restarted
    nodes = cluster.alive()
    assert sorted(placement(tags, 2)) == sorted(nodes[name] for name in NODES)
    print(f"ranks on nodes {placement(tags, 2)}; worker nodes {nodes}")  # for the log (-rP)
    assert tags[WORKER_GROUPS_TAG] == "1" and RESUMED_FROM_TAG not in tags
    hosts = [tags[worker_tag(rank, "host")] for rank in range(2)]  # "<hostname> (<node IP>)"
    assert hosts[0] != hosts[1] and all(host.startswith(socket.gethostname()) for host in hosts)
    # what it recorded points into object storage, not into a node's disk or the driver's
    run_url = f"{storage}/across-nodes"
    assert tags["checkpoint.last"] == f"{run_url}/{checkpoint_name(STEPS)}"
    assert tags["checkpoint.best"].startswith(f"{run_url}/{CHECKPOINT_PREFIX}")
    inputs = run.inputs.dataset_inputs
    assert inputs and all(json.loads(i.dataset.source)["uri"].startswith(shards) for i in inputs)
    assert registered(run_url)[-1] == STEPS
    # the flow ran in the checkout (the pull step) and wrote nothing there
    assert across_nodes["after"] == across_nodes["before"]


# ------------------------------------------------------------------- 2. a node lost mid-run
def test_a_lost_node_costs_the_steps_since_the_last_checkpoint(
    across_nodes, cluster, shards, user_env, mlflow_server, s3_store, tmp_path
):
    uri, name = mlflow_server.url, "node-lost"
    storage = s3_store.url(f"{PREFIX}/ray")
    command = magnet(
        "train", "--config", "tiny", "--shards", shards, *sets(TRAIN), "--num-workers", "2",
        "--placement-strategy", "STRICT_SPREAD", "--ray-address", cluster.address,
        "--storage-path", storage, "--experiment", EXPERIMENT, "--run-name", name, "--no-register",
    )  # fmt: skip
    first_nodes = {node: cluster.alive()[node] for node in NODES}

    def rank_zero_node_after_a_checkpoint() -> tuple[str, Any] | None:
        runs = run_named(uri, EXPERIMENT, name)
        if not runs or len(placement(runs[0].data.tags, 2)) < 2:
            return None
        checkpoints = registered(f"{storage}/{name}")
        if not checkpoints:
            return None
        (lost,) = [
            node for node, node_id in first_nodes.items() if node_id == placement(runs[0].data.tags, 2)[0]
        ]
        logged = max(loss_steps(uri, runs[0].info.run_id), default=0)
        return lost, {"node": lost, "registered": checkpoints[-1], "logged": logged}

    log = tmp_path / "train.log"
    with log.open("w") as out:
        driver = subprocess.Popen(command, env=user_env, cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT)
    lost = lose_node_when(cluster, driver, rank_zero_node_after_a_checkpoint)
    finished(driver, log)

    (run,) = run_named(uri, EXPERIMENT, name)  # one run, though its workers started twice
    tags = run.data.tags
    assert run.info.status == "FINISHED" and tags[WORKER_GROUPS_TAG] == "2"
    # resumed from the newest checkpoint registered when the node died (or one reported just then),
    # so it lost the steps since that checkpoint and no more
    resumed = checkpoint_step(tags[RESUMED_FROM_TAG])
    assert lost["registered"] <= resumed < STEPS, (lost, resumed)
    # the restarted ranks: one on the node that survived, one on the node that replaced the lost one
    now = cluster.alive()
    assert now[lost["node"]] != first_nodes[lost["node"]]
    assert sorted(placement(tags, 2)) == sorted(now[node] for node in NODES)
    assert tags["checkpoint.last"] == f"{storage}/{name}/{checkpoint_name(STEPS)}"
    # every step once, each with the uninterrupted run's loss: the resume is exact across nodes
    reference = across_nodes["run"]
    expected = loss_steps(uri, reference.info.run_id)
    assert sorted(expected) == list(range(1, STEPS + 1))
    assert loss_steps(uri, run.info.run_id) == pytest.approx(expected, rel=1e-6)
    final = {
        k: v for k, v in reference.data.metrics.items() if not k.startswith(("system/", "train/samples"))
    }
    assert {k: run.data.metrics[k] for k in final} == pytest.approx(final, rel=1e-6)
    difference = largest_difference(run.data.metrics, final)
    print(  # the measured figures, for the log (-rP)
        f"ranks on {placement(tags, 2)} (first {first_nodes}); node {lost['node']} lost at logged "
        f"step {lost['logged']}, resumed from step {resumed}: {lost['logged'] - resumed} step(s) "
        f"redone; largest relative difference of a final metric {difference:.1e}"
    )


# ------------------------------------------------------------------ 3. a sweep across nodes
@pytest.mark.extended  # ~10 min on 2 busy cores: run with -m multinode (or -m extended)
def test_a_sweep_across_nodes_survives_a_lost_node_and_promotes(
    cluster, shards, user_env, mlflow_server, s3_store, tmp_path
):
    uri = mlflow_server.url
    client = tracking.client_for(uri)
    storage = s3_store.url(f"{PREFIX}/sweeps")
    (tmp_path / "space.yaml").write_text(SWEEP)
    command = magnet(
        "tune", "--config", "tiny", "--space", str(tmp_path / "space.yaml"), "--shards", shards,
        *sets(TRAIN), "--experiment", SWEEP_EXPERIMENT, "--storage-path", storage,
    )  # fmt: skip
    first_nodes = {node: cluster.alive()[node] for node in NODES}

    def children() -> list[Any]:
        experiment = client.get_experiment_by_name(SWEEP_EXPERIMENT)
        if experiment is None:
            return []
        runs = client.search_runs([experiment.experiment_id])
        return [run for run in runs if "tune.trial_id" in run.data.tags]

    def a_trial_node_after_its_checkpoint() -> tuple[str, Any] | None:
        trials = children()
        started = {run.info.run_name: placement(run.data.tags, 1) for run in trials}
        if len(started) < 2 or not all(started.values()):
            return None
        sweep = client.get_run(trials[0].data.tags["mlflow.parentRunId"]).info.run_name
        for run in trials:
            checkpoints = registered(f"{storage}/{sweep}/train/{run.info.run_name}")
            if checkpoints and checkpoints[-1] < STEPS:
                lost = next(
                    node for node, node_id in first_nodes.items() if node_id == started[run.info.run_name][0]
                )
                return lost, {
                    "trial": run.info.run_name,
                    "node": lost,
                    "registered": checkpoints[-1],
                    "at": started,
                }
        return None

    log = tmp_path / "tune.log"
    with log.open("w") as out:  # RAY_ADDRESS in the environment, as `ray job submit` sets it
        driver = subprocess.Popen(
            command, env={**user_env, "RAY_ADDRESS": cluster.address}, cwd=tmp_path,
            stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    lost = lose_node_when(cluster, driver, a_trial_node_after_its_checkpoint)
    finished(driver, log)

    # the trials started on different nodes, one each
    assert sorted(nodes[0] for nodes in lost["at"].values()) == sorted(first_nodes.values())
    trials = {run.info.run_name: run for run in children()}
    statuses = {name: run.info.status for name, run in trials.items()}
    assert list(statuses.values()) == ["FINISHED"] * 2, f"{statuses}\n{log.read_text()[-6000:]}"
    hit = trials.pop(lost["trial"])
    (other,) = trials.values()
    # the trial whose node was lost resumed from its checkpoint on a live node (the new one, or the
    # other trial's if that had ended)
    assert hit.data.tags[WORKER_GROUPS_TAG] == "2"
    resumed = checkpoint_step(hit.data.tags[RESUMED_FROM_TAG])
    assert resumed >= lost["registered"]
    (resumed_on,) = placement(hit.data.tags, 1)
    assert resumed_on in cluster.alive().values() and resumed_on != lost["at"][hit.info.run_name][0]
    print(  # for the log (-rP)
        f"trials started on {lost['at']}; {hit.info.run_name} lost node {lost['node']}, resumed "
        f"from step {resumed} on {resumed_on}"
    )
    # the other was untouched: one worker group, on the node it started on
    assert other.data.tags[WORKER_GROUPS_TAG] == "1" and RESUMED_FROM_TAG not in other.data.tags
    assert placement(other.data.tags, 1) == lost["at"][other.info.run_name]
    for run in (hit, other):
        assert sorted(loss_steps(uri, run.info.run_id)) == list(range(1, STEPS + 1))
    # the parent ranks both
    parent = client.get_run(hit.data.tags["mlflow.parentRunId"])
    assert parent.info.status == "FINISHED"
    table = Path(client.download_artifacts(parent.info.run_id, "trials.csv", str(tmp_path))).read_text()
    rows = list(csv.DictReader(io.StringIO(table)))
    assert sorted(r["trial"] for r in rows) == sorted(run.data.tags["tune.trial_id"] for run in (hit, other))
    assert [r["rank"] for r in rows] == ["1", "2"] and all(r["status"] == "FINISHED" for r in rows)
    assert all(r["step"] == str(STEPS) and r["val/oIoU"] for r in rows)

    # promote works on the result: the sweep's registered best becomes the champion
    promoted = subprocess.run(
        magnet("promote", "--experiment", SWEEP_EXPERIMENT, "--shards", shards),
        env=user_env, cwd=tmp_path, capture_output=True, text=True, timeout=DEADLINE_S,
    )  # fmt: skip
    assert promoted.returncode == 0, promoted.stdout[-3000:] + promoted.stderr[-3000:]
    champion = client.get_model_version_by_alias("magnet", "champion")
    assert champion.version == parent.data.tags["tune.best_model_version"]
