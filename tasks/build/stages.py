"""The dataset build's stages, one function per Prefect task of ``flows/dataset.py``.

Each fans its per-shard jobs (``tasks.build.jobs``) out through ``infra.fanout`` or runs one of
the global reduces between them: the per-query counts and cap thresholds (balancing), the
within-dataset duplicates and the hold-out, the output-shard plan, the manifest and the reports.
No reduce holds a per-sample list on the driver: the within-dataset drops stay in storage by part
group, and the hold-out is merged on workers; the driver sees counts and keys.
"""

from __future__ import annotations

import functools
import hashlib
import io
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from infra.config import (BalanceConfig, DedupConfig, EvalSetConfig, GatherConfig, ImageConfig, ShardConfig,
                          SourceConfig, StorageConfig, TextFilterConfig, to_dict)
from infra.fanout import map_shards, shuffle, split_by, values_or_raise
from infra.funnel import Funnel
from infra.log import get_logger, log_event
from infra.manifest import Manifest, build_manifest
from infra.manifest import write_manifest as write_manifest_file
from infra.prefect_utils import publish_image, publish_markdown, publish_table
from infra.storage import ObjectStore
from tasks.build.jobs import CleanContext, FilterContext, clean_shard, ensure_query_matcher, filter_shard, query_counts
from tasks.build.records import (CleanStage, EvalIndexRef, FilterRecord, FilterStage, PartRows, QueryCountsSummary,
                                 QueryListRef, WithinResult, WrittenShards, to_json)
from tasks.build.workdir import WorkDir, fingerprint
from tasks.queries.output import QUERIES_KEY

log = get_logger(__name__)

Progress = Callable[[int, int], None] | None

# ------------------------------------------------------------------------------------------------
# Inputs: the query list, the input shards, the eval-set index
# ------------------------------------------------------------------------------------------------


def find_query_list(queries_root: str, storage: StorageConfig) -> QueryListRef | None:
    """The query list at ``queries_root`` (None if it has not been built)."""
    store = ObjectStore(queries_root, storage)
    if not store.exists(QUERIES_KEY):
        return None
    data = store.read_bytes(QUERIES_KEY)  # read once: checksum and row count from the same bytes
    rows = pq.ParquetFile(pa.BufferReader(data)).metadata.num_rows
    return QueryListRef(store.uri(QUERIES_KEY), hashlib.sha256(data).hexdigest(), rows)


def plan_inputs(sources: Sequence[SourceConfig], base_dir: str) -> list[Any]:
    """Every source cut into input shards (``tasks.readers.InputShard``)."""
    from tasks.readers import plan_input_shards

    shards = plan_input_shards(sources, base_dir)
    log_event(log, "planned input shards", shards=len(shards), sources=len(sources))
    return shards


def eval_index(eval_sets: Sequence[EvalSetConfig], root: str, storage: StorageConfig,
               dedup: DedupConfig) -> EvalIndexRef | None:
    """Build (or reuse: it is versioned by content) the perceptual-hash index of every eval set."""
    if not dedup.against_eval or not eval_sets:
        return None
    from infra.eval_sets import load_eval_set
    from tasks.dedup.eval_index import ensure_eval_index

    sets = [load_eval_set(e, max_images=e.max_images) for e in eval_sets]
    index, built = ensure_eval_index(sets, ObjectStore(root, storage), dedup.hash_kind,
                                     crop_variants=dedup.crop_variants, low_info_max_std=dedup.low_info_max_std,
                                     min_ncc=dedup.verify_min_ncc)
    log_event(log, "eval index", version=index.version, state="built" if built else "reused", **index.set_sizes())
    return EvalIndexRef(root, index.version, index.set_sizes(), built)


def record_config(dataset_root: str, storage: StorageConfig, resolved_yaml: str) -> None:
    """The resolved config beside the dataset (``config.resolved.yaml``)."""
    from infra.config import RESOLVED_CONFIG_NAME

    ObjectStore(dataset_root, storage).write_text(RESOLVED_CONFIG_NAME, resolved_yaml)


# ------------------------------------------------------------------------------------------------
# read -> filter -> match, and the per-query counts
# ------------------------------------------------------------------------------------------------


def filter_stage(shards: Sequence[Any], *, dataset_root: str, storage: StorageConfig, sources: Sequence[SourceConfig],
                 base_dir: str, text_filter: TextFilterConfig, queries: QueryListRef,
                 on_done: Progress = None, use_ray: bool = True) -> FilterStage:
    work = WorkDir.for_filter(dataset_root, storage, sources, base_dir, text_filter, queries.sha256)
    if shards:
        ensure_query_matcher(work, queries)
    results = map_shards(filter_shard, shards, context=FilterContext(work, queries, text_filter),
                         desc="read/filter/match", on_done=on_done, use_ray=use_ray)
    return FilterStage(work, tuple(values_or_raise("read-filter-match", results)))


@dataclass(frozen=True)
class _CapContext:
    work: WorkDir
    balance: BalanceConfig
    num_partitions: int


def _cap_pieces(record: FilterRecord, ctx: _CapContext) -> list[pa.Table]:
    """Shuffle map: one shard's (query_id, pair hash) of over-cap queries, at most t + 1 per query
    (the shard's smallest), partitioned by query."""
    from tasks.balance import CapHashes

    table = ctx.work.store.read_parquet(WorkDir.filtered(record.shard_id), columns=["sample_id", "query_ids"])
    caps = CapHashes.from_table(table, query_counts(ctx.work), ctx.balance)
    pairs = pa.table({"query_id": pa.array(caps.query_ids, pa.int64()), "hash": pa.array(caps.hashes, pa.uint64())})
    return split_by(pairs, (caps.query_ids % ctx.num_partitions).astype(np.int64), ctx.num_partitions)


def _cap_reduce(partition: int, pieces: list[pa.Table], ctx: _CapContext) -> pa.Table:
    """Shuffle reduce: every pair hash of this partition's queries is here; their cut-offs."""
    from tasks.balance import CapHashes

    t = pa.concat_tables([pa.schema([("query_id", pa.int64()), ("hash", pa.uint64())]).empty_table(), *pieces])
    caps = CapHashes(ctx.balance.max_per_query, t.column("query_id").to_numpy(), t.column("hash").to_numpy())
    queries = np.unique(caps.query_ids)
    cut = caps.thresholds(int(queries.max()) + 1 if len(queries) else 0)[queries]
    return pa.table({"query_id": pa.array(queries, pa.int64()), "threshold": pa.array(cut, pa.uint64())})


CAP_PAIRS_PER_PARTITION = 2_000_000  # (query, hash) pairs one cap reduce holds (~100 MB with its sort)


def count_queries(filtered: FilterStage, num_queries: int, balance: BalanceConfig, *,
                  use_ray: bool = True) -> QueryCountsSummary:
    """Reduce the shards' match counts into the global per-query counts (balancing's input); in
    exact mode also the per-query cut-off hashes: a shuffle by query over the shards' pairs of
    over-cap queries, so no process holds more than a partition of them."""
    counts = np.zeros(num_queries, dtype=np.int64)
    for r in filtered.records:
        np.add.at(counts, np.asarray(r.matches.query_ids, dtype=np.int64),
                  np.asarray(r.matches.query_counts, dtype=np.int64))
    nz = np.flatnonzero(counts)
    table = pa.table({"query_id": pa.array(nz, pa.int32()), "count_before": pa.array(counts[nz], pa.int64())})
    store = filtered.work.store
    store.write_parquet(WorkDir.QUERY_COUNTS, table.replace_schema_metadata({"num_queries": str(num_queries)}))
    if balance.mode == "exact":
        over = counts > balance.max_per_query
        pairs = int(np.minimum(counts[over], (balance.max_per_query + 1) * len(filtered.records)).sum())
        partitions = max(1, min(1024, -(-pairs // CAP_PAIRS_PER_PARTITION)))
        # Pieces are named by what makes them: the settings and the counts (which queries are over the cap).
        name = fingerprint(to_dict(balance), partitions, hashlib.sha256(counts.tobytes()).hexdigest())
        scratch = store.child(f"caps/{name}").scratch()
        keys = shuffle(_cap_pieces, _cap_reduce, list(filtered.records), num_partitions=partitions, scratch=scratch,
                       context=_CapContext(filtered.work, balance, partitions), desc="cap thresholds", use_ray=use_ray)
        thresholds = np.full(num_queries, np.iinfo(np.uint64).max, np.uint64)
        for key in keys:
            cut = scratch.read_parquet(key)
            thresholds[cut.column("query_id").to_numpy()] = cut.column("threshold").to_numpy()
        buf = io.BytesIO()
        np.save(buf, thresholds)
        store.write_bytes(WorkDir.CAP_THRESHOLDS, buf.getvalue())
    return QueryCountsSummary(int((counts > 0).sum()), int(counts.sum()), int((counts > balance.max_per_query).sum()))


# ------------------------------------------------------------------------------------------------
# balance -> fetch + images -> hash -> eval dedup
# ------------------------------------------------------------------------------------------------


def clean_stage(filtered: FilterStage, *, balance: BalanceConfig, gather: GatherConfig, images: ImageConfig,
                dedup: DedupConfig, index: EvalIndexRef | None, retry_failed: bool = False,
                on_done: Progress = None, use_ray: bool = True) -> CleanStage:
    work = filtered.work.for_clean(balance, gather, images, dedup, index.version if index else None)
    ctx = CleanContext(filtered.work, work, balance, gather, images, dedup, index, retry_failed)
    results = map_shards(clean_shard, filtered.records, context=ctx, desc="balance/fetch/images/eval-dedup",
                         on_done=on_done, use_ray=use_ray)
    return CleanStage(work, tuple(values_or_raise("balance-fetch-images-eval-dedup", results)))


# ------------------------------------------------------------------------------------------------
# Within the dataset: duplicates across all shards, then the hold-out among what is left
# ------------------------------------------------------------------------------------------------


def _duplicates(clean: CleanStage, dedup: DedupConfig, scratch: ObjectStore, use_ray: bool) -> Any:
    from tasks.dedup.within import DuplicateSets, PartRef, within_dataset_duplicates_distributed

    if not dedup.within_dataset or not clean.records:
        return DuplicateSets(tuple(r.shard_id for r in clean.records), (), {})
    store = clean.work.store
    parts = [PartRef(r.shard_id, store, WorkDir.clean(r.shard_id), r.rows) for r in clean.records]
    return within_dataset_duplicates_distributed(parts, scratch=scratch, radius=dedup.within_radius,
                                                 kind=dedup.hash_kind, min_ncc=dedup.verify_min_ncc,
                                                 max_candidates=dedup.max_candidates,
                                                 task_memory_mb=dedup.task_memory_mb, use_ray=use_ray)


# ---- the hold-out: the n smallest ranks among the survivors, merged on workers ----------------

HOLDOUT_SCHEMA = pa.schema([("rank", pa.binary(20)), ("sample_id", pa.string()), ("part", pa.string())])
HOLDOUT_FAN_IN = 64  # candidate files one merge job reads


@dataclass(frozen=True)
class _SurvivorContext:
    work: WorkDir
    prefix: str
    holdout_rows: int
    duplicates: Any  # tasks.dedup.within.DuplicateSets


def _survivor_ids(work: WorkDir, shard_id: str, duplicates: Any) -> pa.Array:
    """The sample ids of one clean part left after the within-dataset drops, in row order."""
    ids = work.store.read_parquet(WorkDir.clean(shard_id), columns=["sample_id"]).column("sample_id").combine_chunks()
    drops = duplicates.part_drops(shard_id).column("sample_id")
    return ids.filter(pc.invert(pc.is_in(ids, drops))) if len(drops) else ids


def _part_survivors(shard_id: str, ctx: _SurvivorContext) -> int:
    """Rows of one clean part left after the drops; writes its hold-out candidates (level 0)."""
    from tasks.shards import holdout_candidates

    left = _survivor_ids(ctx.work, shard_id, ctx.duplicates)
    if ctx.holdout_rows > 0:
        best = holdout_candidates(left.to_pylist(), ctx.holdout_rows)
        ctx.work.store.write_parquet(WorkDir.holdout_candidates(ctx.prefix, 0, shard_id), pa.table(
            [pa.array([r for r, _ in best], pa.binary(20)), pa.array([s for _, s in best], pa.string()),
             pa.array([shard_id] * len(best), pa.string())], schema=HOLDOUT_SCHEMA))
    return len(left)


@dataclass(frozen=True)
class _MergeJob:
    key: str
    inputs: tuple[str, ...]
    output: str


def _merge_candidates(job: _MergeJob, ctx: _SurvivorContext) -> dict[str, int]:
    """The ``holdout_rows`` smallest ranks of some candidate files; returns them counted per part."""
    store = ctx.work.store
    if not store.exists(job.output):
        table = pa.concat_tables([HOLDOUT_SCHEMA.empty_table(), *(store.read_parquet(k) for k in job.inputs)])
        store.write_parquet(job.output, table.sort_by("rank").slice(0, ctx.holdout_rows))
    return dict(Counter(store.read_parquet(job.output, columns=["part"]).column("part").to_pylist()))


def _select_holdout(ctx: _SurvivorContext, shard_ids: Sequence[str], use_ray: bool) -> dict[str, int]:
    """Merge the parts' candidates up a tree of ``HOLDOUT_FAN_IN``-way merges on workers into the
    hold-out file (``holdout_rows`` ids); returns how many rows each part holds out."""
    keys = [WorkDir.holdout_candidates(ctx.prefix, 0, s) for s in shard_ids]
    level = 0
    while True:
        level += 1
        chunks = [tuple(keys[i:i + HOLDOUT_FAN_IN]) for i in range(0, len(keys), HOLDOUT_FAN_IN)]
        last = len(chunks) == 1
        jobs = [_MergeJob(f"l{level}-{i:05d}", c, WorkDir.holdout_ids(ctx.prefix) if last
                          else WorkDir.holdout_candidates(ctx.prefix, level, f"m-{i:05d}")) for i, c in enumerate(chunks)]
        held = values_or_raise("hold-out", map_shards(_merge_candidates, jobs, context=ctx, desc=f"hold-out: merge {level}",
                                                      use_ray=use_ray))
        if last:
            return held[0]
        keys = [j.output for j in jobs]


def within_settings(dedup: DedupConfig) -> dict:
    """The dedup settings a within-dataset result depends on (not the memory budget: partitions
    never change the result)."""
    return {k: v for k, v in to_dict(dedup).items() if k != "task_memory_mb"}


def within_dataset(clean: CleanStage, dedup: DedupConfig, holdout_rows: int, *, use_ray: bool = True) -> WithinResult:
    """Exact and near duplicates across all shards (each group keeps its smallest sample_id, so the
    result does not depend on shard order), then the held-out pairs for retrieval evaluation: the
    ``holdout_rows`` deduplicated rows of smallest SHA-1 (``tasks.shards.select_holdout``).

    Nothing per sample reaches the driver: the drops stay in storage by part group
    (``DuplicateSets``), each part's survivors and hold-out candidates are found by a worker, and
    the candidates are merged on workers; the driver gets counts per part."""
    store = clean.work.store
    prefix = clean.work.within_prefix([(r.shard_id, r.rows, r.bytes) for r in clean.records],
                                      [within_settings(dedup), holdout_rows])
    dups = _duplicates(clean, dedup, store.child(WorkDir.within_scratch(prefix)).scratch(), use_ray)
    ctx = _SurvivorContext(clean.work, prefix, holdout_rows, dups)
    shard_ids = [r.shard_id for r in clean.records]
    left = values_or_raise("within-dataset", map_shards(_part_survivors, shard_ids, context=ctx,
                                                        desc="hold-out: survivors", use_ray=use_ray))
    held = _select_holdout(ctx, shard_ids, use_ray) if holdout_rows > 0 and shard_ids else {}
    parts = tuple(PartRows(s, n - held.get(s, 0), held.get(s, 0)) for s, n in zip(shard_ids, left))
    return WithinResult(prefix, dups.total, dict(dups.counts), parts, dups)


# ------------------------------------------------------------------------------------------------
# Output shards
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OutputShard:
    """One output shard to write: which slices of which clean parts, under which plan."""

    key: str  # "shards/part-00000" | "holdout/part-00000"
    index: int
    prefix: str  # "shards" | "holdout"
    slices: tuple[Any, ...]  # tasks.shards.ShardSlice
    plan_id: str


@dataclass(frozen=True)
class _WriteContext:
    work: WorkDir
    within_prefix: str
    duplicates: Any  # tasks.dedup.within.DuplicateSets
    has_holdout: bool
    dataset_root: str
    row_group_rows: int
    compression: str


@functools.lru_cache(maxsize=2)
def _holdout_table(work: WorkDir, prefix: str) -> pa.Table:
    """The hold-out file (``holdout_rows`` ids), read once per worker: it is complete before any writer starts."""
    return work.store.read_parquet(WorkDir.holdout_ids(prefix), columns=["sample_id", "part"])


def _held_of_part(work: WorkDir, prefix: str, shard_id: str) -> pa.Array:
    table = _holdout_table(work, prefix)
    return table.filter(pc.equal(table.column("part"), shard_id)).column("sample_id").combine_chunks()


def _write_output_shard(job: OutputShard, ctx: _WriteContext) -> dict:
    """Assemble one output shard from slices of clean parts and write it (skips if complete).

    Slices index the rows of a part left after dropping the duplicates and the held-out rows
    (the training shards), or the part's held-out rows (the held-out shard)."""
    from tasks.shards import completed_stats, write_shard

    out = ObjectStore(ctx.dataset_root, ctx.work.storage)
    done = completed_stats(out, job.index, job.plan_id, job.prefix)
    if done is not None:
        return done
    pieces = []
    for s in job.slices:
        table = ctx.work.store.read_parquet(WorkDir.clean(s.part))
        ids = table.column("sample_id")
        held = _held_of_part(ctx.work, ctx.within_prefix, s.part) if ctx.has_holdout else pa.array([], pa.string())
        if job.prefix == "holdout":
            table = table.filter(pc.is_in(ids, held))
        else:
            leave_out = pa.concat_arrays([ctx.duplicates.part_drops(s.part).column("sample_id").combine_chunks(), held])
            if len(leave_out):
                table = table.filter(pc.invert(pc.is_in(ids, leave_out)))
        pieces.append(table.slice(s.start, s.stop - s.start))
    table = pa.concat_tables(pieces, promote_options="default")
    if "status" not in table.column_names:
        table = table.append_column("status", pa.array(["ok"] * table.num_rows, pa.string()))
    return write_shard(out, job.index, table, ctx.row_group_rows, ctx.compression, job.prefix, job.plan_id)


def plan_output(clean: CleanStage, within: WithinResult, shards: ShardConfig) -> list[OutputShard]:
    """The output shards: a pure function of the data (rows per clean part after the drops)."""
    from tasks.shards import ShardSlice, plan_output_shards

    rows = within.by_part
    parts = [(r.shard_id, rows[r.shard_id].kept, int(r.bytes * rows[r.shard_id].kept / max(r.rows, 1)))
             for r in clean.records]
    plan = plan_output_shards(parts, shards.rows_per_shard, shards.max_bytes_per_shard)
    holdout = [ShardSlice(r.shard_id, 0, rows[r.shard_id].held) for r in clean.records if rows[r.shard_id].held]

    def plan_id(slices: Sequence[Any]) -> str:  # what goes into a shard: a marker from another plan is stale
        return fingerprint(clean.work.root, within.key, [(s.part, s.start, s.stop) for s in slices],
                           shards.row_group_rows, shards.compression)

    jobs = [OutputShard(f"shards/part-{i:05d}", i, "shards", tuple(sl), plan_id(sl)) for i, sl in enumerate(plan)]
    if holdout:
        jobs.append(OutputShard("holdout/part-00000", 0, "holdout", tuple(holdout), plan_id(holdout)))
    return jobs


def write_output(clean: CleanStage, within: WithinResult, *, dataset_root: str, shards: ShardConfig,
                 on_done: Progress = None, use_ray: bool = True) -> WrittenShards:
    """Write every output shard (skipping complete ones), then remove an earlier plan's extras."""
    from tasks.shards import remove_stale_shards

    jobs = plan_output(clean, within, shards)
    ctx = _WriteContext(clean.work, within.key, within.duplicates, any(p.held for p in within.parts), dataset_root,
                        shards.row_group_rows, shards.compression)
    written = values_or_raise("write-shards", map_shards(_write_output_shard, jobs, context=ctx, desc="write shards",
                                                         on_done=on_done, use_ray=use_ray))
    train = [w for j, w in zip(jobs, written) if j.prefix == "shards"]
    held = [w for j, w in zip(jobs, written) if j.prefix == "holdout"]
    store = ObjectStore(dataset_root, clean.work.storage)
    stale = remove_stale_shards(store, len(train)) + remove_stale_shards(store, len(held), "holdout")
    if stale:
        log_event(log, "removed an earlier plan's extra shards", files=len(stale))
    return WrittenShards(train, held)


# ------------------------------------------------------------------------------------------------
# Manifest and reports
# ------------------------------------------------------------------------------------------------


def build_funnel(filtered: FilterStage, clean: CleanStage, within: WithinResult) -> Funnel:
    """The whole build's funnel: every stage's rows in, drops by reason, rows out."""
    funnel = Funnel()
    for r in filtered.records:
        funnel.merge(r.funnel)
    for r in clean.records:
        funnel.merge(r.funnel)
    before = sum(r.rows for r in clean.records)
    funnel.record("dedup_within", before, before - within.drops)
    funnel.stage("dedup_within").dropped.update(within.reasons)
    return funnel


def write_manifest(*, dataset_root: str, storage: StorageConfig, config: dict, written: WrittenShards,
                   filtered: FilterStage, clean: CleanStage, counts: QueryCountsSummary, within: WithinResult,
                   queries: QueryListRef, index: EvalIndexRef | None) -> Manifest:
    """Write ``manifest.json`` and the funnel reports (files and UI artifacts); returns the manifest."""
    store = ObjectStore(dataset_root, storage)
    funnel = build_funnel(filtered, clean, within)
    manifest = build_manifest(config=config, shards=written.shards, funnel=funnel.to_dict(),
                              queries=to_json(queries), eval_index=to_json(index) if index else None,
                              holdout=written.holdout, work=clean.work.root, query_counts=to_json(counts))
    store.write_json("reports/funnel.json", funnel.to_dict())
    store.write_parquet("reports/funnel.parquet", funnel.to_table())
    write_manifest_file(store, manifest)
    publish_markdown("dataset-funnel", "## Dataset funnel\n\n" + funnel.to_markdown(),
                     f"{manifest.num_rows} rows in {manifest.num_shards} shards")
    publish_table("dataset-shards", [{"path": s.path, "rows": s.rows, "bytes": s.bytes} for s in manifest.shards])
    log_event(log, "dataset written", rows=manifest.num_rows, shards=manifest.num_shards, root=store.root)
    return manifest


def reports(*, dataset_root: str, filtered: FilterStage, clean: CleanStage, queries: QueryListRef,
            index: EvalIndexRef | None, max_per_query: int) -> dict:
    """Every report of a build: per-query counts and, with an eval index, the overlap report."""
    uris = query_count_report(dataset_root=dataset_root, filtered=filtered, clean=clean, queries=queries,
                              max_per_query=max_per_query)
    overlap = eval_overlap_report(dataset_root=dataset_root, clean=clean, index=index) if index else None
    return {"query_counts": uris, "overlap": overlap}


def query_count_report(*, dataset_root: str, filtered: FilterStage, clean: CleanStage, queries: QueryListRef,
                       max_per_query: int) -> dict[str, str]:
    """Per-query counts before/after balancing (table + log-log plot) under ``reports/``; their URIs."""
    from tasks.balance import write_query_count_report

    storage = clean.work.storage
    before = query_counts(filtered.work)
    after = np.zeros_like(before)
    for r in clean.records:
        np.add.at(after, np.asarray(r.matches.query_ids, dtype=np.int64),
                  np.asarray(r.matches.query_counts, dtype=np.int64))
    root, key = queries.uri.rsplit("/", 1)
    names = ObjectStore(root, storage).read_parquet(key).select(["query_id", "query"])
    out = ObjectStore(dataset_root, storage)
    uris = write_query_count_report(out, before, after, names, max_per_query, prefix="reports/")
    publish_image("query-counts", out.read_bytes("reports/query_counts.png"),
                  "pairs per query before and after balancing (log-log)")
    return uris


def eval_overlap_report(*, dataset_root: str, clean: CleanStage, index: EvalIndexRef) -> dict:
    """Per eval set, how many eval images have a near-duplicate among the candidates (CLIP §5)."""
    from tasks.build.jobs import eval_index
    from tasks.dedup.eval_overlap import EVAL_MATCHES, overlap_report

    store = clean.work.store
    tables = [store.read_parquet(WorkDir.side(EVAL_MATCHES, r.shard_id)) for r in clean.records if r.eval_matches]
    report = overlap_report(tables, eval_index(index, clean.work.storage))
    ObjectStore(dataset_root, clean.work.storage).write_json("reports/eval_overlap.json", report)
    publish_table("eval-overlap", [{"eval_set": k, **v} for k, v in report.items()],
                  "eval images with a near-duplicate among the candidates")
    return report
