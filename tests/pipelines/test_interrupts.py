"""Ctrl-C and SIGTERM stop `magnet` within seconds, with one line saying what stopped and how to
continue (issue 25), made for real: each `magnet` runs in its own session as a terminal runs it,
so a SIGINT sent to its process group reaches every process the command started, Prefect's
temporary API server included (it used to die first, and the command then retried it for minutes).

1. `magnet prepare` (2 worker processes) interrupted between chunks: whole shards only, no
   summary.json, no .tmp, no process left;
2. `magnet demo` interrupted while it prepares its shards: the command to run again, nothing left;
3. `magnet train` interrupted by Ctrl-C mid-training, then continued with the command the line
   gives (under --quiet: no progress lines) and stopped again by SIGTERM: the MLflow run KILLED
   each time, every step logged once, the redone ones included.
Each interruption: exit 130 / 143 within seconds, and after the signal nothing but the line (and
progress lines Ray was already forwarding), no traceback.
"""

from __future__ import annotations

import contextlib
import json
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
from pipelines.train_driver import RAY_SNAPSHOT, last_checkpoint_step

REPO = Path(__file__).resolve().parents[2]
# Exit within this many seconds of the signal: the graceful path (Prefect reports the crash to a
# live server, the MLflow run is closed, Ray shut down) takes a few; interrupts.GRACE_SECONDS is
# the backstop, so an exit that needed it fails here.
EXIT_SECONDS = interrupts.GRACE_SECONDS - 3
SETUP_SECONDS = 600  # a start on a loaded 2-core machine (imports, Prefect's server, Ray) took over 300 s
# a progress line of training (rank 0's, forwarded by Ray with its worker prefix) or preparation
PROGRESS_LINE = re.compile(r"(step \d+/\d+|prepare \S+: \d+/\d+ chunks) \(")
# what may already be on its way when the signal comes: a progress line, a chunk's task finishing
IN_FLIGHT = re.compile(rf"{PROGRESS_LINE.pattern}|Task run 'chunk-\S+' - Finished in state Completed")


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
        """What it printed after the signal: the interrupted line last, before it only lines
        already on their way when the signal came (`IN_FLIGHT`), and no traceback."""
        after = self.lines[self.signalled_at :]
        assert after and after[-1].startswith("interrupted: "), "\n".join(after)
        assert all(IN_FLIGHT.search(line) for line in after[:-1]), "\n".join(after)
        return after[-1]


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


def test_the_step_named_is_the_last_checkpoint_ray_registered(tmp_path):
    """A resume restores what Ray Train's snapshot lists, not a checkpoint directory written after."""
    run = tmp_path / "run-1"
    (run / "checkpoint_step00000004").mkdir(parents=True)
    (run / "checkpoint_step00000004" / "meta.json").write_text("{}")
    assert last_checkpoint_step(str(tmp_path), "run-1") is None
    registered = [{"checkpoint_dir_name": f"checkpoint_step{s:08d}", "metrics": {"step": s}} for s in (2, 0)]
    (run / RAY_SNAPSHOT).write_text(json.dumps({"checkpoint_results": registered}))
    assert last_checkpoint_step(str(tmp_path), "run-1") == 2


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
def test_train_interrupted_mid_training_and_resumed(synthetic_shards, environment, tmp_path):
    shards = str(synthetic_shards())
    overrides = [*TINY_RUN, "train.max_steps=8", "train.checkpoint_every=2", "data.eval_splits=[]"]
    args = ["train", "--shards", shards, "--num-workers", "1", "--no-register"]
    args += [arg for item in overrides for arg in ("--set", item)]
    client = tracking.client_for(f"sqlite:///{tmp_path}/mlflow.db")

    def run(name: str) -> Any:
        experiment = client.get_experiment_by_name("magnet").experiment_id
        (found,) = client.search_runs([experiment], filter_string=f"tags.`mlflow.runName` = '{name}'")
        return found

    # 1. Ctrl-C at the terminal (the whole process group) once Ray registered a checkpoint.
    first = Magnet(*args, cwd=tmp_path, env=environment)
    first.wait_until(lambda: any((tmp_path / "ray-results").glob(f"*/{RAY_SNAPSHOT}")), "a checkpoint")
    seconds = first.interrupt(signal.SIGINT, group=True)
    assert first.process.returncode == 130, "\n".join(first.lines[-40:])
    assert seconds < EXIT_SECONDS, f"exited {seconds:.1f} s after SIGINT"
    assert not first.survivors()
    line = first.interrupted_line()
    stopped = re.fullmatch(
        r"interrupted: run '(\S+)' stopped at step (\d+) \(its last checkpoint\); continue with: .+", line
    )
    assert stopped and int(stopped.group(2)) >= 2, line
    name = stopped.group(1)
    assert command_in(line) == [*args, "--run-name", name, "--resume"]
    assert run(name).info.status == "KILLED"
    progress = r"step 1/8 \(12%\): loss \d+\.\d{4}, \d+\.\d samples/s, \S+ left"
    assert any(re.search(progress, line) for line in first.lines), "\n".join(first.lines)

    # 2. The command it gives, quiet (no progress lines), continues the run; SIGTERM to `magnet`
    # alone (as `kill` sends it) once Ray registered a checkpoint past the first run's: every step
    # logged once.
    second = Magnet("--quiet", *command_in(line), cwd=tmp_path, env=environment)
    storage = str(tmp_path / "ray-results")

    def registered_past_the_first() -> bool:
        with contextlib.suppress(ValueError):  # Ray rewrites its snapshot in place: read it again
            return (last_checkpoint_step(storage, name) or 0) > int(stopped.group(2))
        return False

    second.wait_until(registered_past_the_first, "a checkpoint past the first run's")
    seconds = second.interrupt(signal.SIGTERM, group=False)
    assert second.process.returncode == 143, "\n".join(second.lines[-40:])
    assert seconds < EXIT_SECONDS, f"exited {seconds:.1f} s after SIGTERM"
    assert not second.survivors()
    again = re.fullmatch(
        rf"interrupted: run '{name}' stopped at step (\d+) \(its last checkpoint\); .+",
        second.interrupted_line(),
    )
    assert again and int(again.group(1)) > int(stopped.group(2))
    assert any(f"resumed from {tmp_path / 'ray-results' / name}" in line for line in second.lines)
    assert not [line for line in second.lines if PROGRESS_LINE.search(line)]
    assert run(name).info.status == "KILLED"
    steps = [point.step for point in client.get_metric_history(run(name).info.run_id, "train/loss")]
    assert sorted(steps) == list(range(1, max(steps) + 1)) and max(steps) >= 4


@pytest.mark.slow
def test_demo_interrupted_while_it_prepares_its_shards(environment, tmp_path):
    """The demo's shard preparation (Prefect's temporary server and a process pool) stopped by
    Ctrl-C: the line says how to run it again, nothing is left running, no MLflow run was made."""
    workdir = tmp_path / "demo"
    demo = Magnet("demo", "--workdir", str(workdir), cwd=tmp_path, env=environment)
    demo.wait_until(lambda: any(line.startswith("[demo] preparing shards") for line in demo.lines), "shards")
    seconds = demo.interrupt(signal.SIGINT, group=True)

    assert demo.process.returncode == 130, "\n".join(demo.lines[-40:])
    assert seconds < EXIT_SECONDS, f"exited {seconds:.1f} s after SIGINT"
    assert not demo.survivors()
    kept = f"its data in {workdir} is kept, run again: magnet demo --workdir {workdir}"
    assert demo.interrupted_line() == f"interrupted: the demo stopped; {kept}"
    assert not list(workdir.rglob("*.tmp")), "a file was left half-written"
    assert not (workdir / "shards" / "refcoco-unc" / "summary.json").exists()
