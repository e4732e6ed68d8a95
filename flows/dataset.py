"""The dataset build as a Prefect flow: one task per stage, per-shard work fanned out to Ray.

read -> text filters -> query match -> [count] -> balance -> fetch + images -> eval dedup
-> [dataset dedup] -> shards -> manifest

Images are fetched only for pairs that survive the text filters, the query match and balancing:
at web scale that is a small fraction of the candidates, and the bandwidth is the cost.

Each stage is a Prefect task, so the UI draws the stages and their dependencies; inside a stage the
input shards run on Ray (see infra/ray_utils.map_shards). Every per-shard result is persisted with a
completion record, so a rerun (after a crash, a kill or a failed shard) redoes only what is missing.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from prefect import flow, get_run_logger, task

from infra.config import RESOLVED_CONFIG_NAME, Config, dump_config, to_dict
from infra.log import get_logger
from infra.manifest import Manifest
from infra.prefect_utils import ShardProgress, publish_image, publish_markdown, publish_table
from infra.fanout import ShardResult, init_ray, map_shards as _map_shards
from infra.funnel import Funnel

log = get_logger(__name__)


class ShardFailures(RuntimeError):
    """Some input shards failed; everything else is kept and a rerun retries only those."""


def _apply(item: tuple[str, tuple], fn: Any) -> Any:  # interim adapter to the fan-out's job protocol
    return fn(*item[1])


def map_shards(fn: Any, items: list, **kwargs: Any) -> list[ShardResult]:
    return _map_shards(_apply, items, context=fn, key=lambda it: it[0], **kwargs)


def _fingerprint(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _sources_identity(config: Config, base_dir: str) -> list:
    """The sources as config, plus size and mtime of local input files: a changed input is a new build."""
    import glob
    import os

    out = []
    for src in config.sources:
        path = src.path if os.path.isabs(src.path) or "://" in src.path else os.path.join(base_dir, src.path)
        files = sorted(glob.glob(path)) if "://" not in path else []
        out.append([to_dict(src), [(f, os.path.getsize(f), int(os.path.getmtime(f))) for f in files if os.path.isfile(f)]])
    return out


def _raise_on_failures(stage: str, results: list[ShardResult]) -> list[Any]:
    failed = [r for r in results if not r.ok]
    if failed:
        lines = "\n".join(f"  {r.key}: {r.error.splitlines()[0] if r.error else '?'}" for r in failed[:20])
        raise ShardFailures(f"{stage}: {len(failed)} of {len(results)} shards failed (the rest are kept; "
                            f"rerun the same build to retry only these):\n{lines}")
    return [r.value for r in results]


def _is_transient(task, task_run, state) -> bool:  # Prefect retry condition: I/O errors only
    try:
        state.result()
    except (OSError, TimeoutError, ConnectionError):
        return True
    except Exception:  # noqa: BLE001 - anything else is a bug or bad input: do not retry
        return False
    return False


@task(name="plan-inputs")
def plan_inputs(config: Config, base_dir: str) -> list[Any]:
    from tasks.readers import plan_input_shards

    shards = plan_input_shards(config.sources, base_dir)
    get_run_logger().info("%d input shards from %d sources", len(shards), len(config.sources))
    return shards


@task(name="queries", retries=2, retry_delay_seconds=2, retry_condition_fn=_is_transient)
def locate_queries(config: Config) -> dict:
    """The query list this build matches against (built first if it does not exist)."""
    from infra.storage import ObjectStore

    root = config.uri(config.queries.output)
    store = ObjectStore(root, config.storage)
    if not store.exists("queries.parquet"):
        from flows.queries import build_queries

        build_queries(config)
    data = store.read_bytes("queries.parquet")  # read once: checksum and row count from the same bytes
    rows = pq.ParquetFile(pa.BufferReader(data)).metadata.num_rows
    return {"uri": store.uri("queries.parquet"), "sha256": hashlib.sha256(data).hexdigest(), "rows": rows}


@task(name="read-filter-match")
def filter_stage(config: Config, shards: list[Any], queries: dict, work_root: str) -> list[dict]:
    from tasks.stages import filter_shard

    items = [(s.shard_id, (s, work_root, config.storage, queries["uri"], queries["sha256"], config.text_filter))
             for s in shards]
    results = map_shards(filter_shard, items, desc="read/filter/match",
                         on_done=ShardProgress("read → text filters → query match"))
    return _raise_on_failures("read-filter-match", results)


@task(name="count-queries")
def count_stage(config: Config, records: list[dict], queries: dict, work_root: str) -> dict:
    from tasks.stages import write_cap_thresholds, write_query_counts

    counts = write_query_counts(work_root, config.storage, records, queries["rows"])
    if config.balance.mode == "exact":
        write_cap_thresholds(work_root, config.storage, [r["shard_id"] for r in records], config.balance, counts.size)
    return {"matched_queries": int((counts > 0).sum()), "pairs": int(counts.sum()),
            "over_cap": int((counts > config.balance.max_per_query).sum())}


@task(name="eval-index", retries=2, retry_delay_seconds=2, retry_condition_fn=_is_transient)
def eval_index_stage(config: Config) -> dict | None:
    """Build (or reuse: it is versioned by content) the perceptual-hash index of every eval set."""
    if not config.dedup.against_eval or not config.eval_sets:
        return None
    from infra.eval_sets import load_eval_set
    from infra.storage import ObjectStore
    from tasks.dedup import ensure_eval_index

    root = config.uri("eval_index")
    sets = [load_eval_set(e, max_images=e.max_images) for e in config.eval_sets]
    index, built = ensure_eval_index(sets, ObjectStore(root, config.storage), config.dedup.hash_kind,
                                     crop_variants=config.dedup.crop_variants,
                                     low_info_max_std=config.dedup.low_info_max_std,
                                     min_ncc=config.dedup.verify_min_ncc)
    get_run_logger().info("eval index %s (%s): %s", index.version, "built" if built else "reused", index.set_sizes())
    return {"root": root, "version": index.version, "sets": index.set_sizes(), "built": built}


@task(name="balance-fetch-images-eval-dedup")
def clean_stage(config: Config, records: list[dict], counts: dict, index: dict | None, filter_root: str,
                work_root: str, retry_failed: bool = False) -> list[dict]:
    from tasks.stages import clean_shard

    items = [(r["shard_id"], (r["shard_id"], filter_root, work_root, config.storage, config.balance, config.gather,
                              config.images, config.dedup, index["root"] if index else None,
                              index["version"] if index else None, retry_failed))
             for r in records]
    results = map_shards(clean_shard, items, desc="balance/fetch/images/eval-dedup",
                         on_done=ShardProgress("balance → fetch + images → eval-set dedup"))
    return _raise_on_failures("balance-fetch-images-eval-dedup", results)


@task(name="dedup-within-dataset")
def within_stage(config: Config, records: list[dict], work_root: str) -> dict:
    """Exact and near duplicates across all shards (two Ray shuffles); each group keeps its
    smallest sample_id, so the result does not depend on shard order."""
    import ray

    from infra.storage import ObjectStore
    from tasks.dedup import within_dataset_duplicates_ray
    from tasks.shards import select_holdout
    from tasks.stages import dedup_columns

    tables = [dedup_columns(r["shard_id"], work_root, config.storage, config.dedup.hash_kind) for r in records]
    part_of = {sid: r["shard_id"] for r, t in zip(records, tables) for sid in t.column("sample_id").to_pylist()}
    refs = [ray.put(t) for t in tables]
    drops: list[str] = []
    reasons: list[str] = []
    if config.dedup.within_dataset and records:
        dups = within_dataset_duplicates_ray(refs, config.dedup.within_radius, kind=config.dedup.hash_kind,
                                             min_ncc=config.dedup.verify_min_ncc)
        drops, reasons = dups.column("sample_id").to_pylist(), dups.column("reason").to_pylist()
    dropped = set(drops)
    # Held-out pairs for retrieval evaluation, chosen among the deduplicated rows.
    held = select_holdout((sid for sid in part_of if sid not in dropped), config.shards.holdout_rows)
    kept = {r["shard_id"]: r["rows"] for r in records}
    held_rows = {r["shard_id"]: 0 for r in records}
    for sid in dropped | held:
        kept[part_of[sid]] -= 1
    for sid in held:
        held_rows[part_of[sid]] += 1
    work = ObjectStore(work_root, config.storage)
    work.write_json("within_drops.json", sorted(drops))
    work.write_json("holdout_ids.json", sorted(held))
    return {"drops": len(drops), "kept_rows": kept, "holdout_rows": held_rows, "reasons": reasons}


@task(name="write-shards")
def shard_stage(config: Config, records: list[dict], within: dict, work_root: str, dataset_root: str) -> dict:
    from infra.storage import ObjectStore
    from tasks.shards import ShardSlice, plan_output_shards, remove_stale_shards
    from tasks.stages import write_output_shard

    work = ObjectStore(work_root, config.storage)
    drops = frozenset(work.read_json("within_drops.json"))
    held = frozenset(work.read_json("holdout_ids.json"))
    # Rows per clean part after the within-dataset drops and the hold-out: the plan is a pure
    # function of the data.
    parts = [(r["shard_id"], within["kept_rows"][r["shard_id"]],
              int(r["bytes"] * within["kept_rows"][r["shard_id"]] / max(r["rows"], 1))) for r in records]
    plan = plan_output_shards(parts, config.shards.rows_per_shard, config.shards.max_bytes_per_shard)
    holdout = [ShardSlice(r["shard_id"], 0, within["holdout_rows"][r["shard_id"]]) for r in records
               if within["holdout_rows"][r["shard_id"]]]
    common = (work_root, dataset_root, config.storage, drops | held, config.shards.row_group_rows,
              config.shards.compression)

    def plan_id(slices: list) -> str:  # what goes into a shard: a marker from another plan is stale
        return _fingerprint(work_root, [(s.part, s.start, s.stop) for s in slices], len(drops), sorted(held),
                            config.shards.row_group_rows, config.shards.compression)

    items = [(f"part-{i:05d}", (i, slices, *common, "shards", plan_id(slices))) for i, slices in enumerate(plan)]
    if holdout:
        items.append(("holdout", (0, holdout, *common, "holdout", plan_id(holdout), held)))
    results = map_shards(write_output_shard, items, desc="write shards", on_done=ShardProgress("write shards"))
    written = _raise_on_failures("write-shards", results)
    store = ObjectStore(dataset_root, config.storage)
    stale = remove_stale_shards(store, len(plan)) + remove_stale_shards(store, 1 if holdout else 0, "holdout")
    if stale:
        get_run_logger().info("removed %d files of an earlier plan's extra shards", len(stale))
    return {"shards": written[:len(plan)], "holdout": written[len(plan):]}


@task(name="manifest", retries=2, retry_delay_seconds=2, retry_condition_fn=_is_transient)
def manifest_stage(config: Config, dataset_root: str, written: dict, filtered: list[dict], clean: list[dict],
                   counts: dict, within: dict, queries: dict, index: dict | None, work_root: str) -> Manifest:
    from infra.manifest import build_manifest, write_manifest
    from infra.storage import ObjectStore

    store = ObjectStore(dataset_root, config.storage)
    funnel = Funnel()
    for r in filtered:
        funnel.merge(Funnel.from_dict(r["funnel"]))
    for r in clean:
        funnel.merge(Funnel.from_dict(r["funnel"]))
    kept_before_within = sum(r["rows"] for r in clean)
    funnel.record("dedup_within", kept_before_within, kept_before_within - within["drops"], within["reasons"])
    shards = written["shards"]
    manifest = build_manifest(config=to_dict(config), shards=shards, funnel=funnel.to_dict(), queries=queries,
                              eval_index=index, holdout=written["holdout"], work=work_root, query_counts=counts)
    store.write_json("reports/funnel.json", funnel.to_dict())
    store.write_parquet("reports/funnel.parquet", funnel.to_table())
    write_manifest(store, manifest)
    publish_markdown("dataset-funnel", "## Dataset funnel\n\n" + funnel.to_markdown(),
                     f"{manifest.num_rows} rows in {manifest.num_shards} shards")
    publish_table("dataset-shards", [{k: s[k] for k in ("path", "rows", "bytes")} for s in shards])
    return manifest


@task(name="reports")
def report_stage(config: Config, dataset_root: str, filter_root: str, work_root: str, clean: list[dict],
                 queries: dict, index: dict | None) -> dict:
    """Per-query counts before/after balancing (with the log-log plot) and the eval overlap report."""
    import numpy as np

    from infra.storage import ObjectStore
    from tasks.balance import write_query_count_report
    from tasks.stages import load_query_counts

    store = ObjectStore(dataset_root, config.storage)
    before = load_query_counts(filter_root, config.storage)
    after = np.zeros_like(before)
    for r in clean:
        np.add.at(after, np.asarray(r["query_ids"], dtype=np.int64), np.asarray(r["query_counts"], dtype=np.int64))
    root, key = queries["uri"].rsplit("/", 1)
    names = ObjectStore(root, config.storage).read_parquet(key).select(["query_id", "query"])
    uris = write_query_count_report(store, before, after, names, config.balance.max_per_query, prefix="reports/")
    publish_image("query-counts", store.read_bytes("reports/query_counts.png"),
                  "pairs per query before and after balancing (log-log)")
    overlap = None
    if index:
        overlap = _overlap_report(config, work_root, clean, index)
        store.write_json("reports/eval_overlap.json", overlap)
        publish_table("eval-overlap", [{"eval_set": k, **v} for k, v in overlap.items()],
                      "eval images with a near-duplicate among the candidates")
    return {"query_counts": uris, "overlap": overlap}


def _overlap_report(config: Config, work_root: str, clean: list[dict], index: dict) -> dict:
    from infra.storage import ObjectStore
    from tasks.dedup import overlap_report
    from tasks.stages import load_eval_index

    work = ObjectStore(work_root, config.storage)
    tables = [work.read_parquet(f"eval_matches/{r['shard_id']}.parquet") for r in clean if r.get("eval_matches")]
    return overlap_report(tables, load_eval_index(index["root"], index["version"], config.storage))


@flow(name="build_dataset", log_prints=True)
def build_dataset(config: Config, base_dir: str = ".", retry_failed: bool = False) -> Manifest:
    """Build the dataset described by ``config``; returns the manifest.

    A rerun resumes; with ``retry_failed`` it also fetches again the samples that failed
    transiently (timeouts, 429/5xx, connection errors) in shards already done.
    """
    from infra.storage import ObjectStore

    init_ray(config.ray.address, config.ray.num_cpus, config.ray.include_dashboard, config.ray.object_store_memory_mb)
    dataset_root = config.uri(config.shards.output)
    store = ObjectStore(dataset_root, config.storage)
    store.write_text(RESOLVED_CONFIG_NAME, dump_config(config))

    index = eval_index_stage.submit(config)  # independent of the query list and the filter stage
    queries = locate_queries(config)
    shards = plan_inputs(config, base_dir)
    filter_fp = _fingerprint(_sources_identity(config, base_dir), to_dict(config.text_filter), queries["sha256"])
    filter_root = f"{dataset_root}/work/f-{filter_fp}"
    filtered = filter_stage(config, shards, queries, filter_root)
    counts = count_stage(config, filtered, queries, filter_root)
    index_result = index.result()
    clean_fp = _fingerprint(filter_fp, to_dict(config.balance), to_dict(config.gather), to_dict(config.images),
                            to_dict(config.dedup), index_result["version"] if index_result else None)
    work_root = f"{filter_root}/c-{clean_fp}"
    clean = clean_stage(config, filtered, counts, index_result, filter_root, work_root, retry_failed)
    within = within_stage(config, clean, work_root)
    written = shard_stage(config, clean, within, work_root, dataset_root)
    manifest = manifest_stage(config, dataset_root, written, filtered, clean, counts, within, queries,
                              index_result, work_root)
    report_stage(config, dataset_root, filter_root, work_root, clean, queries, index_result)
    print(f"dataset: {manifest.num_rows} rows in {manifest.num_shards} shards at {dataset_root}")
    return manifest

