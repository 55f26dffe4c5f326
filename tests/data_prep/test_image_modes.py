"""Pictures are read as a person looking at them sees them (data_prep.images), by preparation and
by the shard reader alike: a phone photo stored sideways is upright, 16-bit grey is not white,
transparency is white, and a mask with a transparent background is its opaque part. Real files of
each mode are prepared from a folder and from refer data, and read back through magnet.data."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from pictures import BLUE, RED, huge_png, red_over_blue, save_grey16, save_sideways
from PIL import Image
from refer_fixture import IMAGES, build_refer_fixture

from data_prep.contract import MANIFEST, REJECTS
from data_prep.refer import IMAGE_SUBDIR
from data_prep.shards import prepare_dataset
from magnet.data import decode_sample, read_shard

W, H = 40, 30  # the stored size of every folder image (the sideways one shows 30x40)


def _halves(left: tuple[int, ...], right: tuple[int, ...], channels: int) -> np.ndarray:
    pixels = np.zeros((H, W, channels), dtype=np.uint8)
    pixels[:, : W // 2], pixels[:, W // 2 :] = left, right
    return pixels


def _box() -> np.ndarray:
    """The object of the masks with transparency: bool [H, W]."""
    box = np.zeros((H, W), dtype=bool)
    box[5:20, 8:30] = True
    return box


def _build_folder(root: Path) -> list[tuple[str, str, str]]:
    """Write the images and masks; returns the rows (image, mask, expression)."""
    (root / "masks").mkdir(parents=True)
    save_sideways(root / "sideways.jpg", red_over_blue(width=30, height=40))  # stored 40x30
    save_grey16(root / "grey16.png", _grey())
    Image.fromarray(_halves((0, 200, 0, 255), (0, 0, 0, 0), 4), "RGBA").save(root / "cutout.png")
    gif = Image.fromarray(_halves((1,), (0,), 1)[..., 0], "P")
    gif.putpalette([0, 0, 0, *RED] + [0] * 762)
    gif.save(root / "palette.gif", transparency=0)
    Image.fromarray(_halves((255, 0, 0, 0), (255, 0, 0, 0), 4), "CMYK").save(root / "cmyk.jpg", quality=95)

    upright_mask = np.zeros((W, H), dtype=np.uint8)  # [40, 30]: the top half of the upright photo
    upright_mask[: W // 2] = 255
    Image.fromarray(upright_mask, "L").save(root / "masks/upright.png")
    Image.fromarray(_halves((255,), (0,), 1)[..., 0], "L").save(root / "masks/stored.png")  # 40x30
    alpha = np.zeros((H, W, 4), dtype=np.uint8)
    alpha[..., :3] = 255  # white everywhere, opaque only on the object
    alpha[_box(), 3] = 255
    Image.fromarray(alpha, "RGBA").save(root / "masks/alpha.png")
    palette = Image.fromarray(_box().astype(np.uint8), "P")
    palette.putpalette([255, 255, 255] * 2 + [0] * 762)  # index 0 and 1 both white: 0 transparent
    palette.save(root / "masks/palette.png", transparency=0)
    la = np.zeros((H, W, 2), dtype=np.uint8)
    la[..., 0], la[_box(), 1] = 255, 255
    Image.fromarray(la, "LA").save(root / "masks/la.png")
    Image.fromarray(_halves((255,), (0,), 1)[..., 0], "L").save(root / "masks/left.png")
    return [
        ("sideways.jpg", "masks/upright.png", "the red top"),
        ("sideways.jpg", "masks/stored.png", "a mask drawn on the stored pixels"),
        ("grey16.png", "masks/alpha.png", "the grey side"),
        ("cutout.png", "masks/palette.png", "the green half"),
        ("palette.gif", "masks/la.png", "the red half"),
        ("cmyk.jpg", "masks/left.png", "the cyan"),
    ]


def _grey() -> np.ndarray:
    """uint16 [H, W]: 0 on the left half, 40000 on the right (a person sees 40000 / 257 = 156)."""
    values = np.zeros((H, W), dtype=np.uint16)
    values[:, W // 2 :] = 40000
    return values


@pytest.fixture(scope="module")
def folder_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("modes")
    rows = _build_folder(root)
    lines = [json.dumps({"image": i, "mask": m, "expression": e, "split": "train"}) for i, m, e in rows]
    (root / "annotations.jsonl").write_text("\n".join(lines) + "\n")
    return Path(prepare_dataset(root, "modes", "folder", tmp_path_factory.mktemp("out")).out_dir)


def _samples(out: Path) -> dict[str, dict]:
    """expression -> the reader's sample (image at 40x40, the mask at its stored size) and its json."""
    samples = {}
    for shard in sorted(out.glob("*/shard-*.tar")):
        for raw in read_shard(str(shard)):
            meta = json.loads(raw["json"])
            samples[meta["raw"]] = {**decode_sample(raw, 40, 40, keep_orig_mask=True), "meta": meta}
    return samples


def _mean(pixels: np.ndarray) -> np.ndarray:
    return pixels.reshape(-1, pixels.shape[-1]).mean(axis=0)


def test_folder_images_are_read_upright_and_as_shown(folder_out: Path) -> None:
    samples = _samples(folder_out)
    photo = samples["the red top"]
    assert (photo["meta"]["width"], photo["meta"]["height"]) == (30, 40)
    assert photo["orig_mask"].shape == (40, 30) and photo["orig_mask"][:20].all()
    np.testing.assert_allclose(_mean(photo["image"][2:16]), RED, atol=12)  # the top is red
    np.testing.assert_allclose(_mean(photo["image"][24:38]), BLUE, atol=12)
    grey = samples["the grey side"]["image"]
    np.testing.assert_allclose(_mean(grey[:, 22:]), [156] * 3, atol=1)  # not white
    assert grey[:, :18].max() == 0
    cutout = samples["the green half"]["image"]
    np.testing.assert_allclose(_mean(cutout[:, :18]), (0, 200, 0), atol=1)
    np.testing.assert_allclose(_mean(cutout[:, 22:]), (255, 255, 255), atol=1)  # transparent: white
    gif = samples["the red half"]["image"]
    np.testing.assert_allclose(_mean(gif[:, :18]), RED, atol=1)
    np.testing.assert_allclose(_mean(gif[:, 22:]), (255, 255, 255), atol=1)
    np.testing.assert_allclose(_mean(samples["the cyan"]["image"]), (0, 255, 255), atol=3)


def test_masks_with_transparency_are_their_opaque_pixels(folder_out: Path) -> None:
    samples = _samples(folder_out)
    box = _box().astype(np.uint8)
    np.testing.assert_array_equal(samples["the grey side"]["orig_mask"], box)  # RGBA, white everywhere
    np.testing.assert_array_equal(samples["the green half"]["orig_mask"], box)  # palette, tRNS
    np.testing.assert_array_equal(samples["the red half"]["orig_mask"], box)  # LA
    manifest = {r["raw"]: r["mask_area"] for r in pq.read_table(folder_out / MANIFEST).to_pylist()}
    assert manifest["the grey side"] == box.sum()


def test_a_mask_that_fits_only_the_unturned_photo_is_refused_naming_orientation(folder_out: Path) -> None:
    rejects = pq.read_table(folder_out / REJECTS).to_pylist()
    assert [(r["sent_id"], r["reason"]) for r in rejects] == [(2, "unusable_segmentation")]
    assert "mask masks/stored.png is 40x30, the image 30x40: a quarter turn apart" in rejects[0]["detail"]
    assert "EXIF orientation" in rejects[0]["detail"]


def test_refer_images_are_judged_upright_against_instances_json(tmp_path: Path) -> None:
    """COCO-style sizes are the upright ones: a sideways photo whose instances.json size is its
    upright size is written, one whose size is only its stored size is refused naming the turn.
    A picture of too many pixels is refused from its header."""
    root = build_refer_fixture(tmp_path / "refer", tmp_path / "evil")
    image_dir = root / IMAGE_SUBDIR
    (image_dir / IMAGES[2][0]).write_bytes(huge_png(10_000, 9_000))
    name, width, height, _ = IMAGES[3]  # 24x20 in instances.json: stored 20x24, shown upright
    save_sideways(image_dir / name, red_over_blue(width, height))
    name, width, height, _ = IMAGES[8]  # 24x16 in instances.json: stored so, shown 16x24
    (image_dir / name).unlink()
    save_sideways(image_dir / name, red_over_blue(height, width))
    out = Path(prepare_dataset(root, "refcoco", "unc", tmp_path / "out", splits=["train", "testB"]).out_dir)

    rejects = {r["sent_id"]: r for r in pq.read_table(out / REJECTS).to_pylist()}
    assert rejects[22]["reason"] == "image_size_mismatch"
    assert rejects[22]["detail"].startswith(
        f"{IMAGES[8][0]} is 16x24, instances.json says 24x16: a quarter turn apart"
    )
    assert [rejects[i]["reason"] for i in (7, 8, 9)] == ["image_too_large"] * 3  # image 2
    assert rejects[7]["detail"].startswith(f"{IMAGES[2][0]}: too large: 10000x9000 pixels (90.0 MP)")
    written = _samples(out)["the crowd"]  # image 3
    assert written["orig_mask"].shape == (20, 24)
    np.testing.assert_allclose(_mean(written["image"][2:16]), RED, atol=12)


def test_shards_keep_the_original_bytes(folder_out: Path) -> None:
    """The contract: the image member is the file as given (EXIF and all); only formats other
    than JPEG and PNG are stored as the PNG of what they show."""
    samples = {}
    for shard in sorted(folder_out.glob("*/shard-*.tar")):
        for raw in read_shard(str(shard)):
            samples[json.loads(raw["json"])["raw"]] = raw
    photo = Image.open(io.BytesIO(samples["the red top"]["jpg"]))
    assert photo.size == (40, 30) and photo.getexif()[0x0112] == 6
    assert Image.open(io.BytesIO(samples["the red half"]["png"])).mode == "RGB"
