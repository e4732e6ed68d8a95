"""Per-input-shard stage runners for the dataset build.

Each runner composes the pure stage functions of the other `tasks/` modules for one input shard,
persists its output under the build's work directory, and writes a completion record last; a rerun
returns the record instead of redoing the work. They run on Ray workers: stateful helpers (the
language detector, the query automaton, the eval-set index) are built once per worker process and
cached, not rebuilt per shard.

Work layout (fingerprints cover every input that changes a result, so a changed config never reuses
stale parts):

    <dataset>/work/f-<fp>/filtered/<shard_id>.parquet|.json       read -> text filters -> query match
    <dataset>/work/f-<fp>/query_counts.parquet                    global per-query counts (balancing)
    <dataset>/work/f-<fp>/cap_thresholds.npy                      exact-mode balancing cut per query
    <dataset>/work/f-<fp>/c-<fp2>/clean/<shard_id>.parquet|.json  balance -> fetch + images -> hash -> eval dedup
    <dataset>/work/f-<fp>/c-<fp2>/failed/<shard_id>.parquet       fetch/decode failures with status and reason
    <dataset>/work/f-<fp>/c-<fp2>/eval_matches/<shard_id>.parquet what each eval-dedup drop matched
    <dataset>/work/f-<fp>/c-<fp2>/within_drops.json               global within-dataset duplicates
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import pyarrow as pa

from infra.config import BalanceConfig, DedupConfig, GatherConfig, ImageConfig, StorageConfig, TextFilterConfig
from infra.funnel import Funnel


def _store(root: str, storage: StorageConfig) -> Any:
    from infra.storage import ObjectStore

    return ObjectStore(root, storage)


@functools.lru_cache(maxsize=4)
def _text_filter(cfg: TextFilterConfig) -> Any:
    from tasks.text_filter import TextFilter

    return TextFilter(cfg)


@functools.lru_cache(maxsize=2)
def _query_matcher(queries_uri: str, checksum: str, storage: StorageConfig) -> Any:
    from tasks.query_match import QueryMatcher

    root, key = queries_uri.rsplit("/", 1)
    return QueryMatcher(_store(root, storage).read_parquet(key))


@functools.lru_cache(maxsize=2)
def load_query_counts(work_root: str, storage: StorageConfig) -> np.ndarray:
    table = _store(work_root, storage).read_parquet("query_counts.parquet")
    counts = np.zeros(int(table.schema.metadata[b"num_queries"]), dtype=np.int64)
    counts[table.column("query_id").to_numpy()] = table.column("count_before").to_numpy()
    return counts


@functools.lru_cache(maxsize=2)
def load_cap_thresholds(work_root: str, storage: StorageConfig) -> np.ndarray:
    import io

    return np.load(io.BytesIO(_store(work_root, storage).read_bytes("cap_thresholds.npy")))


def write_cap_thresholds(work_root: str, storage: StorageConfig, shard_ids: list[str], balance: BalanceConfig,
                         num_queries: int) -> None:
    """Exact-mode balancing's second global pass: per over-cap query, the hash that cuts it at t."""
    import io

    from tasks.balance import CapHashes

    work = _store(work_root, storage)
    counts = load_query_counts(work_root, storage)
    caps = CapHashes(balance.max_per_query)
    for sid in shard_ids:
        table = work.read_parquet(f"filtered/{sid}.parquet").select(["sample_id", "query_ids"])
        caps.merge(CapHashes.from_table(table, counts, balance))
    buf = io.BytesIO()
    np.save(buf, caps.thresholds(num_queries))
    work.write_bytes("cap_thresholds.npy", buf.getvalue())


@functools.lru_cache(maxsize=2)
def load_eval_index(index_root: str, version: str, storage: StorageConfig) -> Any:
    from tasks.dedup.eval_index import EvalIndex

    return EvalIndex.load(_store(index_root, storage), version)


def filter_shard(shard: Any, work_root: str, storage: StorageConfig, queries_uri: str, queries_checksum: str,
                 text: TextFilterConfig) -> dict:
    """read -> text filters -> query match, for one input shard.

    Text is filtered before anything is fetched: at web scale most candidates fail the text filters
    or match no query, and fetching their images first would waste most of the bandwidth.
    """
    from tasks.balance import count_queries
    from tasks.readers import read_input_shard_with_funnel

    work = _store(work_root, storage)
    record_key = f"filtered/{shard.shard_id}.json"
    if work.exists(record_key):
        return work.read_json(record_key)
    funnel = Funnel()
    table, f = read_input_shard_with_funnel(shard)
    funnel.merge(f)
    table, f = _text_filter(text)(table)
    funnel.merge(f)
    matcher = _query_matcher(queries_uri, queries_checksum, storage)
    table, f = matcher(table)
    funnel.merge(f)
    work.write_parquet(f"filtered/{shard.shard_id}.parquet", table)
    counts = count_queries(table.column("query_ids"), matcher.num_queries)
    nz = np.flatnonzero(counts)
    record = {"shard_id": shard.shard_id, "rows": table.num_rows, "funnel": funnel.to_dict(),
              "query_ids": nz.tolist(), "query_counts": counts[nz].tolist()}
    work.write_json(record_key, record)
    return record


def write_query_counts(work_root: str, storage: StorageConfig, records: list[dict], num_queries: int) -> np.ndarray:
    """Reduce the per-shard match counts into the global per-query counts (the balancing input)."""
    counts = np.zeros(num_queries, dtype=np.int64)
    for r in records:
        np.add.at(counts, np.asarray(r["query_ids"], dtype=np.int64), np.asarray(r["query_counts"], dtype=np.int64))
    nz = np.flatnonzero(counts)
    table = pa.table({"query_id": pa.array(nz, pa.int32()), "count_before": pa.array(counts[nz], pa.int64())})
    table = table.replace_schema_metadata({"num_queries": str(num_queries)})
    _store(work_root, storage).write_parquet("query_counts.parquet", table)
    return counts


def clean_shard(shard_id: str, filter_root: str, work_root: str, storage: StorageConfig, balance: BalanceConfig,
                gather: GatherConfig, images: ImageConfig, dedup: DedupConfig, index_root: str | None,
                index_version: str | None, retry_failed: bool = False) -> dict:
    """balance -> fetch + decode/validate/resize -> hash -> eval-set dedup, for one filtered shard.

    ``retry_failed``: for a shard already done, fetch again only its samples that failed
    transiently (timeouts, 5xx, connection errors) and add the ones that now pass.
    """
    from tasks.balance import balance_table
    from tasks.gather import gather_images_shard

    work = _store(work_root, storage)
    record_key = f"clean/{shard_id}.json"
    if work.exists(record_key):
        record = work.read_json(record_key)
        if retry_failed and record.get("transient_failures"):
            record = _retry_transient(record, work, storage, gather, images, dedup, index_root, index_version)
        return record
    funnel = Funnel()
    table = _store(filter_root, storage).read_parquet(f"filtered/{shard_id}.parquet")
    thresholds = load_cap_thresholds(filter_root, storage) if balance.mode == "exact" else None
    table, f = balance_table(table, load_query_counts(filter_root, storage), balance, thresholds=thresholds)
    funnel.merge(f)
    # Fetch rows that have a URL and no inline image, then decode/validate/re-encode every image.
    table, failures, f = gather_images_shard(table, gather, images)
    funnel.merge(Funnel.from_dict(f))
    table, matches = _hash_and_decontaminate(table, funnel, storage, dedup, index_root, index_version)
    return _write_clean(work, shard_id, table, failures, matches, funnel)


def _hash_and_decontaminate(table: pa.Table, funnel: Funnel, storage: StorageConfig, dedup: DedupConfig,
                            index_root: str | None, index_version: str | None) -> tuple[pa.Table, pa.Table | None]:
    from tasks.dedup.eval_overlap import filter_eval_overlap
    from tasks.dedup.hashing import hash_table

    table = hash_table(table, dedup.hash_kind, low_info_max_std=dedup.low_info_max_std)
    if not (dedup.against_eval and index_root and index_version):
        return table, None
    table, f, matches = filter_eval_overlap(table, load_eval_index(index_root, index_version, storage), dedup.eval_radius)
    funnel.merge(f)
    return table, matches


def _write_clean(work: Any, shard_id: str, table: pa.Table, failures: pa.Table, matches: pa.Table | None,
                 funnel: Funnel) -> dict:
    """Persist one clean part, its failures and eval matches, then its completion record (last)."""
    from tasks.gather import FAILED_TRANSIENT

    if failures.num_rows:  # kept aside with their reasons and statuses, for inspection and retries
        work.write_parquet(f"failed/{shard_id}.parquet", failures)
    elif work.exists(f"failed/{shard_id}.parquet"):
        work.delete(f"failed/{shard_id}.parquet")
    if matches is not None and matches.num_rows:
        work.write_parquet(f"eval_matches/{shard_id}.parquet", matches)
    work.write_parquet(f"clean/{shard_id}.parquet", table)
    ids = [np.asarray(q, dtype=np.int64) for q in table.column("query_ids").to_pylist()]
    query_ids, query_counts = np.unique(np.concatenate(ids) if ids else np.zeros(0, np.int64), return_counts=True)
    transient = (failures.column("status").to_pylist().count(FAILED_TRANSIENT)
                 if failures.num_rows and "status" in failures.column_names else 0)
    record = {"shard_id": shard_id, "rows": table.num_rows, "bytes": int(table.nbytes), "funnel": funnel.to_dict(),
              "eval_matches": matches.num_rows if matches is not None else 0, "transient_failures": transient,
              "query_ids": query_ids.tolist(), "query_counts": query_counts.tolist()}
    work.write_json(f"clean/{shard_id}.json", record)
    return record


def _retry_transient(record: dict, work: Any, storage: StorageConfig, gather: GatherConfig, images: ImageConfig,
                     dedup: DedupConfig, index_root: str | None, index_version: str | None) -> dict:
    """Fetch a done shard's transient failures again; rows that now pass join its clean part."""
    from tasks.gather import gather_images_shard

    shard_id = record["shard_id"]
    previous = work.read_parquet(f"failed/{shard_id}.parquet")
    recovered, failures, f = gather_images_shard(previous, gather, images, previous_failures=previous)
    for stage in f["stages"]:  # counted apart: these rows were already counted in by the first pass
        stage["stage"] = f"{stage['stage']}_retry"
    funnel = Funnel.from_dict(record["funnel"]).merge(Funnel.from_dict(f))
    recovered, matches = _hash_and_decontaminate(recovered, funnel, storage, dedup, index_root, index_version)
    table = work.read_parquet(f"clean/{shard_id}.parquet")
    if recovered.num_rows:
        recovered = recovered.select(table.column_names).cast(table.schema)
        table = pa.concat_tables([table, recovered])
    if work.exists(f"eval_matches/{shard_id}.parquet") and matches is not None:
        matches = pa.concat_tables([work.read_parquet(f"eval_matches/{shard_id}.parquet"), matches])
    return _write_clean(work, shard_id, table, failures, matches, funnel)


def dedup_columns(shard_id: str, work_root: str, storage: StorageConfig, hash_kind: str = "phash") -> pa.Table:
    """The small columns the global within-dataset dedup needs from one clean shard."""
    columns = ["sample_id", "sha256", "pixels_sha256", "low_info", "thumb", hash_kind]
    return _store(work_root, storage).read_parquet(f"clean/{shard_id}.parquet", columns=columns)


def write_output_shard(index: int, slices: list[Any], work_root: str, dataset_root: str, storage: StorageConfig,
                       drop_ids: frozenset[str], row_group_rows: int, compression: str, prefix: str = "shards",
                       plan_id: str = "", keep_ids: frozenset[str] | None = None) -> dict:
    """Assemble output shard ``index`` from slices of clean parts and write it (skips if complete).

    Slices index the rows of a part left after dropping ``drop_ids`` (or, with ``keep_ids``, the
    rows kept by it: the held-out shard)."""
    import pyarrow.compute as pc

    from tasks.shards import is_complete, stats_key, write_shard

    out = _store(dataset_root, storage)
    if is_complete(out, index, plan_id, prefix):
        return out.read_json(stats_key(index, prefix))
    work = _store(work_root, storage)
    pieces = []
    for s in slices:
        table = work.read_parquet(f"clean/{s.part}.parquet")
        if keep_ids is not None:
            table = table.filter(pc.is_in(table.column("sample_id"), pa.array(sorted(keep_ids), pa.string())))
        elif drop_ids:
            table = table.filter(pc.invert(pc.is_in(table.column("sample_id"), pa.array(sorted(drop_ids)))))
        pieces.append(table.slice(s.start, s.stop - s.start))
    table = pa.concat_tables(pieces, promote_options="default") if pieces else None
    status = pa.array(["ok"] * table.num_rows, pa.string())
    if "status" not in table.column_names:
        table = table.append_column("status", status)
    return write_shard(out, index, table, row_group_rows, compression, prefix, plan_id)
