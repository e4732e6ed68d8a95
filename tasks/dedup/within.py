"""Duplicates within the dataset: exact and near copies grouped globally, each group keeping one row.

Why each step is there:

- **Exact first**, by the decoded-pixel digest where known (a re-encoded copy with the same
  pixels), else the bytes' sha256 (same bytes ⇒ same pixels).
- **Near among the rest**: pHash within ``radius``; low-information rows are left out (their hash
  bits are noise and collide), and pairs must also correlate as thumbnails (``verify.pair_ncc`` ≥
  ``min_ncc``), as for the eval sets. Groups are transitive (connected components).
- **Every group keeps its smallest ``sample_id``**: the result does not depend on shard order.

:func:`within_dataset_duplicates` is the single-process form over columns (the reference);
:func:`within_dataset_duplicates_distributed` gives the same result over many Parquet parts with no
task holding more than a partition of the rows and the driver holding no per-sample list. Every
step is an ``infra.fanout.shuffle`` through object storage (resumable):

1. **exact**: rows by their exact key; each key's smallest ``sample_id`` represents it;
2. the exact drops routed to their part's group (the band stage leaves them out);
3. **bands**: the r + 1 pigeonhole bands of each hash (two hashes within r bits agree exactly on
   at least one), candidate pairs per (band, value) group with capped candidate sets
   (:mod:`tasks.dedup.bands`). A count pass first finds the *hot* groups, those with more rows
   than one reduce should hold (:func:`hot_group_rows`), and samples them. A hot group that the
   sample says splits well by sub-bands is split in the map (each row once per sub-band, every
   sub-group reduced where its key lands, as one task would split it); any other hot group is
   cut into ranges of its code order of about ``hot_group_rows`` rows, every range reduced on its
   own with the next range's first ``max_candidates`` rows lent to it, which gives exactly the
   whole group's capped candidate set;
4. **verify** (with thumbnails): each pair fetches its two thumbnails from their parts, one side at
   a time, and keeps NCC ≥ ``min_ncc``;
5. **components**: alternating large-star / small-star rounds (:mod:`tasks.dedup.components`): each
   near group's members link to its smallest ``sample_id``;
6. **join**: an exact group whose representative is itself a near duplicate points to the near
   group's representative;
7. the drops routed to their part's group: :class:`DuplicateSets`, read one part at a time.

Rows carry a numeric node id (``part << 32 | row``) that places them in partitions and part groups.
The partition count comes from ``task_memory_mb``, the memory one reduce may use; with the capped
candidate sets and the hot groups cut into ranges, that bounds every task's memory and its work per
row, whatever the data size and however many images share 13 hash bits.

The hot path decides from a sample what one task decides from all of a group's rows (split, or
cap), so a hot group whose biggest sub-group is close to the rule's quarter may go the other way;
with every row sampled (``hot_rows`` ≤ 256) the decision is the one-task one. A hot group whose
sample agrees on a whole sub-band is capped in ranges, where one task would drop that sub-band
and try again.
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import json
import os
from collections import Counter
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from infra.fanout import cluster_cpus, map_shards, shuffle, split_by, values_or_raise
from infra.log import get_logger, log_event
from infra.storage import ObjectStore, read_parquet_once
from tasks.dedup.bands import (PairStats, band_values, bands, candidate_pairs, compact_ids, splits_well,
                               sub_band_bits, window_pairs)
from tasks.dedup.components import EDGE_SCHEMA, FileRef, by_node, components, mix64, rank_stars, spanning_stars
from tasks.dedup.hashing import check_kind
from tasks.dedup.mih import MultiIndexHash
from tasks.dedup.verify import DEFAULT_MIN_NCC, pair_ncc, thumbs_of

log = get_logger(__name__)

DUPLICATES_SCHEMA = pa.schema([
    pa.field("sample_id", pa.string(), nullable=False),
    pa.field("representative", pa.string(), nullable=False),
    pa.field("reason", pa.string(), nullable=False),  # duplicate_exact | duplicate_near
])


class _UnionFind:
    """Components over integer node ids; each root is its component's smallest id."""

    def __init__(self, n: int) -> None:
        self.parent = np.arange(n, dtype=np.int64)

    def find(self, x: int) -> int:
        p = self.parent
        root = x
        while p[root] != root:
            root = p[root]
        while p[x] != root:
            p[x], x = root, p[x]
        return int(root)

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            lo, hi = (ra, rb) if ra < rb else (rb, ra)
            self.parent[hi] = lo

    def roots(self) -> np.ndarray:
        return np.array([self.find(i) for i in range(len(self.parent))], dtype=np.int64)


def _exact_groups(sample_ids: Sequence[str], keys: Sequence[str | None]) -> dict[str, str]:
    """sample_id -> representative for every row whose key equals a smaller sample_id's."""
    rep: dict[str, str] = {}
    out = {}
    for sid, key in sorted(zip(sample_ids, keys), key=lambda x: x[0]):
        if key is None:
            continue
        if key in rep:
            out[sid] = rep[key]
        else:
            rep[key] = sid
    return out


def _exact_keys(pixels_sha256: Sequence[str | None] | None, sha256: Sequence[str | None] | None, n: int) -> list[str | None]:
    """Decoded-pixel digest where known, else the bytes' sha256 (same bytes ⇒ same pixels)."""
    keys: list[str | None] = [None] * n
    for src, tag in ((sha256, "b:"), (pixels_sha256, "p:")):
        if src is not None:
            for i, v in enumerate(src):
                if v is not None:
                    keys[i] = tag + v
    return keys


def _near_edges(codes: np.ndarray, radius: int, thumbs: np.ndarray | None, min_ncc: float) -> tuple[np.ndarray, np.ndarray]:
    """Pairs (i < j) within radius (and correlating ≥ min_ncc when thumbnails are given)."""
    qi, ci, _ = MultiIndexHash(codes).search(codes, radius)
    keep = qi < ci
    a, b = qi[keep], ci[keep]
    if thumbs is not None and len(a):
        ok = pair_ncc(thumbs[a], thumbs[b]) >= min_ncc
        a, b = a[ok], b[ok]
    return a, b


def _duplicates_table(exact: dict[str, str], near: dict[str, str]) -> pa.Table:
    """DUPLICATES_SCHEMA rows, sorted by sample_id, from the exact and near representative maps."""
    # An exact group's representative may itself be a near duplicate: point to the one kept.
    ids = list(exact) + list(near)
    reps = [near.get(r, r) for r in exact.values()] + list(near.values())
    reasons = ["duplicate_exact"] * len(exact) + ["duplicate_near"] * len(near)
    return pa.table({"sample_id": pa.array(ids, pa.string()), "representative": pa.array(reps, pa.string()),
                     "reason": pa.array(reasons, pa.string())}, schema=DUPLICATES_SCHEMA).sort_by("sample_id")


def within_dataset_duplicates(sample_ids: Sequence[str], hashes: np.ndarray | Sequence[int | None], radius: int, *,
                              sha256: Sequence[str | None] | None = None,
                              pixels_sha256: Sequence[str | None] | None = None,
                              low_info: Sequence[bool | None] | None = None,
                              thumbs: np.ndarray | None = None, min_ncc: float = DEFAULT_MIN_NCC) -> pa.Table:
    """Every duplicate row with its representative and reason (DUPLICATES_SCHEMA), in one process.

    Exact duplicates first (decoded-pixel digest, else bytes sha256); then near duplicates among
    the rest: pHash within ``radius`` (low-information rows excluded; pairs also verified by
    thumbnail correlation when ``thumbs`` are given), grouped transitively (connected components).
    Every group keeps its smallest ``sample_id``: deterministic whatever the shard order.
    """
    ids = [str(s) for s in sample_ids]
    n = len(ids)
    if len(set(ids)) != n:
        raise ValueError("within_dataset_duplicates: sample_ids are not unique")
    exact = _exact_groups(ids, _exact_keys(pixels_sha256, sha256, n))
    hashes_arr = pa.array(hashes, pa.uint64()) if not isinstance(hashes, np.ndarray) else pa.array(hashes.astype(np.uint64))
    valid = hashes_arr.is_valid().to_numpy(zero_copy_only=False)
    if low_info is not None:
        valid &= ~pa.array(low_info, pa.bool_()).fill_null(True).to_numpy(zero_copy_only=False)
    valid &= np.array([s not in exact for s in ids], dtype=bool)
    # Work in sample_id order so that component roots are the smallest ids.
    rows = np.flatnonzero(valid)
    rows = rows[np.argsort(np.array([ids[r] for r in rows], dtype=object), kind="stable")] if len(rows) else rows
    near: dict[str, str] = {}
    if len(rows) > 1:
        codes = hashes_arr.fill_null(0).to_numpy().astype(np.uint64)[rows]
        a, b = _near_edges(codes, radius, thumbs[rows] if thumbs is not None else None, min_ncc)
        uf = _UnionFind(len(rows))
        for x, y in zip(a.tolist(), b.tolist()):
            uf.union(x, y)
        roots = uf.roots()
        near = {ids[rows[k]]: ids[rows[roots[k]]] for k in np.flatnonzero(roots != np.arange(len(rows)))}
    return _duplicates_table(exact, near)


def near_duplicate_drops(sample_ids: Sequence[str], hashes: np.ndarray | Sequence[int | None], radius: int, *,
                         sha256: Sequence[str | None] | None = None, **kwargs: Any) -> set[str]:
    """The sample_ids to drop so that each (exact or near) duplicate group keeps one representative."""
    return set(within_dataset_duplicates(sample_ids, hashes, radius, sha256=sha256, **kwargs)
               .column("sample_id").to_pylist())


# ------------------------------------------------------------------------------------------------
# Over many parts: shuffles through object storage, nothing per-sample on the driver
# ------------------------------------------------------------------------------------------------

DEFAULT_MAX_CANDIDATES = 16
DEFAULT_TASK_MEMORY_MB = 1024


@dataclass(frozen=True)
class PartRef:
    """One Parquet part of the rows to deduplicate: ``path`` in ``store``, named ``key`` (unique).

    The part holds ``sample_id`` and the hash column, optionally ``sha256``, ``pixels_sha256``,
    ``low_info`` and ``thumb``; the shuffles read only those columns. ``rows``, when known, sizes
    the shuffles without reading the part's footer.
    """

    key: str
    store: ObjectStore
    path: str
    rows: int | None = None


_EXACT_COLUMNS = ("sample_id", "sha256", "pixels_sha256")
_NODE_SHIFT = np.uint64(32)
_ROW_MASK = np.uint64(0xFFFFFFFF)
_BYTES_TAG = np.uint64(0x62797465735F5F5F)  # byte-digest keys never equal pixel-digest keys
_HEX = np.full(256, 255, np.uint8)
for _i, _c in enumerate(b"0123456789abcdef"):
    _HEX[_c] = _i
for _i, _c in enumerate(b"ABCDEF"):
    _HEX[_c] = 10 + _i

EXACT_SCHEMA = pa.schema([("hi", pa.uint64()), ("lo", pa.uint64()), ("sample_id", pa.string()), ("node", pa.uint64())])
# A dropped row: which, where (node), kept instead, and why.
DROPS_SCHEMA = pa.schema([("sample_id", pa.string()), ("node", pa.uint64()), ("representative", pa.string()),
                          ("rep_node", pa.uint64()), ("reason", pa.string())])
# slot: -1 for a row of an ordinary group; in a hot group cut into ranges, 2k for a row of range k,
# 2k + 1 for a row of range k + 1 lent to range k (its first rows, which range k's last rows are
# compared with); in a hot group split in the map, -2 - c for its copy in sub-band c.
BAND_SCHEMA = pa.schema([("band", pa.int8()), ("value", pa.uint64()), ("code", pa.uint64()),
                         ("sample_id", pa.string()), ("node", pa.uint64()), ("slot", pa.int32())])
# Bytes one band row costs a reduce, with its sort and pairing copies (sizes the partitions).
_BAND_ROW_BYTES = 4 * (1 + 8 + 8 + 8 + 4 + 4 + 40)
# The count pass: (band, value, count) per part and group, and the sampled rows (code, sample_id;
# count 0) that place the hot groups' range starts.
COUNT_SCHEMA = pa.schema([("band", pa.int8()), ("value", pa.uint64()), ("count", pa.int64()), ("code", pa.uint64()),
                          ("sample_id", pa.string())])
# A hot group: split by sub-bands in the map (one row, range 0), or its ranges: range 0 (no start)
# and ranges 1.. starting at (start_code, start_id); a range ends where the next starts, and its
# task also takes the next range's rows up to (halo_code, halo_id) inclusive (null: to the end).
HOT_SCHEMA = pa.schema([("band", pa.int8()), ("value", pa.uint64()), ("split", pa.bool_()), ("range", pa.int32()),
                        ("start_code", pa.uint64()), ("start_id", pa.string()), ("halo_code", pa.uint64()),
                        ("halo_id", pa.string())])
_RANGE_SAMPLES = 256  # sampled rows per range of a hot group (a range is ~hot_rows rows)
_SAMPLE_SALT = np.uint64(0x5A17ED5A5A17ED5A)
_RANGE_MIX = np.uint64(0x9E3779B97F4A7C15)
_SUB_MIX = np.uint64(0xC2B2AE3D27D4EB4F)
_COUNTS = b"counts"
_THUMBS = b"thumbs"


def _read_part(part: PartRef, required: Sequence[str], optional: Sequence[str]) -> tuple[pa.Table, list[str]]:
    """The part's ``required`` columns and those of ``optional`` it has (no other column is read),
    and the names of all its columns."""
    uri = part.store.uri(part.path)
    with part.store.filesystem.open_input_file(part.store.fs_path(part.path)) as f:
        parquet = pq.ParquetFile(f)
        names = parquet.schema_arrow.names
        missing = [c for c in required if c not in names]
        if missing:
            raise ValueError(f"{uri}: no column {', '.join(missing)} (part {part.key})")
        return parquet.read(columns=[*required, *(c for c in optional if c in names and c not in required)]), names


def _read_columns(part: PartRef, required: Sequence[str], optional: Sequence[str]) -> pa.Table:
    return _read_part(part, required, optional)[0]


def _nodes(index: int, rows: int) -> pa.Array:
    return pa.array((np.uint64(index) << _NODE_SHIFT) | np.arange(rows, dtype=np.uint64))


def _bucket(keys: np.ndarray, n: int) -> np.ndarray:
    return (mix64(keys) % np.uint64(n)).astype(np.int64)


def _digest_words(column: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(hi, lo, valid): the first 128 bits of hex digests (of any other string: its BLAKE2b)."""
    arr = (column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column).cast(pa.string())
    n = len(arr)
    valid = arr.is_valid().to_numpy(zero_copy_only=False)
    hi, lo = np.zeros(n, np.uint64), np.zeros(n, np.uint64)
    if not valid.any():
        return hi, lo, valid
    filled = arr.fill_null("0" * 32)
    nib = None
    if pc.min(pc.utf8_length(filled)).as_py() >= 32:
        raw = pc.utf8_slice_codeunits(filled, 0, 32).cast(pa.binary(32))
        chars = np.frombuffer(raw.buffers()[1], np.uint8)[raw.offset * 32:(raw.offset + n) * 32].reshape(n, 32)
        nib = _HEX[chars]
        if (nib[valid] == 255).any():
            nib = None
    if nib is None:  # not hex digests: hash the strings themselves
        words = np.zeros((n, 2), np.uint64)
        for i, v in enumerate(arr.to_pylist()):
            if v is not None:
                words[i] = np.frombuffer(hashlib.blake2b(v.encode(), digest_size=16).digest(), ">u8")
        return words[:, 0], words[:, 1], valid
    nib = nib.astype(np.uint64)
    for k in range(16):
        hi = (hi << np.uint64(4)) | nib[:, k]
        lo = (lo << np.uint64(4)) | nib[:, 16 + k]
    return hi, lo, valid


@dataclass(frozen=True)
class _Plan:
    """What every job of one within-dataset dedup shares."""

    parts: tuple[PartRef, ...]
    scratch: ObjectStore  # scratch/<digest>/: every shuffle of this dedup
    kind: str
    radius: int
    min_ncc: float
    max_candidates: int
    num_partitions: int
    num_groups: int  # part i's drops live in group i % num_groups
    hot_rows: int  # a (band, value) group with more rows is hot: reduced in ranges of about this many

    def groups_of(self, nodes: np.ndarray) -> np.ndarray:
        return ((nodes >> _NODE_SHIFT) % np.uint64(self.num_groups)).astype(np.int64)


@dataclass(frozen=True)
class _PartJob:
    key: str
    index: int


# ---- 1. exact keys -----------------------------------------------------------------------------


def _map_exact(job: _PartJob, plan: _Plan) -> list[pa.Table]:
    """(exact key, sample_id, node) of every row with a digest, by key."""
    part = plan.parts[job.index]
    table = _read_columns(part, ["sample_id"], _EXACT_COLUMNS)
    n = table.num_rows
    hi, lo, valid = np.zeros(n, np.uint64), np.zeros(n, np.uint64), np.zeros(n, bool)
    # Bytes first, then the decoded-pixel digest over it where known (the reference's rule).
    for name, tag in (("sha256", _BYTES_TAG), ("pixels_sha256", np.uint64(0))):
        if name in table.column_names:
            h, low, ok = _digest_words(table.column(name))
            hi, lo, valid = np.where(ok, h ^ tag, hi), np.where(ok, low, lo), valid | ok
    rows = np.flatnonzero(valid)
    t = pa.table([pa.array(hi[rows]), pa.array(lo[rows]), table.column("sample_id").take(pa.array(rows)),
                  _nodes(job.index, n).take(pa.array(rows))], schema=EXACT_SCHEMA)
    return split_by(t, _bucket(hi[rows] ^ lo[rows], plan.num_partitions), plan.num_partitions)


def _reduce_exact(partition: int, pieces: list[pa.Table], plan: _Plan) -> pa.Table:
    """Every key's rows are here: all but its smallest sample_id are exact drops (DROPS_SCHEMA)."""
    t = pa.concat_tables([EXACT_SCHEMA.empty_table(), *pieces])
    t = t.sort_by([("hi", "ascending"), ("lo", "ascending"), ("sample_id", "ascending")])
    hi, lo = t.column("hi").to_numpy(), t.column("lo").to_numpy()
    first = np.ones(len(hi), bool)
    first[1:] = (hi[1:] != hi[:-1]) | (lo[1:] != lo[:-1])
    head = np.flatnonzero(first)[np.cumsum(first) - 1]  # each row's group head
    drop = pa.array(~first)
    return pa.table([t.column("sample_id").filter(drop), t.column("node").filter(drop),
                     t.column("sample_id").take(pa.array(head)).filter(drop),
                     t.column("node").take(pa.array(head)).filter(drop),
                     pa.array(["duplicate_exact"] * int((~first).sum()), pa.string())], schema=DROPS_SCHEMA)


# ---- routing: rows of files to the group of their part --------------------------------------


@dataclass(frozen=True)
class _RouteSpec:
    plan: _Plan
    node_column: str  # the column naming the row's part


def _map_route(ref: FileRef, spec: _RouteSpec) -> list[pa.Table]:
    t = ref.store.read_parquet(ref.path)
    return split_by(t, spec.plan.groups_of(t.column(spec.node_column).to_numpy()), spec.plan.num_groups)


def _reduce_route(group: int, pieces: list[pa.Table], spec: _RouteSpec) -> pa.Table:
    """One group's rows, each once, by sample_id; their reasons counted in the schema metadata."""
    t = pa.concat_tables([DROPS_SCHEMA.empty_table(), *pieces]).sort_by("sample_id")
    if t.num_rows > 1:  # a member can come out of several reduces of the components
        ids = t.column("sample_id")
        repeat = pc.equal(ids.slice(1), ids.slice(0, t.num_rows - 1)).to_numpy(zero_copy_only=False)
        t = t.filter(pa.array(~np.r_[False, repeat]))
    counts = Counter(t.column("reason").to_pylist())
    return t.replace_schema_metadata({_COUNTS: json.dumps(dict(counts)).encode()})


def _route(refs: Sequence[FileRef], plan: _Plan, name: str, node_column: str, use_ray: bool) -> list[FileRef]:
    store = plan.scratch.child(name)
    keys = shuffle(_map_route, _reduce_route, refs, num_partitions=plan.num_groups, scratch=store,
                   context=_RouteSpec(plan, node_column), desc=f"within-dataset dedup: {name}", use_ray=use_ray)
    return [FileRef(f"{name}-{k}", store, k) for k in keys]


def _rows_of_part(table: pa.Table, index: int) -> pa.Table:
    parts = (table.column("node").to_numpy() >> _NODE_SHIFT).astype(np.int64)
    return table.filter(pa.array(parts == index))


# ---- 3. bands ----------------------------------------------------------------------------------


def hot_group_rows(task_memory_mb: int, max_candidates: int = DEFAULT_MAX_CANDIDATES) -> int:
    """Rows of one (band, value) group beyond which it is hot (reduced in ranges): a sixteenth of
    the band rows one reduce of ``task_memory_mb`` holds, so that one group, or one range of a hot
    one, adds little to a reduce sized for the average (290k rows at 1024 MB, 72k at 256)."""
    return max(4 * (max_candidates + 1), task_memory_mb * 2**20 // _BAND_ROW_BYTES // 16)


@dataclass(frozen=True)
class _BandSpec:
    plan: _Plan
    exact_groups: tuple[FileRef, ...]
    hot: tuple[FileRef, ...] = ()  # the count pass's hot ranges (HOT_SCHEMA), none when no group can be hot


def _band_rows(job: _PartJob, spec: _BandSpec) -> tuple[np.ndarray, pa.Array, pa.Array, list[str]]:
    """(codes, sample_ids, nodes) of the part's rows that enter the bands (a valid hash, not low
    information, not an exact drop), and the part's column names."""
    plan = spec.plan
    part = plan.parts[job.index]
    table, names = _read_part(part, ["sample_id", plan.kind], ["low_info"])
    ok = table.column(plan.kind).is_valid()
    if "low_info" in table.column_names:
        ok = pc.and_(ok, pc.invert(table.column("low_info").fill_null(True)))
    nodes = _nodes(job.index, table.num_rows)
    group = spec.exact_groups[job.index % plan.num_groups]
    exact = _rows_of_part(read_parquet_once(group.store, group.path), job.index).column("node")
    if len(exact):
        ok = pc.and_(ok, pc.invert(pc.is_in(nodes, exact)))
    ok = ok.combine_chunks() if isinstance(ok, pa.ChunkedArray) else ok
    codes = table.column(plan.kind).filter(ok).to_numpy().astype(np.uint64)
    ids, nodes = table.column("sample_id").filter(ok), nodes.filter(ok)
    ids = ids.combine_chunks() if isinstance(ids, pa.ChunkedArray) else ids
    return codes, ids, nodes, names


def _band_key(value: np.ndarray, band: int) -> np.ndarray:
    return value ^ (np.uint64(band) << np.uint64(58))


# ---- 3a. the count pass: which (band, value) groups are hot, and where their ranges start -----


def _map_band_counts(job: _PartJob, spec: _BandSpec) -> list[pa.Table]:
    """Per band, each value's row count in this part, and the sampled rows (~``_RANGE_SAMPLES``
    per ``hot_rows`` rows, chosen by a hash of the node: the sample only places range starts, the
    pairs do not depend on it)."""
    plan = spec.plan
    codes, ids, nodes, _ = _band_rows(job, spec)
    rate = min(1.0, _RANGE_SAMPLES / plan.hot_rows)
    sampled = np.flatnonzero(mix64(nodes.to_numpy() ^ _SAMPLE_SALT) <= np.uint64(min(2**64 - 1, int(rate * 2**64))))
    sample_ids = ids.take(pa.array(sampled))
    pieces, buckets = [], []
    for band, (shift, bits) in enumerate(bands(plan.radius)):
        value = band_values(codes, shift, bits)[0]
        if bits <= 20:  # a band of at most 2^20 values: counted in one pass, no sort
            count = np.bincount(value.astype(np.int64), minlength=1 << bits)
            uniq = np.flatnonzero(count).astype(np.uint64)
            count = count[uniq.astype(np.int64)]
        else:
            uniq, count = np.unique(value, return_counts=True)
        pieces.append(pa.table([pa.array(np.full(len(uniq), band, np.int8)), pa.array(uniq), pa.array(count),
                                pa.nulls(len(uniq), pa.uint64()), pa.nulls(len(uniq), pa.string())],
                               schema=COUNT_SCHEMA))
        pieces.append(pa.table([pa.array(np.full(len(sampled), band, np.int8)), pa.array(value[sampled]),
                                pa.array(np.zeros(len(sampled), np.int64)), pa.array(codes[sampled]), sample_ids],
                               schema=COUNT_SCHEMA))
        buckets += [_bucket(_band_key(uniq, band), plan.num_partitions),
                    _bucket(_band_key(value[sampled], band), plan.num_partitions)]
    return split_by(pa.concat_tables(pieces), np.concatenate(buckets), plan.num_partitions)


def _reduce_band_counts(partition: int, pieces: list[pa.Table], spec: _BandSpec) -> pa.Table:
    """The hot groups of this partition (HOT_SCHEMA): split in the map when their sample splits
    well (:func:`splits_well`), else cut into ranges: range k ≥ 1 starts at the sample of rank k·q
    in (code, sample_id) order, q = the samples per ``hot_rows`` rows; its predecessor also takes
    the rows up to the sample ``max_candidates`` further on."""
    plan = spec.plan
    t = pa.concat_tables([COUNT_SCHEMA.empty_table(), *pieces])
    is_sample = pc.is_valid(t.column("code"))
    counts = t.filter(pc.invert(is_sample)).group_by(["band", "value"]).aggregate([("count", "sum")])
    hot = counts.filter(pc.greater(counts.column("count_sum"), plan.hot_rows))
    if not hot.num_rows:
        return HOT_SCHEMA.empty_table()
    samples = (t.filter(is_sample).select(["band", "value", "code", "sample_id"])
               .join(hot, ["band", "value"], join_type="inner")
               .sort_by([("band", "ascending"), ("value", "ascending"), ("code", "ascending"),
                         ("sample_id", "ascending")]))
    rate = min(1.0, _RANGE_SAMPLES / plan.hot_rows)
    step = max(plan.max_candidates + 2, round(rate * plan.hot_rows))
    s_band, s_value = samples.column("band").to_numpy(), samples.column("value").to_numpy()
    s_code, s_id = samples.column("code").to_numpy(), samples.column("sample_id").to_pylist()
    group = compact_ids(s_band, s_value)  # samples are sorted: ids follow (band, value)
    well = np.zeros(int(group.max()) + 1 if len(group) else 0, bool)
    for b, (shift, bits) in enumerate(bands(plan.radius)):  # the split rule, every hot group of a band at once
        at = np.flatnonzero(s_band == b)
        if len(at):
            well[np.unique(group[at])] = splits_well(group[at], band_values(s_code[at], shift, bits)[1], 64 - bits,
                                                     plan.radius)
    cols: dict[str, list] = {name: [] for name in HOT_SCHEMA.names}

    def add(band: int, value: int, rng: int, start: tuple | None = None, halo: tuple | None = None,
            split: bool = False) -> None:
        for name, v in zip(HOT_SCHEMA.names, (band, value, split, rng, *(start or (None, None)),
                                              *(halo or (None, None)))):
            cols[name].append(v)

    unsampled = set(zip(hot.column("band").to_pylist(), hot.column("value").to_pylist()))
    bounds = np.r_[np.flatnonzero(np.r_[True, group[1:] != group[:-1]]), len(group)] if len(group) else [0]
    for g, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
        b, v = int(s_band[lo]), int(s_value[lo])
        unsampled.discard((b, v))
        add(b, v, 0, split=bool(well[g]))
        if well[g]:
            continue
        for k, at in enumerate(range(lo + step, hi, step), start=1):
            end = at + plan.max_candidates
            add(b, v, k, (int(s_code[at]), s_id[at]), (int(s_code[end]), s_id[end]) if end < hi else None)
    for b, v in sorted(unsampled):  # hot without a sample: one range
        add(b, v, 0)
    return pa.table(cols, schema=HOT_SCHEMA)


def _keys_before(codes: np.ndarray, ids: pa.Array, at_codes: np.ndarray, at_ids: list[str], *,
                 inclusive: bool) -> np.ndarray:
    """For each row, how many of the sorted keys (at_codes, at_ids) come before its (code,
    sample_id): those ≤ it when ``inclusive``, else those < it (sample_id breaks code ties)."""
    lo = np.searchsorted(at_codes, codes, "left")
    hi = np.searchsorted(at_codes, codes, "right")
    out = lo.copy()
    ties = np.flatnonzero(hi > lo)
    if len(ties):
        find = bisect.bisect_right if inclusive else bisect.bisect_left
        for t, sid in zip(ties.tolist(), ids.take(pa.array(ties)).to_pylist()):
            out[t] = find(at_ids, sid, int(lo[t]), int(hi[t]))
    return out


def _hot_slots(codes: np.ndarray, ids: pa.Array, ranges: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """One hot group's rows of a part: (row index, slot), every row for its own range first, then
    the rows lent to the range before theirs."""
    starts = ranges.filter(pc.greater(ranges.column("range"), 0)).sort_by("range")
    own = np.zeros(len(codes), np.int64)
    lent = np.zeros(0, np.int64)
    if starts.num_rows:
        own = _keys_before(codes, ids, starts.column("start_code").to_numpy(), starts.column("start_id").to_pylist(),
                           inclusive=True)
        # A row of range k is lent to range k - 1 when it is ≤ range k's halo end, (halo_code,
        # halo_id): fewer than k halo ends lie before it (they are sorted; a null one, the last
        # range's, means to the group's end).
        to_end = starts.column("halo_code").is_null().to_numpy(zero_copy_only=False)
        halo_code = starts.column("halo_code").fill_null(np.iinfo(np.uint64).max).to_numpy()
        halo_id = starts.column("halo_id").fill_null("").to_pylist()
        later = np.flatnonzero(own > 0)
        k = own[later] - 1
        below = _keys_before(codes[later], ids.take(pa.array(later)), halo_code, halo_id, inclusive=False)
        lent = later[to_end[k] | (below <= k)]
    return np.r_[np.arange(len(codes)), lent], np.r_[2 * own, 2 * (own[lent] - 1) + 1]


@functools.lru_cache(maxsize=2)
def _hot_ranges(refs: tuple[FileRef, ...]) -> pa.Table:
    """Every hot group's ranges, read once per process (every band map of a dedup reads them all)."""
    return pa.concat_tables([HOT_SCHEMA.empty_table(), *(r.store.read_parquet(r.path) for r in refs)])


def _map_bands(job: _PartJob, spec: _BandSpec) -> list[pa.Table]:
    """One (band, band value, code, sample_id, node, slot) row per pigeonhole band of each usable
    row; a row of a hot group goes once to each of its sub-band groups (a group that splits well)
    or to its range (and the first rows of a range also to the one before)."""
    plan = spec.plan
    parts = plan.radius + 1
    codes, ids, nodes, names = _band_rows(job, spec)
    hot = _hot_ranges(spec.hot)
    pieces, buckets = [], []
    for band, (shift, bits) in enumerate(bands(plan.radius)):
        value, free = band_values(codes, shift, bits)
        band_hot = hot.filter(pc.equal(hot.column("band"), band)).sort_by([("value", "ascending"), ("range", "ascending")])
        hot_values = band_hot.column("value").to_numpy()
        first = np.flatnonzero(np.r_[True, hot_values[1:] != hot_values[:-1]]) if len(hot_values) else np.zeros(0, int)
        split_values = hot_values[first][band_hot.column("split").to_numpy(zero_copy_only=False)[first]]
        # Every row once in place (its slot and partition key set where it is hot), then the extra
        # copies: rows lent to the range before theirs, and the sub-band copies past the first.
        slot = np.full(len(codes), -1, np.int32)
        key = _band_key(value, band)
        extra: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        members = np.flatnonzero(np.isin(value, split_values))
        if len(members):  # a copy per sub-band, keyed by its value there: all split groups at once
            widths = np.full(len(members), 64 - bits, np.int64)
            group_key = key[members]
            for c in range(parts):
                sub = sub_band_bits(free[members], widths, c, parts)[0]
                copy_key = group_key ^ np.uint64((c + 1) * int(_SUB_MIX) % 2**64) ^ (sub * _RANGE_MIX)
                if c == 0:
                    slot[members], key[members] = -2, copy_key
                else:
                    extra.append((members, np.full(len(members), -2 - c, np.int32), copy_key))
        ranged = np.flatnonzero(np.isin(value, np.setdiff1d(hot_values, split_values)))
        if len(ranged):  # the groups cut into ranges, one at a time (their rows by value, one sort)
            ranged = ranged[np.argsort(value[ranged], kind="stable")]
            cuts = np.flatnonzero(np.r_[True, value[ranged][1:] != value[ranged][:-1], True])
            for lo, hi in zip(cuts[:-1], cuts[1:]):
                members = ranged[lo:hi]
                v = value[members[0]]
                at_v = np.searchsorted(hot_values, v)
                ranges = band_hot.slice(at_v, np.searchsorted(hot_values, v, "right") - at_v)
                at, slots = _hot_slots(codes[members], ids.take(pa.array(members)), ranges)
                keys = key[members[at]] ^ (slots // 2 + 1).astype(np.uint64) * _RANGE_MIX
                own = len(members)  # every row for its own range first, then the lent rows
                slot[members], key[members] = slots[:own], keys[:own]
                if len(at) > own:
                    extra.append((members[at[own:]], slots[own:].astype(np.int32), keys[own:]))
        pieces.append(pa.table([pa.array(np.full(len(codes), band, np.int8)), pa.array(value), pa.array(codes), ids,
                                nodes, pa.array(slot)], schema=BAND_SCHEMA))
        buckets.append(_bucket(key, plan.num_partitions))
        if extra:
            rows = np.concatenate([e[0] for e in extra])
            pieces.append(pa.table([pa.array(np.full(len(rows), band, np.int8)), pa.array(value[rows]),
                                    pa.array(codes[rows]), ids.take(pa.array(rows)), nodes.take(pa.array(rows)),
                                    pa.array(np.concatenate([e[1] for e in extra]))], schema=BAND_SCHEMA))
            buckets.append(_bucket(np.concatenate([e[2] for e in extra]), plan.num_partitions))
    out = split_by(pa.concat_tables(pieces), np.concatenate(buckets), plan.num_partitions)
    has_thumbs = b"1" if "thumb" in names else b"0"
    return [t.replace_schema_metadata({_THUMBS: has_thumbs}) for t in out]


def _reduce_bands(partition: int, pieces: list[pa.Table], spec: _BandSpec) -> pa.Table:
    """Pairs within radius inside each (band, value) group, once each (EDGE_SCHEMA, a < b)."""
    plan = spec.plan
    t = pa.concat_tables([BAND_SCHEMA.empty_table(), *pieces])
    stats = PairStats()
    edges = EDGE_SCHEMA.empty_table()
    with_thumbs = sum(1 for p in pieces if (p.schema.metadata or {}).get(_THUMBS) == b"1")
    found = hot_range_rows = hot_ranges = hot_split_rows = 0
    if t.num_rows > 1:
        band = t.column("band").to_numpy()
        slot = t.column("slot").to_numpy()
        rank = pc.rank(t.column("sample_id"), sort_keys="ascending", tiebreaker="dense").to_numpy().astype(np.int64)
        span = int(rank.max()) + 1
        lo_hi = []
        # Bands never share a group: one band's rows in memory at a time.
        parts = plan.radius + 1
        for b, (shift, bits) in enumerate(bands(plan.radius)):
            in_band = band == b
            # Plain groups (slot -1), hot groups' ranges (slot ≥ 0), hot groups' copies in sub-band c
            # (slot -2 - c): never one group between two of these.
            for kind in (-1, 0, *(-2 - c for c in range(parts))):
                rows = np.flatnonzero(in_band & ((slot >= 0) if kind == 0 else (slot == kind)))
                if len(rows) < 2:
                    continue
                codes = t.column("code").take(pa.array(rows)).to_numpy()
                value = t.column("value").take(pa.array(rows)).to_numpy()
                free = band_values(codes, shift, bits)[1]
                widths = np.full(len(rows), 64 - bits, np.int64)
                if kind == 0:  # ranges of hot groups: the whole group's capped pairs, a range at a time
                    ranges = compact_ids(value, slot[rows] // 2)
                    i, j, part_stats = window_pairs(ranges, codes, rank[rows], slot[rows] % 2 == 0, plan.radius,
                                                    plan.max_candidates)
                    hot_range_rows += part_stats.capped_rows
                    hot_ranges += int(ranges.max()) + 1
                elif kind == -1:
                    i, j, part_stats = candidate_pairs(compact_ids(value), codes, free, widths, rank[rows],
                                                       plan.radius, plan.max_candidates)
                else:  # one sub-band's groups of split hot groups, one level down (as one task splits them)
                    sub, rest, left = sub_band_bits(free, widths, -2 - kind, parts)
                    i, j, part_stats = candidate_pairs(compact_ids(value, sub), codes, rest, left, rank[rows],
                                                       plan.radius, plan.max_candidates, np.ones(len(rows), np.int64))
                    hot_split_rows += len(rows)
                stats.add(part_stats)
                ri, rj = rank[rows[i]], rank[rows[j]]
                lo_hi.append((np.minimum(ri, rj), np.maximum(ri, rj)))
        lo = np.concatenate([p[0] for p in lo_hi]) if lo_hi else np.zeros(0, np.int64)
        hi = np.concatenate([p[1] for p in lo_hi]) if lo_hi else np.zeros(0, np.int64)
        found = len(lo)
        if found and not with_thumbs:  # no pixel verification follows: only the components matter
            lo, hi = rank_stars(lo, hi, span)
        elif found:  # each pair verified once
            pair = np.unique(lo * span + hi)
            lo, hi = pair // span, pair % span
        if len(lo):
            row_of_rank = np.zeros(span, np.int64)
            row_of_rank[rank] = np.arange(len(rank))
            a, b = pa.array(row_of_rank[lo]), pa.array(row_of_rank[hi])
            ids, nodes = t.column("sample_id"), t.column("node")
            edges = pa.table([ids.take(a), nodes.take(a), ids.take(b), nodes.take(b)], schema=EDGE_SCHEMA)
    meta = {"comparisons": stats.comparisons, "capped_rows": stats.capped_rows, "largest_group": stats.largest_group,
            "pairs": found, "parts_with_thumbs": with_thumbs, "hot_range_rows": hot_range_rows, "hot_ranges": hot_ranges,
            "hot_split_copies": hot_split_rows}
    return edges.replace_schema_metadata({b"pairs": json.dumps(meta).encode()})


# ---- 4. verification by thumbnails ---------------------------------------------------------


@dataclass(frozen=True)
class _VerifySpec:
    plan: _Plan
    side: str  # "a" (fetch a's thumbnails) or "b" (fetch b's, then verify)


_WITH_THUMB_A = EDGE_SCHEMA.append(pa.field("thumb_a", pa.binary()))


def _map_verify(ref: FileRef, spec: _VerifySpec) -> list[pa.Table]:
    t = ref.store.read_parquet(ref.path)
    groups = spec.plan.groups_of(t.column(f"{spec.side}_node").to_numpy())
    return split_by(t, groups, spec.plan.num_groups)


def _thumbs_for(plan: _Plan, nodes: np.ndarray) -> pa.Array:
    """Each node's thumbnail from its part (null where the part has none), one part read at a time."""
    out: list[bytes | None] = [None] * len(nodes)
    parts = (nodes >> _NODE_SHIFT).astype(np.int64)
    rows = (nodes & _ROW_MASK).astype(np.int64)
    for index in np.unique(parts):
        at = np.flatnonzero(parts == index)
        table = _read_columns(plan.parts[int(index)], [], ["thumb"])
        if "thumb" not in table.column_names:
            continue
        values = table.column("thumb").take(pa.array(rows[at])).to_pylist()
        for k, v in zip(at.tolist(), values):
            out[k] = v if v is not None else b""
    return pa.array(out, pa.binary())


def _reduce_verify(group: int, pieces: list[pa.Table], spec: _VerifySpec) -> pa.Table:
    plan = spec.plan
    if spec.side == "a":
        t = pa.concat_tables([EDGE_SCHEMA.empty_table(), *pieces])
        return t.append_column("thumb_a", _thumbs_for(plan, t.column("a_node").to_numpy()))
    t = pa.concat_tables([_WITH_THUMB_A.empty_table(), *pieces])
    thumb_b = _thumbs_for(plan, t.column("b_node").to_numpy())
    thumb_a = t.column("thumb_a").combine_chunks()
    unverifiable = pc.or_(pc.is_null(thumb_a), pc.is_null(thumb_b)).to_numpy(zero_copy_only=False)
    keep = unverifiable.copy()
    check = np.flatnonzero(~unverifiable)
    step = 4096  # pairs per NCC batch: bounded float32 copies
    for lo in range(0, len(check), step):
        at = check[lo:lo + step]
        ncc = pair_ncc(thumbs_of(thumb_a.take(pa.array(at))), thumbs_of(thumb_b.take(pa.array(at))))
        keep[at] = ncc >= plan.min_ncc
    return spanning_stars(t.select(EDGE_SCHEMA.names).filter(pa.array(keep)))


# ---- 6. join: exact representatives that are near duplicates --------------------------------


@dataclass(frozen=True)
class _JoinSpec:
    plan: _Plan


def _map_join(ref: FileRef, spec: _JoinSpec) -> list[pa.Table]:
    """Exact drops by their representative's node; near members by their own node."""
    t = ref.store.read_parquet(ref.path)
    n = spec.plan.num_partitions
    if "a" in t.column_names:  # star edges (root, member) of the components
        t = pa.table([t.column("b"), t.column("b_node"), t.column("a"), t.column("a_node"),
                      pa.array(["duplicate_near"] * t.num_rows, pa.string())], schema=DROPS_SCHEMA)
        return by_node(t, "node", n)
    return by_node(t.cast(DROPS_SCHEMA), "rep_node", n)


def _reduce_join(partition: int, pieces: list[pa.Table], spec: _JoinSpec) -> pa.Table:
    t = pa.concat_tables([DROPS_SCHEMA.empty_table(), *pieces])
    is_near = pc.equal(t.column("reason"), "duplicate_near")
    near, exact = t.filter(is_near), t.filter(pc.invert(is_near))
    if not near.num_rows or not exact.num_rows:
        return t
    # A member may come out of several component reduces, always with the same root: one row each.
    roots = (near.select(["node", "representative", "rep_node"]).rename_columns(["rep_node", "root", "root_node"])
             .group_by("rep_node").aggregate([("root", "min"), ("root_node", "min")]))
    roots = roots.select(["rep_node", "root_min", "root_node_min"]).rename_columns(["rep_node", "near_rep", "near_rep_node"])
    joined = exact.join(roots, "rep_node", join_type="left outer")
    moved = pc.is_valid(joined.column("near_rep"))
    exact = pa.table([joined.column("sample_id"), joined.column("node"),
                      pc.if_else(moved, joined.column("near_rep"), joined.column("representative")),
                      pc.if_else(moved, joined.column("near_rep_node"), joined.column("rep_node")),
                      joined.column("reason")], schema=DROPS_SCHEMA)
    return pa.concat_tables([exact, near])


# ---- the whole -----------------------------------------------------------------------------


@dataclass(frozen=True)
class DuplicateSets:
    """The within-dataset drops, by part group: part i's drops are in ``groups[i % len(groups)]``.

    Read with :meth:`part_drops` (one part) or :meth:`table` (everything: small builds and tests)."""

    parts: tuple[str, ...]  # part keys in index order
    groups: tuple[FileRef, ...]
    counts: Mapping[str, int]  # drops per reason

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def part_drops(self, part_key: str) -> pa.Table:
        """DROPS_SCHEMA rows of one part, by sample_id."""
        if not self.groups:
            return DROPS_SCHEMA.empty_table()
        index = self.parts.index(part_key)
        ref = self.groups[index % len(self.groups)]
        return _rows_of_part(read_parquet_once(ref.store, ref.path), index)

    def table(self) -> pa.Table:
        """Every drop (DUPLICATES_SCHEMA), sorted by sample_id."""
        t = pa.concat_tables([DROPS_SCHEMA.empty_table(),
                              *(r.store.read_parquet(r.path).cast(DROPS_SCHEMA) for r in self.groups)])
        return t.select(DUPLICATES_SCHEMA.names).cast(DUPLICATES_SCHEMA).sort_by("sample_id")


def _shuffle_scratch(scratch: ObjectStore, parts: Sequence[PartRef], **settings: Any) -> ObjectStore:
    """``scratch/<digest>/``: the digest names the parts and settings the pieces are made of, so a
    rerun resumes only from pieces of the same dedup (the parts' content is the caller's: ``scratch``
    sits under a fingerprinted work directory)."""
    spec = {"parts": [(p.key, p.store.uri(p.path)) for p in parts], **settings}
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
    return scratch.child(f"d-{digest}")


def _footer_rows(part: PartRef, _: Any = None) -> int:
    uri = part.store.uri(part.path)
    try:
        with part.store.filesystem.open_input_file(part.store.fs_path(part.path)) as f:
            return pq.ParquetFile(f).metadata.num_rows
    except FileNotFoundError:
        raise FileNotFoundError(f"{uri}: no such part ({part.key})") from None


def _total_rows(parts: Sequence[PartRef], use_ray: bool) -> int:
    """Rows of every part: as given, else from their footers (read on workers)."""
    unknown = [p for p in parts if p.rows is None]
    counted = map_shards(_footer_rows, unknown, desc="within-dataset dedup: part sizes", use_ray=use_ray) if unknown else []
    return sum(p.rows for p in parts if p.rows is not None) + sum(values_or_raise("within-dataset dedup", counted))


def partition_count(rows: int, radius: int, task_memory_mb: int) -> int:
    """Reduce partitions so that one band reduce (the biggest shuffle) fits in ``task_memory_mb``."""
    bytes_needed = rows * (min(radius, 63) + 1) * _BAND_ROW_BYTES
    return max(1, -(-bytes_needed // (task_memory_mb * 1024 * 1024)))


def _metadata_sum(refs: Sequence[FileRef], key: bytes) -> Counter:
    total: Counter = Counter()
    for ref in refs:
        with ref.store.filesystem.open_input_file(ref.store.fs_path(ref.path)) as f:
            meta = pq.read_schema(f).metadata or {}
        if key in meta:
            for k, v in json.loads(meta[key]).items():
                total[k] = max(total[k], v) if k == "largest_group" else total[k] + v
    return total


def within_dataset_duplicates_distributed(parts: Sequence[PartRef], *, scratch: ObjectStore, radius: int,
                                          kind: str = "phash", min_ncc: float | None = None,
                                          max_candidates: int = DEFAULT_MAX_CANDIDATES,
                                          task_memory_mb: int = DEFAULT_TASK_MEMORY_MB,
                                          num_partitions: int | None = None, hot_rows: int | None = None,
                                          use_ray: bool = True) -> DuplicateSets:
    """Global exact + near duplicates over many Parquet parts, through ``infra.fanout.shuffle``.

    Equals :func:`within_dataset_duplicates` on the concatenated parts (same drops,
    representatives and reasons) whatever the number of parts or partitions, as long as no
    (sub-)group of hashes outgrows ``max_candidates``; beyond that each row is compared with its
    ``max_candidates`` nearest rows in hash order (:mod:`tasks.dedup.bands`). Pairs are verified
    by thumbnail correlation ≥ ``min_ncc`` (``DEFAULT_MIN_NCC`` when None) when the parts have a
    ``thumb`` column. ``num_partitions`` defaults to what ``task_memory_mb`` needs (at least one
    per CPU of the cluster, at most one per part). A (band, value) group of more than ``hot_rows``
    rows (default :func:`hot_group_rows` of ``task_memory_mb``) is hot: split by sub-bands in the
    map when a sample of it splits well, else capped and reduced in code-order ranges of about
    ``hot_rows`` rows, so no reduce holds a whole one. Every shuffle writes under
    ``scratch/d-<digest>/`` (the digest names the parts and settings); a rerun with the same ones
    skips every finished map and reduce.
    """
    check_kind(kind)
    if max_candidates < 1:
        raise ValueError("within-dataset dedup: max_candidates must be >= 1")
    keys = tuple(p.key for p in parts)
    if not parts:
        return DuplicateSets((), (), {})
    if len(set(keys)) != len(keys):
        raise ValueError("within-dataset dedup: part keys are not unique")
    hot = hot_group_rows(task_memory_mb, max_candidates) if hot_rows is None else hot_rows
    if hot < max_candidates + 2:
        raise ValueError(f"within-dataset dedup: hot_rows ({hot}) must be > max_candidates + 1 ({max_candidates + 1})")
    if num_partitions is None:
        cpus = cluster_cpus(default=os.cpu_count() or 1) if use_ray else 1
        rows: int | None = _total_rows(parts, use_ray)
        n = max(partition_count(rows, radius, task_memory_mb), min(len(parts), cpus))
    else:  # the parts' sizes only where given: a rerun reads its finished pieces, never the parts
        rows = sum(p.rows for p in parts) if all(p.rows is not None for p in parts) else None
        n = num_partitions
    verify = DEFAULT_MIN_NCC if min_ncc is None else min_ncc
    root = _shuffle_scratch(scratch, parts, num_partitions=n, kind=kind, radius=radius, min_ncc=verify,
                            max_candidates=max_candidates, hot_rows=hot)
    plan = _Plan(tuple(parts), root, kind, radius, verify, max_candidates, n, min(n, len(parts)), hot)
    jobs = [_PartJob(p.key, i) for i, p in enumerate(parts)]

    def run(name: str, map_fn: Any, reduce_fn: Any, items: Sequence[Any], context: Any, partitions: int = n
            ) -> list[FileRef]:
        store = root.child(name)
        out = shuffle(map_fn, reduce_fn, items, num_partitions=partitions, scratch=store, context=context,
                      desc=f"within-dataset dedup: {name}", use_ray=use_ray)
        return [FileRef(f"{name}-{k}", store, k) for k in out]

    exact = run("exact", _map_exact, _reduce_exact, jobs, plan)
    exact_groups = _route(exact, plan, "exact-groups", "node", use_ray)
    # No group can be hot when there are no more rows than that: no count pass.
    hot_ranges = run("band-counts", _map_band_counts, _reduce_band_counts, jobs,
                     _BandSpec(plan, tuple(exact_groups))) if rows is None or rows > hot else []
    edges = run("bands", _map_bands, _reduce_bands, jobs, _BandSpec(plan, tuple(exact_groups), tuple(hot_ranges)))
    pairs = _metadata_sum(edges, b"pairs")
    if pairs.get("parts_with_thumbs"):  # the parts have thumbnails: verify every pair on pixels
        edges = run("verify-a", _map_verify, _reduce_verify, edges, _VerifySpec(plan, "a"), plan.num_groups)
        edges = run("verify-b", _map_verify, _reduce_verify, edges, _VerifySpec(plan, "b"), plan.num_groups)
    stars = components(edges, scratch=root.child("components"), num_partitions=n, use_ray=use_ray)
    final = run("join", _map_join, _reduce_join, [*exact, *stars], _JoinSpec(plan))
    groups = _route(final, plan, "drops", "node", use_ray)
    counts = _metadata_sum(groups, _COUNTS)
    log_event(log, "within-dataset duplicates", parts=len(parts), partitions=n, hot_group_rows=hot,
              exact=counts.get("duplicate_exact", 0), near=counts.get("duplicate_near", 0), **dict(pairs))
    return DuplicateSets(keys, tuple(groups), dict(counts))
