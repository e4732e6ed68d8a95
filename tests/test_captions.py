"""Captions (tasks/captions.py): the named boilerplate patterns, composition from a source's text
fields with provenance, the repeated-caption count (different images, not copies) and its report."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest

from infra.config import CaptionConfig, ConfigError, SourceConfig, config_from_dict, to_dict
from tasks.captions import (AUTHOR_CREDIT, BOILERPLATE, COLLECTION_STAMP, CONVERTED_FROM, DATE_STAMP, EMAIL_ADDRESS,
                            OUTCOMES, PATTERNS, CaptionStep, apply_patterns, boilerplate_values, caption_pieces,
                            caption_image_pieces, compose, count_caption_images, count_captions, image_identity,
                            length_histogram, normalise, policy_field_text, render_caption_lengths, repeated_caption_report)

ALL = PATTERNS


@pytest.mark.parametrize("text, reason", [
    ("Part of the Flat Icon Collection (Wed Aug 25 23:29:46 2004)", DATE_STAMP),
    ("exported 2004-08-25T23:29", DATE_STAMP),
    ("SVG Gradient Collection by Alan Horkan, 2004.", COLLECTION_STAMP),
    ("Part of Hotel Icons Collection", COLLECTION_STAMP),
    ("Lemon SVG theme", COLLECTION_STAMP), ("gold-theme", COLLECTION_STAMP), ("plastik-icon-theme", COLLECTION_STAMP),
    ("blueberry - iconset", COLLECTION_STAMP), ("Various Cliparts", COLLECTION_STAMP),
    ("collection of satellite engineering related clipart", COLLECTION_STAMP),
    ("jean.victor.balin@gmail.com", EMAIL_ADDRESS), ("contact: hermann@example.de", EMAIL_ADDRESS),
    ("EPS converted from  http://aiga.org", CONVERTED_FROM),
    ("Photo by John Smith", AUTHOR_CREDIT),
])
def test_named_patterns_drop(text: str, reason: str) -> None:
    assert apply_patterns(text, ALL) == (None, reason)


@pytest.mark.parametrize("text, kept", [
    ("Clipart by Steve Hall - United States - South Carolina", "United States - South Carolina"),
    ("Clipart by Nicu Buculei - jigsaw_red_10", "jigsaw_red_10"),
    ("Telefono (email: frollandin@email.it)", "Telefono"),
    ("sunset over the bay © Jane Doe", "sunset over the bay"),
    # descriptions, not boilerplate
    ("A collection of stamps", "A collection of stamps"), ("A theme park ride", "A theme park ride"),
    ("Christmas 2004", "Christmas 2004"), ("Stamp collection", "Stamp collection"), ("card", "card"),
])
def test_named_patterns_strip_credits_and_keep_descriptions(text: str, kept: str) -> None:
    assert apply_patterns(text, ALL) == (kept, None)


def test_patterns_are_per_source_and_checked_in_config() -> None:
    assert apply_patterns("Lemon SVG theme", [DATE_STAMP]) == ("Lemon SVG theme", None)
    with pytest.raises(ConfigError, match="unknown"):
        CaptionConfig(patterns=("typo",))
    with pytest.raises(ConfigError):
        CaptionConfig(fields=())
    assert SourceConfig(kind="openclipart", path="x").caption == CaptionConfig()


def test_joined_fields_append_new_keywords_once() -> None:
    """A "+" name is one field: the first text, then the others' items that are new (the
    ``caption_keywords`` preset is "caption+keywords")."""
    fields = {"caption": "Cartoon cat", "keywords": ["cat", "cartoon cat", "cat", " pet ", None]}
    assert policy_field_text(fields, "caption+keywords") == "Cartoon cat, cat, pet"
    assert policy_field_text({"caption": " ", "keywords": ["cat", "pet"]}, "caption+keywords") == "cat, pet"
    assert policy_field_text({"caption": "Tux", "keywords": [], "alt": "penguin"}, "caption+keywords+alt") == "Tux, penguin"
    assert policy_field_text({"caption": None, "keywords": []}, "caption+keywords") is None
    assert policy_field_text(fields, "caption") == "Cartoon cat"
    # one field for the patterns and the boilerplate count: a stamp anywhere drops it
    out = compose({"caption": "Sun", "keywords": ["Wed Aug 25 23:29:46 2004"]}, CaptionConfig(fields=("caption+keywords",)))
    assert out.caption is None and out.reason == DATE_STAMP
    out = compose(fields, CaptionConfig(fields=("caption+keywords",)))
    assert out.caption == "Cartoon cat, cat, pet" and out.fields == ("caption+keywords",)


def test_caption_keywords_is_a_preset_of_the_caption_policy() -> None:
    preset = SourceConfig(kind="openclipart", path="x", caption_keywords=True)
    assert preset.caption == CaptionConfig(fields=("caption+keywords",))
    explicit = SourceConfig(kind="emoji", path="x", caption=CaptionConfig(fields=("title", "caption"), append=("caption",)),
                            caption_keywords=True)
    assert explicit.caption.fields == ("title", "caption+keywords") and explicit.caption.append == ("caption+keywords",)
    # idempotent: the resolved config (as saved beside the outputs) loads to the same policy
    again = config_from_dict({"sources": [to_dict(preset)]}).sources[0]
    assert again == preset
    with pytest.raises(ConfigError, match="empty part"):
        CaptionConfig(fields=("caption+",))
    with pytest.raises(ConfigError, match="empty part"):
        CaptionConfig(append=("+keywords",))


def test_normalise() -> None:
    assert normalise("BlueMan#109") == normalise("blueman 210") == "blueman 0"
    assert normalise("  Gramastar!! ") == "gramastar"
    assert normalise("Ｃａｒｄ") == "card"  # NFKC


POLICY = CaptionConfig(fields=("title", "keywords"), append=("description",), append_max_chars=60)


def test_compose_falls_back_and_appends_short_fields() -> None:
    fields = {"title": "gramastar", "keywords": ["stars", "shapes", "stars", " "], "description": "A ten-pointed star"}
    out = compose(fields, POLICY, frozenset({"gramastar"}))
    assert out.caption == "stars, shapes. A ten-pointed star" and out.fields == ("keywords", "description")
    assert out.skipped == {"title": (BOILERPLATE, "gramastar")}
    # A description already in the caption, or too long, is not appended
    assert compose({"title": "Tux", "description": "tux"}, POLICY).caption == "Tux"
    assert compose({"title": "Tux", "description": "x" * 61}, POLICY).fields == ("title",)
    # Nothing usable: the first field's reason
    out = compose({"title": "Lemon SVG theme", "keywords": ["gramastar"]}, POLICY, frozenset({"gramastar"}))
    assert out.caption is None and out.reason == COLLECTION_STAMP and set(out.skipped) == {"title", "keywords"}
    # All empty: no reason (the text filter counts it as empty)
    assert compose({"title": " ", "keywords": []}, POLICY) == compose({}, POLICY)
    assert compose({}, POLICY).reason is None and compose({}, POLICY).caption is None


def _candidates(rows: list[tuple[str, str | None, dict, bytes | None, str | None]]) -> pa.Table:
    return pa.table({"sample_id": [r[0] for r in rows], "source": ["t"] * len(rows), "caption": [r[1] for r in rows],
                     "url": pa.array([r[4] for r in rows], pa.string()),
                     "image": pa.array([r[3] for r in rows], pa.binary()),
                     "meta": [json.dumps(r[2]) for r in rows]})


def test_caption_step_records_provenance_and_outcomes() -> None:
    table = _candidates([
        ("a", "gramastar", {"title": "gramastar", "keywords": ["star"]}, b"1", None),
        ("b", "gramastar", {"title": "gramastar", "keywords": []}, b"2", None),
        ("c", "Red car", {"title": "Red car", "keywords": ["car"]}, b"3", None),
        ("d", "Lemon SVG theme", {"title": "Lemon SVG theme"}, b"4", None),
        ("e", None, {"title": ""}, b"5", None),
    ])
    out = CaptionStep(POLICY, frozenset({"gramastar"}))(table)
    assert out.table.column("sample_id").to_pylist() == ["a", "c", "e"]
    assert out.table.column("caption").to_pylist() == ["star", "Red car", None]
    meta = [json.loads(m) for m in out.table.column("meta").to_pylist()]
    assert meta[0]["caption_fields"] == ["keywords"] and meta[0]["caption_skipped"] == {"title": [BOILERPLATE, "gramastar"]}
    assert meta[1]["caption_fields"] == ["title"] and meta[0]["title"] == "gramastar"  # source fields kept
    assert out.funnel.to_dict()["stages"] == [{"stage": "caption", "in": 5, "out": 3,
                                               "dropped": {BOILERPLATE: 1, COLLECTION_STAMP: 1}}]
    assert sorted(zip(*(out.side[OUTCOMES].column(c).to_pylist() for c in ("value", "outcome", "rows")))) == \
        [("gramastar", "dropped", 1), ("gramastar", "keywords", 1)]


def test_repeated_captions_count_different_images_not_copies() -> None:
    policy = CaptionConfig(fields=("title",))
    rows = [(f"s{i}", "Gramastar", {"title": "Gramastar"}, f"img{i}".encode(), None) for i in range(5)]
    rows += [(f"c{i}", "A lighthouse", {"title": "A lighthouse"}, b"same bytes", None) for i in range(6)]  # copies
    rows += [(f"u{i}", "logo", {"title": "logo"}, None, f"http://h/{i % 3}.png") for i in range(9)]  # 3 URLs
    table = _candidates(rows)
    pieces = [caption_pieces(table.slice(0, 8), policy, 3), caption_pieces(table.slice(8), policy, 3)]
    partitions = [count_captions([p[k] for p in pieces], min_images=4) for k in range(3)]
    counts = pa.concat_tables(partitions).sort_by([("images", "descending")])
    got = {r["value"]: (r["rows"], r["images"], r["boilerplate"]) for r in counts.to_pylist()}
    assert got == {"gramastar": (5, 5, True), "logo": (9, 3, False), "a lighthouse": (6, 1, False)}
    assert boilerplate_values(counts) == frozenset({"gramastar"})
    # the same answer from one partition as from three
    assert count_captions(caption_pieces(table, policy, 1), 4).to_pylist() == counts.to_pylist()
    assert image_identity("http://h/1.png", b"x", "id") == image_identity("http://h/1.png", None, "other")
    assert image_identity(None, b"x", "a") == image_identity(None, b"x", "b") != image_identity(None, b"y", "a")


def test_count_keeps_boilerplate_and_the_most_repeated_others() -> None:
    policy = CaptionConfig(fields=("title",))
    rows = [(f"{v}{i}", v, {"title": v}, f"{v}{i}".encode(), None) for v, n in (("aa", 6), ("bb", 3), ("cc", 2), ("dd", 1))
            for i in range(n)]
    counts = count_captions(caption_pieces(_candidates(rows), policy, 1), min_images=5, keep_top=1)
    assert [(r["value"], r["images"], r["boilerplate"]) for r in counts.to_pylist()] == [("aa", 6, True), ("bb", 3, False)]


def test_report_and_histogram() -> None:
    counts = pa.table({"value": ["gramastar", "card"], "rows": pa.array([4, 3], pa.int64()),
                       "images": pa.array([4, 3], pa.int64()), "example": ["gramastar", "card"],
                       "boilerplate": [True, False]})
    outcomes = pa.table({"value": ["gramastar", "gramastar"], "outcome": ["keywords", "dropped"],
                         "rows": pa.array([3, 1], pa.int64())})
    metas = [json.dumps({"caption_skipped": {"title": [BOILERPLATE, "gramastar"]}})] * 3 + [None, None]
    output = pa.table({"caption": ["star", "star", "stars", "card", "Card"], "meta": metas,
                       "phash": pa.array([1, 1, 2, 7, 8], pa.uint64())})
    pieces = caption_image_pieces(output, frozenset({"gramastar", "card", "star"}), 2)
    assert all(set(np.asarray(p.column("phash")) % 2) <= {k} for k, p in enumerate(pieces))  # split by hash
    by_hash = dict(zip(*count_caption_images(pieces).to_pydict().values()))
    assert by_hash == {"gramastar": 2, "card": 2, "star": 1}  # distinct hashes: 1 twice counts once
    table = repeated_caption_report(counts, outcomes, by_hash)
    assert table.to_pylist()[0] | {} == {"rank": 1, "caption": "gramastar", "value": "gramastar", "rows": 4, "images": 4,
                                         "boilerplate": True, "outcome": "keywords 3; dropped 1", "rows_out": 3,
                                         "images_by_hash": 2}
    assert table.to_pylist()[1]["outcome"] == "kept" and table.to_pylist()[1]["rows_out"] is None
    flagged = counts.set_column(4, "boilerplate", pa.array([True, True]))
    assert repeated_caption_report(flagged, outcomes, by_hash).to_pylist()[1]["outcome"].startswith("never the caption")
    assert length_histogram(["a b", None, "x " * 50])[:3] == [1, 0, 1] and length_histogram(["x " * 50])[-1] == 1
    assert render_caption_lengths(length_histogram(["a"]), length_histogram(["a b"]))[:4] == b"\x89PNG"
