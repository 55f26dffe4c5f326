"""MagNet: Mask Grounding for Referring Image Segmentation (Chng et al., CVPR 2024, arXiv 2312.12198).

Built on LAVT (Yang et al., CVPR 2022): a Swin image encoder and a BERT text encoder run side by
side in four stages and exchange information after every stage (pixel-word attention with tanh
gates on both sides); MagNet adds the cross-modal alignment module (CAM) per stage, a
Mask2Former-style decoder, and two training-only objectives (Mask Grounding and the cross-modal
alignment loss). Swin stages come from timm and BERT layers from transformers; only the fusion
between them is written here (``fusion.py``). See ../shared/design/magnet-architecture.md.

Names follow the published checkpoint (``image_model``, ``language_model``, ``classifier``), so
``magnet.weights`` maps it with two renames. The differences, by design: timm's Swin stage k
starts with the patch merging that the reference keeps at the end of stage k-1
(``layers.{k-1}.downsample`` -> ``layers.{k}.downsample``), and the CAM of a stage sits under
``layers.{k}.cam`` instead of directly on the stage. Training-only weights (the Mask Grounding
head, the alignment-loss projections) live under ``criterion`` and never enter inference
weights (``inference_state_dict``).

Legend: B batch, S_h x S_w input size, H_k x W_k grid of stage k (S/4, S/8, S/16, S/32),
C_k channels of stage k, L expression ids, D text width.
"""

from __future__ import annotations

import itertools
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from timm.layers import PatchEmbed, trunc_normal_
from timm.models.swin_transformer import (
    SwinTransformerBlock,
    SwinTransformerStage,
    window_partition,
    window_reverse,
)
from torch import Tensor, nn
from transformers import BertConfig, BertModel
from transformers.utils import logging as hf_logging

from magnet.config import ModelConfig
from magnet.models.criterion import AlignmentInputs, MagNetCriterion, MaskGroundingInputs
from magnet.models.decoders import build_decoder
from magnet.models.fusion import (
    PADDING_BIAS,
    PWAM,
    CrossModalAlignment,
    LanguageFusion,
    tanh_gate,
    zero_gate_,
)
from magnet.models.mask_grounding import mask_tokens

log = logging.getLogger(__name__)

TRAINING_ONLY_PREFIX = "criterion."
"""State-dict prefix of every training-only parameter (Mask Grounding head, CAL projections)."""

NO_GRADIENT_BY_DESIGN = (
    "classifier.predictor.class_embed.",
    "image_model.layers.3.res_gate.",
    "language_model.norms.",
)
"""Parameters kept only so the published checkpoint loads as it is, which no loss reaches: the
decoder's class head (MagNet's loss ignores it), the last stage's vision gate (its main path feeds
no further stage) and the language-side norms (the reference normalises only a residual it never
uses at inference). With the CAM on, the backbone's output norms ``image_model.norm0..3`` join
them (``MagNet.no_gradient_by_design``). DDP therefore runs with find_unused_parameters."""

OUTPUT_NORMS_PREFIX = "image_model.norm"
"""The backbone's per-stage output norms: applied by LAVT (no CAM), never by MagNet's forward."""

SWIN_KEY = re.compile(r"patch_embed\.|layers\.\d+\.(blocks|downsample)\.")
"""Parameters of the image side that are plain Swin (timm names), i.e. what pretrained weights fill."""

PRETRAINED_TEXT_KEY = re.compile(r"language_model\.(embeddings|encoder)\.")
"""Parameters of the text side that pretrained BERT weights fill (its fusion layers are new)."""

PARTS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("vision", re.compile(r"image_model\.(patch_embed|layers\.\d+\.(blocks|downsample))\.")),
    ("vision_fusion", re.compile(r"image_model\.layers\.\d+\.(fusion|res_gate)\.")),
    ("cam", re.compile(r"image_model\.layers\.\d+\.cam\.")),
    ("text", re.compile(r"language_model\.(embeddings|encoder)\.")),
    ("text_fusion", re.compile(r"language_model\.")),
    ("decoder", re.compile(r"classifier\.")),
    ("mask_grounding", re.compile(r"criterion\.mask_grounding\.")),
    ("alignment", re.compile(r"criterion\.alignment\.")),
)
"""The model's parts by parameter name, first match wins: what the per-part gradient norms
(``train/grad_norm/<part>``) and learning diagnostics group by. ``other`` takes the rest."""


def part_of(name: str) -> str:
    """The part (``PARTS``) a parameter name belongs to, or ``other``."""
    return next((part for part, pattern in PARTS if pattern.match(name)), "other")


KNOWN_TEXT_CONFIGS: dict[str, dict[str, int]] = {
    "bert-base-uncased": {},
    "google-bert/bert-base-uncased": {},
    "google/bert_uncased_l-6_h-128_a-2": {
        "num_hidden_layers": 6,
        "hidden_size": 128,
        "num_attention_heads": 2,
        "intermediate_size": 512,
    },
}
"""Text encoders whose config is known without a download: BertConfig's defaults ARE
bert-base-uncased; the 6-layer, 128-wide Google BERT miniature (5 M parameters, the same vocabulary)
is a quick random one for tests and smoke runs (``text.pretrained: false``; its weights are on the hub)."""


@dataclass
class MagNetOutput:
    """What ``MagNet.forward`` returns (DEVELOPERS.md, model contract).

    Attributes:
        mask_logits: [B, 1, S_h/4, S_w/4] final mask logits.
        aux_mask_logits: earlier decoder predictions, each [B, 1, S_h/4, S_w/4] (deep supervision).
        losses: with a target mask, ``loss``, ``bce``, ``dice``, ``seg``, ``mg``, ``cal`` scalars.
    """

    mask_logits: Tensor
    aux_mask_logits: list[Tensor]
    losses: dict[str, Tensor] | None = None


@dataclass
class EncoderOutput:
    """The two encoders after the four fused stages.

    Attributes:
        features: what the decoder sees, four maps [B, C_k, H_k, W_k] (strides 4, 8, 16, 32).
        words: [B, L, D] language features after the last stage.
    """

    features: list[Tensor]
    words: Tensor


# ------------------------------------------------------------------------------------ blocks
class PadThenShiftBlock(SwinTransformerBlock):
    """timm's Swin block with the reference's order on grids that are not a window multiple:
    pad (bottom / right) first, then roll and mask on the padded grid; timm rolls the unpadded
    grid, then pads, which mixes other pixels into the shifted windows (stage 3 and 4 at 480,
    every stage at 448)."""

    def _attn(self, x: Tensor) -> Tensor:
        """x [B, H, W, C] -> [B, H, W, C]."""
        _, height, width, channels = x.shape
        win_h, win_w = self.window_size
        pad_h, pad_w = (win_h - height % win_h) % win_h, (win_w - width % win_w) % win_w
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))  # [B, Hp, Wp, C]
        shifted = any(self.shift_size)
        if shifted:
            x = torch.roll(x, shifts=(-self.shift_size[0], -self.shift_size[1]), dims=(1, 2))
        padded_h, padded_w = x.shape[1:3]
        windows = window_partition(x, self.window_size).view(-1, self.window_area, channels)  # [B*nW, N, C]
        windows = self.attn(windows, mask=self.get_attn_mask(x))  # mask of the padded grid
        x = window_reverse(windows.view(-1, win_h, win_w, channels), self.window_size, padded_h, padded_w)
        if shifted:
            x = torch.roll(x, shifts=self.shift_size, dims=(1, 2))
        return x[:, :height, :width, :].contiguous()


class MultiModalStage(SwinTransformerStage):
    """One Swin stage of timm (patch merging, then blocks) followed by MagNet's vision-side fusion.

    The stage's pixels read the words (``fusion``, PWAM) into a multimodal residual that enters
    the main path through a tanh gate (``res_gate``, zero at init: the main path starts as plain
    Swin). The decoder gets the CAM output (``cam``) or, with the CAM off, the residual itself
    (LAVT).

    Args:
        dim: channels entering the stage (C_{k-1}; the patch embedding's for stage 1).
        out_dim: C_k, channels of the stage.
        input_resolution: grid the stage is built for (any grid runs: masks are computed per call).
        depth: Swin blocks.
        num_heads: attention heads.
        window_size: Swin window; always partitioned, padded when the grid is not a multiple,
            as the reference's Swin (timm would otherwise shrink it on small grids).
        word_dim: D, width of the words.
        downsample: patch merging at the start (every stage but the first).
        mlp_ratio: Swin MLP width ratio.
        drop_path: stochastic depth per block.
        use_cam: build the cross-modal alignment module.
        cam_pool_sizes: its pyramid pooling sizes.
    """

    def __init__(
        self,
        dim: int,
        out_dim: int,
        input_resolution: tuple[int, int],
        depth: int,
        num_heads: int,
        window_size: int,
        word_dim: int,
        downsample: bool,
        mlp_ratio: float,
        drop_path: list[float],
        use_cam: bool,
        cam_pool_sizes: tuple[int, ...],
    ) -> None:
        super().__init__(
            dim=dim,
            out_dim=out_dim,
            input_resolution=input_resolution,
            depth=depth,
            downsample=downsample,
            num_heads=num_heads,
            window_size=window_size,
            always_partition=True,
            dynamic_mask=True,
            mlp_ratio=mlp_ratio,
            drop_path=drop_path,
        )
        for block in self.blocks:
            # timm's stage takes no block class: swap it in (same parameters and state dict).
            block.__class__ = PadThenShiftBlock
        self.fusion = PWAM(out_dim, word_dim)
        self.res_gate = tanh_gate(out_dim, nn.GELU)
        self.cam = CrossModalAlignment(out_dim, word_dim, cam_pool_sizes) if use_cam else None

    def forward(self, x: Tensor, words: Tensor, word_mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x [B, H_{k-1}, W_{k-1}, C_{k-1}], words [B, L, D], word_mask [B, L].

        Returns:
            (main path [B, H_k, W_k, C_k] for the next stage, Swin output before the gate
            [B, H_k, W_k, C_k] for the language side, decoder feature [B, H_k, W_k, C_k]).
        """
        pixels = super().forward(x)  # [B, H, W, C]: merging + Swin blocks (timm)
        batch, height, width, channels = pixels.shape
        residual = self.fusion(pixels.reshape(batch, height * width, channels), words, word_mask)  # [B, N, C]
        residual = residual.reshape(batch, height, width, channels)
        main = pixels + self.res_gate(residual) * residual
        out = residual if self.cam is None else self.cam(pixels, residual, words, word_mask)
        return main, pixels, out


class MultiModalSwin(nn.Module):
    """The image side: timm's patch embedding, four fused stages and per-stage output norms.

    Parameter names are timm's SwinTransformer ones (``patch_embed``, ``layers.k.blocks``,
    ``layers.k.downsample``), so timm / ImageNet checkpoints load as they are; ``norm0..3``
    normalise what the decoder sees only without the CAM (LAVT); see ``decoder_feature``.

    Args:
        cfg: the model config (vision sizes and fusion switches).
        word_dim: D, width of the words.
    """

    def __init__(self, cfg: ModelConfig, word_dim: int) -> None:
        super().__init__()
        v = cfg.vision
        self.patch_embed = PatchEmbed(
            img_size=cfg.image_size,
            patch_size=v.patch_size,
            in_chans=3,
            embed_dim=v.embed_dim,
            norm_layer=nn.LayerNorm,
            output_fmt="NHWC",
            strict_img_size=False,
            dynamic_img_pad=True,
        )
        self.channels = tuple(v.embed_dim * 2**k for k in range(4))
        blocks = sum(v.depths)
        rates = [v.drop_path_rate * i / max(blocks - 1, 1) for i in range(blocks)]  # linear, as timm
        layers = []
        for k in range(4):
            grid = max(cfg.image_size // (v.patch_size * 2**k), 1)
            layers.append(
                MultiModalStage(
                    dim=self.channels[max(k - 1, 0)],
                    out_dim=self.channels[k],
                    input_resolution=(grid, grid),
                    depth=v.depths[k],
                    num_heads=v.num_heads[k],
                    window_size=v.window_size,
                    word_dim=word_dim,
                    downsample=k > 0,
                    mlp_ratio=v.mlp_ratio,
                    drop_path=rates[sum(v.depths[:k]) : sum(v.depths[: k + 1])],
                    use_cam=cfg.fusion.use_cam,
                    cam_pool_sizes=cfg.fusion.cam_pool_sizes,
                )
            )
        self.layers = nn.ModuleList(layers)
        for k, channels in enumerate(self.channels):
            self.add_module(f"norm{k}", nn.LayerNorm(channels))
        self.use_cam = cfg.fusion.use_cam

    def decoder_feature(self, k: int, out: Tensor) -> Tensor:
        """Stage k's output [B, H_k, W_k, C_k] as the decoder sees it, [B, C_k, H_k, W_k].

        MagNet hands the decoder the CAM mixer output as it is: ``norm0..3`` are in the published
        checkpoint but its forward never applies them (reference-forward.md, point 6; applying
        them moves the logits by 3e-1 to 9e-1). LAVT, the model without the CAM, normalises the
        fused residual with them, as its own code does.
        """
        if not self.use_cam:
            out = getattr(self, f"norm{k}")(out)
        return out.permute(0, 3, 1, 2)


class FusedLanguageModel(nn.Module):
    """The text side: BERT (transformers) split into four layer groups, each followed by fusion.

    After group k the words read the stage-k pixels (``pwams[k]``, language-side PWAM), and the
    result enters through a tanh gate (``res_gates[k]``, zero at init) and a LayerNorm
    (``norms[k]``): ``words = norm(words + gate(res) * res)``.

    Args:
        bert: a BertModel without pooler; its ``embeddings`` and ``encoder`` are kept as they are.
        pixel_channels: C_k of the four stages.
        layers_per_stage: BERT layers in each group (sums to the model's layer count).
        reference_mask_quirk: hand the fusion BERT's additive mask, as the published model does.
    """

    def __init__(
        self,
        bert: BertModel,
        pixel_channels: tuple[int, ...],
        layers_per_stage: tuple[int, int, int, int],
        reference_mask_quirk: bool = False,
    ) -> None:
        super().__init__()
        self.embeddings = bert.embeddings
        self.encoder = bert.encoder
        width = bert.config.hidden_size
        self.pwams = nn.ModuleList(LanguageFusion(width, channels) for channels in pixel_channels)
        self.res_gates = nn.ModuleList(tanh_gate(width, nn.ReLU) for _ in pixel_channels)
        self.norms = nn.ModuleList(nn.LayerNorm(width) for _ in pixel_channels)
        ends = list(itertools.accumulate(layers_per_stage))
        self.groups = [range(end - n, end) for n, end in zip(layers_per_stage, ends, strict=True)]
        self.reference_mask_quirk = reference_mask_quirk

    def fusion_mask(self, attention_mask: Tensor) -> Tensor:
        """[B, L] 0/1 -> the mask the language fusion multiplies queries with (float32)."""
        mask = attention_mask.float()
        return (1.0 - mask) * PADDING_BIAS if self.reference_mask_quirk else mask

    def run_group(self, k: int, words: Tensor, attend: Tensor) -> Tensor:
        """BERT layer group k: words [B, L, D], attend [B, 1, 1, L] bool -> [B, L, D]."""
        for index in self.groups[k]:
            words = self.encoder.layer[index](words, attend)
        return words

    def fuse(self, k: int, words: Tensor, pixels: Tensor, fusion_mask: Tensor) -> Tensor:
        """words [B, L, D] read the stage-k pixels [B, H, W, C] -> [B, L, D]."""
        residual = self.pwams[k](words, pixels.flatten(1, 2), fusion_mask)  # [B, L, D]
        return words + self.res_gates[k](residual) * residual


# ------------------------------------------------------------------------------------- model
class MagNet(nn.Module):
    """Referring image segmentation: image + expression -> mask logits at 1/4 of the input.

    Args:
        cfg: the model config.
        bert: the text encoder (see ``build_text_encoder``).
        special_ids: token ids Mask Grounding never masks ([PAD], [UNK], [CLS], [SEP], [MASK]).
        mask_token_id: the [MASK] id.
    """

    def __init__(self, cfg: ModelConfig, bert: BertModel, special_ids: list[int], mask_token_id: int) -> None:
        super().__init__()
        self.cfg = cfg
        word_dim = bert.config.hidden_size
        self.image_model = MultiModalSwin(cfg, word_dim)
        self.language_model = FusedLanguageModel(
            bert,
            self.image_model.channels,
            split_layers(bert.config.num_hidden_layers, cfg.text.layers_per_stage),
            cfg.fusion.reference_mask_quirk,
        )
        self.classifier = build_decoder(self.image_model.channels, cfg.decoder)
        word_embeddings = self.language_model.embeddings.word_embeddings
        cal_pixel_dim = (
            self.classifier.mask_feature_dim
            if cfg.alignment.pixel_features == "mask_features"
            else self.image_model.channels[0]
        )
        self.criterion = MagNetCriterion(
            cfg.loss,
            cfg.mask_grounding,
            cfg.alignment,
            text_dim=word_dim,
            word_embeddings=word_embeddings,
            mg_visual_dim=self.image_model.channels[-1],
            cal_pixel_dim=cal_pixel_dim,
        )
        self.register_buffer("special_ids", torch.tensor(special_ids, dtype=torch.long), persistent=False)
        self.mask_token_id = mask_token_id
        self.vocab_size = word_embeddings.num_embeddings

    # ------------------------------------------------------------------------------ init
    def init_weights(self) -> None:
        """Fusion and CAM like timm's Swin (truncated normal 0.02), then every gate to zero.

        The gates are zeroed last, after any other init or pretrained load, so the fused paths
        start exactly as the plain encoders (the reference's init overwrote its zero gates).
        """
        fusion_modules = [self.language_model.pwams, self.language_model.res_gates]
        for stage in self.image_model.layers:
            fusion_modules += [stage.fusion, stage.res_gate] + ([stage.cam] if stage.cam is not None else [])
        for module in fusion_modules:
            module.apply(_init_linear)
        self.zero_gates()

    def zero_gates(self) -> None:
        for stage in self.image_model.layers:
            zero_gate_(stage.res_gate)
        for gate in self.language_model.res_gates:
            zero_gate_(gate)

    # ---------------------------------------------------------------------------- forward
    def encode(self, image: Tensor, input_ids: Tensor, attention_mask: Tensor) -> EncoderOutput:
        """image [B, 3, S_h, S_w], input_ids / attention_mask [B, L] -> the fused encoders' outputs."""
        language = self.language_model
        attend = attention_mask.bool()[:, None, None, :]  # [B, 1, 1, L] for BERT's SDPA
        word_mask = attention_mask.to(image.dtype)  # [B, L] 0/1 for the vision-side fusions
        fusion_mask = language.fusion_mask(attention_mask)
        x = self.image_model.patch_embed(image)  # [B, S_h/4, S_w/4, C_0]
        words = language.embeddings(input_ids=input_ids)  # [B, L, D]
        features = []
        for k, stage in enumerate(self.image_model.layers):
            words = language.run_group(k, words, attend)
            x, pixels, out = stage(x, words, word_mask)  # each [B, H_k, W_k, C_k]
            words = language.fuse(k, words, pixels, fusion_mask)
            features.append(self.image_model.decoder_feature(k, out))  # [B, C_k, H_k, W_k]
        return EncoderOutput(features=features, words=words)

    def forward(
        self, image: Tensor, input_ids: Tensor, attention_mask: Tensor, target_mask: Tensor | None = None
    ) -> MagNetOutput:
        """Args:
        image: [B, 3, S_h, S_w] ImageNet-normalised.
        input_ids: [B, L] int64 token ids.
        attention_mask: [B, L] 1 on real tokens.
        target_mask: [B, S_h, S_w] ground truth in {0, 1}; given, the losses are computed
            (Mask Grounding only in training mode).

        With Mask Grounding on, words are masked first and the predictor's tokens come from a fused
        pass on the masked ids (``cfg.mask_grounding.encoder_pass``): ``shared`` segments from that
        same pass, ``separate`` segments from a pass on the original ids.
        """
        grounding = target_mask is not None and self.training and self.criterion.mask_grounding is not None
        masked_ids = labels = None
        if grounding:
            masked_ids, labels = mask_tokens(
                input_ids,
                attention_mask,
                self.special_ids,
                self.mask_token_id,
                self.vocab_size,
                self.cfg.mask_grounding,
            )
        shared = grounding and self.cfg.mask_grounding.encoder_pass == "shared"
        enc = self.encode(image, masked_ids if shared else input_ids, attention_mask)
        dec = self.classifier(enc.features)
        if target_mask is None:
            return MagNetOutput(dec.mask_logits, list(dec.aux_mask_logits))
        mg = cal = None
        if grounding:
            masked = enc if shared else self.encode(image, masked_ids, attention_mask)
            mg = self._mask_grounding_inputs(masked, attention_mask, labels)
        if self.criterion.alignment is not None:
            on_mask_features = self.cfg.alignment.pixel_features == "mask_features"
            pixels = dec.mask_features if on_mask_features else enc.features[0]  # [B, C_cal, S_h/4, S_w/4]
            cal = AlignmentInputs(pixels, enc.words, attention_mask)
        losses = self.criterion(dec.mask_logits, dec.aux_mask_logits, target_mask, mg, cal)
        return MagNetOutput(dec.mask_logits, list(dec.aux_mask_logits), losses)

    def _mask_grounding_inputs(
        self, masked: EncoderOutput, attention_mask: Tensor, labels: Tensor
    ) -> MaskGroundingInputs:
        """The predictor's inputs from a fused pass on the masked ids: its final words and its last
        stage, so no token has seen the words to recover (a pass on the original ids fuses them
        into the image side, and the answer could be read off the visual tokens)."""
        return MaskGroundingInputs(
            text_features=masked.words,
            attention_mask=attention_mask,
            visual_features=masked.features[-1],
            labels=labels,
            word_embeddings=self.language_model.embeddings.word_embeddings.weight,
        )

    # ----------------------------------------------------------------------------- weights
    def no_gradient_by_design(self) -> tuple[str, ...]:
        """Prefixes of the parameters no loss reaches in this configuration (see NO_GRADIENT_BY_DESIGN)."""
        return NO_GRADIENT_BY_DESIGN + ((OUTPUT_NORMS_PREFIX,) if self.cfg.fusion.use_cam else ())

    def inference_state_dict(self) -> dict[str, Tensor]:
        """The state dict without training-only weights (Mask Grounding head, CAL projections)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith(TRAINING_ONLY_PREFIX)}

    def parameter_counts(self) -> dict[str, int]:
        """Parameters per part; ``inference`` excludes the training-only heads."""

        def count(module: nn.Module) -> int:
            return sum(p.numel() for p in module.parameters())

        counts = {
            "vision_fusion_cam": count(self.image_model),
            "language_fusion": count(self.language_model),
            "decoder": count(self.classifier),
            "training_only": count(self.criterion),
        }
        counts["inference"] = counts["vision_fusion_cam"] + counts["language_fusion"] + counts["decoder"]
        counts["total"] = counts["inference"] + counts["training_only"]
        return counts


def _init_linear(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


# --------------------------------------------------------------------------------- builders
def split_layers(
    num_layers: int, layers_per_stage: tuple[int, int, int, int] | None
) -> tuple[int, int, int, int]:
    """BERT layers per stage: as given (must sum to ``num_layers``), or as even as possible
    with the remainder on the early stages (12 -> 3,3,3,3; 6 -> 2,2,1,1)."""
    if layers_per_stage is None:
        base, extra = divmod(num_layers, 4)
        return tuple(base + (k < extra) for k in range(4))  # type: ignore[return-value]
    if sum(layers_per_stage) != num_layers:
        raise ValueError(
            f"text.layers_per_stage {tuple(layers_per_stage)} sums to {sum(layers_per_stage)}, "
            f"but the text encoder has {num_layers} layers"
        )
    return tuple(layers_per_stage)  # type: ignore[return-value]


def text_encoder_config(name_or_path: str) -> BertConfig:
    """The BERT config of the text encoder: a known name or a local directory offline, another hub
    name from the Hugging Face cache, or from the hub when it is not there."""
    from data_prep.tokenize import from_local_or_hub, resolve_text_model

    source = resolve_text_model(name_or_path)
    if source.lower() in KNOWN_TEXT_CONFIGS:
        config = BertConfig(**KNOWN_TEXT_CONFIGS[source.lower()])
    else:
        config = from_local_or_hub(BertConfig.from_pretrained, source)
    config._attn_implementation = "sdpa"
    return config


def build_text_encoder(cfg: ModelConfig, load_pretrained: bool) -> BertModel:
    """BERT without pooler: pretrained weights of ``text.name_or_path`` or random ones."""
    from data_prep.tokenize import from_local_or_hub, resolve_text_model

    if load_pretrained and cfg.text.pretrained:
        source = resolve_text_model(cfg.text.name_or_path)
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # its load report lists the pooler we leave out on purpose
        try:
            bert, info = from_local_or_hub(
                BertModel.from_pretrained,
                source,
                add_pooling_layer=False,
                attn_implementation="sdpa",
                output_loading_info=True,
            )
        finally:
            hf_logging.set_verbosity(verbosity)
        if info["missing_keys"]:
            raise ValueError(
                f"text.name_or_path {source}: checkpoint lacks {len(info['missing_keys'])} BERT weights, "
                f"e.g. {sorted(info['missing_keys'])[:3]}"
            )
        log.info("text encoder: pretrained weights from %s", source)
        return bert
    bert = BertModel(text_encoder_config(cfg.text.name_or_path), add_pooling_layer=False)
    log.info("text encoder: random init (%s config)", cfg.text.name_or_path)
    return bert


SHIPPED_VISION_DIR = Path(__file__).resolve().parent.parent / "pretrained"
"""Swin weights that ship with the project (``<name>.pt`` + ``<name>.json``, how each was made):
``vision.pretrained: <name>`` loads one, as a timm name loads ImageNet weights."""


def shipped_vision_weights(source: str) -> Path | None:
    """The shipped weights file a ``vision.pretrained`` name stands for, or None."""
    candidate = SHIPPED_VISION_DIR / f"{source}.pt"
    return candidate if "/" not in source and candidate.is_file() else None


def load_pretrained_vision(image_model: MultiModalSwin, source: str) -> None:
    """Swin weights from a local checkpoint file, a shipped name (``SHIPPED_VISION_DIR``) or a timm
    hub name (network or HF cache).

    The file may hold a timm state dict or an original Swin one (``{'model': ...}``, patch
    merging at the end of each stage); timm's own converter renames the latter and resizes
    relative-position tables to our window. Only Swin parameters are loaded (all of them, or an
    error); fusion, CAM and output norms keep their init.
    """
    import timm
    from timm.models.swin_transformer import checkpoint_filter_fn as swin_filter_fn

    shipped = shipped_vision_weights(source)
    if Path(source).is_file() or shipped:
        state = torch.load(shipped or source, map_location="cpu", weights_only=True)
        origin = f"shipped weights {shipped}" if shipped else f"local file {source}"
    else:
        state = timm.create_model(source, pretrained=True, num_classes=0).state_dict()
        origin = f"timm hub {source}"
    state = swin_filter_fn(state, image_model)
    swin_keys = {k for k in image_model.state_dict() if SWIN_KEY.match(k)}
    missing = sorted(swin_keys - state.keys())
    if missing:
        raise ValueError(
            f"vision.pretrained {source}: {len(missing)} Swin weights missing, e.g. {missing[:3]}"
        )
    image_model.load_state_dict({k: state[k] for k in swin_keys}, strict=False)
    log.info("vision encoder: pretrained Swin weights from %s (%d tensors)", origin, len(swin_keys))


def special_token_ids(name_or_path: str) -> tuple[list[int], int]:
    """Special ids and the [MASK] id of the text encoder's tokenizer (``text.name_or_path``, resolved
    by data_prep.tokenize): the ids mask grounding must not hide or put in."""
    from data_prep.tokenize import load_tokenizer

    tokenizer = load_tokenizer(name_or_path)
    return list(tokenizer.all_special_ids), int(tokenizer.mask_token_id)


def build_magnet(cfg: ModelConfig, device: torch.device | str | None = None) -> MagNet:
    """Build MagNet from its config; on the meta device nothing is allocated nor loaded."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    on_meta = device.type == "meta"
    special_ids, mask_token_id = special_token_ids(cfg.text.name_or_path)
    if on_meta:
        with torch.device("meta"):
            return MagNet(cfg, build_text_encoder(cfg, load_pretrained=False), special_ids, mask_token_id)
    model = MagNet(cfg, build_text_encoder(cfg, load_pretrained=True), special_ids, mask_token_id)
    model.init_weights()
    if cfg.vision.pretrained:
        load_pretrained_vision(model.image_model, cfg.vision.pretrained)
    else:
        log.info("vision encoder: random init")
    model.zero_gates()
    return model.to(device)


def describe_model(cfg: ModelConfig, height: int | None = None, width: int | None = None) -> dict:
    """Parameter counts per part and output shapes for one [1, 3, height, width] input, from a
    model built on the meta device: no memory, no weights, so the paper config is free.

    Returns a JSON-ready dict: ``parameters`` (per part, ``inference`` and ``total``),
    ``text_encoder`` (name, layers, width, parameters), ``input``, ``stages`` (per-stage
    feature shapes the decoder sees), ``mask_logits`` and ``aux_mask_logits`` shapes.
    """
    height = height or cfg.image_size
    width = width or cfg.image_size
    model = build_magnet(cfg, "meta")
    language = model.language_model
    text_params = sum(
        p.numel() for part in (language.embeddings, language.encoder) for p in part.parameters()
    )
    ids = torch.ones(1, cfg.text.max_tokens, dtype=torch.long, device="meta")
    image = torch.empty(1, 3, height, width, device="meta")
    with torch.no_grad():
        enc = model.encode(image, ids, ids)
        out = model.classifier(enc.features)
    return {
        "parameters": model.parameter_counts(),
        "text_encoder": {
            "name_or_path": cfg.text.name_or_path,
            "layers_per_stage": [len(group) for group in language.groups],
            "width": language.embeddings.word_embeddings.embedding_dim,
            "parameters": text_params,
            "word_embedding_parameters": language.embeddings.word_embeddings.weight.numel(),
        },
        "input": [1, 3, height, width],
        "stages": [list(f.shape) for f in enc.features],
        "mask_logits": list(out.mask_logits.shape),
        "aux_mask_logits": [list(a.shape) for a in out.aux_mask_logits],
    }
