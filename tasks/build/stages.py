"""The dataset build's stages, one function per Prefect task of ``flows/dataset.py``.

Each fans its per-shard jobs (``tasks.build.jobs``) out through ``infra.fanout`` or runs one of
the global reduces between them: the per-query counts and cap thresholds (balancing), the
within-dataset duplicates and the hold-out, the output-shard plan, the manifest and the reports.
No reduce holds a per-sample list of the whole build on the driver except the within-dataset
drops (one id per dropped duplicate) and the hold-out (``shards.holdout_rows`` ids).
"""

from __future__ import annotations

import functools
import hashlib
import io
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from infra.config import (BalanceConfig, DedupConfig, EvalSetConfig, GatherConfig, ImageConfig, ShardConfig,
                          SourceConfig, StorageConfig, TextFilterConfig, to_dict)
from infra.fanout import map_shards, values_or_raise
from infra.funnel import Funnel
from infra.log import get_logger, log_event
from infra.manifest import Manifest, build_manifest
from infra.manifest import write_manifest as write_manifest_file
from infra.prefect_utils import publish_image, publish_markdown, publish_table
from infra.storage import ObjectStore
from tasks.build.jobs import CleanContext, FilterContext, clean_shard, filter_shard, query_counts
from tasks.build.records import (CaptionCounts, CleanStage, EvalIndexRef, FilterRecord, FilterStage, PartRows,
                                 QueryCountsSummary, QueryListRef, WithinResult, WrittenShards, to_json)
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
                   queries: QueryListRef, use_ray: bool = True) -> CaptionCounts | None:
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
    work = WorkDir.for_filter(dataset_root, storage, sources, base_dir, text_filter, queries.sha256)
    store = work.store
    if not store.exists(WorkDir.CAPTION_COUNTS):
        rows = sum((s.stop or s.start + s.source.rows_per_input_shard) - s.start for s in shards)
        partitions = max(1, min(1024, -(-rows // CAPTION_VALUES_PER_PARTITION)))
        scratch = store.child(WorkDir.caption_scratch(partitions))
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
                 captions: CaptionCounts | None = None, on_done: Progress = None, use_ray: bool = True) -> FilterStage:
    work = WorkDir.for_filter(dataset_root, storage, sources, base_dir, text_filter, queries.sha256)
    ctx = FilterContext(work, queries, text_filter, captions)
    results = map_shards(filter_shard, shards, context=ctx, desc="read/caption/filter/match", on_done=on_done,
                         use_ray=use_ray)
    return FilterStage(work, tuple(values_or_raise("read-filter-match", results)))


@dataclass(frozen=True)
class _CapContext:
    work: WorkDir
    balance: BalanceConfig


def _cap_hashes(record: FilterRecord, ctx: _CapContext) -> Any:
    from tasks.balance import CapHashes

    table = ctx.work.store.read_parquet(WorkDir.filtered(record.shard_id), columns=["sample_id", "query_ids"])
    return CapHashes.from_table(table, query_counts(ctx.work), ctx.balance)


def count_queries(filtered: FilterStage, num_queries: int, balance: BalanceConfig, *,
                  use_ray: bool = True) -> QueryCountsSummary:
    """Reduce the shards' match counts into the global per-query counts (balancing's input); in
    exact mode also the per-query cut-off hashes (a second pass over the shards)."""
    from tasks.balance import CapHashes

    counts = np.zeros(num_queries, dtype=np.int64)
    for r in filtered.records:
        np.add.at(counts, np.asarray(r.matches.query_ids, dtype=np.int64),
                  np.asarray(r.matches.query_counts, dtype=np.int64))
    nz = np.flatnonzero(counts)
    table = pa.table({"query_id": pa.array(nz, pa.int32()), "count_before": pa.array(counts[nz], pa.int64())})
    store = filtered.work.store
    store.write_parquet(WorkDir.QUERY_COUNTS, table.replace_schema_metadata({"num_queries": str(num_queries)}))
    if balance.mode == "exact":
        caps = CapHashes(balance.max_per_query)
        results = map_shards(_cap_hashes, filtered.records, context=_CapContext(filtered.work, balance),
                             desc="cap thresholds", use_ray=use_ray)
        for part in values_or_raise("cap-thresholds", results):
            caps.merge(part)
        buf = io.BytesIO()
        np.save(buf, caps.thresholds(num_queries))
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


# Read once per worker. Each file is complete before the first job that reads it starts (the drops
# before the hold-out jobs, the hold-out before the writers), so a cached copy is never stale.
@functools.lru_cache(maxsize=2)
def _drop_ids(work: WorkDir, prefix: str) -> pa.Array:
    return work.store.read_parquet(WorkDir.within_drops(prefix), columns=["sample_id"]).column("sample_id").combine_chunks()


@functools.lru_cache(maxsize=2)
def _held_ids(work: WorkDir, prefix: str) -> pa.Array:
    return work.store.read_parquet(WorkDir.holdout_ids(prefix)).column("sample_id").combine_chunks()


@dataclass(frozen=True)
class _SurvivorContext:
    work: WorkDir
    prefix: str
    holdout_rows: int


@dataclass(frozen=True)
class _Survivors:
    shard_id: str
    rows: int
    candidates: tuple[tuple[bytes, str], ...]


def _part_survivors(shard_id: str, ctx: _SurvivorContext) -> _Survivors:
    """Rows of one clean part left after the drops, and its candidates for the hold-out."""
    from tasks.shards import holdout_candidates

    ids = ctx.work.store.read_parquet(WorkDir.clean(shard_id), columns=["sample_id"]).column("sample_id")
    drops = _drop_ids(ctx.work, ctx.prefix)
    left = ids.filter(pc.invert(pc.is_in(ids, drops))).to_pylist() if len(drops) else ids.to_pylist()
    return _Survivors(shard_id, len(left), tuple(holdout_candidates(left, ctx.holdout_rows)))


def _duplicates(clean: CleanStage, dedup: DedupConfig, scratch: ObjectStore, use_ray: bool) -> pa.Table:
    from tasks.dedup.within import DUPLICATES_SCHEMA, PartRef, within_dataset_duplicates_distributed

    if not dedup.within_dataset or not clean.records:
        return DUPLICATES_SCHEMA.empty_table()
    store = clean.work.store
    parts = [PartRef(r.shard_id, store, WorkDir.clean(r.shard_id)) for r in clean.records]
    return within_dataset_duplicates_distributed(parts, scratch=scratch, radius=dedup.within_radius,
                                                 kind=dedup.hash_kind, min_ncc=dedup.verify_min_ncc, use_ray=use_ray)


def within_dataset(clean: CleanStage, dedup: DedupConfig, holdout_rows: int, *, use_ray: bool = True) -> WithinResult:
    """Exact and near duplicates across all shards (each group keeps its smallest sample_id, so the
    result does not depend on shard order), then the held-out pairs for retrieval evaluation: the
    ``holdout_rows`` deduplicated rows of smallest SHA-1 (``tasks.shards.select_holdout``)."""
    store = clean.work.store
    prefix = clean.work.within_prefix([(r.shard_id, r.rows, r.bytes) for r in clean.records],
                                      [to_dict(dedup), holdout_rows])
    dups = _duplicates(clean, dedup, store.child(WorkDir.within_scratch(prefix)), use_ray)
    store.write_parquet(WorkDir.within_drops(prefix), dups)
    ctx = _SurvivorContext(clean.work, prefix, holdout_rows)
    survivors = values_or_raise("within-dataset", map_shards(
        _part_survivors, [r.shard_id for r in clean.records], context=ctx, desc="hold-out", use_ray=use_ray))
    held = sorted(c for s in survivors for c in s.candidates)[:max(holdout_rows, 0)]
    held_ids = [sid for _, sid in held]
    store.write_parquet(WorkDir.holdout_ids(prefix), pa.table({"sample_id": pa.array(sorted(held_ids), pa.string())}))
    held_per_part = Counter()
    held_set = set(held_ids)
    for s in survivors:
        held_per_part[s.shard_id] = sum(1 for _, sid in s.candidates if sid in held_set)
    parts = tuple(PartRows(s.shard_id, s.rows - held_per_part[s.shard_id], held_per_part[s.shard_id])
                  for s in survivors)
    reasons = Counter(dups.column("reason").to_pylist())
    return WithinResult(prefix, dups.num_rows, dict(reasons), parts)


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
    dataset_root: str
    row_group_rows: int
    compression: str


def _write_output_shard(job: OutputShard, ctx: _WriteContext) -> dict:
    """Assemble one output shard from slices of clean parts and write it (skips if complete).

    Slices index the rows of a part left after dropping the duplicates and the held-out rows
    (the training shards), or the part's held-out rows (the held-out shard)."""
    from tasks.shards import is_complete, stats_key, write_shard

    out = ObjectStore(ctx.dataset_root, ctx.work.storage)
    if is_complete(out, job.index, job.plan_id, job.prefix):
        return out.read_json(stats_key(job.index, job.prefix))
    drops, held = _drop_ids(ctx.work, ctx.within_prefix), _held_ids(ctx.work, ctx.within_prefix)
    leave_out = pa.concat_arrays([drops, held]) if job.prefix == "shards" else None
    pieces = []
    for s in job.slices:
        table = ctx.work.store.read_parquet(WorkDir.clean(s.part))
        ids = table.column("sample_id")
        if leave_out is None:
            table = table.filter(pc.is_in(ids, held))
        elif len(leave_out):
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
    ctx = _WriteContext(clean.work, within.key, dataset_root, shards.row_group_rows, shards.compression)
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


class EvalContamination(RuntimeError):
    """Training shards hold rows an eval set shows; the message names the set and an id."""


def source_provenance(sources: Sequence[SourceConfig], base_dir: str) -> list[dict]:
    """Per source: kind, path, size, and the provenance a packaged table carries (origin, licence,
    attribution: the ``witflow.*`` Parquet metadata infra/openclipart.py and infra/emoji.py write)."""
    from tasks.readers import _resolve_files

    out = []
    for source in sources:
        entry: dict[str, Any] = {"kind": source.kind, "path": source.path, "files": []}
        if source.kind != "directory":
            for path, display in _resolve_files(source, Path(base_dir).resolve()):
                info: dict[str, Any] = {"file": display, "bytes": path.stat().st_size}
                if path.suffix == ".parquet":
                    meta = pq.read_schema(path).metadata or {}
                    info.update({k.decode()[len("witflow."):]: v.decode() for k, v in meta.items()
                                 if k.startswith(b"witflow.") and k not in (b"witflow.schema_version", b"witflow.table")})
                entry["files"].append(info)
        out.append(entry)
    return out


def eval_holdout_check(eval_sets: Sequence[EvalSetConfig], dataset_root: str, storage: StorageConfig,
                       written: WrittenShards) -> dict[str, dict[str, int]]:
    """Per eval set drawn from a training source: how many source rows it shows and how many of
    them are in the training shards (must be 0: raises :class:`EvalContamination`) or the held-out
    retrieval shards (reported)."""
    from infra.eval_sets import EvalSetError, training_ids

    store = ObjectStore(dataset_root, storage)

    def ids(entries: Sequence[Any]) -> pa.Array:
        cols = [store.read_parquet(e["path"], columns=["sample_id"]).column("sample_id") for e in entries]
        return pa.chunked_array(cols, pa.string()).combine_chunks() if cols else pa.array([], pa.string())

    train_ids, held_ids = ids(written.shards), ids(written.holdout)
    report: dict[str, dict[str, int]] = {}
    for cfg in eval_sets:
        try:
            held_out = training_ids(cfg)
        except EvalSetError as e:  # the eval index stage already failed or reported it
            log_event(log, "eval set not checked", name=cfg.name, error=str(e)[:200])
            continue
        if not held_out:
            continue
        wanted = pa.array(sorted(held_out), pa.string())
        in_train = train_ids.filter(pc.is_in(train_ids, wanted))
        report[cfg.name] = {"training_ids": len(held_out), "in_shards": len(in_train),
                            "in_holdout": int(pc.sum(pc.is_in(held_ids, wanted)).as_py() or 0)}
        if len(in_train):
            raise EvalContamination(f"{store.root}: {len(in_train)} training rows are images of eval set "
                                    f"{cfg.name!r} (e.g. {in_train[0].as_py()}): a reader lets them through")
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


def caption_report(*, dataset_root: str, filtered: FilterStage, captions: CaptionCounts | None,
                   manifest: Manifest, top: int = 20) -> dict[str, str]:
    """``reports/repeated_captions.parquet`` (the ``top`` most repeated caption values, what the
    caption step did with their rows, their different perceptual hashes in the output) and
    ``reports/caption_lengths.png`` + ``.parquet`` (words per caption as read and in the output),
    also as UI artifacts; their URIs."""
    from tasks.captions import (COUNTS_SCHEMA, MAX_WORDS_BUCKET, OUTCOMES, OUTCOMES_SCHEMA, final_caption_images,
                                length_histogram, render_caption_lengths, repeated_caption_report)

    work = filtered.work.store
    out = ObjectStore(dataset_root, filtered.work.storage)
    captions_out, metas, phashes = [], [], []
    for shard in manifest.shards:
        t = out.read_parquet(shard.path, columns=["caption", "meta", "phash"])
        captions_out += t.column("caption").to_pylist()
        metas += t.column("meta").to_pylist()
        phashes += t.column("phash").to_pylist()
    before = np.zeros(MAX_WORDS_BUCKET + 1, np.int64)
    for r in filtered.records:
        if r.caption_words:
            before += np.asarray(r.caption_words, np.int64)
    after = np.asarray(length_histogram(captions_out), np.int64)
    out.write_parquet("reports/caption_lengths.parquet", pa.table({
        "words": pa.array(range(MAX_WORDS_BUCKET + 1), pa.int32()), "as_read": pa.array(before), "output": pa.array(after)}))
    out.write_bytes("reports/caption_lengths.png", render_caption_lengths(before.tolist(), after.tolist()))
    publish_image("caption-lengths", out.read_bytes("reports/caption_lengths.png"),
                  "words per caption: as read (first caption field) and in the output")
    uris = {"lengths": out.uri("reports/caption_lengths.png")}
    if captions is None:
        return uris
    counts = work.read_parquet(captions.key) if work.exists(captions.key) else COUNTS_SCHEMA.empty_table()
    outcome_parts = [work.read_parquet(WorkDir.side(OUTCOMES, r.shard_id)) for r in filtered.records
                     if work.exists(WorkDir.side(OUTCOMES, r.shard_id))]
    outcomes = pa.concat_tables([OUTCOMES_SCHEMA.empty_table(), *outcome_parts])
    table = repeated_caption_report(counts, outcomes, final_caption_images(captions_out, metas, phashes), top)
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
