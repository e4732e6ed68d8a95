"""The copy detector for decontamination: invariant features, a descriptor for the lookup, and a
colour-aware verification after geometric alignment.

Why each piece is there (numbers: ``bench/dedup_quality.py``, the CLIP-paper alteration families of
:mod:`tasks.dedup.alterations` on Openclipart and Fashion-MNIST):

- **Square RGB thumbnails** (``SIDE``², aspect squashed away): an aspect-ratio distortion or a
  rescale of a copy gives (nearly) the same thumbnail, and a crop + zoom becomes a small affine map.
- **Descriptor** (the ``DESCRIPTOR_DIM`` lowest 2-D DCT frequencies of the grey thumbnail, zero-mean
  and unit length): a float vector degrades smoothly under crops and rotations where pHash's median
  bits flip (crop + zoom moved pHash a median 10 bits); it is looked up by inner product
  (:mod:`tasks.dedup.ann`), and only the nearest eval images are verified.
- **Alignment** (:mod:`tasks.dedup.align`) before any pixel comparison: crops, zooms and rotations.
- **Structure score** on the HSV value and saturation channels, not grey: a hue shift keeps V and S,
  and the jitter scales them (a correlation ignores scale), while grey levels of a hue-shifted
  drawing change colour by colour. Each channel counts by how much it varies (a saturated drawing
  on white is flat in V; a grey image is flat in S).
- **Colour check**: the circular mean hue difference over pixels coloured in both must stay within
  ``max_hue_shift`` (jitter, not a recolouring), and the saturation of the two may not differ by more
  than the jitter allows: a green and a purple arrow of the same drawing are not copies.
- **Exact pixels**: ``rgb_sha256`` (the decoded RGB pixels and size) names identical images whatever
  their names, bytes or flatness.

Feature extraction is a function of a decoded image (:func:`copy_features`), with a thin wrapper from
bytes, so a decode-once image path can feed it. It needs only numpy and scipy; the alignment and the
verification (torch) are in :mod:`tasks.dedup.copy_verify`, so the hashing and within-dedup workers,
which compute features but verify nothing, never import torch.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from PIL import Image
from scipy.fft import dctn

from infra.imaging import to_rgb

SIDE = 32  # thumbnail side (pixels)
DCT_BLOCK = 8  # the descriptor keeps the DCT_BLOCK² lowest frequencies, less the constant one
DESCRIPTOR_DIM = DCT_BLOCK * DCT_BLOCK - 1
FLAT_STD = 2.0  # grey levels: a thumbnail this flat in every channel has no structure to compare

# Verification defaults (:mod:`tasks.dedup.copy_verify`; bench/dedup_quality.py tunes them on its
# tuning split).
DEFAULT_MIN_SCORE = 0.90
# An eval image under SIDE px holds little detail: look-alikes (two plain trousers at 28 px) score
# like copies of it, so its pairs need a higher score.
DEFAULT_MIN_SCORE_SMALL = 0.98
DEFAULT_MAX_HUE_SHIFT = 0.1  # of the hue circle; the HSV-jitter family shifts by ≤ 0.06


@dataclass
class CopyFeatures:
    """What the copy detector keeps of one image."""

    thumb: np.ndarray  # (SIDE, SIDE, 3) uint8, aspect squashed
    descriptor: np.ndarray  # (DESCRIPTOR_DIM,) float32, unit length (zero for a flat image)
    rgb_sha256: str  # the decoded RGB pixels and size: identical images, whatever their names
    flat: bool  # no structure to compare: matched only by rgb_sha256
    min_side: int  # the decoded image's shorter side: how much detail its thumbnail holds


def rgb_digest(rgb: Image.Image) -> str:
    """sha256 of an RGB image's size and pixels."""
    return hashlib.sha256(f"{rgb.size}:".encode() + rgb.tobytes()).hexdigest()


def copy_features(img: Image.Image) -> CopyFeatures:
    """Features of a decoded image (any mode; alpha goes onto white, ``infra.imaging.to_rgb``)."""
    rgb = to_rgb(img)
    thumb = np.asarray(rgb.resize((SIDE, SIDE), Image.BILINEAR), dtype=np.uint8)
    desc = descriptors(thumb[None])[0]
    return CopyFeatures(thumb, desc, rgb_digest(rgb), bool(is_flat(thumb[None])[0]), min(rgb.size))


def copy_features_from_bytes(data: bytes) -> CopyFeatures:
    """:func:`copy_features` of encoded image bytes (raises OSError/ValueError if undecodable)."""
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        return copy_features(im)


COPY_COLUMNS = ("copy_thumb", "copy_desc", "rgb_sha256", "copy_flat")


def copy_feature_columns(features: "list[CopyFeatures | None]") -> "dict[str, pa.Array]":
    """The table columns of per-row features (nulls where an image could not be decoded)."""
    return {"copy_thumb": pa.array([f.thumb.tobytes() if f else None for f in features], pa.binary()),
            "copy_desc": pa.array([f.descriptor.tobytes() if f else None for f in features], pa.binary()),
            "rgb_sha256": pa.array([f.rgb_sha256 if f else None for f in features], pa.string()),
            "copy_flat": pa.array([f.flat if f else None for f in features], pa.bool_())}


def thumbs_from_column(column: "pa.ChunkedArray | pa.Array") -> np.ndarray:
    """``copy_thumb`` bytes → (rows, SIDE, SIDE, 3) uint8 (nulls are zeros)."""
    size = SIDE * SIDE * 3
    return np.frombuffer(b"".join(v or bytes(size) for v in column.to_pylist()), np.uint8).reshape(-1, SIDE, SIDE, 3)


def descriptors_from_column(column: "pa.ChunkedArray | pa.Array") -> np.ndarray:
    """``copy_desc`` bytes → (rows, DESCRIPTOR_DIM) float32 (nulls are zeros)."""
    size = DESCRIPTOR_DIM * 4
    return np.frombuffer(b"".join(v or bytes(size) for v in column.to_pylist()), np.float32).reshape(-1, DESCRIPTOR_DIM)


def grey(thumbs: np.ndarray) -> np.ndarray:
    """(N, S, S, 3) uint8 → (N, S, S) float32 luma (ITU-R 601, as Pillow's ``L``)."""
    t = thumbs.astype(np.float32)
    return t[..., 0] * 0.299 + t[..., 1] * 0.587 + t[..., 2] * 0.114


def descriptors(thumbs: np.ndarray) -> np.ndarray:
    """(N, DESCRIPTOR_DIM) float32 unit vectors: low-frequency DCT of the grey thumbnails."""
    coeffs = dctn(grey(thumbs), axes=(1, 2), norm="ortho")[:, :DCT_BLOCK, :DCT_BLOCK].reshape(len(thumbs), -1)[:, 1:]
    coeffs = coeffs - coeffs.mean(axis=1, keepdims=True)
    norm = np.linalg.norm(coeffs, axis=1, keepdims=True)
    return np.where(norm > 1e-3, coeffs / np.maximum(norm, 1e-3), 0.0).astype(np.float32)


def is_flat(thumbs: np.ndarray) -> np.ndarray:
    """True where every channel of the thumbnail is (nearly) constant."""
    return thumbs.reshape(len(thumbs), -1, 3).astype(np.float32).std(axis=1).max(axis=1) < FLAT_STD
