"""Parquet shards: planning, atomic writes with stats and completion markers, the hold-out.

Layout under a dataset root (any ObjectStore root: path, file://, s3://):

    shards/part-00000.parquet        the rows (infra.schema.SHARD_SCHEMA)
    shards/part-00000_stats.json     rows, bytes, sha256, columns' byte sizes
    shards/part-00000.done           completion marker, written last
    holdout/part-00000.parquet       held-out pairs (retrieval evaluation), never read by training
    manifest.json                    every shard and the build's records (written by infra.manifest)

Each shard is written atomically, then its stats, then its marker; the marker records the plan (an
identity of the rows that go into the shard), and a rerun skips shards completed for the same plan.
Shard contents are a deterministic function of the build's inputs, so a shard rewritten after a
crash is byte-for-byte the one an uninterrupted build writes; a changed config rewrites them.
"""

from __future__ import annotations

import hashlib
import heapq
import io
from dataclasses import dataclass
from typing import Any, Iterable

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from infra.schema import SHARD_SCHEMA, conform


def shard_key(index: int, prefix: str = "shards") -> str:
    return f"{prefix}/part-{index:05d}.parquet"


def stats_key(index: int, prefix: str = "shards") -> str:
    return f"{prefix}/part-{index:05d}_stats.json"


def marker_key(index: int, prefix: str = "shards") -> str:
    return f"{prefix}/part-{index:05d}.done"


@dataclass(frozen=True)
class ShardSlice:
    """Rows ``[start, stop)`` of one input part, destined for one output shard."""

    part: str
    start: int
    stop: int


def plan_output_shards(parts: Iterable[tuple[str, int, int]], rows_per_shard: int,
                       max_bytes_per_shard: int) -> list[list[ShardSlice]]:
    """Cut parts ``(name, rows, bytes)`` (in the given order) into output shards.

    A shard closes when it reaches ``rows_per_shard`` rows or would pass ``max_bytes_per_shard``
    (estimated from the part's mean row size). Deterministic in its inputs.
    """
    if rows_per_shard <= 0 or max_bytes_per_shard <= 0:
        raise ValueError("rows_per_shard and max_bytes_per_shard must be > 0")
    plan: list[list[ShardSlice]] = []
    current: list[ShardSlice] = []
    cur_rows = 0
    cur_bytes = 0.0
    for name, rows, nbytes in parts:
        row_bytes = nbytes / rows if rows else 0.0
        start = 0
        while start < rows:
            room_rows = rows_per_shard - cur_rows
            room_bytes = (max_bytes_per_shard - cur_bytes) / row_bytes if row_bytes else float("inf")
            take = int(min(rows - start, room_rows, max(room_bytes, 1 if cur_rows == 0 else 0)))
            if take <= 0:
                plan.append(current)
                current, cur_rows, cur_bytes = [], 0, 0.0
                continue
            current.append(ShardSlice(name, start, start + take))
            cur_rows += take
            cur_bytes += take * row_bytes
            start += take
            if cur_rows >= rows_per_shard or cur_bytes >= max_bytes_per_shard:
                plan.append(current)
                current, cur_rows, cur_bytes = [], 0, 0.0
    if current:
        plan.append(current)
    return plan


def holdout_rank(sample_id: str) -> bytes:
    """The hold-out order: a sample's SHA-1 (uniform, independent of row and shard order)."""
    return hashlib.sha1(sample_id.encode()).digest()


def holdout_candidates(sample_ids: Iterable[str], n: int) -> list[tuple[bytes, str]]:
    """The ``n`` smallest ``(rank, sample_id)`` of some ids: a part's candidates for the hold-out.
    The hold-out of the whole is the ``n`` smallest of every part's candidates."""
    return heapq.nsmallest(n, ((holdout_rank(s), s) for s in sample_ids)) if n > 0 else []


def select_holdout(sample_ids: Iterable[str], n: int) -> set[str]:
    """The ``n`` held-out pairs (retrieval evaluation; training never reads them): the ids with the
    smallest SHA-1, a uniform sample that does not depend on row or shard order."""
    return {s for _, s in holdout_candidates(sample_ids, n)}


def encode_shard(table: pa.Table, row_group_rows: int, compression: str) -> bytes:
    """The Parquet bytes of one shard (row groups sized for streaming reads)."""
    table = conform(table, SHARD_SCHEMA)
    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=max(1, row_group_rows),
                   compression=None if compression == "none" else compression,
                   write_statistics=["sample_id", "source", "width", "height"])
    return buf.getvalue()


def is_complete(store: Any, index: int, plan_id: str = "", prefix: str = "shards") -> bool:
    """Shard ``index`` is complete for this plan (a marker left by another plan does not count)."""
    key = marker_key(index, prefix)
    return store.exists(key) and store.read_text(key).strip() == plan_id


def write_shard(store: Any, index: int, table: pa.Table, row_group_rows: int = 1_000,
                compression: str = "zstd", prefix: str = "shards", plan_id: str = "") -> dict:
    """Write shard ``index`` (atomic), then its stats, then its marker. Skips a shard completed for
    the same ``plan_id`` (an identity of the rows that go into it); another plan's shard is rewritten."""
    if is_complete(store, index, plan_id, prefix):
        return store.read_json(stats_key(index, prefix))
    data = encode_shard(table, row_group_rows, compression)
    store.write_bytes(shard_key(index, prefix), data)
    stats = {
        "path": shard_key(index, prefix),
        "rows": table.num_rows,
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "image_bytes": int(pc.sum(table.column("image_bytes")).as_py() or 0)
        if "image_bytes" in table.column_names else None,
        "plan": plan_id,
    }
    store.write_json(stats_key(index, prefix), stats)
    store.write_text(marker_key(index, prefix), plan_id + "\n")
    return stats


def remove_stale_shards(store: Any, keep: int, prefix: str = "shards") -> list[str]:
    """Delete shards numbered ``keep`` and above (left by an earlier plan with more shards)."""
    removed = []
    for key in store.list(prefix + "/"):
        name = key.rsplit("/", 1)[-1]
        if name.startswith("part-") and int(name[5:10]) >= keep:
            store.delete(key)
            removed.append(key)
    return removed
