"""The decontamination report a person can check: every drop as a table, the matches as a picture.

``reports/eval_matches.parquet`` holds one row per (dropped candidate, eval image) match
(``MATCHES_COLUMNS``: ``sample_id``, ``eval_set``, ``eval_id``, ``score`` and how it matched), so
any drop can be audited and a build scored end to end. ``reports/eval_matches.png`` shows matches
side by side (candidate | eval image | score): per eval set, the highest-scoring ones and the ones
nearest the threshold, where a wrong drop would show first.
"""

from __future__ import annotations

import io
from typing import Callable

import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image, ImageDraw

from infra.imaging import decode_rgb

MATCHES_COLUMNS = ("sample_id", "eval_set", "eval_id", "eval_label", "score", "method", "hue_shift", "descriptor_sim")
CELL = 96  # pixels per image on the sheet
_LABEL_H = 14
_PAIR_W = 2 * CELL + 8


def matches_table(matches: pa.Table) -> pa.Table:
    """The audit table: every match without the previews, sorted by eval set, score (desc), sample_id."""
    table = matches.select(list(MATCHES_COLUMNS))
    order = pc.sort_indices(table, sort_keys=[("eval_set", "ascending"), ("score", "descending"),
                                              ("sample_id", "ascending")])
    return table.take(order)


def _chosen(matches: pa.Table, per_set: int) -> list[int]:
    """Row numbers to draw: per eval set, the top-scoring half and the lowest-scoring half."""
    rows: list[int] = []
    sets = matches.column("eval_set").to_pylist()
    scores = matches.column("score").to_pylist()
    for name in sorted(set(sets)):
        mine = sorted((i for i, s in enumerate(sets) if s == name), key=lambda i: (-scores[i], i))
        if len(mine) <= per_set:
            rows += mine
        else:
            top = per_set - per_set // 2
            rows += mine[:top] + mine[len(mine) - per_set // 2:]
    return rows


def _tile(data: bytes | None) -> Image.Image:
    tile = Image.new("RGB", (CELL, CELL), (235, 235, 235))
    try:
        img = decode_rgb(data) if data else None
    except (OSError, ValueError):
        img = None
    if img is not None:
        img.thumbnail((CELL, CELL), Image.BILINEAR)
        tile.paste(img, ((CELL - img.width) // 2, (CELL - img.height) // 2))
    return tile


def match_sheet(matches: pa.Table, eval_image: Callable[[str, str], bytes | None], *, per_set: int = 12,
                columns: int = 4) -> bytes | None:
    """PNG of matches side by side: candidate | eval image, with eval set, score and method below.

    ``matches`` has ``candidate_png`` (``eval_overlap.MATCHES_SCHEMA``); ``eval_image(set, id)``
    returns the eval image's bytes. None when there is nothing to show."""
    rows = _chosen(matches, per_set)
    if not rows:
        return None
    lines = (len(rows) + columns - 1) // columns
    sheet = Image.new("RGB", (columns * _PAIR_W, lines * (CELL + 2 * _LABEL_H + 6)), "white")
    draw = ImageDraw.Draw(sheet)
    cols = {c: matches.column(c).to_pylist() for c in ("sample_id", "eval_set", "eval_id", "score", "method",
                                                      "candidate_png")}
    for k, r in enumerate(rows):
        x, y = (k % columns) * _PAIR_W, (k // columns) * (CELL + 2 * _LABEL_H + 6)
        sheet.paste(_tile(cols["candidate_png"][r]), (x, y))
        sheet.paste(_tile(eval_image(cols["eval_set"][r], cols["eval_id"][r])), (x + CELL + 2, y))
        draw.text((x, y + CELL), f"{cols['eval_set'][r][:14]} {cols['score'][r]:.3f} {cols['method'][r]}",
                  fill=(180, 0, 0))
        draw.text((x, y + CELL + _LABEL_H), f"{cols['sample_id'][r][-16:]} | {cols['eval_id'][r][-14:]}",
                  fill=(60, 60, 60))
    buf = io.BytesIO()
    sheet.save(buf, "PNG")
    return buf.getvalue()


def eval_images_by_id(eval_sets: list) -> Callable[[str, str], bytes | None]:
    """``eval_image(set, id)`` over loaded ``infra.eval_sets.EvalSet`` objects."""
    lookup = {(s.name, i): img for s in eval_sets for i, img in zip(s.ids, s.images)}
    return lambda name, id_: lookup.get((name, id_))
