"""Small datasets for the trainer's tests: SHARD_SCHEMA shards + a manifest, from the bundled sample."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from infra.manifest import build_manifest, write_manifest
from infra.storage import ObjectStore
from tasks.shards import write_shard


def sample_pairs(sample_parquet: Path, rows: int) -> pa.Table:
    """(sample_id, source, caption, image) rows from the bundled Openclipart sample."""
    table = pq.read_table(sample_parquet, columns=["id", "title", "keywords", "image"]).slice(0, rows)
    titles = table.column("title").to_pylist()
    keywords = table.column("keywords").to_pylist()
    captions = [f"{t}, {', '.join(k[:3])}" if k else t for t, k in zip(titles, keywords)]
    return pa.table({"sample_id": table.column("id"), "source": pa.array(["openclipart"] * table.num_rows),
                     "caption": pa.array(captions), "image": table.column("image")})


def write_dataset(root: Path, pairs: pa.Table, rows_per_shard: int) -> Path:
    """Write ``pairs`` as a build does (shards/part-NNNNN.parquet with stats and markers, then
    manifest.json) under ``root``; returns the manifest's path."""
    store = ObjectStore(str(root))
    shards = [write_shard(store, index, pairs.slice(start, rows_per_shard), row_group_rows=64)
              for index, start in enumerate(range(0, pairs.num_rows, rows_per_shard))]
    write_manifest(store, build_manifest(config={}, shards=shards, funnel={}, queries=None, eval_index=None))
    return root / "manifest.json"
