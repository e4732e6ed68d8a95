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
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from infra.config import BalanceConfig, DedupConfig, GatherConfig, ImageConfig, StorageConfig, TextFilterConfig
from infra.funnel import Funnel
from infra.storage import ObjectStore
from tasks.build.records import (CaptionCounts, CleanRecord, EvalIndexRef, FilterRecord, QueryListRef,
                                 QueryMatchCounts, UrlDrops, to_json)
from tasks.build.workdir import WorkDir
from tasks.step import StepOutput, run_steps

# ------------------------------------------------------------------------------------------------
# Worker-level caches: built once per worker process
# ------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4)
def text_filter_step(cfg: TextFilterConfig) -> Any:
    from tasks.text_filter import TextFilter

    return TextFilter(cfg)


def build_query_matcher(queries: QueryListRef, storage: StorageConfig) -> Any:
    """The matcher of a query list, built from the list (``tasks.query_match.QueryMatcher``)."""
    from tasks.query_match import QueryMatcher

    root, key = queries.uri.rsplit("/", 1)
    return QueryMatcher(ObjectStore(root, storage).read_parquet(key))


def ensure_query_matcher(work: WorkDir, queries: QueryListRef) -> None:
    """Build the matcher once per build (the driver) and store it with its automaton, so that every
    worker loads it instead of building it (the work directory is named by the query list's sha256)."""
    if not work.store.exists(WorkDir.QUERY_MATCHER):
        work.store.write_bytes(WorkDir.QUERY_MATCHER, build_query_matcher(queries, work.storage).to_bytes())


@functools.lru_cache(maxsize=2)
def query_matcher(work: WorkDir, queries: QueryListRef) -> Any:
    """The stored matcher (:func:`ensure_query_matcher`), loaded once per worker process."""
    from tasks.query_match import QueryMatcher

    if work.store.exists(WorkDir.QUERY_MATCHER):
        try:
            return QueryMatcher.from_bytes(work.store.read_bytes(WorkDir.QUERY_MATCHER))
        except Exception:  # noqa: BLE001 - e.g. a pyahocorasick upgrade: the list itself still works
            pass
    return build_query_matcher(queries, work.storage)


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
    return QueryMatchCounts(ids, counts)


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
    matcher = query_matcher(ctx.work, ctx.queries)
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
# balance -> fetch + images (+ hashes from the decoded pixels) -> eval-set dedup
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
    url_drops: UrlDrops | None = None  # rows another row's URL has, read per shard (None: URLs not deduped)


URL_STAGE = "dedup_url"
DUPLICATE_URL = "duplicate_url"


def _url_dedup_step(drops: UrlDrops | None, shard_id: str) -> Any:
    """Drop the rows whose URL a row of smaller sample_id has (found across all shards by the count stage)."""

    def step(table: pa.Table) -> StepOutput:
        funnel = Funnel()
        keep = drops.kept(table, shard_id) if drops is not None else pa.array(np.ones(table.num_rows, bool))
        return StepOutput(funnel.apply_mask(URL_STAGE, table, keep, DUPLICATE_URL), funnel)

    return step


def _hash_features(dedup: DedupConfig) -> Any:
    """The dedup hashes, computed by the image step from the pixels it decoded (decoded once)."""
    from tasks.dedup.hashing import HashFeatures

    return HashFeatures(dedup.hash_kind, dedup.low_info_max_std)


def _eval_dedup_step(ctx: CleanContext) -> Any:
    from tasks.dedup.eval_overlap import filter_eval_overlap

    index = eval_index(ctx.index, ctx.work.storage)
    return lambda table: filter_eval_overlap(table, index)  # the settings are the index's (part of its version)


def _decontamination_steps(ctx: CleanContext) -> list[Any]:
    return [_eval_dedup_step(ctx)] if ctx.dedup.against_eval and ctx.index is not None else []


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
        _url_dedup_step(ctx.url_drops, shard_id),
        lambda t: balance_table(t, counts, ctx.balance, thresholds=thresholds),
        # Fetch rows that have a URL and no inline image, then decode/validate/hash/encode every image.
        lambda t: gather_images(t, ctx.gather, ctx.images, features=_hash_features(ctx.dedup)),
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
    """Fetch a done shard's transient failures again; rows that now pass join its clean part.

    The shard's funnel then reads as if the recovered rows had passed the first time: their
    earlier drop reasons leave the ``gather`` stage, and the retry's outcomes join ``gather``,
    ``images`` and the stages after them, so every stage still balances and hands on its rows."""
    from tasks.dedup.eval_overlap import EVAL_MATCHES
    from tasks.gather import FAILED, FAILED_TRANSIENT, retry_transient

    store = ctx.work.store
    shard_id = done.shard_id
    previous = store.read_parquet(WorkDir.side(FAILED, shard_id))
    steps = [lambda t: retry_transient(t, ctx.gather, ctx.images, features=_hash_features(ctx.dedup)),
             *_decontamination_steps(ctx)]
    recovered = run_steps(previous, steps)
    transient = [r for r, s in zip(previous.column("reason").to_pylist(), previous.column("status").to_pylist())
                 if s == FAILED_TRANSIENT]
    funnel = _fold_retry(done.funnel, Counter(transient), recovered.funnel)
    table = store.read_parquet(WorkDir.clean(shard_id))
    if recovered.table.num_rows:
        table = pa.concat_tables([table, recovered.table.select(table.column_names).cast(table.schema)])
    side = dict(recovered.side)
    matches_key = WorkDir.side(EVAL_MATCHES, shard_id)
    if store.exists(matches_key) and EVAL_MATCHES in side:
        side[EVAL_MATCHES] = pa.concat_tables([store.read_parquet(matches_key), side[EVAL_MATCHES]])
    return _write_clean(ctx.work, shard_id, StepOutput(table, funnel, side))


def _fold_retry(first: Funnel, retried: Counter, retry: Funnel) -> Funnel:
    """The first pass's funnel with a retry folded in (see :func:`_retry_transient`)."""
    from tasks.gather import RETRY_STAGE
    from tasks.gather import STAGE as GATHER_STAGE
    from tasks.images import STAGE as IMAGE_STAGE

    funnel = Funnel().merge(first)
    gather = funnel.stage(GATHER_STAGE)
    gather.dropped.subtract(retried)  # counted in by the first pass; their outcome is the retry's now
    gather.dropped = Counter({k: v for k, v in gather.dropped.items() if v > 0})
    renamed = {RETRY_STAGE: GATHER_STAGE, f"{IMAGE_STAGE}_retry": IMAGE_STAGE}
    for name, stage in retry.stages.items():
        mine = funnel.stage(renamed.get(name, name))
        if name != RETRY_STAGE:
            mine.rows_in += stage.rows_in
        mine.rows_out += stage.rows_out
        mine.dropped.update(stage.dropped)
    return funnel
