"""Duplicates within the dataset: exact and near copies grouped globally, each group keeping one row.

Why each step is there:

- **Exact first**, by the decoded-pixel digest where known (a re-encoded copy with the same
  pixels), else the bytes' sha256 (same bytes ⇒ same pixels).
- **Near among the rest**: pHash within ``radius``; low-information rows are left out (their hash
  bits are noise and collide), and pairs must also correlate as thumbnails (``verify.pair_ncc`` ≥
  ``min_ncc``), as for the eval sets. Groups are transitive (connected components).
- **Every group keeps its smallest ``sample_id``**: the result does not depend on shard order.

:func:`within_dataset_duplicates` is the single-process form over columns (the reference);
:func:`within_dataset_duplicates_distributed` gives the same result over many Parquet parts with
two storage-backed shuffles (``infra.fanout.shuffle``): exact keys → sample ids, then the r + 1
pigeonhole bands of each hash → sample ids (two hashes within r bits agree exactly on at least
one of r + 1 bands, MIH's argument with a probe radius of 0). Reducers emit edges; components and
their smallest-id representatives are found on the driver over the edges only.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from infra.fanout import cluster_cpus, shuffle
from infra.log import get_logger, log_event
from infra.storage import ObjectStore
from tasks.dedup.hashing import check_kind
from tasks.dedup.mih import MultiIndexHash, chunk_bits
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
# Over many parts: two shuffles through object storage
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PartRef:
    """One Parquet part of the rows to deduplicate: ``path`` in ``store``, named ``key`` (unique).

    The part holds ``sample_id`` and the hash column, optionally ``sha256``, ``pixels_sha256``,
    ``low_info`` and ``thumb``; the shuffles read only those columns.
    """

    key: str
    store: ObjectStore
    path: str


_EXACT_COLUMNS = ("sample_id", "sha256", "pixels_sha256")
_BAND_COLUMNS = ("sample_id", "low_info", "thumb")  # and the hash column
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _read_columns(part: PartRef, required: Sequence[str], optional: Sequence[str]) -> pa.Table:
    """The part's ``required`` columns and those of ``optional`` it has; no other column is read."""
    uri = part.store.uri(part.path)
    with part.store.filesystem.open_input_file(part.store.fs_path(part.path)) as f:
        parquet = pq.ParquetFile(f)
        names = parquet.schema_arrow.names
        missing = [c for c in required if c not in names]
        if missing:
            raise ValueError(f"{uri}: no column {', '.join(missing)} (part {part.key})")
        return parquet.read(columns=[*required, *(c for c in optional if c in names and c not in required)])


def _values(table: pa.Table, name: str) -> list | None:
    return table.column(name).to_pylist() if name in table.column_names else None


def _partition_of(keys: np.ndarray, num_partitions: int) -> np.ndarray:
    return ((keys.astype(np.uint64) * _GOLDEN) >> np.uint64(40)).astype(np.int64) % num_partitions


def _str_key(values: Sequence[str]) -> np.ndarray:
    return np.array([int(v[2:18], 16) if v else 0 for v in values], dtype=np.uint64)


@dataclass(frozen=True)
class _ExactSpec:
    num_partitions: int


def _map_exact(part: PartRef, spec: _ExactSpec) -> list[pa.Table]:
    """Shuffle map: (exact key, sample_id) rows, partitioned by key."""
    table = _read_columns(part, ["sample_id"], _EXACT_COLUMNS)
    keys = _exact_keys(_values(table, "pixels_sha256"), _values(table, "sha256"), table.num_rows)
    rows = [i for i, k in enumerate(keys) if k is not None]
    t = pa.table({"key": pa.array([keys[i] for i in rows], pa.string()),
                  "sample_id": table.column("sample_id").take(pa.array(rows, pa.int64()))})
    n = spec.num_partitions
    p = _partition_of(_str_key(t.column("key").to_pylist()), n) if t.num_rows else np.zeros(0, np.int64)
    return [t.filter(pa.array(p == i)) for i in range(n)]


def _reduce_exact(partition: int, pieces: list[pa.Table], spec: _ExactSpec) -> pa.Table:
    """Shuffle reduce: every key's rows are here, so its groups are complete (DUPLICATES_SCHEMA)."""
    t = pa.concat_tables(pieces)
    exact = _exact_groups(t.column("sample_id").to_pylist(), t.column("key").to_pylist())
    return pa.table({"sample_id": pa.array(list(exact), pa.string()),
                     "representative": pa.array(list(exact.values()), pa.string()),
                     "reason": pa.array(["duplicate_exact"] * len(exact), pa.string())}, schema=DUPLICATES_SCHEMA)


@dataclass(frozen=True)
class _BandSpec:
    kind: str
    radius: int
    min_ncc: float
    num_partitions: int
    exact_drops: frozenset[str]  # rows already dropped as exact duplicates take no part in near groups


def _bands(radius: int) -> list[tuple[int, int]]:
    return chunk_bits(radius + 1) if radius < 64 else [(0, 64)]


def _map_bands(part: PartRef, spec: _BandSpec) -> list[pa.Table]:
    """Shuffle map: one (band, band value, sample_id, hash) row per pigeonhole band of each usable row."""
    table = _read_columns(part, ["sample_id", spec.kind], _BAND_COLUMNS)
    ok = table.column(spec.kind).is_valid()
    if "low_info" in table.column_names:
        ok = pc.and_(ok, pc.invert(table.column("low_info").fill_null(True)))
    if spec.exact_drops:
        drops = pa.array(sorted(spec.exact_drops), pa.string())
        ok = pc.and_(ok, pc.invert(pc.is_in(table.column("sample_id"), drops)))
    table = table.filter(ok)
    codes = table.column(spec.kind).to_numpy().astype(np.uint64)
    ids = table.column("sample_id")
    out: list[list[pa.Table]] = [[] for _ in range(spec.num_partitions)]
    for band, (shift, bits) in enumerate(_bands(spec.radius)):
        values = (codes >> np.uint64(shift)) & np.uint64((1 << bits) - 1 if bits < 64 else 0xFFFFFFFFFFFFFFFF)
        p = _partition_of(values ^ np.uint64(band), spec.num_partitions)
        cols = {"band": pa.array(np.full(len(codes), band, np.int8)), "value": pa.array(values), "sample_id": ids,
                "code": pa.array(codes)}
        if "thumb" in table.column_names:
            cols["thumb"] = table.column("thumb")
        t = pa.table(cols)
        for i in range(spec.num_partitions):
            out[i].append(t.filter(pa.array(p == i)))
    return [pa.concat_tables(ts) for ts in out]


def _reduce_bands(partition: int, pieces: list[pa.Table], spec: _BandSpec) -> pa.Table:
    """Shuffle reduce: within each (band, value) group, every verified pair within radius is an edge."""
    t = pa.concat_tables(pieces)
    empty = pa.table({"a": pa.array([], pa.string()), "b": pa.array([], pa.string())})
    if t.num_rows < 2:
        return empty
    band = t.column("band").to_numpy()
    value = t.column("value").to_numpy()
    order = np.lexsort((value, band))
    band, value = band[order], value[order]
    codes = t.column("code").to_numpy()[order]
    ids = np.array(t.column("sample_id").to_pylist(), dtype=object)[order]
    thumbs = thumbs_of(t.column("thumb").take(pa.array(order))) if "thumb" in t.column_names else None
    starts = np.flatnonzero(np.r_[True, (band[1:] != band[:-1]) | (value[1:] != value[:-1])])
    ends = np.r_[starts[1:], len(order)]
    edges_a, edges_b = [], []
    for s, e in zip(starts, ends):
        if e - s < 2:
            continue
        g = codes[s:e]
        d = np.bitwise_count(g[:, None] ^ g[None, :])
        i, j = np.nonzero(np.triu(d <= spec.radius, k=1))
        if thumbs is not None and len(i):
            ok = pair_ncc(thumbs[s + i], thumbs[s + j]) >= spec.min_ncc
            i, j = i[ok], j[ok]
        edges_a.extend(ids[s + i]), edges_b.extend(ids[s + j])
    if not edges_a:
        return empty
    return pa.table({"a": pa.array(edges_a, pa.string()), "b": pa.array(edges_b, pa.string())})


def _components(a: Sequence[str], b: Sequence[str]) -> dict[str, str]:
    """sample_id -> its component's smallest sample_id, for every non-root node of the edges (a, b)."""
    nodes = sorted(set(a) | set(b))
    pos = {s: i for i, s in enumerate(nodes)}
    uf = _UnionFind(len(nodes))
    for x, y in zip(a, b):
        uf.union(pos[x], pos[y])
    roots = uf.roots() if nodes else np.zeros(0, np.int64)
    return {nodes[k]: nodes[roots[k]] for k in range(len(nodes)) if roots[k] != k}


def _shuffle_scratch(scratch: ObjectStore, name: str, parts: Sequence[PartRef], **settings: Any) -> ObjectStore:
    """``scratch/<name>/<digest>/``: the digest names the parts and settings the pieces are made of,
    so a rerun resumes only from pieces of the same shuffle (the parts' content is the caller's:
    ``scratch`` sits under a fingerprinted work directory)."""
    spec = {"parts": sorted((p.key, p.store.uri(p.path)) for p in parts), **settings}
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
    return scratch.child(f"{name}/{digest}")


def within_dataset_duplicates_distributed(parts: Sequence[PartRef], *, scratch: ObjectStore, radius: int,
                                          kind: str = "phash", min_ncc: float | None = None,
                                          num_partitions: int | None = None, use_ray: bool = True) -> pa.Table:
    """Global exact + near duplicates over many Parquet parts (DUPLICATES_SCHEMA), through ``map_shards``.

    Equals :func:`within_dataset_duplicates` on the concatenated parts (same drops, representatives
    and reasons), whatever the number of parts or partitions. Two ``infra.fanout.shuffle`` runs
    write their pieces under ``scratch/exact/<digest>/`` and ``scratch/bands/<digest>/`` (the
    digest names the parts and settings); a rerun with the same ones skips every finished map and
    reduce. Pairs are verified by thumbnail correlation ≥ ``min_ncc`` (``DEFAULT_MIN_NCC`` when
    None) when the parts have a ``thumb`` column. ``num_partitions`` defaults to the cluster's CPUs
    (at most one per part).
    """
    check_kind(kind)
    if not parts:
        return DUPLICATES_SCHEMA.empty_table()
    n = num_partitions or max(1, min(len(parts), cluster_cpus(default=os.cpu_count() or 1)))
    exact_store = _shuffle_scratch(scratch, "exact", parts, num_partitions=n)
    keys = shuffle(_map_exact, _reduce_exact, parts, num_partitions=n, scratch=exact_store,
                   context=_ExactSpec(n), desc="within-dataset dedup: exact keys", use_ray=use_ray)
    exact: dict[str, str] = {}
    for key in keys:
        t = exact_store.read_parquet(key)
        exact.update(zip(t.column("sample_id").to_pylist(), t.column("representative").to_pylist()))

    verify = DEFAULT_MIN_NCC if min_ncc is None else min_ncc
    spec = _BandSpec(kind, radius, verify, n, frozenset(exact))
    bands_store = _shuffle_scratch(scratch, "bands", parts, num_partitions=n, kind=kind, radius=radius, min_ncc=verify)
    keys = shuffle(_map_bands, _reduce_bands, parts, num_partitions=n, scratch=bands_store, context=spec,
                   desc="within-dataset dedup: hash bands", use_ray=use_ray)
    a: list[str] = []
    b: list[str] = []
    for key in keys:
        t = bands_store.read_parquet(key)
        a += t.column("a").to_pylist()
        b += t.column("b").to_pylist()
    near = _components(a, b)
    log_event(log, "within-dataset duplicates", parts=len(parts), partitions=n, exact=len(exact), near=len(near))
    return _duplicates_table(exact, near)
