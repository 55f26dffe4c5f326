"""`magnet predict`: segment the object one expression refers to in one image."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from pipelines.commands import (
    DEVICE,
    TRACKING_URI,
    require_device,
    require_image,
    require_picture_path,
    require_writable,
)


def predict(
    model: str = typer.Option(
        ..., "--model", help="models:/magnet@alias, models:/magnet/N, run id, or checkpoint."
    ),
    image: Path = typer.Option(..., "--image", exists=True, dir_okay=False, help="Image file."),
    text: str = typer.Option(..., "--text", help="The referring expression."),
    out: Path = typer.Option(Path("overlay.png"), "--out", help="Overlay picture to write."),
    mask_out: Path | None = typer.Option(None, "--mask-out", help="Also write the mask (PNG, 0/255)."),
    tracking_uri: str | None = TRACKING_URI,
    device: str = DEVICE,
    logits_out: Path | None = typer.Option(
        None, "--logits-out", help="Also write the raw mask logits, float32 [S/4, S/4] (.npy)."
    ),
) -> None:
    """Segment the object an expression refers to; write an overlay (and the mask)."""
    from magnet.inference import mask_to_png_image, missing_glyphs, predict_one, render_overlay, words_read
    from pipelines.registry import check_model_reference, load_model

    if not text.strip():
        raise typer.BadParameter("the expression is empty: say which object to segment", param_hint="--text")
    require_picture_path(out, "--out")
    if mask_out is not None:
        require_picture_path(mask_out, "--mask-out")
    if logits_out is not None and logits_out.suffix != ".npy":
        raise typer.BadParameter(f"{logits_out}: numpy writes .npy files", param_hint="--logits-out")
    for written, option in ((out, "--out"), (mask_out, "--mask-out"), (logits_out, "--logits-out")):
        if written is not None:
            require_writable(written.parent, option)
    require_device(device)
    picture = require_image(image)
    check_model_reference(model, tracking_uri)
    try:
        net, cfg = load_model(model, tracking_uri=tracking_uri, device=device)
    except (ValueError, FileNotFoundError) as err:
        raise typer.BadParameter(str(err), param_hint="--model") from None
    cut = words_read(text, cfg.model)
    if cut is not None:
        max_tokens = cfg.model.text.max_tokens
        typer.echo(
            f"note: the expression has {cut[0]} word pieces; the model reads only its first "
            f"{max_tokens - 1} (text.max_tokens {max_tokens} with [CLS]): {cut[1]!r}"
        )
    unseen = missing_glyphs(text)
    if unseen:
        typer.echo(
            f"note: the caption font has no glyphs for {''.join(unseen[:10])!r}"
            f"{f' and {len(unseen) - 10} more characters' if len(unseen) > 10 else ''}: "
            "they show as boxes in the overlay (the model reads the text as typed)"
        )
    mask = predict_one(net, cfg.model, picture, text, cfg.eval.threshold)
    out.parent.mkdir(parents=True, exist_ok=True)
    render_overlay(picture, mask, text=text).save(out)
    if mask_out is not None:
        mask_out.parent.mkdir(parents=True, exist_ok=True)
        mask_to_png_image(mask).save(mask_out)
    if logits_out is not None:
        _save_logits(net, cfg.model, picture, text, logits_out)
    share = 100 * mask.mean()
    typer.echo(
        f"mask covers {share:.1f}% of the image; overlay: {out}" + (f", mask: {mask_out}" if mask_out else "")
    )


def _save_logits(net: Any, model_cfg: Any, picture: Any, text: str, path: Path) -> None:
    """The model's raw mask logits for one pair, at its output resolution (S/4 x S/4, before
    any resize or sigmoid), so they compare number by number with the reference model's."""
    import numpy as np
    import torch

    from magnet.inference import preprocess_images, tokenize

    device = next(net.parameters()).device
    ids, attention = tokenize([text], model_cfg)  # [1, L]
    with torch.inference_mode():
        pixels = preprocess_images([picture], model_cfg.image_size).to(device)  # [1, 3, S, S]
        logits = net.eval()(pixels, ids.to(device), attention.to(device)).mask_logits  # [1, 1, S/4, S/4]
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, logits[0, 0].float().cpu().numpy())


def register(app: typer.Typer) -> None:
    """Add this stage's commands to the `magnet` app."""
    app.command("predict")(predict)
