"""Perceptual hashes, grey thumbnails and flatness: what every dedup step compares.

Why each piece is there (numbers: bench/dedup_quality.py, Fashion-MNIST):

- **pHash** (imagehash, 64 bits) is the candidate key: copies land within a small Hamming radius
  of each other, found with multi-index hashing (:mod:`tasks.dedup.mih`), never a scan over all pairs.
- **One grey view** for every hash: ``infra.imaging.to_gray`` (its RGB rule puts alpha onto
  white first; otherwise clip art's transparent pixels hash as whatever colour hides under them,
  often black, while a flattened copy of the same picture is white there).
- **Low-information images** (grey-level std of the thumbnail below ``LOW_INFO_MAX_STD``: blank or
  near-flat) are flagged: their hash bits are noise and collide, so no dedup step uses their hash.
- **Thumbnails** (``THUMB_SIDE``² grey) and the decoded image's shorter side feed pixel
  verification (:mod:`tasks.dedup.verify`); ``pixels_sha256`` names exact duplicates by their pixels.
- **Copy features** (:mod:`tasks.dedup.copy_detect`: ``copy_thumb``, ``copy_desc``, ``rgb_sha256``,
  ``copy_flat``) for decontamination, from the same decode.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from typing import Callable

import imagehash
import numpy as np
import pyarrow as pa
from PIL import Image

from infra.imaging import to_gray
from tasks.dedup.copy_detect import CopyFeatures, copy_feature_columns, copy_features

HASH_KINDS: dict[str, Callable[[Image.Image], imagehash.ImageHash]] = {
    "phash": imagehash.phash,
    "dhash": imagehash.dhash,
    "ahash": imagehash.average_hash,
    "whash": imagehash.whash,
}
THUMB_SIDE = 32
LOW_INFO_MAX_STD = 4.0  # grey levels; Fashion-MNIST's flattest image has std ~20, a blank page 0
# (left, top, right, bottom) crop fractions: none, centred, the 4 corners and the 4 edges of a 5%
# window. The eval index hashes each eval image under all of them (a copy cropped by ≤5% is close
# to one); verification cuts the eval thumbnail to the matched one.
CROP_VARIANTS: tuple[tuple[float, float, float, float], ...] = (
    (0.0, 0.0, 0.0, 0.0), (0.025, 0.025, 0.025, 0.025),
    (0.0, 0.0, 0.05, 0.05), (0.0, 0.05, 0.05, 0.0), (0.05, 0.0, 0.0, 0.05), (0.05, 0.05, 0.0, 0.0),
    (0.0, 0.025, 0.05, 0.025), (0.05, 0.025, 0.0, 0.025), (0.025, 0.0, 0.025, 0.05), (0.025, 0.05, 0.025, 0.0),
)


def check_kind(kind: str) -> None:
    """Raise ``ValueError`` for a hash kind we do not know."""
    if kind not in HASH_KINDS:
        raise ValueError(f"unknown hash kind {kind!r} (known: {sorted(HASH_KINDS)})")


def hash_code(img: Image.Image, kind: str = "phash") -> int:
    """The 64-bit hash of a grey image as an unsigned int (first bit most significant)."""
    bits = HASH_KINDS[kind](img).hash.reshape(-1)
    if bits.size != 64:
        raise ValueError(f"{kind}: expected 64 bits, got {bits.size}")
    return int.from_bytes(np.packbits(bits).tobytes(), "big")


def thumbnail(img: Image.Image, box: tuple[float, float, float, float] | None = None) -> np.ndarray:
    """THUMB_SIDE² uint8 grey thumbnail (of ``box`` when given) for pixel verification."""
    return np.asarray(img.resize((THUMB_SIDE, THUMB_SIDE), Image.BILINEAR, box=box), dtype=np.uint8)


@dataclass
class ImageFeatures:
    code: int
    thumb: np.ndarray
    std: float
    pixels_sha256: str
    min_side: int  # the decoded image's shorter side: how much detail the thumbnail can hold
    copy: CopyFeatures  # the copy detector's features (decontamination)


def image_features(data: bytes, kind: str = "phash") -> ImageFeatures:
    """Decode once; hash, thumbnail, flatness, decoded-pixel digest and copy features."""
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        digest = hashlib.sha256(f"{img.mode}:{img.size}:".encode() + img.tobytes()).hexdigest()
        gray = to_gray(img)
        copy = copy_features(img)
    thumb = thumbnail(gray)
    return ImageFeatures(hash_code(gray, kind), thumb, float(thumb.std()), digest, min(gray.size), copy)


def hash_table(table: pa.Table, kind: str = "phash", *, image_column: str = "image",
               low_info_max_std: float = LOW_INFO_MAX_STD) -> pa.Table:
    """Add ``<kind>`` (uint64 hash), ``low_info`` (bool), ``thumb`` (32×32 grey bytes), ``min_side``
    (int32), ``pixels_sha256`` (digest of the decoded pixels) and the copy detector's columns
    (``copy_detect.copy_feature_columns``). Undecodable images get nulls, not an error: the dedup
    filters drop them with a reason."""
    check_kind(kind)
    features: list[ImageFeatures | None] = []
    for data in table.column(image_column).to_pylist():
        try:
            if not data:
                raise ValueError("no image")
            features.append(image_features(data, kind))
        except (OSError, ValueError, Image.DecompressionBombError, SyntaxError):
            features.append(None)
    codes = [f.code if f else None for f in features]
    low = [f.std < low_info_max_std if f else None for f in features]
    thumbs = [f.thumb.tobytes() if f else None for f in features]
    digests = [f.pixels_sha256 if f else None for f in features]
    sides = [f.min_side if f else None for f in features]
    out = table
    columns = [(kind, pa.array(codes, pa.uint64())), ("low_info", pa.array(low, pa.bool_())),
               ("thumb", pa.array(thumbs, pa.binary())), ("min_side", pa.array(sides, pa.int32())),
               ("pixels_sha256", pa.array(digests, pa.string())),
               *copy_feature_columns([f.copy if f else None for f in features]).items()]
    for name, arr in columns:
        if name in out.column_names:
            out = out.set_column(out.column_names.index(name), name, arr)
        else:
            out = out.append_column(name, arr)
    return out
