"""What a sweep's results look like to a reader: the ranked trials as markdown and CSV tables, the
ablation's aggregate (mean and sample std over seeds per variant, split and kind of expression) as
tables and plots, and the ablation report `magnet sweep-report` writes from a finished sweep, with
the trials' learning curves per kind where they were evaluated more than once while training.

    magnet sweep-report <sweep name> --out docs/results/<sweep name>.md   # + .png, -curves.png

The rule the report applies: a variant beats the baseline on a split and kind *beyond the spread*
when ``mean - baseline mean > std + baseline std`` (``beats_beyond_spread``), so a gap the seeds'
scatter alone could make does not count.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from magnet.metrics import PICK_METRICS
from pipelines.sweep.space import SweepSpace

METRICS = ("oIoU", "mIoU")
"""What the verdicts and plots compare."""
TABLE_METRICS = (*METRICS, *PICK_METRICS)
"""What the tables show: also pick accuracy and outline IoU (wrong object, or bad mask?) where the
trials were scored on shards that carry the images' objects."""
# what the driver records on a sweep's parent run at its start, for the report
SWEEP_KIND_TAG = "tune.kind"
COMMAND_PARAM = "sweep.command"
RESUME_TAG = "sweep.resume_command"
REPORT_PARAM = "sweep.report"
OVERRIDES_PARAM = "sweep.overrides"
OVERALL = "all"  # magnet.evaluate.breakdown_rows' group of every expression of a split
BUDGET_KEYS = ("train.max_steps", "train.epochs", "data.batch_size", "train.grad_accum", "train.precision")


class ReportError(ValueError):
    """A sweep that cannot be reported: not there, or without scored trials."""


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


# ------------------------------------------------------------------------------- the aggregate
def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample std (0 for a single value: one seed shows no spread)."""
    import numpy as np

    scores = np.asarray(values, dtype=float)
    return float(scores.mean()), float(scores.std(ddof=1)) if len(scores) > 1 else 0.0


def aggregate_groups(
    rows: Sequence[Mapping[str, Any]],
    group_by: str,
    splits: Sequence[str],
    order: Sequence[Any] = (),
) -> list[dict[str, Any]]:
    """Mean and sample std of each of TABLE_METRICS per value of ``group_by``, split and group of
    expressions, over the trials that have final scores (``row["final"]``, the seeds of an ablation
    variant). Groups as ``magnet.evaluate.breakdown_rows`` names them: ``all``, then ``kind/<kind>``
    (synthetic data) or ``text/<feature>`` (real data). Values in ``order`` (the sweep file's, e.g.
    baseline first), others after them as met; ``n`` counts the trials scored on that group. A pick
    figure is averaged over the trials that have it and left out where none has (shards without
    the images' objects; outline IoU where nothing was picked right)."""
    from magnet.evaluate import breakdown_rows

    scores: dict[Any, dict[tuple[str, str], dict[str, list[float]]]] = {value: {} for value in order}
    for row in rows:
        if not row.get("final"):
            continue
        cells = scores.setdefault(row[group_by], {})
        for found in breakdown_rows(row["final"]):
            if found["split"] in splits:
                cell = cells.setdefault(
                    (found["split"], found["group"]), {name: [] for name in TABLE_METRICS}
                )
                for name in TABLE_METRICS:
                    if name in found:
                        cell[name].append(found[name])
    table = []
    for value, cells in scores.items():
        for split in splits:
            for (cell_split, group), cell in cells.items():
                if cell_split != split:
                    continue
                entry: dict[str, Any] = {
                    group_by: value,
                    "split": split,
                    "group": group,
                    "n": len(cell["oIoU"]),
                }
                for name in TABLE_METRICS:
                    if cell[name]:
                        entry[f"{name} mean"], entry[f"{name} std"] = _mean_std(cell[name])
                table.append(entry)
    return table


def aggregate(
    rows: Sequence[Mapping[str, Any]],
    group_by: str,
    splits: Sequence[str],
    order: Sequence[Any] = (),
) -> list[dict[str, Any]]:
    """``aggregate_groups``' overall figures as one row per value of ``group_by``: ``n`` and
    ``<split>/<oIoU|mIoU> <mean|std>`` columns (the sweep run's report/summary.csv)."""
    table: dict[Any, dict[str, Any]] = {}
    for cell in aggregate_groups(rows, group_by, splits, order):
        if cell["group"] != OVERALL:
            continue
        entry = table.setdefault(cell[group_by], {group_by: cell[group_by], "n": cell["n"]})
        for name in METRICS:
            for stat in ("mean", "std"):
                entry[f"{cell['split']}/{name} {stat}"] = cell[f"{name} {stat}"]
    return list(table.values())


CURVE_METRIC = "oIoU"


def curve_keys(metric_keys: Sequence[str]) -> list[str]:
    """Of a trial's logged metric names, the oIoU of each split and group of expressions that the
    training evaluated (``val/oIoU``, ``val/kind/ordinal/oIoU``): the keys of its learning curves.
    The final scoring's ``final/...`` keys and the training losses are not curves."""
    from magnet.evaluate import breakdown_rows

    keys = []
    for key in metric_keys:
        if key.startswith("final/") or not key.endswith(f"/{CURVE_METRIC}"):
            continue
        if breakdown_rows({key: 0.0}):
            keys.append(key)
    return keys


def aggregate_curves(
    rows: Sequence[Mapping[str, Any]], group_by: str, order: Sequence[Any] = ()
) -> list[dict[str, Any]]:
    """Mean and sample std of oIoU at each evaluated step, per value of ``group_by``, split and
    group of expressions, over the trials' learning curves (``row["curves"]``: metric key ->
    [(step, value)]). A step counts the trials evaluated there (``n``)."""
    from magnet.evaluate import breakdown_rows

    found: dict[Any, dict[tuple[str, str, int], list[float]]] = {value: {} for value in order}
    for row in rows:
        cells = found.setdefault(row[group_by], {})
        for key, points in row.get("curves", {}).items():
            (where,) = breakdown_rows({key: 0.0})
            for step, value in points:
                cells.setdefault((where["split"], where["group"], int(step)), []).append(value)
    table = []
    for value, cells in found.items():
        for (split, group, step), values in sorted(cells.items()):
            mean, std = _mean_std(values)
            table.append(
                {group_by: value, "split": split, "group": group, "step": step, "n": len(values),
                 "mean": mean, "std": std}
            )  # fmt: skip
    return table


def has_curves(curves: Sequence[Mapping[str, Any]]) -> bool:
    """Whether any trial was evaluated at two steps or more (else there is no curve to draw)."""
    return len({c["step"] for c in curves}) > 1


def beats_beyond_spread(mean: float, std: float, baseline_mean: float, baseline_std: float) -> bool:
    """The ablation's rule: better than the baseline by more than both spreads together, so that
    a difference the seeds' scatter alone could produce does not count as a gain."""
    return mean - baseline_mean > std + baseline_std


def wins_over_baseline(
    cells: Sequence[Mapping[str, Any]], group_by: str, baseline: Any
) -> dict[Any, list[tuple[str, str, str]]]:
    """Per other value of ``group_by`` (in the cells' order), the (metric, split, group) where it
    beats ``baseline`` beyond the spread; an empty list where it nowhere does."""
    reference = {(c["split"], c["group"]): c for c in cells if c[group_by] == baseline}
    wins: dict[Any, list[tuple[str, str, str]]] = {}
    for cell in cells:
        if cell[group_by] == baseline:
            continue
        found = wins.setdefault(cell[group_by], [])
        base = reference.get((cell["split"], cell["group"]))
        for name in METRICS:
            if base is not None and beats_beyond_spread(
                cell[f"{name} mean"], cell[f"{name} std"], base[f"{name} mean"], base[f"{name} std"]
            ):
                found.append((name, cell["split"], cell["group"]))
    return wins


def group_label(group: str) -> str:
    """``kind/relation`` -> ``relation``; the split as a whole -> ``overall``."""
    return "overall" if group == OVERALL else group.rpartition("/")[2]


def verdict(value: Any, wins: Sequence[tuple[str, str, str]], baseline: Any) -> str:
    """One sentence: where ``value`` beats the baseline beyond the spread, or that it does not."""
    if not wins:
        return f"**{value}** does not beat {baseline} beyond the spread on any split or kind."
    parts = []
    for name in METRICS:
        places = [f"{split} {group_label(group)}" for metric, split, group in wins if metric == name]
        if places:
            parts.append(f"in {name} on {', '.join(places)}")
    return f"**{value}** beats {baseline} beyond the spread {'; '.join(parts)}."


# ------------------------------------------------------------------------------------ the plots
def _save_png(fig: Any) -> bytes:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def aggregate_plot(table: Sequence[Mapping[str, Any]], group_by: str, splits: Sequence[str]) -> bytes:
    """Bars of mean oIoU and mIoU per group and split, std as error bars; PNG bytes."""
    import numpy as np

    plt = _pyplot()
    names = [str(row[group_by]) for row in table]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    width = 0.8 / max(len(splits), 1)
    x = np.arange(len(names))
    for ax, metric in zip(axes, METRICS, strict=True):
        for i, split in enumerate(splits):
            means = [row[f"{split}/{metric} mean"] for row in table]
            stds = [row[f"{split}/{metric} std"] for row in table]
            ax.bar(x + i * width, means, width, yerr=stds, capsize=3, label=split)
        ax.set_xticks(x + width * (len(splits) - 1) / 2, names, rotation=20)
        ax.set_title(f"{metric} (mean ± std over seeds)")
        ax.set_ylabel("%")
    axes[0].legend()
    fig.tight_layout()
    return _save_png(fig)


def groups_plot(cells: Sequence[Mapping[str, Any]], group_by: str, splits: Sequence[str]) -> bytes:
    """Per metric (rows) and split (columns): bars of the mean per group of expressions (overall
    and each kind), one bar per value of ``group_by``, std as error bars; PNG bytes."""
    import numpy as np

    plt = _pyplot()
    values = list(dict.fromkeys(c[group_by] for c in cells))
    groups = list(dict.fromkeys(c["group"] for c in cells))
    found = {(c[group_by], c["split"], c["group"]): c for c in cells}
    fig, axes = plt.subplots(
        len(METRICS), len(splits), figsize=(4.5 * len(splits), 3.5 * len(METRICS)), squeeze=False, sharey=True
    )
    width = 0.8 / max(len(values), 1)
    x = np.arange(len(groups))
    for row, name in enumerate(METRICS):
        for column, split in enumerate(splits):
            ax = axes[row][column]
            for i, value in enumerate(values):
                here = [found.get((value, split, group)) for group in groups]
                means = [c[f"{name} mean"] if c else np.nan for c in here]
                stds = [c[f"{name} std"] if c else 0.0 for c in here]
                ax.bar(x + i * width, means, width, yerr=stds, capsize=2, label=str(value))
            ax.set_xticks(x + width * (len(values) - 1) / 2, [group_label(g) for g in groups], rotation=20)
            ax.set_title(f"{split}: {name} (mean ± std over seeds)")
            ax.set_ylabel("%")
    axes[0][0].legend(fontsize="small")
    fig.tight_layout()
    return _save_png(fig)


def curves_plot(curves: Sequence[Mapping[str, Any]], group_by: str) -> bytes:
    """Learning curves: per split (rows) and group of expressions (columns: overall, each kind),
    mean oIoU against the step, one line per value of ``group_by``, a band of ± std; PNG bytes."""
    import numpy as np

    plt = _pyplot()
    splits = list(dict.fromkeys(c["split"] for c in curves))
    groups = list(dict.fromkeys(c["group"] for c in curves))
    values = list(dict.fromkeys(c[group_by] for c in curves))
    fig, axes = plt.subplots(
        len(splits), len(groups), figsize=(3.2 * len(groups), 2.8 * len(splits)), squeeze=False, sharey=True
    )
    for row, split in enumerate(splits):
        for column, group in enumerate(groups):
            ax = axes[row][column]
            for value in values:
                here = [c for c in curves if (c[group_by], c["split"], c["group"]) == (value, split, group)]
                steps = np.array([c["step"] for c in here])
                mean = np.array([c["mean"] for c in here])
                std = np.array([c["std"] for c in here])
                (line,) = ax.plot(steps, mean, marker=".", label=str(value))
                ax.fill_between(steps, mean - std, mean + std, color=line.get_color(), alpha=0.2)
            ax.set_title(f"{split}: {group_label(group)}", fontsize="medium")
            ax.set_xlabel("step")
            if column == 0:
                ax.set_ylabel(f"{CURVE_METRIC} %")
    axes[0][0].legend(fontsize="small")
    fig.tight_layout()
    return _save_png(fig)


# ------------------------------------------------------------------------ the report of a sweep
@dataclass(frozen=True)
class FinishedSweep:
    """What the report needs of a sweep, read back from MLflow."""

    name: str
    experiment: str
    run_id: str
    params: dict[str, str]  # the parent run's: the base config, flattened, and sweep.*
    tags: dict[str, str]
    group_by: str
    splits: tuple[str, ...]
    order: tuple[Any, ...]  # the values of group_by in the sweep file's order, the baseline first
    rows: list[dict[str, Any]]  # per scored trial: its group_by value, "final" metrics and "curves"


def read_sweep(sweep_name: str, experiment: str, tracking_uri: str | None = None) -> FinishedSweep:
    """The finished sweep ``sweep_name`` of ``experiment``: its parent run and every trial's final
    scores. ReportError when there is no such sweep, it has no report, or no trial was scored."""
    from pipelines import tracking
    from pipelines.sweep.trial import PARAMS_TAG, PARENT_TAG, SWEEP_TAG

    uri = tracking.resolve_tracking_uri(tracking_uri, existing=True)
    client = tracking.client_for(uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise ReportError(f"{experiment}: no such MLflow experiment in {uri}")
    sweeps = client.search_runs([found.experiment_id], filter_string=f"tags.`{SWEEP_KIND_TAG}` = 'sweep'")
    parent = next((run for run in sweeps if run.data.tags.get(SWEEP_TAG) == sweep_name), None)
    if parent is None:
        known = sorted(run.data.tags.get(SWEEP_TAG, "") for run in sweeps)
        raise ReportError(
            f"{sweep_name}: no sweep of that name in experiment {experiment}; sweeps there: "
            + (", ".join(known) or "none")
        )
    params = dict(parent.data.params)
    report = json.loads(params.get(REPORT_PARAM, "{}"))
    if not report.get("group_by") or not report.get("splits"):
        raise ReportError(f"{sweep_name}: its sweep file has no report (splits and group_by) to aggregate")
    group_by = report["group_by"]
    space = json.loads(params["sweep.space"])
    children = client.search_runs(
        [found.experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent.info.run_id}'"
    )
    rows = []
    for child in children:
        final = {k.removeprefix("final/"): v for k, v in child.data.metrics.items() if k.startswith("final/")}
        if final:
            value = json.loads(child.data.tags.get(PARAMS_TAG, "{}")).get(group_by)
            curves = {
                key: [(m.step, m.value) for m in client.get_metric_history(child.info.run_id, key)]
                for key in curve_keys(list(child.data.metrics))
            }
            rows.append({group_by: value, "final": final, "curves": curves})
    if not rows:
        why = (
            f"the sweep is unfinished; continue it with `magnet tune --resume {sweep_name}`"
            if parent.info.status == "RUNNING"
            else f"the sweep ended {parent.info.status} before any trial finished"
        )
        raise ReportError(f"{sweep_name}: no trial has final scores: {why}")
    return FinishedSweep(
        name=sweep_name,
        experiment=experiment,
        run_id=parent.info.run_id,
        params=params,
        tags=dict(parent.data.tags),
        group_by=group_by,
        splits=tuple(report["splits"]),
        order=tuple(next(iter(space[group_by].values()))),
        rows=rows,
    )


def _groups_table(cells: Sequence[Mapping[str, Any]], group_by: str, name: str) -> str:
    """Rows (value, split), columns overall and each kind: ``mean ± std`` of ``name`` (blank
    where no trial has it)."""
    groups = list(dict.fromkeys(c["group"] for c in cells))
    table: dict[tuple[Any, str], dict[str, Any]] = {}
    for cell in cells:
        row = table.setdefault(
            (cell[group_by], cell["split"]), {group_by: cell[group_by], "split": cell["split"]}
        )
        if cell["group"] == OVERALL:
            row["n"] = cell["n"]
        if f"{name} mean" in cell:
            row[group_label(cell["group"])] = f"{cell[f'{name} mean']:.1f} ± {cell[f'{name} std']:.1f}"
    return markdown_table(list(table.values()), [group_by, "split", "n", *map(group_label, groups)])


def _curves_table(curves: Sequence[Mapping[str, Any]], group_by: str, split: str) -> str:
    """Rows (value, step) of one split, columns overall and each kind: ``mean ± std`` of oIoU."""
    here = [c for c in curves if c["split"] == split]
    groups = list(dict.fromkeys(c["group"] for c in here))
    table: dict[tuple[Any, int], dict[str, Any]] = {}
    for cell in here:
        key = (cell[group_by], cell["step"])
        row = table.setdefault(key, {group_by: cell[group_by], "step": cell["step"]})
        if cell["group"] == OVERALL:
            row["n"] = cell["n"]
        row[group_label(cell["group"])] = f"{cell['mean']:.1f} ± {cell['std']:.1f}"
    return markdown_table(list(table.values()), [group_by, "step", "n", *map(group_label, groups)])


def report_markdown(
    sweep: FinishedSweep,
    cells: Sequence[Mapping[str, Any]],
    plot_name: str,
    curves: Sequence[Mapping[str, Any]] = (),
    curves_plot_name: str = "",
) -> str:
    """The ablation report: what ran (command, commit, config, budget), the tables of mean ± std
    (``cells``: ``aggregate_groups``) per value of group_by x split, overall and per kind, a
    verdict per value against the first (where there are several) and the plot; then, where the
    trials were evaluated more than once while training, their learning curves per kind
    (``curves``: ``aggregate_curves``) and their plot."""
    baseline = cells[0][sweep.group_by]
    wins = wins_over_baseline(cells, sweep.group_by, baseline)
    params, tags = sweep.params, sweep.tags
    overrides = json.loads(params.get(OVERRIDES_PARAM, "[]"))
    commit = tags.get("mlflow.source.git.commit", "unrecorded")
    dirty = " (with uncommitted changes)" if tags.get("git.dirty") == "true" else ""
    lines = [
        f"# Sweep report: {sweep.name}",
        "",
        f"Sweep `{sweep.name}` of MLflow experiment `{sweep.experiment}` (parent run `{sweep.run_id}`).",
        "",
        f"- Command: `{params.get(COMMAND_PARAM, 'unrecorded')}`",
    ]
    if tags.get(RESUME_TAG):
        lines.append(f"- Last resumed with: `{tags[RESUME_TAG]}`")
    lines += [
        f"- Code: commit `{commit}`{dirty}",
        f"- Config: preset `{tags.get('config.name', '?')}`; overrides: "
        + (", ".join(f"`{o}`" for o in overrides) or "none"),
        "- Budget: "
        + ", ".join(f"{key}={params[key]}" for key in BUDGET_KEYS if key in params)
        + f"; {params.get('sweep.num_samples', '?')} sample(s) of the grid, "
        + f"{params.get('sweep.workers_per_trial', '?')} worker(s) and "
        + f"{params.get('sweep.gpus_per_trial', '?')} GPU(s) per trial",
        f"- Sweep file: `{params.get('sweep.space_file', '?')}`; per {sweep.group_by}, each trial's "
        f"best checkpoint by {params.get('sweep.metric', '?')} scored on {', '.join(sweep.splits)} "
        f"(whole splits, {params.get('eval.protocol', '?')} protocol)",
    ]
    for name in (name for name in TABLE_METRICS if any(f"{name} mean" in cell for cell in cells)):
        lines += ["", f"## {name} (%, mean ± std over seeds)", "", _groups_table(cells, sweep.group_by, name)]
    if any(f"{PICK_METRICS[0]} mean" in cell for cell in cells):
        lines += [
            "",
            "pick_acc: share of expressions whose mask picks the referred object (its IoU with it "
            "strictly above that with every other object of the image); outline_IoU: mean IoU of "
            "those. A low pick_acc is the wrong object; a low outline_IoU, a poor mask of the right one.",
        ]
    if wins:  # more than one value of group_by: each against the first
        lines += [
            "",
            "## Against the baseline",
            "",
            f"Rule: {sweep.group_by} X beats the baseline (`{baseline}`, the sweep file's first) on a split "
            "and kind *beyond the spread* when mean_X - mean_baseline > std_X + std_baseline (sample std "
            "over the seeds; 0 for one seed), so a gap the seeds' scatter alone could make does not count.",
            "",
            *(f"- {verdict(value, found, baseline)}" for value, found in wins.items()),
        ]
    lines += ["", f"![{' and '.join(METRICS)} per split and kind]({plot_name})", ""]
    if has_curves(curves):
        lines += [
            f"## Learning curves ({CURVE_METRIC} %, mean ± std over seeds, as evaluated during training)",
            "",
            f"![{CURVE_METRIC} per evaluated step, split and kind]({curves_plot_name})",
        ]
        for split in dict.fromkeys(c["split"] for c in curves):
            lines += ["", f"### {split}", "", _curves_table(curves, sweep.group_by, split)]
        lines.append("")
    return "\n".join(lines)


def write_report(sweep: FinishedSweep, out: Path) -> list[Path]:
    """The report as ``out`` (markdown), its plot beside it (``out`` with .png) and, where the
    trials have learning curves, their plot (``<out>-curves.png``): the files written."""
    cells = aggregate_groups(sweep.rows, sweep.group_by, sweep.splits, sweep.order)
    plot = out.with_suffix(".png")
    plot.write_bytes(groups_plot(cells, sweep.group_by, sweep.splits))
    written = [out, plot]
    curves = aggregate_curves(sweep.rows, sweep.group_by, sweep.order)
    curves_png = out.with_name(f"{out.stem}-curves.png")
    if has_curves(curves):
        curves_png.write_bytes(curves_plot(curves, sweep.group_by))
        written.append(curves_png)
    out.write_text(report_markdown(sweep, cells, plot.name, curves, curves_png.name))
    return written
