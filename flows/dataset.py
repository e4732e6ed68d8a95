"""The dataset build as a Prefect flow: one task per stage; the stages are ``tasks.build.stages``.

[count captions] -> read -> caption -> text filters -> query match -> [dedupe URLs, count] -> balance
-> fetch + images -> eval dedup
-> [dataset dedup] -> shards -> manifest -> reports

Each stage is a Prefect task, so the UI draws the stages and their dependencies; inside a stage the
shards fan out to Ray (``infra.fanout.map_shards``). Every per-shard result is persisted with a
completion record, so a rerun (after a crash, a kill or a failed shard) redoes only what is
missing. This module only wires the config's sections to the stages and passes their typed records
along.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, task

from infra.config import Config, dump_config, to_dict
from infra.fanout import init_ray
from infra.lease import OutputLease
from infra.manifest import Manifest
from infra.prefect_utils import ShardProgress, crash_orphaned_runs_quietly, retry_if_transient, track_flow_run
from tasks.build import stages
from tasks.build.records import (CaptionCounts, CleanStage, EvalIndexRef, FilterStage, QueryCountsSummary, QueryListRef,
                                 WithinResult, WrittenShards)


@task(name="plan-inputs")
def plan_inputs(config: Config, base_dir: str) -> list[Any]:
    return stages.plan_inputs(config.sources, base_dir, config.storage)


@task(name="queries", retries=2, retry_delay_seconds=2, retry_condition_fn=retry_if_transient)
def locate_queries(config: Config) -> QueryListRef | None:
    """The query list this build matches against (None: not built yet)."""
    return stages.find_query_list(config.queries_uri(), config.storage)


@task(name="count-captions")
def caption_count_stage(config: Config, base_dir: str, shards: list[Any], queries: QueryListRef,
                        lease: OutputLease) -> CaptionCounts | None:
    """Captions repeated across many different images (boilerplate), counted before any filtering."""
    return stages.caption_counts(shards, dataset_root=config.dataset_uri(), storage=config.storage,
                                 sources=config.sources, base_dir=base_dir, text_filter=config.text_filter,
                                 queries=queries, lease=lease)


@task(name="read-filter-match")
def filter_stage(config: Config, base_dir: str, shards: list[Any], queries: QueryListRef,
                 lease: OutputLease, captions: CaptionCounts | None) -> FilterStage:
    return stages.filter_stage(shards, dataset_root=config.dataset_uri(), storage=config.storage,
                               sources=config.sources, base_dir=base_dir, text_filter=config.text_filter,
                               queries=queries, captions=captions, lease=lease,
                               on_done=ShardProgress("read → caption → text filters → query match"))


@task(name="count-queries")
def count_stage(config: Config, filtered: FilterStage, queries: QueryListRef) -> QueryCountsSummary:
    """The global reduce after the text stage: URLs shared across shards, then per-query counts."""
    return stages.count_queries(filtered, queries.rows, config.balance, dedupe_urls=config.gather.dedupe_urls,
                                task_memory_mb=config.dedup.task_memory_mb)


@task(name="eval-index", retries=2, retry_delay_seconds=2, retry_condition_fn=retry_if_transient)
def eval_index_stage(config: Config) -> EvalIndexRef | None:
    return stages.eval_index(config.eval_sets, config.eval_index_uri(), config.storage, config.dedup)


@task(name="balance-fetch-images-eval-dedup")
def clean_stage(config: Config, filtered: FilterStage, counts: QueryCountsSummary, index: EvalIndexRef | None,
                retry_failed: bool = False) -> CleanStage:
    return stages.clean_stage(filtered, balance=config.balance, gather=config.gather, images=config.images,
                              dedup=config.dedup, index=index, retry_failed=retry_failed, url_drops=counts.url_drops,
                              on_done=ShardProgress("balance → fetch + images → eval-set dedup"))


@task(name="dedup-within-dataset")
def within_stage(config: Config, clean: CleanStage) -> WithinResult:
    return stages.within_dataset(clean, config.dedup, config.shards.holdout_rows)


@task(name="write-shards")
def shard_stage(config: Config, clean: CleanStage, within: WithinResult) -> WrittenShards:
    return stages.write_output(clean, within, dataset_root=config.dataset_uri(), shards=config.shards,
                               on_done=ShardProgress("write shards"))


@task(name="manifest", retries=2, retry_delay_seconds=2, retry_condition_fn=retry_if_transient)
def manifest_stage(config: Config, written: WrittenShards, filtered: FilterStage, clean: CleanStage,
                   counts: QueryCountsSummary, within: WithinResult, queries: QueryListRef,
                   index: EvalIndexRef | None, base_dir: str = ".") -> Manifest:
    root = config.dataset_uri()
    return stages.write_manifest(dataset_root=root, storage=config.storage,
                                 config=to_dict(config), written=written, filtered=filtered, clean=clean,
                                 counts=counts, within=within, queries=queries, index=index,
                                 sources=stages.source_provenance(config.sources, base_dir, config.storage),
                                 eval_holdout=stages.eval_holdout_check(config.eval_sets, root, config.storage, written))


@task(name="reports")
def report_stage(config: Config, filtered: FilterStage, clean: CleanStage, queries: QueryListRef,
                 index: EvalIndexRef | None, captions: CaptionCounts | None, manifest: Manifest) -> dict:
    """Per-query counts before/after balancing (with the log-log plot), the eval overlap report,
    the most repeated captions and the caption lengths before/after."""
    return stages.reports(dataset_root=config.dataset_uri(), filtered=filtered, clean=clean,
                          queries=queries, index=index, max_per_query=config.balance.max_per_query,
                          eval_sets=config.eval_sets, captions=captions, manifest=manifest)


@flow(name="build_dataset", log_prints=True)
def build_dataset(config: Config, base_dir: str = ".", retry_failed: bool = False) -> Manifest:
    """Build the dataset described by ``config``; returns the manifest.

    A rerun resumes; with ``retry_failed`` it also fetches again the samples that failed
    transiently (timeouts, 429/5xx, connection errors) in shards already done.
    """
    shards = plan_inputs(config, base_dir)  # first: an unreadable input fails the build before any work
    crash_orphaned_runs_quietly()  # earlier runs whose process died without telling the API
    track_flow_run()
    init_ray(config.ray.address, config.ray.num_cpus, config.ray.include_dashboard, config.ray.object_store_memory_mb,
             config.ray.ship_code)
    # One build writes into a dataset at a time, and its workers stop writing when it is gone.
    lease = stages.take_output(config.dataset_uri(), config.storage)
    try:
        return _build(config, base_dir, retry_failed, lease, shards)
    finally:
        lease.release()


def _build(config: Config, base_dir: str, retry_failed: bool, lease: OutputLease,
           shards: list[Any]) -> Manifest:
    stages.record_config(config.dataset_uri(), config.storage, dump_config(config))
    index = eval_index_stage.submit(config)  # independent of the query list and the filter stage
    queries = locate_queries(config)
    if queries is None:
        from flows.queries import build_queries

        get_run_logger().info("no query list at %s: building it first", config.queries_uri())
        build_queries(config)
        queries = locate_queries(config)
    captions = caption_count_stage(config, base_dir, shards, queries, lease)
    filtered = filter_stage(config, base_dir, shards, queries, lease, captions)
    counts = count_stage(config, filtered, queries)
    index_ref = index.result()
    clean = clean_stage(config, filtered, counts, index_ref, retry_failed)
    within = within_stage(config, clean)
    written = shard_stage(config, clean, within)
    manifest = manifest_stage(config, written, filtered, clean, counts, within, queries, index_ref, base_dir)
    report_stage(config, filtered, clean, queries, index_ref, captions, manifest)
    print(f"dataset: {manifest.num_rows} rows in {manifest.num_shards} shards at {config.dataset_uri()}")
    return manifest
