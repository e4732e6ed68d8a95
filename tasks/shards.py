"""Parquet shards: planning, atomic writes with stats and completion markers, the hold-out.

Layout under a dataset root (any ObjectStore root: path, file://, s3://):

    shards/part-00000.parquet        the rows (infra.schema.SHARD_SCHEMA)
    shards/part-00000_stats.json     rows, bytes, sha256
    shards/part-00000.done           completion marker, written last: the plan, then the stats
    holdout/part-00000.parquet       held-out pairs (retrieval evaluation), never read by training
    manifest.json                    every shard and the build's records (written by infra.manifest)

Each shard is written atomically, then its stats, then its marker; the marker records the plan (an
identity of the rows that go into the shard), and a rerun skips shards completed for the same plan.
Shard contents are a deterministic function of the build's inputs, so a shard rewritten after a
crash is byte-for-byte the one an uninterrupted build writes; a changed config rewrites them.
A :class:`ShardWriter` writes shards in sequence, each one's durable commit overlapping the
encoding of the next.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import logging
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from infra.log import get_logger, log_event
from infra.schema import SHARD_SCHEMA, conform

log = get_logger(__name__)


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


# Parquet options of a shard. The image column holds already-compressed JPEG/PNG/WebP bytes:
# zstd gains nothing there (bench/shards.py: same file size) and costs most of the encode, and a
# dictionary of unique image bytes is built only to be thrown away; the other columns keep both.
_NO_DICTIONARY = frozenset({"image", "sample_id", "caption", "url", "sha256", "phash", "meta", "error"})
_STATISTICS = ["sample_id", "source", "width", "height"]


def parquet_options(compression: str) -> dict:
    """``pq.write_table`` options of a shard for the codec ``compression`` (the image column never compressed)."""
    codec = "none" if compression == "none" else compression
    return {"compression": {name: ("none" if name == "image" else codec) for name in SHARD_SCHEMA.names},
            "use_dictionary": [n for n in SHARD_SCHEMA.names if n not in _NO_DICTIONARY],
            "write_statistics": _STATISTICS}


def completed_stats(store: Any, index: int, plan_id: str = "", prefix: str = "shards") -> dict | None:
    """The stats of shard ``index`` if it is complete for this plan, else None (a marker left by
    another plan, or a marker without its stats line, does not count)."""
    key = marker_key(index, prefix)
    if not store.exists(key):
        return None
    lines = store.read_text(key).split("\n")
    if lines[0].strip() != plan_id:
        return None
    if len(lines) > 1 and lines[1].strip():
        try:
            return json.loads(lines[1])
        except json.JSONDecodeError:
            return None
    return store.read_json(stats_key(index, prefix)) if store.exists(stats_key(index, prefix)) else None


def is_complete(store: Any, index: int, plan_id: str = "", prefix: str = "shards") -> bool:
    """Shard ``index`` is complete for this plan (a marker left by another plan does not count)."""
    return completed_stats(store, index, plan_id, prefix) is not None


def write_shard(store: Any, index: int, table: pa.Table, row_group_rows: int = 1_000,
                compression: str = "zstd", prefix: str = "shards", plan_id: str = "") -> dict:
    """Write shard ``index`` (atomic), then its stats, then its marker, and return the stats. Skips
    a shard completed for the same ``plan_id`` (an identity of the rows that go into it); another
    plan's shard is rewritten. One shard of a :class:`ShardWriter`, which says how."""
    with ShardWriter(store, row_group_rows, compression, prefix) as writer:
        writer.write(index, table, plan_id)
    return writer.stats[0]


class ShardWriter:
    """Writes shards one after another; each shard's durable commit (fsync, rename, stats, marker)
    runs on a background thread while the caller encodes the next shard, so the wait for the disk
    overlaps CPU work (the fsync releases the GIL). At most one commit is in flight.

    The encoder writes the Parquet bytes straight into a hidden temp object (Arrow's own file I/O,
    no Python in between, as a plain ``pq.write_table`` to a path does); then the object's disk
    writeback starts and its sha256 is taken on the bytes read back (mapped from the page cache,
    no copy) right after they were written, much of them still in the CPU's cache. (On a loaded
    machine the sha256 on the commit thread, overlapping the next encoding, measured slower in
    wall and in CPU; so did hashing row group by row group as they stream.) Only the shard is
    fsynced: the marker carries the stats itself (plan on its first line, stats on the second), so
    a marker that did not reach the disk whole never matches a plan and the shard is written
    again; ``_stats.json`` is for people and tools. A shard counts only once it is durable:
    :attr:`stats` (every durable shard, in write order) is complete after the ``with`` block,
    whose end waits for the last commit; a failed commit raises from the next :meth:`write` or
    from the block's end, a failed write or checksum read from that :meth:`write`.
    A crash at any point leaves complete, checksummed shards and hidden temp files, nothing else.
    """

    def __init__(self, store: Any, row_group_rows: int = 1_000, compression: str = "zstd",
                 prefix: str = "shards") -> None:
        self.store, self.row_group_rows, self.compression, self.prefix = store, row_group_rows, compression, prefix
        self.stats: list[dict] = []
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="shard-commit")
        self._in_flight: Future | None = None

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        try:
            if exc is None:
                self._wait()
            elif self._in_flight is not None and self._in_flight.exception() is not None:
                # The block's own error propagates; this shard was not committed, a rerun writes it.
                log_event(log, "shard commit failed", logging.WARNING, error=str(self._in_flight.exception()))
            elif self._in_flight is not None:
                self._wait()  # durable although the block failed: listed, as every durable shard is
        finally:
            self._pool.shutdown()

    def write(self, index: int, table: pa.Table | Callable[[], pa.Table], plan_id: str = "") -> None:
        """Encode shard ``index`` (``table``, or what calling it returns) into a temp object, then
        queue its commit once the previous one is durable. Skips a shard completed for the same
        ``plan_id`` (an identity of the rows that go into it) without calling ``table``."""
        done = completed_stats(self.store, index, plan_id, self.prefix)
        if done is not None:
            self._wait()
            self.stats.append(done)
            return
        table = conform(table() if callable(table) else table, SHARD_SCHEMA)
        key = shard_key(index, self.prefix)
        with self.store.open_pending(key) as pending:
            pq.write_table(table, pending.native_file(), row_group_size=max(1, self.row_group_rows),
                           **parquet_options(self.compression))
            digest = hashlib.sha256()
            size = pending.finish(digest)  # hashed as read back, right after the encoder wrote it
            stats = {
                "path": key,
                "rows": table.num_rows,
                "bytes": size,
                "sha256": digest.hexdigest(),
                "image_bytes": int(pc.sum(table.column("image_bytes")).as_py() or 0)
                if "image_bytes" in table.column_names else None,
                "plan": plan_id,
            }
            self._wait()  # inside the block: a failed previous commit discards this one too
        self._in_flight = self._pool.submit(self._commit, pending, index, stats)

    def _commit(self, pending: Any, index: int, stats: dict) -> dict:
        pending.commit()
        after = self.store.scratch()  # the shard is durable; these two need no fsync of their own
        after.write_json(stats_key(index, self.prefix), stats)
        after.write_text(marker_key(index, self.prefix), stats["plan"] + "\n" + json.dumps(stats, sort_keys=True) + "\n")
        return stats

    def _wait(self) -> None:
        """Wait for the commit in flight; record its stats or raise its error."""
        if self._in_flight is None:
            return
        future, self._in_flight = self._in_flight, None
        self.stats.append(future.result())


def remove_stale_shards(store: Any, keep: int, prefix: str = "shards") -> list[str]:
    """Delete shards numbered ``keep`` and above (left by an earlier plan with more shards)."""
    removed = []
    for key in store.list(prefix + "/"):
        name = key.rsplit("/", 1)[-1]
        if name.startswith("part-") and int(name[5:10]) >= keep:
            store.delete(key)
            removed.append(key)
    return removed
