"""Balancing: at most about ``t`` pairs per query, decided globally across shards.

Two passes, as in MetaCLIP: first ``count_queries`` per shard, summed over all shards (a reduce),
then ``balance_table`` per shard with the global counts.

* ``probability`` mode (MetaCLIP): an entry matched by ``c`` pairs keeps each of them with
  probability ``min(1, t / c)``; a pair is kept if any of its entries keeps it. The coin for
  (pair, entry) is a hash of (seed, sample_id, query_id), not an RNG stream, so the outcome does not
  depend on how the pool is split into shards or in which order they run.
* ``exact`` mode: each entry over the cap keeps the ``t`` pairs with the smallest hash of
  (seed, sample_id, query_id) — a deterministic random sample. A pair is kept only if it is inside
  the cap of *every* over-cap entry it matches, so no entry ever has more than ``t`` kept pairs,
  counting a kept pair for all its entries. The price: an entry whose top-``t`` pairs are vetoed by
  another heavy entry ends below ``t``, and a pair that also matches a rare entry is not rescued by
  it (probability mode is the one that protects the tail). The per-entry cut-off hashes need a
  second reduce over the shards: ``CapHashes.from_table`` per shard, ``merge``, ``thresholds``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from infra.coins import keep_with_probability, pair_hashes, sample_hashes
from infra.config import BalanceConfig
from infra.funnel import Funnel
from tasks.step import StepOutput

STAGE = "balance"
BALANCED_OUT = "balanced_out"
NO_QUERY_IDS = "no_query_ids"
_U64_MAX = np.uint64(2**64 - 1)


def _flat_query_ids(query_ids: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """(flattened ids as int64, per-row lengths) of a list<int> column."""
    if isinstance(query_ids, pa.ChunkedArray):
        query_ids = query_ids.combine_chunks() if query_ids.num_chunks else pa.array([], pa.list_(pa.int32()))
    lengths = pc.fill_null(pc.list_value_length(query_ids), 0).to_numpy(zero_copy_only=False).astype(np.int64)
    flat = pc.list_flatten(query_ids).to_numpy(zero_copy_only=False).astype(np.int64)
    return flat, lengths


def count_queries(query_ids: pa.Array | pa.ChunkedArray, num_queries: int) -> np.ndarray:
    """Pairs matched per query (int64, length ``num_queries``); shards' counts merge by summing."""
    flat, _ = _flat_query_ids(query_ids)
    if flat.size and (flat.min() < 0 or flat.max() >= num_queries):
        raise ValueError(f"query_ids out of range [0, {num_queries}): min {flat.min()}, max {flat.max()}")
    return np.bincount(flat, minlength=num_queries).astype(np.int64)


def sparse_query_counts(query_ids: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """(query ids ascending, pairs matched per id) of the ids that occur: a shard's counts in brief."""
    flat, _ = _flat_query_ids(query_ids)
    return np.unique(flat, return_counts=True)


def _pairs(table: pa.Table, id_column: str, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(query id, pair hash, row index) per (row, matched query) pair."""
    flat, lengths = _flat_query_ids(table.column("query_ids"))
    rows = np.repeat(np.arange(table.num_rows), lengths)
    hashes = pair_hashes(sample_hashes(table.column(id_column))[rows], flat, seed)
    return flat, hashes, rows


class CapHashes:
    """Per over-cap query, the ``t + 1`` smallest pair hashes seen so far (exact mode's reduce)."""

    def __init__(self, max_per_query: int, query_ids: np.ndarray | None = None, hashes: np.ndarray | None = None) -> None:
        self.max_per_query = max_per_query
        q = np.zeros(0, np.int64) if query_ids is None else np.asarray(query_ids, np.int64)
        h = np.zeros(0, np.uint64) if hashes is None else np.asarray(hashes, np.uint64)
        self.query_ids, self.hashes = self._truncate(q, h)

    def _truncate(self, q: np.ndarray, h: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        order = np.lexsort((h, q))
        q, h = q[order], h[order]
        starts = np.flatnonzero(np.r_[True, q[1:] != q[:-1]]) if q.size else np.zeros(0, np.int64)
        rank = np.arange(q.size) - np.repeat(starts, np.diff(np.r_[starts, q.size]))
        keep = rank <= self.max_per_query  # t + 1 values: the last one detects a tie at the cut
        return q[keep], h[keep]

    @classmethod
    def from_table(cls, table: pa.Table, counts: np.ndarray, cfg: BalanceConfig, id_column: str = "sample_id") -> "CapHashes":
        """This shard's contribution: hashes of the pairs of queries whose global count exceeds t."""
        q, h, _ = _pairs(table, id_column, cfg.seed)
        heavy = counts[q] > cfg.max_per_query
        return cls(cfg.max_per_query, q[heavy], h[heavy])

    def merge(self, other: "CapHashes") -> "CapHashes":
        if other.max_per_query != self.max_per_query:
            raise ValueError("cannot merge CapHashes of different caps")
        self.query_ids, self.hashes = self._truncate(np.r_[self.query_ids, other.query_ids],
                                                      np.r_[self.hashes, other.hashes])
        return self

    def thresholds(self, num_queries: int) -> np.ndarray:
        """Per query, the largest pair hash that stays (uint64; max for queries under the cap)."""
        t = self.max_per_query
        out = np.full(num_queries, _U64_MAX, np.uint64)
        q, h = self.query_ids, self.hashes
        if not q.size:
            return out
        starts = np.flatnonzero(np.r_[True, q[1:] != q[:-1]])
        sizes = np.diff(np.r_[starts, q.size])
        over = sizes > t
        cut = h[starts[over] + t - 1]
        nxt = h[starts[over] + t]
        # a hash tie at the cut would let t + 1 through: cut below it (keeps fewer than t)
        out[q[starts[over]]] = np.where(nxt == cut, cut - np.uint64(1), cut)
        return out


def balance_table(table: pa.Table, counts: np.ndarray, cfg: BalanceConfig, *, thresholds: np.ndarray | None = None,
                  id_column: str = "sample_id") -> StepOutput:
    """The balancing step: keep or drop each row by the global per-query ``counts`` (see the
    module docstring).

    ``thresholds`` (exact mode only, required there): ``CapHashes(...).thresholds(num_queries)``
    merged over all shards. Rows without query ids are dropped (``no_query_ids``).
    """
    funnel = Funnel()
    counts = np.asarray(counts, np.int64)
    q, h, rows = _pairs(table, id_column, cfg.seed)
    if q.size and q.max() >= counts.size:
        raise ValueError(f"query id {q.max()} is beyond the counts ({counts.size} queries)")
    c = counts[q]
    if cfg.mode == "probability":
        row_keep = keep_with_probability(q, h, rows, counts, cfg.max_per_query, table.num_rows)
    elif cfg.mode == "exact":
        if thresholds is None:
            raise ValueError("exact balancing needs thresholds: merge CapHashes.from_table over all shards "
                             "and pass .thresholds(num_queries)")
        heavy = c > cfg.max_per_query
        pair_veto = heavy & (h > np.asarray(thresholds, np.uint64)[q])
        vetoed = np.zeros(table.num_rows, bool)
        np.logical_or.at(vetoed, rows, pair_veto)
        row_keep = ~vetoed
    else:
        raise ValueError(f"unknown balance mode {cfg.mode!r}")
    has_ids = np.zeros(table.num_rows, bool)
    has_ids[rows] = True
    reasons = np.where(~has_ids, NO_QUERY_IDS, np.where(row_keep, "", BALANCED_OUT))
    keep = has_ids & row_keep
    out = table.filter(pa.array(keep))
    funnel.record(STAGE, table.num_rows, out.num_rows, (r for r in reasons.tolist() if r))
    return StepOutput(out, funnel)


# ------------------------------------------------------------------------------------------------
# Reporting: per-query counts and their distribution
# ------------------------------------------------------------------------------------------------


def query_counts_table(before: np.ndarray, after: np.ndarray, queries: pa.Table | None = None) -> pa.Table:
    """Per query with any match: query_id, (query), count_before, count_after."""
    before, after = np.asarray(before, np.int64), np.asarray(after, np.int64)
    if before.shape != after.shape:
        raise ValueError("before and after counts differ in length")
    nz = np.flatnonzero(before)
    columns = {"query_id": pa.array(nz.astype(np.int32), pa.int32())}
    if queries is not None:
        text = dict(zip(queries.column("query_id").to_pylist(), queries.column("query").to_pylist()))
        columns["query"] = pa.array([text.get(int(i)) for i in nz], pa.string())
    columns["count_before"] = pa.array(before[nz], pa.int64())
    columns["count_after"] = pa.array(after[nz], pa.int64())
    return pa.table(columns)


def render_query_counts(before: np.ndarray, after: np.ndarray, max_per_query: int | None = None) -> bytes:
    """PNG bytes: log-log rank/count curves of matches per query, before and after balancing."""
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg  # no pyplot: no global figure state
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for counts, label in ((before, "before balancing"), (after, "after balancing")):
        c = np.sort(np.asarray(counts, np.int64))[::-1]
        c = c[c > 0]
        if c.size:
            ax.loglog(np.arange(1, c.size + 1), c, label=f"{label} ({int(c.sum()):,} matches, {c.size:,} queries)")
    if max_per_query:
        ax.axhline(max_per_query, color="grey", linestyle="--", linewidth=1, label=f"t = {max_per_query:,}")
    ax.set_xlabel("query rank (by matches)")
    ax.set_ylabel("pairs matched")
    ax.set_title("Matches per query")
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def write_query_count_report(store: Any, before: np.ndarray, after: np.ndarray, queries: pa.Table | None = None,
                             max_per_query: int | None = None, prefix: str = "") -> dict[str, str]:
    """``query_counts.parquet`` and ``query_counts.png`` under ``prefix`` of an ObjectStore; their URIs."""
    keys = {"table": f"{prefix}query_counts.parquet", "plot": f"{prefix}query_counts.png"}
    store.write_parquet(keys["table"], query_counts_table(before, after, queries))
    store.write_bytes(keys["plot"], render_query_counts(before, after, max_per_query))
    return {k: store.uri(v) for k, v in keys.items()}
