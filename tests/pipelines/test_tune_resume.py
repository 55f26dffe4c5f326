"""A sweep stopped for real is continued by `magnet tune --resume NAME`: the finished trial is not
run again, the cut-off trial continues from its checkpoint, and MLflow ends with one parent run and
one child per trial.

It is stopped twice: first its driver dies (SIGKILL to `magnet tune`'s process group, Ray
included) the moment a trial's run is FINISHED, before Tune's periodic snapshot of the sweep can
record that (the restored sweep reruns that trial); then, while the other trial is between
checkpoints, Ctrl-C at the terminal (SIGINT to the group): `magnet tune` exits 130 within seconds
with one line naming the command that continues it (issue 25), and that command is run."""

from __future__ import annotations

import contextlib
import csv
import io
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from tiny_runs import TWO_SEED_SWEEP, tiny_trial

from magnet.checkpoint import CHECKPOINT_GLOB, checkpoint_name
from pipelines import interrupts, tracking

pytestmark = pytest.mark.slow

TINY = tiny_trial()
# two trials, one at a time (--max-concurrent 1), no early stopping
SWEEP = TWO_SEED_SWEEP
EXPERIMENT = "resume-test"
DEADLINE_S = 600  # a safety net on a loaded machine; idle, the kill comes after about a minute


def magnet_tune(root: Path, shards: str, *extra: str) -> list[str]:
    sets = [arg for override in TINY for arg in ("--set", override)]
    return [
        str(Path(sys.executable).parent / "magnet"), "tune", "--config", "tiny",
        "--space", str(root / "space.yaml"), "--shards", shards, *sets,
        "--experiment", EXPERIMENT, "--storage-path", str(root / "ray"),
        "--tracking-uri", f"sqlite:///{root}/mlflow.db", "--max-concurrent", "1", "--no-register",
        *extra,
    ]  # fmt: skip


def children(client, parent_id: str) -> list:
    experiment = client.get_experiment_by_name(EXPERIMENT)
    return client.search_runs(
        [experiment.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'"
    )


def sweep_parent(client):
    experiment = client.get_experiment_by_name(EXPERIMENT)
    if experiment is None:
        return None
    parents = client.search_runs([experiment.experiment_id], filter_string="tags.`tune.kind` = 'sweep'")
    assert len(parents) <= 1
    return parents[0] if parents else None


def wait_for_a_finished_trial(client, driver: subprocess.Popen) -> str:
    """Poll until a trial's child run is FINISHED; returns the sweep's parent run id."""
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline:
        assert driver.poll() is None, "the sweep ended before it could be killed"
        parent = sweep_parent(client)
        if parent is not None and any(
            r.info.status == "FINISHED" for r in children(client, parent.info.run_id)
        ):
            return parent.info.run_id
        time.sleep(0.1)
    raise AssertionError(f"no finished trial within {DEADLINE_S} s")


def killed_when(wait, command: list[str], env: dict, cwd: Path, *args) -> str:
    """Start `magnet tune`, kill its process group (the driver and the Ray it started, all at
    once) when ``wait(*args, driver)`` returns, and return what it returned."""
    with (cwd / "driver.log").open("a") as log:
        driver = subprocess.Popen(
            command, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            return wait(*args, driver)
        finally:
            os.killpg(driver.pid, signal.SIGKILL)
            driver.wait()


def interrupted_when(wait, command: list[str], env: dict, cwd: Path, *args) -> list[str]:
    """Start `magnet tune`, press Ctrl-C (SIGINT to its process group) when ``wait(*args, driver)``
    returns; check it exits 130 within seconds; return what it printed after the signal."""
    driver = subprocess.Popen(
        command, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )  # fmt: skip
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(line.rstrip("\n") for line in driver.stdout))
    reader.start()
    try:
        wait(*args, driver)
        before, sent = len(lines), time.monotonic()
        os.killpg(driver.pid, signal.SIGINT)
        driver.wait(timeout=interrupts.GRACE_SECONDS + 30)
        seconds = time.monotonic() - sent
    finally:
        with contextlib.suppress(ProcessLookupError):  # whatever the interrupt left running
            os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
        reader.join(timeout=10)
    assert driver.returncode == 130, "\n".join(lines[-40:])
    assert seconds < interrupts.GRACE_SECONDS - 3, f"exited {seconds:.1f} s after SIGINT"
    return lines[before:]


def wait_for_one_finished_and_one_checkpointed(client, root: Path, driver: subprocess.Popen) -> str:
    """Poll until a trial's child run is FINISHED and the other trial's Train run holds a checkpoint
    short of the end; returns the sweep's parent run id."""
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline:
        assert driver.poll() is None, "the sweep ended before it could be killed"
        parent = sweep_parent(client)
        if parent is not None:
            runs = children(client, parent.info.run_id)
            finished = [r for r in runs if r.info.status == "FINISHED"]
            running = [r for r in runs if r.info.status == "RUNNING"]
            if finished and running:
                train = root / "ray" / parent.info.run_name / "train" / running[0].info.run_name
                steps = sorted(p.name for p in train.glob(CHECKPOINT_GLOB))
                if steps and steps[-1] != checkpoint_name(6):
                    return parent.info.run_id
        time.sleep(0.5)
    raise AssertionError(f"no finished and running trial pair within {DEADLINE_S} s")


def test_a_killed_sweep_resumes_where_it_stopped(synthetic_shards, tmp_path):
    shards = str(synthetic_shards(num_images=16, image_size=64, seed=0, samples_per_shard=8))
    (tmp_path / "space.yaml").write_text(SWEEP)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PREFECT_HOME": str(tmp_path / "prefect")}
    client = tracking.client_for(f"sqlite:///{tmp_path}/mlflow.db")
    parent_id = killed_when(wait_for_a_finished_trial, magnet_tune(tmp_path, shards), env, tmp_path, client)
    (first,) = [r for r in children(client, parent_id) if r.info.status == "FINISHED"]
    sweep_name = client.get_run(parent_id).info.run_name
    resume = magnet_tune(tmp_path, shards, "--resume", sweep_name)
    after_signal = interrupted_when(
        wait_for_one_finished_and_one_checkpointed, resume, env, tmp_path, client, tmp_path
    )
    assert after_signal and not any("Traceback" in line for line in after_signal), "\n".join(after_signal)
    continued = re.fullmatch(
        rf"interrupted: sweep '{sweep_name}' stopped; continue with: (.+)", after_signal[-1]
    )
    assert continued, "\n".join(after_signal)
    assert shlex.split(continued.group(1))[1:] == resume[1:]  # the same command (its --resume kept)
    before = {r.data.tags["tune.trial_id"]: r for r in children(client, parent_id)}
    (done_trial,) = [t for t, r in before.items() if r.info.status == "FINISHED"]
    (cut_trial,) = [t for t, r in before.items() if r.info.status != "FINISHED"]
    assert before[cut_trial].info.status == "KILLED"  # closed by the interrupt, not left RUNNING
    assert client.get_run(parent_id).info.status == "KILLED"
    assert first.data.tags["tune.trial_id"] == done_trial

    resumed = subprocess.run(
        resume, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=DEADLINE_S
    )
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]

    parent = sweep_parent(client)  # still exactly one parent run, now finished
    assert parent.info.run_id == parent_id and parent.info.status == "FINISHED"
    after = {r.data.tags["tune.trial_id"]: r for r in children(client, parent_id)}
    assert sorted(after) == sorted([done_trial, cut_trial])  # one child per trial, no duplicates
    assert all(r.info.status == "FINISHED" for r in after.values())
    # the finished trial was not run again: its run untouched since it first ended, its curve
    # logged once, its reports given to Tune again (the trials table below has its score)
    assert after[done_trial].info.end_time == first.info.end_time
    for trial in (done_trial, cut_trial):  # a rerun from scratch would log step 2 twice
        history = client.get_metric_history(after[trial].info.run_id, "val/oIoU")
        assert [m.step for m in history] == [2, 4, 6], (trial, [m.step for m in history])
    # the cut-off trial continued its own Train run from its checkpoints (no second run directory)
    train_root = tmp_path / "ray" / sweep_name / "train"
    assert sorted(p.name for p in train_root.iterdir() if p.is_dir()) == sorted(
        r.info.run_name for r in after.values()
    )
    table = Path(client.download_artifacts(parent_id, "trials.csv", str(tmp_path))).read_text()
    rows = list(csv.DictReader(io.StringIO(table)))
    assert sorted(r["trial"] for r in rows) == sorted(after)
    assert [r["rank"] for r in rows] == ["1", "2"] and all(r["status"] == "FINISHED" for r in rows)
    assert all(r["step"] == "6" and r["val/oIoU"] for r in rows)
