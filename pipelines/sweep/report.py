"""What a sweep's results look like to a reader: the ranked trials as markdown and CSV tables, and
the ablation's aggregate (mean and sample std over seeds per variant) as a table and a plot."""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping, Sequence
from typing import Any

from pipelines.sweep.space import SweepSpace


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def csv_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def trial_columns(space: SweepSpace) -> list[str]:
    """The columns of the ranked-trials table, in order."""
    return ["rank", "trial", "status", space.metric, f"best {space.metric}", "step", *space.params, "run_id"]


def aggregate(
    rows: Sequence[Mapping[str, Any]],
    group_by: str,
    splits: Sequence[str],
    order: Sequence[Any] = (),
) -> list[dict[str, Any]]:
    """Mean and sample std of oIoU and mIoU per value of ``group_by``, over the trials that have
    final scores (the seeds of an ablation variant); groups in ``order`` (the sweep file's, e.g.
    baseline first), others after them as met."""
    import numpy as np

    groups: dict[Any, list[Mapping[str, float]]] = {value: [] for value in order}
    for row in rows:
        if row.get("final"):
            groups.setdefault(row[group_by], []).append(row["final"])
    table = []
    for value, finals in groups.items():
        if not finals:
            continue
        entry: dict[str, Any] = {group_by: value, "n": len(finals)}
        for split in splits:
            for name in ("oIoU", "mIoU"):
                scores = np.array([f[f"{split}/{name}"] for f in finals], dtype=float)
                entry[f"{split}/{name} mean"] = float(scores.mean())
                entry[f"{split}/{name} std"] = float(scores.std(ddof=1)) if len(scores) > 1 else 0.0
        table.append(entry)
    return table


def aggregate_plot(table: Sequence[Mapping[str, Any]], group_by: str, splits: Sequence[str]) -> bytes:
    """Bars of mean oIoU and mIoU per group and split, std as error bars; PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = [str(row[group_by]) for row in table]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    width = 0.8 / max(len(splits), 1)
    x = np.arange(len(names))
    for ax, metric in zip(axes, ("oIoU", "mIoU"), strict=True):
        for i, split in enumerate(splits):
            means = [row[f"{split}/{metric} mean"] for row in table]
            stds = [row[f"{split}/{metric} std"] for row in table]
            ax.bar(x + i * width, means, width, yerr=stds, capsize=3, label=split)
        ax.set_xticks(x + width * (len(splits) - 1) / 2, names, rotation=20)
        ax.set_title(f"{metric} (mean ± std over seeds)")
        ax.set_ylabel("%")
    axes[0].legend()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()
