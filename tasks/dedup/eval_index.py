"""The eval-set index: every eval image hashed once, a versioned artifact in object storage.

Decontamination is two steps, as datatrove does it: this index is built once from the eval sets,
then :mod:`tasks.dedup.eval_overlap` drops every candidate that matches an eval image.

Why the index holds what it holds (numbers: bench/dedup_quality.py, Fashion-MNIST):

- **Crop variants**: each eval image is hashed as is and under 9 crops of ≤5%
  (``hashing.CROP_VARIANTS``), so a cropped copy still lands within ``r`` of one of them (pHash
  alone moves ~6–16 bits under a 5% crop of a 28-px image).
- **Low-information eval images** are not indexed (their hash bits are noise and collide).
- **Thumbnails and shorter sides** of every eval image, for pixel verification.
- **A content version** (the eval sets' checksums, the hash kind, the build parameters and
  ``INDEX_FORMAT``): an unchanged registry is never re-hashed, a changed one gets a new version.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
from PIL import Image

from infra.imaging import to_gray
from infra.log import get_logger, log_event, progress
from tasks.dedup.hashing import CROP_VARIANTS, LOW_INFO_MAX_STD, THUMB_SIDE, check_kind, hash_code, thumbnail
from tasks.dedup.mih import MultiIndexHash
from tasks.dedup.verify import DEFAULT_MIN_NCC, thumbs_of

log = get_logger(__name__)

INDEX_FORMAT = 2  # bump when hashing/thumbnails change: part of every index version


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
        check_kind(kind)
        params = {"crop_variants": crop_variants, "low_info_max_std": low_info_max_std, "min_ncc": min_ncc}
        variants = CROP_VARIANTS if crop_variants else CROP_VARIANTS[:1]
        image_set, ids, labels, low, thumbs, sides = [], [], [], [], [], []
        entry_image, entry_variant, entry_codes = [], [], []
        total = sum(len(s.ids) for s in eval_sets)
        rows = ((si, s, j) for si, s in enumerate(eval_sets) for j in range(len(s.ids)))
        for si, s, j in progress(rows, desc="hash eval sets", total=total, unit="img"):
            with Image.open(io.BytesIO(s.images[j])) as img:
                img.load()
                gray = to_gray(img)
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
                   thumbs=thumbs_of(images.column("thumb")),
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

