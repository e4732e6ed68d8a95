"""Small datasets for the trainer's tests: SHARD_SCHEMA shards + a manifest, from the bundled sample."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from infra.schema import SCHEMA_VERSION, SHARD_SCHEMA, conform


def sample_pairs(sample_parquet: Path, rows: int) -> pa.Table:
    """(sample_id, source, caption, image) rows from the bundled Openclipart sample."""
    table = pq.read_table(sample_parquet, columns=["id", "title", "keywords", "image"]).slice(0, rows)
    titles = table.column("title").to_pylist()
    keywords = table.column("keywords").to_pylist()
    captions = [f"{t}, {', '.join(k[:3])}" if k else t for t, k in zip(titles, keywords)]
    return pa.table({"sample_id": table.column("id"), "source": pa.array(["openclipart"] * table.num_rows),
                     "caption": pa.array(captions), "image": table.column("image")})


def write_dataset(root: Path, pairs: pa.Table, rows_per_shard: int) -> Path:
    """Write ``pairs`` as shards/part-NNNNN.parquet under ``root`` plus manifest.json; returns the manifest."""
    (root / "shards").mkdir(parents=True, exist_ok=True)
    shards = []
    for index, start in enumerate(range(0, pairs.num_rows, rows_per_shard)):
        part = conform(pairs.slice(start, rows_per_shard), SHARD_SCHEMA)
        key = f"shards/part-{index:05d}.parquet"
        pq.write_table(part, root / key, row_group_size=64)
        shards.append({"path": key, "rows": part.num_rows, "bytes": (root / key).stat().st_size})
    manifest = root / "manifest.json"
    manifest.write_text(json.dumps({"schema_version": SCHEMA_VERSION, "num_rows": pairs.num_rows, "shards": shards}))
    return manifest
