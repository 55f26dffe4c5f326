"""The sweep file (configs/sweeps/*.yaml) as a typed tree, validated like magnet.config's: an
unknown key or a value of the wrong type or range is an error naming the entry, never a default.

    space = load_space("configs/sweeps/loss-weights.yaml", cfg)   # SpaceError names what is wrong
    apply_params(cfg, {"variant": "+MG", "train.seed": 1}, space.variants) -> the trial's Config

``params`` maps a dotted config key (or ``variant``, which picks a named bundle under ``variants``)
to one distribution; ``scheduler`` is ASHA's settings; ``report`` names the splits every finished
trial is scored on and the param whose values the final report aggregates over (the ablation's).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_validator

from magnet.config import Config, ConfigError, config_from_dict, parse_overrides
from magnet.train import SCORE_KEY

Distribution = Literal["loguniform", "uniform", "choice", "grid"]
Search = Literal["optuna", "random", "grid"]
DISTRIBUTIONS: tuple[str, ...] = get_args(Distribution)
SEARCHES: tuple[str, ...] = get_args(Search)
VARIANT_KEY = "variant"


class SpaceError(ValueError):
    """A sweep file that does not describe a valid search space."""


class _Entry(BaseModel):
    """Base of every part of a sweep file: unknown keys are errors; a loaded space does not change."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Param(_Entry):
    """One searched config field, written in the file as one distribution: ``{loguniform: [low,
    high]}``, ``{uniform: [low, high]}``, ``{choice: [options]}`` or ``{grid: [options]}``
    (``Param.model_validate({"grid": [0, 1]})`` in code)."""

    kind: Distribution = Field(description="How Tune draws the values: sampled (the first three) or all.")
    values: tuple[Any, ...] = Field(description="The bounds (loguniform, uniform) or the options.")

    @model_validator(mode="before")
    @classmethod
    def _one_distribution(cls, data: Any) -> dict[str, Any]:
        """``{kind: values}`` as written -> kind and checked values (bounds as floats)."""
        if not isinstance(data, Mapping) or len(data) != 1:
            raise ValueError(f"must be one distribution, e.g. {{loguniform: [1e-5, 1e-3]}}, got {data!r}")
        ((kind, values),) = data.items()
        if kind not in DISTRIBUTIONS:
            raise ValueError(f"unknown distribution {kind!r}; use one of {DISTRIBUTIONS}")
        if not isinstance(values, list | tuple) or not values:
            raise ValueError(f"{kind} needs a non-empty list, got {values!r}")
        if kind in ("choice", "grid"):
            return {"kind": kind, "values": tuple(values)}
        if len(values) != 2 or not all(
            isinstance(v, int | float) and not isinstance(v, bool) for v in values
        ):
            raise ValueError(f"{kind} needs [low, high] numbers, got {values!r}")
        low, high = (float(v) for v in values)
        if not low < high:
            raise ValueError(f"{kind} needs low < high, got {values!r}")
        if kind == "loguniform" and low <= 0:
            raise ValueError(f"loguniform needs low > 0, got {low}")
        return {"kind": kind, "values": (low, high)}


class Scheduler(_Entry):
    """ASHA: a trial reaching ``grace_period * reduction_factor**k`` (in ``time_attr`` units, steps by
    default) is stopped when it is below the top 1/reduction_factor of the trials seen there."""

    grace_period: int = Field(1, ge=1, description="The first rung.")
    reduction_factor: int = Field(2, ge=2, description="Rung spacing, and 1/kept share at each rung.")
    time_attr: str = Field("step", description="The reported metric the rungs count in.")
    max_t: int | None = Field(None, ge=1, description="Last rung; None = just past train.max_steps.")
    early_stopping: bool = Field(
        True, description="False: FIFO, every trial runs to its end (ablations compare finished runs)."
    )

    @model_validator(mode="after")
    def _grace_period_within_max_t(self) -> Scheduler:
        if self.max_t is not None and self.grace_period > self.max_t:
            raise ValueError(f"grace_period {self.grace_period} > max_t {self.max_t}")
        return self


class Report(_Entry):
    """The ablation's final report (empty: no final scoring)."""

    splits: tuple[str, ...] = Field((), description="Splits every finished trial is scored on at the end.")
    group_by: str | None = Field(
        None, description="The param whose values the report aggregates over (mean and std), e.g. variant."
    )


class SweepSpace(_Entry):
    """A sweep file, validated (``load_space``); ``source`` is the file it came from."""

    params: dict[str, Param] = Field(
        min_length=1, description="Dotted config key (or variant) -> its distribution."
    )
    metric: str = Field("val/oIoU", description="What trials are ranked and ASHA-stopped on.")
    mode: Literal["max", "min"] = "max"
    search: Search = Field("optuna", description="optuna (TPE; no grid params), random or grid.")
    num_samples: int = Field(8, ge=1, strict=True, description="Trials, times the grid when there is one.")
    seed: int = Field(0, description="The searcher's seed.")
    scheduler: Scheduler = Field(default_factory=Scheduler)
    variants: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="Named bundles of {config key: value}, picked by param variant."
    )
    overrides: tuple[str, ...] = Field((), description="Dotted key=value set on the base config first.")
    report: Report = Field(default_factory=Report)
    _source: str = PrivateAttr("sweep space")

    @property
    def source(self) -> str:
        """The sweep file read, named in every error and logged with the sweep."""
        return self._source

    @model_validator(mode="after")
    def _keys_are_config_fields(self) -> SweepSpace:
        keys = set(Config().flat())
        for name, values in self.variants.items():
            bad = sorted(set(values) - keys)
            if bad:
                raise ValueError(f"variants.{name}: {bad} are not config fields")
        for key, param in self.params.items():
            if key == VARIANT_KEY:
                if param.kind not in ("choice", "grid"):
                    raise ValueError(f"params.{key} picks named variants: use choice or grid")
                unknown = [v for v in param.values if v not in self.variants]
                if unknown:
                    raise ValueError(f"params.{key}: {unknown} not among variants {sorted(self.variants)}")
            elif key not in keys:
                raise ValueError(f"params.{key} is not a config field (e.g. model.loss.lambda_mg, train.lr)")
        group_by = self.report.group_by
        if group_by is not None and group_by not in self.params:
            raise ValueError(f"report.group_by {group_by!r} is not a param of the sweep")
        return self

    def as_json(self) -> str:
        return json.dumps({k: {p.kind: list(p.values)} for k, p in self.params.items()}, sort_keys=True)


_SECTIONS: dict[tuple[str | int, ...], type[_Entry]] = {
    (): SweepSpace,
    ("scheduler",): Scheduler,
    ("report",): Report,
}


def _problems(err: ValidationError) -> str:
    """Pydantic's errors as one line, each naming its entry (``params.train.lr: ...``); unknown
    keys gathered per section with the known ones."""
    unknown: dict[tuple[str | int, ...], list[str]] = {}
    problems = []
    for error in err.errors():
        loc = error["loc"]
        if error["type"] == "extra_forbidden":
            unknown.setdefault(loc[:-1], []).append(str(loc[-1]))
            continue
        message = error["msg"].removeprefix("Value error, ")
        problems.append(f"{'.'.join(map(str, loc))}: {message}" if loc else message)
    for section, names in unknown.items():
        known = sorted(_SECTIONS[section].model_fields) if section in _SECTIONS else []
        where = f"{'.'.join(map(str, section))}: unknown" if section else "unknown top-level"
        problems.insert(0, f"{where} key(s) {sorted(names)}; known: {known}")
    return "; ".join(problems)


def load_space(path: str | Path, config: Config | None = None) -> SweepSpace:
    """Read and validate a sweep file; every error names the entry at fault.

    With ``config``, every value a param can take (bounds, options, variants) is also applied to
    it, so a type error ("lr: choice [fast]") surfaces now rather than in trial 37. An empty
    top-level entry (``overrides:``) means its default.
    """
    path = Path(path)
    source = str(path)
    if not path.is_file():
        raise SpaceError(f"sweep file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{source}, line {mark.line + 1} column {mark.column + 1}" if mark else source
        raise SpaceError(f"{where}: not valid YAML: {getattr(err, 'problem', None) or err}") from None
    if not isinstance(data, dict):
        raise SpaceError(f"{source}: expected a mapping at the top level")
    try:
        space = SweepSpace.model_validate({k: v for k, v in data.items() if v is not None})
    except ValidationError as err:
        raise SpaceError(f"{source}: {_problems(err)}") from None
    space._source = source
    check_search(space, space.search)
    if config is not None:
        check_against(space, config)
    return space


def check_search(space: SweepSpace, search: str) -> None:
    """Grid params need a generator that enumerates them; a grid search needs nothing else."""
    grids = [k for k, p in space.params.items() if p.kind == "grid"]
    if search == "optuna" and grids:
        raise SpaceError(
            f"{space.source}: optuna cannot search grid params {grids}; use --search random or grid"
        )
    others = [k for k, p in space.params.items() if p.kind != "grid"]
    if search == "grid" and others:
        raise SpaceError(f"{space.source}: --search grid needs every param as a grid; not: {others}")


def rankable_metrics(cfg: Config) -> list[str]:
    """The metrics every evaluated report of a trial carries, the ones a sweep can rank trials on."""
    from magnet.metrics import PRECISION_THRESHOLDS

    names = ["oIoU", "mIoU", *(f"P@{t:g}" for t in PRECISION_THRESHOLDS)]
    return [f"{split}/{name}" for split in cfg.data.eval_splits for name in names] + [SCORE_KEY]


def check_against(space: SweepSpace, config: Config) -> None:
    """Apply the overrides, each param's bounds/options and each variant to ``config``, and check the
    metric is one a trial reports; ConfigError names the entry."""
    try:
        config = with_overrides(config, space.overrides)
    except ConfigError as err:
        raise SpaceError(f"{space.source}: {err}") from None
    known = rankable_metrics(config)
    if space.metric not in known:
        raise SpaceError(
            f"{space.source}: metric {space.metric!r} is not reported; one of {', '.join(known)}"
        )
    for name in space.variants:
        try:
            apply_params(config, {VARIANT_KEY: name}, space.variants)
        except ConfigError as err:
            raise SpaceError(f"{space.source}: variants.{name}: {err}") from None
    for key, param in space.params.items():
        for value in param.values:  # the bounds of the continuous ones, every option of the others
            try:
                apply_params(config, {key: value}, space.variants)
            except ConfigError as err:
                raise SpaceError(f"{space.source}: params.{key} = {value!r}: {err}") from None


def apply_params(
    config: Config,
    values: Mapping[str, Any],
    variants: Mapping[str, Mapping[str, Any]],
    source: str | None = None,
) -> Config:
    """``config`` with a trial's values set (dotted keys; ``variant`` expands to its bundle)."""
    source = source or f"trial values {dict(values)}"
    data = config.model_dump(mode="json")
    flat: dict[str, Any] = {}
    for key, value in values.items():
        flat.update(variants[value] if key == VARIANT_KEY else {key: value})
    for key, value in flat.items():
        *parents, leaf = key.split(".")
        node = data
        for depth, part in enumerate(parents):
            if not isinstance(node, dict) or part not in node:
                section = ".".join(parents[: depth + 1])
                raise ConfigError(f"{source}: {key}: {section} is not a config section")
            node = node[part]
        node[leaf] = value
    return config_from_dict(data, source=source)


def with_overrides(cfg: Config, overrides: Sequence[str]) -> Config:
    """``cfg`` with dotted ``key=value`` overrides (the sweep file's) applied."""
    values: dict[str, Any] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for key, sub in node.items():
                walk(f"{prefix}.{key}" if prefix else key, sub)
        else:
            values[prefix] = node

    walk("", parse_overrides(list(overrides)))
    return apply_params(cfg, values, {}, source="overrides")
