"""The one image-to-RGB rule, shared by the image stage, the hashes, training and the sample builder.

Alpha is composited onto white (clip art is drawn on transparency; a flattened copy of the same
picture is white there), 16-bit greys are scaled to 8 bits by their top byte (full scale stays full
scale, never clipped), palette images go through RGBA when they carry transparency.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

_SIXTEEN_BIT = ("I", "I;16", "I;16L", "I;16B", "I;16N")
_ALPHA = ("RGBA", "LA", "PA", "RGBa", "La")


def to_rgb(im: Image.Image) -> Image.Image:
    """``im`` as 8-bit RGB; raises ``ValueError`` for a mode Pillow cannot convert."""
    if im.mode == "RGB":
        return im
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in _SIXTEEN_BIT:
        arr = np.asarray(im)
        if arr.size and arr.max() > 255:
            arr = arr >> 8
        im = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "L")
    elif im.mode == "F":
        arr = np.asarray(im, dtype=np.float64)
        im = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L")
    if im.mode in _ALPHA:
        rgba = im.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    try:
        return im.convert("RGB")
    except (ValueError, OSError) as e:
        raise ValueError(f"cannot convert mode {im.mode} to RGB: {e}") from None


def to_gray(im: Image.Image) -> Image.Image:
    """``im`` as a new 8-bit grey (``L``) image, after :func:`to_rgb`."""
    return im.copy() if im.mode == "L" else to_rgb(im).convert("L")


def decode_rgb(data: bytes) -> Image.Image:
    """Decode encoded image bytes to RGB (fully loaded); raises ``OSError``/``ValueError`` if bad."""
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        rgb = to_rgb(im)
        return im.copy() if rgb is im else rgb  # closing the file releases a loaded image's pixels


def png_on_white(rgba: Image.Image, max_side: int) -> tuple[bytes, int, int]:
    """Shrink an RGBA image in place (keep aspect, never enlarge) to ``max_side``, composite it onto white and
    encode an optimised RGB PNG; returns (bytes, width, height). Pillow resizes RGBA premultiplied, so
    shrinking first cannot bleed the colours hidden under transparent pixels into edges, and
    compositing the small image is cheap."""
    rgba.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    rgb = to_rgb(rgba)
    buf = io.BytesIO()
    rgb.save(buf, format="PNG", optimize=True)
    return buf.getvalue(), rgb.width, rgb.height
