"""Import of the published MagNet checkpoints into our ``paper`` model, and the way back.

The authors of MagNet (arXiv 2312.12198) published evaluation code and one checkpoint per
dataset: ``torch.save({'model': state_dict})`` of their ``WrapperModel`` (``image_model``,
``language_model``, ``classifier``, ``lang_proj``; inventory of every key in
../shared/reference/official_magnet_state_dict.json). Our modules carry the same names, so the
import is a short table of renames (``RENAMES``), not a re-wiring:

- timm's Swin starts stage k with the patch merging the reference keeps at the END of stage
  k-1: ``image_model.layers.{k}.downsample`` -> ``image_model.layers.{k+1}.downsample``;
- our CAM is a module of its stage: ``layers.{k}.pyramids|fusions|mixer`` -> ``layers.{k}.cam.*``;
- ``lang_proj`` (768 -> 256) is used by no inference path: it is the alignment loss's text
  projection onto the decoder's 256-wide mask features, and seeds ours
  (``criterion.alignment.text_proj``, a single Linear with ``alignment.pixel_features=mask_features``,
  the default) when our model has one of that shape, else it is dropped;
- ``relative_position_index`` buffers are derived from the window size (timm does not save
  them): each is checked against the index our model computes, then dropped.

Every other key maps to itself. The import refuses, counting the keys at fault (every one listed in
a file it names), a file in which a tensor finds no place, an inference parameter of ours stays
unfilled, or a shape differs.
Loading uses ``weights_only=True``: a file that needs arbitrary unpickling is refused.

Reproducing the published numbers with imported weights:

    magnet import-weights --checkpoint magnet_refcoco.pth --out ckpt/magnet-refcoco
    magnet prepare --refer-root REFER --dataset refcoco --split-by unc --out shards --mask-mode refer
    magnet evaluate --model ckpt/magnet-refcoco --shards shards/refcoco-unc --split val --split testA

``--mask-mode refer`` rasterises ground truth as the refer toolkit does (polygons summed, overlaps
dropped), as the reference scored itself; the default ``union`` is the correct mask. The model
trained on all datasets takes ``--image-size 448``. ``--no-quirk`` imports for fine-tuning with
the corrected language-side fusion (outputs then differ from the reference's).
"""

from __future__ import annotations

import hashlib
import logging
import re
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from torch import Tensor, nn

from magnet.checkpoint import CONFIG_FILE, MODEL_FILE, CheckpointMeta, ImportRecord, describe_misfit
from magnet.config import Config, load_config
from magnet.models.magnet import TRAINING_ONLY_PREFIX

log = logging.getLogger(__name__)

PUBLISHED_IMAGE_SIZES = (480, 448)
"""Input sizes of the published models: 480 for the per-dataset ones, 448 for the combined-data one."""

POSITION_INDEX_SUFFIX = ".attn.relative_position_index"
"""Swin buffers the reference saves and timm derives from the window size."""

_FIELDS = {"stage": r"\d+", "cam_part": r"pyramids|fusions|mixer", "param": r"weight|bias", "rest": r".+"}
"""What each ``{field}`` of a rename template matches."""


class WeightImportError(ValueError):
    """A published checkpoint that does not fit our model; the message counts the keys at fault, names
    the first few and the file listing them all."""


@dataclass(frozen=True)
class Rename:
    """One key rename between the published layout and ours, usable in both directions.

    Args:
        published: key template in the published checkpoint; ``{stage}``, ``{cam_part}``,
            ``{param}`` and ``{rest}`` are fields (see ``_FIELDS``), copied to the other side.
        ours: the same key in our model.
        stage_shift: added to ``{stage}`` going published -> ours.
        training_only: the tensor feeds a training-only head of ours; without a matching head
            (absent, or another shape) it is dropped, never an error.
    """

    published: str
    ours: str
    stage_shift: int = 0
    training_only: bool = False

    def to_ours(self, key: str) -> str | None:
        return _apply(self.published, self.ours, key, self.stage_shift)

    def to_published(self, key: str) -> str | None:
        return _apply(self.ours, self.published, key, -self.stage_shift)


RENAMES: tuple[Rename, ...] = (
    Rename(
        "image_model.layers.{stage}.downsample.{rest}",
        "image_model.layers.{stage}.downsample.{rest}",
        stage_shift=1,
    ),
    Rename(
        "image_model.layers.{stage}.{cam_part}.{rest}", "image_model.layers.{stage}.cam.{cam_part}.{rest}"
    ),
    Rename("lang_proj.{param}", "criterion.alignment.text_proj.{param}", training_only=True),
)
"""Published -> ours, first match wins; a key no rule matches keeps its name."""


def _template_regex(template: str) -> re.Pattern[str]:
    parts = re.split(r"\{(\w+)\}", template)  # literal, field, literal, field, ...
    return re.compile(
        "".join(
            re.escape(part) if i % 2 == 0 else f"(?P<{part}>{_FIELDS[part]})" for i, part in enumerate(parts)
        )
    )


def _apply(source: str, target: str, key: str, stage_shift: int) -> str | None:
    """``key`` matched against template ``source``, rewritten by template ``target``; None if no match."""
    match = _template_regex(source).fullmatch(key)
    if match is None:
        return None
    fields = match.groupdict()
    if "stage" in fields:
        stage = int(fields["stage"]) + stage_shift
        if stage < 0:
            return None
        fields["stage"] = str(stage)
    return target.format(**fields)


def _rename(key: str, to_ours: bool) -> tuple[str, Rename | None]:
    for rule in RENAMES:
        renamed = rule.to_ours(key) if to_ours else rule.to_published(key)
        if renamed is not None:
            return renamed, rule
    return key, None


# ------------------------------------------------------------------------------------ reading
def read_published(path: str | Path) -> dict[str, Tensor]:
    """The state dict of a published checkpoint: ``{'model': sd}`` or a bare ``sd``.

    Read with ``weights_only=True``: tensors and plain containers only, so a file carrying
    code to run on unpickling is refused instead of executed.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"published checkpoint {path} does not exist")
    try:
        # zip-format files (torch >= 1.6) are memory-mapped: 1.2 GB not copied into RAM first
        loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as err:  # torch raises UnpicklingError, RuntimeError or others by format
        raise WeightImportError(
            f"{path}: refused, not a plain tensor checkpoint (torch.load weights_only=True failed: "
            f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
        ) from None
    state = loaded.get("model", loaded) if isinstance(loaded, Mapping) else loaded
    if not isinstance(state, Mapping):
        raise WeightImportError(
            f"{path}: expected a state dict or {{'model': state_dict}}, got {type(state).__name__}"
        )
    not_tensors = sorted(str(k) for k, v in state.items() if not isinstance(v, Tensor))
    if not_tensors:
        raise WeightImportError(
            f"{path}: {len(not_tensors)} entries are not tensors: {', '.join(not_tensors)}"
        )
    return dict(state)


# ------------------------------------------------------------------------------------ mapping
@dataclass
class ImportReport:
    """What the mapping did with each published tensor.

    Attributes:
        mapped: published key -> our key, for every tensor placed in our model.
        dropped: published key -> why it was not placed (derived buffers, unused training head).
        kept_training_only: our keys of training-only heads filled from the published file.
    """

    mapped: dict[str, str] = field(default_factory=dict)
    dropped: dict[str, str] = field(default_factory=dict)
    kept_training_only: list[str] = field(default_factory=list)


def _expected_position_index(model: nn.Module, our_key: str) -> Tensor | None:
    """The relative_position_index our block would compute (None if there is no such block)."""
    from timm.models.swin_transformer import get_relative_position_index

    try:
        attn = model.get_submodule(our_key[: -len(".relative_position_index")])
    except AttributeError:
        return None
    window = getattr(attn, "window_size", None)
    return None if window is None else get_relative_position_index(*window)


def published_to_ours(
    published: Mapping[str, Tensor], model: nn.Module
) -> tuple[dict[str, Tensor], ImportReport]:
    """Map a published state dict onto ``model``'s keys, checking everything first.

    ``model`` may live on the meta device: only its keys, shapes and window sizes are read.

    Returns:
        (our key -> published tensor, report). Every inference parameter of ``model`` is in it;
        training-only ones only where the published file has a match.

    Raises:
        WeightImportError: counting (and listing in a file) every published key without a place,
            every inference key of ours left unfilled, every shape that differs and every wrong
            position index.
    """
    ours = model.state_dict()
    report = ImportReport()
    out: dict[str, Tensor] = {}
    source_of: dict[str, str] = {}
    extra, misshapen, bad_index, collisions = [], [], [], []
    for key, value in published.items():
        if key.endswith(POSITION_INDEX_SUFFIX):
            our_key, _ = _rename(key, to_ours=True)
            expected = _expected_position_index(model, our_key)
            if expected is None:
                extra.append(
                    f"{key} (no Swin block {our_key.removesuffix('.relative_position_index')} in our model)"
                )
            elif value.shape != expected.shape or not torch.equal(value.to(expected.dtype), expected):
                bad_index.append(
                    f"{key} (shape {list(value.shape)}, ours {list(expected.shape)} for its window)"
                )
            else:
                report.dropped[key] = "derived buffer, equal to ours"
            continue
        our_key, rule = _rename(key, to_ours=True)
        optional = rule is not None and rule.training_only
        if our_key not in ours:
            if optional:
                report.dropped[key] = f"our model has no {our_key} (training-only head)"
            else:
                extra.append(key if our_key == key else f"{key} (-> {our_key})")
            continue
        if tuple(value.shape) != tuple(ours[our_key].shape):
            shapes = f"{list(value.shape)}, ours {our_key} {list(ours[our_key].shape)}"
            if optional:
                report.dropped[key] = f"shape {shapes} (training-only head of another size)"
            else:
                misshapen.append(f"{key} (published {shapes})")
            continue
        if value.is_floating_point() != ours[our_key].is_floating_point():
            misshapen.append(f"{key} (dtype {value.dtype}, ours {ours[our_key].dtype})")
            continue
        if our_key in source_of:
            collisions.append(f"{key} and {source_of[our_key]} -> {our_key}")
            continue
        source_of[our_key] = key
        out[our_key] = value
        report.mapped[key] = our_key
        if optional:
            report.kept_training_only.append(our_key)
    missing = sorted(k for k in ours if k not in out and not k.startswith(TRAINING_ONLY_PREFIX))
    problems = {
        "inference parameters of our model not filled": missing,
        "published tensors without a place in our model": sorted(extra),
        "tensors of another shape or dtype": sorted(misshapen),
        "relative_position_index buffers unlike ours": sorted(bad_index),
        "published tensors mapped to the same key": sorted(collisions),
    }
    if any(problems.values()):  # summarised: a file of another model names a thousand keys or more
        raise WeightImportError(describe_misfit("published checkpoint", problems))
    return out, report


def ours_to_published(state_dict: Mapping[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """Our state dict in the published layout (the inverse of ``published_to_ours``).

    Training-only tensors are left out except those a rename maps back (``lang_proj``); the
    Swin ``relative_position_index`` buffers are added from ``model``'s window sizes, so the
    result loads into the reference model when every published tensor has a source.
    """
    out: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        published_key, rule = _rename(key, to_ours=False)
        if key.startswith(TRAINING_ONLY_PREFIX) and rule is None:
            continue
        out[published_key] = value
    for name, module in model.named_modules():
        if hasattr(module, "relative_position_index") and hasattr(module, "window_size"):
            published_key, _ = _rename(f"{name}.relative_position_index", to_ours=False)
            out[published_key] = _expected_position_index(model, f"{name}.relative_position_index")
    return out


# ------------------------------------------------------------------------------------- import
def imported_config(image_size: int = 480, reference_mask_quirk: bool = True) -> Config:
    """The ``paper`` config of an imported model: its input size, the reference's mask quirk,
    float32 (the reference ran in float32, and its quirk's huge additive constants need it; also
    what ``magnet evaluate`` then uses on GPU), and no pretrained backbone or text weights to fetch
    (the checkpoint holds every weight). Fine-tuning may set ``train.precision=bf16`` again."""
    if image_size not in PUBLISHED_IMAGE_SIZES:
        raise ValueError(f"image_size {image_size}: the published models take {PUBLISHED_IMAGE_SIZES}")
    return load_config(
        "paper",
        [
            f"model.image_size={image_size}",
            f"model.fusion.reference_mask_quirk={str(reference_mask_quirk).lower()}",
            "model.vision.pretrained=null",
            "model.text.pretrained=false",
            "train.precision=fp32",
        ],
    )


def _sha256(path: Path) -> str:
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def import_published(
    checkpoint: str | Path,
    out: str | Path,
    image_size: int = 480,
    reference_mask_quirk: bool = True,
) -> Path:
    """Read a published MagNet checkpoint, load it strictly into our ``paper`` model and write
    our checkpoint directory (``model.pt``, ``config.yaml``, ``meta.json``; see magnet.checkpoint),
    which ``magnet.checkpoint.load_model_from_checkpoint`` loads.

    Training-only heads the published file has no weights for keep their fresh initialisation
    (seeded, so two imports write the same bytes).

    Args:
        checkpoint: the published ``.pth`` file.
        out: directory to write (created).
        image_size: 480, or 448 for the model trained on all datasets.
        reference_mask_quirk: reproduce the reference's language-side mask (on for exact outputs).
    """
    from magnet.models import build_model

    checkpoint, out = Path(checkpoint), Path(out)
    cfg = imported_config(image_size, reference_mask_quirk)
    published = read_published(checkpoint)
    published_to_ours(published, build_model(cfg.model, "meta"))  # refuse a misfit before building for real
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model)
    mapped, report = published_to_ours(published, model)
    state = model.state_dict()
    state.update(mapped)
    model.load_state_dict(state, strict=True)
    del published, mapped, state
    for key, why in report.dropped.items():
        if not key.endswith(POSITION_INDEX_SUFFIX):
            log.info("dropped %s: %s", key, why)
    kept = ", ".join(report.kept_training_only) or "none"
    log.info(
        "imported %d published tensors from %s; %d relative_position_index buffers checked and dropped; "
        "training-only tensors kept: %s",
        len(report.mapped),
        checkpoint,
        sum(k.endswith(POSITION_INDEX_SUFFIX) for k in report.dropped),
        kept,
    )
    out.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), out / MODEL_FILE)
    (out / CONFIG_FILE).write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    imported_from = ImportRecord(
        file=str(checkpoint.resolve()),
        sha256=_sha256(checkpoint),
        tensors_mapped=len(report.mapped),
        dropped=report.dropped,
        training_only_kept=tuple(report.kept_training_only),
    )
    CheckpointMeta(step=0, epoch=0, world_size=1, imported_from=imported_from).write(out)
    return out
