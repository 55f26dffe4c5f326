"""The benchmarks run end to end on tiny settings and print the tables their docstrings promise.

Only their mechanics are checked here (every row, a number in every cell): speed targets are
read from a full run of the benchmark, never asserted in a timed test.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
NUMBER = r"\d+(?:\.\d+)?"


def _run(script: str, *args: str, timeout: int = 300) -> str:
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=BENCHMARKS,
    )
    assert result.returncode == 0, f"{script} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


def test_reader_benchmark_prints_rates_ratios_and_ceilings() -> None:
    out = _run(
        "bench_reader.py",
        *("--images", "40", "--input-sizes", "96", "64", "--max-batches", "3", "--latency-batches", "3"),
        *("--repeats", "1", "--storages", "local", "s3-latency", "--s3-latency-ms", "5"),
    )
    for size in (96, 64):
        for reader in ("naive refer reader", "shard reader"):  # rate and ratio on both storages
            assert re.search(rf"^\s*{size}\s+{reader}(\s+{NUMBER}\s+{NUMBER}x){{2}}\s*$", out, re.M), out
        # shared, naive only, shard only (ms), then a ceiling per storage
        assert re.search(rf"^\s*{size}(\s+-?{NUMBER}){{3}}(\s+{NUMBER}x){{2}}\s*$", out, re.M), out
    requests = re.search(rf"S3 \+5 ms: naive refer reader ({NUMBER}), shard reader ({NUMBER})", out)
    assert requests and float(requests[1]) > float(requests[2]), out  # one GET per image vs per shard


def test_prepare_benchmark_prints_throughput_and_identical_outputs() -> None:
    out = _run("bench_prepare.py", "--expressions", "60", "--samples-per-shard", "20")
    assert "outputs byte-identical across the runs: True" in out, out
    rows = re.findall(rf"^\| (.+?)\s+\|\s+{NUMBER} \|\s+{NUMBER} \|\s+{NUMBER}x \|$", out, re.M)
    assert rows == [
        "library, 1 worker",
        "library, 2 workers",
        "magnet prepare (Prefect flow), 2 workers",
        "magnet prepare re-run (all chunks done)",
    ], out


def test_step_benchmark_splits_the_step_into_parts_that_add_up() -> None:
    """Two trees side by side (this one against HEAD); per part a time and a share for each, and
    the parts add up to the measured step."""
    out = _run("bench_step.py", "--steps", "2", "--warmup", "1", "--against", "HEAD")
    for part in (
        "data",
        "vision stages",
        "text groups",
        "fusions + CAM",
        "decoder",
        "Mask Grounding",
        "alignment loss",
        "segmentation loss",
        "backward",
        "optimizer step",
        "other",
    ):
        assert re.search(rf"^{re.escape(part)}(\s+{NUMBER}\s+{NUMBER}%){{2}}\s*$", out, re.M), out
    sums = [float(v) for v in re.search(rf"^sum of parts\s+({NUMBER})\s+({NUMBER})", out, re.M).groups()]
    steps = [float(v) for v in re.search(rf"^measured step\s+({NUMBER})\s+({NUMBER})", out, re.M).groups()]
    for total, step in zip(sums, steps, strict=True):
        assert abs(total - step) <= 0.02 * step, out
    assert re.search(rf"GFLOP/s fp32 matmul peak \({NUMBER}%\)", out), out
    assert re.search(rf"this tree vs HEAD: {NUMBER}x samples/s", out), out


def _bench_learning() -> ModuleType:
    """benchmarks/bench_learning.py as a module (benchmarks/ is not a package)."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import bench_learning
    finally:
        sys.path.remove(str(BENCHMARKS))
    return bench_learning


def test_learning_benchmark_scores_kinds_against_their_floors_and_checks_the_targets() -> None:
    """bench_learning's arithmetic (its run is the overfit check's loop, tests/magnet/test_learning.py)."""
    bench = _bench_learning()
    floors = {"all": 20.0, "ordinal": 25.0}
    metrics = {"val/oIoU": 70.0, "val/pick_acc": 85.0, "val/kind/ordinal/oIoU": 45.0}
    rows = bench.kind_scores(metrics, floors)
    assert rows["all"]["ratio"] == 3.5 and rows["all"]["pick_acc"] == 85.0 and rows["ordinal"]["ratio"] == 1.8
    assert list(bench.verdict(rows).values()) == [True, False, True]
    points = {
        1: {"train/grad_norm/vision": 2.0},
        2: {"train/grad_norm/vision": 4.0},
        99: {"train/grad_norm/vision": 9.0},
    }
    assert bench.gradient_table(points, steps=50) == {"vision": 3.0}


def test_learning_benchmark_run_continues_its_curve_and_keeps_one_checkpoint(tmp_path: Path) -> None:
    """--run: the curve survives the process (journal read back) and only the newest checkpoint stays."""
    bench = _bench_learning()
    journal = tmp_path / "points.jsonl"
    first = bench.Recorder({"all": 20.0}, start=0.0, journal=journal)
    first.log_metrics({"train/loss": 2.0}, step=1)
    first.log_metrics({"val/oIoU": 30.0}, step=2)
    again = bench.Recorder({"all": 20.0}, start=0.0, journal=journal)
    assert again.points == {1: {"train/loss": 2.0}, 2: {"val/oIoU": 30.0}}

    reporter = bench.NewestOnlyReporter(tmp_path / "checkpoints")
    for step in (2, 4):
        staged = tmp_path / f"staged{step}"
        staged.mkdir()
        (staged / "meta.json").write_text("{}")
        reporter.report({"step": float(step)}, staged)
    assert [p.name for p in reporter.checkpoints()] == ["checkpoint_step00000004"]


def test_learning_benchmark_refuses_a_run_name_that_leaves_its_workdir(
    tmp_path: Path, monkeypatch, capsys
) -> None:
    bench = _bench_learning()
    monkeypatch.setattr(
        sys, "argv", ["bench_learning.py", "--workdir", str(tmp_path / "w"), "--run", "../out"]
    )
    with pytest.raises(SystemExit) as stopped:
        bench.main()
    assert (
        stopped.value.code == 2
        and "--run: run name '../out' cannot name a directory" in capsys.readouterr().err
    )
    assert not (tmp_path / "w").exists()
