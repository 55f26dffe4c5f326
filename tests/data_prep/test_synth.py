"""The synthetic RefCOCO generator: refer layout, expression semantics, determinism, baselines."""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from typer.testing import CliRunner

from data_prep.masks import rasterize
from data_prep.refer import ReferFormatError, kinds_path, load_kinds, load_refer, load_refs_pickle
from data_prep.scenes import (
    COLOURS,
    KINDS,
    Attribute,
    Desc,
    Ordinal,
    Relation,
    Scene,
    SceneObject,
    Superlative,
    kind_of,
    parse,
    referring_expressions,
    render,
    resolve,
)
from data_prep.synth import SPLITS, scene_for, synthesize

SEED, SIZE, N_IMAGES = 3, 128, 300


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    synthesize(out, num_images=N_IMAGES, image_size=SIZE, seed=SEED, workers=1)
    return out


@pytest.fixture(scope="module")
def instances(dataset: Path) -> dict:
    return json.loads((dataset / "refcoco" / "instances.json").read_text())


@pytest.fixture(scope="module")
def refs(dataset: Path) -> list[dict]:
    # The plain-data unpickler of the real-data path: the file holds nothing but plain data.
    return load_refs_pickle(dataset / "refcoco" / "refs(unc).p")


def _annotations_by_image(instances: dict) -> dict[int, list[dict]]:
    by_image: dict[int, list[dict]] = defaultdict(list)
    for ann in instances["annotations"]:
        by_image[ann["image_id"]].append(ann)
    return {k: sorted(v, key=lambda a: a["id"]) for k, v in by_image.items()}


def _obj(shape: str, colour: str, cx: float, cy: float, size: str = "large", r: float = 15.0) -> SceneObject:
    return SceneObject(
        shape, colour, size, cx, cy, r, (cx - r, cy - r, cx + r, cy - r, cx + r, cy + r, cx - r, cy + r)
    )


# ----------------------------------------------------------------------------------- layout
def test_layout_and_file_names(dataset: Path, instances: dict) -> None:
    image_dir = dataset / "images/mscoco/images/train2014"
    files = sorted(p.name for p in image_dir.iterdir())
    assert files == sorted(img["file_name"] for img in instances["images"])
    assert len(files) == N_IMAGES
    assert all(re.fullmatch(r"COCO_train2014_\d{12}\.jpg", f) for f in files)
    img = instances["images"][0]
    with Image.open(image_dir / img["file_name"]) as im:
        assert im.format == "JPEG" and im.size == (img["width"], img["height"]) == (SIZE, SIZE)
    assert (dataset / "refcoco" / "refs(unc).p").is_file()


def test_instances_structure(instances: dict) -> None:
    assert set(instances) == {"images", "annotations", "categories"}
    image_ids = {img["id"] for img in instances["images"]}
    assert all(set(img) == {"id", "file_name", "height", "width"} for img in instances["images"])
    categories = {c["id"]: c for c in instances["categories"]}
    assert all(set(c) == {"id", "name", "supercategory"} for c in categories.values())
    ann_ids = [a["id"] for a in instances["annotations"]]
    assert len(ann_ids) == len(set(ann_ids))
    per_image = _annotations_by_image(instances)
    assert set(per_image) == image_ids and all(2 <= len(v) <= 6 for v in per_image.values())
    for ann in instances["annotations"]:
        assert set(ann) == {"id", "image_id", "category_id", "segmentation", "bbox", "area", "iscrowd"}
        assert ann["iscrowd"] == 0 and ann["category_id"] in categories
        assert isinstance(ann["segmentation"], list) and len(ann["segmentation"]) == 1
        poly = ann["segmentation"][0]
        assert len(poly) >= 6 and len(poly) % 2 == 0 and all(isinstance(v, float) for v in poly)
        assert all(0 <= v <= SIZE for v in poly)
        x, y, w, h = ann["bbox"]
        assert all(isinstance(v, float) for v in ann["bbox"]) and w > 0 and h > 0
        assert x >= 0 and y >= 0 and x + w <= SIZE and y + h <= SIZE
        # A visible, non-trivial object: at least ~0.4% of the image.
        assert ann["area"] >= 0.004 * SIZE * SIZE


def test_refs_structure(instances: dict, refs: list[dict]) -> None:
    per_image = _annotations_by_image(instances)
    ann_by_id = {a["id"]: a for a in instances["annotations"]}
    assert isinstance(refs, list) and refs
    sent_ids = [s["sent_id"] for ref in refs for s in ref["sentences"]]
    assert len(sent_ids) == len(set(sent_ids))
    assert len({r["ref_id"] for r in refs}) == len(refs)
    assert len({r["ann_id"] for r in refs}) == len(refs), "one ref per referred object"
    for ref in refs:
        assert set(ref) == {
            "ref_id", "ann_id", "image_id", "category_id", "split", "sent_ids", "file_name", "sentences"
        }  # fmt: skip
        assert all(isinstance(ref[k], int) for k in ("ref_id", "ann_id", "image_id", "category_id"))
        assert ref["split"] in SPLITS
        ann = ann_by_id[ref["ann_id"]]
        assert ann in per_image[ref["image_id"]] and ann["category_id"] == ref["category_id"]
        assert ref["file_name"] == f"COCO_train2014_{ref['image_id']:012d}_{ref['ann_id']}.jpg"
        assert ref["sent_ids"] == [s["sent_id"] for s in ref["sentences"]]
        for s in ref["sentences"]:
            assert set(s) == {"raw", "sent", "sent_id", "tokens"}
            assert isinstance(s["raw"], str) and s["sent"] == s["raw"].lower()
            assert s["tokens"] == s["sent"].split()
        texts = [s["sent"] for s in ref["sentences"]]
        assert len(set(texts)) == len(texts)
    assert np.mean([len(r["sentences"]) >= 2 for r in refs]) > 0.9


def test_splits_by_image(refs: list[dict], dataset: Path) -> None:
    split_of_image: dict[int, set[str]] = defaultdict(set)
    for ref in refs:
        split_of_image[ref["image_id"]].add(ref["split"])
    assert all(len(s) == 1 for s in split_of_image.values())
    counts = {s: sum(v == {s} for v in split_of_image.values()) for s in SPLITS}
    assert counts["train"] == pytest.approx(0.7 * N_IMAGES, abs=2)
    assert all(counts[s] == pytest.approx(0.1 * N_IMAGES, abs=2) for s in ("val", "testA", "testB"))
    report = json.loads((dataset / "synth_report.json").read_text())
    assert {s: v["n_images"] for s, v in report["splits"].items()} == counts


def test_reads_back_through_the_refer_reader(dataset: Path) -> None:
    data = load_refer(dataset, "refcoco", "unc")
    assert data.stored_splits() == list(SPLITS)
    test_refs = data.select("test")
    assert len(test_refs) == len(data.select("testA")) + len(data.select("testB"))
    ref = test_refs[0]
    image = data.images[ref.image_id]
    assert (data.image_dir / image.file_name).is_file()
    mask = rasterize(data.annotations[ref.ann_id].segmentation, image.height, image.width)
    assert mask.shape == (SIZE, SIZE) and mask.sum() > 0


# -------------------------------------------------------------------------------- semantics
def test_every_written_expression_refers_to_exactly_its_object(instances: dict, refs: list[dict]) -> None:
    """Read the written text back (parse), evaluate it on the regenerated scene: one object."""
    per_image = _annotations_by_image(instances)
    kinds: dict[type, int] = defaultdict(int)
    for ref in refs:
        scene = scene_for(SEED, ref["image_id"] - 1, SIZE)
        anns = per_image[ref["image_id"]]
        assert len(anns) == len(scene.objects)
        target = [a["id"] for a in anns].index(ref["ann_id"])
        assert [round(v, 2) for v in scene.objects[target].polygon] == anns[target]["segmentation"][0]
        for s in ref["sentences"]:
            expr = parse(s["sent"])
            kinds[type(expr)] += 1
            assert resolve(expr, scene) == (target,), s["sent"]
    assert set(kinds) == {Attribute, Relation, Ordinal, Superlative}
    assert min(kinds.values()) / sum(kinds.values()) > 0.03


def test_ambiguous_expressions_are_rejected() -> None:
    scene = Scene(
        128,
        (
            _obj("circle", "red", 20, 30),
            _obj("circle", "red", 100, 30),
            _obj("square", "blue", 60, 90),
            _obj("circle", "blue", 62, 40, size="small", r=8),
        ),
    )
    assert resolve(parse("the red circle"), scene) == (0, 1)
    assert resolve(parse("the red circle left of the blue square"), scene) == (0,)
    assert resolve(parse("the leftmost red circle"), scene) == (0,)
    # The small circle's centre is 2 px right of the square's: neither left nor right of it.
    assert resolve(parse("the circle left of the square"), scene) == (0, 3)
    assert resolve(parse("the circle right of the square"), scene) == (1, 3)
    # Equal areas: no largest red circle; a landmark that is not unique names nothing.
    assert resolve(parse("the largest red circle"), scene) == (0, 1)
    assert resolve(parse("the square below the red circle"), scene) == ()
    assert resolve(parse("the square below the small shape"), scene) == (2,)
    assert resolve(parse("the leftmost square"), scene) == ()  # nothing to rank it against
    found = {render(e) for exprs in referring_expressions(scene, 0).values() for e in exprs}
    assert "the red circle left of the square" in found
    assert not found & {"the red circle", "the largest red circle", "the circle left of the square"}
    for texts in (found, {render(e) for v in referring_expressions(scene, 3).values() for e in v}):
        assert all(len(resolve(parse(t), scene)) == 1 for t in texts)


@pytest.mark.parametrize(
    "expr",
    [
        Attribute(Desc("star", "green", "small")),
        Attribute(Desc(None, "red", None)),
        Relation(Desc("circle"), "above", Desc("hexagon", "blue")),
        Ordinal(Desc(None, "yellow"), "bottom", 1),
        Ordinal(Desc("ellipse"), "right", 3),
        Superlative(Desc("triangle", "purple"), "smallest"),
    ],
)
def test_parse_reads_back_render(expr) -> None:
    assert parse(render(expr)) == expr


def test_parse_rejects_foreign_text() -> None:
    with pytest.raises(ValueError, match="not a synthetic referring expression"):
        parse("the man on the left")


def test_scenes_have_distractors(instances: dict, refs: list[dict]) -> None:
    """Most targets share their shape or colour with another object, so one word is not enough."""
    shared = []
    for ref in refs:
        scene = scene_for(SEED, ref["image_id"] - 1, SIZE)
        ann_ids = [a["id"] for a in _annotations_by_image(instances)[ref["image_id"]]]
        t = scene.objects[ann_ids.index(ref["ann_id"])]
        others = [o for o in scene.objects if o is not t]
        shared.append(any(o.shape == t.shape or o.colour == t.colour for o in others))
    assert np.mean(shared) > 0.6


# ----------------------------------------------------------------------- pixels and baselines
def test_polygon_masks_match_rendered_pixels(dataset: Path, instances: dict) -> None:
    image_id = 1
    scene = scene_for(SEED, image_id - 1, SIZE)
    pixels = np.asarray(
        Image.open(dataset / "images/mscoco/images/train2014/COCO_train2014_000000000001.jpg")
    )
    yy, xx = np.mgrid[:SIZE, :SIZE]
    inter = union = 0
    for obj, ann in zip(scene.objects, _annotations_by_image(instances)[image_id], strict=True):
        rle = mask_utils.merge(mask_utils.frPyObjects(ann["segmentation"], SIZE, SIZE))
        mask = mask_utils.decode(rle).astype(bool)
        # Pixels of the object's colour inside its circumscribing circle (no other object there).
        near = np.hypot(xx - obj.cx, yy - obj.cy) <= obj.radius + 2
        drawn = near & (np.abs(pixels.astype(int) - COLOURS[obj.colour]).max(axis=2) < 50)
        i, u = (mask & drawn).sum(), (mask | drawn).sum()
        assert i / u > 0.95, (obj, i / u)
        inter, union = inter + i, union + u
    assert inter / union > 0.98


def test_language_blind_baselines_are_weak(dataset: Path) -> None:
    report = json.loads((dataset / "synth_report.json").read_text())
    assert report["protocol"] == "original-size"
    total = {k: sum(s[k] for s in report["splits"].values()) for k in ("n_refs", "n_expressions")}
    assert total["n_expressions"] >= 2 * total["n_refs"] > 0
    for split in report["splits"].values():
        assert 0 < split["baseline_largest_oiou"] < 0.6
        assert 0 < split["baseline_random_oiou"] < 0.5


# ------------------------------------------------------------------------------------ kinds
def test_kinds_file_names_each_sentence_kind_and_its_words(dataset: Path, refs: list[dict]) -> None:
    entries = json.loads(kinds_path(dataset, "refcoco", "unc").read_text())["sentences"]
    raw_of = {s["sent_id"]: s["raw"] for ref in refs for s in ref["sentences"]}
    assert [e["sent_id"] for e in entries] == sorted(raw_of)
    for entry in entries:
        raw = raw_of[entry["sent_id"]]
        assert entry["kind"] == kind_of(parse(raw)), raw  # the kind the text itself reads as
        assert entry["words"] and all(re.search(rf"\b{w}\b", raw) for w in entry["words"]), (raw, entry)
    assert load_kinds(dataset, "refcoco", "unc") == {e["sent_id"]: e["kind"] for e in entries}
    assert {e["kind"] for e in entries} == set(KINDS)


def test_baselines_per_kind_add_up_and_match_a_recount(
    dataset: Path, instances: dict, refs: list[dict]
) -> None:
    """Per split and kind: the counts are the kinds file's, and the largest-object floor recounted
    from the annotations is the report's."""
    report = json.loads((dataset / "synth_report.json").read_text())
    kind_of_sent = load_kinds(dataset, "refcoco", "unc")
    per_image = _annotations_by_image(instances)
    ann_by_id = {a["id"]: a for a in instances["annotations"]}

    def mask(ann: dict) -> np.ndarray:
        return rasterize(ann["segmentation"], SIZE, SIZE).astype(bool)

    for split, stats in report["splits"].items():
        kinds = stats["kinds"]
        assert sum(k["n_expressions"] for k in kinds.values()) == stats["n_expressions"]
        inter: dict[str, int] = defaultdict(int)
        union: dict[str, int] = defaultdict(int)
        count: dict[str, int] = defaultdict(int)
        for ref in (r for r in refs if r["split"] == split):
            largest = mask(max(per_image[ref["image_id"]], key=lambda a: a["area"]))
            gt = mask(ann_by_id[ref["ann_id"]])
            for sentence in ref["sentences"]:
                kind = kind_of_sent[sentence["sent_id"]]
                count[kind] += 1
                inter[kind] += int((largest & gt).sum())
                union[kind] += int((largest | gt).sum())
        assert {k: v["n_expressions"] for k, v in kinds.items()} == dict(count)
        for kind, values in kinds.items():
            assert values["baseline_largest_oiou"] == pytest.approx(inter[kind] / union[kind], abs=1e-6)
            assert 0 <= values["baseline_random_oiou"] <= 1


def test_a_bad_kinds_file_is_named(tmp_path: Path) -> None:
    assert load_kinds(tmp_path, "refcoco", "unc") is None  # real data has none
    path = kinds_path(tmp_path, "refcoco", "unc")
    path.parent.mkdir(parents=True)
    path.write_text('{"sentences": [{"sent_id": 1}]}')
    with pytest.raises(ReferFormatError, match=r"kinds\(unc\)\.json: not a kinds file"):
        load_kinds(tmp_path, "refcoco", "unc")
    path.write_text('{"sentences": [{"sent_id": 1, "kind": "colour"}]}')
    with pytest.raises(ReferFormatError, match=r"unknown kinds \['colour'\]"):
        load_kinds(tmp_path, "refcoco", "unc")


# ------------------------------------------------------------------------------ determinism
def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_arguments_same_bytes_whatever_the_worker_count(tmp_path: Path) -> None:
    one = synthesize(tmp_path / "one", num_images=24, image_size=96, seed=7, workers=1)
    two = synthesize(tmp_path / "two", num_images=24, image_size=96, seed=7, workers=2)
    assert one.splits == two.splits
    first, second = _tree_bytes(tmp_path / "one"), _tree_bytes(tmp_path / "two")
    assert len(first) == 24 + 4 and first == second
    synthesize(tmp_path / "other", num_images=24, image_size=96, seed=8, workers=1)
    other = _tree_bytes(tmp_path / "other")
    assert other.keys() == first.keys() and other != first


def test_rerun_into_the_same_root_leaves_only_its_own_images(tmp_path: Path) -> None:
    synthesize(tmp_path, num_images=12, image_size=64, seed=0, workers=1)
    synthesize(tmp_path, num_images=10, image_size=64, seed=0, workers=1)
    assert len(list((tmp_path / "images/mscoco/images/train2014").iterdir())) == 10


def test_refuses_to_overwrite_a_real_refer_root(tmp_path: Path) -> None:
    (tmp_path / "refcoco").mkdir()
    (tmp_path / "refcoco" / "instances.json").write_text("{}")
    with pytest.raises(FileExistsError, match="synth did not write"):
        synthesize(tmp_path, num_images=2, workers=1)


def test_bad_arguments_are_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="num_images"):
        synthesize(tmp_path, num_images=0)
    with pytest.raises(ValueError, match="image_size"):
        synthesize(tmp_path, num_images=1, image_size=8)
    with pytest.raises(ValueError, match="seed"):
        synthesize(tmp_path, num_images=1, seed=-1)
    with pytest.raises(ValueError, match="workers"):
        synthesize(tmp_path, num_images=1, workers=0)


def test_command_prints_the_baselines(tmp_path: Path) -> None:
    from pipelines.cli import app

    result = CliRunner().invoke(app, ["synth", "--out", str(tmp_path), "--images", "12", "--workers", "1"])
    assert result.exit_code == 0, result.output
    assert "oIoU largest" in result.output and "original-size" in result.output
    assert {line.split()[0] for line in result.output.splitlines()[2:]} == set(SPLITS)
    assert (tmp_path / "synth_report.json").is_file()
