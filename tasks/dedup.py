"""Deduplication: against the eval sets (decontamination) and within the dataset.

Decontamination is two steps, as datatrove does it: an :class:`EvalIndex` is built once from the
eval sets (a versioned artifact in object storage), then :func:`filter_eval_overlap` drops every
candidate that matches an eval image and records what it matched.

Matching, and why each step is there (numbers: bench/dedup_quality.py, Fashion-MNIST):

1. **pHash candidates** (imagehash, 64 bits) within Hamming radius ``r``, looked up with
   multi-index hashing (:class:`MultiIndexHash`), never a scan over all pairs.
2. **Crop variants in the index**: each eval image is hashed as is and under 9 crops of ≤5%, so a
   cropped copy still lands within ``r`` of one of them (pHash alone moves ~6–16 bits under a 5%
   crop of a 28-px image).
3. **Low-information images** (grey-level std below a threshold: blank or near-flat images) are
   neither indexed nor looked up: their hash bits are noise and collide.
4. **Pixel verification**: a candidate pair must also correlate (NCC of 32×32 grey thumbnails,
   the eval side cut to the matched crop) at least ``min_ncc``. On small low-detail images pHash
   alone matches far too much (16% of Fashion-MNIST train images are within r=4 of some test image).
   When one image of a pair is much smaller (a half-size copy), both thumbnails are first reduced
   to its detail, or downscaled copies would fail verification.

Within the dataset: exact duplicates (same decoded pixels, or same bytes) and near duplicates
(pHash within ``r``) are grouped globally; each group keeps its smallest ``sample_id``.
:func:`within_dataset_duplicates` is the single-process form; :func:`within_dataset_duplicates_ray`
does the same with Ray shuffles of (band value → sample ids), MIH's pigeonhole bands.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import imagehash
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image

from infra.log import get_logger, log_event, progress
from infra.funnel import Funnel
from infra.imaging import to_gray

log = get_logger(__name__)

HASH_KINDS: dict[str, Callable[[Image.Image], imagehash.ImageHash]] = {
    "phash": imagehash.phash,
    "dhash": imagehash.dhash,
    "ahash": imagehash.average_hash,
    "whash": imagehash.whash,
}
THUMB_SIDE = 32
DETAIL_MATCH_BELOW = 24  # pairs whose smaller image is narrower than this are compared at its detail
LOW_INFO_MAX_STD = 4.0  # grey levels; Fashion-MNIST's flattest image has std ~20, a blank page 0
DEFAULT_MIN_NCC = 0.98
# (left, top, right, bottom) crop fractions indexed per eval image: none, centred, the 4 corners
# and the 4 edges of a 5% window. A copy cropped by ≤5% is close to one of them.
CROP_VARIANTS: tuple[tuple[float, float, float, float], ...] = (
    (0.0, 0.0, 0.0, 0.0), (0.025, 0.025, 0.025, 0.025),
    (0.0, 0.0, 0.05, 0.05), (0.0, 0.05, 0.05, 0.0), (0.05, 0.0, 0.0, 0.05), (0.05, 0.05, 0.0, 0.0),
    (0.0, 0.025, 0.05, 0.025), (0.05, 0.025, 0.0, 0.025), (0.025, 0.0, 0.025, 0.05), (0.025, 0.05, 0.025, 0.0),
)
INDEX_FORMAT = 2  # bump when hashing/thumbnails change: part of every index version
MATCHES_SCHEMA = pa.schema([
    pa.field("sample_id", pa.string(), nullable=False),
    pa.field("eval_set", pa.string(), nullable=False),
    pa.field("eval_id", pa.string(), nullable=False),
    pa.field("eval_label", pa.int64()),
    pa.field("distance", pa.int32()),  # pHash Hamming distance to the matched (crop of the) eval image
    pa.field("crop_variant", pa.int8()),
    pa.field("ncc", pa.float32()),
])
DUPLICATES_SCHEMA = pa.schema([
    pa.field("sample_id", pa.string(), nullable=False),
    pa.field("representative", pa.string(), nullable=False),
    pa.field("reason", pa.string(), nullable=False),  # duplicate_exact | duplicate_near
])


# ------------------------------------------------------------------------------------------------
# Hashing
# ------------------------------------------------------------------------------------------------


def canonical_gray(img: Image.Image) -> Image.Image:
    """Grey-level view used by every hash: ``infra.imaging``'s RGB rule (alpha onto white) first.

    Without it, clip art's transparent pixels hash as whatever colour hides under them (often
    black), while a flattened copy of the same picture is white there.
    """
    return to_gray(img)


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


def image_features(data: bytes, kind: str = "phash") -> ImageFeatures:
    """Decode once; hash, thumbnail, flatness and decoded-pixel digest."""
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        digest = hashlib.sha256(f"{img.mode}:{img.size}:".encode() + img.tobytes()).hexdigest()
        gray = canonical_gray(img)
    thumb = thumbnail(gray)
    return ImageFeatures(hash_code(gray, kind), thumb, float(thumb.std()), digest, min(gray.size))


def hash_table(table: pa.Table, kind: str = "phash", *, image_column: str = "image",
               low_info_max_std: float = LOW_INFO_MAX_STD) -> pa.Table:
    """Add ``<kind>`` (uint64 hash), ``low_info`` (bool), ``thumb`` (32×32 grey bytes), ``min_side``
    (int32) and ``pixels_sha256`` (digest of the decoded pixels). Undecodable images get nulls, not an error:
    the dedup filters drop them with a reason."""
    if kind not in HASH_KINDS:
        raise ValueError(f"unknown hash kind {kind!r} (known: {sorted(HASH_KINDS)})")
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
    for name, arr in ((kind, pa.array(codes, pa.uint64())), ("low_info", pa.array(low, pa.bool_())),
                      ("thumb", pa.array(thumbs, pa.binary())), ("min_side", pa.array(sides, pa.int32())),
                      ("pixels_sha256", pa.array(digests, pa.string()))):
        if name in out.column_names:
            out = out.set_column(out.column_names.index(name), name, arr)
        else:
            out = out.append_column(name, arr)
    return out


# ------------------------------------------------------------------------------------------------
# Multi-index hashing
# ------------------------------------------------------------------------------------------------

MAX_SUBSTRING_BITS = 22  # bucket offset tables stay ≤ 2^22 entries (16 MiB) each


def _chunk_bits(m: int) -> list[tuple[int, int]]:
    """(shift, bits) of m contiguous substrings covering 64 bits (sizes differ by at most one)."""
    sizes = [64 // m + (1 if i < 64 % m else 0) for i in range(m)]
    out, hi = [], 64
    for b in sizes:
        hi -= b
        out.append((hi, b))
    return out


def _flip_masks(bits: int, radius: int) -> np.ndarray:
    masks = [0]
    for k in range(1, radius + 1):
        masks.extend(sum(1 << i for i in c) for c in itertools.combinations(range(bits), k))
    return np.asarray(masks, dtype=np.int64)


def _probe_count(bits: int, radius: int) -> int:
    return sum(math.comb(bits, k) for k in range(radius + 1))


def choose_substrings(n: int, radius: int) -> int | None:
    """Number of substrings m minimising expected work per query, or None if a scan is cheaper.

    Pigeonhole (Norouzi et al., MIH): if two codes differ in ≤ r bits, some substring of m differs
    in ≤ r // m bits. Per substring we probe every key within r // m bits; the expected cost is
    probes × (1 + 2 · n / 2^bits) (a probe, then the candidates it yields). m = r + 1 is the
    exact-match special case; larger substrings with a small probe radius win once n is large.
    """
    best, best_cost = None, float(n)  # the scan: one popcount per stored code
    for m in range(3, max(3, radius + 1) + 1):
        sub_r = radius // m
        cost = sum(_probe_count(b, sub_r) * (1.0 + 2.0 * n / 2.0 ** b) for _, b in _chunk_bits(m))
        if cost < best_cost:
            best, best_cost = m, cost
    return best


class MultiIndexHash:
    """Exact r-neighbour search over 64-bit codes (numpy-vectorised multi-index hashing)."""

    def __init__(self, codes: np.ndarray) -> None:
        self.codes = np.ascontiguousarray(codes, dtype=np.uint64)
        self._tables: dict[int, list[tuple[int, int, np.ndarray, np.ndarray]]] = {}

    def __len__(self) -> int:
        return len(self.codes)

    def _tables_for(self, m: int) -> list[tuple[int, int, np.ndarray, np.ndarray]]:
        if m not in self._tables:
            tables = []
            for shift, bits in _chunk_bits(m):
                keys = ((self.codes >> np.uint64(shift)) & np.uint64((1 << bits) - 1)).astype(np.int64)
                order = np.argsort(keys, kind="stable").astype(np.int64)
                offsets = np.zeros((1 << bits) + 1, dtype=np.int64)
                np.cumsum(np.bincount(keys, minlength=1 << bits), out=offsets[1:])
                tables.append((shift, bits, offsets, order))
            self._tables[m] = tables
        return self._tables[m]

    def search(self, queries: np.ndarray, radius: int, *, max_probes: int = 2_000_000
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """All (query index, code index, distance) with Hamming distance ≤ radius, sorted."""
        queries = np.ascontiguousarray(queries, dtype=np.uint64)
        empty = (np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int32))
        if len(queries) == 0 or len(self.codes) == 0:
            return empty
        m = choose_substrings(len(self.codes), radius)
        if m is None:
            return brute_force_search(self.codes, queries, radius)
        tables = self._tables_for(m)
        sub_r = radius // m
        masks = [_flip_masks(bits, sub_r) for _, bits, _, _ in tables]
        per_query = sum(len(x) for x in masks)
        step = max(1, max_probes // per_query)
        out_q, out_c, out_d = [], [], []
        for lo in range(0, len(queries), step):
            q = queries[lo:lo + step]
            cand_q, cand_c = [], []
            for (shift, bits, offsets, order), flips in zip(tables, masks):
                keys = ((q >> np.uint64(shift)) & np.uint64((1 << bits) - 1)).astype(np.int64)
                probes = (keys[:, None] ^ flips[None, :]).reshape(-1)
                starts, ends = offsets[probes], offsets[probes + 1]
                counts = ends - starts
                total = int(counts.sum())
                if total == 0:
                    continue
                nz = np.flatnonzero(counts)
                counts, starts = counts[nz], starts[nz]
                first = np.cumsum(counts) - counts
                pos = np.repeat(starts - first, counts) + np.arange(total, dtype=np.int64)
                cand_c.append(order[pos])
                cand_q.append(np.repeat(nz // len(flips), counts))
            if not cand_c:
                continue
            qi, ci = np.concatenate(cand_q), np.concatenate(cand_c)
            d = np.bitwise_count(q[qi] ^ self.codes[ci]).astype(np.int32)
            keep = d <= radius
            qi, ci, d = qi[keep], ci[keep], d[keep]
            # A pair found through several substrings is one pair.
            pair = np.unique(qi * len(self.codes) + ci, return_index=True)[1]
            out_q.append(qi[pair] + lo), out_c.append(ci[pair]), out_d.append(d[pair])
        if not out_q:
            return empty
        return np.concatenate(out_q), np.concatenate(out_c), np.concatenate(out_d)


def brute_force_search(codes: np.ndarray, queries: np.ndarray, radius: int, *, block: int = 1 << 18
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Vectorised scan of every (query, code) pair: the reference MIH must equal."""
    codes = np.ascontiguousarray(codes, dtype=np.uint64)
    queries = np.ascontiguousarray(queries, dtype=np.uint64)
    step = max(1, block // max(len(codes), 1))
    out_q, out_c, out_d = [], [], []
    for lo in range(0, len(queries), step):
        d = np.bitwise_count(queries[lo:lo + step, None] ^ codes[None, :])
        qi, ci = np.nonzero(d <= radius)
        out_q.append(qi.astype(np.int64) + lo), out_c.append(ci.astype(np.int64)), out_d.append(d[qi, ci].astype(np.int32))
    if not out_q:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int32)
    return np.concatenate(out_q), np.concatenate(out_c), np.concatenate(out_d)


# ------------------------------------------------------------------------------------------------
# Pixel verification
# ------------------------------------------------------------------------------------------------


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


def _thumbs_of(column: pa.ChunkedArray | pa.Array | Sequence[bytes | None]) -> np.ndarray:
    values = column.to_pylist() if hasattr(column, "to_pylist") else list(column)
    size = THUMB_SIDE * THUMB_SIDE
    return np.frombuffer(b"".join(v if v else bytes(size) for v in values), dtype=np.uint8).reshape(-1, THUMB_SIDE, THUMB_SIDE)


# ------------------------------------------------------------------------------------------------
# The eval-set index
# ------------------------------------------------------------------------------------------------


def eval_index_version(eval_sets: Sequence[Any], kind: str = "phash", **params: Any) -> str:
    """Content version of an index: the eval sets' checksums, the hash kind and the build params."""
    spec = {"format": INDEX_FORMAT, "kind": kind, "params": dict(sorted(params.items())),
            "sets": [(s.name, s.checksum()) for s in eval_sets]}
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class EvalIndex:
    """Hashes of every eval image (and its crop variants), looked up with multi-index hashing."""

    kind: str
    version: str
    set_names: list[str]
    image_set: np.ndarray  # int32 per eval image: index into set_names
    image_ids: list[str]
    image_labels: np.ndarray  # int64
    image_low_info: np.ndarray  # bool: not indexed
    thumbs: np.ndarray  # uint8 (images, S, S)
    image_sides: np.ndarray  # int32: shorter side of each eval image
    entry_image: np.ndarray  # int64 per hash entry: which eval image
    entry_variant: np.ndarray  # int8 per hash entry: which crop of it
    entry_codes: np.ndarray  # uint64
    params: dict = field(default_factory=dict)
    _mih: MultiIndexHash | None = field(default=None, repr=False)

    BUILD_DEFAULTS = {"crop_variants": True, "low_info_max_std": LOW_INFO_MAX_STD, "min_ncc": DEFAULT_MIN_NCC}

    @classmethod
    def build(cls, eval_sets: Sequence[Any], kind: str = "phash", *, crop_variants: bool = True,
              low_info_max_std: float = LOW_INFO_MAX_STD, min_ncc: float = DEFAULT_MIN_NCC) -> "EvalIndex":
        """Hash every image of every eval set (``infra.eval_sets.EvalSet``)."""
        if kind not in HASH_KINDS:
            raise ValueError(f"unknown hash kind {kind!r} (known: {sorted(HASH_KINDS)})")
        params = {"crop_variants": crop_variants, "low_info_max_std": low_info_max_std, "min_ncc": min_ncc}
        variants = CROP_VARIANTS if crop_variants else CROP_VARIANTS[:1]
        image_set, ids, labels, low, thumbs, sides = [], [], [], [], [], []
        entry_image, entry_variant, entry_codes = [], [], []
        total = sum(len(s.ids) for s in eval_sets)
        rows = ((si, s, j) for si, s in enumerate(eval_sets) for j in range(len(s.ids)))
        for si, s, j in progress(rows, desc="hash eval sets", total=total, unit="img"):
            with Image.open(io.BytesIO(s.images[j])) as img:
                img.load()
                gray = canonical_gray(img)
            image_no = len(ids)
            thumb = thumbnail(gray)
            image_set.append(si), ids.append(s.ids[j]), labels.append(int(s.labels[j])), thumbs.append(thumb)
            sides.append(min(gray.size))
            flat = float(thumb.std()) < low_info_max_std
            low.append(flat)
            if flat:
                continue
            w, h = gray.size
            for v, (l, t, r, b) in enumerate(variants):
                view = gray if v == 0 else gray.resize((w, h), Image.BILINEAR, box=(l * w, t * h, w - r * w, h - b * h))
                entry_image.append(image_no), entry_variant.append(v), entry_codes.append(hash_code(view, kind))
        index = cls(kind=kind, version=eval_index_version(eval_sets, kind, **params),
                    set_names=[s.name for s in eval_sets], image_set=np.asarray(image_set, np.int32),
                    image_ids=ids, image_labels=np.asarray(labels, np.int64), image_low_info=np.asarray(low, bool),
                    thumbs=np.stack(thumbs) if thumbs else np.zeros((0, THUMB_SIDE, THUMB_SIDE), np.uint8),
                    image_sides=np.asarray(sides, np.int32),
                    entry_image=np.asarray(entry_image, np.int64), entry_variant=np.asarray(entry_variant, np.int8),
                    entry_codes=np.asarray(entry_codes, np.uint64), params=params)
        log_event(log, "eval index built", version=index.version, images=len(ids), entries=len(entry_codes),
                  low_info=int(index.image_low_info.sum()))
        return index

    @property
    def mih(self) -> MultiIndexHash:
        if self._mih is None:
            self._mih = MultiIndexHash(self.entry_codes)
        return self._mih

    @property
    def min_ncc(self) -> float:
        return float(self.params.get("min_ncc", DEFAULT_MIN_NCC))

    def lookup(self, hashes: np.ndarray, radius: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Hash candidates within ``radius``: (query index, eval image, crop variant, distance),
        one row per (query, eval image) — the closest variant."""
        qi, ei, d = self.mih.search(np.asarray(hashes, np.uint64), radius)
        img, var = self.entry_image[ei], self.entry_variant[ei]
        order = np.lexsort((d, img, qi))
        qi, img, var, d = qi[order], img[order], var[order], d[order]
        first = np.ones(len(qi), bool)
        first[1:] = (qi[1:] != qi[:-1]) | (img[1:] != img[:-1])
        return qi[first], img[first], var[first], d[first]

    # -- storage ---------------------------------------------------------------------------------

    def save(self, store: Any, key: str) -> None:
        """Write under ``key/`` (an ``infra.storage.ObjectStore``): Parquet tables, then index.json last."""
        images = pa.table({"set": pa.array(self.image_set, pa.int32()), "id": pa.array(self.image_ids, pa.string()),
                           "label": pa.array(self.image_labels, pa.int64()),
                           "low_info": pa.array(self.image_low_info, pa.bool_()),
                           "thumb": pa.array([t.tobytes() for t in self.thumbs], pa.binary()),
                           "min_side": pa.array(self.image_sides, pa.int32())})
        entries = pa.table({"image": pa.array(self.entry_image, pa.int64()),
                            "variant": pa.array(self.entry_variant, pa.int8()),
                            "code": pa.array(self.entry_codes, pa.uint64())})
        store.write_parquet(f"{key}/images.parquet", images)
        store.write_parquet(f"{key}/entries.parquet", entries)
        store.write_json(f"{key}/index.json", {"version": self.version, "kind": self.kind, "format": INDEX_FORMAT,
                                              "sets": self.set_names, "params": self.params,
                                              "images": len(self.image_ids), "entries": len(self.entry_codes),
                                              "sizes": self.set_sizes()})

    @classmethod
    def load(cls, store: Any, key: str) -> "EvalIndex":
        meta = store.read_json(f"{key}/index.json")
        if meta.get("format") != INDEX_FORMAT:
            raise ValueError(f"eval index {store.uri(key)}: format {meta.get('format')}, this code reads {INDEX_FORMAT}")
        images = store.read_parquet(f"{key}/images.parquet")
        entries = store.read_parquet(f"{key}/entries.parquet")
        return cls(kind=meta["kind"], version=meta["version"], set_names=list(meta["sets"]),
                   image_set=images.column("set").to_numpy().astype(np.int32),
                   image_ids=images.column("id").to_pylist(),
                   image_labels=images.column("label").to_numpy().astype(np.int64),
                   image_low_info=images.column("low_info").to_numpy(zero_copy_only=False).astype(bool),
                   thumbs=_thumbs_of(images.column("thumb")),
                   image_sides=images.column("min_side").to_numpy().astype(np.int32),
                   entry_image=entries.column("image").to_numpy().astype(np.int64),
                   entry_variant=entries.column("variant").to_numpy().astype(np.int8),
                   entry_codes=entries.column("code").to_numpy().astype(np.uint64), params=dict(meta["params"]))

    def set_sizes(self) -> dict[str, int]:
        counts = np.bincount(self.image_set, minlength=len(self.set_names))
        return {n: int(c) for n, c in zip(self.set_names, counts)}


def ensure_eval_index(eval_sets: Sequence[Any], store: Any, kind: str = "phash", **params: Any
                      ) -> tuple[EvalIndex, bool]:
    """Load the index of these eval sets from ``store/<version>/`` or build and save it.

    Returns (index, built). The version is a content checksum, so an unchanged registry is never
    re-hashed and a changed one gets a new version beside the old.
    """
    full = {**EvalIndex.BUILD_DEFAULTS, **params}
    version = eval_index_version(eval_sets, kind, **full)
    if store.exists(f"{version}/index.json"):
        return EvalIndex.load(store, version), False
    index = EvalIndex.build(eval_sets, kind, **full)
    index.save(store, version)
    return index, True


# ------------------------------------------------------------------------------------------------
# Filtering candidates against the index
# ------------------------------------------------------------------------------------------------


def _ensure_hashed(table: pa.Table, kind: str) -> pa.Table:
    needed = (kind, "low_info", "thumb")
    return table if all(c in table.column_names for c in needed) else hash_table(table, kind)


def match_eval(table: pa.Table, index: EvalIndex, radius: int, *, min_ncc: float | None = None) -> pa.Table:
    """Verified matches of the rows of a hashed table against the index (MATCHES_SCHEMA)."""
    min_ncc = index.min_ncc if min_ncc is None else min_ncc
    codes = table.column(index.kind)
    low = table.column("low_info").fill_null(True).to_numpy(zero_copy_only=False)
    usable = np.flatnonzero(~low & codes.is_valid().to_numpy(zero_copy_only=False))
    if len(usable) == 0:
        return MATCHES_SCHEMA.empty_table()
    qi, img, var, dist = index.lookup(codes.take(pa.array(usable)).to_numpy().astype(np.uint64), radius)
    rows = usable[qi]
    if min_ncc > -1.0 and len(rows):
        cand_thumbs = _thumbs_of(table.column("thumb").take(pa.array(rows)))
        sides = None
        if "min_side" in table.column_names:
            cand_sides = table.column("min_side").take(pa.array(rows)).fill_null(THUMB_SIDE).to_numpy()
            sides = np.minimum(cand_sides, index.image_sides[img])
        ncc = pair_ncc(cand_thumbs, index.thumbs[img], var.astype(np.int64), sides)
    else:
        ncc = np.ones(len(rows), np.float32)
    keep = ncc >= min_ncc
    rows, img, var, dist, ncc = rows[keep], img[keep], var[keep], dist[keep], ncc[keep]
    ids = table.column("sample_id").take(pa.array(rows, pa.int64())) if len(rows) else pa.array([], pa.string())
    return pa.table({
        "sample_id": ids,
        "eval_set": pa.array([index.set_names[s] for s in index.image_set[img]], pa.string()),
        "eval_id": pa.array([index.image_ids[i] for i in img], pa.string()),
        "eval_label": pa.array(index.image_labels[img], pa.int64()),
        "distance": pa.array(dist, pa.int32()),
        "crop_variant": pa.array(var, pa.int8()),
        "ncc": pa.array(ncc, pa.float32()),
    }, schema=MATCHES_SCHEMA)


def filter_eval_overlap(table: pa.Table, index: EvalIndex, radius: int, *, min_ncc: float | None = None
                        ) -> tuple[pa.Table, Funnel, pa.Table]:
    """Drop candidates that near-duplicate an eval image.

    Returns (kept rows, funnel of stage ``dedup_eval`` with reasons ``eval_overlap:<set>`` and
    ``unhashable_image``, matches: every verified (sample, eval image) pair, MATCHES_SCHEMA).
    """
    table = _ensure_hashed(table, index.kind)
    funnel = Funnel()
    matches = match_eval(table, index, radius, min_ncc=min_ncc)
    reasons: list[str | None] = [None] * table.num_rows
    for i, valid in enumerate(table.column(index.kind).is_valid().to_pylist()):
        if not valid:
            reasons[i] = "unhashable_image"
    if matches.num_rows:
        # The reason names the best match's eval set (highest correlation, then smallest distance).
        best: dict[str, tuple[float, int, str]] = {}
        for sid, name, d, n in zip(*(matches.column(c).to_pylist() for c in ("sample_id", "eval_set", "distance", "ncc"))):
            cand = (-n, d, name)
            if sid not in best or cand < best[sid]:
                best[sid] = cand
        for i, sid in enumerate(table.column("sample_id").to_pylist()):
            if sid in best:
                reasons[i] = f"eval_overlap:{best[sid][2]}"
    kept = funnel.apply("dedup_eval", table, reasons)
    return kept, funnel, matches


def overlap_report(matches: pa.Table | Sequence[pa.Table], index: EvalIndex) -> dict[str, dict]:
    """Per eval set, as CLIP's overlap analysis: how many eval images have a near duplicate among
    the candidates (``overlap``/``overlap_pct``), plus the candidates dropped for it."""
    if not isinstance(matches, pa.Table):
        matches = pa.concat_tables([MATCHES_SCHEMA.empty_table(), *matches]) if matches else MATCHES_SCHEMA.empty_table()
    sizes = index.set_sizes()
    low = np.bincount(index.image_set[index.image_low_info], minlength=len(index.set_names))
    report = {}
    for si, name in enumerate(index.set_names):
        sub = matches.filter(pc.equal(matches.column("eval_set"), name)) if matches.num_rows else matches
        overlapping = len(set(sub.column("eval_id").to_pylist()))
        total = sizes[name]
        report[name] = {"eval_images": total, "low_info_not_indexed": int(low[si]), "overlap": overlapping,
                        "overlap_pct": round(100.0 * overlapping / total, 3) if total else 0.0,
                        "clean": total - overlapping,
                        "candidates_matched": len(set(sub.column("sample_id").to_pylist()))}
    return report


# ------------------------------------------------------------------------------------------------
# Within the dataset
# ------------------------------------------------------------------------------------------------


class _UnionFind:
    """Components over integer node ids; each root is its component's smallest id."""

    def __init__(self, n: int) -> None:
        self.parent = np.arange(n, dtype=np.int64)

    def find(self, x: int) -> int:
        p = self.parent
        root = x
        while p[root] != root:
            root = p[root]
        while p[x] != root:
            p[x], x = root, p[x]
        return int(root)

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            lo, hi = (ra, rb) if ra < rb else (rb, ra)
            self.parent[hi] = lo

    def roots(self) -> np.ndarray:
        return np.array([self.find(i) for i in range(len(self.parent))], dtype=np.int64)


def _exact_groups(sample_ids: Sequence[str], keys: Sequence[str | None]) -> dict[str, str]:
    """sample_id -> representative for every row whose key equals a smaller sample_id's."""
    rep: dict[str, str] = {}
    out = {}
    for sid, key in sorted(zip(sample_ids, keys), key=lambda x: x[0]):
        if key is None:
            continue
        if key in rep:
            out[sid] = rep[key]
        else:
            rep[key] = sid
    return out


def _exact_keys(pixels_sha256: Sequence[str | None] | None, sha256: Sequence[str | None] | None, n: int) -> list[str | None]:
    """Decoded-pixel digest where known, else the bytes' sha256 (same bytes ⇒ same pixels)."""
    keys: list[str | None] = [None] * n
    for src, tag in ((sha256, "b:"), (pixels_sha256, "p:")):
        if src is not None:
            for i, v in enumerate(src):
                if v is not None:
                    keys[i] = tag + v
    return keys


def _near_edges(codes: np.ndarray, radius: int, thumbs: np.ndarray | None, min_ncc: float) -> tuple[np.ndarray, np.ndarray]:
    """Pairs (i < j) within radius (and correlating ≥ min_ncc when thumbnails are given)."""
    qi, ci, _ = MultiIndexHash(codes).search(codes, radius)
    keep = qi < ci
    a, b = qi[keep], ci[keep]
    if thumbs is not None and len(a):
        ok = pair_ncc(thumbs[a], thumbs[b]) >= min_ncc
        a, b = a[ok], b[ok]
    return a, b


def within_dataset_duplicates(sample_ids: Sequence[str], hashes: np.ndarray | Sequence[int | None], radius: int, *,
                              sha256: Sequence[str | None] | None = None,
                              pixels_sha256: Sequence[str | None] | None = None,
                              low_info: Sequence[bool | None] | None = None,
                              thumbs: np.ndarray | None = None, min_ncc: float = DEFAULT_MIN_NCC) -> pa.Table:
    """Every duplicate row with its representative and reason (DUPLICATES_SCHEMA).

    Exact duplicates first (decoded-pixel digest, else bytes sha256); then near duplicates among
    the rest: pHash within ``radius`` (low-information rows excluded; pairs also verified by
    thumbnail correlation when ``thumbs`` are given), grouped transitively (connected components).
    Every group keeps its smallest ``sample_id``: deterministic whatever the shard order.
    """
    ids = [str(s) for s in sample_ids]
    n = len(ids)
    if len(set(ids)) != n:
        raise ValueError("within_dataset_duplicates: sample_ids are not unique")
    exact = _exact_groups(ids, _exact_keys(pixels_sha256, sha256, n))
    out_ids = list(exact)
    out_rep = [exact[s] for s in out_ids]
    out_reason = ["duplicate_exact"] * len(out_ids)
    hashes_arr = pa.array(hashes, pa.uint64()) if not isinstance(hashes, np.ndarray) else pa.array(hashes.astype(np.uint64))
    valid = hashes_arr.is_valid().to_numpy(zero_copy_only=False)
    if low_info is not None:
        valid &= ~pa.array(low_info, pa.bool_()).fill_null(True).to_numpy(zero_copy_only=False)
    valid &= np.array([s not in exact for s in ids], dtype=bool)
    # Work in sample_id order so that component roots are the smallest ids.
    rows = np.flatnonzero(valid)
    rows = rows[np.argsort(np.array([ids[r] for r in rows], dtype=object), kind="stable")] if len(rows) else rows
    if len(rows) > 1:
        codes = hashes_arr.fill_null(0).to_numpy().astype(np.uint64)[rows]
        a, b = _near_edges(codes, radius, thumbs[rows] if thumbs is not None else None, min_ncc)
        uf = _UnionFind(len(rows))
        for x, y in zip(a.tolist(), b.tolist()):
            uf.union(x, y)
        roots = uf.roots()
        near = {ids[rows[k]]: ids[rows[roots[k]]] for k in np.flatnonzero(roots != np.arange(len(rows)))}
        # An exact group's representative may itself be a near duplicate: point to the one kept.
        out_rep = [near.get(r, r) for r in out_rep]
        out_ids += list(near)
        out_rep += list(near.values())
        out_reason += ["duplicate_near"] * len(near)
    return pa.table({"sample_id": pa.array(out_ids, pa.string()), "representative": pa.array(out_rep, pa.string()),
                     "reason": pa.array(out_reason, pa.string())}, schema=DUPLICATES_SCHEMA).sort_by("sample_id")


def near_duplicate_drops(sample_ids: Sequence[str], hashes: np.ndarray | Sequence[int | None], radius: int, *,
                         sha256: Sequence[str | None] | None = None, **kwargs: Any) -> set[str]:
    """The sample_ids to drop so that each (exact or near) duplicate group keeps one representative."""
    return set(within_dataset_duplicates(sample_ids, hashes, radius, sha256=sha256, **kwargs)
               .column("sample_id").to_pylist())


# ------------------------------------------------------------------------------------------------
# Within the dataset, globally on Ray
# ------------------------------------------------------------------------------------------------

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _partition_of(keys: np.ndarray, num_partitions: int) -> np.ndarray:
    return ((keys.astype(np.uint64) * _GOLDEN) >> np.uint64(40)).astype(np.int64) % num_partitions


def _str_key(values: Sequence[str]) -> np.ndarray:
    return np.array([int(v[2:18], 16) if v else 0 for v in values], dtype=np.uint64)


def _map_exact(part: pa.Table, num_partitions: int) -> list[pa.Table]:
    """Shuffle map: (exact key, sample_id) rows, partitioned by key."""
    n = part.num_rows
    keys = _exact_keys(part.column("pixels_sha256").to_pylist() if "pixels_sha256" in part.column_names else None,
                       part.column("sha256").to_pylist() if "sha256" in part.column_names else None, n)
    rows = [i for i, k in enumerate(keys) if k is not None]
    t = pa.table({"key": pa.array([keys[i] for i in rows], pa.string()),
                  "sample_id": part.column("sample_id").take(pa.array(rows, pa.int64()))})
    p = _partition_of(_str_key(t.column("key").to_pylist()), num_partitions) if t.num_rows else np.zeros(0, np.int64)
    return [t.filter(pa.array(p == i)) for i in range(num_partitions)]


def _reduce_exact(*pieces: pa.Table) -> pa.Table:
    t = pa.concat_tables(pieces)
    exact = _exact_groups(t.column("sample_id").to_pylist(), t.column("key").to_pylist())
    return pa.table({"sample_id": pa.array(list(exact), pa.string()), "representative": pa.array(list(exact.values()), pa.string()),
                     "reason": pa.array(["duplicate_exact"] * len(exact), pa.string())}, schema=DUPLICATES_SCHEMA)


def _bands(radius: int) -> list[tuple[int, int]]:
    return _chunk_bits(radius + 1) if radius < 64 else [(0, 64)]


def _map_bands(part: pa.Table, kind: str, radius: int, num_partitions: int, exact_drops: frozenset[str]) -> list[pa.Table]:
    """Shuffle map: one (band, band value, sample_id, hash) row per pigeonhole band of each usable row."""
    ok = part.column(kind).is_valid()
    if "low_info" in part.column_names:
        ok = pc.and_(ok, pc.invert(part.column("low_info").fill_null(True)))
    if exact_drops:
        ok = pc.and_(ok, pc.invert(pc.is_in(part.column("sample_id"), pa.array(sorted(exact_drops), pa.string()))))
    part = part.filter(ok)
    codes = part.column(kind).to_numpy().astype(np.uint64)
    ids = part.column("sample_id")
    out: list[list[pa.Table]] = [[] for _ in range(num_partitions)]
    for band, (shift, bits) in enumerate(_bands(radius)):
        values = (codes >> np.uint64(shift)) & np.uint64((1 << bits) - 1 if bits < 64 else 0xFFFFFFFFFFFFFFFF)
        p = _partition_of(values ^ np.uint64(band), num_partitions)
        cols = {"band": pa.array(np.full(len(codes), band, np.int8)), "value": pa.array(values), "sample_id": ids,
                "code": pa.array(codes)}
        if "thumb" in part.column_names:
            cols["thumb"] = part.column("thumb")
        t = pa.table(cols)
        for i in range(num_partitions):
            out[i].append(t.filter(pa.array(p == i)))
    return [pa.concat_tables(ts) for ts in out]


def _reduce_bands(radius: int, min_ncc: float, *pieces: pa.Table) -> pa.Table:
    """Shuffle reduce: within each (band, value) group, every pair within radius is an edge."""
    t = pa.concat_tables(pieces)
    empty = pa.table({"a": pa.array([], pa.string()), "b": pa.array([], pa.string())})
    if t.num_rows < 2:
        return empty
    band = t.column("band").to_numpy()
    value = t.column("value").to_numpy()
    order = np.lexsort((value, band))
    band, value = band[order], value[order]
    codes = t.column("code").to_numpy()[order]
    ids = np.array(t.column("sample_id").to_pylist(), dtype=object)[order]
    thumbs = _thumbs_of(t.column("thumb").take(pa.array(order))) if "thumb" in t.column_names else None
    starts = np.flatnonzero(np.r_[True, (band[1:] != band[:-1]) | (value[1:] != value[:-1])])
    ends = np.r_[starts[1:], len(order)]
    edges_a, edges_b = [], []
    for s, e in zip(starts, ends):
        if e - s < 2:
            continue
        g = codes[s:e]
        d = np.bitwise_count(g[:, None] ^ g[None, :])
        i, j = np.nonzero(np.triu(d <= radius, k=1))
        if thumbs is not None and len(i):
            ok = pair_ncc(thumbs[s + i], thumbs[s + j]) >= min_ncc
            i, j = i[ok], j[ok]
        edges_a.extend(ids[s + i]), edges_b.extend(ids[s + j])
    if not edges_a:
        return empty
    return pa.table({"a": pa.array(edges_a, pa.string()), "b": pa.array(edges_b, pa.string())})


def _shuffle(ray: Any, map_fn: Callable, reduce_fn: Callable, refs: list, map_args: tuple, reduce_args: tuple,
             num_partitions: int) -> list[pa.Table]:
    """A map/reduce shuffle on Ray tasks: each map returns one piece per partition (num_returns),
    reducer i gets piece i of every map."""
    def map_task(part: pa.Table, *args: Any) -> Any:
        pieces = map_fn(part, *args)
        return pieces if num_partitions > 1 else pieces[0]

    mapper = ray.remote(map_task).options(num_returns=num_partitions)
    reducer = ray.remote(reduce_fn)
    mapped = [mapper.remote(r, *map_args) for r in refs]
    mapped = [m if num_partitions > 1 else [m] for m in mapped]
    return ray.get([reducer.remote(*reduce_args, *[m[i] for m in mapped]) for i in range(num_partitions)])


def within_dataset_duplicates_ray(parts: Sequence[Any], radius: int, *, kind: str = "phash",
                                  num_partitions: int | None = None, min_ncc: float | None = None) -> pa.Table:
    """Global exact + near duplicates over many parts (``pa.Table``s or Ray refs to them).

    Each part needs ``sample_id`` and ``<kind>``; optional ``sha256``, ``pixels_sha256``,
    ``low_info`` and ``thumb`` (pairs are then verified by correlation ≥ ``min_ncc``). Two Ray
    shuffles: exact keys → sample ids, then the r+1 pigeonhole bands of each hash → sample ids
    (two hashes within r share at least one band exactly). Reducers emit edges; components and
    their smallest-id representatives are found on the driver over the edges only. The result
    equals :func:`within_dataset_duplicates` on the concatenated parts.
    """
    import ray

    if not parts:
        return DUPLICATES_SCHEMA.empty_table()
    num_partitions = num_partitions or max(1, min(len(parts), int(ray.available_resources().get("CPU", 1))))
    verify = min_ncc if min_ncc is not None else DEFAULT_MIN_NCC
    refs = [p if isinstance(p, ray.ObjectRef) else ray.put(p) for p in parts]

    exact_parts = _shuffle(ray, _map_exact, _reduce_exact, refs, (num_partitions,), (), num_partitions)
    exact = pa.concat_tables([DUPLICATES_SCHEMA.empty_table(), *exact_parts])
    drops_ref = ray.put(frozenset(exact.column("sample_id").to_pylist()))
    edges = _shuffle(ray, _map_bands, _reduce_bands, refs, (kind, radius, num_partitions, drops_ref),
                     (radius, verify), num_partitions)
    a = [x for e in edges for x in e.column("a").to_pylist()]
    b = [x for e in edges for x in e.column("b").to_pylist()]
    nodes = sorted(set(a) | set(b))
    pos = {s: i for i, s in enumerate(nodes)}
    uf = _UnionFind(len(nodes))
    for x, y in zip(a, b):
        uf.union(pos[x], pos[y])
    roots = uf.roots() if nodes else np.zeros(0, np.int64)
    near_ids = [nodes[k] for k in range(len(nodes)) if roots[k] != k]
    near_rep = {s: nodes[roots[pos[s]]] for s in near_ids}
    exact = exact.set_column(1, DUPLICATES_SCHEMA.field("representative"), pa.array(
        [near_rep.get(r, r) for r in exact.column("representative").to_pylist()], pa.string()))
    near = pa.table({"sample_id": pa.array(near_ids, pa.string()),
                     "representative": pa.array([nodes[roots[pos[s]]] for s in near_ids], pa.string()),
                     "reason": pa.array(["duplicate_near"] * len(near_ids), pa.string())}, schema=DUPLICATES_SCHEMA)
    return pa.concat_tables([exact, near]).sort_by("sample_id")
