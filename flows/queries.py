"""``witflow queries``: build the query list as a Prefect flow (orchestration only).

One task per source (Wikipedia dump counts on Ray, unigrams, PMI bigrams, page titles, WordNet), then
the merge, then the write of ``queries.parquet``, ``queries_manifest.json`` and
``config.resolved.yaml`` under ``config.queries_uri()``. The logic is in tasks/queries/.
"""

from __future__ import annotations

import time
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from infra.config import Config, QueriesConfig, RayConfig, dump_config, to_dict
from infra.log import get_logger, log_event
from infra.prefect_utils import retry_if_transient
from tasks.queries.bigrams import bigram_source
from tasks.queries.dump_counts import DumpCounts, count_dump, count_settings, count_work_dir
from tasks.queries.merge import build_query_table
from tasks.queries.output import existing_output, query_manifest, summary_lines, write_query_list
from tasks.queries.source import SourceResult
from tasks.queries.titles import title_source
from tasks.queries.unigrams import unigram_source
from tasks.queries.wordnet import wordnet_source

log = get_logger(__name__)


@task(name="queries-count-dumps", cache_policy=NO_CACHE)
def count_dumps_task(cfg: QueriesConfig, ray_cfg: RayConfig, work_dir: str) -> DumpCounts:
    from infra.fanout import init_ray

    init_ray(address=ray_cfg.address, num_cpus=ray_cfg.num_cpus, include_dashboard=ray_cfg.include_dashboard,
             object_store_memory_mb=ray_cfg.object_store_memory_mb)
    settings = count_settings(work_dir, num_partitions=cfg.count_partitions, max_entries=cfg.count_max_entries,
                              min_unigram_count=cfg.min_unigram_count, bigram_min_count=cfg.bigram_min_count)
    t0 = time.perf_counter()
    counts = count_dump(list(cfg.wikipedia_dumps), settings, use_ray=True,
                        on_progress=lambda bid, s: log_event(log, "dump block counted", block=bid,
                                                             pages=s.get("pages", 0), tokens=s.get("tokens", 0)))
    seconds = time.perf_counter() - t0
    get_run_logger().info("dump counts: %d tokens, %d pages in %.1fs (%.0f tokens/s)", counts.total_tokens,
                          counts.stats.get("pages", 0), seconds, counts.total_tokens / max(seconds, 1e-9))
    return counts


@task(name="queries-unigrams", cache_policy=NO_CACHE)
def unigrams_task(cfg: QueriesConfig, dump_counts: DumpCounts | None) -> SourceResult:
    return unigram_source(dump_counts, cfg.unigram_counts, cfg.min_unigram_count)


@task(name="queries-bigrams", cache_policy=NO_CACHE)
def bigrams_task(cfg: QueriesConfig, dump_counts: DumpCounts | None) -> SourceResult:
    return bigram_source(dump_counts, bigram_counts=cfg.bigram_counts, bigram_unigram_counts=cfg.bigram_unigram_counts,
                         unigram_counts=cfg.unigram_counts, total_tokens=cfg.bigram_total_tokens,
                         min_count=cfg.bigram_min_count, min_pmi=cfg.bigram_min_pmi)


@task(name="queries-titles", cache_policy=NO_CACHE)
def titles_task(cfg: QueriesConfig) -> SourceResult:
    return title_source(cfg.pageviews, cfg.min_title_views)


@task(name="queries-wordnet", cache_policy=NO_CACHE)
def wordnet_task(cfg: QueriesConfig) -> SourceResult:
    return wordnet_source(cfg.wordnet_dir)


@task(name="queries-merge", cache_policy=NO_CACHE)
def merge_task(results: list[SourceResult], cfg: QueriesConfig) -> tuple[Any, dict]:
    return build_query_table({r.name: r.entries for r in results if r.entries},
                             max_queries=cfg.max_queries, priority=cfg.priority)


@task(name="queries-write", retries=2, retry_delay_seconds=2, retry_condition_fn=retry_if_transient,
      cache_policy=NO_CACHE)
def write_task(config: Config, table: Any, manifest: dict) -> str:
    from infra.storage import ObjectStore

    store = ObjectStore(config.queries_uri(), config.storage)
    return write_query_list(store, table, manifest, dump_config(config))


@flow(name="build-queries", log_prints=True)
def build_queries(config: Config) -> str:
    """Build the query list from the sources in ``config.queries``; returns the URI of queries.parquet."""
    from infra.storage import ObjectStore

    cfg = config.queries
    t0 = time.perf_counter()
    existing = existing_output(ObjectStore(config.queries_uri(), config.storage), to_dict(cfg))
    if existing:
        print(f"queries: up to date ({existing}); same config and inputs")
        return existing
    dump_counts = None
    timings: dict[str, float] = {}
    results: list[SourceResult] = []
    with count_work_dir(cfg.work_dir) as work_dir:
        if cfg.wikipedia_dumps:
            dump_counts = count_dumps_task(cfg, config.ray, work_dir)
        for name, run in (("wordnet", lambda: wordnet_task(cfg)),
                          ("unigram", lambda: unigrams_task(cfg, dump_counts)),
                          ("bigram", lambda: bigrams_task(cfg, dump_counts)),
                          ("title", lambda: titles_task(cfg))):
            ts = time.perf_counter()
            results.append(run())
            timings[name] = round(time.perf_counter() - ts, 2)
    table, report = merge_task(results, cfg)
    manifest = query_manifest(queries_config=to_dict(cfg), report=report, results=results, dump_counts=dump_counts,
                              dump_paths=cfg.wikipedia_dumps,
                              seconds={**timings, "total": round(time.perf_counter() - t0, 2)})
    uri = write_task(config, table, manifest)
    for line in summary_lines(manifest, uri, time.perf_counter() - t0):
        print(line)
    return uri
