"""Balancing: mergeable counts, MetaCLIP's probability rule, the exact cap, shard-order independence."""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from infra.config import BalanceConfig, ConfigError
from infra.storage import ObjectStore
from tasks.balance import (BALANCED_OUT, NO_QUERY_IDS, CapHashes, balance_table, count_queries,
                           query_counts_table, sample_hashes, write_query_count_report)

LIST = pa.list_(pa.int32())


def pool(query_ids: list[list[int]], prefix: str = "s") -> pa.Table:
    return pa.table({"sample_id": [f"{prefix}{i}" for i in range(len(query_ids))], "query_ids": pa.array(query_ids, LIST)})


def shards(table: pa.Table, cuts: list[int]) -> list[pa.Table]:
    bounds = [0, *cuts, table.num_rows]
    return [table.slice(a, b - a) for a, b in zip(bounds[:-1], bounds[1:])]


def kept_ids(tables: list[pa.Table]) -> set[str]:
    return {s for t in tables for s in t.column("sample_id").to_pylist()}


@pytest.fixture(scope="module")
def skewed() -> pa.Table:
    """Queries 0-2 heavy (5000, 3000, 1200 pairs), 3-4 light (300, 50), each pair one query."""
    sizes = [5000, 3000, 1200, 300, 50]
    ids = [[q] for q, n in enumerate(sizes) for _ in range(n)]
    order = np.random.default_rng(1).permutation(len(ids))
    return pool([ids[i] for i in order])


def test_count_queries_merges_by_sum(skewed: pa.Table) -> None:
    whole = count_queries(skewed.column("query_ids"), 6)
    assert whole.tolist() == [5000, 3000, 1200, 300, 50, 0] and whole.dtype == np.int64
    parts = sum(count_queries(t.column("query_ids"), 6) for t in shards(skewed, [100, 4000, 7777]))
    assert np.array_equal(parts, whole)
    chunked = pa.chunked_array([pa.array([[1, 2], None], LIST), pa.array([[2]], LIST)])
    assert count_queries(chunked, 3).tolist() == [0, 1, 2]
    assert count_queries(pa.chunked_array([], LIST), 2).tolist() == [0, 0]
    with pytest.raises(ValueError, match="out of range"):
        count_queries(pa.array([[3]], LIST), 3)


def test_sample_hash_is_blake2b_of_the_id() -> None:
    expected = int.from_bytes(hashlib.blake2b(b"s-42", digest_size=8).digest(), "little")
    assert sample_hashes(["s-42"]).tolist() == [expected]
    assert sample_hashes(pa.array(["s-42", "s-43"])).tolist()[0] == expected


def test_probability_mode_keeps_about_t_per_heavy_query(skewed: pa.Table) -> None:
    t = 1000
    counts = count_queries(skewed.column("query_ids"), 5)
    step = balance_table(skewed, counts, BalanceConfig(max_per_query=t, seed=7))
    out, funnel = step.table, step.funnel
    after = count_queries(out.column("query_ids"), 5)
    for q in range(3):  # binomial(c, t/c): within 4 standard deviations of t
        c = counts[q]
        sd = np.sqrt(c * (t / c) * (1 - t / c))
        assert abs(after[q] - t) <= 4 * sd, (q, after[q])
    assert after[3:].tolist() == counts[3:].tolist()  # light queries keep everything
    stats = funnel.stages["balance"]
    assert stats.rows_out == out.num_rows and stats.dropped[BALANCED_OUT] == skewed.num_rows - out.num_rows


def test_probability_mode_keeps_a_pair_if_any_entry_keeps_it() -> None:
    heavy = [[0]] * 2000
    both = [[0, 1]] * 100  # query 1 is light: all of these stay, whatever query 0 decides
    table = pool(heavy + both)
    counts = count_queries(table.column("query_ids"), 2)
    out = balance_table(table, counts, BalanceConfig(max_per_query=200)).table
    assert sum(1 for q in out.column("query_ids").to_pylist() if q == [0, 1]) == 100
    assert count_queries(out.column("query_ids"), 2)[0] > 200  # OR rule: the heavy entry exceeds t


@pytest.mark.parametrize("mode", ["probability", "exact"])
def test_independent_of_shard_split_and_order(mode: str) -> None:
    rng = np.random.default_rng(3)
    table = pool([sorted(set(rng.integers(0, 8, size=rng.integers(1, 4)).tolist())) for _ in range(6000)])
    counts = count_queries(table.column("query_ids"), 8)
    cfg = BalanceConfig(max_per_query=300, mode=mode, seed=11)

    def run(parts: list[pa.Table]) -> set[str]:
        thresholds = None
        if mode == "exact":
            caps = CapHashes(cfg.max_per_query)
            for p in parts:
                caps.merge(CapHashes.from_table(p, counts, cfg))
            thresholds = caps.thresholds(8)
        return kept_ids([balance_table(p, counts, cfg, thresholds=thresholds).table for p in parts])

    whole = run([table])
    assert run(shards(table, [1, 2500, 2501, 4000])[::-1]) == whole
    assert run(shards(table, [3000])) == whole
    other_seed = balance_table(table, counts, BalanceConfig(max_per_query=300, mode="probability", seed=12)).table
    if mode == "probability":
        assert kept_ids([other_seed]) != whole


def test_exact_mode_never_exceeds_t() -> None:
    rng = np.random.default_rng(5)
    table = pool([sorted(set(rng.integers(0, 6, size=rng.integers(1, 3)).tolist())) for _ in range(8000)]
                 + [[6]] * 900 + [[7]] * 40)
    num = 8
    counts = count_queries(table.column("query_ids"), num)
    cfg = BalanceConfig(max_per_query=500, mode="exact", seed=0)
    caps = CapHashes(cfg.max_per_query)
    for part in shards(table, [2000, 5000]):
        caps.merge(CapHashes.from_table(part, counts, cfg))
    step = balance_table(table, counts, cfg, thresholds=caps.thresholds(num))
    out, funnel = step.table, step.funnel
    after = count_queries(out.column("query_ids"), num)
    assert (after <= 500).all(), after  # every entry, counting a kept pair for all its entries
    assert after[6] == 500  # an entry whose pairs match nothing else is cut at exactly t
    assert after[7] == 40  # entries under the cap keep everything
    assert funnel.stages["balance"].rows_out == out.num_rows


def test_exact_mode_cuts_below_a_hash_tie() -> None:
    # The same sample id twice gives the same hash for the same query: a tie at the cut must not
    # let t + 1 pairs through.
    table = pa.table({"sample_id": ["dup"] * 2 + [f"s{i}" for i in range(50)], "query_ids": pa.array([[0]] * 52, LIST)})
    counts = count_queries(table.column("query_ids"), 1)
    for t in range(1, 52):
        cfg = BalanceConfig(max_per_query=t, mode="exact")
        out = balance_table(table, counts, cfg, thresholds=CapHashes.from_table(table, counts, cfg).thresholds(1)).table
        assert out.num_rows <= t


def test_exact_mode_needs_thresholds(skewed: pa.Table) -> None:
    counts = count_queries(skewed.column("query_ids"), 5)
    with pytest.raises(ValueError, match="thresholds"):
        balance_table(skewed, counts, BalanceConfig(mode="exact"))
    with pytest.raises(ValueError, match="different caps"):
        CapHashes(5).merge(CapHashes(6))
    with pytest.raises(ConfigError):
        BalanceConfig(max_per_query=0)


def test_rows_without_query_ids_are_dropped_with_a_reason() -> None:
    table = pa.table({"sample_id": ["a", "b", "c"], "query_ids": pa.array([[0], [], None], LIST)})
    step = balance_table(table, np.array([1]), BalanceConfig())
    out, funnel = step.table, step.funnel
    assert out.column("sample_id").to_pylist() == ["a"]
    assert dict(funnel.stages["balance"].dropped) == {NO_QUERY_IDS: 2}
    with pytest.raises(ValueError, match="beyond the counts"):
        balance_table(pool([[4]]), np.array([1]), BalanceConfig())


def test_counts_table_and_plot(tmp_path, skewed: pa.Table) -> None:
    before = count_queries(skewed.column("query_ids"), 6)
    out = balance_table(skewed, before, BalanceConfig(max_per_query=1000)).table
    after = count_queries(out.column("query_ids"), 6)
    queries = pa.table({"query_id": pa.array(range(6), pa.int32()), "query": ["a", "b", "c", "d", "e", "f"]})
    table = query_counts_table(before, after, queries)
    assert table.column_names == ["query_id", "query", "count_before", "count_after"]
    assert table.column("query_id").to_pylist() == [0, 1, 2, 3, 4]  # query 5 never matched
    assert pc.sum(table.column("count_after")).as_py() == int(after.sum())
    with pytest.raises(ValueError):
        query_counts_table(before, after[:3])
    store = ObjectStore(str(tmp_path / "store"))
    uris = write_query_count_report(store, before, after, queries, 1000, prefix="balance/")
    assert store.read_parquet("balance/query_counts.parquet").equals(table)
    png = store.read_bytes("balance/query_counts.png")
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert uris["table"] == store.uri("balance/query_counts.parquet")
