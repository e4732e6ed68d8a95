"""The dataset build's stages, one function per Prefect task of ``flows/dataset.py``.

Each fans its per-shard jobs (``tasks.build.jobs``) out through ``infra.fanout`` or runs one of
the global reduces between them: the per-query counts and cap thresholds (balancing), the
within-dataset duplicates and the hold-out, the output-shard plan, the manifest and the reports.
No reduce holds a per-sample list on the driver: the URL duplicates and the within-dataset drops
stay in storage by shard (part) group, read per shard by the workers that need them, and the
hold-out is merged on workers; the driver sees counts and keys.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import os
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from infra.config import (BalanceConfig, DedupConfig, EvalSetConfig, GatherConfig, ImageConfig, ShardConfig,
                          SourceConfig, StorageConfig, TextFilterConfig, to_dict)
from infra.fanout import cluster_cpus, map_shards, shuffle, split_by, values_or_raise
from infra.funnel import Funnel
from infra.lease import OutputLease
from infra.log import get_logger, log_event
from infra.manifest import Manifest, build_manifest
from infra.manifest import write_manifest as write_manifest_file
from infra.prefect_utils import publish_image, publish_markdown, publish_table
from infra.storage import ObjectStore
from tasks.build.jobs import CleanContext, FilterContext, clean_shard, ensure_query_matcher, filter_shard, query_counts
from tasks.build.records import (URL_DROPS_SCHEMA, CaptionCounts, CleanStage, EvalIndexRef, FilterRecord, FilterStage,
                                 PartRows, QueryCountsSummary, QueryListRef, UrlDrops, WithinResult, WrittenShards,
                                 shard_group, to_json)
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


def plan_inputs(sources: Sequence[SourceConfig], base_dir: str, storage: StorageConfig | None = None) -> list[Any]:
    """Every source cut into input shards (``tasks.readers.InputShard``); ``storage`` opens s3:// sources."""
    from tasks.readers import plan_input_shards

    shards = plan_input_shards(sources, base_dir, storage)
    log_event(log, "planned input shards", shards=len(shards), sources=len(sources))
    return shards


def eval_index(eval_sets: Sequence[EvalSetConfig], root: str, storage: StorageConfig,
               dedup: DedupConfig) -> EvalIndexRef | None:
    """Build (or reuse: it is versioned by content and detector) the copy-detection index of every eval set."""
    if not dedup.against_eval or not eval_sets:
        return None
    from infra.eval_sets import load_eval_set
    from tasks.dedup.eval_index import ensure_eval_index

    sets = [load_eval_set(e, max_images=e.max_images) for e in eval_sets]
    index, built = ensure_eval_index(sets, ObjectStore(root, storage), views=dedup.eval_views,
                                     min_score=dedup.eval_min_score, min_score_small=dedup.eval_min_score_small,
                                     max_hue_shift=dedup.eval_max_hue_shift,
                                     neighbours=dedup.eval_neighbours)
    log_event(log, "eval index", version=index.version, state="built" if built else "reused", **index.set_sizes())
    return EvalIndexRef(root, index.version, index.set_sizes(), built)


def take_output(dataset_root: str, storage: StorageConfig) -> OutputLease:
    """Take the lease on the dataset's output (:class:`infra.lease.LeaseHeld` while another live
    build holds it), then clear what dead writers left there: temp files of killed local writes,
    and multipart uploads a killed writer never completed on S3."""
    lease = OutputLease.acquire(dataset_root, storage)
    store = ObjectStore(dataset_root, storage)
    temps = store.remove_temp_files(older_than=lease.acquired)
    uploads = store.abort_multipart_uploads(older_than=lease.acquired)
    if temps or uploads:
        log_event(log, "removed what killed writes left", root=store.root, temp_files=len(temps),
                  multipart_uploads=len(uploads))
    return lease


def record_config(dataset_root: str, storage: StorageConfig, resolved_yaml: str) -> None:
    """The resolved config beside the dataset (``config.resolved.yaml``)."""
    from infra.config import RESOLVED_CONFIG_NAME

    ObjectStore(dataset_root, storage).write_text(RESOLVED_CONFIG_NAME, resolved_yaml)


# ------------------------------------------------------------------------------------------------
# read -> filter -> match, and the per-query counts
# ------------------------------------------------------------------------------------------------


CAPTION_VALUES_PER_PARTITION = 4_000_000  # a reduce of the repeated-caption count holds about this many values


@dataclass(frozen=True)
class _CaptionCountContext:
    num_partitions: int
    min_images: int


def _caption_pieces(shard: Any, ctx: _CaptionCountContext) -> list[pa.Table]:
    from tasks.captions import caption_pieces
    from tasks.readers import read_input_shard

    return caption_pieces(read_input_shard(shard), shard.source.caption, ctx.num_partitions)


def _caption_counts(partition: int, pieces: list[pa.Table], ctx: _CaptionCountContext) -> pa.Table:
    from tasks.captions import count_captions

    return count_captions(pieces, ctx.min_images)


def caption_counts(shards: Sequence[Any], *, dataset_root: str, storage: StorageConfig,
                   sources: Sequence[SourceConfig], base_dir: str, text_filter: TextFilterConfig,
                   queries: QueryListRef, lease: OutputLease | None = None, use_ray: bool = True) -> CaptionCounts | None:
    """The repeated-caption count (tasks/captions.py): every caption field value of every input
    shard, normalised, counted once per different image (URL or inline-bytes identity) on a
    hash-partitioned shuffle through the work directory (resumable); the values on at least
    ``text_filter.boilerplate_min_images`` images are boilerplate. It reads the inputs' text
    before the filter stage does, so the caption step can fall back to another field; nothing is
    fetched for it. None when ``boilerplate_min_images`` is off."""
    from infra.fanout import shuffle
    from tasks.captions import COUNTS_SCHEMA

    if text_filter.boilerplate_min_images is None:
        return None
    work = WorkDir.for_filter(dataset_root, storage, sources, base_dir, text_filter, queries.sha256, lease)
    store = work.store
    if not store.exists(WorkDir.CAPTION_COUNTS):
        rows = sum((s.stop or s.start + s.source.rows_per_input_shard) - s.start for s in shards)
        partitions = shuffle_partitions(rows, CAPTION_VALUES_PER_PARTITION)
        scratch = store.child(WorkDir.caption_scratch(partitions)).scratch()
        keys = shuffle(_caption_pieces, _caption_counts, list(shards), num_partitions=partitions, scratch=scratch,
                       context=_CaptionCountContext(partitions, text_filter.boilerplate_min_images),
                       desc="count repeated captions", key=lambda s: s.shard_id, use_ray=use_ray)
        counts = pa.concat_tables([COUNTS_SCHEMA.empty_table(), *(scratch.read_parquet(k) for k in keys)])
        store.write_parquet(WorkDir.CAPTION_COUNTS, counts.sort_by([("images", "descending"), ("value", "ascending")]))
    counts = store.read_parquet(WorkDir.CAPTION_COUNTS, columns=["boilerplate", "rows"])
    flagged = counts.filter(counts.column("boilerplate"))
    log_event(log, "repeated captions counted", boilerplate=flagged.num_rows,
              rows_with_them=int(pc.sum(flagged.column("rows")).as_py() or 0))
    return CaptionCounts(WorkDir.CAPTION_COUNTS, text_filter.boilerplate_min_images, flagged.num_rows)


def filter_stage(shards: Sequence[Any], *, dataset_root: str, storage: StorageConfig, sources: Sequence[SourceConfig],
                 base_dir: str, text_filter: TextFilterConfig, queries: QueryListRef,
                 captions: CaptionCounts | None = None, lease: OutputLease | None = None, on_done: Progress = None,
                 use_ray: bool = True) -> FilterStage:
    """read -> caption -> text filters -> query match per input shard; ``lease`` (from
    :func:`take_output`) guards every write of this and the later stages, which inherit its work
    directory."""
    work = WorkDir.for_filter(dataset_root, storage, sources, base_dir, text_filter, queries.sha256, lease)
    if shards:
        ensure_query_matcher(work, queries)
    ctx = FilterContext(work, queries, text_filter, captions)
    results = map_shards(filter_shard, shards, context=ctx, desc="read/caption/filter/match", on_done=on_done,
                         use_ray=use_ray)
    return FilterStage(work, tuple(values_or_raise("read-filter-match", results)))


_URL_PIECE_SCHEMA = pa.schema([("url", pa.string()), ("sample_id", pa.string()), ("shard_id", pa.string()),
                               ("query_ids", pa.list_(pa.int32()))])
URL_ROWS_PER_PARTITION = 2_000_000  # a reduce holds at most this many URLs, fewer when the budget says so
# A URL reduce's memory per row (URL, sample id, shard id and query ids in Arrow, plus the sort's
# indices and copy), measured at ~450 B with bench/scale.py's candidates.
URL_ROW_BYTES = 512


def shuffle_partitions(items: int, per_partition: int, *, item_bytes: int | None = None,
                       task_memory_mb: int | None = None) -> int:
    """Partitions of a global shuffle: at most ``per_partition`` items each and, given their size,
    no more than ``task_memory_mb`` of them in one reduce (``item_bytes`` each), 1 to 1024.
    ``item_bytes`` and ``task_memory_mb`` are one budget: both or neither."""
    if (item_bytes is None) != (task_memory_mb is None):
        raise ValueError(f"shuffle_partitions: item_bytes ({item_bytes}) and task_memory_mb ({task_memory_mb}) "
                         "go together: give both or neither")
    per = per_partition if item_bytes is None else max(1, min(per_partition, task_memory_mb * 2**20 // item_bytes))
    return max(1, min(1024, -(-items // per)))



@dataclass(frozen=True)
class _UrlContext:
    work: WorkDir
    num_partitions: int


def _url_pieces(record: FilterRecord, ctx: _UrlContext) -> list[pa.Table]:
    """One filtered shard's rows that will be fetched (a URL, no inline image), by hash of the URL."""
    from tasks.balance import sample_hashes

    store = ctx.work.store
    key = WorkDir.filtered(record.shard_id)
    table = store.read_parquet(key, columns=["sample_id", "url", "query_ids"])
    has_url = pc.fill_null(pc.invert(pc.is_null(table.column("url"))), False)
    if pc.any(has_url).as_py():  # only then read the images, to leave out rows that carry theirs
        inline = pc.invert(pc.is_null(store.read_parquet(key, columns=["image"]).column("image")))
        table = table.filter(pc.and_(has_url, pc.invert(inline)))
    else:
        table = table.filter(has_url)
    table = table.append_column("shard_id", pa.array([record.shard_id] * table.num_rows, pa.string()))
    table = table.select(_URL_PIECE_SCHEMA.names).cast(_URL_PIECE_SCHEMA)
    part = (sample_hashes(table.column("url")) % np.uint64(ctx.num_partitions)).astype(np.int64)
    return split_by(table, part, ctx.num_partitions)  # one sort and R slices, not R filters of the whole map


def _url_duplicates(partition: int, pieces: list[pa.Table], ctx: _UrlContext) -> pa.Table:
    """Of each URL's rows, every one but the smallest sample_id (so shard order does not matter)."""
    table = pa.concat_tables([_URL_PIECE_SCHEMA.empty_table(), *pieces])
    table = table.sort_by([("url", "ascending"), ("sample_id", "ascending")])
    urls, ids = table.column("url").to_pylist(), table.column("sample_id").to_pylist()
    keep_as: list[str | None] = []
    for i, url in enumerate(urls):
        keep_as.append(None if i == 0 or url != urls[i - 1] else (keep_as[i - 1] or ids[i - 1]))
    dup = pa.array([k is not None for k in keep_as], pa.bool_())
    out = table.filter(dup).append_column("duplicate_of", pa.array([k for k in keep_as if k], pa.string()))
    return out.select(URL_DROPS_SCHEMA.names)


@dataclass(frozen=True)
class _UrlRouteContext:
    num_groups: int


def _url_route_pieces(output: tuple[ObjectStore, str], ctx: _UrlRouteContext) -> list[pa.Table]:
    """One URL reduce's drops (``(scratch, key)``), by the group of their shard."""
    store, name = output
    table = store.read_parquet(name)
    shards = pc.dictionary_encode(table.column("shard_id")).combine_chunks()
    group_of = np.array([shard_group(s, ctx.num_groups) for s in shards.dictionary.to_pylist()], np.int64)
    groups = group_of[shards.indices.to_numpy(zero_copy_only=False)] if len(group_of) else np.zeros(0, np.int64)
    return split_by(table, groups, ctx.num_groups)


def _url_route_reduce(group: int, pieces: list[pa.Table], ctx: _UrlRouteContext) -> pa.Table:
    return pa.concat_tables([URL_DROPS_SCHEMA.empty_table(), *pieces]).sort_by("sample_id")


def _url_group_pairs(key: str, drops: UrlDrops) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """One group's drops' pairs per query (sparse: ids, counts)."""
    from tasks.balance import sparse_query_counts

    ids, counts = sparse_query_counts(drops.store.read_parquet(key, columns=["query_ids"]).column("query_ids"))
    return tuple(ids.tolist()), tuple(counts.tolist())


def url_drop_pairs(drops: UrlDrops, num_queries: int, *, use_ray: bool = True) -> np.ndarray:
    """Pairs per query of the URL drops (int64, ``num_queries`` long), counted by workers per group."""
    out = np.zeros(num_queries, np.int64)
    if drops.total:
        for ids, counts in values_or_raise("dedupe URLs", map_shards(_url_group_pairs, list(drops.keys), context=drops,
                                                                      desc="dedupe URLs: pairs", key=str,
                                                                      use_ray=use_ray)):
            np.add.at(out, np.asarray(ids, np.int64), np.asarray(counts, np.int64))
    return out


def url_duplicates(filtered: FilterStage, *, task_memory_mb: int = 1024, use_ray: bool = True) -> UrlDrops:
    """Rows whose URL another row also has, over all shards (one URL_DROPS_SCHEMA row per dropped
    duplicate): a hash-partitioned shuffle by URL, then one by shard group (so each shard's drops
    are read by the worker of that shard: :class:`UrlDrops`), both through the work directory,
    resumable, the same for any number of workers, each reduce within ``task_memory_mb``. Each URL
    is then fetched once, for the row of smallest sample_id."""
    rows = sum(r.rows for r in filtered.records)
    partitions = shuffle_partitions(rows, URL_ROWS_PER_PARTITION, item_bytes=URL_ROW_BYTES,
                                    task_memory_mb=task_memory_mb)
    scratch = filtered.work.store.child(WorkDir.url_scratch(partitions))
    keys = shuffle(_url_pieces, _url_duplicates, list(filtered.records), num_partitions=partitions,
                   scratch=scratch, context=_UrlContext(filtered.work, partitions), desc="dedupe URLs", use_ray=use_ray)
    # A group holds the drops of about 1/groups of the shards: no more rows than a URL reduce.
    groups = max(1, min(partitions, len(filtered.records)))
    by_shard = scratch.child(WorkDir.url_groups(groups))
    group_keys = shuffle(_url_route_pieces, _url_route_reduce, [(scratch, k) for k in keys], num_partitions=groups,
                         scratch=by_shard, context=_UrlRouteContext(groups), desc="dedupe URLs: by shard",
                         key=lambda item: item[1].rsplit("/", 1)[-1].removesuffix(".parquet"), use_ray=use_ray)
    return UrlDrops(by_shard, tuple(group_keys), sum(_footer_rows(by_shard, k) for k in group_keys))


def _footer_rows(store: ObjectStore, key: str) -> int:
    with store.filesystem.open_input_file(store.fs_path(key)) as f:
        return pq.ParquetFile(f).metadata.num_rows


CAP_PAIRS_PER_PARTITION = 250_000  # (query, hash) pairs one cap reduce holds at most (~12 MB)
CAP_PAIR_BYTES = 50  # a cap reduce's memory per pair, its sort included
# An over-cap query's map pieces keep its pairs of hash below a bound that about
# t + 1 + CAP_SAMPLE_SIGMAS·sqrt(t + 1) + CAP_SAMPLE_EXTRA of its c pairs pass (hashes are
# uniform): its t + 1 smallest, with 8 standard deviations to spare, whatever c is.
CAP_SAMPLE_SIGMAS = 8.0
CAP_SAMPLE_EXTRA = 64
_U64_MAX = np.uint64(2**64 - 1)


@dataclass(frozen=True)
class CapSample:
    """Which of an over-cap query's pairs the cap shuffle carries: those of hash below a bound that
    about ``scale · (t + 1 + sigmas·sqrt(t + 1) + extra)`` of its ``c`` pairs pass."""

    max_per_query: int
    scale: float = 1.0
    sigmas: float = CAP_SAMPLE_SIGMAS
    extra: int = CAP_SAMPLE_EXTRA

    def sizes(self, counts: np.ndarray) -> np.ndarray:
        """Pairs per query expected below its bound (``counts``: the queries' pairs)."""
        t1 = self.max_per_query + 1
        wanted = np.ceil(self.scale * (t1 + self.sigmas * np.sqrt(t1) + self.extra))
        return np.minimum(counts, max(wanted, 1.0)).astype(np.int64)

    def bounds(self, counts: np.ndarray) -> np.ndarray:
        """Per query, the largest pair hash its pieces keep (uint64)."""
        share = self.sizes(counts) / np.maximum(counts, 1).astype(np.float64)
        below = np.minimum(share * 2.0**64, np.nextafter(2.0**64, 0))  # a double that fits in uint64
        return np.where(share >= 1.0, _U64_MAX, below.astype(np.uint64))


@dataclass(frozen=True)
class _CapContext:
    work: WorkDir
    balance: BalanceConfig
    url_drops: UrlDrops | None
    num_partitions: int
    sample: CapSample  # this round's bounds (scale 1, then 4, 16, ... for queries a round found short)
    pending: tuple[int, ...] | None  # the queries of this round (None: every over-cap query)

    def queries(self) -> np.ndarray:
        """This round's queries, ascending: query ``queries()[i]`` goes to partition ``i % num_partitions``."""
        if self.pending is not None:
            return np.asarray(self.pending, np.int64)
        return np.flatnonzero(query_counts(self.work) > self.balance.max_per_query).astype(np.int64)


def _cap_pieces(record: FilterRecord, ctx: _CapContext) -> list[pa.Table]:
    """Shuffle map: one shard's (query_id, pair hash) of this round's queries below their bound,
    at most t + 1 per query (the shard's smallest), partitioned by query."""
    from tasks.balance import CapHashes

    table = ctx.work.store.read_parquet(WorkDir.filtered(record.shard_id), columns=["sample_id", "query_ids"])
    if ctx.url_drops is not None:
        table = table.filter(ctx.url_drops.kept(table, record.shard_id))
    counts = query_counts(ctx.work)
    caps = CapHashes.from_table(table, counts, ctx.balance)
    queries = ctx.queries()
    rank = np.searchsorted(queries, caps.query_ids)
    mine = np.isin(caps.query_ids, queries) & (caps.hashes <= ctx.sample.bounds(counts[caps.query_ids]))
    pairs = pa.table({"query_id": pa.array(caps.query_ids[mine], pa.int64()),
                      "hash": pa.array(caps.hashes[mine], pa.uint64())})
    return split_by(pairs, (rank[mine] % ctx.num_partitions).astype(np.int64), ctx.num_partitions)


_CAP_CUTS = pa.schema([("query_id", pa.int64()), ("threshold", pa.uint64()), ("short", pa.bool_())])


def _cap_reduce(partition: int, pieces: list[pa.Table], ctx: _CapContext) -> pa.Table:
    """Shuffle reduce: each query of this partition with its t + 1 smallest pair hashes here gets
    its cut-off; one with fewer (its bound was too tight) is marked short, for the next round."""
    from tasks.balance import CapHashes

    t = pa.concat_tables([pa.schema([("query_id", pa.int64()), ("hash", pa.uint64())]).empty_table(), *pieces])
    caps = CapHashes(ctx.balance.max_per_query, t.column("query_id").to_numpy(), t.column("hash").to_numpy())
    queries = ctx.queries()
    queries = queries[np.arange(len(queries)) % ctx.num_partitions == partition]
    got = np.bincount(np.searchsorted(queries, caps.query_ids), minlength=len(queries))[:len(queries)]
    short = got <= ctx.balance.max_per_query
    cut = caps.thresholds(int(queries.max()) + 1 if len(queries) else 0)[queries]
    return pa.table([pa.array(queries, pa.int64()), pa.array(np.where(short, np.uint64(0), cut), pa.uint64()),
                     pa.array(short)], schema=_CAP_CUTS)


def _cap_thresholds(filtered: FilterStage, counts: np.ndarray, balance: BalanceConfig, drops: UrlDrops | None,
                    task_memory_mb: int, use_ray: bool) -> np.ndarray:
    """Exact mode's cut-off hash per query (max for queries under the cap): rounds of a shuffle by
    query of the over-cap queries' pairs below a bound, each query's t + 1 smallest expected to pass
    (so a reduce's memory does not grow with the pool), until every query had them."""
    store = filtered.work.store
    thresholds = np.full(len(counts), _U64_MAX, np.uint64)
    pending: tuple[int, ...] | None = None
    sample, rounds = CapSample(balance.max_per_query, 1.0, CAP_SAMPLE_SIGMAS, CAP_SAMPLE_EXTRA), 0
    while True:
        queries = np.flatnonzero(counts > balance.max_per_query) if pending is None else np.asarray(pending, np.int64)
        if not len(queries):
            return thresholds
        pairs = int(sample.sizes(counts[queries]).sum())
        partitions = min(len(queries), shuffle_partitions(pairs, CAP_PAIRS_PER_PARTITION, item_bytes=CAP_PAIR_BYTES,
                                                          task_memory_mb=task_memory_mb))
        # Pieces are named by what makes them: the settings, the counts (which queries are over the cap), the round.
        name = fingerprint(to_dict(balance), partitions, hashlib.sha256(counts.tobytes()).hexdigest(),
                           drops.total if drops else 0, to_dict(sample), hashlib.sha256(queries.tobytes()).hexdigest())
        scratch = store.child(f"caps/{name}").scratch()
        ctx = _CapContext(filtered.work, balance, drops, partitions, sample, pending)
        keys = shuffle(_cap_pieces, _cap_reduce, list(filtered.records), num_partitions=partitions, scratch=scratch,
                       context=ctx, desc="cap thresholds" + (f" (round {rounds + 1})" if rounds else ""),
                       use_ray=use_ray)
        short = []
        for key in keys:
            cut = scratch.read_parquet(key)
            ok = cut.filter(pc.invert(cut.column("short")))
            thresholds[ok.column("query_id").to_numpy()] = ok.column("threshold").to_numpy()
            short += cut.filter(cut.column("short")).column("query_id").to_pylist()
        if not short:
            return thresholds
        log_event(log, "cap thresholds: queries short of t + 1 pairs below their bound, widened",
                  queries=len(short), round=rounds + 1)
        pending, rounds = tuple(sorted(short)), rounds + 1
        sample = dataclasses.replace(sample, scale=sample.scale * 4)


def count_queries(filtered: FilterStage, num_queries: int, balance: BalanceConfig, *, dedupe_urls: bool = True,
                  task_memory_mb: int = 1024, use_ray: bool = True) -> QueryCountsSummary:
    """The global reduce after the text stage: rows whose URL another row has (``dedupe_urls``),
    then the global per-query counts of the rest (balancing's input); in exact mode also the
    per-query cut-off hashes: a shuffle by query over the shards' pairs of over-cap queries, so no
    process holds more than a partition of them. Each shuffle's reduce stays within ``task_memory_mb``."""
    drops = url_duplicates(filtered, task_memory_mb=task_memory_mb, use_ray=use_ray) if dedupe_urls else None
    counts = np.zeros(num_queries, dtype=np.int64)
    for r in filtered.records:
        np.add.at(counts, np.asarray(r.matches.query_ids, dtype=np.int64),
                  np.asarray(r.matches.query_counts, dtype=np.int64))
    if drops is not None and drops.total:  # a duplicate is not a pair of the pool
        counts -= url_drop_pairs(drops, num_queries, use_ray=use_ray)
    nz = np.flatnonzero(counts)
    table = pa.table({"query_id": pa.array(nz, pa.int32()), "count_before": pa.array(counts[nz], pa.int64())})
    store = filtered.work.store
    store.write_parquet(WorkDir.QUERY_COUNTS, table.replace_schema_metadata({"num_queries": str(num_queries)}))
    if balance.mode == "exact":
        thresholds = _cap_thresholds(filtered, counts, balance, drops, task_memory_mb, use_ray)
        buf = io.BytesIO()
        np.save(buf, thresholds)
        store.write_bytes(WorkDir.CAP_THRESHOLDS, buf.getvalue())
    duplicates = drops.total if drops is not None else 0
    if duplicates:
        log_event(log, "URLs shared by rows of several shards: fetched once", duplicates=duplicates)
    return QueryCountsSummary(int((counts > 0).sum()), int(counts.sum()), int((counts > balance.max_per_query).sum()),
                              duplicates, drops)


# ------------------------------------------------------------------------------------------------
# balance -> fetch + images -> hash -> eval dedup
# ------------------------------------------------------------------------------------------------


def clean_stage(filtered: FilterStage, *, balance: BalanceConfig, gather: GatherConfig, images: ImageConfig,
                dedup: DedupConfig, index: EvalIndexRef | None, retry_failed: bool = False,
                url_drops: UrlDrops | None = None, on_done: Progress = None, use_ray: bool = True) -> CleanStage:
    """drop URL duplicates -> balance -> fetch + images -> hash -> eval-set dedup, per filtered shard.
    The URL duplicates are the count stage's: ``url_drops`` (its ``QueryCountsSummary.url_drops``),
    else its shuffles' outputs are found again (resumed, not redone); each worker reads its shard's."""
    work = filtered.work.for_clean(balance, gather, images, dedup, index.version if index else None)
    if gather.dedupe_urls and url_drops is None:
        url_drops = url_duplicates(filtered, task_memory_mb=dedup.task_memory_mb, use_ray=use_ray)
    ctx = CleanContext(filtered.work, work, balance, gather, images, dedup, index, retry_failed,
                       url_drops if gather.dedupe_urls else None)
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
    """The ``holdout_rows`` smallest ranks of some candidate files; returns them counted per part.
    One file at a time joins the best so far (ranks are distinct), so a merge holds two files' rows,
    not ``HOLDOUT_FAN_IN``."""
    store = ctx.work.store
    if not store.exists(job.output):
        best = HOLDOUT_SCHEMA.empty_table()
        for key in job.inputs:
            best = pa.concat_tables([best, store.read_parquet(key)]).sort_by("rank").slice(0, ctx.holdout_rows)
        store.write_parquet(job.output, best)
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
    """The dedup settings a within-dataset result depends on: not the memory budget itself
    (partitions never change the result), but the hot-group size it sets (a hot group is split or
    capped as a sample of it says, not as all its rows would)."""
    from tasks.dedup.within import hot_group_rows

    settings = {k: v for k, v in to_dict(dedup).items() if k != "task_memory_mb"}
    return {**settings, "hot_group_rows": hot_group_rows(dedup.task_memory_mb, dedup.max_candidates)}


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


@dataclass(frozen=True)
class OutputRun:
    """Consecutive output shards that one task writes with one ``tasks.shards.ShardWriter``: each
    shard's durable commit (its fsync) overlaps the reading and encoding of the next."""

    key: str  # "shards/part-00000..00007"
    prefix: str
    jobs: tuple[OutputShard, ...]


_SHARDS_PER_RUN = 8  # the last shard's fsync is the only one left waited for: 1/8 of a run's


def output_runs(jobs: Sequence[OutputShard], workers: int) -> list[OutputRun]:
    """The jobs in runs of consecutive shards of one prefix: up to 8 a run, fewer where that would
    leave some of the ``workers`` without a run."""
    runs = []
    for prefix in dict.fromkeys(j.prefix for j in jobs):
        same = [j for j in jobs if j.prefix == prefix]
        size = max(1, min(_SHARDS_PER_RUN, len(same) // max(workers, 1)))
        for start in range(0, len(same), size):
            run = tuple(same[start:start + size])
            name = run[0].key if len(run) == 1 else f"{run[0].key}..{run[-1].index:05d}"
            runs.append(OutputRun(name, prefix, run))
    return runs


def _output_table(job: OutputShard, ctx: _WriteContext) -> pa.Table:
    """One output shard's rows, from slices of clean parts.

    Slices index the rows of a part left after dropping the duplicates and the held-out rows
    (the training shards), or the part's held-out rows (the held-out shard)."""
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
    return table


def _write_output_run(run: OutputRun, ctx: _WriteContext) -> list[dict]:
    """Write a run's shards in order (a complete one is skipped without reading its inputs); their
    stats, each returned only once its shard is durable."""
    from tasks.shards import ShardWriter

    with ShardWriter(ctx.work.store_at(ctx.dataset_root), ctx.row_group_rows, ctx.compression, run.prefix) as writer:
        for job in run.jobs:
            writer.write(job.index, functools.partial(_output_table, job, ctx), job.plan_id)
    return writer.stats


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


class NothingToTrainOn(RuntimeError):
    """The build would write no training shard: every candidate was dropped, or all are held out."""


def _nothing_to_train_on(clean: CleanStage, within: WithinResult, dataset_root: str, holdout_rows: int) -> str:
    held = sum(p.held for p in within.parts)
    if held:
        return (f"dataset {dataset_root}: no rows to train on: shards.holdout_rows={holdout_rows} holds out all "
                f"{held} rows left after deduplication (lower it below {held})")
    funnel = Funnel()
    for r in clean.records:
        funnel.merge(r.funnel)
    reasons = Counter()
    for stage in funnel.stages.values():
        reasons.update(stage.dropped)
    reasons.update(within.reasons)
    seen = next((s.rows_in for s in funnel.stages.values()), 0)
    top = ", ".join(f"{k}: {v}" for k, v in reasons.most_common(5)) or "none reached this stage"
    return (f"dataset {dataset_root}: no rows to train on: all {seen} candidates after the text stage were "
            f"dropped ({top}); see the failed/ parts in {clean.work.root}")


def write_output(clean: CleanStage, within: WithinResult, *, dataset_root: str, shards: ShardConfig,
                 on_done: Progress = None, use_ray: bool = True) -> WrittenShards:
    """Write every output shard (skipping complete ones), then remove an earlier plan's extras.
    Raises :class:`NothingToTrainOn` (before writing anything) when no training row is left."""
    from tasks.shards import remove_stale_shards

    jobs = plan_output(clean, within, shards)
    if not any(j.prefix == "shards" for j in jobs):
        raise NothingToTrainOn(_nothing_to_train_on(clean, within, dataset_root, shards.holdout_rows))
    ctx = _WriteContext(clean.work, within.key, within.duplicates, any(p.held for p in within.parts), dataset_root,
                        shards.row_group_rows, shards.compression)
    runs = output_runs(jobs, cluster_cpus(os.cpu_count() or 1) if use_ray else 1)
    written = values_or_raise("write-shards", map_shards(_write_output_run, runs, context=ctx, desc="write shards",
                                                         on_done=on_done, use_ray=use_ray))
    train = [w for run, stats in zip(runs, written) if run.prefix == "shards" for w in stats]
    held = [w for run, stats in zip(runs, written) if run.prefix == "holdout" for w in stats]
    store = clean.work.store_at(dataset_root)
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


class EvalContamination(RuntimeError):
    """Training shards hold rows an eval set shows; the message names the set and an id."""


def source_provenance(sources: Sequence[SourceConfig], base_dir: str, storage: StorageConfig | None = None) -> list[dict]:
    """Per source: kind, path, size (and a remote file's ETag/Last-Modified), and the provenance a
    packaged table carries (origin, licence, attribution: the ``witflow.*`` Parquet metadata
    infra/openclipart.py and infra/emoji.py write)."""
    from infra.remote import open_input
    from tasks.readers import source_files

    out = []
    for source in sources:
        entry: dict[str, Any] = {"kind": source.kind, "path": source.path, "files": []}
        if source.kind != "directory":
            for found in source_files(source, base_dir, storage):
                info: dict[str, Any] = {k: v for k, v in found.items() if k != "path"}
                if found["file"].endswith(".parquet"):
                    with open_input(found.get("path", found["file"]), storage) as f:
                        meta = pq.read_schema(f).metadata or {}
                    info.update({k.decode()[len("witflow."):]: v.decode() for k, v in meta.items()
                                 if k.startswith(b"witflow.") and k not in (b"witflow.schema_version", b"witflow.table")})
                entry["files"].append(info)
        out.append(entry)
    return out


def eval_holdout_check(eval_sets: Sequence[EvalSetConfig], dataset_root: str, storage: StorageConfig,
                       written: WrittenShards) -> dict[str, dict[str, int]]:
    """Per eval set drawn from a training source: how many source rows it shows and how many of
    them are in the training shards (must be 0: raises :class:`EvalContamination`) or the held-out
    retrieval shards (reported). The shards are read one at a time (their ids, never all at once)."""
    from infra.eval_sets import EvalSetError, training_ids

    store = ObjectStore(dataset_root, storage)
    wanted: dict[str, pa.Array] = {}
    for cfg in eval_sets:
        try:
            held_out = training_ids(cfg)
        except EvalSetError as e:  # the eval index stage already failed or reported it
            log_event(log, "eval set not checked", name=cfg.name, error=str(e)[:200])
            continue
        if held_out:
            wanted[cfg.name] = pa.array(sorted(held_out), pa.string())
    report = {name: {"training_ids": len(ids), "in_shards": 0, "in_holdout": 0} for name, ids in wanted.items()}
    if not wanted:
        return report
    first: dict[str, str] = {}
    any_eval = pa.concat_arrays(list(wanted.values())).unique()  # one lookup per shard; sets only for its hits
    for field, entries in (("in_shards", written.shards), ("in_holdout", written.holdout)):
        for entry in entries:
            ids = store.read_parquet(entry["path"], columns=["sample_id"]).column("sample_id")
            ids = ids.filter(pc.is_in(ids, any_eval))
            for name, eval_ids in wanted.items():
                found = ids.filter(pc.is_in(ids, eval_ids))
                report[name][field] += len(found)
                if field == "in_shards" and len(found) and name not in first:
                    first[name] = found[0].as_py()
    for name in (n for n in wanted if n in first):  # the first contaminated set, in config order
        raise EvalContamination(f"{store.root}: {report[name]['in_shards']} training rows are images of eval set "
                                f"{name!r} (e.g. {first[name]}): a reader lets them through")
    return report


def write_manifest(*, dataset_root: str, storage: StorageConfig, config: dict, written: WrittenShards,
                   filtered: FilterStage, clean: CleanStage, counts: QueryCountsSummary, within: WithinResult,
                   queries: QueryListRef, index: EvalIndexRef | None, sources: list[dict] | None = None,
                   eval_holdout: dict[str, dict[str, int]] | None = None) -> Manifest:
    """Write ``manifest.json`` and the funnel reports (files and UI artifacts); returns the manifest.

    ``sources``: :func:`source_provenance`; ``eval_holdout``: :func:`eval_holdout_check`."""
    store = ObjectStore(dataset_root, storage)
    funnel = build_funnel(filtered, clean, within)
    manifest = build_manifest(config=config, shards=written.shards, funnel=funnel.to_dict(),
                              queries=to_json(queries), eval_index=to_json(index) if index else None,
                              holdout=written.holdout, work=clean.work.root, query_counts=to_json(counts),
                              sources=sources or [], eval_holdout=eval_holdout or {})
    store.write_json("reports/funnel.json", funnel.to_dict())
    store.write_parquet("reports/funnel.parquet", funnel.to_table())
    write_manifest_file(store, manifest)
    publish_markdown("dataset-funnel", "## Dataset funnel\n\n" + funnel.to_markdown(),
                     f"{manifest.num_rows} rows in {manifest.num_shards} shards")
    publish_table("dataset-shards", [{"path": s.path, "rows": s.rows, "bytes": s.bytes} for s in manifest.shards])
    log_event(log, "dataset written", rows=manifest.num_rows, shards=manifest.num_shards, root=store.root)
    return manifest


def reports(*, dataset_root: str, filtered: FilterStage, clean: CleanStage, queries: QueryListRef,
            index: EvalIndexRef | None, max_per_query: int, eval_sets: Sequence[EvalSetConfig] = (),
            captions: CaptionCounts | None = None, manifest: Manifest | None = None) -> dict:
    """Every report of a build: per-query counts, with an eval index the overlap report, and with
    the output's manifest the caption report."""
    uris = query_count_report(dataset_root=dataset_root, filtered=filtered, clean=clean, queries=queries,
                              max_per_query=max_per_query)
    overlap = (eval_overlap_report(dataset_root=dataset_root, clean=clean, index=index, eval_sets=eval_sets)
               if index else None)
    caption = caption_report(dataset_root=dataset_root, filtered=filtered, captions=captions, manifest=manifest) \
        if manifest is not None else None
    return {"query_counts": uris, "overlap": overlap, "captions": caption}


CAPTION_REPORT_ROWS_PER_PARTITION = 4_000_000  # output rows whose (value, phash) pairs one reduce counts


@dataclass(frozen=True)
class _CaptionReportContext:
    dataset_root: str
    storage: StorageConfig
    values: frozenset[str] = frozenset()  # the report's values: only their hashes are counted
    num_partitions: int = 1


def _output_caption_lengths(shard: Any, ctx: _CaptionReportContext) -> list[int]:
    from tasks.captions import length_histogram

    table = ObjectStore(ctx.dataset_root, ctx.storage).read_parquet(shard.path, columns=["caption"])
    return length_histogram(table.column("caption").to_pylist())


def _caption_image_pieces(shard: Any, ctx: _CaptionReportContext) -> list[pa.Table]:
    from tasks.captions import caption_image_pieces

    table = ObjectStore(ctx.dataset_root, ctx.storage).read_parquet(shard.path, columns=["caption", "meta", "phash"])
    return caption_image_pieces(table, ctx.values, ctx.num_partitions)


def _caption_images(partition: int, pieces: list[pa.Table], ctx: _CaptionReportContext) -> pa.Table:
    from tasks.captions import count_caption_images

    return count_caption_images(pieces)


def _images_by_hash(work: ObjectStore, manifest: Manifest, ctx: _CaptionReportContext, use_ray: bool) -> dict[str, int]:
    """Per report value, the different perceptual hashes of the output rows carrying it: a shuffle
    of (value, phash) pairs by phash, so the driver only sums ``len(values)`` counts per partition.
    Its scratch is named by the output shards' digests and the values: a new output counts afresh."""
    from tasks.captions import IMAGES_SCHEMA

    if not ctx.values or not manifest.shards:
        return {}
    name = fingerprint(sorted(ctx.values), [s.sha256 for s in manifest.shards], ctx.num_partitions)
    scratch = work.child(WorkDir.caption_report_scratch(name)).scratch()
    keys = shuffle(_caption_image_pieces, _caption_images, list(manifest.shards), num_partitions=ctx.num_partitions,
                   scratch=scratch, context=ctx, desc="count report captions' images", key=lambda s: s.sha256,
                   use_ray=use_ray)
    counts = pa.concat_tables([IMAGES_SCHEMA.empty_table(), *(scratch.read_parquet(k) for k in keys)])
    total: Counter = Counter()
    for value, images in zip(counts.column("value").to_pylist(), counts.column("images").to_pylist()):
        total[value] += images  # partitions hold different hashes: their counts add up
    return dict(total)


def caption_report(*, dataset_root: str, filtered: FilterStage, captions: CaptionCounts | None,
                   manifest: Manifest, top: int = 20, use_ray: bool = True) -> dict[str, str]:
    """``reports/repeated_captions.parquet`` (the ``top`` most repeated caption values, what the
    caption step did with their rows, their different perceptual hashes in the output) and
    ``reports/caption_lengths.png`` + ``.parquet`` (words per caption as read and in the output),
    also as UI artifacts; their URIs. Workers read the output shards; the driver merges per-shard
    histograms and per-partition counts of the ``top`` values, never the rows."""
    from tasks.captions import (COUNTS_SCHEMA, MAX_WORDS_BUCKET, OUTCOMES, OUTCOMES_SCHEMA, render_caption_lengths,
                                repeated_caption_report, report_head)

    work = filtered.work.store
    out = ObjectStore(dataset_root, filtered.work.storage)
    ctx = _CaptionReportContext(dataset_root, filtered.work.storage)
    before = np.zeros(MAX_WORDS_BUCKET + 1, np.int64)
    for r in filtered.records:
        if r.caption_words:
            before += np.asarray(r.caption_words, np.int64)
    after = np.zeros(MAX_WORDS_BUCKET + 1, np.int64)
    for hist in values_or_raise("caption lengths", map_shards(_output_caption_lengths, list(manifest.shards), context=ctx,
                                                              desc="caption lengths", key=lambda s: s.sha256,
                                                              use_ray=use_ray)):
        after += np.asarray(hist, np.int64)
    out.write_parquet("reports/caption_lengths.parquet", pa.table({
        "words": pa.array(range(MAX_WORDS_BUCKET + 1), pa.int32()), "as_read": pa.array(before), "output": pa.array(after)}))
    png = render_caption_lengths(before.tolist(), after.tolist())
    out.write_bytes("reports/caption_lengths.png", png)
    publish_image("caption-lengths", png,
                  "words per caption: as read (first caption field) and in the output")
    uris = {"lengths": out.uri("reports/caption_lengths.png")}
    if captions is None:
        return uris
    counts = work.read_parquet(captions.key) if work.exists(captions.key) else COUNTS_SCHEMA.empty_table()
    outcome_parts = [work.read_parquet(WorkDir.side(OUTCOMES, r.shard_id)) for r in filtered.records
                     if work.exists(WorkDir.side(OUTCOMES, r.shard_id))]
    outcomes = pa.concat_tables([OUTCOMES_SCHEMA.empty_table(), *outcome_parts])
    partitions = shuffle_partitions(sum(s.rows for s in manifest.shards), CAPTION_REPORT_ROWS_PER_PARTITION)
    values = frozenset(report_head(counts, top).column("value").to_pylist())
    ctx = dataclasses.replace(ctx, values=values, num_partitions=partitions)
    table = repeated_caption_report(counts, outcomes, _images_by_hash(work, manifest, ctx, use_ray), top)
    out.write_parquet("reports/repeated_captions.parquet", table)
    publish_table("repeated-captions", table.to_pylist(),
                  f"the {top} most repeated captions (different images); boilerplate at >= {captions.min_images}")
    uris["repeated"] = out.uri("reports/repeated_captions.parquet")
    return uris


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


def eval_overlap_report(*, dataset_root: str, clean: CleanStage, index: EvalIndexRef,
                        eval_sets: Sequence[EvalSetConfig] = ()) -> dict:
    """Per eval set, how many eval images have a near-copy among the candidates (CLIP §5); every
    dropped row (``reports/eval_matches.parquet``) and a sheet of matches side by side
    (``reports/eval_matches.png``, also a Prefect artifact). The sheet's eval images are read from
    ``eval_sets`` (the index keeps thumbnails only)."""
    from tasks.build.jobs import eval_index
    from tasks.dedup.eval_overlap import EVAL_MATCHES, MATCHES_SCHEMA, overlap_report
    from tasks.dedup.overlap_sheet import eval_images_by_id, match_sheet, matches_table

    store = clean.work.store
    tables = [store.read_parquet(WorkDir.side(EVAL_MATCHES, r.shard_id)) for r in clean.records if r.eval_matches]
    matches = pa.concat_tables([MATCHES_SCHEMA.empty_table(), *tables], promote_options="default")
    report = overlap_report(matches, eval_index(index, clean.work.storage))
    out = ObjectStore(dataset_root, clean.work.storage)
    out.write_json("reports/eval_overlap.json", report)
    out.write_parquet("reports/eval_matches.parquet", matches_table(matches))
    publish_table("eval-overlap", [{"eval_set": k, **v} for k, v in report.items()],
                  "eval images with a near-copy among the candidates")
    sheet = None
    if matches.num_rows and eval_sets:
        from infra.eval_sets import load_eval_set

        wanted = set(matches.column("eval_set").to_pylist())
        sets = [load_eval_set(e, max_images=e.max_images) for e in eval_sets if e.name in wanted]
        sheet = match_sheet(matches, eval_images_by_id(sets))
    if sheet is not None:
        out.write_bytes("reports/eval_matches.png", sheet)
        publish_image("eval-matches", sheet, "dropped candidates beside the eval image they copy, with the score")
    elif out.exists("reports/eval_matches.png"):
        out.delete("reports/eval_matches.png")  # an earlier build's sheet must not pass for this one's
    return report
