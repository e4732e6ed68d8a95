"""Connected components over an edge list too big for one process: alternating large-star and
small-star rounds (Kiveris et al., "Connected Components in MapReduce and Beyond", SoCC 2014), each
a storage-backed shuffle (``infra.fanout.shuffle``) keyed by node.

Why this algorithm: it needs only "group the edges by one endpoint" per step (so each task holds
one partition of the edges, never the graph), every step keeps each component's smallest node
(here: the smallest ``sample_id``), and it converges in O(log² n) rounds — a handful for
near-duplicate graphs. It ends when every component is a star around its smallest node, which a
large-star reduce checks locally on its input: every node has at most one smaller neighbour, and a
node with a smaller neighbour has no larger one.

Edges are :data:`EDGE_SCHEMA` rows ``(a, a_node, b, b_node)`` with ``a < b`` (sample ids) and the
nodes' numeric ids (``part << 32 | row``), which place them in partitions and in part groups.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from infra.coins import mix64
from infra.fanout import shuffle, split_by
from infra.log import get_logger, log_event
from infra.storage import ObjectStore

log = get_logger(__name__)

EDGE_SCHEMA = pa.schema([("a", pa.string()), ("a_node", pa.uint64()), ("b", pa.string()), ("b_node", pa.uint64())])
_DIRECTED = pa.schema([("u", pa.string()), ("u_node", pa.uint64()), ("v", pa.string()), ("v_node", pa.uint64())])
MAX_ROUNDS = 64  # Kiveris et al. bound rounds by O(log² n); 64 is far beyond any real graph
_STAR_VIOLATIONS = b"star_violations"


def by_node(table: pa.Table, column: str, n: int) -> list[pa.Table]:
    """Pieces of ``table`` partitioned by a hash of its numeric node column."""
    nodes = table.column(column).to_numpy()
    return split_by(table, (mix64(nodes) % np.uint64(n)).astype(np.int64), n)


def rank_stars(a: np.ndarray, b: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """For edges between nodes 0..n-1 (ranks: a smaller rank is a smaller id; duplicates allowed),
    each connected component as a star: (its smallest node, another node) per non-root node."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    graph = coo_matrix((np.ones(len(a), np.int8), (a, b)), shape=(n, n))
    _, label = connected_components(graph, directed=False)
    root = np.full(label.max() + 1, n, np.int64)
    np.minimum.at(root, label, np.arange(n))
    touched = np.zeros(n, bool)
    touched[a], touched[b] = True, True
    members = np.flatnonzero(touched & (root[label] != np.arange(n)))
    return root[label[members]], members


def spanning_stars(edges: pa.Table) -> pa.Table:
    """The same components in at most (nodes - 1) edges: in each connected component of ``edges``,
    its smallest node linked to every other node (EDGE_SCHEMA). A reduce that found many edges
    among few nodes (a cluster of copies) hands on only these."""
    if edges.num_rows < 2:
        return edges
    m = edges.num_rows
    ends = pa.concat_arrays([edges.column("a").combine_chunks(), edges.column("b").combine_chunks()])
    nodes = pa.concat_arrays([edges.column("a_node").combine_chunks(), edges.column("b_node").combine_chunks()])
    rank = pc.rank(ends, sort_keys="ascending", tiebreaker="dense").to_numpy().astype(np.int64) - 1
    n = int(rank.max()) + 1
    heads, members = rank_stars(rank[:m], rank[m:], n)
    where = np.zeros(n, np.int64)
    where[rank] = np.arange(2 * m)
    h, t = pa.array(where[heads]), pa.array(where[members])
    return pa.table([ends.take(h), nodes.take(h), ends.take(t), nodes.take(t)], schema=EDGE_SCHEMA)


@dataclass(frozen=True)
class FileRef:
    """One Parquet file of a shuffle's input: ``path`` in ``store``, named ``key`` (unique)."""

    key: str
    store: ObjectStore
    path: str


@dataclass(frozen=True)
class _StarSpec:
    num_partitions: int


def _unique_directed(pieces: Sequence[pa.Table]) -> pa.Table:
    """The directed edges of a partition, each once, sorted by (u, v)."""
    t = pa.concat_tables([_DIRECTED.empty_table(), *pieces])
    if t.num_rows == 0:
        return t
    t = t.sort_by([("u", "ascending"), ("v", "ascending")])
    u, v = t.column("u"), t.column("v")
    n = t.num_rows
    same = np.zeros(n, dtype=bool)
    if n > 1:
        same[1:] = (pc.equal(u.slice(1), u.slice(0, n - 1)).to_numpy(zero_copy_only=False)
                    & pc.equal(v.slice(1), v.slice(0, n - 1)).to_numpy(zero_copy_only=False))
    return t.filter(pa.array(~same))


def _groups(u: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """For rows sorted by ``u``: each row's group index and each group's first row."""
    n = len(u)
    start = np.ones(n, dtype=bool)
    if n > 1:
        start[1:] = pc.not_equal(u.slice(1), u.slice(0, n - 1)).to_numpy(zero_copy_only=False)
    first = np.flatnonzero(start)
    return np.cumsum(start) - 1, first


def _canonical(a: pa.Array, a_node: pa.Array, b: pa.Array, b_node: pa.Array) -> pa.Table:
    return pa.table([a, a_node, b, b_node], schema=EDGE_SCHEMA)


def _small_star_map(ref: FileRef, spec: _StarSpec) -> list[pa.Table]:
    """Each edge from its larger end to its smaller one, by the larger end."""
    t = ref.store.read_parquet(ref.path)
    directed = pa.table([t.column("b"), t.column("b_node"), t.column("a"), t.column("a_node")], schema=_DIRECTED)
    return by_node(directed, "u_node", spec.num_partitions)


def _small_star_reduce(partition: int, pieces: list[pa.Table], spec: _StarSpec) -> pa.Table:
    """Small-star: every node and its smaller neighbours all link to the smallest of them."""
    t = _unique_directed(pieces)
    if t.num_rows == 0:
        return EDGE_SCHEMA.empty_table()
    group, first = _groups(t.column("u"))
    m = t.column("v").take(pa.array(first[group]))  # sorted by v within u: the first is the smallest
    m_node = t.column("v_node").take(pa.array(first[group]))
    # (v, m) for every smaller neighbour v other than m, and (u, m) once per node.
    others = pc.not_equal(t.column("v"), m)
    leaves = pa.table([m.filter(others), m_node.filter(others), t.column("v").filter(others),
                       t.column("v_node").filter(others)], schema=EDGE_SCHEMA)
    heads = pa.table([m.take(pa.array(first)), m_node.take(pa.array(first)), t.column("u").take(pa.array(first)),
                      t.column("u_node").take(pa.array(first))], schema=EDGE_SCHEMA)
    return pa.concat_tables([leaves, heads])


def _large_star_map(ref: FileRef, spec: _StarSpec) -> list[pa.Table]:
    """Each edge in both directions, by its first end."""
    t = ref.store.read_parquet(ref.path)
    forward = pa.table([t.column("a"), t.column("a_node"), t.column("b"), t.column("b_node")], schema=_DIRECTED)
    back = pa.table([t.column("b"), t.column("b_node"), t.column("a"), t.column("a_node")], schema=_DIRECTED)
    return by_node(pa.concat_tables([forward, back]), "u_node", spec.num_partitions)


def _large_star_reduce(partition: int, pieces: list[pa.Table], spec: _StarSpec) -> pa.Table:
    """Large-star: every larger neighbour of a node links to the smallest of its neighbourhood.

    Also counts the nodes here that break the star shape of the input (schema metadata)."""
    t = _unique_directed(pieces)
    if t.num_rows == 0:
        return EDGE_SCHEMA.empty_table().replace_schema_metadata({_STAR_VIOLATIONS: b"0"})
    u, v = t.column("u"), t.column("v")
    group, first = _groups(u)
    smaller = pc.less(v, u).to_numpy(zero_copy_only=False)
    n_smaller = np.bincount(group, weights=smaller, minlength=len(first))
    n_larger = np.bincount(group, weights=~smaller, minlength=len(first))
    violations = int(((n_smaller > 1) | ((n_smaller == 1) & (n_larger > 0))).sum())
    first_v = v.take(pa.array(first[group]))
    first_v_node = t.column("v_node").take(pa.array(first[group]))
    use_u = pc.less(u, first_v)
    m = pc.if_else(use_u, u, first_v)
    m_node = pc.if_else(use_u, t.column("u_node"), first_v_node)
    larger = pa.array(~smaller)
    out = pa.table([m.filter(larger), m_node.filter(larger), v.filter(larger), t.column("v_node").filter(larger)],
                   schema=EDGE_SCHEMA)
    return out.replace_schema_metadata({_STAR_VIOLATIONS: str(violations).encode()})


def _star_violations(store: ObjectStore, keys: Sequence[str]) -> int:
    total = 0
    for key in keys:
        with store.filesystem.open_input_file(store.fs_path(key)) as f:
            meta = pq.read_schema(f).metadata or {}
        total += int(meta.get(_STAR_VIOLATIONS, b"0"))
    return total


def components(edges: Sequence[FileRef], *, scratch: ObjectStore, num_partitions: int,
               use_ray: bool = True) -> list[FileRef]:
    """Star edges ``(root, root_node, member, member_node)``: every node of the edges' graph but
    its component's smallest is a ``member`` once, linked to that smallest node (the ``root``).

    ``edges`` are files of :data:`EDGE_SCHEMA` rows (duplicates allowed); the rounds' pieces live
    under ``scratch/r<round>-{small,large}/`` and a rerun skips every finished map and reduce.
    """
    spec = _StarSpec(num_partitions)
    current = list(edges)
    for round_ in range(MAX_ROUNDS):
        small_store = scratch.child(f"r{round_:02d}-small")
        keys = shuffle(_small_star_map, _small_star_reduce, current, num_partitions=num_partitions,
                       scratch=small_store, context=spec, desc=f"components: small-star {round_}", use_ray=use_ray)
        small = [FileRef(f"small-{round_}-{k}", small_store, k) for k in keys]
        large_store = scratch.child(f"r{round_:02d}-large")
        keys = shuffle(_large_star_map, _large_star_reduce, small, num_partitions=num_partitions,
                       scratch=large_store, context=spec, desc=f"components: large-star {round_}", use_ray=use_ray)
        violations = _star_violations(large_store, keys)
        log_event(log, "components round", round=round_, nodes_off_star=violations)
        if violations == 0:
            return small
        current = [FileRef(f"large-{round_}-{k}", large_store, k) for k in keys]
    raise RuntimeError(f"components under {scratch.root}: no convergence after {MAX_ROUNDS} rounds")


def read_all(refs: Sequence[FileRef], schema: pa.Schema = EDGE_SCHEMA) -> pa.Table:
    """Every row of ``refs`` (small graphs and tests)."""
    return pa.concat_tables([schema.empty_table(), *(r.store.read_parquet(r.path).cast(schema) for r in refs)])


__all__: Any = ["EDGE_SCHEMA", "FileRef", "by_node", "components", "mix64", "rank_stars", "read_all", "spanning_stars"]
