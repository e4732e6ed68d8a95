"""The dataset build's per-shard jobs: ``job(item, context) -> record``, as ``infra.fanout`` runs them.

Each job composes the stage steps of the other ``tasks/`` modules (the ``tasks.step`` protocol) for
one shard, writes its outputs to the work directory, and writes its completion record last; a
rerun returns the record instead of redoing the work. They run on Ray workers: the stateful steps
(the language detector, the query automaton, the eval-set index) are built once per worker
process and cached, not rebuilt per shard.
"""

from __future__ import annotations

import functools
import io
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from infra.config import BalanceConfig, DedupConfig, GatherConfig, ImageConfig, StorageConfig, TextFilterConfig
from infra.funnel import Funnel
from infra.storage import ObjectStore
from tasks.build.records import (CaptionCounts, CleanRecord, EvalIndexRef, FilterRecord, QueryListRef,
                                 QueryMatchCounts, to_json)
from tasks.build.workdir import WorkDir
from tasks.step import StepOutput, run_steps

# ------------------------------------------------------------------------------------------------
# Worker-level caches: built once per worker process
# ------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4)
def text_filter_step(cfg: TextFilterConfig) -> Any:
    from tasks.text_filter import TextFilter

    return TextFilter(cfg)


@functools.lru_cache(maxsize=2)
def query_matcher(queries: QueryListRef, storage: StorageConfig) -> Any:
    from tasks.query_match import QueryMatcher

    root, key = queries.uri.rsplit("/", 1)
    return QueryMatcher(ObjectStore(root, storage).read_parquet(key))


@functools.lru_cache(maxsize=2)
def query_counts(work: WorkDir) -> np.ndarray:
    """The global per-query counts (balancing's input), as the count stage wrote them."""
    table = work.store.read_parquet(WorkDir.QUERY_COUNTS)
    counts = np.zeros(int(table.schema.metadata[b"num_queries"]), dtype=np.int64)
    counts[table.column("query_id").to_numpy()] = table.column("count_before").to_numpy()
    return counts


@functools.lru_cache(maxsize=2)
def cap_thresholds(work: WorkDir) -> np.ndarray:
    return np.load(io.BytesIO(work.store.read_bytes(WorkDir.CAP_THRESHOLDS)))


def eval_index(index: EvalIndexRef, storage: StorageConfig) -> Any:
    """The eval-set index (``tasks.dedup.EvalIndex``) of this build, loaded once per worker."""
    return _load_eval_index(index.root, index.version, storage)


@functools.lru_cache(maxsize=2)
def _load_eval_index(root: str, version: str, storage: StorageConfig) -> Any:
    from tasks.dedup.eval_index import EvalIndex

    return EvalIndex.load(ObjectStore(root, storage), version)


def _match_counts(query_ids: pa.ChunkedArray | pa.Array) -> QueryMatchCounts:
    from tasks.balance import sparse_query_counts

    ids, counts = sparse_query_counts(query_ids)
    return QueryMatchCounts(tuple(ids.tolist()), tuple(counts.tolist()))


# ------------------------------------------------------------------------------------------------
# read -> text filters -> query match
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FilterContext:
    work: WorkDir
    queries: QueryListRef
    text_filter: TextFilterConfig
    captions: CaptionCounts | None = None  # the build's repeated-caption count (None: not counted)


@functools.lru_cache(maxsize=2)
def boilerplate_captions(work: WorkDir, key: str) -> frozenset[str]:
    """The normalised captions the count stage found boilerplate (read once per worker)."""
    from tasks.captions import boilerplate_values

    return boilerplate_values(work.store.read_parquet(key))


def filter_shard(shard: Any, ctx: FilterContext) -> FilterRecord:
    """read -> caption -> text filters -> query match, for one input shard (``tasks.readers.InputShard``).

    Text is filtered before anything is fetched: at web scale most candidates fail the text filters
    or match no query, and fetching their images first would waste most of the bandwidth.
    """
    from tasks.captions import OUTCOMES, CaptionStep, length_histogram, primary_field_captions
    from tasks.readers import read_input_shard_with_funnel

    store = ctx.work.store
    record_key = WorkDir.filter_record(shard.shard_id)
    if store.exists(record_key):
        return FilterRecord.from_json(store.read_json(record_key))
    table, funnel = read_input_shard_with_funnel(shard)
    policy = shard.source.caption
    before = length_histogram(primary_field_captions(table, policy))
    boilerplate = boilerplate_captions(ctx.work, ctx.captions.key) if ctx.captions else frozenset()
    matcher = query_matcher(ctx.queries, ctx.work.storage)
    out = run_steps(table, [CaptionStep(policy, boilerplate), text_filter_step(ctx.text_filter), matcher], funnel)
    outcomes = out.side.get(OUTCOMES)
    if outcomes is not None and outcomes.num_rows:
        store.write_parquet(WorkDir.side(OUTCOMES, shard.shard_id), outcomes)
    store.write_parquet(WorkDir.filtered(shard.shard_id), out.table)
    record = FilterRecord(shard.shard_id, out.table.num_rows, out.funnel,
                          _match_counts(out.table.column("query_ids")), tuple(before))
    store.write_json(record_key, to_json(record))
    return record


# ------------------------------------------------------------------------------------------------
# balance -> fetch + images -> hash -> eval-set dedup
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CleanContext:
    filter_work: WorkDir
    work: WorkDir
    balance: BalanceConfig
    gather: GatherConfig
    images: ImageConfig
    dedup: DedupConfig
    index: EvalIndexRef | None
    retry_failed: bool = False


def _hash_step(dedup: DedupConfig) -> Any:
    from tasks.dedup.hashing import hash_table

    def step(table: pa.Table) -> StepOutput:
        return StepOutput(hash_table(table, dedup.hash_kind, low_info_max_std=dedup.low_info_max_std))

    return step


def _eval_dedup_step(ctx: CleanContext) -> Any:
    from tasks.dedup.eval_overlap import filter_eval_overlap

    index = eval_index(ctx.index, ctx.work.storage)
    return lambda table: filter_eval_overlap(table, index)  # the settings are the index's (part of its version)


def _decontamination_steps(ctx: CleanContext) -> list[Any]:
    steps = [_hash_step(ctx.dedup)]
    if ctx.dedup.against_eval and ctx.index is not None:
        steps.append(_eval_dedup_step(ctx))
    return steps


def clean_shard(record: FilterRecord, ctx: CleanContext) -> CleanRecord:
    """balance -> fetch + decode/validate/resize -> hash -> eval-set dedup, for one filtered shard.

    With ``ctx.retry_failed``, a shard already done fetches again only its samples that failed
    transiently (timeouts, 5xx, connection errors) and adds the ones that now pass.
    """
    from tasks.balance import balance_table
    from tasks.gather import gather_images

    shard_id = record.shard_id
    store = ctx.work.store
    if store.exists(WorkDir.clean_record(shard_id)):
        done = CleanRecord.from_json(store.read_json(WorkDir.clean_record(shard_id)))
        if ctx.retry_failed and done.transient_failures:
            return _retry_transient(done, ctx)
        return done
    table = ctx.filter_work.store.read_parquet(WorkDir.filtered(shard_id))
    thresholds = cap_thresholds(ctx.filter_work) if ctx.balance.mode == "exact" else None
    counts = query_counts(ctx.filter_work)
    steps = [
        lambda t: balance_table(t, counts, ctx.balance, thresholds=thresholds),
        # Fetch rows that have a URL and no inline image, then decode/validate/re-encode every image.
        lambda t: gather_images(t, ctx.gather, ctx.images),
        *_decontamination_steps(ctx),
    ]
    return _write_clean(ctx.work, shard_id, run_steps(table, steps))


def _write_clean(work: WorkDir, shard_id: str, out: StepOutput) -> CleanRecord:
    """Persist one clean part and its side outputs, then its completion record (last)."""
    from tasks.dedup.eval_overlap import EVAL_MATCHES
    from tasks.gather import FAILED, FAILED_TRANSIENT

    store = work.store
    failures = out.side.get(FAILED)
    if failures is not None and failures.num_rows:  # kept aside with reasons and statuses, for retries
        store.write_parquet(WorkDir.side(FAILED, shard_id), failures)
    elif store.exists(WorkDir.side(FAILED, shard_id)):
        store.delete(WorkDir.side(FAILED, shard_id))
    matches = out.side.get(EVAL_MATCHES)
    if matches is not None and matches.num_rows:
        store.write_parquet(WorkDir.side(EVAL_MATCHES, shard_id), matches)
    store.write_parquet(WorkDir.clean(shard_id), out.table)
    transient = (failures.column("status").to_pylist().count(FAILED_TRANSIENT)
                 if failures is not None and failures.num_rows and "status" in failures.column_names else 0)
    record = CleanRecord(shard_id, out.table.num_rows, int(out.table.nbytes), out.funnel,
                         _match_counts(out.table.column("query_ids")),
                         matches.num_rows if matches is not None else 0, transient)
    store.write_json(WorkDir.clean_record(shard_id), to_json(record))
    return record


def _retry_transient(done: CleanRecord, ctx: CleanContext) -> CleanRecord:
    """Fetch a done shard's transient failures again; rows that now pass join its clean part."""
    from tasks.dedup.eval_overlap import EVAL_MATCHES
    from tasks.gather import FAILED, retry_transient

    store = ctx.work.store
    shard_id = done.shard_id
    previous = store.read_parquet(WorkDir.side(FAILED, shard_id))
    steps = [lambda t: retry_transient(t, ctx.gather, ctx.images), *_decontamination_steps(ctx)]
    recovered = run_steps(previous, steps, Funnel().merge(done.funnel))
    table = store.read_parquet(WorkDir.clean(shard_id))
    if recovered.table.num_rows:
        table = pa.concat_tables([table, recovered.table.select(table.column_names).cast(table.schema)])
    side = dict(recovered.side)
    matches_key = WorkDir.side(EVAL_MATCHES, shard_id)
    if store.exists(matches_key) and EVAL_MATCHES in side:
        side[EVAL_MATCHES] = pa.concat_tables([store.read_parquet(matches_key), side[EVAL_MATCHES]])
    return _write_clean(ctx.work, shard_id, StepOutput(table, recovered.funnel, side))
