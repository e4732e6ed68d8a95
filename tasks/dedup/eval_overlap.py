"""Decontamination: match candidates against the eval index and drop those that copy an eval image.

Why each step is there (numbers: bench/dedup_quality.py, Fashion-MNIST): hash candidates within
radius ``r`` come from the index's multi-index hashing (crop variants included); low-information
or unhashable candidates are never looked up (their bits are noise; unhashable rows are dropped
with a reason); every candidate pair is then verified by thumbnail correlation
(:mod:`tasks.dedup.verify`), because pHash alone matches far too many distinct small images.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from infra.funnel import Funnel
from tasks.dedup.eval_index import EvalIndex
from tasks.dedup.hashing import THUMB_SIDE, hash_table
from tasks.dedup.verify import pair_ncc, thumbs_of
from tasks.step import StepOutput

MATCHES_SCHEMA = pa.schema([
    pa.field("sample_id", pa.string(), nullable=False),
    pa.field("eval_set", pa.string(), nullable=False),
    pa.field("eval_id", pa.string(), nullable=False),
    pa.field("eval_label", pa.int64()),
    pa.field("distance", pa.int32()),  # pHash Hamming distance to the matched (crop of the) eval image
    pa.field("crop_variant", pa.int8()),
    pa.field("ncc", pa.float32()),
])


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
        cand_thumbs = thumbs_of(table.column("thumb").take(pa.array(rows)))
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


EVAL_MATCHES = "eval_matches"  # the step's side output


def filter_eval_overlap(table: pa.Table, index: EvalIndex, radius: int, *, min_ncc: float | None = None
                        ) -> StepOutput:
    """The decontamination step: drop candidates that near-duplicate an eval image.

    The funnel's stage ``dedup_eval`` counts reasons ``eval_overlap:<set>`` and ``unhashable_image``;
    the ``eval_matches`` side output holds every verified (sample, eval image) pair (MATCHES_SCHEMA).
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
    return StepOutput(kept, funnel, {EVAL_MATCHES: matches})


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

