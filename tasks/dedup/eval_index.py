"""The eval-set index: every eval image described once, a versioned artifact in object storage.

Decontamination is two steps, as datatrove does it: this index is built once from the eval sets,
then :mod:`tasks.dedup.eval_overlap` drops every candidate that copies an eval image.

What the index holds, and why (numbers: ``bench/dedup_quality.py``):

- **Copy features** of every eval image (:mod:`tasks.dedup.copy_detect`): the square RGB thumbnail
  and shorter side (for verification), the RGB pixel digest (identical images, whatever their names).
- **Descriptor entries** for the lookup (:mod:`tasks.dedup.ann`): the image itself and
  ``VIEW_CROPS`` (a crop + zoom moves the descriptor most; an indexed crop of the eval image is
  close to a cropped copy). Flat eval images get no entry (their descriptor is noise); they are
  still found by their pixel digest.
- **A content version**: the eval sets' checksums, the build parameters, ``INDEX_FORMAT`` and a
  digest of the detector's source (:func:`detector_digest`): an unchanged registry is never
  rebuilt, and a changed detector or eval set gets a new version, never a stale index.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
from PIL import Image

from infra.imaging import to_rgb
from infra.log import get_logger, log_event, progress
from tasks.dedup import ann as _ann_module
from tasks.dedup import copy_detect
from tasks.dedup.ann import DescriptorIndex
from tasks.dedup.copy_detect import DEFAULT_MAX_HUE_SHIFT, DEFAULT_MIN_SCORE, DEFAULT_MIN_SCORE_SMALL, SIDE, copy_features

log = get_logger(__name__)

INDEX_FORMAT = 3  # bump when the stored layout changes: part of every index version
# (left, top) placement of a window of VIEW_SCALE of each side: centre and the four corners.
VIEW_SCALE = 0.93
VIEW_CROPS: tuple[tuple[float, float], ...] = ((0.5, 0.5), (0.0, 0.0), (1.0, 0.0), (0.0, 1.0), (1.0, 1.0))
DEFAULT_NEIGHBOURS = 10


def detector_digest() -> str:
    """sha256 of the detector's source (features, alignment, lookup, decision, this module): any
    change to how images are described or compared makes a new index version."""
    h = hashlib.sha256()
    for module in (copy_detect, _ann_module):
        h.update(Path(module.__file__).read_bytes())
    here = Path(__file__)
    # By path, not by import: alignment and verification need torch, building the index does not.
    for path in (here.with_name("align.py"), here.with_name("copy_verify.py")):
        h.update(path.read_bytes())
    for path in (here, here.with_name("eval_overlap.py")):  # the lookup and the decision
        h.update(path.read_bytes())
    return h.hexdigest()


def eval_index_version(eval_sets: Sequence[Any], **params: Any) -> str:
    """Content version of an index: the eval sets' checksums, the build params and the detector."""
    spec = {"format": INDEX_FORMAT, "detector": detector_digest(), "params": dict(sorted(params.items())),
            "sets": [(s.name, s.checksum()) for s in eval_sets]}
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:16]


def view_boxes(width: int, height: int) -> list[tuple[float, float, float, float]]:
    """The crop windows (PIL boxes) of an eval image's extra descriptor entries."""
    cw, ch = width * VIEW_SCALE, height * VIEW_SCALE
    return [(x * (width - cw), y * (height - ch), x * (width - cw) + cw, y * (height - ch) + ch) for x, y in VIEW_CROPS]


@dataclass
class EvalIndex:
    """Copy features of every eval image, and descriptor entries looked up by inner product."""

    version: str
    set_names: list[str]
    image_set: np.ndarray  # int32 per eval image: index into set_names
    image_ids: list[str]
    image_labels: np.ndarray  # int64
    image_flat: np.ndarray  # bool: no descriptor entry (matched by pixel digest only)
    thumbs: np.ndarray  # uint8 (images, SIDE, SIDE, 3)
    image_sides: np.ndarray  # int32: shorter side of each eval image
    image_digests: list[str]  # copy_detect.rgb_digest of each eval image
    entry_image: np.ndarray  # int64 per descriptor entry: which eval image
    descriptors: np.ndarray  # float32 (entries, DESCRIPTOR_DIM)
    params: dict = field(default_factory=dict)
    _ann: DescriptorIndex | None = field(default=None, repr=False)
    _by_digest: dict[str, list[int]] | None = field(default=None, repr=False)

    BUILD_DEFAULTS = {"views": True, "min_score": DEFAULT_MIN_SCORE, "min_score_small": DEFAULT_MIN_SCORE_SMALL,
                      "max_hue_shift": DEFAULT_MAX_HUE_SHIFT, "neighbours": DEFAULT_NEIGHBOURS}

    @classmethod
    def build(cls, eval_sets: Sequence[Any], *, views: bool = True, min_score: float = DEFAULT_MIN_SCORE,
              min_score_small: float = DEFAULT_MIN_SCORE_SMALL, max_hue_shift: float = DEFAULT_MAX_HUE_SHIFT,
              neighbours: int = DEFAULT_NEIGHBOURS) -> "EvalIndex":
        """Describe every image of every eval set (``infra.eval_sets.EvalSet``); the decision
        settings are kept with it (they are part of its version)."""
        params = {"views": views, "min_score": min_score, "min_score_small": min_score_small,
                  "max_hue_shift": max_hue_shift, "neighbours": neighbours}
        image_set, ids, labels, flat, thumbs, sides, digests = [], [], [], [], [], [], []
        entry_image, entry_thumbs = [], []
        total = sum(len(s.ids) for s in eval_sets)
        rows = ((si, s, j) for si, s in enumerate(eval_sets) for j in range(len(s.ids)))
        for si, s, j in progress(rows, desc="describe eval sets", total=total, unit="img"):
            with Image.open(io.BytesIO(s.images[j])) as img:
                img.load()
                rgb = to_rgb(img)
            f = copy_features(rgb)
            image_no = len(ids)
            image_set.append(si), ids.append(s.ids[j]), labels.append(int(s.labels[j]))
            flat.append(f.flat), thumbs.append(f.thumb), sides.append(f.min_side), digests.append(f.rgb_sha256)
            if f.flat:
                continue
            entry_image.append(image_no), entry_thumbs.append(f.thumb)
            if views:
                for box in view_boxes(*rgb.size):
                    view = rgb.resize((SIDE, SIDE), Image.BILINEAR, box=box)
                    entry_image.append(image_no), entry_thumbs.append(np.asarray(view, dtype=np.uint8))
        desc = (copy_detect.descriptors(np.stack(entry_thumbs)) if entry_thumbs
                else np.zeros((0, copy_detect.DESCRIPTOR_DIM), np.float32))
        index = cls(version=eval_index_version(eval_sets, **params), set_names=[s.name for s in eval_sets],
                    image_set=np.asarray(image_set, np.int32), image_ids=ids,
                    image_labels=np.asarray(labels, np.int64), image_flat=np.asarray(flat, bool),
                    thumbs=np.stack(thumbs) if thumbs else np.zeros((0, SIDE, SIDE, 3), np.uint8),
                    image_sides=np.asarray(sides, np.int32), image_digests=digests,
                    entry_image=np.asarray(entry_image, np.int64), descriptors=desc, params=params)
        log_event(log, "eval index built", version=index.version, images=len(ids), entries=len(entry_image),
                  flat=int(index.image_flat.sum()))
        return index

    @property
    def ann(self) -> DescriptorIndex:
        if self._ann is None:
            self._ann = DescriptorIndex(self.descriptors)
        return self._ann

    def images_with_digest(self, digest: str) -> list[int]:
        """Eval images whose RGB pixels are exactly these (``copy_detect.rgb_digest``)."""
        if self._by_digest is None:
            by: dict[str, list[int]] = {}
            for i, d in enumerate(self.image_digests):
                by.setdefault(d, []).append(i)
            self._by_digest = by
        return self._by_digest.get(digest, [])

    def lookup(self, descriptors: np.ndarray, neighbours: int | None = None
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The nearest eval images of each descriptor: (query index, eval image, similarity), at
        most ``neighbours`` distinct eval images per query (the best view of each)."""
        k = int(neighbours or self.params.get("neighbours", DEFAULT_NEIGHBOURS))
        views = 1 + (len(VIEW_CROPS) if self.params.get("views", True) else 0)
        sims, entries = self.ann.search(descriptors, k * views)
        qi = np.repeat(np.arange(len(descriptors), dtype=np.int64), sims.shape[1])
        entries, sims = entries.reshape(-1), sims.reshape(-1)
        ok = entries >= 0
        qi, img, sims = qi[ok], self.entry_image[entries[ok]], sims[ok]
        order = np.lexsort((-sims, img, qi))
        qi, img, sims = qi[order], img[order], sims[order]
        first = np.ones(len(qi), bool)
        first[1:] = (qi[1:] != qi[:-1]) | (img[1:] != img[:-1])
        qi, img, sims = qi[first], img[first], sims[first]
        order = np.lexsort((-sims, qi))
        qi, img, sims = qi[order], img[order], sims[order]
        rank = np.arange(len(qi)) - np.searchsorted(qi, qi, side="left")
        keep = rank < k
        return qi[keep], img[keep], sims[keep]

    # -- storage ---------------------------------------------------------------------------------

    def save(self, store: Any, key: str) -> None:
        """Write under ``key/`` (an ``infra.storage.ObjectStore``): Parquet tables, then index.json last."""
        images = pa.table({"set": pa.array(self.image_set, pa.int32()), "id": pa.array(self.image_ids, pa.string()),
                           "label": pa.array(self.image_labels, pa.int64()),
                           "flat": pa.array(self.image_flat, pa.bool_()),
                           "thumb": pa.array([t.tobytes() for t in self.thumbs], pa.binary()),
                           "min_side": pa.array(self.image_sides, pa.int32()),
                           "rgb_sha256": pa.array(self.image_digests, pa.string())})
        entries = pa.table({"image": pa.array(self.entry_image, pa.int64()),
                            "descriptor": pa.array([d.tobytes() for d in self.descriptors], pa.binary())})
        store.write_parquet(f"{key}/images.parquet", images)
        store.write_parquet(f"{key}/entries.parquet", entries)
        store.write_json(f"{key}/index.json", {"version": self.version, "format": INDEX_FORMAT,
                                              "detector": detector_digest(), "sets": self.set_names,
                                              "params": self.params, "images": len(self.image_ids),
                                              "entries": len(self.entry_image), "sizes": self.set_sizes()})

    @classmethod
    def load(cls, store: Any, key: str) -> "EvalIndex":
        meta = store.read_json(f"{key}/index.json")
        if meta.get("format") != INDEX_FORMAT or meta.get("detector") != detector_digest():
            raise ValueError(f"eval index {store.uri(key)}: built by another detector (format {meta.get('format')}); "
                             "rebuild it (its version changes with the detector)")
        images = store.read_parquet(f"{key}/images.parquet")
        entries = store.read_parquet(f"{key}/entries.parquet")
        thumbs = images.column("thumb").to_pylist()
        desc = entries.column("descriptor").to_pylist()
        return cls(version=meta["version"], set_names=list(meta["sets"]),
                   image_set=images.column("set").to_numpy().astype(np.int32),
                   image_ids=images.column("id").to_pylist(),
                   image_labels=images.column("label").to_numpy().astype(np.int64),
                   image_flat=images.column("flat").to_numpy(zero_copy_only=False).astype(bool),
                   thumbs=(np.frombuffer(b"".join(thumbs), np.uint8).reshape(-1, SIDE, SIDE, 3) if thumbs
                           else np.zeros((0, SIDE, SIDE, 3), np.uint8)),
                   image_sides=images.column("min_side").to_numpy().astype(np.int32),
                   image_digests=images.column("rgb_sha256").to_pylist(),
                   entry_image=entries.column("image").to_numpy().astype(np.int64),
                   descriptors=(np.frombuffer(b"".join(desc), np.float32).reshape(len(desc), -1) if desc
                                else np.zeros((0, copy_detect.DESCRIPTOR_DIM), np.float32)),
                   params=dict(meta["params"]))

    def set_sizes(self) -> dict[str, int]:
        counts = np.bincount(self.image_set, minlength=len(self.set_names))
        return {n: int(c) for n, c in zip(self.set_names, counts)}


def ensure_eval_index(eval_sets: Sequence[Any], store: Any, **params: Any) -> tuple[EvalIndex, bool]:
    """Load the index of these eval sets from ``store/<version>/`` or build and save it.

    Returns (index, built). The version is a content checksum (eval sets, parameters, detector
    source), so an unchanged registry is never rebuilt and a changed one gets a new version.
    """
    full = {**EvalIndex.BUILD_DEFAULTS, **params}
    version = eval_index_version(eval_sets, **full)
    if store.exists(f"{version}/index.json"):
        return EvalIndex.load(store, version), False
    index = EvalIndex.build(eval_sets, **full)
    index.save(store, version)
    return index, True
