"""The alteration families of CLIP's near-duplicate detector (Radford et al. 2021, Appendix C).

CLIP trained its detector on random crop + zoom, aspect-ratio distortion, down/up-scaling, small
rotations, JPEG compression and HSV colour jitter; :func:`alter` applies one family (or a
combination) with a random strength, so the benchmark (``bench/dedup_quality.py``) and the tests
measure the copy detector against exactly those changes. Strengths (the paper gives none):

========== ==========================================================================
crop_zoom  keep a window of 90–97% of each side at a random place, resize back to the size
aspect     one axis scaled by 0.8–1.25
rescale    both axes scaled by 0.4–2 (bilinear or bicubic)
rotation   ±2–8°, same canvas, uncovered corners black or white (either at random)
jpeg       quality 20–60
hsv        hue shifted by up to ±0.06 of the circle, saturation ×0.6–1.4, value ×0.7–1.3
combined   2–3 of the above (geometric first, colour next, JPEG last)
========== ==========================================================================
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

FAMILIES = ("crop_zoom", "aspect", "rescale", "rotation", "jpeg", "hsv", "combined")
_SINGLE = FAMILIES[:-1]
HUE_SHIFT_MAX = 0.06  # of the hue circle: colour jitter, not a recolouring


def _crop_zoom(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    w, h = img.size
    fx, fy = rng.uniform(0.90, 0.97, size=2)
    cw, ch = max(1, round(w * fx)), max(1, round(h * fy))
    x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    return img.crop((x, y, x + cw, y + ch)).resize((w, h), Image.BILINEAR)


def _aspect(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    w, h = img.size
    a = float(np.exp(rng.uniform(np.log(0.8), np.log(1.25))))
    size = (max(1, round(w * a)), h) if rng.random() < 0.5 else (w, max(1, round(h * a)))
    return img.resize(size, Image.BILINEAR)


def _rescale(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    w, h = img.size
    s = float(np.exp(rng.uniform(np.log(0.4), np.log(2.0))))
    method = Image.BILINEAR if rng.random() < 0.5 else Image.BICUBIC
    return img.resize((max(1, round(w * s)), max(1, round(h * s))), method)


def _rotation(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    angle = float(rng.uniform(2.0, 8.0)) * (1 if rng.random() < 0.5 else -1)
    fill = (0, 0, 0) if rng.random() < 0.5 else (255, 255, 255)
    return img.rotate(angle, resample=Image.BILINEAR, expand=False, fillcolor=fill)


def _hsv(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    hsv = np.asarray(img.convert("HSV"), dtype=np.float32)
    dh = rng.uniform(-HUE_SHIFT_MAX, HUE_SHIFT_MAX) * 256.0
    hsv[..., 0] = np.mod(hsv[..., 0] + dh, 256.0)
    hsv[..., 1] *= rng.uniform(0.6, 1.4)
    hsv[..., 2] *= rng.uniform(0.7, 1.3)
    out = np.clip(np.rint(hsv), 0, 255).astype(np.uint8)
    return Image.fromarray(out, "HSV").convert("RGB")


def _jpeg(img: Image.Image, rng: np.random.Generator) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=int(rng.integers(20, 61)))
    return buf.getvalue()


_GEOMETRIC = {"crop_zoom": _crop_zoom, "aspect": _aspect, "rescale": _rescale, "rotation": _rotation}


def alter(data: bytes, family: str, rng: np.random.Generator) -> bytes:
    """An altered copy (encoded PNG, or JPEG for the JPEG family) of encoded image ``data``."""
    if family not in FAMILIES:
        raise ValueError(f"unknown alteration family {family!r} (known: {FAMILIES})")
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        grey = im.mode in ("L", "LA", "I;16", "1")
        img = im.convert("RGB")
    chosen = [family] if family != "combined" else list(rng.choice(_SINGLE, size=int(rng.integers(2, 4)), replace=False))
    for name in (n for n in _SINGLE if n in chosen and n in _GEOMETRIC):
        img = _GEOMETRIC[name](img, rng)
    if "hsv" in chosen and not grey:
        img = _hsv(img, rng)
    elif "hsv" in chosen:  # a grey image has no hue or saturation: jitter its value only
        arr = np.asarray(img, np.float32) * rng.uniform(0.7, 1.3)
        img = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8))
    if grey:
        img = img.convert("L")
    if "jpeg" in chosen:
        return _jpeg(img, rng)
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()
