"""Preparation faults made for real: an image that the file system cannot read for a while (a
symlink loop, ELOOP, standing in for a flaky mount) makes a task fail and Prefect retry it; a
`magnet prepare` process SIGKILLed after some chunks finished is re-run and reuses them. Both
end byte-identical to a clean run. A write that cannot succeed (a full disk; a file-size limit,
which root cannot escape, stands in for it) fails at once, without retries or partial files."""

from __future__ import annotations

import errno
import logging
import os
import resource
import signal
import subprocess
import sys
import tarfile
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
    assert len(summary.shards) == total
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in before} == before, "finished chunks rewritten"
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        reports = [a for a in client.read_artifacts() if a.type == "markdown"]
    report = max(reports, key=lambda a: a.created).data
    assert f"{total} shards, {len(finished)} already done" in report
    assert_identical(out, clean)


def test_a_full_disk_mid_shard_leaves_no_partial_file(refer_root, tmp_path, monkeypatch):
    """The library: the disk fills while a shard is written (ENOSPC from the tar writer)."""
    written = []

    def addfile(tar: tarfile.TarFile, info: tarfile.TarInfo, fileobj=None) -> None:
        if len(written) == 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), tar.name)
        written.append(info.name)
        real_addfile(tar, info, fileobj)

    real_addfile = tarfile.TarFile.addfile
    monkeypatch.setattr(tarfile.TarFile, "addfile", addfile)
    with pytest.raises(OSError) as raised:
        prepare_dataset(refer_root, "refcoco", "unc", tmp_path, samples_per_shard=SAMPLES_PER_SHARD)
    assert raised.value.errno == errno.ENOSPC and written
    assert [p.name for p in tmp_path.rglob("*") if p.is_file()] == [], "partial files left behind"


def test_magnet_prepare_on_a_full_disk_fails_at_once_in_one_line(prefect_harness, refer_root, tmp_path):
    """`magnet prepare` under an 8 kB file-size limit (EFBIG on the first shard): no Prefect retry
    (they waited 2 + 10 + 30 s), exit 2 and a line naming the output and the file, no traceback,
    no partial file."""
    from prefect.settings import PREFECT_API_URL

    command = [sys.executable, "-m", "pipelines.cli", "prepare", "--refer-root", str(refer_root)]
    command += ["--out", str(tmp_path), "--samples-per-shard", str(SAMPLES_PER_SHARD), "--workers", "1"]
    env = {
        **os.environ,
        "PYTHONPATH": str(Path(__file__).resolve().parents[2]),  # this checkout's code
        "PREFECT_API_URL": PREFECT_API_URL.value(),  # the test's server: its database has no limit
    }

    def limit_file_size() -> None:  # in the child only; Python ignores SIGXFSZ, so writes get EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (8_000, resource.RLIM_INFINITY))

    runs_before = {run.id for run in task_runs()}
    done = subprocess.run(
        command, env=env, preexec_fn=limit_file_size, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 2, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    shards = tmp_path / "refcoco-unc" / "train"  # the shard named is the first failure Prefect saw
    assert last.startswith(
        f"error: Invalid value for --out: cannot write to {tmp_path}: File too large ({shards}/"
    )
    assert last.endswith(".tar); a re-run keeps the finished shards"), last
    assert "Traceback" not in done.stderr, done.stderr[-3000:]  # Prefect's log of it is one line too
    chunk_runs = [run for run in task_runs() if run.id not in runs_before and run.name.startswith("chunk-")]
    assert chunk_runs and all(run.run_count == 1 for run in chunk_runs), "a permanent error was retried"
    assert not list(tmp_path.rglob("*.tmp")), "partial files left behind"
