"""Decontamination: match candidates against the eval index and drop those that copy an eval image.

Why each step is there (numbers: ``bench/dedup_quality.py``):

- **Identical pixels first**: a candidate whose RGB pixels equal an eval image's is a copy whatever
  its name, bytes or flatness (``method = "pixels"``, score 1).
- **Nearest eval images** by descriptor (:meth:`EvalIndex.lookup`: the ``neighbours`` nearest,
  crop views included); flat or undecodable candidates are never looked up (undecodable rows are
  dropped with a reason, flat ones kept unless identical).
- **Verification** of each of those pairs (:func:`tasks.dedup.copy_verify.verify`): alignment, then
  the structure score ≥ ``min_score`` and colours consistent with jitter (``method = "aligned"``).
"""

from __future__ import annotations

import io
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image

from infra.funnel import Funnel
from tasks.dedup.copy_detect import (COPY_COLUMNS, DEFAULT_MAX_HUE_SHIFT, DEFAULT_MIN_SCORE, DEFAULT_MIN_SCORE_SMALL,
                                     SIDE, descriptors_from_column, thumbs_from_column)
from tasks.dedup.eval_index import EvalIndex
from tasks.dedup.hashing import hash_table
from tasks.step import StepOutput

MATCHES_SCHEMA = pa.schema([
    pa.field("sample_id", pa.string(), nullable=False),
    pa.field("eval_set", pa.string(), nullable=False),
    pa.field("eval_id", pa.string(), nullable=False),
    pa.field("eval_label", pa.int64()),
    pa.field("score", pa.float32()),  # structure score after alignment (1 for identical pixels)
    pa.field("hue_shift", pa.float32()),  # mean hue difference, fraction of the circle
    pa.field("descriptor_sim", pa.float32()),  # the lookup's similarity (1 for identical pixels)
    pa.field("method", pa.string()),  # "pixels" | "aligned"
    pa.field("candidate_png", pa.binary()),  # a small preview of the candidate, for the report sheet
])
PREVIEW_SIDE = 96
MIN_DESCRIPTOR_SIM = 0.6  # below this a neighbour is not verified (true copies: ≥ 0.7 in 95% of cases)
EVAL_MATCHES = "eval_matches"  # the step's side output


def _ensure_features(table: pa.Table) -> pa.Table:
    needed = (*COPY_COLUMNS, "min_side")
    return table if all(c in table.column_names for c in needed) else hash_table(table)


def preview_png(data: bytes | None, side: int = PREVIEW_SIDE) -> bytes | None:
    """A small RGB PNG of encoded image bytes (None if they cannot be decoded)."""
    from infra.imaging import decode_rgb

    try:
        img = decode_rgb(data) if data else None
    except (OSError, ValueError, Image.DecompressionBombError, SyntaxError):
        return None
    if img is None:
        return None
    img.thumbnail((side, side), Image.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def candidate_scores(table: pa.Table, index: EvalIndex, *, neighbours: int | None = None,
                     max_hue_shift: float | None = None) -> dict[str, np.ndarray]:
    """Every (row, eval image) pair worth a decision: identical pixels, then the verified nearest
    eval images. Arrays ``row``, ``image``, ``score`` (−1 where colours disagree or the pair
    cannot be compared), ``hue_shift``, ``descriptor_sim``, ``identical`` and ``small`` (bool: the
    eval image is under SIDE px). Pairs below ``MIN_DESCRIPTOR_SIM`` are not verified."""
    max_hue = index.params.get("max_hue_shift", DEFAULT_MAX_HUE_SHIFT) if max_hue_shift is None else max_hue_shift
    digests = table.column("rgb_sha256").to_pylist()
    rows_p, imgs_p = [], []
    for r, d in enumerate(digests):
        for i in index.images_with_digest(d) if d else ():
            rows_p.append(r), imgs_p.append(i)
    flat = table.column("copy_flat").fill_null(True).to_numpy(zero_copy_only=False)
    usable = np.flatnonzero(~flat)
    identical_rows = set(rows_p)
    usable = np.array([r for r in usable if r not in identical_rows], np.int64)
    qi, img, sim = (index.lookup(descriptors_from_column(table.column("copy_desc").take(pa.array(usable))), neighbours)
                    if len(usable) else (np.zeros(0, np.int64),) * 2 + (np.zeros(0, np.float32),))
    gate = sim >= MIN_DESCRIPTOR_SIM
    qi, img, sim = qi[gate], img[gate], sim[gate]
    rows_a = usable[qi] if len(usable) else np.zeros(0, np.int64)
    if len(rows_a):
        # Imported here: torch is for verifying pairs; a clean worker that only writes this module's
        # side outputs (``EVAL_MATCHES``), or has no candidates, never loads it.
        from tasks.dedup.copy_verify import verify

        thumbs = thumbs_from_column(table.column("copy_thumb").take(pa.array(rows_a)))
        sides = np.minimum(table.column("min_side").take(pa.array(rows_a)).fill_null(0).to_numpy(), index.image_sides[img])
        small_a = index.image_sides[img] < SIDE
        v = verify(thumbs, index.thumbs[img], sides=sides, max_hue_shift=max_hue)
        score, hue = np.where(v.colour_ok, v.score, -1.0).astype(np.float32), v.hue_shift
    else:
        score = hue = np.zeros(0, np.float32)
        small_a = np.zeros(0, bool)
    n_p = len(rows_p)
    return {"row": np.concatenate([np.asarray(rows_p, np.int64), rows_a]),
            "image": np.concatenate([np.asarray(imgs_p, np.int64), img]),
            "score": np.concatenate([np.ones(n_p, np.float32), score]),
            "hue_shift": np.concatenate([np.zeros(n_p, np.float32), hue]),
            "descriptor_sim": np.concatenate([np.ones(n_p, np.float32), sim.astype(np.float32)]),
            "identical": np.r_[np.ones(n_p, bool), np.zeros(len(rows_a), bool)],
            "small": np.r_[np.zeros(n_p, bool), small_a]}


def pair_thresholds(pairs: dict[str, np.ndarray], min_score: float, min_score_small: float) -> np.ndarray:
    """The score each pair must reach: ``min_score_small`` where the eval image is under SIDE px."""
    return np.where(pairs["small"], min_score_small, min_score).astype(np.float32)


def match_eval(table: pa.Table, index: EvalIndex, *, min_score: float | None = None,
               min_score_small: float | None = None, neighbours: int | None = None,
               max_hue_shift: float | None = None) -> pa.Table:
    """The matches of a table's rows against the index (MATCHES_SCHEMA): identical pixels, and
    verified pairs scoring ≥ ``min_score`` (``min_score_small`` for eval images under SIDE px;
    the index's settings when None)."""
    table = _ensure_features(table)
    min_score = index.params.get("min_score", DEFAULT_MIN_SCORE) if min_score is None else min_score
    if min_score_small is None:
        min_score_small = index.params.get("min_score_small", DEFAULT_MIN_SCORE_SMALL)
    pairs = candidate_scores(table, index, neighbours=neighbours, max_hue_shift=max_hue_shift)
    keep = pairs["identical"] | (pairs["score"] >= pair_thresholds(pairs, min_score, min_score_small))
    rows, img = pairs["row"][keep], pairs["image"][keep]
    if not len(rows):
        return MATCHES_SCHEMA.empty_table()
    take = pa.array(rows, pa.int64())
    images = table.column("image").take(take).to_pylist() if "image" in table.column_names else [None] * len(rows)
    return pa.table({
        "sample_id": table.column("sample_id").take(take),
        "eval_set": pa.array([index.set_names[s] for s in index.image_set[img]], pa.string()),
        "eval_id": pa.array([index.image_ids[i] for i in img], pa.string()),
        "eval_label": pa.array(index.image_labels[img], pa.int64()),
        "score": pa.array(pairs["score"][keep], pa.float32()),
        "hue_shift": pa.array(pairs["hue_shift"][keep], pa.float32()),
        "descriptor_sim": pa.array(pairs["descriptor_sim"][keep], pa.float32()),
        "method": pa.array(np.where(pairs["identical"][keep], "pixels", "aligned").tolist(), pa.string()),
        "candidate_png": pa.array([preview_png(b) for b in images], pa.binary()),
    }, schema=MATCHES_SCHEMA)


def filter_eval_overlap(table: pa.Table, index: EvalIndex, *, min_score: float | None = None,
                        min_score_small: float | None = None, neighbours: int | None = None,
                        max_hue_shift: float | None = None) -> StepOutput:
    """The decontamination step: drop candidates that copy an eval image.

    The funnel's stage ``dedup_eval`` counts reasons ``eval_overlap:<set>`` and ``unhashable_image``;
    the ``eval_matches`` side output holds every match (MATCHES_SCHEMA).
    """
    table = _ensure_features(table)
    funnel = Funnel()
    matches = match_eval(table, index, min_score=min_score, min_score_small=min_score_small, neighbours=neighbours,
                         max_hue_shift=max_hue_shift)
    reasons: list[str | None] = [None] * table.num_rows
    for i, valid in enumerate(table.column("rgb_sha256").is_valid().to_pylist()):
        if not valid:
            reasons[i] = "unhashable_image"
    if matches.num_rows:
        # The reason names the best match's eval set (highest score, then the set's name).
        best: dict[str, tuple[float, str]] = {}
        for sid, name, score in zip(*(matches.column(c).to_pylist() for c in ("sample_id", "eval_set", "score"))):
            cand = (-score, name)
            if sid not in best or cand < best[sid]:
                best[sid] = cand
        for i, sid in enumerate(table.column("sample_id").to_pylist()):
            if sid in best:
                reasons[i] = f"eval_overlap:{best[sid][1]}"
    kept = funnel.apply("dedup_eval", table, reasons)
    return StepOutput(kept, funnel, {EVAL_MATCHES: matches})


def overlap_report(matches: pa.Table | Sequence[pa.Table], index: EvalIndex) -> dict[str, dict]:
    """Per eval set, as CLIP's overlap analysis: how many eval images have a near-copy among the
    candidates (``overlap``/``overlap_pct``), plus the candidates dropped for it."""
    if not isinstance(matches, pa.Table):
        matches = pa.concat_tables([MATCHES_SCHEMA.empty_table(), *matches]) if matches else MATCHES_SCHEMA.empty_table()
    sizes = index.set_sizes()
    flat = np.bincount(index.image_set[index.image_flat], minlength=len(index.set_names))
    report = {}
    for si, name in enumerate(index.set_names):
        sub = matches.filter(pc.equal(matches.column("eval_set"), name)) if matches.num_rows else matches
        overlapping = len(set(sub.column("eval_id").to_pylist()))
        total = sizes[name]
        methods = sub.column("method").to_pylist()
        report[name] = {"eval_images": total, "flat_matched_by_pixels_only": int(flat[si]), "overlap": overlapping,
                        "overlap_pct": round(100.0 * overlapping / total, 3) if total else 0.0,
                        "clean": total - overlapping,
                        "candidates_matched": len(set(sub.column("sample_id").to_pylist())),
                        "identical_pixels": methods.count("pixels")}
    return report
