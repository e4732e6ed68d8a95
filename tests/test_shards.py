"""Shard planning, atomic shard writes with stats and markers, the hold-out sample."""

from __future__ import annotations

import hashlib
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from infra.schema import SHARD_SCHEMA
from infra.storage import ObjectStore
from tasks.shards import is_complete, marker_key, plan_output_shards, shard_key, stats_key, write_shard


def rows(n: int, start: int = 0) -> pa.Table:
    return pa.table({
        "sample_id": [f"s{i:04d}" for i in range(start, start + n)],
        "source": ["test"] * n,
        "caption": [f"a photo of thing {i}" for i in range(start, start + n)],
        "image": [bytes([i % 256]) * 10 for i in range(start, start + n)],
        "image_bytes": [10] * n,
        "query_ids": [[i % 7] for i in range(n)],
    })


def flatten(plan):
    return [(s.part, s.start, s.stop) for shard in plan for s in shard]


def test_plan_cuts_by_rows_covers_every_row_once_in_order():
    parts = [("a", 7, 700), ("b", 0, 0), ("c", 12, 1200), ("d", 3, 300)]
    plan = plan_output_shards(parts, rows_per_shard=5, max_bytes_per_shard=10**9)
    assert [sum(s.stop - s.start for s in shard) for shard in plan] == [5, 5, 5, 5, 2]
    covered = {p: [] for p, _, _ in parts}
    for part, start, stop in flatten(plan):
        covered[part].extend(range(start, stop))
    for part, n, _ in parts:
        assert covered[part] == list(range(n))
    assert plan == plan_output_shards(parts, 5, 10**9)


def test_plan_cuts_by_bytes():
    plan = plan_output_shards([("a", 10, 1000), ("b", 10, 5000)], rows_per_shard=100, max_bytes_per_shard=1000)
    sizes = []
    for shard in plan:
        nbytes = sum((s.stop - s.start) * (100 if s.part == "a" else 500) for s in shard)
        sizes.append(nbytes)
    assert all(b <= 1000 for b in sizes)
    assert sum(s.stop - s.start for shard in plan for s in shard) == 20


def test_plan_rejects_nonsense_sizes():
    with pytest.raises(ValueError):
        plan_output_shards([("a", 1, 1)], 0, 10)


def test_write_shard_is_complete_and_skipped_on_rerun(tmp_path):
    store = ObjectStore(str(tmp_path))
    stats = write_shard(store, 3, rows(25), row_group_rows=10, compression="zstd")
    data = store.read_bytes(shard_key(3))
    assert stats["rows"] == 25 and stats["bytes"] == len(data)
    assert stats["sha256"] == hashlib.sha256(data).hexdigest()
    assert store.read_json(stats_key(3)) == stats
    assert is_complete(store, 3) and not is_complete(store, 2)
    meta = pq.ParquetFile(tmp_path / "shards" / "part-00003.parquet").metadata
    assert meta.num_row_groups == 3  # row groups sized for streaming reads
    table = store.read_parquet(shard_key(3))
    assert table.schema.equals(SHARD_SCHEMA, check_metadata=False)
    assert table.column("sample_id").to_pylist()[0] == "s0000"
    # A rerun with a marker present does not rewrite (even if handed different rows).
    again = write_shard(store, 3, rows(5, start=100))
    assert again == stats and store.read_bytes(shard_key(3)) == data


def test_a_shard_without_marker_is_rewritten_identically(tmp_path):
    store = ObjectStore(str(tmp_path))
    first = write_shard(store, 0, rows(8))
    store.delete(marker_key(0))  # as if the build died between the stats and the marker
    assert not is_complete(store, 0)
    second = write_shard(store, 0, rows(8))
    assert second["sha256"] == first["sha256"]


def big_rows(n: int, image_bytes: int) -> pa.Table:
    return rows(n).set_column(3, "image", pa.array([os.urandom(image_bytes) for _ in range(n)], pa.binary()))


def test_a_shard_is_hashed_as_read_back_once_its_writeback_starts_then_fsynced_in_the_commit(tmp_path, monkeypatch):
    import mmap
    import threading

    import infra.storage

    events: list[tuple] = []
    real_writeback, real_digest, real_fsync = infra.storage.start_writeback, infra.storage._digest_file, os.fsync

    def is_shard(fd: int) -> bool:
        return os.path.basename(os.readlink(f"/proc/self/fd/{fd}")).startswith(".part-00000.parquet")

    def writeback(fd: int, offset: int, nbytes: int) -> None:
        events.append(("writeback", offset, nbytes))
        real_writeback(fd, offset, nbytes)  # the real calls, on the real temp file

    def digest_file(fd: int, size: int, digest) -> None:
        events.append(("checksum", threading.current_thread().name.split("_")[0], size))
        real_digest(fd, size, digest)

    def fsync(fd: int) -> None:
        if is_shard(fd):
            events.append(("fsync", threading.current_thread().name.split("_")[0]))
        real_fsync(fd)
    monkeypatch.setattr(infra.storage, "start_writeback", writeback)
    monkeypatch.setattr(infra.storage, "_digest_file", digest_file)
    monkeypatch.setattr(infra.storage.os, "fsync", fsync)
    monkeypatch.setattr(infra.storage, "_READBACK_BYTES", mmap.ALLOCATIONGRANULARITY)  # many windows
    store = ObjectStore(str(tmp_path))
    stats = write_shard(store, 0, big_rows(200, 1_000), row_group_rows=20)
    data = store.read_bytes(shard_key(0))
    assert len(data) > 10 * mmap.ALLOCATIONGRANULARITY
    assert events == [("writeback", 0, len(data)), ("checksum", "MainThread", len(data)), ("fsync", "shard-commit")]
    assert stats["sha256"] == hashlib.sha256(data).hexdigest() and stats["bytes"] == len(data)
    assert store.read_parquet(shard_key(0)).num_rows == 200


def test_a_shard_is_byte_for_byte_what_write_table_writes_with_its_options(tmp_path):
    from infra.schema import conform
    from tasks.shards import parquet_options

    table = big_rows(120, 300)
    write_shard(ObjectStore(str(tmp_path)), 0, table, row_group_rows=25, compression="zstd")
    plain = tmp_path / "plain.parquet"
    pq.write_table(conform(table, SHARD_SCHEMA), plain, row_group_size=25, **parquet_options("zstd"))
    assert (tmp_path / "shards" / "part-00000.parquet").read_bytes() == plain.read_bytes()


def test_missing_required_column_is_a_clear_error(tmp_path):
    store = ObjectStore(str(tmp_path))
    with pytest.raises(ValueError, match="caption"):
        write_shard(store, 0, rows(3).drop(["caption"]))
    assert not store.exists(shard_key(0))


def test_select_holdout_is_a_uniform_order_independent_sample():
    from tasks.shards import select_holdout

    ids = [f"src:{i:05d}" for i in range(2000)]
    held = select_holdout(ids, 100)
    assert len(held) == 100 and held <= set(ids)
    assert select_holdout(reversed(ids), 100) == held  # row and shard order do not matter
    assert select_holdout(ids[:1000], 1000) == set(ids[:1000]) and select_holdout(ids, 0) == set()
    # Uniform over the ids, not the head or the tail of the order.
    positions = sorted(int(s[4:]) for s in held)
    assert positions[0] < 200 and positions[-1] > 1800 and 600 < sum(positions) / len(positions) < 1400


def test_a_shard_of_another_plan_is_rewritten_and_extra_shards_removed(tmp_path):
    from tasks.shards import remove_stale_shards

    store = ObjectStore(str(tmp_path))
    for i in range(3):
        write_shard(store, i, rows(4, start=4 * i), plan_id="plan-a")
    assert is_complete(store, 1, "plan-a") and not is_complete(store, 1, "plan-b")
    # A new plan (say rows_per_shard changed) must not reuse plan-a's shard 0.
    stats = write_shard(store, 0, rows(6), plan_id="plan-b")
    assert stats["rows"] == 6 and store.read_parquet(shard_key(0)).num_rows == 6
    removed = remove_stale_shards(store, keep=2)
    assert sorted(removed) == [marker_key(2), shard_key(2), stats_key(2)]
    assert is_complete(store, 0, "plan-b") and is_complete(store, 1, "plan-a") and not store.exists(shard_key(2))


def _temp_files(root) -> list[str]:
    return sorted(p.name for p in root.rglob("*") if p.is_file() and ".tmp-" in p.name)


def test_a_shard_writer_writes_what_write_shard_writes_and_reports_in_order(tmp_path):
    from tasks.shards import ShardWriter

    tables = [rows(30, start=30 * i) for i in range(4)]
    alone = ObjectStore(str(tmp_path / "alone"))
    expected = [write_shard(alone, i, t, row_group_rows=10, plan_id=f"p{i}") for i, t in enumerate(tables)]
    store = ObjectStore(str(tmp_path / "piped"))
    write_shard(store, 2, tables[2], row_group_rows=10, plan_id="p2")  # complete already: skipped, in its place
    called = []

    def table_of(i: int):
        return lambda: called.append(i) or tables[i]
    with ShardWriter(store, row_group_rows=10) as writer:
        for i in range(4):
            writer.write(i, table_of(i), plan_id=f"p{i}")
    assert writer.stats == expected and called == [0, 1, 3]  # a complete shard's rows are never built
    for i in range(4):
        assert store.read_bytes(shard_key(i)) == alone.read_bytes(shard_key(i))
        assert is_complete(store, i, f"p{i}") and store.read_json(stats_key(i)) == expected[i]
    assert _temp_files(tmp_path) == []


def test_a_shard_writer_on_s3_writes_the_local_bytes_and_checksums(tmp_path, s3_store):
    from tasks.shards import ShardWriter, completed_stats

    tables = [rows(30, start=30 * i) for i in range(3)]
    local = ObjectStore(str(tmp_path))
    expected = [write_shard(local, i, t, row_group_rows=10) for i, t in enumerate(tables)]
    with ShardWriter(s3_store, row_group_rows=10) as writer:
        for i, t in enumerate(tables):
            writer.write(i, t)
    assert writer.stats == expected
    for i, stats in enumerate(writer.stats):
        data = s3_store.read_bytes(shard_key(i))
        assert data == local.read_bytes(shard_key(i)) and stats["sha256"] == hashlib.sha256(data).hexdigest()
        assert completed_stats(s3_store, i) == stats


@pytest.mark.parametrize("fault", ["fsync", "checksum read"])
def test_a_failed_commit_leaves_only_complete_shards_and_a_rerun_finishes(tmp_path, monkeypatch, fault):
    import infra.storage
    from tasks.shards import ShardWriter

    tables = [rows(20, start=20 * i) for i in range(3)]
    reference = ObjectStore(str(tmp_path / "reference"))
    expected = [write_shard(reference, i, t) for i, t in enumerate(tables)]
    store = ObjectStore(str(tmp_path / "out"))
    real_fsync, real_digest, synced = os.fsync, infra.storage._digest_file, []

    def is_shard_1(fd: int) -> bool:
        return os.path.basename(os.readlink(f"/proc/self/fd/{fd}")).startswith(".part-00001.parquet")

    def failing_fsync(fd: int) -> None:
        if fault == "fsync" and is_shard_1(fd):
            raise OSError(5, "Input/output error (injected)")
        synced.append(fd)
        real_fsync(fd)

    def failing_digest(fd: int, size: int, digest) -> None:
        if fault == "checksum read" and is_shard_1(fd):
            raise OSError(5, "Input/output error (injected)")
        real_digest(fd, size, digest)
    monkeypatch.setattr(infra.storage.os, "fsync", failing_fsync)
    monkeypatch.setattr(infra.storage, "_digest_file", failing_digest)
    with pytest.raises(OSError, match="injected"):
        with ShardWriter(store) as writer:
            for i, t in enumerate(tables):
                writer.write(i, t)
    assert synced  # shard 0's commit ran through the real fsync
    assert is_complete(store, 0) and store.read_bytes(shard_key(0)) == reference.read_bytes(shard_key(0))
    # Shard 1 failed its commit and shard 2 was encoded behind it: neither is visible, and no temp is left.
    for i in (1, 2):
        assert not store.exists(shard_key(i)) and not store.exists(marker_key(i)) and not store.exists(stats_key(i))
    assert _temp_files(tmp_path) == [] and writer.stats == [expected[0]]
    monkeypatch.setattr(infra.storage.os, "fsync", real_fsync)
    monkeypatch.setattr(infra.storage, "_digest_file", real_digest)
    with ShardWriter(store) as writer:
        for i, t in enumerate(tables):
            writer.write(i, t)
    assert writer.stats == expected
    assert [store.read_bytes(shard_key(i)) for i in range(3)] == [reference.read_bytes(shard_key(i)) for i in range(3)]


_KILLED_WRITER = """
import os, sys, time
sys.path.insert(0, os.getcwd())
import infra.storage
from tests.test_shards import rows
from infra.storage import ObjectStore
from tasks.shards import ShardWriter

real_fsync = os.fsync
def fsync(fd):
    if os.path.basename(os.readlink(f"/proc/self/fd/{fd}")).startswith(".part-00001.parquet"):
        open(sys.argv[2], "w").close()  # shard 1 is written, its commit has begun: kill me now
        time.sleep(600)
    real_fsync(fd)
infra.storage.os.fsync = fsync
with ShardWriter(ObjectStore(sys.argv[1])) as writer:
    for i in range(3):
        writer.write(i, rows(20, start=20 * i))
"""


def test_a_writer_killed_between_write_and_commit_leaves_only_complete_checksummed_shards(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    from tasks.shards import ShardWriter, completed_stats

    out, ready = tmp_path / "out", tmp_path / "ready"
    child = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, str(out), str(ready)],
                             cwd=os.getcwd(), env={**os.environ, "PYTHONPATH": os.getcwd()})
    deadline = time.monotonic() + 120
    while not ready.exists() and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert ready.exists(), f"the writer never reached shard 1's commit (exit {child.poll()})"
    time.sleep(0.5)  # let it encode shard 2 behind the blocked commit
    child.send_signal(signal.SIGKILL)
    child.wait()
    store = ObjectStore(str(out))
    visible = sorted(store.list("shards/"))
    assert visible == [marker_key(0), shard_key(0), stats_key(0)]  # the killed shards left no visible object
    stats = completed_stats(store, 0)
    assert stats["sha256"] == hashlib.sha256(store.read_bytes(shard_key(0))).hexdigest()
    assert _temp_files(out)  # what the kill interrupted stays hidden (temp names), never read as a shard
    with ShardWriter(store) as writer:
        for i in range(3):
            writer.write(i, rows(20, start=20 * i))
    assert writer.stats[0] == stats and all(is_complete(store, i) for i in range(3))
    for s in writer.stats:
        assert s["sha256"] == hashlib.sha256(store.read_bytes(s["path"])).hexdigest()
