"""The demo's summary: the model's scores per split and per kind of expression beside the
language-blind baselines of synth_report.json."""

from __future__ import annotations

import json
from pathlib import Path

from pipelines.demo import _baselines, score_rows, score_table


def test_per_kind_rows_sit_beside_the_baselines_per_kind(tmp_path: Path) -> None:
    report = {
        "splits": {
            "val": {
                "baseline_largest_oiou": 0.2,
                "baseline_random_oiou": 0.1,
                "kinds": {
                    "relation": {
                        "n_expressions": 2,
                        "baseline_largest_oiou": 0.3,
                        "baseline_random_oiou": 0.05,
                    },
                    "ordinal": {
                        "n_expressions": 1,
                        "baseline_largest_oiou": 0.1,
                        "baseline_random_oiou": 0.6,
                    },
                },
            },
            "testB": {"baseline_largest_oiou": 0.2, "baseline_random_oiou": 0.1, "kinds": {}},  # not scored
        }
    }
    (tmp_path / "synth_report.json").write_text(json.dumps(report))
    metrics = {
        "val/oIoU": 50.0, "val/mIoU": 45.0, "val/pick_acc": 66.0, "val/outline_IoU": 60.0, "val/n": 3,
        "val/kind/relation/oIoU": 40.0, "val/kind/relation/mIoU": 35.0, "val/kind/relation/pick_acc": 50.0,
        "val/kind/relation/outline_IoU": 70.0, "val/kind/relation/n": 2,
        "val/kind/ordinal/oIoU": 55.0, "val/kind/ordinal/mIoU": 55.0, "val/kind/ordinal/pick_acc": 0.0,
        "val/kind/ordinal/n": 1,  # nothing picked right: no outline IoU
    }  # fmt: skip
    rows = score_rows(metrics, _baselines(tmp_path))
    assert list(rows) == ["val"]
    assert rows["val"]["kinds"]["relation"] == {
        "oIoU": 40.0, "mIoU": 35.0, "pick_acc": 50.0, "outline_IoU": 70.0, "n": 2, "baseline_largest": 30.0,
        "baseline_random": 5.0,
    }  # fmt: skip
    assert rows["val"]["kinds"]["ordinal"]["outline_IoU"] is None
    lines = score_table(rows).splitlines()
    assert lines[0].split()[:2] == ["split", "/"] and lines[0].endswith("beats both")
    assert lines[0].split()[6:10] == ["mIoU", "pick", "outline", "largest"]
    assert lines[1].split() == ["val", "3", "50.00", "45.00", "66.00", "60.00", "20.00", "10.00", "yes"]
    assert lines[2].split() == ["relation", "2", "40.00", "35.00", "50.00", "70.00", "30.00", "5.00", "yes"]
    assert lines[3].split() == ["ordinal", "1", "55.00", "55.00", "0.00", "-", "10.00", "60.00", "NO"]
    # shards prepared before the images' objects were written: no pick figures, no crash
    old = score_rows(
        {k: v for k, v in metrics.items() if "pick" not in k and "outline" not in k}, _baselines(tmp_path)
    )
    assert old["val"]["pick_acc"] is None and score_table(old).splitlines()[1].split()[4:6] == ["-", "-"]
