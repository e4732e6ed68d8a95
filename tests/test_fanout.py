"""The one fan-out: results in input order, one failing shard reported (not raised), progress
callbacks, a context shared by every job; the storage-backed shuffle and its resume."""

from __future__ import annotations

import pyarrow as pa
import pytest

from infra.fanout import ShardFailures, map_shards, shuffle, values_or_raise
from infra.storage import ObjectStore


def square_or_fail(x: int, offset: int) -> int:
    if x == 3:
        raise ValueError("bad shard 3")
    return x * x + offset


@pytest.mark.parametrize("use_ray", [False, True])
def test_a_failing_shard_costs_only_itself(use_ray, request):
    if use_ray:
        request.getfixturevalue("ray_local")
    done = []
    results = map_shards(square_or_fail, list(range(6)), context=100, desc="test", use_ray=use_ray,
                         key=lambda i: f"s{i}", on_done=lambda d, t: done.append((d, t)))
    assert [r.key for r in results] == [f"s{i}" for i in range(6)]
    assert [r.value for r in results if r.ok] == [100, 101, 104, 116, 125]
    failed = [r for r in results if not r.ok]
    assert [r.key for r in failed] == ["s3"] and failed[0].error.startswith("ValueError: bad shard 3")
    assert done[-1] == (6, 6) and [d for d, _ in done] == list(range(1, 7))
    with pytest.raises(ShardFailures, match=r"1 of 6 shards failed.*\n  s3: ValueError: bad shard 3"):
        values_or_raise("test", results)


def test_keys_must_be_unique():
    with pytest.raises(ValueError, match="not unique"):
        map_shards(square_or_fail, [1, 1], context=0, desc="dupes", use_ray=False)


def _split_by_parity(n: int, calls: list) -> list[pa.Table]:
    calls.append(n)
    values = list(range(n))
    return [pa.table({"v": [v for v in values if v % 2 == p]}) for p in range(2)]


def _sum(partition: int, pieces: list[pa.Table], calls: list) -> pa.Table:
    calls.append(f"r{partition}")
    return pa.table({"partition": [partition], "sum": [sum(sum(t.column("v").to_pylist()) for t in pieces)]})


def test_shuffle_reduces_each_partition_and_a_rerun_skips_finished_work(tmp_path):
    scratch = ObjectStore(str(tmp_path / "scratch"))
    calls: list = []
    keys = shuffle(_split_by_parity, _sum, [3, 4], num_partitions=2, scratch=scratch, context=calls,
                   desc="parity", use_ray=False)
    got = [scratch.read_parquet(k).to_pylist()[0] for k in keys]
    # partition 0: evens of range(3) and range(4) = 0+2 + 0+2; partition 1: 1 + 1+3
    assert got == [{"partition": 0, "sum": 4}, {"partition": 1, "sum": 5}]
    assert calls == [3, 4, "r0", "r1"]
    scratch.delete(keys[1])  # as if killed before the second reduce finished
    calls.clear()
    assert shuffle(_split_by_parity, _sum, [3, 4], num_partitions=2, scratch=scratch, context=calls,
                   desc="parity", use_ray=False) == keys
    assert calls == ["r1"], "finished maps and reduces must not run again"


def test_shuffle_on_ray(ray_local, tmp_path):
    scratch = ObjectStore(str(tmp_path / "scratch"))
    keys = shuffle(_split_by_parity, _sum, [5, 6, 7], num_partitions=2, scratch=scratch, context=[],
                   desc="parity")
    sums = [scratch.read_parquet(k).column("sum")[0].as_py() for k in keys]
    assert sums == [sum(v for n in (5, 6, 7) for v in range(n) if v % 2 == p) for p in range(2)]


def _hold(mb: int, _context: None) -> int:
    # A new anonymous mapping, every page written: fresh resident memory whatever the process's heap
    # holds (a bytearray can land in freed, still-resident heap pages, or in calloc'd pages it never
    # touches, and then the process's RSS does not grow: this test failed so once in a full run).
    import mmap

    chunk = b"\1" * 2**20
    with mmap.mmap(-1, mb * 2**20) as block:
        for offset in range(0, len(block), len(chunk)):
            block[offset:offset + len(chunk)] = chunk
        return len(block)


def test_each_job_reports_its_own_peak_memory():
    """On Ray a job's result carries its worker's peak RSS during that job and its RSS at the start;
    the peak is counted afresh for every job, so a small job after a big one in the same long-lived
    process reports its own, not the big one's (what the per-stage "job peak RSS" log line says)."""
    from infra.fanout import _run_one, stage_peak_rss

    big = _run_one(_hold, "big", 200, None, on_ray=True)  # as a Ray worker runs it (no Ray needed)
    small = _run_one(_hold, "small", 1, None, on_ray=True)
    if big.peak_rss is None:
        pytest.skip("this kernel offers no resettable peak RSS (/proc/self/clear_refs)")
    assert big.ok and big.peak_rss - big.start_rss >= 190 * 2**20
    assert small.ok and small.peak_rss - small.start_rss < 50 * 2**20
    assert small.peak_rss < big.peak_rss - 100 * 2**20, "the peak must be reset between jobs"
    assert stage_peak_rss([big, small]) == (big.peak_rss, big.peak_rss - big.start_rss)
    here = _run_one(_hold, "here", 1, None)  # in the driver's process: nothing is measured
    assert here.peak_rss is None and stage_peak_rss([here]) is None


def test_a_stage_on_ray_logs_its_job_peak_memory(ray_local, caplog):
    import logging

    with caplog.at_level(logging.INFO, logger="infra.fanout"):
        results = map_shards(_hold, [64, 1, 2], desc="hold memory", key=str)
    assert all(r.ok and r.peak_rss and r.start_rss for r in results)
    events = [r for r in caplog.records if r.getMessage() == "job peak RSS"]
    assert len(events) == 1 and events[0].fields["stage"] == "hold memory" and events[0].fields["jobs"] == 3
    assert events[0].fields["max_added_mb"] >= 60 and events[0].fields["max_mb"] >= events[0].fields["max_added_mb"]
