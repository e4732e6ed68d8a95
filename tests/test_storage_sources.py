"""Our data read by the field's tools and read from where the field keeps it: duckdb counts a
build's shards as a user's query engine would."""

from __future__ import annotations

import pyarrow as pa

from infra.manifest import read_manifest
from tests.trainer_fixtures import sample_pairs, write_dataset


def test_duckdb_counts_the_shards(tmp_path, sample_parquet, monkeypatch):
    import duckdb

    pairs = sample_pairs(sample_parquet, 50)
    pairs = pairs.append_column("query_ids", pa.array([[1, 2]] * 50, pa.list_(pa.int32())))
    manifest = write_dataset(tmp_path / "dataset", pairs, 20)
    monkeypatch.chdir(tmp_path / "dataset")
    con = duckdb.connect()
    (count,) = con.execute("SELECT count(*) FROM 'shards/*.parquet'").fetchone()
    assert count == read_manifest(str(manifest)).num_rows == 50
    # The columns come through typed: captions as text, images as bytes, query ids as a list.
    caption, image, ids = con.execute(
        "SELECT caption, image, query_ids FROM 'shards/*.parquet' ORDER BY sample_id LIMIT 1").fetchone()
    first = min(pairs.to_pylist(), key=lambda r: r["sample_id"])
    assert (caption, bytes(image), ids) == (first["caption"], first["image"], [1, 2])
