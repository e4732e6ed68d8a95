"""Drop accounting: per-stage counts, merging across shards, and the STATS_SCHEMA table."""

from __future__ import annotations

import pyarrow as pa
import pytest

from infra.schema import STATS_SCHEMA
from infra.funnel import Funnel


def test_apply_keeps_unreasoned_rows_and_counts_reasons():
    table = pa.table({"x": list(range(5))})
    f = Funnel()
    out = f.apply("text", table, [None, "empty", None, "not_english", "empty"])
    assert out.column("x").to_pylist() == [0, 2]
    assert f.to_dict() == {"stages": [{"stage": "text", "in": 5, "out": 2, "dropped": {"empty": 2, "not_english": 1}}]}
    with pytest.raises(ValueError, match="3 reasons for 5 rows"):
        f.apply("text", table, [None, None, None])


def test_merge_across_shards_and_round_trip():
    a, b = Funnel(), Funnel()
    a.record("images", 10, 8, ["too_small", "corrupt_image"])
    b.record("images", 5, 4, ["too_small"])
    b.record("dedup", 4, 3, ["duplicate_exact"])
    merged = Funnel().merge(a).merge(b)
    assert merged.to_dict()["stages"][0] == {"stage": "images", "in": 15, "out": 12,
                                             "dropped": {"too_small": 2, "corrupt_image": 1}}
    assert Funnel.from_dict(merged.to_dict()).to_dict() == merged.to_dict()
    md = merged.to_markdown()
    assert "| images | 15 | too_small: 2, corrupt_image: 1 | 12 |" in md and "| dedup | 4 |" in md


def test_table_has_in_each_reason_and_out_per_stage():
    f = Funnel()
    f.record("text", 6, 3, ["empty", "empty", "machine_made"])
    table = f.to_table()
    assert table.schema.equals(STATS_SCHEMA, check_metadata=False)
    assert list(zip(*(table.column(c).to_pylist() for c in ("stage", "reason", "count")))) == [
        ("text", "in", 6), ("text", "empty", 2), ("text", "machine_made", 1), ("text", "out", 3)]
