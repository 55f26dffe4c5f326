"""Preparation faults made for real: an image that the file system cannot read for a while (a
symlink loop, ELOOP, standing in for a flaky mount) makes a task fail and Prefect retry it; a
`magnet prepare` process SIGKILLed after some chunks finished is re-run and reuses them. Both
end byte-identical to a clean run."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from data_prep.contract import SUMMARY
from data_prep.shards import prepare_dataset

SAMPLES_PER_SHARD = 4


@pytest.fixture(scope="module")
def refer_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from data_prep.synth import synthesize

    root = tmp_path_factory.mktemp("synth")
    synthesize(root, num_images=40, image_size=64, seed=2, workers=1)
    return root


@pytest.fixture(scope="module")
def clean(refer_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same preparation in one uninterrupted library run: what every faulty run must equal."""
    out = tmp_path_factory.mktemp("clean")
    return Path(
        prepare_dataset(refer_root, "refcoco", "unc", out, samples_per_shard=SAMPLES_PER_SHARD).out_dir
    )


def files(root: Path) -> dict[str, bytes]:
    """Every file under root (completion markers and parts included), by relative path."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def assert_identical(produced: Path, clean: Path) -> None:
    got, want = files(produced), files(clean)
    assert sorted(got) == sorted(want), f"extra {set(got) - set(want)}, missing {set(want) - set(got)}"
    differ = [name for name in want if got[name] != want[name]]
    assert not differ, f"files differ from a clean run: {differ}"


def task_runs() -> list:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_task_runs()


class RestoreOnRetry(logging.Handler):
    """Puts the real file back when Prefect announces the retry of the task it broke: the failure
    lasts exactly one attempt, whatever the machine's speed."""

    def __init__(self, broken: Path, original: Path) -> None:
        super().__init__()
        self.broken, self.original, self.retries = broken, original, []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "Retry 1/" in message and self.broken.is_symlink():
            self.retries.append(message)
            self.broken.unlink()
            os.rename(self.original, self.broken)  # rename keeps its mtime, part of chunk fingerprints


def test_transient_io_error_is_retried_and_the_flow_completes(prefect_harness, refer_root, clean, tmp_path):
    from pipelines.flows.prepare import run_prepare

    image_dir = refer_root / "images" / "mscoco" / "images" / "train2014"
    image = sorted(image_dir.iterdir())[0]
    aside = tmp_path / "aside.jpg"
    os.rename(image, aside)
    os.symlink(image.name, image)  # points at itself: open() and stat() raise ELOOP, an OSError
    with pytest.raises(OSError, match="symbolic links"):
        image.read_bytes()

    handler = RestoreOnRetry(image, aside)
    logger = logging.getLogger("prefect")
    logger.addHandler(handler)
    try:
        run_prepare(
            workers=1, refer_root=str(refer_root), out=str(tmp_path), samples_per_shard=SAMPLES_PER_SHARD
        )
    finally:
        logger.removeHandler(handler)
        if image.is_symlink():
            image.unlink()
            os.rename(aside, image)
    assert handler.retries, "no task failed on the unreadable image"
    retried = [run for run in task_runs() if run.run_count > 1]
    assert retried and all(run.state.is_completed() for run in retried)
    assert_identical(tmp_path / "refcoco-unc", clean)


def markers(out: Path) -> list[Path]:
    return sorted((out / "refcoco-unc" / "_work").rglob("*.done.json"))


def test_rerun_after_sigkill_mid_prepare_reuses_finished_chunks(prefect_harness, refer_root, clean, tmp_path):
    from prefect.settings import PREFECT_API_URL

    from pipelines.flows.prepare import run_prepare

    total = len(list((clean / "_work").rglob("*.done.json")))
    command = [str(Path(sys.executable).parent / "magnet"), "prepare", "--refer-root", str(refer_root)]
    command += ["--out", str(tmp_path), "--samples-per-shard", str(SAMPLES_PER_SHARD), "--workers", "1"]
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
    process = subprocess.Popen(
        command, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + 120
        while len(markers(tmp_path)) < 2 and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        os.killpg(process.pid, signal.SIGKILL)  # its session: the CLI and anything it started
    finally:
        _, stderr = process.communicate(timeout=30)
    assert process.returncode == -signal.SIGKILL, f"prepare ended on its own first: {stderr.decode()[-2000:]}"
    finished = markers(tmp_path)
    assert 2 <= len(finished) < total, f"killed with {len(finished)} of {total} chunks done"
    out = tmp_path / "refcoco-unc"
    assert not (out / SUMMARY).exists()
    shards = [out / p.parent.name / p.name.replace(".done.json", ".tar") for p in finished]
    before = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in [*finished, *shards]}

    summary = run_prepare(
        workers=1, refer_root=str(refer_root), out=str(tmp_path), samples_per_shard=SAMPLES_PER_SHARD
    )
    assert len(summary["shards"]) == total
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in before} == before, "finished chunks rewritten"
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        reports = [a for a in client.read_artifacts() if a.type == "markdown"]
    report = max(reports, key=lambda a: a.created).data
    assert f"{total} shards, {len(finished)} already done" in report
    assert_identical(out, clean)
