"""Ctrl-C and SIGTERM stop `magnet` within seconds, with one line saying what stopped and how to
continue (issue 25), made for real: each `magnet` runs in its own session as a terminal runs it,
so a SIGINT sent to its process group reaches every process the command started, Prefect's
temporary API server included (it used to die first, and the command then retried it for minutes).

1. `magnet prepare` (2 worker processes) interrupted between chunks: whole shards only, no
   summary.json, no .tmp, no process left;
2. `magnet train` interrupted during set-up, then mid-training by SIGTERM, then continued with the
   command the line gives (under --quiet: no progress lines) and interrupted again: the MLflow run
   KILLED each time, every step logged once, the redone ones included.
Each interruption: exit 130 / 143 within seconds, one line, no traceback.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import signal
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from tiny_runs import TINY_RUN

from pipelines import interrupts, tracking

REPO = Path(__file__).resolve().parents[2]
# Exit within this many seconds of the signal: the graceful path (Prefect reports the crash to a
# live server, the MLflow run is closed, Ray shut down) takes a few; interrupts.GRACE_SECONDS is
# the backstop, so an exit that needed it fails here.
EXIT_SECONDS = interrupts.GRACE_SECONDS - 3
SETUP_SECONDS = 300  # a command's start on a loaded 2-core machine: imports, Prefect's server, Ray
RAY_WORKER_LINE = re.compile(r"(\x1b\[\d+m)?\((RayTrainWorker|TrainController|\w+) pid=")


class Magnet:
    """A `magnet` command in a session of its own, its output (stdout and stderr) read as it comes."""

    def __init__(self, *args: str, cwd: Path, env: dict[str, str]) -> None:
        self.args = args
        self.lines: list[str] = []
        self.signalled_at: int | None = None  # how many lines had come when the signal was sent
        self.process = subprocess.Popen(
            [sys.executable, "-m", "pipelines.cli", *args],
            cwd=cwd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, pattern: str) -> None:
        self.wait_until(lambda: any(re.search(pattern, line) for line in self.lines), pattern)

    def wait_until(self, condition: Callable[[], bool], what: str = "the condition") -> None:
        deadline = time.monotonic() + SETUP_SECONDS
        while not condition():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"never saw {what}:\n" + "\n".join(self.lines[-40:]))
            time.sleep(0.02)

    def interrupt(self, signum: int, *, group: bool) -> float:
        """Send ``signum`` (to the process group, as a terminal's Ctrl-C, or to `magnet` only, as
        `kill`); the seconds until it exited."""
        self.signalled_at = len(self.lines)
        sent = time.monotonic()
        (os.killpg if group else os.kill)(self.process.pid, signum)
        try:
            self.process.wait(timeout=interrupts.GRACE_SECONDS + 30)
            return time.monotonic() - sent
        finally:
            self.stop()

    def finish(self, timeout: float = 2 * SETUP_SECONDS) -> int:
        try:
            return self.process.wait(timeout=timeout)
        finally:
            self.stop()

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        self._reader.join(timeout=10)

    def survivors(self) -> list[str]:
        """The processes of its group still running 10 s after it ended: what it left behind (a
        Prefect server deaf to SIGINT, a pool worker)."""
        import psutil

        deadline = time.monotonic() + 10
        while True:
            left = []
            for process in psutil.process_iter(["pid", "status", "cmdline"]):
                with contextlib.suppress(psutil.Error, OSError):  # gone meanwhile
                    if (
                        os.getpgid(process.pid) == self.process.pid
                        and process.status() != psutil.STATUS_ZOMBIE
                    ):
                        left.append(" ".join(process.info["cmdline"] or [])[:200])
            if not left or time.monotonic() > deadline:
                return left
            time.sleep(0.2)

    def interrupted_line(self) -> str:
        """What it printed after the signal, checked to be one line (Ray's forwarded lines of its
        workers aside, which may have been on their way), and no traceback anywhere."""
        text = "\n".join(self.lines)
        assert "Traceback" not in text, text[-3000:]
        after = [line for line in self.lines[self.signalled_at :] if not RAY_WORKER_LINE.match(line)]
        assert len(after) == 1 and after[0].startswith("interrupted: "), "\n".join(after)
        return after[0]


@pytest.fixture(scope="module")
def environment(module_tmp) -> dict[str, str]:
    """`magnet`'s environment: no Prefect API (each command starts Prefect's temporary server, the
    one a terminal's Ctrl-C used to kill), one Prefect home for the module (its database is made
    once), no MLflow URI (each test's store is ./mlflow.db in its directory)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API", "MLFLOW_"))}
    env["PREFECT_HOME"] = str(module_tmp("prefect-home"))
    env["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = str(SETUP_SECONDS)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    env["COLUMNS"] = "1000"
    return env


def command_in(line: str) -> list[str]:
    """The `magnet` arguments of the command an interrupted line says to run next."""
    return shlex.split(line.split(" with: ", 1)[1])[1:]


def test_the_command_to_continue_is_the_one_typed_with_the_named_options_replaced(monkeypatch):
    typed = ["/venv/bin/magnet", "train", "--shards", "my data", "--run-name", "old", "--resume"]
    monkeypatch.setattr(sys, "argv", [*typed, "--set", "a=1"])
    continued = interrupts.magnet_command(
        "--run-name", "new", "--resume", flags=["--resume"], options=["--run-name"]
    )
    assert continued == "magnet train --shards 'my data' --set a=1 --run-name new --resume"
    monkeypatch.setattr(sys, "argv", ["magnet", "tune", "--resume=s-1", "--space", "x.yaml"])
    continued = interrupts.magnet_command("--resume", "s-2", options=["--resume"])
    assert continued == "magnet tune --space x.yaml --resume s-2"


def test_the_line_names_the_signal_when_what_was_left_cannot_be_read():
    def unreadable() -> str:
        raise OSError("storage gone")

    interrupts.on_interrupt(unreadable)
    try:
        assert interrupts.line(signal.SIGTERM) == (
            "interrupted: magnet stopped on SIGTERM before it finished (OSError while reading what it left)"
        )
    finally:
        interrupts.on_interrupt(None)


@pytest.mark.slow
def test_prepare_interrupted_leaves_whole_chunks_only(synthetic_shards, environment, tmp_path):
    refer_root = synthetic_shards().parent.parent / "refer"
    out = tmp_path / "out"
    args = ["prepare", "--refer-root", str(refer_root), "--out", str(out), "--samples-per-shard", "2"]
    args += ["--workers", "2"]  # a process pool, whose workers the terminal's Ctrl-C reaches too
    prepare = Magnet(*args, cwd=tmp_path, env=environment)
    work = out / "refcoco-unc" / "_work"
    prepare.wait_until(lambda: any(work.rglob("*.done.json")))
    seconds = prepare.interrupt(signal.SIGINT, group=True)

    assert prepare.process.returncode == 130, "\n".join(prepare.lines[-40:])
    assert seconds < EXIT_SECONDS, f"exited {seconds:.1f} s after SIGINT"
    assert not prepare.survivors()
    line = prepare.interrupted_line()
    done = len(list(work.rglob("*.done.json")))
    assert line == (
        f"interrupted: prepare of {out / 'refcoco-unc'} stopped with {done} chunks written; "
        f"continue with: magnet {shlex.join(args)}"
    )
    assert not list(out.rglob("*.tmp")), "a file was left half-written"
    assert not (out / "refcoco-unc" / "summary.json").exists()
    shards = sorted((out / "refcoco-unc").rglob("*.tar"))
    assert len(shards) >= done  # a worker may have been stopped between its shard and its marker
    for shard in shards:  # each one whole: written under a temporary name, then renamed
        with tarfile.open(shard) as tar:
            assert tar.getmembers()


@pytest.mark.slow
def test_train_interrupted_at_set_up_mid_training_and_resumed(
    synthetic_shards, environment, prefect_harness, tmp_path
):
    from prefect.settings import PREFECT_API_URL

    shards = str(synthetic_shards())
    overrides = [*TINY_RUN, "train.max_steps=8", "train.checkpoint_every=2", "data.eval_splits=[]"]
    args = ["train", "--shards", shards, "--num-workers", "1", "--no-register"]
    args += [arg for item in overrides for arg in ("--set", item)]
    # after the first, the module's Prefect server: the temporary one is the first's to show
    served = {**environment, "PREFECT_API_URL": PREFECT_API_URL.value()}
    client = tracking.client_for(f"sqlite:///{tmp_path}/mlflow.db")

    def run(name: str) -> Any:
        experiment = client.get_experiment_by_name("magnet").experiment_id
        (found,) = client.search_runs([experiment], filter_string=f"tags.`mlflow.runName` = '{name}'")
        return found

    # 1. Ctrl-C once the MLflow run is open, before Ray trains: nothing to resume yet.
    first = Magnet(*args, cwd=tmp_path, env=environment)
    first.wait_for(r"Task run 'open-mlflow-run-\w+' - Finished in state Completed")
    seconds = first.interrupt(signal.SIGINT, group=True)
    assert first.process.returncode == 130, "\n".join(first.lines[-40:])
    assert seconds < EXIT_SECONDS, f"exited {seconds:.1f} s after SIGINT"
    assert not first.survivors()
    line = first.interrupted_line()
    stopped = re.fullmatch(
        r"interrupted: run '(\S+)' stopped before (training started|its first checkpoint); .+", line
    )
    assert stopped, line
    assert run(stopped.group(1)).info.status == "KILLED"

    # 2. SIGTERM to `magnet` alone (as `kill` sends it) once step 3 is logged: step 2 is checkpointed.
    second = Magnet(*args, cwd=tmp_path, env=served)
    second.wait_for(r"step 3/8 \(37%\): loss [\d.]+, [\d.]+ samples/s, \S+ left")
    seconds = second.interrupt(signal.SIGTERM, group=False)
    assert second.process.returncode == 143, "\n".join(second.lines[-40:])
    assert seconds < EXIT_SECONDS, f"exited {seconds:.1f} s after SIGTERM"
    assert not second.survivors()
    line = second.interrupted_line()
    stopped = re.fullmatch(
        r"interrupted: run '(\S+)' stopped at step (\d+) \(its last checkpoint\); .+", line
    )
    assert stopped and int(stopped.group(2)) >= 2, line
    name = stopped.group(1)
    assert command_in(line) == [*args, "--run-name", name, "--resume"]
    assert run(name).info.status == "KILLED"

    # 3. The command it gives, quiet (no progress lines), continues the run: stopped again once
    # it has checkpointed step 4, it has logged every step once, the redone ones included.
    third = Magnet("--quiet", *command_in(line), cwd=tmp_path, env=served)
    third.wait_until(
        lambda: (tmp_path / "ray-results" / name / "checkpoint_step00000004" / "meta.json").exists()
    )
    seconds = third.interrupt(signal.SIGINT, group=True)
    assert third.process.returncode == 130, "\n".join(third.lines[-40:])
    assert seconds < EXIT_SECONDS, f"exited {seconds:.1f} s after SIGINT"
    assert re.fullmatch(
        rf"interrupted: run '{name}' stopped at step [468] \(its last checkpoint\); .+",
        third.interrupted_line(),
    )
    assert any(f"resumed from {tmp_path / 'ray-results' / name}" in line for line in third.lines)
    assert not [line for line in third.lines if re.search(r"step \d+/8 \(", line)]
    assert run(name).info.status == "KILLED"
    steps = [point.step for point in client.get_metric_history(run(name).info.run_id, "train/loss")]
    assert sorted(steps) == list(range(1, max(steps) + 1)) and max(steps) >= 4
