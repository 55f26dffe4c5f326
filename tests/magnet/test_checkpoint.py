"""A checkpoint's meta.json (its one reader and writer) and the one name of a checkpoint directory."""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import pytest

from magnet.checkpoint import (
    CHECKPOINT_GLOB,
    META_FILE,
    CheckpointError,
    CheckpointMeta,
    ImportRecord,
    checkpoint_name,
    checkpoint_step,
    read_checkpoint_meta,
)

IMPORTED = ImportRecord(
    file="/w.pth", sha256="ab", tensors_mapped=2, dropped={"x": "unused"}, training_only_kept=("y",)
)


@pytest.mark.parametrize(
    "meta",
    [
        CheckpointMeta(
            step=3, epoch=1, world_size=2, metrics={"step": 3, "val/oIoU": 41.5, "nan": float("nan")}
        ),
        CheckpointMeta(step=0, epoch=0, world_size=1, imported_from=IMPORTED),
    ],
)
def test_meta_round_trips_through_its_file_and_pickle(tmp_path: Path, meta: CheckpointMeta) -> None:
    meta.write(tmp_path)
    again = read_checkpoint_meta(tmp_path)
    assert again.model_dump_json() == meta.model_dump_json()  # NaN != NaN: compare the dumps
    assert pickle.loads(pickle.dumps(meta)).model_dump_json() == meta.model_dump_json()
    assert ('"imported_from"' in (tmp_path / META_FILE).read_text()) == (meta.imported_from is not None)
    assert isinstance(again.metrics.get("step", 0), int)  # an integer metric stays one


def test_a_broken_or_older_meta_is_one_error_naming_the_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"is not a MagNet checkpoint: meta\.json is missing"):
        read_checkpoint_meta(tmp_path)
    where = re.escape(f"{tmp_path / META_FILE} cannot be read: ")
    (tmp_path / META_FILE).write_text('{"step": 3}')  # an older layout: no epoch or world size
    with pytest.raises(CheckpointError, match=f"^{where}epoch: Field required; world_size: Field required$"):
        read_checkpoint_meta(tmp_path)
    (tmp_path / META_FILE).write_text("step 3")
    with pytest.raises(CheckpointError, match=f"^{where}not JSON"):
        read_checkpoint_meta(tmp_path)
    (tmp_path / META_FILE).write_text('{"step": "three", "epoch": 0, "world_size": 1}')
    with pytest.raises(CheckpointError, match="step: Input should be a valid integer"):
        read_checkpoint_meta(tmp_path)


def test_checkpoint_names_sort_by_step_and_parse_back(tmp_path: Path) -> None:
    names = [checkpoint_name(step) for step in (10, 2, 100)]
    assert sorted(names) == [checkpoint_name(step) for step in (2, 10, 100)]
    assert [checkpoint_step(name) for name in names] == [10, 2, 100]
    assert checkpoint_step("checkpoint_00000002") is None and checkpoint_step("step_00000002") is None
    for name in [*names, "checkpoint_00000002"]:
        (tmp_path / name).mkdir()
    assert sorted(p.name for p in tmp_path.glob(CHECKPOINT_GLOB)) == sorted(names)
