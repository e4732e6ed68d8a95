"""Pixel verification: a hash candidate pair must also correlate as thumbnails.

Why: on small low-detail images pHash alone matches far too much (16% of Fashion-MNIST train
images are within r=4 of some test image), so a pair counts only if the normalised
cross-correlation (NCC) of its 32×32 grey thumbnails is at least ``min_ncc``. The eval side is
first cut to the matched crop variant (``hashing.CROP_VARIANTS``). When one image of a pair is much
smaller (a half-size copy), both thumbnails are first reduced to its detail, or downscaled copies
would fail verification.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pyarrow as pa

from tasks.dedup.hashing import CROP_VARIANTS, THUMB_SIDE

DETAIL_MATCH_BELOW = 24  # pairs whose smaller image is narrower than this are compared at its detail
DEFAULT_MIN_NCC = 0.98


def _crop_matrix(lo: float, hi: float, side: int = THUMB_SIDE) -> np.ndarray:
    """side×side linear-interpolation matrix sampling the window [lo, 1-hi] of a side-long axis."""
    width = side * (1.0 - lo - hi)
    centres = lo * side + (np.arange(side) + 0.5) * width / side - 0.5
    centres = np.clip(centres, 0, side - 1)
    left = np.floor(centres).astype(int)
    right = np.minimum(left + 1, side - 1)
    frac = centres - left
    mat = np.zeros((side, side), dtype=np.float32)
    mat[np.arange(side), left] += 1 - frac
    mat[np.arange(side), right] += frac
    return mat


_ROW_MATS = np.stack([_crop_matrix(v[1], v[3]) for v in CROP_VARIANTS])  # (V, S, S) along y
_COL_MATS = np.stack([_crop_matrix(v[0], v[2]) for v in CROP_VARIANTS])  # along x


def _normalise(thumbs: np.ndarray) -> np.ndarray:
    flat = thumbs.reshape(len(thumbs), -1).astype(np.float32)
    flat -= flat.mean(axis=1, keepdims=True)
    flat /= np.maximum(np.linalg.norm(flat, axis=1, keepdims=True), 1e-3)
    return flat


def _detail_matrix(side: int, full: int = THUMB_SIDE) -> np.ndarray:
    """full×full operator: area-downsample to ``side`` pixels, then linear upsample back."""
    down = np.zeros((side, full), dtype=np.float32)
    for i in range(side):
        lo, hi = i * full / side, (i + 1) * full / side
        for k in range(int(np.floor(lo)), int(np.ceil(hi))):
            down[i, k] = (min(hi, k + 1) - max(lo, k)) * side / full
    centres = np.clip((np.arange(full) + 0.5) * side / full - 0.5, 0, side - 1)
    left = np.floor(centres).astype(int)
    right = np.minimum(left + 1, side - 1)
    up = np.zeros((full, side), dtype=np.float32)
    up[np.arange(full), left] += 1 - (centres - left)
    up[np.arange(full), right] += centres - left
    return up @ down


def pair_ncc(a_thumbs: np.ndarray, b_thumbs: np.ndarray, b_variants: np.ndarray | None = None,
             sides: np.ndarray | None = None) -> np.ndarray:
    """Normalised cross-correlation of thumbnail pairs; ``b`` cut to its crop variant first.

    With ``sides`` (the smaller of the two images' shorter sides), both thumbnails of a pair are
    first reduced to that much detail: a half-size copy of a 28-px image holds 14 px of detail, and
    comparing it against the sharp original would reject it.
    """
    a = a_thumbs.astype(np.float32)
    b = b_thumbs.astype(np.float32)
    if b_variants is not None and len(b):
        b = np.einsum("nij,njk,nlk->nil", _ROW_MATS[b_variants], b, _COL_MATS[b_variants], optimize=True)
    if sides is not None and len(b):
        sides = np.asarray(sides)
        # Only real losses of detail: 28-px originals both upsampled to 32 compare fine as they are.
        for side in np.unique(sides[(sides > 0) & (sides < DETAIL_MATCH_BELOW)]):
            m = sides == side
            op = _detail_matrix(int(side))
            a[m] = np.einsum("ij,njk,lk->nil", op, a[m], op, optimize=True)
            b[m] = np.einsum("ij,njk,lk->nil", op, b[m], op, optimize=True)
    return (_normalise(a) * _normalise(b)).sum(axis=1)


def thumbs_of(column: pa.ChunkedArray | pa.Array | Sequence[bytes | None]) -> np.ndarray:
    """Thumbnail bytes (``hash_table``'s ``thumb`` column) as a (rows, S, S) uint8 array; nulls are zeros."""
    values = column.to_pylist() if hasattr(column, "to_pylist") else list(column)
    size = THUMB_SIDE * THUMB_SIDE
    return np.frombuffer(b"".join(v if v else bytes(size) for v in values), dtype=np.uint8).reshape(-1, THUMB_SIDE, THUMB_SIDE)

