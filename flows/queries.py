"""``witflow queries``: build the query list as a Prefect flow (orchestration only).

One task per source (Wikipedia dump counts on Ray, unigrams, PMI bigrams, page titles, WordNet), then
the merge, then the write of ``queries.parquet``, ``queries_manifest.json`` and
``config.resolved.yaml`` under ``config.uri(config.queries.output)``. The logic is in tasks/queries.py.
"""

from __future__ import annotations

import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from infra.config import RESOLVED_CONFIG_NAME, Config, QueriesConfig, RayConfig, dump_config, to_dict
from infra.log import get_logger, log_event
from tasks import queries as q
from infra.funnel import Funnel

log = get_logger(__name__)
QUERIES_KEY = "queries.parquet"
MANIFEST_KEY = "queries_manifest.json"


@dataclass
class SourceResult:
    """One source's candidate queries and what the manifest records about it."""

    name: str
    entries: dict[str, Any]
    report: dict[str, Any] = field(default_factory=dict)
    inputs: list[dict] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def _is_transient(task, task_run, state) -> bool:  # Prefect retry condition: storage I/O only
    try:
        state.result()
    except (TimeoutError, ConnectionError):
        return True
    except Exception:  # noqa: BLE001 - bad inputs will not fix themselves
        return False
    return False


def _unigram_reference(spec: str, stats: Counter) -> tuple[dict[str, int], list[dict]]:
    if spec == "pywordfreq":
        return q.read_pywordfreq_counts(stats), [q.input_record(q.pywordfreq_counts_path())]
    return q.read_counts_file(spec, stats), [q.input_record(spec)]


@task(name="queries-count-dumps", cache_policy=NO_CACHE)
def count_dumps_task(cfg: QueriesConfig, ray_cfg: RayConfig, work_dir: str) -> q.DumpCounts:
    from infra.fanout import init_ray

    init_ray(address=ray_cfg.address, num_cpus=ray_cfg.num_cpus, include_dashboard=ray_cfg.include_dashboard,
             object_store_memory_mb=ray_cfg.object_store_memory_mb)
    keep = min(cfg.min_unigram_count, cfg.bigram_min_count)
    settings = q.CountSettings(work_dir=work_dir, num_partitions=cfg.count_partitions,
                               max_entries=cfg.count_max_entries, min_unigram_keep=keep,
                               min_bigram_keep=cfg.bigram_min_count)
    t0 = time.perf_counter()
    counts = q.count_dump(list(cfg.wikipedia_dumps), settings, use_ray=True,
                          on_progress=lambda bid, s: log_event(log, "dump block counted", block=bid,
                                                               pages=s.get("pages", 0), tokens=s.get("tokens", 0)))
    seconds = time.perf_counter() - t0
    get_run_logger().info("dump counts: %d tokens, %d pages in %.1fs (%.0f tokens/s)", counts.total_tokens,
                          counts.stats.get("pages", 0), seconds, counts.total_tokens / max(seconds, 1e-9))
    return counts


@task(name="queries-unigrams", cache_policy=NO_CACHE)
def unigrams_task(cfg: QueriesConfig, dump_counts: q.DumpCounts | None) -> SourceResult:
    funnel, stats = Funnel(), Counter()
    res = SourceResult("unigram", {})
    if dump_counts is not None:
        counts = dump_counts.unigrams()
        res.report["input"] = "wikipedia_dumps"
        if cfg.unigram_counts:
            res.warnings.append(f"unigram_counts {cfg.unigram_counts!r} not used: counted from wikipedia_dumps")
    elif cfg.unigram_counts:
        counts, res.inputs = _unigram_reference(cfg.unigram_counts, stats)
        res.report["input"] = cfg.unigram_counts
    else:
        res.warnings.append("unigrams skipped: no unigram_counts and no wikipedia_dumps")
        return res
    res.entries = q.select_unigrams(counts, cfg.min_unigram_count, funnel)
    res.report.update({"min_count": cfg.min_unigram_count, "read": dict(stats), "funnel": funnel.to_dict()})
    return res


@task(name="queries-bigrams", cache_policy=NO_CACHE)
def bigrams_task(cfg: QueriesConfig, dump_counts: q.DumpCounts | None) -> SourceResult:
    funnel, stats = Funnel(), Counter()
    res = SourceResult("bigram", {})
    if dump_counts is not None:
        unigrams, bigrams, total = dump_counts.unigrams(), dump_counts.iter_bigrams(), dump_counts.total_tokens
        res.report["input"] = "wikipedia_dumps"
    elif cfg.bigram_counts == "wordsegment":
        src = q.read_wordsegment_counts(stats)
        unigrams, bigrams, total = src.unigrams, src.bigrams, src.total_tokens
        res.inputs = [q.input_record(f) for f in src.files]
        res.report["input"] = "wordsegment (Google Web 1T bigram/unigram counts; not Wikipedia)"
    elif cfg.bigram_counts:
        ref = cfg.bigram_unigram_counts or cfg.unigram_counts
        if not ref:
            raise ValueError("queries.bigram_counts is a file: PMI needs bigram_unigram_counts (or unigram_counts)")
        bigrams = q.read_counts_file(cfg.bigram_counts, stats)
        unigrams, ref_inputs = _unigram_reference(ref, Counter())
        total = cfg.bigram_total_tokens or sum(unigrams.values())
        res.inputs = [q.input_record(cfg.bigram_counts)] + ref_inputs
        res.report["input"] = cfg.bigram_counts
        res.report["pmi_unigrams"] = ref
    else:
        res.warnings.append("bigrams skipped: no bigram_counts and no wikipedia_dumps")
        return res
    res.entries = q.pmi_bigrams(bigrams, unigrams, total, cfg.bigram_min_count, cfg.bigram_min_pmi, funnel)
    res.report.update({"min_count": cfg.bigram_min_count, "min_pmi_bits": cfg.bigram_min_pmi,
                       "total_tokens": total, "read": dict(stats), "funnel": funnel.to_dict()})
    return res


@task(name="queries-titles", cache_policy=NO_CACHE)
def titles_task(cfg: QueriesConfig) -> SourceResult:
    res = SourceResult("title", {})
    if not cfg.pageviews:
        res.warnings.append("titles skipped: no pageview files (queries.pageviews is empty)")
        return res
    views, stats, funnel = Counter(), Counter(), Funnel()
    for path in cfg.pageviews:
        q.count_pageviews_file(path, views, stats)
        res.inputs.append(q.input_record(path))
    res.entries = q.select_titles(views, cfg.min_title_views, funnel)
    res.report = {"min_views": cfg.min_title_views, "files": len(cfg.pageviews), "projects": list(q.TITLE_PROJECTS),
                  "lines": dict(stats), "funnel": funnel.to_dict()}
    return res


@task(name="queries-wordnet", cache_policy=NO_CACHE)
def wordnet_task(cfg: QueriesConfig) -> SourceResult:
    res = SourceResult("wordnet", {})
    wn_dir = q.find_wordnet_dir(cfg.wordnet_dir)
    if wn_dir is None:
        res.warnings.append("wordnet skipped: " + ("wordnet_dir is empty" if not cfg.wordnet_dir else
                                                   "no local WordNet 3.0 found (apt-get install wordnet-base)"))
        return res
    names, info = q.wordnet_lemma_names(wn_dir)
    funnel = Funnel()
    res.entries = q.select_wordnet(names, funnel)
    res.inputs = [{"path": str(wn_dir / f), "sha256": h} for f, h in info.pop("sha256").items()]
    res.report = {**info, "funnel": funnel.to_dict()}
    return res


@task(name="queries-merge", cache_policy=NO_CACHE)
def merge_task(results: list[SourceResult], cfg: QueriesConfig) -> tuple[Any, dict]:
    table, report = q.build_query_table({r.name: r.entries for r in results if r.entries},
                                         max_queries=cfg.max_queries, priority=cfg.priority)
    return table, report


@task(name="queries-write", retries=2, retry_delay_seconds=2, retry_condition_fn=_is_transient, cache_policy=NO_CACHE)
def write_task(config: Config, table: Any, manifest: dict) -> str:
    from infra.storage import ObjectStore

    store = ObjectStore(config.uri(config.queries.output), config.storage)
    store.write_parquet(QUERIES_KEY, table)
    store.write_text(RESOLVED_CONFIG_NAME, dump_config(config))
    store.write_json(MANIFEST_KEY, manifest)  # last: its presence marks a complete output
    return store.uri(QUERIES_KEY)


def _up_to_date(config: Config) -> str | None:
    """The existing output's URI if it was built from the same queries config and inputs."""
    from infra.storage import ObjectStore

    store = ObjectStore(config.uri(config.queries.output), config.storage)
    if not (store.exists(MANIFEST_KEY) and store.exists(QUERIES_KEY)):
        return None
    try:
        manifest = store.read_json(MANIFEST_KEY)
        if manifest.get("config") != to_dict(config.queries):
            return None
        for rec in manifest.get("inputs", []):
            if "bytes" in rec and q.input_record(rec["path"])["sha256"] != rec["sha256"]:
                return None
    except (OSError, ValueError, KeyError):
        return None
    return store.uri(QUERIES_KEY)


@flow(name="build-queries", log_prints=True)
def build_queries(config: Config) -> str:
    """Build the query list from the sources in ``config.queries``; returns the URI of queries.parquet."""
    cfg = config.queries
    t0 = time.perf_counter()
    existing = _up_to_date(config)
    if existing:
        print(f"queries: up to date ({existing}); same config and inputs")
        return existing
    dump_counts = None
    tmp_dir = None
    if cfg.wikipedia_dumps:
        work_dir = cfg.work_dir or (tmp_dir := tempfile.mkdtemp(prefix="witflow-counts-"))
        dump_counts = count_dumps_task(cfg, config.ray, work_dir)
    try:
        timings: dict[str, float] = {}
        results: list[SourceResult] = []
        for name, run in (("wordnet", lambda: wordnet_task(cfg)),
                          ("unigram", lambda: unigrams_task(cfg, dump_counts)),
                          ("bigram", lambda: bigrams_task(cfg, dump_counts)),
                          ("title", lambda: titles_task(cfg))):
            ts = time.perf_counter()
            results.append(run())
            timings[name] = round(time.perf_counter() - ts, 2)
    finally:
        if tmp_dir:
            q.remove_work_dir(tmp_dir)
    table, report = merge_task(results, cfg)
    warnings = [w for r in results for w in r.warnings]
    inputs = [i for r in results for i in r.inputs]
    if dump_counts is not None:
        inputs = [q.input_record(p) for p in cfg.wikipedia_dumps] + inputs
        if dump_counts.failed_blocks:
            warnings.append(f"dump blocks failed (not counted): {sorted(dump_counts.failed_blocks)}")
    wall = round(time.perf_counter() - t0, 2)
    manifest = {
        "schema_version": report["schema_version"],
        "config": to_dict(cfg),
        "total": report["total"],
        "per_source": {s: v["selected"] for s, v in report["sources"].items()},
        "budget": {k: report[k] for k in ("max_queries", "priority")} | {"sources": report["sources"]},
        "sources": {r.name: r.report for r in results},
        "dump_counts": None if dump_counts is None else {"total_tokens": dump_counts.total_tokens,
                                                         "stats": dump_counts.stats,
                                                         "failed_blocks": dump_counts.failed_blocks},
        "inputs": inputs,
        "warnings": warnings,
        "seconds": {**timings, "total": wall},
    }
    uri = write_task(config, table, manifest)
    for line in summary_lines(manifest, uri, time.perf_counter() - t0):
        print(line)
    return uri


def summary_lines(manifest: dict, uri: str, wall_s: float) -> list[str]:
    """The per-source counts, warnings and total that ``witflow queries`` prints."""
    lines = [f"queries: warning: {w}" for w in manifest["warnings"]]
    for s, v in manifest["budget"]["sources"].items():
        lines.append(f"queries: {s:8s} {v['selected']:>8,d} selected  ({v['candidates']:,} candidates, "
                     f"{v['already_in_list']:,} already in the list, {v['cut_by_budget']:,} cut by the budget)")
    lines.append(f"queries: total {manifest['total']:,} -> {uri}  (wall {wall_s:.1f}s)")
    return lines
