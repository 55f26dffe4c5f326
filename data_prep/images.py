"""Reading image and mask files the way a person looking at them sees them: the one reading rule
of preparation (refer data and folders), the shard reader, `magnet predict`, magnet.inference and
the served model, so training, evaluation and prediction all see the same picture.

Images (`decode_image`, `as_shown`) come out RGB and upright:
- EXIF orientation is applied (`PIL.ImageOps.exif_transpose`): a phone photo stored sideways is
  read upright, and its size is the upright size.
- 16-bit grey ("I;16", "I") is shown over the full 16-bit range, value / 257, as image viewers
  show it (PIL's own conversion clips every value above 255 to white).
- Transparency (an alpha band: "LA", "RGBA", "PA"; or a transparent palette entry or colour) is
  composited over white, the page a viewer shows it on.
- Every other mode ("P", "CMYK", "1", "L", "YCbCr", ...) is PIL's conversion to RGB.
- A picture of more pixels than PIL's decompression-bomb limit (`PIL.Image.MAX_IMAGE_PIXELS`,
  89.5 MP unless changed) is refused from its header, before anything is decoded.

Masks (`decode_mask`) are oriented the same way; then, when the file has transparency somewhere
(a pixel less than fully opaque), the object is every pixel that is not fully transparent;
otherwise it is every pixel that is not black (a non-zero grey value, a colour with any non-zero
channel, a palette index whose colour is not black).
"""

from __future__ import annotations

import io

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

BACKDROP = (255, 255, 255)
"""What transparent pixels are composited over: white."""
SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})
_GREY_MODES = SIXTEEN_BIT_MODES | {"1", "L", "F"}
_QUARTER_TURNS = frozenset({5, 6, 7, 8})  # EXIF orientations that swap width and height


class UnreadableImage(ValueError):
    """Bytes that are no image PIL decodes, or a damaged one (truncated, broken chunks). The
    message completes "<the file> is ...": "not a recognised image format ...", "damaged: ...",
    "too large: ..."."""


class TooLargeImage(UnreadableImage):
    """An image of more pixels than the decompression-bomb limit."""


def open_image(data: bytes) -> Image.Image:
    """The image's header, checked against the pixel limit; nothing is decoded yet.

    Raises:
        UnreadableImage: not an image format PIL reads, or a broken header.
        TooLargeImage: more pixels than `PIL.Image.MAX_IMAGE_PIXELS`.
    """
    try:
        image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:  # its message holds a memory address: not reproducible
        raise UnreadableImage("not a recognised image format") from None
    except Image.DecompressionBombError:  # past twice the limit PIL refuses to open it
        raise TooLargeImage(_too_large(None)) from None
    except Exception as err:  # PIL raises many types for a broken header
        raise UnreadableImage(_damaged(err)) from None
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and image.width * image.height > limit:
        image.close()
        raise TooLargeImage(_too_large(image.size))
    return image


def _damaged(err: Exception) -> str:
    return f"damaged: {err or type(err).__name__}"


def _too_large(size: tuple[int, int] | None) -> str:
    """Why an image is refused: its size against the limit (PIL withholds the size past twice it)."""
    limit = f"the {(Image.MAX_IMAGE_PIXELS or 0) / 1e6:.1f} MP limit"
    guard = "(PIL.Image.MAX_IMAGE_PIXELS: a guard against decompression bombs)"
    if size is None:
        return f"too large: more pixels than twice {limit} {guard}"
    width, height = size
    return f"too large: {width}x{height} pixels ({width * height / 1e6:.1f} MP), more than {limit} {guard}"


def orientation(image: Image.Image) -> int:
    """The EXIF orientation (1-8; 1 when absent or unreadable: viewers ignore a broken EXIF block)."""
    try:
        value = image.getexif().get(ExifTags.Base.Orientation, 1)
    except Exception:  # PIL raises many types for a broken EXIF block
        return 1
    return value if value in range(1, 9) else 1


def _upright(image: Image.Image) -> Image.Image:
    """The image with its EXIF orientation applied (itself when there is none to apply)."""
    return ImageOps.exif_transpose(image) if orientation(image) != 1 else image


def shown_size(image: Image.Image) -> tuple[int, int]:
    """(width, height) once the EXIF orientation is applied."""
    width, height = image.size
    return (height, width) if orientation(image) in _QUARTER_TURNS else (width, height)


def as_shown(image: Image.Image) -> Image.Image:
    """`image` RGB and upright, as a viewer shows it (see the module docstring). Does not change
    `image`; returns it as it is when it is RGB already with nothing to turn."""
    image = _upright(image)
    if image.mode in SIXTEEN_BIT_MODES:
        grey = np.clip(np.asarray(image), 0, 65535).astype(np.float32)  # [H,W]
        return Image.fromarray(np.rint(grey / 257).astype(np.uint8), mode="L").convert("RGB")
    if image.has_transparency_data:
        backdrop = Image.new("RGBA", image.size, BACKDROP)
        return Image.alpha_composite(backdrop, image.convert("RGBA")).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def _decoded(image: Image.Image) -> Image.Image:
    """`image` with every pixel decoded: a truncated file opens but fails here."""
    try:
        image.load()
    except Exception as err:  # PIL raises many types for bad data; all mean "does not decode"
        raise UnreadableImage(_damaged(err)) from None
    return image


def load_shown(image: Image.Image) -> Image.Image:
    """An opened image (`open_image`) decoded and `as_shown`."""
    return as_shown(_decoded(image))


def decode_image(data: bytes) -> Image.Image:
    """An image file's bytes -> the RGB, upright picture a person sees.

    Raises:
        UnreadableImage: not an image, or a damaged one; TooLargeImage (a subclass): too many pixels.
    """
    with open_image(data) as image:
        return load_shown(image)


def decode_mask(data: bytes) -> np.ndarray:
    """A mask file's bytes -> bool [H, W], upright: its object's pixels by the rule in the module
    docstring (not fully transparent when the file has transparency, else not black).

    Raises:
        UnreadableImage: not an image, or a damaged one; TooLargeImage (a subclass): too many pixels.
    """
    with open_image(data) as opened:
        image = _upright(_decoded(opened))
    if image.has_transparency_data:
        alpha = np.asarray(image.convert("RGBA").getchannel("A"))  # [H,W]
        if (alpha < 255).any():
            return alpha > 0
    if image.mode in _GREY_MODES:
        return np.asarray(image) != 0
    return np.asarray(image.convert("RGB")).any(axis=2)  # [H,W,3] -> [H,W]


def turn_note(shown: tuple[int, int], other: tuple[int, int], what: str) -> str:
    """For a picture `shown` (width, height) upright and `what` of size `other` that differ: a note
    when a quarter turn explains it, else ""."""
    if shown == other or shown != other[::-1]:
        return ""
    return (
        f": a quarter turn apart. Images are read upright, their EXIF orientation applied as "
        f"viewers apply it; {what} fits the image turned sideways"
    )
